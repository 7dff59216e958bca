//! The embedded MQTT broker (`rumqttd`), started when no broker is
//! configured, so `labelcast run` works on a bare machine and
//! `mosquitto_sub -t 'labelcast/#'` shows labels at once. It runs on its own
//! threads (rumqttd brings its own runtimes) and lives as long as the process.
//! Its own log lines are off by default (it logs every client that hangs up
//! as an ERROR); `RUST_LOG=info,rumqttd=info` shows them.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Starts the broker on `listen` and waits until it accepts connections.
pub fn start_embedded(listen: SocketAddr) -> anyhow::Result<()> {
    // rumqttd binds inside its own thread and only logs a failure there, so
    // check the port here, where the error can reach the operator.
    // A port that is taken is a configuration problem (exit 78): restarting
    // will not free it.
    TcpListener::bind(listen).map_err(|err| {
        crate::config::ConfigError::new(
            "mqtt.embedded_listen",
            format!(
                "cannot start the embedded MQTT broker on {listen}: {err}. If a broker (mosquitto?) already \
                 listens there, use it with --mqtt mqtt://{listen} (or mqtt.url); otherwise set mqtt.embedded_listen \
                 to a free address"
            ),
        )
    })?;

    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        // Snapshots are whole JPEGs (publish::snapshot::MAX_PICTURE_BYTES).
        max_payload_size: super::snapshot::MAX_PACKET_BYTES,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "labelcast-embedded".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        // Small commit-log segments: labels messages are not kept for long,
        // and memory stays bounded on a small board.
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(err) = broker.start() {
                tracing::error!(error = %err, "embedded MQTT broker stopped");
            }
        })
        .context("starting the embedded MQTT broker thread")?;

    // Wait until the broker holds the port. Probing with a bind, not a
    // connection: rumqttd logs a half-open probe connection as an error.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpListener::bind(listen).is_ok() {
        if Instant::now() > deadline {
            bail!("the embedded MQTT broker did not start listening on {listen} within 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%listen, "no MQTT broker configured: started the embedded broker (try: mosquitto_sub -h {} -p {} -t 'labelcast/#' -v)", listen.ip(), listen.port());
    Ok(())
}
