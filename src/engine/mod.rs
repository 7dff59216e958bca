//! Inference engines behind one trait, and the model facts they share.
//!
//! An engine takes a preprocessed [`Tensor`] and returns the model's raw
//! output scores (logits or probabilities, as the model's metadata says).
//! tract is always built ([`tract::TractEngine`]); faster or accelerated
//! engines join behind cargo features. No tract type leaves this module: the
//! rest of the daemon sees [`Tensor`], `Vec<f32>` scores and [`ModelInfo`].

pub mod config;
pub mod depthwise;
pub mod depthwise_op;
pub mod metadata;
pub mod onnx_graph;
pub mod pointwise;
pub mod prepare;
pub mod qdq;
pub mod registry;
pub mod selfcheck;
pub mod stem;
pub mod tract;

#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
#[cfg(not(feature = "onnxruntime"))]
#[path = "disabled.rs"]
pub mod onnxruntime;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use metadata::ModelMetadata;

pub use onnx_graph::Int8Format;
pub use selfcheck::SelfCheck;

use crate::config::{EngineKind, InputLayout, Int8Mode, ModelConfig};
pub use crate::flow::Tensor;

/// The element type of a model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputElement {
    F32,
    /// Pixels 0..255 as they are (many TFLite-derived models normalise inside).
    U8,
}

/// What a model's input is: its layout, element type and the NCHW shape
/// preprocessing fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSpec {
    pub layout: InputLayout,
    pub element: InputElement,
    /// `[1, 3, H, W]`.
    pub shape: [usize; 4],
}

impl InputSpec {
    /// The shape the model declares: `[1, 3, H, W]` or `[1, H, W, 3]`.
    pub fn model_shape(&self) -> [usize; 4] {
        let [n, c, h, w] = self.shape;
        match self.layout {
            InputLayout::Nchw => self.shape,
            InputLayout::Nhwc => [n, h, w, c],
        }
    }

    /// `input`'s values in the model's layout, in `scratch` when they must
    /// be moved (NHWC), else `input`'s own.
    pub fn layout_f32<'a>(&self, input: &'a Tensor, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match self.layout {
            InputLayout::Nchw => &input.data,
            InputLayout::Nhwc => {
                let [_, c, h, w] = input.shape;
                let plane = h * w;
                scratch.clear();
                scratch.extend(
                    (0..plane).flat_map(|i| (0..c).map(move |ch| (i, ch))).map(|(i, ch)| input.data[ch * plane + i]),
                );
                scratch
            }
        }
    }

    /// `input` as uint8 pixels in the model's layout. Preprocessing made
    /// them 0..255 (mean 0, std 1/255); rounding undoes float error.
    pub fn layout_u8(&self, input: &Tensor, scratch: &mut Vec<f32>, out: &mut Vec<u8>) {
        let values = self.layout_f32(input, scratch);
        out.clear();
        out.extend(values.iter().map(|v| v.round().clamp(0.0, 255.0) as u8));
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
    /// `[1, 3, height, width]`, what preprocessing fills whatever the model's layout.
    pub input_shape: [usize; 4],
    pub input_type: String,
    /// The input's dims as the file declares them, e.g. `[N, 224, 224, 3]`.
    pub input_dims: String,
    pub input_layout: InputLayout,
    /// The output the scores are read from.
    pub output_name: String,
    pub output_shape: Vec<usize>,
    /// How many outputs the graph has (the others are not computed where the engine allows).
    pub outputs: usize,
    pub quantize_linear: usize,
    pub dequantize_linear: usize,
    /// QDQ, QOperator or dynamic; `None` for a float model.
    pub int8_format: Option<Int8Format>,
    /// How INT8 runs; `None` for a float model.
    pub int8_mode: Option<Int8Mode>,
    /// Activation quantise/dequantise pairs removed (weights-only mode).
    pub activation_qdq_removed: usize,
    /// Of those, pairs whose saturation a Clip keeps (see [`qdq`]).
    pub saturation_clips: usize,
    /// Activation pairs left quantised (parameters that are not one scale and zero point).
    pub activation_qdq_kept: usize,
    /// Weights stored in external data files beside the model.
    pub external_tensors: usize,
    /// Row-wise ops (Softmax...) whose output labelcast kept in float
    /// because tract would mis-fuse their Q/DQ (see [`qdq`]).
    pub qdq_repaired: Vec<String>,
    pub metadata: ModelMetadata,
    /// Reading and parsing the ONNX file (and, for tract, building its graph).
    pub load_time: Duration,
    /// The engine's analysis, optimisation and planning (session creation
    /// for ONNX Runtime).
    pub optimize_time: Duration,
    /// The INT8 rewrite's check against the graph as quantised, when one ran.
    pub selfcheck: Option<std::sync::Arc<SelfCheck>>,
}

impl ModelInfo {
    /// True when the graph is quantised (QDQ, QOperator or dynamic).
    pub fn is_int8(&self) -> bool {
        self.int8_format.is_some()
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
    if config.engine == EngineKind::Tract {
        return registry::backend(EngineKind::Tract).load(config);
    }
    let attempt = registry::backend(config.engine).load(config);
    match (attempt, config.fallback) {
        (Ok(engine), _) => Ok(engine),
        (Err(err), Some(EngineKind::Tract)) if !is_model_problem(&err) => {
            tracing::warn!(
                engine = config.engine.as_str(),
                error = %format!("{err:#}"),
                "the configured engine cannot start; running on tract as model.fallback allows"
            );
            Ok(Box::new(tract::TractEngine::load(&tract_fallback(config))?))
        }
        (Err(err), _) => Err(err),
    }
}

/// The config tract falls back with: the demo's `-int8-cpu` file (what the
/// onnxruntime engine defaults to) is swapped for the demo file made for
/// tract where it is beside it; any other model stays as configured.
fn tract_fallback(config: &ModelConfig) -> ModelConfig {
    let demo = config.path.with_file_name(Path::new(crate::config::DEFAULT_MODEL).file_name().unwrap_or_default());
    if config.path.ends_with(crate::config::DEFAULT_MODEL_CPU) && demo.is_file() {
        ModelConfig { path: demo, ..config.clone() }
    } else {
        config.clone()
    }
}

/// A cache key for what is built from a model file: the SHA-256 (hex) of
/// the file's SHA-256 and of each part (versions, settings), each part
/// followed by a zero byte so no two lists of parts run together.
pub fn model_key(model: &[u8], parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut key = Sha256::new();
    key.update(format!("{:x}", Sha256::digest(model)).as_bytes());
    key.update([0]);
    for part in parts {
        key.update(part.as_bytes());
        key.update([0]);
    }
    format!("{:x}", key.finalize())
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
    /// Where an inference's time goes, per kind of operator: `runs`
    /// inferences of `input`, each node timed. `None` for an engine that
    /// cannot say (ONNX Runtime has its own profiler).
    fn profile(&mut self, _input: &Tensor, _runs: usize) -> Option<anyhow::Result<Profile>> {
        None
    }
}

/// Where an inference's time goes: by kind of operator, and the slowest nodes.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    pub kinds: Vec<OpTime>,
    /// The slowest nodes, most first: `kind` is the node's operator and
    /// what tract says of it (shapes, kernel), `nodes` 1.
    pub slowest: Vec<OpTime>,
}

/// Time spent in one kind of operator, per inference.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpTime {
    /// The group the operator falls in (depthwise conv, matrix product...).
    pub kind: String,
    /// How many nodes of the graph are of this kind.
    pub nodes: usize,
    /// Milliseconds per inference.
    pub ms: f64,
}

/// The group a tract operator is reported under in `bench --profile`,
/// from the name tract gives it after optimisation.
pub fn op_kind(name: &str) -> &'static str {
    match name {
        n if n.starts_with("DepthWise") => "depthwise conv",
        n if n.starts_with("DepthwiseConv") => "depthwise conv (labelcast's op, clamp fused)",
        n if n.starts_with("PointwiseConv") => "1x1 conv (labelcast's kernel)",
        n if n.starts_with("StemConv") => "stem conv (labelcast's kernel)",
        // Before the matrix products: tract names it OptMatMulPack.
        n if n.contains("Pack") => "packing (activations for a matrix product)",
        n if n.contains("MatMul") || n.starts_with("EinSum") || n.starts_with("Gemm") => {
            "matrix product (1x1 conv, dense)"
        }
        n if n.starts_with("Conv") || n.contains("Im2col") || n.starts_with("Lazy") || n.contains("DirectConv") => {
            "convolution (im2col, direct)"
        }
        n if n.contains("Softmax") || n.contains("LayerNorm") || n.contains("Reduce") => "softmax, norms, reductions",
        n if n.starts_with("Opt")
            || n.contains("BinChain")
            || n.contains("Max")
            || n.contains("Min")
            || n.contains("Add")
            || n.contains("Mul") =>
        {
            "element-wise (activations, adds)"
        }
        n if n.contains("Quantize") || n.contains("Lookup") || n.contains("Cast") => "quantise, dequantise, casts",
        _ => "other (moves, reshapes...)",
    }
}

#[cfg(test)]
mod tests {
    use super::op_kind;

    #[test]
    fn packing_before_a_matrix_product_is_reported_apart_from_the_product() {
        assert_eq!(op_kind("OptMatMulPack"), "packing (activations for a matrix product)");
        assert_eq!(op_kind("OptMatMul"), "matrix product (1x1 conv, dense)");
        assert_eq!(op_kind("DepthWise"), "depthwise conv");
        assert_eq!(op_kind("DepthwiseConv"), "depthwise conv (labelcast's op, clamp fused)");
    }
}
