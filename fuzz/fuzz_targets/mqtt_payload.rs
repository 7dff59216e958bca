//! What labelcast publishes: label names (from a model, a sidecar or the
//! config), scores straight out of a model (NaN and infinities included), a
//! frame's origin and the device id go into MQTT topics, the `labels` JSON
//! and the Home Assistant discovery configs. For every name the config
//! checks accept, each topic must be a valid MQTT topic to publish to (no
//! wildcard, no U+0000, within the length limit) and each payload valid JSON
//! that carries the name back unchanged.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use labelcast::config::{HomeAssistantConfig, check_label_names, sanitize_id};
use labelcast::labels::{LabelEvent, LabelScore};
use labelcast::publish::homeassistant::Discovery;
use labelcast::publish::payload::{Topics, labels_json};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[derive(Debug, Arbitrary)]
struct Input {
    device: String,
    origin: Option<String>,
    model: String,
    sequence: u64,
    inference_ms: f64,
    labels: Vec<(String, f32, bool)>,
    retained_config: Vec<u8>,
}

/// MQTT 5 / 3.1.1: a topic to publish to is 1 to 65535 bytes of UTF-8 with
/// no U+0000 and no wildcard.
fn assert_publishable(topic: &str) {
    assert!(!topic.is_empty() && topic.len() <= 65535, "topic length {}", topic.len());
    assert!(!topic.contains(['+', '#', '\0']), "topic {topic:?} cannot be published to");
}

fuzz_target!(|input: Input| {
    let names: Vec<String> = input.labels.iter().map(|(name, ..)| name.clone()).collect();
    if check_label_names(&names, "fuzz").is_err() {
        return;
    }
    let device = sanitize_id(&input.device);
    if device.is_empty() {
        return;
    }
    let topics = Topics::new(&format!("labelcast/{device}"));
    for topic in [topics.available(), topics.labels(), topics.stats(), topics.source()] {
        assert_publishable(&topic);
    }

    let event = LabelEvent {
        sequence: input.sequence,
        timestamp: SystemTime::UNIX_EPOCH + Duration::from_millis(input.sequence % (1 << 44)),
        origin: input.origin.map(Arc::from),
        model: Arc::from(input.model.as_str()),
        inference_ms: input.inference_ms,
        frame_ms: input.inference_ms,
        labels: input
            .labels
            .iter()
            .map(|(name, score, on)| LabelScore { name: Arc::from(name.as_str()), score: *score, on: *on })
            .collect(),
        changed: Vec::new(),
    };
    let payload = labels_json(&event).to_string();
    let parsed: Value = serde_json::from_str(&payload).expect("the labels payload is JSON");
    for name in &names {
        assert_publishable(&topics.label(name));
        assert!(parsed["labels"].get(name).is_some(), "label {name:?} is missing from {payload}");
    }

    let ha = HomeAssistantConfig { prefix: "homeassistant".into(), birth_delay: Duration::ZERO };
    let discovery = Discovery::new(&ha, &device, topics, input.model.clone(), 60);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let messages = discovery.messages(&refs);
    let distinct: std::collections::HashSet<&String> = messages.iter().map(|(topic, _)| topic).collect();
    assert_eq!(distinct.len(), messages.len(), "two entities share a discovery topic: {messages:?}");
    for (topic, config) in messages {
        assert_publishable(&topic);
        assert_eq!(topic.split('/').count(), 4, "a discovery topic has 4 levels: {topic:?}");
        let config: Value = serde_json::from_str(&config).expect("a discovery config is JSON");
        assert_publishable(config["state_topic"].as_str().expect("state_topic"));
    }
    // A retained config replayed by the broker: anything at all must be
    // handled, and labels still configured are never cleared.
    for name in &refs {
        let topic = format!("homeassistant/binary_sensor/{device}_{name}/config");
        assert_eq!(discovery.stale_label(&topic, &input.retained_config, &refs), None, "{name:?} would be cleared");
    }
});
