//! tract must agree with ONNX Runtime on the same model and input. The
//! reference outputs come from `tests/fixtures/make_ort_reference.py` (run
//! with the onnxruntime wheel); committed fixtures cover the shipped FP32 and
//! INT8 demo models, and CI adds one for the INT8 model it re-quantises
//! (directory in `LABELCAST_ORT_FIXTURES`).

use std::path::{Path, PathBuf};

use labelcast::config::ModelConfig;
use labelcast::engine::tract::TractEngine;
use labelcast::engine::{Engine, Tensor};

/// Scores (after the sigmoid) may differ this much for INT8 models: ONNX
/// Runtime runs integer kernels, tract folds the weight quantisation into f32
/// and fake-quantises activations, and rounding differs at each step.
const INT8_SCORE_TOLERANCE: f64 = 0.05;
/// FP32 models compute the same maths in a different order.
const FP32_LOGIT_TOLERANCE: f64 = 1e-3;

fn formula_input(shape: [usize; 4], phase: f64, amplitude: f64) -> Tensor {
    let [_, c, h, w] = shape;
    let mut data = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for i in 0..h * w {
            data.push((amplitude * (0.0123 * i as f64 + 0.7 * ch as f64 + phase).sin()) as f32);
        }
    }
    Tensor { shape, data }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn fixtures() -> Vec<PathBuf> {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ort")];
    if let Some(extra) = std::env::var_os("LABELCAST_ORT_FIXTURES") {
        dirs.push(PathBuf::from(extra));
    }
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap_or_else(|e| panic!("{}: {e}", d.display())))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn tract_agrees_with_onnxruntime_on_every_fixture() {
    let files = fixtures();
    assert!(files.len() >= 2, "expected the committed FP32 and INT8 fixtures, found {files:?}");
    for file in files {
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let model = PathBuf::from(fixture["model"].as_str().unwrap());
        let model = if model.is_absolute() { model } else { Path::new(env!("CARGO_MANIFEST_DIR")).join(model) };
        let config = ModelConfig::for_path(&model);
        let mut engine = TractEngine::load(&config).unwrap_or_else(|e| panic!("{}: {e:#}", model.display()));
        let int8 = engine.info().is_int8();
        let shape = engine.info().input_shape;
        let mut worst = 0.0f64;
        for case in fixture["cases"].as_array().unwrap() {
            let input = formula_input(shape, case["phase"].as_f64().unwrap(), case["amplitude"].as_f64().unwrap());
            let got = engine.infer(&input).unwrap();
            let expected: Vec<f64> = case["output"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(&expected) {
                let diff = if int8 { (sigmoid(*g as f64) - sigmoid(*e)).abs() } else { (*g as f64 - e).abs() };
                worst = worst.max(diff);
            }
        }
        let tolerance = if int8 { INT8_SCORE_TOLERANCE } else { FP32_LOGIT_TOLERANCE };
        println!("{}: int8={int8} worst difference {worst:.5} (tolerance {tolerance})", file.display());
        assert!(worst <= tolerance, "{}: tract differs from ONNX Runtime by {worst} (> {tolerance})", file.display());
    }
}

/// ONNX Runtime's default quantisation also quantises the attention Softmax.
/// tract alone fuses that DQ -> Softmax -> Q into a lookup table and is
/// wrong; labelcast's load-time repair makes it agree again. tests/run.sh
/// builds that model with `quantize.py --quantize-attention` and its ONNX
/// Runtime reference into `LABELCAST_ORT_FIXTURES`.
#[test]
fn an_attention_quantised_model_is_wrong_in_plain_tract_and_right_after_the_repair() {
    let fixture_path = std::env::var_os("LABELCAST_ORT_FIXTURES")
        .map(|d| PathBuf::from(d).join("attention-quantized-int8.json"))
        .filter(|p| p.exists());
    let Some(fixture_path) = fixture_path else {
        assert!(std::env::var_os("CI").is_none(), "CI must provide the attention-quantised fixture (tests/run.sh)");
        eprintln!("skipped: no LABELCAST_ORT_FIXTURES/attention-quantized-int8.json (run bash tests/run.sh)");
        return;
    };
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&fixture_path).unwrap()).unwrap();
    let model = PathBuf::from(fixture["model"].as_str().unwrap());
    let worst_difference = |repair_qdq: bool| {
        let config = ModelConfig { repair_qdq, ..ModelConfig::for_path(&model) };
        let mut engine = TractEngine::load(&config).unwrap();
        let shape = engine.info().input_shape;
        let mut worst = 0.0f64;
        for case in fixture["cases"].as_array().unwrap() {
            let input = formula_input(shape, case["phase"].as_f64().unwrap(), case["amplitude"].as_f64().unwrap());
            let got = engine.infer(&input).unwrap();
            for (g, e) in got.iter().zip(case["output"].as_array().unwrap()) {
                worst = worst.max((sigmoid(*g as f64) - sigmoid(e.as_f64().unwrap())).abs());
            }
        }
        (worst, engine.info().qdq_repaired.clone())
    };
    let (plain, untouched) = worst_difference(false);
    let (repaired, kept_float) = worst_difference(true);
    println!(
        "attention-quantised model: plain tract differs by {plain:.4}, repaired by {repaired:.4}; kept float: {kept_float:?}"
    );
    assert!(untouched.is_empty());
    assert!(!kept_float.is_empty(), "the repair found the attention Softmax");
    // Measured on the demo model: plain tract 0.076 off, repaired 0.002.
    assert!(plain > INT8_SCORE_TOLERANCE, "plain tract was expected to fail the INT8 tolerance, differs by {plain}");
    assert!(plain > 10.0 * repaired, "the repair should cut the error by 10x or more: {plain} -> {repaired}");
    assert!(repaired <= INT8_SCORE_TOLERANCE, "repaired tract differs from ONNX Runtime by {repaired}");
}
