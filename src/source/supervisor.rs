//! Keeping a source open: the supervisor reopens a camera that went away,
//! with backoff, and reports whether it is streaming. The capture thread
//! runs one per camera; this is the part that knows about sources.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Frame, FrameSource, SourceError, SourceSpec};
use crate::backoff::Backoff;
use crate::events::CameraEvents;
use crate::service::{Health, SourceState};

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
    spec: SourceSpec,
    source: Option<Box<dyn FrameSource>>,
    backoff: Backoff,
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
    /// Its counters and log lines (which name the camera).
    events: Arc<CameraEvents>,
    health: Arc<Health>,
}

/// See [`Supervisor`]'s `stable_after`.
const STABLE_STREAM: Duration = Duration::from_secs(10);

/// What one step of the supervisor produced.
pub(crate) enum Step {
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
        spec: SourceSpec,
        first: Option<Box<dyn FrameSource>>,
        events: Arc<CameraEvents>,
        health: Arc<Health>,
    ) -> Self {
        let state = if first.is_some() { SourceState::Streaming } else { SourceState::Reconnecting };
        health.set_source_state(state);
        Self {
            spec,
            opened_before: first.is_some(),
            source: first,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(10)),
            timeouts: 0,
            delivered: false,
            opened_at: Instant::now(),
            stable_after: STABLE_STREAM,
            max_frame_pixels: crate::preprocess::DEFAULT_MAX_FRAME_PIXELS,
            events,
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
        self.backoff = Backoff::new(min, max);
        self
    }

    pub(crate) fn frame_interval(&self) -> Option<Duration> {
        self.source.as_ref().and_then(|s| s.frame_interval())
    }

    pub(crate) fn is_live(&self) -> bool {
        self.spec.is_live()
    }

    pub(crate) fn step(&mut self) -> Step {
        let Some(source) = self.source.as_mut() else { return self.reopen() };
        match source.next_frame() {
            Ok(Some(frame)) => {
                self.timeouts = 0;
                self.delivered = true;
                Step::Frame(frame)
            }
            Ok(None) if self.spec.is_live() => self.lost("the live stream ended".into()),
            Ok(None) => {
                tracing::info!(camera = self.events.camera(), source = %source.describe(), "source reached its end");
                self.health.set_source_state(SourceState::Ended);
                Step::Ended
            }
            Err(SourceError::Skipped { origin, reason }) => {
                self.events.skipped(&origin, &reason);
                Step::Nothing
            }
            Err(SourceError::Timeout) => {
                self.timeouts += 1;
                self.events.timed_out();
                if self.timeouts >= TIMEOUT_STREAK {
                    self.lost(format!("{} reads in a row timed out", self.timeouts))
                } else {
                    Step::Nothing
                }
            }
            Err(SourceError::Disconnected(reason)) => self.lost(reason),
            Err(SourceError::Fatal(message)) => {
                tracing::error!(camera = self.events.camera(), source = %source.describe(), error = message, "source failed; no more frames");
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
        let retry_ms = match step {
            Step::Retry(delay) => delay.as_millis() as u64,
            _ => 0,
        };
        self.events.lost(&described, &reason, retry_ms);
        self.health.set_source_state(SourceState::Reconnecting);
        step
    }

    fn reopen(&mut self) -> Step {
        match super::open_limited(&self.spec, self.max_frame_pixels) {
            Ok(source) => {
                if self.opened_before {
                    self.events.back(&source.describe());
                } else {
                    tracing::info!(camera = self.events.camera(), source = %source.describe(), "source opened");
                }
                self.opened_before = true;
                self.source = Some(source);
                self.delivered = false;
                self.opened_at = Instant::now();
                self.health.set_source_state(SourceState::Streaming);
                Step::Nothing
            }
            Err(SourceError::Fatal(message)) if !self.opened_before => {
                tracing::error!(camera = self.events.camera(), source = %self.spec.describe(), error = message, "cannot open the source");
                self.health.set_source_state(SourceState::Ended);
                Step::Ended
            }
            Err(err) => {
                let delay = self.backoff.next_delay();
                self.events.still_away(&self.spec.describe(), &err.to_string(), delay.as_millis() as u64);
                Step::Retry(delay)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Counters;

    fn supervisor_counting(uri: &str) -> (Supervisor, Arc<Counters>) {
        let spec = SourceSpec::parse(uri).unwrap();
        let counters = Arc::new(Counters::default());
        let health = Arc::new(Health::new(Duration::from_secs(30)));
        (Supervisor::new(spec, None, CameraEvents::new(None, counters.clone()), health), counters)
    }

    fn supervisor(uri: &str) -> Supervisor {
        supervisor_counting(uri).0
    }

    #[test]
    fn a_source_that_fails_before_its_first_frame_is_reopened_with_growing_delays() {
        // Opens fine, then is "unplugged" before delivering anything, every time.
        let (mut supervisor, counters) =
            supervisor_counting("test://pattern?width=32&height=32&fps=0&disconnect_after=0");
        let mut delays = Vec::new();
        for _ in 0..8 {
            if let Step::Retry(delay) = supervisor.step() {
                delays.push(delay);
            }
        }
        assert_eq!(delays.len(), 4, "every second step is a loss: {delays:?}");
        assert!(delays[0] <= Duration::from_millis(250) && delays[3] >= Duration::from_secs(1), "{delays:?}");
        assert_eq!(Counters::get(&counters.source_reconnects), 3);
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
}
