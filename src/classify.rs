//! One frame's journey after capture, without threads: preprocess, run the
//! engine, turn outputs into scores. `labelcast classify` runs it as is;
//! the daemon runs the same parts on its preprocess and inference threads.

use std::time::{Duration, Instant};

use crate::config::OutputKind;
use crate::engine::{Engine, ModelInfo, Tensor};
use crate::labels;
use crate::preprocess::Preprocessor;
use crate::source::Frame;

/// The engine and what turns its raw outputs into scores: the part of a
/// frame's journey after preprocessing.
pub struct Scorer {
    engine: Box<dyn Engine>,
    output: OutputKind,
}

impl Scorer {
    pub fn new(engine: Box<dyn Engine>) -> Self {
        let output = engine.info().metadata.output;
        Self { engine, output }
    }

    pub fn info(&self) -> &ModelInfo {
        self.engine.info()
    }

    /// Scores in [0, 1], one per label, and how long the engine took.
    pub fn score(&mut self, tensor: &Tensor) -> anyhow::Result<(Vec<f32>, Duration)> {
        let began = Instant::now();
        let mut scores = self.engine.infer(tensor)?;
        let inference = began.elapsed();
        labels::to_scores(&mut scores, self.output);
        Ok((scores, inference))
    }
}

pub(crate) fn preprocessor_for(info: &ModelInfo) -> Preprocessor {
    let meta = &info.metadata;
    Preprocessor::new(info.input_width(), info.input_height(), meta.mean, meta.std, meta.resize)
}

/// One frame through preprocessing and the engine, every buffer reused:
/// what `labelcast classify` does (the daemon runs the two halves on two
/// threads).
pub struct FrameClassifier {
    scorer: Scorer,
    preprocessor: Preprocessor,
    tensor: Tensor,
}

/// Scores in [0, 1], one per label, and where the time went.
pub struct Classified {
    pub scores: Vec<f32>,
    pub inference: Duration,
    pub preprocess: crate::preprocess::StageTimes,
}

/// Why a frame produced no scores; the daemon skips the first kind quietly
/// (rate-limited WARN) and reports the second as an ERROR.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// The frame itself is unusable (corrupt JPEG, wrong size...).
    #[error("{0:#}")]
    BadFrame(anyhow::Error),
    /// The engine failed on a well-formed input.
    #[error("inference failed: {0:#}")]
    Engine(anyhow::Error),
}

impl FrameClassifier {
    pub fn new(engine: Box<dyn Engine>) -> Self {
        let scorer = Scorer::new(engine);
        let preprocessor = preprocessor_for(scorer.info());
        let tensor = preprocessor.new_tensor();
        Self { scorer, preprocessor, tensor }
    }

    pub fn info(&self) -> &ModelInfo {
        self.scorer.info()
    }

    /// Refuses frames of more than `max_pixels` pixels before decoding them.
    pub fn with_max_frame_pixels(mut self, max_pixels: u64) -> Self {
        self.preprocessor = self.preprocessor.with_max_pixels(max_pixels);
        self
    }

    /// The input tensor of the last frame classified (NCHW float), as the
    /// engine received it.
    pub fn last_input(&self) -> &Tensor {
        &self.tensor
    }

    /// Scores for the whole frame: one inference, or with `tiles` one per
    /// window and each label's highest score ([`Preprocessor::windows`]).
    pub fn classify(&mut self, frame: &Frame) -> Result<Classified, ClassifyError> {
        let began = Instant::now();
        let (w, h) = self.preprocessor.decode(frame).map_err(ClassifyError::BadFrame)?;
        let decode = began.elapsed();
        let mut preprocess = crate::preprocess::StageTimes { decode, ..Default::default() };
        let mut inference = Duration::ZERO;
        let mut combined: Option<Vec<f32>> = None;
        for window in self.preprocessor.windows(w, h, None) {
            let fitting = Instant::now();
            self.preprocessor.fit_window(w, h, Some(window), &mut self.tensor).map_err(ClassifyError::BadFrame)?;
            preprocess.fit_normalise += fitting.elapsed();
            let (scores, took) = self.scorer.score(&self.tensor).map_err(ClassifyError::Engine)?;
            inference += took;
            combined = Some(keep_highest(combined, scores));
        }
        let scores = combined.ok_or_else(|| ClassifyError::BadFrame(anyhow::anyhow!("no window to classify")))?;
        Ok(Classified { scores, inference, preprocess })
    }
}

/// Each label's highest score over a frame's windows (`tiles`): the label
/// is in the frame if it is in any window.
pub(crate) fn keep_highest(best: Option<Vec<f32>>, scores: Vec<f32>) -> Vec<f32> {
    match best {
        None => scores,
        Some(best) => best.into_iter().zip(scores).map(|(a, b)| a.max(b)).collect(),
    }
}
