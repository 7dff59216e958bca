//! `test://pattern`: a generated, deterministic moving picture (colour bars
//! that scroll, and a white square that travels diagonally). It exercises the
//! whole pipeline with no files and no camera, and the same sequence number
//! always yields the same pixels, so tests can rely on it.

use std::time::{Duration, SystemTime};

use super::{Frame, FrameSource, PixelFormat, SourceError, interval_for_fps};

const BARS: [[u8; 3]; 8] =
    [[255, 255, 255], [255, 255, 0], [0, 255, 255], [0, 255, 0], [255, 0, 255], [255, 0, 0], [0, 0, 255], [0, 0, 0]];

pub struct TestPattern {
    width: u32,
    height: u32,
    interval: Option<Duration>,
    limit: Option<u64>,
    hang_after: Option<u64>,
    sequence: u64,
}

impl TestPattern {
    pub fn new(width: u32, height: u32, fps: f64, limit: Option<u64>) -> Self {
        Self { width, height, interval: interval_for_fps(fps), limit, hang_after: None, sequence: 0 }
    }

    /// Blocks forever in `next_frame` after `frames` frames, as a hung
    /// camera driver would.
    pub fn hanging_after(mut self, frames: Option<u64>) -> Self {
        self.hang_after = frames;
        self
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

impl FrameSource for TestPattern {
    fn describe(&self) -> String {
        format!("test://pattern ({}x{})", self.width, self.height)
    }

    fn frame_interval(&self) -> Option<Duration> {
        self.interval
    }

    fn is_live(&self) -> bool {
        true
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.limit.is_some_and(|limit| self.sequence >= limit) {
            return Ok(None);
        }
        if self.hang_after.is_some_and(|after| self.sequence >= after) {
            tracing::debug!(after = self.sequence, "test pattern: hanging as asked (hang_after)");
            loop {
                std::thread::park();
            }
        }
        let frame = Frame {
            format: PixelFormat::Rgb8,
            width: self.width,
            height: self.height,
            stride: self.width as usize * 3,
            data: Self::render(self.width, self.height, self.sequence),
            sequence: self.sequence,
            captured_at: SystemTime::now(),
            origin: None,
        };
        self.sequence += 1;
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
}
