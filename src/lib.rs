//! labelcast: camera frames in, labels out on MQTT, for Jetson and ARM boards.
//!
//! ```text
//!  source ──Frame──▶ preprocess ──Tensor──▶ engine ──scores──▶ labels ──LabelEvent──▶ publish
//!  (V4L2 camera,     (decode, fit,           (tract or ONNX       (sigmoid, thresholds,  (MQTT with retained
//!   files, test        normalise, NCHW)        Runtime; INT8 QDQ    hysteresis, hold)      state, or stdout)
//!   pattern)                                   or FP32 ONNX)
//!        pipeline/ wires the stages for every camera, owns threads and shutdown;
//!        classify.rs is one frame's way through them without threads
//! ```
//!
//! Each module owns one stage; the types that cross a boundary are the
//! project's own and live in one low module, [`flow`] ([`source::Frame`],
//! [`engine::Tensor`], [`labels::LabelEvent`] are re-exports of them),
//! so no tract, rumqttc or image type leaks between stages. [`config`] turns a
//! TOML file and command-line flags into a checked [`config::Config`] before
//! anything starts.

pub mod allocator;
pub mod backoff;
pub mod bench;
pub mod classify;
pub mod config;
pub mod engine;
pub mod events;
pub mod flow;
pub mod http;
pub mod labels;
pub mod pipeline;
pub mod preprocess;
pub mod probe;
pub mod publish;
pub mod service;
pub mod source;
pub mod status;
pub mod telemetry;
