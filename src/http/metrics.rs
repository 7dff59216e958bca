//! `/metrics`: the counters, gauges and the latency histogram in the
//! Prometheus text exposition format, encoded by `prometheus-client`.

use std::sync::Arc;
use std::time::Instant;

use crate::service::Health;
use crate::telemetry::Counters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
