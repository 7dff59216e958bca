//! What every engine does before it builds anything: read the ONNX file,
//! check its input and output, resolve labels and preprocessing, and apply
//! the graph changes the config asks for. Keeping it here means every engine
//! refuses the same bad models with the same messages.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use tract_onnx::pb;

use super::onnx_graph::{self, Dim, GraphFacts, Int8Format, OutputFact, show_dims};
use super::{InputElement, InputSpec, ModelInfo, ModelMetadata, qdq};
use crate::config::{ConfigError, InputLayout, Int8Check, Int8Mode, ModelConfig};

/// Set to `1` only to show that the load-time self-check catches a wrong
/// rewrite: weights-only then drops the saturation of the pairs it removes,
/// as labelcast did before it kept them. Never right on a real model.
pub const FAULT_DROP_SATURATION: &str = "LABELCAST_FAULT_DROP_SATURATION";

/// A model read, checked and (for tract) rewritten, ready for an engine.
pub struct PreparedModel {
    /// The graph as the engine will run it.
    pub proto: pb::ModelProto,
    /// The graph as quantised (with only [`qdq::repair`]), to check the
    /// rewritten one against at load; `None` when nothing needs checking.
    pub reference: Option<pb::ModelProto>,
    /// Where the model's external data files are.
    pub model_dir: PathBuf,
    pub facts: GraphFacts,
    pub metadata: ModelMetadata,
    pub input: InputSpec,
    /// The output that holds the scores.
    pub output_name: String,
    /// Row-wise ops kept in float (see [`qdq::repair`]).
    pub qdq_repaired: Vec<String>,
    /// What weights-only removed (and kept of each pair's saturation).
    pub rewrite: Option<qdq::Rewritten>,
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
    let mut metadata = ModelMetadata::resolve(path, &facts.metadata, &config.overrides, require_labels)?;
    let input = input_spec(&facts, &metadata).map_err(|err| model_error(path, err))?;
    if input.element == InputElement::U8 {
        // The model takes pixels as they are (0..255) and normalises them
        // itself: preprocessing must hand it the bytes unchanged.
        if config.overrides.mean.is_some() || config.overrides.std.is_some() {
            return Err(ConfigError::new(
                if config.overrides.mean.is_some() { "model.mean" } else { "model.std" },
                format!(
                    "{} takes uint8 pixels (0..255) and normalises them itself; remove model.mean and model.std",
                    path.display()
                ),
            )
            .into());
        }
        metadata.mean = [0.0; 3];
        metadata.std = [1.0 / 255.0; 3];
    }
    let output_name = choose_output(&facts.outputs, &metadata, require_labels).map_err(|err| model_error(path, err))?;
    let model_dir = onnx_graph::model_dir(path);
    let dir_text = model_dir.to_str().map(str::to_string);
    let options = qdq::Options {
        model_dir: dir_text.as_deref(),
        drop_saturation: std::env::var(FAULT_DROP_SATURATION).is_ok_and(|v| v == "1"),
    };

    let mut qdq_repaired = Vec::new();
    let mut rewritten = None;
    let mut reference = None;
    let int8_mode = match (rewrite, facts.int8_format) {
        (_, None) => None,
        (Rewrite::None, Some(_)) => Some(Int8Mode::Native),
        (Rewrite::ForTract, Some(format)) => {
            let mode = if format == Int8Format::Qdq { config.int8 } else { Int8Mode::Native };
            if format != Int8Format::Qdq && config.int8 == Int8Mode::WeightsOnly {
                tracing::info!(
                    model = %path.display(),
                    format = format.as_str(),
                    "a {} INT8 model runs as quantised (weights-only applies to QDQ models)",
                    format.as_str()
                );
            }
            let original =
                (mode == Int8Mode::WeightsOnly && config.int8_check != Int8Check::Off).then(|| proto.clone());
            if mode == Int8Mode::WeightsOnly {
                let report = qdq::strip_activation_qdq(&mut proto, options);
                tracing::debug!(
                    model = %path.display(),
                    pairs = report.pairs_removed,
                    clips_inserted = report.clips_inserted,
                    clips_tightened = report.clips_tightened,
                    kept = report.pairs_kept.len(),
                    "weights-only INT8: removed activation quantise/dequantise pairs, kept their saturation"
                );
                if !report.pairs_kept.is_empty() {
                    tracing::info!(
                        model = %path.display(),
                        kept = report.pairs_kept.len(),
                        first = %report.pairs_kept[0],
                        "weights-only INT8: some activation pairs stay quantised"
                    );
                }
                if report.pairs_removed > 0 {
                    reference = original;
                }
                rewritten = Some(report);
            }
            if config.repair_qdq {
                let repair = qdq::repair(&mut proto, options);
                if !repair.ops_kept_float.is_empty() {
                    tracing::info!(
                        model = %path.display(),
                        ops = %repair.ops_kept_float.join(", "),
                        removed_nodes = repair.nodes_removed,
                        "kept these row-wise ops' outputs in float: tract would fuse their QuantizeLinear/DequantizeLinear into a wrong lookup table"
                    );
                }
                qdq_repaired = repair.ops_kept_float;
                if let Some(reference) = reference.as_mut() {
                    qdq::repair(reference, options);
                }
            }
            Some(mode)
        }
    };
    Ok(PreparedModel {
        proto,
        reference,
        model_dir,
        facts,
        metadata,
        input,
        output_name,
        qdq_repaired,
        rewrite: rewritten,
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
    /// The folder external data is read from, as tract wants it.
    pub fn model_dir_str(&self) -> Option<&str> {
        self.model_dir.to_str()
    }

    /// Checks the engine's output against the labels and assembles the
    /// [`ModelInfo`] every engine reports.
    pub fn into_info(self, path: &Path, built: EngineFacts, require_labels: bool) -> anyhow::Result<ModelInfo> {
        check_output(path, &self.output_name, &built.output_shape, &self.metadata, require_labels)?;
        let facts = self.facts;
        let rewrite = self.rewrite.unwrap_or_default();
        Ok(ModelInfo {
            path: path.to_path_buf(),
            engine: built.engine,
            engine_version: built.engine_version,
            threads: built.threads,
            input_name: facts.input_name,
            input_shape: self.input.shape,
            input_type: facts.input_type,
            input_dims: show_dims(&facts.input_dims),
            input_layout: self.input.layout,
            output_name: self.output_name,
            output_shape: built.output_shape,
            outputs: facts.outputs.len(),
            quantize_linear: facts.quantize_linear,
            dequantize_linear: facts.dequantize_linear,
            int8_format: facts.int8_format,
            int8_mode: self.int8_mode,
            qdq_repaired: self.qdq_repaired,
            activation_qdq_removed: rewrite.pairs_removed,
            saturation_clips: rewrite.clips_inserted + rewrite.clips_tightened,
            activation_qdq_kept: rewrite.pairs_kept.len(),
            external_tensors: facts.external_tensors,
            metadata: self.metadata,
            load_time: self.read_time + built.graph_time,
            optimize_time: built.optimize_time,
            selfcheck: None,
        })
    }
}

/// Checks the engine's output against the labels: one row of scores, one per label.
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

/// The model's input: its layout (from metadata or config, else from its
/// shape), its element type, and the NCHW shape labelcast prepares.
fn input_spec(facts: &GraphFacts, metadata: &ModelMetadata) -> anyhow::Result<InputSpec> {
    let element = match facts.input_type.as_str() {
        "float32" => InputElement::F32,
        "uint8" => InputElement::U8,
        other => bail!(
            "input {:?} is {other}; labelcast feeds float32 images (or uint8 pixels): export the model with a float32 input \
             (a float16 model converted with keep_io_types=True has one)",
            facts.input_name
        ),
    };
    let (layout, shape) = input_shape(&facts.input_dims, metadata.layout, metadata.input_size)?;
    Ok(InputSpec { layout, element, shape })
}

/// The layout and the NCHW shape to prepare: batch 1, the graph's own height
/// and width where numeric, else the metadata's size (or 224).
///
/// The layout is the metadata's or config's when given; otherwise the axis
/// that is fixed at 3 holds the channels: `[N, 3, H, W]` is NCHW, `[N, H, W, 3]`
/// NHWC. A shape that does not say (both or neither of axes 1 and 3 could be
/// channels) is refused, asking for `model.layout`.
fn input_shape(
    dims: &[Dim],
    layout: Option<InputLayout>,
    size: Option<(usize, usize)>,
) -> anyhow::Result<(InputLayout, [usize; 4])> {
    if dims.len() != 4 {
        bail!(
            "the input has {} dimensions ({}); labelcast feeds images as [1, 3, H, W] or [1, H, W, 3]",
            dims.len(),
            show_dims(dims)
        );
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
    let could_be_channels = |d: &Dim| fixed(d).is_none_or(|v| v == 3);
    let layout = match layout {
        Some(layout) => layout,
        None => match (fixed(&dims[1]), fixed(&dims[3])) {
            (Some(3), Some(v)) if v != 3 => InputLayout::Nchw,
            (Some(v), Some(3)) if v != 3 => InputLayout::Nhwc,
            (Some(3), None) => InputLayout::Nchw,
            (None, Some(3)) => InputLayout::Nhwc,
            _ if !could_be_channels(&dims[1]) && !could_be_channels(&dims[3]) => {
                bail!("the input {} has no axis of 3 colour channels; labelcast feeds RGB images", show_dims(dims))
            }
            _ if could_be_channels(&dims[1]) && !could_be_channels(&dims[3]) => InputLayout::Nchw,
            _ if could_be_channels(&dims[3]) && !could_be_channels(&dims[1]) => InputLayout::Nhwc,
            _ => bail!(
                "the input {} does not say whether its colour channels are axis 1 (NCHW) or axis 3 (NHWC); \
                 set model.layout = \"nchw\" or \"nhwc\" (or labelcast.layout in the model's metadata)",
                show_dims(dims)
            ),
        },
    };
    let (channels, h, w) = match layout {
        InputLayout::Nchw => (&dims[1], &dims[2], &dims[3]),
        InputLayout::Nhwc => (&dims[3], &dims[1], &dims[2]),
    };
    if let Some(c) = fixed(channels)
        && c != 3
    {
        bail!(
            "the input {} has {c} channels on the {} channel axis; labelcast feeds RGB (3)",
            show_dims(dims),
            layout.as_str().to_uppercase()
        );
    }
    let (default_h, default_w) = size.unwrap_or((224, 224));
    Ok((layout, [1, 3, fixed(h).unwrap_or(default_h), fixed(w).unwrap_or(default_w)]))
}

/// The output that holds the scores: the one the metadata or config names,
/// the only one, or the only one whose width is the number of labels.
fn choose_output(outputs: &[OutputFact], metadata: &ModelMetadata, require_labels: bool) -> anyhow::Result<String> {
    let listed = || outputs.iter().map(|o| format!("{} {}", o.name, show_dims(&o.dims))).collect::<Vec<_>>().join(", ");
    if let Some(name) = &metadata.output_name {
        return match outputs.iter().find(|o| &o.name == name) {
            Some(o) => Ok(o.name.clone()),
            None => bail!("model.output_name {name:?} is not one of the model's outputs ({})", listed()),
        };
    }
    if let [only] = outputs {
        return Ok(only.name.clone());
    }
    let labels = metadata.labels.len();
    let matching: Vec<&OutputFact> = outputs
        .iter()
        .filter(|o| {
            labels > 0
                && matches!(o.dims.last(), Some(Dim::Fixed(n)) if *n == labels)
                && o.dims[..o.dims.len() - 1].iter().all(|d| matches!(d, Dim::Fixed(1) | Dim::Symbolic(_)))
        })
        .collect();
    match matching.as_slice() {
        [one] => {
            tracing::info!(output = %one.name, outputs = outputs.len(), labels, "the model has several outputs; using the one with one score per label");
            Ok(one.name.clone())
        }
        _ if !require_labels && labels == 0 => Ok(outputs[0].name.clone()),
        _ => bail!(
            "the model has {} outputs ({}); set model.output_name (or labelcast.output_name in its metadata) to the one that holds the scores",
            outputs.len(),
            listed()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(name: &str) -> Dim {
        Dim::Symbolic(name.into())
    }

    #[test]
    fn a_symbolic_batch_is_fixed_to_one_and_size_comes_from_the_graph() {
        let dims = [sym("N"), Dim::Fixed(3), Dim::Fixed(160), Dim::Fixed(128)];
        assert_eq!(input_shape(&dims, None, None).unwrap(), (InputLayout::Nchw, [1, 3, 160, 128]));
    }

    #[test]
    fn symbolic_height_and_width_use_the_metadata_size() {
        let dims = [Dim::Fixed(1), Dim::Fixed(3), sym("h"), sym("w")];
        assert_eq!(input_shape(&dims, None, Some((300, 400))).unwrap(), (InputLayout::Nchw, [1, 3, 300, 400]));
    }

    #[test]
    fn channels_last_inputs_are_recognised_fixed_or_symbolic() {
        let fixed = [Dim::Fixed(1), Dim::Fixed(224), Dim::Fixed(224), Dim::Fixed(3)];
        assert_eq!(input_shape(&fixed, None, None).unwrap(), (InputLayout::Nhwc, [1, 3, 224, 224]));
        let keras = [sym("N"), sym("H"), sym("W"), Dim::Fixed(3)];
        assert_eq!(input_shape(&keras, None, Some((192, 256))).unwrap(), (InputLayout::Nhwc, [1, 3, 192, 256]));
        let wide = [sym("N"), Dim::Fixed(160), Dim::Fixed(320), sym("C")];
        assert_eq!(input_shape(&wide, None, None).unwrap(), (InputLayout::Nhwc, [1, 3, 160, 320]));
    }

    #[test]
    fn a_shape_that_does_not_say_where_the_channels_are_asks_for_the_layout() {
        for dims in
            [[sym("N"), sym("C"), sym("H"), sym("W")], [Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(3)]]
        {
            let err = input_shape(&dims, None, None).unwrap_err();
            assert!(err.to_string().contains("model.layout"), "{err}");
        }
        let dims = [sym("N"), sym("C"), sym("H"), sym("W")];
        assert_eq!(input_shape(&dims, Some(InputLayout::Nhwc), None).unwrap().0, InputLayout::Nhwc);
    }

    #[test]
    fn a_batch_of_eight_or_a_grey_input_is_refused() {
        let batch8 = [Dim::Fixed(8), Dim::Fixed(3), Dim::Fixed(224), Dim::Fixed(224)];
        assert!(input_shape(&batch8, None, None).unwrap_err().to_string().contains("batch 1"));
        let grey = [Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(224), Dim::Fixed(224)];
        assert!(input_shape(&grey, None, None).unwrap_err().to_string().contains("channels"));
        let grey_nhwc = [Dim::Fixed(1), Dim::Fixed(224), Dim::Fixed(224), Dim::Fixed(1)];
        assert!(input_shape(&grey_nhwc, None, None).unwrap_err().to_string().contains("channels"));
    }

    fn metadata(labels: &[&str]) -> ModelMetadata {
        ModelMetadata::resolve(
            Path::new("m.onnx"),
            &Default::default(),
            &crate::config::MetadataOverrides {
                labels: Some(labels.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
            true,
        )
        .unwrap()
    }

    fn output(name: &str, dims: &[usize]) -> OutputFact {
        OutputFact {
            name: name.into(),
            dims: dims.iter().map(|&d| Dim::Fixed(d)).collect(),
            elem_type: "float32".into(),
        }
    }

    #[test]
    fn of_two_outputs_the_one_with_a_score_per_label_is_used_or_the_choice_is_asked_for() {
        let outputs = [output("embedding", &[1, 768]), output("logits", &[1, 3])];
        assert_eq!(choose_output(&outputs, &metadata(&["a", "b", "c"]), true).unwrap(), "logits");
        let ambiguous = [output("a", &[1, 3]), output("b", &[1, 3])];
        let err = choose_output(&ambiguous, &metadata(&["a", "b", "c"]), true).unwrap_err();
        assert!(err.to_string().contains("model.output_name") && err.to_string().contains("a [1, 3]"), "{err}");
        let mut named = metadata(&["a", "b", "c"]);
        named.output_name = Some("b".into());
        assert_eq!(choose_output(&ambiguous, &named, true).unwrap(), "b");
        named.output_name = Some("nope".into());
        assert!(choose_output(&ambiguous, &named, true).unwrap_err().to_string().contains("not one of"));
    }

    #[test]
    fn an_output_with_a_batch_of_two_is_refused_and_a_label_count_mismatch_names_the_field() {
        let metadata = metadata(&["a", "b"]);
        let err = check_output(Path::new("m.onnx"), "scores", &[2, 2], &metadata, true).unwrap_err();
        assert!(format!("{err:#}").contains("expected [1, N]"), "{err:#}");
        let err = check_output(Path::new("m.onnx"), "scores", &[1, 3], &metadata, true).unwrap_err();
        let config_error = err.downcast_ref::<ConfigError>().expect("a config error");
        assert_eq!(config_error.field, "model.labels");
        assert!(check_output(Path::new("m.onnx"), "scores", &[1, 2], &metadata, true).is_ok());
    }
}
