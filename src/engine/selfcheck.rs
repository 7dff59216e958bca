//! The load-time check that an INT8 rewrite kept the model's meaning.
//!
//! Weights-only mode rewrites the graph a quantiser made ([`super::qdq`]).
//! Every rewrite there is argued to keep the graph's meaning, but an
//! argument is not a measurement, and the failure it guards against (a
//! model that outputs confident garbage) is silent. So when tract loads a
//! rewritten INT8 model it also builds the graph as quantised (`native`,
//! with only the Softmax repair, which is itself exact up to rounding), runs
//! both on a fixed probe picture and compares the scores; and it runs the
//! first real frame through both again, in the background. If the largest
//! difference exceeds [`TOLERANCE`] the daemon logs a WARN naming the model,
//! the mode and the difference, and runs `native` from then on
//! (`model.int8_check = "error"` refuses to start instead).
//!
//! The verdict is cached per model, labelcast and tract version
//! ([`VerdictCache`]), so later starts skip the second graph.
//!
//! The tolerance comes from the conformance matrix (`tests/int8_matrix.py`,
//! README "Engines"): across every quantiser setting and body there, the
//! largest score difference between weights-only and native on a model the
//! rewrite handles right is the rounding weights-only leaves out, well
//! below it; a rewrite that loses a folded activation differs by 0.3 to 1.

use std::sync::Mutex;
use std::time::Duration;

use crate::config::{Int8Check, Int8Mode, OutputKind};

use super::Tensor;

/// The largest difference in any label's score (after the sigmoid, 0..1)
/// between the rewritten graph and the graph as quantised that still counts
/// as agreement. See the module documentation for where it comes from.
pub const TOLERANCE: f32 = 0.15;

/// What the check found, shared with `model-info`, `/metrics` and the log.
#[derive(Debug)]
pub struct SelfCheck {
    /// The mode that was checked (weights-only).
    pub mode: Int8Mode,
    pub tolerance: f32,
    pub policy: Int8Check,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone)]
struct State {
    probe_difference: Option<f32>,
    frame_difference: Option<f32>,
    fell_back: bool,
    /// The verdict is an earlier start's (see [`VerdictCache`]).
    cached: bool,
    /// Extra time the check added to loading (building the reference graph
    /// beside the configured one, and the probe).
    took: Duration,
}

impl SelfCheck {
    pub fn new(mode: Int8Mode, policy: Int8Check) -> Self {
        Self { mode, tolerance: TOLERANCE, policy, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_probe(&self, difference: f32, took: Duration) {
        let mut state = self.lock();
        state.probe_difference = Some(difference);
        state.took = took;
    }

    pub fn record_frame(&self, difference: f32) {
        self.lock().frame_difference = Some(difference);
    }

    pub fn record_fallback(&self) {
        self.lock().fell_back = true;
    }

    /// The largest difference seen so far (probe and first frame).
    pub fn max_difference(&self) -> Option<f32> {
        let state = self.lock();
        match (state.probe_difference, state.frame_difference) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// True once the check found a disagreement and the engine runs the
    /// graph as quantised instead.
    pub fn fell_back(&self) -> bool {
        self.lock().fell_back
    }

    /// Whether the first real frame has been compared yet.
    pub fn frame_checked(&self) -> bool {
        self.lock().frame_difference.is_some()
    }

    pub fn took(&self) -> Duration {
        self.lock().took
    }

    /// One line for `model-info` and logs.
    pub fn summary(&self) -> String {
        let state = self.lock().clone();
        let show = |d: Option<f32>| d.map_or("not yet".to_string(), |d| format!("{d:.4}"));
        let verdict = if state.fell_back {
            format!("DISAGREES with the graph as quantised; running native instead of {}", self.mode.as_str())
        } else {
            format!("{} agrees with the graph as quantised", self.mode.as_str())
        };
        let when = if state.cached {
            "measured at an earlier start of this model and labelcast version".to_string()
        } else {
            format!("check took {:.0} ms", state.took.as_secs_f64() * 1e3)
        };
        format!(
            "{verdict}: largest score difference {} on the probe, {} on the first frame (tolerance {}); {when}",
            show(state.probe_difference),
            show(state.frame_difference),
            self.tolerance,
        )
    }
}

/// The largest absolute difference between two score vectors (0..1 each);
/// infinite when a score is not a number or the lengths differ.
pub fn difference(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_finite() && y.is_finite() { (x - y).abs() } else { f32::INFINITY })
        .fold(0.0, f32::max)
}

/// Raw outputs as 0..1 scores, as the daemon shows them.
/// A score that is not a number stays one, so [`difference`] sees it.
pub fn as_scores(mut raw: Vec<f32>, kind: OutputKind) -> Vec<f32> {
    let nan: Vec<bool> = raw.iter().map(|v| v.is_nan()).collect();
    crate::labels::to_scores(&mut raw, kind);
    for (value, was_nan) in raw.iter_mut().zip(nan) {
        if was_nan {
            *value = f32::NAN;
        }
    }
    raw
}

/// A fixed, picture-like probe at the model's input size, normalised with
/// its mean and std: colour gradients, a few solid discs and edges, so that
/// activations cover the range a photo gives (a flat grey would leave most
/// ReLUs at zero and prove little).
pub fn probe(shape: [usize; 4], mean: [f32; 3], std: [f32; 3]) -> Tensor {
    let [_, channels, h, w] = shape;
    let mut tensor = Tensor::zeros(shape);
    let plane = h * w;
    let discs = [
        (0.3, 0.35, 0.18, [230.0, 40.0, 30.0]),
        (0.7, 0.6, 0.22, [20.0, 90.0, 210.0]),
        (0.45, 0.8, 0.12, [250.0, 230.0, 60.0]),
    ];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let mut rgb = [255.0 * fx, 255.0 * fy, 255.0 * (1.0 - fx) * (0.5 + 0.5 * (fy * 12.0).sin().abs())];
            if ((x / 16) + (y / 16)) % 2 == 0 && fy > 0.85 {
                rgb = [rgb[0] * 0.2, rgb[1] * 0.2, rgb[2] * 0.2];
            }
            for (cx, cy, r, colour) in discs {
                if (fx - cx).powi(2) + (fy - cy).powi(2) < r * r {
                    rgb = colour;
                }
            }
            for c in 0..channels.min(3) {
                tensor.data[c * plane + y * w + x] = (rgb[c] / 255.0 - mean[c]) / std[c];
            }
        }
    }
    tensor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_is_the_largest_and_a_nan_is_infinitely_far() {
        assert_eq!(difference(&[0.1, 0.5], &[0.2, 0.45]), 0.1f32.max(0.05));
        assert_eq!(difference(&[0.1, f32::NAN], &[0.1, 0.2]), f32::INFINITY);
        assert_eq!(difference(&[0.1], &[0.1, 0.2]), f32::INFINITY);
    }

    #[test]
    fn the_probe_is_the_same_every_time_and_spans_the_colours() {
        let a = probe([1, 3, 32, 48], [0.5; 3], [0.25; 3]);
        assert_eq!(a, probe([1, 3, 32, 48], [0.5; 3], [0.25; 3]));
        let (lo, hi) = a.data.iter().fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
        assert!(lo < -1.5 && hi > 1.5, "{lo}..{hi}");
    }

    #[test]
    fn the_summary_says_when_it_fell_back() {
        let check = SelfCheck::new(Int8Mode::WeightsOnly, Int8Check::Fallback);
        check.record_probe(0.9, Duration::from_millis(120));
        check.record_fallback();
        let summary = check.summary();
        assert!(summary.contains("DISAGREES") && summary.contains("0.9000"), "{summary}");
        assert_eq!(check.max_difference(), Some(0.9));
    }

    #[test]
    fn the_verdict_cache_key_covers_the_engine_sources_and_the_kernels() {
        // build.rs hashed the files under src/engine: an empty walk would
        // give FNV-1a's offset basis and leave kernel changes out of the key.
        let hash = env!("LABELCAST_ENGINE_SOURCE");
        assert_eq!(hash.len(), 16, "{hash}");
        assert_ne!(hash, "cbf29ce484222325", "build.rs found no engine sources");
        assert!(VerdictCache::key_parts(Int8Mode::WeightsOnly, false, false, "k").contains(&hash));
        let dir = std::env::temp_dir();
        let a = VerdictCache::new(&dir, b"model", Int8Mode::WeightsOnly, false, false, "k");
        assert_eq!(a.path(), VerdictCache::new(&dir, b"model", Int8Mode::WeightsOnly, false, false, "k").path());
        assert_ne!(a.path(), VerdictCache::new(&dir, b"model", Int8Mode::WeightsOnly, false, false, "k2").path());
    }
}

/// Verdicts of earlier checks, so that only the first start of a model
/// (with this labelcast and tract) pays for building the graph twice: that
/// costs about 0.13 s and 60 MB at start on the demo model. The key is the
/// model's SHA-256, both versions, a hash of the engine's sources (build.rs),
/// the mode, every switch that changes the rewrite and the kernels that run
/// it, so a new labelcast, a build with changed rewrites or kernels under
/// the same version, or another CPU checks again.
pub struct VerdictCache {
    file: std::path::PathBuf,
}

/// A cached verdict.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub agrees: bool,
    pub probe_difference: f32,
    pub frame_difference: Option<f32>,
}

impl VerdictCache {
    /// The cache entry for this model and rewrite under `dir`.
    /// `kernels` names the kernels that run the rewritten graph (depthwise,
    /// 1x1), which can differ between builds of one version and between CPUs.
    pub fn new(dir: &std::path::Path, model: &[u8], mode: Int8Mode, repair: bool, fault: bool, kernels: &str) -> Self {
        let key = super::model_key(model, &Self::key_parts(mode, repair, fault, kernels));
        Self { file: dir.join("int8-checks").join(format!("{}.json", &key[..32])) }
    }

    /// What the key hashes besides the model's bytes.
    fn key_parts(mode: Int8Mode, repair: bool, fault: bool, kernels: &str) -> [&str; 7] {
        [
            env!("CARGO_PKG_VERSION"),
            env!("LABELCAST_TRACT_VERSION"),
            env!("LABELCAST_ENGINE_SOURCE"),
            mode.as_str(),
            if repair { "repair" } else { "no-repair" },
            if fault { "fault-drop-saturation" } else { "" },
            kernels,
        ]
    }

    pub fn path(&self) -> &std::path::Path {
        &self.file
    }

    pub fn load(&self) -> Option<Verdict> {
        serde_json::from_slice(&std::fs::read(&self.file).ok()?).ok()
    }

    /// Stores a verdict; a cache that cannot be written only costs the next
    /// start the check again.
    pub fn store(&self, verdict: &Verdict) {
        let written = self
            .file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&self.file, serde_json::to_vec(verdict).unwrap_or_default()));
        if let Err(err) = written {
            tracing::debug!(file = %self.file.display(), error = %err, "INT8 self-check verdict not cached");
        }
    }
}

impl SelfCheck {
    /// A check answered from the cache: what the earlier check measured.
    pub fn from_cache(mode: Int8Mode, policy: Int8Check, verdict: &Verdict) -> Self {
        let check = Self::new(mode, policy);
        {
            let mut state = check.lock();
            state.probe_difference = Some(verdict.probe_difference);
            state.frame_difference = verdict.frame_difference;
            state.fell_back = !verdict.agrees;
            state.cached = true;
        }
        check
    }

    /// True when the verdict came from an earlier start.
    pub fn cached(&self) -> bool {
        self.lock().cached
    }

    /// Caches the verdict as far as the check got (nothing before the probe).
    pub fn save(&self, cache: Option<&VerdictCache>) {
        if let (Some(cache), Some(verdict)) = (cache, self.verdict()) {
            cache.store(&verdict);
        }
    }

    /// What to cache once the check is as far as it will get.
    fn verdict(&self) -> Option<Verdict> {
        let state = self.lock();
        Some(Verdict {
            agrees: !state.fell_back,
            probe_difference: state.probe_difference?,
            frame_difference: state.frame_difference,
        })
    }
}
