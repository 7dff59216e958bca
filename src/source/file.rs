//! `file://` source: one image, or a folder of images in name order,
//! optionally looping. It is how demos run without a camera and how tests feed
//! real photos through the same path a camera frame takes: JPEG files travel
//! as `Mjpeg` frames and are decoded by `preprocess`, exactly like MJPEG from
//! a webcam; PNG files are decoded here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};

use super::{Frame, FrameSource, PixelFormat, SourceError, interval_for_fps};

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

pub struct FileSource {
    root: PathBuf,
    files: Vec<PathBuf>,
    next_index: usize,
    looping: bool,
    interval: Option<Duration>,
    sequence: u64,
    max_pixels: u64,
}

impl FileSource {
    pub fn open(path: &Path, fps: f64, looping: bool) -> anyhow::Result<Self> {
        let files = list_images(path)?;
        Ok(Self {
            root: path.to_path_buf(),
            files,
            next_index: 0,
            looping,
            interval: interval_for_fps(fps),
            sequence: 0,
            max_pixels: crate::preprocess::DEFAULT_MAX_FRAME_PIXELS,
        })
    }

    /// Refuses PNG files of more than `max_pixels` pixels before decoding
    /// them (JPEG files are checked where they are decoded).
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }
}

/// Reads one image file as a frame: JPEG bytes as an `Mjpeg` frame (decoded
/// later, like a webcam's), anything else decoded to RGB here. A file that
/// cannot be read or decoded is a [`SourceError::Skipped`] naming it.
pub fn read_frame(path: &Path, sequence: u64) -> Result<Frame, SourceError> {
    read_frame_limited(path, sequence, crate::preprocess::DEFAULT_MAX_FRAME_PIXELS)
}

/// [`read_frame`] with a pixel limit: a PNG whose header declares more
/// pixels is refused before anything is decoded or allocated for it (a
/// 48 KB 1-bit PNG can declare 20000x20000). Its EXIF orientation (eXIf
/// chunk) is applied, as for JPEG files.
pub fn read_frame_limited(path: &Path, sequence: u64, max_pixels: u64) -> Result<Frame, SourceError> {
    let origin: Arc<str> = Arc::from(path.display().to_string());
    let skipped = |reason: String| SourceError::Skipped { origin: origin.to_string(), reason };
    let bytes = std::fs::read(path).map_err(|err| skipped(err.to_string()))?;
    let captured_at = SystemTime::now();
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return Ok(Frame {
            format: PixelFormat::Mjpeg,
            width: 0,
            height: 0,
            stride: 0,
            data: bytes,
            sequence,
            captured_at,
            origin: Some(origin),
        });
    }
    let image = decode_limited(&bytes, max_pixels).map_err(skipped)?;
    let (width, height) = image.dimensions();
    Ok(Frame {
        format: PixelFormat::Rgb8,
        width,
        height,
        stride: width as usize * 3,
        data: image.into_raw(),
        sequence,
        captured_at,
        origin: Some(origin),
    })
}

/// Decodes a non-JPEG image within the pixel limit: the size is read from
/// the header first, and the decoder may allocate no more than the RGBA16
/// picture of that many pixels needs.
fn decode_limited(bytes: &[u8], max_pixels: u64) -> Result<image::RgbImage, String> {
    use image::ImageDecoder;
    let unreadable = |err: image::ImageError| format!("not a readable JPEG or PNG image ({err})");
    let mut reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(16 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(unreadable)?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(format!(
            "the picture is {w}x{h} ({:.1} megapixels); frames above {:.1} megapixels are refused before decoding \
             (source.max_frame_megapixels)",
            pixels as f64 / 1e6,
            max_pixels as f64 / 1e6
        ));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(unreadable)?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

impl FrameSource for FileSource {
    fn describe(&self) -> String {
        format!("file://{} ({} images)", self.root.display(), self.files.len())
    }

    fn frame_interval(&self) -> Option<Duration> {
        self.interval
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.next_index >= self.files.len() {
            if !self.looping {
                return Ok(None);
            }
            // Re-list on every pass so photos added to the folder join in.
            self.files = list_images(&self.root).map_err(|err| SourceError::Fatal(format!("{err:#}")))?;
            self.next_index = 0;
        }
        let path = self.files[self.next_index].clone();
        self.next_index += 1;
        let frame = read_frame_limited(&path, self.sequence, self.max_pixels);
        self.sequence += 1;
        frame.map(Some)
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn list_images(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).with_context(|| format!("source {}", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("listing source folder {}", path.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    if files.is_empty() {
        bail!("source folder {} holds no .jpg, .jpeg or .png files", path.display());
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, rgb: [u8; 3]) {
        image::RgbImage::from_pixel(4, 3, image::Rgb(rgb)).save(path).unwrap();
    }

    #[test]
    fn a_folder_is_read_in_name_order_and_ends_without_loop() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("b.png"), [0, 255, 0]);
        write_png(&dir.path().join("a.png"), [255, 0, 0]);
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let mut source = FileSource::open(dir.path(), 0.0, false).unwrap();
        let first = source.next_frame().unwrap().unwrap();
        assert!(first.origin().ends_with("a.png"));
        assert_eq!((first.format, first.width, first.height), (PixelFormat::Rgb8, 4, 3));
        assert_eq!(&first.data[..3], &[255, 0, 0]);
        let second = source.next_frame().unwrap().unwrap();
        assert_eq!(second.sequence, 1);
        assert!(source.next_frame().unwrap().is_none());
    }

    #[test]
    fn a_looping_folder_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("only.png"), [1, 2, 3]);
        let mut source = FileSource::open(dir.path(), 0.0, true).unwrap();
        for expected in 0..3 {
            assert_eq!(source.next_frame().unwrap().unwrap().sequence, expected);
        }
    }

    #[test]
    fn an_unreadable_image_is_skipped_with_its_name_and_the_next_one_still_comes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a_broken.png"), b"\x89PNG garbage").unwrap();
        write_png(&dir.path().join("b_good.png"), [9, 9, 9]);
        let mut source = FileSource::open(dir.path(), 0.0, false).unwrap();
        match source.next_frame() {
            Err(SourceError::Skipped { origin, .. }) => assert!(origin.ends_with("a_broken.png")),
            other => panic!("expected a skipped frame, got {other:?}"),
        }
        assert!(source.next_frame().unwrap().unwrap().origin().ends_with("b_good.png"));
    }

    #[test]
    fn jpeg_files_travel_undecoded_like_mjpeg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jpg");
        image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30])).save(&path).unwrap();
        let mut source = FileSource::open(&path, 0.0, false).unwrap();
        let frame = source.next_frame().unwrap().unwrap();
        assert_eq!(frame.format, PixelFormat::Mjpeg);
        assert_eq!(frame.data, std::fs::read(&path).unwrap());
    }

    #[test]
    fn an_empty_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileSource::open(dir.path(), 1.0, true).err().unwrap();
        assert!(format!("{err:#}").contains(&dir.path().display().to_string()));
    }
}
