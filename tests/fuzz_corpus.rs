//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`) through
//! the same property checks the cargo-fuzz targets run (`fuzz/checks.rs`),
//! in the ordinary test build: no instrumented build, no nightly. Whatever a
//! fuzzing run once found and kept stays a regression test here; the files
//! include the hand-made seeds (valid models, frames in every pixel format,
//! an MJPEG frame without Huffman tables, config files). Then mutated
//! copies of the corpus go through the same checks, from a fixed seed.

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

/// The structured payload target's input, decoded as cargo-fuzz decodes it.
fn payload_from_bytes(data: &[u8]) {
    if let Ok(input) = checks::PayloadInput::arbitrary_take_rest(Unstructured::new(data)) {
        checks::mqtt_payload(input);
    }
}

#[test]
fn every_payload_input_in_the_fuzz_corpus_gives_publishable_topics_and_json() {
    replay("mqtt_payload", payload_from_bytes);
}

/// Mutated copies of the corpus, made the way libFuzzer mutates (bit flips,
/// boundary bytes, inserts, deletes, truncation, duplicated chunks, splices
/// of two inputs) but from a fixed seed, so a run is repeatable: what CI can
/// afford in seconds without the 21-minute instrumented build. Not
/// coverage-guided, so no substitute for `fuzz/run.sh`; it finds a property
/// broken near the corpus. A failing input is saved and named.
fn mutate_and_check(target: &str, iterations: usize, check: impl Fn(&[u8])) {
    let inputs: Vec<Vec<u8>> = corpus(target).iter().map(|path| std::fs::read(path).expect("a corpus file")).collect();
    let seed = target.bytes().fold(0x1abe_1ca5_u64, |hash, byte| hash.rotate_left(5) ^ u64::from(byte));
    let mut rng = fastrand::Rng::with_seed(seed);
    for iteration in 0..iterations {
        let mut data = inputs[rng.usize(..inputs.len())].clone();
        for _ in 0..rng.usize(1..=4) {
            mutate(&mut data, &inputs, &mut rng);
        }
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-mutations");
            std::fs::create_dir_all(&dir).expect("a folder for the failing input");
            let path = dir.join(format!("{target}-{iteration}"));
            std::fs::write(&path, &data).expect("saving the failing input");
            panic!(
                "mutation {iteration} of the {target} corpus broke its property; the input is {} \
                 (add it to fuzz/corpus/{target}/ once fixed)",
                path.display()
            );
        }
    }
}

fn mutate(data: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut fastrand::Rng) {
    const BOUNDARY_BYTES: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];
    let len = data.len();
    match rng.u8(..7) {
        0 if len > 0 => data[rng.usize(..len)] ^= 1 << rng.u8(..8),
        1 if len > 0 => data[rng.usize(..len)] = BOUNDARY_BYTES[rng.usize(..BOUNDARY_BYTES.len())],
        2 => {
            let at = rng.usize(..=len);
            let bytes: Vec<u8> = (0..rng.usize(1..=8)).map(|_| rng.u8(..)).collect();
            data.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let at = rng.usize(..len);
            let count = rng.usize(1..=(len - at).min(64));
            data.drain(at..at + count);
        }
        4 => data.truncate(rng.usize(..=len)),
        5 if len > 0 => {
            let at = rng.usize(..len);
            let chunk = data[at..at + rng.usize(1..=(len - at).min(64))].to_vec();
            let to = rng.usize(..=len);
            data.splice(to..to, chunk);
        }
        6 => {
            let other = &corpus[rng.usize(..corpus.len())];
            data.truncate(rng.usize(..=len));
            data.extend_from_slice(&other[rng.usize(..=other.len())..]);
        }
        _ => data.push(rng.u8(..)),
    }
}

#[test]
fn mutated_configs_parse_or_name_a_field() {
    mutate_and_check("config", 200_000, checks::config);
}

#[test]
fn mutated_model_files_load_or_give_an_error_naming_the_file() {
    mutate_and_check("model_file", 20_000, checks::model_file);
}

#[test]
fn mutated_frames_decode_or_are_skipped() {
    mutate_and_check("frame_decode", 30_000, checks::frame_decode);
}

#[test]
fn mutated_payload_inputs_give_publishable_topics_and_json() {
    mutate_and_check("mqtt_payload", 50_000, payload_from_bytes);
}
