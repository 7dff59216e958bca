//! Cameras and their regions of interest, as the config file names them.
//!
//! A camera is a source with an id (its part of every MQTT topic) and an
//! optional frame-rate cap; a region is a rectangle of that camera's frame
//! that is cropped out and classified on its own ("is the garage door
//! open", "is there a bird at the feeder"). The source stage owns these
//! settings; `config.rs` only assembles them.
//!
//! A rectangle is `[x, y, width, height]`, in pixels when all four are
//! integers and in fractions of the frame when all four are floats (TOML
//! tells the two apart: `320` is an integer, `0.5` a float). Fractions are
//! checked when the config is read; pixels once the first frame says how
//! large the frame is.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::SourceSpec;
use crate::config::ConfigError;
use crate::labels::ViewLabels;

/// `[[camera]]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCamera {
    pub id: Option<String>,
    /// A source URI, as `source.uri`.
    pub source: Option<String>,
    /// Classify at most this many frames per second from this camera.
    pub fps: Option<f64>,
    /// A model of its own (the rest of `[model]` applies); cameras naming
    /// the same file share one engine.
    pub model: Option<std::path::PathBuf>,
    /// The labels this camera is about (default all), and its own
    /// on-thresholds.
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub thresholds: std::collections::BTreeMap<String, f64>,
    /// Classify only when this share of the picture changed (0 to 1)...
    pub motion: Option<f64>,
    /// ... or at least this often (a duration such as "60s").
    pub interval: Option<String>,
    #[serde(default)]
    pub region: Vec<RawRegion>,
}

/// `[[camera.region]]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    pub id: Option<String>,
    pub rect: Option<Vec<toml::Value>>,
    /// The camera's `motion` and `interval`, for this region alone.
    pub motion: Option<f64>,
    pub interval: Option<String>,
    /// The labels this region is about, and its on-thresholds (the
    /// camera's when not set).
    pub labels: Option<Vec<String>>,
    pub thresholds: Option<std::collections::BTreeMap<String, f64>>,
}

/// When a view (a camera's whole frame, or a region) is classified: on
/// every frame when both are `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GateConfig {
    /// Classify only when at least this share (0 to 1] of the view's 32x32
    /// grey grid changed since it was last classified.
    pub motion: Option<f32>,
    /// Classify at least this often, changed or not; with no `motion`,
    /// exactly this often.
    pub interval: Option<Duration>,
}

impl GateConfig {
    /// Checks `motion` and `interval` as written under `field` (a camera, a
    /// region, or `source`); `inherited` fills what is not set.
    pub fn parse(
        field: &str,
        motion: Option<f64>,
        interval: Option<&str>,
        inherited: GateConfig,
    ) -> Result<GateConfig, ConfigError> {
        let motion = match motion {
            None => inherited.motion,
            Some(share) if share.is_finite() && share > 0.0 && share <= 1.0 => Some(share as f32),
            Some(share) => {
                return Err(ConfigError::new(
                    format!("{field}.motion"),
                    format!("expected the share of the picture that must change, above 0 and at most 1, got {share}"),
                ));
            }
        };
        let interval = match interval {
            None => inherited.interval,
            Some(text) => {
                let interval = humantime::parse_duration(text).map_err(|err| {
                    ConfigError::new(
                        format!("{field}.interval"),
                        format!("expected a duration like \"30s\" or \"5m\", got {text:?} ({err})"),
                    )
                })?;
                if interval < Duration::from_millis(100) {
                    return Err(ConfigError::new(format!("{field}.interval"), "must be at least 100ms"));
                }
                Some(interval)
            }
        };
        // A motion gate with no interval still looks again now and then.
        let interval = match (motion, interval) {
            (Some(_), None) => Some(crate::pipeline::DEFAULT_MOTION_INTERVAL),
            (_, interval) => interval,
        };
        Ok(GateConfig { motion, interval })
    }
}

/// A rectangle of the frame, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rect {
    /// Pixels of the frame as the source delivers it.
    Pixels { x: u32, y: u32, width: u32, height: u32 },
    /// Fractions of the frame's width and height, each in [0, 1].
    Fraction { x: f64, y: f64, width: f64, height: f64 },
}

/// A rectangle in pixels of a frame of known size; never empty, never past
/// the frame's edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelRect {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

/// Regions smaller than this (in pixels, either side) hold too little to
/// classify: a 4x4 crop scaled to 224x224 is a blur.
pub const MIN_REGION_PIXELS: u32 = 8;

impl Rect {
    /// The rectangle on a `frame_width` x `frame_height` frame; the error
    /// says which edge it crosses (the caller adds the field name).
    pub fn resolve(&self, frame_width: u32, frame_height: u32) -> Result<PixelRect, String> {
        let (fw, fh) = (f64::from(frame_width), f64::from(frame_height));
        let rect = match *self {
            Rect::Pixels { x, y, width, height } => {
                if u64::from(x) + u64::from(width) > u64::from(frame_width) {
                    return Err(format!(
                        "x + width ({x} + {width}) exceeds the frame ({frame_width}x{frame_height} pixels)"
                    ));
                }
                if u64::from(y) + u64::from(height) > u64::from(frame_height) {
                    return Err(format!(
                        "y + height ({y} + {height}) exceeds the frame ({frame_width}x{frame_height} pixels)"
                    ));
                }
                PixelRect { x: f64::from(x), y: f64::from(y), width: f64::from(width), height: f64::from(height) }
            }
            Rect::Fraction { x, y, width, height } => {
                let (x, y) = (x * fw, y * fh);
                // Products of fractions can round a hair past the edge.
                PixelRect { x, y, width: (width * fw).min(fw - x), height: (height * fh).min(fh - y) }
            }
        };
        if rect.width < f64::from(MIN_REGION_PIXELS) || rect.height < f64::from(MIN_REGION_PIXELS) {
            return Err(format!(
                "covers {:.0}x{:.0} pixels of the {frame_width}x{frame_height} frame; a region needs at least \
                 {MIN_REGION_PIXELS}x{MIN_REGION_PIXELS}",
                rect.width, rect.height
            ));
        }
        Ok(rect)
    }
}

/// One region of a camera, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionConfig {
    pub id: Arc<str>,
    pub rect: Rect,
    pub gate: GateConfig,
    pub labels: ViewLabels,
    /// `camera[i].region[j]`, for errors found once frames arrive.
    pub field: String,
}

/// One camera, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    /// `None` for the single camera of a `[source]` config: its topics keep
    /// today's form, with no camera level.
    pub id: Option<Arc<str>>,
    pub source: SourceSpec,
    /// The shortest time between two frames classified from this camera.
    pub min_interval: Option<Duration>,
    /// When its whole frame is classified.
    pub gate: GateConfig,
    pub regions: Vec<RegionConfig>,
    /// Its own model file, instead of `[model]`'s path.
    pub model: Option<std::path::PathBuf>,
    /// Its whole frame's labels and thresholds.
    pub labels: ViewLabels,
    /// `camera[i]`, for errors found once the model is loaded.
    pub field: String,
}

impl CameraConfig {
    /// The camera of a `[source]`-only config.
    pub fn single(source: SourceSpec, gate: GateConfig) -> Self {
        Self {
            id: None,
            source,
            min_interval: None,
            gate,
            regions: Vec::new(),
            model: None,
            labels: ViewLabels::default(),
            field: "source".into(),
        }
    }

    /// For logs and errors: the id, or "camera" for the single camera.
    pub fn name(&self) -> &str {
        self.id.as_deref().unwrap_or("camera")
    }
}

/// Names a camera or region cannot take: its topics would read as one of
/// labelcast's own (`<prefix>/labels`, `<prefix>/<camera>/label/<name>`...).
const RESERVED_IDS: [&str; 9] =
    ["available", "stats", "labels", "label", "source", "snapshot", "frame", "homeassistant", "hub"];

fn check_id(field: &str, raw: Option<&str>) -> Result<Arc<str>, ConfigError> {
    let id = raw.ok_or_else(|| ConfigError::new(field, "missing: every camera and region needs an id"))?;
    let clean = crate::config::sanitize_id(id);
    if clean.is_empty() || clean != id {
        return Err(ConfigError::new(
            field,
            format!("expected lower-case letters, digits, '-' or '_' (it becomes part of MQTT topics), got {id:?}"),
        ));
    }
    if RESERVED_IDS.contains(&id) {
        return Err(ConfigError::new(field, format!("{id:?} is one of labelcast's own topic names; choose another")));
    }
    Ok(Arc::from(id))
}

fn parse_rect(field: &str, raw: Option<&[toml::Value]>) -> Result<Rect, ConfigError> {
    let values = raw.ok_or_else(|| {
        ConfigError::new(field, "missing: [x, y, width, height] in pixels (integers) or fractions (0.0 to 1.0)")
    })?;
    let [x, y, w, h] = values else {
        return Err(ConfigError::new(field, format!("expected [x, y, width, height], got {} numbers", values.len())));
    };
    let ints: Option<Vec<i64>> = [x, y, w, h].iter().map(|v| v.as_integer()).collect();
    if let Some(ints) = ints {
        if ints.iter().any(|&v| !(0..=65_535).contains(&v)) {
            return Err(ConfigError::new(field, format!("pixel values must be 0 to 65535, got {ints:?}")));
        }
        let [x, y, width, height] = [ints[0], ints[1], ints[2], ints[3]].map(|v| v as u32);
        if width < MIN_REGION_PIXELS || height < MIN_REGION_PIXELS {
            return Err(ConfigError::new(
                field,
                format!("width and height must be at least {MIN_REGION_PIXELS} pixels, got {width}x{height}"),
            ));
        }
        return Ok(Rect::Pixels { x, y, width, height });
    }
    let floats: Option<Vec<f64>> = [x, y, w, h].iter().map(|v| v.as_float()).collect();
    let Some(f) = floats else {
        return Err(ConfigError::new(
            field,
            "mixes integers and floats: write all four in pixels (e.g. [0, 0, 640, 360]) or all four as fractions \
             of the frame (e.g. [0.0, 0.0, 0.5, 1.0])",
        ));
    };
    if f.iter().any(|v| !v.is_finite() || !(0.0..=1.0).contains(v)) {
        return Err(ConfigError::new(field, format!("fractions must be 0.0 to 1.0, got {f:?}")));
    }
    let (x, y, width, height) = (f[0], f[1], f[2], f[3]);
    if width <= 0.0 || height <= 0.0 {
        return Err(ConfigError::new(field, format!("width and height must be above 0, got {width} x {height}")));
    }
    // A little slack for decimal fractions such as 0.7 + 0.3.
    if x + width > 1.0 + 1e-9 {
        return Err(ConfigError::new(field, format!("x + width ({x} + {width}) exceeds the frame (1.0)")));
    }
    if y + height > 1.0 + 1e-9 {
        return Err(ConfigError::new(field, format!("y + height ({y} + {height}) exceeds the frame (1.0)")));
    }
    Ok(Rect::Fraction { x, y, width: width.min(1.0 - x), height: height.min(1.0 - y) })
}

/// A view's `labels` and `thresholds` as written under `field`, each
/// inheriting `inherited`'s when not set (a region takes its camera's).
fn view_labels(
    field: &str,
    only: Option<&Vec<String>>,
    thresholds: &std::collections::BTreeMap<String, f64>,
    inherited: &ViewLabels,
) -> Result<ViewLabels, ConfigError> {
    if only.is_some_and(|list| list.is_empty()) {
        return Err(ConfigError::new(format!("{field}.labels"), "an empty list: leave it out for every label"));
    }
    let mut own = std::collections::BTreeMap::new();
    for (name, &on) in thresholds {
        if !(on.is_finite() && (0.0..=1.0).contains(&on)) {
            return Err(ConfigError::new(format!("{field}.thresholds.{name}"), format!("expected 0 to 1, got {on}")));
        }
        own.insert(name.clone(), on as f32);
    }
    Ok(ViewLabels {
        only: only.cloned().or_else(|| inherited.only.clone()),
        thresholds: if thresholds.is_empty() { inherited.thresholds.clone() } else { own },
    })
}

/// Checks `[[camera]]` tables: ids unique and topic-safe, sources that
/// parse, rectangles that fit. `check_source` checks what a source needs
/// beyond parsing (a file that exists), with the field to name.
pub fn validate_cameras(
    raw: &[RawCamera],
    check_source: impl Fn(&str, &SourceSpec) -> Result<(), ConfigError>,
) -> Result<Vec<CameraConfig>, ConfigError> {
    let mut cameras: Vec<CameraConfig> = Vec::with_capacity(raw.len());
    for (i, camera) in raw.iter().enumerate() {
        let field = format!("camera[{i}]");
        let id = check_id(&format!("{field}.id"), camera.id.as_deref())?;
        if let Some(other) = cameras.iter().position(|c| c.id.as_deref() == Some(&*id)) {
            return Err(ConfigError::new(format!("{field}.id"), format!("{id:?} is already camera[{other}]'s id")));
        }
        let uri = camera.source.as_deref().ok_or_else(|| {
            ConfigError::new(format!("{field}.source"), "missing: a source URI such as v4l2:///dev/video0")
        })?;
        let source = SourceSpec::parse(uri).map_err(|msg| ConfigError::new(format!("{field}.source"), msg))?;
        check_source(&format!("{field}.source"), &source)?;
        let min_interval = match camera.fps {
            None => None,
            Some(fps) if fps.is_finite() && (0.001..=1000.0).contains(&fps) => Some(Duration::from_secs_f64(1.0 / fps)),
            Some(fps) => {
                return Err(ConfigError::new(
                    format!("{field}.fps"),
                    format!("expected 0.001 to 1000 frames per second, got {fps}"),
                ));
            }
        };
        let gate = GateConfig::parse(&field, camera.motion, camera.interval.as_deref(), GateConfig::default())?;
        let labels = view_labels(&field, camera.labels.as_ref(), &camera.thresholds, &ViewLabels::default())?;
        let mut regions: Vec<RegionConfig> = Vec::with_capacity(camera.region.len());
        for (j, region) in camera.region.iter().enumerate() {
            let region_field = format!("{field}.region[{j}]");
            let id = check_id(&format!("{region_field}.id"), region.id.as_deref())?;
            if let Some(other) = regions.iter().position(|r| r.id == id) {
                return Err(ConfigError::new(
                    format!("{region_field}.id"),
                    format!("{id:?} is already {field}.region[{other}]'s id"),
                ));
            }
            let rect = parse_rect(&format!("{region_field}.rect"), region.rect.as_deref())?;
            let gate = GateConfig::parse(&region_field, region.motion, region.interval.as_deref(), gate)?;
            let thresholds = region.thresholds.clone().unwrap_or_default();
            let labels = view_labels(&region_field, region.labels.as_ref(), &thresholds, &labels)?;
            regions.push(RegionConfig { id, rect, gate, labels, field: region_field });
        }
        if let Some(model) = &camera.model {
            std::fs::File::open(model).map_err(|err| {
                ConfigError::new(format!("{field}.model"), format!("cannot read {}: {err}", model.display()))
            })?;
        }
        cameras.push(CameraConfig {
            id: Some(id),
            source,
            min_interval,
            gate,
            regions,
            model: camera.model.clone(),
            labels,
            field,
        });
    }
    Ok(cameras)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cameras(text: &str) -> Result<Vec<CameraConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            camera: Vec<RawCamera>,
        }
        let file: File = toml::from_str(text).expect("test TOML parses");
        validate_cameras(&file.camera, |_, _| Ok(()))
    }

    #[test]
    fn integer_rectangles_are_pixels_and_float_rectangles_are_fractions() {
        let parsed = cameras(
            r#"
            [[camera]]
            id = "porch"
            source = "test://pattern"
            fps = 2
            [[camera.region]]
            id = "door"
            rect = [10, 20, 300, 200]
            [[camera.region]]
            id = "left"
            rect = [0.0, 0.0, 0.5, 1.0]
            "#,
        )
        .unwrap();
        assert_eq!(parsed[0].min_interval, Some(Duration::from_millis(500)));
        assert_eq!(parsed[0].regions[0].rect, Rect::Pixels { x: 10, y: 20, width: 300, height: 200 });
        assert_eq!(parsed[0].regions[1].rect, Rect::Fraction { x: 0.0, y: 0.0, width: 0.5, height: 1.0 });
        let left = parsed[0].regions[1].rect.resolve(1280, 720).unwrap();
        assert_eq!(left, PixelRect { x: 0.0, y: 0.0, width: 640.0, height: 720.0 });
    }

    #[test]
    fn a_region_inherits_the_cameras_gate_and_a_motion_gate_looks_again_every_minute() {
        let parsed = cameras(
            r#"
            [[camera]]
            id = "drive"
            source = "test://pattern"
            motion = 0.05
            [[camera.region]]
            id = "gate"
            rect = [0.0, 0.0, 0.5, 0.5]
            [[camera.region]]
            id = "door"
            rect = [0.5, 0.5, 0.5, 0.5]
            interval = "10s"
            "#,
        )
        .unwrap();
        let minute = Some(Duration::from_secs(60));
        assert_eq!(parsed[0].gate, GateConfig { motion: Some(0.05), interval: minute });
        assert_eq!(parsed[0].regions[0].gate, parsed[0].gate);
        assert_eq!(
            parsed[0].regions[1].gate,
            GateConfig { motion: Some(0.05), interval: Some(Duration::from_secs(10)) }
        );
    }

    #[test]
    fn a_pixel_rectangle_past_the_frame_edge_is_refused_once_the_frame_size_is_known() {
        let rect = Rect::Pixels { x: 1000, y: 0, width: 400, height: 100 };
        let err = rect.resolve(1280, 720).unwrap_err();
        assert!(err.contains("x + width (1000 + 400) exceeds the frame (1280x720"), "{err}");
        assert!(rect.resolve(1920, 1080).is_ok());
    }

    #[test]
    fn bad_cameras_and_regions_are_refused_naming_the_field() {
        let cases = [
            ("[[camera]]\nsource = \"test://pattern\"", "camera[0].id"),
            ("[[camera]]\nid = \"Porch\"\nsource = \"test://pattern\"", "camera[0].id"),
            ("[[camera]]\nid = \"labels\"\nsource = \"test://pattern\"", "camera[0].id"),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera]]\nid = \"a\"\nsource = \"test://pattern\"",
                "camera[1].id",
            ),
            ("[[camera]]\nid = \"a\"", "camera[0].source"),
            ("[[camera]]\nid = \"a\"\nsource = \"ftp://x\"", "camera[0].source"),
            ("[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\nfps = 0", "camera[0].fps"),
            ("[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\nmotion = 0", "camera[0].motion"),
            ("[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\ninterval = \"soon\"", "camera[0].interval"),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera.region]]\nid = \"r\"\nrect = [0, 0, 40, 40]\nmotion = 1.5",
                "camera[0].region[0].motion",
            ),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera.region]]\nid = \"r\"\nrect = [0.5, 0.0, 0.6, 1.0]",
                "camera[0].region[0].rect",
            ),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera.region]]\nid = \"r\"\nrect = [0, 0.0, 1, 1]",
                "camera[0].region[0].rect",
            ),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera.region]]\nid = \"r\"\nrect = [0, 0, 640]",
                "camera[0].region[0].rect",
            ),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera.region]]\nid = \"r\"\nrect = [0, 0, 4, 4]",
                "camera[0].region[0].rect",
            ),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera.region]]\nrect = [0, 0, 40, 40]",
                "camera[0].region[0].id",
            ),
            (
                "[[camera]]\nid = \"a\"\nsource = \"test://pattern\"\n[[camera.region]]\nid = \"r\"\nrect = [0, 0, 40, 40]\n[[camera.region]]\nid = \"r\"\nrect = [0, 0, 40, 40]",
                "camera[0].region[1].id",
            ),
        ];
        for (text, field) in cases {
            let err = cameras(text).expect_err(text);
            assert_eq!(err.field, field, "{text}: {err}");
        }
    }
}
