//! The engine stage's settings: the `[model]` section as written and as
//! checked (which file, which engine, INT8 mode and check, threads,
//! TensorRT options, metadata overrides). `config.rs` assembles them with
//! the other stages'.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, OutputKind, ResizeMode, check_label_names, choice, rgb_triplet};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub path: Option<PathBuf>,
    pub labels: Option<Vec<String>>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub output: Option<String>,
    pub resize: Option<String>,
    pub threads: Option<i64>,
    pub repair_qdq: Option<bool>,
    pub engine: Option<String>,
    pub int8: Option<String>,
    pub fallback: Option<String>,
    pub onnxruntime_library: Option<PathBuf>,
    pub layout: Option<String>,
    pub output_name: Option<String>,
    pub int8_check: Option<String>,
    #[serde(default)]
    pub tensorrt: RawTensorRt,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTensorRt {
    pub precision: Option<String>,
    pub dla_core: Option<i64>,
    pub workspace_mb: Option<i64>,
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// Where the INT8 self-check keeps its verdicts; `None`: no cache.
    pub check_cache: Option<PathBuf>,
    pub overrides: MetadataOverrides,
    pub threads: usize,
    /// Keep row-wise ops' outputs out of INT8 so tract computes them right
    /// (see `engine::qdq`); off only to measure what it fixes.
    pub repair_qdq: bool,
    pub engine: EngineKind,
    pub int8: Int8Mode,
    /// The engine to run on when `engine` cannot start (only tract).
    pub fallback: Option<EngineKind>,
    /// `libonnxruntime.so` to load; else `ORT_DYLIB_PATH`, else the system's.
    pub onnxruntime_library: Option<PathBuf>,
    pub tensorrt: TensorRtConfig,
    /// What happens when an INT8 rewrite disagrees with the graph as quantised.
    pub int8_check: Int8Check,
}

impl ModelConfig {
    /// A model with everything at its defaults.
    pub fn for_path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            check_cache: None,
            overrides: MetadataOverrides::default(),
            threads: 1,
            repair_qdq: true,
            engine: EngineKind::Tract,
            int8: Int8Mode::default(),
            fallback: None,
            onnxruntime_library: None,
            tensorrt: TensorRtConfig::default(),
            int8_check: Int8Check::default(),
        }
    }
}

/// Which inference engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Pure Rust, always built.
    Tract,
    /// ONNX Runtime's CPU execution provider (cargo feature `onnxruntime`).
    OnnxRuntime,
    /// ONNX Runtime with the TensorRT and CUDA providers (cargo feature `tensorrt`).
    TensorRt,
}

impl EngineKind {
    /// The kind a name means ([`crate::engine::registry`] holds the names).
    pub fn parse(text: &str) -> Result<Self, String> {
        crate::engine::registry::by_name(text).map(|backend| backend.kind)
    }
    pub fn as_str(self) -> &'static str {
        crate::engine::registry::backend(self).name()
    }
}

/// How a QDQ INT8 model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int8Mode {
    /// The graph as quantised: activations go through quantise/dequantise.
    Native,
    /// Activation quantise/dequantise pairs removed; weights stay INT8 in
    /// the file and are dequantised once at load, compute is float.
    #[default]
    WeightsOnly,
}

impl Int8Mode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "native" => Ok(Self::Native),
            "weights-only" => Ok(Self::WeightsOnly),
            other => Err(format!("expected \"native\" or \"weights-only\", got {other:?}")),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::WeightsOnly => "weights-only",
        }
    }
}

/// The load-time check of a rewritten INT8 graph against the graph as
/// quantised (`engine::selfcheck`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int8Check {
    /// On disagreement, log a WARN and run the graph as quantised.
    #[default]
    Fallback,
    /// On disagreement, refuse to start (exit 78).
    Error,
    /// No check (the rewrite is trusted; only to measure what it costs).
    Off,
}

impl Int8Check {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "fallback" => Ok(Self::Fallback),
            "error" => Ok(Self::Error),
            "off" => Ok(Self::Off),
            other => Err(format!("expected \"fallback\", \"error\" or \"off\", got {other:?}")),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fallback => "fallback",
            Self::Error => "error",
            Self::Off => "off",
        }
    }
}

/// Where a model's input keeps its colour channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLayout {
    /// `[N, 3, H, W]` (PyTorch exports).
    Nchw,
    /// `[N, H, W, 3]` (TensorFlow/Keras and TFLite-derived exports).
    Nhwc,
}

impl InputLayout {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "nchw" => Ok(Self::Nchw),
            "nhwc" => Ok(Self::Nhwc),
            other => Err(format!("expected \"nchw\" or \"nhwc\", got {other:?}")),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nchw => "nchw",
            Self::Nhwc => "nhwc",
        }
    }
}

/// What TensorRT builds an engine with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRtPrecision {
    Fp32,
    Fp16,
    Int8,
}

impl TensorRtPrecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Int8 => "int8",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorRtConfig {
    pub precision: TensorRtPrecision,
    /// Run on this DLA core (Jetson AGX/NX) instead of the GPU; opt-in.
    pub dla_core: Option<u32>,
    pub workspace_bytes: usize,
    /// Where built engines are kept; under systemd, the CacheDirectory.
    pub cache_dir: PathBuf,
}

impl Default for TensorRtConfig {
    fn default() -> Self {
        let cache_dir = std::env::var_os("CACHE_DIRECTORY")
            .map(|dirs| PathBuf::from(dirs.to_string_lossy().split(':').next().unwrap_or_default().to_string()))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("/var/cache/labelcast"));
        Self { precision: TensorRtPrecision::Fp16, dla_core: None, workspace_bytes: 1 << 30, cache_dir }
    }
}

/// Model metadata given in the config; each replaces what the model carries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetadataOverrides {
    pub labels: Option<Vec<String>>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub output: Option<OutputKind>,
    pub resize: Option<ResizeMode>,
    pub layout: Option<InputLayout>,
    /// Which of several outputs holds the scores.
    pub output_name: Option<String>,
}

pub const DEFAULT_MODEL: &str = "models/demo/labelcast-demo-int8.onnx";

/// The demo model quantised for ONNX Runtime's CPU provider (uint8
/// activations, `models/quantize.py --target cpu`), which runs it as integer
/// kernels; [`DEFAULT_MODEL`]'s symmetric int8 activations (TensorRT's
/// layout) it runs in float.
pub const DEFAULT_MODEL_CPU: &str = "models/demo/labelcast-demo-int8-cpu.onnx";

/// The shipped demo model an engine runs fastest: the `--target cpu` file on
/// the onnxruntime engine where it is installed, else [`DEFAULT_MODEL`].
pub fn default_model(data: &Path, engine: EngineKind) -> PathBuf {
    let cpu = data.join(DEFAULT_MODEL_CPU);
    if engine == EngineKind::OnnxRuntime && cpu.is_file() { cpu } else { data.join(DEFAULT_MODEL) }
}
/// Checks the `[model]` section; an unset path means the shipped demo model.
pub fn validate_model(raw: &RawModel, data: Option<&Path>) -> Result<ModelConfig, ConfigError> {
    let engine = choice("model.engine", raw.engine.as_deref(), EngineKind::parse)?.unwrap_or(EngineKind::Tract);
    let path = match &raw.path {
        Some(path) => path.clone(),
        None => data.map(|d| default_model(d, engine)).ok_or_else(|| {
            ConfigError::new(
                "model.path",
                "not set, and the shipped demo model was not found (set LABELCAST_DATA_DIR or model.path)",
            )
        })?,
    };
    if !path.is_file() {
        return Err(ConfigError::new("model.path", format!("{} does not exist or is not a file", path.display())));
    }
    let overrides = MetadataOverrides {
        labels: raw.labels.as_deref().map(validate_label_names).transpose()?,
        mean: rgb_triplet("model.mean", &raw.mean)?,
        std: rgb_triplet("model.std", &raw.std)?,
        output: choice("model.output", raw.output.as_deref(), OutputKind::parse)?,
        resize: choice("model.resize", raw.resize.as_deref(), ResizeMode::parse)?,
        layout: choice("model.layout", raw.layout.as_deref(), InputLayout::parse)?,
        output_name: match raw.output_name.as_deref() {
            Some("") => return Err(ConfigError::new("model.output_name", "is empty; remove it or name an output")),
            other => other.map(str::to_string),
        },
    };
    if let Some(std) = overrides.std
        && std.iter().any(|v| *v <= 0.0)
    {
        return Err(ConfigError::new("model.std", format!("every value must be above 0, got {std:?}")));
    }
    let threads = match raw.threads {
        None => 1,
        Some(n) if (1..=256).contains(&n) => n as usize,
        Some(n) => return Err(ConfigError::new("model.threads", format!("expected 1 to 256, got {n}"))),
    };
    let int8 = choice("model.int8", raw.int8.as_deref(), Int8Mode::parse)?.unwrap_or_default();
    let fallback = match raw.fallback.as_deref() {
        None | Some("none") => None,
        Some("tract") if engine != EngineKind::Tract => Some(EngineKind::Tract),
        Some("tract") => {
            return Err(ConfigError::new("model.fallback", "\"tract\" is a fallback for another engine; remove it"));
        }
        Some(other) => {
            return Err(ConfigError::new("model.fallback", format!("expected \"tract\" or \"none\", got {other:?}")));
        }
    };
    Ok(ModelConfig {
        path,
        check_cache: None,
        overrides,
        threads,
        repair_qdq: raw.repair_qdq.unwrap_or(true),
        engine,
        int8,
        fallback,
        onnxruntime_library: raw.onnxruntime_library.clone(),
        tensorrt: validate_tensorrt(&raw.tensorrt)?,
        int8_check: choice("model.int8_check", raw.int8_check.as_deref(), Int8Check::parse)?.unwrap_or_default(),
    })
}

fn validate_tensorrt(raw: &RawTensorRt) -> Result<TensorRtConfig, ConfigError> {
    let mut config = TensorRtConfig::default();
    if let Some(precision) = raw.precision.as_deref() {
        config.precision = match precision {
            "fp32" => TensorRtPrecision::Fp32,
            "fp16" => TensorRtPrecision::Fp16,
            "int8" => TensorRtPrecision::Int8,
            other => {
                return Err(ConfigError::new(
                    "model.tensorrt.precision",
                    format!("expected \"fp32\", \"fp16\" or \"int8\", got {other:?}"),
                ));
            }
        };
    }
    if let Some(core) = raw.dla_core {
        if !(0..=1).contains(&core) {
            return Err(ConfigError::new(
                "model.tensorrt.dla_core",
                format!("Jetson modules have DLA cores 0 and 1, got {core}"),
            ));
        }
        config.dla_core = Some(core as u32);
    }
    if let Some(mb) = raw.workspace_mb {
        if !(16..=65536).contains(&mb) {
            return Err(ConfigError::new("model.tensorrt.workspace_mb", format!("expected 16 to 65536, got {mb}")));
        }
        config.workspace_bytes = mb as usize * 1024 * 1024;
    }
    if let Some(dir) = &raw.cache_dir {
        config.cache_dir = dir.clone();
    }
    Ok(config)
}

fn validate_label_names(labels: &[String]) -> Result<Vec<String>, ConfigError> {
    if labels.is_empty() {
        return Err(ConfigError::new("model.labels", "the list is empty"));
    }
    check_label_names(labels, "model.labels")?;
    Ok(labels.to_vec())
}
