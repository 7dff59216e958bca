//! Inference engines behind one trait, and the model facts they share.
//!
//! An engine takes a preprocessed [`Tensor`] and returns the model's raw
//! output scores (logits or probabilities, as the model's metadata says).
//! tract is always built ([`tract::TractEngine`]); faster or accelerated
//! engines join behind cargo features. No tract type leaves this module: the
//! rest of the daemon sees [`Tensor`], `Vec<f32>` scores and [`ModelInfo`].

pub mod metadata;
mod onnx_graph;
pub mod qdq;
pub mod tract;

use std::path::PathBuf;
use std::time::Duration;

pub use metadata::ModelMetadata;

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
    pub engine: &'static str,
    pub input_name: String,
    /// `[1, 3, height, width]`.
    pub input_shape: [usize; 4],
    pub input_type: String,
    pub output_name: String,
    pub output_shape: Vec<usize>,
    pub quantize_linear: usize,
    pub dequantize_linear: usize,
    /// Row-wise ops (Softmax...) whose output labelcast kept in float
    /// because tract would mis-fuse their Q/DQ (see [`qdq`]).
    pub qdq_repaired: Vec<String>,
    pub metadata: ModelMetadata,
    /// Reading and parsing the ONNX file.
    pub load_time: Duration,
    /// tract's type analysis, optimisation and planning.
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
}

/// Runs a model, one frame at a time.
pub trait Engine: Send {
    fn info(&self) -> &ModelInfo;
    /// Raw output scores for one input, `info().output_width()` of them.
    fn infer(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>>;
}
