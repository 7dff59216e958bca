//! Bad pictures as people really send them, through the real binary: JPEGs
//! cut short, decompression bombs, phone photos that are stored sideways.
//! Each must give a clear error naming the file (or be handled as a browser
//! would) without costing the board its memory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

/// A 640x480 JPEG of the cat photo, as a camera or a phone writes one.
fn cat_jpeg_640() -> Vec<u8> {
    let photo =
        image::open(photo("chelsea.jpg")).unwrap().resize_exact(640, 480, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    photo.to_rgb8().write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    jpeg
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_jpeg_cut_at_forty_percent_is_refused_by_classify_naming_it_and_garbage_after_the_end_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let jpeg = cat_jpeg_640();
    let truncated = write(dir.path(), "truncated.jpg", &jpeg[..jpeg.len() * 2 / 5]);
    let mut trailing = jpeg.clone();
    trailing.extend_from_slice(&[0u8; 1000]);
    let trailing = write(dir.path(), "trailing.jpg", &trailing);
    let out = run_to_end(&mut labelcast(&[
        "classify",
        "--model",
        demo_model().to_str().unwrap(),
        truncated.to_str().unwrap(),
        trailing.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("truncated.jpg") && out.stderr.contains("truncated JPEG"), "{}", out.stderr);
    assert!(!out.stdout.contains("truncated.jpg"), "no scores for the cut file: {}", out.stdout);
    assert!(out.stdout.contains("trailing.jpg") && out.stdout.contains("cat "), "{}", out.stdout);
}

#[test]
fn the_daemon_skips_and_counts_a_truncated_jpeg_and_classifies_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let jpeg = cat_jpeg_640();
    write(dir.path(), "a-truncated.jpg", &jpeg[..jpeg.len() * 2 / 5]);
    write(dir.path(), "b-whole.jpg", &jpeg);
    let uri = format!("file://{}?fps=0&loop=false", dir.path().display());
    let out = run_to_end(&mut labelcast(&["run", "--output", "stdout", "--http-listen", "off", "--source", &uri]));
    assert!(out.status.success(), "{}", out.stderr);
    let origins: Vec<String> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["origin"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(origins.len(), 1, "one labels message, for the whole file: {}", out.stdout);
    assert!(origins[0].ends_with("b-whole.jpg"));
    assert!(out.stderr.contains("frame skipped") && out.stderr.contains("a-truncated.jpg"), "{}", out.stderr);
    assert!(
        out.stderr.contains(r#"\"frames_failed\":1"#) || out.stderr.contains(r#""frames_failed":1"#),
        "{}",
        out.stderr
    );
}

/// A PNG of `width` x `height` zeros, streamed row by row: a few hundred KB
/// on disk that decode to `width * height * bytes per pixel`.
fn png_bomb(path: &Path, width: u32, height: u32, colour: png::ColorType, depth: png::BitDepth) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(colour);
    encoder.set_depth(depth);
    encoder.set_compression(png::Compression::Fastest);
    let mut writer = encoder.write_header().unwrap();
    let bits = match colour {
        png::ColorType::Rgb => 24,
        _ => 1,
    };
    let row = vec![0u8; (width as usize * bits).div_ceil(8)];
    let mut stream = writer.stream_writer().unwrap();
    for _ in 0..height {
        std::io::Write::write_all(&mut stream, &row).unwrap();
    }
    stream.finish().unwrap();
}

/// Runs `labelcast classify` on `picture` and returns its output and peak
/// resident memory in MiB (`wait4`'s rusage of that one child).
// The child is reaped by wait4, which std's Child does not know about.
#[allow(clippy::zombie_processes)]
fn classify_measured(picture: &Path) -> (Finished, f64) {
    let mut child = labelcast(&["classify", "--model", demo_model().to_str().unwrap(), picture.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        std::io::Read::read_to_string(&mut stdout, &mut o).unwrap();
        std::io::Read::read_to_string(&mut stderr, &mut e).unwrap();
        (o, e)
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for this child only.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let (stdout, stderr) = reader.join().unwrap();
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    let status = std::os::unix::process::ExitStatusExt::from_raw(if code >= 0 { code << 8 } else { status });
    (Finished { status, stdout, stderr }, usage.ru_maxrss as f64 / 1024.0)
}

#[test]
fn decompression_bombs_are_refused_from_their_header_without_the_memory_they_claim() {
    let dir = tempfile::tempdir().unwrap();
    // What a plain classify of a normal photo costs, for comparison.
    let (normal, baseline_mib) = classify_measured(&photo("chelsea.jpg"));
    assert!(normal.status.success(), "{}", normal.stderr);

    let one_bit = dir.path().join("one-bit-20000.png");
    png_bomb(&one_bit, 20_000, 20_000, png::ColorType::Grayscale, png::BitDepth::One);
    let rgb = dir.path().join("rgb-12000.png");
    png_bomb(&rgb, 12_000, 12_000, png::ColorType::Rgb, png::BitDepth::Eight);
    let mut jpeg = cat_jpeg_640();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0x3E, 0x80, 0x3E, 0x80]); // 16000 x 16000
    let jpeg_bomb = write(dir.path(), "jpeg-16000.jpg", &jpeg);
    for (bomb, declared) in [(&one_bit, "20000x20000"), (&rgb, "12000x12000"), (&jpeg_bomb, "16000x16000")] {
        let on_disk = std::fs::metadata(bomb).unwrap().len();
        let (out, peak_mib) = classify_measured(bomb);
        println!(
            "{}: {on_disk} bytes on disk, peak RSS {peak_mib:.0} MiB (a normal photo: {baseline_mib:.0} MiB)",
            bomb.display()
        );
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        let name = bomb.file_name().unwrap().to_str().unwrap();
        assert!(
            out.stderr.contains(name)
                && out.stderr.contains(declared)
                && out.stderr.contains("source.max_frame_megapixels"),
            "{}",
            out.stderr
        );
        // Refused before decoding: no more memory than a normal photo takes.
        assert!(peak_mib < baseline_mib + 30.0, "{name}: peak {peak_mib:.0} MiB against {baseline_mib:.0} MiB");
    }
}

#[test]
fn a_larger_limit_in_the_config_lets_a_large_photo_through() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.png");
    png_bomb(&big, 3000, 2000, png::ColorType::Rgb, png::BitDepth::Eight);
    // 3000 x 2000 is 6 megapixels.
    let config = write(dir.path(), "c.toml", b"[source]\nmax_frame_megapixels = 8\n");
    let small = write(dir.path(), "s.toml", b"[source]\nmax_frame_megapixels = 5\n");
    let classify = |cfg: &Path| {
        run_to_end(&mut labelcast(&[
            "classify",
            "--config",
            cfg.to_str().unwrap(),
            "--model",
            demo_model().to_str().unwrap(),
            big.to_str().unwrap(),
        ]))
    };
    let out = classify(&config);
    assert!(out.status.success(), "{}", out.stderr);
    let out = classify(&small);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("3000x2000") && out.stderr.contains("5.0 megapixels"), "{}", out.stderr);
}

/// A phone photo stored sideways with EXIF orientation 6 ("turn 90 degrees
/// clockwise to view") is classified the right way up, like the upright one.
#[test]
fn a_phone_photo_stored_sideways_is_classified_the_right_way_up() {
    let dir = tempfile::tempdir().unwrap();
    let upright = image::open(photo("chelsea.jpg")).unwrap().to_rgb8();
    // Stored turned 90 degrees counter-clockwise, as a phone held upright stores it.
    let stored = image::imageops::rotate270(&upright);
    let mut jpeg = Vec::new();
    stored.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    let sideways = write(dir.path(), "sideways.jpg", &jpeg);
    let mut tagged = jpeg[..2].to_vec();
    tagged.extend(exif_orientation_segment(6));
    tagged.extend_from_slice(&jpeg[2..]);
    let tagged_path = write(dir.path(), "tagged.jpg", &tagged);
    let tagged = tagged_path.clone();
    // What the model is fed: the input tensor classify hands the engine.
    let input = |p: &Path| -> Vec<f32> {
        let out_dir = tempfile::tempdir().unwrap();
        let out = run_to_end(&mut labelcast(&[
            "classify",
            "--model",
            demo_model().to_str().unwrap(),
            "--dump-input",
            out_dir.path().to_str().unwrap(),
            p.to_str().unwrap(),
        ]));
        assert!(out.status.success(), "{}", out.stderr);
        std::fs::read(out_dir.path().join("0.f32"))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let upright = input(&photo("chelsea.jpg"));
    let mean_difference = |other: &[f32]| {
        upright.iter().zip(other).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / upright.len() as f64
    };
    let (sideways, tagged) = (mean_difference(&input(&sideways)), mean_difference(&input(&tagged)));
    println!(
        "mean input difference from the upright photo: stored sideways {sideways:.3}, with EXIF orientation 6 {tagged:.3}"
    );
    // Re-encoding alone moves the normalised input by about 0.01.
    assert!(tagged < 0.03, "turned upright, the model sees the upright photo: {tagged}");
    assert!(sideways > 10.0 * tagged, "unturned, it sees another picture: {sideways} vs {tagged}");
    let out = run_to_end(&mut labelcast(&[
        "classify",
        "--model",
        demo_model().to_str().unwrap(),
        tagged_path.to_str().unwrap(),
    ]));
    assert!(out.status.success() && out.stdout.contains("cat "), "and finds the cat: {}", out.stdout);
}

/// An APP1 Exif segment (big-endian TIFF) holding one tag: Orientation.
fn exif_orientation_segment(orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2A\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0; 6]);
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&((tiff.len() + 8) as u16).to_be_bytes());
    segment.extend_from_slice(b"Exif\0\0");
    segment.extend(tiff);
    segment
}
