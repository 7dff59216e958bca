//! Inference engines behind one trait, and the model facts they share.
//!
//! An engine takes a preprocessed [`Tensor`] and returns the model's raw
//! output scores (logits or probabilities, as the model's metadata says).
//! tract is always built ([`tract::TractEngine`]); faster or accelerated
//! engines join behind cargo features. No tract type leaves this module: the
//! rest of the daemon sees [`Tensor`], `Vec<f32>` scores and [`ModelInfo`].

pub mod metadata;
mod onnx_graph;
pub mod prepare;
pub mod qdq;
pub mod tract;

#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
#[cfg(not(feature = "onnxruntime"))]
#[path = "disabled.rs"]
pub mod onnxruntime;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use metadata::ModelMetadata;

use crate::config::{EngineKind, Int8Mode, ModelConfig};

/// A model input: NCHW float32, batch 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: [usize; 4]) -> Self {
        Self { shape, data: vec![0.0; shape.iter().product()] }
    }
}

/// Facts about a loaded model, for `model-info`, logs and validation.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// `tract`, `onnxruntime` or `tensorrt`.
    pub engine: &'static str,
    /// The engine build, e.g. `tract 0.23.9` or `ONNX Runtime 1.32.0 (CPU)`.
    pub engine_version: String,
    pub threads: usize,
    pub input_name: String,
    /// `[1, 3, height, width]`.
    pub input_shape: [usize; 4],
    pub input_type: String,
    pub output_name: String,
    pub output_shape: Vec<usize>,
    pub quantize_linear: usize,
    pub dequantize_linear: usize,
    /// How INT8 runs; `None` for a float model.
    pub int8_mode: Option<Int8Mode>,
    /// Activation quantise/dequantise pairs removed (weights-only mode).
    pub activation_qdq_removed: usize,
    /// Row-wise ops (Softmax...) whose output labelcast kept in float
    /// because tract would mis-fuse their Q/DQ (see [`qdq`]).
    pub qdq_repaired: Vec<String>,
    pub metadata: ModelMetadata,
    /// Reading and parsing the ONNX file (and, for tract, building its graph).
    pub load_time: Duration,
    /// The engine's analysis, optimisation and planning (session creation
    /// for ONNX Runtime).
    pub optimize_time: Duration,
}

impl ModelInfo {
    /// True when the graph carries QDQ quantisation.
    pub fn is_int8(&self) -> bool {
        self.quantize_linear + self.dequantize_linear > 0
    }
    /// How many scores one inference yields.
    pub fn output_width(&self) -> usize {
        self.output_shape.last().copied().unwrap_or(0)
    }
    pub fn input_height(&self) -> usize {
        self.input_shape[2]
    }
    pub fn input_width(&self) -> usize {
        self.input_shape[3]
    }

    /// An input of another shape is refused before it reaches an engine.
    pub fn check_input(&self, input: &Tensor) -> anyhow::Result<()> {
        if input.shape != self.input_shape {
            anyhow::bail!("input tensor {:?} does not match the model's {:?}", input.shape, self.input_shape);
        }
        Ok(())
    }

    /// `native`, `weights-only` or `float`, for tables and logs.
    pub fn precision(&self) -> &'static str {
        self.int8_mode.map_or("float", Int8Mode::as_str)
    }

    pub(crate) fn log_loaded(&self) {
        tracing::info!(
            model = %self.path.display(),
            engine = %self.engine_version,
            labels = self.metadata.labels.len(),
            int8 = self.precision(),
            threads = self.threads,
            load_ms = self.load_time.as_millis() as u64,
            optimize_ms = self.optimize_time.as_millis() as u64,
            "model loaded"
        );
    }
}

/// Loads the model on the engine the config names. If that engine cannot
/// start and `model.fallback = "tract"` is set, logs why and runs on tract;
/// otherwise the error says what to fix.
pub fn load(config: &ModelConfig) -> anyhow::Result<Box<dyn Engine>> {
    let attempt: anyhow::Result<Box<dyn Engine>> = match config.engine {
        EngineKind::Tract => return Ok(Box::new(tract::TractEngine::load(config)?)),
        EngineKind::OnnxRuntime | EngineKind::TensorRt => {
            onnxruntime::OrtEngine::load(config, true).map(|e| Box::new(e) as Box<dyn Engine>)
        }
    };
    match (attempt, config.fallback) {
        (Ok(engine), _) => Ok(engine),
        (Err(err), Some(EngineKind::Tract)) if !is_model_problem(&err) => {
            tracing::warn!(
                engine = config.engine.as_str(),
                error = %format!("{err:#}"),
                "the configured engine cannot start; running on tract as model.fallback allows"
            );
            Ok(Box::new(tract::TractEngine::load(config)?))
        }
        (Err(err), _) => Err(err),
    }
}

/// Loads a model for `model-info`: label names are not required.
pub fn inspect(path: &Path, config: &ModelConfig) -> anyhow::Result<Box<dyn Engine>> {
    let config = ModelConfig { path: path.to_path_buf(), ..config.clone() };
    match config.engine {
        EngineKind::Tract => Ok(Box::new(tract::TractEngine::inspect_with(&config)?)),
        _ => Ok(Box::new(onnxruntime::OrtEngine::load(&config, false)?)),
    }
}

/// A bad model or label list fails on every engine alike: falling back
/// would only hide it.
fn is_model_problem(err: &anyhow::Error) -> bool {
    err.downcast_ref::<crate::config::ConfigError>()
        .is_some_and(|e| e.field.starts_with("model.path") || e.field == "model.labels")
}

/// Runs a model, one frame at a time.
pub trait Engine: Send {
    fn info(&self) -> &ModelInfo;
    /// Raw output scores for one input, `info().output_width()` of them.
    fn infer(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>>;
}
