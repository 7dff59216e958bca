//! `labelcast probe`: what cameras this machine has and what they offer,
//! and, for one source, what labelcast actually gets from it (negotiated
//! format, measured frame rate, decode time). The first thing to run on a
//! new board, and what to paste into a bug report.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::config::ResizeMode;
use crate::preprocess::Preprocessor;
use crate::source::negotiate::{SizeOffer, fourcc_str};
use crate::source::{self, SourceError, SourceSpec, v4l2};

/// The device listing, as printed.
pub fn list_devices() -> String {
    let nodes = v4l2::list_nodes();
    if nodes.is_empty() {
        return "no video devices found (no /dev/video* nodes): plug in a camera, or check that its driver \
                is loaded (`lsmod`, `dmesg`)\n"
            .into();
    }
    let mut out = String::new();
    for (node, by_id) in nodes {
        let _ = write!(out, "{}", node.display());
        for link in &by_id {
            let _ = write!(out, "  {}", link.display());
        }
        out.push('\n');
        let device = match v4l::Device::with_path(&node) {
            Ok(device) => device,
            Err(err) => {
                let _ = writeln!(out, "    cannot open: {err}");
                continue;
            }
        };
        let info = match v4l2::device_info(&device) {
            Ok(info) => info,
            Err(err) => {
                let _ = writeln!(out, "    not a V4L2 device: {err}");
                continue;
            }
        };
        let _ = writeln!(out, "    {} (driver {}, {})", info.card, info.driver, info.bus);
        if info.metadata_only {
            let _ = writeln!(out, "    metadata node (not a camera image): skip it");
            continue;
        }
        if !info.captures_video {
            let _ = writeln!(out, "    does not capture video");
            continue;
        }
        match v4l2::enumerate(&device) {
            Ok(offers) => {
                for offer in offers {
                    let usable =
                        if source::negotiate::pixel_format(offer.fourcc).is_some() { "" } else { " (not used)" };
                    let _ = writeln!(out, "    {} {}{usable}", fourcc_str(offer.fourcc), offer.description);
                    for size in offer.sizes {
                        let _ = match size {
                            SizeOffer::Discrete { width, height, fps } => {
                                let rates: Vec<String> = fps
                                    .iter()
                                    .map(|f| format!("{f:.4}").trim_end_matches('0').trim_end_matches('.').to_string())
                                    .collect();
                                writeln!(out, "      {width}x{height} @ {} fps", rates.join(", "))
                            }
                            SizeOffer::Stepwise { min, max, step } => writeln!(
                                out,
                                "      {}x{} to {}x{} in steps of {}x{}",
                                min.0, min.1, max.0, max.1, step.0, step.1
                            ),
                        };
                    }
                }
            }
            Err(err) => {
                let _ = writeln!(out, "    cannot list formats: {err}");
            }
        }
    }
    out
}

/// What `probe --source` measured.
#[derive(Debug)]
pub struct SourceReport {
    pub description: String,
    pub frames: u32,
    pub skipped: u32,
    pub timeouts: u32,
    pub fps: f64,
    pub decode_ms_mean: f64,
    pub format: String,
    pub size: (u32, u32),
}

/// Opens `uri`, grabs `frames` frames, and converts each as the daemon
/// would (to a 224x224 model input) to time the decode.
pub fn measure(uri: &str, frames: u32) -> anyhow::Result<SourceReport> {
    let spec = SourceSpec::parse(uri).map_err(|msg| anyhow::anyhow!("source {uri:?}: {msg}"))?;
    // Source errors name the device or URL themselves.
    let mut source = source::open(&spec)?;
    let description = source.describe();
    let mut preprocessor = Preprocessor::new(224, 224, [0.0; 3], [1.0; 3], ResizeMode::CenterCrop);
    let mut tensor = preprocessor.new_tensor();
    let (mut got, mut skipped, mut timeouts) = (0u32, 0u32, 0u32);
    let mut decode = Duration::ZERO;
    let mut first_at: Option<Instant> = None;
    let mut last_at = Instant::now();
    let mut format = String::new();
    let mut size = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30) + Duration::from_millis(200) * frames;
    while got < frames && Instant::now() < deadline {
        if let Some(interval) = source.frame_interval() {
            std::thread::sleep(interval);
        }
        match source.next_frame() {
            Ok(Some(frame)) => match preprocessor.run_timed(&frame, &mut tensor) {
                Ok(times) => {
                    let now = Instant::now();
                    first_at.get_or_insert(now);
                    last_at = now;
                    got += 1;
                    // The first frame's decode includes warm-up; keep it out of the mean.
                    if got > 1 {
                        decode += times.decode;
                    }
                    format = frame.format.as_str().to_string();
                    size = (frame.width, frame.height);
                }
                Err(err) => {
                    skipped += 1;
                    tracing::warn!(error = %format!("{err:#}"), "frame did not decode");
                }
            },
            Ok(None) => break,
            Err(SourceError::Skipped { .. }) => skipped += 1,
            Err(SourceError::Timeout) => timeouts += 1,
            Err(err) => return Err(anyhow::Error::new(err).context(format!("reading {description}"))),
        }
    }
    if got == 0 {
        anyhow::bail!("{description}: no frame decoded ({skipped} skipped, {timeouts} timeouts)");
    }
    let span = first_at.map_or(0.0, |t| (last_at - t).as_secs_f64());
    Ok(SourceReport {
        description,
        frames: got,
        skipped,
        timeouts,
        fps: if got > 1 && span > 0.0 { (got - 1) as f64 / span } else { 0.0 },
        decode_ms_mean: if got > 1 { decode.as_secs_f64() * 1e3 / (got - 1) as f64 } else { 0.0 },
        format,
        size,
    })
}

impl std::fmt::Display for SourceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "source:   {}", self.description)?;
        let size = if self.size == (0, 0) { String::new() } else { format!(" {}x{}", self.size.0, self.size.1) };
        writeln!(
            f,
            "frames:   {} {}{size} ({} skipped, {} timeouts)",
            self.frames, self.format, self.skipped, self.timeouts
        )?;
        writeln!(f, "rate:     {:.1} fps", self.fps)?;
        writeln!(f, "decode:   {:.2} ms mean (to RGB, before resizing to the model input)", self.decode_ms_mean)
    }
}
