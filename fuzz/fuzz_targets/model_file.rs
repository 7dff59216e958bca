//! cargo-fuzz target: model files (see `fuzz/checks.rs`). Garbage, truncated
//! and mutated ONNX protobufs must come back as an error naming the file,
//! never a panic, an abort or a hang (libFuzzer's -timeout catches the last).
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(
    init: {
        // libfuzzer-sys aborts on every panic, even one that is caught. The
        // loader runs tract under catch_unwind and turns its panics into an
        // error naming the file, as the daemon does; keep that behaviour
        // (print, do not abort). A panic that escapes the loader still
        // reaches libfuzzer-sys's own catch_unwind, which aborts: a finding.
        std::panic::set_hook(Box::new(|info| eprintln!("caught while loading: {info}")));
    },
    |data: &[u8]| checks::model_file(data)
);
