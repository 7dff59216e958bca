//! Wires cameras -> preprocess -> engine -> labels -> sink, and owns
//! threads and shutdown.
//!
//! Each camera gets a capture thread and a preprocess thread (they block: on
//! a device, on the CPU); one inference thread runs the one engine for every
//! camera and region. Capture and preprocess are joined by a [`Slot`]
//! holding one frame: a live source overwrites a frame not yet taken, so a
//! slow model skips stale frames instead of queueing them; a file source
//! waits instead, since its frames are not going stale. Preprocessing
//! (decode, the motion gate, crop, resize, normalise) of a camera's next
//! frame overlaps inference, and hands over through [`lanes::Lanes`], one
//! place per camera taken in turn, so every camera is served once per
//! round whatever its frame rate. With one camera, preparation starts just
//! before inference will be free ([`Pacing`]), so the frame is as fresh as
//! without the overlap. Label events go to the sink (an async task) through
//! a bounded channel with `try_send`: inference never waits on the network.
//!
//! Shutdown is ordered: stop capture, let inference finish the frame in
//! flight, close the event channel, and let the sink publish `offline` and
//! disconnect.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::mpsc;

mod gate;
mod lanes;
pub use gate::DEFAULT_MOTION_INTERVAL;
use gate::Gate;
use lanes::{CloseLaneOnDrop, Lanes};

use crate::config::{Config, OutputConfig, OutputKind};
use crate::engine::{self, Engine, ModelInfo, Tensor};
use crate::labels::{self, LabelEvent, LabelRule, LabelScore, LabelTracker, RegionLabels};
use crate::preprocess::Preprocessor;
use crate::publish;
use crate::service::{self, Health, Notifier, SourceState};
use crate::source::camera::{CameraConfig, PixelRect};
use crate::source::{self, Frame, FrameSource, SourceError};
use crate::telemetry::{Counters, RateLimit};

/// The model and label rules a config yields, loaded and cross-checked.
pub struct Prepared {
    pub engine: Box<dyn Engine>,
    pub rules: Vec<LabelRule>,
}

/// Loads the model and checks it against the config (label count, label
/// overrides). `check-config` stops here; `run` goes on.
pub fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    let engine = engine::load(&config.model)?;
    let rules = labels::resolve_rules(&config.labels, &engine.info().metadata)?;
    if let OutputConfig::Mqtt(mqtt) = &config.output
        && mqtt.homeassistant.is_some()
    {
        // Each label becomes an entity: two must not share an id.
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_ref()).collect();
        publish::homeassistant::check_entity_ids(&names, "model.labels")?;
    }
    Ok(Prepared { engine, rules })
}

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

fn preprocessor_for(info: &ModelInfo) -> Preprocessor {
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
            combined = Some(match combined {
                None => scores,
                Some(best) => best.into_iter().zip(scores).map(|(a, b)| a.max(b)).collect(),
            });
        }
        let scores = combined.ok_or_else(|| ClassifyError::BadFrame(anyhow::anyhow!("no window to classify")))?;
        Ok(Classified { scores, inference, preprocess })
    }
}

/// Room for one item between two pipeline threads: raw frames between
/// capture and preprocessing, prepared tensors between preprocessing and
/// inference.
pub struct Slot<T> {
    state: Mutex<SlotState<T>>,
    changed: Condvar,
}

/// The slot between the capture thread and the preprocess thread.
pub type FrameSlot = Slot<Frame>;

struct SlotState<T> {
    item: Option<T>,
    closed: bool,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self { state: Mutex::new(SlotState { item: None, closed: false }), changed: Condvar::new() }
    }
}

impl<T> Slot<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, state: std::sync::MutexGuard<'a, SlotState<T>>) -> std::sync::MutexGuard<'a, SlotState<T>> {
        self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
    }

    /// Puts an item, replacing one not yet taken; returns true if it replaced one.
    pub fn put_latest(&self, item: T) -> bool {
        let replaced = self.lock().item.replace(item).is_some();
        self.changed.notify_all();
        replaced
    }

    /// Puts an item, first waiting until the previous one was taken; false if
    /// the slot closed meanwhile.
    pub fn put_wait(&self, item: T) -> bool {
        let mut state = self.wait_empty_locked();
        if state.closed {
            return false;
        }
        state.item = Some(item);
        self.changed.notify_all();
        true
    }

    /// Waits until the slot is empty (its item was taken); false if the slot
    /// closed meanwhile.
    pub fn wait_empty(&self) -> bool {
        !self.wait_empty_locked().closed
    }

    fn wait_empty_locked(&self) -> std::sync::MutexGuard<'_, SlotState<T>> {
        let mut state = self.lock();
        while state.item.is_some() && !state.closed {
            state = self.wait(state);
        }
        state
    }

    /// Sleeps up to `duration`; true if the slot closed meanwhile.
    pub fn wait_closed(&self, duration: Duration) -> bool {
        let state = self.lock();
        let (state, _) =
            self.changed.wait_timeout_while(state, duration, |s| !s.closed).unwrap_or_else(|p| p.into_inner());
        state.closed
    }

    /// The next item; `None` once the slot is closed and empty.
    pub fn take(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.item.take() {
                self.changed.notify_all();
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.wait(state);
        }
    }

    /// No more items. With `discard`, an item not yet taken is dropped (a
    /// shutdown); without, it is still delivered (a finite source ended).
    pub fn close(&self, discard: bool) {
        let mut state = self.lock();
        state.closed = true;
        if discard {
            state.item = None;
        }
        self.changed.notify_all();
    }
}

/// A stop flag that sleeping threads can wait on.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl StopSignal {
    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }
    fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Sleeps up to `duration`; true if stopped meanwhile.
    fn sleep(&self, duration: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) =
            self.changed.wait_timeout_while(guard, duration, |stopped| !*stopped).unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// What the pipeline keeps about each camera while wiring it.
struct CameraPlan {
    config: CameraConfig,
    /// This camera's source state and capture marks: the daemon's own
    /// [`Health`] when there is one camera, a camera's own with several.
    health: Arc<Health>,
    first_source: Option<Box<dyn FrameSource>>,
}

/// Runs the daemon until `shutdown` completes or every finite source ends.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let health = Arc::new(Health::new(config.service.stall_timeout));
    // The embedded broker's address is part of the config: a port another
    // program holds is exit 78, found before seconds go into the model.
    if let OutputConfig::Mqtt(mqtt) = &config.output
        && let crate::config::BrokerChoice::Embedded { listen } = mqtt.broker
    {
        publish::broker::start_embedded(listen)?;
    }
    service::spawn_watchdog(health.clone(), counters.clone()).context("starting the watchdog thread")?;
    let prepare_config = config.clone();
    // A SIGTERM while the model loads stops the daemon then, not after.
    tokio::pin!(shutdown);
    let loading = tokio::task::spawn_blocking(move || prepare(&prepare_config));
    let Prepared { engine, rules } = tokio::select! {
        loaded = loading => loaded.context("model loading thread")??,
        _ = &mut shutdown => {
            tracing::info!("shutdown requested while the model was loading; stopping");
            return Ok(());
        }
    };
    crate::telemetry::release_freed_memory();
    let several = config.cameras.len() > 1;
    let mut plans = Vec::with_capacity(config.cameras.len());
    for camera in &config.cameras {
        // A camera that is not plugged in yet is waited for; anything else
        // wrong with the source (no such folder, not a camera) stops here.
        let first_source = match source::open_limited(&camera.source, config.max_frame_pixels) {
            Ok(source) => {
                tracing::info!(camera = camera.name(), source = %source.describe(), device_id = %config.device_id, "source opened");
                Some(source)
            }
            Err(SourceError::Disconnected(reason)) if camera.source.is_live() => {
                tracing::warn!(camera = camera.name(), source = %camera.source.describe(), reason, "source not available yet; will keep trying");
                None
            }
            Err(err) => {
                return Err(anyhow::Error::new(err).context(format!("opening the frame source of {}", camera.name())));
            }
        };
        let health = if several { Arc::new(Health::new(config.service.stall_timeout)) } else { health.clone() };
        plans.push(CameraPlan { config: camera.clone(), health, first_source });
    }
    if several {
        health.set_cameras(plans.iter().map(|plan| plan.health.clone()).collect());
    }

    // Room for a burst while a sink catches up; beyond it events are dropped and counted.
    let (events_tx, events_rx) = mpsc::channel::<LabelEvent>(64);
    let sink = match &config.output {
        OutputConfig::Mqtt(mqtt) => {
            let sink = publish::mqtt::Sink {
                device_id: config.device_id.clone(),
                config: (**mqtt).clone(),
                rules: rules.clone(),
                model: publish::mqtt::ModelFacts::new(engine.info()),
                cameras: plans
                    .iter()
                    .map(|plan| publish::mqtt::SinkCamera {
                        id: plan.config.id.clone(),
                        regions: plan.config.regions.iter().map(|r| r.id.clone()).collect(),
                        health: plan.health.clone(),
                    })
                    .collect(),
                counters: counters.clone(),
                health: health.clone(),
            };
            tokio::spawn(sink.run(events_rx))
        }
        OutputConfig::Stdout => tokio::spawn(publish::stdout::run(events_rx)),
    };

    let stop = Arc::new(StopSignal::default());
    if let Some(listen) = config.service.http_listen {
        let exporter = crate::http::Exporter {
            health: health.clone(),
            counters: counters.clone(),
            source: config.cameras.iter().map(|c| c.source.describe()).collect::<Vec<_>>().join(", "),
            engine: engine.info().engine.to_string(),
            selfcheck: engine.info().selfcheck.clone(),
        };
        crate::http::start(listen, exporter).await;
    }
    let scorer = Scorer::new(engine);
    let prepared = Arc::new(Lanes::<PreparedFrame>::new(plans.len()));
    let mut frame_slots = Vec::with_capacity(plans.len());
    let mut captures = Vec::with_capacity(plans.len());
    let mut preprocessors = Vec::with_capacity(plans.len());
    let mut returns = Vec::with_capacity(plans.len());
    let mut served = Vec::with_capacity(plans.len());
    // One camera: preparing the next frame is timed to end as inference
    // frees up. Several: inference serves the cameras in turn, so each
    // prepares as soon as its last frame was taken.
    let pacing = (!several).then(|| Arc::new(Pacing::default()));
    for (index, plan) in plans.into_iter().enumerate() {
        let CameraPlan { config: camera, health: camera_health, first_source } = plan;
        let frames = Arc::new(FrameSlot::default());
        let supervisor = Supervisor::new(camera.source.clone(), first_source, counters.clone(), camera_health.clone())
            .with_max_frame_pixels(config.max_frame_pixels)
            .with_backoff(config.source_backoff.0, config.source_backoff.1)
            .with_camera(camera.id.clone());
        captures.push(spawn_capture(
            camera.name(),
            supervisor,
            camera.min_interval,
            frames.clone(),
            stop.clone(),
            counters.clone(),
            camera_health.clone(),
        )?);
        let (tensors_back, returned_tensors) = std::sync::mpsc::channel();
        preprocessors.push(spawn_preprocess(
            preprocessor_for(scorer.info()).with_max_pixels(config.max_frame_pixels),
            &camera,
            index,
            frames.clone(),
            prepared.clone(),
            returned_tensors,
            pacing.clone(),
            counters.clone(),
            [health.clone(), camera_health.clone()],
        )?);
        frame_slots.push(frames);
        returns.push(tensors_back);
        served.push(ServedCamera {
            id: camera.id.clone(),
            regions: camera.regions.iter().map(|r| r.id.clone()).collect(),
            health: camera_health,
        });
    }
    let inference = spawn_inference(
        scorer,
        rules,
        config.labels.min_hold,
        served,
        prepared.clone(),
        returns,
        pacing,
        events_tx,
        counters.clone(),
        health.clone(),
    )?;

    // The inference thread ends by itself when every finite source has run
    // out; watch it from async code without blocking the runtime.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let inference_watch = std::thread::Builder::new().name("inference-watch".into()).spawn(move || {
        let result = inference.join();
        let _ = done_tx.send(());
        // They end once their slots close: at once on shutdown, already when a source ran out.
        for preprocess in preprocessors {
            let _ = preprocess.join();
        }
        result
    })?;

    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutdown requested: stopping capture, finishing the frame in flight"),
        _ = done_rx => tracing::info!("source finished: all frames processed"),
    }
    Notifier::stopping();
    stop.stop();
    for frames in &frame_slots {
        frames.close(true);
    }
    prepared.close_all();
    // A capture call that hangs (a wedged camera driver) must not hold the
    // shutdown hostage: give it a moment, then leave it behind.
    for capture in captures {
        if !join_within("capture", capture, Duration::from_secs(2)).await? {
            tracing::warn!("a capture thread is stuck in its source; exiting without it");
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || inference_watch.join()))
        .await
        .is_err()
    {
        tracing::warn!("the frame in flight did not finish within 10 s; exiting without it");
    }
    // The inference thread dropped the event sender; the sink drains and disconnects.
    match tokio::time::timeout(Duration::from_secs(10), sink).await {
        Ok(Ok(result)) => result?,
        Ok(Err(err)) => return Err(anyhow::anyhow!("sink task failed: {err}")),
        Err(_) => tracing::warn!("sink did not stop within 10 s"),
    }
    // The embedded broker lives in this process: give it a moment to pass
    // the last messages (`offline`, final stats) on to its subscribers
    // before the process, and the broker with it, goes away.
    if let OutputConfig::Mqtt(mqtt) = &config.output
        && matches!(mqtt.broker, crate::config::BrokerChoice::Embedded { .. })
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tracing::info!(stats = %counters.snapshot(started.elapsed()), "labelcast stopped");
    Ok(())
}

/// Joins a thread if it finishes within `limit`; false if it did not.
async fn join_within(name: &str, handle: JoinHandle<()>, limit: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.join().map_err(|_| anyhow::anyhow!("the {name} thread panicked"))?;
    Ok(true)
}

static SKIP_WARNING: RateLimit = RateLimit::new(Duration::from_secs(10));
static DROP_WARNING: RateLimit = RateLimit::new(Duration::from_secs(30));
static FAIL_WARNING: RateLimit = RateLimit::new(Duration::from_secs(10));

/// Reads timed out this many times in a row: the camera stopped sending,
/// and closing and reopening it is the cure (a UVC camera that lost sync).
const TIMEOUT_STREAK: u32 = 3;

/// Keeps a live source open: reopens it by the same path with capped
/// backoff when it goes away, and reports whether it is streaming.
///
/// A file source is opened once and ends when it ends; a camera or the test
/// pattern is never given up on, since a camera that comes back should be
/// used again without anyone restarting the daemon.
pub struct Supervisor {
    spec: source::SourceSpec,
    source: Option<Box<dyn FrameSource>>,
    backoff: publish::mqtt::Backoff,
    timeouts: u32,
    /// A frame arrived since the source was (re)opened.
    delivered: bool,
    opened_before: bool,
    /// When the source was last (re)opened.
    opened_at: Instant,
    /// A source lost after streaming at least this long is reopened at once
    /// (and the backoff starts over); one lost sooner waits the backoff, so
    /// a camera that fails right after each open cannot flood the log and
    /// the broker.
    stable_after: Duration,
    max_frame_pixels: u64,
    lost_warning: RateLimit,
    back_info: RateLimit,
    counters: Arc<Counters>,
    health: Arc<Health>,
    /// The camera's id in its log lines (`None`: the only camera).
    camera: Option<Arc<str>>,
}

/// See [`Supervisor`]'s `stable_after`.
const STABLE_STREAM: Duration = Duration::from_secs(10);

/// What one step of the supervisor produced.
enum Step {
    Frame(Frame),
    /// Nothing this time (a skipped frame, a timeout, a reopen pending).
    Nothing,
    /// Wait this long before the next attempt to open the source.
    Retry(Duration),
    /// The source ended (a finite source) or failed for good.
    Ended,
}

impl Supervisor {
    pub fn new(
        spec: source::SourceSpec,
        first: Option<Box<dyn FrameSource>>,
        counters: Arc<Counters>,
        health: Arc<Health>,
    ) -> Self {
        let state = if first.is_some() { SourceState::Streaming } else { SourceState::Reconnecting };
        health.set_source_state(state);
        Self {
            spec,
            opened_before: first.is_some(),
            source: first,
            backoff: publish::mqtt::Backoff::new(Duration::from_millis(250), Duration::from_secs(10)),
            timeouts: 0,
            delivered: false,
            opened_at: Instant::now(),
            stable_after: STABLE_STREAM,
            max_frame_pixels: crate::preprocess::DEFAULT_MAX_FRAME_PIXELS,
            lost_warning: RateLimit::new(Duration::from_secs(10)),
            back_info: RateLimit::new(Duration::from_secs(10)),
            counters,
            health,
            camera: None,
        }
    }

    /// Names the camera in log lines, when there are several.
    pub fn with_camera(mut self, camera: Option<Arc<str>>) -> Self {
        self.camera = camera;
        self
    }

    /// Refuses pictures of more pixels where the source decodes them itself.
    pub fn with_max_frame_pixels(mut self, max_pixels: u64) -> Self {
        self.max_frame_pixels = max_pixels;
        self
    }

    /// Waits from `min` doubling to `max` between attempts to reopen.
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = publish::mqtt::Backoff::new(min, max);
        self
    }

    fn frame_interval(&self) -> Option<Duration> {
        self.source.as_ref().and_then(|s| s.frame_interval())
    }

    fn is_live(&self) -> bool {
        self.spec.is_live()
    }

    fn step(&mut self) -> Step {
        let Some(source) = self.source.as_mut() else { return self.reopen() };
        match source.next_frame() {
            Ok(Some(frame)) => {
                self.timeouts = 0;
                self.delivered = true;
                Step::Frame(frame)
            }
            Ok(None) if self.spec.is_live() => self.lost("the live stream ended".into()),
            Ok(None) => {
                tracing::info!(camera = self.camera.as_deref(), source = %source.describe(), "source reached its end");
                self.health.set_source_state(SourceState::Ended);
                Step::Ended
            }
            Err(SourceError::Skipped { origin, reason }) => {
                Counters::inc(&self.counters.frames_failed);
                if let Some(suppressed) = SKIP_WARNING.check(Instant::now()) {
                    tracing::warn!(camera = self.camera.as_deref(), origin, reason, suppressed, "frame skipped");
                }
                Step::Nothing
            }
            Err(SourceError::Timeout) => {
                self.timeouts += 1;
                Counters::inc(&self.counters.source_timeouts);
                if self.timeouts >= TIMEOUT_STREAK {
                    self.lost(format!("{} reads in a row timed out", self.timeouts))
                } else {
                    Step::Nothing
                }
            }
            Err(SourceError::Disconnected(reason)) => self.lost(reason),
            Err(SourceError::Fatal(message)) => {
                tracing::error!(camera = self.camera.as_deref(), source = %source.describe(), error = message, "source failed; no more frames");
                self.health.set_source_state(SourceState::Ended);
                Step::Ended
            }
        }
    }

    /// The source went away: close it (a camera's buffers and descriptor go
    /// with it) and start reopening: at once after a source that streamed
    /// for a while ([`STABLE_STREAM`]), after the backoff delay when it failed
    /// before its first frame or soon after (an RTSP camera that accepts
    /// connections but sends nothing, a camera that drops out after three
    /// frames every time, must not be reopened in a tight loop).
    fn lost(&mut self, reason: String) -> Step {
        let described = self.source.as_ref().map(|s| s.describe()).unwrap_or_default();
        self.source = None;
        self.timeouts = 0;
        let streamed = std::mem::take(&mut self.delivered) && self.opened_at.elapsed() >= self.stable_after;
        if streamed {
            self.backoff.reset();
        }
        let step = if streamed { Step::Nothing } else { Step::Retry(self.backoff.next_delay()) };
        if let Some(suppressed) = self.lost_warning.check(Instant::now()) {
            let retry_ms = match step {
                Step::Retry(delay) => delay.as_millis() as u64,
                _ => 0,
            };
            tracing::warn!(camera = self.camera.as_deref(), source = %described, reason, retry_ms, suppressed, "source lost; reopening");
        }
        self.health.set_source_state(SourceState::Reconnecting);
        step
    }

    fn reopen(&mut self) -> Step {
        match source::open_limited(&self.spec, self.max_frame_pixels) {
            Ok(source) => {
                if self.opened_before {
                    Counters::inc(&self.counters.source_reconnects);
                    if let Some(suppressed) = self.back_info.check(Instant::now()) {
                        tracing::info!(camera = self.camera.as_deref(), source = %source.describe(), suppressed, "source back");
                    }
                } else {
                    tracing::info!(camera = self.camera.as_deref(), source = %source.describe(), "source opened");
                }
                self.opened_before = true;
                self.source = Some(source);
                self.delivered = false;
                self.opened_at = Instant::now();
                self.health.set_source_state(SourceState::Streaming);
                Step::Nothing
            }
            Err(SourceError::Fatal(message)) if !self.opened_before => {
                tracing::error!(camera = self.camera.as_deref(), source = %self.spec.describe(), error = message, "cannot open the source");
                self.health.set_source_state(SourceState::Ended);
                Step::Ended
            }
            Err(err) => {
                let delay = self.backoff.next_delay();
                if let Some(suppressed) = REOPEN_WARNING.check(Instant::now()) {
                    tracing::warn!(camera = self.camera.as_deref(), source = %self.spec.describe(), error = %err, retry_ms = delay.as_millis() as u64, suppressed, "source still away");
                }
                Step::Retry(delay)
            }
        }
    }
}

static REOPEN_WARNING: RateLimit = RateLimit::new(Duration::from_secs(30));

fn spawn_capture(
    camera: &str,
    mut supervisor: Supervisor,
    min_interval: Option<Duration>,
    slot: Arc<FrameSlot>,
    stop: Arc<StopSignal>,
    counters: Arc<Counters>,
    health: Arc<Health>,
) -> anyhow::Result<JoinHandle<()>> {
    let live = supervisor.is_live();
    let camera_name = camera.to_string();
    let thread = std::thread::Builder::new().name(format!("capture-{camera}")).spawn(move || {
        let mut next_due = Instant::now();
        // When this camera's `fps` cap next lets a frame through.
        let mut next_accepted = Instant::now();
        while !stop.is_stopped() {
            if let Some(interval) = supervisor.frame_interval() {
                let now = Instant::now();
                if next_due > now && stop.sleep(next_due - now) {
                    break;
                }
                // Keep a steady cadence, but do not burst to catch up after a stall.
                next_due = (next_due + interval).max(Instant::now());
            }
            health.capture_started();
            let step = supervisor.step();
            health.capture_finished();
            match step {
                Step::Frame(frame) => {
                    Counters::inc(&counters.frames_captured);
                    tracing::trace!(camera = %camera_name, sequence = frame.sequence, origin = frame.origin(), "frame captured");
                    // A camera is still read at its own rate (its driver
                    // would otherwise hand over old buffers); the cap
                    // decides which frames go on.
                    if let Some(min) = min_interval {
                        let now = Instant::now();
                        if now < next_accepted {
                            Counters::inc(&counters.frames_gated);
                            continue;
                        }
                        next_accepted = (next_accepted + min).max(now);
                    }
                    if live {
                        if slot.put_latest(frame) {
                            Counters::inc(&counters.frames_dropped);
                            if let Some(suppressed) = DROP_WARNING.check(Instant::now()) {
                                tracing::warn!(
                                    suppressed,
                                    dropped_total = Counters::get(&counters.frames_dropped),
                                    "inference is slower than the source: dropping stale frames"
                                );
                            }
                        }
                    } else if !slot.put_wait(frame) {
                        break;
                    }
                }
                Step::Nothing => {}
                Step::Retry(delay) => {
                    if stop.sleep(delay) {
                        break;
                    }
                }
                Step::Ended => {
                    slot.close(false);
                    return;
                }
            }
        }
    })?;
    Ok(thread)
}

/// A frame turned into the model's input, with what its label event says
/// about the frame. The raw frame itself is already dropped.
struct PreparedFrame {
    /// Every window's input, in view order; may hold spare tensors past the
    /// last view's range.
    tensors: Vec<Tensor>,
    /// Per view (the whole frame, then each region in config order).
    views: Vec<ViewInput>,
    sequence: u64,
    captured_at: SystemTime,
    origin: Option<Arc<str>>,
}

/// What the preprocess thread made of one view of a frame.
enum ViewInput {
    /// Its windows' range in `tensors` (one window, or several with `tiles`).
    Windows(std::ops::Range<usize>),
    /// A region that does not fit this frame: left out.
    Unfit,
    /// Its gate found nothing new: its last labels stand.
    Unchanged,
}

/// When the preprocess thread should start on a live source's next frame:
/// late enough that it is the newest frame the camera has, early enough that
/// inference does not wait for it. Running means, in microseconds.
#[derive(Default)]
struct Pacing {
    inference_us: AtomicU64,
}

/// A running mean that follows drift (thermal throttling, a busier board)
/// within about ten frames; the first sample is taken as is.
fn running_mean(mean_us: u64, sample: Duration) -> u64 {
    let sample = sample.as_micros() as u64;
    if mean_us == 0 { sample } else { mean_us - mean_us / 8 + sample / 8 }
}

impl Pacing {
    fn record_inference(&self, took: Duration) {
        let mean = self.inference_us.load(Ordering::Relaxed);
        self.inference_us.store(running_mean(mean, took), Ordering::Relaxed);
    }

    /// How long to wait, once inference has taken a frame, before preparing
    /// the next one so that it is ready just as inference is. The margin
    /// (a quarter of the preparation time plus 1 ms) errs towards inference
    /// waiting a little rather than the frame ageing.
    fn lead(&self, preprocess_us: u64) -> Duration {
        let inference_us = self.inference_us.load(Ordering::Relaxed);
        Duration::from_micros(inference_us.saturating_sub(preprocess_us + preprocess_us / 4 + 1_000))
    }
}

/// Decodes and normalises the next frame while inference runs on the one
/// before, so a frame costs the longer of the two rather than their sum.
/// One frame ahead, no more: it waits until inference has taken the last
/// one. On a live source it also waits until just before inference will be
/// free ([`Pacing`]), so the frame it takes is as fresh as without overlap.
#[allow(clippy::too_many_arguments)]
fn spawn_preprocess(
    mut preprocessor: Preprocessor,
    camera: &CameraConfig,
    lane: usize,
    frames: Arc<FrameSlot>,
    prepared: Arc<Lanes<PreparedFrame>>,
    returned_tensors: std::sync::mpsc::Receiver<Vec<Tensor>>,
    pacing: Option<Arc<Pacing>>,
    counters: Arc<Counters>,
    seen: [Arc<Health>; 2],
) -> anyhow::Result<JoinHandle<()>> {
    let live = camera.source.is_live();
    let regions = camera.regions.clone();
    let camera_name = camera.name().to_string();
    let mut gates: Vec<Gate> =
        std::iter::once(camera.gate).chain(regions.iter().map(|r| r.gate)).map(Gate::new).collect();
    let thread = std::thread::Builder::new().name(format!("prepare-{camera_name}")).spawn(move || {
        let _closer = CloseLaneOnDrop(prepared.clone(), lane);
        let mut preprocess_us = 0;
        let mut spare: Option<Vec<Tensor>> = None;
        // A region that does not fit is said once, not once per frame.
        let mut refused = vec![false; regions.len()];
        let mut thumb = Box::new([0u8; crate::preprocess::THUMB_CELLS]);
        while prepared.wait_empty(lane) {
            if live && let Some(pacing) = &pacing {
                let lead = pacing.lead(preprocess_us);
                if !lead.is_zero() && prepared.wait_closed(lane, lead) {
                    break;
                }
            }
            let Some(frame) = frames.take() else { break };
            // Two sets of tensors take turns: one being filled here, one in inference.
            let mut tensors = spare.take().or_else(|| returned_tensors.try_recv().ok()).unwrap_or_default();
            let began = Instant::now();
            let decoded = preprocessor.decode(&frame).and_then(|(w, h)| {
                let decode = began.elapsed();
                let now = Instant::now();
                let whole = PixelRect { x: 0.0, y: 0.0, width: w as f64, height: h as f64 };
                // Each view's rectangle, or why it is not classified.
                let mut windows: Vec<Result<Vec<PixelRect>, ViewInput>> = Vec::with_capacity(1 + regions.len());
                for (view, gate) in gates.iter_mut().enumerate() {
                    let rect = match view.checked_sub(1).map(|j| (j, regions[j].rect.resolve(w, h))) {
                        None => whole,
                        Some((_, Ok(rect))) => rect,
                        Some((j, Err(message))) => {
                            if !std::mem::replace(&mut refused[j], true) {
                                tracing::error!(
                                    camera = %camera_name,
                                    region = %regions[j].id,
                                    "{}.rect: {message}; this region is not classified until the config is fixed",
                                    regions[j].field
                                );
                            }
                            windows.push(Err(ViewInput::Unfit));
                            continue;
                        }
                    };
                    if gate.is_active() {
                        preprocessor.thumbnail(w, h, rect, &mut thumb);
                        if !gate.admit(&thumb, now) {
                            Counters::inc(&counters.views_unchanged);
                            windows.push(Err(ViewInput::Unchanged));
                            continue;
                        }
                    }
                    windows.push(Ok(preprocessor.windows(w, h, Some(rect))));
                }
                let needed: usize = windows.iter().flatten().map(Vec::len).sum();
                while tensors.len() < needed {
                    tensors.push(preprocessor.new_tensor());
                }
                let mut views = Vec::with_capacity(windows.len());
                let mut next = 0;
                for view in windows {
                    views.push(match view {
                        Err(input) => input,
                        Ok(rects) => {
                            let start = next;
                            for rect in rects {
                                preprocessor.fit_window(w, h, Some(rect), &mut tensors[next])?;
                                next += 1;
                            }
                            ViewInput::Windows(start..next)
                        }
                    });
                }
                Ok((decode, views, needed))
            });
            match decoded {
                Ok((_, _, 0)) => {
                    // Nothing changed anywhere in the picture: the camera is
                    // alive and watched, there is just nothing to classify.
                    spare = Some(tensors);
                    for health in &seen {
                        health.mark_classified();
                    }
                }
                Ok((decode, views, _)) => {
                    let fit = began.elapsed() - decode;
                    Counters::add(&counters.decode_us_total, decode.as_micros() as u64);
                    Counters::add(&counters.fit_normalise_us_total, fit.as_micros() as u64);
                    preprocess_us = running_mean(preprocess_us, decode + fit);
                    let item = PreparedFrame {
                        tensors,
                        views,
                        sequence: frame.sequence,
                        captured_at: frame.captured_at,
                        origin: frame.origin,
                    };
                    if !prepared.put_wait(lane, item) {
                        break;
                    }
                }
                Err(err) => {
                    spare = Some(tensors);
                    Counters::inc(&counters.frames_failed);
                    if let Some(suppressed) = FAIL_WARNING.check(Instant::now()) {
                        tracing::warn!(camera = %camera_name, error = %format!("{err:#}"), suppressed, "frame skipped");
                    }
                }
            }
        }
    })?;
    Ok(thread)
}

/// What the inference thread knows of each camera.
struct ServedCamera {
    id: Option<Arc<str>>,
    regions: Vec<Arc<str>>,
    health: Arc<Health>,
}

/// Runs the one engine for every camera and region, in turn ([`Lanes`]),
/// and tracks each one's label states on its own.
#[allow(clippy::too_many_arguments)]
fn spawn_inference(
    mut scorer: Scorer,
    rules: Vec<LabelRule>,
    min_hold: Duration,
    cameras: Vec<ServedCamera>,
    prepared: Arc<Lanes<PreparedFrame>>,
    returned_tensors: Vec<std::sync::mpsc::Sender<Vec<Tensor>>>,
    pacing: Option<Arc<Pacing>>,
    events: mpsc::Sender<LabelEvent>,
    counters: Arc<Counters>,
    health: Arc<Health>,
) -> anyhow::Result<JoinHandle<()>> {
    // `/metrics` reports label states for the one camera's whole frame.
    if cameras.len() == 1 && cameras[0].regions.is_empty() {
        health.set_labels(rules.iter().map(|r| r.name.clone()));
    }
    let model_name: Arc<str> = Arc::from(scorer.info().metadata.name.as_str());
    let thread = std::thread::Builder::new().name("inference".into()).spawn(move || {
        // One tracker per camera and view (the whole frame, then each region).
        let mut trackers: Vec<Vec<LabelTracker>> = cameras
            .iter()
            .map(|camera| (0..=camera.regions.len()).map(|_| LabelTracker::new(rules.clone(), min_hold)).collect())
            .collect();
        // Each view's labels as last classified: they stand for a view its
        // gate found unchanged.
        let mut last: Vec<Vec<Option<Vec<LabelScore>>>> =
            cameras.iter().map(|camera| vec![None; 1 + camera.regions.len()]).collect();
        while let Some((lane, item)) = prepared.take_next() {
            let PreparedFrame { tensors, views: ranges, sequence, captured_at, origin } = item;
            let camera = &cameras[lane];
            let shown_origin = source::describe_origin(origin.as_deref());
            let mut views: Vec<Option<(Vec<LabelScore>, Vec<usize>)>> = Vec::with_capacity(ranges.len());
            let mut elapsed_total = Duration::ZERO;
            let mut failed = false;
            'views: for (view, input) in ranges.into_iter().enumerate() {
                let range = match input {
                    ViewInput::Windows(range) => range,
                    ViewInput::Unfit => {
                        views.push(None);
                        continue;
                    }
                    ViewInput::Unchanged => {
                        views.push(last[lane][view].clone().map(|labels| (labels, Vec::new())));
                        continue;
                    }
                };
                // With tiles, each label's highest score over the windows.
                let mut combined: Option<Vec<f32>> = None;
                for tensor in &tensors[range] {
                    health.inference_started();
                    let scored = scorer.score(tensor);
                    health.inference_finished(scored.is_ok());
                    let (scores, elapsed) = match scored {
                        Ok(scored) => scored,
                        Err(err) => {
                            Counters::inc(&counters.frames_failed);
                            tracing::error!(error = %format!("{err:#}"), origin = shown_origin, "inference failed");
                            failed = true;
                            break 'views;
                        }
                    };
                    elapsed_total += elapsed;
                    Counters::inc(&counters.inferences);
                    Counters::add(&counters.inference_us_total, elapsed.as_micros() as u64);
                    health.inference_seconds.observe(elapsed.as_secs_f64());
                    combined = Some(match combined {
                        None => scores,
                        Some(best) => best.into_iter().zip(scores).map(|(a, b)| a.max(b)).collect(),
                    });
                }
                let Some(scores) = combined else {
                    views.push(None);
                    continue;
                };
                let tracker = &mut trackers[lane][view];
                let changed = tracker.update(&scores, Instant::now());
                let labels: Vec<LabelScore> = tracker
                    .rules()
                    .iter()
                    .zip(&scores)
                    .enumerate()
                    .map(|(i, (rule, &score))| LabelScore { name: rule.name.clone(), score, on: tracker.is_on(i) })
                    .collect();
                let region = view.checked_sub(1).map(|j| &*camera.regions[j]);
                for &i in &changed {
                    if view == 0 {
                        health.set_label(i, labels[i].on);
                    }
                    Counters::inc(&counters.state_changes);
                    tracing::info!(camera = camera.id.as_deref(), region, label = %labels[i].name, state = if labels[i].on { "ON" } else { "OFF" }, score = labels[i].score, origin = shown_origin, "label changed");
                }
                last[lane][view] = Some(labels.clone());
                views.push(Some((labels, changed)));
            }
            // The preprocess thread fills them again with the frame after next.
            let _ = returned_tensors[lane].send(tensors);
            if failed {
                continue;
            }
            camera.health.mark_classified();
            if let Some(pacing) = &pacing {
                pacing.record_inference(elapsed_total);
            }
            if health.mark_ready() {
                let ms = elapsed_total.as_secs_f64() * 1e3;
                tracing::info!(inference_ms = ms, "first frame classified: ready");
                Notifier::ready(&format!("ready; first frame classified in {ms:.0} ms"));
            }
            tracing::trace!(camera = camera.id.as_deref(), sequence, inference_ms = elapsed_total.as_secs_f64() * 1e3, "frame classified");
            let mut views = views.into_iter();
            let Some(Some((labels, changed))) = views.next() else { continue };
            let regions = views
                .zip(&camera.regions)
                .filter_map(|(view, id)| view.map(|(labels, changed)| RegionLabels { id: id.clone(), labels, changed }))
                .collect();
            let event = LabelEvent {
                sequence,
                timestamp: SystemTime::now(),
                origin,
                model: model_name.clone(),
                inference_ms: elapsed_total.as_secs_f64() * 1e3,
                frame_ms: captured_at.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3),
                labels,
                changed,
                camera: camera.id.clone(),
                regions,
            };
            match events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => Counters::inc(&counters.labels_dropped),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    })?;
    Ok(thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sequence: u64) -> Frame {
        Frame {
            format: crate::source::PixelFormat::Gray8,
            width: 1,
            height: 1,
            stride: 1,
            data: vec![0],
            sequence,
            captured_at: SystemTime::now(),
            origin: None,
        }
    }

    fn supervisor(uri: &str) -> Supervisor {
        let spec = source::SourceSpec::parse(uri).unwrap();
        Supervisor::new(spec, None, Arc::new(Counters::default()), Arc::new(Health::new(Duration::from_secs(30))))
    }

    #[test]
    fn a_source_that_fails_before_its_first_frame_is_reopened_with_growing_delays() {
        // Opens fine, then is "unplugged" before delivering anything, every time.
        let mut supervisor = supervisor("test://pattern?width=32&height=32&fps=0&disconnect_after=0");
        let mut delays = Vec::new();
        for _ in 0..8 {
            if let Step::Retry(delay) = supervisor.step() {
                delays.push(delay);
            }
        }
        assert_eq!(delays.len(), 4, "every second step is a loss: {delays:?}");
        assert!(delays[0] <= Duration::from_millis(250) && delays[3] >= Duration::from_secs(1), "{delays:?}");
        assert_eq!(Counters::get(&supervisor.counters.source_reconnects), 3);
    }

    #[test]
    fn a_source_that_fails_right_after_each_open_backs_off_instead_of_reopening_at_once() {
        // Three frames, then "unplugged", every time, as fast as it can.
        let mut supervisor = supervisor("test://pattern?width=32&height=32&fps=0&disconnect_after=3&offline_ms=0");
        let mut delays = Vec::new();
        for _ in 0..40 {
            if let Step::Retry(delay) = supervisor.step() {
                delays.push(delay);
            }
        }
        assert!(delays.len() >= 4, "every loss waits: {delays:?}");
        // Jittered doubling from 250 ms: the fourth wait is 1 to 2 s.
        assert!(delays[0] <= Duration::from_millis(250) && delays[3] >= Duration::from_secs(1), "{delays:?}");
    }

    #[test]
    fn a_source_that_streamed_is_reopened_at_once_and_reports_its_state() {
        let mut supervisor = supervisor("test://pattern?width=32&height=32&fps=0&disconnect_after=2");
        // It "streamed for long enough" at once.
        supervisor.stable_after = Duration::ZERO;
        assert!(matches!(supervisor.step(), Step::Nothing), "the first step opens");
        assert_eq!(supervisor.health.source_state(), SourceState::Streaming);
        assert!(matches!(supervisor.step(), Step::Frame(_)));
        assert!(matches!(supervisor.step(), Step::Frame(_)));
        assert!(matches!(supervisor.step(), Step::Nothing), "lost after two frames: reopen without waiting");
        assert_eq!(supervisor.health.source_state(), SourceState::Reconnecting);
        assert!(matches!(supervisor.step(), Step::Nothing));
        assert_eq!(supervisor.health.source_state(), SourceState::Streaming);
        assert!(matches!(supervisor.step(), Step::Frame(_)));
    }

    fn rgb_frame(sequence: u64, bytes: usize) -> Frame {
        Frame {
            format: crate::source::PixelFormat::Rgb8,
            width: 4,
            height: 4,
            stride: 12,
            data: vec![128; bytes],
            ..frame(sequence)
        }
    }

    #[test]
    fn the_preprocess_thread_prepares_one_frame_ahead_in_order_and_skips_a_bad_frame() {
        let frames = Arc::new(FrameSlot::default());
        let prepared = Arc::new(Lanes::<PreparedFrame>::new(1));
        let counters = Arc::new(Counters::default());
        let (tensors_back, returned_tensors) = std::sync::mpsc::channel();
        let preprocessor = Preprocessor::new(2, 2, [0.5; 3], [0.25; 3], crate::config::ResizeMode::Stretch);
        let camera = CameraConfig::single(crate::source::SourceSpec::parse("file:///").unwrap(), Default::default());
        let thread = spawn_preprocess(
            preprocessor,
            &camera,
            0,
            frames.clone(),
            prepared.clone(),
            returned_tensors,
            Some(Arc::new(Pacing::default())),
            counters.clone(),
            [Arc::new(Health::new(Duration::from_secs(30))), Arc::new(Health::new(Duration::from_secs(30)))],
        )
        .unwrap();
        let writer = {
            let frames = frames.clone();
            std::thread::spawn(move || {
                for sequence in 0..5 {
                    // Frame 2 is 5 bytes short of 4 rows of 12.
                    let bytes = if sequence == 2 { 43 } else { 48 };
                    if !frames.put_wait(rgb_frame(sequence, bytes)) {
                        return;
                    }
                }
                frames.close(false);
            })
        };
        let waiting = || frames.lock().item.as_ref().map(|frame| frame.sequence);
        // Generous for a loaded CI machine or qemu: frame 0 prepared, frame 1 handed over.
        let deadline = Instant::now() + Duration::from_secs(20);
        while waiting() != Some(1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(waiting(), Some(1), "with frame 0 prepared and not taken, frame 1 is not touched");
        assert!(!writer.is_finished(), "and capture waits");

        let mut received = Vec::new();
        while let Some((_, item)) = prepared.take_next() {
            // mean 0.5, std 0.25: a grey of 128 normalises to (128/255 - 0.5) / 0.25.
            let expected = (128.0 / 255.0 - 0.5) / 0.25;
            let tensor = &item.tensors[0];
            assert!(tensor.data.iter().all(|v| (v - expected).abs() < 1e-5), "{:?}", tensor.data);
            received.push(item.sequence);
            // As inference does; after the last frame the thread may be gone.
            let _ = tensors_back.send(item.tensors);
        }
        writer.join().unwrap();
        thread.join().unwrap();
        assert_eq!(received, [0, 1, 3, 4]);
        assert_eq!(Counters::get(&counters.frames_failed), 1);
    }

    #[test]
    fn a_live_frame_is_prepared_just_before_inference_will_be_free() {
        let pacing = Pacing::default();
        assert_eq!(pacing.lead(3_000), Duration::ZERO, "no inference timed yet: prepare at once");
        pacing.record_inference(Duration::from_millis(50));
        // 50 ms of inference, 4 ms to prepare, a margin of 1 + 1 ms.
        assert_eq!(pacing.lead(4_000), Duration::from_millis(44));
        // One fast inference moves the mean an eighth of the way.
        pacing.record_inference(Duration::from_millis(2));
        assert_eq!(pacing.lead(4_000), Duration::from_millis(38));
        assert_eq!(pacing.lead(60_000), Duration::ZERO, "preparing takes longer than inference: at once");
    }

    #[test]
    fn waiting_on_a_slot_ends_early_when_it_closes() {
        let slot = Arc::new(FrameSlot::default());
        assert!(!slot.wait_closed(Duration::from_millis(10)), "still open after the full wait");
        let closer = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                slot.close(true);
            })
        };
        let began = Instant::now();
        assert!(slot.wait_closed(Duration::from_secs(30)));
        assert!(began.elapsed() < Duration::from_secs(20), "woken by the close, not the timeout");
        closer.join().unwrap();
        assert!(!slot.wait_empty(), "a closed slot tells a waiting producer to stop");
    }

    #[test]
    fn a_live_slot_keeps_only_the_newest_frame_and_reports_the_drop() {
        let slot = FrameSlot::default();
        assert!(!slot.put_latest(frame(1)));
        assert!(slot.put_latest(frame(2)));
        assert_eq!(slot.take().unwrap().sequence, 2);
    }

    #[test]
    fn closing_without_discard_still_delivers_the_last_frame() {
        let slot = FrameSlot::default();
        slot.put_latest(frame(9));
        slot.close(false);
        assert_eq!(slot.take().unwrap().sequence, 9);
        assert!(slot.take().is_none());
    }

    #[test]
    fn closing_with_discard_drops_the_waiting_frame_and_wakes_a_blocked_writer() {
        let slot = Arc::new(FrameSlot::default());
        slot.put_latest(frame(1));
        let writer = {
            let slot = slot.clone();
            std::thread::spawn(move || slot.put_wait(frame(2)))
        };
        std::thread::sleep(Duration::from_millis(50));
        slot.close(true);
        assert!(!writer.join().unwrap(), "the blocked writer learns the slot closed");
        assert!(slot.take().is_none());
    }

    #[test]
    fn a_waiting_writer_hands_over_every_frame_in_order() {
        let slot = Arc::new(FrameSlot::default());
        let writer = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    assert!(slot.put_wait(frame(i)));
                }
                slot.close(false);
            })
        };
        let received: Vec<u64> = std::iter::from_fn(|| slot.take()).map(|f| f.sequence).collect();
        writer.join().unwrap();
        assert_eq!(received, (0..50).collect::<Vec<_>>());
    }
}
