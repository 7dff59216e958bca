//! cargo-fuzz target: MQTT topics and payloads (see `fuzz/checks.rs`).
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(|input: checks::PayloadInput| checks::mqtt_payload(input));
