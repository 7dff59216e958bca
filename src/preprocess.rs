//! Frame -> model input: decode or convert to RGB, fit to the model's input
//! size (centre-crop, letterbox or stretch; bilinear), normalise with the
//! model's mean/std, lay out as NCHW float32.
//!
//! A [`Preprocessor`] owns every intermediate buffer and reuses them frame
//! after frame, so steady-state preprocessing allocates nothing large.
//! Resizing uses `fast_image_resize` (SIMD on x86-64 and NEON on aarch64).

use anyhow::{Context, bail};
use fast_image_resize as fr;
use image::ImageDecoder;

use crate::config::ResizeMode;
use crate::engine::Tensor;
use crate::source::{Frame, PixelFormat};

/// The largest frame side accepted (a 16K camera is 15360 wide).
const MAX_SIDE: u32 = 16384;

/// Where preprocessing time went, for the per-stage figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    /// JPEG decode or pixel-format conversion to RGB.
    pub decode: std::time::Duration,
    /// Resize/crop to the model input and normalise to NCHW float.
    pub fit_normalise: std::time::Duration,
}

pub struct Preprocessor {
    width: u32,
    height: u32,
    mode: ResizeMode,
    /// Per channel: `x * scale + bias == (x/255 - mean) / std`.
    scale: [f32; 3],
    bias: [f32; 3],
    /// The mean colour as 8-bit RGB: letterbox padding that normalises to ~0.
    pad: [u8; 3],
    resizer: fr::Resizer,
    rgb: Vec<u8>,
    decoded: Vec<u8>,
    fitted: Vec<u8>,
    letterboxed: Vec<u8>,
}

impl Preprocessor {
    pub fn new(width: usize, height: usize, mean: [f32; 3], std: [f32; 3], mode: ResizeMode) -> Self {
        let scale = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
        let bias = std::array::from_fn(|c| -mean[c] / std[c]);
        let pad = std::array::from_fn(|c| (mean[c] * 255.0).round().clamp(0.0, 255.0) as u8);
        Self {
            width: width as u32,
            height: height as u32,
            mode,
            scale,
            bias,
            pad,
            resizer: fr::Resizer::new(),
            rgb: Vec::new(),
            decoded: Vec::new(),
            fitted: vec![0; width * height * 3],
            letterboxed: Vec::new(),
        }
    }

    /// A tensor of the right shape to pass to [`Preprocessor::run`].
    pub fn new_tensor(&self) -> Tensor {
        Tensor::zeros([1, 3, self.height as usize, self.width as usize])
    }

    /// Fills `out` from `frame`. A corrupt or inconsistent frame is an error
    /// naming where it came from; `out` is then unspecified.
    pub fn run(&mut self, frame: &Frame, out: &mut Tensor) -> anyhow::Result<()> {
        self.run_timed(frame, out).map(|_| ())
    }

    /// [`Preprocessor::run`], also saying how long decoding (or pixel
    /// conversion) and fitting + normalising took.
    pub fn run_timed(&mut self, frame: &Frame, out: &mut Tensor) -> anyhow::Result<StageTimes> {
        let began = std::time::Instant::now();
        let (w, h) = self
            .convert_to_rgb(frame)
            .with_context(|| format!("{} frame from {}", frame.format.as_str(), frame.origin()))?;
        let decoded = std::time::Instant::now();
        self.fit(w, h)?;
        self.normalise(out);
        Ok(StageTimes { decode: decoded - began, fit_normalise: decoded.elapsed() })
    }

    /// Leaves the frame as packed RGB in `self.rgb` and returns its size.
    fn convert_to_rgb(&mut self, frame: &Frame) -> anyhow::Result<(u32, u32)> {
        let (w, h) = (frame.width as usize, frame.height as usize);
        if frame.format != PixelFormat::Mjpeg && (w == 0 || h == 0) {
            bail!("frame size is {w}x{h}");
        }
        let row_bytes = match frame.format {
            PixelFormat::Rgb8 => w * 3,
            PixelFormat::Yuyv => w * 2,
            PixelFormat::Gray8 | PixelFormat::Nv12 | PixelFormat::Mjpeg => w,
        };
        if frame.format != PixelFormat::Mjpeg && frame.stride < row_bytes {
            bail!("stride {} is shorter than a row of {w} pixels ({row_bytes} bytes)", frame.stride);
        }
        let need = |bytes: usize| -> anyhow::Result<()> {
            if frame.data.len() < bytes {
                bail!("frame holds {} bytes; {w}x{h} with stride {} needs {bytes}", frame.data.len(), frame.stride);
            }
            Ok(())
        };
        match frame.format {
            PixelFormat::Mjpeg => return self.decode_jpeg(&frame.data),
            PixelFormat::Rgb8 => {
                need(frame.stride * (h - 1) + w * 3)?;
                self.rgb.clear();
                for row in frame.data.chunks(frame.stride).take(h) {
                    self.rgb.extend_from_slice(&row[..w * 3]);
                }
            }
            PixelFormat::Gray8 => {
                need(frame.stride * (h - 1) + w)?;
                self.rgb.clear();
                for row in frame.data.chunks(frame.stride).take(h) {
                    for &y in &row[..w] {
                        self.rgb.extend_from_slice(&[y, y, y]);
                    }
                }
            }
            PixelFormat::Yuyv => {
                if w % 2 != 0 {
                    bail!("YUYV frame width {w} is odd");
                }
                need(frame.stride * (h - 1) + w * 2)?;
                self.rgb.clear();
                for row in frame.data.chunks(frame.stride).take(h) {
                    for quad in row[..w * 2].chunks_exact(4) {
                        let (y0, u, y1, v) = (quad[0], quad[1], quad[2], quad[3]);
                        self.rgb.extend_from_slice(&yuv_to_rgb(y0, u, v));
                        self.rgb.extend_from_slice(&yuv_to_rgb(y1, u, v));
                    }
                }
            }
            PixelFormat::Nv12 => {
                if w % 2 != 0 || h % 2 != 0 {
                    bail!("NV12 frame size {w}x{h} is odd");
                }
                let luma = frame.stride * h;
                need(luma + frame.stride * (h / 2 - 1) + w)?;
                let (y_plane, uv_plane) = frame.data.split_at(luma);
                self.rgb.clear();
                for row in 0..h {
                    let y_row = &y_plane[row * frame.stride..][..w];
                    let uv_row = &uv_plane[(row / 2) * frame.stride..][..w];
                    for (x, &y) in y_row.iter().enumerate() {
                        let pair = x & !1;
                        self.rgb.extend_from_slice(&yuv_to_rgb(y, uv_row[pair], uv_row[pair + 1]));
                    }
                }
            }
        }
        Ok((frame.width, frame.height))
    }

    fn decode_jpeg(&mut self, data: &[u8]) -> anyhow::Result<(u32, u32)> {
        let decoder =
            image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(data)).context("corrupt JPEG header")?;
        let (w, h) = decoder.dimensions();
        // A corrupt header can claim any size; refuse before allocating for it.
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            bail!("JPEG claims {w}x{h} pixels; expected 1 to {MAX_SIDE} on each side");
        }
        let color = decoder.color_type();
        self.decoded.resize(decoder.total_bytes() as usize, 0);
        decoder.read_image(&mut self.decoded).context("corrupt JPEG data")?;
        self.rgb.clear();
        match color {
            image::ColorType::Rgb8 => self.rgb.extend_from_slice(&self.decoded),
            image::ColorType::L8 => self.decoded.iter().for_each(|&y| self.rgb.extend_from_slice(&[y, y, y])),
            other => bail!("JPEG colour type {other:?} is not supported"),
        }
        Ok((w, h))
    }

    /// Resizes `self.rgb` (w x h) into `self.fitted` (the model's size).
    fn fit(&mut self, w: u32, h: u32) -> anyhow::Result<()> {
        let (dw, dh) = (self.width, self.height);
        let src = fr::images::ImageRef::new(w, h, &self.rgb, fr::PixelType::U8x3).context("RGB buffer size")?;
        let bilinear = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
        match self.mode {
            ResizeMode::Stretch | ResizeMode::CenterCrop => {
                let options = if self.mode == ResizeMode::CenterCrop {
                    // The largest centred box with the destination's aspect ratio.
                    let (sw, sh) = (w as f64, h as f64);
                    let target = dw as f64 / dh as f64;
                    let (cw, ch) = if sw / sh > target { (sh * target, sh) } else { (sw, sw / target) };
                    bilinear.crop((sw - cw) / 2.0, (sh - ch) / 2.0, cw, ch)
                } else {
                    bilinear
                };
                let mut dst = fr::images::Image::from_slice_u8(dw, dh, &mut self.fitted, fr::PixelType::U8x3)?;
                self.resizer.resize(&src, &mut dst, &options)?;
            }
            ResizeMode::Letterbox => {
                let scale = (dw as f64 / w as f64).min(dh as f64 / h as f64);
                let rw = ((w as f64 * scale).round() as u32).clamp(1, dw);
                let rh = ((h as f64 * scale).round() as u32).clamp(1, dh);
                self.letterboxed.resize((rw * rh * 3) as usize, 0);
                let mut dst = fr::images::Image::from_slice_u8(rw, rh, &mut self.letterboxed, fr::PixelType::U8x3)?;
                self.resizer.resize(&src, &mut dst, &bilinear)?;
                for pixel in self.fitted.chunks_exact_mut(3) {
                    pixel.copy_from_slice(&self.pad);
                }
                let (left, top) = (((dw - rw) / 2) as usize, ((dh - rh) / 2) as usize);
                let row_bytes = rw as usize * 3;
                for (y, row) in self.letterboxed.chunks_exact(row_bytes).enumerate() {
                    let start = ((top + y) * dw as usize + left) * 3;
                    self.fitted[start..start + row_bytes].copy_from_slice(row);
                }
            }
        }
        Ok(())
    }

    fn normalise(&self, out: &mut Tensor) {
        let plane = (self.width * self.height) as usize;
        out.shape = [1, 3, self.height as usize, self.width as usize];
        out.data.resize(plane * 3, 0.0);
        let (r, rest) = out.data.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in self.fitted.chunks_exact(3).enumerate() {
            r[i] = px[0] as f32 * self.scale[0] + self.bias[0];
            g[i] = px[1] as f32 * self.scale[1] + self.bias[1];
            b[i] = px[2] as f32 * self.scale[2] + self.bias[2];
        }
    }
}

/// BT.601 limited-range YCbCr to RGB, the colour space UVC webcams send.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (y as i32 - 16).max(0) * 298;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [clamp(c + 409 * e), clamp(c - 100 * d - 208 * e), clamp(c + 516 * d)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn frame(format: PixelFormat, width: u32, height: u32, stride: usize, data: Vec<u8>) -> Frame {
        Frame { format, width, height, stride, data, sequence: 0, captured_at: SystemTime::now(), origin: None }
    }

    fn solid_rgb(w: u32, h: u32, rgb: [u8; 3]) -> Frame {
        frame(PixelFormat::Rgb8, w, h, w as usize * 3, rgb.repeat((w * h) as usize))
    }

    fn jpeg_bytes(side: u32) -> Vec<u8> {
        let mut jpeg = Vec::new();
        image::RgbImage::from_pixel(side, side, image::Rgb([1, 2, 3]))
            .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        jpeg
    }

    fn identity(size: usize, mode: ResizeMode) -> Preprocessor {
        // mean 0, std 1/255: the tensor holds raw 0..255 values.
        Preprocessor::new(size, size, [0.0; 3], [1.0 / 255.0; 3], mode)
    }

    #[test]
    fn a_solid_colour_normalises_to_its_expected_value_in_every_plane() {
        let mut p = Preprocessor::new(8, 8, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], ResizeMode::CenterCrop);
        let mut t = p.new_tensor();
        p.run(&solid_rgb(32, 20, [255, 0, 128]), &mut t).unwrap();
        let plane = 64;
        assert!(t.data[..plane].iter().all(|v| (v - 2.0).abs() < 1e-5));
        assert!(t.data[plane..2 * plane].iter().all(|v| (v + 2.0).abs() < 1e-5));
        assert!(t.data[2 * plane..].iter().all(|v| (v - (128.0 / 255.0 - 0.5) / 0.25).abs() < 1e-5));
    }

    #[test]
    fn centre_crop_drops_the_sides_of_a_wide_frame() {
        // 30x10: red 10 columns, green 10, blue 10. The centre square is green.
        let mut data = Vec::new();
        for _ in 0..10 {
            for x in 0..30 {
                data.extend_from_slice(match x / 10 {
                    0 => &[255, 0, 0],
                    1 => &[0, 255, 0],
                    _ => &[0, 0, 255],
                });
            }
        }
        let mut p = identity(4, ResizeMode::CenterCrop);
        let mut t = p.new_tensor();
        p.run(&frame(PixelFormat::Rgb8, 30, 10, 90, data), &mut t).unwrap();
        // Bilinear sampling at the crop's edge blends in a little of the
        // neighbouring columns; the crop itself is green.
        assert!(t.data[..16].iter().all(|v| *v < 64.0), "red plane {:?}", &t.data[..16]);
        assert!(t.data[16..32].iter().all(|v| *v > 190.0), "green plane {:?}", &t.data[16..32]);
        assert!(t.data[32..].iter().all(|v| *v < 64.0), "blue plane {:?}", &t.data[32..]);
        let red_mean: f32 = t.data[..16].iter().sum::<f32>() / 16.0;
        assert!(red_mean < 16.0, "mostly no red: {red_mean}");
    }

    #[test]
    fn letterbox_pads_with_the_mean_colour() {
        let mut p = Preprocessor::new(8, 8, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], ResizeMode::Letterbox);
        let mut t = p.new_tensor();
        p.run(&solid_rgb(16, 4, [255, 255, 255]), &mut t).unwrap();
        // Top row is padding (~0 after normalising), the middle row is white (1.0).
        assert!(t.data[0].abs() < 0.01, "{}", t.data[0]);
        assert!((t.data[4 * 8] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn yuyv_grey_and_nv12_decode_to_the_colours_they_encode() {
        let mut p = identity(2, ResizeMode::Stretch);
        let mut t = p.new_tensor();
        // Pure red in BT.601 limited range: Y=81, U=90, V=240.
        p.run(&frame(PixelFormat::Yuyv, 2, 2, 4, [81, 90, 81, 240].repeat(2)), &mut t).unwrap();
        assert!(t.data[..4].iter().all(|v| *v > 250.0) && t.data[4..].iter().all(|v| *v < 5.0), "{:?}", t.data);
        p.run(&frame(PixelFormat::Gray8, 2, 2, 2, vec![77; 4]), &mut t).unwrap();
        assert!(t.data.iter().all(|v| (*v - 77.0).abs() < 0.5));
        let mut nv12 = vec![81; 4];
        nv12.extend_from_slice(&[90, 240]);
        p.run(&frame(PixelFormat::Nv12, 2, 2, 2, nv12), &mut t).unwrap();
        assert!(t.data[..4].iter().all(|v| *v > 250.0));
    }

    #[test]
    fn a_truncated_jpeg_is_an_error_naming_its_origin() {
        let mut jpeg = jpeg_bytes(16);
        jpeg.truncate(jpeg.len() / 3);
        let mut f = frame(PixelFormat::Mjpeg, 0, 0, 0, jpeg);
        f.origin = Some("cam.jpg".into());
        let mut p = identity(4, ResizeMode::Stretch);
        let mut t = p.new_tensor();
        let err = p.run(&f, &mut t).unwrap_err();
        assert!(format!("{err:#}").contains("cam.jpg"), "{err:#}");
    }

    #[test]
    fn a_zero_stride_is_an_error_not_a_panic() {
        let mut p = identity(4, ResizeMode::Stretch);
        let mut t = p.new_tensor();
        let err = p.run(&frame(PixelFormat::Rgb8, 2, 2, 0, vec![0; 12]), &mut t).unwrap_err();
        assert!(format!("{err:#}").contains("stride 0"), "{err:#}");
    }

    #[test]
    fn a_jpeg_header_claiming_a_huge_size_is_refused_before_allocating() {
        let mut jpeg = jpeg_bytes(8);
        // Patch the SOF0 frame header's height and width to 65000 x 65000.
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
        let mut p = identity(4, ResizeMode::Stretch);
        let mut t = p.new_tensor();
        let err = p.run(&frame(PixelFormat::Mjpeg, 0, 0, 0, jpeg), &mut t).unwrap_err();
        assert!(format!("{err:#}").contains("65000x65000"), "{err:#}");
    }

    #[test]
    fn a_frame_shorter_than_its_size_says_so() {
        let mut p = identity(4, ResizeMode::Stretch);
        let mut t = p.new_tensor();
        let err = p.run(&frame(PixelFormat::Rgb8, 8, 8, 24, vec![0; 10]), &mut t).unwrap_err();
        assert!(format!("{err:#}").contains("needs"), "{err:#}");
    }
}
