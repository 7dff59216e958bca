//! Scores -> label states: sigmoid for logits, per-label on/off thresholds
//! (hysteresis) and a minimum hold time, so a label hovering around its
//! threshold does not flood the bus with ON/OFF/ON.
//!
//! Everything here is a plain function of its inputs (the clock is passed
//! in), which keeps the behaviour exhaustively testable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{ConfigError, OutputKind, duration, unit_interval};
use crate::engine::ModelMetadata;
pub use crate::flow::{LabelEvent, LabelScore, RegionLabels};

/// Up to this many labels, a model's every label gets a retained topic, a
/// Home Assistant entity and a place in every `labels` JSON. Above it (an
/// ML-Decoder head over OpenImages' 9,605 classes), only the labels
/// `labels.publish` lists get topics and entities, and the JSON carries the
/// ON labels and the highest scores (`labels.top_k`, `labels.floor`):
/// 9,605 retained topics and entities would swamp a broker and Home
/// Assistant, and a 400 KB JSON per frame the network.
pub const FEW_LABELS: usize = 64;

/// What the `labels` JSON carries on a model with more than [`FEW_LABELS`]
/// labels unless the config says otherwise.
pub const DEFAULT_TOP_K: usize = 20;
pub const DEFAULT_FLOOR: f32 = 0.05;

/// The thresholds for one label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRule {
    pub name: Arc<str>,
    /// A label turns ON at or above this score...
    pub on: f32,
    /// ...and OFF only below this one (`off <= on`).
    pub off: f32,
    /// It has a retained topic and a Home Assistant entity.
    pub publish: bool,
    /// It is tracked and reported for this view at all (a camera's or
    /// region's `labels` list leaves the others out).
    pub listed: bool,
}

/// A camera's or region's own label settings: which labels it is about
/// (`None`: all) and on-thresholds of its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewLabels {
    pub only: Option<Vec<String>>,
    pub thresholds: std::collections::BTreeMap<String, f32>,
}

/// The rules of one view (a camera's whole frame or a region): the model's
/// rules with the view's thresholds (`off` = `on - hysteresis`) and its
/// list applied. `field` names the view in errors (`camera[0].region[1]`).
pub fn view_rules(
    base: &[LabelRule],
    view: &ViewLabels,
    hysteresis: f32,
    field: &str,
) -> Result<Vec<LabelRule>, ConfigError> {
    let names: Vec<String> = base.iter().map(|r| r.name.to_string()).collect();
    let unknown = |part: &str, name: &str| {
        ConfigError::new(
            format!("{field}.{part}"),
            format!("the model has no label {name:?}; its labels are: {}", some_names(&names)),
        )
    };
    if let Some(name) = view.only.iter().flatten().find(|n| !names.contains(n)) {
        return Err(unknown("labels", name));
    }
    if let Some(name) = view.thresholds.keys().find(|n| !names.contains(n)) {
        return Err(unknown("thresholds", name));
    }
    Ok(base
        .iter()
        .map(|rule| {
            let listed = view.only.as_ref().is_none_or(|only| only.iter().any(|n| **n == *rule.name));
            let mut rule = LabelRule { listed, publish: rule.publish && listed, ..rule.clone() };
            if let Some(&on) = view.thresholds.get(&*rule.name) {
                rule.on = on;
                rule.off = (on - hysteresis).max(0.0);
            }
            rule
        })
        .collect())
}

/// A list of names for a message: all of them when few, else the first
/// ones and how many there are.
pub fn some_names(names: &[String]) -> String {
    const SHOWN: usize = 20;
    if names.len() <= SHOWN {
        names.join(", ")
    } else {
        format!("{}, ... ({} in all)", names[..SHOWN].join(", "), names.len())
    }
}

/// Which labels a `labels` JSON carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reporting {
    /// `None`: every label.
    pub top_k: Option<usize>,
    pub floor: f32,
}

impl Reporting {
    /// Every label of a model with few, unless the config set `top_k` or
    /// `floor`; else the ON labels and the highest scores.
    pub fn new(policy: &LabelPolicy, label_count: usize) -> Self {
        if label_count <= FEW_LABELS && policy.top_k.is_none() && policy.floor.is_none() {
            return Self { top_k: None, floor: 0.0 };
        }
        Self { top_k: Some(policy.top_k.unwrap_or(DEFAULT_TOP_K)), floor: policy.floor.unwrap_or(DEFAULT_FLOOR) }
    }

    /// The indices to report, in model order: every ON label, and of the
    /// others the `top_k` highest scoring at least `floor`.
    pub fn select(&self, scores: &[f32], on: impl Fn(usize) -> bool) -> Vec<usize> {
        self.select_listed(scores, on, |_| true)
    }

    /// [`Reporting::select`] among the labels `listed` keeps.
    pub fn select_listed(
        &self,
        scores: &[f32],
        on: impl Fn(usize) -> bool,
        listed: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let Some(top_k) = self.top_k else { return (0..scores.len()).filter(|&i| listed(i)).collect() };
        let mut candidates: Vec<usize> =
            (0..scores.len()).filter(|&i| listed(i) && !on(i) && scores[i] >= self.floor).collect();
        if candidates.len() > top_k {
            // Highest first; the k-th splits, so this is linear in the labels.
            candidates.select_nth_unstable_by(top_k - 1, |&a, &b| scores[b].total_cmp(&scores[a]));
            candidates.truncate(top_k);
        }
        let mut chosen: Vec<usize> = (0..scores.len()).filter(|&i| listed(i) && on(i)).chain(candidates).collect();
        chosen.sort_unstable();
        chosen
    }
}

/// Combines the config's policy with the model's default thresholds:
/// a config override wins, then the model's per-label default, then the
/// config's general threshold; `off` defaults to `on - hysteresis`.
pub fn resolve_rules(policy: &LabelPolicy, metadata: &ModelMetadata) -> Result<Vec<LabelRule>, ConfigError> {
    let known: std::collections::HashSet<&str> = metadata.labels.iter().map(String::as_str).collect();
    for name in policy.overrides.keys() {
        if !known.contains(name.as_str()) {
            return Err(ConfigError::new(
                format!("labels.overrides.{name}"),
                format!("the model has no label {name:?}; its labels are: {}", some_names(&metadata.labels)),
            ));
        }
    }
    let published: Option<std::collections::HashSet<&str>> = match &policy.publish {
        None => None,
        Some(list) => {
            if let Some(name) = list.iter().find(|name| !known.contains(name.as_str())) {
                return Err(ConfigError::new(
                    "labels.publish",
                    format!("the model has no label {name:?}; its labels are: {}", some_names(&metadata.labels)),
                ));
            }
            Some(list.iter().map(String::as_str).collect())
        }
    };
    let few = metadata.labels.len() <= FEW_LABELS;
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
            let publish = published.as_ref().map_or(few, |list| list.contains(name.as_str()));
            Ok(LabelRule { name: Arc::from(name.as_str()), on, off, publish, listed: true })
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
            if !rule.listed {
                continue;
            }
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

// ---------------------------------------------------------------------------
// The `[labels]` section: thresholds, hysteresis, hold, what is published.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLabels {
    pub threshold: Option<f64>,
    pub hysteresis: Option<f64>,
    pub min_hold: Option<String>,
    /// The labels that get a retained topic and a Home Assistant entity.
    pub publish: Option<Vec<String>>,
    /// The `labels` JSON carries the ON labels and at most this many others...
    pub top_k: Option<i64>,
    /// ... scoring at least this.
    pub floor: Option<f64>,
    #[serde(default)]
    pub overrides: BTreeMap<String, RawLabelOverride>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLabelOverride {
    pub on: Option<f64>,
    pub off: Option<f64>,
}

/// Thresholds and hysteresis before the model's label list is known.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelPolicy {
    /// On-threshold for labels with neither a config override nor a model default.
    pub threshold: f32,
    /// How far below its on-threshold a label must fall to turn off.
    pub hysteresis: f32,
    /// A label keeps a new state at least this long before it may change again.
    pub min_hold: Duration,
    pub overrides: BTreeMap<String, LabelOverride>,
    /// `labels.publish`: the labels with a retained topic and an entity;
    /// `None`: every label of a model with few ([`crate::labels::FEW_LABELS`]).
    pub publish: Option<Vec<String>>,
    /// `labels.top_k` / `labels.floor`: what the `labels` JSON carries
    /// besides the ON labels; `None`: every label of a model with few,
    /// else the 20 highest scoring at least 0.05.
    pub top_k: Option<usize>,
    pub floor: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LabelOverride {
    pub on: Option<f32>,
    pub off: Option<f32>,
}

impl Default for LabelPolicy {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            hysteresis: 0.1,
            min_hold: Duration::from_secs(1),
            overrides: BTreeMap::new(),
            publish: None,
            top_k: None,
            floor: None,
        }
    }
}

/// Checks the `[labels]` section.
pub fn validate_labels(raw: &RawLabels) -> Result<LabelPolicy, ConfigError> {
    let defaults = LabelPolicy::default();
    let threshold = match raw.threshold {
        Some(v) => unit_interval("labels.threshold", v)?,
        None => defaults.threshold,
    };
    let hysteresis = match raw.hysteresis {
        Some(v) => unit_interval("labels.hysteresis", v)?,
        None => defaults.hysteresis,
    };
    let min_hold = duration("labels.min_hold", &raw.min_hold, defaults.min_hold)?;
    let mut overrides = BTreeMap::new();
    for (name, o) in &raw.overrides {
        let field = |part: &str| format!("labels.overrides.{name}.{part}");
        let on = o.on.map(|v| unit_interval(&field("on"), v)).transpose()?;
        let off = o.off.map(|v| unit_interval(&field("off"), v)).transpose()?;
        if let (Some(on), Some(off)) = (on, off)
            && off > on
        {
            return Err(ConfigError::new(field("off"), format!("must not be above on ({on}), got {off}")));
        }
        overrides.insert(name.clone(), LabelOverride { on, off });
    }
    let top_k = match raw.top_k {
        None => None,
        Some(k) if (1..=100_000).contains(&k) => Some(k as usize),
        Some(k) => return Err(ConfigError::new("labels.top_k", format!("expected 1 to 100000 labels, got {k}"))),
    };
    let floor = raw.floor.map(|v| unit_interval("labels.floor", v)).transpose()?;
    Ok(LabelPolicy { threshold, hysteresis, min_hold, overrides, publish: raw.publish.clone(), top_k, floor })
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
        LabelRule { name: "cat".into(), on, off, publish: true, listed: true }
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
        let rules =
            vec![rule(0.5, 0.4), LabelRule { name: "dog".into(), on: 0.9, off: 0.8, publish: true, listed: true }];
        let hits: Vec<_> = above_threshold(&rules, &[0.5, 0.89]).map(|(r, s)| (r.name.to_string(), s)).collect();
        assert_eq!(hits, [("cat".to_string(), 0.5)]);
    }

    #[test]
    fn a_model_with_thousands_of_labels_reports_the_on_labels_and_the_highest_scores_and_publishes_the_listed() {
        let names: Vec<String> = (0..9605).map(|i| format!("class_{i:04}")).collect();
        let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
        let meta = metadata(&names_ref, &[]);
        let rules = resolve_rules(&LabelPolicy::default(), &meta).unwrap();
        assert!(rules.iter().all(|r| !r.publish), "no topics for 9605 labels unless listed");
        let policy = LabelPolicy { publish: Some(vec!["class_0007".into()]), ..LabelPolicy::default() };
        let rules = resolve_rules(&policy, &meta).unwrap();
        assert_eq!(rules.iter().filter(|r| r.publish).map(|r| &*r.name).collect::<Vec<_>>(), ["class_0007"]);
        let wrong = LabelPolicy { publish: Some(vec!["class_9999".into()]), ..LabelPolicy::default() };
        let err = resolve_rules(&wrong, &meta).unwrap_err();
        assert_eq!(err.field, "labels.publish");
        assert!(err.message.contains("(9605 in all)") && err.message.len() < 600, "{err}");

        let reporting = Reporting::new(&LabelPolicy::default(), names.len());
        let mut scores = vec![0.01f32; 9605];
        for (i, s) in [(10, 0.9), (20, 0.3), (30, 0.2), (40, 0.06)] {
            scores[i] = s;
        }
        scores[100..130].fill(0.1);
        let chosen = reporting.select(&scores, |i| i == 5000);
        assert_eq!(chosen.len(), 21, "the ON label and the top 20");
        assert!(chosen.contains(&5000) && chosen.contains(&10) && chosen.contains(&20) && chosen.contains(&30));
        assert!(!chosen.contains(&40), "0.06 is not among the 20 highest");
        assert!(chosen.windows(2).all(|w| w[0] < w[1]), "model order");
        // A model with few labels reports them all.
        assert_eq!(Reporting::new(&LabelPolicy::default(), 12).select(&[0.0; 12], |_| false).len(), 12);
    }

    #[test]
    fn a_region_tracks_only_its_listed_labels_with_its_own_thresholds() {
        let base = resolve_rules(&LabelPolicy::default(), &metadata(&["cat", "dog", "car"], &[])).unwrap();
        let view = ViewLabels {
            only: Some(vec!["car".into(), "dog".into()]),
            thresholds: [("car".to_string(), 0.8)].into_iter().collect(),
        };
        let rules = view_rules(&base, &view, 0.1, "camera[0].region[0]").unwrap();
        assert_eq!(rules.iter().map(|r| r.listed).collect::<Vec<_>>(), [false, true, true]);
        assert!(!rules[0].publish && rules[2].publish);
        assert!((rules[2].on - 0.8).abs() < 1e-6 && (rules[2].off - 0.7).abs() < 1e-6);
        let mut tracker = LabelTracker::new(rules, Duration::ZERO);
        let now = Instant::now();
        // cat scores 0.99 but is not this region's: never ON; car needs 0.8 here.
        assert_eq!(tracker.update(&[0.99, 0.1, 0.75], now), Vec::<usize>::new());
        assert_eq!(tracker.update(&[0.99, 0.1, 0.85], now), vec![2]);
        let reporting = Reporting { top_k: None, floor: 0.0 };
        assert_eq!(
            reporting.select_listed(&[0.99, 0.1, 0.85], |i| tracker.is_on(i), |i| tracker.rules()[i].listed),
            [1, 2]
        );
        let wrong = ViewLabels { only: Some(vec!["bus".into()]), ..ViewLabels::default() };
        assert_eq!(
            view_rules(&base, &wrong, 0.1, "camera[0].region[0]").unwrap_err().field,
            "camera[0].region[0].labels"
        );
    }
}
