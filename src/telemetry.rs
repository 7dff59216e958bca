//! Logging setup and the daemon's counters.
//!
//! Counters are plain atomics shared by every stage: cheap enough for the
//! hot path, and read by the periodic `stats` message and the shutdown
//! summary. Warnings that can repeat every frame go through [`RateLimit`]
//! so a broken camera or broker does not fill the journal.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Sets up `tracing` with `RUST_LOG`-style filtering (default `info`). The
/// embedded broker's own lines are off unless RUST_LOG asks for them: it
/// reports every client that hangs up as an ERROR.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default_level},rumqttd=off,tract=warn")));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

#[derive(Debug, Default)]
pub struct Counters {
    pub frames_captured: AtomicU64,
    /// Frames replaced in the latest-frame slot before inference took them.
    pub frames_dropped: AtomicU64,
    /// Frames that could not be read, decoded or run.
    pub frames_failed: AtomicU64,
    /// Frames a camera's `fps` cap let pass by unclassified.
    pub frames_gated: AtomicU64,
    /// Views (whole frames or regions) not classified because their motion
    /// gate found them unchanged.
    pub views_unchanged: AtomicU64,
    /// Reads that timed out, and times the source was reopened after going away.
    pub source_timeouts: AtomicU64,
    pub source_reconnects: AtomicU64,
    /// Frames the model classified (each counted once, however many tiles
    /// and regions it was run as): what `fps` counts.
    pub frames_classified: AtomicU64,
    pub inferences: AtomicU64,
    pub labels_published: AtomicU64,
    /// `labels` messages not sent because the broker was away or the queue full.
    pub labels_dropped: AtomicU64,
    pub state_changes: AtomicU64,
    pub mqtt_connect_attempts: AtomicU64,
    pub mqtt_connections: AtomicU64,
    /// Connections the broker accepted, then closed within moments: another
    /// client with the same client id takes the session over.
    pub mqtt_kicked: AtomicU64,
    /// Connections the broker answered with a refusal (CONNACK return code).
    pub mqtt_refused: AtomicU64,
    /// Messages (QoS >= 1) the broker acknowledged.
    pub mqtt_acked: AtomicU64,
    /// Sum of inference time in microseconds, for the mean.
    pub inference_us_total: AtomicU64,
    /// Sums of JPEG decode / pixel conversion and of resize + normalise time.
    pub decode_us_total: AtomicU64,
    pub fit_normalise_us_total: AtomicU64,
    /// Sum of the time to build and queue `labels` messages, and their count.
    pub publish_us_total: AtomicU64,
    /// Snapshot and latest-frame pictures the broker acknowledged.
    pub snapshots_published: AtomicU64,
    /// Snapshots not sent: the encoder busy, the broker away, no frame kept.
    pub snapshots_dropped: AtomicU64,
    /// Preview JPEGs encoded for the status page.
    pub previews_encoded: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The `stats` payload and the shutdown summary.
    pub fn snapshot(&self, uptime: Duration) -> Value {
        let inferences = Self::get(&self.inferences);
        let frames = Self::get(&self.frames_classified);
        let mean_ms =
            if inferences > 0 { Self::get(&self.inference_us_total) as f64 / inferences as f64 / 1000.0 } else { 0.0 };
        let per_inference = |total: &AtomicU64| {
            if inferences > 0 { (Self::get(total) as f64 / inferences as f64 / 10.0).round() / 100.0 } else { 0.0 }
        };
        let published = Self::get(&self.labels_published);
        let publish_ms_mean = if published > 0 {
            (Self::get(&self.publish_us_total) as f64 / published as f64 / 10.0).round() / 100.0
        } else {
            0.0
        };
        let mut stats = json!({
            "uptime_s": uptime.as_secs(),
            "decode_ms_mean": per_inference(&self.decode_us_total),
            "preprocess_ms_mean": per_inference(&self.fit_normalise_us_total),
            "publish_ms_mean": publish_ms_mean,
            "inference_ms_mean": (mean_ms * 100.0).round() / 100.0,
            "fps": if uptime.as_secs_f64() > 0.0 { ((frames as f64 / uptime.as_secs_f64()) * 100.0).round() / 100.0 } else { 0.0 },
        });
        for counter in COUNTERS {
            stats[counter.stats] = json!((counter.get)(self));
        }
        stats
    }
}

/// One counter as it is shown: its key in the `stats` JSON, its name on
/// `/metrics` (Prometheus adds `_total`), its help text, and whether it is
/// about the source (and carries the `source` label there). `stats` and the
/// Prometheus collector both read [`COUNTERS`], so a counter added there
/// shows in both.
pub struct CounterSpec {
    pub stats: &'static str,
    pub metric: &'static str,
    pub help: &'static str,
    pub per_source: bool,
    pub get: fn(&Counters) -> u64,
}

macro_rules! counter {
    ($field:ident, $metric:literal, $per_source:literal, $help:literal) => {
        CounterSpec {
            stats: stringify!($field),
            metric: $metric,
            help: $help,
            per_source: $per_source,
            get: |c| Counters::get(&c.$field),
        }
    };
}

/// Every counter, in the order `stats` and `/metrics` list them.
pub static COUNTERS: &[CounterSpec] = &[
    counter!(frames_captured, "frames_captured", true, "Frames read from the source"),
    counter!(
        frames_dropped,
        "frames_dropped",
        true,
        "Frames replaced before inference took them (inference slower than the source)"
    ),
    counter!(frames_failed, "frames_failed", true, "Frames that could not be read, decoded or run"),
    counter!(frames_gated, "frames_gated", true, "Live frames a camera's fps cap dropped"),
    counter!(
        views_unchanged,
        "views_unchanged",
        true,
        "Views (whole frames or regions) the motion gate found unchanged and did not classify"
    ),
    counter!(source_timeouts, "source_timeouts", true, "Source reads that timed out"),
    counter!(source_reconnects, "source_reconnects", true, "Times the source was reopened after going away"),
    counter!(
        frames_classified,
        "frames_classified",
        false,
        "Frames classified, each once however many tiles and regions it was run as"
    ),
    counter!(inferences, "inferences", false, "Windows classified (a frame fitted as two tiles counts two)"),
    counter!(labels_published, "labels_published", false, "labels messages published"),
    counter!(labels_dropped, "labels_dropped", false, "labels messages dropped (broker away or queue full)"),
    counter!(state_changes, "label_changes", false, "Label state changes"),
    counter!(mqtt_connect_attempts, "mqtt_connect_attempts", false, "MQTT connection attempts"),
    counter!(mqtt_connections, "mqtt_connections", false, "MQTT connections the broker accepted"),
    counter!(
        mqtt_kicked,
        "mqtt_kicked",
        false,
        "Connections the broker closed moments after accepting them (another client with the same client id?)"
    ),
    counter!(mqtt_refused, "mqtt_refused", false, "Connections the broker refused (CONNACK return code)"),
    counter!(mqtt_acked, "mqtt_acked", false, "Messages (QoS >= 1) the broker acknowledged"),
    counter!(snapshots_published, "snapshots_published", false, "Snapshot pictures the broker acknowledged"),
    counter!(
        snapshots_dropped,
        "snapshots_dropped",
        false,
        "Snapshots not sent (encoder busy, broker away, or no frame kept)"
    ),
    counter!(previews_encoded, "previews_encoded", false, "Preview JPEGs encoded for the status page"),
];

/// Lets a repeating warning through at most once per interval, and says how
/// many were held back since the last one.
pub struct RateLimit {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    pub const fn new(interval: Duration) -> Self {
        Self { interval, state: Mutex::new((None, 0)) }
    }

    /// Starts a new interval at `now`, as if a line had just been let through.
    pub fn reset(&self, now: Instant) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (Some(now), 0);
    }

    /// `Some(suppressed)` when the caller should log now.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed) = &mut *state;
        if last.is_none_or(|at| now.saturating_duration_since(at) >= self.interval) {
            *last = Some(now);
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

/// This process's peak resident set size in KiB (`VmHWM`), where Linux reports it.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| line.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fps_counts_frames_classified_not_the_windows_they_were_run_as() {
        let counters = Counters::default();
        Counters::add(&counters.frames_classified, 10);
        Counters::add(&counters.inferences, 20);
        let stats = counters.snapshot(Duration::from_secs(5));
        assert_eq!(stats["fps"], 2.0, "{stats}");
        assert_eq!((stats["frames_classified"].as_u64(), stats["inferences"].as_u64()), (Some(10), Some(20)));
    }

    #[test]
    fn a_rate_limit_lets_one_through_per_interval_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.check(t0), Some(0));
        assert_eq!(limit.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(2)), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(11)), Some(2));
    }
}
