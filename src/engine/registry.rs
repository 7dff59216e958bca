//! The inference backends labelcast knows, in one table: the names a
//! config may give, whether this build has each, how each loads, and what
//! `labelcast bench` measures on it. A new engine is a row here and a
//! module beside this one; nothing outside `engine/` matches on the kind.

use super::{Engine, onnxruntime, tract};
use crate::config::{ConfigError, EngineKind, Int8Mode, ModelConfig};

/// One inference backend.
pub struct Backend {
    pub kind: EngineKind,
    /// The spellings a config or flag may use; the first is the canonical one.
    pub names: &'static [&'static str],
    /// The cargo feature that builds it in (`None`: always built).
    pub feature: Option<&'static str>,
    load: fn(&ModelConfig) -> anyhow::Result<Box<dyn Engine>>,
    /// The INT8 modes `labelcast bench` measures on it.
    pub bench_int8_modes: &'static [Int8Mode],
    /// Whether `bench` also runs the demo's `-int8-cpu` file (uint8
    /// activations, what ONNX Runtime's CPU provider runs as integer kernels).
    pub bench_cpu_file: bool,
    /// Whether `bench` measures it when no `--engines` are given (it needs
    /// no GPU).
    pub bench_by_default: bool,
}

fn load_tract(config: &ModelConfig) -> anyhow::Result<Box<dyn Engine>> {
    Ok(Box::new(tract::TractEngine::load(config)?))
}

fn load_ort(config: &ModelConfig) -> anyhow::Result<Box<dyn Engine>> {
    // In a build without the feature this is `disabled.rs`, whose error says
    // which feature to rebuild with.
    Ok(Box::new(onnxruntime::OrtEngine::load(config, true)?))
}

pub static BACKENDS: [Backend; 3] = [
    Backend {
        kind: EngineKind::OnnxRuntime,
        names: &["onnxruntime", "ort"],
        feature: Some("onnxruntime"),
        load: load_ort,
        bench_int8_modes: &[Int8Mode::Native],
        bench_cpu_file: true,
        bench_by_default: true,
    },
    Backend {
        kind: EngineKind::Tract,
        names: &["tract"],
        feature: None,
        load: load_tract,
        bench_int8_modes: &[Int8Mode::Native, Int8Mode::WeightsOnly],
        bench_cpu_file: false,
        bench_by_default: true,
    },
    Backend {
        kind: EngineKind::TensorRt,
        names: &["tensorrt", "trt"],
        feature: Some("tensorrt"),
        load: load_ort,
        bench_int8_modes: &[Int8Mode::Native],
        bench_cpu_file: false,
        bench_by_default: false,
    },
];

impl Backend {
    /// Whether this build has it.
    pub fn is_built(&self) -> bool {
        match self.feature {
            None => true,
            Some("onnxruntime") => cfg!(feature = "onnxruntime"),
            Some("tensorrt") => cfg!(feature = "tensorrt"),
            Some(_) => false,
        }
    }

    pub fn load(&self, config: &ModelConfig) -> anyhow::Result<Box<dyn Engine>> {
        (self.load)(config)
    }

    pub fn name(&self) -> &'static str {
        self.names[0]
    }
}

/// The backend of an engine kind.
pub fn backend(kind: EngineKind) -> &'static Backend {
    BACKENDS.iter().find(|b| b.kind == kind).expect("every engine kind has a row in BACKENDS")
}

/// The backend a name means; the error lists the names there are.
pub fn by_name(name: &str) -> Result<&'static Backend, String> {
    BACKENDS.iter().find(|b| b.names.contains(&name)).ok_or_else(|| {
        let names: Vec<String> = BACKENDS.iter().map(|b| format!("{:?}", b.name())).collect();
        format!("expected {}, got {name:?}", names.join(", "))
    })
}

/// What a build without `backend` says when a config asks for it.
pub fn not_built(backend: &Backend) -> ConfigError {
    ConfigError::new(
        "model.engine",
        format!(
            "{:?} is not in this build: rebuild with `cargo build --release --features {}`, or use engine = \"tract\"",
            backend.name(),
            backend.feature.unwrap_or_default()
        ),
    )
}

/// The engines `labelcast bench` measures when none are named: those this
/// build has that need no GPU, in table order (ONNX Runtime, the usual
/// baseline, first).
pub fn bench_defaults() -> Vec<EngineKind> {
    BACKENDS.iter().filter(|b| b.bench_by_default && b.is_built()).map(|b| b.kind).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_kind_has_one_row_and_names_resolve_to_it() {
        for kind in [EngineKind::Tract, EngineKind::OnnxRuntime, EngineKind::TensorRt] {
            assert_eq!(backend(kind).kind, kind);
            for name in backend(kind).names {
                assert_eq!(by_name(name).unwrap().kind, kind);
            }
        }
        let err = by_name("openvino").err().unwrap();
        assert!(err.contains("\"onnxruntime\", \"tract\", \"tensorrt\""), "{err}");
        assert!(bench_defaults().contains(&EngineKind::Tract));
        assert!(!bench_defaults().contains(&EngineKind::TensorRt));
        let missing = not_built(backend(EngineKind::TensorRt));
        assert!(missing.message.contains("--features tensorrt"), "{missing}");
    }
}
