//! The properties the fuzz targets check, one function per target, shared by
//! the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and by
//! `tests/fuzz_corpus.rs`, which replays every committed corpus file through
//! them in the ordinary test run. Each function panics when the property
//! does not hold; that is how libFuzzer and the test both see a failure.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use labelcast::config::{
    Config, HomeAssistantConfig, ModelConfig, RawConfig, ResizeMode, check_label_names, sanitize_id,
};
use labelcast::labels::{LabelEvent, LabelScore};
use labelcast::preprocess::Preprocessor;
use labelcast::publish::homeassistant::{Discovery, Entity};
use labelcast::publish::payload::{Topics, labels_json};
use labelcast::source::{Frame, PixelFormat};
use serde_json::Value;

/// The config file: any bytes through TOML parsing and validation give a
/// config or a ConfigError naming a field, never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let raw = match RawConfig::from_toml(text) {
        Ok(raw) => raw,
        Err(err) => {
            assert!(!err.field.is_empty(), "a parse error names no field: {err}");
            return;
        }
    };
    if let Err(err) = Config::validate(raw) {
        assert!(!err.field.is_empty(), "a validation error names no field: {err}");
    }
}

/// Model files: any bytes as an `.onnx` file through the loader `run` and
/// `model-info` use (protobuf decoding, the QDQ repair, metadata, tract's
/// analysis under catch_unwind) give a model or an error naming the file.
pub fn model_file(data: &[u8]) {
    let mut file = tempfile::Builder::new().suffix(".onnx").tempfile().expect("a temporary file");
    file.write_all(data).expect("writing the temporary model");
    let path = file.path();
    if let Err(err) = labelcast::engine::inspect(path, &ModelConfig::for_path(path)) {
        let message = format!("{err:#}");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(message.contains(name), "the error does not name the model file: {message}");
    }
}

const FORMATS: [PixelFormat; 5] =
    [PixelFormat::Mjpeg, PixelFormat::Yuyv, PixelFormat::Nv12, PixelFormat::Gray8, PixelFormat::Rgb8];
const MODES: [ResizeMode; 3] = [ResizeMode::CenterCrop, ResizeMode::Letterbox, ResizeMode::Stretch];
const INPUTS: [(usize, usize); 3] = [(32, 32), (24, 40), (1, 1)];

/// Camera frames: byte 0 picks the pixel format, bytes 1 and 2 the width and
/// height (1 to 256), byte 3 extra stride bytes, byte 4 the resize mode and
/// the model input size; the rest is the frame (for MJPG, the JPEG file). A
/// bad frame is an error (skipped and counted by the daemon); a good one
/// gives a tensor of finite numbers.
pub fn frame_decode(input: &[u8]) {
    let [format, width, height, stride_pad, choice, data @ ..] = input else { return };
    let format = FORMATS[*format as usize % FORMATS.len()];
    let (width, height) = (*width as u32 + 1, *height as u32 + 1);
    let row_bytes = format.row_bytes(width as usize);
    let jpeg = format == PixelFormat::Mjpeg;
    let frame = Frame {
        format,
        width: if jpeg { 0 } else { width },
        height: if jpeg { 0 } else { height },
        stride: if jpeg { 0 } else { row_bytes + (*stride_pad as usize % 8) },
        data: data.to_vec(),
        sequence: 0,
        captured_at: SystemTime::UNIX_EPOCH,
        origin: Some("fuzz".into()),
    };
    let mode = MODES[*choice as usize % MODES.len()];
    let (model_w, model_h) = INPUTS[(*choice as usize / MODES.len()) % INPUTS.len()];
    let mut preprocessor = Preprocessor::new(model_w, model_h, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], mode);
    let mut tensor = preprocessor.new_tensor();
    if preprocessor.run(&frame, &mut tensor).is_ok() {
        assert_eq!(tensor.data.len(), 3 * model_w * model_h);
        assert!(tensor.data.iter().all(|v| v.is_finite()), "a decoded frame gave a non-finite input value");
    }
}

/// What goes into topics and payloads: label names (from a model, a sidecar
/// or the config), raw scores (NaN and infinities included), a frame's
/// origin, the device id, and a retained config the broker replays.
#[derive(Debug, Arbitrary)]
pub struct PayloadInput {
    device: String,
    origin: Option<String>,
    model: String,
    sequence: u64,
    inference_ms: f64,
    labels: Vec<(String, f32, bool)>,
    retained_config: Vec<u8>,
}

/// MQTT 5 / 3.1.1: a topic to publish to is 1 to 65535 bytes of UTF-8 with
/// no U+0000 and no wildcard.
fn assert_publishable(topic: &str) {
    assert!(!topic.is_empty() && topic.len() <= 65535, "topic length {}", topic.len());
    assert!(!topic.contains(['+', '#', '\0']), "topic {topic:?} cannot be published to");
}

/// For every set of names the config checks accept: each topic is
/// publishable, each payload is JSON carrying the names back, no two Home
/// Assistant entities share a topic, and a configured label is never taken
/// for a stale one.
pub fn mqtt_payload(input: PayloadInput) {
    let names: Vec<String> = input.labels.iter().map(|(name, ..)| name.clone()).collect();
    if check_label_names(&names, "fuzz").is_err()
        || labelcast::publish::homeassistant::check_entity_ids(&names, "fuzz").is_err()
    {
        return;
    }
    let device = sanitize_id(&input.device);
    if device.is_empty() {
        return;
    }
    let topics = Topics::new(&format!("labelcast/{device}"));
    for topic in [topics.available(), topics.labels(), topics.stats(), topics.source()] {
        assert_publishable(&topic);
    }

    let event = LabelEvent {
        sequence: input.sequence,
        timestamp: SystemTime::UNIX_EPOCH + Duration::from_millis(input.sequence % (1 << 44)),
        origin: input.origin.map(Arc::from),
        model: Arc::from(input.model.as_str()),
        inference_ms: input.inference_ms,
        frame_ms: input.inference_ms,
        labels: input
            .labels
            .iter()
            .map(|(name, score, on)| LabelScore { name: Arc::from(name.as_str()), score: *score, on: *on })
            .collect(),
        changed: Vec::new(),
        camera: None,
        regions: Vec::new(),
    };
    let payload = labels_json(&event).to_string();
    let parsed: Value = serde_json::from_str(&payload).expect("the labels payload is JSON");
    for name in &names {
        assert_publishable(&topics.label(name));
        assert!(parsed["labels"].get(name).is_some(), "label {name:?} is missing from {payload}");
    }

    let ha = HomeAssistantConfig { prefix: "homeassistant".into(), birth_delay: Duration::ZERO };
    let discovery = Discovery::new(&ha, &device, topics.clone(), input.model.clone(), 60);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let entities: Vec<Entity> = refs
        .iter()
        .map(|name| Entity {
            key: name.to_string(),
            name: name.to_string(),
            state_topic: topics.label(name),
            snapshot_topic: Some(topics.snapshot(name)),
        })
        .collect();
    let messages = discovery.messages(&entities);
    let distinct: std::collections::HashSet<&String> = messages.iter().map(|(topic, _)| topic).collect();
    assert_eq!(distinct.len(), messages.len(), "two entities share a discovery topic: {messages:?}");
    for (topic, config) in messages {
        assert_publishable(&topic);
        assert_eq!(topic.split('/').count(), 4, "a discovery topic has 4 levels: {topic:?}");
        let config: Value = serde_json::from_str(&config).expect("a discovery config is JSON");
        // A label's binary_sensor reads its state topic, its snapshot's image entity its picture topic.
        let read = config.get("state_topic").or_else(|| config.get("image_topic"));
        assert_publishable(read.and_then(Value::as_str).expect("state_topic or image_topic"));
    }
    for name in &refs {
        let topic = format!("homeassistant/binary_sensor/{device}_{name}/config");
        assert_eq!(
            discovery.stale_label(&topic, &input.retained_config, &refs, &[] as &[&str], &[]),
            None,
            "{name:?} would be cleared"
        );
    }
}
