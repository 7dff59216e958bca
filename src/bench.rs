//! `labelcast bench`: how fast each engine and INT8 mode in this build runs
//! the model, how much memory it takes and how far its scores are from the
//! reference, measured side by side in one run.
//!
//! Every row runs in its own child process (this binary with a hidden
//! `--row` argument), so each row's peak RSS is its own and one engine's
//! allocator or thread pool cannot slow the next. Ratios are against the
//! first row, which is ONNX Runtime FP32 when ONNX Runtime can be loaded
//! (the acceptance baseline) and tract FP32 otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::config::{EngineKind, Int8Mode, ModelConfig};
use crate::engine::{self, Tensor};
use crate::labels;
use crate::preprocess::Preprocessor;
use crate::source;

/// One row to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowSpec {
    pub model: PathBuf,
    /// `int8` or `fp32`, for the table.
    pub model_kind: String,
    pub engine: String,
    pub int8: String,
    pub threads: usize,
    pub onnxruntime_library: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub iterations: usize,
    pub warmup: usize,
    /// Also time every node and report by kind of operator (tract only).
    #[serde(default)]
    pub profile: bool,
}

/// What one row measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowResult {
    pub spec: RowSpec,
    pub engine_version: String,
    pub precision: String,
    pub load_ms: f64,
    pub optimize_ms: f64,
    pub latencies_ms: Vec<f64>,
    pub peak_rss_mb: f64,
    /// Probabilities per image, in `spec.images` order.
    pub scores: Vec<Vec<f32>>,
    pub thresholds: Vec<f32>,
    /// Milliseconds per inference by kind of operator (`--profile`, tract).
    #[serde(default)]
    pub profile: crate::engine::Profile,
}

/// Runs one row in this process; what the child does.
pub fn run_row(spec: &RowSpec) -> anyhow::Result<RowResult> {
    let mut config = ModelConfig::for_path(&spec.model);
    // The INT8 self-check's verdict is cached after a model's first start:
    // the rows measure the starts after it.
    config.int8_check = crate::config::Int8Check::Off;
    config.engine = EngineKind::parse(&spec.engine).map_err(anyhow::Error::msg)?;
    config.int8 = Int8Mode::parse(&spec.int8).map_err(anyhow::Error::msg)?;
    config.threads = spec.threads;
    config.onnxruntime_library = spec.onnxruntime_library.clone();
    let mut engine = engine::load(&config)?;
    let info = engine.info().clone();
    let meta = &info.metadata;
    let mut preprocessor = Preprocessor::new(info.input_width(), info.input_height(), meta.mean, meta.std, meta.resize);
    let mut tensors: Vec<Tensor> = Vec::new();
    for (index, path) in spec.images.iter().enumerate() {
        let frame = source::read_frame(path, index as u64)?;
        let mut tensor = preprocessor.new_tensor();
        preprocessor.run(&frame, &mut tensor).with_context(|| format!("preprocessing {}", path.display()))?;
        tensors.push(tensor);
    }
    let mut scores = Vec::new();
    for tensor in &tensors {
        let mut row = engine.infer(tensor)?;
        labels::to_scores(&mut row, meta.output);
        scores.push(row);
    }
    for i in 0..spec.warmup {
        engine.infer(&tensors[i % tensors.len()])?;
    }
    let mut latencies_ms = Vec::with_capacity(spec.iterations);
    for i in 0..spec.iterations {
        let began = Instant::now();
        engine.infer(&tensors[i % tensors.len()])?;
        latencies_ms.push(began.elapsed().as_secs_f64() * 1e3);
    }
    let profile = match spec.profile {
        true => engine.profile(&tensors[0], spec.iterations.clamp(1, 20)).transpose()?.unwrap_or_default(),
        false => Default::default(),
    };
    let rules = labels::resolve_rules(&Default::default(), meta)?;
    Ok(RowResult {
        spec: spec.clone(),
        engine_version: info.engine_version.clone(),
        precision: info.precision().to_string(),
        load_ms: info.load_time.as_secs_f64() * 1e3,
        optimize_ms: info.optimize_time.as_secs_f64() * 1e3,
        latencies_ms,
        peak_rss_mb: crate::telemetry::peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
        scores,
        thresholds: rules.iter().map(|r| r.on).collect(),
        profile,
    })
}

/// What the user asked `bench` for.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub int8_model: PathBuf,
    pub fp32_model: Option<PathBuf>,
    /// The model quantised for ONNX Runtime's CPU provider (uint8
    /// activations): an extra `int8-cpu` row for the onnxruntime engine.
    pub int8_cpu_model: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub threads: Vec<usize>,
    pub engines: Vec<EngineKind>,
    pub iterations: usize,
    pub warmup: usize,
    pub onnxruntime_library: Option<PathBuf>,
    pub profile: bool,
}

impl BenchPlan {
    /// The rows, baseline first.
    pub fn rows(&self) -> Vec<RowSpec> {
        let row = |model: &Path, kind: &str, engine: EngineKind, int8: Int8Mode, threads: usize| RowSpec {
            model: model.to_path_buf(),
            model_kind: kind.to_string(),
            engine: engine.as_str().to_string(),
            int8: int8.as_str().to_string(),
            threads,
            onnxruntime_library: self.onnxruntime_library.clone(),
            images: self.images.clone(),
            iterations: self.iterations,
            warmup: self.warmup,
            profile: self.profile && engine == EngineKind::Tract,
        };
        let mut rows = Vec::new();
        for &threads in &self.threads {
            for &engine in &self.engines {
                if let Some(fp32) = &self.fp32_model {
                    rows.push(row(fp32, "fp32", engine, Int8Mode::Native, threads));
                }
                let backend = crate::engine::registry::backend(engine);
                for &mode in backend.bench_int8_modes {
                    rows.push(row(&self.int8_model, "int8", engine, mode, threads));
                }
                if backend.bench_cpu_file
                    && let Some(cpu) = &self.int8_cpu_model
                {
                    rows.push(row(cpu, "int8-cpu", engine, Int8Mode::Native, threads));
                }
            }
        }
        rows
    }
}

/// One finished row, or why it could not run.
pub type RowOutcome = Result<RowResult, String>;

/// Runs every row of the plan in child processes of `exe`, in `rounds`
/// interleaved passes (row 1, row 2, ..., row 1, row 2, ...) so that a slow
/// patch on a shared machine spreads over every row instead of landing on
/// one. A row's latencies are pooled over its rounds; its peak RSS is the
/// highest and its load time the lowest seen.
pub fn run_plan(
    exe: &Path,
    plan: &BenchPlan,
    rounds: usize,
    progress: impl Fn(usize, &RowSpec),
) -> anyhow::Result<Vec<(RowSpec, RowOutcome)>> {
    let rows = plan.rows();
    let rounds = rounds.clamp(1, plan.iterations.max(1));
    let mut outcomes: Vec<RowOutcome> = vec![Err("not run".to_string()); rows.len()];
    for round in 0..rounds {
        for (index, spec) in rows.iter().enumerate() {
            if round > 0 && outcomes[index].is_err() {
                continue;
            }
            progress(round, spec);
            let share = plan.iterations / rounds + usize::from(round < plan.iterations % rounds);
            let spec_this_round = RowSpec { iterations: share, ..spec.clone() };
            let outcome = run_child(exe, &spec_this_round)?;
            outcomes[index] = match (std::mem::replace(&mut outcomes[index], Err(String::new())), outcome) {
                (_, Err(why)) => Err(why),
                (Ok(mut pooled), Ok(new)) if round > 0 => {
                    pooled.latencies_ms.extend(new.latencies_ms);
                    pooled.peak_rss_mb = pooled.peak_rss_mb.max(new.peak_rss_mb);
                    if new.load_ms + new.optimize_ms < pooled.load_ms + pooled.optimize_ms {
                        (pooled.load_ms, pooled.optimize_ms) = (new.load_ms, new.optimize_ms);
                    }
                    Ok(pooled)
                }
                (_, Ok(new)) => Ok(RowResult { spec: spec.clone(), ..new }),
            };
        }
    }
    Ok(rows.into_iter().zip(outcomes).collect())
}

fn run_child(exe: &Path, spec: &RowSpec) -> anyhow::Result<RowOutcome> {
    let encoded = serde_json::to_string(spec)?;
    let child = Command::new(exe)
        .args(["--log-level", "error", "bench", "--row", &encoded])
        .output()
        .with_context(|| format!("starting {}", exe.display()))?;
    Ok(if child.status.success() {
        serde_json::from_slice::<RowResult>(&child.stdout).map_err(|err| format!("unreadable row result: {err}"))
    } else {
        let stderr = String::from_utf8_lossy(&child.stderr);
        Err(stderr.trim().trim_start_matches("labelcast: error: ").to_string())
    })
}

/// Percentile by nearest rank over a sorted slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A row's figures and its comparison with the baseline row.
#[derive(Debug, Clone, Serialize)]
pub struct RowSummary {
    pub engine: String,
    pub engine_version: String,
    pub model: String,
    pub mode: String,
    pub threads: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub frames_per_s: f64,
    pub peak_rss_mb: f64,
    pub load_optimize_ms: f64,
    /// Largest |probability difference| from the baseline row over all images and labels.
    pub max_score_diff: f64,
    /// Share of (image, label) on/off decisions equal to the baseline row's.
    pub decision_agreement: f64,
    pub p50_ratio: f64,
    pub rss_ratio: f64,
}

pub fn summarise(baseline: &RowResult, row: &RowResult) -> RowSummary {
    let mut sorted = row.latencies_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
    let mut base_sorted = baseline.latencies_ms.clone();
    base_sorted.sort_by(f64::total_cmp);
    let (mut max_diff, mut same, mut total) = (0.0f64, 0usize, 0usize);
    for (ours, theirs) in row.scores.iter().zip(&baseline.scores) {
        for ((a, b), t) in ours.iter().zip(theirs).zip(&baseline.thresholds) {
            max_diff = max_diff.max((a - b).abs() as f64);
            same += usize::from((a >= t) == (b >= t));
            total += 1;
        }
    }
    RowSummary {
        engine: row.spec.engine.clone(),
        engine_version: row.engine_version.clone(),
        model: row.spec.model_kind.clone(),
        mode: row.precision.clone(),
        threads: row.spec.threads,
        p50_ms: percentile(&sorted, 50.0),
        p90_ms: percentile(&sorted, 90.0),
        p99_ms: percentile(&sorted, 99.0),
        mean_ms: mean,
        frames_per_s: 1e3 / mean,
        peak_rss_mb: row.peak_rss_mb,
        load_optimize_ms: row.load_ms + row.optimize_ms,
        max_score_diff: max_diff,
        decision_agreement: if total == 0 { 1.0 } else { same as f64 / total as f64 },
        p50_ratio: percentile(&sorted, 50.0) / percentile(&base_sorted, 50.0),
        rss_ratio: row.peak_rss_mb / baseline.peak_rss_mb,
    }
}

/// The table `bench` prints.
pub fn render_table(summaries: &[RowSummary], failures: &[(RowSpec, String)]) -> String {
    let mut out = String::new();
    out.push_str(
        "engine       model    mode          thr   p50 ms   p90 ms   p99 ms  frames/s  RSS MB  load ms  max|dscore|  agree   p50/base  RSS/base\n",
    );
    for s in summaries {
        out.push_str(&format!(
            "{:<12} {:<8} {:<13} {:>3} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>7.1} {:>8.0} {:>12.4} {:>6.1}% {:>9.2} {:>9.2}\n",
            s.engine,
            s.model,
            s.mode,
            s.threads,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.frames_per_s,
            s.peak_rss_mb,
            s.load_optimize_ms,
            s.max_score_diff,
            s.decision_agreement * 100.0,
            s.p50_ratio,
            s.rss_ratio
        ));
    }
    for (spec, why) in failures {
        out.push_str(&format!(
            "{:<12} {:<8} {:<13} {:>3}  not measured: {}\n",
            spec.engine,
            spec.model_kind,
            spec.int8,
            spec.threads,
            why.lines().next().unwrap_or_default()
        ));
    }
    out
}

/// Image files (JPEG/PNG) in a folder, sorted, or the files given.
pub fn collect_images(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut images = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading image folder {}", path.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
                })
                .collect();
            found.sort();
            images.extend(found);
        } else {
            images.push(path.clone());
        }
    }
    if images.is_empty() {
        bail!("no JPEG or PNG images in {:?}", paths);
    }
    Ok(images)
}

/// `bench --profile`: per tract row, where an inference's time goes by kind
/// of operator, with each kind's share.
pub fn render_profile(rows: &[RowResult]) -> String {
    let mut out = String::new();
    for row in rows.iter().filter(|r| !r.profile.kinds.is_empty()) {
        let total: f64 = row.profile.kinds.iter().map(|t| t.ms).sum();
        out.push_str(&format!(
            "\n{} {} {} threads={}: {:.2} ms per inference in tract's nodes\n",
            row.spec.engine, row.spec.model_kind, row.precision, row.spec.threads, total
        ));
        out.push_str("  kind of operator                                nodes       ms   share\n");
        for t in &row.profile.kinds {
            out.push_str(&format!(
                "  {:<46} {:>6} {:>8.2} {:>6.1}%\n",
                t.kind,
                t.nodes,
                t.ms,
                100.0 * t.ms / total.max(1e-9)
            ));
        }
        out.push_str("  slowest nodes:\n");
        for t in &row.profile.slowest {
            let text: String = t.kind.chars().take(160).collect();
            out.push_str(&format!("  {:>8.3} ms  {text}\n", t.ms));
        }
    }
    out
}

/// The CPU this ran on, for the table's heading.
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{model}, {cores} cores available")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(latencies: &[f64], scores: Vec<Vec<f32>>, rss: f64) -> RowResult {
        RowResult {
            spec: RowSpec {
                model: "m.onnx".into(),
                model_kind: "int8".into(),
                engine: "tract".into(),
                int8: "native".into(),
                threads: 1,
                onnxruntime_library: None,
                images: vec![],
                iterations: latencies.len(),
                warmup: 0,
                profile: false,
            },
            engine_version: "tract".into(),
            precision: "native".into(),
            load_ms: 1.0,
            optimize_ms: 2.0,
            latencies_ms: latencies.to_vec(),
            peak_rss_mb: rss,
            scores,
            thresholds: vec![0.5, 0.5],
            profile: Default::default(),
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 90.0), 7.0);
    }

    #[test]
    fn a_row_is_compared_with_the_baseline_in_speed_memory_and_decisions() {
        let base = result(&[10.0, 10.0, 10.0], vec![vec![0.9, 0.1]], 100.0);
        let row = result(&[5.0, 5.0, 5.0], vec![vec![0.45, 0.1]], 50.0);
        let s = summarise(&base, &row);
        assert_eq!(s.p50_ratio, 0.5);
        assert_eq!(s.rss_ratio, 0.5);
        assert!((s.max_score_diff - 0.45).abs() < 1e-6);
        assert_eq!(s.decision_agreement, 0.5);
        assert_eq!(s.frames_per_s, 200.0);
    }

    #[test]
    fn tract_gets_both_int8_modes_and_the_fp32_model_comes_first_per_engine() {
        let plan = BenchPlan {
            int8_model: "i.onnx".into(),
            fp32_model: Some("f.onnx".into()),
            int8_cpu_model: None,
            images: vec![],
            threads: vec![1, 2],
            engines: vec![EngineKind::OnnxRuntime, EngineKind::Tract],
            iterations: 1,
            warmup: 0,
            onnxruntime_library: None,
            profile: false,
        };
        let rows = plan.rows();
        let names: Vec<String> =
            rows.iter().map(|r| format!("{} {} {} {}", r.engine, r.model_kind, r.int8, r.threads)).collect();
        assert_eq!(
            names[..5],
            [
                "onnxruntime fp32 native 1",
                "onnxruntime int8 native 1",
                "tract fp32 native 1",
                "tract int8 native 1",
                "tract int8 weights-only 1"
            ]
        );
        assert_eq!(rows.len(), 10);
    }

    #[test]
    fn the_cpu_quantised_model_is_an_extra_row_for_onnx_runtime_only() {
        let plan = BenchPlan {
            int8_model: "m-int8.onnx".into(),
            fp32_model: None,
            int8_cpu_model: Some("m-int8-cpu.onnx".into()),
            images: vec![],
            threads: vec![1],
            engines: vec![EngineKind::OnnxRuntime, EngineKind::Tract],
            iterations: 1,
            warmup: 0,
            onnxruntime_library: None,
            profile: false,
        };
        let names: Vec<String> = plan
            .rows()
            .iter()
            .map(|r| format!("{} {} {} {}", r.engine, r.model_kind, r.int8, r.model.display()))
            .collect();
        assert_eq!(
            names,
            [
                "onnxruntime int8 native m-int8.onnx",
                "onnxruntime int8-cpu native m-int8-cpu.onnx",
                "tract int8 native m-int8.onnx",
                "tract int8 weights-only m-int8.onnx"
            ]
        );
    }
}
