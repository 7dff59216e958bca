//! One place per internal event of the frame path: what labelcast logs,
//! counts and marks on its health when a frame is captured, dropped,
//! skipped or classified, a source times out or comes back, or a label
//! changes, written once so the log line, the counter (`stats` and
//! `/metrics` read [`crate::telemetry::COUNTERS`]) and the health mark
//! cannot drift apart (as vector's `internal_events`). The pipeline and the
//! source supervisor call these instead of touching counters and logs
//! themselves.
//!
//! Warnings that can repeat per frame are rate-limited per camera: one
//! camera dropping frames does not hide another's corrupt frames.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::labels::LabelScore;
use crate::service::Health;
use crate::telemetry::{Counters, RateLimit};

/// The events of one camera's capture and preprocessing.
pub struct CameraEvents {
    camera: Option<Arc<str>>,
    counters: Arc<Counters>,
    dropped: RateLimit,
    undecodable: RateLimit,
    skipped: RateLimit,
    lost: RateLimit,
    back: RateLimit,
    away: RateLimit,
}

impl CameraEvents {
    /// `camera`: its id in log lines (`None` for the only camera).
    pub fn new(camera: Option<Arc<str>>, counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Self {
            camera,
            counters,
            dropped: RateLimit::new(Duration::from_secs(30)),
            undecodable: RateLimit::new(Duration::from_secs(10)),
            skipped: RateLimit::new(Duration::from_secs(10)),
            lost: RateLimit::new(Duration::from_secs(10)),
            back: RateLimit::new(Duration::from_secs(10)),
            away: RateLimit::new(Duration::from_secs(30)),
        })
    }

    pub fn camera(&self) -> Option<&str> {
        self.camera.as_deref()
    }

    pub fn captured(&self, sequence: u64, origin: &str) {
        Counters::inc(&self.counters.frames_captured);
        tracing::trace!(camera = self.camera(), sequence, origin, "frame captured");
    }

    /// A live frame the camera's `fps` cap let go.
    pub fn gated(&self) {
        Counters::inc(&self.counters.frames_gated);
    }

    /// A live frame replaced in its slot before preprocessing took it.
    pub fn dropped(&self) {
        Counters::inc(&self.counters.frames_dropped);
        if let Some(suppressed) = self.dropped.check(Instant::now()) {
            tracing::warn!(
                camera = self.camera(),
                suppressed,
                dropped_total = Counters::get(&self.counters.frames_dropped),
                "inference is slower than the source: dropping stale frames"
            );
        }
    }

    /// A view its motion gate found unchanged.
    pub fn unchanged(&self) {
        Counters::inc(&self.counters.views_unchanged);
    }

    /// A frame preprocessing could not use (a corrupt JPEG, a wrong size).
    pub fn undecodable(&self, error: &anyhow::Error) {
        Counters::inc(&self.counters.frames_failed);
        if let Some(suppressed) = self.undecodable.check(Instant::now()) {
            tracing::warn!(camera = self.camera(), error = %format!("{error:#}"), suppressed, "frame skipped");
        }
    }

    /// A frame the source itself could not deliver (an unreadable file).
    pub fn skipped(&self, origin: &str, reason: &str) {
        Counters::inc(&self.counters.frames_failed);
        if let Some(suppressed) = self.skipped.check(Instant::now()) {
            tracing::warn!(camera = self.camera(), origin, reason, suppressed, "frame skipped");
        }
    }

    pub fn timed_out(&self) {
        Counters::inc(&self.counters.source_timeouts);
    }

    /// The source went away; `retry_ms` 0 when it is reopened at once.
    pub fn lost(&self, source: &str, reason: &str, retry_ms: u64) {
        if let Some(suppressed) = self.lost.check(Instant::now()) {
            tracing::warn!(camera = self.camera(), source, reason, retry_ms, suppressed, "source lost; reopening");
        }
    }

    /// A source that went away could not be opened yet.
    pub fn still_away(&self, source: &str, error: &str, retry_ms: u64) {
        if let Some(suppressed) = self.away.check(Instant::now()) {
            tracing::warn!(camera = self.camera(), source, error, retry_ms, suppressed, "source still away");
        }
    }

    /// A source opened again after going away.
    pub fn back(&self, source: &str) {
        Counters::inc(&self.counters.source_reconnects);
        if let Some(suppressed) = self.back.check(Instant::now()) {
            tracing::info!(camera = self.camera(), source, suppressed, "source back");
        }
    }

    /// Decode and fit/normalise times of a prepared frame.
    pub fn prepared(&self, decode: Duration, fit: Duration) {
        Counters::add(&self.counters.decode_us_total, decode.as_micros() as u64);
        Counters::add(&self.counters.fit_normalise_us_total, fit.as_micros() as u64);
    }
}

/// The events of an inference thread.
pub struct InferenceEvents {
    pub counters: Arc<Counters>,
    pub health: Arc<Health>,
}

impl InferenceEvents {
    /// One window classified in `elapsed`.
    pub fn classified(&self, elapsed: Duration) {
        Counters::inc(&self.counters.inferences);
        Counters::add(&self.counters.inference_us_total, elapsed.as_micros() as u64);
        self.health.inference_seconds.observe(elapsed.as_secs_f64());
    }

    /// One frame classified (at least one of its views), however many
    /// windows that took.
    pub fn frame_classified(&self) {
        Counters::inc(&self.counters.frames_classified);
    }

    pub fn failed(&self, camera: Option<&str>, origin: &str, error: &anyhow::Error) {
        Counters::inc(&self.counters.frames_failed);
        tracing::error!(camera, error = %format!("{error:#}"), origin, "inference failed");
    }

    /// A label of a camera (and region) turned ON or OFF; `metric` is its
    /// place among the `/metrics` label states, if it has one.
    pub fn label_changed(
        &self,
        camera: Option<&str>,
        region: Option<&str>,
        label: &LabelScore,
        origin: &str,
        metric: Option<usize>,
    ) {
        Counters::inc(&self.counters.state_changes);
        if let Some(metric) = metric {
            self.health.set_label(metric, label.on);
        }
        let state = if label.on { "ON" } else { "OFF" };
        tracing::info!(camera, region, label = %label.name, state, score = label.score, origin, "label changed");
    }

    /// A label event the sink had no room for.
    pub fn event_dropped(&self) {
        Counters::inc(&self.counters.labels_dropped);
    }
}
