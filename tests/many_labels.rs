//! A model with thousands of labels, as ML-Decoder's OpenImages setting has
//! (9,605 classes through group decoding): generated here, a small ML-Decoder
//! head with group queries and group fully-connected layers on a patch
//! embedding, run through the real binary on one camera and on four against
//! mosquitto. What must stay sane: `model-info`, `classify`, the `labels`
//! JSON, per-label topics and Home Assistant entities.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::onnx::*;
use common::*;
use prost::Message;
use tract_onnx::pb;

const WAIT: Duration = Duration::from_secs(60);
const CLASSES: usize = 9605;
/// Group decoding (Ridnik et al., 2021, section 3.2): K learned queries,
/// each decoded by its own fully-connected layer into ceil(classes / K)
/// logits; the concatenation, cut to the class count, is the output.
const GROUPS: usize = 100;
const PER_GROUP: usize = CLASSES.div_ceil(GROUPS);
const DIM: usize = 16;
/// Always ON (bias +6) and always OFF (bias -8); the others sit near 0.02.
const ALWAYS_ON: usize = 7;
const ALWAYS_OFF: usize = 42;

fn label(i: usize) -> String {
    format!("class_{i:04}")
}

/// Small deterministic weights (a linear congruential generator).
fn weights(count: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// image [1,3,64,64] -> 8x8 patch embedding (Conv) -> 64 tokens of 16 ->
/// cross-attention of 100 group queries over the tokens -> one
/// [16 x 97] fully-connected layer per group -> 9,700 logits -> the first
/// 9,605 plus a bias.
fn group_decoding_model(dir: &Path) -> PathBuf {
    let mut bias = vec![-4.0f32; CLASSES];
    bias[ALWAYS_ON] = 6.0;
    bias[ALWAYS_OFF] = -8.0;
    let initializer = vec![
        float_tensor("patch_w", &[DIM as i64, 3, 8, 8], &weights(DIM * 3 * 64, 1, 0.05)),
        float_tensor("patch_b", &[DIM as i64], &weights(DIM, 2, 0.05)),
        int64_tensor("tokens_shape", &[1, DIM as i64, 64]),
        float_tensor("queries", &[1, GROUPS as i64, DIM as i64], &weights(GROUPS * DIM, 3, 0.5)),
        int64_tensor("groups_shape", &[GROUPS as i64, 1, DIM as i64]),
        float_tensor(
            "group_fc",
            &[GROUPS as i64, DIM as i64, PER_GROUP as i64],
            &weights(GROUPS * DIM * PER_GROUP, 4, 0.05),
        ),
        int64_tensor("flat_shape", &[1, (GROUPS * PER_GROUP) as i64]),
        int64_tensor("cut_start", &[0]),
        int64_tensor("cut_end", &[CLASSES as i64]),
        int64_tensor("cut_axis", &[1]),
        float_tensor("class_bias", &[CLASSES as i64], &bias),
    ];
    let nodes = vec![
        node(
            "Conv",
            &["image", "patch_w", "patch_b"],
            &["patches"],
            vec![ints_attribute("kernel_shape", &[8, 8]), ints_attribute("strides", &[8, 8])],
        ),
        node("Reshape", &["patches", "tokens_shape"], &["tokens_cf"], vec![]),
        node("Transpose", &["tokens_cf"], &["tokens"], vec![ints_attribute("perm", &[0, 2, 1])]),
        node("MatMul", &["queries", "tokens_cf"], &["attention_logits"], vec![]),
        node("Softmax", &["attention_logits"], &["attention"], vec![int_attribute("axis", 2)]),
        node("MatMul", &["attention", "tokens"], &["decoded"], vec![]),
        node("Reshape", &["decoded", "groups_shape"], &["per_group"], vec![]),
        node("MatMul", &["per_group", "group_fc"], &["group_logits"], vec![]),
        node("Reshape", &["group_logits", "flat_shape"], &["all_logits"], vec![]),
        node("Slice", &["all_logits", "cut_start", "cut_end", "cut_axis"], &["cut"], vec![]),
        node("Add", &["cut", "class_bias"], &["logits"], vec![]),
    ];
    let names: Vec<String> = (0..CLASSES).map(label).collect();
    let metadata = [
        ("labelcast.name", "ml-decoder-9605".to_string()),
        ("labelcast.labels", serde_json::to_string(&names).unwrap()),
        ("labelcast.output", "logits".to_string()),
        ("labelcast.mean", "[0.5, 0.5, 0.5]".to_string()),
        ("labelcast.std", "[0.5, 0.5, 0.5]".to_string()),
    ];
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
        producer_name: "labelcast tests".into(),
        graph: Some(pb::GraphProto {
            name: "ml-decoder-groups".into(),
            node: nodes,
            initializer,
            input: vec![value_info("image", 1, &[1, 3, 64, 64])],
            output: vec![value_info("logits", 1, &[1, CLASSES as i64])],
            ..Default::default()
        }),
        metadata_props: metadata
            .into_iter()
            .map(|(k, v)| pb::StringStringEntryProto { key: k.into(), value: v })
            .collect(),
        ..Default::default()
    };
    let path = dir.join("ml-decoder-9605.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

#[test]
fn model_info_and_classify_stay_readable_with_9605_labels() {
    let dir = tempfile::tempdir().unwrap();
    let model = group_decoding_model(dir.path());
    let info = run_to_end(&mut labelcast(&["model-info", model.to_str().unwrap()]));
    assert!(info.status.success(), "{}", info.stderr);
    let line = info.stdout.lines().find(|l| l.starts_with("labels")).unwrap();
    assert!(line.contains("9605 from model") && line.contains("(9605 in all)") && line.len() < 400, "{line}");
    assert!(info.stdout.contains("output       logits [1, 9605]"), "{}", info.stdout);

    let out = run_to_end(&mut labelcast(&[
        "classify",
        "--json",
        "--model",
        model.to_str().unwrap(),
        photo("chelsea.jpg").to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", out.stderr);
    let payload: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let labels = payload["labels"].as_object().unwrap();
    assert!(labels.len() <= 21, "the ON label and at most 20 more, not 9605: {}", labels.len());
    assert_eq!(payload["active"], serde_json::json!([label(ALWAYS_ON)]));
    assert!(labels.values().all(|v| v["score"].as_f64().unwrap() >= 0.05), "only scores above the floor");
    let table = run_to_end(&mut labelcast(&[
        "classify",
        "--model",
        model.to_str().unwrap(),
        photo("chelsea.jpg").to_str().unwrap(),
    ]));
    assert!(table.stdout.contains(&format!("{} 0.99", label(ALWAYS_ON))), "{}", table.stdout);
}

fn config(broker: &Mosquitto, dir: &Path, model: &Path, cameras: usize) -> PathBuf {
    let mut text = format!(
        "[mqtt]\nurl = \"{}\"\n[model]\npath = \"{}\"\n[labels]\npublish = [\"{}\", \"{}\"]\ntop_k = 5\n",
        broker.url(),
        model.display(),
        label(ALWAYS_ON),
        label(ALWAYS_OFF)
    );
    for i in 0..cameras {
        text += &format!("[[camera]]\nid = \"cam{i}\"\nsource = \"test://pattern?width=320&height=240&fps=5\"\n");
    }
    let path = dir.join(format!("many-{cameras}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// On `cameras` cameras: each publishes the two listed labels' topics and
/// entities and nothing for the other 9,603; its `labels` JSON carries the
/// ON label and the top 5.
fn only_the_listed_labels_get_topics_and_entities(cameras: usize) {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = group_decoding_model(dir.path());
    let device = format!("many{cameras}");
    let sub = Subscriber::connect(broker.port, &format!("labelcast/{device}/#"));
    let ha = Subscriber::connect(broker.port, "homeassistant/#");
    let config = config(&broker, dir.path(), &model, cameras);
    let mut daemon = Daemon::start(&["run", "--config", config.to_str().unwrap(), "--device-id", &device]);
    let topic = |rest: &str| format!("labelcast/{device}/{rest}");
    for i in 0..cameras {
        sub.wait_for(&topic(&format!("cam{i}/label/{}", label(ALWAYS_ON))), "ON", WAIT);
        sub.wait_for(&topic(&format!("cam{i}/label/{}", label(ALWAYS_OFF))), "OFF", WAIT);
        wait_until(WAIT, || !sub.payloads(&topic(&format!("cam{i}/labels"))).is_empty()).expect("labels arrive");
        let payload: serde_json::Value =
            serde_json::from_str(&sub.payloads(&topic(&format!("cam{i}/labels"))).pop().unwrap()).unwrap();
        assert!(payload["labels"].as_object().unwrap().len() <= 6, "{payload}");
        assert_eq!(payload["active"], serde_json::json!([label(ALWAYS_ON)]));
    }
    wait_until(WAIT, || ha.all().iter().filter(|(t, _, _)| t.contains("/binary_sensor/")).count() >= 2 * cameras)
        .expect("discovery of the listed labels");
    // Give the daemon a stats round, then count what it announced.
    std::thread::sleep(Duration::from_secs(1));
    let label_topics: std::collections::HashSet<String> =
        sub.all().into_iter().map(|(t, _, _)| t).filter(|t| t.contains("/label/")).collect();
    assert_eq!(label_topics.len(), 2 * cameras, "{label_topics:?}");
    let entities: std::collections::HashSet<String> =
        ha.all().into_iter().map(|(t, _, _)| t).filter(|t| t.contains("/binary_sensor/")).collect();
    assert_eq!(entities.len(), 2 * cameras, "binary sensors announced: {entities:?}");
    let rss = rss_kib(daemon.pid());
    eprintln!("{cameras} camera(s), 9605 labels: RSS {} MB", rss / 1024);
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn with_9605_labels_one_camera_publishes_only_the_listed_labels() {
    only_the_listed_labels_get_topics_and_entities(1);
}

#[test]
fn with_9605_labels_four_cameras_publish_only_the_listed_labels() {
    only_the_listed_labels_get_topics_and_entities(4);
}
