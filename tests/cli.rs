//! The command line against the real binary, the shipped demo model and real
//! photos: what a user sees for good input and for each kind of bad input.

mod common;

use common::*;

#[test]
fn classify_prints_a_table_row_per_photo_with_the_labels_it_sees() {
    let out = run_to_end(&mut labelcast(&[
        "classify",
        "--model",
        demo_model().to_str().unwrap(),
        photo("chelsea.jpg").to_str().unwrap(),
        photo("coffee.jpg").to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(lines[0].contains("chelsea.jpg") && lines[0].contains("cat "), "{}", lines[0]);
    assert!(lines[1].contains("coffee.jpg") && lines[1].contains("drink "), "{}", lines[1]);
}

#[test]
fn classify_json_gives_one_object_per_photo_with_every_label_scored() {
    let out = run_to_end(&mut labelcast(&[
        "classify",
        "--json",
        "--model",
        demo_model().to_str().unwrap(),
        photo("astronaut.jpg").to_str().unwrap(),
        photo("china.jpg").to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", out.stderr);
    let objects: Vec<serde_json::Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 2);
    for object in &objects {
        let scores = scores_of(object);
        assert_eq!(scores.len(), 12, "every label is scored");
        assert!(scores.values().all(|s| (0.0..=1.0).contains(s)));
    }
    assert!(objects[0]["active"].as_array().unwrap().iter().any(|l| l == "person"), "{}", objects[0]);
    assert!(objects[1]["active"].as_array().unwrap().iter().any(|l| l == "building"), "{}", objects[1]);
}

#[test]
fn classify_names_a_missing_or_undecodable_file_and_still_does_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"this is not a picture").unwrap();
    let out = run_to_end(&mut labelcast(&[
        "classify",
        "--model",
        demo_model().to_str().unwrap(),
        "/nonexistent/photo.jpg",
        broken.to_str().unwrap(),
        photo("chelsea.jpg").to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("/nonexistent/photo.jpg") && out.stderr.contains("No such file"), "{}", out.stderr);
    assert!(out.stderr.contains("broken.png") && out.stderr.contains("not a readable"), "{}", out.stderr);
    assert!(out.stdout.contains("chelsea.jpg"), "the good photo is still classified: {}", out.stdout);
}

#[test]
fn model_info_reports_shapes_int8_labels_and_load_time() {
    let out = run_to_end(&mut labelcast(&["model-info", demo_model().to_str().unwrap()]));
    assert!(out.status.success(), "{}", out.stderr);
    let text = out.stdout;
    assert!(text.contains("[1, 3, 224, 224]"), "{text}");
    assert!(text.contains("[1, 12]"), "{text}");
    assert!(text.contains("int8         yes (QDQ)"), "{text}");
    assert!(text.contains("person, cat, dog"), "{text}");
    assert!(text.contains("engine       tract 0."), "{text}");
    assert!(text.contains("runs weights-only"), "the default INT8 mode is reported: {text}");

    let out = run_to_end(&mut labelcast(&["model-info", "--json", demo_fp32_model().to_str().unwrap()]));
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(info["int8"], false);
    assert_eq!(info["quantize_linear"], 0);
    assert_eq!(info["input"]["type"], "float32");
    assert_eq!(info["labels"].as_array().unwrap().len(), 12);
}

#[test]
fn a_truncated_model_is_refused_with_exit_78_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(demo_model()).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"\x08\x07 definitely not a protobuf \xff\xff\xff").unwrap();
    for model in [&truncated, &garbage] {
        let out = run_to_end(&mut labelcast(&[
            "classify",
            "--model",
            model.to_str().unwrap(),
            photo("chelsea.jpg").to_str().unwrap(),
        ]));
        assert_eq!(out.status.code(), Some(78), "{}", out.stderr);
        assert!(out.stderr.contains(model.to_str().unwrap()), "{}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn check(config: &std::path::Path) -> Finished {
    run_to_end(&mut labelcast(&["check-config", config.to_str().unwrap()]))
}

fn base_config() -> String {
    format!(
        "[source]\nuri = \"file://{}?fps=1\"\n[model]\npath = \"{}\"\n",
        repo().join("calibration/images").display(),
        demo_model().display()
    )
}

#[test]
fn a_good_config_passes_check_config_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &format!("{}[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n", base_config()));
    let out = check(&config);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("OK") && out.stdout.contains("12 labels"), "{}", out.stdout);
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = repo().join("systemd/config.example.toml");
    // The example points at installed paths; check it against the repo's copies.
    let out = run_to_end(&mut labelcast(&[
        "check-config",
        example.to_str().unwrap(),
        "--model",
        demo_model().to_str().unwrap(),
        "--source",
        &format!("file://{}?fps=1&loop=true", repo().join("calibration/images").display()),
    ]));
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn config_errors_exit_78_and_name_the_field() {
    let cases = [
        ("[mqtt]\nqos = 3\n", "mqtt.qos: expected 0, 1 or 2, got 3"),
        ("[mqtt]\nqso = 1\n", "mqtt.qso: unknown field `qso`"),
        ("[labels]\nthreshold = \"high\"\n", "labels.threshold: invalid type"),
        ("[labels]\nthreshold = 1.5\n", "labels.threshold: expected a number from 0 to 1, got 1.5"),
        ("[labels.overrides.dgo]\non = 0.5\n", "labels.overrides.dgo: the model has no label \"dgo\""),
        ("[mqtt]\nurl = \"http://broker\"\n", "mqtt.url: expected an mqtt:// or mqtts:// URL"),
    ];
    for (extra, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &format!("{}{extra}", base_config()));
        let out = check(&config);
        assert_eq!(out.status.code(), Some(78), "for {extra:?}: {}", out.stderr);
        assert!(out.stderr.contains(expected), "for {extra:?} expected {expected:?} in: {}", out.stderr);
        assert!(out.stderr.contains(config.to_str().unwrap()), "the file is named: {}", out.stderr);
    }
}

#[test]
fn a_label_list_that_does_not_match_the_model_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &format!("{}labels = [\"cat\", \"dog\"]\n", base_config()));
    let out = check(&config);
    assert_eq!(out.status.code(), Some(78), "{}", out.stderr);
    assert!(out.stderr.contains("outputs 12 scores but has 2 labels"), "{}", out.stderr);
    assert!(out.stderr.contains("model.labels"), "{}", out.stderr);
}

#[test]
fn a_missing_config_file_is_named() {
    let out = run_to_end(&mut labelcast(&["check-config", "/nonexistent/labelcast.toml"]));
    assert_eq!(out.status.code(), Some(78));
    assert!(out.stderr.contains("/nonexistent/labelcast.toml"), "{}", out.stderr);
}

#[test]
fn model_info_reports_the_int8_mode_it_was_asked_for() {
    let out = run_to_end(&mut labelcast(&["model-info", "--json", "--int8", "native", demo_model().to_str().unwrap()]));
    assert!(out.status.success(), "{}", out.stderr);
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(info["int8_mode"], "native");
    assert_eq!(info["activation_qdq_removed"], 0);
    assert_eq!(info["engine"]["name"], "tract");

    let out = run_to_end(&mut labelcast(&["model-info", "--json", demo_model().to_str().unwrap()]));
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(info["int8_mode"], "weights-only");
    assert!(info["activation_qdq_removed"].as_u64().unwrap() > 100, "{info}");

    let out = run_to_end(&mut labelcast(&["model-info", "--int8", "fast", demo_model().to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(78));
    assert!(out.stderr.contains("model.int8") && out.stderr.contains("weights-only"), "{}", out.stderr);
}

#[test]
fn an_engine_that_cannot_start_is_an_error_naming_the_library_unless_tract_is_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let strict = dir.path().join("strict.toml");
    std::fs::write(
        &strict,
        "[model]\nengine = \"onnxruntime\"\nonnxruntime_library = \"/nonexistent/libonnxruntime.so\"\n",
    )
    .unwrap();
    let photo_path = photo("chelsea.jpg");
    let out = run_to_end(&mut labelcast(&["classify", "-c", strict.to_str().unwrap(), photo_path.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(78), "{}", out.stderr);
    let expected =
        if cfg!(feature = "onnxruntime") { "/nonexistent/libonnxruntime.so" } else { "--features onnxruntime" };
    assert!(out.stderr.contains(expected), "{}", out.stderr);

    let lenient = dir.path().join("lenient.toml");
    std::fs::write(
        &lenient,
        "[model]\nengine = \"onnxruntime\"\nonnxruntime_library = \"/nonexistent/libonnxruntime.so\"\nfallback = \"tract\"\n",
    )
    .unwrap();
    let out = run_to_end(&mut labelcast(&["classify", "-c", lenient.to_str().unwrap(), photo_path.to_str().unwrap()]));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("WARN") && out.stderr.contains("running on tract"), "{}", out.stderr);
    assert!(out.stdout.contains("cat "), "{}", out.stdout);
    // The onnxruntime engine's default demo file (uint8 activations) is
    // swapped for the one made for tract.
    let loaded = out.stderr.lines().find(|l| l.contains("model loaded")).unwrap_or_default();
    assert!(loaded.contains("labelcast-demo-int8.onnx"), "{}", out.stderr);
}

/// Each engine runs the demo file made for it (uint8 activations on ONNX
/// Runtime, symmetric int8 on tract), so their scores differ by the two
/// files' INT8 rounding: no score may differ by more than the INT8
/// matrix's 0.1, a label may flip only where the two scores are within
/// `ROUNDING` of each other (the threshold then lies between them), every
/// other decision must agree, and the labels these photos plainly show must
/// be ON on both.
#[test]
fn classify_gives_the_same_labels_on_onnxruntime_as_on_tract_except_within_int8_rounding_of_a_threshold() {
    const ROUNDING: f64 = 0.05;
    if !cfg!(feature = "onnxruntime") || std::env::var_os("ORT_DYLIB_PATH").is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI runs the onnxruntime engine (tests/run.sh sets ORT_DYLIB_PATH)");
        eprintln!("skipped: ORT_DYLIB_PATH is not set");
        return;
    }
    let names = ["chelsea.jpg", "coffee.jpg", "china.jpg", "rocket.jpg"];
    let photos: Vec<String> = names.iter().map(|p| photo(p).display().to_string()).collect();
    let labels = |engine: &str| {
        let mut args = vec!["classify", "--json", "--engine", engine];
        args.extend(photos.iter().map(String::as_str));
        let out = run_to_end(&mut labelcast(&args));
        assert!(out.status.success(), "{engine}: {}", out.stderr);
        out.stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["labels"].clone())
            .collect::<Vec<_>>()
    };
    let (ort, tract) = (labels("onnxruntime"), labels("tract"));
    assert_eq!(ort.len(), names.len());
    for (((name, ort), tract), shown) in names.iter().zip(&ort).zip(&tract).zip(["cat", "drink", "building", "vehicle"])
    {
        for (label, o) in ort.as_object().unwrap() {
            let t = &tract[label];
            let (os, ts) = (o["score"].as_f64().unwrap(), t["score"].as_f64().unwrap());
            // The INT8 conformance matrix's tolerance between engines.
            assert!((os - ts).abs() <= 0.1, "{name} {label}: onnxruntime {os:.4}, tract {ts:.4}");
            if o["state"] != t["state"] {
                assert!(
                    (os - ts).abs() <= ROUNDING,
                    "{name} {label}: onnxruntime {os:.4} {} but tract {ts:.4} {}",
                    o["state"],
                    t["state"]
                );
            }
        }
        assert_eq!(ort[shown]["state"], "ON", "{name}: {shown} on onnxruntime: {}", ort[shown]);
        assert_eq!(tract[shown]["state"], "ON", "{name}: {shown} on tract: {}", tract[shown]);
    }
}

#[test]
fn bench_measures_every_engine_row_and_reports_ratios_against_the_first() {
    let out = run_to_end(&mut labelcast(&[
        "bench",
        "--json",
        "--iterations",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--engines",
        "tract",
        "--images",
        photo("chelsea.jpg").to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["float", "native", "weights-only"], "{report}");
    assert_eq!(rows[0]["p50_ratio"], 1.0);
    assert_eq!(rows[0]["max_score_diff"], 0.0);
    for row in rows {
        assert!(row["p50_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["peak_rss_mb"].as_f64().unwrap() > 10.0, "{row}");
        assert!(row["max_score_diff"].as_f64().unwrap() < 0.1, "INT8 stays close to FP32: {row}");
    }
}

#[test]
fn probe_lists_the_video_devices_or_says_there_are_none() {
    let out = run_to_end(&mut labelcast(&["probe"]));
    assert!(out.status.success(), "{}", out.stderr);
    let has_nodes =
        std::fs::read_dir("/dev").unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("video"));
    if has_nodes {
        assert!(out.stdout.contains("/dev/video"), "{}", out.stdout);
    } else {
        assert!(out.stdout.starts_with("no video devices found"), "{}", out.stdout);
    }
}

#[test]
fn probe_with_a_source_reports_the_format_rate_and_decode_time_it_measured() {
    for format in ["yuyv", "nv12", "grey", "mjpg"] {
        let uri = format!("test://pattern?width=320&height=240&fps=50&format={format}");
        let out = run_to_end(&mut labelcast(&["probe", "--source", &uri, "--frames", "10"]));
        assert!(out.status.success(), "{format}: {}", out.stderr);
        assert!(out.stdout.contains(&format!("frames:   10 {format}")), "{}", out.stdout);
        let rate: f64 = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("rate:"))
            .unwrap()
            .trim()
            .trim_end_matches(" fps")
            .parse()
            .unwrap();
        assert!(rate > 0.0, "{}", out.stdout);
        assert!(out.stdout.contains("decode:"), "{}", out.stdout);
    }
}

#[test]
fn probe_of_a_missing_camera_names_the_device_and_fails() {
    let out = run_to_end(&mut labelcast(&["probe", "--source", "/dev/video-labelcast-none"]));
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("/dev/video-labelcast-none") && out.stderr.contains("not plugged in"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_gstreamer_source_in_a_build_without_it_says_which_feature_to_enable() {
    let out =
        run_to_end(&mut labelcast(&["run", "--source", "rtsp://admin:hunter2@10.0.0.9/stream", "--output", "stdout"]));
    assert_eq!(out.status.code(), Some(78), "{}", out.stderr);
    assert!(out.stderr.contains("--features gstreamer"), "{}", out.stderr);
    assert!(!out.stderr.contains("hunter2"), "credentials never reach the log: {}", out.stderr);
}
