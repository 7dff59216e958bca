//! Home Assistant MQTT discovery: one retained `binary_sensor` per label and
//! two diagnostic sensors (frames per second, inference time), grouped under
//! one device. Home Assistant finds them when it starts or when the broker
//! replays the retained configs; when it announces itself on
//! `<prefix>/status` with `online`, labelcast sends everything again.
//!
//! A label that left the config (or the model) leaves a retained config
//! behind; labelcast spots those among the retained configs the broker
//! replays on subscribe (by this device's identifiers, never by topic name
//! alone, so another labelcast's entities are safe) and clears them with an
//! empty retained payload.

use serde_json::{Value, json};

use super::payload::Topics;
use crate::config::{ConfigError, HomeAssistantConfig, node_safe};

/// The part of a label's Home Assistant ids (`unique_id`, the discovery
/// topic's node id) that comes from its name. Home Assistant allows
/// `[a-zA-Z0-9_-]` there. An ASCII name keeps the form labelcast always gave
/// it (`traffic light` -> `traffic_light`); a name with other characters
/// (`猫`, `café`) gets what is left of it plus a short hash of the whole
/// name (FNV-1a, 32 bits, in hex), so names in any script get distinct ids
/// that do not change from run to run. The entity's display name is the
/// label itself.
pub fn object_id(name: &str) -> String {
    if name.is_ascii() {
        return node_safe(name);
    }
    // FNV-1a (64-bit offset basis and prime), folded to 32 bits.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let hash = (hash ^ (hash >> 32)) as u32;
    let safe = node_safe(name);
    let readable = safe.trim_matches('_');
    if readable.is_empty() { format!("label_{hash:08x}") } else { format!("{readable}_{hash:08x}") }
}

/// With discovery on, two labels must not share an entity: ASCII names that
/// differ only in characters Home Assistant does not allow (`a b`, `a_b`)
/// would. `field` names where the labels came from.
pub fn check_entity_ids(labels: &[impl AsRef<str>], field: &str) -> Result<(), ConfigError> {
    let mut taken: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
    for name in labels {
        let name = name.as_ref();
        let id = object_id(name);
        if let Some(other) = taken.insert(id.clone(), name)
            && other != name
        {
            return Err(ConfigError::new(
                field,
                format!(
                    "labels {other:?} and {name:?} would share the Home Assistant entity id {id:?}; rename one, \
                     or set homeassistant.discovery = false"
                ),
            ));
        }
    }
    Ok(())
}

/// One binary_sensor: what keys its ids, what Home Assistant shows as its
/// name, and where its `ON` / `OFF` is published.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub key: String,
    pub name: String,
    pub state_topic: String,
    /// With snapshots on: where its snapshot is, announced as an `image`
    /// entity keyed `<key>_snapshot`.
    pub snapshot_topic: Option<String>,
}

/// An `image` entity's key for a label entity's snapshot.
pub fn snapshot_key(key: &str) -> String {
    format!("{key}_snapshot")
}

/// The picture topic a retained `image` config points at, if it is one.
pub fn image_topic(config: &[u8]) -> Option<String> {
    let config: Value = serde_json::from_slice(config).ok()?;
    config["image_topic"].as_str().map(str::to_string)
}

/// The `image` entity's key for a camera's latest frame.
pub const FRAME_KEY: &str = "latest_frame";

/// Everything the discovery payloads need to know about this daemon (the
/// hub device), or about one of its cameras (a device of its own, linked to
/// the hub by `via_device`).
#[derive(Debug, Clone)]
pub struct Discovery {
    pub prefix: String,
    pub device_id: String,
    /// `Some`: this is a camera's device.
    pub camera: Option<String>,
    /// The daemon's topics (availability, stats).
    pub topics: Topics,
    /// What the device block shows as the model, e.g. `labelcast-demo v1`.
    pub model: String,
    /// Seconds without a state message after which Home Assistant shows the
    /// entity unavailable; label states are re-sent well within it.
    pub expire_after_s: u64,
}

impl Discovery {
    pub fn new(
        config: &HomeAssistantConfig,
        device_id: &str,
        topics: Topics,
        model: String,
        expire_after_s: u64,
    ) -> Self {
        Self {
            prefix: config.prefix.clone(),
            device_id: device_id.to_string(),
            camera: None,
            topics,
            model,
            expire_after_s,
        }
    }

    /// The discovery of one camera's device, under this hub.
    pub fn for_camera(&self, camera: &str) -> Self {
        Self { camera: Some(camera.to_string()), ..self.clone() }
    }

    /// What this device's ids start with: `<device_id>` for the hub,
    /// `<device_id>_<camera>` for a camera.
    fn object_prefix(&self) -> String {
        match &self.camera {
            None => self.device_id.clone(),
            Some(camera) => format!("{}_{camera}", self.device_id),
        }
    }

    /// Where Home Assistant announces itself.
    pub fn status_topic(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// The filter that replays every retained binary_sensor config.
    pub fn binary_sensor_configs(&self) -> String {
        format!("{}/binary_sensor/+/config", self.prefix)
    }

    /// The filter that replays every retained image config.
    pub fn image_configs(&self) -> String {
        format!("{}/image/+/config", self.prefix)
    }

    fn hub_identifier(&self) -> String {
        format!("labelcast_{}", self.device_id)
    }

    /// The hub's is `labelcast_<device_id>`; a camera's puts a `:` (which no
    /// device or camera id contains) between device and camera, so camera
    /// `door` of device `garage` is never device `garage_door`'s hub, and
    /// neither clears the other's entities as stale.
    fn device_identifier(&self) -> String {
        match &self.camera {
            None => self.hub_identifier(),
            Some(camera) => format!("labelcast_{}:{camera}", self.device_id),
        }
    }

    fn unique_id(&self, entity: &str) -> String {
        format!("{}_{}", self.device_identifier(), object_id(entity))
    }

    fn config_topic(&self, component: &str, entity: &str) -> String {
        format!("{}/{component}/{}_{}/config", self.prefix, self.object_prefix(), object_id(entity))
    }

    fn device(&self) -> Value {
        let mut device = json!({
            "identifiers": [self.device_identifier()],
            "name": format!("labelcast {}", self.device_id),
            "model": self.model,
            "manufacturer": "labelcast",
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        if let Some(camera) = &self.camera {
            device["name"] = json!(format!("labelcast {} {camera}", self.device_id));
            device["via_device"] = json!(self.hub_identifier());
        }
        device
    }

    fn common(&self, entity: &str) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert("unique_id".into(), json!(self.unique_id(entity)));
        map.insert("availability_topic".into(), json!(self.topics.available()));
        map.insert("payload_available".into(), json!("online"));
        map.insert("payload_not_available".into(), json!("offline"));
        map.insert("expire_after".into(), json!(self.expire_after_s));
        map.insert("device".into(), self.device());
        map.insert("origin".into(), json!({ "name": "labelcast", "sw_version": env!("CARGO_PKG_VERSION") }));
        map.insert("qos".into(), json!(1));
        map
    }

    /// The retained config messages for these label entities, and on the
    /// hub the two diagnostic sensors.
    pub fn messages(&self, entities: &[Entity]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entity in entities {
            let mut config = self.common(&entity.key);
            config.insert("name".into(), json!(entity.name));
            config.insert("state_topic".into(), json!(entity.state_topic));
            config.insert("payload_on".into(), json!("ON"));
            config.insert("payload_off".into(), json!("OFF"));
            out.push((self.config_topic("binary_sensor", &entity.key), Value::Object(config).to_string()));
            if let Some(topic) = &entity.snapshot_topic {
                out.push(self.image(&snapshot_key(&entity.key), &format!("{} snapshot", entity.name), topic));
            }
        }
        if self.camera.is_some() {
            return out;
        }
        for (entity, name, field, unit, extra) in [
            ("fps", "Frames per second", "fps_recent", "fps", json!({})),
            ("inference_ms", "Inference time", "inference_ms_mean", "ms", json!({ "device_class": "duration" })),
        ] {
            let mut config = self.common(entity);
            config.insert("name".into(), json!(name));
            config.insert("state_topic".into(), json!(self.topics.stats()));
            config.insert("value_template".into(), json!(format!("{{{{ value_json.{field} }}}}")));
            config.insert("unit_of_measurement".into(), json!(unit));
            config.insert("state_class".into(), json!("measurement"));
            config.insert("entity_category".into(), json!("diagnostic"));
            if let Value::Object(extra) = extra {
                config.extend(extra);
            }
            out.push((self.config_topic("sensor", entity), Value::Object(config).to_string()));
        }
        out
    }

    /// An `image` entity showing the JPEGs published on `topic`. Image
    /// entities take no `expire_after` or `qos`: availability says whether
    /// the picture is current.
    fn image(&self, key: &str, name: &str, topic: &str) -> (String, String) {
        let mut config = self.common(key);
        config.remove("expire_after");
        config.remove("qos");
        config.insert("name".into(), json!(name));
        config.insert("image_topic".into(), json!(topic));
        config.insert("content_type".into(), json!("image/jpeg"));
        (self.config_topic("image", key), Value::Object(config).to_string())
    }

    /// The camera's latest-frame `image` entity (`snapshots.frame_interval`).
    pub fn frame_message(&self, topic: &str) -> (String, String) {
        self.image(FRAME_KEY, "Latest frame", topic)
    }

    /// For a retained binary_sensor or image config the broker replayed: the entity
    /// it belongs to if it is this device's and its key is not among `keys`
    /// (`image_keys` for an image),
    /// or (on the hub) it belongs to a camera device of this hub whose id is
    /// not among `cameras`; so it must be cleared. Else `None`.
    pub fn stale_label(
        &self,
        topic: &str,
        payload: &[u8],
        keys: &[impl AsRef<str>],
        image_keys: &[impl AsRef<str>],
        cameras: &[&str],
    ) -> Option<String> {
        let ours =
            |component: &str| topic.starts_with(&format!("{}/{component}/{}_", self.prefix, self.object_prefix()));
        // Keys are per component: a label named `cat_snapshot` and the
        // snapshot image of `cat` share one.
        let keys: Vec<&str> = if ours("binary_sensor") {
            keys.iter().map(AsRef::as_ref).collect()
        } else if ours("image") {
            image_keys.iter().map(AsRef::as_ref).collect()
        } else {
            return None;
        };
        if payload.is_empty() {
            return None;
        }
        let config: Value = serde_json::from_slice(payload).ok()?;
        let identifiers = config["device"]["identifiers"].as_array()?;
        let has = |id: &str| identifiers.iter().any(|x| x.as_str() == Some(id));
        let unique_id = config["unique_id"].as_str()?;
        let name = || Some(config["name"].as_str().unwrap_or(unique_id).to_string());
        if has(&self.device_identifier()) {
            if keys.iter().any(|key| self.unique_id(key) == unique_id) {
                return None;
            }
            return name();
        }
        let camera_of_this_hub =
            self.camera.is_none() && config["device"]["via_device"].as_str() == Some(&self.hub_identifier());
        if camera_of_this_hub && !cameras.iter().any(|camera| has(&self.for_camera(camera).device_identifier())) {
            return name();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_IMAGES: &[&str] = &[];

    fn homeassistant_image_topic(body: &str) -> Option<String> {
        image_topic(body.as_bytes())
    }

    fn discovery() -> Discovery {
        Discovery {
            prefix: "homeassistant".into(),
            device_id: "kitchen".into(),
            camera: None,
            topics: Topics::new("labelcast/kitchen"),
            model: "labelcast-demo v1".into(),
            expire_after_s: 90,
        }
    }

    /// Whole-frame label entities, as the MQTT sink makes them.
    fn labels(names: &[&str]) -> Vec<Entity> {
        let topics = Topics::new("labelcast/kitchen");
        names
            .iter()
            .map(|n| Entity {
                key: n.to_string(),
                name: n.to_string(),
                state_topic: topics.label(n),
                snapshot_topic: None,
            })
            .collect()
    }

    /// The keys Home Assistant's MQTT discovery documentation requires or
    /// that labelcast relies on, with their types.
    fn assert_valid_entity(config: &Value, component: &str) {
        type TypeCheck = fn(&Value) -> bool;
        let keys: &[(&str, TypeCheck)] = &[
            ("unique_id", Value::is_string),
            ("name", Value::is_string),
            ("state_topic", Value::is_string),
            ("availability_topic", Value::is_string),
            ("payload_available", Value::is_string),
            ("payload_not_available", Value::is_string),
            ("expire_after", Value::is_u64),
            ("qos", Value::is_u64),
            ("device", Value::is_object),
            ("origin", Value::is_object),
        ];
        for (key, is_type) in keys {
            assert!(is_type(&config[key]), "{component}: {key} missing or of the wrong type in {config}");
        }
        let device = &config["device"];
        assert!(device["identifiers"].as_array().is_some_and(|ids| !ids.is_empty()), "{device}");
        for key in ["name", "model", "manufacturer", "sw_version"] {
            assert!(device[key].is_string(), "device.{key} in {device}");
        }
        assert!(config["origin"]["name"].is_string(), "origin.name is required by Home Assistant");
        const EVERY_ENTITY: &[&str] = &[
            "unique_id",
            "name",
            "state_topic",
            "availability_topic",
            "payload_available",
            "payload_not_available",
            "expire_after",
            "qos",
            "device",
            "origin",
        ];
        let component_options: &[&str] = match component {
            "binary_sensor" => &["payload_on", "payload_off"],
            _ => &["value_template", "unit_of_measurement", "state_class", "entity_category", "device_class"],
        };
        let allowed: Vec<&str> = EVERY_ENTITY.iter().chain(component_options).copied().collect();
        for key in config.as_object().unwrap().keys() {
            assert!(allowed.contains(&key.as_str()), "{component}: {key} is not a discovery option of this component");
        }
    }

    #[test]
    fn every_label_gets_a_retained_binary_sensor_config_under_one_device() {
        let messages = discovery().messages(&labels(&["cat", "coffee cup"]));
        assert_eq!(messages.len(), 4);
        let (topic, body) = &messages[0];
        assert_eq!(topic, "homeassistant/binary_sensor/kitchen_cat/config");
        let config: Value = serde_json::from_str(body).unwrap();
        assert_valid_entity(&config, "binary_sensor");
        assert_eq!(config["state_topic"], "labelcast/kitchen/label/cat");
        assert_eq!(config["availability_topic"], "labelcast/kitchen/available");
        assert_eq!(config["payload_on"], "ON");
        assert_eq!(config["unique_id"], "labelcast_kitchen_cat");
        assert_eq!(config["device"]["identifiers"][0], "labelcast_kitchen");
        assert_eq!(config["expire_after"], 90);
        assert_eq!(messages[1].0, "homeassistant/binary_sensor/kitchen_coffee_cup/config", "node ids are sanitised");
    }

    #[test]
    fn fps_and_inference_time_are_diagnostic_sensors_on_the_stats_topic() {
        let messages = discovery().messages(&labels(&[]));
        let topics: Vec<&str> = messages.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            ["homeassistant/sensor/kitchen_fps/config", "homeassistant/sensor/kitchen_inference_ms/config"]
        );
        for (_, body) in &messages {
            let config: Value = serde_json::from_str(body).unwrap();
            assert_valid_entity(&config, "sensor");
            assert_eq!(config["state_topic"], "labelcast/kitchen/stats");
            assert!(config["value_template"].as_str().unwrap().starts_with("{{ value_json."));
        }
    }

    #[test]
    fn a_retained_config_of_a_removed_label_of_this_device_is_stale_and_others_are_not() {
        let d = discovery();
        let old = d.messages(&labels(&["dog"]));
        let (topic, body) = &old[0];
        assert_eq!(d.stale_label(topic, body.as_bytes(), &["cat"], NO_IMAGES, &[]), Some("dog".to_string()));
        assert_eq!(d.stale_label(topic, body.as_bytes(), &["cat", "dog"], NO_IMAGES, &[]), None, "still configured");
        assert_eq!(d.stale_label(topic, b"", &["cat"], NO_IMAGES, &[]), None, "already cleared");
        // Another labelcast whose device id starts the same way.
        let other = Discovery { device_id: "kitchen_2".into(), ..discovery() };
        let (topic, body) = &other.messages(&labels(&["dog"]))[0];
        assert!(topic.starts_with("homeassistant/binary_sensor/kitchen_"));
        assert_eq!(d.stale_label(topic, body.as_bytes(), &["cat"], NO_IMAGES, &[]), None, "not this device's entity");
    }

    #[test]
    fn labels_in_any_script_get_distinct_stable_entity_ids_and_keep_their_names() {
        let d = discovery();
        let names = ["猫", "狗", "鳥", "café", "traffic light"];
        let messages = d.messages(&labels(&names));
        let topics: std::collections::HashSet<&String> = messages.iter().map(|(t, _)| t).collect();
        assert_eq!(topics.len(), messages.len(), "{messages:?}");
        assert_eq!(object_id("traffic light"), "traffic_light", "ASCII names keep their ids");
        assert_eq!(object_id("猫"), object_id("猫"), "stable");
        assert!(object_id("猫").starts_with("label_") && object_id("café").starts_with("caf_"));
        let config: Value = serde_json::from_str(&messages[0].1).unwrap();
        assert_eq!(config["name"], "猫");
        assert_eq!(config["state_topic"], "labelcast/kitchen/label/猫");
        check_entity_ids(&names, "model.labels").unwrap();
        let err = check_entity_ids(&["a b", "a_b"], "model.labels").unwrap_err();
        assert!(err.message.contains("homeassistant.discovery = false"), "{err}");
    }

    #[test]
    fn a_camera_is_a_device_of_its_own_via_the_hub_and_a_removed_camera_is_stale_on_the_hub() {
        let hub = discovery();
        let porch = hub.for_camera("porch");
        let topics = Topics::new("labelcast/kitchen/porch");
        let entities = [
            Entity { key: "cat".into(), name: "cat".into(), state_topic: topics.label("cat"), snapshot_topic: None },
            Entity {
                key: "door_cat".into(),
                name: "door cat".into(),
                state_topic: topics.child("door").label("cat"),
                snapshot_topic: None,
            },
        ];
        let messages = porch.messages(&entities);
        assert_eq!(messages.len(), 2, "no diagnostic sensors on a camera");
        assert_eq!(messages[1].0, "homeassistant/binary_sensor/kitchen_porch_door_cat/config");
        let config: Value = serde_json::from_str(&messages[1].1).unwrap();
        assert_valid_entity(&config, "binary_sensor");
        assert_eq!(config["device"]["identifiers"][0], "labelcast_kitchen:porch");
        assert_eq!(config["device"]["via_device"], "labelcast_kitchen");
        assert_eq!(config["unique_id"], "labelcast_kitchen:porch_door_cat");
        assert_eq!(config["state_topic"], "labelcast/kitchen/porch/door/label/cat");
        assert_eq!(config["availability_topic"], "labelcast/kitchen/available");
        let (topic, body) = &messages[1];
        // The camera still configured, its region gone: the camera clears it.
        assert_eq!(porch.stale_label(topic, body.as_bytes(), &["cat"], NO_IMAGES, &[]), Some("door cat".into()));
        assert_eq!(hub.stale_label(topic, body.as_bytes(), &[] as &[&str], NO_IMAGES, &["porch"]), None);
        // Another daemon whose device id is this one's and its camera's: not ours.
        let other = Discovery { device_id: "kitchen_porch".into(), ..discovery() };
        let (other_topic, other_body) = &other.messages(&entities)[1];
        assert_eq!(hub.stale_label(other_topic, other_body.as_bytes(), &[] as &[&str], NO_IMAGES, &["porch"]), None);
        assert_eq!(porch.stale_label(other_topic, other_body.as_bytes(), &["cat"], NO_IMAGES, &[]), None);
        // The camera gone: the hub clears it.
        assert_eq!(
            hub.stale_label(topic, body.as_bytes(), &[] as &[&str], NO_IMAGES, &["garden"]),
            Some("door cat".into())
        );
    }

    #[test]
    fn a_label_with_snapshots_gets_an_image_entity_and_a_removed_one_is_stale() {
        let hub = discovery();
        let topics = Topics::new("labelcast/kitchen");
        let entity = Entity {
            key: "cat".into(),
            name: "cat".into(),
            state_topic: topics.label("cat"),
            snapshot_topic: Some(topics.snapshot("cat")),
        };
        let messages = hub.messages(&[entity]);
        let (topic, body) = &messages[1];
        assert_eq!(topic, "homeassistant/image/kitchen_cat_snapshot/config");
        let config: Value = serde_json::from_str(body).unwrap();
        assert_eq!(config["image_topic"], "labelcast/kitchen/snapshot/cat");
        assert_eq!(config["content_type"], "image/jpeg");
        assert_eq!(config["name"], "cat snapshot");
        assert_eq!(config["unique_id"], "labelcast_kitchen_cat_snapshot");
        assert_eq!(config["device"]["identifiers"][0], "labelcast_kitchen");
        assert!(config.get("expire_after").is_none() && config.get("qos").is_none(), "{config}");
        // Snapshots switched off: the image entity is no longer among the keys.
        assert_eq!(hub.stale_label(topic, body.as_bytes(), &["cat"], NO_IMAGES, &[]), Some("cat snapshot".into()));
        assert_eq!(hub.stale_label(topic, body.as_bytes(), &["cat"], &["cat_snapshot"], &[]), None);
        // A label named like the image's key keeps no image alive, nor the reverse.
        assert_eq!(
            hub.stale_label(topic, body.as_bytes(), &["cat_snapshot"], NO_IMAGES, &[]),
            Some("cat snapshot".into())
        );
        assert_eq!(homeassistant_image_topic(body), Some("labelcast/kitchen/snapshot/cat".into()));
    }
}
