//! Camera frames: whatever bytes a camera (or a file) hands over, in any of
//! the pixel formats labelcast takes, with any size and stride, go through
//! the decoder, the pixel-format converters and the resize to the model
//! input. A bad frame must be an error (the daemon skips and counts it),
//! never a panic or an out-of-bounds access in the SIMD converters; a good
//! one must give a tensor of finite numbers.
//!
//! Input layout (simple, so seeds are easy to write by hand): byte 0 picks
//! the pixel format, bytes 1 and 2 the width and height (1 to 256), byte 3
//! extra stride bytes, byte 4 the resize mode and the model input size; the
//! rest is the frame (for MJPG, the JPEG file).
#![no_main]

use std::time::SystemTime;

use labelcast::config::ResizeMode;
use labelcast::preprocess::Preprocessor;
use labelcast::source::{Frame, PixelFormat};
use libfuzzer_sys::fuzz_target;

const FORMATS: [PixelFormat; 5] =
    [PixelFormat::Mjpeg, PixelFormat::Yuyv, PixelFormat::Nv12, PixelFormat::Gray8, PixelFormat::Rgb8];
const MODES: [ResizeMode; 3] = [ResizeMode::CenterCrop, ResizeMode::Letterbox, ResizeMode::Stretch];
const INPUTS: [(usize, usize); 3] = [(32, 32), (24, 40), (1, 1)];

fuzz_target!(|input: &[u8]| {
    let [format, width, height, stride_pad, choice, data @ ..] = input else { return };
    let format = FORMATS[*format as usize % FORMATS.len()];
    let (width, height) = (*width as u32 + 1, *height as u32 + 1);
    let row_bytes = match format {
        PixelFormat::Rgb8 => width * 3,
        PixelFormat::Yuyv => width * 2,
        _ => width,
    } as usize;
    let frame = Frame {
        format,
        width: if format == PixelFormat::Mjpeg { 0 } else { width },
        height: if format == PixelFormat::Mjpeg { 0 } else { height },
        stride: if format == PixelFormat::Mjpeg { 0 } else { row_bytes + (*stride_pad as usize % 8) },
        data: data.to_vec(),
        sequence: 0,
        captured_at: SystemTime::UNIX_EPOCH,
        origin: Some("fuzz".into()),
    };
    let mode = MODES[*choice as usize % MODES.len()];
    let (model_w, model_h) = INPUTS[(*choice as usize / MODES.len()) % INPUTS.len()];
    let mut preprocessor = Preprocessor::new(model_w, model_h, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], mode);
    let mut tensor = preprocessor.new_tensor();
    if preprocessor.run(&frame, &mut tensor).is_ok() {
        assert_eq!(tensor.data.len(), 3 * model_w * model_h);
        assert!(tensor.data.iter().all(|v| v.is_finite()), "a decoded frame gave a non-finite input value");
    }
});
