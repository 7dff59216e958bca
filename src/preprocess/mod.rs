//! Frame -> model input: decode or convert to RGB, cut out a region when
//! asked, fit to the model's input size (tiles, centre-crop, letterbox or
//! stretch; bilinear), normalise with the model's mean/std, lay out as NCHW
//! float32; and the small grey copy the motion gate compares.
//!
//! A [`Preprocessor`] owns every intermediate buffer and reuses them frame
//! after frame, so steady-state preprocessing allocates nothing large.
//! Resizing uses `fast_image_resize` (SIMD on x86-64 and NEON on aarch64).

use anyhow::{Context, bail};
use fast_image_resize as fr;

use crate::config::ResizeMode;
use crate::engine::Tensor;
use crate::source::camera::PixelRect;
use crate::source::{Frame, PixelFormat};

pub mod jpeg;

/// The largest frame side accepted (a 16K camera is 15360 wide).
const MAX_SIDE: u32 = 16384;

/// The most pixels a frame may have unless `source.max_frame_megapixels`
/// says otherwise: 50 megapixels (a 48 MP phone photo, 8000x6000, fits)
/// cost 150 MB as RGB, which a 1 GB board can still hold once. A picture
/// above it is refused from its header, before anything is allocated.
pub const DEFAULT_MAX_FRAME_PIXELS: u64 = 50_000_000;

/// The most windows [`Preprocessor::windows`] covers a rectangle with (a
/// 8:1 strip on a square model); a longer one is classified as one.
pub const MAX_TILES: usize = 8;

/// The side of the grid [`Preprocessor::thumbnail`] makes.
pub const THUMB_SIDE: usize = 32;
/// Cells in that grid.
pub const THUMB_CELLS: usize = THUMB_SIDE * THUMB_SIDE;

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
    /// An MJPEG frame with the marker for standard Huffman tables added.
    patched: Vec<u8>,
    /// libjpeg-turbo, for decoding large MJPEG frames at reduced scale;
    /// `None` when it could not start (zune-jpeg decodes then).
    #[cfg(feature = "turbojpeg")]
    turbo: Option<turbojpeg::Decompressor>,
    fitted: Vec<u8>,
    letterboxed: Vec<u8>,
    /// A frame turned the way its EXIF orientation says.
    oriented: Vec<u8>,
    max_pixels: u64,
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
            patched: Vec::new(),
            #[cfg(feature = "turbojpeg")]
            turbo: turbojpeg::Decompressor::new()
                .map_err(
                    |err| tracing::warn!(error = %err, "libjpeg-turbo does not start; decoding MJPEG at full size"),
                )
                .ok(),
            fitted: vec![0; width * height * 3],
            letterboxed: Vec::new(),
            oriented: Vec::new(),
            max_pixels: DEFAULT_MAX_FRAME_PIXELS,
        }
    }

    /// Refuses frames of more than `max_pixels` pixels (from the JPEG header,
    /// before decoding).
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// Decodes every frame at full size (no reduced-scale MJPEG decode):
    /// for a camera with regions, whose pixel rectangles count in the
    /// frame's own pixels and are cut out before fitting.
    pub fn at_full_size(#[allow(unused_mut)] mut self) -> Self {
        #[cfg(feature = "turbojpeg")]
        {
            self.turbo = None;
        }
        self
    }

    /// Decodes MJPEG at full size with zune-jpeg even in a `turbojpeg`
    /// build: the baseline the reduced-scale decode is benchmarked against.
    #[cfg(feature = "turbojpeg")]
    pub fn without_reduced_scale_jpeg(mut self) -> Self {
        self.turbo = None;
        self
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
        self.fit(w, h, None)?;
        self.normalise(out);
        Ok(StageTimes { decode: decoded - began, fit_normalise: decoded.elapsed() })
    }

    /// Decodes (or converts) `frame` to RGB, kept for [`Preprocessor::fit_window`];
    /// returns its size. Errors name the frame's origin.
    pub fn decode(&mut self, frame: &Frame) -> anyhow::Result<(u32, u32)> {
        self.convert_to_rgb(frame).with_context(|| format!("{} frame from {}", frame.format.as_str(), frame.origin()))
    }

    /// The windows a rectangle of a `w` x `h` frame (the whole frame when
    /// `rect` is `None`) is classified through: the rectangle itself, or
    /// with [`ResizeMode::Tiles`] the fewest windows of the model input's
    /// aspect ratio that cover it, spread evenly along its long side so
    /// neighbours overlap equally (a 1920x1080 frame on a square input: two
    /// 1080x1080 windows at x = 0 and x = 840).
    pub fn windows(&self, w: u32, h: u32, rect: Option<PixelRect>) -> Vec<PixelRect> {
        let rect = rect.unwrap_or(PixelRect { x: 0.0, y: 0.0, width: w as f64, height: h as f64 });
        if self.mode != ResizeMode::Tiles {
            return vec![rect];
        }
        let target = self.width as f64 / self.height as f64;
        let aspect = rect.width / rect.height;
        // Within 2 % of the input's aspect ratio: one window (centre-cropped
        // by at most 1 % a side).
        if (aspect / target - 1.0).abs() <= 0.02 {
            return vec![rect];
        }
        let (long, tile, wide) = if aspect > target {
            (rect.width, rect.height * target, true)
        } else {
            (rect.height, rect.width / target, false)
        };
        let count = ((long / tile) - 0.02).ceil().max(1.0) as usize;
        // A panorama or a 16384x1 strip would take hundreds of windows (an
        // inference and a tensor each): beyond MAX_TILES the rectangle is
        // classified as one centre-cropped window.
        if count > MAX_TILES {
            return vec![rect];
        }
        let step = if count > 1 { (long - tile) / (count - 1) as f64 } else { 0.0 };
        (0..count)
            .map(|i| {
                // The last window ends exactly at the far edge.
                let offset = if i + 1 == count { long - tile } else { step * i as f64 };
                if wide {
                    PixelRect { x: rect.x + offset, y: rect.y, width: tile, height: rect.height }
                } else {
                    PixelRect { x: rect.x, y: rect.y + offset, width: rect.width, height: tile }
                }
            })
            .collect()
    }

    /// A small grey picture of a rectangle of the last decoded `w` x `h`
    /// frame, for telling whether it changed: the mean luma of each cell of
    /// a [`THUMB_SIDE`] x [`THUMB_SIDE`] grid, from at most 8 x 8 samples per
    /// cell (so a 1920x1080 frame costs about 65,000 reads, not 2 million).
    pub fn thumbnail(&self, w: u32, h: u32, rect: PixelRect, out: &mut [u8; THUMB_CELLS]) {
        let (w, h) = (w as usize, h as usize);
        let cell_w = rect.width / THUMB_SIDE as f64;
        let cell_h = rect.height / THUMB_SIDE as f64;
        for cy in 0..THUMB_SIDE {
            for cx in 0..THUMB_SIDE {
                let x0 = rect.x + cx as f64 * cell_w;
                let y0 = rect.y + cy as f64 * cell_h;
                let (mut sum, mut count) = (0u32, 0u32);
                for sy in 0..8 {
                    let y = ((y0 + (sy as f64 + 0.5) * cell_h / 8.0) as usize).min(h - 1);
                    for sx in 0..8 {
                        let x = ((x0 + (sx as f64 + 0.5) * cell_w / 8.0) as usize).min(w - 1);
                        let px = &self.rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
                        // BT.601 luma, integer weights summing to 256.
                        sum += (77 * u32::from(px[0]) + 150 * u32::from(px[1]) + 29 * u32::from(px[2])) >> 8;
                        count += 1;
                    }
                }
                out[cy * THUMB_SIDE + cx] = (sum / count.max(1)) as u8;
            }
        }
    }

    /// Fills `out` from a rectangle of the last decoded `w` x `h` frame (the
    /// whole frame when `window` is `None`), fitted by the resize mode as a
    /// whole frame would be: a region is classified as if it were the picture.
    pub fn fit_window(&mut self, w: u32, h: u32, window: Option<PixelRect>, out: &mut Tensor) -> anyhow::Result<()> {
        self.fit(w, h, window)?;
        self.normalise(out);
        Ok(())
    }

    /// Only the decode or pixel-format conversion to RGB (what differs
    /// between camera formats), for benchmarks; returns the frame's size.
    pub fn convert(&mut self, frame: &Frame) -> anyhow::Result<(u32, u32)> {
        self.convert_to_rgb(frame)
    }

    /// The packed RGB picture the last [`Preprocessor::convert`] (or run) made.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// Leaves the frame as packed RGB in `self.rgb` and returns its size.
    fn convert_to_rgb(&mut self, frame: &Frame) -> anyhow::Result<(u32, u32)> {
        if frame.format == PixelFormat::Mjpeg {
            return self.decode_jpeg(&frame.data);
        }
        let (w, h) = (frame.width, frame.height);
        check_layout(frame)?;
        let (wu, hu) = (w as usize, h as usize);
        let stride = frame.stride as u32;
        self.rgb.resize(wu * hu * 3, 0);
        let rgb_stride = w * 3;
        let converted = match frame.format {
            PixelFormat::Mjpeg => unreachable!("handled above"),
            PixelFormat::Rgb8 => {
                for (dst, src) in self.rgb.chunks_exact_mut(wu * 3).zip(frame.data.chunks(frame.stride)) {
                    dst.copy_from_slice(&src[..wu * 3]);
                }
                Ok(())
            }
            PixelFormat::Gray8 => {
                // Full range: a grey camera's 0..255 is the picture's 0..255.
                let image = yuv::YuvGrayImage { y_plane: &frame.data, y_stride: stride, width: w, height: h };
                yuv::yuv400_to_rgb(&image, &mut self.rgb, rgb_stride, yuv::YuvRange::Full, CAMERA_MATRIX)
            }
            PixelFormat::Yuyv => {
                let image = yuv::YuvPackedImage { yuy: &frame.data, yuy_stride: stride, width: w, height: h };
                yuv::yuyv422_to_rgb(&image, &mut self.rgb, rgb_stride, CAMERA_RANGE, CAMERA_MATRIX)
            }
            PixelFormat::Nv12 => {
                let (y_plane, uv_plane) = frame.data.split_at(frame.stride * hu);
                let image = yuv::YuvBiPlanarImage {
                    y_plane,
                    y_stride: stride,
                    uv_plane,
                    uv_stride: stride,
                    width: w,
                    height: h,
                };
                yuv::yuv_nv12_to_rgb(
                    &image,
                    &mut self.rgb,
                    rgb_stride,
                    CAMERA_RANGE,
                    CAMERA_MATRIX,
                    yuv::YuvConversionMode::Balanced,
                )
            }
        };
        converted.map_err(|err| anyhow::anyhow!("converting {w}x{h} to RGB: {err}"))?;
        Ok((w, h))
    }

    /// Decodes a JPEG (a file or an MJPEG frame) into `self.rgb`, turned the
    /// way its EXIF orientation says; a JPEG cut short, corrupt in its scan
    /// data or larger than the pixel limit is an error.
    fn decode_jpeg(&mut self, data: &[u8]) -> anyhow::Result<(u32, u32)> {
        // Taken out of `self` while its bytes are decoded, and put back after.
        let mut patched = std::mem::take(&mut self.patched);
        let data: &[u8] = if lacks_huffman_tables(data) {
            // UVC cameras leave the Huffman tables out and mean the JPEG
            // standard's (Annex K). An APP0 "AVI1" segment says exactly that
            // (the AVI MJPEG convention), and the decoder then uses them.
            patched.clear();
            patched.extend_from_slice(&data[..2]);
            patched.extend_from_slice(&AVI1_APP0);
            patched.extend_from_slice(&data[2..]);
            &patched
        } else {
            data
        };
        let decoded = self.decode_oriented_jpeg(data);
        self.patched = patched;
        decoded
    }

    fn decode_oriented_jpeg(&mut self, data: &[u8]) -> anyhow::Result<(u32, u32)> {
        // Whole, up to its EOI; what follows (camera padding) is dropped.
        let layout = jpeg::scan(data).map_err(anyhow::Error::msg)?;
        let (w, h) = self.decode_whole_jpeg(&data[..layout.end])?;
        match layout.orientation {
            Some(value @ 2..=8) => {
                let (w, h) = jpeg::orient(&self.rgb, w as usize, h as usize, value, &mut self.oriented);
                std::mem::swap(&mut self.rgb, &mut self.oriented);
                Ok((w as u32, h as u32))
            }
            _ => Ok((w, h)),
        }
    }

    fn decode_whole_jpeg(&mut self, data: &[u8]) -> anyhow::Result<(u32, u32)> {
        #[cfg(feature = "turbojpeg")]
        if let Some(turbo) = self.turbo.as_mut()
            && let Ok(header) = turbo.read_header(data)
            && (1..=MAX_SIDE as usize).contains(&header.width)
            && (1..=MAX_SIDE as usize).contains(&header.height)
        {
            // Too many pixels is final; a header libjpeg-turbo cannot read,
            // a size out of range or data it cannot decode is left to
            // zune-jpeg below, which says what is wrong.
            check_pixels(header.width, header.height, self.max_pixels)?;
            let (width, height) = (self.width as usize, self.height as usize);
            match decode_jpeg_scaled(turbo, data, (header.width, header.height), width, height, &mut self.rgb) {
                Ok(size) => return Ok(size),
                // TurboJPEG has no CMYK/YCCK to RGB conversion: zune-jpeg
                // does, and says what is wrong with a really corrupt file.
                Err(err) => {
                    tracing::debug!(error = %format!("{err:#}"), "libjpeg-turbo could not decode; trying zune-jpeg")
                }
            }
        }
        // A corrupt header can claim any size: the limits refuse it before
        // anything is allocated for it. Strict: scan data that runs short or
        // holds a stray marker is an error, not a grey patch.
        let options = zune_core::options::DecoderOptions::default()
            .set_max_width(MAX_SIDE as usize)
            .set_max_height(MAX_SIDE as usize)
            .set_strict_mode(true)
            .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
        let mut decoder = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(data), options);
        decoder.decode_headers().map_err(|err| anyhow::anyhow!("corrupt JPEG header: {err}"))?;
        let (w, h) = decoder.dimensions().context("JPEG without a frame header")?;
        if w == 0 || h == 0 {
            bail!("JPEG claims {w}x{h} pixels");
        }
        check_pixels(w, h, self.max_pixels)?;
        let size = decoder.output_buffer_size().context("JPEG output size overflows")?;
        self.rgb.resize(size, 0);
        decoder.decode_into(&mut self.rgb).map_err(|err| anyhow::anyhow!("corrupt JPEG data: {err}"))?;
        if size != w * h * 3 {
            bail!("JPEG decoded to {size} bytes, expected {w}x{h} RGB");
        }
        Ok((w as u32, h as u32))
    }

    /// Resizes `self.rgb` (w x h), or the `window` of it, into
    /// `self.fitted` (the model's size).
    fn fit(&mut self, w: u32, h: u32, window: Option<PixelRect>) -> anyhow::Result<()> {
        let (dw, dh) = (self.width, self.height);
        // Typed (U8x3) calls, not the pixel-type-dispatching `resize`: that
        // one compiles every pixel type's SIMD kernels into the binary.
        let src =
            fr::images::TypedImageRef::<fr::pixels::U8x3>::from_buffer(w, h, &self.rgb).context("RGB buffer size")?;
        let window = window.unwrap_or(PixelRect { x: 0.0, y: 0.0, width: w as f64, height: h as f64 });
        let bilinear = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
        // fast_image_resize refuses a crop box that ends past the picture even
        // by a rounding error (0.1 + 0.9 of 1944 rows is 1944.0000000000002):
        // every box is kept inside it.
        let (fw, fh) = (w as f64, h as f64);
        let crop = |x: f64, y: f64, cw: f64, ch: f64| {
            let (x, y) = (x.clamp(0.0, fw - 1.0), y.clamp(0.0, fh - 1.0));
            bilinear.crop(x, y, cw.clamp(1.0, fw - x), ch.clamp(1.0, fh - y))
        };
        match self.mode {
            ResizeMode::Stretch | ResizeMode::CenterCrop | ResizeMode::Tiles => {
                // A tile already has the input's aspect ratio (up to 2 %):
                // centre-cropping it only trims rounding.
                let options = if self.mode != ResizeMode::Stretch {
                    // The largest centred box with the destination's aspect ratio.
                    let (sw, sh) = (window.width, window.height);
                    let target = dw as f64 / dh as f64;
                    let (cw, ch) = if sw / sh > target { (sh * target, sh) } else { (sw, sw / target) };
                    crop(window.x + (sw - cw) / 2.0, window.y + (sh - ch) / 2.0, cw, ch)
                } else {
                    crop(window.x, window.y, window.width, window.height)
                };
                let mut dst = fr::images::TypedImage::<fr::pixels::U8x3>::from_buffer(dw, dh, &mut self.fitted)?;
                self.resizer.resize_typed(&src, &mut dst, &options)?;
            }
            ResizeMode::Letterbox => {
                let scale = (dw as f64 / window.width).min(dh as f64 / window.height);
                let rw = ((window.width * scale).round() as u32).clamp(1, dw);
                let rh = ((window.height * scale).round() as u32).clamp(1, dh);
                self.letterboxed.resize((rw * rh * 3) as usize, 0);
                let mut dst = fr::images::TypedImage::<fr::pixels::U8x3>::from_buffer(rw, rh, &mut self.letterboxed)?;
                let options = crop(window.x, window.y, window.width, window.height);
                self.resizer.resize_typed(&src, &mut dst, &options)?;
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

/// UVC webcams send BT.601 limited-range YCbCr (the UVC default colour
/// space); CSI sensors through the ISP do the same.
const CAMERA_RANGE: yuv::YuvRange = yuv::YuvRange::Limited;
const CAMERA_MATRIX: yuv::YuvStandardMatrix = yuv::YuvStandardMatrix::Bt601;

/// Refuses a picture of more pixels than `max_pixels`, from its header,
/// before anything is allocated for it.
fn check_pixels(w: usize, h: usize, max_pixels: u64) -> anyhow::Result<()> {
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        bail!(
            "the picture is {w}x{h} ({:.1} megapixels); frames above {:.1} megapixels are refused before decoding \
             (source.max_frame_megapixels)",
            pixels as f64 / 1e6,
            max_pixels as f64 / 1e6
        );
    }
    Ok(())
}

/// Decodes with libjpeg-turbo at the smallest power-of-two DCT scale whose
/// result still covers `min_width` x `min_height` (the model input), into
/// `rgb`; returns the decoded size. `(w, h)` is the size its header gives,
/// already checked against the limits. A 1280x720 frame for a 224x224 model
/// decodes at 1/2 (640x360): a quarter of the pixels to reconstruct, with no
/// loss the resize to 224 would not make anyway.
#[cfg(feature = "turbojpeg")]
fn decode_jpeg_scaled(
    turbo: &mut turbojpeg::Decompressor,
    data: &[u8],
    (w, h): (usize, usize),
    min_width: usize,
    min_height: usize,
    rgb: &mut Vec<u8>,
) -> anyhow::Result<(u32, u32)> {
    use turbojpeg::ScalingFactor;
    let factor = [ScalingFactor::ONE_EIGHTH, ScalingFactor::ONE_QUARTER, ScalingFactor::ONE_HALF]
        .into_iter()
        .find(|f| f.scale(w) >= min_width && f.scale(h) >= min_height)
        .unwrap_or(ScalingFactor::ONE);
    turbo.set_scaling_factor(factor).map_err(|err| anyhow::anyhow!("JPEG scaling: {err}"))?;
    let (sw, sh) = (factor.scale(w), factor.scale(h));
    rgb.resize(sw * sh * 3, 0);
    let image = turbojpeg::Image {
        pixels: rgb.as_mut_slice(),
        width: sw,
        pitch: sw * 3,
        height: sh,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbo.decompress(data, image).map_err(|err| anyhow::anyhow!("corrupt JPEG data: {err}"))?;
    Ok((sw as u32, sh as u32))
}

/// APP0 segment "AVI1": marker, length 7 (itself included), the tag.
const AVI1_APP0: [u8; 9] = [0xFF, 0xE0, 0x00, 0x07, b'A', b'V', b'I', b'1', 0x00];

/// True for a JPEG with no DHT segment before its first scan (what UVC
/// cameras send). Walks the segment headers only; a malformed stream is
/// left for the decoder to reject.
fn lacks_huffman_tables(jpeg: &[u8]) -> bool {
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut at = 2;
    while at + 4 <= jpeg.len() {
        if jpeg[at] != 0xFF {
            return false;
        }
        match jpeg[at + 1] {
            0xC4 => return false,
            0xDA => return true,
            // Fill bytes before a marker.
            0xFF => at += 1,
            _ => at += 2 + u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize,
        }
    }
    false
}

/// Checks that a raw frame's size, stride and byte count agree, so the
/// converters never read past the buffer or misread rows.
fn check_layout(frame: &Frame) -> anyhow::Result<()> {
    let (w, h) = (frame.width as usize, frame.height as usize);
    if w == 0 || h == 0 || frame.width > MAX_SIDE || frame.height > MAX_SIDE {
        bail!("frame size is {w}x{h}; expected 1 to {MAX_SIDE} on each side");
    }
    let row_bytes = frame.format.row_bytes(w);
    if frame.stride < row_bytes {
        bail!("stride {} is shorter than a row of {w} pixels ({row_bytes} bytes)", frame.stride);
    }
    if frame.format == PixelFormat::Yuyv && w % 2 != 0 {
        bail!("YUYV frame width {w} is odd");
    }
    if frame.format == PixelFormat::Nv12 && (w % 2 != 0 || h % 2 != 0) {
        bail!("NV12 frame size {w}x{h} is odd");
    }
    // The converters take whole strides, the last row included.
    let needed = match frame.format {
        PixelFormat::Nv12 => frame.stride * (h + h / 2),
        _ => frame.stride * h,
    };
    if frame.data.len() < needed {
        bail!("frame holds {} bytes; {w}x{h} with stride {} needs {needed}", frame.data.len(), frame.stride);
    }
    Ok(())
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

    /// Decodes JPEGs at full size in every build (with `turbojpeg` the
    /// decode would otherwise be scaled down to the small test input).
    fn full_size(size: usize) -> Preprocessor {
        let p = identity(size, ResizeMode::Stretch);
        #[cfg(feature = "turbojpeg")]
        let p = p.without_reduced_scale_jpeg();
        p
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
    fn a_region_is_fitted_as_the_same_pixels_cut_out_as_a_frame_of_their_own() {
        let (w, h) = (96, 64);
        let rgb = gradient(w, h);
        let whole = frame(PixelFormat::Rgb8, w, h, w as usize * 3, rgb.clone());
        // The right half, 48x64, cut out by hand.
        let half: Vec<u8> = rgb.chunks_exact(w as usize * 3).flat_map(|row| row[48 * 3..].to_vec()).collect();
        let cut = frame(PixelFormat::Rgb8, 48, 64, 48 * 3, half);
        for mode in [ResizeMode::CenterCrop, ResizeMode::Letterbox, ResizeMode::Stretch] {
            let mut pre = identity(16, mode);
            let mut by_region = pre.new_tensor();
            let (fw, fh) = pre.decode(&whole).unwrap();
            let window = PixelRect { x: 48.0, y: 0.0, width: 48.0, height: 64.0 };
            pre.fit_window(fw, fh, Some(window), &mut by_region).unwrap();
            let mut by_cut = pre.new_tensor();
            pre.run(&cut, &mut by_cut).unwrap();
            let diffs: Vec<f32> = by_region.data.iter().zip(&by_cut.data).map(|(a, b)| (a - b).abs()).collect();
            let worst = diffs.iter().copied().fold(0.0, f32::max);
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            // Bilinear taps at the cut edge read the neighbouring pixels in
            // the whole frame and clamp in the cut-out: a few levels (of 255)
            // there, none inside.
            assert!(worst < 12.0 && mean < 1.5, "{mode:?}: region and cut-out differ by {worst} (mean {mean})");
            let mut whole_tensor = pre.new_tensor();
            pre.run(&whole, &mut whole_tensor).unwrap();
            assert_ne!(whole_tensor.data, by_region.data, "{mode:?}: the region must not be the whole frame");
        }
    }

    #[test]
    fn a_fraction_region_that_rounds_past_the_frame_edge_is_still_fitted() {
        // 0.1 + 0.9 of 1944 rows is 1944.0000000000002 in f64.
        let (w, h) = (64, 1944);
        let frame = frame(PixelFormat::Rgb8, w, h, w as usize * 3, gradient(w, h));
        let rect = crate::source::camera::Rect::Fraction { x: 0.0, y: 0.1, width: 0.5, height: 0.9 };
        let window = rect.resolve(w, h).unwrap();
        for mode in [ResizeMode::CenterCrop, ResizeMode::Letterbox, ResizeMode::Stretch, ResizeMode::Tiles] {
            let mut pre = identity(16, mode);
            let mut out = pre.new_tensor();
            let (fw, fh) = pre.decode(&frame).unwrap();
            for tile in pre.windows(fw, fh, Some(window)) {
                pre.fit_window(fw, fh, Some(tile), &mut out).unwrap_or_else(|err| panic!("{mode:?}: {err:#}"));
            }
        }
    }

    #[test]
    fn tiles_cover_a_wide_or_tall_frame_with_the_fewest_overlapping_windows_of_the_input_aspect() {
        let pre = identity(224, ResizeMode::Tiles);
        let at = |x: f64, y: f64, width: f64, height: f64| PixelRect { x, y, width, height };
        assert_eq!(pre.windows(1920, 1080, None), [at(0.0, 0.0, 1080.0, 1080.0), at(840.0, 0.0, 1080.0, 1080.0)]);
        assert_eq!(pre.windows(480, 640, None), [at(0.0, 0.0, 480.0, 480.0), at(0.0, 160.0, 480.0, 480.0)]);
        assert_eq!(pre.windows(3000, 1000, None).len(), 3, "3:1 takes three squares, no overlap");
        assert_eq!(pre.windows(3100, 1000, None).len(), 4);
        assert_eq!(pre.windows(500, 500, None), [at(0.0, 0.0, 500.0, 500.0)]);
        assert_eq!(pre.windows(505, 500, None).len(), 1, "within 2 %: one window");
        // A region is tiled within itself.
        let region = at(100.0, 50.0, 400.0, 200.0);
        assert_eq!(
            pre.windows(1920, 1080, Some(region)),
            [at(100.0, 50.0, 200.0, 200.0), at(300.0, 50.0, 200.0, 200.0)]
        );
        // A strip too long to tile is one window, not thousands.
        assert_eq!(pre.windows(16384, 1, None).len(), 1);
        assert_eq!(pre.windows(8000, 1000, None).len(), 8);
        // Other modes: one window, the rectangle itself.
        assert_eq!(identity(224, ResizeMode::Letterbox).windows(1920, 1080, None).len(), 1);
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
    fn pure_red_in_yuyv_and_nv12_and_mid_grey_decode_to_their_colours() {
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

    /// A smooth picture (gradients, no sharp edges) so chroma subsampling
    /// loses nothing visible and a decode can be compared pixel by pixel.
    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x * 255 / w) as u8, (y * 255 / h) as u8, 128 + (x + y) as u8 / 8]))
            .collect()
    }

    /// The largest per-channel difference between `rgb` and what the
    /// preprocessor's converter made of `frame`.
    fn worst_difference(frame: &Frame, rgb: &[u8], gray: bool) -> u8 {
        // A model input as large as the picture: no reduced-scale decoding.
        let pixels = rgb.len() / 3;
        let (side_w, side_h) = if frame.width > 0 { (frame.width, frame.height) } else { (64, (pixels / 64) as u32) };
        let mut p =
            Preprocessor::new(side_w as usize, side_h as usize, [0.0; 3], [1.0 / 255.0; 3], ResizeMode::Stretch);
        let (w, h) = p.convert_to_rgb(frame).unwrap();
        assert_eq!((w as usize) * (h as usize) * 3, rgb.len());
        p.rgb
            .chunks_exact(3)
            .zip(rgb.chunks_exact(3))
            .map(|(got, want)| {
                let want = if gray {
                    let l = crate::source::encode(want, 1, 1, PixelFormat::Gray8).0[0];
                    [l, l, l]
                } else {
                    [want[0], want[1], want[2]]
                };
                (0..3).map(|c| got[c].abs_diff(want[c])).max().unwrap()
            })
            .max()
            .unwrap()
    }

    #[test]
    fn yuyv_nv12_grey_and_mjpeg_frames_decode_to_the_picture_they_encode() {
        let (w, h) = (64, 48);
        let rgb = gradient(w, h);
        // Chroma is shared by 2 (YUYV) or 4 (NV12) pixels and the SIMD
        // converters round in fixed point: a few levels of 255 either way.
        // A wrong range or matrix would be off by 20 or more.
        for (format, tolerance) in
            [(PixelFormat::Yuyv, 6), (PixelFormat::Nv12, 6), (PixelFormat::Gray8, 1), (PixelFormat::Mjpeg, 6)]
        {
            let (data, stride) = crate::source::encode(&rgb, w, h, format);
            let (fw, fh) = if format == PixelFormat::Mjpeg { (0, 0) } else { (w, h) };
            let worst = worst_difference(&frame(format, fw, fh, stride, data), &rgb, format == PixelFormat::Gray8);
            assert!(worst <= tolerance, "{}: off by up to {worst} (tolerance {tolerance})", format.as_str());
        }
    }

    #[test]
    fn padded_rows_from_a_driver_stride_are_skipped() {
        let (w, h) = (32, 16);
        let rgb = gradient(w, h);
        let (yuyv, stride) = crate::source::encode(&rgb, w, h, PixelFormat::Yuyv);
        // A driver that aligns rows to 128 bytes: 64 bytes of picture, 64 of padding.
        let padded: Vec<u8> = yuyv.chunks_exact(stride).flat_map(|row| row.iter().copied().chain([0xAA; 64])).collect();
        let worst = worst_difference(&frame(PixelFormat::Yuyv, w, h, stride + 64, padded), &rgb, false);
        assert!(worst <= 6, "off by up to {worst}");
    }

    #[test]
    fn an_mjpeg_frame_without_huffman_tables_decodes_with_the_standard_ones() {
        // UVC cameras leave out the DHT segment and rely on the tables of
        // the JPEG standard (Annex K), which the encoder here also uses.
        let rgb = gradient(64, 48);
        let (jpeg, _) = crate::source::encode(&rgb, 64, 48, PixelFormat::Mjpeg);
        // Walk the segments after SOI: marker (2 bytes), length (2, counting itself).
        let mut stripped = jpeg[..2].to_vec();
        let mut i = 2;
        let mut removed = 0;
        while i + 4 <= jpeg.len() {
            let marker = jpeg[i + 1];
            if marker == 0xDA {
                stripped.extend_from_slice(&jpeg[i..]);
                break;
            }
            let length = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
            if marker == 0xC4 {
                removed += 1;
            } else {
                stripped.extend_from_slice(&jpeg[i..i + 2 + length]);
            }
            i += 2 + length;
        }
        assert!(removed > 0, "the test JPEG had Huffman tables to remove");
        assert!(lacks_huffman_tables(&stripped) && !lacks_huffman_tables(&jpeg));
        let with_tables = worst_difference(&frame(PixelFormat::Mjpeg, 0, 0, 0, jpeg), &rgb, false);
        let without = worst_difference(&frame(PixelFormat::Mjpeg, 0, 0, 0, stripped), &rgb, false);
        assert_eq!(with_tables, without, "same pixels with and without the DHT segment");
    }

    #[cfg(feature = "turbojpeg")]
    #[test]
    fn a_large_mjpeg_frame_is_decoded_at_the_smallest_scale_that_covers_the_model_input() {
        let rgb = gradient(640, 480);
        let (jpeg, _) = crate::source::encode(&rgb, 640, 480, PixelFormat::Mjpeg);
        let frame = frame(PixelFormat::Mjpeg, 0, 0, 0, jpeg);
        let mut small = Preprocessor::new(224, 224, [0.0; 3], [1.0 / 255.0; 3], ResizeMode::CenterCrop);
        assert_eq!(small.convert(&frame).unwrap(), (320, 240), "1/2 covers 224x224; 1/4 would not");
        let mut tiny = Preprocessor::new(56, 56, [0.0; 3], [1.0 / 255.0; 3], ResizeMode::CenterCrop);
        assert_eq!(tiny.convert(&frame).unwrap(), (80, 60), "1/8");
        // The reduced picture is the picture: the top-left pixel of each
        // 8x8 block's average is within a few levels of the gradient there.
        let (x, y) = (40usize, 30usize);
        let got = &tiny.rgb[(y * 80 + x) * 3..][..3];
        let want = &rgb[((y * 8 + 4) * 640 + x * 8 + 4) * 3..][..3];
        assert!(got.iter().zip(want).all(|(a, b)| a.abs_diff(*b) <= 8), "{got:?} vs {want:?}");
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
        let message = format!("{err:#}");
        assert!(message.contains("65000") && message.contains("16384"), "{message}");
    }

    #[test]
    fn a_frame_shorter_than_its_size_says_so() {
        let mut p = identity(4, ResizeMode::Stretch);
        let mut t = p.new_tensor();
        let err = p.run(&frame(PixelFormat::Rgb8, 8, 8, 24, vec![0; 10]), &mut t).unwrap_err();
        assert!(format!("{err:#}").contains("needs"), "{err:#}");
    }

    fn fixture_frame(name: &str, data: Vec<u8>) -> Frame {
        let mut f = frame(PixelFormat::Mjpeg, 0, 0, 0, data);
        f.origin = Some(name.into());
        f
    }

    /// JPEGs from other encoders (tests/fixtures/jpeg, made by Pillow and
    /// OpenCV: progressive, restart markers, 4:4:4/4:2:2/4:2:0, grey, CMYK,
    /// EXIF with a thumbnail JPEG inside, an ICC profile): each decodes, and
    /// to the picture Pillow decodes.
    #[test]
    fn jpegs_from_other_encoders_decode_to_the_picture_pillow_sees() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg");
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let mut p = full_size(4);
        for (name, expected) in reference.as_object().unwrap() {
            let data = std::fs::read(dir.join(name)).unwrap();
            let (w, h) = p.convert(&fixture_frame(name, data)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let (w, h) = (w as usize, h as usize);
            assert_eq!(
                (w as u64, h as u64),
                (expected["width"].as_u64().unwrap(), expected["height"].as_u64().unwrap())
            );
            let mut worst = 0.0f64;
            for (cell, want) in expected["grid"].as_array().unwrap().iter().enumerate() {
                let (gx, gy) = (cell % 8, cell / 8);
                let (y0, x0) = (gy * h / 8, gx * w / 8);
                let (y1, x1) = (((gy + 1) * h / 8).max(y0 + 1), ((gx + 1) * w / 8).max(x0 + 1));
                for c in 0..3 {
                    let mut sum = 0.0;
                    for y in y0..y1 {
                        for x in x0..x1 {
                            sum += p.rgb()[(y * w + x) * 3 + c] as f64;
                        }
                    }
                    let mean = sum / ((y1 - y0) * (x1 - x0)) as f64;
                    worst = worst.max((mean - want[c].as_f64().unwrap()).abs());
                }
            }
            // IDCT and chroma upsampling differ between decoders by a few levels.
            assert!(worst < 6.0, "{name}: a grid cell differs from Pillow's decode by {worst:.1} levels");
        }
    }

    #[test]
    fn every_fixture_jpeg_cut_short_is_refused_and_one_with_bytes_after_its_end_is_kept() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg");
        let mut p = identity(4, ResizeMode::Stretch);
        let mut t = p.new_tensor();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "jpg") {
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let data = std::fs::read(&path).unwrap();
            for fraction in [0.4, 0.75, 0.98] {
                let cut = (data.len() as f64 * fraction) as usize;
                let err = p.run(&fixture_frame(&name, data[..cut].to_vec()), &mut t).unwrap_err();
                let message = format!("{err:#}");
                assert!(message.contains(&name) && message.contains("truncated"), "{name} at {cut}: {message}");
            }
            let err = p.run(&fixture_frame(&name, data[..data.len() - 2].to_vec()), &mut t).unwrap_err();
            assert!(format!("{err:#}").contains("truncated"), "{name} without its EOI: {err:#}");
            let mut padded = data.clone();
            padded.extend_from_slice(&[0u8; 64]);
            padded.extend_from_slice(b"\xFF\xD8 trailer written by a camera");
            p.run(&fixture_frame(&name, padded), &mut t).unwrap_or_else(|e| panic!("{name} with a trailer: {e:#}"));
        }
    }

    #[test]
    fn a_jpeg_is_turned_the_way_its_exif_orientation_says() {
        // Left half red, right half blue, 16x8: after orientation 6 (turn
        // 90 degrees clockwise) it is 8x16 with red on top.
        let img =
            image::RgbImage::from_fn(
                16,
                8,
                |x, _| if x < 8 { image::Rgb([220, 20, 20]) } else { image::Rgb([20, 20, 220]) },
            );
        let mut plain = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut plain), image::ImageFormat::Jpeg).unwrap();
        let mut p = full_size(4);
        for (value, size, red_at) in
            [(1u16, (16, 8), (2, 4)), (3, (16, 8), (13, 4)), (6, (8, 16), (4, 2)), (8, (8, 16), (4, 13))]
        {
            let mut tagged = plain[..2].to_vec();
            tagged.extend(jpeg_exif_app1(value));
            tagged.extend_from_slice(&plain[2..]);
            let (w, h) = p.convert(&fixture_frame("phone.jpg", tagged)).unwrap();
            assert_eq!((w, h), size, "orientation {value}");
            let (x, y) = red_at;
            let px = &p.rgb()[(y * w as usize + x) * 3..][..3];
            assert!(px[0] > 150 && px[2] < 100, "orientation {value}: ({x}, {y}) is {px:?}, expected red");
        }
    }

    fn jpeg_exif_app1(orientation: u16) -> Vec<u8> {
        super::jpeg::tests::exif_app1(orientation)
    }

    #[test]
    fn a_jpeg_header_declaring_more_pixels_than_the_limit_is_refused_before_decoding() {
        let mut jpeg = jpeg_bytes(8);
        // 16000 x 16000: within the side limit, 256 megapixels.
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x3E, 0x80, 0x3E, 0x80]);
        let mut p = identity(4, ResizeMode::Stretch).with_max_pixels(2_000_000);
        let mut t = p.new_tensor();
        let message = format!("{:#}", p.run(&frame(PixelFormat::Mjpeg, 0, 0, 0, jpeg), &mut t).unwrap_err());
        assert!(message.contains("16000x16000") && message.contains("source.max_frame_megapixels"), "{message}");
    }
}
