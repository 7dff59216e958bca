//! Reads what labelcast needs from an ONNX file before any engine sees it:
//! the real graph input (name, dims, element type), the outputs, which INT8
//! format the graph uses and `metadata_props`, and checks that the external
//! data files a model's weights may live in are there and whole. Working on
//! the protobuf keeps these facts engine-independent and lets a garbage file
//! fail with a clear message instead of deep in an engine.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path};

use anyhow::{Context, bail};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::prelude::Framework;

/// One graph dimension: a number, or a name (a symbolic axis such as `batch`).
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(usize),
    Symbolic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbolic(name) => f.write_str(name),
        }
    }
}

/// Dims as `[N, 3, 224, 224]`.
pub fn show_dims(dims: &[Dim]) -> String {
    format!("[{}]", dims.iter().map(Dim::to_string).collect::<Vec<_>>().join(", "))
}

/// A graph output as the file declares it.
#[derive(Debug, Clone)]
pub struct OutputFact {
    pub name: String,
    /// Empty when the file does not declare the shape.
    pub dims: Vec<Dim>,
    pub elem_type: String,
}

/// How a model is quantised, as far as its operators tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Format {
    /// QuantizeLinear/DequantizeLinear around float operators (ONNX
    /// Runtime's default `QuantFormat.QDQ`, TensorRT's explicit quantisation).
    Qdq,
    /// Integer operators (QLinearConv, QLinearMatMul, ONNX Runtime's QGemm,
    /// QLinearAdd...): `QuantFormat.QOperator`.
    QOperator,
    /// Weights quantised, activations quantised at run time
    /// (DynamicQuantizeLinear + MatMulInteger/ConvInteger): `quantize_dynamic`.
    Dynamic,
}

impl Int8Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qdq => "QDQ",
            Self::QOperator => "QOperator",
            Self::Dynamic => "dynamic",
        }
    }
}

#[derive(Debug)]
pub struct GraphFacts {
    pub input_name: String,
    pub input_dims: Vec<Dim>,
    pub input_type: String,
    pub outputs: Vec<OutputFact>,
    pub quantize_linear: usize,
    pub dequantize_linear: usize,
    pub int8_format: Option<Int8Format>,
    pub metadata: BTreeMap<String, String>,
    /// Tensors whose bytes live in files beside the model.
    pub external_tensors: usize,
}

/// Reads and decodes an ONNX file, and checks its external data files.
pub fn read_model(path: &Path) -> anyhow::Result<pb::ModelProto> {
    let bytes = std::fs::read(path).with_context(|| format!("reading model {}", path.display()))?;
    if bytes.is_empty() {
        bail!("model {} is empty", path.display());
    }
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut bytes.as_slice())
        .map_err(|err| anyhow::anyhow!("{err}"))
        .with_context(|| format!("model {} is not a readable ONNX file (truncated or not ONNX?)", path.display()))?;
    let Some(graph) = proto.graph.as_ref().filter(|g| !g.node.is_empty()) else {
        bail!("model {} holds no graph: is it an ONNX model?", path.display());
    };
    check_external_data(graph, &model_dir(path))?;
    Ok(proto)
}

/// The folder a model's external data paths are relative to.
pub fn model_dir(path: &Path) -> std::path::PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// Bytes per element of the types a weight can have; `None` for types
/// whose size this check does not know (then only the offset is checked).
fn element_bytes(data_type: i32) -> Option<u64> {
    Some(match DataType::try_from(data_type).ok()? {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Uint8 | DataType::Int8 | DataType::Bool => 1,
        DataType::Uint16 | DataType::Int16 | DataType::Float16 | DataType::Bfloat16 => 2,
        DataType::Int64 | DataType::Uint64 | DataType::Double => 8,
        _ => return None,
    })
}

/// Every tensor stored outside the model file (`onnx.save(...,
/// save_as_external_data=True)` writes `model.onnx.data` beside it) must
/// name a file inside the model's folder that holds all of its bytes. A
/// missing or short file is refused here, naming it, rather than as a read
/// error deep in an engine.
fn check_external_data(graph: &pb::GraphProto, dir: &Path) -> anyhow::Result<()> {
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for tensor in &graph.initializer {
        if tensor.data_location != Some(DataLocation::External as i32) {
            continue;
        }
        let entry = |key: &str| tensor.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str());
        let location = entry("location").with_context(|| {
            format!("tensor {:?} is stored in external data but names no file (no \"location\")", tensor.name)
        })?;
        let relative = Path::new(location);
        if relative.is_absolute() || relative.components().any(|c| matches!(c, Component::ParentDir)) {
            bail!(
                "tensor {:?} is stored in {location:?}, outside the model's folder; external data must be a file beside the model",
                tensor.name
            );
        }
        let file = dir.join(relative);
        let size = match sizes.get(location) {
            Some(size) => *size,
            None => {
                let size = std::fs::metadata(&file)
                    .with_context(|| {
                        format!(
                            "external data file {} (tensor {:?}) cannot be read; copy it next to the model",
                            file.display(),
                            tensor.name
                        )
                    })?
                    .len();
                sizes.insert(location.to_string(), size);
                size
            }
        };
        let number = |key: &str| -> anyhow::Result<Option<u64>> {
            entry(key)
                .map(|v| {
                    v.parse::<u64>().with_context(|| format!("tensor {:?}: external data {key} {v:?}", tensor.name))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let elements: Option<u64> =
            tensor.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?));
        let length = match number("length")? {
            Some(length) => Some(length),
            None => elements.zip(element_bytes(tensor.data_type)).and_then(|(n, b)| n.checked_mul(b)),
        };
        let end = offset.checked_add(length.unwrap_or(0)).context("external data offset + length overflows")?;
        if end > size || offset > size {
            bail!(
                "external data file {} is truncated: it holds {size} bytes, tensor {:?} needs bytes {offset}..{end}",
                file.display(),
                tensor.name
            );
        }
    }
    Ok(())
}

/// Ops that only ONNX Runtime's QOperator format (and its contrib domain) writes.
pub fn is_qoperator(op: &str) -> bool {
    op.starts_with("QLinear") || matches!(op, "QGemm" | "QAttention" | "QEmbedLayerNormalization")
}

fn is_dynamic_int8(op: &str) -> bool {
    matches!(
        op,
        "DynamicQuantizeLinear" | "MatMulInteger" | "ConvInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat"
    )
}

pub fn inspect(proto: &pb::ModelProto) -> anyhow::Result<GraphFacts> {
    let graph = proto.graph.as_ref().context("the ONNX file holds no graph")?;
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> =
        graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())).collect();
    let [input] = inputs.as_slice() else {
        bail!(
            "the model has {} inputs ({}); labelcast feeds one image tensor",
            inputs.len(),
            inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    };
    if graph.output.is_empty() {
        bail!("the model has no output");
    }
    let (input_dims, input_type) = tensor_type(input)?;
    let outputs = graph
        .output
        .iter()
        .map(|o| {
            let (dims, elem_type) = tensor_type(o).unwrap_or_default();
            OutputFact { name: o.name.clone(), dims, elem_type }
        })
        .collect();
    let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
    let (quantize_linear, dequantize_linear) = (count("QuantizeLinear"), count("DequantizeLinear"));
    let int8_format = if graph.node.iter().any(|n| is_qoperator(&n.op_type)) {
        Some(Int8Format::QOperator)
    } else if graph.node.iter().any(|n| is_dynamic_int8(&n.op_type)) {
        Some(Int8Format::Dynamic)
    } else if dequantize_linear > 0 {
        Some(Int8Format::Qdq)
    } else {
        None
    };
    Ok(GraphFacts {
        input_name: input.name.clone(),
        input_dims,
        input_type,
        outputs,
        quantize_linear,
        dequantize_linear,
        int8_format,
        metadata: proto.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect(),
        external_tensors: graph
            .initializer
            .iter()
            .filter(|t| t.data_location == Some(DataLocation::External as i32))
            .count(),
    })
}

fn tensor_type(value: &pb::ValueInfoProto) -> anyhow::Result<(Vec<Dim>, String)> {
    let Some(pb::type_proto::Value::TensorType(tensor)) = value.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        bail!("{:?} is not a tensor", value.name);
    };
    let elem = match DataType::try_from(tensor.elem_type) {
        Ok(DataType::Float) => "float32",
        Ok(DataType::Uint8) => "uint8",
        Ok(DataType::Int8) => "int8",
        Ok(DataType::Float16) => "float16",
        Ok(DataType::Double) => "float64",
        Ok(DataType::Bfloat16) => "bfloat16",
        Ok(DataType::Int32) => "int32",
        Ok(DataType::Int64) => "int64",
        _ => "other",
    };
    let dims = tensor
        .shape
        .as_ref()
        .map(|shape| {
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => Dim::Fixed(*v as usize),
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                        Dim::Symbolic(p.clone())
                    }
                    _ => Dim::Symbolic("?".into()),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((dims, elem.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn external(name: &str, location: &str, offset: u64, length: u64) -> pb::TensorProto {
        let entry = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        pb::TensorProto {
            name: name.into(),
            data_type: DataType::Float as i32,
            dims: vec![(length / 4) as i64],
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                entry("location", location.into()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ],
            ..Default::default()
        }
    }

    fn graph(tensors: Vec<pb::TensorProto>) -> pb::GraphProto {
        pb::GraphProto { initializer: tensors, ..Default::default() }
    }

    #[test]
    fn external_data_that_is_whole_passes_and_a_short_or_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx.data"), vec![0u8; 64]).unwrap();
        assert!(check_external_data(&graph(vec![external("w", "m.onnx.data", 32, 32)]), dir.path()).is_ok());
        let err = check_external_data(&graph(vec![external("w", "m.onnx.data", 32, 64)]), dir.path()).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("m.onnx.data is truncated") && message.contains("holds 64 bytes"), "{message}");
        let err = check_external_data(&graph(vec![external("w", "gone.data", 0, 4)]), dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("gone.data"), "{err:#}");
    }

    #[test]
    fn external_data_outside_the_model_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for location in ["../secret", "/etc/passwd"] {
            let err = check_external_data(&graph(vec![external("w", location, 0, 4)]), dir.path()).unwrap_err();
            assert!(format!("{err:#}").contains("outside the model's folder"), "{err:#}");
        }
    }
}
