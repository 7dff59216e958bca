//! The config file: any bytes through TOML parsing and validation must give a
//! config or a ConfigError naming a field, never a panic.
#![no_main]

use labelcast::config::{Config, RawConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
