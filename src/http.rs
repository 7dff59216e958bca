//! `/metrics` (Prometheus text exposition, encoded by `prometheus-client`)
//! and `/healthz` (200 or 503 with the reason), on a small HTTP/1.1 listener
//! that answers GET and closes. Loopback by default: the figures are not
//! secret, but nothing on the network needs to reach them unless the
//! operator says so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::service::{Health, Verdict};
use crate::telemetry::Counters;

/// What `/metrics` reads at each scrape.
#[derive(Debug, Clone)]
pub struct Exporter {
    pub health: Arc<Health>,
    pub counters: Arc<Counters>,
    /// The frame source, as a label.
    pub source: String,
    /// The inference engine, as a label.
    pub engine: String,
    /// The INT8 rewrite's load-time check, when one ran.
    pub selfcheck: Option<Arc<crate::engine::SelfCheck>>,
}

impl Exporter {
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("labelcast");
        registry.register_collector(Box::new(self.clone()));
        registry.sub_registry_with_label(("engine".into(), self.engine.clone().into())).register(
            "inference_seconds",
            "Time the engine took per frame",
            self.health.inference_seconds.clone(),
        );
        registry
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry()) {
            tracing::warn!(error = %err, "encoding metrics failed");
        }
        text
    }
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        let source = [("source", self.source.as_str())];
        for counter in crate::telemetry::COUNTERS {
            let mut metric = encoder.encode_descriptor(counter.metric, counter.help, None, MetricType::Counter)?;
            let value = ConstCounter::new((counter.get)(c));
            if counter.per_source {
                value.encode(metric.encode_family(&source)?)?;
            } else {
                value.encode(metric)?;
            }
        }
        // Kept for dashboards made before mqtt_connections was exported.
        let reconnects = Counters::get(&c.mqtt_connections).saturating_sub(1);
        let metric = encoder.encode_descriptor(
            "mqtt_reconnects",
            "MQTT connections after the first",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(reconnects).encode(metric)?;
        if let Some(connected) = self.health.mqtt_state() {
            let metric = encoder.encode_descriptor(
                "mqtt_connected",
                "1 while connected to the broker",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(connected)).encode(metric)?;
            let metric = encoder.encode_descriptor(
                "mqtt_unacked",
                "Messages (QoS >= 1) written to the broker and not acknowledged yet",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(self.health.mqtt_unacked() as i64).encode(metric)?;
        }
        let streaming = i64::from(self.health.source_report(Instant::now()) == crate::service::SourceState::Streaming);
        let mut metric = encoder.encode_descriptor(
            "source_streaming",
            "1 while the source is open and delivering, 0 while it is reconnecting, stalled, hung or ended",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(streaming).encode(metric.encode_family(&source)?)?;
        let ready = i64::from(self.health.is_ready());
        ConstGauge::new(ready).encode(encoder.encode_descriptor(
            "ready",
            "1 once the first frame was classified",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(check) = &self.selfcheck {
            let difference = check.max_difference().map_or(f64::NAN, f64::from);
            ConstGauge::new(difference).encode(encoder.encode_descriptor(
                "int8_selfcheck_max_difference",
                "Largest score difference between the rewritten INT8 graph and the graph as quantised (probe and first frame)",
                None,
                MetricType::Gauge,
            )?)?;
            ConstGauge::new(i64::from(check.fell_back())).encode(encoder.encode_descriptor(
                "int8_selfcheck_fallback",
                "1 when the INT8 self-check found a disagreement and the engine runs the graph as quantised",
                None,
                MetricType::Gauge,
            )?)?;
        }
        let states = self.health.label_states();
        if !states.is_empty() {
            let mut metric =
                encoder.encode_descriptor("label_on", "1 while the label is ON", None, MetricType::Gauge)?;
            for (name, on) in states {
                let label = [("label", name.as_ref())];
                ConstGauge::new(i64::from(on)).encode(metric.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

/// Binds and serves in the background. A port already taken is logged as
/// an error and the daemon goes on without the endpoint: labels matter more.
/// Serves until `shutdown` turns true (the pipeline stopped), then closes
/// the listener, so a second `pipeline::run` in the process can bind again.
pub async fn start(listen: SocketAddr, exporter: Exporter, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(listen = %listen, error = %err, "cannot serve /metrics and /healthz (set service.http_listen to another address, or \"off\")");
            return;
        }
    };
    tracing::info!(listen = %listener.local_addr().unwrap_or(listen), "serving /metrics and /healthz");
    let exporter = Arc::new(exporter);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stopped| *stopped) => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let exporter = exporter.clone();
            tokio::spawn(async move {
                if let Err(err) = tokio::time::timeout(Duration::from_secs(5), serve(stream, &exporter)).await {
                    tracing::debug!(error = %err, "HTTP client too slow; closed");
                }
            });
        }
    });
}

async fn serve(mut stream: TcpStream, exporter: &Exporter) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let (status, content_type, body) = respond(&request, exporter);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn respond(request: &[u8], exporter: &Exporter) -> (&'static str, &'static str, String) {
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", exporter.encode()),
        "/healthz" => match exporter.health.verdict(Instant::now()) {
            Verdict::Healthy(reason) => ("200 OK", TEXT, format!("{reason}\n")),
            Verdict::Unhealthy(reason) => ("503 Service Unavailable", TEXT, format!("{reason}\n")),
        },
        _ => ("404 Not Found", TEXT, "try /metrics or /healthz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exporter() -> Exporter {
        let health = Arc::new(Health::new(Duration::from_secs(30)));
        health.set_labels(["cat".into(), "dog".into()]);
        let counters = Arc::new(Counters::default());
        Counters::add(&counters.frames_captured, 7);
        Counters::add(&counters.mqtt_connections, 3);
        health.inference_seconds.observe(0.042);
        health.set_label(1, true);
        Exporter { health, counters, source: "test://pattern (64x64)".into(), engine: "tract".into(), selfcheck: None }
    }

    #[test]
    fn metrics_are_prometheus_text_with_counters_states_and_the_latency_histogram() {
        let text = exporter().encode();
        assert!(text.contains("# TYPE labelcast_frames_captured_total counter"), "{text}");
        assert!(text.contains("labelcast_frames_captured_total{source=\"test://pattern (64x64)\"} 7"), "{text}");
        assert!(text.contains("labelcast_mqtt_reconnects_total 2"), "{text}");
        assert!(text.contains("labelcast_label_on{label=\"dog\"} 1"), "{text}");
        assert!(text.contains("labelcast_label_on{label=\"cat\"} 0"), "{text}");
        assert!(text.contains("labelcast_inference_seconds_bucket{engine=\"tract\",le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("labelcast_inference_seconds_count{engine=\"tract\"} 1"), "{text}");
    }

    #[test]
    fn healthz_is_503_with_the_reason_until_a_frame_is_classified() {
        let exporter = exporter();
        let (status, _, body) = respond(b"GET /healthz HTTP/1.1\r\n\r\n", &exporter);
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.contains("no frame classified yet"), "{body}");
        exporter.health.inference_started();
        exporter.health.inference_finished(true);
        exporter.health.mark_ready();
        let (status, _, body) = respond(b"GET /healthz HTTP/1.1\r\n\r\n", &exporter);
        assert_eq!((status, body.as_str()), ("200 OK", "ok\n"));
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let exporter = exporter();
        assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", &exporter).0, "404 Not Found");
        assert_eq!(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &exporter).0, "405 Method Not Allowed");
        assert_eq!(respond(b"\xff\xfe garbage", &exporter).0, "405 Method Not Allowed");
    }
}
