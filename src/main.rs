//! The `labelcast` command line: subcommands, exit codes and printing
//! errors. The work lives in the library; this file only glues it together.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

use labelcast::config::{self, Config, EXIT_CONFIG, Overrides, RawConfig};
use labelcast::engine::Engine;
use labelcast::engine::tract::TractEngine;
use labelcast::labels::{self, LabelEvent, LabelScore};
use labelcast::pipeline::FrameClassifier;
use labelcast::publish::payload;
use labelcast::{pipeline, source, telemetry};

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
}

impl OverrideArgs {
    fn overrides(self) -> Overrides {
        Overrides {
            device_id: self.device_id,
            source: self.source,
            model: self.model,
            mqtt_url: self.mqtt,
            output: self.output,
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
        /// One JSON object per image instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show what a model file holds and how long tract takes to load it.
    ModelInfo {
        model: PathBuf,
        #[arg(long)]
        json: bool,
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
        Command::Classify { images, model, config, json } => classify(&images, model, config, json),
        Command::ModelInfo { model, json } => model_info(&model, json),
        Command::CheckConfig { config, overrides } => check_config(config, overrides.overrides()),
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
    let config = Config::load(config_path.as_deref(), &overrides)?;
    // Two worker threads: the MQTT client and the embedded broker's glue are
    // light; capture and inference run on their own OS threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(pipeline::run(config, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn classify(
    images: &[PathBuf],
    model: Option<PathBuf>,
    config_path: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut raw = match &config_path {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    if model.is_some() {
        raw.model.path = model;
    }
    let model_config = config::validate_model(&raw.model, config::data_dir().as_deref())?;
    let policy = config::validate_labels(&raw.labels)?;
    let engine = TractEngine::load(&model_config)?;
    let rules = labels::resolve_rules(&policy, &engine.info().metadata)?;
    let mut classifier = FrameClassifier::new(Box::new(engine));
    let model_name: std::sync::Arc<str> = classifier.info().metadata.name.as_str().into();
    let mut failures = 0;
    for (index, path) in images.iter().enumerate() {
        let result = source::read_frame(path, index as u64)
            .map_err(anyhow::Error::from)
            .and_then(|frame| Ok(classifier.classify(&frame)?))
            .map(|c| (c.scores, c.inference.as_secs_f64() * 1e3));
        let (scores, inference_ms) = match result {
            Ok(ok) => ok,
            Err(err) => {
                failures += 1;
                eprintln!("labelcast: error: {}: {err:#}", path.display());
                continue;
            }
        };
        let event = LabelEvent {
            sequence: index as u64,
            timestamp: std::time::SystemTime::now(),
            origin: Some(path.display().to_string().into()),
            model: model_name.clone(),
            inference_ms,
            labels: rules
                .iter()
                .zip(&scores)
                .map(|(rule, &score)| LabelScore { name: rule.name.clone(), score, on: score >= rule.on })
                .collect(),
            changed: Vec::new(),
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

fn model_info(path: &std::path::Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let engine = TractEngine::inspect(path)?;
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
            "input": { "name": info.input_name, "shape": info.input_shape, "type": info.input_type },
            "output": { "name": info.output_name, "shape": info.output_shape, "kind": meta.output.as_str() },
            "int8": info.is_int8(),
            "quantize_linear": info.quantize_linear,
            "dequantize_linear": info.dequantize_linear,
            "labels": meta.labels,
            "labels_from": meta.labels_from,
            "thresholds": meta.thresholds,
            "preprocess": { "resize": meta.resize.as_str(), "mean": meta.mean, "std": meta.std },
            "tract": { "load_ms": info.load_time.as_secs_f64() * 1e3, "optimize_ms": info.optimize_time.as_secs_f64() * 1e3 },
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
    println!("input        {} {} {:?}", info.input_name, info.input_type, info.input_shape);
    println!("output       {} {:?} ({})", info.output_name, info.output_shape, meta.output.as_str());
    if info.is_int8() {
        println!(
            "int8         yes (QDQ): {} QuantizeLinear, {} DequantizeLinear",
            info.quantize_linear, info.dequantize_linear
        );
    } else {
        println!("int8         no (no QuantizeLinear/DequantizeLinear nodes)");
    }
    if meta.labels.is_empty() {
        println!("labels       none in the model: give them in the config (model.labels) or a sidecar .toml");
    } else {
        println!("labels       {} from {}: {}", meta.labels.len(), meta.labels_from, meta.labels.join(", "));
    }
    if !meta.thresholds.is_empty() {
        let t: Vec<String> = meta.thresholds.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("thresholds   {}", t.join(", "));
    }
    println!("preprocess   {}, mean {:?}, std {:?}", meta.resize.as_str(), meta.mean, meta.std);
    println!(
        "tract        load {:.0} ms, optimise {:.0} ms",
        info.load_time.as_secs_f64() * 1e3,
        info.optimize_time.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}

fn check_config(path: PathBuf, overrides: Overrides) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(&path), &overrides)?;
    let prepared = pipeline::prepare(&config).with_context(|| format!("config file {}", path.display()))?;
    let info = prepared.engine.info();
    let output = match &config.output {
        config::OutputConfig::Stdout => "stdout".to_string(),
        config::OutputConfig::Mqtt(m) => match &m.broker {
            config::BrokerChoice::External { host, port } => format!("mqtt {host}:{port}"),
            config::BrokerChoice::Embedded { listen } => format!("embedded broker on {listen}"),
        },
    };
    println!(
        "{}: OK (model {}, {} labels; source {:?}; output {output})",
        path.display(),
        info.path.display(),
        info.metadata.labels.len(),
        config.source
    );
    Ok(ExitCode::SUCCESS)
}
