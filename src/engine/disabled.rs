//! Stands in for the ONNX Runtime engine in builds without the
//! `onnxruntime` feature, so a config that asks for it gets a clear
//! "rebuild with this feature" instead of an unknown-engine error.

use super::{Engine, ModelInfo, Tensor};
use crate::config::ModelConfig;

pub enum OrtEngine {}

impl OrtEngine {
    pub fn load(config: &ModelConfig, _require_labels: bool) -> anyhow::Result<OrtEngine> {
        Err(super::registry::not_built(super::registry::backend(config.engine)).into())
    }
}

impl Engine for OrtEngine {
    fn info(&self) -> &ModelInfo {
        match *self {}
    }
    fn infer(&mut self, _: &Tensor) -> anyhow::Result<Vec<f32>> {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, EngineKind};

    #[test]
    fn asking_for_onnxruntime_or_tensorrt_in_a_build_without_them_names_the_feature_to_enable() {
        for (engine, feature) in
            [(EngineKind::OnnxRuntime, "--features onnxruntime"), (EngineKind::TensorRt, "--features tensorrt")]
        {
            let config = ModelConfig { engine, ..ModelConfig::for_path("model.onnx") };
            let err = crate::engine::load(&config).err().expect("no such engine in this build");
            let config_error = err.downcast_ref::<ConfigError>().expect("a config error");
            assert_eq!(config_error.field, "model.engine");
            assert!(config_error.message.contains(feature), "{}", config_error.message);
        }
    }
}
