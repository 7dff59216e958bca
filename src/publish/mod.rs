//! Where label events go: an MQTT broker (external, or embedded when none is
//! configured) or stdout. The pipeline hands events over through a bounded
//! channel and never waits on a sink.

pub mod broker;
pub mod config;
pub mod homeassistant;
pub mod mqtt;
pub mod payload;
pub mod snapshot;
pub mod stdout;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::OutputConfig;
use crate::engine::ModelInfo;
use crate::labels::{LabelEvent, LabelRule};
use crate::service::Health;
use crate::telemetry::Counters;

/// What a sink runs as: a task that ends once the event channel closes
/// (the pipeline stopped), after its own clean-up (MQTT: `offline`, then
/// disconnect).
pub type SinkTask = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A destination for label events. Each is built from its config section
/// ([`OutputConfig::build`]), so the pipeline never needs to know which one
/// it feeds; a new sink is a module here and an arm in `build`.
pub trait Sink: Send {
    fn run(self: Box<Self>, events: mpsc::Receiver<LabelEvent>) -> SinkTask;
}

/// What the pipeline knows that a sink may publish.
pub struct SinkContext<'a> {
    pub device_id: &'a str,
    /// The first model: what the hub device shows.
    pub model: &'a ModelInfo,
    /// Every camera, at least one, in config order.
    pub cameras: Vec<mqtt::SinkCamera>,
    pub counters: Arc<Counters>,
    pub health: Arc<Health>,
    pub snapshots: &'a crate::config::SnapshotConfig,
}

impl OutputConfig {
    /// What must run before the model loads: the embedded broker, whose
    /// address is part of the config (a port another program holds is
    /// exit 78, found before seconds go into the model).
    pub fn start_before_model(&self) -> anyhow::Result<()> {
        if let OutputConfig::Mqtt(mqtt) = self
            && let crate::config::BrokerChoice::Embedded { listen } = mqtt.broker
        {
            broker::start_embedded(listen)?;
        }
        Ok(())
    }

    /// Checks the model's labels against what this sink makes of them: with
    /// Home Assistant discovery, two published labels must not share an
    /// entity id.
    pub fn check_rules(&self, rules: &[LabelRule]) -> Result<(), crate::config::ConfigError> {
        if let OutputConfig::Mqtt(mqtt) = self
            && mqtt.homeassistant.is_some()
        {
            let names: Vec<&str> = rules.iter().filter(|r| r.publish).map(|r| r.name.as_ref()).collect();
            homeassistant::check_entity_ids(&names, "model.labels")?;
        }
        Ok(())
    }

    /// With Home Assistant discovery, every published label of a camera's
    /// views (its whole frame, then each region) gets an entity keyed
    /// `<label>` or `<region>_<label>`: two must not share one (region
    /// `a_b` with label `c`, and region `a` with label `b_c`).
    pub fn check_views(
        &self,
        camera: &crate::source::camera::CameraConfig,
        views: &[Vec<LabelRule>],
    ) -> Result<(), crate::config::ConfigError> {
        if let OutputConfig::Mqtt(mqtt) = self
            && mqtt.homeassistant.is_some()
        {
            let published = |rules: &[LabelRule]| -> Vec<String> {
                rules.iter().filter(|r| r.publish).map(|r| r.name.to_string()).collect()
            };
            let mut keys = views.first().map(|rules| published(rules)).unwrap_or_default();
            for (region, rules) in camera.regions.iter().zip(views.iter().skip(1)) {
                keys.extend(published(rules).into_iter().map(|name| format!("{}_{name}", region.id)));
            }
            homeassistant::check_entity_ids(&keys, &format!("{}.region", camera.field))?;
        }
        Ok(())
    }

    /// How long the process should stay after the sink stopped: the embedded
    /// broker lives in this process and needs a moment to pass the last
    /// messages (`offline`, final stats) on to its subscribers.
    pub fn linger(&self) -> std::time::Duration {
        match self {
            OutputConfig::Mqtt(mqtt) if matches!(mqtt.broker, crate::config::BrokerChoice::Embedded { .. }) => {
                std::time::Duration::from_millis(300)
            }
            _ => std::time::Duration::ZERO,
        }
    }

    /// The sink this section configures.
    pub fn build(&self, context: SinkContext<'_>) -> Box<dyn Sink> {
        match self {
            OutputConfig::Mqtt(mqtt) => Box::new(mqtt::MqttSink {
                device_id: context.device_id.to_string(),
                config: (**mqtt).clone(),
                snapshots: context.snapshots.clone(),
                model: mqtt::ModelFacts::new(context.model),
                cameras: context.cameras,
                counters: context.counters,
                health: context.health,
            }),
            OutputConfig::Stdout => Box::new(stdout::StdoutSink),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> LabelRule {
        LabelRule { name: name.into(), on: 0.5, off: 0.4, publish: true, listed: true }
    }

    #[test]
    fn a_region_label_whose_entity_would_be_another_labels_is_refused_naming_the_camera() {
        let text = "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n\n[[camera]]\nid = \"porch\"\nsource = \"test://pattern\"\n\
                    [[camera.region]]\nid = \"door\"\nrect = [0.0, 0.0, 0.5, 0.5]\n";
        let raw = crate::config::RawConfig::from_toml(text).unwrap();
        let cameras = crate::source::camera::validate_cameras(&raw.camera, |_, _| Ok(())).unwrap();
        let config = crate::config::Config::validate(raw).unwrap();
        // "door cat" on the whole frame and "cat" in region "door" are both
        // Home Assistant's `door_cat`.
        let views = vec![vec![rule("door cat"), rule("cat")], vec![rule("door cat"), rule("cat")]];
        let err = config.output.check_views(&cameras[0], &views).unwrap_err();
        assert_eq!(err.field, "camera[0].region");
        assert!(err.message.contains("door_cat"), "{err}");
        let fine = vec![vec![rule("dog"), rule("cat")], vec![rule("dog"), rule("cat")]];
        assert!(config.output.check_views(&cameras[0], &fine).is_ok());
    }
}
