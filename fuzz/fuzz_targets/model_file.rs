//! Model files: garbage, truncated and mutated ONNX protobufs go through the
//! same loader `labelcast run` and `model-info` use (protobuf decoding, the
//! QDQ repair, metadata, tract's analysis under catch_unwind) and must come
//! back as an error naming the file, never a panic, an abort or a hang
//! (libFuzzer's -timeout catches the last).
#![no_main]

use std::io::Write;

use labelcast::config::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // libfuzzer-sys aborts on every panic, even one that is caught. The
        // loader runs tract under catch_unwind and turns its panics into an
        // error naming the file, as the daemon does; keep that behaviour
        // (print, do not abort). A panic that escapes the loader still
        // reaches libfuzzer-sys's own catch_unwind, which aborts: a finding.
        std::panic::set_hook(Box::new(|info| eprintln!("caught while loading: {info}")));
    },
    |data: &[u8]| {
        let mut file = tempfile::Builder::new().suffix(".onnx").tempfile().expect("a temporary file");
        file.write_all(data).expect("writing the temporary model");
        let path = file.path();
        let config = ModelConfig::for_path(path);
        if let Err(err) = labelcast::engine::inspect(path, &config) {
            let message = format!("{err:#}");
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert!(message.contains(name), "the error does not name the model file: {message}");
        }
    }
);
