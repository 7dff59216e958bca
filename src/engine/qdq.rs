//! Graph rewrites of QDQ INT8 models for tract, each of which must keep the
//! graph's meaning.
//!
//! A QuantizeLinear -> DequantizeLinear pair does two things to a tensor: it
//! rounds it to the quantisation grid, and it *saturates* it to the float
//! range the integer type can hold, `[(qmin - zp) * s, (qmax - zp) * s]`.
//! Quantisers rely on the second: ONNX Runtime's `quantize_static` with
//! uint8 activations deletes the Relu and Clip nodes after a Conv and lets
//! the QuantizeLinear's range (zero point 0: nothing below 0.0) do the
//! clamping. Removing such a pair without keeping its saturation turns every
//! ReLU6 into the identity, and the model into garbage.
//!
//! So every pair removed here keeps its saturation where it can matter: when
//! the range its input is known to lie in (a Relu's `[0, inf)`, a Softmax's
//! `[0, 1]`, another pair's saturation, ...) is not inside the saturation
//! range, a `Clip` to that range takes the pair's place (or a Relu/Clip that
//! only feeds the pair is tightened to it); tract fuses such clamps into the
//! producing convolution or matrix product. What is then lost is only the
//! rounding to the grid, the part weights-only mode means to drop. A pair
//! whose parameters cannot be read as one constant scale and zero point is
//! left in place.
//!
//! Two passes use this:
//!
//! * [`repair`] (native and weights-only): tract fuses `DequantizeLinear ->
//!   op -> QuantizeLinear` into a 256-entry lookup table when `op` looks
//!   element-wise. For Softmax that is wrong (each output depends on the
//!   whole row): an ONNX Runtime default QDQ export of ML-Decoder was off by
//!   about 0.5. The pair after every row-wise op is removed, so the fusion
//!   cannot happen; the op's input stays quantised.
//! * [`strip_activation_qdq`] (weights-only): every pair on an activation
//!   goes; weight pairs (on constants) stay, so tract dequantises the INT8
//!   weights once at load and computes in float.
//!
//! Neither is trusted blindly: `selfcheck` runs the rewritten graph against
//! the graph as quantised at load.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

/// Ops that tract would wrongly fuse into a lookup table when wrapped in Q/DQ.
const ROW_WISE_OPS: &[&str] = &["Softmax", "LogSoftmax", "Hardmax"];

/// A closed interval of floats; either end may be infinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub lo: f64,
    pub hi: f64,
}

impl Range {
    pub const FULL: Range = Range { lo: f64::NEG_INFINITY, hi: f64::INFINITY };

    pub fn new(lo: f64, hi: f64) -> Self {
        Self { lo, hi }
    }
    /// True when every value of `self` lies in `outer`.
    pub fn within(self, outer: Range) -> bool {
        self.lo >= outer.lo && self.hi <= outer.hi
    }
    fn union(self, other: Range) -> Range {
        Range::new(self.lo.min(other.lo), self.hi.max(other.hi))
    }
    fn intersect(self, other: Range) -> Range {
        Range::new(self.lo.max(other.lo), self.hi.min(other.hi))
    }
}

/// One QuantizeLinear's parameters, read as a single scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantParams {
    pub scale: f64,
    pub zero_point: f64,
    pub qmin: f64,
    pub qmax: f64,
}

impl QuantParams {
    /// The float range a quantise/dequantise round trip clamps to:
    /// `[(qmin - zp) * s, (qmax - zp) * s]` (ONNX QuantizeLinear saturates to
    /// the output type's range before DequantizeLinear maps it back).
    pub fn saturation(&self) -> Range {
        Range::new((self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale)
    }
}

/// The integer range of a quantised type, `None` for types this pass does
/// not reason about (float8: its saturation is not a simple clamp).
fn integer_range(data_type: i32) -> Option<(f64, f64)> {
    match DataType::try_from(data_type).ok()? {
        DataType::Uint8 => Some((0.0, 255.0)),
        DataType::Int8 => Some((-128.0, 127.0)),
        DataType::Uint16 => Some((0.0, 65535.0)),
        DataType::Int16 => Some((-32768.0, 32767.0)),
        DataType::Uint4 => Some((0.0, 15.0)),
        DataType::Int4 => Some((-8.0, 7.0)),
        _ => None,
    }
}

/// Constant tensors of a graph by name: initializers and `Constant` nodes.
struct Constants<'a> {
    tensors: HashMap<&'a str, &'a pb::TensorProto>,
    /// Where external data lives (the model's folder).
    model_dir: Option<&'a str>,
}

impl<'a> Constants<'a> {
    fn new(graph: &'a pb::GraphProto, model_dir: Option<&'a str>) -> Self {
        let mut tensors: HashMap<&str, &pb::TensorProto> =
            graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
            let value = node.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
            if let (Some(value), Some(output)) = (value, node.output.first()) {
                tensors.insert(output.as_str(), value);
            }
        }
        Self { tensors, model_dir }
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn data_type(&self, name: &str) -> Option<i32> {
        self.tensors.get(name).map(|t| t.data_type)
    }

    /// Every value of a constant, as f64; `None` if it is not a constant
    /// or cannot be read.
    fn values(&self, name: &str) -> Option<Vec<f64>> {
        let proto = self.tensors.get(name)?;
        let provider = tract_onnx::data_resolver::default();
        let tensor = tract_onnx::tensor::load_tensor(&*provider, proto, self.model_dir).ok()?;
        let tensor = tensor.cast_to::<f64>().ok()?;
        let values: Vec<f64> = tensor.to_plain_array_view::<f64>().ok()?.iter().copied().collect();
        (!values.is_empty()).then_some(values)
    }

    /// A constant all of whose values are equal (a scalar, or a per-axis
    /// tensor that happens to be uniform).
    fn uniform(&self, name: &str) -> Option<f64> {
        let values = self.values(name)?;
        let first = values[0];
        values.iter().all(|v| *v == first).then_some(first)
    }
}

fn attribute<'n>(node: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// A QuantizeLinear's (or DequantizeLinear's) parameters, when they are one
/// float32 scale and one zero point of an integer type.
fn quant_params(node: &pb::NodeProto, constants: &Constants) -> Result<QuantParams, String> {
    let scale_name = node.input.get(1).filter(|s| !s.is_empty()).ok_or("it has no scale")?;
    if constants.data_type(scale_name) != Some(DataType::Float as i32) {
        return Err("its scale is not a float32 constant".into());
    }
    let scale = constants.uniform(scale_name).ok_or("its scale varies along an axis")?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(format!("its scale is {scale}"));
    }
    let (data_type, zero_point) = match node.input.get(2).filter(|s| !s.is_empty()) {
        Some(zp) => {
            let data_type = constants.data_type(zp).ok_or("its zero point is not a constant")?;
            (data_type, constants.uniform(zp).ok_or("its zero point varies along an axis")?)
        }
        // Without a zero point the type is `output_dtype` (opset 21) or uint8.
        None => (attribute(node, "output_dtype").map_or(DataType::Uint8 as i32, |a| a.i as i32), 0.0),
    };
    let (qmin, qmax) = integer_range(data_type).ok_or("its type is not an integer type")?;
    Ok(QuantParams { scale, zero_point, qmin, qmax })
}

/// Producers and consumers of every tensor, and what is known about ranges.
struct Analysis<'a> {
    graph: &'a pb::GraphProto,
    constants: Constants<'a>,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    graph_outputs: HashSet<&'a str>,
    ranges: std::cell::RefCell<HashMap<String, Range>>,
}

/// How deep [`Analysis::known_range`] follows pass-through ops; beyond it a
/// tensor is taken to be unbounded (always safe: a Clip too many, no error).
const RANGE_DEPTH: usize = 64;

impl<'a> Analysis<'a> {
    fn new(graph: &'a pb::GraphProto, model_dir: Option<&'a str>) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for output in &node.output {
                producer.insert(output.as_str(), i);
            }
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                consumers.entry(input.as_str()).or_default().push(i);
            }
        }
        Self {
            graph,
            constants: Constants::new(graph, model_dir),
            producer,
            consumers,
            graph_outputs: graph.output.iter().map(|o| o.name.as_str()).collect(),
            ranges: Default::default(),
        }
    }

    fn node(&self, index: usize) -> &'a pb::NodeProto {
        &self.graph.node[index]
    }

    fn consumers_of(&self, tensor: &str) -> &[usize] {
        self.consumers.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }

    fn produced_by(&self, tensor: &str) -> Option<&'a pb::NodeProto> {
        self.producer.get(tensor).map(|&i| self.node(i))
    }

    /// A constant scalar input of a node (Clip's min and max), if given.
    fn constant_input(&self, node: &pb::NodeProto, index: usize) -> Option<f64> {
        node.input.get(index).filter(|s| !s.is_empty()).and_then(|name| self.constants.uniform(name))
    }

    /// The bounds of a Clip node: its constant inputs (opset >= 11) or
    /// attributes (before), `None` where a bound is missing or not constant.
    fn clip_bounds(&self, node: &pb::NodeProto) -> Range {
        let lo = self
            .constant_input(node, 1)
            .or_else(|| attribute(node, "min").map(|a| f64::from(a.f)))
            .unwrap_or(f64::NEG_INFINITY);
        let hi = self
            .constant_input(node, 2)
            .or_else(|| attribute(node, "max").map(|a| f64::from(a.f)))
            .unwrap_or(f64::INFINITY);
        Range::new(lo, hi)
    }

    /// A range every value of `tensor` is guaranteed to lie in, in the graph
    /// as quantised. Only ops whose bound follows from their definition
    /// count; anything else is unbounded.
    fn known_range(&self, tensor: &str) -> Range {
        self.known_range_at(tensor, 0)
    }

    fn known_range_at(&self, tensor: &str, depth: usize) -> Range {
        if let Some(range) = self.ranges.borrow().get(tensor) {
            return *range;
        }
        let range = self.compute_range(tensor, depth);
        self.ranges.borrow_mut().insert(tensor.to_string(), range);
        range
    }

    fn compute_range(&self, tensor: &str, depth: usize) -> Range {
        let Some(node) = self.produced_by(tensor) else { return Range::FULL };
        if depth >= RANGE_DEPTH {
            return Range::FULL;
        }
        let input = |i: usize| {
            node.input.get(i).filter(|s| !s.is_empty()).map_or(Range::FULL, |n| self.known_range_at(n, depth + 1))
        };
        match node.op_type.as_str() {
            "Relu" => Range::new(0.0, f64::INFINITY).intersect(input(0)),
            "Clip" => self.clip_bounds(node).intersect(input(0)),
            "Sigmoid" | "HardSigmoid" | "Softmax" | "Hardmax" => Range::new(0.0, 1.0),
            "Tanh" | "Softsign" => Range::new(-1.0, 1.0),
            "LogSoftmax" => Range::new(f64::NEG_INFINITY, 0.0),
            // The pair's saturation, when it can be read.
            "DequantizeLinear" => {
                let pair = node.input.first().and_then(|q| self.produced_by(q));
                match pair.filter(|q| q.op_type == "QuantizeLinear") {
                    Some(q) => quant_params(q, &self.constants).map_or(Range::FULL, |p| p.saturation()),
                    None => quant_params(node, &self.constants).map_or(Range::FULL, |p| p.saturation()),
                }
            }
            // Ops that only move, select or take the largest of their input's values.
            "MaxPool" | "GlobalMaxPool" | "Reshape" | "Transpose" | "Flatten" | "Squeeze" | "Unsqueeze"
            | "Identity" | "Slice" | "Gather" | "Split" | "DepthToSpace" | "SpaceToDepth" | "Expand" | "Tile"
            | "ReduceMax" | "ReduceMin" => input(0),
            // Means stay within their inputs' range; padding may add zeros.
            "AveragePool" | "GlobalAveragePool" | "ReduceMean" => input(0).union(Range::new(0.0, 0.0)),
            "Concat" | "Max" | "Min" => (0..node.input.len()).map(input).reduce(Range::union).unwrap_or(Range::FULL),
            _ => Range::FULL,
        }
    }
}

/// One QuantizeLinear -> DequantizeLinear pair on an activation and what
/// removing it takes.
#[derive(Debug)]
struct Pair {
    quantize: usize,
    dequantizes: Vec<usize>,
    /// The float tensor the QuantizeLinear read.
    source: String,
    keep: Saturation,
    params: QuantParams,
}

/// How a removed pair's saturation survives.
#[derive(Debug, PartialEq)]
enum Saturation {
    /// Its input never leaves the saturation range: nothing to keep.
    Implied,
    /// The Relu or Clip producing its input (used by nothing else) is
    /// narrowed to the range.
    Tighten { node: usize, range: Range },
    /// A Clip to the range takes the QuantizeLinear's place.
    Clip(Range),
    /// The round trip itself, spelled out in float ops tract does not fuse
    /// (`Mul(Clip(Round(Div(x, s)), qmin - zp, qmax - zp), s)`): rounding
    /// and saturation both kept, for [`repair`], which must change nothing.
    FakeQuant { scale: String, params: QuantParams },
}

/// Why a pair was left in the graph.
fn removable_pair(analysis: &Analysis, quantize: usize) -> Result<Pair, String> {
    let node = analysis.node(quantize);
    let (Some(source), Some(quantized)) = (node.input.first(), node.output.first()) else {
        return Err("it has no input or output".into());
    };
    if analysis.graph_outputs.contains(quantized.as_str()) {
        return Err("its quantised tensor is a graph output".into());
    }
    let dequantizes = analysis.consumers_of(quantized).to_vec();
    if dequantizes.is_empty() {
        return Err("nothing reads it".into());
    }
    let params = quant_params(node, &analysis.constants)?;
    for &d in &dequantizes {
        let dq = analysis.node(d);
        if dq.op_type != "DequantizeLinear" || dq.output.is_empty() {
            return Err(format!("{} reads the quantised tensor", dq.op_type));
        }
        // A DequantizeLinear with other parameters would rescale: not a round trip.
        let same_inputs = dq.input.get(1..) == node.input.get(1..);
        if !same_inputs && quant_params(dq, &analysis.constants).ok() != Some(params) {
            return Err("its DequantizeLinear uses another scale or zero point".into());
        }
    }
    let saturation = params.saturation();
    let known = analysis.known_range(source);
    let keep = if known.within(saturation) {
        Saturation::Implied
    } else {
        let producer = analysis.producer.get(source.as_str()).copied();
        let only_user =
            analysis.consumers_of(source) == [quantize] && !analysis.graph_outputs.contains(source.as_str());
        match producer.map(|p| (p, analysis.node(p))) {
            Some((p, n)) if only_user && matches!(n.op_type.as_str(), "Relu" | "Clip") && n.output.len() == 1 => {
                let own = if n.op_type == "Relu" { Range::new(0.0, f64::INFINITY) } else { analysis.clip_bounds(n) };
                // Bounds that are not constants cannot be merged.
                let constant_bounds = n.op_type == "Relu"
                    || n.input.iter().skip(1).all(|i| i.is_empty() || analysis.constants.contains(i));
                if constant_bounds {
                    Saturation::Tighten { node: p, range: own.intersect(saturation) }
                } else {
                    Saturation::Clip(saturation)
                }
            }
            _ => Saturation::Clip(saturation),
        }
    };
    Ok(Pair { quantize, dequantizes, source: source.clone(), keep, params })
}

/// What a rewrite changed, for the log and `model-info`.
#[derive(Debug, Default, PartialEq)]
pub struct Rewritten {
    /// QuantizeLinear/DequantizeLinear pairs removed.
    pub pairs_removed: usize,
    /// Of those, pairs whose saturation a new Clip keeps.
    pub clips_inserted: usize,
    /// Of those, pairs whose saturation an existing Relu/Clip now applies.
    pub clips_tightened: usize,
    /// Pairs left in place, with the reason (the first few).
    pub pairs_kept: Vec<String>,
}

/// What [`repair`] changed, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Repair {
    /// Names of the ops whose output now stays in float.
    pub ops_kept_float: Vec<String>,
    /// Q/DQ nodes removed.
    pub nodes_removed: usize,
    /// Round trips spelled out in float ops in the pairs' place.
    pub round_trips_kept: usize,
}

/// Options for the rewrites.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// The model's folder, for tensors in external data files.
    pub model_dir: Option<&'a str>,
    /// Drop removed pairs' saturation (the rewrite before this module kept
    /// it). Only for showing that the load-time self-check catches a wrong
    /// rewrite: never right on a real model.
    pub drop_saturation: bool,
}

/// Replaces the Q/DQ pairs after row-wise ops in the main graph with the
/// same round trip in float ops (see [`Saturation::FakeQuant`]): the graph
/// computes exactly what it did, and tract no longer sees the pattern it
/// mis-fuses.
pub fn repair(model: &mut pb::ModelProto, options: Options) -> Repair {
    let Some(graph) = model.graph.as_ref() else { return Repair::default() };
    let analysis = Analysis::new(graph, options.model_dir);
    let mut pairs = Vec::new();
    let mut ops_kept_float = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        if !ROW_WISE_OPS.contains(&node.op_type.as_str()) || node.output.is_empty() {
            continue;
        }
        let takes_dequantized = node
            .input
            .first()
            .and_then(|input| analysis.produced_by(input))
            .is_some_and(|p| p.op_type == "DequantizeLinear");
        let users = analysis.consumers_of(&node.output[0]);
        // Only when every user is a removable pair can the output go float
        // without changing anything else.
        let found: Option<Vec<Pair>> = users
            .iter()
            .map(|&q| {
                (analysis.node(q).op_type == "QuantizeLinear").then(|| removable_pair(&analysis, q).ok()).flatten()
            })
            .collect();
        let Some(found) = found.filter(|p| !p.is_empty()) else { continue };
        if !takes_dequantized {
            continue;
        }
        for mut pair in found {
            let scale = analysis.node(pair.quantize).input[1].clone();
            pair.keep = Saturation::FakeQuant { scale, params: pair.params };
            pairs.push(pair);
        }
        ops_kept_float.push(if node.name.is_empty() { format!("{}#{index}", node.op_type) } else { node.name.clone() });
    }
    drop(analysis);
    let applied = apply(model, pairs, options);
    Repair {
        ops_kept_float,
        nodes_removed: applied.pairs_removed + applied.dequantizes_removed,
        round_trips_kept: applied.rewritten.clips_inserted,
    }
}

/// Weights-only INT8: removes every QuantizeLinear -> DequantizeLinear pair
/// on an activation (a tensor computed at run time), keeping its saturation,
/// so the graph computes in float from dequantised INT8 weights. Weight
/// pairs (on initializers or constants) stay: the file keeps its INT8
/// weights and the engine dequantises them once at load.
pub fn strip_activation_qdq(model: &mut pb::ModelProto, options: Options) -> Rewritten {
    let Some(graph) = model.graph.as_ref() else { return Rewritten::default() };
    let analysis = Analysis::new(graph, options.model_dir);
    let mut pairs = Vec::new();
    let mut kept = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        if node.op_type != "QuantizeLinear" || node.input.first().is_none_or(|s| analysis.constants.contains(s)) {
            continue;
        }
        match removable_pair(&analysis, index) {
            Ok(pair) => pairs.push(pair),
            Err(reason) => {
                let name = if node.name.is_empty() { format!("QuantizeLinear#{index}") } else { node.name.clone() };
                kept.push(format!("{name}: {reason}"));
            }
        }
    }
    drop(analysis);
    let mut applied = apply(model, pairs, options);
    applied.rewritten.pairs_kept = kept;
    applied.rewritten
}

struct Applied {
    rewritten: Rewritten,
    pairs_removed: usize,
    dequantizes_removed: usize,
}

/// Removes the pairs, putting a Clip in each QuantizeLinear's place or
/// tightening a producer as each pair's [`Saturation`] says, and rewires
/// every reader of a removed DequantizeLinear.
fn apply(model: &mut pb::ModelProto, pairs: Vec<Pair>, options: Options) -> Applied {
    let mut rewritten = Rewritten::default();
    let mut dequantizes_removed = 0;
    let opset =
        model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(11, |o| o.version);
    let Some(graph) = model.graph.as_mut() else {
        return Applied { rewritten, pairs_removed: 0, dequantizes_removed };
    };
    // Tensor and node names already in use: a new name must not take one.
    let mut taken: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned().chain(std::iter::once(n.name.clone())))
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(graph.input.iter().map(|i| i.name.clone()))
        .collect();
    let mut fresh = move |base: &str| {
        let mut name = base.to_string();
        let mut n = 0;
        while taken.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        taken.insert(name.clone());
        name
    };
    let mut rename: HashMap<String, String> = HashMap::new();
    let mut replace: HashMap<usize, pb::NodeProto> = HashMap::new();
    // Nodes that take one node's place (several of them, in order).
    let mut expand: HashMap<usize, Vec<pb::NodeProto>> = HashMap::new();
    let mut dropped: HashSet<usize> = HashSet::new();
    let mut new_initializers = Vec::new();
    let pairs_removed = pairs.len();
    for pair in pairs {
        let keep = if options.drop_saturation { Saturation::Implied } else { pair.keep };
        let target = match keep {
            Saturation::Implied => {
                dropped.insert(pair.quantize);
                pair.source.clone()
            }
            Saturation::Tighten { node, range } => {
                let original = replace.get(&node).cloned().unwrap_or_else(|| graph.node[node].clone());
                let (clip, inits) =
                    clip_node(&original, &original.input[0], &original.output[0], range, opset, &mut fresh);
                new_initializers.extend(inits);
                replace.insert(node, clip);
                dropped.insert(pair.quantize);
                rewritten.clips_tightened += 1;
                pair.source.clone()
            }
            Saturation::Clip(range) => {
                let q = &graph.node[pair.quantize];
                let output = fresh(&format!("{}_saturated", pair.source));
                let (clip, inits) = clip_node(q, &pair.source, &output, range, opset, &mut fresh);
                new_initializers.extend(inits);
                replace.insert(pair.quantize, clip);
                rewritten.clips_inserted += 1;
                output
            }
            Saturation::FakeQuant { scale, params } => {
                let q = graph.node[pair.quantize].clone();
                let (nodes, inits, output) = fake_quant(&q, &pair.source, &scale, params, opset, &mut fresh);
                new_initializers.extend(inits);
                expand.insert(pair.quantize, nodes);
                rewritten.clips_inserted += 1;
                output
            }
        };
        for d in pair.dequantizes {
            dropped.insert(d);
            dequantizes_removed += 1;
            rename.insert(graph.node[d].output[0].clone(), target.clone());
        }
    }
    rewritten.pairs_removed = pairs_removed;
    if pairs_removed == 0 {
        return Applied { rewritten, pairs_removed, dequantizes_removed };
    }
    // A pair can feed another pair (Q -> DQ -> Q -> DQ): follow the chain.
    let resolve = |name: &String| {
        let mut current = name;
        for _ in 0..=rename.len() {
            match rename.get(current) {
                Some(next) => current = next,
                None => break,
            }
        }
        current.clone()
    };
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .flat_map(|(i, node)| match (replace.remove(&i), expand.remove(&i)) {
            (_, Some(many)) => many,
            (Some(new), None) => vec![new],
            (None, None) if dropped.contains(&i) => Vec::new(),
            (None, None) => vec![node],
        })
        .map(|mut node| {
            for input in &mut node.input {
                *input = resolve(input);
            }
            node
        })
        .collect();
    graph.initializer.extend(new_initializers);
    for output in &mut graph.output {
        output.name = resolve(&output.name);
    }
    Applied { rewritten, pairs_removed, dequantizes_removed }
}

/// The quantise/dequantise round trip of `like` (a QuantizeLinear) in float
/// ops: `Mul(Clip(Round(Div(input, scale)), qmin - zp, qmax - zp), scale)`,
/// which is what QuantizeLinear then DequantizeLinear compute (Round is
/// round-half-to-even in both). Returns the nodes, new initializers and the
/// output tensor.
fn fake_quant(
    like: &pb::NodeProto,
    input: &str,
    scale: &str,
    params: QuantParams,
    opset: i64,
    fresh: &mut impl FnMut(&str) -> String,
) -> (Vec<pb::NodeProto>, Vec<pb::TensorProto>, String) {
    let base = if like.name.is_empty() { input.to_string() } else { like.name.clone() };
    let node = |op: &str, name: String, inputs: Vec<String>, output: String| pb::NodeProto {
        op_type: op.into(),
        name,
        input: inputs,
        output: vec![output],
        ..Default::default()
    };
    let (scaled, rounded, output) =
        (fresh(&format!("{base}_scaled")), fresh(&format!("{base}_rounded")), fresh(&format!("{base}_requantized")));
    let clipped = fresh(&format!("{base}_clipped"));
    let div = node("Div", fresh(&format!("{base}_div")), vec![input.into(), scale.into()], scaled.clone());
    let round = node("Round", fresh(&format!("{base}_round")), vec![scaled], rounded.clone());
    let range = Range::new(params.qmin - params.zero_point, params.qmax - params.zero_point);
    let (clip, inits) = clip_node(like, &rounded, &clipped, range, opset, fresh);
    let mul = node("Mul", fresh(&format!("{base}_mul")), vec![clipped, scale.into()], output.clone());
    (vec![div, round, clip, mul], inits, output)
}

/// A Clip node named after `like`, from `input` to `output`, clamping to
/// `range` (inputs from opset 11, attributes before), and the float32
/// initializers its bounds need.
fn clip_node(
    like: &pb::NodeProto,
    input: &str,
    output: &str,
    range: Range,
    opset: i64,
    fresh: &mut impl FnMut(&str) -> String,
) -> (pb::NodeProto, Vec<pb::TensorProto>) {
    let name = fresh(&format!("{}_saturation", if like.name.is_empty() { output } else { like.name.as_str() }));
    // Infinite bounds stay infinite: Clip clamps to +-inf as a no-op.
    let (lo, hi) = (range.lo as f32, range.hi as f32);
    if opset < 11 {
        let attr = |n: &str, f: f32| pb::AttributeProto {
            name: n.into(),
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            f,
            ..Default::default()
        };
        let node = pb::NodeProto {
            op_type: "Clip".into(),
            name,
            input: vec![input.into()],
            output: vec![output.into()],
            attribute: vec![attr("min", lo), attr("max", hi)],
            ..Default::default()
        };
        return (node, Vec::new());
    }
    let scalar = |n: String, v: f32| pb::TensorProto {
        name: n,
        data_type: DataType::Float as i32,
        float_data: vec![v],
        ..Default::default()
    };
    let (lo_name, hi_name) = (fresh(&format!("{name}_min")), fresh(&format!("{name}_max")));
    let node = pb::NodeProto {
        op_type: "Clip".into(),
        name,
        input: vec![input.into(), lo_name.clone(), hi_name.clone()],
        output: vec![output.into()],
        ..Default::default()
    };
    (node, vec![scalar(lo_name, lo), scalar(hi_name, hi)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn scalar(name: &str, data_type: DataType, value: f32) -> pb::TensorProto {
        let mut t = pb::TensorProto { name: name.into(), data_type: data_type as i32, ..Default::default() };
        match data_type {
            DataType::Float => t.float_data = vec![value],
            _ => t.int32_data = vec![value as i32],
        }
        t
    }

    /// A model with uint8 activations (scale 0.1, zero point 0: saturation
    /// [0, 25.5]) and int8 weights (scale 0.01, zero point 0).
    fn model(nodes: Vec<pb::NodeProto>, output: &str) -> pb::ModelProto {
        pb::ModelProto {
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
            graph: Some(pb::GraphProto {
                node: nodes,
                output: vec![pb::ValueInfoProto { name: output.into(), ..Default::default() }],
                initializer: vec![
                    scalar("s", DataType::Float, 0.1),
                    scalar("z", DataType::Uint8, 0.0),
                    scalar("s8", DataType::Float, 0.1),
                    scalar("z8", DataType::Int8, 0.0),
                    scalar("six", DataType::Float, 6.0),
                    scalar("zero", DataType::Float, 0.0),
                    scalar("w_int8", DataType::Int8, 1.0),
                    scalar("ws", DataType::Float, 0.01),
                    scalar("wz", DataType::Int8, 0.0),
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn graph(m: &pb::ModelProto) -> &pb::GraphProto {
        m.graph.as_ref().unwrap()
    }

    fn names(m: &pb::ModelProto) -> Vec<&str> {
        graph(m).node.iter().map(|n| n.name.as_str()).collect()
    }

    fn clip_range(m: &pb::ModelProto, name: &str) -> (f32, f32) {
        let g = graph(m);
        let clip = g.node.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"));
        assert_eq!(clip.op_type, "Clip");
        let value = |i: usize| g.initializer.iter().find(|t| t.name == clip.input[i]).unwrap().float_data[0];
        (value(1), value(2))
    }

    #[test]
    fn the_qdq_pair_after_a_dequantized_softmax_becomes_the_same_round_trip_in_float_ops() {
        let mut m = model(
            vec![
                node("QuantizeLinear", "q0", &["scores", "s", "z"], &["scores_q"]),
                node("DequantizeLinear", "dq0", &["scores_q", "s", "z"], &["scores_dq"]),
                node("Softmax", "attn", &["scores_dq"], &["probs"]),
                node("QuantizeLinear", "q1", &["probs", "small", "z"], &["probs_q"]),
                node("DequantizeLinear", "dq1", &["probs_q", "small", "z"], &["probs_dq"]),
                node("MatMul", "mm", &["probs_dq", "v"], &["out"]),
            ],
            "out",
        );
        m.graph.as_mut().unwrap().initializer.push(scalar("small", DataType::Float, 0.002));
        let report = repair(&mut m, Options::default());
        assert_eq!(report, Repair { ops_kept_float: vec!["attn".into()], nodes_removed: 2, round_trips_kept: 1 });
        assert_eq!(names(&m), ["q0", "dq0", "attn", "q1_div", "q1_round", "q1_saturation", "q1_mul", "mm"]);
        let g = graph(&m);
        let ops: Vec<&str> = g.node[3..7].iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Div", "Round", "Clip", "Mul"]);
        assert_eq!(g.node[3].input, ["probs", "small"]);
        // uint8 with zero point 0: the rounded value is clamped to 0..255.
        assert_eq!(clip_range(&m, "q1_saturation"), (0.0, 255.0));
        assert_eq!(g.node[6].input[1], "small");
        assert_eq!(g.node[7].input, [g.node[6].output[0].as_str(), "v"]);
    }

    #[test]
    fn a_softmax_already_in_float_is_left_alone() {
        let mut m =
            model(vec![node("Softmax", "attn", &["x"], &["p"]), node("MatMul", "mm", &["p", "v"], &["out"])], "out");
        assert_eq!(repair(&mut m, Options::default()), Repair::default());
        assert_eq!(graph(&m).node.len(), 2);
    }

    #[test]
    fn a_quantized_softmax_output_also_used_in_float_is_not_touched() {
        let mut m = model(
            vec![
                node("DequantizeLinear", "dq0", &["xq", "s", "z"], &["x"]),
                node("Softmax", "attn", &["x"], &["p"]),
                node("QuantizeLinear", "q1", &["p", "s", "z"], &["pq"]),
                node("DequantizeLinear", "dq1", &["pq", "s", "z"], &["pdq"]),
                node("Relu", "relu", &["p"], &["r"]),
                node("Add", "add", &["pdq", "r"], &["out"]),
            ],
            "out",
        );
        assert!(repair(&mut m, Options::default()).ops_kept_float.is_empty());
        assert_eq!(graph(&m).node.len(), 6);
    }

    #[test]
    fn a_dequantize_feeding_the_graph_output_hands_the_output_the_float_tensor() {
        let mut m = model(
            vec![
                node("DequantizeLinear", "dq0", &["xq", "s", "z"], &["x"]),
                node("Softmax", "sm", &["x"], &["p"]),
                node("QuantizeLinear", "q1", &["p", "s", "z"], &["pq"]),
                node("DequantizeLinear", "dq1", &["pq", "s", "z"], &["probs"]),
            ],
            "probs",
        );
        assert_eq!(repair(&mut m, Options::default()).nodes_removed, 2);
        let g = graph(&m);
        assert_eq!(g.output[0].name, g.node.last().unwrap().output[0], "the output takes the round trip's result");
    }

    #[test]
    fn weights_only_removes_activation_pairs_and_keeps_weight_dequantization() {
        // A Relu before each pair: its output is never below 0, so the uint8
        // pair only clamps at the top, and the Relu is tightened to do that.
        let mut m = model(
            vec![
                node("Relu", "relu_in", &["x"], &["xr"]),
                node("QuantizeLinear", "qx", &["xr", "s", "z"], &["xq"]),
                node("DequantizeLinear", "dqx", &["xq", "s", "z"], &["xdq"]),
                node("DequantizeLinear", "dqw", &["w_int8", "ws", "wz"], &["w"]),
                node("Conv", "conv", &["xdq", "w"], &["y"]),
                node("QuantizeLinear", "qy", &["y", "s8", "z8"], &["yq"]),
                node("DequantizeLinear", "dqy", &["yq", "s8", "z8"], &["out"]),
            ],
            "out",
        );
        let report = strip_activation_qdq(&mut m, Options::default());
        assert_eq!((report.pairs_removed, report.clips_tightened, report.clips_inserted), (2, 1, 1));
        assert!(report.pairs_kept.is_empty(), "{:?}", report.pairs_kept);
        let g = graph(&m);
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Clip", "DequantizeLinear", "Conv", "Clip"]);
        assert_eq!(clip_range(&m, "relu_in_saturation"), (0.0, 25.5));
        assert_eq!(g.node[2].input, ["xr", "w"]);
        // The Conv output is int8: [-12.8, 12.7], and the graph output takes the Clip.
        assert_eq!(clip_range(&m, "qy_saturation"), (-12.8, 12.7));
        assert_eq!(g.output[0].name, g.node[3].output[0]);
    }

    #[test]
    fn a_relu6_folded_into_a_uint8_pair_becomes_a_clip_to_its_range() {
        // ONNX Runtime's default: Conv -> Q(uint8, zp 0) -> DQ, the Clip(0, 6) deleted.
        let mut m = model(
            vec![
                node("Conv", "conv", &["x", "w"], &["y"]),
                node("QuantizeLinear", "qy", &["y", "s", "z"], &["yq"]),
                node("DequantizeLinear", "dqy", &["yq", "s", "z"], &["ydq"]),
                node("Conv", "conv2", &["ydq", "w"], &["out"]),
            ],
            "out",
        );
        let report = strip_activation_qdq(&mut m, Options::default());
        assert_eq!((report.pairs_removed, report.clips_inserted), (1, 1));
        assert_eq!(clip_range(&m, "qy_saturation"), (0.0, 25.5));
        let g = graph(&m);
        assert_eq!(g.node[2].input[0], g.node[1].output[0], "the second Conv reads the clamped tensor");
    }

    #[test]
    fn the_old_rewrite_without_saturation_is_what_drop_saturation_reproduces() {
        let mut m = model(
            vec![
                node("Conv", "conv", &["x", "w"], &["y"]),
                node("QuantizeLinear", "qy", &["y", "s", "z"], &["yq"]),
                node("DequantizeLinear", "dqy", &["yq", "s", "z"], &["ydq"]),
                node("Conv", "conv2", &["ydq", "w"], &["out"]),
            ],
            "out",
        );
        let report = strip_activation_qdq(&mut m, Options { drop_saturation: true, ..Options::default() });
        assert_eq!((report.pairs_removed, report.clips_inserted), (1, 0));
        assert_eq!(names(&m), ["conv", "conv2"]);
        assert_eq!(graph(&m).node[1].input[0], "y");
    }

    #[test]
    fn a_clip_inside_the_saturation_range_needs_nothing_more() {
        let mut m = model(
            vec![
                node("Conv", "conv", &["x", "w"], &["y"]),
                node("Clip", "relu6", &["y", "zero", "six"], &["r"]),
                node("QuantizeLinear", "q", &["r", "s", "z"], &["rq"]),
                node("DequantizeLinear", "dq", &["rq", "s", "z"], &["rdq"]),
                node("Conv", "conv2", &["rdq", "w"], &["out"]),
            ],
            "out",
        );
        let report = strip_activation_qdq(&mut m, Options::default());
        assert_eq!((report.pairs_removed, report.clips_inserted, report.clips_tightened), (1, 0, 0));
        assert_eq!(names(&m), ["conv", "relu6", "conv2"]);
    }

    #[test]
    fn a_range_is_followed_through_pooling_and_reshapes() {
        let mut m = model(
            vec![
                node("Relu", "relu", &["x"], &["r"]),
                node("QuantizeLinear", "q1", &["r", "s", "z"], &["rq"]),
                node("DequantizeLinear", "dq1", &["rq", "s", "z"], &["rdq"]),
                node("MaxPool", "pool", &["rdq"], &["p"]),
                node("Flatten", "flat", &["p"], &["f"]),
                node("QuantizeLinear", "q2", &["f", "s", "z"], &["fq"]),
                node("DequantizeLinear", "dq2", &["fq", "s", "z"], &["out"]),
            ],
            "out",
        );
        let report = strip_activation_qdq(&mut m, Options::default());
        assert_eq!((report.pairs_removed, report.clips_tightened, report.clips_inserted), (2, 1, 0));
        assert_eq!(names(&m), ["relu_saturation", "pool", "flat"]);
        assert_eq!(graph(&m).output[0].name, "f");
    }

    #[test]
    fn a_pair_with_a_per_channel_activation_scale_is_kept_with_the_reason() {
        let mut m = model(
            vec![
                node("Conv", "conv", &["x", "w"], &["y"]),
                node("QuantizeLinear", "qy", &["y", "pc", "z"], &["yq"]),
                node("DequantizeLinear", "dqy", &["yq", "pc", "z"], &["out"]),
            ],
            "out",
        );
        let per_channel = pb::TensorProto {
            name: "pc".into(),
            data_type: DataType::Float as i32,
            dims: vec![2],
            float_data: vec![0.1, 0.2],
            ..Default::default()
        };
        m.graph.as_mut().unwrap().initializer.push(per_channel);
        let report = strip_activation_qdq(&mut m, Options::default());
        assert_eq!(report.pairs_removed, 0);
        assert!(report.pairs_kept[0].contains("varies along an axis"), "{:?}", report.pairs_kept);
        assert_eq!(graph(&m).node.len(), 3);
    }

    #[test]
    fn weights_only_leaves_a_quantized_tensor_that_something_else_reads() {
        let mut m = model(
            vec![
                node("QuantizeLinear", "qx", &["x", "s", "z"], &["xq"]),
                node("DequantizeLinear", "dqx", &["xq", "s", "z"], &["xdq"]),
                node("Cast", "cast", &["xq"], &["xc"]),
                node("Add", "add", &["xdq", "xc"], &["out"]),
            ],
            "out",
        );
        assert_eq!(strip_activation_qdq(&mut m, Options::default()).pairs_removed, 0);
        assert_eq!(graph(&m).node.len(), 4);
    }

    #[test]
    fn before_opset_eleven_the_clip_takes_attributes() {
        let mut m = model(
            vec![
                node("Conv", "conv", &["x", "w"], &["y"]),
                node("QuantizeLinear", "qy", &["y", "s", "z"], &["yq"]),
                node("DequantizeLinear", "dqy", &["yq", "s", "z"], &["out"]),
            ],
            "out",
        );
        m.opset_import[0].version = 10;
        strip_activation_qdq(&mut m, Options::default());
        let clip = &graph(&m).node[1];
        assert_eq!(clip.input.len(), 1);
        let attr = |n: &str| clip.attribute.iter().find(|a| a.name == n).unwrap().f;
        assert_eq!((attr("min"), attr("max")), (0.0, 25.5));
    }
}
