//! The `labelcast` command line: subcommands, exit codes and printing
//! errors. The work lives in the library; this file only glues it together.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

use labelcast::classify::FrameClassifier;
use labelcast::config::{self, Config, EXIT_CONFIG, Overrides, RawConfig};
use labelcast::engine;
use labelcast::labels::{self, LabelEvent, LabelScore};
use labelcast::publish::payload;
use labelcast::{bench, pipeline, source, telemetry};

#[derive(Parser)]
#[command(name = "labelcast", version, about = "Camera frames in, labels out on MQTT: an edge inference daemon")]
struct Cli {
    /// Log level when RUST_LOG is not set (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

/// Flags that replace the config file's values, for `run` and `check-config`.
#[derive(clap::Args, Default)]
struct OverrideArgs {
    /// Frame source URI, e.g. file:///photos?fps=2&loop=true or test://pattern.
    #[arg(long)]
    source: Option<String>,
    /// ONNX model file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// MQTT broker, e.g. mqtt://192.168.1.10:1883 or mqtts://broker:8883.
    #[arg(long)]
    mqtt: Option<String>,
    /// Where labels go: mqtt or stdout.
    #[arg(long)]
    output: Option<String>,
    /// Device id used in topics and the MQTT client id.
    #[arg(long)]
    device_id: Option<String>,
    /// Inference engine: tract, onnxruntime or tensorrt.
    #[arg(long)]
    engine: Option<String>,
    /// Inference threads.
    #[arg(long)]
    threads: Option<i64>,
    /// Address for the status page, /metrics and /healthz (default 127.0.0.1:9464), or "off".
    #[arg(long)]
    http_listen: Option<String>,
}

/// Engine choice for the one-shot commands (the daemon takes them from the config).
#[derive(clap::Args, Default, Clone)]
struct EngineArgs {
    /// Inference engine: tract, onnxruntime or tensorrt.
    #[arg(long)]
    engine: Option<String>,
    /// How tract runs an INT8 model: native or weights-only.
    #[arg(long)]
    int8: Option<String>,
    /// Inference threads.
    #[arg(long)]
    threads: Option<i64>,
    /// The INT8 rewrite's check against the graph as quantised: fallback, error or off.
    #[arg(long)]
    int8_check: Option<String>,
}

impl EngineArgs {
    fn apply(&self, model: &mut config::RawModel) {
        if self.int8_check.is_some() {
            model.int8_check = self.int8_check.clone();
        }
        if self.engine.is_some() {
            model.engine = self.engine.clone();
        }
        if self.int8.is_some() {
            model.int8 = self.int8.clone();
        }
        if self.threads.is_some() {
            model.threads = self.threads;
        }
    }
}

impl OverrideArgs {
    fn overrides(self) -> Overrides {
        Overrides {
            device_id: self.device_id,
            source: self.source,
            model: self.model,
            mqtt_url: self.mqtt,
            output: self.output,
            engine: self.engine,
            threads: self.threads,
            http_listen: self.http_listen,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT/SIGTERM (or until a finite source ends).
    Run {
        /// TOML config file (see systemd/config.example.toml). Without one, the
        /// embedded defaults: the demo model, the sample photos, an in-process broker.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Classify image files and print the labels above threshold.
    Classify {
        /// Image files (JPEG or PNG).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// ONNX model file (default: the config's, or the demo model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Config file whose [model] and [labels] sections apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        engine: EngineArgs,
        /// One JSON object per image instead of a table.
        #[arg(long)]
        json: bool,
        /// Testing: also write each image's model input (NCHW float32,
        /// little-endian) to DIR/<n>.f32, so another runtime can be fed the
        /// very same tensor (tests/int8_matrix.py).
        #[arg(long, hide = true, value_name = "DIR")]
        dump_input: Option<PathBuf>,
    },
    /// Show what a model file holds and how long the engine takes to load it.
    ModelInfo {
        model: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        #[arg(long)]
        json: bool,
    },
    /// Measure each engine and INT8 mode in this build on the model: latency,
    /// throughput, peak memory, load time and agreement, side by side.
    Bench {
        #[command(flatten)]
        args: BenchArgs,
        /// Internal: measure one row (JSON) in this process.
        #[arg(long, hide = true)]
        row: Option<String>,
    },
    /// List the cameras on this machine and what they offer; with --source,
    /// grab frames from one and report the negotiated format, frame rate and
    /// decode time.
    Probe {
        /// A source URI to measure, e.g. v4l2:///dev/video0?width=1280&height=720 or /dev/video0.
        #[arg(long)]
        source: Option<String>,
        /// Frames to grab with --source.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(2..=10_000))]
        frames: u32,
    },
    /// Validate a config file (and the model it names) without running anything.
    CheckConfig {
        /// The TOML config file to check, e.g. /etc/labelcast/config.toml.
        config: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Run { config, overrides } => run(config, overrides.overrides()),
        Command::Classify { images, model, config, engine, json, dump_input } => {
            classify(&images, model, config, &engine, json, dump_input.as_deref())
        }
        Command::ModelInfo { model, engine, json } => model_info(&model, &engine, json),
        Command::Bench { args, row } => match row {
            Some(row) => bench_row(&row),
            None => bench(args),
        },
        Command::CheckConfig { config, overrides } => check_config(config, overrides.overrides()),
        Command::Probe { source, frames } => probe(source.as_deref(), frames),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("labelcast: error: {err:#}");
            if config::is_config_error(&err) { ExitCode::from(EXIT_CONFIG as u8) } else { ExitCode::FAILURE }
        }
    }
}

fn run(config_path: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<ExitCode> {
    // Two worker threads: the MQTT client and the embedded broker's glue are
    // light; capture and inference run on their own OS threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Before anything slow: until these handlers exist, a SIGHUP (or
        // SIGTERM) kills the process without a word, and systemd counts death
        // by SIGHUP as clean, so Restart=on-failure would not bring it back.
        let signals = Signals::install();
        let config = Config::load(config_path.as_deref(), &overrides)?;
        pipeline::run(config, signals.shutdown()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM, SIGINT and SIGHUP, listened for from the moment they are installed.
struct Signals(Option<[tokio::signal::unix::Signal; 3]>);

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup())) {
            (Ok(term), Ok(int), Ok(hup)) => Self(Some([term, int, hup])),
            _ => {
                tracing::error!("cannot listen for SIGTERM/SIGINT/SIGHUP; stop the daemon with SIGKILL");
                Self(None)
            }
        }
    }

    /// Completes on SIGTERM or SIGINT; SIGHUP is logged and ignored.
    async fn shutdown(self) {
        let Some([term, int, hup]) = self.0 else { return std::future::pending().await };
        shutdown_signal(term, int, hup).await
    }
}

async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    mut hup: tokio::signal::unix::Signal,
) {
    loop {
        tokio::select! {
            _ = term.recv() => return tracing::info!("SIGTERM received"),
            _ = int.recv() => return tracing::info!("SIGINT received"),
            // A half-applied config on a device nobody watches is worse than
            // a restart: reloading is deliberately not supported.
            _ = hup.recv() => tracing::warn!(
                "SIGHUP received: reloading the config is not supported; restart labelcast to apply changes (systemctl restart labelcast)"
            ),
        }
    }
}

fn classify(
    images: &[PathBuf],
    model: Option<PathBuf>,
    config_path: Option<PathBuf>,
    engine_args: &EngineArgs,
    json: bool,
    dump_input: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    if let Some(dir) = dump_input {
        std::fs::create_dir_all(dir).with_context(|| format!("--dump-input {}", dir.display()))?;
    }
    let mut raw = match &config_path {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    if model.is_some() {
        raw.model.path = model;
    }
    engine_args.apply(&mut raw.model);
    let mut model_config = config::validate_model(&raw.model, config::data_dir().as_deref())?;
    model_config.check_cache = config::cache_dir(raw.service.cache_dir.as_deref());
    let policy = config::validate_labels(&raw.labels)?;
    let max_pixels = config::validate_max_frame_pixels(&raw.source)?;
    let engine = engine::load(&model_config)?;
    let rules = labels::resolve_rules(&policy, &engine.info().metadata)?;
    let reporting = labels::Reporting::new(&policy, rules.len());
    let mut classifier = FrameClassifier::new(engine).with_max_frame_pixels(max_pixels);
    let model_name: std::sync::Arc<str> = classifier.info().metadata.name.as_str().into();
    let mut failures = 0;
    for (index, path) in images.iter().enumerate() {
        let result = source::read_frame_limited(path, index as u64, max_pixels)
            .map_err(anyhow::Error::from)
            .and_then(|frame| Ok(classifier.classify(&frame)?))
            .map(|c| {
                let total = c.inference + c.preprocess.decode + c.preprocess.fit_normalise;
                (c.scores, c.inference.as_secs_f64() * 1e3, total.as_secs_f64() * 1e3)
            });
        let (scores, inference_ms, frame_ms) = match result {
            Ok(ok) => ok,
            Err(err) => {
                failures += 1;
                eprintln!("labelcast: error: {}: {err:#}", path.display());
                continue;
            }
        };
        if let Some(dir) = dump_input {
            let tensor = classifier.last_input();
            let bytes: Vec<u8> = tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            let file = dir.join(format!("{index}.f32"));
            std::fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))?;
        }
        let event = LabelEvent {
            sequence: index as u64,
            timestamp: std::time::SystemTime::now(),
            origin: Some(path.display().to_string().into()),
            model: model_name.clone(),
            inference_ms,
            frame_ms,
            labels: reporting
                .select(&scores, |i| scores[i] >= rules[i].on)
                .into_iter()
                .map(|i| LabelScore { name: rules[i].name.clone(), score: scores[i], on: scores[i] >= rules[i].on })
                .collect(),
            changed: Vec::new(),
            camera: None,
            regions: Vec::new(),
        };
        if json {
            println!("{}", payload::labels_json(&event));
        } else {
            let hits: Vec<String> = labels::above_threshold(&rules, &scores)
                .map(|(rule, score)| format!("{} {:.3}", rule.name, score))
                .collect();
            let shown = if hits.is_empty() { "(no label above threshold)".to_string() } else { hits.join("  ") };
            println!("{}\t{shown}", path.display());
        }
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn model_info(path: &std::path::Path, engine_args: &EngineArgs, json_out: bool) -> anyhow::Result<ExitCode> {
    let mut raw = config::RawModel::default();
    engine_args.apply(&mut raw);
    raw.path = Some(path.to_path_buf());
    let model_config = config::validate_model(&raw, None)?;
    let engine = engine::inspect(path, &model_config)?;
    let info = engine.info();
    let meta = &info.metadata;
    let size_mb = std::fs::metadata(path).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    if json_out {
        let value = json!({
            "path": path.display().to_string(),
            "size_mb": (size_mb * 100.0).round() / 100.0,
            "name": meta.name,
            "version": meta.version,
            "backbone": meta.backbone,
            "recipe_hash": meta.recipe_hash,
            "input": {
                "name": info.input_name,
                "shape": info.input_shape,
                "dims": info.input_dims,
                "layout": info.input_layout.as_str(),
                "type": info.input_type,
            },
            "output": { "name": info.output_name, "shape": info.output_shape, "kind": meta.output.as_str(), "of": info.outputs },
            "external_tensors": info.external_tensors,
            "int8": info.is_int8(),
            "int8_format": info.int8_format.map(|f| f.as_str()),
            "int8_mode": info.int8_mode.map(|m| m.as_str()),
            "quantize_linear": info.quantize_linear,
            "dequantize_linear": info.dequantize_linear,
            "activation_qdq_removed": info.activation_qdq_removed,
            "saturation_clips": info.saturation_clips,
            "activation_qdq_kept": info.activation_qdq_kept,
            "qdq_repaired": info.qdq_repaired,
            "int8_selfcheck": info.selfcheck.as_ref().map(|c| json!({
                "mode": c.mode.as_str(),
                "max_difference": c.max_difference(),
                "tolerance": c.tolerance,
                "fell_back": c.fell_back(),
                "took_ms": c.took().as_secs_f64() * 1e3,
            })),
            "labels": meta.labels,
            "labels_from": meta.labels_from,
            "thresholds": meta.thresholds,
            "preprocess": { "resize": meta.resize.as_str(), "mean": meta.mean, "std": meta.std },
            "engine": {
                "name": info.engine,
                "version": info.engine_version,
                "threads": info.threads,
                "load_ms": info.load_time.as_secs_f64() * 1e3,
                "optimize_ms": info.optimize_time.as_secs_f64() * 1e3,
            },
        });
        println!("{value:#}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("model        {} ({size_mb:.1} MB)", path.display());
    let mut name = meta.name.clone();
    if let Some(version) = &meta.version {
        name += &format!(" v{version}");
    }
    if let Some(backbone) = &meta.backbone {
        name += &format!(", backbone {backbone}");
    }
    println!("name         {name}");
    println!(
        "input        {} {} {} ({}; labelcast prepares {:?})",
        info.input_name,
        info.input_type,
        info.input_dims,
        info.input_layout.as_str().to_uppercase(),
        info.input_shape
    );
    let of = if info.outputs > 1 { format!(", 1 of {} outputs", info.outputs) } else { String::new() };
    println!("output       {} {:?} ({}{of})", info.output_name, info.output_shape, meta.output.as_str());
    if info.external_tensors > 0 {
        println!("weights      {} tensors in external data files beside the model", info.external_tensors);
    }
    match (info.int8_format, info.int8_mode) {
        (Some(format), Some(mode)) => {
            println!(
                "int8         yes ({}): {} QuantizeLinear, {} DequantizeLinear; runs {}",
                format.as_str(),
                info.quantize_linear,
                info.dequantize_linear,
                mode.as_str()
            );
            if info.activation_qdq_removed > 0 {
                println!(
                    "             weights-only: {} activation quantise/dequantise pairs removed, {} of them clamped to the range the quantiser folded in",
                    info.activation_qdq_removed, info.saturation_clips
                );
            }
            if info.activation_qdq_kept > 0 {
                println!(
                    "             {} activation pairs kept quantised (not one scale and zero point)",
                    info.activation_qdq_kept
                );
            }
            if !info.qdq_repaired.is_empty() {
                println!("             kept in float for tract: {}", info.qdq_repaired.join(", "));
            }
        }
        _ => println!("int8         no (a float model)"),
    }
    if let Some(check) = &info.selfcheck {
        println!("int8 check   {}", check.summary());
    }
    if meta.labels.is_empty() {
        println!("labels       none in the model: give them in the config (model.labels) or a sidecar .toml");
    } else {
        // A list of thousands (OpenImages' 9,605) is shown by its first
        // names; `--json` carries every one.
        println!("labels       {} from {}: {}", meta.labels.len(), meta.labels_from, labels::some_names(&meta.labels));
    }
    if !meta.thresholds.is_empty() {
        let t: Vec<String> = meta.thresholds.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("thresholds   {}", labels::some_names(&t));
    }
    println!("preprocess   {}, mean {:?}, std {:?}", meta.resize.as_str(), meta.mean, meta.std);
    println!(
        "engine       {}, {} thread(s): load {:.0} ms, optimise {:.0} ms",
        info.engine_version,
        info.threads,
        info.load_time.as_secs_f64() * 1e3,
        info.optimize_time.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}

fn probe(source: Option<&str>, frames: u32) -> anyhow::Result<ExitCode> {
    match source {
        None => print!("{}", labelcast::probe::list_devices()),
        Some(uri) => print!("{}", labelcast::probe::measure(uri, frames)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn check_config(path: PathBuf, overrides: Overrides) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(&path), &overrides)?;
    let prepared = pipeline::prepare(&config).with_context(|| format!("config file {}", path.display()))?;
    let info = prepared.first().context("no model")?.engine.info();
    let more_models = match prepared.len() {
        1 => String::new(),
        n => format!(" and {} more", n - 1),
    };
    let output = match &config.output {
        config::OutputConfig::Stdout => "stdout".to_string(),
        config::OutputConfig::Mqtt(m) => match &m.broker {
            config::BrokerChoice::External { host, port } => format!("mqtt {host}:{port}"),
            config::BrokerChoice::Embedded { listen } => format!("embedded broker on {listen}"),
        },
    };
    let sources = match config.cameras.as_slice() {
        [single] if single.id.is_none() => format!("source {}", single.source.describe()),
        cameras => {
            let each: Vec<String> = cameras
                .iter()
                .map(|c| {
                    let regions = match c.regions.len() {
                        0 => String::new(),
                        1 => ", 1 region".to_string(),
                        n => format!(", {n} regions"),
                    };
                    format!("{} = {}{regions}", c.name(), c.source.describe())
                })
                .collect();
            format!("{} cameras: {}", cameras.len(), each.join("; "))
        }
    };
    println!(
        "{}: OK (model {}{more_models}, {} labels; {sources}; output {output})",
        path.display(),
        info.path.display(),
        info.metadata.labels.len(),
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
struct BenchArgs {
    /// INT8 model (default: the demo model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// FP32 model to compare with (default: the model's -fp32 sibling when it exists).
    #[arg(long)]
    fp32: Option<PathBuf>,
    /// INT8 model with uint8 activations for the onnxruntime rows
    /// (`models/quantize.py --target cpu`; default: the model's -int8-cpu
    /// sibling when it exists).
    #[arg(long)]
    int8_cpu: Option<PathBuf>,
    /// Images or folders to run (default: the shipped photos).
    #[arg(long)]
    images: Vec<PathBuf>,
    /// Thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Engines to measure, comma-separated (default: every engine in this build).
    #[arg(long, value_delimiter = ',')]
    engines: Vec<String>,
    /// Timed inferences per row.
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// Untimed inferences per row before timing.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Interleaved passes over the rows; the timed runs are split between them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// libonnxruntime.so for the onnxruntime rows (else ORT_DYLIB_PATH).
    #[arg(long)]
    onnxruntime_library: Option<PathBuf>,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time every node of the tract rows and print where an inference's
    /// time goes, by kind of operator.
    #[arg(long)]
    profile: bool,
}

fn bench_row(row: &str) -> anyhow::Result<ExitCode> {
    let spec: bench::RowSpec =
        serde_json::from_str(row).context("bench --row takes the JSON that bench itself writes")?;
    let result = bench::run_row(&spec)?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(ExitCode::SUCCESS)
}

/// The file beside `model` whose name `rename` gives, if there is one and
/// it is another file.
fn sibling(model: &Path, rename: impl Fn(&str) -> String) -> Option<PathBuf> {
    let name = rename(&model.file_name()?.to_string_lossy());
    Some(model.with_file_name(name)).filter(|p| p.is_file() && p != model)
}

fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let data = config::data_dir();
    let int8_model = match args.model {
        Some(path) => path,
        None => data
            .as_deref()
            .map(|d| d.join(config::DEFAULT_MODEL))
            .context("the demo model was not found; give --model")?,
    };
    if !int8_model.is_file() {
        anyhow::bail!("--model {} does not exist", int8_model.display());
    }
    let fp32_model = match args.fp32 {
        Some(path) if path.is_file() => Some(path),
        Some(path) => anyhow::bail!("--fp32 {} does not exist", path.display()),
        // `m-int8.onnx` and `m-int8-cpu.onnx` both come from `m-fp32.onnx`.
        None => sibling(&int8_model, |name| name.replace("-int8-cpu.", "-fp32.").replace("-int8", "-fp32")),
    };
    let int8_cpu_model = match args.int8_cpu {
        Some(path) if path.is_file() => Some(path),
        Some(path) => anyhow::bail!("--int8-cpu {} does not exist", path.display()),
        None => sibling(&int8_model, |name| name.replace("-int8.", "-int8-cpu.")),
    };
    let image_args = if args.images.is_empty() {
        vec![
            data.as_deref()
                .map(|d| d.join(config::DEFAULT_PHOTOS))
                .context("the shipped photos were not found; give --images")?,
        ]
    } else {
        args.images
    };
    let images = bench::collect_images(&image_args)?;
    let engines = if args.engines.is_empty() {
        engine::registry::bench_defaults()
    } else {
        args.engines
            .iter()
            .map(|e| config::EngineKind::parse(e).map_err(|m| anyhow::anyhow!("--engines: {m}")))
            .collect::<anyhow::Result<_>>()?
    };
    if args.iterations == 0 || args.threads.contains(&0) {
        anyhow::bail!("--iterations and --threads must be at least 1");
    }
    let plan = bench::BenchPlan {
        int8_model,
        fp32_model,
        int8_cpu_model,
        images,
        threads: args.threads,
        engines,
        iterations: args.iterations,
        warmup: args.warmup,
        onnxruntime_library: args.onnxruntime_library,
        profile: args.profile,
    };
    let exe = std::env::current_exe().context("finding the labelcast binary to run rows")?;
    let started = std::time::Instant::now();
    let results = bench::run_plan(&exe, &plan, args.rounds, |round, spec| {
        eprintln!(
            "bench: round {} of {}: {} {} {} threads={}",
            round + 1,
            args.rounds,
            spec.engine,
            spec.model_kind,
            spec.int8,
            spec.threads
        )
    })?;
    let (done, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|(_, outcome)| outcome.is_ok());
    let done: Vec<bench::RowResult> = done.into_iter().filter_map(|(_, o)| o.ok()).collect();
    let failed: Vec<(bench::RowSpec, String)> =
        failed.into_iter().filter_map(|(s, o)| o.err().map(|e| (s, e))).collect();
    let Some(baseline) = done.first() else {
        for (spec, why) in &failed {
            eprintln!("labelcast: error: {} {}: {why}", spec.engine, spec.model_kind);
        }
        anyhow::bail!("no bench row could run");
    };
    let summaries: Vec<bench::RowSummary> = done.iter().map(|row| bench::summarise(baseline, row)).collect();
    if args.json {
        let value = json!({
            "model": plan.int8_model.display().to_string(),
            "fp32_model": plan.fp32_model.as_ref().map(|p| p.display().to_string()),
            "images": plan.images.len(),
            "iterations": plan.iterations,
            "cpu": bench::cpu_description(),
            "rows": summaries,
            "not_measured": failed.iter().map(|(s, why)| json!({"engine": s.engine, "model": s.model_kind, "mode": s.int8, "threads": s.threads, "error": why})).collect::<Vec<_>>(),
        });
        println!("{value:#}");
    } else {
        println!(
            "labelcast bench: {} (fp32: {}), {} images, {} timed runs per row in {} interleaved rounds, {} warm-up each; {}",
            plan.int8_model.display(),
            plan.fp32_model.as_ref().map_or("none".to_string(), |p| p.display().to_string()),
            plan.images.len(),
            plan.iterations,
            args.rounds,
            plan.warmup,
            bench::cpu_description()
        );
        println!("baseline (ratios, score differences): the first row; each row in its own process\n");
        print!("{}", bench::render_table(&summaries, &failed));
        if args.profile {
            print!("{}", bench::render_profile(&done));
        }
        println!("\n{} rows in {:.0} s", summaries.len() + failed.len(), started.elapsed().as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}
