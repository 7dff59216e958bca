//! What labelcast checks in a JPEG's structure before decoding it: that it
//! is whole, and which way up it is meant to be shown.
//!
//! Decoders are lenient by design (browsers show half a photo rather than
//! nothing), so a JPEG cut short decodes "successfully" with the missing
//! part filled grey, and would be classified as if it were whole. labelcast
//! instead walks the marker segments and the entropy-coded scan data up to
//! the end-of-image marker (EOI); a stream that ends before it is refused.
//! Bytes after EOI are ignored: cameras pad MJPEG frames, and some write
//! trailers there. The same walk finds the EXIF orientation tag of the APP1
//! segment that phones write instead of rotating the pixels.

/// What the marker walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes up to and including the EOI marker.
    pub end: usize,
    /// EXIF orientation, 1 to 8, when an APP1 Exif segment gives one.
    pub orientation: Option<u8>,
}

/// Walks a JPEG from SOI to EOI. Errors say what is missing.
pub fn scan(jpeg: &[u8]) -> Result<Layout, String> {
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG (no start-of-image marker)".into());
    }
    let truncated = |what: &str| {
        format!(
            "truncated JPEG: it ends after {} bytes {what}, before its end-of-image marker (EOI); \
             the file or frame was cut short",
            jpeg.len()
        )
    };
    let mut orientation = None;
    let mut scans = 0;
    let mut at = 2;
    loop {
        // A marker: 0xFF, any number of 0xFF fill bytes, then the code.
        if at >= jpeg.len() {
            return Err(truncated(if scans == 0 { "in its headers" } else { "between scans" }));
        }
        if jpeg[at] != 0xFF {
            return Err(format!("corrupt JPEG: expected a marker at byte {at}, found 0x{:02X}", jpeg[at]));
        }
        while at < jpeg.len() && jpeg[at] == 0xFF {
            at += 1;
        }
        let Some(&code) = jpeg.get(at) else { return Err(truncated("in a marker")) };
        at += 1;
        match code {
            0xD9 if scans > 0 => return Ok(Layout { end: at, orientation }),
            0xD9 => return Err("corrupt JPEG: end-of-image marker before any image data".into()),
            0xD8 => return Err(format!("corrupt JPEG: a second start-of-image marker at byte {}", at - 2)),
            // Markers without a length: TEM and restart markers.
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let Some(length) = jpeg.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
                    return Err(truncated("in a segment header"));
                };
                if length < 2 {
                    return Err(format!("corrupt JPEG: segment 0x{code:02X} claims {length} bytes"));
                }
                let Some(body) = jpeg.get(at + 2..at + length) else {
                    return Err(truncated("inside a segment"));
                };
                if code == 0xE1 && orientation.is_none() {
                    orientation = exif_orientation(body);
                }
                at += length;
                if code == 0xDA {
                    scans += 1;
                    at = scan_end(jpeg, at).ok_or_else(|| truncated("inside its image data"))?;
                }
            }
        }
    }
}

/// Where the entropy-coded data that starts at `from` ends: at the next
/// marker that is not a restart marker (0xFF 0x00 is a stuffed data byte).
/// `None` when the data runs to the end of the buffer.
fn scan_end(jpeg: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        at += memchr::memchr(0xFF, jpeg.get(at..)?)?;
        match *jpeg.get(at + 1)? {
            0x00 | 0xD0..=0xD7 | 0xFF => at += 1,
            _ => return Some(at),
        }
    }
}

/// The orientation tag (0x0112) of an APP1 "Exif" segment's first IFD.
fn exif_orientation(app1: &[u8]) -> Option<u8> {
    let tiff = app1.strip_prefix(b"Exif\0\0")?;
    match image::metadata::Orientation::from_exif_chunk(tiff)? {
        image::metadata::Orientation::NoTransforms => Some(1),
        image::metadata::Orientation::FlipHorizontal => Some(2),
        image::metadata::Orientation::Rotate180 => Some(3),
        image::metadata::Orientation::FlipVertical => Some(4),
        image::metadata::Orientation::Rotate90FlipH => Some(5),
        image::metadata::Orientation::Rotate90 => Some(6),
        image::metadata::Orientation::Rotate270FlipH => Some(7),
        image::metadata::Orientation::Rotate270 => Some(8),
    }
}

/// Puts packed RGB `rgb` (`w` x `h`) the way EXIF orientation `value` says
/// it is meant to be seen, into `out`; returns the new size. The EXIF
/// values (TIFF 6.0 tag 274): 1 as stored, 2 mirrored, 3 rotated 180°, 4
/// flipped, 5 transposed, 6 to be turned 90° clockwise, 7 transversed, 8 to
/// be turned 90° counter-clockwise.
pub fn orient(rgb: &[u8], w: usize, h: usize, value: u8, out: &mut Vec<u8>) -> (usize, usize) {
    let (dw, dh) = if value >= 5 { (h, w) } else { (w, h) };
    out.resize(dw * dh * 3, 0);
    for y in 0..dh {
        for x in 0..dw {
            let (sx, sy) = match value {
                2 => (w - 1 - x, y),
                3 => (w - 1 - x, h - 1 - y),
                4 => (x, h - 1 - y),
                5 => (y, x),
                6 => (y, h - 1 - x),
                7 => (w - 1 - y, h - 1 - x),
                8 => (w - 1 - y, x),
                _ => (x, y),
            };
            let (d, s) = ((y * dw + x) * 3, (sy * w + sx) * 3);
            out[d..d + 3].copy_from_slice(&rgb[s..s + 3]);
        }
    }
    (dw, dh)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn encoded(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
        let mut jpeg = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        jpeg
    }

    #[test]
    fn a_whole_jpeg_ends_at_its_eoi_and_trailing_bytes_are_ignored() {
        let jpeg = encoded(40, 30);
        let layout = scan(&jpeg).unwrap();
        assert_eq!(layout.end, jpeg.len());
        assert_eq!(layout.orientation, None);
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0u8; 300]);
        padded.extend_from_slice(b"camera trailer \xFF\xD8 junk");
        assert_eq!(scan(&padded).unwrap().end, jpeg.len());
    }

    #[test]
    fn a_jpeg_cut_anywhere_before_its_eoi_is_refused_as_truncated() {
        let jpeg = encoded(64, 48);
        for cut in (3..jpeg.len() - 1).step_by(7).chain([jpeg.len() - 1, jpeg.len() - 2]) {
            let err = scan(&jpeg[..cut]).unwrap_err();
            assert!(err.contains("truncated") || err.contains("corrupt"), "cut at {cut}: {err}");
        }
    }

    /// An APP1 Exif segment (big-endian TIFF) with one tag: Orientation.
    pub(crate) fn exif_app1(orientation: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2A\0\0\0\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes());
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, next IFD 0
        let mut segment = vec![0xFF, 0xE1];
        segment.extend_from_slice(&((tiff.len() + 8) as u16).to_be_bytes());
        segment.extend_from_slice(b"Exif\0\0");
        segment.extend(tiff);
        segment
    }

    #[test]
    fn the_exif_orientation_of_an_app1_segment_is_found() {
        let jpeg = encoded(16, 8);
        for value in 1..=8u16 {
            let mut tagged = jpeg[..2].to_vec();
            tagged.extend(exif_app1(value));
            tagged.extend_from_slice(&jpeg[2..]);
            assert_eq!(scan(&tagged).unwrap().orientation, Some(value as u8));
        }
    }

    #[test]
    fn every_orientation_matches_the_image_crates_own() {
        let (w, h) = (5u32, 3u32);
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, (x + y) as u8]));
        for value in 1..=8u8 {
            let mut theirs = image::DynamicImage::ImageRgb8(img.clone());
            theirs.apply_orientation(image::metadata::Orientation::from_exif(value).unwrap());
            let theirs = theirs.into_rgb8();
            let mut ours = Vec::new();
            let (dw, dh) = orient(img.as_raw(), w as usize, h as usize, value, &mut ours);
            assert_eq!((dw as u32, dh as u32), theirs.dimensions(), "orientation {value}");
            assert_eq!(&ours, theirs.as_raw(), "orientation {value}");
        }
    }
}
