//! `test://pattern`: a generated, deterministic moving picture (colour bars
//! that scroll, and a white square that travels diagonally). It exercises the
//! whole pipeline with no files and no camera, and the same sequence number
//! always yields the same pixels, so tests can rely on it.
//!
//! It can also stand in for a camera and its faults, which CI has no other
//! way to produce: it delivers frames in any pixel format a camera sends
//! (`format=yuyv|nv12|grey|mjpg|rgb`, encoded here with the textbook BT.601
//! formulas, independent of the decoders under test), and on request it
//! unplugs itself after N frames and stays away for a while, stops
//! delivering (read timeouts), sends corrupt frames, or hangs.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{Frame, FrameSource, PixelFormat, SourceError, interval_for_fps};

const BARS: [[u8; 3]; 8] =
    [[255, 255, 255], [255, 255, 0], [0, 255, 255], [0, 255, 0], [255, 0, 255], [255, 0, 0], [0, 0, 255], [0, 0, 0]];

/// Faults the pattern injects, as a scripted camera would.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatternFaults {
    /// After this many frames the source blocks like a hung camera driver
    /// (to test the watchdog and `/healthz`).
    pub hang_after: Option<u64>,
    /// After this many frames from one opening, the "device" is unplugged:
    /// `next_frame` reports a disconnect, and opening fails until `offline`
    /// has passed.
    pub disconnect_after: Option<u64>,
    pub offline: Duration,
    /// After this many frames from one opening, reads time out (the camera
    /// stopped sending) until the source is reopened.
    pub stall_after: Option<u64>,
    /// Every Nth frame is a corrupt JPEG.
    pub corrupt_every: Option<u64>,
}

/// When the scripted "device" comes back after an unplug. Process-wide,
/// because the supervisor drops the source and opens a new one, as it does
/// with a real device node.
static UNPLUGGED_UNTIL: Mutex<Option<Instant>> = Mutex::new(None);

/// How long one read waits before reporting a timeout in a stall, like a
/// camera read with a timeout.
const STALL_READ: Duration = Duration::from_millis(200);

pub struct TestPattern {
    width: u32,
    height: u32,
    format: PixelFormat,
    interval: Option<Duration>,
    limit: Option<u64>,
    faults: PatternFaults,
    sequence: u64,
    /// Frames since this source was opened.
    delivered: u64,
}

impl TestPattern {
    pub fn new(width: u32, height: u32, fps: f64, limit: Option<u64>) -> Self {
        Self {
            width,
            height,
            format: PixelFormat::Rgb8,
            interval: interval_for_fps(fps),
            limit,
            faults: PatternFaults::default(),
            sequence: 0,
            delivered: 0,
        }
    }

    /// Blocks forever in `next_frame` after `frames` frames, as a hung
    /// camera driver would.
    pub fn hanging_after(mut self, frames: Option<u64>) -> Self {
        self.faults.hang_after = frames;
        self
    }

    /// Opens the pattern as a scripted device: fails while the device is
    /// "unplugged".
    pub fn open(
        width: u32,
        height: u32,
        fps: f64,
        limit: Option<u64>,
        format: PixelFormat,
        faults: PatternFaults,
    ) -> Result<Self, SourceError> {
        let unplugged = *UNPLUGGED_UNTIL.lock().unwrap_or_else(|p| p.into_inner());
        if unplugged.is_some_and(|until| Instant::now() < until) {
            return Err(SourceError::Disconnected("test://pattern: the scripted device is unplugged".into()));
        }
        if format == PixelFormat::Yuyv && !width.is_multiple_of(2)
            || format == PixelFormat::Nv12 && !(width | height).is_multiple_of(2)
        {
            return Err(SourceError::Fatal(format!("{} needs an even size, got {width}x{height}", format.as_str())));
        }
        let mut pattern = Self::new(width, height, fps, limit);
        pattern.format = format;
        pattern.faults = faults;
        Ok(pattern)
    }

    /// The picture for one sequence number.
    pub fn render(width: u32, height: u32, sequence: u64) -> Vec<u8> {
        let (w, h) = (width as usize, height as usize);
        let mut data = vec![0u8; w * h * 3];
        let shift = (sequence as usize * 4) % w;
        let bar_width = w.div_ceil(BARS.len());
        let side = (w.min(h) / 6).max(2);
        let square_x = (sequence as usize * 3) % (w - side);
        let square_y = (sequence as usize * 2) % (h - side);
        for (y, row) in data.chunks_exact_mut(w * 3).enumerate() {
            for (x, pixel) in row.chunks_exact_mut(3).enumerate() {
                let in_square = (square_x..square_x + side).contains(&x) && (square_y..square_y + side).contains(&y);
                let colour = if in_square { [255, 255, 255] } else { BARS[((x + shift) % w) / bar_width] };
                pixel.copy_from_slice(&colour);
            }
        }
        data
    }
}

/// Encodes packed RGB as a camera would send it: returns the bytes and the
/// stride. YUYV and NV12 are BT.601 limited range (chroma averaged over each
/// 2x1 or 2x2 block), GREY is full-range luma, MJPEG is a baseline JPEG.
pub fn encode(rgb: &[u8], width: u32, height: u32, format: PixelFormat) -> (Vec<u8>, usize) {
    let (w, h) = (width as usize, height as usize);
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32]
    };
    let luma = |[r, g, b]: [f32; 3]| 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0;
    let chroma = |[r, g, b]: [f32; 3]| {
        (128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0, 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0)
    };
    let mean = |pixels: &[[f32; 3]]| {
        let n = pixels.len() as f32;
        std::array::from_fn(|c| pixels.iter().map(|p| p[c]).sum::<f32>() / n)
    };
    let byte = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    match format {
        PixelFormat::Rgb8 => (rgb.to_vec(), w * 3),
        PixelFormat::Gray8 => {
            let grey = (0..w * h).map(|i| byte(luma_full(px(i % w, i / w)))).collect();
            (grey, w)
        }
        PixelFormat::Yuyv => {
            let mut out = Vec::with_capacity(w * h * 2);
            for y in 0..h {
                for x in (0..w).step_by(2) {
                    let (a, b) = (px(x, y), px(x + 1, y));
                    let (u, v) = chroma(mean(&[a, b]));
                    out.extend_from_slice(&[byte(luma(a)), byte(u), byte(luma(b)), byte(v)]);
                }
            }
            (out, w * 2)
        }
        PixelFormat::Nv12 => {
            let mut out: Vec<u8> = (0..w * h).map(|i| byte(luma(px(i % w, i / w)))).collect();
            for y in (0..h).step_by(2) {
                for x in (0..w).step_by(2) {
                    let (u, v) = chroma(mean(&[px(x, y), px(x + 1, y), px(x, y + 1), px(x + 1, y + 1)]));
                    out.extend_from_slice(&[byte(u), byte(v)]);
                }
            }
            (out, w)
        }
        PixelFormat::Mjpeg => {
            let mut jpeg = Vec::new();
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90);
            // Encoding an in-memory buffer of the right size cannot fail.
            let _ = image::ImageEncoder::write_image(encoder, rgb, width, height, image::ExtendedColorType::Rgb8);
            (jpeg, 0)
        }
    }
}

/// Full-range BT.601 luma, what a monochrome sensor reports.
fn luma_full([r, g, b]: [f32; 3]) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

impl FrameSource for TestPattern {
    fn describe(&self) -> String {
        format!("test://pattern ({}x{} {})", self.width, self.height, self.format.as_str())
    }

    fn frame_interval(&self) -> Option<Duration> {
        self.interval
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.limit.is_some_and(|limit| self.sequence >= limit) {
            return Ok(None);
        }
        let faults = &self.faults;
        if faults.hang_after.is_some_and(|after| self.sequence >= after) {
            tracing::debug!(after = self.sequence, "test pattern: hanging as asked (hang_after)");
            loop {
                std::thread::park();
            }
        }
        if faults.disconnect_after.is_some_and(|after| self.delivered >= after) {
            *UNPLUGGED_UNTIL.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + faults.offline);
            return Err(SourceError::Disconnected("test://pattern: the scripted device was unplugged".into()));
        }
        if faults.stall_after.is_some_and(|after| self.delivered >= after) {
            std::thread::sleep(STALL_READ);
            return Err(SourceError::Timeout);
        }
        let corrupt = faults.corrupt_every.is_some_and(|every| every > 0 && (self.sequence + 1).is_multiple_of(every));
        let rgb = Self::render(self.width, self.height, self.sequence);
        let (format, data, stride) = if corrupt {
            // A JPEG start, then noise: what a USB glitch leaves in a buffer.
            let mut data = vec![0xFF, 0xD8, 0xFF, 0xDB];
            data.extend((0..512u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
            (PixelFormat::Mjpeg, data, 0)
        } else {
            let (data, stride) = encode(&rgb, self.width, self.height, self.format);
            (self.format, data, stride)
        };
        let frame = Frame {
            format,
            width: if format == PixelFormat::Mjpeg { 0 } else { self.width },
            height: if format == PixelFormat::Mjpeg { 0 } else { self.height },
            stride,
            data,
            sequence: self.sequence,
            captured_at: SystemTime::now(),
            origin: None,
        };
        self.sequence += 1;
        self.delivered += 1;
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_sequence_number_gives_the_same_picture_and_the_next_one_moves() {
        assert_eq!(TestPattern::render(64, 48, 5), TestPattern::render(64, 48, 5));
        assert_ne!(TestPattern::render(64, 48, 5), TestPattern::render(64, 48, 6));
    }

    #[test]
    fn a_frame_limit_ends_the_stream() {
        let mut source = TestPattern::new(32, 32, 0.0, Some(2));
        assert!(source.next_frame().unwrap().is_some());
        assert!(source.next_frame().unwrap().is_some());
        assert!(source.next_frame().unwrap().is_none());
    }

    #[test]
    fn a_stalling_pattern_times_out_after_its_frames() {
        let faults = PatternFaults { stall_after: Some(1), ..Default::default() };
        let mut source = TestPattern::open(32, 32, 0.0, None, PixelFormat::Yuyv, faults).unwrap();
        let frame = source.next_frame().unwrap().unwrap();
        assert_eq!((frame.format, frame.stride, frame.data.len()), (PixelFormat::Yuyv, 64, 32 * 32 * 2));
        assert!(matches!(source.next_frame(), Err(SourceError::Timeout)));
    }

    #[test]
    fn every_nth_frame_is_corrupt_when_asked() {
        let faults = PatternFaults { corrupt_every: Some(2), ..Default::default() };
        let mut source = TestPattern::open(32, 32, 0.0, None, PixelFormat::Rgb8, faults).unwrap();
        let first = source.next_frame().unwrap().unwrap();
        let second = source.next_frame().unwrap().unwrap();
        assert_eq!(first.format, PixelFormat::Rgb8);
        assert_eq!(second.format, PixelFormat::Mjpeg);
        assert!(image::load_from_memory(&second.data).is_err(), "the corrupt frame does not decode");
    }

    #[test]
    fn encoded_formats_have_the_sizes_v4l2_gives_them() {
        let rgb = TestPattern::render(16, 8, 0);
        assert_eq!(encode(&rgb, 16, 8, PixelFormat::Yuyv).0.len(), 16 * 8 * 2);
        assert_eq!(encode(&rgb, 16, 8, PixelFormat::Nv12).0.len(), 16 * 8 * 3 / 2);
        let (grey, stride) = encode(&rgb, 16, 8, PixelFormat::Gray8);
        assert_eq!((grey.len(), stride), (16 * 8, 16));
        // The first bar is white: full-range luma 255.
        assert_eq!(grey[0], 255);
    }
}
