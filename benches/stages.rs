//! Per-stage benchmarks, so a regression shows up in the stage where it
//! happened: each camera pixel format -> RGB, JPEG frame -> tensor (decode + fit + normalise) and RGB frame ->
//! tensor (fit + normalise) at 640x480 and 1280x720, inference on each engine
//! and INT8 mode in the build, and scores -> label states -> JSON payload.
//! Criterion prints each stage's time; within a group the first function is
//! the baseline the others are read against (tract FP32 for inference).
//!
//!   cargo bench --bench stages
//!   ORT_DYLIB_PATH=.../libonnxruntime.so.1.32.0 cargo bench --bench stages   # adds ONNX Runtime

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use image::ImageEncoder;

use labelcast::config::{EngineKind, Int8Mode, ModelConfig};
use labelcast::engine;
use labelcast::labels::{self, LabelEvent, LabelScore, LabelTracker};
use labelcast::preprocess::Preprocessor;
use labelcast::publish::payload;
use labelcast::source::{Frame, PixelFormat};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A shipped photo scaled to a camera's frame size, as RGB and as a JPEG.
fn camera_frames(width: u32, height: u32) -> (Frame, Frame) {
    let photo = image::open(repo().join("calibration/images/chelsea.jpg")).expect("shipped photo").to_rgb8();
    let scaled = image::imageops::resize(&photo, width, height, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .write_image(scaled.as_raw(), width, height, image::ExtendedColorType::Rgb8)
        .expect("encode");
    let frame = |format, data: Vec<u8>, w, h, stride| Frame {
        format,
        width: w,
        height: h,
        stride,
        data,
        sequence: 0,
        captured_at: SystemTime::now(),
        origin: None,
    };
    (
        frame(PixelFormat::Rgb8, scaled.into_raw(), width, height, width as usize * 3),
        frame(PixelFormat::Mjpeg, jpeg, 0, 0, 0),
    )
}

fn preprocessing(c: &mut Criterion) {
    let model = engine::load(&ModelConfig::for_path(repo().join("models/demo/labelcast-demo-int8.onnx"))).unwrap();
    let meta = &model.info().metadata;
    let mut pre = Preprocessor::new(224, 224, meta.mean, meta.std, meta.resize);
    let mut tensor = pre.new_tensor();
    let mut group = c.benchmark_group("preprocess");
    for (w, h) in [(640, 480), (1280, 720)] {
        let (rgb, jpeg) = camera_frames(w, h);
        group.bench_function(format!("rgb {w}x{h} -> tensor"), |b| {
            b.iter(|| pre.run(black_box(&rgb), &mut tensor).unwrap())
        });
        #[cfg(feature = "turbojpeg")]
        {
            // Same run, same frame: zune-jpeg at full size is the baseline
            // for libjpeg-turbo's reduced-scale decode below.
            let mut full = Preprocessor::new(224, 224, meta.mean, meta.std, meta.resize).without_reduced_scale_jpeg();
            group.bench_function(format!("jpeg {w}x{h} -> tensor (zune-jpeg, full size)"), |b| {
                b.iter(|| full.run(black_box(&jpeg), &mut tensor).unwrap())
            });
        }
        group.bench_function(format!("jpeg {w}x{h} -> tensor"), |b| {
            b.iter(|| pre.run(black_box(&jpeg), &mut tensor).unwrap())
        });
    }
    group.finish();
}

fn inference(c: &mut Criterion) {
    let int8 = repo().join("models/demo/labelcast-demo-int8.onnx");
    let fp32 = repo().join("models/demo/labelcast-demo-fp32.onnx");
    let mut rows: Vec<(&str, &Path, EngineKind, Int8Mode)> = vec![
        ("tract fp32", &fp32, EngineKind::Tract, Int8Mode::Native),
        ("tract int8 native", &int8, EngineKind::Tract, Int8Mode::Native),
        ("tract int8 weights-only", &int8, EngineKind::Tract, Int8Mode::WeightsOnly),
    ];
    if cfg!(feature = "onnxruntime") && std::env::var_os("ORT_DYLIB_PATH").is_some() {
        rows.push(("onnxruntime fp32", &fp32, EngineKind::OnnxRuntime, Int8Mode::Native));
        rows.push(("onnxruntime int8", &int8, EngineKind::OnnxRuntime, Int8Mode::Native));
    }
    let mut group = c.benchmark_group("infer");
    group.sample_size(20).measurement_time(Duration::from_secs(8));
    for (name, model, engine, int8) in rows {
        let config = ModelConfig { engine, int8, ..ModelConfig::for_path(model) };
        let mut engine = engine::load(&config).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let meta = engine.info().metadata.clone();
        let mut pre = Preprocessor::new(224, 224, meta.mean, meta.std, meta.resize);
        let mut tensor = pre.new_tensor();
        pre.run(&camera_frames(640, 480).0, &mut tensor).unwrap();
        group.bench_function(name, |b| b.iter(|| engine.infer(black_box(&tensor)).unwrap()));
    }
    group.finish();
}

fn postprocessing(c: &mut Criterion) {
    let model = engine::load(&ModelConfig::for_path(repo().join("models/demo/labelcast-demo-int8.onnx"))).unwrap();
    let meta = model.info().metadata.clone();
    let rules = labels::resolve_rules(&Default::default(), &meta).unwrap();
    let mut tracker = LabelTracker::new(rules.clone(), Duration::from_secs(1));
    let raw: Vec<f32> = (0..rules.len()).map(|i| (i as f32 - 6.0) * 0.7).collect();
    let model_name: Arc<str> = meta.name.as_str().into();
    let origin: Arc<str> = "bench".into();
    let mut sequence = 0u64;
    c.bench_function("postprocess: logits -> label states -> labels JSON", |b| {
        b.iter(|| {
            let mut scores = raw.clone();
            labels::to_scores(&mut scores, meta.output);
            let changed = tracker.update(&scores, Instant::now());
            sequence += 1;
            let event = LabelEvent {
                sequence,
                timestamp: SystemTime::now(),
                origin: Some(origin.clone()),
                model: model_name.clone(),
                inference_ms: 12.5,
                frame_ms: 14.0,
                labels: rules
                    .iter()
                    .zip(&scores)
                    .enumerate()
                    .map(|(i, (rule, &score))| LabelScore { name: rule.name.clone(), score, on: tracker.is_on(i) })
                    .collect(),
                changed: changed
                    .iter()
                    .map(|&i| LabelScore { name: rules[i].name.clone(), score: scores[i], on: tracker.is_on(i) })
                    .collect(),
                camera: None,
                regions: Vec::new(),
            };
            black_box(payload::labels_json(&event).to_string())
        })
    });
}

/// Camera pixel format -> packed RGB alone (the step the capture formats
/// differ in), per frame, with the throughput in pixels: criterion's
/// `Melem/s` is pixels per microsecond, so ns/pixel = 1000 / Melem/s. The
/// RGB row (a row-by-row copy) is the floor the others are read against.
fn conversion(c: &mut Criterion) {
    let mut pre = Preprocessor::new(224, 224, [0.0; 3], [1.0; 3], labelcast::config::ResizeMode::CenterCrop);
    let mut group = c.benchmark_group("convert to rgb");
    for (w, h) in [(640u32, 480u32), (1280, 720)] {
        let (rgb, _) = camera_frames(w, h);
        group.throughput(criterion::Throughput::Elements(u64::from(w * h)));
        for format in [PixelFormat::Rgb8, PixelFormat::Yuyv, PixelFormat::Nv12, PixelFormat::Gray8, PixelFormat::Mjpeg]
        {
            let (data, stride) = labelcast::source::encode(&rgb.data, w, h, format);
            let mjpeg = format == PixelFormat::Mjpeg;
            let frame = Frame {
                format,
                width: if mjpeg { 0 } else { w },
                height: if mjpeg { 0 } else { h },
                stride,
                data,
                sequence: 0,
                captured_at: SystemTime::now(),
                origin: None,
            };
            #[cfg(feature = "turbojpeg")]
            if mjpeg {
                let mut full =
                    Preprocessor::new(224, 224, [0.0; 3], [1.0; 3], labelcast::config::ResizeMode::CenterCrop)
                        .without_reduced_scale_jpeg();
                group.bench_function(format!("mjpg {w}x{h} (zune-jpeg, full size)"), |b| {
                    b.iter(|| full.convert(black_box(&frame)).unwrap())
                });
            }
            group.bench_function(format!("{} {w}x{h}", format.as_str()), |b| {
                b.iter(|| pre.convert(black_box(&frame)).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(stages, preprocessing, conversion, inference, postprocessing);
criterion_main!(stages);
