//! The ONNX Runtime engine: the fast INT8 path on x86 and ARM CPUs and, with
//! the `tensorrt` feature, the TensorRT path on Jetson.
//!
//! Nothing of ONNX Runtime is linked at build time: `ort` is built with
//! `load-dynamic`, and the shared library is opened at load from
//! `model.onnxruntime_library`, else `ORT_DYLIB_PATH`, else the system's
//! `libonnxruntime.so`. Every failure to find or open it is an error that
//! says where labelcast looked and how to point it elsewhere.
//!
//! ONNX Runtime runs QDQ graphs correctly and as integer math, so the graph
//! is handed over as written: no repair, no INT8 mode.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, bail};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use super::prepare::{self, EngineFacts, Rewrite};
use super::{Engine, InputElement, InputSpec, ModelInfo, Tensor};
use crate::config::{ConfigError, EngineKind, ModelConfig};

/// `ort`'s loader panics on some malformed libraries; it also keeps the first
/// library it opened for the life of the process, so the outcome is kept too.
static RUNTIME: OnceLock<Result<RuntimeLibrary, String>> = OnceLock::new();

#[derive(Clone)]
struct RuntimeLibrary {
    path: PathBuf,
    version: String,
    environment: ort::environment::Environment,
}

pub struct OrtEngine {
    info: ModelInfo,
    session: Session,
    input: InputSpec,
    output_name: String,
    /// Reused buffers for inputs that are not NCHW float.
    scratch: Vec<f32>,
    bytes: Vec<u8>,
}

impl OrtEngine {
    pub fn load(config: &ModelConfig, require_labels: bool) -> anyhow::Result<OrtEngine> {
        if config.engine == EngineKind::TensorRt {
            tensorrt::check_built()?;
        }
        let runtime = open_runtime(config.onnxruntime_library.as_deref())?;
        let path = config.path.as_path();
        let prepared = prepare::prepare(config, require_labels, Rewrite::None)?;
        let input = prepared.input;
        let output_name = prepared.output_name.clone();
        let started = Instant::now();
        let built = std::panic::catch_unwind(AssertUnwindSafe(|| {
            build_session(&runtime.environment, config, path, input, &output_name)
        }));
        let (session, output_shape, engine_name) = match built {
            Ok(Ok(ok)) => ok,
            Ok(Err(err)) => return Err(engine_error(config.engine, path, err)),
            Err(_) => bail!("{}: ONNX Runtime panicked while creating the session", path.display()),
        };
        let built = EngineFacts {
            engine: engine_name,
            engine_version: format!("ONNX Runtime {} ({})", runtime.version, runtime.path.display()),
            threads: config.threads,
            output_shape,
            // The session is built from the file in one step: all of it counts as optimising.
            graph_time: std::time::Duration::ZERO,
            optimize_time: started.elapsed(),
        };
        let info = prepared.into_info(path, built, require_labels)?;
        info.log_loaded();
        Ok(OrtEngine { info, session, input, output_name, scratch: Vec::new(), bytes: Vec::new() })
    }

    /// Runs one input, converted to the model's layout and element type.
    fn run(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>> {
        run_session(&mut self.session, self.input, &self.output_name, input, &mut self.scratch, &mut self.bytes)
            .map(|(_, scores)| scores)
    }
}

/// One inference; the output named `output_name` as floats, and its shape.
fn run_session(
    session: &mut Session,
    spec: InputSpec,
    output_name: &str,
    input: &Tensor,
    scratch: &mut Vec<f32>,
    bytes: &mut Vec<u8>,
) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let shape = spec.model_shape();
    let err = |e: ort::Error| anyhow::anyhow!("{e}");
    let outputs = match spec.element {
        InputElement::F32 => {
            let values = spec.layout_f32(input, scratch);
            let tensor = TensorRef::from_array_view((shape, values)).map_err(err)?;
            session.run(ort::inputs![tensor]).map_err(err)?
        }
        InputElement::U8 => {
            spec.layout_u8(input, scratch, bytes);
            let tensor = TensorRef::from_array_view((shape, bytes.as_slice())).map_err(err)?;
            session.run(ort::inputs![tensor]).map_err(err)?
        }
    };
    let output = outputs.get(output_name).with_context(|| format!("the model produced no output {output_name:?}"))?;
    let (shape, scores) = output.try_extract_tensor::<f32>().map_err(err)?;
    Ok((shape.iter().map(|&d| d.max(0) as usize).collect(), scores.to_vec()))
}

fn build_session(
    environment: &ort::environment::Environment,
    config: &ModelConfig,
    path: &Path,
    input: InputSpec,
    output_name: &str,
) -> anyhow::Result<(Session, Vec<usize>, &'static str)> {
    let ort_err = |err: ort::Error<_>| anyhow::anyhow!("{err}");
    let mut builder = Session::builder(environment)
        .map_err(|err| anyhow::anyhow!("{err}"))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort_err)?
        .with_intra_threads(config.threads)
        .map_err(ort_err)?
        .with_inter_threads(1)
        .map_err(ort_err)?
        .with_intra_op_spinning(spinning_leaves_a_core(config.threads))
        .map_err(ort_err)?;
    let engine_name = match config.engine {
        EngineKind::TensorRt => {
            // The engine cache is keyed by the model's bytes.
            let bytes = std::fs::read(path).with_context(|| format!("reading model {}", path.display()))?;
            builder = tensorrt::register(builder, config, &bytes)?;
            "tensorrt"
        }
        _ => "onnxruntime",
    };
    // From the file, not from memory: ONNX Runtime then finds external data
    // (`model.onnx.data`) beside the model whatever the working directory.
    let mut session = builder.commit_from_file(path).map_err(|err| anyhow::anyhow!("{err}"))?;
    // One run now: it fixes the output shape and takes the first-run cost
    // (allocations, kernel selection) before the first real frame.
    let zeros = Tensor::zeros(input.shape);
    let (output_shape, _) = run_session(&mut session, input, output_name, &zeros, &mut Vec::new(), &mut Vec::new())
        .context("first inference failed")?;
    Ok((session, output_shape, engine_name))
}

impl Engine for OrtEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn infer(&mut self, input: &Tensor) -> anyhow::Result<Vec<f32>> {
        self.info.check_input(input)?;
        self.run(input)
    }
}

/// Where to find `libonnxruntime.so`, in order: the config, `ORT_DYLIB_PATH`,
/// the dynamic loader's search path.
fn library_candidate(configured: Option<&Path>) -> (PathBuf, &'static str) {
    if let Some(path) = configured {
        return (path.to_path_buf(), "model.onnxruntime_library");
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return (PathBuf::from(path), "ORT_DYLIB_PATH");
    }
    (PathBuf::from("libonnxruntime.so"), "the system library path")
}

fn open_runtime(configured: Option<&Path>) -> anyhow::Result<RuntimeLibrary> {
    let outcome = RUNTIME.get_or_init(|| {
        let (path, from) = library_candidate(configured);
        if path.components().count() > 1 && !path.exists() {
            return Err(format!(
                "{} (from {from}) does not exist; install ONNX Runtime (>= 1.17) and point model.onnxruntime_library or ORT_DYLIB_PATH at its libonnxruntime.so",
                path.display()
            ));
        }
        let opened = std::panic::catch_unwind(|| -> Result<ort::environment::Environment, String> {
            let builder = ort::init_from(&path).map_err(|err| err.to_string())?;
            builder.with_name("labelcast").with_telemetry(false).build().map_err(|err| err.to_string())
        });
        match opened {
            Ok(Ok(environment)) => Ok(RuntimeLibrary { version: runtime_version(&path), path, environment }),
            Ok(Err(err)) => Err(format!(
                "cannot load ONNX Runtime from {} (from {from}): {err}; install ONNX Runtime (>= 1.17) and point model.onnxruntime_library or ORT_DYLIB_PATH at its libonnxruntime.so",
                path.display()
            )),
            Err(_) => Err(format!("{} (from {from}) is not a usable ONNX Runtime library", path.display())),
        }
    });
    match outcome {
        Ok(runtime) => {
            let (wanted, _) = library_candidate(configured);
            if wanted != runtime.path && wanted.components().count() > 1 {
                tracing::warn!(
                    loaded = %runtime.path.display(),
                    ignored = %wanted.display(),
                    "ONNX Runtime is already loaded in this process; one process can hold only one"
                );
            }
            Ok(runtime.clone())
        }
        Err(message) => Err(ConfigError::new("model.onnxruntime_library", message.clone()).into()),
    }
}

/// ONNX Runtime's own version, from its build string (`git-branch=rel-1.32.0`).
fn runtime_version(path: &Path) -> String {
    let info = std::panic::catch_unwind(ort::info).unwrap_or_default();
    info.split([',', ' '])
        .find_map(|part| part.trim().strip_prefix("git-branch=rel-"))
        .map(str::to_string)
        .or_else(|| {
            let name = path.file_name()?.to_string_lossy().into_owned();
            name.strip_prefix("libonnxruntime.so.").map(str::to_string)
        })
        .unwrap_or_else(|| "(version unknown)".to_string())
}

/// Whether ONNX Runtime's idle pool threads may spin (the faster wake-up)
/// without taking the core the daemon's preprocess thread needs, which runs
/// beside inference: only when the pool leaves a core free. On two cores
/// with two threads, spinning made the preprocess thread wait for a core.
fn spinning_leaves_a_core(threads: usize) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    threads < cores
}

fn engine_error(engine: EngineKind, path: &Path, err: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!("{}: {} could not create a session: {err:#}", path.display(), engine.as_str())
}

#[cfg(feature = "tensorrt")]
mod tensorrt {
    //! The TensorRT and CUDA execution providers. TensorRT builds an engine
    //! for the exact GPU, TensorRT version and precision, which takes
    //! minutes on a Jetson; built engines are cached on disk under a key of
    //! all of these, so a restart (or an upgrade of any of them) never runs
    //! a stale engine.

    use std::path::Path;

    use crate::config::{ModelConfig, TensorRtPrecision};
    use ort::ep::{CUDA, ExecutionProvider, TensorRT};
    use ort::session::builder::SessionBuilder;

    pub fn check_built() -> anyhow::Result<()> {
        Ok(())
    }

    pub fn register(builder: SessionBuilder, config: &ModelConfig, model: &[u8]) -> anyhow::Result<SessionBuilder> {
        if !TensorRT::is_available().unwrap_or(false) {
            anyhow::bail!(
                "this ONNX Runtime has no TensorRT execution provider; use a JetPack build of onnxruntime-gpu and point model.onnxruntime_library at it"
            );
        }
        let trt = &config.tensorrt;
        let key = cache_key(model, &ort_version(), &tensorrt_version(), &gpu_name(), trt.precision);
        let cache = trt.cache_dir.join(&key);
        let mut provider = TensorRT::default()
            .with_fp16(trt.precision != TensorRtPrecision::Fp32)
            .with_int8(trt.precision == TensorRtPrecision::Int8)
            .with_max_workspace_size(trt.workspace_bytes);
        match cache_problem(&cache, model.len() as u64) {
            None => {
                tracing::info!(cache = %cache.display(), precision = trt.precision.as_str(), dla_core = ?trt.dla_core, "TensorRT: engines are cached here; the first build takes minutes");
                provider = provider
                    .with_engine_cache(true)
                    .with_engine_cache_path(cache.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(cache.display());
            }
            // The daemon still runs, as a user would want at 3 a.m.; only
            // every start pays the engine build again.
            Some(problem) => tracing::warn!(
                cache = %cache.display(),
                problem,
                "TensorRT engine cache unusable: running without it, so every start builds the engine again (minutes); free some space or fix the folder, or set model.tensorrt.cache_dir"
            ),
        }
        if let Some(core) = trt.dla_core {
            provider = provider.with_dla(true).with_dla_core(core);
        }
        builder
            .with_execution_providers([provider.build().error_on_failure(), CUDA::default().build()])
            .map_err(|err| anyhow::anyhow!("{err}"))
    }

    /// Why the engine cache folder cannot be used, if it cannot: it cannot
    /// be created, written (a read-only state directory) or has too little
    /// room for an engine. TensorRT writes its engine files without
    /// checking the writes (ONNX Runtime's provider), so a full disk would
    /// leave a truncated engine behind for the next start to trip on;
    /// better to find out before the build.
    pub fn cache_problem(dir: &Path, model_bytes: u64) -> Option<String> {
        if let Err(err) = std::fs::create_dir_all(dir) {
            return Some(format!("cannot create it: {err}"));
        }
        let probe = dir.join(".labelcast-write-probe");
        let written = std::fs::write(&probe, b"labelcast").and_then(|()| std::fs::File::open(&probe)?.sync_all());
        let _ = std::fs::remove_file(&probe);
        if let Err(err) = written {
            return Some(format!("cannot write to it: {err}"));
        }
        match rustix::fs::statvfs(dir) {
            Ok(stats) => room_problem(stats.f_bavail.saturating_mul(stats.f_frsize), model_bytes),
            Err(err) => Some(format!("cannot tell how much room it has: {err}")),
        }
    }

    /// An engine and its timing cache take a few times the ONNX file's
    /// size (FP16 weights of an INT8 model, tactics, padding); ask for four
    /// times the model and never less than 64 MiB. A design margin, not a
    /// measurement: no GPU here to measure engines on.
    pub fn room_problem(free_bytes: u64, model_bytes: u64) -> Option<String> {
        let needed = model_bytes.saturating_mul(4).max(64 << 20);
        (free_bytes < needed)
            .then(|| format!("{} MiB free, an engine needs about {} MiB", free_bytes >> 20, needed >> 20))
    }

    /// The cache folder name: every input that changes the built engine.
    pub fn cache_key(model: &[u8], ort: &str, tensorrt: &str, gpu: &str, precision: TensorRtPrecision) -> String {
        let key = crate::engine::model_key(model, &[ort, tensorrt, gpu, precision.as_str()]);
        format!("{}-{}", precision.as_str(), &key[..32])
    }

    fn ort_version() -> String {
        ort::info().to_string()
    }

    /// TensorRT's version from `getInferLibVersion` in libnvinfer.
    fn tensorrt_version() -> String {
        for name in ["libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"] {
            // SAFETY: libnvinfer's initialisers only register plugins; the
            // symbol is a plain C function returning an int.
            let Ok(lib) = (unsafe { libloading::Library::new(name) }) else { continue };
            let version: Result<libloading::Symbol<unsafe extern "C" fn() -> i32>, _> =
                unsafe { lib.get(b"getInferLibVersion") };
            if let Ok(version) = version {
                let v = unsafe { version() };
                return format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
            }
        }
        "unknown".to_string()
    }

    /// The board (Jetson) or GPU model.
    fn gpu_name() -> String {
        let jetson = std::fs::read_to_string("/proc/device-tree/model").ok();
        let dgpu = || {
            let dir = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?.flatten().next()?;
            let text = std::fs::read_to_string(dir.path().join("information")).ok()?;
            text.lines().find_map(|l| l.strip_prefix("Model:")).map(|m| m.trim().to_string())
        };
        jetson
            .map(|m| m.trim_end_matches('\0').to_string())
            .or_else(dgpu)
            .unwrap_or_else(|| Path::new("unknown-gpu").display().to_string())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_engine_cache_key_changes_with_every_input_that_changes_the_engine() {
            let base = cache_key(b"model", "1.20", "10.3.0", "Orin", TensorRtPrecision::Fp16);
            assert_eq!(base, cache_key(b"model", "1.20", "10.3.0", "Orin", TensorRtPrecision::Fp16));
            for other in [
                cache_key(b"model2", "1.20", "10.3.0", "Orin", TensorRtPrecision::Fp16),
                cache_key(b"model", "1.21", "10.3.0", "Orin", TensorRtPrecision::Fp16),
                cache_key(b"model", "1.20", "10.4.0", "Orin", TensorRtPrecision::Fp16),
                cache_key(b"model", "1.20", "10.3.0", "Xavier", TensorRtPrecision::Fp16),
                cache_key(b"model", "1.20", "10.3.0", "Orin", TensorRtPrecision::Int8),
            ] {
                assert_ne!(base, other);
            }
            assert!(base.starts_with("fp16-"));
        }

        #[test]
        fn an_engine_cache_folder_that_cannot_be_created_is_a_problem_that_names_why() {
            let dir = tempfile::tempdir().unwrap();
            let file_in_the_way = dir.path().join("state");
            std::fs::write(&file_in_the_way, b"not a folder").unwrap();
            let problem = cache_problem(&file_in_the_way.join("fp16-0123"), 10 << 20).expect("a problem");
            assert!(problem.starts_with("cannot create it:"), "{problem}");
        }

        #[test]
        fn a_writable_engine_cache_folder_with_room_is_used_and_left_clean() {
            let dir = tempfile::tempdir().unwrap();
            let cache = dir.path().join("engines/fp16-0123");
            assert_eq!(cache_problem(&cache, 1 << 20), None);
            assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0, "the write probe is removed");
        }

        #[test]
        fn an_engine_cache_on_a_nearly_full_disk_is_refused_before_the_build() {
            assert_eq!(room_problem(1 << 30, 10 << 20), None);
            let small_model = room_problem(50 << 20, 1 << 20).expect("below the 64 MiB floor");
            assert_eq!(small_model, "50 MiB free, an engine needs about 64 MiB");
            assert!(room_problem(300 << 20, 100 << 20).is_some(), "a 100 MB model needs 400 MiB");
        }
    }
}

#[cfg(not(feature = "tensorrt"))]
mod tensorrt {
    use ort::session::builder::SessionBuilder;

    use crate::config::{ConfigError, ModelConfig};

    pub fn register(builder: SessionBuilder, _: &ModelConfig, _: &[u8]) -> anyhow::Result<SessionBuilder> {
        check_built()?;
        Ok(builder)
    }

    pub fn check_built() -> anyhow::Result<()> {
        Err(ConfigError::new(
            "model.engine",
            "\"tensorrt\" is not in this build: rebuild with `cargo build --release --features tensorrt` (JetPack 6, onnxruntime-gpu with TensorRT)",
        )
        .into())
    }
}
