//! The motion and interval gate: whether a camera's frame, or one of its
//! regions, is worth classifying at all.
//!
//! A camera watching a driveway sees the same picture for hours; running
//! the model on every frame spends a Raspberry Pi's CPU on answers already
//! known. The gate compares a small grey copy of the view (a 32x32 grid of
//! mean luma, [`Preprocessor::thumbnail`](crate::preprocess::Preprocessor::thumbnail))
//! with the copy taken when the view was last classified, and lets the
//! frame through when enough cells changed, or when `interval` has passed
//! (so a state that stays, a parked car, is confirmed now and then).
//! Comparing with the last classified copy, not the previous frame, means
//! a slow change (dusk, a cloud) adds up until it counts, as Frigate's
//! motion detector does with its running average.

use std::time::{Duration, Instant};

use crate::preprocess::THUMB_CELLS;
use crate::source::camera::GateConfig;

/// A cell whose mean luma moved by more than this (of 255) counts as
/// changed: above sensor noise, which the cell means already average away,
/// below a person or a car entering the cell.
pub const CELL_CHANGE: u8 = 20;

/// One view's gate: its settings and what it saw when last classified.
pub struct Gate {
    config: GateConfig,
    reference: Option<Box<[u8; THUMB_CELLS]>>,
    classified_at: Option<Instant>,
}

impl Gate {
    pub fn new(config: GateConfig) -> Self {
        Self { config, reference: None, classified_at: None }
    }

    /// True when the gate looks at frames at all (motion or interval set).
    pub fn is_active(&self) -> bool {
        self.config.motion.is_some() || self.config.interval.is_some()
    }

    /// Whether to classify the view whose grey copy is `thumb`, now. A view
    /// never classified always is. When it is let through, `thumb` becomes
    /// the reference.
    pub fn admit(&mut self, thumb: &[u8; THUMB_CELLS], now: Instant) -> bool {
        let due = match (self.classified_at, self.config.interval) {
            (None, _) => true,
            (Some(at), Some(interval)) => now.duration_since(at) >= interval,
            (Some(_), None) => false,
        };
        let moved = match (&self.reference, self.config.motion) {
            (Some(reference), Some(share)) => changed_share(reference, thumb) >= share,
            _ => false,
        };
        if !(due || moved) {
            return false;
        }
        self.reference.get_or_insert_with(|| Box::new([0; THUMB_CELLS])).copy_from_slice(thumb);
        self.classified_at = Some(now);
        true
    }
}

/// The share of cells (0 to 1) whose mean luma moved by more than
/// [`CELL_CHANGE`].
pub fn changed_share(before: &[u8; THUMB_CELLS], after: &[u8; THUMB_CELLS]) -> f32 {
    let changed = before.iter().zip(after).filter(|(a, b)| a.abs_diff(**b) > CELL_CHANGE).count();
    changed as f32 / THUMB_CELLS as f32
}

/// How long a motion gate waits at most between two classifications of a
/// view that did not change, unless the config says otherwise.
pub const DEFAULT_MOTION_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn picture(lit: usize) -> [u8; THUMB_CELLS] {
        std::array::from_fn(|i| if i < lit { 200 } else { 40 })
    }

    #[test]
    fn a_view_is_classified_first_then_only_when_enough_of_it_changed() {
        let mut gate = Gate::new(GateConfig { motion: Some(0.05), interval: Some(Duration::from_secs(60)) });
        let start = Instant::now();
        assert!(gate.admit(&picture(0), start), "never classified: let through");
        assert!(!gate.admit(&picture(0), start + Duration::from_secs(1)), "nothing changed");
        // 3 % of the cells lit: below 5 %.
        assert!(!gate.admit(&picture(THUMB_CELLS * 3 / 100), start + Duration::from_secs(2)));
        // 6 %: let through, and that picture is the new reference.
        assert!(gate.admit(&picture(THUMB_CELLS * 6 / 100), start + Duration::from_secs(3)));
        assert!(!gate.admit(&picture(THUMB_CELLS * 6 / 100), start + Duration::from_secs(4)));
        // A noise of a few levels everywhere changes no cell.
        let noisy: [u8; THUMB_CELLS] = std::array::from_fn(|i| picture(THUMB_CELLS * 6 / 100)[i].saturating_add(9));
        assert!(!gate.admit(&noisy, start + Duration::from_secs(5)));
        // A minute without change: classified again all the same.
        assert!(gate.admit(&noisy, start + Duration::from_secs(64)));
    }

    #[test]
    fn an_interval_alone_classifies_a_view_once_per_interval() {
        let mut gate = Gate::new(GateConfig { motion: None, interval: Some(Duration::from_secs(10)) });
        let start = Instant::now();
        assert!(gate.admit(&picture(0), start));
        assert!(!gate.admit(&picture(THUMB_CELLS), start + Duration::from_secs(9)), "a change does not count");
        assert!(gate.admit(&picture(THUMB_CELLS), start + Duration::from_secs(10)));
        assert!(!Gate::new(GateConfig::default()).is_active());
    }
}
