//! Configuration: a TOML file plus command-line overrides, validated into a
//! [`Config`] before anything starts.
//!
//! Parsing happens in two steps, as ripgrep does with its arguments: the file
//! is deserialised into [`RawConfig`] (every field optional, unknown keys
//! rejected), command-line overrides are laid over it, and [`Config::validate`]
//! turns the result into typed, checked values. Every error names the field it
//! is about (`mqtt.qos: expected 0, 1 or 2, got 3`) so an operator can fix it
//! without reading code, and the binary exits with [`EXIT_CONFIG`] (78,
//! `EX_CONFIG`) so systemd does not restart-loop on a bad file.
//!
//! Each stage owns its section's vocabulary and checks: `[model]` in
//! `engine/config.rs`, `[mqtt]`, `[homeassistant]` and `[output]` in
//! `publish/config.rs`, `[labels]` in `labels.rs`, `[[camera]]` in
//! `source/camera.rs`. This module reads the file and the flags, hands each
//! section to its stage, assembles the result, and re-exports the stages'
//! types so `config::ModelConfig` and friends stay one import away.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

pub use crate::engine::config::{
    DEFAULT_MODEL, DEFAULT_MODEL_CPU, EngineKind, InputLayout, Int8Check, Int8Mode, MetadataOverrides, ModelConfig,
    RawModel, RawTensorRt, TensorRtConfig, TensorRtPrecision, default_model, validate_model,
};
pub use crate::flow::{OutputKind, ResizeMode};
pub use crate::labels::{LabelOverride, LabelPolicy, RawLabelOverride, RawLabels, validate_labels};
pub use crate::publish::config::{
    BrokerChoice, DEFAULT_EMBEDDED_LISTEN, HomeAssistantConfig, MqttConfig, OutputConfig, RawHomeAssistant, RawMqtt,
    RawOutput, RawSnapshots, RawTls, Secret, SnapshotConfig, TlsConfig, parse_mqtt_url,
};
use crate::publish::config::{validate_homeassistant, validate_mqtt};
use crate::source::SourceSpec;
use crate::source::camera::{CameraConfig, GateConfig, validate_cameras};

/// Exit status for a configuration the daemon cannot run with (`EX_CONFIG`).
pub const EXIT_CONFIG: i32 = 78;

/// A configuration value that is wrong, with the dotted name of its field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// True when `err` (or anything in its chain) is a configuration problem,
/// which the CLI reports with [`EXIT_CONFIG`].
pub fn is_config_error(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.is::<ConfigError>())
}

// ---------------------------------------------------------------------------
// Raw form: what the TOML file and the command line say, unchecked.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub device_id: Option<String>,
    #[serde(default)]
    pub source: RawSource,
    /// `[[camera]]` tables: several sources on one engine, with regions.
    #[serde(default)]
    pub camera: Vec<crate::source::camera::RawCamera>,
    #[serde(default)]
    pub model: RawModel,
    #[serde(default)]
    pub labels: RawLabels,
    #[serde(default)]
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub output: RawOutput,
    #[serde(default)]
    pub service: RawService,
    #[serde(default)]
    pub homeassistant: RawHomeAssistant,
    #[serde(default)]
    pub snapshots: crate::publish::config::RawSnapshots,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub stall_timeout: Option<String>,
    pub http_listen: Option<String>,
    /// A file holding the password the status page, `/metrics` and the
    /// frames ask for (HTTP basic auth): required when `http_listen` is not
    /// a loopback address.
    pub http_password_file: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub uri: Option<String>,
    pub max_frame_megapixels: Option<f64>,
    pub reconnect_min: Option<String>,
    pub reconnect_max: Option<String>,
    /// The single camera's motion and interval gate (as `[[camera]]`'s).
    pub motion: Option<f64>,
    pub interval: Option<String>,
}

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub device_id: Option<String>,
    pub source: Option<String>,
    pub model: Option<PathBuf>,
    pub mqtt_url: Option<String>,
    pub output: Option<String>,
    pub engine: Option<String>,
    pub threads: Option<i64>,
    /// The status page's, `/metrics`' and `/healthz`' address, or `off`.
    pub http_listen: Option<String>,
}

impl RawConfig {
    /// Reads and parses a TOML file; unknown keys and wrong types are errors
    /// that name the file and the dotted field.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::new("(file)", format!("cannot read it: {err}")))
            .with_context(|| format!("config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let deserializer =
            toml::de::Deserializer::parse(text).map_err(|err| ConfigError::new("(file)", located(text, &err)))?;
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let field = if path == "." { "(file)".to_string() } else { path };
            ConfigError::new(field, located(text, err.inner()))
        })
    }

    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(v) = &overrides.device_id {
            self.device_id = Some(v.clone());
        }
        if let Some(v) = &overrides.source {
            self.source.uri = Some(v.clone());
        }
        if let Some(v) = &overrides.model {
            self.model.path = Some(v.clone());
        }
        if let Some(v) = &overrides.mqtt_url {
            self.mqtt.url = Some(v.clone());
        }
        if let Some(v) = &overrides.output {
            self.output.mode = Some(v.clone());
        }
        if let Some(v) = &overrides.engine {
            self.model.engine = Some(v.clone());
        }
        if let Some(v) = overrides.threads {
            self.model.threads = Some(v);
        }
        if let Some(v) = &overrides.http_listen {
            self.service.http_listen = Some(v.clone());
        }
    }
}

/// toml's own message (without its multi-line source excerpt) and the line
/// it is about.
fn located(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end_matches('\n');
    match err.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Validated form.
// ---------------------------------------------------------------------------

/// A configuration that passed every check that does not need the model.
#[derive(Debug, Clone)]
pub struct Config {
    pub device_id: String,
    /// Every camera, at least one: `[[camera]]` tables, or the `[source]`
    /// section as one camera without an id.
    pub cameras: Vec<CameraConfig>,
    /// Frames (photos) with more pixels are refused from their header,
    /// before decoding (`source.max_frame_megapixels`).
    pub max_frame_pixels: u64,
    /// The wait before reopening a source that went away, doubling from the
    /// first to the second (`source.reconnect_min` / `source.reconnect_max`).
    pub source_backoff: (Duration, Duration),
    pub model: ModelConfig,
    pub labels: LabelPolicy,
    pub output: OutputConfig,
    pub service: ServiceConfig,
    /// Frames published on MQTT when a label turns ON (`[snapshots]`).
    pub snapshots: SnapshotConfig,
}

/// How labelcast watches itself: the hang detector behind the systemd
/// watchdog and `/healthz`, and where `/metrics` and `/healthz` listen.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// A capture or inference call that has not returned for this long is hung.
    pub stall_timeout: Duration,
    /// `None`: no HTTP endpoint.
    pub http_listen: Option<SocketAddr>,
    /// The password HTTP clients must give (basic auth, any user name);
    /// `None`: none asked (loopback only).
    pub http_password: Option<Secret>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            stall_timeout: Duration::from_secs(30),
            http_listen: DEFAULT_HTTP_LISTEN.parse().ok(),
            http_password: None,
        }
    }
}

/// Where the repository's (or the installed package's) models and sample
/// photos live, for the embedded defaults. Searched in order:
/// `$LABELCAST_DATA_DIR`, `<exe>/../share/labelcast`, `/usr/share/labelcast`,
/// and the source tree the binary was built from.
pub fn data_dir() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("LABELCAST_DATA_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(prefix) = exe.parent().and_then(Path::parent)
    {
        candidates.push(prefix.join("share/labelcast"));
    }
    candidates.push(PathBuf::from("/usr/share/labelcast"));
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    candidates.into_iter().find(|dir| dir.join(DEFAULT_MODEL).is_file())
}

/// The shipped demo model, relative to [`data_dir`].
/// `/metrics` and `/healthz`: loopback only unless the config says otherwise.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9464";
/// The shipped sample photos, relative to [`data_dir`].
pub const DEFAULT_PHOTOS: &str = "calibration/images";
fn default_device_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id = sanitize_id(host.trim());
    if id.is_empty() { "labelcast".to_string() } else { id }
}

/// Lower-case, with anything outside `[a-z0-9_-]` replaced by `_`, so the id is
/// safe in MQTT topics and Home Assistant object ids.
pub fn sanitize_id(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }
        })
        .collect()
}

pub(crate) fn duration(field: &str, raw: &Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text).map_err(|err| {
            ConfigError::new(field, format!("expected a duration like \"500ms\" or \"2s\", got {text:?} ({err})"))
        }),
    }
}

pub(crate) fn unit_interval(field: &str, value: f64) -> Result<f32, ConfigError> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(value as f32)
    } else {
        Err(ConfigError::new(field, format!("expected a number from 0 to 1, got {value}")))
    }
}

/// An optional setting that names one of a fixed set of choices: `None`
/// when unset, the field named in the error when it is not one of them.
pub(crate) fn choice<T>(
    field: &str,
    raw: Option<&str>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    raw.map(parse).transpose().map_err(|m| ConfigError::new(field, m))
}

pub(crate) fn rgb_triplet(field: &str, raw: &Option<Vec<f32>>) -> Result<Option<[f32; 3]>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(values) => match values.as_slice() {
            [r, g, b] if values.iter().all(|v| v.is_finite()) => Ok(Some([*r, *g, *b])),
            _ => Err(ConfigError::new(field, format!("expected three finite numbers (R, G, B), got {values:?}"))),
        },
    }
}

pub(crate) fn readable_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|err| ConfigError::new(field, format!("cannot read {}: {err}", path.display())))
}

impl Config {
    /// Checks everything that can be checked without loading the model.
    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let device_id = match &raw.device_id {
            Some(id) => {
                let clean = sanitize_id(id);
                if clean.is_empty() || clean != *id {
                    return Err(ConfigError::new(
                        "device_id",
                        format!("expected lower-case letters, digits, '-' or '_', got {id:?} (try {clean:?})"),
                    ));
                }
                clean
            }
            None => default_device_id(),
        };

        let data = data_dir();
        let exists = |field: &str, source: &SourceSpec| match source {
            SourceSpec::File { path, .. } if !path.exists() => {
                Err(ConfigError::new(field, format!("{} does not exist", path.display())))
            }
            _ => Ok(()),
        };
        let cameras = validate_cameras(&raw.camera, exists)?;
        if !cameras.is_empty() && (raw.source.motion.is_some() || raw.source.interval.is_some()) {
            return Err(ConfigError::new(
                "source.motion",
                "with [[camera]] tables, set motion and interval in each camera (or region) instead",
            ));
        }
        if !cameras.is_empty() && raw.source.uri.is_some() {
            return Err(ConfigError::new(
                "source.uri",
                "set together with [[camera]] tables: give each camera its own `source` and drop source.uri \
                 (the [source] section's other settings still apply to every camera)",
            ));
        }
        let cameras = if !cameras.is_empty() {
            cameras
        } else {
            let source_uri = match &raw.source.uri {
                Some(uri) => uri.clone(),
                None => {
                    let dir = data.as_ref().ok_or_else(|| {
                        ConfigError::new(
                            "source.uri",
                            "not set, and the shipped sample photos were not found (set LABELCAST_DATA_DIR or \
                             source.uri)",
                        )
                    })?;
                    format!("file://{}?fps=2&loop=true", dir.join(DEFAULT_PHOTOS).display())
                }
            };
            let source = SourceSpec::parse(&source_uri).map_err(|msg| ConfigError::new("source.uri", msg))?;
            exists("source.uri", &source)?;
            let gate =
                GateConfig::parse("source", raw.source.motion, raw.source.interval.as_deref(), GateConfig::default())?;
            vec![CameraConfig::single(source, gate)]
        };
        let max_frame_pixels = validate_max_frame_pixels(&raw.source)?;
        let reconnect_min = duration("source.reconnect_min", &raw.source.reconnect_min, Duration::from_millis(250))?;
        let reconnect_max = duration("source.reconnect_max", &raw.source.reconnect_max, Duration::from_secs(10))?;
        if reconnect_min.is_zero() || reconnect_min > reconnect_max {
            return Err(ConfigError::new(
                "source.reconnect_min",
                format!("must be above 0 and not above source.reconnect_max ({reconnect_max:?})"),
            ));
        }
        let model = validate_model(&raw.model, data.as_deref())?;

        let labels = validate_labels(&raw.labels)?;

        let mode = raw.output.mode.as_deref().unwrap_or("mqtt");
        let output = match mode {
            "mqtt" => {
                let mut mqtt = validate_mqtt(&raw.mqtt, &device_id)?;
                mqtt.homeassistant = validate_homeassistant(&raw.homeassistant)?;
                OutputConfig::Mqtt(Box::new(mqtt))
            }
            "stdout" => OutputConfig::Stdout,
            other => {
                return Err(ConfigError::new("output.mode", format!("expected \"mqtt\" or \"stdout\", got {other:?}")));
            }
        };

        let service = validate_service(&raw.service)?;
        let snapshots = crate::publish::config::validate_snapshots(&raw.snapshots)?;
        if snapshots.enabled && !matches!(output, OutputConfig::Mqtt(_)) {
            return Err(ConfigError::new(
                "snapshots.enabled",
                "snapshots are published on MQTT: set output.mode = \"mqtt\"",
            ));
        }
        let mut model = model;
        model.check_cache = cache_dir(raw.service.cache_dir.as_deref());
        Ok(Config {
            device_id,
            cameras,
            max_frame_pixels,
            source_backoff: (reconnect_min, reconnect_max),
            model,
            labels,
            output,
            service,
            snapshots,
        })
    }

    /// The distinct models the cameras use, each with the cameras (indices
    /// into `cameras`) that use it, in the order the cameras first name them
    /// (`[model]` for a camera without a `model` of its own). One engine is
    /// loaded per entry.
    pub fn models(&self) -> Vec<(ModelConfig, Vec<usize>)> {
        let mut groups: Vec<(ModelConfig, Vec<usize>)> = Vec::new();
        for (index, camera) in self.cameras.iter().enumerate() {
            let path = camera.model.as_ref().unwrap_or(&self.model.path);
            match groups.iter_mut().find(|(model, _)| &model.path == path) {
                Some((_, cameras)) => cameras.push(index),
                None => groups.push((ModelConfig { path: path.clone(), ..self.model.clone() }, vec![index])),
            }
        }
        groups
    }

    /// Reads `path` (if any), applies the overrides and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Config> {
        let mut raw = match path {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        raw.apply(overrides);
        let config = Config::validate(raw);
        match path {
            Some(path) => config.with_context(|| format!("config file {}", path.display())),
            None => Ok(config?),
        }
    }
}

/// Where labelcast keeps what it may reuse across starts (the INT8 self-check's
/// verdicts): `service.cache_dir` (`"off"`: nowhere), else systemd's
/// `$CACHE_DIRECTORY`, else `$XDG_CACHE_HOME/labelcast`, else
/// `~/.cache/labelcast`.
pub fn cache_dir(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = configured {
        return (dir != Path::new("off")).then(|| dir.to_path_buf());
    }
    let from_env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    from_env("CACHE_DIRECTORY")
        .map(|dirs| PathBuf::from(dirs.to_string_lossy().split(':').next().unwrap_or_default().to_string()))
        .or_else(|| from_env("XDG_CACHE_HOME").map(|d| d.join("labelcast")))
        .or_else(|| from_env("HOME").map(|d| d.join(".cache/labelcast")))
}

/// `source.max_frame_megapixels`: from 0.1 (a 320x240 camera fits three
/// times) to 1000; the default is [`crate::preprocess::DEFAULT_MAX_FRAME_PIXELS`].
pub fn validate_max_frame_pixels(raw: &RawSource) -> Result<u64, ConfigError> {
    match raw.max_frame_megapixels {
        None => Ok(crate::preprocess::DEFAULT_MAX_FRAME_PIXELS),
        Some(mp) if mp.is_finite() && (0.1..=1000.0).contains(&mp) => Ok((mp * 1e6) as u64),
        Some(mp) => Err(ConfigError::new(
            "source.max_frame_megapixels",
            format!("expected 0.1 to 1000 (megapixels; a frame costs 3 bytes per pixel), got {mp}"),
        )),
    }
}

fn validate_service(raw: &RawService) -> Result<ServiceConfig, ConfigError> {
    let defaults = ServiceConfig::default();
    let stall_timeout = duration("service.stall_timeout", &raw.stall_timeout, defaults.stall_timeout)?;
    if stall_timeout < Duration::from_secs(1) {
        return Err(ConfigError::new("service.stall_timeout", "must be at least 1s"));
    }
    let http_listen = match raw.http_listen.as_deref() {
        None => defaults.http_listen,
        Some("" | "off") => None,
        Some(text) => Some(text.parse().map_err(|_| {
            ConfigError::new(
                "service.http_listen",
                format!("expected host:port like \"127.0.0.1:9464\", or \"off\", got {text:?}"),
            )
        })?),
    };
    let http_password = match &raw.http_password_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                ConfigError::new("service.http_password_file", format!("cannot read {}: {err}", path.display()))
            })?;
            let password = text.trim_end_matches(['\n', '\r']);
            if password.chars().count() < 8 {
                return Err(ConfigError::new(
                    "service.http_password_file",
                    format!(
                        "{} holds {} characters; use a password of at least 8 (e.g. `openssl rand -hex 16 > {}`)",
                        path.display(),
                        password.chars().count(),
                        path.display()
                    ),
                ));
            }
            Some(Secret(password.to_string()))
        }
    };
    // The page shows the inside of someone's house: off loopback, only
    // with a password.
    if let Some(listen) = http_listen
        && !listen.ip().is_loopback()
        && http_password.is_none()
    {
        return Err(ConfigError::new(
            "service.http_listen",
            format!(
                "{listen} is reachable from other machines, and the status page shows the cameras' frames: set \
                 service.http_password_file to a file holding a password (HTTP basic auth; put a TLS reverse \
                 proxy in front on an untrusted network, see README \"Status page and snapshots\"), or keep 127.0.0.1"
            ),
        ));
    }
    Ok(ServiceConfig { stall_timeout, http_listen, http_password })
}

/// Every label becomes an MQTT topic level (and, with discovery on, a Home
/// Assistant entity, see `publish::homeassistant::check_entity_ids`), so a
/// name must be usable as one: not empty, no `/`, `+`, `#` (levels and
/// wildcards), no control characters (MQTT forbids U+0000 in topics and
/// advises against the rest), not absurdly long, and not given twice.
/// Any script is fine (`猫`, `café`). `field` is what the error names: the
/// config key, or the model file or sidecar the names came from.
pub fn check_label_names(labels: &[String], field: &str) -> Result<(), ConfigError> {
    const MAX_LABEL_BYTES: usize = 256;
    let mut seen = std::collections::HashSet::new();
    for name in labels {
        if name.is_empty() || name.contains(['/', '+', '#']) || name.chars().any(char::is_control) {
            return Err(ConfigError::new(
                field,
                format!("label {name:?} is empty or holds '/', an MQTT wildcard or a control character"),
            ));
        }
        if name.len() > MAX_LABEL_BYTES {
            return Err(ConfigError::new(
                field,
                format!(
                    "label {:?}... is {} bytes long; at most {MAX_LABEL_BYTES}",
                    truncate_chars(name, 32),
                    name.len()
                ),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(ConfigError::new(field, format!("label {name:?} appears twice")));
        }
    }
    Ok(())
}

/// Home Assistant's discovery node ids allow `[a-zA-Z0-9_-]`; anything else
/// becomes `_`.
pub fn node_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

fn truncate_chars(text: &str, chars: usize) -> &str {
    text.char_indices().nth(chars).map_or(text, |(at, _)| &text[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    fn validate(toml_text: &str) -> Result<Config, ConfigError> {
        let model = model_file();
        // Top-level keys in `toml_text` must come before any table.
        let text = format!(
            "{toml_text}\n[source]\nuri = \"test://pattern\"\n[model]\npath = {:?}\n",
            model.path().display().to_string()
        );
        Config::validate(RawConfig::from_toml(&text)?)
    }

    #[test]
    fn snapshot_settings_out_of_range_are_refused_naming_the_field() {
        assert_eq!(validate("[snapshots]\nenabled = true\nmax_size = 32\n").unwrap_err().field, "snapshots.max_size");
        assert_eq!(validate("[snapshots]\nenabled = true\nquality = 0\n").unwrap_err().field, "snapshots.quality");
        let err = validate("[snapshots]\nframe_interval = \"10s\"\n").unwrap_err();
        assert_eq!(err.field, "snapshots.frame_interval", "a latest-frame topic with snapshots off");
        let err = validate("[snapshots]\nenabled = true\nframe_interval = \"100ms\"\n").unwrap_err();
        assert_eq!(err.field, "snapshots.frame_interval");
        let err = validate("[output]\nmode = \"stdout\"\n[snapshots]\nenabled = true\n").unwrap_err();
        assert_eq!(err.field, "snapshots.enabled", "pictures go out on MQTT only");
        let config = validate("[snapshots]\nenabled = true\nmin_interval = \"1m\"\n").unwrap();
        assert_eq!(config.snapshots.min_interval, Duration::from_secs(60));
        assert!(!validate("").unwrap().snapshots.enabled, "off by default");
    }

    #[test]
    fn an_http_listener_off_loopback_needs_a_password_file_of_eight_characters() {
        let err = validate("[service]\nhttp_listen = \"0.0.0.0:9464\"\n").unwrap_err();
        assert_eq!(err.field, "service.http_listen");
        assert!(err.message.contains("http_password_file"), "{err}");
        let short = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(short.path(), "abc\n").unwrap();
        let text = format!("[service]\nhttp_listen = \"0.0.0.0:9464\"\nhttp_password_file = {:?}\n", short.path());
        assert_eq!(validate(&text).unwrap_err().field, "service.http_password_file");
        std::fs::write(short.path(), "long enough\n").unwrap();
        let config = validate(&text).unwrap();
        assert_eq!(config.service.http_password.as_ref().map(Secret::expose), Some("long enough"));
        assert!(validate("[service]\nhttp_listen = \"[::1]:9464\"\n").is_ok(), "loopback needs none");
    }

    #[test]
    fn a_qos_of_three_is_rejected_naming_the_field() {
        let err = validate("[mqtt]\nqos = 3\n").unwrap_err();
        assert_eq!(err.to_string(), "mqtt.qos: expected 0, 1 or 2, got 3");
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_its_section() {
        let err = RawConfig::from_toml("[mqtt]\nqso = 1\n").unwrap_err();
        assert_eq!(err.field, "mqtt.qso");
        assert!(err.message.contains("unknown field `qso`") && err.message.contains("line 2"), "{err}");
    }

    #[test]
    fn a_wrong_type_names_the_dotted_field() {
        let err = RawConfig::from_toml("[labels]\nthreshold = \"high\"\n").unwrap_err();
        assert_eq!(err.field, "labels.threshold");
        assert!(err.message.contains("invalid type"), "{err}");
    }

    #[test]
    fn a_threshold_above_one_is_rejected() {
        let err = validate("[labels]\nthreshold = 1.5\n").unwrap_err();
        assert_eq!(err.to_string(), "labels.threshold: expected a number from 0 to 1, got 1.5");
    }

    #[test]
    fn an_off_threshold_above_on_is_rejected() {
        let err = validate("[labels.overrides.cat]\non = 0.4\noff = 0.6\n").unwrap_err();
        assert_eq!(err.field, "labels.overrides.cat.off");
    }

    #[test]
    fn the_onnx_runtime_engine_defaults_to_the_demo_model_quantised_for_its_cpu_provider() {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(data.path().join("models/demo")).unwrap();
        std::fs::write(data.path().join(DEFAULT_MODEL), b"x").unwrap();
        let raw = |engine: &str| RawModel { engine: Some(engine.into()), ..Default::default() };
        // Without the -cpu file every engine gets the default one.
        let ort = validate_model(&raw("onnxruntime"), Some(data.path())).unwrap();
        assert_eq!(ort.path, data.path().join(DEFAULT_MODEL));
        std::fs::write(data.path().join(DEFAULT_MODEL_CPU), b"x").unwrap();
        let ort = validate_model(&raw("onnxruntime"), Some(data.path())).unwrap();
        assert_eq!(ort.path, data.path().join(DEFAULT_MODEL_CPU));
        let tract = validate_model(&raw("tract"), Some(data.path())).unwrap();
        assert_eq!(tract.path, data.path().join(DEFAULT_MODEL));
        // An explicit path is never replaced.
        let mine = RawModel { path: Some(data.path().join(DEFAULT_MODEL)), ..raw("onnxruntime") };
        assert_eq!(validate_model(&mine, Some(data.path())).unwrap().path, data.path().join(DEFAULT_MODEL));
    }

    #[test]
    fn no_broker_url_means_the_embedded_broker_on_loopback() {
        let config = validate("").unwrap();
        let OutputConfig::Mqtt(mqtt) = config.output else { panic!("expected mqtt output") };
        assert_eq!(mqtt.broker, BrokerChoice::Embedded { listen: "127.0.0.1:1883".parse().unwrap() });
        assert_eq!(mqtt.qos, 1);
    }

    #[test]
    fn an_mqtts_url_turns_tls_on_with_port_8883() {
        assert_eq!(parse_mqtt_url("mqtts://broker.lan").unwrap(), ("broker.lan".into(), 8883, true));
        assert_eq!(parse_mqtt_url("mqtt://10.0.0.2:1884").unwrap(), ("10.0.0.2".into(), 1884, false));
        assert!(parse_mqtt_url("http://x").unwrap_err().contains("scheme"));
        assert!(parse_mqtt_url("mqtt://u:p@x").unwrap_err().contains("credentials"));
    }

    #[test]
    fn a_missing_tls_ca_file_is_named() {
        let err = validate("[mqtt]\nurl = \"mqtts://x\"\n[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n").unwrap_err();
        assert_eq!(err.field, "mqtt.tls.ca_file");
        assert!(err.message.contains("/nonexistent/ca.pem"));
    }

    #[test]
    fn a_missing_model_file_is_named() {
        let text = "[source]\nuri = \"test://pattern\"\n[model]\npath = \"/nonexistent/m.onnx\"\n";
        let err = Config::validate(RawConfig::from_toml(text).unwrap()).unwrap_err();
        assert_eq!(err.field, "model.path");
    }

    #[test]
    fn a_bad_source_uri_is_named() {
        let model = model_file();
        let text = format!("[source]\nuri = \"ftp://x\"\n[model]\npath = {:?}\n", model.path().display().to_string());
        let err = Config::validate(RawConfig::from_toml(&text).unwrap()).unwrap_err();
        assert_eq!(err.field, "source.uri");
    }

    #[test]
    fn command_line_overrides_replace_file_values() {
        let mut raw = RawConfig::from_toml("[mqtt]\nurl = \"mqtt://a:1\"\n[output]\nmode = \"mqtt\"\n").unwrap();
        raw.apply(&Overrides {
            mqtt_url: Some("mqtt://b:2".into()),
            output: Some("stdout".into()),
            ..Default::default()
        });
        assert_eq!(raw.mqtt.url.as_deref(), Some("mqtt://b:2"));
        assert_eq!(raw.output.mode.as_deref(), Some("stdout"));
    }

    #[test]
    fn a_password_never_appears_in_debug_output() {
        let secret = Secret("hunter2".into());
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn device_ids_with_spaces_are_rejected_with_a_suggestion() {
        let err = validate("device_id = \"Kitchen Cam\"\n").unwrap_err();
        assert_eq!(err.field, "device_id");
        assert!(err.message.contains("kitchen_cam"));
    }

    #[test]
    fn label_names_in_any_script_are_topics_and_a_name_given_twice_is_rejected() {
        let names: Vec<String> =
            ["猫", "狗", "鳥", "café", "traffic light", "traffic_light"].map(String::from).to_vec();
        check_label_names(&names, "model.labels").unwrap();
        let twice = ["猫".to_string(), "猫".to_string()];
        let err = check_label_names(&twice, "model.labels").unwrap_err();
        assert!(err.message.contains("appears twice"), "{err}");
    }

    #[test]
    fn port_zero_is_not_a_broker_port() {
        assert!(parse_mqtt_url("mqtt://127.0.0.1:0").unwrap_err().contains("port 0"));
        let err = validate("[mqtt]\nembedded_listen = \"127.0.0.1:0\"\n").unwrap_err();
        assert_eq!(err.field, "mqtt.embedded_listen");
    }

    #[test]
    fn label_names_with_control_characters_or_of_huge_length_are_rejected() {
        for bad in ["tab\there", "nul\0", &"x".repeat(257)] {
            let err = check_label_names(&[bad.to_string()], "model.labels").unwrap_err();
            assert_eq!(err.field, "model.labels");
        }
        check_label_names(&["chat noir".to_string(), "café".to_string()], "model.labels").unwrap();
    }
}
