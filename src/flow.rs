//! The types that cross stages, in one low module that imports no stage:
//! a [`Frame`] from a source, the [`Tensor`] preprocessing makes of it, the
//! [`LabelEvent`] the labels stage sends to the sinks, and the two settings
//! several stages read ([`ResizeMode`], [`OutputKind`]). Each stage
//! re-exports the ones it hands over (`source::Frame`, `engine::Tensor`,
//! `labels::LabelEvent`), so both paths name the same type.

use std::sync::Arc;
use std::time::SystemTime;

// ---------------------------------------------------------------------------
// Frames, as sources deliver them.
// ---------------------------------------------------------------------------

/// How the bytes of a [`Frame`] are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Packed 8-bit R, G, B.
    Rgb8,
    /// 8-bit luma only.
    Gray8,
    /// Packed 4:2:2 Y0 U Y1 V (V4L2 `YUYV`).
    Yuyv,
    /// Planar Y, then interleaved U V at half resolution (V4L2 `NV12`).
    Nv12,
    /// One complete JPEG image (V4L2 `MJPG`, or a `.jpg` file).
    Mjpeg,
}

impl PixelFormat {
    /// Parses the names V4L2 tools use (`mjpg`, `yuyv`, `nv12`, `grey`, `rgb`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "rgb" | "rgb8" | "rgb3" => Self::Rgb8,
            "grey" | "gray" | "y8" => Self::Gray8,
            "yuyv" | "yuy2" => Self::Yuyv,
            "nv12" => Self::Nv12,
            "mjpg" | "mjpeg" | "jpeg" => Self::Mjpeg,
            _ => return None,
        })
    }

    /// Bytes in one tightly packed row of `width` pixels (of the Y plane for
    /// NV12; a JPEG has no rows, and counts one byte per pixel here).
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            Self::Rgb8 => width * 3,
            Self::Yuyv => width * 2,
            Self::Gray8 | Self::Nv12 | Self::Mjpeg => width,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rgb8 => "rgb8",
            Self::Gray8 => "grey",
            Self::Yuyv => "yuyv",
            Self::Nv12 => "nv12",
            Self::Mjpeg => "mjpg",
        }
    }
}

/// One captured picture, owned, in the format the source produced it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub format: PixelFormat,
    /// Width in pixels; 0 for an `Mjpeg` frame whose size is only in its header.
    pub width: u32,
    /// Height in pixels; 0 for an `Mjpeg` frame whose size is only in its header.
    pub height: u32,
    /// Bytes from the start of one row to the next (of the Y plane for NV12);
    /// 0 for `Mjpeg`.
    pub stride: usize,
    pub data: Vec<u8>,
    /// Counts frames from this source, from 0, without gaps.
    pub sequence: u64,
    pub captured_at: SystemTime,
    /// What the frame came from (a file path), for error messages.
    pub origin: Option<Arc<str>>,
}

/// A frame's origin for logs, or a placeholder for frames that have none.
pub fn describe_origin(origin: Option<&str>) -> &str {
    origin.unwrap_or("(frame)")
}

impl Frame {
    /// The file or device this frame came from, for logs.
    pub fn origin(&self) -> &str {
        describe_origin(self.origin.as_deref())
    }
}

// ---------------------------------------------------------------------------
// Model inputs, as preprocessing makes them.
// ---------------------------------------------------------------------------

/// A model input as preprocessing makes it: NCHW float32, batch 1. Engines
/// turn it into what the model takes ([`InputSpec`]).
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

// ---------------------------------------------------------------------------
// Label events, as the labels stage sends them to the sinks.
// ---------------------------------------------------------------------------

/// One label's part of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub name: Arc<str>,
    pub score: f32,
    pub on: bool,
}

/// What one inference produced, as it travels to the publishers.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelEvent {
    pub sequence: u64,
    pub timestamp: SystemTime,
    /// The frame's file or device, when known.
    pub origin: Option<Arc<str>>,
    pub model: Arc<str>,
    pub inference_ms: f64,
    /// From capture to scores: waiting, decode, preprocess and inference.
    pub frame_ms: f64,
    /// The labels to report ([`Reporting`]): every label of a model with
    /// few, else the ON ones and the highest scores.
    pub labels: Vec<LabelScore>,
    /// The labels whose state changed on this frame (reported or not).
    pub changed: Vec<LabelScore>,
    /// The camera's id; `None` for the single camera of a `[source]` config.
    pub camera: Option<Arc<str>>,
    /// The camera's regions classified on this frame, in config order; a
    /// region that does not fit the frame is left out.
    pub regions: Vec<RegionLabels>,
}

/// One region's part of an event: its labels as `LabelEvent::labels`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionLabels {
    pub id: Arc<str>,
    pub labels: Vec<LabelScore>,
    pub changed: Vec<LabelScore>,
}

// ---------------------------------------------------------------------------
// Settings several stages read.
// ---------------------------------------------------------------------------

/// What the model's output tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// Raw scores; labelcast applies a sigmoid.
    Logits,
    /// Already in [0, 1].
    Probabilities,
}

impl OutputKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "logits" => Ok(Self::Logits),
            "probabilities" | "probs" | "sigmoid" => Ok(Self::Probabilities),
            other => Err(format!("expected \"logits\" or \"probabilities\", got {other:?}")),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Logits => "logits",
            Self::Probabilities => "probabilities",
        }
    }
}

/// How a frame whose aspect ratio differs from the model's is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// Scale to cover the input, cut the overhang equally on both sides.
    CenterCrop,
    /// Scale to fit inside the input, pad the rest with the mean colour.
    Letterbox,
    /// Scale each axis independently.
    Stretch,
    /// Cover the frame with as few overlapping windows of the input's
    /// aspect ratio as it takes (two for 16:9 on a square input), classify
    /// each, and keep each label's highest score: the whole frame is seen
    /// at full resolution, at the cost of one inference per window.
    Tiles,
}

impl ResizeMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "center-crop" | "centre-crop" | "crop" => Ok(Self::CenterCrop),
            "letterbox" | "pad" => Ok(Self::Letterbox),
            "stretch" => Ok(Self::Stretch),
            "tiles" => Ok(Self::Tiles),
            other => Err(format!("expected \"center-crop\", \"letterbox\", \"tiles\" or \"stretch\", got {other:?}")),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CenterCrop => "center-crop",
            Self::Letterbox => "letterbox",
            Self::Stretch => "stretch",
            Self::Tiles => "tiles",
        }
    }
}
