//! What every engine does before it builds anything: read the ONNX file,
//! check its input and output, resolve labels and preprocessing, and apply
//! the graph changes the config asks for. Keeping it here means every engine
//! refuses the same bad models with the same messages.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use tract_onnx::pb;

use super::onnx_graph::{self, Dim, GraphFacts};
use super::{ModelInfo, ModelMetadata, qdq};
use crate::config::{ConfigError, Int8Mode, ModelConfig};

/// A model read, checked and (for tract) rewritten, ready for an engine.
pub struct PreparedModel {
    pub proto: pb::ModelProto,
    pub facts: GraphFacts,
    pub metadata: ModelMetadata,
    pub input_shape: [usize; 4],
    /// Row-wise ops kept in float (see [`qdq::repair`]).
    pub qdq_repaired: Vec<String>,
    /// Activation quantise/dequantise pairs removed (weights-only mode).
    pub activation_qdq_removed: usize,
    /// The INT8 mode in effect; `None` for a float model.
    pub int8_mode: Option<Int8Mode>,
    pub read_time: Duration,
}

/// How the graph may be rewritten before the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// Apply `repair_qdq` and the INT8 mode (tract).
    ForTract,
    /// Leave the graph as it is (ONNX Runtime runs QDQ correctly and fast).
    None,
}

pub fn prepare(config: &ModelConfig, require_labels: bool, rewrite: Rewrite) -> anyhow::Result<PreparedModel> {
    let path = config.path.as_path();
    let started = Instant::now();
    let mut proto = onnx_graph::read_model(path).map_err(|err| model_error(path, err))?;
    let facts = onnx_graph::inspect(&proto).map_err(|err| model_error(path, err))?;
    let metadata = ModelMetadata::resolve(path, &facts.metadata, &config.overrides, require_labels)?;
    if facts.input_type != "float32" {
        return Err(model_error(
            path,
            anyhow::anyhow!("input {:?} is {}; labelcast feeds float32 images", facts.input_name, facts.input_type),
        ));
    }
    let input_shape = input_shape(&facts.input_dims, metadata.input_size).map_err(|err| model_error(path, err))?;

    let is_int8 = facts.quantize_linear + facts.dequantize_linear > 0;
    let mut qdq_repaired = Vec::new();
    let mut activation_qdq_removed = 0;
    let int8_mode = match rewrite {
        Rewrite::None => is_int8.then_some(Int8Mode::Native),
        Rewrite::ForTract if !is_int8 => None,
        Rewrite::ForTract => {
            if config.int8 == Int8Mode::WeightsOnly {
                activation_qdq_removed = qdq::strip_activation_qdq(&mut proto);
                tracing::debug!(
                    model = %path.display(),
                    pairs = activation_qdq_removed,
                    "weights-only INT8: removed activation quantise/dequantise pairs"
                );
            }
            if config.repair_qdq {
                let repair = qdq::repair(&mut proto);
                if !repair.ops_kept_float.is_empty() {
                    tracing::info!(
                        model = %path.display(),
                        ops = %repair.ops_kept_float.join(", "),
                        removed_nodes = repair.nodes_removed,
                        "kept these row-wise ops' outputs in float: tract would fuse their QuantizeLinear/DequantizeLinear into a wrong lookup table"
                    );
                }
                qdq_repaired = repair.ops_kept_float;
            }
            Some(config.int8)
        }
    };
    Ok(PreparedModel {
        proto,
        facts,
        metadata,
        input_shape,
        qdq_repaired,
        activation_qdq_removed,
        int8_mode,
        read_time: started.elapsed(),
    })
}

/// What an engine adds to a [`PreparedModel`] once it has built the model.
pub struct EngineFacts {
    pub engine: &'static str,
    pub engine_version: String,
    pub threads: usize,
    pub output_shape: Vec<usize>,
    /// Engine time spent reading the graph, added to the file's read time.
    pub graph_time: Duration,
    pub optimize_time: Duration,
}

impl PreparedModel {
    /// Checks the engine's output against the labels and assembles the
    /// [`ModelInfo`] every engine reports.
    pub fn into_info(self, path: &Path, built: EngineFacts, require_labels: bool) -> anyhow::Result<ModelInfo> {
        check_output(path, &self.facts.output_name, &built.output_shape, &self.metadata, require_labels)?;
        let facts = self.facts;
        Ok(ModelInfo {
            path: path.to_path_buf(),
            engine: built.engine,
            engine_version: built.engine_version,
            threads: built.threads,
            input_name: facts.input_name,
            input_shape: self.input_shape,
            input_type: facts.input_type,
            output_name: facts.output_name,
            output_shape: built.output_shape,
            quantize_linear: facts.quantize_linear,
            dequantize_linear: facts.dequantize_linear,
            int8_mode: self.int8_mode,
            qdq_repaired: self.qdq_repaired,
            activation_qdq_removed: self.activation_qdq_removed,
            metadata: self.metadata,
            load_time: self.read_time + built.graph_time,
            optimize_time: built.optimize_time,
        })
    }
}

/// Checks the output an engine reports: one row of scores, one per label.
pub fn check_output(
    path: &Path,
    output_name: &str,
    output_shape: &[usize],
    metadata: &ModelMetadata,
    require_labels: bool,
) -> anyhow::Result<()> {
    let width = output_shape.last().copied().unwrap_or(0);
    let batch_ok = output_shape.len() == 1 || output_shape[..output_shape.len() - 1].iter().all(|d| *d == 1);
    if !batch_ok || width == 0 {
        return Err(model_error(
            path,
            anyhow::anyhow!("output {output_name:?} has shape {output_shape:?}; expected [1, N] scores"),
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
    Ok(())
}

/// A model file the daemon cannot use is a configuration problem: the
/// config points at it, and restarting will not help.
pub fn model_error(path: &Path, err: anyhow::Error) -> anyhow::Error {
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

    #[test]
    fn an_output_with_a_batch_of_two_is_refused_and_a_label_count_mismatch_names_the_field() {
        let metadata = ModelMetadata::resolve(
            Path::new("m.onnx"),
            &Default::default(),
            &crate::config::MetadataOverrides { labels: Some(vec!["a".into(), "b".into()]), ..Default::default() },
            true,
        )
        .unwrap();
        let err = check_output(Path::new("m.onnx"), "scores", &[2, 2], &metadata, true).unwrap_err();
        assert!(format!("{err:#}").contains("expected [1, N]"), "{err:#}");
        let err = check_output(Path::new("m.onnx"), "scores", &[1, 3], &metadata, true).unwrap_err();
        let config_error = err.downcast_ref::<ConfigError>().expect("a config error");
        assert_eq!(config_error.field, "model.labels");
        assert!(check_output(Path::new("m.onnx"), "scores", &[1, 2], &metadata, true).is_ok());
    }
}
