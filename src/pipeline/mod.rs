//! Wires cameras -> preprocess -> engine -> labels -> sink, and owns
//! threads and shutdown.
//!
//! Each camera gets a capture thread and a preprocess thread (they block: on
//! a device, on the CPU); one inference thread per distinct model runs its
//! engine for every camera and region on that model (one for most configs). Capture and preprocess are joined by a [`Slot`]
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::mpsc;

mod gate;
mod lanes;
mod slot;
pub use gate::DEFAULT_MOTION_INTERVAL;
use gate::Gate;
use lanes::{CloseLaneOnDrop, Lanes};
use slot::StopSignal;
pub use slot::{FrameSlot, Slot};

pub use crate::classify::{Classified, ClassifyError, FrameClassifier, Scorer};
use crate::classify::{keep_highest, preprocessor_for};
use crate::source::supervisor::Step;
pub use crate::source::supervisor::Supervisor;

use crate::config::Config;
use crate::engine::{self, Engine, Tensor};
use crate::events::{CameraEvents, InferenceEvents};
use crate::labels::{self, LabelEvent, LabelRule, LabelScore, LabelTracker, RegionLabels};
use crate::preprocess::Preprocessor;
use crate::publish;
use crate::service::{self, Health, Notifier};
use crate::source::camera::{CameraConfig, PixelRect};
use crate::source::{self, FrameSource, SourceError};
use crate::status::{Board, CameraBoard, CameraFacts, FrameTap, PREVIEW_MAX_SIDE};
use crate::telemetry::Counters;

/// A model and its label rules, loaded and cross-checked, with the cameras
/// (indices into `Config::cameras`) it serves.
pub struct Prepared {
    pub engine: Box<dyn Engine>,
    pub rules: Vec<LabelRule>,
    pub cameras: Vec<usize>,
    /// Per camera in `cameras`, per view (its whole frame, then each
    /// region): the rules with that view's own labels and thresholds.
    pub views: Vec<Vec<Vec<LabelRule>>>,
}

/// Loads every distinct model the cameras use ([`Config::models`]: one
/// for most configs) and checks each against the config (label count,
/// label overrides). `check-config` stops here; `run` goes on.
pub fn prepare(config: &Config) -> anyhow::Result<Vec<Prepared>> {
    let mut prepared = Vec::new();
    for (model, cameras) in config.models() {
        let engine = engine::load(&model)?;
        let rules = labels::resolve_rules(&config.labels, &engine.info().metadata)?;
        config.output.check_rules(&rules)?;
        if config.labels.publish.is_none() && rules.len() > labels::FEW_LABELS {
            tracing::warn!(
                model = %model.path.display(),
                labels = rules.len(),
                "the model has more than {} labels: none gets a retained topic or a Home Assistant entity unless \
                 listed in labels.publish; the labels JSON carries the ON labels and the highest scores \
                 (labels.top_k, labels.floor)",
                labels::FEW_LABELS
            );
        }
        let hysteresis = config.labels.hysteresis;
        let views = cameras
            .iter()
            .map(|&index| {
                let camera = &config.cameras[index];
                let views = std::iter::once(labels::view_rules(&rules, &camera.labels, hysteresis, &camera.field))
                    .chain(camera.regions.iter().map(|r| labels::view_rules(&rules, &r.labels, hysteresis, &r.field)))
                    .collect::<Result<Vec<_>, _>>()?;
                config.output.check_views(camera, &views)?;
                Ok(views)
            })
            .collect::<Result<Vec<_>, crate::config::ConfigError>>()?;
        prepared.push(Prepared { engine, rules, cameras, views });
    }
    Ok(prepared)
}

/// Stops the watchdog and the HTTP server when `run` returns, by any path.
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>, tokio::sync::watch::Sender<bool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.1.send(true);
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
    config.output.start_before_model()?;
    // Every task this run starts ends with it: the watchdog and the HTTP
    // server on these, the sink when the event channel closes, the threads
    // by their slots. (The embedded broker, rumqttd, has no way to stop: it
    // lives until the process ends.)
    let watchdog_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tasks_stop, tasks_stopped) = tokio::sync::watch::channel(false);
    let _stop_tasks = StopOnDrop(watchdog_stop.clone(), tasks_stop);
    service::spawn_watchdog(health.clone(), counters.clone(), watchdog_stop).context("starting the watchdog thread")?;
    let prepare_config = config.clone();
    // A SIGTERM while the model loads stops the daemon then, not after.
    tokio::pin!(shutdown);
    let loading = tokio::task::spawn_blocking(move || prepare(&prepare_config));
    let models: Vec<Prepared> = tokio::select! {
        loaded = loading => loaded.context("model loading thread")??,
        _ = &mut shutdown => {
            tracing::info!("shutdown requested while the model was loading; stopping");
            return Ok(());
        }
    };
    crate::allocator::release_freed_memory();
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
        plans.push(Some(CameraPlan { config: camera.clone(), health, first_source }));
    }
    if several {
        health.set_cameras(plans.iter().flatten().map(|plan| plan.health.clone()).collect());
    }
    // Each camera's views' rules (its model's, with its own labels and
    // thresholds) go to the sink with it.
    let mut rules_of = vec![Vec::new(); plans.len()];
    for model in &models {
        for (&camera, views) in model.cameras.iter().zip(&model.views) {
            rules_of[camera] = views.clone();
        }
    }
    // What the status page and the snapshots see of each camera: its recent
    // frames (copied only while a page looks, or for snapshots) and its
    // latest scores.
    let tap_size = if config.snapshots.enabled { config.snapshots.max_size } else { PREVIEW_MAX_SIDE };
    let taps: Vec<Arc<FrameTap>> =
        plans.iter().map(|_| Arc::new(FrameTap::new(config.snapshots.enabled, tap_size, counters.clone()))).collect();
    let mut boards: Vec<Option<Arc<CameraBoard>>> = vec![None; plans.len()];
    for model in &models {
        let info = model.engine.info();
        for &index in &model.cameras {
            let plan = plans[index].as_ref().context("a camera on two models")?;
            let camera = &plan.config;
            let facts = CameraFacts {
                id: camera.id.clone(),
                source: camera.source.describe(),
                model: info.metadata.name.clone(),
                engine: format!("{} ({})", info.engine, info.precision()),
                resize: info.metadata.resize.as_str(),
                regions: camera.regions.iter().map(|r| (r.id.clone(), r.rect)).collect(),
            };
            boards[index] = Some(Arc::new(CameraBoard::new(
                facts,
                plan.health.clone(),
                taps[index].clone(),
                rules_of[index].clone(),
            )));
        }
    }
    let boards: Vec<Arc<CameraBoard>> =
        boards.into_iter().collect::<Option<_>>().context("a camera without a model")?;

    // Room for a burst while a sink catches up; beyond it events are dropped and counted.
    let (events_tx, events_rx) = mpsc::channel::<LabelEvent>(64);
    let first = models.first().context("no model to run")?.engine.info();
    let sink = config.output.build(publish::SinkContext {
        device_id: &config.device_id,
        model: first,
        cameras: plans
            .iter()
            .flatten()
            .zip(rules_of)
            .zip(&taps)
            .map(|((plan, rules), tap)| publish::mqtt::SinkCamera {
                id: plan.config.id.clone(),
                regions: plan.config.regions.iter().map(|r| r.id.clone()).collect(),
                health: plan.health.clone(),
                rules,
                outlines: plan.config.regions.iter().map(|r| r.rect).collect(),
                tap: tap.clone(),
            })
            .collect(),
        counters: counters.clone(),
        health: health.clone(),
        snapshots: &config.snapshots,
    });
    let sink = tokio::spawn(sink.run(events_rx));

    let stop = Arc::new(StopSignal::default());
    if let Some(listen) = config.service.http_listen {
        let exporter = crate::http::Exporter {
            health: health.clone(),
            counters: counters.clone(),
            source: config.cameras.iter().map(|c| c.source.describe()).collect::<Vec<_>>().join(", "),
            engine: first.engine.to_string(),
            selfcheck: first.selfcheck.clone(),
        };
        let board =
            Board { device_id: config.device_id.clone(), cameras: boards.clone(), health: health.clone(), started };
        let server = crate::http::Server { exporter, board, password: config.service.http_password.clone() };
        crate::http::start(listen, server, tasks_stopped.clone()).await;
    }
    let mut frame_slots = Vec::with_capacity(plans.len());
    let mut captures = Vec::with_capacity(plans.len());
    let mut preprocessors = Vec::with_capacity(plans.len());
    let mut all_lanes = Vec::with_capacity(models.len());
    let mut inferences = Vec::with_capacity(models.len());
    // One engine per distinct model, each with its own inference thread
    // serving its cameras in turn.
    for Prepared { engine, rules, cameras, views } in models {
        let scorer = Scorer::new(engine);
        let prepared = Arc::new(Lanes::<PreparedFrame>::new(cameras.len()));
        let mut returns = Vec::with_capacity(cameras.len());
        let mut served = Vec::with_capacity(cameras.len());
        // One camera on this engine: preparing the next frame is timed to end
        // as inference frees up. Several: inference serves them in turn, so
        // each prepares as soon as its last frame was taken.
        let pacing = (cameras.len() == 1).then(|| Arc::new(Pacing::default()));
        for (lane, (&index, views)) in cameras.iter().zip(views).enumerate() {
            let CameraPlan { config: camera, health: camera_health, first_source } =
                plans[index].take().context("a camera on two models")?;
            let frames = Arc::new(FrameSlot::default());
            let events = CameraEvents::new(camera.id.clone(), counters.clone());
            let supervisor =
                Supervisor::new(camera.source.clone(), first_source, events.clone(), camera_health.clone())
                    .with_max_frame_pixels(config.max_frame_pixels)
                    .with_backoff(config.source_backoff.0, config.source_backoff.1);
            captures.push(spawn_capture(
                camera.name(),
                supervisor,
                camera.min_interval,
                frames.clone(),
                stop.clone(),
                events.clone(),
                camera_health.clone(),
            )?);
            let (tensors_back, returned_tensors) = std::sync::mpsc::channel();
            // Regions are cut from the frame at full size: a reduced-scale
            // MJPEG decode would shrink the pixels their rectangles count in.
            let mut preprocessor = preprocessor_for(scorer.info()).with_max_pixels(config.max_frame_pixels);
            if !camera.regions.is_empty() {
                preprocessor = preprocessor.at_full_size();
            }
            preprocessors.push(spawn_preprocess(
                preprocessor,
                &camera,
                taps[index].clone(),
                lane,
                frames.clone(),
                prepared.clone(),
                returned_tensors,
                pacing.clone(),
                events,
                [health.clone(), camera_health.clone()],
            )?);
            frame_slots.push(frames);
            returns.push(tensors_back);
            served.push(ServedCamera {
                id: camera.id.clone(),
                regions: camera.regions.iter().map(|r| r.id.clone()).collect(),
                health: camera_health,
                views,
                board: boards[index].clone(),
            });
        }
        let reporting = labels::Reporting::new(&config.labels, rules.len());
        inferences.push(spawn_inference(
            scorer,
            config.labels.min_hold,
            reporting,
            config.cameras.len() == 1 && config.cameras[0].regions.is_empty(),
            served,
            prepared.clone(),
            returns,
            pacing,
            events_tx.clone(),
            counters.clone(),
            health.clone(),
        )?);
        all_lanes.push(prepared);
    }
    // The sink ends when the inference threads' senders are gone.
    drop(events_tx);

    // The inference thread ends by itself when every finite source has run
    // out; watch it from async code without blocking the runtime.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let inference_watch = std::thread::Builder::new().name("inference-watch".into()).spawn(move || {
        let results: Vec<_> = inferences.into_iter().map(|inference| inference.join()).collect();
        let _ = done_tx.send(());
        // They end once their slots close: at once on shutdown, already when a source ran out.
        for preprocess in preprocessors {
            let _ = preprocess.join();
        }
        results
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
    for lanes in &all_lanes {
        lanes.close_all();
    }
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
    tokio::time::sleep(config.output.linger()).await;
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

fn spawn_capture(
    camera: &str,
    mut supervisor: Supervisor,
    min_interval: Option<Duration>,
    slot: Arc<FrameSlot>,
    stop: Arc<StopSignal>,
    events: Arc<CameraEvents>,
    health: Arc<Health>,
) -> anyhow::Result<JoinHandle<()>> {
    let live = supervisor.is_live();
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
                    events.captured(frame.sequence, frame.origin());
                    // A camera is still read at its own rate (its driver
                    // would otherwise hand over old buffers); the cap
                    // decides which frames go on.
                    if let Some(min) = min_interval {
                        let now = Instant::now();
                        if now < next_accepted {
                            if live {
                                events.gated();
                                continue;
                            }
                            // A file's frames do not go stale: wait for the
                            // cap rather than skip photos.
                            if stop.sleep(next_accepted - now) {
                                break;
                            }
                        }
                        next_accepted = (next_accepted + min).max(Instant::now());
                    }
                    if live {
                        if slot.put_latest(frame) {
                            events.dropped();
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
    tap: Arc<FrameTap>,
    lane: usize,
    frames: Arc<FrameSlot>,
    prepared: Arc<Lanes<PreparedFrame>>,
    returned_tensors: std::sync::mpsc::Receiver<Vec<Tensor>>,
    pacing: Option<Arc<Pacing>>,
    events: Arc<CameraEvents>,
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
                // A page is looking, or snapshots are on: keep a small copy.
                if tap.wants(now) {
                    tap.store(frame.sequence, frame.captured_at, w, h, preprocessor.rgb());
                }
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
                            events.unchanged();
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
                    events.prepared(decode, fit);
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
                    events.undecodable(&err);
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
    /// Per view (the whole frame, then each region): its rules.
    views: Vec<Vec<LabelRule>>,
    /// What the status page shows of it.
    board: Arc<CameraBoard>,
}

/// Runs one model's engine for every camera and region on it, in turn
/// ([`Lanes`]), and tracks each one's label states on its own.
#[allow(clippy::too_many_arguments)]
fn spawn_inference(
    mut scorer: Scorer,
    min_hold: Duration,
    reporting: labels::Reporting,
    single_view: bool,
    cameras: Vec<ServedCamera>,
    prepared: Arc<Lanes<PreparedFrame>>,
    returned_tensors: Vec<std::sync::mpsc::Sender<Vec<Tensor>>>,
    pacing: Option<Arc<Pacing>>,
    sink: mpsc::Sender<LabelEvent>,
    counters: Arc<Counters>,
    health: Arc<Health>,
) -> anyhow::Result<JoinHandle<()>> {
    let events = InferenceEvents { counters, health: health.clone() };
    // `/metrics` reports label states when the config has one camera and no
    // region (with several, the states are per camera and region on MQTT),
    // of the labels that are published.
    // Every view's rules are the model's, in its label order.
    let mut metric_index = vec![None; cameras[0].views[0].len()];
    if single_view {
        let rules = &cameras[0].views[0];
        let published: Vec<usize> = (0..rules.len()).filter(|&i| rules[i].publish).collect();
        for (metric, &i) in published.iter().enumerate() {
            metric_index[i] = Some(metric);
        }
        health.set_labels(published.iter().map(|&i| rules[i].name.clone()));
    }
    let model_name: Arc<str> = Arc::from(scorer.info().metadata.name.as_str());
    let thread = std::thread::Builder::new().name("inference".into()).spawn(move || {
        // One tracker per camera and view (the whole frame, then each region).
        let mut trackers: Vec<Vec<LabelTracker>> = cameras
            .iter()
            .map(|camera| camera.views.iter().map(|rules| LabelTracker::new(rules.clone(), min_hold)).collect())
            .collect();
        // Each view's labels as last classified: they stand for a view its
        // gate found unchanged.
        let mut last: Vec<Vec<Option<Vec<LabelScore>>>> =
            cameras.iter().map(|camera| vec![None; 1 + camera.regions.len()]).collect();
        // Freed memory goes back between two of this thread's frames, not
        // during its inference (`allocator.rs`).
        let mut release = crate::allocator::PeriodicRelease::new();
        loop {
            release.tick(Instant::now());
            let Some((lane, item)) = prepared.take_next() else { break };
            let PreparedFrame { tensors, views: ranges, sequence, captured_at, origin } = item;
            let camera = &cameras[lane];
            let shown_origin = source::describe_origin(origin.as_deref());
            let mut views: Vec<Option<(Vec<LabelScore>, Vec<LabelScore>)>> = Vec::with_capacity(ranges.len());
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
                            // This view is left out of the event; the views
                            // already classified (their trackers moved) are
                            // still published.
                            events.failed(camera.id.as_deref(), shown_origin, &err);
                            failed = true;
                            views.push(None);
                            continue 'views;
                        }
                    };
                    elapsed_total += elapsed;
                    events.classified(elapsed);
                    combined = Some(keep_highest(combined, scores));
                }
                let Some(scores) = combined else {
                    views.push(None);
                    continue;
                };
                let tracker = &mut trackers[lane][view];
                let changed_at = tracker.update(&scores, Instant::now());
                let tracker = &trackers[lane][view];
                let score_of = |i: usize| LabelScore {
                    name: tracker.rules()[i].name.clone(),
                    score: scores[i],
                    on: tracker.is_on(i),
                };
                let labels: Vec<LabelScore> = reporting
                    .select_listed(&scores, |i| tracker.is_on(i), |i| tracker.rules()[i].listed)
                    .into_iter()
                    .map(score_of)
                    .collect();
                let changed: Vec<LabelScore> = changed_at.iter().map(|&i| score_of(i)).collect();
                let region = view.checked_sub(1).map(|j| &*camera.regions[j]);
                for (&i, label) in changed_at.iter().zip(&changed) {
                    let metric = if view == 0 { metric_index[i] } else { None };
                    events.label_changed(camera.id.as_deref(), region, label, shown_origin, metric);
                }
                last[lane][view] = Some(labels.clone());
                views.push(Some((labels, changed)));
            }
            // The preprocess thread fills them again with the frame after next.
            let _ = returned_tensors[lane].send(tensors);
            if failed && views.iter().all(Option::is_none) {
                continue;
            }
            camera.health.mark_classified();
            events.frame_classified();
            if let Some(pacing) = &pacing {
                pacing.record_inference(elapsed_total);
            }
            if health.mark_ready() {
                let ms = elapsed_total.as_secs_f64() * 1e3;
                tracing::info!(inference_ms = ms, "first frame classified: ready");
                Notifier::ready(&format!("ready; first frame classified in {ms:.0} ms"));
            }
            tracing::trace!(
                camera = camera.id.as_deref(),
                sequence,
                inference_ms = elapsed_total.as_secs_f64() * 1e3,
                "frame classified"
            );
            let mut views = views.into_iter();
            // The whole frame not classified this time (it failed, or its
            // gate found it unchanged before it ever was): its labels are
            // left empty, the regions still go out.
            let (labels, changed) = views.next().flatten().unwrap_or_default();
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
            camera.board.record(&event);
            match sink.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => events.event_dropped(),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    })?;
    Ok(thread)
}

#[cfg(test)]
mod tests {
    use super::slot::test_frame as frame;
    use super::*;
    use crate::source::Frame;

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
            Arc::new(FrameTap::new(false, 64, counters.clone())),
            0,
            frames.clone(),
            prepared.clone(),
            returned_tensors,
            Some(Arc::new(Pacing::default())),
            CameraEvents::new(None, counters.clone()),
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
}
