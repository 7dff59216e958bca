//! Depthwise convolutions with their bias and clamps as one op, for tract
//! on x86-64.
//!
//! With the channel-inner kernels of `depthwise.rs` registered, tract runs
//! every channels-last depthwise convolution fast, but as tract's own
//! `DepthWise` op, which has no place for what follows it: on the demo's
//! INT8 file each is followed by the quantiser's saturation and ReLU6, four
//! Max/Min that tract runs as a separate pass over the whole output
//! (`OptBinChain(Max+Min+Max+Min)`). `bench --profile` on the demo model:
//! those passes were about 1.1 of the 1.3 ms tract spent on element-wise ops,
//! next to 1.8 ms in the 16 depthwise convolutions themselves.
//!
//! Here a decluttered depthwise `Conv` (group = input channels = output
//! channels, channels-last `[1, H, W, C]` or `[H, W, C]`, kernels up to 7x7,
//! any stride and padding, no dilation) with the Adds of constants and the
//! Max/Min of scalar constants after it becomes one [`DepthwiseConv`]. It
//! walks the output row by row: the columns whose window lies inside the
//! image are one run of the same channel-inner kernel with every tap, the
//! border columns and rows one call each with the taps that fall inside
//! (padding is read as nothing, never copied into a padded image), and the
//! clamp is applied to each vector before its one store. With two or more
//! inference threads the output rows are split over tract's thread pool.
//! It goes in between tract's declutter (which settles the channels-last
//! layout) and its codegen, like the 1x1 and stem kernels; only where AVX2
//! and FMA are found at run time. aarch64 keeps tract's op and NEON kernel.
//! `LABELCAST_TRACT_DEPTHWISE=off` keeps tract's op everywhere (for comparing
//! the two in one build).

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::KernelFormat;
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::pointwise::Isa;
use super::stem::{FloatConv, float_conv, following};

/// The largest kernel side the op takes (7x7: EfficientNet's and
/// MobileNetV3's largest); the taps of one call live on the stack.
const MAX_SIDE: usize = 7;

/// A depthwise convolution of a channels-last `[H, W, C]` map (batch 1) to
/// `[OH, OW, C]`, with its bias and clamp; see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthwiseConv {
    pub channels: usize,
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Vertical and horizontal stride.
    pub stride: (usize, usize),
    /// Zero padding before the first row and the first column (after the
    /// last ones it follows from the output size).
    pub pad: (usize, usize),
    /// Input height and width.
    pub input: (usize, usize),
    /// Output height and width.
    pub output: (usize, usize),
    /// Tap `ky * KW + kx`, channel `c` at `[(ky * KW + kx) * C + c]`.
    pub weights: Vec<f32>,
    /// `[C]`: the convolution's bias plus any constant added after it.
    pub bias: Vec<f32>,
    /// Lower and upper bound of a fused Max/Min, if fused.
    pub clamp: (Option<f32>, Option<f32>),
    /// The output's shape as the graph has it (`[1, OH, OW, C]` or `[OH,
    /// OW, C]`).
    pub output_shape: TVec<usize>,
}

impl Eq for DepthwiseConv {}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "DepthwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels, kernel {:?}, stride {:?}, pad {:?}, {:?} -> {:?}, clamp {:?}",
            self.channels, self.kernel, self.stride, self.pad, self.input, self.output, self.clamp
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let (h, w) = self.input;
        ensure!(
            input.len() == h * w * self.channels,
            "DepthwiseConv: {} input values for {}x{}x{}",
            input.len(),
            h,
            w,
            self.channels
        );
        // SAFETY: `run` writes every output element (each row, column and
        // channel below the output's size).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let output = view.as_slice_mut::<f32>()?;
            let row = self.output.1 * self.channels;
            super::pointwise::split_rows(self.output.0, row, 1, 2, output, |first, rows| self.run(input, first, rows));
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

impl DepthwiseConv {
    /// Output rows `first..` (as many as `output` holds, `[rows, OW, C]`)
    /// from the whole `input` (`[H, W, C]`), with the best kernel this CPU
    /// has.
    ///
    /// # Panics
    /// If the slices are not those sizes (the op checks the input first),
    /// or off a CPU with AVX2 and FMA (the rewrite only runs where they are).
    pub fn run(&self, input: &[f32], first: usize, output: &mut [f32]) {
        let simd = Isa::detect().expect("DepthwiseConv is only wired in where AVX2 and FMA are");
        self.run_with(simd, input, first, output)
    }

    /// [`DepthwiseConv::run`] with the kernel for `simd`.
    ///
    /// # Panics
    /// As [`DepthwiseConv::run`], and if this CPU cannot run `simd`.
    pub fn run_with(&self, simd: Isa, input: &[f32], first: usize, output: &mut [f32]) {
        let (h, w, c) = (self.input.0, self.input.1, self.channels);
        let (oh, ow) = self.output;
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.pad;
        let row = ow * c;
        assert!(
            input.len() == h * w * c
                && output.len().is_multiple_of(row.max(1))
                && first + output.len() / row.max(1) <= oh
        );
        assert!(simd.runs_here(), "DepthwiseConv: this CPU cannot run {simd:?}");
        // The columns whose whole window is inside the image: one run.
        let inner_first = pw.div_ceil(sw).min(ow);
        let inner_end = if w + pw >= kw { ((w + pw - kw) / sw + 1).min(ow) } else { 0 }.max(inner_first);
        let (mut taps, mut offsets) = ([0usize; MAX_SIDE * MAX_SIDE], [0isize; MAX_SIDE * MAX_SIDE]);
        for (r, out_row) in output.chunks_exact_mut(row.max(1)).enumerate() {
            let oy = first + r;
            let iy = (oy * sh) as isize - ph as isize;
            let ky_range = (-iy).max(0) as usize..((h as isize - iy).clamp(0, kh as isize) as usize);
            // Taps `ky_range` x `kx_range` of output column `ox`, `len` columns
            // from it, the input read from its first tap inside the image.
            let mut call = |ox: usize, len: usize, kx_range: std::ops::Range<usize>| {
                let ix = (ox * sw) as isize - pw as isize;
                let mut n = 0;
                for ky in ky_range.clone() {
                    for kx in kx_range.clone() {
                        taps[n] = ky * kw + kx;
                        offsets[n] = (((ky - ky_range.start) * w + (kx - kx_range.start)) * c) as isize;
                        n += 1;
                    }
                }
                let out = &mut out_row[ox * c..(ox + len) * c];
                if n == 0 {
                    // Every tap in the padding (outputs past the image's
                    // edge): the bias, clamped, with no pointer into the
                    // input at all.
                    for o in out.chunks_exact_mut(c) {
                        for (o, b) in o.iter_mut().zip(&self.bias) {
                            let v = self.clamp.0.map_or(*b, |lo| b.max(lo));
                            *o = self.clamp.1.map_or(v, |hi| v.min(hi));
                        }
                    }
                    return;
                }
                // The first tap inside the image.
                let start = ((iy + ky_range.start as isize) * w as isize + ix + kx_range.start as isize) * c as isize;
                let base = input[start as usize..].as_ptr();
                // SAFETY: every tap read is inside `input` (the ranges keep
                // rows and columns inside the image, and `base` is the
                // first tap's place); `len` outputs of `c` values from
                // `out` are this slice; the CPU runs `simd` (asserted above).
                unsafe {
                    kernel(
                        simd,
                        base,
                        out.as_mut_ptr(),
                        &self.weights,
                        &taps[..n],
                        &offsets[..n],
                        &self.bias,
                        c,
                        len,
                        (sw * c) as isize,
                        self.clamp,
                    )
                }
            };
            for ox in (0..inner_first).chain(inner_end..ow) {
                let ix = (ox * sw) as isize - pw as isize;
                let kx_range = (-ix).max(0) as usize..((w as isize - ix).clamp(0, kw as isize) as usize);
                call(ox, 1, kx_range);
            }
            if inner_end > inner_first {
                call(inner_first, inner_end - inner_first, 0..kw);
            }
        }
    }
}

/// The channel-inner kernel of `depthwise.rs` for `simd`, clamping.
///
/// # Safety
/// As `depthwise::depthwise_c_avx2`, on a CPU that runs `simd`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    simd: Isa,
    input: *const f32,
    output: *mut f32,
    weights: &[f32],
    taps: &[usize],
    offsets: &[isize],
    bias: &[f32],
    channels: usize,
    len: usize,
    in_stride: isize,
    clamp: (Option<f32>, Option<f32>),
) {
    let (k, b, c) = (weights.as_ptr(), bias.as_ptr(), channels as isize);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use super::depthwise::x86;
        let bounds = x86::Bounds { lo: clamp.0, hi: clamp.1 };
        match simd {
            Isa::Avx512f => {
                x86::avx512::<true>(input, output, k, taps, offsets, b, channels, channels, len, in_stride, c, bounds)
            }
            Isa::Avx2Fma => {
                x86::avx2::<true>(input, output, k, taps, offsets, b, channels, channels, len, in_stride, c, bounds)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (simd, input, output, k, taps, offsets, b, c, len, in_stride, clamp);
        unreachable!("the depthwise op is only wired in on x86-64");
    }
}

/// Whether the rewrite is turned off (`LABELCAST_TRACT_DEPTHWISE=off`).
pub fn disabled_by_env() -> bool {
    std::env::var("LABELCAST_TRACT_DEPTHWISE").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

/// The kernel depthwise convolutions are rewritten for on this CPU
/// (AVX2+FMA or AVX-512F), `None` without them or when turned off.
pub fn choice() -> Option<Isa> {
    Isa::detect().filter(|_| !disabled_by_env())
}

/// Replaces every matching depthwise convolution of a decluttered model (see
/// the module doc) by a [`DepthwiseConv`]; returns how many and how many
/// clamps (Max/Min ops) they took in.
pub fn rewrite(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut done, mut clamps) = (0, 0);
    for id in model.eval_order()? {
        // Anything unexpected leaves the node to tract, never fails the load.
        let Ok(Some((op, last, fused))) = matching(model, id) else { continue };
        super::stem::replace(model, id, op, "depthwise", last)?;
        done += 1;
        clamps += fused;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok((done, clamps))
}

/// The op that replaces `Conv` node `id` and the chain after it, the outlet
/// it replaces and how many Max/Min it took in.
fn matching(model: &TypedModel, id: usize) -> TractResult<Option<(DepthwiseConv, OutletId, usize)>> {
    let Some(FloatConv { conv, weights, bias, x_shape, out_shape }) = float_conv(model, id)? else { return Ok(None) };
    let spec = &conv.pool_spec;
    if spec.input_channels != spec.output_channels || conv.group != spec.input_channels {
        return Ok(None);
    }
    // Channels-last, a batch of one (or none).
    let (h, w, c, oh, ow) = match (spec.data_format, x_shape, out_shape) {
        (DataFormat::NHWC, &[1, h, w, c], &[1, oh, ow, oc]) if oc == c => (h, w, c, oh, ow),
        (DataFormat::HWC, &[h, w, c], &[oh, ow, oc]) if oc == c => (h, w, c, oh, ow),
        _ => return Ok(None),
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let (sh, sw) = (spec.stride(0), spec.stride(1));
    if c != conv.group || !(1..=MAX_SIDE).contains(&kh) || !(1..=MAX_SIDE).contains(&kw) || sh == 0 || sw == 0 {
        return Ok(None);
    }
    if oh == 0 || ow == 0 || !(bias.len() == c || bias.len() == 1) {
        return Ok(None);
    }
    // Where tap (ky, kx) of channel `c` is in the weights.
    let at: Box<dyn Fn(usize, usize, usize) -> usize> = match conv.kernel_fmt {
        KernelFormat::OIHW if weights.shape() == [c, 1, kh, kw] => Box::new(move |ch, ky, kx| (ch * kh + ky) * kw + kx),
        KernelFormat::OHWI if weights.shape() == [c, kh, kw, 1] => Box::new(move |ch, ky, kx| (ch * kh + ky) * kw + kx),
        KernelFormat::HWIO if weights.shape() == [kh, kw, 1, c] => Box::new(move |ch, ky, kx| (ky * kw + kx) * c + ch),
        _ => return Ok(None),
    };
    let padding = spec.computed_padding(&[h, w]);
    if padding[0].convoluted != oh || padding[1].convoluted != ow {
        return Ok(None);
    }
    let Some((last, bias, clamp, clamps)) =
        following(model, OutletId::new(id, 0), out_shape, &bias, out_shape.len() - 1)?
    else {
        return Ok(None);
    };
    let given = weights.try_as_plain_ram()?.as_slice::<f32>()?;
    let mut packed = vec![0f32; kh * kw * c];
    for ky in 0..kh {
        for kx in 0..kw {
            for ch in 0..c {
                packed[(ky * kw + kx) * c + ch] = given[at(ch, ky, kx)];
            }
        }
    }
    let op = DepthwiseConv {
        channels: c,
        kernel: (kh, kw),
        stride: (sh, sw),
        pad: (padding[0].pad_before, padding[1].pad_before),
        input: (h, w),
        output: (oh, ow),
        weights: packed,
        bias,
        clamp,
        output_shape: out_shape.into(),
    };
    Ok(Some((op, last, clamps)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{Conv, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
    }

    /// One depthwise problem: `[1, H, W, C]`, a kernel, stride, padding and
    /// weight layout.
    #[derive(Debug, Clone)]
    struct Case {
        c: usize,
        hw: (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: PaddingSpec,
        format: KernelFormat,
    }

    /// `x -> Conv -> Add -> Max lo -> Min hi` with the weights as `format`
    /// holds them (the same values whatever the format).
    fn model(case: &Case, format: KernelFormat) -> TypedModel {
        let Case { c, hw, kernel: (kh, kw), stride, ref padding, .. } = *case;
        let oihw = values(2, c * kh * kw);
        let (shape, weights): (Vec<usize>, Vec<f32>) = match format {
            KernelFormat::OIHW | KernelFormat::OHWI => {
                let shape = if format == KernelFormat::OIHW { vec![c, 1, kh, kw] } else { vec![c, kh, kw, 1] };
                (shape, oihw)
            }
            KernelFormat::HWIO => {
                let hwio = (0..kh * kw * c).map(|i| oihw[(i % c) * kh * kw + i / c]).collect();
                (vec![kh, kw, 1, c], hwio)
            }
        };
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, hw.0, hw.1, c])).unwrap();
        let w = model.add_const("w", Tensor::from_shape(&shape, &weights).unwrap()).unwrap();
        let b = model.add_const("b", Tensor::from_shape(&[c], &values(3, c)).unwrap()).unwrap();
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NHWC,
                kernel_shape: tvec!(kh, kw),
                padding: padding.clone(),
                dilations: None,
                strides: Some(tvec!(stride.0, stride.1)),
                input_channels: c,
                output_channels: c,
            },
            kernel_fmt: format,
            group: c,
            q_params: None,
        };
        let mut wire = model.wire_node("conv", conv, &[x, w, b]).unwrap()[0];
        let added = model.add_const("added", Tensor::from_shape(&[1, 1, 1, c], &values(4, c)).unwrap()).unwrap();
        wire = model.wire_node("add", math::add(), &[wire, added]).unwrap()[0];
        let scalar = |v: f32| Tensor::from_shape(&[1, 1, 1, 1], &[v]).unwrap();
        let lo = model.add_const("lo", scalar(-0.5)).unwrap();
        wire = model.wire_node("max", math::max(), &[wire, lo]).unwrap()[0];
        let hi = model.add_const("hi", scalar(0.7)).unwrap();
        wire = model.wire_node("min", math::min(), &[wire, hi]).unwrap()[0];
        model.select_output_outlets(&[wire]).unwrap();
        model
    }

    /// The case's output as tract runs it (its own `DepthWise`, on OIHW
    /// weights: tract 0.23.9 cannot plan a depthwise convolution with HWIO
    /// or OHWI ones), the rewritten op's output with `simd` (over `split`
    /// row ranges, as threads would; empty where this CPU cannot run
    /// `simd`), and how many convolutions and clamps it rewrote.
    fn rewritten(case: &Case, simd: Isa, split: usize) -> (Vec<f32>, Vec<f32>, usize, usize) {
        let Case { c, hw, .. } = *case;
        rewritten_on(case, simd, split, &values(1, hw.0 * hw.1 * c))
    }

    /// [`rewritten`] on `input` (`[H, W, C]`).
    fn rewritten_on(case: &Case, simd: Isa, split: usize, input: &[f32]) -> (Vec<f32>, Vec<f32>, usize, usize) {
        let Case { c, hw, .. } = *case;
        let tensor = Tensor::from_shape(&[1, hw.0, hw.1, c], input).unwrap();
        let plan = model(case, KernelFormat::OIHW).into_optimized().unwrap().into_runnable().unwrap();
        let out = plan.run(tvec!(tensor.into_tvalue())).unwrap();
        let before = out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let mut model = model(case, case.format);
        let (done, clamps) = rewrite(&mut model).unwrap();
        let op = model.nodes.iter().find_map(|n| n.op_as::<DepthwiseConv>()).cloned();
        let after = match op {
            Some(op) if simd.runs_here() => {
                let (oh, row) = (op.output.0, op.output.1 * c);
                let mut after = vec![f32::NAN; oh * row];
                // Row ranges as uneven as a split gets.
                let mut first = 0;
                for part in 0..split {
                    let end = (part + 1) * oh / split;
                    op.run_with(simd, input, first, &mut after[first * row..end * row]);
                    first = end;
                }
                after
            }
            _ => vec![],
        };
        (before, after, done, clamps)
    }

    fn simds() -> Vec<Isa> {
        match Isa::detect() {
            Some(Isa::Avx512f) => vec![Isa::Avx512f, Isa::Avx2Fma],
            Some(Isa::Avx2Fma) => vec![Isa::Avx2Fma],
            None => vec![],
        }
    }

    #[test]
    fn the_depthwise_op_matches_tracts_own_on_every_padding_stride_kernel_and_odd_width() {
        if simds().is_empty() {
            eprintln!("no AVX2+FMA here: depthwise convolutions stay with tract");
            return;
        }
        let explicit = |b: [usize; 2], a: [usize; 2]| PaddingSpec::Explicit(tvec!(b[0], b[1]), tvec!(a[0], a[1]));
        let case = |c, hw, kernel, stride, padding, format| Case { c, hw, kernel, stride, padding, format };
        let cases = vec![
            // EfficientNet-Lite0's: TensorFlow's SAME at stride 2 (padded
            // after only), 3x3 and 5x5 at stride 1.
            case(96, (112, 112), (3, 3), (2, 2), explicit([0, 0], [1, 1]), KernelFormat::OIHW),
            case(144, (28, 28), (5, 5), (1, 1), explicit([2, 2], [2, 2]), KernelFormat::OIHW),
            case(1152, (7, 7), (5, 5), (1, 1), explicit([2, 2], [2, 2]), KernelFormat::OIHW),
            // Widths off every vector size, maps narrower than the kernel.
            case(7, (5, 9), (3, 3), (1, 1), PaddingSpec::SameUpper, KernelFormat::HWIO),
            case(17, (1, 1), (3, 3), (1, 1), explicit([1, 1], [1, 1]), KernelFormat::OHWI),
            case(33, (2, 3), (5, 5), (2, 2), PaddingSpec::SameLower, KernelFormat::OIHW),
            case(65, (13, 11), (7, 7), (2, 1), explicit([3, 2], [3, 4]), KernelFormat::HWIO),
            case(24, (9, 10), (3, 5), (3, 2), PaddingSpec::Valid, KernelFormat::OIHW),
            // Padding that is not a multiple of the stride (PyTorch exports'
            // stride-2 3x3 with one each side).
            case(40, (15, 16), (3, 3), (2, 2), explicit([1, 1], [1, 1]), KernelFormat::OIHW),
            case(20, (8, 9), (5, 5), (2, 3), explicit([1, 2], [2, 1]), KernelFormat::OHWI),
            // Padding as large as the kernel (whole output rows and
            // columns in the padding: the bias alone), and a stride larger
            // than the kernel (inputs skipped).
            case(9, (4, 5), (3, 3), (1, 1), explicit([3, 4], [3, 3]), KernelFormat::OIHW),
            case(16, (10, 11), (2, 2), (3, 3), explicit([1, 0], [2, 1]), KernelFormat::OIHW),
            case(1, (6, 6), (1, 1), (1, 1), PaddingSpec::Valid, KernelFormat::OIHW),
        ];
        for simd in simds() {
            let mut bit = 0;
            for (i, case) in cases.iter().enumerate() {
                let what = format!("{simd:?} {case:?}");
                let (before, after, done, clamps) = rewritten(case, simd, 1 + i % 3);
                assert_eq!((done, clamps), (1, 2), "{what}: not rewritten with both clamps");
                assert_eq!(before.len(), after.len(), "{what}");
                // The clamp is fused: values at both bounds, and inside.
                assert!(after.iter().all(|v| (-0.5..=0.7).contains(v)), "{what}");
                bit += (after.contains(&-0.5) && after.contains(&0.7)) as usize;
                for (j, (a, b)) in before.iter().zip(&after).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{what}: [{j}] tract {a} vs {b}");
                }
            }
            // Both bounds bite in every case but the single-channel 1x1 one
            // (36 outputs of one weight, which may all fall inside) and
            // the one whose outputs are mostly the bias alone.
            assert!(bit >= cases.len() - 2, "{simd:?}: the clamp bit at both ends in only {bit} cases");
        }
    }

    #[test]
    fn convolutions_the_depthwise_op_is_not_for_are_left_to_tract() {
        // The match does not depend on the CPU (`rewritten` runs the op
        // only where the CPU can; aarch64 checks the match alone).
        let simd = Isa::Avx2Fma;
        let case = |kernel, stride| Case {
            c: 8,
            hw: (20, 20),
            kernel,
            stride,
            padding: PaddingSpec::Valid,
            format: KernelFormat::OIHW,
        };
        // A 9x9 kernel: more taps than a call holds.
        let (_, _, done, _) = rewritten(&case((9, 9), (1, 1)), simd, 1);
        assert_eq!(done, 0);
        let (_, _, done, _) = rewritten(&case((3, 3), (1, 1)), simd, 1);
        assert_eq!(done, 1);
    }

    #[test]
    fn a_nan_input_comes_out_as_tract_makes_it_through_the_clamp() {
        let case = Case {
            c: 16,
            hw: (5, 5),
            kernel: (3, 3),
            stride: (1, 1),
            padding: PaddingSpec::Explicit(tvec!(1, 1), tvec!(1, 1)),
            format: KernelFormat::OIHW,
        };
        let mut input = values(1, 5 * 5 * 16);
        input[12 * 16 + 3] = f32::NAN;
        input[0] = f32::INFINITY;
        for simd in simds() {
            let (before, after, done, _) = rewritten_on(&case, simd, 1, &input);
            assert_eq!((done, before.len()), (1, after.len()));
            // tract's Max and Min are `f32::max`/`min`: a NaN becomes the
            // bound; the op's clamp keeps that, NaN for NaN.
            assert!(!before.iter().any(|v| v.is_nan()), "tract's clamp let a NaN through");
            for (j, (a, b)) in before.iter().zip(&after).enumerate() {
                assert!(a == b || (a - b).abs() <= 1e-5, "{simd:?} [{j}]: tract {a} vs {b}");
            }
        }
    }
}
