//! labelcast's depthwise and 1x1 kernels inside tract, end to end: the demo
//! model's scores on real photos with the AVX-512 kernels, the AVX2+FMA
//! ones, tract's own paths (instruction sets masked with tract's
//! `TRACT_CPU_ISA`), and tract's own matrix product for the 1x1 convolutions
//! (`LABELCAST_TRACT_POINTWISE=off`), against each other and against ONNX
//! Runtime's FP32. The unit tests in src/engine/depthwise.rs and
//! src/engine/pointwise.rs check the kernels on random shapes.

mod common;

use std::collections::HashMap;

use common::*;

/// `classify --json` scores of the FP32 demo for the shipped photos, with
/// `TRACT_CPU_ISA`.
fn scores(isa: &str, engine: &str) -> (Vec<HashMap<String, f64>>, String) {
    scores_with(isa, engine, "on")
}

/// [`scores`] with `LABELCAST_TRACT_POINTWISE` set to `pointwise`.
fn scores_with(isa: &str, engine: &str, pointwise: &str) -> (Vec<HashMap<String, f64>>, String) {
    scores_of_model(&demo_fp32_model(), isa, engine, pointwise)
}

/// [`scores_with`] for any model file, on one inference thread.
fn scores_of_model(
    model: &std::path::Path,
    isa: &str,
    engine: &str,
    pointwise: &str,
) -> (Vec<HashMap<String, f64>>, String) {
    scores_on_threads(model, isa, engine, pointwise, "1")
}

/// [`scores_of_model`] on `threads` inference threads.
fn scores_on_threads(
    model: &std::path::Path,
    isa: &str,
    engine: &str,
    pointwise: &str,
    threads: &str,
) -> (Vec<HashMap<String, f64>>, String) {
    scores_with_stem(model, isa, engine, pointwise, threads, "on")
}

/// [`scores_on_threads`] with `LABELCAST_TRACT_STEM` set to `stem`.
fn scores_with_stem(
    model: &std::path::Path,
    isa: &str,
    engine: &str,
    pointwise: &str,
    threads: &str,
    stem: &str,
) -> (Vec<HashMap<String, f64>>, String) {
    scores_with_env(
        model,
        isa,
        engine,
        threads,
        &[("LABELCAST_TRACT_POINTWISE", pointwise), ("LABELCAST_TRACT_STEM", stem)],
    )
}

/// `classify --json` scores of `model` for five shipped photos and the
/// `model-info` engine line, with `TRACT_CPU_ISA` set to `isa` and the
/// `envs` given.
fn scores_with_env(
    model: &std::path::Path,
    isa: &str,
    engine: &str,
    threads: &str,
    envs: &[(&str, &str)],
) -> (Vec<HashMap<String, f64>>, String) {
    let photos = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "china.jpg", "astronaut.jpg"];
    let mut args = vec!["classify", "--json", "--threads", threads, "--engine", engine, "--model"];
    args.push(model.to_str().unwrap());
    let paths: Vec<String> = photos.iter().map(|p| photo(p).display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let with_env = |mut command: std::process::Command| {
        command.env("TRACT_CPU_ISA", isa);
        for (name, value) in envs {
            command.env(name, value);
        }
        command
    };
    let out = run_to_end(&mut with_env(labelcast(&args)));
    assert!(out.status.success(), "{isa}: {}", out.stderr);
    let info = run_to_end(&mut with_env(labelcast(&["model-info", "--threads", threads, model.to_str().unwrap()])));
    let engine_line = info.stdout.lines().find(|l| l.starts_with("engine")).unwrap_or_default().to_string();
    (out.stdout.lines().map(|l| scores_of(&serde_json::from_str(l).unwrap())).collect(), engine_line)
}

fn largest_difference(a: &[HashMap<String, f64>], b: &[HashMap<String, f64>]) -> f64 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().map(move |(label, s)| (s - y[label]).abs())).fold(0.0, f64::max)
}

#[test]
fn the_demo_model_scores_the_same_with_every_depthwise_and_1x1_kernel() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("labelcast's depthwise and 1x1 kernels are x86-64 only; aarch64 runs tract's NEON kernels");
        return;
    }
    let (default, engine) = scores("", "tract");
    println!("{engine}");
    let (avx2, avx2_engine) = scores("-avx512f", "tract");
    let (tracts_own, own_engine) = scores("-avx512f,-avx2,-fma", "tract");
    let (tracts_product, product_engine) = scores_with("", "tract", "off");
    assert!(avx2_engine.contains("labelcast_avx2_fma_depthwise") || !engine.contains("avx512f"), "{avx2_engine}");
    // The 1x1 convolutions of the demo model run on labelcast's kernel
    // wherever there is AVX2 and FMA, and on tract's product when told.
    assert!(engine.contains("1x1 convs: labelcast"), "{engine}");
    assert!(avx2_engine.contains("1x1 convs: labelcast avx2+fma"), "{avx2_engine}");
    assert!(
        own_engine.contains("tract's width-inner") && own_engine.contains("tract's matrix product"),
        "{own_engine}"
    );
    assert!(product_engine.contains("1x1 convs: tract's matrix product"), "{product_engine}");
    for (name, other) in
        [("AVX2+FMA kernels", &avx2), ("tract's own paths", &tracts_own), ("tract's matrix product", &tracts_product)]
    {
        let difference = largest_difference(&default, other);
        println!("{name}: largest score difference {difference:.6}");
        // Summation order and fused multiply-adds differ; the scores do not.
        assert!(difference < 1e-3, "{name} differs by {difference}");
    }
    if std::env::var_os("ORT_DYLIB_PATH").is_some() {
        let (reference, _) = scores("", "onnxruntime");
        let difference = largest_difference(&default, &reference);
        println!("ONNX Runtime FP32: largest score difference {difference:.6}");
        assert!(difference < 1e-3, "{difference}");
    }
}

#[test]
fn the_int8_demo_keeps_its_1x1_weights_as_int8_and_scores_as_tract_does_with_them_in_float() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("labelcast's 1x1 kernels are x86-64 only");
        return;
    }
    // The shipped INT8 file in the default weights-only mode: tract folds
    // each DequantizeLinear into float weights; labelcast's 1x1 kernel finds
    // them on their int8 grid and keeps them as int8 (activations in float
    // here; with 8-bit activations, see the next test).
    let model = demo_model();
    let (int8, engine) = scores_of_model(&model, "", "tract", "int8-weights");
    // AVX2 has no 8-bit dot products: int8 weights, float activations.
    let (avx2, avx2_engine) = scores_of_model(&model, "-avx512f", "tract", "on");
    let (float, float_engine) = scores_of_model(&model, "", "tract", "float");
    // On two threads the kernel splits the positions over tract's pool.
    let (two, two_engine) = scores_on_threads(&model, "", "tract", "int8-weights", "2");
    let (product, product_engine) = scores_of_model(&model, "", "tract", "off");
    println!("{engine}");
    let int8_convs = |line: &str| count_after(line, "int8 weights on ");
    // Every 1x1 convolution the kernel took: the demo's weights are all int8.
    let taken = convs_taken(&engine);
    assert!(taken.is_some_and(|n| n > 30), "{engine}");
    assert_eq!(int8_convs(&engine), taken, "{engine}");
    assert_eq!(int8_convs(&avx2_engine), taken, "{avx2_engine}");
    if cfg!(feature = "tract-threads") {
        assert!(two_engine.contains("2 thread(s)") && int8_convs(&two_engine) == taken, "{two_engine}");
    }
    assert_eq!(int8_convs(&float_engine), Some(0), "{float_engine}");
    assert_eq!(count_after(&engine, "8-bit activations (VNNI) on "), Some(0), "{engine}");
    assert_eq!(count_after(&avx2_engine, "8-bit activations (VNNI) on "), Some(0), "{avx2_engine}");
    assert!(product_engine.contains("1x1 convs: tract's matrix product"), "{product_engine}");
    for (name, other) in [
        ("AVX2+FMA int8 weights", &avx2),
        ("two threads", &two),
        ("the kernel on float weights", &float),
        ("tract's product on float weights", &product),
    ] {
        let difference = largest_difference(&int8, other);
        println!("{name}: largest score difference {difference:.6}");
        assert!(difference < 1e-3, "{name} differs by {difference}");
    }
    // And the FP32 file's learned weights are floats, none on an int8 grid:
    // the one product kept as int8 is the head's label grouping (`head.groups`,
    // a [1000, 12] matrix of 0 and 1, which int8 holds exactly).
    let (_, fp32_engine) = scores("", "tract");
    assert_eq!(int8_convs(&fp32_engine), Some(1), "{fp32_engine}");
}

/// The number that follows `prefix` in `line` (an engine line's counts).
fn count_after(line: &str, prefix: &str) -> Option<usize> {
    let rest = line.split(prefix).nth(1)?;
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
}

/// How many 1x1 convolutions labelcast's kernel took, from an engine line.
fn convs_taken(engine: &str) -> Option<usize> {
    engine.split("1x1 convs: labelcast ").nth(1).and_then(|rest| count_after(rest, " on "))
}

#[test]
fn with_vnni_the_int8_demo_quantises_its_1x1_activations_and_scores_near_int8_weights_alone() {
    #[cfg(target_arch = "x86_64")]
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    let model = demo_model();
    let (dot, engine) = scores_of_model(&model, "", "tract", "on");
    println!("{engine}");
    let activations = count_after(&engine, "8-bit activations (VNNI) on ");
    if !vnni || !engine.contains("labelcast avx512f") {
        // The default everywhere else: int8 weights, float activations.
        assert!(activations.is_none_or(|n| n == 0), "{engine}");
        eprintln!("no AVX-512 VNNI here: nothing to compare");
        return;
    }
    // Every 1x1 convolution over a map of positions; the one product left
    // with float activations is the head's label grouping (one vector of
    // 1000 softmax probabilities, which 8 bits per position would zero).
    let taken = convs_taken(&engine);
    assert_eq!(activations.map(|n| n + 1), taken, "{engine}");
    // The graph as quantised (`--int8 native`, and the reference the INT8
    // check compares with at start) keeps float activations: 8 bits per
    // position on both sides would hide their common error from the check.
    let native =
        run_to_end(&mut labelcast(&["model-info", "--int8", "native", "--threads", "1", model.to_str().unwrap()]));
    let native_engine = native.stdout.lines().find(|l| l.starts_with("engine")).unwrap_or_default().to_string();
    assert_eq!(count_after(&native_engine, "8-bit activations (VNNI) on "), Some(0), "{native_engine}");
    let (weights_only, _) = scores_of_model(&model, "", "tract", "int8-weights");
    let difference = largest_difference(&dot, &weights_only);
    println!("8-bit activations against float activations: largest score difference {difference:.6}");
    // Measured 0.0087 on the nine shipped photos (the model's own
    // activation quantisation, which weights-only leaves out, moves them by
    // up to 0.04): well inside the 0.15 the INT8 check allows.
    assert!(difference > 0.0 && difference < 0.03, "{difference}");
    // On two threads the positions are split over tract's pool (with the
    // tract-threads feature): each position's sums are the same.
    if cfg!(feature = "tract-threads") {
        let (two, two_engine) = scores_on_threads(&model, "", "tract", "on", "2");
        assert_eq!(count_after(&two_engine, "8-bit activations (VNNI) on "), activations, "{two_engine}");
        let split = largest_difference(&dot, &two);
        println!("two threads: largest score difference {split:.6}");
        assert!(split < 1e-3, "two threads differ by {split}");
    }
}

#[test]
fn the_demo_models_stem_runs_on_labelcasts_kernel_and_scores_as_on_tracts_own() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("labelcast's stem kernel is x86-64 only");
        return;
    }
    for model in [demo_fp32_model(), demo_model()] {
        // Float activations in the 1x1 convolutions: with 8 bits per
        // position a last-digit difference upstream can move a rounding.
        let (ours, engine) = scores_with_stem(&model, "", "tract", "int8-weights", "1", "on");
        let (tracts, tracts_engine) = scores_with_stem(&model, "", "tract", "int8-weights", "1", "off");
        let (avx2, avx2_engine) = scores_with_stem(&model, "-avx512f", "tract", "int8-weights", "1", "on");
        println!("{engine}");
        assert!(engine.contains("stem: labelcast's"), "{engine}");
        assert!(engine.contains("stem: labelcast's avx"), "{engine}");
        assert!(avx2_engine.contains("stem: labelcast's avx2+fma"), "{avx2_engine}");
        assert!(tracts_engine.contains("stem: tract's"), "{tracts_engine}");
        for (name, other) in [("tract's im2col", &tracts), ("AVX2+FMA", &avx2)] {
            let difference = largest_difference(&ours, other);
            println!("{}: {name}: largest score difference {difference:.6}", model.display());
            assert!(difference < 1e-3, "{name} differs by {difference}");
        }
    }
}

#[test]
fn the_demo_models_depthwise_convolutions_run_on_labelcasts_op_with_their_clamps_and_score_as_on_tracts_own() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("labelcast's depthwise op is x86-64 only");
        return;
    }
    for model in [demo_fp32_model(), demo_model()] {
        // Float activations in the 1x1 convolutions, as in the stem's test.
        let envs =
            |depthwise| [("LABELCAST_TRACT_POINTWISE", "int8-weights"), ("LABELCAST_TRACT_DEPTHWISE", depthwise)];
        let (ours, engine) = scores_with_env(&model, "", "tract", "1", &envs("on"));
        let (tracts, tracts_engine) = scores_with_env(&model, "", "tract", "1", &envs("off"));
        let (avx2, avx2_engine) = scores_with_env(&model, "-avx512f", "tract", "1", &envs("on"));
        let (split, _) = scores_with_env(&model, "", "tract", "2", &envs("on"));
        println!("{engine}");
        // EfficientNet-Lite0 has 16 depthwise convolutions; the first reads
        // the stem's channels-first output and stays with tract's op.
        assert!(engine.contains("depthwise: labelcast's avx"), "{engine}");
        let convs = count_after(&engine, "op on ").unwrap_or(0);
        assert!(convs >= 15, "{engine}");
        // Each with the clamp after it: ReLU6 (FP32), and the quantiser's
        // saturation too (INT8).
        let clamps = count_after(&engine, &format!("op on {convs} with ")).unwrap_or(0);
        assert!(clamps >= 2 * convs, "{engine}");
        assert!(avx2_engine.contains("depthwise: labelcast's avx2+fma op"), "{avx2_engine}");
        assert!(!tracts_engine.contains("op on"), "{tracts_engine}");
        for (name, other) in [("tract's DepthWise", &tracts), ("AVX2+FMA", &avx2), ("two threads", &split)] {
            let difference = largest_difference(&ours, other);
            println!("{}: {name}: largest score difference {difference:.6}", model.display());
            assert!(difference < 1e-3, "{name} differs by {difference}");
        }
    }
}
