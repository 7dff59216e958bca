//! The tract engine: pure Rust, always built, runs FP32 and INT8 ONNX (QDQ,
//! and QOperator/dynamic where tract has the operators).
//!
//! Loading fixes the input to the model's declared shape (batch 1), optimises
//! once and keeps one run state, so a frame costs one inference and no
//! model rebuild. Loading runs under `catch_unwind`: a malformed file must
//! give an error naming it, never take the daemon down.
//!
//! A rewritten INT8 graph (weights-only) is checked against the graph as
//! quantised at load ([`super::selfcheck`]): both are built, one after the
//! other, compared on a probe picture, and again on the first real frame before
//! its scores are returned; on disagreement the engine runs the graph as
//! quantised.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
#[cfg(feature = "tract-threads")]
use tract_linalg::multithread::Executor;
use tract_onnx::pb;
#[cfg(not(feature = "tract-threads"))]
use tract_onnx::prelude::tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

use super::prepare::{self, EngineFacts, Rewrite};
use super::selfcheck::{self, SelfCheck, VerdictCache};
use super::{Engine, InputElement, InputSpec, ModelInfo, Tensor};
use crate::config::{ConfigError, Int8Check, Int8Mode, ModelConfig, OutputKind};

pub struct TractEngine {
    info: ModelInfo,
    plan: Plan,
    /// The graph as quantised, kept for the first real frame:
    /// [`Engine::infer`] runs it after the configured graph and compares
    /// before returning.
    frame_check: Option<FrameCheck>,
}

/// A built, optimised model and its run state.
struct Plan {
    state: TypedSimpleState,
    input: InputSpec,
    /// Reused buffers for inputs that are not NCHW float.
    scratch: Vec<f32>,
    bytes: Vec<u8>,
    /// tract's thread pool when the plan runs on more than one thread.
    executor: Option<Executor>,
}

/// What [`build`] reports besides the plan.
struct Built {
    plan: Plan,
    /// labelcast's pointwise kernel and what it replaced, where it ran.
    pointwise: Option<(super::pointwise::Isa, super::pointwise::Rewritten)>,
    /// How many convolutions became labelcast's stem op.
    stems: usize,
    /// How many depthwise convolutions became labelcast's op, and how many
    /// Max/Min they took in.
    depthwise: (usize, usize),
    output_shape: Vec<usize>,
    graph_time: Duration,
    optimize_time: Duration,
}

impl Plan {
    /// Runs `input` `runs` times timing every node, and sums the times by
    /// [`super::op_kind`]: milliseconds per inference, most first.
    fn profile(&mut self, input: &Tensor, runs: usize) -> anyhow::Result<super::Profile> {
        use std::collections::HashMap;
        let mut by_node: HashMap<usize, (String, String, Duration)> = HashMap::new();
        for _ in 0..runs {
            let tensor = self.model_input(input)?;
            let state = &mut self.state;
            let by_node = &mut by_node;
            on_pool_thread(self.executor.as_ref(), || {
                state.run_plan_with_eval(tvec!(tensor.into_tvalue()), |ctx, op_state, node, inputs| {
                    let began = Instant::now();
                    let outputs = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    let entry = by_node.entry(node.id).or_insert_with(|| {
                        let info = node.op.info().unwrap_or_default().join("; ");
                        (node.op.name().to_string(), format!("{} #{}: {info}", node.op.name(), node.id), Duration::ZERO)
                    });
                    entry.2 += began.elapsed();
                    outputs
                })
            })
            .context("tract could not run the model")?;
        }
        let mut by_kind: HashMap<&'static str, (usize, Duration)> = HashMap::new();
        for (name, _, took) in by_node.values() {
            let entry = by_kind.entry(super::op_kind(name)).or_default();
            entry.0 += 1;
            entry.1 += *took;
        }
        let mut times: Vec<super::OpTime> = by_kind
            .into_iter()
            .map(|(kind, (nodes, took))| super::OpTime {
                kind: kind.to_string(),
                nodes,
                ms: took.as_secs_f64() * 1e3 / runs as f64,
            })
            .collect();
        times.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        let mut slowest: Vec<super::OpTime> = by_node
            .into_values()
            .map(|(_, described, took)| super::OpTime {
                kind: described,
                nodes: 1,
                ms: took.as_secs_f64() * 1e3 / runs as f64,
            })
            .collect();
        slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        slowest.truncate(12);
        Ok(super::Profile { kinds: times, slowest })
    }

    /// `input` as the tensor the model takes (layout and element type).
    fn model_input(&mut self, input: &Tensor) -> anyhow::Result<tract_onnx::prelude::Tensor> {
        let shape = self.input.model_shape();
        Ok(match self.input.element {
            InputElement::F32 => {
                let values = self.input.layout_f32(input, &mut self.scratch);
                tract_onnx::prelude::Tensor::from_shape(&shape, values)?
            }
            InputElement::U8 => {
                self.input.layout_u8(input, &mut self.scratch, &mut self.bytes);
                tract_onnx::prelude::Tensor::from_shape(&shape, &self.bytes)?
            }
        })
    }

    fn run(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>> {
        let tensor = self.model_input(input)?;
        // A panic inside tract (or one of labelcast's ops) is this frame's
        // error, not the end of the inference thread: nothing above the
        // engine catches one, and the INT8 check's graph as quantised runs
        // here too.
        let state = &mut self.state;
        let executor = self.executor.as_ref();
        let outputs = std::panic::catch_unwind(AssertUnwindSafe(|| {
            on_pool_thread(executor, || state.run(tvec!(tensor.into_tvalue())))
        }))
        .map_err(|panic| anyhow::anyhow!("tract panicked running the model: {}", panic_message(&panic)))?
        .context("tract could not run the model")?;
        let scores = outputs[0].to_plain_array_view::<f32>().context("the model's output is not float")?;
        Ok(scores.iter().copied().collect())
    }
}

/// The INT8 check's comparison on the first real frame, still to run.
struct FrameCheck {
    check: Arc<SelfCheck>,
    output: OutputKind,
    /// The graph as quantised, kept for the first real frame.
    reference: Plan,
    cache: Option<VerdictCache>,
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

    /// [`TractEngine::inspect`] with the config's engine settings.
    pub fn inspect_with(config: &ModelConfig) -> anyhow::Result<TractEngine> {
        Self::load_checked(config, false)
    }

    fn load_checked(config: &ModelConfig, require_labels: bool) -> anyhow::Result<TractEngine> {
        let path = config.path.as_path();
        let mut prepared = prepare::prepare(config, require_labels, Rewrite::ForTract)?;
        let threads = tract_threads(config.threads);
        let reference = prepared.reference.take();
        let output_kind = prepared.metadata.output;
        let (mean, std) = (prepared.metadata.mean, prepared.metadata.std);
        let (input, output_name, dir) =
            (prepared.input, prepared.output_name.clone(), prepared.model_dir_str().map(str::to_string));
        // An earlier start's verdict for this very model and rewrite saves
        // building the graph twice.
        let cache = match (&reference, &config.check_cache) {
            (Some(_), Some(dir)) => std::fs::read(path).ok().map(|bytes| {
                let fault = std::env::var(prepare::FAULT_DROP_SATURATION).is_ok_and(|v| v == "1");
                // The kernels run the rewritten graph: another choice checks again.
                let kernels = format!(
                    "{}/{:?}/{:?}/vnni={}/stem={:?}/depthwise-op={:?}",
                    super::depthwise::selected().unwrap_or("tract"),
                    super::pointwise::choice(threads),
                    super::pointwise::precision_by_env(),
                    super::pointwise::dot_products_here(),
                    super::stem::choice().map(super::pointwise::Isa::features),
                    super::depthwise_op::choice().map(super::pointwise::Isa::features)
                );
                VerdictCache::new(dir, &bytes, Int8Mode::WeightsOnly, config.repair_qdq, fault, &kernels)
            }),
            _ => None,
        };
        // Only a verdict that saw a real frame (or found a disagreement) is
        // trusted: a probe picture alone can miss a broken rewrite (on the
        // demo model an ONNX Runtime default file broken on purpose is 0.11
        // off on the probe and 0.45 on the cat photo).
        let cached = cache.as_ref().and_then(VerdictCache::load).filter(|v| !v.agrees || v.frame_difference.is_some());
        let mut check = None;
        let mut frame_check = None;
        let mut mode = prepared.int8_mode;
        let mut reference = reference;
        if let Some(verdict) = &cached
            && let Some(reference_proto) = reference.take()
        {
            let selfcheck = Arc::new(SelfCheck::from_cache(Int8Mode::WeightsOnly, config.int8_check, verdict));
            if !verdict.agrees {
                disagree(
                    path,
                    config.int8_check,
                    &selfcheck,
                    verdict.probe_difference.max(verdict.frame_difference.unwrap_or(0.0)),
                    "an earlier start",
                )?;
                // Run the graph as quantised, as the earlier start ended up doing.
                prepared.proto = reference_proto;
                mode = Some(Int8Mode::Native);
            }
            check = Some(selfcheck);
        }
        let started = Instant::now();
        // The configured graph, then the graph as quantised, one after the
        // other, with what each stage frees purged before the next (in
        // `build` and around the probe): built side by side on two threads,
        // a start without a cached verdict peaked at 100.5 MB on the demo
        // model (jemalloc then kept freed pages ten seconds) against 74.9-75.0 MB
        // built in turn, for about 0.2 s more before the first label
        // (0.75-0.78 against 0.96-1.02 s), once per model; with the first
        // frame's check in turn too (see `infer`), 65.6-67.4 MB, its peak
        // the graph as quantised's declutter with the configured graph
        // built. Built in the other order: 70.1-70.2 MB (quiet machine).
        // Each build takes its proto and drops it once tract has parsed it,
        // so the file's tensors are not held beside tract's own while it
        // optimises (the graph as quantised's proto waits for its build).
        let proto = std::mem::take(&mut prepared.proto);
        let precision = super::pointwise::precision_for(mode == Some(Int8Mode::WeightsOnly));
        let built = build(proto, dir.as_deref(), input, &output_name, threads, precision, true);
        let reference_built = reference.take().filter(|_| built.is_ok()).map(|proto| {
            // What the first build freed goes back before the second.
            crate::allocator::release_freed_memory();
            // The graph as quantised: float activations in the 1x1
            // kernel, tract's own stem and depthwise op, so that the
            // check compares labelcast's kernels with something else.
            let precision = super::pointwise::precision_for(false);
            build(proto, dir.as_deref(), input, &output_name, threads, precision, false)
        });
        let mut built = built.map_err(|err| prepare::model_error(path, err))?;
        if let Some(reference_built) = reference_built {
            let mut reference = reference_built.map_err(|err| prepare::model_error(path, err))?.plan;
            let selfcheck = Arc::new(SelfCheck::new(Int8Mode::WeightsOnly, config.int8_check));
            let probe = selfcheck::probe(input.shape, mean, std);
            // Each graph's first run allocates its activations; what one
            // freed goes back before the other runs.
            let ours = selfcheck::as_scores(built.plan.run(&probe)?, output_kind);
            crate::allocator::release_freed_memory();
            let theirs = selfcheck::as_scores(reference.run(&probe)?, output_kind);
            crate::allocator::release_freed_memory();
            let difference = selfcheck::difference(&ours, &theirs);
            selfcheck
                .record_probe(difference, started.elapsed().saturating_sub(built.graph_time + built.optimize_time));
            if difference > selfcheck.tolerance {
                disagree(path, config.int8_check, &selfcheck, difference, "a probe picture")?;
                built.plan = reference;
                mode = Some(Int8Mode::Native);
                selfcheck.save(cache.as_ref());
            } else {
                tracing::info!(model = %path.display(), difference, tolerance = selfcheck.tolerance, "weights-only INT8 agrees with the graph as quantised on the probe; checking the first frame too");
                selfcheck.save(cache.as_ref());
                frame_check = Some(FrameCheck { check: selfcheck.clone(), output: output_kind, reference, cache });
            }
            check = Some(selfcheck);
        } else if let Some(check) = &check {
            tracing::info!(model = %path.display(), "{}", check.summary());
        }
        let facts = EngineFacts {
            engine: "tract",
            engine_version: format!(
                "tract {} (depthwise: {}; 1x1 convs: {}; stem: {})",
                env!("LABELCAST_TRACT_VERSION"),
                match (super::depthwise_op::choice(), built.depthwise) {
                    (Some(simd), (convs, clamps)) if convs > 0 => format!(
                        "labelcast's {} op on {convs} with {clamps} Max/Min fused, any other on {}",
                        simd.features(),
                        super::depthwise::selected().unwrap_or("tract's width-inner")
                    ),
                    _ => super::depthwise::selected().unwrap_or("tract's width-inner").to_string(),
                },
                match built.pointwise {
                    Some((isa, done)) if done.convs > 0 => format!(
                        "labelcast {} on {}, int8 weights on {}, 8-bit activations (VNNI) on {}",
                        isa.name(),
                        done.convs,
                        done.int8_weights,
                        done.int8_activations
                    ),
                    _ => "tract's matrix product".to_string(),
                },
                match super::stem::choice() {
                    Some(simd) if built.stems > 0 => format!("labelcast's {}", simd.features()),
                    _ => "tract's".to_string(),
                }
            ),
            threads,
            output_shape: built.output_shape,
            graph_time: built.graph_time,
            optimize_time: built.optimize_time,
        };
        prepared.int8_mode = mode;
        let mut info = prepared.into_info(path, facts, require_labels)?;
        info.selfcheck = check;
        info.log_loaded();
        Ok(TractEngine { info, plan: built.plan, frame_check })
    }

    /// Runs the graph as quantised on the first frame and compares it with
    /// `ours`, the rewritten graph's scores (`None` when it failed): on
    /// disagreement the graph as quantised takes over and its scores for
    /// that frame are returned (to be used instead of the rewritten graph's).
    fn finish_frame_check(&mut self, pending: FrameCheck, input: &Tensor, ours: Option<&[f32]>) -> Option<Vec<f32>> {
        let FrameCheck { check, output, mut reference, cache } = pending;
        match reference.run(input) {
            Ok(theirs) => {
                let ours = ours.map(|scores| selfcheck::as_scores(scores.to_vec(), output)).unwrap_or_default();
                let difference = selfcheck::difference(&ours, &selfcheck::as_scores(theirs.clone(), output));
                check.record_frame(difference);
                let mut replacement = None;
                if difference > check.tolerance {
                    // An error is not possible here (the daemon runs): fall back either way.
                    let _ = disagree(&self.info.path, Int8Check::Fallback, &check, difference, "the first frame");
                    self.plan = reference;
                    self.info.int8_mode = Some(Int8Mode::Native);
                    replacement = Some(theirs);
                } else {
                    tracing::info!(model = %self.info.path.display(), difference, "weights-only INT8 agrees with the graph as quantised on the first frame");
                    drop(reference);
                }
                check.save(cache.as_ref());
                // The graph as quantised is gone (unless it took over): give its memory back.
                crate::allocator::release_freed_memory();
                replacement
            }
            Err(err) => {
                tracing::warn!(model = %self.info.path.display(), error = %format!("{err:#}"), "the first-frame INT8 check could not run");
                None
            }
        }
    }
}

/// Logs (or refuses, with `model.int8_check = "error"`) a disagreement.
fn disagree(path: &Path, policy: Int8Check, check: &SelfCheck, difference: f32, on: &str) -> anyhow::Result<()> {
    if policy == Int8Check::Error {
        return Err(ConfigError::new(
            "model.int8_check",
            format!(
                "{}: weights-only INT8 scores differ from the graph as quantised by {difference:.3} on {on} (tolerance {}); \
                 run it with model.int8 = \"native\" or model.engine = \"onnxruntime\"",
                path.display(),
                check.tolerance
            ),
        )
        .into());
    }
    check.record_fallback();
    tracing::warn!(
        model = %path.display(),
        mode = check.mode.as_str(),
        difference,
        tolerance = check.tolerance,
        on,
        "INT8 self-check: the rewritten graph disagrees with the graph as quantised; running native instead (slower, right)"
    );
    Ok(())
}

/// Parses, optimises and plans one graph for a fixed input; `precision` is
/// what labelcast's 1x1 kernel computes in (see
/// [`super::pointwise::precision_for`]), `own_convs` whether labelcast's
/// stem kernel and depthwise op may take those convolutions (the INT8
/// check's reference graph keeps tract's, so that the check compares them
/// with something else).
fn build(
    proto: pb::ModelProto,
    model_dir: Option<&str>,
    input: InputSpec,
    output_name: &str,
    threads: usize,
    precision: super::pointwise::Precision,
    own_convs: bool,
) -> anyhow::Result<Built> {
    let built = std::panic::catch_unwind(AssertUnwindSafe(move || -> anyhow::Result<Built> {
        let started = Instant::now();
        let parsed = tract_onnx::onnx().parse(&proto, model_dir).context("tract could not read the graph")?;
        drop(proto);
        // Loading builds and drops whole graphs: what each stage freed goes
        // back before the next allocates (jemalloc keeps it until released).
        crate::allocator::release_freed_memory();
        if !parsed.unresolved_inputs.is_empty() {
            anyhow::bail!("the graph reads tensors nothing produces: {}", parsed.unresolved_inputs.join(", "));
        }
        let mut model = parsed.model;
        let missing = unimplemented_ops(&model);
        if !missing.is_empty() {
            // ONNX Runtime's QOperator format writes its own contrib ops
            // (QGemm, QLinearAdd...): say so, the fix is the format.
            let qoperator = missing.iter().any(|op| super::onnx_graph::is_qoperator(op));
            let how = if qoperator {
                "this is a QOperator-format INT8 model with ONNX Runtime's contrib ops: run it with model.engine = \"onnxruntime\", \
                 or quantise it as QDQ (quant_format=QuantFormat.QDQ, ONNX Runtime's default), which tract runs"
            } else {
                "run this model with model.engine = \"onnxruntime\", or export it with standard ONNX operators"
            };
            anyhow::bail!("tract has no implementation of {}: {how}", missing.join(", "));
        }
        if model.outputs.len() > 1 {
            model.select_outputs_by_name([output_name]).with_context(|| format!("selecting output {output_name:?}"))?;
        }
        let loaded = Instant::now();
        let fact: InferenceFact = match input.element {
            InputElement::F32 => f32::fact(input.model_shape()).into(),
            InputElement::U8 => u8::fact(input.model_shape()).into(),
        };
        let mut model = model
            .with_input_fact(0, fact)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .context("tract could not analyse and optimise the graph")?;
        crate::allocator::release_freed_memory();
        // Between declutter (which settles the layout) and codegen: 1x1
        // convolutions on channels-last activations as labelcast's own op.
        let pointwise = match super::pointwise::choice(threads) {
            Some(isa) => Some((
                isa,
                super::pointwise::rewrite(&mut model, isa, precision).context("rewriting tract's 1x1 convolutions")?,
            )),
            None => None,
        };
        // The stem (the first convolution, on the image) likewise, and the
        // depthwise convolutions with the clamps after them.
        let stems = if own_convs && super::stem::choice().is_some() {
            super::stem::rewrite(&mut model).context("rewriting tract's stem convolution")?
        } else {
            0
        };
        let depthwise = if own_convs && super::depthwise_op::choice().is_some() {
            super::depthwise_op::rewrite(&mut model).context("rewriting tract's depthwise convolutions")?
        } else {
            (0, 0)
        };
        model.optimize().context("tract could not analyse and optimise the graph")?;
        crate::allocator::release_freed_memory();
        let options = RunOptions { executor: executor(threads), ..Default::default() };
        let output_shape: Vec<usize> = model
            .output_fact(0)?
            .shape
            .as_concrete()
            .map(|s| s.to_vec())
            .context("the output shape is not fixed once the input is")?;
        let plan = model.into_runnable_with_options(&options).context("tract could not plan the graph")?;
        let state = plan.spawn()?;
        Ok(Built {
            plan: Plan { state, input, scratch: Vec::new(), bytes: Vec::new(), executor: options.executor.clone() },
            pointwise,
            stems,
            depthwise,
            output_shape,
            graph_time: loaded - started,
            optimize_time: loaded.elapsed(),
        })
    }));
    built.unwrap_or_else(|panic| Err(anyhow::anyhow!("tract panicked while loading it: {}", panic_message(&panic))))
}

/// The text a panic carried (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

impl Engine for TractEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn profile(&mut self, input: &Tensor, runs: usize) -> Option<anyhow::Result<super::Profile>> {
        Some(self.plan.profile(input, runs.max(1)))
    }

    fn infer(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>> {
        self.info.check_input(input)?;
        let Some(pending) = self.frame_check.take() else {
            return self.plan.run(input);
        };
        // The first real frame: the graph as quantised runs it too, and the
        // scores go out only once the two were compared, so no result from
        // a graph that turns out to be wrong is ever published (the probe
        // picture alone can miss one). One after the other (each on its
        // pool's first thread where it has one, else on this thread), with
        // what the first freed purged before the second: run side by
        // side on two threads, the two graphs' first runs took a first
        // start's peak to 72.6-73.2 MB on the demo model against 66.8-67.4
        // MB in turn (VmHWM, four alternated starts each, quiet machine;
        // 77.1-77.6 against 70.5-71.9 while other jobs ran),
        // with no difference in the time to the first label beyond the
        // spread (1.04-1.19 s against 1.07-1.12 s).
        let scores = self.plan.run(input);
        crate::allocator::release_freed_memory();
        match scores {
            Ok(scores) => match self.finish_frame_check(pending, input, Some(&scores)) {
                Some(theirs) => Ok(theirs),
                None => Ok(scores),
            },
            // The rewritten graph failed where the graph as quantised may
            // not have: with nothing of ours to compare, the check counts it
            // as a disagreement and the graph as quantised takes over.
            Err(err) => self.finish_frame_check(pending, input, None).ok_or(err),
        }
    }
}

/// Operators in the graph that tract parsed but cannot run (it keeps them as
/// `Unimplemented(name)` placeholders and only fails later, with a message
/// about typing): their ONNX names, each once.
fn unimplemented_ops(model: &InferenceModel) -> Vec<String> {
    let mut names: Vec<String> = model
        .nodes()
        .iter()
        .filter_map(|node| {
            let op = node.op.name();
            op.strip_prefix("Unimplemented(").and_then(|rest| rest.strip_suffix(')')).map(str::to_string)
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The threads tract will use: as asked, or one in a build without the
/// `tract-threads` feature (which leaves out tract's multithreaded matrix
/// products to make the binary smaller), with a warning saying so.
fn tract_threads(asked: usize) -> usize {
    if cfg!(feature = "tract-threads") || asked <= 1 {
        return asked;
    }
    tracing::warn!(
        threads = asked,
        "this build has no tract-threads feature: tract runs on one thread (rebuild with --features tract-threads)"
    );
    1
}

#[cfg(feature = "tract-threads")]
fn executor(threads: usize) -> Option<Executor> {
    (threads > 1).then(|| Executor::multithread(threads))
}

#[cfg(not(feature = "tract-threads"))]
fn executor(_threads: usize) -> Option<Executor> {
    None
}

/// Runs a plan (`work`) on the first thread of tract's pool where it has one,
/// else here. Each plan has a pool of its own (`build` makes one per plan),
/// so its frames run one at a time.
///
/// Why: an op split over the pool from outside it (tract's products,
/// labelcast's kernels through `pointwise::split_rows`) wakes every pool
/// thread and sleeps the caller until they are done, once per op, about
/// fifty times a frame on the demo; from a pool thread the caller runs a
/// share itself and wakes the others. Always the first thread (a
/// `broadcast` the others return from at once), not any (`install`), so
/// that every frame's tensors come from the same thread's allocator arena:
/// `install` ran on either and held 61-65 MB steady against 53-54 on two
/// threads (two alternated runs each). Measured here on two threads:
/// `labelcast bench` INT8 weights-only p50 3.70-3.72 ms (two runs) against
/// 4.23-5.28 (three) from outside the pool, one thread 4.54-5.44 (seven);
/// end to end, the README's `benches/e2e.sh` table.
fn on_pool_thread<T: Send>(
    executor: Option<&Executor>,
    work: impl FnOnce() -> TractResult<T> + Send,
) -> TractResult<T> {
    #[cfg(feature = "tract-threads")]
    if let Some(Executor::MultiThread(pool)) = executor {
        use tract_linalg::multithread::multithread_tract_scope;
        let work = std::sync::Mutex::new(Some(work));
        // The lock is let go before the work runs (the guard ends with the
        // `take`). A panic is caught on the pool thread and raised again
        // here: tract sets its thread-local executor (this pool) around the
        // plan and restores it only on a normal return, so a panic left
        // unwinding through it would leave the pool thread holding its own
        // pool, which then never ends. The scope around it restores it.
        let ran = pool.broadcast(|thread| {
            let work = (thread.index() == 0).then(|| work.lock().ok()?.take()).flatten()?;
            Some(multithread_tract_scope(Executor::SingleThread, || std::panic::catch_unwind(AssertUnwindSafe(work))))
        });
        // `broadcast` runs on every thread, thread 0 included, and returns
        // in thread order: the work has run unless the lock was poisoned,
        // which nothing holding it can do.
        return match ran.into_iter().flatten().next() {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Err(anyhow::anyhow!("tract's thread pool did not run the model")),
        };
    }
    #[cfg(not(feature = "tract-threads"))]
    let _ = executor;
    work()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tract_onnx::tract_core::internal::*;

    use super::{Executor, InputElement, InputSpec, Plan};
    use crate::engine::InputLayout;

    /// What [`Probe`] saw on each run that did not panic: its thread, and
    /// how many parts `split_rows` split four rows into there.
    static SEEN: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());

    /// An op that notes where it runs and splits a little work over
    /// tract's pool as labelcast's kernels do (one part without a pool),
    /// then passes its input through; a NaN first value makes it panic
    /// instead, naming its thread, standing in for a bug in tract or in
    /// one of labelcast's ops.
    #[derive(Debug, Clone, Hash, PartialEq, Eq)]
    struct Probe;

    impl Op for Probe {
        fn name(&self) -> StaticName {
            "Probe".into()
        }

        op_as_typed_op!();
    }

    impl EvalOp for Probe {
        op_out_of_plan!();

        fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
            let name = std::thread::current().name().unwrap_or("unnamed").to_string();
            if inputs[0].try_as_plain_ram()?.as_slice::<f32>()?[0].is_nan() {
                panic!("a bug in an op on {name}");
            }
            let mut rows = [0f32; 4];
            let parts = crate::engine::pointwise::split_rows(4, 1, 1, 1, &mut rows, |first, out| {
                out.iter_mut().enumerate().for_each(|(i, v)| *v = (first + i) as f32)
            });
            assert_eq!(rows, [0.0, 1.0, 2.0, 3.0]);
            SEEN.lock().unwrap().push((name, parts));
            Ok(inputs)
        }
    }

    impl TypedOp for Probe {
        fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
            Ok(tvec!(inputs[0].without_value()))
        }

        as_op!();
    }

    const SHAPE: [usize; 4] = [1, 3, 2, 2];

    /// A `Probe` plan on `executor`'s pool (`None`: the caller's thread).
    fn plan(executor: Option<Executor>) -> Plan {
        let mut model = TypedModel::default();
        let source = model.add_source("image", f32::fact(SHAPE)).unwrap();
        let out = model.wire_node("probe", Probe, &[source]).unwrap();
        model.select_output_outlets(&out).unwrap();
        let options = RunOptions { executor: executor.clone(), ..Default::default() };
        let state = model.into_runnable_with_options(&options).unwrap().spawn().unwrap();
        let input = InputSpec { layout: InputLayout::Nchw, element: InputElement::F32, shape: SHAPE };
        Plan { state, input, scratch: Vec::new(), bytes: Vec::new(), executor }
    }

    /// A frame `Probe` panics on.
    fn broken_frame() -> crate::flow::Tensor {
        let mut frame = crate::flow::Tensor::zeros(SHAPE);
        frame.data[0] = f32::NAN;
        frame
    }

    #[test]
    fn a_panic_while_running_the_graph_is_an_error_for_each_frame_not_the_end_of_the_thread() {
        let mut plan = plan(None);
        let frame = broken_frame();
        for _ in 0..2 {
            let err = plan.run(&frame).expect_err("the op panicked");
            assert!(format!("{err:#}").contains("tract panicked running the model: a bug in an op"), "{err:#}");
        }
    }

    /// Plans on tract's thread pool (only in builds with one).
    #[cfg(feature = "tract-threads")]
    mod on_the_pool {
        use tract_linalg::multithread::Executor;

        use super::{SEEN, broken_frame, plan};
        use crate::engine::tract::executor;

        // One test for both, as they share `SEEN`.
        #[test]
        fn on_two_threads_every_frame_runs_on_the_pools_first_thread_which_splits_work_and_survives_a_panic() {
            let pool = executor(2);
            let Some(Executor::MultiThread(threads)) = &pool else { panic!("two threads make a pool") };
            let threads = threads.clone();
            let mut pooled = plan(pool);
            let values: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 2.0).collect();
            let frame = crate::flow::Tensor { shape: super::SHAPE, data: values.clone() };
            SEEN.lock().unwrap().clear();
            for _ in 0..8 {
                assert_eq!(pooled.run(&frame).unwrap(), values);
            }
            let seen = std::mem::take(&mut *SEEN.lock().unwrap());
            // The same pool thread every frame, with tract's pool set for
            // the ops there and both threads taking a part.
            assert_eq!(seen, vec![("tract-default-0".to_string(), 2); 8]);
            let held = std::sync::Arc::strong_count(&threads);

            // A panic on the pool is that frame's error; the thread it ran
            // on keeps no hold on the pool; the next frame runs as before.
            let broken = broken_frame();
            for _ in 0..2 {
                let err = pooled.run(&broken).expect_err("the op panicked");
                let err = format!("{err:#}");
                assert!(err.contains("tract panicked running the model: a bug in an op on tract-default-0"), "{err}");
            }
            assert_eq!(std::sync::Arc::strong_count(&threads), held, "a pool thread still holds its pool");
            assert_eq!(pooled.run(&frame).unwrap(), values);
            assert_eq!(std::mem::take(&mut *SEEN.lock().unwrap()), vec![("tract-default-0".to_string(), 2)]);

            // Without a pool: the caller's thread, nothing split.
            let mut here = plan(None);
            assert_eq!(here.run(&frame).unwrap(), values);
            let seen = std::mem::take(&mut *SEEN.lock().unwrap());
            assert_eq!(seen.len(), 1);
            assert_ne!(seen[0].0, "tract-default-0", "without a pool the plan runs on the caller's thread");
            assert_eq!(seen[0].1, 1);
        }
    }
}
