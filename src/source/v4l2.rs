//! V4L2 cameras through the `v4l` crate: USB webcams (UVC), the Raspberry
//! Pi camera through its V4L2 driver, capture cards.
//!
//! Opening checks that the node really captures video (a UVC camera also
//! has a metadata node, `/dev/video1` beside `/dev/video0`, that does not),
//! enumerates what the camera offers, lets [`negotiate`] choose, and logs
//! what the driver actually set, which may differ. Frames come from
//! memory-mapped buffers with a read timeout; only `bytesused` bytes of a
//! buffer are copied out (an MJPEG frame is far shorter than its buffer).
//!
//! Errors are sorted for the capture supervisor: a device that is absent,
//! busy or unplugged (ENOENT, ENODEV, ENXIO, EBUSY, EIO) is
//! [`SourceError::Disconnected`] and gets reopened by the same path; a node
//! that is not a camera, no permission, or no usable format is
//! [`SourceError::Fatal`] with what to do about it.

use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use v4l::buffer::Type;
use v4l::capability::Flags;
use v4l::frameinterval::FrameIntervalEnum;
use v4l::framesize::FrameSizeEnum;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;

use super::negotiate::{self, Offer, SizeOffer};
use super::{Frame, FrameSource, PixelFormat, SourceError};

/// Buffers the driver fills in turn: enough to ride out a slow read, few
/// enough that the newest frame is never far behind.
const BUFFERS: u32 = 4;

pub struct V4l2Source {
    path: PathBuf,
    origin: Arc<str>,
    summary: String,
    format: PixelFormat,
    width: u32,
    height: u32,
    stride: usize,
    sequence: u64,
    stream: Option<v4l::io::mmap::Stream<'static>>,
    // Kept after the stream so it closes last.
    _device: v4l::Device,
}

/// What a device node is, for `labelcast probe` and error messages.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub card: String,
    pub driver: String,
    pub bus: String,
    pub captures_video: bool,
    pub streams: bool,
    pub metadata_only: bool,
}

impl V4l2Source {
    /// Opens, negotiates and starts streaming.
    pub fn open(path: &Path, request: &negotiate::Request, timeout: Duration) -> Result<Self, SourceError> {
        // The v4l crate unwraps in a few places (non-UTF-8 card names); a
        // strange device must be an error, not a dead capture thread.
        std::panic::catch_unwind(AssertUnwindSafe(|| Self::open_inner(path, request, timeout))).unwrap_or_else(|_| {
            Err(SourceError::Fatal(format!("{}: the v4l crate failed on this device (see the log)", path.display())))
        })
    }

    fn open_inner(path: &Path, request: &negotiate::Request, timeout: Duration) -> Result<Self, SourceError> {
        let device = v4l::Device::with_path(path).map_err(|err| classify(path, "opening", &err))?;
        let info = device_info(&device).map_err(|err| classify(path, "querying", &err))?;
        check_is_camera(path, &info)?;
        let offers = enumerate(&device).map_err(|err| classify(path, "listing the formats of", &err))?;
        let choice = negotiate::choose(&offers, request)
            .map_err(|reason| SourceError::Fatal(format!("{} ({}): {reason}", path.display(), info.card)))?;
        for compromise in &choice.compromises {
            tracing::warn!(device = %path.display(), "{compromise}");
        }
        let wanted = v4l::Format::new(choice.width, choice.height, v4l::FourCC::new(&choice.fourcc));
        let actual = device.set_format(&wanted).map_err(|err| classify(path, "setting the format of", &err))?;
        let format = negotiate::pixel_format(actual.fourcc.repr).ok_or_else(|| {
            SourceError::Fatal(format!(
                "{}: asked for {} and the driver set {}, which labelcast cannot convert",
                path.display(),
                negotiate::fourcc_str(choice.fourcc),
                negotiate::fourcc_str(actual.fourcc.repr)
            ))
        })?;
        let fps = match choice.fps {
            Some(fps) => {
                let interval = v4l::Fraction::new(1000, (fps * 1000.0).round().max(1.0) as u32);
                match device.set_params(&v4l::video::capture::Parameters::new(interval)) {
                    Ok(params) if params.interval.numerator > 0 => {
                        Some(params.interval.denominator as f64 / params.interval.numerator as f64)
                    }
                    Ok(_) => None,
                    Err(err) => {
                        tracing::warn!(device = %path.display(), error = %err, "cannot set the frame rate; the driver keeps its own");
                        None
                    }
                }
            }
            None => None,
        };
        let mut stream = v4l::io::mmap::Stream::with_buffers(&device, Type::VideoCapture, BUFFERS)
            .map_err(|err| classify(path, "mapping buffers of", &err))?;
        stream.set_timeout(timeout);
        let summary = format!(
            "{} ({}, {} {}x{}{})",
            path.display(),
            info.card,
            negotiate::fourcc_str(actual.fourcc.repr),
            actual.width,
            actual.height,
            fps.map(|f| format!(" @ {f:.1} fps")).unwrap_or_default()
        );
        tracing::info!(
            device = %path.display(),
            card = %info.card,
            driver = %info.driver,
            format = %negotiate::fourcc_str(actual.fourcc.repr),
            width = actual.width,
            height = actual.height,
            stride = actual.stride,
            fps = fps.unwrap_or(0.0),
            "camera opened"
        );
        Ok(Self {
            path: path.to_path_buf(),
            origin: Arc::from(path.display().to_string()),
            summary,
            format,
            width: actual.width,
            height: actual.height,
            stride: actual.stride as usize,
            sequence: 0,
            stream: Some(stream),
            _device: device,
        })
    }
}

impl Drop for V4l2Source {
    fn drop(&mut self) {
        // The v4l stream panics in drop when STREAMOFF fails with anything
        // but ENODEV (a USB error mid-unplug can give EIO). Closing a broken
        // camera must not take the capture thread with it.
        if let Some(stream) = self.stream.take()
            && std::panic::catch_unwind(AssertUnwindSafe(move || drop(stream))).is_err()
        {
            tracing::warn!(device = %self.path.display(), "stopping the stream failed; the device is closed anyway");
        }
    }
}

impl FrameSource for V4l2Source {
    fn describe(&self) -> String {
        format!("v4l2://{}", self.summary)
    }

    fn frame_interval(&self) -> Option<Duration> {
        None
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(SourceError::Disconnected(format!("{}: stream closed", self.path.display())));
        };
        let (buffer, meta) = match stream.next() {
            Ok(next) => next,
            Err(err) if err.kind() == io::ErrorKind::TimedOut => return Err(SourceError::Timeout),
            Err(err) => return Err(disconnected(&self.path, "reading", &err)),
        };
        let used = (meta.bytesused as usize).min(buffer.len());
        if meta.flags.contains(v4l::buffer::Flags::ERROR) || used == 0 {
            return Err(SourceError::Skipped {
                origin: self.origin.to_string(),
                reason: format!("the driver flagged buffer {} as damaged ({used} bytes)", meta.sequence),
            });
        }
        let frame = Frame {
            format: self.format,
            width: if self.format == PixelFormat::Mjpeg { 0 } else { self.width },
            height: if self.format == PixelFormat::Mjpeg { 0 } else { self.height },
            stride: if self.format == PixelFormat::Mjpeg { 0 } else { self.stride },
            data: buffer[..used].to_vec(),
            sequence: self.sequence,
            captured_at: SystemTime::now(),
            origin: Some(self.origin.clone()),
        };
        self.sequence += 1;
        Ok(Some(frame))
    }
}

/// Card, driver, bus and capabilities of an open node.
pub fn device_info(device: &v4l::Device) -> io::Result<DeviceInfo> {
    let caps = device.query_caps()?;
    let flags = caps.capabilities;
    Ok(DeviceInfo {
        card: caps.card,
        driver: caps.driver,
        bus: caps.bus,
        captures_video: flags.contains(Flags::VIDEO_CAPTURE),
        streams: flags.contains(Flags::STREAMING),
        metadata_only: flags.contains(Flags::META_CAPTURE) && !flags.contains(Flags::VIDEO_CAPTURE),
    })
}

fn check_is_camera(path: &Path, info: &DeviceInfo) -> Result<(), SourceError> {
    let shown = path.display();
    if info.metadata_only {
        return Err(SourceError::Fatal(format!(
            "{shown} ({}) is a UVC metadata node, not a video node: use the node before it, or the \
             /dev/v4l/by-id/...-video-index0 path (`labelcast probe` lists them)",
            info.card
        )));
    }
    if !info.captures_video {
        return Err(SourceError::Fatal(format!(
            "{shown} ({}, driver {}) does not capture video (single-planar VIDEO_CAPTURE); `labelcast probe` lists the nodes that do",
            info.card, info.driver
        )));
    }
    if !info.streams {
        return Err(SourceError::Fatal(format!("{shown} ({}) does not support streaming I/O", info.card)));
    }
    Ok(())
}

/// What the device offers, mirrored for [`negotiate::choose`].
pub fn enumerate(device: &v4l::Device) -> io::Result<Vec<Offer>> {
    let mut offers = Vec::new();
    for description in device.enum_formats()? {
        let fourcc = description.fourcc;
        let mut sizes = Vec::new();
        // A driver that lists no sizes for a format still offers it.
        for size in device.enum_framesizes(fourcc).unwrap_or_default() {
            match size.size {
                FrameSizeEnum::Discrete(d) => {
                    let fps = device
                        .enum_frameintervals(fourcc, d.width, d.height)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|interval| match interval.interval {
                            FrameIntervalEnum::Discrete(f) if f.numerator > 0 => {
                                Some(f.denominator as f64 / f.numerator as f64)
                            }
                            _ => None,
                        })
                        .collect();
                    sizes.push(SizeOffer::Discrete { width: d.width, height: d.height, fps });
                }
                FrameSizeEnum::Stepwise(s) => sizes.push(SizeOffer::Stepwise {
                    min: (s.min_width, s.min_height),
                    max: (s.max_width, s.max_height),
                    step: (s.step_width, s.step_height),
                }),
            }
        }
        offers.push(Offer { fourcc: fourcc.repr, description: description.description, sizes });
    }
    Ok(offers)
}

/// Sorts an I/O error from opening or configuring a device.
fn classify(path: &Path, doing: &str, err: &io::Error) -> SourceError {
    let shown = path.display();
    match err.raw_os_error() {
        Some(libc_errno::EACCES) | Some(libc_errno::EPERM) => SourceError::Fatal(format!(
            "{doing} {shown}: permission denied; run labelcast as a user in the `video` group \
             (the systemd unit does)"
        )),
        Some(libc_errno::ENOTTY) | Some(libc_errno::EINVAL) => SourceError::Fatal(format!(
            "{doing} {shown}: {err}; this is not a V4L2 capture device (`labelcast probe` lists the ones there are)"
        )),
        _ => disconnected(path, doing, err),
    }
}

fn disconnected(path: &Path, doing: &str, err: &io::Error) -> SourceError {
    let hint = match err.raw_os_error() {
        Some(libc_errno::ENOENT) | Some(libc_errno::ENXIO) => " (not plugged in?)",
        Some(libc_errno::ENODEV) => " (unplugged)",
        Some(libc_errno::EBUSY) => " (in use by another program)",
        Some(libc_errno::EIO) => " (USB or driver error)",
        _ => "",
    };
    SourceError::Disconnected(format!("{doing} {}: {err}{hint}", path.display()))
}

/// The errno values the sorting above needs (Linux, every architecture
/// labelcast targets), without a libc dependency for five constants.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const ENXIO: i32 = 6;
    pub const EACCES: i32 = 13;
    pub const EBUSY: i32 = 16;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const ENOTTY: i32 = 25;
}

/// Video device nodes on this machine, `/dev/video*` in number order, each
/// with the `/dev/v4l/by-id` links that point at it (stable across replugs).
pub fn list_nodes() -> Vec<(PathBuf, Vec<PathBuf>)> {
    let mut nodes: Vec<PathBuf> = std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("video")))
                .collect()
        })
        .unwrap_or_default();
    let number = |p: &PathBuf| -> u32 {
        p.file_name().and_then(|n| n.to_str()).and_then(|n| n.trim_start_matches("video").parse().ok()).unwrap_or(0)
    };
    nodes.sort_by_key(number);
    let links: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/dev/v4l/by-id")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::canonicalize(e.path()).ok().map(|target| (e.path(), target)))
                .collect()
        })
        .unwrap_or_default();
    nodes
        .into_iter()
        .map(|node| {
            let mut by_id: Vec<PathBuf> =
                links.iter().filter(|(_, target)| *target == node).map(|(link, _)| link.clone()).collect();
            by_id.sort();
            (node, by_id)
        })
        .collect()
}
