//! CSI cameras on Jetson, RTSP cameras and any other GStreamer pipeline
//! (cargo feature `gstreamer`).
//!
//! Each source is a pipeline ending in an `appsink` that keeps only the
//! newest buffer (`max-buffers=1 drop=true`), so a slow model never makes
//! GStreamer queue stale frames. Frames leave as NV12 where labelcast builds
//! the pipeline: on Jetson `nvvidconv` does the conversion (and scaling, with
//! `output_width`/`output_height`) in hardware, elsewhere `videoconvert`
//! does it; the NV12 -> RGB step then runs on labelcast's SIMD path.
//!
//! Errors and end of stream are [`SourceError::Disconnected`]: the capture
//! supervisor tears the pipeline down and builds it again with backoff, which
//! is how an RTSP camera that rebooted comes back. RTSP credentials live only
//! in the `location` property: descriptions and logged GStreamer messages
//! have them removed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use super::{Frame, FrameSource, PixelFormat, SourceError};

/// A parsed `csi://`, `rtsp://` or `gst://` source.
#[derive(Clone, PartialEq)]
pub struct GstSpec {
    kind: Kind,
    /// How long a read waits for a frame before it counts as a timeout.
    pub timeout: Duration,
}

#[derive(Clone, PartialEq)]
enum Kind {
    Csi { sensor: u32, width: u32, height: u32, fps: u32, output: Option<(u32, u32)> },
    Rtsp { location: String, latency_ms: u32 },
    Custom { pipeline: String },
}

impl std::fmt::Debug for GstSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print an RTSP password, not even in a debug dump.
        f.write_str(&self.describe())
    }
}

const APPSINK_NAME: &str = "labelcast";
/// Formats labelcast converts, in GStreamer's names.
const ACCEPTED_CAPS: &str = "video/x-raw,format={NV12,YUY2,GRAY8,RGB}";

impl GstSpec {
    /// `scheme` is `csi`, `rtsp` or `gst`; `uri` the whole source URI.
    pub fn parse(scheme: &str, uri: &str) -> Result<GstSpec, String> {
        let rest = &uri[scheme.len() + 3..];
        let timeout = Duration::from_secs(5);
        let kind = match scheme {
            "csi" => {
                let (target, query) = rest.split_once('?').unwrap_or((rest, ""));
                let sensor =
                    target.parse().map_err(|_| format!("expected a sensor number like csi://0, got {uri:?}"))?;
                let mut params = super::QueryParams::parse(query)?;
                let width = params.take_u32("width", 1280)?;
                let height = params.take_u32("height", 720)?;
                let fps = params.take_u32("fps", 30)?;
                let output = match (params.take_opt_u32("output_width")?, params.take_opt_u32("output_height")?) {
                    (Some(w), Some(h)) => Some((w, h)),
                    (None, None) => None,
                    _ => return Err("output_width and output_height go together".into()),
                };
                params.finish()?;
                if !(16..=8192).contains(&width) || !(16..=8192).contains(&height) || !(1..=240).contains(&fps) {
                    return Err(format!("csi size must be 16 to 8192 and fps 1 to 240, got {width}x{height}@{fps}"));
                }
                Kind::Csi { sensor, width, height, fps, output }
            }
            // The query string belongs to the camera (`?channel=1&subtype=0`):
            // the whole URI goes to rtspsrc as it is.
            "rtsp" | "rtsps" => {
                url::Url::parse(uri).map_err(|err| format!("not a valid RTSP URL ({err})"))?;
                Kind::Rtsp { location: uri.to_string(), latency_ms: 200 }
            }
            "gst" => {
                if !rest.contains("appsink") {
                    return Err("a gst:// pipeline must end in an appsink, e.g. \
                                gst://videotestsrc is-live=true ! videoconvert ! appsink"
                        .into());
                }
                gst::init().map_err(|err| format!("GStreamer does not start: {err}"))?;
                gst::parse::launch(rest).map_err(|err| format!("the pipeline does not parse: {err}"))?;
                Kind::Custom { pipeline: rest.to_string() }
            }
            other => return Err(format!("{other}:// is not a GStreamer source")),
        };
        Ok(GstSpec { kind, timeout })
    }

    /// The source for logs: RTSP user, password and query left out.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Csi { sensor, width, height, fps, .. } => format!("csi://{sensor} ({width}x{height}@{fps})"),
            Kind::Rtsp { location, .. } => redact(location),
            Kind::Custom { pipeline } => format!("gst://{}", redact_pipeline(pipeline)),
        }
    }

    fn secrets(&self) -> Vec<String> {
        match &self.kind {
            Kind::Rtsp { location, .. } => url::Url::parse(location)
                .map(|url| {
                    [url.password().unwrap_or_default().to_string(), url.username().to_string()]
                        .into_iter()
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The launch line. Jetson's `nvvidconv` is used when it is installed.
    fn launch_line(&self) -> String {
        let hardware = gst::init().is_ok() && gst::ElementFactory::find("nvvidconv").is_some();
        let convert = if hardware { "nvvidconv" } else { "videoconvert" };
        let sink = format!("appsink name={APPSINK_NAME}");
        match &self.kind {
            Kind::Csi { sensor, width, height, fps, output } => {
                let scaled = output.map(|(w, h)| format!(",width={w},height={h}")).unwrap_or_default();
                format!(
                    "nvarguscamerasrc sensor-id={sensor} ! \
                     video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1 ! \
                     nvvidconv ! video/x-raw,format=NV12{scaled} ! {sink}"
                )
            }
            // `location` is set as a property after parsing: no quoting to get wrong.
            Kind::Rtsp { latency_ms, .. } => format!(
                "rtspsrc name=rtsp latency={latency_ms} ! decodebin ! {convert} ! video/x-raw,format=NV12 ! {sink}"
            ),
            Kind::Custom { pipeline } => pipeline.clone(),
        }
    }
}

/// A custom pipeline for logs and the status page: every URL in it (a
/// `location=rtsp://user:pass@...` property) redacted as [`redact`] does.
pub fn redact_pipeline(pipeline: &str) -> String {
    pipeline
        .split(' ')
        .map(|word| match word.find("://") {
            Some(scheme_end) => {
                // The URL starts after `property=` and an opening quote.
                let start = word[..scheme_end].rfind(['=', '"', '\'']).map_or(0, |i| i + 1);
                let end = word[start..].find(['"', '\'']).map_or(word.len(), |i| start + i);
                let url = &word[start..end];
                match url::Url::parse(url) {
                    Ok(parsed)
                        if !parsed.username().is_empty() || parsed.password().is_some() || parsed.query().is_some() =>
                    {
                        let mut clean = parsed;
                        let _ = clean.set_username("");
                        let _ = clean.set_password(None);
                        clean.set_query(None);
                        format!("{}{}{} (credentials and query hidden)", &word[..start], clean, &word[end..])
                    }
                    Ok(_) => word.to_string(),
                    Err(_) => format!("{}(unparsable URL hidden){}", &word[..start], &word[end..]),
                }
            }
            None => word.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `rtsp://user:pass@host:554/path?token=x` -> `rtsp://host:554/path`.
pub fn redact(location: &str) -> String {
    match url::Url::parse(location) {
        Ok(mut url) => {
            let hidden = !url.username().is_empty() || url.password().is_some() || url.query().is_some();
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            format!("{url}{}", if hidden { " (credentials and query hidden)" } else { "" })
        }
        Err(_) => "rtsp://(unparsable URL hidden)".into(),
    }
}

pub struct GstSource {
    spec: GstSpec,
    pipeline: gst::Element,
    appsink: gst_app::AppSink,
    bus: gst::Bus,
    origin: Arc<str>,
    sequence: u64,
}

impl GstSource {
    pub fn open(spec: &GstSpec) -> Result<Self, SourceError> {
        gst::init().map_err(|err| SourceError::Fatal(format!("GStreamer does not start: {err}")))?;
        let shown = spec.describe();
        let pipeline = gst::parse::launch(&spec.launch_line()).map_err(|err| {
            SourceError::Fatal(format!(
                "{shown}: {} (are the GStreamer plugins installed? `gst-inspect-1.0` lists them)",
                scrub(&err.to_string(), &spec.secrets())
            ))
        })?;
        let bin = pipeline.clone().dynamic_cast::<gst::Bin>().map_err(|_| {
            SourceError::Fatal(format!("{shown}: the pipeline is a single element; it must end in an appsink"))
        })?;
        if let Kind::Rtsp { location, .. } = &spec.kind
            && let Some(rtsp) = bin.by_name("rtsp")
        {
            rtsp.set_property("location", location);
        }
        let appsink = bin
            .by_name(APPSINK_NAME)
            .or_else(|| bin.iterate_sinks().into_iter().flatten().find(|e| e.is::<gst_app::AppSink>()))
            .and_then(|e| e.dynamic_cast::<gst_app::AppSink>().ok())
            .ok_or_else(|| SourceError::Fatal(format!("{shown}: no appsink at the end of the pipeline")))?;
        appsink.set_max_buffers(1);
        appsink.set_drop(true);
        appsink.set_property("sync", false);
        if appsink.caps().is_none() {
            appsink.set_caps(Some(&ACCEPTED_CAPS.parse::<gst::Caps>().expect("constant caps parse")));
        }
        let bus = pipeline.bus().ok_or_else(|| SourceError::Fatal(format!("{shown}: the pipeline has no bus")))?;
        let source =
            Self { spec: spec.clone(), pipeline, appsink, bus, origin: Arc::from(shown.as_str()), sequence: 0 };
        if source.pipeline.set_state(gst::State::Playing).is_err() {
            return Err(source
                .bus_error()
                .unwrap_or_else(|| SourceError::Disconnected(format!("{shown}: the pipeline does not start"))));
        }
        // Wait for the pipeline to run (an RTSP connection, a sensor
        // powering up): a source that cannot start is reported here, not
        // as a stream of timeouts.
        let (result, _, _) = source.pipeline.state(gst::ClockTime::from_mseconds(spec.timeout.as_millis() as u64));
        if result.is_err() {
            return Err(source
                .bus_error()
                .unwrap_or_else(|| SourceError::Disconnected(format!("{shown}: the pipeline did not reach PLAYING"))));
        }
        tracing::info!(source = %shown, "GStreamer pipeline playing");
        Ok(source)
    }

    /// The first error on the bus, if any, as a disconnect (credentials removed).
    fn bus_error(&self) -> Option<SourceError> {
        let message = self.bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Eos])?;
        let text = match message.view() {
            gst::MessageView::Error(err) => {
                let debug = err.debug().map(|d| format!(" ({d})")).unwrap_or_default();
                format!("{}{debug}", err.error())
            }
            _ => "end of stream".into(),
        };
        Some(SourceError::Disconnected(format!("{}: {}", self.origin, scrub(&text, &self.spec.secrets()))))
    }

    fn to_frame(&self, sample: &gst::Sample) -> Result<Frame, SourceError> {
        let skipped = |reason: String| SourceError::Skipped { origin: self.origin.to_string(), reason };
        let caps = sample.caps().ok_or_else(|| skipped("a sample without caps".into()))?;
        let info = gst_video::VideoInfo::from_caps(caps).map_err(|err| skipped(format!("caps: {err}")))?;
        let buffer = sample.buffer().ok_or_else(|| skipped("a sample without a buffer".into()))?;
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)
            .map_err(|err| skipped(format!("mapping the buffer: {err}")))?;
        let (w, h) = (info.width() as usize, info.height() as usize);
        let format = match info.format() {
            gst_video::VideoFormat::Nv12 => PixelFormat::Nv12,
            gst_video::VideoFormat::Yuy2 => PixelFormat::Yuyv,
            gst_video::VideoFormat::Gray8 => PixelFormat::Gray8,
            gst_video::VideoFormat::Rgb => PixelFormat::Rgb8,
            other => {
                return Err(SourceError::Fatal(format!(
                    "{}: the appsink delivers {other:?}; labelcast converts NV12, YUY2, GRAY8 and RGB",
                    self.origin
                )));
            }
        };
        let row_bytes = format.row_bytes(w);
        // Rows are copied tightly packed: GStreamer's plane strides and
        // offsets vary by element, labelcast's frame layout does not.
        let plane_rows = |plane: u32, rows: usize, data: &mut Vec<u8>| -> Result<(), SourceError> {
            let bytes = frame.plane_data(plane).map_err(|err| skipped(format!("plane {plane}: {err}")))?;
            let stride = frame.plane_stride()[plane as usize] as usize;
            for row in 0..rows {
                let start = row * stride;
                let line = bytes.get(start..start + row_bytes).ok_or_else(|| skipped("a short plane".into()))?;
                data.extend_from_slice(line);
            }
            Ok(())
        };
        let mut data = Vec::with_capacity(row_bytes * (h + h / 2));
        plane_rows(0, h, &mut data)?;
        if format == PixelFormat::Nv12 {
            plane_rows(1, h / 2, &mut data)?;
        }
        Ok(Frame {
            format,
            width: w as u32,
            height: h as u32,
            stride: row_bytes,
            data,
            sequence: self.sequence,
            captured_at: SystemTime::now(),
            origin: Some(self.origin.clone()),
        })
    }
}

impl Drop for GstSource {
    fn drop(&mut self) {
        // NULL releases the sockets, devices and threads the elements hold.
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl FrameSource for GstSource {
    fn describe(&self) -> String {
        self.origin.to_string()
    }

    fn frame_interval(&self) -> Option<Duration> {
        None
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let timeout = gst::ClockTime::from_mseconds(self.spec.timeout.as_millis() as u64);
        match self.appsink.try_pull_sample(timeout) {
            Some(sample) => {
                let frame = self.to_frame(&sample)?;
                self.sequence += 1;
                Ok(Some(frame))
            }
            None => {
                if let Some(err) = self.bus_error() {
                    return Err(err);
                }
                if self.appsink.is_eos() {
                    return Ok(None);
                }
                Err(SourceError::Timeout)
            }
        }
    }
}

fn scrub(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_string(), |text, secret| text.replace(secret.as_str(), "***"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_pipeline_is_described_without_the_credentials_in_its_urls() {
        let shown = redact_pipeline(
            "rtspsrc location=rtsp://admin:hunter2@10.0.0.5:554/live?token=x latency=0 ! decodebin ! appsink",
        );
        assert!(!shown.contains("hunter2") && !shown.contains("admin") && !shown.contains("token"), "{shown}");
        assert!(shown.contains("location=rtsp://10.0.0.5:554/live (credentials and query hidden)"), "{shown}");
        assert_eq!(redact_pipeline("videotestsrc ! appsink"), "videotestsrc ! appsink");
        let quoted = redact_pipeline("souphttpsrc location=\"https://u:p@cam/x.mjpg\" ! jpegdec");
        assert!(!quoted.contains("u:p@"), "{quoted}");
    }

    #[test]
    fn an_rtsp_description_keeps_the_host_and_drops_credentials_and_query() {
        let spec =
            GstSpec::parse("rtsp", "rtsp://admin:hunter2@10.0.0.9:554/cam/realmonitor?channel=1&token=abc").unwrap();
        let shown = format!("{} {spec:?}", spec.describe());
        assert!(shown.contains("10.0.0.9:554/cam/realmonitor"), "{shown}");
        for secret in ["admin", "hunter2", "token", "abc"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert_eq!(scrub("auth failed for admin:hunter2", &spec.secrets()), "auth failed for ***:***");
    }

    #[test]
    fn a_csi_uri_builds_an_argus_pipeline_scaled_by_nvvidconv() {
        let spec =
            GstSpec::parse("csi", "csi://1?width=1920&height=1080&fps=30&output_width=640&output_height=360").unwrap();
        let line = spec.launch_line();
        assert!(line.starts_with("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1920,height=1080"));
        assert!(line.contains("nvvidconv ! video/x-raw,format=NV12,width=640,height=360 ! appsink"), "{line}");
        assert!(GstSpec::parse("csi", "csi://front").unwrap_err().contains("sensor number"));
    }

    #[test]
    fn a_gst_pipeline_without_an_appsink_is_refused() {
        let err = GstSpec::parse("gst", "gst://videotestsrc ! fakesink").unwrap_err();
        assert!(err.contains("must end in an appsink"), "{err}");
    }
}
