//! Wires source -> preprocess -> engine -> labels -> sink, and owns threads
//! and shutdown.
//!
//! Capture, preprocessing and inference each get an OS thread (they block:
//! on a device, on the CPU), joined by [`Slot`]s that hold one item each.
//! A live source overwrites a frame not yet taken, so a slow model skips
//! stale frames instead of queueing them; a file source waits instead, since
//! its frames are not going stale. Preprocessing (JPEG decode, resize,
//! normalise) of the next frame overlaps inference of the current one, so
//! throughput is set by inference alone; on a live source it starts just
//! before inference will be free, so the frame is as fresh as without the
//! overlap. Label events go to the sink (an async task) through a bounded
//! channel with `try_send`: inference never waits on the network.
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

use crate::config::{Config, OutputConfig, OutputKind};
use crate::engine::{self, Engine, ModelInfo, Tensor};
use crate::labels::{self, LabelEvent, LabelRule, LabelScore, LabelTracker};
use crate::preprocess::Preprocessor;
use crate::publish;
use crate::service::{self, Health, Notifier, SourceState};
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

    pub fn classify(&mut self, frame: &Frame) -> Result<Classified, ClassifyError> {
        let preprocess = self.preprocessor.run_timed(frame, &mut self.tensor).map_err(ClassifyError::BadFrame)?;
        let (scores, inference) = self.scorer.score(&self.tensor).map_err(ClassifyError::Engine)?;
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

/// Runs the daemon until `shutdown` completes or a finite source ends.
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
    // A camera that is not plugged in yet is waited for; anything else
    // wrong with the source (no such folder, not a camera) stops here.
    let first_source = match source::open_limited(&config.source, config.max_frame_pixels) {
        Ok(source) => {
            tracing::info!(source = %source.describe(), device_id = %config.device_id, "source opened");
            Some(source)
        }
        Err(SourceError::Disconnected(reason)) if config.source.is_live() => {
            tracing::warn!(source = %config.source.describe(), reason, "source not available yet; will keep trying");
            None
        }
        Err(err) => return Err(anyhow::Error::new(err).context("opening the frame source")),
    };

    // Room for a burst while a sink catches up; beyond it events are dropped and counted.
    let (events_tx, events_rx) = mpsc::channel::<LabelEvent>(64);
    let sink = match &config.output {
        OutputConfig::Mqtt(mqtt) => {
            let sink = publish::mqtt::Sink {
                device_id: config.device_id.clone(),
                config: (**mqtt).clone(),
                rules: rules.clone(),
                model: publish::mqtt::ModelFacts::new(engine.info()),
                counters: counters.clone(),
                health: health.clone(),
            };
            tokio::spawn(sink.run(events_rx))
        }
        OutputConfig::Stdout => tokio::spawn(publish::stdout::run(events_rx)),
    };

    let frames = Arc::new(FrameSlot::default());
    let prepared = Arc::new(Slot::<PreparedFrame>::default());
    let stop = Arc::new(StopSignal::default());
    if let Some(listen) = config.service.http_listen {
        let exporter = crate::http::Exporter {
            health: health.clone(),
            counters: counters.clone(),
            source: config.source.describe(),
            engine: engine.info().engine.to_string(),
            selfcheck: engine.info().selfcheck.clone(),
        };
        crate::http::start(listen, exporter).await;
    }
    let supervisor = Supervisor::new(config.source.clone(), first_source, counters.clone(), health.clone())
        .with_max_frame_pixels(config.max_frame_pixels)
        .with_backoff(config.source_backoff.0, config.source_backoff.1);
    let capture = spawn_capture(supervisor, frames.clone(), stop.clone(), counters.clone(), health.clone())?;
    let scorer = Scorer::new(engine);
    let pacing = Arc::new(Pacing::default());
    let (tensors_back, returned_tensors) = std::sync::mpsc::channel();
    let preprocess = spawn_preprocess(
        preprocessor_for(scorer.info()).with_max_pixels(config.max_frame_pixels),
        config.source.is_live(),
        frames.clone(),
        prepared.clone(),
        returned_tensors,
        pacing.clone(),
        counters.clone(),
    )?;
    let inference = spawn_inference(
        scorer,
        rules,
        config.labels.min_hold,
        prepared.clone(),
        tensors_back,
        pacing,
        events_tx,
        counters.clone(),
        health.clone(),
    )?;

    // The inference thread ends by itself when a finite source runs out;
    // watch it from async code without blocking the runtime.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let inference_watch = std::thread::Builder::new().name("inference-watch".into()).spawn(move || {
        let result = inference.join();
        let _ = done_tx.send(());
        // Ends once its slots close: at once on shutdown, already when a source ran out.
        let _ = preprocess.join();
        result
    })?;

    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutdown requested: stopping capture, finishing the frame in flight"),
        _ = done_rx => tracing::info!("source finished: all frames processed"),
    }
    Notifier::stopping();
    stop.stop();
    frames.close(true);
    prepared.close(true);
    // A capture call that hangs (a wedged camera driver) must not hold the
    // shutdown hostage: give it a moment, then leave it behind.
    if !join_within("capture", capture, Duration::from_secs(2)).await? {
        tracing::warn!("the capture thread is stuck in the source; exiting without it");
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
        }
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
                tracing::info!(source = %source.describe(), "source reached its end");
                self.health.set_source_state(SourceState::Ended);
                Step::Ended
            }
            Err(SourceError::Skipped { origin, reason }) => {
                Counters::inc(&self.counters.frames_failed);
                if let Some(suppressed) = SKIP_WARNING.check(Instant::now()) {
                    tracing::warn!(origin, reason, suppressed, "frame skipped");
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
                tracing::error!(source = %source.describe(), error = message, "source failed; no more frames");
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
            tracing::warn!(source = %described, reason, retry_ms, suppressed, "source lost; reopening");
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
                        tracing::info!(source = %source.describe(), suppressed, "source back");
                    }
                } else {
                    tracing::info!(source = %source.describe(), "source opened");
                }
                self.opened_before = true;
                self.source = Some(source);
                self.delivered = false;
                self.opened_at = Instant::now();
                self.health.set_source_state(SourceState::Streaming);
                Step::Nothing
            }
            Err(SourceError::Fatal(message)) if !self.opened_before => {
                tracing::error!(source = %self.spec.describe(), error = message, "cannot open the source");
                self.health.set_source_state(SourceState::Ended);
                Step::Ended
            }
            Err(err) => {
                let delay = self.backoff.next_delay();
                if let Some(suppressed) = REOPEN_WARNING.check(Instant::now()) {
                    tracing::warn!(source = %self.spec.describe(), error = %err, retry_ms = delay.as_millis() as u64, suppressed, "source still away");
                }
                Step::Retry(delay)
            }
        }
    }
}

static REOPEN_WARNING: RateLimit = RateLimit::new(Duration::from_secs(30));

fn spawn_capture(
    mut supervisor: Supervisor,
    slot: Arc<FrameSlot>,
    stop: Arc<StopSignal>,
    counters: Arc<Counters>,
    health: Arc<Health>,
) -> anyhow::Result<JoinHandle<()>> {
    let live = supervisor.is_live();
    let thread = std::thread::Builder::new().name("capture".into()).spawn(move || {
        let mut next_due = Instant::now();
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
                    tracing::trace!(sequence = frame.sequence, origin = frame.origin(), "frame captured");
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
    tensor: Tensor,
    sequence: u64,
    captured_at: SystemTime,
    origin: Option<Arc<str>>,
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

/// Closes a slot when its producer thread ends, also by a panic, so the
/// consumer sees the end instead of waiting forever.
struct CloseOnDrop<T>(Arc<Slot<T>>);

impl<T> Drop for CloseOnDrop<T> {
    fn drop(&mut self) {
        self.0.close(false);
    }
}

/// Decodes and normalises the next frame while inference runs on the one
/// before, so a frame costs the longer of the two rather than their sum.
/// One frame ahead, no more: it waits until inference has taken the last
/// one. On a live source it also waits until just before inference will be
/// free ([`Pacing`]), so the frame it takes is as fresh as without overlap.
fn spawn_preprocess(
    mut preprocessor: Preprocessor,
    live: bool,
    frames: Arc<FrameSlot>,
    prepared: Arc<Slot<PreparedFrame>>,
    returned_tensors: std::sync::mpsc::Receiver<Tensor>,
    pacing: Arc<Pacing>,
    counters: Arc<Counters>,
) -> anyhow::Result<JoinHandle<()>> {
    let thread = std::thread::Builder::new().name("preprocess".into()).spawn(move || {
        let prepared = CloseOnDrop(prepared);
        let mut preprocess_us = 0;
        let mut spare: Option<Tensor> = None;
        while prepared.0.wait_empty() {
            if live {
                let lead = pacing.lead(preprocess_us);
                if !lead.is_zero() && prepared.0.wait_closed(lead) {
                    break;
                }
            }
            let Some(frame) = frames.take() else { break };
            // Two tensors take turns: one being filled here, one in inference.
            let mut tensor =
                spare.take().or_else(|| returned_tensors.try_recv().ok()).unwrap_or_else(|| preprocessor.new_tensor());
            match preprocessor.run_timed(&frame, &mut tensor) {
                Ok(times) => {
                    Counters::add(&counters.decode_us_total, times.decode.as_micros() as u64);
                    Counters::add(&counters.fit_normalise_us_total, times.fit_normalise.as_micros() as u64);
                    preprocess_us = running_mean(preprocess_us, times.decode + times.fit_normalise);
                    let item = PreparedFrame {
                        tensor,
                        sequence: frame.sequence,
                        captured_at: frame.captured_at,
                        origin: frame.origin,
                    };
                    if !prepared.0.put_wait(item) {
                        break;
                    }
                }
                Err(err) => {
                    spare = Some(tensor);
                    Counters::inc(&counters.frames_failed);
                    if let Some(suppressed) = FAIL_WARNING.check(Instant::now()) {
                        tracing::warn!(error = %format!("{err:#}"), suppressed, "frame skipped");
                    }
                }
            }
        }
    })?;
    Ok(thread)
}

#[allow(clippy::too_many_arguments)]
fn spawn_inference(
    mut scorer: Scorer,
    rules: Vec<LabelRule>,
    min_hold: Duration,
    prepared: Arc<Slot<PreparedFrame>>,
    returned_tensors: std::sync::mpsc::Sender<Tensor>,
    pacing: Arc<Pacing>,
    events: mpsc::Sender<LabelEvent>,
    counters: Arc<Counters>,
    health: Arc<Health>,
) -> anyhow::Result<JoinHandle<()>> {
    health.set_labels(rules.iter().map(|r| r.name.clone()));
    let model_name: Arc<str> = Arc::from(scorer.info().metadata.name.as_str());
    let thread = std::thread::Builder::new().name("inference".into()).spawn(move || {
        let mut tracker = LabelTracker::new(rules, min_hold);
        while let Some(PreparedFrame { tensor, sequence, captured_at, origin }) = prepared.take() {
            let shown_origin = source::describe_origin(origin.as_deref());
            health.inference_started();
            let scored = scorer.score(&tensor);
            health.inference_finished(scored.is_ok());
            // The preprocess thread fills it again with the frame after next.
            let _ = returned_tensors.send(tensor);
            let (scores, elapsed) = match scored {
                Ok(scored) => scored,
                Err(err) => {
                    Counters::inc(&counters.frames_failed);
                    tracing::error!(error = %format!("{err:#}"), origin = shown_origin, "inference failed");
                    continue;
                }
            };
            pacing.record_inference(elapsed);
            Counters::inc(&counters.inferences);
            Counters::add(&counters.inference_us_total, elapsed.as_micros() as u64);
            if health.mark_ready() {
                let ms = elapsed.as_secs_f64() * 1e3;
                tracing::info!(inference_ms = ms, "first frame classified: ready");
                Notifier::ready(&format!("ready; first frame classified in {ms:.0} ms"));
            }
            let changed = tracker.update(&scores, Instant::now());
            let labels: Vec<LabelScore> = tracker
                .rules()
                .iter()
                .zip(&scores)
                .enumerate()
                .map(|(i, (rule, &score))| LabelScore { name: rule.name.clone(), score, on: tracker.is_on(i) })
                .collect();
            health.inference_seconds.observe(elapsed.as_secs_f64());
            for &i in &changed {
                health.set_label(i, labels[i].on);
                Counters::inc(&counters.state_changes);
                tracing::info!(label = %labels[i].name, state = if labels[i].on { "ON" } else { "OFF" }, score = labels[i].score, origin = shown_origin, "label changed");
            }
            tracing::trace!(sequence, inference_ms = elapsed.as_secs_f64() * 1e3, "frame classified");
            let event = LabelEvent {
                sequence,
                timestamp: SystemTime::now(),
                origin,
                model: model_name.clone(),
                inference_ms: elapsed.as_secs_f64() * 1e3,
                frame_ms: captured_at.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3),
                labels,
                changed,
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
        let prepared = Arc::new(Slot::<PreparedFrame>::default());
        let counters = Arc::new(Counters::default());
        let (tensors_back, returned_tensors) = std::sync::mpsc::channel();
        let preprocessor = Preprocessor::new(2, 2, [0.5; 3], [0.25; 3], crate::config::ResizeMode::Stretch);
        let thread = spawn_preprocess(
            preprocessor,
            false,
            frames.clone(),
            prepared.clone(),
            returned_tensors,
            Arc::new(Pacing::default()),
            counters.clone(),
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
        while let Some(item) = prepared.take() {
            // mean 0.5, std 0.25: a grey of 128 normalises to (128/255 - 0.5) / 0.25.
            let expected = (128.0 / 255.0 - 0.5) / 0.25;
            assert!(item.tensor.data.iter().all(|v| (v - expected).abs() < 1e-5), "{:?}", item.tensor.data);
            received.push(item.sequence);
            // As inference does; after the last frame the thread may be gone.
            let _ = tensors_back.send(item.tensor);
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
