//! Snapshots on MQTT: when a published label turns ON, the frame it turned
//! ON on (downscaled, the region outlined) as a retained JPEG on
//! `<camera>/snapshot/<label>`, which Home Assistant shows as an `image`
//! entity; and, when asked, each camera's latest frame every
//! `snapshots.frame_interval`.
//!
//! Encoding a JPEG takes milliseconds, so it runs on a thread of its own fed
//! through a short queue: the MQTT sink only asks, and a request that finds
//! the queue full is dropped and counted (`snapshots_dropped`), never waited
//! for. Inference and label messages are never held up by a picture.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use super::mqtt::{Kind, Outlet};
use crate::config::SnapshotConfig;
use crate::source::camera::Rect;
use crate::status::FrameTap;
use crate::telemetry::Counters;

/// The largest MQTT packet labelcast sends (and its embedded broker takes):
/// room for a snapshot at `snapshots.max_size = 4096` at high quality.
pub const MAX_PACKET_BYTES: usize = 4 * 1024 * 1024;

/// A picture larger than this (leaving room for the topic) is not sent:
/// rumqttc would refuse the packet.
const MAX_PICTURE_BYTES: usize = MAX_PACKET_BYTES - 64 * 1024;

/// Requests waiting for the encoder at most; a burst beyond is dropped.
const QUEUE: usize = 8;

/// The outline's colour on snapshots of a region.
const OUTLINE: [u8; 3] = [255, 200, 0];

/// One picture to publish.
#[derive(Debug)]
pub struct Request {
    /// Index into the taps the encoder was started with.
    pub camera: usize,
    /// The frame the labels turned ON on; `None`: the newest kept.
    pub sequence: Option<u64>,
    /// The region to outline.
    pub outline: Option<Rect>,
    /// A kept frame older than this is not sent (the latest-frame topic
    /// while the camera is away).
    pub max_age: Option<std::time::Duration>,
    /// Where to publish it (each retained).
    pub topics: Vec<String>,
}

/// The sink's handle on the encoder thread; dropping it stops the thread.
pub struct Snapshots {
    requests: SyncSender<Request>,
    counters: Arc<Counters>,
}

impl Snapshots {
    /// Starts the encoder thread for these cameras' taps (in the sink's
    /// camera order).
    pub(super) fn start(
        taps: Vec<Arc<FrameTap>>,
        config: &SnapshotConfig,
        outlet: Outlet,
        counters: Arc<Counters>,
    ) -> anyhow::Result<Self> {
        let (requests, queue) = std::sync::mpsc::sync_channel(QUEUE);
        let quality = config.quality;
        let thread_counters = counters.clone();
        std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || encode_and_publish(queue, taps, quality, outlet, thread_counters))?;
        Ok(Self { requests, counters })
    }

    /// Asks for a picture; never waits.
    pub fn request(&self, request: Request) {
        let topics = request.topics.len() as u64;
        match self.requests.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                Counters::add(&self.counters.snapshots_dropped, topics);
            }
        }
    }
}

fn encode_and_publish(
    queue: Receiver<Request>,
    taps: Vec<Arc<FrameTap>>,
    quality: u8,
    outlet: Outlet,
    counters: Arc<Counters>,
) {
    let too_large = crate::telemetry::RateLimit::new(std::time::Duration::from_secs(60));
    while let Ok(request) = queue.recv() {
        let dropped = request.topics.len() as u64;
        if !outlet.is_connected() {
            Counters::add(&counters.snapshots_dropped, dropped);
            continue;
        }
        let Some(picture) = taps.get(request.camera).and_then(|tap| tap.picture(request.sequence)) else {
            Counters::add(&counters.snapshots_dropped, dropped);
            continue;
        };
        if let Some(max_age) = request.max_age
            && picture.captured_at.elapsed().is_ok_and(|age| age > max_age)
        {
            // The camera is away: its last frame is not its latest view.
            Counters::add(&counters.snapshots_dropped, dropped);
            continue;
        }
        let picture = match request.outline.map(|rect| rect.resolve(picture.frame_width, picture.frame_height)) {
            Some(Ok(rect)) => {
                let mut outlined = std::sync::Arc::unwrap_or_clone(picture);
                outlined.outline(rect, OUTLINE);
                std::sync::Arc::new(outlined)
            }
            _ => picture,
        };
        let jpeg = match picture.jpeg(quality) {
            Ok(jpeg) => jpeg,
            Err(err) => {
                tracing::warn!(error = %err, "snapshot JPEG encoding failed");
                Counters::add(&counters.snapshots_dropped, dropped);
                continue;
            }
        };
        if jpeg.len() > MAX_PICTURE_BYTES {
            if let Some(suppressed) = too_large.check(std::time::Instant::now()) {
                tracing::warn!(
                    bytes = jpeg.len(),
                    limit = MAX_PICTURE_BYTES,
                    suppressed,
                    "snapshot too large for an MQTT message; not sent (lower snapshots.max_size or snapshots.quality)"
                );
            }
            Counters::add(&counters.snapshots_dropped, dropped);
            continue;
        }
        for topic in request.topics {
            if !outlet.send(topic, true, jpeg.clone(), Kind::Snapshot) {
                Counters::inc(&counters.snapshots_dropped);
            }
        }
    }
}
