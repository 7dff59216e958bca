//! Scores -> label states: sigmoid for logits, per-label on/off thresholds
//! (hysteresis) and a minimum hold time, so a label hovering around its
//! threshold does not flood the bus with ON/OFF/ON.
//!
//! Everything here is a plain function of its inputs (the clock is passed
//! in), which keeps the behaviour exhaustively testable.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{ConfigError, LabelPolicy, OutputKind};
use crate::engine::ModelMetadata;

/// The thresholds for one label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRule {
    pub name: Arc<str>,
    /// A label turns ON at or above this score...
    pub on: f32,
    /// ...and OFF only below this one (`off <= on`).
    pub off: f32,
}

/// Combines the config's policy with the model's default thresholds:
/// a config override wins, then the model's per-label default, then the
/// config's general threshold; `off` defaults to `on - hysteresis`.
pub fn resolve_rules(policy: &LabelPolicy, metadata: &ModelMetadata) -> Result<Vec<LabelRule>, ConfigError> {
    for name in policy.overrides.keys() {
        if !metadata.labels.iter().any(|l| l == name) {
            return Err(ConfigError::new(
                format!("labels.overrides.{name}"),
                format!("the model has no label {name:?}; its labels are: {}", metadata.labels.join(", ")),
            ));
        }
    }
    metadata
        .labels
        .iter()
        .map(|name| {
            let o = policy.overrides.get(name).copied().unwrap_or_default();
            let on = o.on.or_else(|| metadata.thresholds.get(name).copied()).unwrap_or(policy.threshold);
            let off = o.off.unwrap_or((on - policy.hysteresis).max(0.0));
            if off > on {
                return Err(ConfigError::new(
                    format!("labels.overrides.{name}.off"),
                    format!("{off} is above the on-threshold {on}"),
                ));
            }
            Ok(LabelRule { name: Arc::from(name.as_str()), on, off })
        })
        .collect()
}

/// Raw model outputs -> scores in [0, 1]. A NaN (a broken model) scores 0, so
/// it can never turn a label on.
pub fn to_scores(raw: &mut [f32], kind: OutputKind) {
    for value in raw.iter_mut() {
        *value = if value.is_nan() {
            0.0
        } else {
            match kind {
                OutputKind::Logits => 1.0 / (1.0 + (-*value).exp()),
                OutputKind::Probabilities => value.clamp(0.0, 1.0),
            }
        };
    }
}

/// Labels whose score reaches their on-threshold, without any state: what
/// `labelcast classify` prints for a single photo.
pub fn above_threshold<'a>(rules: &'a [LabelRule], scores: &'a [f32]) -> impl Iterator<Item = (&'a LabelRule, f32)> {
    rules.iter().zip(scores.iter().copied()).filter(|(rule, score)| *score >= rule.on)
}

#[derive(Debug, Clone, Copy)]
struct LabelState {
    on: bool,
    changed_at: Option<Instant>,
}

/// The current ON/OFF state of every label, updated frame by frame.
pub struct LabelTracker {
    rules: Vec<LabelRule>,
    states: Vec<LabelState>,
    min_hold: Duration,
}

impl LabelTracker {
    /// Every label starts OFF and may change on the first frame.
    pub fn new(rules: Vec<LabelRule>, min_hold: Duration) -> Self {
        let states = vec![LabelState { on: false, changed_at: None }; rules.len()];
        Self { rules, states, min_hold }
    }

    pub fn rules(&self) -> &[LabelRule] {
        &self.rules
    }

    pub fn is_on(&self, index: usize) -> bool {
        self.states[index].on
    }

    /// Applies one frame's scores; returns the indices of labels that changed.
    pub fn update(&mut self, scores: &[f32], now: Instant) -> Vec<usize> {
        let mut changed = Vec::new();
        for (index, ((rule, state), &score)) in self.rules.iter().zip(&mut self.states).zip(scores).enumerate() {
            let held_long_enough = state.changed_at.is_none_or(|at| now.saturating_duration_since(at) >= self.min_hold);
            let wants = if state.on { score >= rule.off } else { score >= rule.on };
            if wants != state.on && held_long_enough {
                state.on = wants;
                state.changed_at = Some(now);
                changed.push(index);
            }
        }
        changed
    }
}

/// One label's part of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub name: Arc<str>,
    pub score: f32,
    pub on: bool,
}

/// What one inference produced, as it travels to the publishers.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelEvent {
    pub sequence: u64,
    pub timestamp: SystemTime,
    /// The frame's file or device, when known.
    pub origin: Option<Arc<str>>,
    pub model: Arc<str>,
    pub inference_ms: f64,
    /// From capture to scores: waiting, decode, preprocess and inference.
    pub frame_ms: f64,
    pub labels: Vec<LabelScore>,
    /// Indices into `labels` of those whose state changed on this frame.
    pub changed: Vec<usize>,
    /// The camera's id; `None` for the single camera of a `[source]` config.
    pub camera: Option<Arc<str>>,
    /// The camera's regions classified on this frame, in config order; a
    /// region that does not fit the frame is left out.
    pub regions: Vec<RegionLabels>,
}

/// One region's part of an event: its labels as `LabelEvent::labels`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionLabels {
    pub id: Arc<str>,
    pub labels: Vec<LabelScore>,
    pub changed: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LabelOverride;
    use std::collections::BTreeMap;

    fn metadata(labels: &[&str], thresholds: &[(&str, f32)]) -> ModelMetadata {
        ModelMetadata {
            name: "m".into(),
            version: None,
            labels: labels.iter().map(|s| s.to_string()).collect(),
            labels_from: "test".into(),
            mean: [0.0; 3],
            std: [1.0; 3],
            output: OutputKind::Logits,
            resize: crate::config::ResizeMode::CenterCrop,
            thresholds: thresholds.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            input_size: None,
            backbone: None,
            recipe_hash: None,
            layout: None,
            output_name: None,
        }
    }

    fn rule(on: f32, off: f32) -> LabelRule {
        LabelRule { name: "cat".into(), on, off }
    }

    #[test]
    fn a_config_override_beats_the_model_default_which_beats_the_general_threshold() {
        let mut policy = LabelPolicy { threshold: 0.5, hysteresis: 0.1, ..LabelPolicy::default() };
        policy.overrides = BTreeMap::from([("dog".to_string(), LabelOverride { on: Some(0.8), off: None })]);
        let rules = resolve_rules(&policy, &metadata(&["cat", "dog", "bird"], &[("cat", 0.3), ("dog", 0.6)])).unwrap();
        let thresholds: Vec<(f32, f32)> = rules.iter().map(|r| (r.on, r.off)).collect();
        assert_eq!(thresholds.len(), 3);
        assert!((thresholds[0].0 - 0.3).abs() < 1e-6 && (thresholds[0].1 - 0.2).abs() < 1e-6);
        assert!((thresholds[1].0 - 0.8).abs() < 1e-6 && (thresholds[1].1 - 0.7).abs() < 1e-6);
        assert!((thresholds[2].0 - 0.5).abs() < 1e-6 && (thresholds[2].1 - 0.4).abs() < 1e-6);
    }

    #[test]
    fn an_override_for_a_label_the_model_lacks_is_an_error_listing_the_real_ones() {
        let mut policy = LabelPolicy::default();
        policy.overrides.insert("dgo".into(), LabelOverride { on: Some(0.5), off: None });
        let err = resolve_rules(&policy, &metadata(&["cat", "dog"], &[])).unwrap_err();
        assert_eq!(err.field, "labels.overrides.dgo");
        assert!(err.message.contains("cat, dog"));
    }

    #[test]
    fn an_override_off_above_the_model_on_threshold_is_an_error() {
        let mut policy = LabelPolicy::default();
        policy.overrides.insert("cat".into(), LabelOverride { on: None, off: Some(0.9) });
        let err = resolve_rules(&policy, &metadata(&["cat"], &[("cat", 0.6)])).unwrap_err();
        assert_eq!(err.field, "labels.overrides.cat.off");
    }

    #[test]
    fn logits_go_through_a_sigmoid_and_nan_scores_zero() {
        let mut raw = [0.0, 100.0, -100.0, f32::NAN];
        to_scores(&mut raw, OutputKind::Logits);
        assert_eq!(raw, [0.5, 1.0, 0.0, 0.0]);
        let mut probs = [1.5, -0.2, 0.3];
        to_scores(&mut probs, OutputKind::Probabilities);
        assert_eq!(probs, [1.0, 0.0, 0.3]);
    }

    #[test]
    fn a_label_turns_on_at_on_and_stays_on_until_it_drops_below_off() {
        let t0 = Instant::now();
        let mut tracker = LabelTracker::new(vec![rule(0.6, 0.4)], Duration::ZERO);
        assert!(tracker.update(&[0.59], t0).is_empty());
        assert_eq!(tracker.update(&[0.6], t0), [0]);
        assert!(tracker.update(&[0.45], t0).is_empty(), "between off and on: stays on");
        assert!(tracker.is_on(0));
        assert_eq!(tracker.update(&[0.39], t0), [0]);
        assert!(!tracker.is_on(0));
    }

    #[test]
    fn a_flickering_score_changes_state_at_most_once_per_hold_time() {
        let t0 = Instant::now();
        let mut tracker = LabelTracker::new(vec![rule(0.5, 0.5)], Duration::from_secs(2));
        let mut changes = 0;
        for step in 0..40u64 {
            let score = if step % 2 == 0 { 0.9 } else { 0.1 };
            changes += tracker.update(&[score], t0 + Duration::from_millis(step * 100)).len();
        }
        // 4 s of flicker with a 2 s hold: on at 0 s, off at 2.1 s, nothing more until 4.1 s.
        assert_eq!(changes, 2);
    }

    #[test]
    fn above_threshold_lists_only_labels_at_or_over_their_on_threshold() {
        let rules = vec![rule(0.5, 0.4), LabelRule { name: "dog".into(), on: 0.9, off: 0.8 }];
        let hits: Vec<_> = above_threshold(&rules, &[0.5, 0.89]).map(|(r, s)| (r.name.to_string(), s)).collect();
        assert_eq!(hits, [("cat".to_string(), 0.5)]);
    }
}
