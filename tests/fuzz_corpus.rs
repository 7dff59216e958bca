//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`) through
//! the same property checks the cargo-fuzz targets run (`fuzz/checks.rs`),
//! in the ordinary test build: no instrumented build, no nightly. Whatever a
//! fuzzing run once found and kept stays a regression test here; the files
//! include the hand-made seeds (valid models, frames in every pixel format,
//! an MJPEG frame without Huffman tables, config files).

#[path = "../fuzz/checks.rs"]
#[allow(dead_code)]
mod checks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every corpus file of `target`; fails naming each file
/// whose check panicked. Returns how many files ran.
fn replay(target: &str, check: impl Fn(&[u8])) -> usize {
    let files = corpus(target);
    let failures: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).expect("a corpus file");
            catch_unwind(AssertUnwindSafe(|| check(&data))).err().map(|_| path.display().to_string())
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} {target} inputs failed: {failures:#?}", failures.len(), files.len());
    files.len()
}

#[test]
fn every_config_in_the_fuzz_corpus_parses_or_names_a_field() {
    let seeds =
        corpus("config").iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seed-")).count();
    assert!(seeds >= 3, "the hand-made config seeds are missing");
    assert!(replay("config", checks::config) > seeds);
}

#[test]
fn every_model_file_in_the_fuzz_corpus_loads_or_gives_an_error_naming_it() {
    assert!(replay("model_file", checks::model_file) >= 2);
}

#[test]
fn the_tiny_seed_models_in_the_fuzz_corpus_really_load() {
    // The seeds must be valid models, or the fuzzer starts from nothing.
    for name in ["seed-tiny-fp32.onnx", "seed-tiny-qdq-int8.onnx"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/model_file").join(name);
        let config = labelcast::config::ModelConfig::for_path(&path);
        let engine = labelcast::engine::inspect(&path, &config).unwrap_or_else(|err| panic!("{name}: {err:#}"));
        assert_eq!(engine.info().metadata.labels, ["cat", "dog", "bird"], "{name}");
    }
}

#[test]
fn every_frame_in_the_fuzz_corpus_decodes_or_is_skipped() {
    assert!(replay("frame_decode", checks::frame_decode) >= 9);
}

#[test]
fn every_payload_input_in_the_fuzz_corpus_gives_publishable_topics_and_json() {
    replay("mqtt_payload", |data| {
        if let Ok(input) = checks::PayloadInput::arbitrary_take_rest(Unstructured::new(data)) {
            checks::mqtt_payload(input);
        }
    });
}
