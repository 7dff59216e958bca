//! The tract engine: pure Rust, always built, runs FP32 and QDQ INT8 ONNX.
//!
//! Loading fixes the input to the model's declared shape (batch 1), optimises
//! once and keeps one run state, so a frame costs one inference and no
//! model rebuild. Loading runs under `catch_unwind`: a malformed file must
//! give an error naming it, never take the daemon down.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tract_onnx::prelude::*;

use super::prepare::{self, EngineFacts, Rewrite};
use super::{Engine, ModelInfo, Tensor};
use crate::config::ModelConfig;

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

    /// [`TractEngine::inspect`] with the config's engine settings.
    pub fn inspect_with(config: &ModelConfig) -> anyhow::Result<TractEngine> {
        Self::load_checked(config, false)
    }

    fn load_checked(config: &ModelConfig, require_labels: bool) -> anyhow::Result<TractEngine> {
        let path = config.path.as_path();
        let prepared = prepare::prepare(config, require_labels, Rewrite::ForTract)?;
        let input_shape = prepared.input_shape;
        let threads = tract_threads(config.threads);
        let proto = &prepared.proto;
        let built = std::panic::catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<_> {
            let started = Instant::now();
            let model = tract_onnx::onnx().model_for_proto_model(proto).context("tract could not read the graph")?;
            let missing = unimplemented_ops(&model);
            if !missing.is_empty() {
                anyhow::bail!(
                    "tract has no implementation of {}: run this model with model.engine = \"onnxruntime\", \
                     or export it with standard ONNX operators",
                    missing.join(", ")
                );
            }
            let loaded = Instant::now();
            let model = model
                .with_input_fact(0, f32::fact(input_shape).into())
                .and_then(|m| m.into_optimized())
                .context("tract could not analyse and optimise the graph")?;
            let options = RunOptions { executor: executor(threads), ..Default::default() };
            let output_shape: Vec<usize> = model
                .output_fact(0)?
                .shape
                .as_concrete()
                .map(|s| s.to_vec())
                .context("the output shape is not fixed once the input is")?;
            let plan = model.into_runnable_with_options(&options).context("tract could not plan the graph")?;
            let state = plan.spawn()?;
            Ok((state, output_shape, loaded - started, loaded.elapsed()))
        }));
        let (state, output_shape, graph_time, optimize_time) = match built {
            Ok(result) => result.map_err(|err| prepare::model_error(path, err))?,
            Err(_) => return Err(prepare::model_error(path, anyhow::anyhow!("tract panicked while loading it"))),
        };
        let built = EngineFacts {
            engine: "tract",
            engine_version: format!("tract {}", env!("LABELCAST_TRACT_VERSION")),
            threads,
            output_shape,
            graph_time,
            optimize_time,
        };
        let info = prepared.into_info(path, built, require_labels)?;
        info.log_loaded();
        Ok(TractEngine { info, state })
    }
}

impl Engine for TractEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn infer(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>> {
        self.info.check_input(input)?;
        let tensor = tract_onnx::prelude::Tensor::from_shape(&input.shape, &input.data)?;
        let outputs = self.state.run(tvec!(tensor.into_tvalue())).context("tract could not run the model")?;
        let scores = outputs[0].to_plain_array_view::<f32>().context("the model's output is not float")?;
        Ok(scores.iter().copied().collect())
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
fn executor(threads: usize) -> Option<tract_linalg::multithread::Executor> {
    (threads > 1).then(|| tract_linalg::multithread::Executor::multithread(threads))
}

#[cfg(not(feature = "tract-threads"))]
fn executor(_threads: usize) -> Option<tract_onnx::prelude::tract_linalg::multithread::Executor> {
    None
}
