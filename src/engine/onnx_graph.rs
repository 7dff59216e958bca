//! Reads what labelcast needs from an ONNX file before any engine sees it:
//! the real graph input (name, dims, element type), the output name, the
//! count of QuantizeLinear/DequantizeLinear nodes and `metadata_props`.
//! Working on the protobuf keeps these facts engine-independent and lets a
//! garbage file fail with a clear message instead of deep in an engine.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{Context, bail};
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

/// One graph dimension: a number, or a name (a symbolic axis such as `batch`).
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(usize),
    Symbolic(String),
}

#[derive(Debug)]
pub struct GraphFacts {
    pub input_name: String,
    pub input_dims: Vec<Dim>,
    pub input_type: String,
    pub output_name: String,
    pub quantize_linear: usize,
    pub dequantize_linear: usize,
    pub metadata: BTreeMap<String, String>,
}

/// Reads and decodes an ONNX file.
pub fn read_model(path: &Path) -> anyhow::Result<pb::ModelProto> {
    let bytes = std::fs::read(path).with_context(|| format!("reading model {}", path.display()))?;
    if bytes.is_empty() {
        bail!("model {} is empty", path.display());
    }
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut bytes.as_slice())
        .map_err(|err| anyhow::anyhow!("{err}"))
        .with_context(|| format!("model {} is not a readable ONNX file (truncated or not ONNX?)", path.display()))?;
    if proto.graph.as_ref().is_none_or(|g| g.node.is_empty()) {
        bail!("model {} holds no graph: is it an ONNX model?", path.display());
    }
    Ok(proto)
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
    let [output] = graph.output.as_slice() else {
        bail!("the model has {} outputs; labelcast reads one score tensor", graph.output.len());
    };
    let (input_dims, input_type) = tensor_type(input)?;
    let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
    Ok(GraphFacts {
        input_name: input.name.clone(),
        input_dims,
        input_type,
        output_name: output.name.clone(),
        quantize_linear: count("QuantizeLinear"),
        dequantize_linear: count("DequantizeLinear"),
        metadata: proto.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect(),
    })
}

fn tensor_type(value: &pb::ValueInfoProto) -> anyhow::Result<(Vec<Dim>, String)> {
    let Some(pb::type_proto::Value::TensorType(tensor)) = value.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        bail!("input {:?} is not a tensor", value.name);
    };
    let elem = match tensor.elem_type {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        10 => "float16",
        11 => "float64",
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
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => Dim::Symbolic(p.clone()),
                    _ => Dim::Symbolic("?".into()),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((dims, elem.to_string()))
}
