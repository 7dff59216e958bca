//! The publish stage's settings: `[mqtt]` (broker, TLS, credentials,
//! topics, rates), `[homeassistant]` and `[output]`, as written and as
//! checked. `config.rs` assembles them with the other stages'.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, duration, readable_file};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHomeAssistant {
    pub discovery: Option<bool>,
    pub prefix: Option<String>,
    pub birth_delay: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub url: Option<String>,
    pub embedded_listen: Option<String>,
    pub topic_prefix: Option<String>,
    pub client_id: Option<String>,
    pub qos: Option<i64>,
    pub keep_alive: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub publish_every: Option<i64>,
    pub stats_interval: Option<String>,
    pub reconnect_min: Option<String>,
    pub reconnect_max: Option<String>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshots {
    pub enabled: Option<bool>,
    pub max_size: Option<i64>,
    pub quality: Option<i64>,
    pub min_interval: Option<String>,
    pub frame_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub mode: Option<String>,
}

/// Home Assistant MQTT discovery.
#[derive(Debug, Clone, PartialEq)]
pub struct HomeAssistantConfig {
    pub prefix: String,
    /// Wait after Home Assistant's `online` before re-sending, so it has
    /// subscribed to everything first.
    pub birth_delay: Duration,
}

#[derive(Debug, Clone)]
pub enum OutputConfig {
    Mqtt(Box<MqttConfig>),
    Stdout,
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub broker: BrokerChoice,
    pub topic_prefix: String,
    pub client_id: String,
    pub qos: u8,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsConfig>,
    /// Publish the `labels` JSON on every Nth inference.
    pub publish_every: u32,
    pub stats_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Home Assistant discovery; `None` when switched off.
    pub homeassistant: Option<HomeAssistantConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BrokerChoice {
    /// A broker the user runs (mosquitto, EMQX, Home Assistant's add-on...).
    External { host: String, port: u16 },
    /// No broker configured: labelcast starts one in-process on this address.
    Embedded { listen: SocketAddr },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub insecure_skip_verify: bool,
}

/// A password: kept out of `Debug` output and therefore out of every log.
#[derive(Clone, PartialEq)]
pub struct Secret(pub(crate) String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Frames published on MQTT (`[snapshots]`): one when a published label
/// turns ON, retained on `<camera>/snapshot/<label>` (a region's on
/// `<camera>/<region>/snapshot/<label>`, outlined), and optionally each
/// camera's latest frame on `<camera>/frame` every `frame_interval`.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotConfig {
    /// Off by default: the pictures show the inside of someone's house, and
    /// leave the device only when asked.
    pub enabled: bool,
    /// The JPEG's longer side, pixels (frames are only ever made smaller).
    pub max_size: u32,
    /// JPEG quality, 1-100.
    pub quality: u8,
    /// A label's snapshot is sent at most this often (one that flaps ON and
    /// OFF does not flood the broker with pictures).
    pub min_interval: Duration,
    /// `None`: no latest-frame topic (the default).
    pub frame_interval: Option<Duration>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self { enabled: false, max_size: 640, quality: 80, min_interval: Duration::from_secs(10), frame_interval: None }
    }
}

pub(crate) fn validate_snapshots(raw: &RawSnapshots) -> Result<SnapshotConfig, ConfigError> {
    let defaults = SnapshotConfig::default();
    let max_size = match raw.max_size {
        None => defaults.max_size,
        Some(n @ 64..=4096) => n as u32,
        Some(n) => {
            return Err(ConfigError::new(
                "snapshots.max_size",
                format!("expected 64 to 4096 (pixels, the longer side), got {n}"),
            ));
        }
    };
    let quality = match raw.quality {
        None => defaults.quality,
        Some(q @ 1..=100) => q as u8,
        Some(q) => return Err(ConfigError::new("snapshots.quality", format!("expected 1 to 100, got {q}"))),
    };
    let frame_interval = match raw.frame_interval.as_deref() {
        None | Some("off") => None,
        Some(_) => {
            let interval = duration("snapshots.frame_interval", &raw.frame_interval, Duration::ZERO)?;
            if interval < Duration::from_secs(1) {
                return Err(ConfigError::new(
                    "snapshots.frame_interval",
                    "expected at least 1s (each message is a whole picture), or \"off\"",
                ));
            }
            Some(interval)
        }
    };
    let min_interval = duration("snapshots.min_interval", &raw.min_interval, defaults.min_interval)?;
    let enabled = raw.enabled.unwrap_or(false);
    if frame_interval.is_some() && !enabled {
        return Err(ConfigError::new(
            "snapshots.frame_interval",
            "set, but snapshots are off: add snapshots.enabled = true",
        ));
    }
    Ok(SnapshotConfig { enabled, max_size, quality, min_interval, frame_interval })
}

/// The embedded broker's default address.
pub const DEFAULT_EMBEDDED_LISTEN: &str = "127.0.0.1:1883";

pub(crate) fn validate_homeassistant(raw: &RawHomeAssistant) -> Result<Option<HomeAssistantConfig>, ConfigError> {
    if raw.discovery == Some(false) {
        return Ok(None);
    }
    let prefix = raw.prefix.clone().unwrap_or_else(|| "homeassistant".to_string());
    if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(ConfigError::new(
            "homeassistant.prefix",
            format!(
                "expected a topic prefix like \"homeassistant\" (no wildcards, no leading or trailing '/'), got {prefix:?}"
            ),
        ));
    }
    let birth_delay = duration("homeassistant.birth_delay", &raw.birth_delay, Duration::from_secs(2))?;
    Ok(Some(HomeAssistantConfig { prefix, birth_delay }))
}

/// Parses `mqtt://host[:port]` (also `tcp://`) and `mqtts://host[:port]`
/// (also `ssl://`); returns host, port and whether TLS is implied.
pub fn parse_mqtt_url(text: &str) -> Result<(String, u16, bool), String> {
    let url = url::Url::parse(text).map_err(|err| format!("not a URL ({err}): {text:?}"))?;
    let tls = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        other => return Err(format!("expected an mqtt:// or mqtts:// URL, got scheme {other:?}")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("put credentials in mqtt.username and mqtt.password_file, not in the URL".into());
    }
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("no host in {text:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    if port == 0 {
        return Err(format!(
            "port 0 is not a broker port: give the port the broker listens on (1883, or 8883 for TLS), got {text:?}"
        ));
    }
    Ok((host, port, tls))
}

pub(crate) fn validate_mqtt(raw: &RawMqtt, device_id: &str) -> Result<MqttConfig, ConfigError> {
    let (broker, url_tls) = match &raw.url {
        Some(text) => {
            let (host, port, tls) = parse_mqtt_url(text).map_err(|m| ConfigError::new("mqtt.url", m))?;
            (BrokerChoice::External { host, port }, tls)
        }
        None => {
            let text = raw.embedded_listen.as_deref().unwrap_or(DEFAULT_EMBEDDED_LISTEN);
            let listen: SocketAddr = text.parse().map_err(|_| {
                ConfigError::new(
                    "mqtt.embedded_listen",
                    format!("expected host:port like \"127.0.0.1:1883\", got {text:?}"),
                )
            })?;
            if listen.port() == 0 {
                return Err(ConfigError::new(
                    "mqtt.embedded_listen",
                    format!(
                        "port 0 would pick a random port no client can know; give one, like \"127.0.0.1:1883\", got {text:?}"
                    ),
                ));
            }
            (BrokerChoice::Embedded { listen }, false)
        }
    };

    let qos = match raw.qos {
        None => 1,
        Some(q @ 0..=2) => q as u8,
        Some(q) => return Err(ConfigError::new("mqtt.qos", format!("expected 0, 1 or 2, got {q}"))),
    };

    let topic_prefix = raw.topic_prefix.clone().unwrap_or_else(|| format!("labelcast/{device_id}"));
    let topic_prefix = topic_prefix.trim_end_matches('/').to_string();
    if topic_prefix.is_empty() || topic_prefix.contains(['+', '#']) {
        return Err(ConfigError::new(
            "mqtt.topic_prefix",
            format!("expected a topic without wildcards, got {topic_prefix:?}"),
        ));
    }

    let client_id = raw.client_id.clone().unwrap_or_else(|| format!("labelcast-{device_id}"));
    if client_id.is_empty() || client_id.len() > 128 {
        return Err(ConfigError::new("mqtt.client_id", "expected 1 to 128 characters"));
    }

    let keep_alive = duration("mqtt.keep_alive", &raw.keep_alive, Duration::from_secs(30))?;
    if keep_alive < Duration::from_secs(5) {
        return Err(ConfigError::new("mqtt.keep_alive", "expected at least 5s"));
    }

    let password =
        match (&raw.password_file, &raw.password_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("mqtt.password_file", "set password_file or password_env, not both"));
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    ConfigError::new("mqtt.password_file", format!("cannot read {}: {err}", path.display()))
                })?;
                Some(Secret(text.trim_end_matches(['\n', '\r']).to_string()))
            }
            (None, Some(var)) => Some(Secret(std::env::var(var).map_err(|_| {
                ConfigError::new("mqtt.password_env", format!("environment variable {var} is not set"))
            })?)),
            (None, None) => None,
        };
    if password.is_some() && raw.username.is_none() {
        return Err(ConfigError::new("mqtt.username", "a password is set but no username"));
    }

    let tls = match (&raw.tls, url_tls) {
        (None, false) => None,
        (None, true) => Some(TlsConfig { ca_file: None, client_cert: None, insecure_skip_verify: false }),
        (Some(t), _) => {
            if let Some(ca) = &t.ca_file {
                readable_file("mqtt.tls.ca_file", ca)?;
            }
            let client_cert = match (&t.cert_file, &t.key_file) {
                (Some(cert), Some(key)) => {
                    readable_file("mqtt.tls.cert_file", cert)?;
                    readable_file("mqtt.tls.key_file", key)?;
                    Some((cert.clone(), key.clone()))
                }
                (None, None) => None,
                (Some(_), None) => {
                    return Err(ConfigError::new("mqtt.tls.key_file", "cert_file is set but key_file is not"));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new("mqtt.tls.cert_file", "key_file is set but cert_file is not"));
                }
            };
            Some(TlsConfig { ca_file: t.ca_file.clone(), client_cert, insecure_skip_verify: t.insecure_skip_verify })
        }
    };
    if tls.is_some() && matches!(broker, BrokerChoice::Embedded { .. }) {
        return Err(ConfigError::new("mqtt.tls", "TLS needs an external broker: set mqtt.url"));
    }

    let publish_every = match raw.publish_every {
        None => 1,
        Some(n) if (1..=1_000_000).contains(&n) => n as u32,
        Some(n) => {
            return Err(ConfigError::new("mqtt.publish_every", format!("expected 1 or more, got {n}")));
        }
    };
    let stats_interval = duration("mqtt.stats_interval", &raw.stats_interval, Duration::from_secs(30))?;
    let reconnect_min = duration("mqtt.reconnect_min", &raw.reconnect_min, Duration::from_millis(250))?;
    let reconnect_max = duration("mqtt.reconnect_max", &raw.reconnect_max, Duration::from_secs(30))?;
    if reconnect_min.is_zero() || reconnect_min > reconnect_max {
        return Err(ConfigError::new(
            "mqtt.reconnect_min",
            format!("must be above 0 and not above mqtt.reconnect_max ({reconnect_max:?})"),
        ));
    }

    Ok(MqttConfig {
        broker,
        topic_prefix,
        client_id,
        qos,
        keep_alive,
        username: raw.username.clone(),
        password,
        tls,
        publish_every,
        stats_interval,
        reconnect_min,
        reconnect_max,
        homeassistant: None,
    })
}
