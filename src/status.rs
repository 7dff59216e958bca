//! What the status page and the snapshots show: per camera, the latest
//! scores of every view with their thresholds and a short history, how fast
//! it runs, and a small copy of recent frames.
//!
//! Setting up a camera classifier is a visual job (aim the camera, draw a
//! region, watch the scores while someone walks past), so the page needs the
//! picture and the scores the engine saw. Both are kept here, cheaply: the
//! inference thread writes each camera's scores under one short lock per
//! frame, and the preprocess thread copies a frame (downscaled, at most
//! [`PREVIEW_INTERVAL`] apart) only while a page is looking, or every frame
//! when snapshots are on and one may be asked for. JPEG encoding happens on
//! request, off the frame path, once per frame however many pages look.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fast_image_resize as fr;
use serde_json::{Value, json};

use crate::flow::LabelEvent;
use crate::labels::LabelRule;
use crate::service::Health;
use crate::source::camera::{PixelRect, Rect};
use crate::telemetry::Counters;

/// The page asks for a frame this often at most; frames for it are copied
/// no closer together than this (a cap of 5 per second).
pub const PREVIEW_INTERVAL: Duration = Duration::from_millis(200);

/// The longer side of the frames kept for the page, pixels (snapshots use
/// `snapshots.max_size` instead).
pub const PREVIEW_MAX_SIDE: u32 = 640;

/// A page that has not asked for a frame for this long is gone: copying
/// frames for it stops.
const WATCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Seconds of score history kept per published label (one value per
/// second, the highest score of that second, so a person walking past in
/// half a second still shows).
pub const HISTORY_SECONDS: usize = 180;

/// Frames kept for snapshots: the preprocess thread works one frame ahead
/// of inference, so the frame a label turned ON on is one of the last few.
const KEPT_FRAMES: usize = 3;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A frame as kept for the page and snapshots: packed RGB, downscaled so
/// its longer side is at most the tap's `max_side`.
#[derive(Debug, Clone)]
pub struct Picture {
    pub sequence: u64,
    pub captured_at: SystemTime,
    /// Size of `rgb`, pixels.
    pub width: u32,
    pub height: u32,
    /// Size of the frame it was taken from (what region rectangles count in).
    pub frame_width: u32,
    pub frame_height: u32,
    pub rgb: Vec<u8>,
}

impl Picture {
    /// This picture made smaller so its longer side is at most `max_side`
    /// (a copy; itself when it already fits).
    pub fn downscaled(self: Arc<Self>, max_side: u32) -> Arc<Self> {
        let (dw, dh) = scaled_size(self.width, self.height, max_side);
        if (dw, dh) == (self.width, self.height) {
            return self;
        }
        let mut rgb = vec![0; dw as usize * dh as usize * 3];
        match resize_rgb(&mut fr::Resizer::new(), &self.rgb, self.width, self.height, &mut rgb, dw, dh) {
            Ok(()) => Arc::new(Picture { width: dw, height: dh, rgb, ..(*self).clone() }),
            Err(err) => {
                tracing::debug!(error = %err, "preview not downscaled");
                self
            }
        }
    }

    /// Draws `rect` (in pixels of the source frame) as a 2-pixel outline.
    pub fn outline(&mut self, rect: PixelRect, colour: [u8; 3]) {
        let sx = f64::from(self.width) / f64::from(self.frame_width.max(1));
        let sy = f64::from(self.height) / f64::from(self.frame_height.max(1));
        let (w, h) = (self.width as i64, self.height as i64);
        if w == 0 || h == 0 {
            return;
        }
        let x0 = ((rect.x * sx).round() as i64).clamp(0, w - 1);
        let y0 = ((rect.y * sy).round() as i64).clamp(0, h - 1);
        let x1 = (((rect.x + rect.width) * sx).round() as i64 - 1).clamp(x0, w - 1);
        let y1 = (((rect.y + rect.height) * sy).round() as i64 - 1).clamp(y0, h - 1);
        let mut put = |x: i64, y: i64| {
            if (0..w).contains(&x) && (0..h).contains(&y) {
                let i = ((y * w + x) * 3) as usize;
                self.rgb[i..i + 3].copy_from_slice(&colour);
            }
        };
        for t in 0..2 {
            for x in x0..=x1 {
                put(x, y0 + t);
                put(x, y1 - t);
            }
            for y in y0..=y1 {
                put(x0 + t, y);
                put(x1 - t, y);
            }
        }
    }

    /// Baseline JPEG at `quality` (1-100).
    pub fn jpeg(&self, quality: u8) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.rgb.len() / 8);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100)).encode(
            &self.rgb,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
        )?;
        Ok(out)
    }
}

/// The scaled size of a `w` x `h` frame whose longer side becomes at most
/// `max_side` (never upscaled, never below one pixel).
pub fn scaled_size(w: u32, h: u32, max_side: u32) -> (u32, u32) {
    let longer = w.max(h);
    if longer <= max_side || longer == 0 {
        return (w.max(1), h.max(1));
    }
    let scale = f64::from(max_side) / f64::from(longer);
    (((f64::from(w) * scale).round() as u32).max(1), ((f64::from(h) * scale).round() as u32).max(1))
}

/// Bilinear resize of packed RGB `src` (`w` x `h`) into `dst` (`dw` x `dh`).
fn resize_rgb(
    resizer: &mut fr::Resizer,
    src: &[u8],
    w: u32,
    h: u32,
    dst: &mut [u8],
    dw: u32,
    dh: u32,
) -> anyhow::Result<()> {
    let src = fr::images::TypedImageRef::<fr::pixels::U8x3>::from_buffer(w, h, src)?;
    let mut dst = fr::images::TypedImage::<fr::pixels::U8x3>::from_buffer(dw, dh, dst)?;
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    resizer.resize_typed(&src, &mut dst, &options)?;
    Ok(())
}

struct TapState {
    /// The last few pictures, newest last. Shared with whoever asked for
    /// one (a snapshot being encoded), so nothing is copied under the lock.
    kept: VecDeque<Arc<Picture>>,
    /// Buffers of pictures that fell out, reused.
    spare: Vec<Vec<u8>>,
    last_stored: Option<Instant>,
    resizer: fr::Resizer,
    /// The newest picture's preview JPEG, by sequence, shared by every page.
    preview: Option<(u64, bytes::Bytes)>,
}

/// One camera's recent frames, downscaled.
pub struct FrameTap {
    /// Snapshots are on: every frame is kept, one may be asked for.
    every_frame: bool,
    max_side: u32,
    /// When a page last asked (milliseconds since `epoch`), 0 if never.
    watched_ms: AtomicU64,
    epoch: Instant,
    state: Mutex<TapState>,
    counters: Arc<Counters>,
}

impl FrameTap {
    /// `every_frame`: keep each frame (snapshots on); else only while a page
    /// looks. `max_side`: the kept pictures' longer side, pixels.
    pub fn new(every_frame: bool, max_side: u32, counters: Arc<Counters>) -> Self {
        Self {
            every_frame,
            max_side: max_side.max(16),
            watched_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            state: Mutex::new(TapState {
                kept: VecDeque::with_capacity(KEPT_FRAMES),
                spare: Vec::new(),
                last_stored: None,
                resizer: fr::Resizer::new(),
                preview: None,
            }),
            counters,
        }
    }

    fn watched(&self, now: Instant) -> bool {
        let at = self.watched_ms.load(Ordering::Relaxed);
        at != 0 && now.saturating_duration_since(self.epoch).as_millis() as u64 <= at + WATCH_TIMEOUT.as_millis() as u64
    }

    /// A page asked for this camera's frame.
    pub fn watch(&self) {
        let ms = (Instant::now().saturating_duration_since(self.epoch).as_millis() as u64).max(1);
        self.watched_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the preprocess thread should hand over the frame it just
    /// decoded: every frame with snapshots on; else only while a page is
    /// looking, and no closer together than [`PREVIEW_INTERVAL`].
    pub fn wants(&self, now: Instant) -> bool {
        if self.every_frame {
            return true;
        }
        if !self.watched(now) {
            return false;
        }
        lock(&self.state).last_stored.is_none_or(|at| now.saturating_duration_since(at) >= PREVIEW_INTERVAL)
    }

    /// Keeps a downscaled copy of a decoded frame (`rgb`: packed RGB,
    /// `w` x `h`). A buffer that does not match its size is ignored.
    pub fn store(&self, sequence: u64, captured_at: SystemTime, w: u32, h: u32, rgb: &[u8]) {
        if rgb.len() != w as usize * h as usize * 3 || w == 0 || h == 0 {
            return;
        }
        let (dw, dh) = scaled_size(w, h, self.max_side);
        let mut state = lock(&self.state);
        // A source reopened after going away counts its frames from 0
        // again: what was kept is from before, and must not stand in for a
        // frame of the new run.
        if state.kept.back().is_some_and(|p| p.sequence >= sequence) {
            let old: Vec<Arc<Picture>> = state.kept.drain(..).collect();
            state.spare.extend(old.into_iter().filter_map(|p| Arc::try_unwrap(p).ok()).map(|p| p.rgb));
            state.preview = None;
        }
        // A buffer of a picture nobody holds any more, else a new one.
        let mut buffer = if state.kept.len() >= KEPT_FRAMES {
            state.kept.pop_front().and_then(|p| Arc::try_unwrap(p).ok()).map(|p| p.rgb).unwrap_or_default()
        } else {
            state.spare.pop().unwrap_or_default()
        };
        buffer.resize(dw as usize * dh as usize * 3, 0);
        if (dw, dh) == (w, h) {
            buffer.copy_from_slice(rgb);
        } else {
            let TapState { resizer, .. } = &mut *state;
            if let Err(err) = resize_rgb(resizer, rgb, w, h, &mut buffer, dw, dh) {
                tracing::debug!(error = %err, "frame not kept for the status page");
                state.spare.push(buffer);
                return;
            }
        }
        state.kept.push_back(Arc::new(Picture {
            sequence,
            captured_at,
            width: dw,
            height: dh,
            frame_width: w,
            frame_height: h,
            rgb: buffer,
        }));
        state.last_stored = Some(Instant::now());
    }

    /// The kept picture of frame `sequence`, else the newest one kept after
    /// it (a frame or two later), else the newest of all.
    pub fn picture(&self, sequence: Option<u64>) -> Option<Arc<Picture>> {
        let state = lock(&self.state);
        let found = match sequence {
            Some(s) => state.kept.iter().find(|p| p.sequence >= s).or_else(|| state.kept.back()),
            None => state.kept.back(),
        };
        found.cloned()
    }

    /// The size of the last frame kept (for regions given in pixels).
    pub fn frame_size(&self) -> Option<(u32, u32)> {
        lock(&self.state).kept.back().map(|p| (p.frame_width, p.frame_height))
    }

    /// The newest kept frame as a JPEG for the page, at most
    /// [`PREVIEW_MAX_SIDE`] on its longer side, encoded once per frame (the
    /// caller runs it off the async runtime). `None` until a frame was kept.
    pub fn preview_jpeg(&self) -> Option<bytes::Bytes> {
        self.watch();
        let picture = {
            let state = lock(&self.state);
            let newest = state.kept.back()?;
            if let Some((sequence, jpeg)) = &state.preview
                && *sequence == newest.sequence
            {
                return Some(jpeg.clone());
            }
            newest.clone()
        };
        let sequence = picture.sequence;
        let jpeg = match picture.downscaled(PREVIEW_MAX_SIDE).jpeg(75) {
            Ok(jpeg) => bytes::Bytes::from(jpeg),
            Err(err) => {
                tracing::warn!(error = %err, "preview JPEG encoding failed");
                return None;
            }
        };
        Counters::inc(&self.counters.previews_encoded);
        lock(&self.state).preview = Some((sequence, jpeg.clone()));
        Some(jpeg)
    }
}

/// One label's history: the highest score of each second, newest last.
#[derive(Debug, Default)]
struct History {
    /// The second (since the board started) of the last value.
    second: u64,
    values: VecDeque<f32>,
}

impl History {
    fn record(&mut self, second: u64, score: f32) {
        if self.values.is_empty() {
            self.second = second;
            self.values.push_back(score);
            return;
        }
        if second <= self.second {
            let last = self.values.back_mut().expect("not empty");
            *last = last.max(score);
            return;
        }
        // Seconds with no frame (a gate found nothing new, the source was
        // away) are gaps.
        for _ in self.second + 1..second.min(self.second + HISTORY_SECONDS as u64 + 1) {
            self.values.push_back(f32::NAN);
        }
        self.values.push_back(score);
        self.second = second;
        while self.values.len() > HISTORY_SECONDS {
            self.values.pop_front();
        }
    }
}

/// One view (a camera's whole frame, or a region) as the page shows it.
struct ViewBoard {
    region: Option<Arc<str>>,
    rect: Option<Rect>,
    rules: Vec<LabelRule>,
    index: HashMap<Arc<str>, usize>,
    /// Latest score and state per rule (`None`: not reported yet).
    latest: Vec<Option<(f32, bool)>>,
    /// Per published label (by rule index).
    history: HashMap<usize, History>,
}

impl ViewBoard {
    fn new(region: Option<Arc<str>>, rect: Option<Rect>, rules: Vec<LabelRule>) -> Self {
        let index = rules.iter().enumerate().map(|(i, r)| (r.name.clone(), i)).collect();
        let history =
            rules.iter().enumerate().filter(|(_, r)| r.publish).map(|(i, _)| (i, History::default())).collect();
        Self { region, rect, latest: vec![None; rules.len()], rules, index, history }
    }

    /// This frame's reported labels replace the last frame's (a model with
    /// many labels reports the ON ones and the highest: one not reported
    /// now shows no score rather than an old one), and its changes set
    /// the states of labels turned OFF below the reporting floor.
    fn record(&mut self, labels: &[crate::flow::LabelScore], changed: &[crate::flow::LabelScore], second: u64) {
        self.latest.fill(None);
        for label in labels.iter().chain(changed) {
            if let Some(&i) = self.index.get(&label.name) {
                self.latest[i] = Some((label.score, label.on));
                if let Some(history) = self.history.get_mut(&i) {
                    history.record(second, label.score);
                }
            }
        }
    }

    fn to_json(&self, frame: Option<(u32, u32)>) -> Value {
        let rect = self.rect.as_ref().and_then(|rect| match *rect {
            Rect::Fraction { x, y, width, height } => Some(json!({ "x": x, "y": y, "width": width, "height": height })),
            Rect::Pixels { x, y, width, height } => frame.map(|(w, h)| {
                let (w, h) = (f64::from(w), f64::from(h));
                json!({
                    "x": f64::from(x) / w, "y": f64::from(y) / h,
                    "width": f64::from(width) / w, "height": f64::from(height) / h,
                })
            }),
        });
        // The labels that were ever reported, in model order: every label
        // of a model with few, the ON ones and the highest of one with many.
        let labels: Vec<Value> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(i, rule)| rule.listed && (self.latest[*i].is_some() || rule.publish))
            .map(|(i, rule)| {
                let (score, on) = self.latest[i].map_or((Value::Null, false), |(s, on)| (json!(round3(s)), on));
                let history: Option<Vec<Value>> = self.history.get(&i).map(|h| {
                    h.values.iter().map(|v| if v.is_nan() { Value::Null } else { json!(round3(*v)) }).collect()
                });
                json!({
                    "name": &*rule.name,
                    "score": score,
                    "on": on,
                    "on_threshold": round3(rule.on),
                    "off_threshold": round3(rule.off),
                    "published": rule.publish,
                    "history": history,
                })
            })
            .collect();
        json!({ "region": self.region.as_deref(), "rect": rect, "labels": labels })
    }
}

fn round3(v: f32) -> f64 {
    (f64::from(v) * 1000.0).round() / 1000.0
}

/// What a camera's part of the page shows that does not change.
pub struct CameraFacts {
    /// `None`: the single camera of a `[source]` config.
    pub id: Option<Arc<str>>,
    pub source: String,
    pub model: String,
    pub engine: String,
    pub resize: &'static str,
    /// Region ids and rectangles, in config order.
    pub regions: Vec<(Arc<str>, Rect)>,
}

/// One camera's live state.
pub struct CameraBoard {
    pub facts: CameraFacts,
    pub health: Arc<Health>,
    pub tap: Arc<FrameTap>,
    epoch: Instant,
    views: Mutex<Vec<ViewBoard>>,
    /// When the last few frames were classified, for frames per second.
    classified: Mutex<VecDeque<Instant>>,
    /// The last frame's inference time, microseconds.
    inference_us: AtomicU64,
}

impl CameraBoard {
    /// `rules`: per view (the whole frame, then each region) its rules.
    pub fn new(facts: CameraFacts, health: Arc<Health>, tap: Arc<FrameTap>, rules: Vec<Vec<LabelRule>>) -> Self {
        let mut rules = rules.into_iter();
        let mut views = vec![ViewBoard::new(None, None, rules.next().unwrap_or_default())];
        for ((id, rect), rules) in facts.regions.iter().zip(rules) {
            views.push(ViewBoard::new(Some(id.clone()), Some(*rect), rules));
        }
        Self {
            facts,
            health,
            tap,
            epoch: Instant::now(),
            views: Mutex::new(views),
            classified: Mutex::new(VecDeque::with_capacity(32)),
            inference_us: AtomicU64::new(0),
        }
    }

    /// Records a classified frame's scores (the inference thread).
    pub fn record(&self, event: &LabelEvent) {
        let now = Instant::now();
        let second = now.saturating_duration_since(self.epoch).as_secs();
        {
            let mut views = lock(&self.views);
            if !event.labels.is_empty()
                && let Some(view) = views.first_mut()
            {
                view.record(&event.labels, &event.changed, second);
            }
            for region in &event.regions {
                if let Some(view) = views.iter_mut().find(|v| v.region.as_ref() == Some(&region.id)) {
                    view.record(&region.labels, &region.changed, second);
                }
            }
        }
        let mut classified = lock(&self.classified);
        classified.push_back(now);
        while classified.len() > 30
            || classified.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(10))
        {
            classified.pop_front();
        }
        self.inference_us.store((event.inference_ms * 1e3) as u64, Ordering::Relaxed);
    }

    fn fps(&self) -> f64 {
        let classified = lock(&self.classified);
        let now = Instant::now();
        match (classified.front(), classified.back()) {
            (Some(first), Some(last)) if classified.len() > 1 && now.duration_since(*last) < Duration::from_secs(5) => {
                let span = last.duration_since(*first).as_secs_f64();
                if span > 0.0 { (classified.len() - 1) as f64 / span } else { 0.0 }
            }
            _ => 0.0,
        }
    }

    pub fn to_json(&self, index: usize) -> Value {
        let frame = self.tap.frame_size();
        let views: Vec<Value> = lock(&self.views).iter().map(|v| v.to_json(frame)).collect();
        let inference_ms = self.inference_us.load(Ordering::Relaxed) as f64 / 1e3;
        json!({
            "index": index,
            "id": self.facts.id.as_deref(),
            "name": self.facts.id.as_deref().unwrap_or("camera"),
            "source": self.facts.source,
            "source_state": self.health.source_report(Instant::now()).as_str(),
            "model": self.facts.model,
            "engine": self.facts.engine,
            "resize": self.facts.resize,
            "fps": (self.fps() * 100.0).round() / 100.0,
            "inference_ms": (inference_ms * 100.0).round() / 100.0,
            "frame": frame.map(|(w, h)| json!({ "width": w, "height": h })),
            "frame_url": format!("/camera/{index}/frame.jpg"),
            "views": views,
        })
    }
}

/// Every camera's live state, for the page.
pub struct Board {
    pub device_id: String,
    pub cameras: Vec<Arc<CameraBoard>>,
    pub health: Arc<Health>,
    pub started: Instant,
}

impl Board {
    pub fn to_json(&self) -> Value {
        let mqtt = match self.health.mqtt_state() {
            None => "off",
            Some(true) => "connected",
            Some(false) => "disconnected",
        };
        json!({
            "device_id": self.device_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "ready": self.health.is_ready(),
            "mqtt": mqtt,
            "cameras": self.cameras.iter().enumerate().map(|(i, c)| c.to_json(i)).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::LabelScore;

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..w * h).flat_map(|i| [(i % w * 255 / w) as u8, (i / w * 255 / h) as u8, 128]).collect()
    }

    #[test]
    fn a_tap_keeps_frames_only_while_a_page_looks_and_at_most_five_a_second() {
        let tap = FrameTap::new(false, 64, Arc::default());
        let now = Instant::now();
        assert!(!tap.wants(now), "no page has asked");
        tap.watch();
        assert!(tap.wants(Instant::now()));
        tap.store(1, SystemTime::now(), 320, 240, &gradient(320, 240));
        assert!(!tap.wants(Instant::now()), "just stored");
        assert!(tap.wants(Instant::now() + PREVIEW_INTERVAL));
        assert!(!tap.wants(Instant::now() + WATCH_TIMEOUT + Duration::from_secs(1)), "the page went away");
        let picture = tap.picture(None).unwrap();
        assert_eq!((picture.width, picture.height, picture.frame_width, picture.frame_height), (64, 48, 320, 240));
    }

    #[test]
    fn a_snapshot_finds_the_frame_it_was_classified_on_or_the_next_kept() {
        let tap = FrameTap::new(true, 32, Arc::default());
        for sequence in [4, 5, 6, 7] {
            assert!(tap.wants(Instant::now()));
            tap.store(sequence, SystemTime::now(), 40, 30, &gradient(40, 30));
        }
        assert_eq!(tap.picture(Some(6)).unwrap().sequence, 6);
        assert_eq!(tap.picture(Some(3)).unwrap().sequence, 5, "4 fell out: the oldest kept after it");
        assert_eq!(tap.picture(Some(9)).unwrap().sequence, 7, "not kept yet: the newest");
        // The source was reopened: its frames count from 0 again.
        tap.store(0, SystemTime::now(), 40, 30, &gradient(40, 30));
        assert_eq!(tap.picture(Some(0)).unwrap().sequence, 0);
        assert_eq!(tap.picture(Some(6)).unwrap().sequence, 0, "nothing from before the reopening");
    }

    #[test]
    fn a_preview_of_a_large_snapshot_picture_is_no_larger_than_the_page_needs() {
        let tap = FrameTap::new(true, 2000, Arc::default());
        tap.store(1, SystemTime::now(), 1600, 1200, &gradient(1600, 1200));
        let jpeg = tap.preview_jpeg().unwrap();
        let decoded = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (PREVIEW_MAX_SIDE, 480));
        assert_eq!(tap.picture(None).unwrap().width, 1600, "the kept picture stays at the snapshot size");
    }

    #[test]
    fn the_preview_is_a_real_jpeg_encoded_once_per_frame() {
        let counters = Arc::new(Counters::default());
        let tap = FrameTap::new(false, 640, counters.clone());
        assert!(tap.preview_jpeg().is_none());
        tap.store(1, SystemTime::now(), 100, 80, &gradient(100, 80));
        let jpeg = tap.preview_jpeg().unwrap();
        let again = tap.preview_jpeg().unwrap();
        assert_eq!(jpeg.as_ptr(), again.as_ptr(), "the same bytes, not encoded again");
        assert_eq!(Counters::get(&counters.previews_encoded), 1);
        let decoded = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (100, 80));
    }

    #[test]
    fn an_outline_is_drawn_where_the_region_is_in_the_scaled_picture() {
        let tap = FrameTap::new(true, 100, Arc::default());
        tap.store(1, SystemTime::now(), 200, 100, &vec![0; 200 * 100 * 3]);
        let mut picture = Arc::unwrap_or_clone(tap.picture(None).unwrap());
        picture.outline(PixelRect { x: 100.0, y: 0.0, width: 100.0, height: 100.0 }, [255, 0, 0]);
        let at = |x: usize, y: usize| &picture.rgb[(y * 100 + x) * 3..(y * 100 + x) * 3 + 3];
        assert_eq!(at(50, 25), [255, 0, 0], "left edge of the region");
        assert_eq!(at(99, 25), [255, 0, 0], "right edge of the region");
        assert_eq!(at(75, 25), [0, 0, 0], "inside is untouched");
        assert_eq!(at(20, 25), [0, 0, 0], "outside is untouched");
    }

    #[test]
    fn the_history_keeps_each_seconds_highest_score_and_gaps_for_missing_seconds() {
        let mut history = History::default();
        history.record(10, 0.2);
        history.record(10, 0.7);
        history.record(10, 0.1);
        history.record(13, 0.4);
        let values: Vec<String> = history.values.iter().map(|v| format!("{v}")).collect();
        assert_eq!(values, ["0.7", "NaN", "NaN", "0.4"]);
        for second in 14..14 + HISTORY_SECONDS as u64 {
            history.record(second, 0.5);
        }
        assert_eq!(history.values.len(), HISTORY_SECONDS);
    }

    #[test]
    fn the_board_shows_each_views_scores_thresholds_and_region_rectangles() {
        let rule = |name: &str| LabelRule { name: name.into(), on: 0.5, off: 0.4, publish: true, listed: true };
        let facts = CameraFacts {
            id: Some("door".into()),
            source: "test://pattern".into(),
            model: "demo".into(),
            engine: "tract".into(),
            resize: "tiles",
            regions: vec![("step".into(), Rect::Pixels { x: 0, y: 0, width: 50, height: 25 })],
        };
        let tap = Arc::new(FrameTap::new(true, 64, Arc::default()));
        tap.store(1, SystemTime::now(), 100, 100, &gradient(100, 100));
        let board = CameraBoard::new(
            facts,
            Arc::new(Health::new(Duration::from_secs(30))),
            tap,
            vec![vec![rule("cat"), rule("dog")], vec![rule("cat"), rule("dog")]],
        );
        let label = |name: &str, score: f32, on: bool| LabelScore { name: name.into(), score, on };
        board.record(&LabelEvent {
            sequence: 1,
            timestamp: SystemTime::now(),
            origin: None,
            model: "demo".into(),
            inference_ms: 12.5,
            frame_ms: 20.0,
            labels: vec![label("cat", 0.9, true), label("dog", 0.1, false)],
            changed: vec![],
            camera: Some("door".into()),
            regions: vec![crate::flow::RegionLabels {
                id: "step".into(),
                labels: vec![label("dog", 0.6, true)],
                changed: vec![],
            }],
        });
        let json = board.to_json(0);
        assert_eq!(json["inference_ms"], 12.5);
        assert_eq!(json["views"][0]["labels"][0]["name"], "cat");
        assert_eq!(json["views"][0]["labels"][0]["score"], 0.9);
        assert_eq!(json["views"][0]["labels"][0]["on"], true);
        assert_eq!(json["views"][0]["labels"][0]["on_threshold"], 0.5);
        assert_eq!(json["views"][0]["labels"][0]["off_threshold"], 0.4);
        assert_eq!(json["views"][0]["labels"][0]["history"][0], 0.9);
        assert_eq!(json["views"][1]["region"], "step");
        assert_eq!(json["views"][1]["rect"]["width"], 0.5);
        assert_eq!(json["views"][1]["rect"]["height"], 0.25);
        assert_eq!(json["views"][1]["labels"][1]["score"], 0.6);
        assert_eq!(json["views"][1]["labels"][0]["score"], Value::Null, "cat not reported for the region yet");
        // A model with many labels reports the ON ones and the highest: dog
        // fell out of the report, and turned OFF.
        board.record(&LabelEvent {
            sequence: 2,
            timestamp: SystemTime::now(),
            origin: None,
            model: "demo".into(),
            inference_ms: 12.0,
            frame_ms: 20.0,
            labels: vec![label("cat", 0.8, true)],
            changed: vec![],
            camera: Some("door".into()),
            regions: vec![crate::flow::RegionLabels {
                id: "step".into(),
                labels: vec![],
                changed: vec![label("dog", 0.01, false)],
            }],
        });
        let json = board.to_json(0);
        assert_eq!(json["views"][0]["labels"][1]["score"], Value::Null, "no old score for an unreported label");
        assert_eq!(json["views"][1]["labels"][1]["on"], false, "its change reached the page");
        assert_eq!(json["views"][1]["labels"][1]["score"], 0.01);
    }
}
