//! Frame sources: where pictures come from, behind one small trait.
//!
//! A source is named by a URI in the scheme jetson-inference made familiar
//! (`file:///photos?fps=2&loop=true`, `test://pattern`); [`SourceSpec::parse`]
//! checks it when the config is validated and [`open`] turns it into a
//! [`FrameSource`]. Sources hand over [`Frame`]s in the pixel format they
//! captured; decoding and resizing happen in `preprocess`, so a camera thread
//! stays cheap and a slow model drops stale frames instead of decoding them.

pub mod camera;
mod file;
#[cfg(feature = "gstreamer")]
pub mod gst;
pub mod negotiate;
mod pattern;
pub mod supervisor;
pub mod v4l2;

use std::path::PathBuf;
use std::time::Duration;

pub use crate::flow::{Frame, PixelFormat, describe_origin};
pub use file::{FileSource, read_frame, read_frame_limited};
pub use pattern::{PatternFaults, TestPattern, encode};

/// Why a source did not deliver a frame; the pipeline branches on the kind.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// This one frame is unusable (an unreadable file, a corrupt buffer); the
    /// next one may be fine.
    #[error("skipped {origin}: {reason}")]
    Skipped { origin: String, reason: String },
    /// No frame arrived within the read timeout. One is a hiccup; a streak
    /// means the camera stopped sending, and the supervisor reopens it.
    #[error("no frame within the read timeout")]
    Timeout,
    /// The device went away (unplugged: ENODEV; a USB error: EIO; a live
    /// stream ended) or is not there yet. The supervisor closes it and
    /// reopens it, with backoff, by the same path.
    #[error("{0}")]
    Disconnected(String),
    /// The source cannot go on and reopening would not help (a folder
    /// deleted, a node that is not a camera, a format nothing can convert).
    #[error("{0}")]
    Fatal(String),
}

/// Something that produces frames, one at a time, on its own thread.
pub trait FrameSource: Send {
    /// A short description for logs (never credentials).
    fn describe(&self) -> String;
    /// The pause between frames the pipeline should keep, for sources that do
    /// not pace themselves (files, patterns); `None` for cameras.
    fn frame_interval(&self) -> Option<Duration>;
    /// The next frame; `Ok(None)` at the end of a finite source.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;
}

/// A parsed, checked source URI.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// `file:///path` to one image or a folder of images (name order).
    File { path: PathBuf, fps: f64, looping: bool },
    /// `test://pattern`: a deterministic moving test picture, optionally in a
    /// camera's pixel format and with scripted camera faults.
    TestPattern { width: u32, height: u32, fps: f64, frames: Option<u64>, format: PixelFormat, faults: PatternFaults },
    /// `v4l2:///dev/video0?width=&height=&fps=&format=` (or a
    /// `/dev/v4l/by-id/...` path): a V4L2 capture device.
    V4l2 { device: PathBuf, request: negotiate::Request, timeout: Duration },
    /// `csi://0`, `rtsp://...` or `gst://<pipeline> ! appsink` (feature `gstreamer`).
    #[cfg(feature = "gstreamer")]
    Gst(gst::GstSpec),
}

impl SourceSpec {
    /// Parses a source URI; the error says what is wrong and what is accepted.
    pub fn parse(uri: &str) -> Result<SourceSpec, String> {
        // A bare device path is shorthand for v4l2://<path>.
        if uri.starts_with("/dev/") {
            return Self::parse(&format!("v4l2://{uri}"));
        }
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            format!("expected a URI like v4l2:///dev/video0, file:///path or test://pattern, got {uri:?}")
        })?;
        let (target, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut params = QueryParams::parse(query)?;
        let spec = match scheme {
            "file" => {
                if target.is_empty() {
                    return Err(format!("no path in {uri:?}"));
                }
                let path = PathBuf::from(percent_decode(target)?);
                let fps = params.take_f64("fps", 2.0)?;
                let looping = params.take_bool("loop", false)?;
                SourceSpec::File { path, fps, looping }
            }
            "test" => {
                if target != "pattern" {
                    return Err(format!("the test source is test://pattern, got {uri:?}"));
                }
                let width = params.take_u32("width", 640)?;
                let height = params.take_u32("height", 480)?;
                if !(16..=8192).contains(&width) || !(16..=8192).contains(&height) {
                    return Err(format!("width and height must be 16 to 8192, got {width}x{height}"));
                }
                let fps = params.take_f64("fps", 10.0)?;
                let frames = params.take_opt_u64("frames")?;
                let format = params.take_format()?.unwrap_or(PixelFormat::Rgb8);
                let faults = PatternFaults {
                    hang_after: params.take_opt_u64("hang_after")?,
                    disconnect_after: params.take_opt_u64("disconnect_after")?,
                    offline: Duration::from_millis(params.take_opt_u64("offline_ms")?.unwrap_or(0)),
                    stall_after: params.take_opt_u64("stall_after")?,
                    corrupt_every: params.take_opt_u64("corrupt_every")?,
                };
                SourceSpec::TestPattern { width, height, fps, frames, format, faults }
            }
            "v4l2" => {
                if !target.starts_with('/') {
                    return Err(format!("expected a device path like v4l2:///dev/video0, got {uri:?}"));
                }
                let device = PathBuf::from(percent_decode(target)?);
                let request = negotiate::Request {
                    width: params.take_opt_u32("width")?,
                    height: params.take_opt_u32("height")?,
                    fps: params.take_opt_f64("fps")?,
                    format: params.take_format()?,
                };
                let timeout_ms = params.take_opt_u64("timeout_ms")?.unwrap_or(2000);
                if !(50..=60_000).contains(&timeout_ms) {
                    return Err(format!("timeout_ms must be 50 to 60000, got {timeout_ms}"));
                }
                SourceSpec::V4l2 { device, request, timeout: Duration::from_millis(timeout_ms) }
            }
            #[cfg(feature = "gstreamer")]
            "csi" | "rtsp" | "rtsps" | "gst" => return gst::GstSpec::parse(scheme, uri).map(SourceSpec::Gst),
            #[cfg(not(feature = "gstreamer"))]
            "csi" | "rtsp" | "rtsps" | "gst" => {
                return Err(format!(
                    "{scheme}:// sources go through GStreamer, which this build leaves out; \
                     rebuild with `cargo build --release --features gstreamer`"
                ));
            }
            other => {
                return Err(format!("unknown source scheme {other:?}: expected v4l2://, file:// or test://pattern"));
            }
        };
        params.finish()?;
        Ok(spec)
    }

    /// True for sources that deliver frames as they happen (cameras, the
    /// pattern): they are reopened when they go away, not ended, and the
    /// pipeline drops a frame inference has not taken when a newer one
    /// arrives. False for files, which wait for inference instead.
    pub fn is_live(&self) -> bool {
        !matches!(self, SourceSpec::File { .. })
    }

    /// The source for logs and metric labels (never credentials).
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::File { path, .. } => format!("file://{}", path.display()),
            SourceSpec::TestPattern { width, height, format, .. } => {
                format!("test://pattern ({width}x{height} {})", format.as_str())
            }
            SourceSpec::V4l2 { device, .. } => format!("v4l2://{}", device.display()),
            #[cfg(feature = "gstreamer")]
            SourceSpec::Gst(spec) => spec.describe(),
        }
    }
}

/// Opens the source a spec names. A camera that is not there (yet) is
/// [`SourceError::Disconnected`]: worth trying again.
pub fn open(spec: &SourceSpec) -> Result<Box<dyn FrameSource>, SourceError> {
    open_limited(spec, crate::preprocess::DEFAULT_MAX_FRAME_PIXELS)
}

/// [`open`], refusing pictures of more than `max_pixels` pixels where the
/// source decodes them itself (PNG files).
pub fn open_limited(spec: &SourceSpec, max_pixels: u64) -> Result<Box<dyn FrameSource>, SourceError> {
    Ok(match spec {
        SourceSpec::File { path, fps, looping } => Box::new(
            FileSource::open(path, *fps, *looping)
                .map_err(|err| SourceError::Fatal(format!("{err:#}")))?
                .with_max_pixels(max_pixels),
        ),
        SourceSpec::TestPattern { width, height, fps, frames, format, faults } => {
            Box::new(TestPattern::open(*width, *height, *fps, *frames, *format, faults.clone())?)
        }
        SourceSpec::V4l2 { device, request, timeout } => Box::new(v4l2::V4l2Source::open(device, request, *timeout)?),
        #[cfg(feature = "gstreamer")]
        SourceSpec::Gst(spec) => Box::new(gst::GstSource::open(spec)?),
    })
}

fn interval_for_fps(fps: f64) -> Option<Duration> {
    (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps))
}

/// Query parameters of a source URI; each is taken once, and any left over
/// is reported as unknown.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(query: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, "true"));
            pairs.push((key.to_string(), percent_decode(value)?));
        }
        Ok(Self(pairs))
    }

    fn take(&mut self, key: &str) -> Option<String> {
        let index = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(index).1)
    }

    fn take_f64(&mut self, key: &str, default: f64) -> Result<f64, String> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(n) if n.is_finite() && (0.0..=1000.0).contains(&n) => Ok(n),
                _ => Err(format!("{key}: expected a number from 0 to 1000, got {v:?}")),
            },
        }
    }

    fn take_u32(&mut self, key: &str, default: u32) -> Result<u32, String> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("{key}: expected a whole number, got {v:?}")),
        }
    }

    fn take_opt_u32(&mut self, key: &str) -> Result<Option<u32>, String> {
        self.take(key).map(|v| v.parse().map_err(|_| format!("{key}: expected a whole number, got {v:?}"))).transpose()
    }

    fn take_opt_f64(&mut self, key: &str) -> Result<Option<f64>, String> {
        if self.0.iter().any(|(k, _)| k == key) { self.take_f64(key, 0.0).map(Some) } else { Ok(None) }
    }

    fn take_format(&mut self) -> Result<Option<PixelFormat>, String> {
        self.take("format")
            .map(|v| {
                PixelFormat::parse(&v)
                    .ok_or_else(|| format!("format: expected mjpg, yuyv, nv12, grey or rgb, got {v:?}"))
            })
            .transpose()
    }

    fn take_opt_u64(&mut self, key: &str) -> Result<Option<u64>, String> {
        self.take(key).map(|v| v.parse().map_err(|_| format!("{key}: expected a whole number, got {v:?}"))).transpose()
    }

    fn take_bool(&mut self, key: &str, default: bool) -> Result<bool, String> {
        match self.take(key).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(v) => Err(format!("{key}: expected true or false, got {v:?}")),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.0.first() {
            None => Ok(()),
            Some((key, _)) => Err(format!("unknown parameter {key:?}")),
        }
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or_else(|| format!("bad %-escape in {text:?}"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape in {text:?}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_uri_with_parameters_parses() {
        let spec = SourceSpec::parse("file:///data/my%20photos?fps=0.5&loop=true").unwrap();
        assert_eq!(spec, SourceSpec::File { path: "/data/my photos".into(), fps: 0.5, looping: true });
    }

    #[test]
    fn a_relative_file_path_is_kept_relative() {
        let spec = SourceSpec::parse("file://calibration/images").unwrap();
        assert_eq!(spec, SourceSpec::File { path: "calibration/images".into(), fps: 2.0, looping: false });
    }

    #[test]
    fn an_unknown_parameter_is_named() {
        let err = SourceSpec::parse("test://pattern?fsp=3").unwrap_err();
        assert_eq!(err, "unknown parameter \"fsp\"");
    }

    #[test]
    fn an_unknown_scheme_lists_what_is_accepted() {
        let err = SourceSpec::parse("http://camera/stream").unwrap_err();
        assert!(err.contains("file://") && err.contains("test://pattern"), "{err}");
    }

    #[test]
    fn a_bare_path_is_not_a_uri_but_a_bare_device_is_a_camera() {
        assert!(SourceSpec::parse("/data/photos").unwrap_err().contains("expected a URI"));
        let SourceSpec::V4l2 { device, request, timeout } = SourceSpec::parse("/dev/video0").unwrap() else {
            panic!("a device path is a V4L2 source")
        };
        assert_eq!(device, PathBuf::from("/dev/video0"));
        assert_eq!(request, negotiate::Request::default());
        assert_eq!(timeout, Duration::from_secs(2));
    }

    #[test]
    fn a_v4l2_uri_carries_the_requested_mode() {
        let uri = "v4l2:///dev/v4l/by-id/usb-Cam-video-index0?width=1280&height=720&fps=30&format=MJPG";
        let SourceSpec::V4l2 { device, request, .. } = SourceSpec::parse(uri).unwrap() else { panic!("v4l2") };
        assert_eq!(device, PathBuf::from("/dev/v4l/by-id/usb-Cam-video-index0"));
        let expected = negotiate::Request {
            width: Some(1280),
            height: Some(720),
            fps: Some(30.0),
            format: Some(PixelFormat::Mjpeg),
        };
        assert_eq!(request, expected);
        assert!(SourceSpec::parse("v4l2:///dev/video0?format=h264").unwrap_err().contains("mjpg, yuyv"));
    }

    #[cfg(not(feature = "gstreamer"))]
    #[test]
    fn gstreamer_schemes_say_which_feature_to_build() {
        let err = SourceSpec::parse("rtsp://user:secret@cam/stream").unwrap_err();
        assert!(err.contains("--features gstreamer"), "{err}");
        assert!(!err.contains("secret"), "credentials stay out of messages: {err}");
    }

    #[test]
    fn test_pattern_sizes_are_bounded() {
        assert!(SourceSpec::parse("test://pattern?width=0").is_err());
        assert!(SourceSpec::parse("test://pattern?width=320&height=240&frames=5").is_ok());
    }
}
