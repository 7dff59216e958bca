//! Running as a service: the health of the pipeline, systemd's notify
//! protocol (READY, STATUS, WATCHDOG, STOPPING) and what `/healthz` reports.
//!
//! The capture and inference threads mark when they enter and leave the
//! calls that can hang (a camera read, an inference). A watchdog thread
//! checks those marks: while neither has been stuck longer than
//! `service.stall_timeout` it sends `WATCHDOG=1` (when systemd asked for a
//! watchdog); once one is stuck it stops, logs why, and systemd restarts the
//! daemon after `WatchdogSec`. Waiting for frames is not a hang: a camera
//! that is away is the capture supervisor's job, and restarting would not
//! bring it back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::telemetry::Counters;

/// Marks shared by the pipeline threads, the watchdog and `/healthz`.
/// Times are milliseconds since `started` plus one (0 means "not set").
#[derive(Debug)]
pub struct Health {
    started: Instant,
    stall_timeout: Duration,
    capture_busy_since: AtomicU64,
    inference_busy_since: AtomicU64,
    last_frame_at: AtomicU64,
    ready: AtomicBool,
    /// MQTT: 1 connected, 0 not (or no MQTT output: see `mqtt_used`).
    mqtt_connected: AtomicBool,
    mqtt_used: AtomicBool,
    mqtt_down_since: AtomicU64,
    /// Whether a connection was ever accepted, and why the last attempt failed.
    mqtt_ever_connected: AtomicBool,
    mqtt_last_error: std::sync::Mutex<Option<String>>,
    /// When the oldest message still waiting for its acknowledgement (QoS
    /// >= 1) was written, and how many wait.
    mqtt_oldest_unacked: AtomicU64,
    mqtt_unacked: AtomicU64,
    /// Streaming / reconnecting / ended; the MQTT sink publishes changes.
    source_state: tokio::sync::watch::Sender<SourceState>,
    /// Inference latency in seconds, for `/metrics`.
    pub inference_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Current label states, for `/metrics`.
    labels: std::sync::OnceLock<Vec<(Arc<str>, AtomicBool)>>,
    /// With several cameras, each camera's own marks (source state, capture
    /// calls, last frame classified); this one then watches inference and
    /// MQTT, and its hang check covers every camera's capture.
    cameras: std::sync::OnceLock<Vec<Arc<Health>>>,
}

/// Whether frames are coming, as published on `<prefix>/source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    Streaming,
    Reconnecting,
    /// A finite source ran out, or the source failed for good.
    Ended,
    /// Open, but no frame was classified for `service.stall_timeout`.
    Stalled,
    /// A camera read has not returned for `service.stall_timeout` (the
    /// watchdog's verdict too).
    Hung,
}

impl SourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Streaming => "streaming",
            Self::Reconnecting => "reconnecting",
            Self::Ended => "ended",
            Self::Stalled => "stalled",
            Self::Hung => "hung",
        }
    }
}

/// Acknowledgements older than this make `/healthz` unhealthy: a broker
/// that accepts the TCP stream but stopped answering (frozen, SIGSTOPped,
/// overloaded) is otherwise only noticed after two keep-alive periods.
pub const MQTT_ACK_OVERDUE: Duration = Duration::from_secs(10);

/// What `/healthz` answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Healthy(String),
    Unhealthy(String),
}

impl Health {
    pub fn new(stall_timeout: Duration) -> Self {
        Self {
            started: Instant::now(),
            stall_timeout,
            capture_busy_since: AtomicU64::new(0),
            inference_busy_since: AtomicU64::new(0),
            last_frame_at: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            mqtt_connected: AtomicBool::new(false),
            mqtt_used: AtomicBool::new(false),
            mqtt_down_since: AtomicU64::new(1),
            mqtt_ever_connected: AtomicBool::new(false),
            mqtt_last_error: std::sync::Mutex::new(None),
            mqtt_oldest_unacked: AtomicU64::new(0),
            mqtt_unacked: AtomicU64::new(0),
            source_state: tokio::sync::watch::Sender::new(SourceState::Streaming),
            inference_seconds: prometheus_client::metrics::histogram::Histogram::new([
                0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
            ]),
            labels: std::sync::OnceLock::new(),
            cameras: std::sync::OnceLock::new(),
        }
    }

    /// Each camera's own marks, when there are several; once.
    pub fn set_cameras(&self, cameras: Vec<Arc<Health>>) {
        let _ = self.cameras.set(cameras);
    }
    /// A frame from this camera was classified (its stall check).
    pub fn mark_classified(&self) {
        self.last_frame_at.store(self.stamp(Instant::now()), Ordering::Relaxed);
    }
    /// The labels whose states `/metrics` reports, all OFF; once.
    pub fn set_labels(&self, names: impl IntoIterator<Item = Arc<str>>) {
        let _ = self.labels.set(names.into_iter().map(|n| (n, AtomicBool::new(false))).collect());
    }
    pub fn set_label(&self, index: usize, on: bool) {
        if let Some((_, state)) = self.labels.get().and_then(|l| l.get(index)) {
            state.store(on, Ordering::Relaxed);
        }
    }
    pub fn label_states(&self) -> Vec<(Arc<str>, bool)> {
        self.labels
            .get()
            .map_or_else(Vec::new, |l| l.iter().map(|(n, s)| (n.clone(), s.load(Ordering::Relaxed))).collect())
    }
    pub fn mqtt_state(&self) -> Option<bool> {
        self.mqtt_used.load(Ordering::Relaxed).then(|| self.mqtt_connected.load(Ordering::Relaxed))
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64 + 1
    }

    fn age(&self, stamp: u64, now: Instant) -> Option<Duration> {
        (stamp != 0).then(|| Duration::from_millis(self.stamp(now).saturating_sub(stamp)))
    }

    pub fn capture_started(&self) {
        self.capture_busy_since.store(self.stamp(Instant::now()), Ordering::Relaxed);
    }
    pub fn capture_finished(&self) {
        self.capture_busy_since.store(0, Ordering::Relaxed);
    }
    pub fn inference_started(&self) {
        self.inference_busy_since.store(self.stamp(Instant::now()), Ordering::Relaxed);
    }
    /// An inference returned; `classified` when it produced scores.
    pub fn inference_finished(&self, classified: bool) {
        self.inference_busy_since.store(0, Ordering::Relaxed);
        if classified {
            self.last_frame_at.store(self.stamp(Instant::now()), Ordering::Relaxed);
        }
    }
    pub fn set_source_state(&self, state: SourceState) {
        self.source_state.send_if_modified(|current| std::mem::replace(current, state) != state);
    }
    pub fn source_state(&self) -> SourceState {
        *self.source_state.borrow()
    }
    /// Wakes on every change of the source state.
    pub fn watch_source_state(&self) -> tokio::sync::watch::Receiver<SourceState> {
        self.source_state.subscribe()
    }
    /// True exactly once: on the first call, when the daemon becomes ready.
    pub fn mark_ready(&self) -> bool {
        !self.ready.swap(true, Ordering::Relaxed)
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    /// The MQTT sink started: from now on `/healthz` and `/metrics` report
    /// the broker, also before (or without) a first connection.
    pub fn mqtt_started(&self) {
        self.mqtt_down_since.store(self.stamp(Instant::now()), Ordering::Relaxed);
        self.mqtt_used.store(true, Ordering::Relaxed);
    }
    pub fn set_mqtt(&self, connected: bool) {
        self.mqtt_used.store(true, Ordering::Relaxed);
        if connected {
            self.mqtt_ever_connected.store(true, Ordering::Relaxed);
        }
        let was = self.mqtt_connected.swap(connected, Ordering::Relaxed);
        if was && !connected {
            self.mqtt_down_since.store(self.stamp(Instant::now()), Ordering::Relaxed);
        }
    }
    /// Why the last connection attempt failed, for `/healthz`.
    pub fn set_mqtt_error(&self, error: String) {
        *self.mqtt_last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }
    /// Messages waiting for their acknowledgement: how many, and since when
    /// the oldest waits (`None`: none waits).
    pub fn set_mqtt_unacked(&self, count: usize, oldest: Option<Instant>) {
        self.mqtt_unacked.store(count as u64, Ordering::Relaxed);
        self.mqtt_oldest_unacked.store(oldest.map_or(0, |at| self.stamp(at)), Ordering::Relaxed);
    }
    pub fn mqtt_unacked(&self) -> u64 {
        self.mqtt_unacked.load(Ordering::Relaxed)
    }

    /// What `<prefix>/source` says: the capture supervisor's state, unless
    /// the camera read hangs (`hung`) or no frame was classified for the
    /// stall timeout while the source is open (`stalled`).
    pub fn source_report(&self, now: Instant) -> SourceState {
        let state = self.source_state();
        let capture_age = self.age(self.capture_busy_since.load(Ordering::Relaxed), now);
        if state != SourceState::Ended && capture_age.is_some_and(|age| age > self.stall_timeout) {
            return SourceState::Hung;
        }
        let last_frame = self.age(self.last_frame_at.load(Ordering::Relaxed), now);
        if state == SourceState::Streaming && self.is_ready() && last_frame.is_some_and(|age| age > self.stall_timeout)
        {
            return SourceState::Stalled;
        }
        state
    }

    /// Which pipeline call has been stuck too long, if any: the watchdog's question.
    pub fn hang(&self, now: Instant) -> Option<String> {
        let limit = self.stall_timeout;
        let stuck = |what: &str, since: &AtomicU64| {
            let age = self.age(since.load(Ordering::Relaxed), now)?;
            (age > limit).then(|| format!("{what} has not returned for {:.0} s", age.as_secs_f64()))
        };
        stuck("the frame source (camera read)", &self.capture_busy_since)
            .or_else(|| stuck("inference", &self.inference_busy_since))
            .or_else(|| self.cameras.get()?.iter().find_map(|camera| camera.hang(now)))
    }

    /// `/healthz`: healthy while frames flow and the broker is connected or
    /// has been away for less than the stall timeout.
    pub fn verdict(&self, now: Instant) -> Verdict {
        if let Some(hang) = self.hang(now) {
            return Verdict::Unhealthy(format!("hung: {hang}"));
        }
        if !self.is_ready() {
            return Verdict::Unhealthy("starting: no frame classified yet".into());
        }
        let last_frame = self.age(self.last_frame_at.load(Ordering::Relaxed), now).unwrap_or_default();
        if last_frame > self.stall_timeout && self.source_state() != SourceState::Ended {
            let why = if self.source_state() == SourceState::Reconnecting {
                "; the source is away, reconnecting"
            } else {
                ""
            };
            return Verdict::Unhealthy(format!("no frame classified for {:.0} s{why}", last_frame.as_secs_f64()));
        }
        if self.mqtt_used.load(Ordering::Relaxed) && !self.mqtt_connected.load(Ordering::Relaxed) {
            let down = self.age(self.mqtt_down_since.load(Ordering::Relaxed), now).unwrap_or_default();
            let why = self
                .mqtt_last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"));
            if down > self.stall_timeout {
                return Verdict::Unhealthy(if self.mqtt_ever_connected.load(Ordering::Relaxed) {
                    format!("MQTT broker unreachable for {:.0} s{why}", down.as_secs_f64())
                } else {
                    format!("MQTT broker never reached in {:.0} s{why}", down.as_secs_f64())
                });
            }
            return Verdict::Healthy(format!("ok; MQTT connecting for {:.0} s{why}", down.as_secs_f64()));
        }
        if self.mqtt_used.load(Ordering::Relaxed)
            && let Some(waiting) = self.age(self.mqtt_oldest_unacked.load(Ordering::Relaxed), now)
            && waiting > MQTT_ACK_OVERDUE
        {
            return Verdict::Unhealthy(format!(
                "MQTT acknowledgements overdue: the oldest of {} messages was sent {:.0} s ago and the broker has not \
                 acknowledged it (frozen or overloaded?)",
                self.mqtt_unacked(),
                waiting.as_secs_f64()
            ));
        }
        Verdict::Healthy("ok".into())
    }
}

/// systemd's notify protocol; every call is a no-op without `NOTIFY_SOCKET`.
pub struct Notifier;

impl Notifier {
    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }
    pub fn status(status: &str) {
        send(&[NotifyState::Status(status)]);
    }
    pub fn stopping() {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
    fn watchdog() {
        send(&[NotifyState::Watchdog]);
    }
}

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::debug!(error = %err, "systemd notification not sent");
    }
}

/// The one-line STATUS= systemd shows in `systemctl status`.
pub fn status_line(counters: &Counters, since: Instant, frames_before: u64, mqtt: Option<bool>) -> String {
    let frames = Counters::get(&counters.frames_classified);
    let inferences = Counters::get(&counters.inferences);
    let fps = (frames - frames_before) as f64 / since.elapsed().as_secs_f64().max(1e-3);
    let mean_ms = if inferences > 0 {
        Counters::get(&counters.inference_us_total) as f64 / inferences as f64 / 1000.0
    } else {
        0.0
    };
    let mqtt = match mqtt {
        Some(true) => ", MQTT connected",
        Some(false) => ", MQTT reconnecting",
        None => "",
    };
    format!("{fps:.1} fps, inference {mean_ms:.0} ms mean, {frames} frames classified{mqtt}")
}

/// Starts the watchdog thread when systemd asked for one (`WATCHDOG_USEC`),
/// and refreshes STATUS= every few seconds either way. It runs until the
/// process exits.
/// `stop` ends the thread within one tick (at most 5 s), so a second
/// `pipeline::run` in the same process does not find the first's watchdog.
pub fn spawn_watchdog(health: Arc<Health>, counters: Arc<Counters>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let watchdog = sd_notify::watchdog_enabled();
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    // Ping at half the period systemd waits, as sd_watchdog_enabled(3) advises.
    let tick = watchdog.map_or(Duration::from_secs(5), |period| (period / 2).max(Duration::from_millis(50)));
    if let Some(period) = watchdog {
        tracing::info!(period_ms = period.as_millis() as u64, "systemd watchdog enabled");
    }
    std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        let mut reported_hang = false;
        let mut window = (Instant::now(), 0u64);
        let mut last_status = Instant::now();
        loop {
            std::thread::sleep(tick);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let now = Instant::now();
            match health.hang(now) {
                None => {
                    if watchdog.is_some() {
                        Notifier::watchdog();
                    }
                    reported_hang = false;
                }
                Some(reason) => {
                    if !reported_hang {
                        tracing::error!(reason = %reason, "pipeline hung: no longer answering the systemd watchdog, so systemd restarts labelcast");
                        Notifier::status(&format!("hung: {reason}"));
                        reported_hang = true;
                    }
                }
            }
            if !reported_hang && health.is_ready() && last_status.elapsed() >= Duration::from_secs(5) {
                let mqtt = health.mqtt_state();
                Notifier::status(&status_line(&counters, window.0, window.1, mqtt));
                window = (now, Counters::get(&counters.frames_classified));
                last_status = now;
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_stuck_longer_than_the_stall_timeout_is_a_hang_and_waiting_is_not() {
        let health = Health::new(Duration::from_millis(100));
        let now = Instant::now();
        assert_eq!(health.hang(now), None, "nothing busy");
        health.capture_started();
        assert_eq!(health.hang(Instant::now()), None, "busy, but not for long");
        let later = Instant::now() + Duration::from_millis(300);
        assert!(health.hang(later).unwrap().contains("frame source"));
        health.capture_finished();
        assert_eq!(health.hang(later), None);
        health.inference_started();
        assert!(health.hang(later).unwrap().contains("inference"));
    }

    #[test]
    fn healthz_wants_a_classified_frame_recent_frames_and_a_broker_not_away_too_long() {
        let health = Health::new(Duration::from_millis(200));
        assert!(matches!(health.verdict(Instant::now()), Verdict::Unhealthy(r) if r.contains("starting")));
        health.inference_started();
        health.inference_finished(true);
        health.mark_ready();
        health.set_mqtt(true);
        assert_eq!(health.verdict(Instant::now()), Verdict::Healthy("ok".into()));
        health.set_mqtt(false);
        assert!(matches!(health.verdict(Instant::now()), Verdict::Healthy(r) if r.contains("connecting")));
        let later = Instant::now() + Duration::from_millis(500);
        assert!(matches!(health.verdict(later), Verdict::Unhealthy(r) if r.contains("no frame")));
        health.set_source_state(SourceState::Ended);
        assert!(matches!(health.verdict(later), Verdict::Unhealthy(r) if r.contains("MQTT")));
    }

    #[test]
    fn a_broker_never_reached_turns_healthz_unhealthy_after_the_stall_timeout_with_the_reason() {
        let health = Health::new(Duration::from_millis(100));
        health.inference_started();
        health.inference_finished(true);
        health.mark_ready();
        health.mqtt_started();
        health.set_mqtt_error("connection refused".into());
        assert!(matches!(health.verdict(Instant::now()), Verdict::Healthy(r) if r.contains("connecting")));
        // A finite source that ended: only the broker is left to judge.
        health.set_source_state(SourceState::Ended);
        let later = Instant::now() + Duration::from_millis(300);
        let Verdict::Unhealthy(reason) = health.verdict(later) else { panic!("expected unhealthy") };
        assert!(reason.contains("never reached") && reason.contains("connection refused"), "{reason}");
    }

    #[test]
    fn overdue_acknowledgements_turn_healthz_unhealthy() {
        let health = Health::new(Duration::from_secs(60));
        health.inference_started();
        health.inference_finished(true);
        health.mark_ready();
        health.set_mqtt(true);
        let sent = Instant::now();
        health.set_mqtt_unacked(3, Some(sent));
        assert_eq!(health.verdict(sent + Duration::from_secs(2)), Verdict::Healthy("ok".into()));
        let Verdict::Unhealthy(reason) = health.verdict(sent + Duration::from_secs(12)) else { panic!() };
        assert!(reason.contains("acknowledgements overdue") && reason.contains("3 messages"), "{reason}");
        health.set_mqtt_unacked(0, None);
        assert_eq!(health.verdict(sent + Duration::from_secs(12)), Verdict::Healthy("ok".into()));
    }

    #[test]
    fn a_camera_read_that_hangs_is_reported_as_hung_and_frames_that_stop_as_stalled() {
        let health = Health::new(Duration::from_millis(100));
        assert_eq!(health.source_report(Instant::now()), SourceState::Streaming);
        health.capture_started();
        assert_eq!(health.source_report(Instant::now() + Duration::from_millis(300)), SourceState::Hung);
        health.capture_finished();
        health.inference_started();
        health.inference_finished(true);
        health.mark_ready();
        assert_eq!(health.source_report(Instant::now()), SourceState::Streaming);
        assert_eq!(health.source_report(Instant::now() + Duration::from_millis(300)), SourceState::Stalled);
        health.set_source_state(SourceState::Reconnecting);
        assert_eq!(health.source_report(Instant::now() + Duration::from_millis(300)), SourceState::Reconnecting);
    }

    #[test]
    fn ready_is_reported_once() {
        let health = Health::new(Duration::from_secs(1));
        assert!(health.mark_ready());
        assert!(!health.mark_ready());
    }
}
