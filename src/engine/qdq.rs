//! Makes QDQ INT8 graphs safe for tract before it sees them.
//!
//! tract fuses `DequantizeLinear -> op -> QuantizeLinear` into a 256-entry
//! lookup table when `op` looks element-wise. For Softmax that is wrong (each
//! output depends on the whole row), and the model then runs with silently
//! wrong scores: an ONNX Runtime default QDQ export of ML-Decoder was off by
//! about 0.5. This pass finds every such op whose output is quantised again
//! and removes the QuantizeLinear/DequantizeLinear pair after it, so the op
//! and its consumers see its float output. The input side stays quantised,
//! which is harmless: it is the fusion that breaks, and it needs the Q after.
//!
//! The cost is a few tensors in float instead of int8; the scores agree with
//! ONNX Runtime again.

use std::collections::HashMap;

use tract_onnx::pb;

/// Ops that tract would wrongly fuse into a lookup table when wrapped in Q/DQ.
const ROW_WISE_OPS: &[&str] = &["Softmax", "LogSoftmax", "Hardmax"];

/// What [`repair`] changed, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Repair {
    /// Names of the ops whose output now stays in float.
    pub ops_kept_float: Vec<String>,
    /// Q/DQ nodes removed.
    pub nodes_removed: usize,
}

/// Removes the Q/DQ pairs after row-wise ops in the main graph.
pub fn repair(model: &mut pb::ModelProto) -> Repair {
    let mut report = Repair::default();
    let Some(graph) = model.graph.as_mut() else { return report };

    let producer: HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        for input in &node.input {
            consumers.entry(input.clone()).or_default().push(i);
        }
    }
    let graph_outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();

    // (tensor to replace, tensor to use instead) and nodes to drop.
    let mut renames: Vec<(String, String)> = Vec::new();
    let mut dropped = vec![false; graph.node.len()];
    for (index, node) in graph.node.iter().enumerate() {
        if !ROW_WISE_OPS.contains(&node.op_type.as_str()) || node.output.is_empty() {
            continue;
        }
        let takes_dequantized = node
            .input
            .first()
            .and_then(|input| producer.get(input))
            .is_some_and(|&p| graph.node[p].op_type == "DequantizeLinear");
        let out = &node.output[0];
        let users = consumers.get(out).map(Vec::as_slice).unwrap_or(&[]);
        // Only when every user is a QuantizeLinear whose every user is a
        // DequantizeLinear can the pair go without changing anything else.
        let pairs: Option<Vec<(usize, Vec<usize>)>> = users
            .iter()
            .map(|&q| {
                let qn = &graph.node[q];
                if qn.op_type != "QuantizeLinear" || graph_outputs.contains(&qn.output[0]) {
                    return None;
                }
                let dqs = consumers.get(&qn.output[0])?.clone();
                dqs.iter().all(|&d| graph.node[d].op_type == "DequantizeLinear").then_some((q, dqs))
            })
            .collect();
        let Some(pairs) = pairs.filter(|p| !p.is_empty()) else { continue };
        if !takes_dequantized {
            continue;
        }
        for (q, dqs) in pairs {
            dropped[q] = true;
            for d in dqs {
                dropped[d] = true;
                renames.push((graph.node[d].output[0].clone(), out.clone()));
            }
        }
        let name = if node.name.is_empty() { format!("{}#{index}", node.op_type) } else { node.name.clone() };
        report.ops_kept_float.push(name);
    }
    if renames.is_empty() {
        return report;
    }

    let rename: HashMap<String, String> = renames.into_iter().collect();
    let mut kept = Vec::with_capacity(graph.node.len());
    for (index, mut node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        if dropped[index] {
            report.nodes_removed += 1;
            continue;
        }
        for input in &mut node.input {
            if let Some(new) = rename.get(input) {
                *input = new.clone();
            }
        }
        kept.push(node);
    }
    graph.node = kept;
    // A DequantizeLinear that fed a graph output: the output now takes the float tensor directly.
    for output in &mut graph.output {
        if let Some(new) = rename.get(&output.name) {
            output.name = new.clone();
        }
    }
    report
}

/// Weights-only INT8: removes every QuantizeLinear -> DequantizeLinear pair
/// on an activation (a tensor computed at run time), so the graph computes
/// in float from dequantised INT8 weights. Weight pairs (on initializers or
/// constants) stay: the file keeps its INT8 weights and the engine
/// dequantises them once at load. Returns the number of pairs removed.
pub fn strip_activation_qdq(model: &mut pb::ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let constants: std::collections::HashSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .chain(graph.node.iter().filter(|n| n.op_type == "Constant").flat_map(|n| n.output.clone()))
        .collect();
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        for input in &node.input {
            consumers.entry(input.clone()).or_default().push(i);
        }
    }
    let graph_outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();

    let mut rename: HashMap<String, String> = HashMap::new();
    let mut dropped = vec![false; graph.node.len()];
    let mut pairs = 0;
    for (index, node) in graph.node.iter().enumerate() {
        if node.op_type != "QuantizeLinear" || node.input.is_empty() || node.output.is_empty() {
            continue;
        }
        let source = &node.input[0];
        let quantized = &node.output[0];
        if constants.contains(source) || graph_outputs.contains(quantized) {
            continue;
        }
        let Some(dqs) = consumers.get(quantized) else { continue };
        if !dqs.iter().all(|&d| graph.node[d].op_type == "DequantizeLinear" && !graph.node[d].output.is_empty()) {
            continue;
        }
        dropped[index] = true;
        for &d in dqs {
            dropped[d] = true;
            rename.insert(graph.node[d].output[0].clone(), source.clone());
        }
        pairs += 1;
    }
    if pairs == 0 {
        return 0;
    }
    // A pair can feed another pair (Q -> DQ -> Q -> DQ): follow the chain.
    let resolve = |name: &String| {
        let mut current = name;
        for _ in 0..rename.len() {
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
        .filter(|(i, _)| !dropped[*i])
        .map(|(_, mut node)| {
            for input in &mut node.input {
                *input = resolve(input);
            }
            node
        })
        .collect();
    for output in &mut graph.output {
        output.name = resolve(&output.name);
    }
    pairs
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

    fn model(nodes: Vec<pb::NodeProto>, output: &str) -> pb::ModelProto {
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: nodes,
                output: vec![pb::ValueInfoProto { name: output.into(), ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_qdq_pair_after_a_dequantized_softmax_is_removed_and_its_users_rewired() {
        let mut m = model(
            vec![
                node("QuantizeLinear", "q0", &["scores", "s", "z"], &["scores_q"]),
                node("DequantizeLinear", "dq0", &["scores_q", "s", "z"], &["scores_dq"]),
                node("Softmax", "attn", &["scores_dq"], &["probs"]),
                node("QuantizeLinear", "q1", &["probs", "s", "z"], &["probs_q"]),
                node("DequantizeLinear", "dq1", &["probs_q", "s", "z"], &["probs_dq"]),
                node("MatMul", "mm", &["probs_dq", "v"], &["out"]),
            ],
            "out",
        );
        let report = repair(&mut m);
        assert_eq!(report, Repair { ops_kept_float: vec!["attn".into()], nodes_removed: 2 });
        let g = m.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(ops, ["q0", "dq0", "attn", "mm"]);
        assert_eq!(g.node[3].input, ["probs", "v"]);
    }

    #[test]
    fn a_softmax_already_in_float_is_left_alone() {
        let mut m =
            model(vec![node("Softmax", "attn", &["x"], &["p"]), node("MatMul", "mm", &["p", "v"], &["out"])], "out");
        assert_eq!(repair(&mut m), Repair::default());
        assert_eq!(m.graph.unwrap().node.len(), 2);
    }

    #[test]
    fn a_quantized_softmax_output_also_used_in_float_is_not_touched() {
        // One user is not a QuantizeLinear: removing the pair is not needed for
        // it and would not be the whole story, so the pass leaves the graph as is.
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
        assert!(repair(&mut m).ops_kept_float.is_empty());
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
        assert_eq!(repair(&mut m).nodes_removed, 2);
        assert_eq!(m.graph.unwrap().output[0].name, "p");
    }

    fn initializer(name: &str) -> pb::TensorProto {
        pb::TensorProto { name: name.into(), ..Default::default() }
    }

    #[test]
    fn weights_only_removes_activation_pairs_and_keeps_weight_dequantization() {
        let mut m = model(
            vec![
                node("QuantizeLinear", "qx", &["x", "s", "z"], &["xq"]),
                node("DequantizeLinear", "dqx", &["xq", "s", "z"], &["xdq"]),
                node("DequantizeLinear", "dqw", &["w_int8", "ws", "wz"], &["w"]),
                node("Conv", "conv", &["xdq", "w"], &["y"]),
                node("QuantizeLinear", "qy", &["y", "s", "z"], &["yq"]),
                node("DequantizeLinear", "dqy", &["yq", "s", "z"], &["out"]),
            ],
            "out",
        );
        m.graph.as_mut().unwrap().initializer = vec![initializer("w_int8"), initializer("ws"), initializer("wz")];
        assert_eq!(strip_activation_qdq(&mut m), 2);
        let g = m.graph.unwrap();
        let names: Vec<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["dqw", "conv"]);
        assert_eq!(g.node[1].input, ["x", "w"]);
        assert_eq!(g.output[0].name, "y");
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
        assert_eq!(strip_activation_qdq(&mut m), 0);
        assert_eq!(m.graph.unwrap().node.len(), 4);
    }
}
