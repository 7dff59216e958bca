//! Capped exponential backoff with jitter, for everything that reconnects:
//! MQTT brokers and frame sources.

use std::time::Duration;

/// Capped exponential backoff with "equal jitter": each wait is between half
/// and all of the current step, so many devices restarting together spread out.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, step: min }
    }

    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.step = self.min;
    }
}
