//! The tract engine: pure Rust, always built, runs FP32 and QDQ INT8 ONNX.
//!
//! Loading fixes the input to the model's declared shape (batch 1), optimises
//! once and keeps one run state, so a frame costs one inference and no
//! model rebuild. Loading runs under `catch_unwind`: a malformed file must
//! give an error naming it, never take the daemon down.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use tract_onnx::prelude::*;

use super::onnx_graph::{self, Dim};
use super::{Engine, ModelInfo, ModelMetadata, Tensor, qdq};
use crate::config::{ConfigError, ModelConfig};

pub struct TractEngine {
    info: ModelInfo,
    state: TypedSimpleState,
}

impl TractEngine {
    /// Loads, checks and optimises the model a config names. Problems that
    /// the operator fixes in the config (missing labels, a label list that
    /// does not match the output) come back as [`ConfigError`]s.
    pub fn load(config: &ModelConfig) -> anyhow::Result<TractEngine> {
        Self::load_checked(config, true)
    }

    /// Loads a model for `model-info`: label names are not required.
    pub fn inspect(path: &Path) -> anyhow::Result<TractEngine> {
        Self::load_checked(&ModelConfig::for_path(path), false)
    }

    fn load_checked(config: &ModelConfig, require_labels: bool) -> anyhow::Result<TractEngine> {
        let path = config.path.as_path();
        let started = Instant::now();
        let mut proto = onnx_graph::read_model(path).map_err(|err| model_error(path, err))?;
        let facts = onnx_graph::inspect(&proto).map_err(|err| model_error(path, err))?;
        let repair = if config.repair_qdq { qdq::repair(&mut proto) } else { qdq::Repair::default() };
        if !repair.ops_kept_float.is_empty() {
            tracing::info!(
                model = %path.display(),
                ops = %repair.ops_kept_float.join(", "),
                removed_nodes = repair.nodes_removed,
                "kept these row-wise ops' outputs in float: tract would fuse their QuantizeLinear/DequantizeLinear into a wrong lookup table"
            );
        }
        let metadata = ModelMetadata::resolve(path, &facts.metadata, &config.overrides, require_labels)?;
        if facts.input_type != "float32" {
            return Err(model_error(
                path,
                anyhow::anyhow!("input {:?} is {}; labelcast feeds float32 images", facts.input_name, facts.input_type),
            ));
        }
        let input_shape = input_shape(&facts.input_dims, metadata.input_size).map_err(|err| model_error(path, err))?;

        let threads = config.threads;
        let built = std::panic::catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<_> {
            let model = tract_onnx::onnx()
                .model_for_proto_model(&proto)
                .map_err(|err| anyhow::anyhow!("{err:?}"))
                .context("tract could not read the graph")?;
            let loaded = Instant::now();
            let model = model
                .with_input_fact(0, f32::fact(input_shape).into())
                .and_then(|m| m.into_optimized())
                .map_err(|err| anyhow::anyhow!("{err:?}"))
                .context("tract could not analyse and optimise the graph")?;
            let options = RunOptions {
                executor: (threads > 1).then(|| tract_linalg::multithread::Executor::multithread(threads)),
                ..Default::default()
            };
            let output_shape: Vec<usize> = model
                .output_fact(0)
                .map_err(|err| anyhow::anyhow!("{err:?}"))?
                .shape
                .as_concrete()
                .map(|s| s.to_vec())
                .context("the output shape is not fixed once the input is")?;
            let plan = model.into_runnable_with_options(&options).map_err(|err| anyhow::anyhow!("{err:?}"))?;
            let state = plan.spawn().map_err(|err| anyhow::anyhow!("{err:?}"))?;
            Ok((state, output_shape, loaded))
        }));
        let (state, output_shape, loaded) = match built {
            Ok(result) => result.map_err(|err| model_error(path, err))?,
            Err(_) => return Err(model_error(path, anyhow::anyhow!("tract panicked while loading it"))),
        };
        let load_time = loaded - started;
        let optimize_time = loaded.elapsed();

        let width = output_shape.last().copied().unwrap_or(0);
        let batch_ok = output_shape.len() == 1 || output_shape[..output_shape.len() - 1].iter().all(|d| *d == 1);
        if !batch_ok || width == 0 {
            return Err(model_error(
                path,
                anyhow::anyhow!("output {:?} has shape {output_shape:?}; expected [1, N] scores", facts.output_name),
            ));
        }
        if (require_labels || !metadata.labels.is_empty()) && width != metadata.labels.len() {
            let field = if metadata.labels_from.starts_with("config") { "model.labels" } else { "model.path" };
            return Err(ConfigError::new(
                field,
                format!(
                    "{} outputs {width} scores but has {} labels (from {}); give one label per output",
                    path.display(),
                    metadata.labels.len(),
                    metadata.labels_from
                ),
            )
            .into());
        }
        let info = ModelInfo {
            path: path.to_path_buf(),
            engine: "tract",
            input_name: facts.input_name,
            input_shape,
            input_type: facts.input_type,
            output_name: facts.output_name,
            output_shape,
            quantize_linear: facts.quantize_linear,
            dequantize_linear: facts.dequantize_linear,
            qdq_repaired: repair.ops_kept_float,
            metadata,
            load_time,
            optimize_time,
        };
        tracing::info!(
            model = %info.path.display(),
            labels = info.metadata.labels.len(),
            int8 = info.is_int8(),
            threads,
            load_ms = info.load_time.as_millis() as u64,
            optimize_ms = info.optimize_time.as_millis() as u64,
            "model loaded"
        );
        Ok(TractEngine { info, state })
    }
}

/// A model file the daemon cannot use is a configuration problem: the
/// config points at it, and restarting will not help.
fn model_error(path: &Path, err: anyhow::Error) -> anyhow::Error {
    let detail = format!("{err:#}");
    let message =
        if detail.contains(&path.display().to_string()) { detail } else { format!("{}: {detail}", path.display()) };
    ConfigError::new("model.path", message).into()
}

/// The input shape to fix: the graph's own where it is numeric, batch 1, and
/// the metadata's size (or 224) for symbolic height and width.
fn input_shape(dims: &[Dim], size: Option<(usize, usize)>) -> anyhow::Result<[usize; 4]> {
    if dims.len() != 4 {
        bail!("the input has {} dimensions; labelcast feeds NCHW images [1, 3, H, W]", dims.len());
    }
    let fixed = |d: &Dim| match d {
        Dim::Fixed(v) => Some(*v),
        Dim::Symbolic(_) => None,
    };
    if let Some(batch) = fixed(&dims[0])
        && batch != 1
    {
        bail!("the input batch is {batch}; export the model with batch 1");
    }
    let channels = fixed(&dims[1]).unwrap_or(3);
    if channels != 3 {
        bail!("the input has {channels} channels; labelcast feeds RGB (3)");
    }
    let (default_h, default_w) = size.unwrap_or((224, 224));
    Ok([1, 3, fixed(&dims[2]).unwrap_or(default_h), fixed(&dims[3]).unwrap_or(default_w)])
}

impl Engine for TractEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn infer(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>> {
        if input.shape != self.info.input_shape {
            bail!("input tensor {:?} does not match the model's {:?}", input.shape, self.info.input_shape);
        }
        let tensor = tract_onnx::prelude::Tensor::from_shape(&input.shape, &input.data)
            .map_err(|err| anyhow::anyhow!("{err:?}"))?;
        let outputs = self.state.run(tvec!(tensor.into_tvalue())).map_err(|err| anyhow::anyhow!("{err:?}"))?;
        let scores = outputs[0].to_plain_array_view::<f32>().map_err(|err| anyhow::anyhow!("{err:?}"))?;
        Ok(scores.iter().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbolic_batch_is_fixed_to_one_and_size_comes_from_the_graph() {
        let dims = [Dim::Symbolic("N".into()), Dim::Fixed(3), Dim::Fixed(160), Dim::Fixed(128)];
        assert_eq!(input_shape(&dims, None).unwrap(), [1, 3, 160, 128]);
    }

    #[test]
    fn symbolic_height_and_width_use_the_metadata_size() {
        let dims = [Dim::Fixed(1), Dim::Fixed(3), Dim::Symbolic("h".into()), Dim::Symbolic("w".into())];
        assert_eq!(input_shape(&dims, Some((300, 400))).unwrap(), [1, 3, 300, 400]);
    }

    #[test]
    fn a_batch_of_eight_or_a_grey_input_is_refused() {
        let batch8 = [Dim::Fixed(8), Dim::Fixed(3), Dim::Fixed(224), Dim::Fixed(224)];
        assert!(input_shape(&batch8, None).unwrap_err().to_string().contains("batch 1"));
        let grey = [Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(224), Dim::Fixed(224)];
        assert!(input_shape(&grey, None).unwrap_err().to_string().contains("channels"));
    }
}
