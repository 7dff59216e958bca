//! The JSON and topic names labelcast publishes, in one place, so the MQTT
//! sink, the stdout sink and `labelcast classify --json` print the same thing.

use std::time::SystemTime;

use serde_json::{Map, Value, json};

use crate::labels::{LabelEvent, LabelScore};

/// Topics under the configured prefix (`labelcast/<device_id>` by default).
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.trim_end_matches('/').to_string() }
    }
    /// The prefix every topic here starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The topics of a camera or region one level down: `<prefix>/<id>/...`.
    pub fn child(&self, id: &str) -> Self {
        Self { prefix: format!("{}/{id}", self.prefix) }
    }
    /// `online` / `offline`, retained; `offline` is also the Last Will.
    pub fn available(&self) -> String {
        format!("{}/available", self.prefix)
    }
    /// The full label set with scores, on every (Nth) inference.
    pub fn labels(&self) -> String {
        format!("{}/labels", self.prefix)
    }
    /// `ON` / `OFF` for one label, retained, on change.
    pub fn label(&self, name: &str) -> String {
        format!("{}/label/{name}", self.prefix)
    }
    /// Counters, retained, periodically.
    pub fn stats(&self) -> String {
        format!("{}/stats", self.prefix)
    }
    /// `streaming` / `reconnecting` / `ended`, retained.
    pub fn source(&self) -> String {
        format!("{}/source", self.prefix)
    }
    /// The frame a label turned ON on (JPEG), retained (`[snapshots]`).
    pub fn snapshot(&self, name: &str) -> String {
        format!("{}/snapshot/{name}", self.prefix)
    }
    /// The camera's latest frame (JPEG), retained, every
    /// `snapshots.frame_interval`.
    pub fn frame(&self) -> String {
        format!("{}/frame", self.prefix)
    }
}

pub fn on_off(on: bool) -> &'static str {
    if on { "ON" } else { "OFF" }
}

/// Scores are rounded to 4 decimals: finer digits are noise between engines
/// and only make payloads longer.
pub fn round_score(score: f32) -> f64 {
    (score as f64 * 1e4).round() / 1e4
}

pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// `{"active": [...], "labels": {name: {score, state}}}` for one set of scores.
fn scored(labels: &[LabelScore]) -> (Vec<String>, Map<String, Value>) {
    let mut map = Map::new();
    let mut active = Vec::new();
    for label in labels {
        map.insert(label.name.to_string(), json!({ "score": round_score(label.score), "state": on_off(label.on) }));
        if label.on {
            active.push(label.name.to_string());
        }
    }
    (active, map)
}

/// The `labels` payload: the whole frame's labels, and with regions, a
/// `regions` object carrying each region's `active` and `labels` alike.
pub fn labels_json(event: &LabelEvent) -> Value {
    let (active, labels) = scored(&event.labels);
    let mut payload = json!({
        "timestamp": rfc3339(event.timestamp),
        "sequence": event.sequence,
        "model": &*event.model,
        "inference_ms": (event.inference_ms * 100.0).round() / 100.0,
        "frame_ms": (event.frame_ms * 100.0).round() / 100.0,
        "active": active,
        "labels": labels,
    });
    if let Some(origin) = &event.origin {
        payload["origin"] = Value::String(origin.to_string());
    }
    if let Some(camera) = &event.camera {
        payload["camera"] = Value::String(camera.to_string());
    }
    if !event.regions.is_empty() {
        let regions: Map<String, Value> = event
            .regions
            .iter()
            .map(|region| {
                let (active, labels) = scored(&region.labels);
                (region.id.to_string(), json!({ "active": active, "labels": labels }))
            })
            .collect();
        payload["regions"] = Value::Object(regions);
    }
    payload
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::RegionLabels;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_labels_payload_carries_every_label_and_lists_the_active_ones() {
        let event = LabelEvent {
            sequence: 7,
            timestamp: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            origin: Some("/photos/chelsea.jpg".into()),
            model: "demo".into(),
            inference_ms: 12.3456,
            frame_ms: 20.0,
            labels: vec![
                LabelScore { name: "cat".into(), score: 0.987_654, on: true },
                LabelScore { name: "dog".into(), score: 0.012_34, on: false },
            ],
            changed: vec![LabelScore { name: "cat".into(), score: 0.987_654, on: true }],
            camera: None,
            regions: Vec::new(),
        };
        let v = labels_json(&event);
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["inference_ms"], 12.35);
        assert_eq!(v["labels"]["cat"]["score"], 0.9877);
        assert_eq!(v["labels"]["cat"]["state"], "ON");
        assert_eq!(v["labels"]["dog"]["state"], "OFF");
        assert_eq!(v["active"], json!(["cat"]));
        assert_eq!(v["origin"], "/photos/chelsea.jpg");
    }

    #[test]
    fn a_cameras_labels_payload_names_the_camera_and_carries_each_regions_labels() {
        let event = LabelEvent {
            sequence: 1,
            timestamp: UNIX_EPOCH,
            origin: None,
            model: "demo".into(),
            inference_ms: 1.0,
            frame_ms: 2.0,
            labels: vec![LabelScore { name: "cat".into(), score: 0.4, on: false }],
            changed: Vec::new(),
            camera: Some("porch".into()),
            regions: vec![RegionLabels {
                id: "door".into(),
                labels: vec![LabelScore { name: "cat".into(), score: 0.9, on: true }],
                changed: vec![LabelScore { name: "cat".into(), score: 0.9, on: true }],
            }],
        };
        let v = labels_json(&event);
        assert_eq!(v["camera"], "porch");
        assert_eq!(v["active"], json!([]));
        assert_eq!(v["regions"]["door"]["active"], json!(["cat"]));
        assert_eq!(v["regions"]["door"]["labels"]["cat"]["score"], 0.9);
    }

    #[test]
    fn topics_live_under_the_prefix() {
        let t = Topics::new("labelcast/kitchen/");
        assert_eq!(t.available(), "labelcast/kitchen/available");
        assert_eq!(t.label("cat"), "labelcast/kitchen/label/cat");
        assert_eq!(t.labels(), "labelcast/kitchen/labels");
        assert_eq!(t.stats(), "labelcast/kitchen/stats");
    }
}
