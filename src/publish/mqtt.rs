//! The MQTT sink, on `rumqttc`.
//!
//! Two tasks share one client. The *connection driver* polls rumqttc's event
//! loop (it must be polled for anything to move) and owns reconnecting:
//! rumqttc retries on the next poll without waiting, so the driver sleeps a
//! capped exponential backoff with jitter between failed attempts, and
//! resets it only once a connection has stayed up for [`STABLE_CONNECTION`]:
//! two daemons with one client id (cloned SD cards share host names) kick
//! each other off the broker, and resetting on every ConnAck made them
//! reconnect in a tight loop. The driver also says what went wrong in words:
//! a broker that refused the connection (with the CONNACK code and what to
//! check) is not a broker that could not be reached.
//!
//! The *publisher* turns label events into messages; it never blocks: while
//! the broker is away, `labels` messages are dropped and counted, and the
//! latest per-label state is kept and re-sent (retained) on every reconnect,
//! together with `available = online`. A message counts as published when
//! the broker acknowledged it (QoS >= 1): the [`Outbox`] follows each one
//! from the queue to the wire to its PUBACK, so a frozen broker shows as
//! overdue acknowledgements in `/healthz`, and a clean shutdown waits for
//! them before DISCONNECT.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, StateError,
    TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};

use super::homeassistant::{self, Discovery, Entity};
use super::payload::{self, Topics};
use super::snapshot::{self, Snapshots};
use crate::config::{BrokerChoice, MqttConfig, SnapshotConfig, TlsConfig};
use crate::engine::ModelInfo;
use crate::labels::{LabelEvent, LabelRule, LabelScore};
use crate::service::{Health, SourceState};
use crate::source::camera::Rect;
use crate::status::FrameTap;
use crate::telemetry::{Counters, RateLimit};

pub use crate::backoff::Backoff;

/// A connection that stayed up this long was a real one: the backoff starts
/// again from `mqtt.reconnect_min` after it. One the broker closes sooner,
/// twice in a row, means another client took the session over.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How long a clean shutdown waits for the broker to acknowledge the last
/// messages (`offline`, final stats) before DISCONNECT.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(3);

/// The `source` topic is re-published at most this often; a source that
/// flaps is published in its latest state once the interval has passed.
const SOURCE_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// What a message was, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Labels,
    Snapshot,
    Other,
}

/// Messages handed to rumqttc and not yet acknowledged, shared by the
/// publisher (which queues them) and the connection driver (which sees them
/// written, `Outgoing::Publish(pkid)`, and acknowledged, PUBACK/PUBCOMP).
/// rumqttc handles its request queue in order, so the n-th publish written
/// is the n-th queued; a packet id written again is a retransmission after
/// a reconnect (rumqttc keeps the id).
#[derive(Debug, Default)]
struct Outbox {
    queued: VecDeque<Kind>,
    inflight: HashMap<u16, (Kind, Instant)>,
}

impl Outbox {
    /// A publish went out. Returns its kind when it is complete now (QoS 0).
    fn written(&mut self, pkid: u16, now: Instant) -> Option<Kind> {
        if pkid != 0 && self.inflight.contains_key(&pkid) {
            return None;
        }
        let kind = self.queued.pop_front().unwrap_or(Kind::Other);
        if pkid == 0 {
            return Some(kind);
        }
        self.inflight.insert(pkid, (kind, now));
        None
    }

    /// The broker acknowledged a publish.
    fn acknowledged(&mut self, pkid: u16) -> Option<Kind> {
        self.inflight.remove(&pkid).map(|(kind, _)| kind)
    }

    fn oldest(&self) -> Option<Instant> {
        self.inflight.values().map(|(_, at)| *at).min()
    }

    fn is_empty(&self) -> bool {
        self.queued.is_empty() && self.inflight.is_empty()
    }

    /// The connection dropped: what was queued or in flight is lost.
    fn forget(&mut self) {
        self.queued.clear();
        self.inflight.clear();
    }

    fn waiting(&self) -> usize {
        self.queued.len() + self.inflight.len()
    }
}

type SharedOutbox = Arc<Mutex<Outbox>>;

fn lock(outbox: &SharedOutbox) -> std::sync::MutexGuard<'_, Outbox> {
    outbox.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a connection attempt or a connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The broker answered the CONNECT with a refusal.
    Refused,
    /// The broker (or something on the way) closed an open connection.
    Closed,
    /// TCP or TLS did not get through.
    Unreachable,
}

/// The failure in words, with what to check for a refusal.
fn explain(err: &ConnectionError, client_id: &str, keep_alive: Duration) -> (Failure, String) {
    let closed = |kind: std::io::ErrorKind| {
        matches!(
            kind,
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
        )
    };
    match err {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => {
                    "bad user name or password: check mqtt.username and mqtt.password_file (or mqtt.password_env)"
                        .to_string()
                }
                ConnectReturnCode::NotAuthorized => "not authorised: check mqtt.username and mqtt.password_file \
                    (or mqtt.password_env), and the broker's access rules for this client"
                    .to_string(),
                ConnectReturnCode::BadClientId => format!(
                    "identifier rejected for client id {client_id:?}: set mqtt.client_id to one the broker accepts \
                     (and unique per device); mosquitto >= 2.0.12 also answers this when mqtt.keep_alive ({}s) is \
                     above its max_keepalive",
                    keep_alive.as_secs()
                ),
                ConnectReturnCode::ServiceUnavailable => {
                    "server unavailable: the broker is up but not taking clients (starting, or at its limits)".into()
                }
                ConnectReturnCode::RefusedProtocolVersion => {
                    "unacceptable protocol version: the broker does not speak MQTT 3.1.1".into()
                }
                ConnectReturnCode::Success => "refused with return code 0".into(),
            };
            (Failure::Refused, format!("the broker refused the connection: {why}"))
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => {
            (Failure::Closed, "the broker closed the connection".into())
        }
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) if closed(io.kind()) => {
            (Failure::Closed, format!("the connection was closed ({io})"))
        }
        ConnectionError::MqttState(StateError::AwaitPingResp) => {
            (Failure::Unreachable, "the broker stopped answering (no reply to the keep-alive ping)".into())
        }
        ConnectionError::Tls(tls) => (
            Failure::Unreachable,
            format!(
                "TLS failed ({tls}): check mqtt.tls.ca_file and that the broker's certificate names the host in mqtt.url"
            ),
        ),
        ConnectionError::NetworkTimeout => (Failure::Unreachable, "no answer within the network timeout".into()),
        other => (Failure::Unreachable, other.to_string()),
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Connection state as the driver sees it; `generation` grows on every ConnAck.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Link {
    connected: bool,
    generation: u64,
}

/// What the device block in Home Assistant shows as the model.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub name: String,
}

impl ModelFacts {
    pub fn new(info: &ModelInfo) -> Self {
        let meta = &info.metadata;
        let mut name = meta.name.clone();
        if let Some(version) = &meta.version {
            name += &format!(" v{version}");
        }
        Self { name: format!("{name} ({}, {})", info.engine, info.precision()) }
    }
}

/// Hands messages to rumqttc without waiting, each recorded in the
/// [`Outbox`] in the same step. Shared by the publisher and the snapshot
/// encoder.
#[derive(Clone)]
pub(super) struct Outlet {
    client: AsyncClient,
    outbox: SharedOutbox,
    qos: QoS,
    connected: Arc<AtomicBool>,
}

impl Outlet {
    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Queues a message; false when rumqttc's queue is full.
    pub(super) fn send(&self, topic: String, retain: bool, body: impl Into<Vec<u8>>, kind: Kind) -> bool {
        // Retained state must not be lost silently: at least QoS 1 for it.
        let qos = if retain && self.qos == QoS::AtMostOnce { QoS::AtLeastOnce } else { self.qos };
        // Held while queueing, so the driver cannot see this message written
        // before it is in the outbox.
        let mut outbox = lock(&self.outbox);
        match self.client.try_publish(topic.as_str(), qos, retain, body) {
            Ok(()) => {
                outbox.queued.push_back(kind);
                true
            }
            Err(err) => {
                tracing::debug!(topic, error = %err, "MQTT queue full; message dropped");
                false
            }
        }
    }
}

/// The MQTT sink and what it needs.
pub struct MqttSink {
    pub device_id: String,
    pub config: MqttConfig,
    pub snapshots: SnapshotConfig,
    pub model: ModelFacts,
    /// Every camera, at least one, in config order.
    pub cameras: Vec<SinkCamera>,
    pub counters: Arc<Counters>,
    pub health: Arc<Health>,
}

/// A camera as the sink publishes it.
pub struct SinkCamera {
    /// `None`: the single camera of a `[source]` config, whose topics sit
    /// right under the prefix as they always did.
    pub id: Option<Arc<str>>,
    pub regions: Vec<Arc<str>>,
    /// Where its source state is read.
    pub health: Arc<Health>,
    /// Per view (its whole frame, then each region): the label rules, its
    /// model's with the view's own labels and thresholds.
    pub rules: Vec<Vec<LabelRule>>,
    /// Each region's rectangle, in config order (outlined on snapshots).
    pub outlines: Vec<Rect>,
    /// Its recent frames, for snapshots.
    pub tap: Arc<FrameTap>,
}

/// One set of label states with its own topics: a camera's whole frame or
/// one of its regions.
struct View {
    topics: Topics,
    /// What Home Assistant's entity for a label of this view is keyed and
    /// named by (the label alone for a whole frame, `<region> <label>` for
    /// a region).
    region: Option<Arc<str>>,
    /// The region's rectangle, outlined on its snapshots.
    outline: Option<Rect>,
    /// The published labels' states (`labels.publish`), and where each is.
    states: Vec<(Arc<str>, bool)>,
    index: HashMap<Arc<str>, usize>,
}

impl View {
    fn new(topics: Topics, region: Option<(Arc<str>, Rect)>, rules: &[LabelRule]) -> Self {
        let states: Vec<(Arc<str>, bool)> =
            rules.iter().filter(|r| r.publish).map(|r| (r.name.clone(), false)).collect();
        let index = states.iter().enumerate().map(|(i, (name, _))| (name.clone(), i)).collect();
        let (region, outline) = region.unzip();
        Self { topics, region, outline, states, index }
    }
}

/// A camera's topics, source state and views.
struct CameraTopics {
    id: Option<Arc<str>>,
    topics: Topics,
    /// The whole frame first, then each region in config order.
    views: Vec<View>,
    discovery: Option<Discovery>,
    health: Arc<Health>,
    /// What its `source` topic says (or will say once the interval allows).
    source_state: SourceState,
    /// When its `source` topic was last published, and when it is next due
    /// (a source that flaps is published at most once a second).
    source_published: Option<Instant>,
    source_due: Option<Instant>,
    events_seen: u64,
}

impl super::Sink for MqttSink {
    fn run(self: Box<Self>, events: mpsc::Receiver<LabelEvent>) -> super::SinkTask {
        Box::pin(self.publish(events))
    }
}

impl MqttSink {
    /// Runs until `events` closes (the pipeline stopped), then publishes
    /// `offline` and disconnects cleanly.
    pub async fn publish(self, mut events: mpsc::Receiver<LabelEvent>) -> anyhow::Result<()> {
        let MqttSink { device_id, config, snapshots: snapshot_config, model, cameras, counters, health } = self;
        // The embedded broker, when chosen, was started before the sink and
        // listens on its address.
        let (host, port) = match &config.broker {
            BrokerChoice::External { host, port } => (host.clone(), *port),
            BrokerChoice::Embedded { listen } => (listen.ip().to_string(), listen.port()),
        };
        let topics = Topics::new(&config.topic_prefix);
        let mut options = MqttOptions::new(&config.client_id, host.as_str(), port);
        options
            .set_keep_alive(config.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(256 * 1024, snapshot::MAX_PACKET_BYTES)
            .set_last_will(LastWill::new(topics.available(), "offline", QoS::AtLeastOnce, true));
        if let Some(user) = &config.username {
            options.set_credentials(user, config.password.as_ref().map(|p| p.expose()).unwrap_or(""));
        }
        if let Some(tls) = &config.tls {
            options.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls_client_config(tls)?)));
        }
        let (client, eventloop) = AsyncClient::new(options, 256);
        let (link_tx, link_rx) = watch::channel(Link::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let (incoming_tx, mut incoming_rx) = mpsc::channel::<rumqttc::Publish>(256);
        let outbox: SharedOutbox = Arc::default();
        let outlet =
            Outlet { client: client.clone(), outbox: outbox.clone(), qos: qos(config.qos), connected: Arc::default() };
        health.mqtt_started();
        let driver = tokio::spawn(drive_connection(
            eventloop,
            DriverSettings {
                broker: format!("{host}:{port}"),
                min: config.reconnect_min,
                max: config.reconnect_max,
                client_id: config.client_id.clone(),
                keep_alive: config.keep_alive,
            },
            link_tx,
            incoming_tx,
            stop_rx,
            counters.clone(),
            health.clone(),
            outbox.clone(),
        ));
        tracing::info!(broker = %format!("{host}:{port}"), tls = config.tls.is_some(), client_id = %config.client_id, prefix = %config.topic_prefix, homeassistant = config.homeassistant.is_some(), "MQTT sink starting");

        // Label states are re-sent with every stats message, so Home
        // Assistant's expire_after (three stats intervals, at least a
        // minute) only fires when labelcast is really gone.
        let expire_after_s = (config.stats_interval.as_secs() * 3).max(60);
        let discovery = config
            .homeassistant
            .as_ref()
            .map(|ha| Discovery::new(ha, &device_id, topics.clone(), model.name.clone(), expire_after_s));
        let taps: Vec<Arc<FrameTap>> = cameras.iter().map(|camera| camera.tap.clone()).collect();
        let snapshots = if snapshot_config.enabled {
            Some(Snapshots::start(taps, &snapshot_config, outlet.clone(), counters.clone())?)
        } else {
            None
        };
        let cameras = cameras
            .into_iter()
            .map(|camera| {
                let camera_topics = match &camera.id {
                    None => topics.clone(),
                    Some(id) => topics.child(id),
                };
                let rules = &camera.rules;
                let mut views = vec![View::new(camera_topics.clone(), None, &rules[0])];
                views.extend(camera.regions.iter().zip(&camera.outlines).zip(&rules[1..]).map(
                    |((region, outline), rules)| {
                        View::new(camera_topics.child(region), Some((region.clone(), *outline)), rules)
                    },
                ));
                CameraTopics {
                    discovery: camera.id.as_ref().and_then(|id| discovery.as_ref().map(|hub| hub.for_camera(id))),
                    id: camera.id,
                    topics: camera_topics,
                    views,
                    source_state: camera.health.source_report(Instant::now()),
                    health: camera.health,
                    source_published: None,
                    source_due: None,
                    events_seen: 0,
                }
            })
            .collect();
        let birth_delay = config.homeassistant.as_ref().map(|ha| ha.birth_delay).unwrap_or_default();
        let mut publisher = Publisher {
            client: client.clone(),
            outlet,
            snapshots,
            frame_topic: snapshot_config.frame_interval.is_some(),
            snapshot_every: snapshot_config.min_interval,
            last_snapshot: HashMap::new(),
            topics,
            publish_every: config.publish_every,
            cameras,
            counters: counters.clone(),
            started: Instant::now(),
            fps_window: (Instant::now(), 0),
            connected: false,
            drop_warning: RateLimit::new(Duration::from_secs(30)),
            discovery,
        };
        let mut source_rx = health.watch_source_state();
        // Hung and stalled are read off the health marks, not announced:
        // look once a second.
        let mut source_tick = tokio::time::interval(Duration::from_secs(1));
        source_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source_due: Option<tokio::time::Instant> = None;
        let mut link_rx = link_rx;
        let mut stats_tick = tokio::time::interval(config.stats_interval);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut birth_due: Option<tokio::time::Instant> = None;
        // The latest-frame topic, when asked for: its first picture after
        // one interval, so a frame has been kept by then.
        let frame_every = snapshot_config.frame_interval.unwrap_or(Duration::from_secs(3600));
        let mut frame_tick = tokio::time::interval_at(tokio::time::Instant::now() + frame_every, frame_every);
        frame_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Each branch is cancel-safe: recv, changed, tick and sleep_until
            // lose nothing when another branch wins.
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => publisher.on_event(&event),
                    None => break,
                },
                changed = link_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let link = *link_rx.borrow_and_update();
                    publisher.connected = link.connected;
                    publisher.outlet.connected.store(link.connected, Ordering::Relaxed);
                    health.set_mqtt(link.connected);
                    if link.connected {
                        publisher.on_connect();
                    }
                }
                Ok(()) = source_rx.changed() => {
                    source_rx.borrow_and_update();
                    source_due = publisher.update_sources();
                }
                _ = source_tick.tick() => {
                    source_due = publisher.update_sources();
                }
                _ = tokio::time::sleep_until(source_due.unwrap_or_else(tokio::time::Instant::now)), if source_due.is_some() => {
                    source_due = publisher.publish_due_sources();
                }
                Some(message) = incoming_rx.recv() => {
                    if publisher.on_message(&message) {
                        birth_due = Some(tokio::time::Instant::now() + birth_delay);
                    }
                }
                _ = tokio::time::sleep_until(birth_due.unwrap_or_else(tokio::time::Instant::now)), if birth_due.is_some() => {
                    birth_due = None;
                    if publisher.connected {
                        tracing::info!("Home Assistant came online: re-sending discovery and label states");
                        publisher.announce();
                    }
                }
                _ = stats_tick.tick() => {
                    publisher.publish_stats();
                    publisher.publish_states();
                }
                _ = frame_tick.tick(), if snapshot_config.frame_interval.is_some() => {
                    publisher.publish_frames(frame_every);
                }
            }
        }

        // No picture after `offline`: the encoder thread ends with its queue.
        publisher.snapshots = None;
        publisher.outlet.connected.store(false, Ordering::Relaxed);
        if publisher.connected {
            publisher.publish_sources();
            publisher.publish_stats();
            publisher.send(publisher.topics.available(), true, "offline".into(), Kind::Other);
            // Wait (bounded) for the broker to acknowledge what is in flight:
            // closing first made mosquitto drop the connection as broken and
            // publish the Last Will too, so subscribers saw `offline` twice.
            let deadline = Instant::now() + SHUTDOWN_ACK_WAIT;
            while !lock(&outbox).is_empty() && Instant::now() < deadline && *link_rx.borrow() != Link::default() {
                if !link_rx.borrow().connected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let waiting = lock(&outbox).waiting();
            if waiting > 0 {
                tracing::warn!(waiting, "disconnecting from MQTT with messages not acknowledged within 3 s");
            }
            let _ = client.try_disconnect();
        }
        let _ = stop_tx.send(true);
        if tokio::time::timeout(Duration::from_secs(3), driver).await.is_err() {
            tracing::warn!("MQTT connection did not close within 3 s; exiting anyway");
        }
        tracing::info!("MQTT sink stopped");
        Ok(())
    }
}

struct Publisher {
    client: AsyncClient,
    outlet: Outlet,
    /// The snapshot encoder, when `[snapshots]` is on.
    snapshots: Option<Snapshots>,
    /// Each camera's latest frame is published (`snapshots.frame_interval`).
    frame_topic: bool,
    /// `snapshots.min_interval`, and when each snapshot topic was last sent.
    snapshot_every: Duration,
    last_snapshot: HashMap<String, Instant>,
    /// The daemon's own topics: availability and stats.
    topics: Topics,
    publish_every: u32,
    cameras: Vec<CameraTopics>,
    counters: Arc<Counters>,
    started: Instant,
    /// Start and inference count of the current frames-per-second window.
    fps_window: (Instant, u64),
    connected: bool,
    drop_warning: RateLimit,
    /// The hub device's discovery (and the single camera's entities).
    discovery: Option<Discovery>,
}

impl Publisher {
    fn on_connect(&mut self) {
        if let Some(discovery) = &self.discovery {
            // Clean sessions: subscriptions are made again on every connect.
            for filter in [discovery.status_topic(), discovery.binary_sensor_configs(), discovery.image_configs()] {
                if let Err(err) = self.client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                    tracing::warn!(filter, error = %err, "cannot subscribe");
                }
            }
        }
        self.announce();
    }

    /// The entities each camera's discovery announces: (key, display name,
    /// state topic, snapshot topic), over its views.
    fn entities(camera: &CameraTopics, snapshots: bool) -> Vec<Entity> {
        camera
            .views
            .iter()
            .flat_map(|view| {
                view.states.iter().map(move |(name, _)| {
                    let (key, shown) = match &view.region {
                        None => (name.to_string(), name.to_string()),
                        Some(region) => (format!("{region}_{name}"), format!("{region} {name}")),
                    };
                    Entity {
                        key,
                        name: shown,
                        state_topic: view.topics.label(name),
                        snapshot_topic: snapshots.then(|| view.topics.snapshot(name)),
                    }
                })
            })
            .collect()
    }

    /// The keys of every entity a camera's discovery announces: its label
    /// `binary_sensor`s, and its `image`s (snapshots, the latest frame).
    /// Retained configs not among them are stale.
    fn entity_keys(&self, camera: &CameraTopics) -> (Vec<String>, Vec<String>) {
        let (mut labels, mut images) = (Vec::new(), Vec::new());
        for entity in Self::entities(camera, self.snapshots.is_some()) {
            if entity.snapshot_topic.is_some() {
                images.push(homeassistant::snapshot_key(&entity.key));
            }
            labels.push(entity.key);
        }
        if self.frame_topic {
            images.push(homeassistant::FRAME_KEY.to_string());
        }
        (labels, images)
    }

    /// Discovery (when on), availability, every label state and stats.
    fn announce(&mut self) {
        if let Some(hub) = &self.discovery {
            // The single camera of a `[source]` config is the hub device's;
            // `[[camera]]` cameras are devices of their own, via the hub.
            let snapshots = self.snapshots.is_some();
            let single: Vec<Entity> =
                self.cameras.iter().filter(|c| c.id.is_none()).flat_map(|c| Self::entities(c, snapshots)).collect();
            let mut messages = hub.messages(&single);
            for camera in &self.cameras {
                let discovery = camera.discovery.as_ref().unwrap_or(hub);
                if let Some(own) = &camera.discovery {
                    messages.extend(own.messages(&Self::entities(camera, snapshots)));
                }
                if self.frame_topic {
                    messages.push(discovery.frame_message(&camera.topics.frame()));
                }
            }
            for (topic, body) in messages {
                self.send(topic, true, body, Kind::Other);
            }
        }
        self.send(self.topics.available(), true, "online".into(), Kind::Other);
        self.publish_sources();
        self.publish_states();
        self.publish_stats();
    }

    /// Handles a message from a subscription; true when Home Assistant
    /// announced it is online (discovery is then re-sent after a delay).
    fn on_message(&mut self, message: &rumqttc::Publish) -> bool {
        let Some(hub) = &self.discovery else { return false };
        if message.topic == hub.status_topic() {
            return message.payload.as_ref() == b"online";
        }
        if message.retain {
            let (mut single, mut single_images) = (Vec::new(), Vec::new());
            for camera in self.cameras.iter().filter(|c| c.id.is_none()) {
                let (labels, images) = self.entity_keys(camera);
                single.extend(labels);
                single_images.extend(images);
            }
            let camera_ids: Vec<&str> = self.cameras.iter().filter_map(|c| c.id.as_deref()).collect();
            let mut stale = hub.stale_label(&message.topic, &message.payload, &single, &single_images, &camera_ids);
            for camera in &self.cameras {
                if let Some(discovery) = &camera.discovery {
                    let (labels, images) = self.entity_keys(camera);
                    stale = stale
                        .or_else(|| discovery.stale_label(&message.topic, &message.payload, &labels, &images, &[]));
                }
            }
            if let Some(stale) = stale {
                tracing::info!(entity = %stale, topic = %message.topic, "removing the Home Assistant entity of a label, region or camera no longer configured");
                self.send(message.topic.clone(), true, String::new(), Kind::Other);
                // A stale image entity's retained picture goes too: pictures
                // stay on the broker only while they are asked for.
                if let Some(picture) = homeassistant::image_topic(&message.payload)
                    && picture.starts_with(&format!("{}/", self.topics.prefix()))
                {
                    tracing::info!(topic = %picture, "clearing the retained picture of a removed snapshot entity");
                    self.send(picture, true, String::new(), Kind::Other);
                }
            }
        }
        false
    }

    /// Reads every camera's source state; publishes the changed ones now,
    /// or once a second has passed since its last. Returns when the next
    /// held-back one is due.
    fn update_sources(&mut self) -> Option<tokio::time::Instant> {
        let now = Instant::now();
        for index in 0..self.cameras.len() {
            let camera = &mut self.cameras[index];
            let state = camera.health.source_report(now);
            if state == camera.source_state {
                continue;
            }
            camera.source_state = state;
            match camera.source_published.map(|at| at.elapsed()) {
                Some(since) if since < SOURCE_PUBLISH_INTERVAL => {
                    camera.source_due = Some(now + (SOURCE_PUBLISH_INTERVAL - since));
                }
                _ => self.publish_source(index),
            }
        }
        self.next_source_due()
    }

    /// Publishes the held-back source states that are due.
    fn publish_due_sources(&mut self) -> Option<tokio::time::Instant> {
        let now = Instant::now();
        for index in 0..self.cameras.len() {
            if self.cameras[index].source_due.is_some_and(|due| due <= now) {
                self.publish_source(index);
            }
        }
        self.next_source_due()
    }

    fn next_source_due(&self) -> Option<tokio::time::Instant> {
        self.cameras.iter().filter_map(|c| c.source_due).min().map(tokio::time::Instant::from_std)
    }

    fn publish_sources(&mut self) {
        for index in 0..self.cameras.len() {
            self.publish_source(index);
        }
    }

    fn publish_source(&mut self, index: usize) {
        if self.connected {
            let camera = &self.cameras[index];
            self.send(camera.topics.source(), true, camera.source_state.as_str().into(), Kind::Other);
            let camera = &mut self.cameras[index];
            camera.source_published = Some(Instant::now());
            camera.source_due = None;
        }
    }

    fn publish_states(&self) {
        if self.connected {
            for view in self.cameras.iter().flat_map(|c| &c.views) {
                for (name, on) in &view.states {
                    self.send(view.topics.label(name), true, payload::on_off(*on).into(), Kind::Other);
                }
            }
        }
    }

    fn on_event(&mut self, event: &LabelEvent) {
        let Some(index) = self.cameras.iter().position(|c| c.id == event.camera) else {
            tracing::warn!(
                camera = event.camera.as_deref(),
                "labels for a camera the MQTT sink does not know; dropped"
            );
            return;
        };
        let mut changes: Vec<(String, bool)> = Vec::new();
        let mut pictures: Vec<(Option<Rect>, Vec<String>)> = Vec::new();
        let snapshots = self.snapshots.is_some();
        {
            let camera = &mut self.cameras[index];
            // Only published labels have a topic.
            let mut record = |view: &mut View, changed: &[LabelScore]| {
                let mut turned_on = Vec::new();
                for label in changed {
                    if let Some(&i) = view.index.get(&label.name) {
                        view.states[i].1 = label.on;
                        changes.push((view.topics.label(&label.name), label.on));
                        if label.on {
                            turned_on.push(view.topics.snapshot(&label.name));
                        }
                    }
                }
                // One picture for every label this view turned ON on this frame.
                if snapshots && !turned_on.is_empty() {
                    pictures.push((view.outline, turned_on));
                }
            };
            record(&mut camera.views[0], &event.changed);
            for region in &event.regions {
                if let Some(view) = camera.views.iter_mut().find(|v| v.region.as_ref() == Some(&region.id)) {
                    record(view, &region.changed);
                }
            }
        }
        if self.connected {
            for (topic, on) in changes {
                self.send(topic, true, payload::on_off(on).into(), Kind::Other);
            }
        }
        if let Some(snapshots) = &self.snapshots {
            // A label that flaps gets one picture per `min_interval`.
            let now = Instant::now();
            for (outline, mut topics) in pictures {
                topics.retain(|topic| {
                    let due =
                        self.last_snapshot.get(topic).is_none_or(|at| now.duration_since(*at) >= self.snapshot_every);
                    if due {
                        self.last_snapshot.insert(topic.clone(), now);
                    }
                    due
                });
                if !topics.is_empty() {
                    snapshots.request(snapshot::Request {
                        camera: index,
                        sequence: Some(event.sequence),
                        outline,
                        max_age: None,
                        topics,
                    });
                }
            }
        }
        let camera = &mut self.cameras[index];
        let due = camera.events_seen.is_multiple_of(u64::from(self.publish_every));
        camera.events_seen += 1;
        if !due {
            return;
        }
        let labels_topic = camera.topics.labels();
        if !self.connected {
            Counters::inc(&self.counters.labels_dropped);
            if let Some(suppressed) = self.drop_warning.check(Instant::now()) {
                tracing::warn!(
                    suppressed,
                    dropped_total = Counters::get(&self.counters.labels_dropped),
                    "broker away: dropping labels messages (label states are kept and re-sent on reconnect)"
                );
            }
            return;
        }
        let began = Instant::now();
        let body = payload::labels_json(event).to_string();
        // Counted as published when the broker acknowledges it (the driver).
        if self.send(labels_topic, false, body, Kind::Labels) {
            Counters::add(&self.counters.publish_us_total, began.elapsed().as_micros() as u64);
        } else {
            Counters::inc(&self.counters.labels_dropped);
        }
    }

    fn publish_stats(&mut self) {
        if self.connected {
            let mut snapshot = self.counters.snapshot(self.started.elapsed());
            let frames = Counters::get(&self.counters.frames_classified);
            let (since, before) = self.fps_window;
            let seconds = since.elapsed().as_secs_f64();
            if seconds > 0.0 {
                let recent = (frames - before) as f64 / seconds;
                snapshot["fps_recent"] = serde_json::json!((recent * 100.0).round() / 100.0);
            }
            self.fps_window = (Instant::now(), frames);
            self.send(self.topics.stats(), true, snapshot.to_string(), Kind::Other);
        }
    }

    /// Each camera's newest kept frame on its `frame` topic.
    fn publish_frames(&self, interval: Duration) {
        let Some(snapshots) = &self.snapshots else { return };
        for (index, camera) in self.cameras.iter().enumerate() {
            snapshots.request(snapshot::Request {
                camera: index,
                sequence: None,
                outline: None,
                max_age: Some(interval * 2),
                topics: vec![camera.topics.frame()],
            });
        }
    }

    /// Queues a message without waiting; false when rumqttc's queue is full.
    fn send(&self, topic: String, retain: bool, body: String, kind: Kind) -> bool {
        self.outlet.send(topic, retain, body, kind)
    }
}

/// What the connection driver needs besides its channels.
struct DriverSettings {
    /// `host:port`, for the log.
    broker: String,
    min: Duration,
    max: Duration,
    client_id: String,
    keep_alive: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn drive_connection(
    mut eventloop: rumqttc::EventLoop,
    settings: DriverSettings,
    link: watch::Sender<Link>,
    incoming: mpsc::Sender<rumqttc::Publish>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    health: Arc<Health>,
    outbox: SharedOutbox,
) {
    let mut backoff = Backoff::new(settings.min, settings.max);
    let mut generation = 0;
    let mut connected_at: Option<Instant> = None;
    // Connections in a row the broker closed soon after accepting them.
    let mut quick_closes = 0u32;
    let mut warned_takeover = false;
    // Refusals and failures repeat with every attempt: one line per kind of
    // failure, then one every 30 s with a count.
    let mut last_failure: Option<String> = None;
    let repeat_warning = RateLimit::new(Duration::from_secs(30));
    Counters::inc(&counters.mqtt_connect_attempts);
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = stop.wait_for(|stopping| *stopping), if connected_at.is_none() => return,
        };
        let now = Instant::now();
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                generation += 1;
                connected_at = Some(now);
                last_failure = None;
                Counters::inc(&counters.mqtt_connections);
                if generation == 1 {
                    tracing::info!(code = ?ack.code, "connected to MQTT broker");
                } else {
                    tracing::info!(
                        reconnects = generation - 1,
                        "reconnected to MQTT broker; re-sending availability and label states"
                    );
                }
                let _ = link.send(Link { connected: true, generation });
            }
            Ok(Event::Incoming(Packet::Publish(message))) => {
                // Only discovery traffic is subscribed to; if the publisher
                // lags, dropping a replayed config costs nothing.
                let _ = incoming.try_send(message);
            }
            Ok(Event::Incoming(Packet::PubAck(rumqttc::PubAck { pkid, .. })))
            | Ok(Event::Incoming(Packet::PubComp(rumqttc::PubComp { pkid, .. }))) => {
                if let Some(kind) = lock(&outbox).acknowledged(pkid) {
                    Counters::inc(&counters.mqtt_acked);
                    match kind {
                        Kind::Labels => Counters::inc(&counters.labels_published),
                        Kind::Snapshot => Counters::inc(&counters.snapshots_published),
                        Kind::Other => {}
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if lock(&outbox).written(pkid, now) == Some(Kind::Labels) {
                    // QoS 0: written is all there is.
                    Counters::inc(&counters.labels_published);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = link.send(Link { connected: false, generation });
                return;
            }
            Ok(_) => {}
            Err(err) => {
                let lasted = connected_at.take().map(|at| at.elapsed());
                if lasted.is_some() {
                    let _ = link.send(Link { connected: false, generation });
                }
                // rumqttc moved what was in flight and what was still queued
                // to its pending list, which a clean session clears on the
                // next ConnAck: none of it will be written or acknowledged,
                // and keeping it would shift every later message's kind and
                // leave acknowledgements overdue for packets that are gone.
                lock(&outbox).forget();
                if *stop.borrow() {
                    return;
                }
                let (failure, reason) = explain(&err, &settings.client_id, settings.keep_alive);
                health.set_mqtt_error(reason.clone());
                match lasted {
                    Some(lasted) if lasted >= STABLE_CONNECTION => {
                        backoff.reset();
                        quick_closes = 0;
                        warned_takeover = false;
                    }
                    Some(lasted) if failure == Failure::Closed => {
                        quick_closes += 1;
                        Counters::inc(&counters.mqtt_kicked);
                        if quick_closes >= 2 && !warned_takeover {
                            warned_takeover = true;
                            tracing::warn!(
                                client_id = %settings.client_id,
                                lasted_ms = lasted.as_millis() as u64,
                                "the MQTT broker closed the connection moments after accepting it, twice in a row: \
                                 another client with the same client id is probably connected (two devices with one \
                                 device_id, e.g. cloned SD cards with the same host name); give each its own device_id \
                                 or mqtt.client_id"
                            );
                        }
                    }
                    _ => {}
                }
                if failure == Failure::Refused {
                    Counters::inc(&counters.mqtt_refused);
                }
                let delay = backoff.next_delay();
                let retry_in_ms = delay.as_millis() as u64;
                let message = match failure {
                    Failure::Refused => "MQTT broker refused the connection",
                    Failure::Closed => "MQTT connection closed by the broker; reconnecting",
                    Failure::Unreachable => {
                        "MQTT broker unreachable (TCP or TLS did not get through): check mqtt.url, that a broker \
                         listens there, and the [mqtt.tls] settings if it uses TLS"
                    }
                };
                let repeated = last_failure.as_deref() == Some(reason.as_str());
                if !repeated {
                    // A new kind of failure: said now, and its repeats held back from now.
                    repeat_warning.reset(Instant::now());
                    tracing::warn!(broker = %settings.broker, reason, retry_in_ms, "{message}");
                } else if let Some(suppressed) = repeat_warning.check(Instant::now()) {
                    tracing::warn!(broker = %settings.broker, reason, retry_in_ms, suppressed, "{message}");
                }
                last_failure = Some(reason);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|stopping| *stopping) => return,
                }
                Counters::inc(&counters.mqtt_connect_attempts);
            }
        }
        let outbox = lock(&outbox);
        health.set_mqtt_unacked(outbox.inflight.len(), outbox.oldest());
    }
}

fn tls_client_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::BufReader;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let read_certs = |path: &std::path::Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let certs = rustls_pemfile::certs(&mut BufReader::new(file))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", path.display());
        Ok(certs)
    };
    let builder = if tls.insecure_skip_verify {
        tracing::warn!("mqtt.tls.insecure_skip_verify is set: the broker's certificate is NOT checked");
        builder.dangerous().with_custom_certificate_verifier(Arc::new(insecure::AcceptAnyServer(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_file {
            Some(ca) => {
                for cert in read_certs(ca).context("mqtt.tls.ca_file")? {
                    roots.add(cert).with_context(|| format!("mqtt.tls.ca_file {}: not a usable CA", ca.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                anyhow::ensure!(!roots.is_empty(), "no system CA certificates found: set mqtt.tls.ca_file");
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match &tls.client_cert {
        Some((cert, key)) => {
            let certs = read_certs(cert).context("mqtt.tls.cert_file")?;
            let file = std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?;
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut BufReader::new(file))
                .with_context(|| format!("mqtt.tls.key_file {}", key.display()))?
                .with_context(|| format!("mqtt.tls.key_file {} holds no PEM private key", key.display()))?;
            builder.with_client_auth_cert(certs, key).context("mqtt.tls: client certificate and key do not match")?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

mod insecure {
    //! The verifier behind `insecure_skip_verify`: signatures are still
    //! checked (so the handshake is well-formed), the certificate chain is not.
    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    #[derive(Debug)]
    pub struct AcceptAnyServer(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyServer {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let waits: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let steps = [100, 200, 400, 800, 800, 800];
        for (wait, step) in waits.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(*wait >= step / 2 && *wait <= step, "{wait:?} not within [{:?}, {step:?}]", step / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn the_outbox_follows_each_message_from_the_queue_to_its_acknowledgement() {
        let mut outbox = Outbox::default();
        let t0 = Instant::now();
        outbox.queued.extend([Kind::Other, Kind::Labels, Kind::Labels]);
        assert_eq!(outbox.written(1, t0), None, "QoS 1: in flight until acknowledged");
        assert_eq!(outbox.written(2, t0 + Duration::from_secs(1)), None);
        assert_eq!(outbox.written(0, t0), Some(Kind::Labels), "QoS 0: complete when written");
        assert_eq!(outbox.oldest(), Some(t0));
        assert_eq!(outbox.written(1, t0 + Duration::from_secs(5)), None, "a retransmission after a reconnect");
        assert_eq!(outbox.oldest(), Some(t0), "keeps its first time");
        assert_eq!(outbox.acknowledged(2), Some(Kind::Labels));
        assert_eq!(outbox.acknowledged(1), Some(Kind::Other));
        assert_eq!(outbox.acknowledged(1), None);
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_dropped_connection_forgets_what_was_queued_and_in_flight_so_later_kinds_stay_in_step() {
        let mut outbox = Outbox::default();
        let t0 = Instant::now();
        outbox.queued.extend([Kind::Snapshot, Kind::Other]);
        assert_eq!(outbox.written(7, t0), None);
        // The connection drops: rumqttc's clean session loses both.
        outbox.forget();
        assert!(outbox.is_empty() && outbox.oldest().is_none(), "nothing overdue for packets that are gone");
        outbox.queued.push_back(Kind::Labels);
        assert_eq!(outbox.written(0, t0), Some(Kind::Labels), "the next message is counted as what it is");
    }

    #[test]
    fn a_refusal_says_what_the_broker_said_and_what_to_check() {
        let keep_alive = Duration::from_secs(30);
        let (kind, text) =
            explain(&ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized), "labelcast-x", keep_alive);
        assert_eq!(kind, Failure::Refused);
        assert!(text.contains("not authorised") && text.contains("mqtt.password_file"), "{text}");
        let (_, text) =
            explain(&ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId), "labelcast-x", keep_alive);
        assert!(text.contains("labelcast-x") && text.contains("mqtt.client_id") && text.contains("30s"), "{text}");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let (kind, _) = explain(&ConnectionError::Io(refused), "x", keep_alive);
        assert_eq!(kind, Failure::Unreachable);
        let (kind, _) = explain(&ConnectionError::MqttState(StateError::ConnectionAborted), "x", keep_alive);
        assert_eq!(kind, Failure::Closed);
    }
}
