//! The first convolution of a vision model (the stem: 3 input channels, a
//! 3x3 kernel at stride 2 on EfficientNet-Lite0 and most mobile networks),
//! and any other convolution with as few input channels, as one direct op
//! for tract on x86-64.
//!
//! tract 0.23.9 runs it as a zero `Pad` of the whole image, a lazy im2col
//! packing 27 values per output position, a matrix product of only 27 terms
//! per output, then the clamps after it (the quantiser's saturation and
//! ReLU6 on the demo's INT8 file) as a separate pass over the 1.6 MB output:
//! `bench --profile` on the demo model, the Pad 0.35 ms, the product with
//! its packing 0.4 ms and the clamps 0.5 ms, about 1.3 ms, where ONNX
//! Runtime takes 0.2 ms for the stem. With so few input channels
//! a matrix product has nothing to reuse; the direct form is what XNNPACK
//! and ONNX Runtime run for these layers.
//!
//! Here every padded input row the outputs reach is split once into its
//! `stride` phases (every other column for stride 2), so that each kernel
//! tap of 16 (AVX-512F) or 8 (AVX2) neighbouring outputs is one contiguous
//! load; each load feeds 8 output channels' accumulators, which start at the
//! bias, and the clamp is applied before the one store of each output
//! vector. The padding is read as zeros, never copied into a padded image.
//! It goes in as a graph rewrite between tract's declutter and its codegen,
//! like the 1x1 kernel (`pointwise.rs`): a decluttered `Conv` over a
//! channels-first image (batch 1), group 1, OIHW weights, at most 4 input
//! channels, kernels up to 7x7, strides up to 4, no dilation, with the bias
//! Add and the Max/Min of scalar constants that follow it. Only where AVX2
//! and FMA are found at run time; aarch64 keeps tract's own path.
//! `LABELCAST_TRACT_STEM=off` keeps tract's path everywhere (for comparing
//! the two in one build).

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::pointwise::Isa;

/// Output channels per accumulator block.
const CO: usize = 8;

thread_local! {
    /// The input rows split into phases ([`StemConv::phases`]), reused.
    static PHASES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A direct convolution of a `[Cin, H, W]` image (batch 1) to `[Cout, OH,
/// OW]` with its bias and clamp; see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct StemConv {
    pub cin: usize,
    pub cout: usize,
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
    /// The weights in blocks of [`CO`] output channels: block `b`, tap `t`
    /// (`(ci * KH + ky) * KW + kx`), channel `j` at `[(b * taps + t) * CO +
    /// j]`, zero past `cout`.
    pub packed: Vec<f32>,
    /// `[Cout]`.
    pub bias: Vec<f32>,
    /// Lower and upper bound of a fused Max/Min, if fused.
    pub clamp: (Option<f32>, Option<f32>),
    /// The output's shape as the graph has it (`[1, Cout, OH, OW]` or
    /// `[Cout, OH, OW]`).
    pub output_shape: TVec<usize>,
}

impl Eq for StemConv {}

impl Op for StemConv {
    fn name(&self) -> StaticName {
        "StemConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {} channels, kernel {:?}, stride {:?}, pad {:?}, {:?} -> {:?}, clamp {:?}",
            self.cin, self.cout, self.kernel, self.stride, self.pad, self.input, self.output, self.clamp
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for StemConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let (h, w) = self.input;
        ensure!(input.len() == self.cin * h * w, "StemConv: {} input values for {}x{}x{}", input.len(), self.cin, h, w);
        // SAFETY: `run` writes every output element (each channel, row and
        // column below the output's size).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            self.run(input, view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for StemConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Outputs per vector of the kernel for `isa` (the CPU detection and its
/// masking with `TRACT_CPU_ISA` are the 1x1 kernel's, [`Isa::detect`]).
fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512f => 16,
        Isa::Avx2Fma => 8,
    }
}

impl StemConv {
    /// `output` (`[Cout, OH, OW]`) from `input` (`[Cin, H, W]`) with the best
    /// kernel this CPU has.
    ///
    /// # Panics
    /// If the slices are not those sizes (the op checks them first), or off
    /// a CPU with AVX2 and FMA (the rewrite only runs where they are).
    pub fn run(&self, input: &[f32], output: &mut [f32]) {
        let simd = Isa::detect().expect("StemConv is only wired in where AVX2 and FMA are");
        self.run_with(simd, input, output)
    }

    /// [`StemConv::run`] with the given kernel.
    ///
    /// # Panics
    /// As `run`, and if this CPU lacks `simd`'s features.
    pub fn run_with(&self, simd: Isa, input: &[f32], output: &mut [f32]) {
        assert_eq!(input.len(), self.cin * self.input.0 * self.input.1);
        assert_eq!(output.len(), self.cout * self.output.0 * self.output.1);
        assert!(simd.runs_here(), "{simd:?} on a CPU without it");
        // Taken out, not borrowed (see pointwise.rs's buffers), and kept
        // for the next frame: 610 KB on the demo's 224x224 stem.
        let mut phases = PHASES.take();
        self.phases(input, lanes(simd), &mut phases);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected on this CPU (above); `phases`
        // is as long as the kernels read (see `phases`), `output` as checked.
        unsafe {
            match simd {
                Isa::Avx512f => x86::rows512(self, &phases, output),
                Isa::Avx2Fma => x86::rows256(self, &phases, output),
            }
        }
        // Not reached off x86-64: `Isa::detect()` is None there, and the
        // assert above stops first.
        #[cfg(not(target_arch = "x86_64"))]
        let _ = output;
        PHASES.set(phases);
    }

    /// Phase length: every vector of `lanes` outputs plus the kernel's reach
    /// (`(KW - 1) / SW`), for the rows of [`StemConv::phases`].
    fn phase_len(&self, lanes: usize) -> usize {
        self.output.1.div_ceil(lanes) * lanes + (self.kernel.1 - 1) / self.stride.1
    }

    /// Padded input rows the outputs reach: `(OH - 1) * SH + KH`.
    fn padded_rows(&self) -> usize {
        (self.output.0 - 1) * self.stride.0 + self.kernel.0
    }

    /// Every padded input row `r` of channel `ci`, split into its `SW`
    /// phases: phase `p` at `((ci * padded_rows + r) * SW + p) * phase_len`
    /// holds padded columns `p, p + SW, ...`, zeros where the padding is.
    fn phases(&self, input: &[f32], lanes: usize, phases: &mut Vec<f32>) {
        let (h, w) = self.input;
        let sw = self.stride.1;
        let (pt, pl) = self.pad;
        let (rows, phase_len) = (self.padded_rows(), self.phase_len(lanes));
        phases.clear();
        phases.resize(self.cin * rows * sw * phase_len, 0.0);
        for ci in 0..self.cin {
            for r in 0..rows {
                let Some(iy) = r.checked_sub(pt).filter(|&iy| iy < h) else { continue };
                let row = &input[(ci * h + iy) * w..][..w];
                for p in 0..sw {
                    let phase = &mut phases[((ci * rows + r) * sw + p) * phase_len..][..phase_len];
                    // Padded column `x * sw + p` is input column `x * sw + p
                    // - pl`: inside the row for `x` in `first..end`.
                    let first = pl.saturating_sub(p).div_ceil(sw).min(phase_len);
                    let end = (w + pl).saturating_sub(p).div_ceil(sw).clamp(first, phase_len);
                    if first < end {
                        let from = first * sw + p - pl;
                        for (v, x) in phase[first..end].iter_mut().zip(row[from..].iter().step_by(sw)) {
                            *v = *x;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    // The accumulators are indexed in loops of a constant length, which the
    // compiler unrolls into registers.
    #![allow(clippy::needless_range_loop)]
    use super::{CO, StemConv};
    use std::arch::x86_64::*;

    /// Where output row `oy`'s tap `(ci, ky, kx)` reads its first input, for
    /// the output column `x0`.
    #[inline(always)]
    fn tap_offset(
        op: &StemConv,
        phase_len: usize,
        (oy, x0): (usize, usize),
        (ci, ky, kx): (usize, usize, usize),
    ) -> usize {
        let (sh, sw) = op.stride;
        ((ci * op.padded_rows() + oy * sh + ky) * sw + kx % sw) * phase_len + x0 + kx / sw
    }

    /// All outputs, 16 columns times 8 channels per step.
    ///
    /// # Safety
    /// AVX-512F and FMA; `phases` from `op.phases(_, 16)`, `output` `[Cout,
    /// OH, OW]`.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn rows512(op: &StemConv, phases: &[f32], output: &mut [f32]) {
        let (oh, ow) = op.output;
        let (kh, kw) = op.kernel;
        let taps = op.cin * kh * kw;
        let phase_len = op.phase_len(16);
        let (lo, hi) = (_mm512_set1_ps(op.clamp.0.unwrap_or(0.0)), _mm512_set1_ps(op.clamp.1.unwrap_or(0.0)));
        for oy in 0..oh {
            for b in 0..op.cout.div_ceil(CO) {
                let weights = &op.packed[b * taps * CO..][..taps * CO];
                for x0 in (0..ow).step_by(16) {
                    let mut acc = [_mm512_setzero_ps(); CO];
                    for j in 0..CO {
                        acc[j] = _mm512_set1_ps(op.bias.get(b * CO + j).copied().unwrap_or(0.0));
                    }
                    let mut t = 0;
                    for ci in 0..op.cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let at = tap_offset(op, phase_len, (oy, x0), (ci, ky, kx));
                                // SAFETY: 16 floats from `at`, inside the phase (its
                                // length covers every vector plus the reach).
                                let x = unsafe { _mm512_loadu_ps(phases[at..at + 16].as_ptr()) };
                                for j in 0..CO {
                                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(weights[t * CO + j]), x, acc[j]);
                                }
                                t += 1;
                            }
                        }
                    }
                    let n = (ow - x0).min(16);
                    let mask: __mmask16 = if n == 16 { 0xffff } else { (1u32 << n) as u16 - 1 };
                    for j in 0..CO.min(op.cout - b * CO) {
                        let mut v = acc[j];
                        // Only the bounds that were fused.
                        if op.clamp.0.is_some() {
                            v = _mm512_max_ps(v, lo);
                        }
                        if op.clamp.1.is_some() {
                            v = _mm512_min_ps(v, hi);
                        }
                        let out = &mut output[((b * CO + j) * oh + oy) * ow + x0..][..n];
                        // SAFETY: the mask keeps the `n` elements of `out`.
                        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v) };
                    }
                }
            }
        }
    }

    /// [`rows512`] with 8 columns per step.
    ///
    /// # Safety
    /// AVX2 and FMA; `phases` from `op.phases(_, 8)`, `output` `[Cout, OH, OW]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows256(op: &StemConv, phases: &[f32], output: &mut [f32]) {
        let (oh, ow) = op.output;
        let (kh, kw) = op.kernel;
        let taps = op.cin * kh * kw;
        let phase_len = op.phase_len(8);
        let (lo, hi) = (_mm256_set1_ps(op.clamp.0.unwrap_or(0.0)), _mm256_set1_ps(op.clamp.1.unwrap_or(0.0)));
        for oy in 0..oh {
            for b in 0..op.cout.div_ceil(CO) {
                let weights = &op.packed[b * taps * CO..][..taps * CO];
                for x0 in (0..ow).step_by(8) {
                    let mut acc = [_mm256_setzero_ps(); CO];
                    for j in 0..CO {
                        acc[j] = _mm256_set1_ps(op.bias.get(b * CO + j).copied().unwrap_or(0.0));
                    }
                    let mut t = 0;
                    for ci in 0..op.cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let at = tap_offset(op, phase_len, (oy, x0), (ci, ky, kx));
                                // SAFETY: 8 floats from `at`, inside the phase.
                                let x = unsafe { _mm256_loadu_ps(phases[at..at + 8].as_ptr()) };
                                for j in 0..CO {
                                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(weights[t * CO + j]), x, acc[j]);
                                }
                                t += 1;
                            }
                        }
                    }
                    let n = (ow - x0).min(8);
                    for j in 0..CO.min(op.cout - b * CO) {
                        let mut v = acc[j];
                        if op.clamp.0.is_some() {
                            v = _mm256_max_ps(v, lo);
                        }
                        if op.clamp.1.is_some() {
                            v = _mm256_min_ps(v, hi);
                        }
                        let out = &mut output[((b * CO + j) * oh + oy) * ow + x0..][..n];
                        if n == 8 {
                            // SAFETY: 8 floats into 8.
                            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
                        } else {
                            let mut lanes = [0f32; 8];
                            // SAFETY: 8 floats into 8.
                            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                            out.copy_from_slice(&lanes[..n]);
                        }
                    }
                }
            }
        }
    }
}

/// Whether the rewrite is turned off (`LABELCAST_TRACT_STEM=off`).
pub fn disabled_by_env() -> bool {
    std::env::var("LABELCAST_TRACT_STEM").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

/// The kernel stems are rewritten for on this CPU (AVX2+FMA or AVX-512F),
/// `None` without them or when turned off.
pub fn choice() -> Option<Isa> {
    Isa::detect().filter(|_| !disabled_by_env())
}

/// Replaces every matching convolution of a decluttered model (see the
/// module doc) by a [`StemConv`]; returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        // Anything unexpected leaves the node to tract, never fails the load.
        let Ok(Some((op, last))) = matching(model, id) else { continue };
        replace(model, id, op, "stem", last)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Wires `op` on node `id`'s first input (named after the node, with
/// `suffix`) in place of everything from the node up to `last`: the
/// convolution and the ops after it that `op` took in. The depthwise op
/// (`depthwise_op.rs`) is wired in the same way.
pub(super) fn replace<O: TypedOp>(
    model: &mut TypedModel,
    id: usize,
    op: O,
    suffix: &str,
    last: OutletId,
) -> TractResult<()> {
    let name = format!("{}.{suffix}", model.nodes[id].name);
    let mut patch = TypedModelPatch::default();
    let input = patch.tap_model(model, model.nodes[id].inputs[0])?;
    let wire = patch.wire_node(name, op, &[input])?;
    patch.shunt_outside(model, last, wire[0])?;
    patch.apply(model)
}

/// A decluttered `Conv` node that a direct op of labelcast's may take: two
/// spatial axes, no dilation, not quantised, float input and output, with
/// constant float weights and bias (its three inputs). The stem and the
/// depthwise op (`depthwise_op.rs`) start their matches from it.
pub(super) struct FloatConv<'a> {
    pub conv: &'a Conv,
    pub weights: Arc<Tensor>,
    pub bias: Arc<Tensor>,
    pub x_shape: &'a [usize],
    pub out_shape: &'a [usize],
}

/// Node `id` as a [`FloatConv`], `None` if it is not one.
pub(super) fn float_conv(model: &TypedModel, id: usize) -> TractResult<Option<FloatConv<'_>>> {
    let node = &model.nodes[id];
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    if conv.q_params.is_some()
        || node.inputs.len() != 3
        || spec.kernel_shape.len() != 2
        || spec.dilations().iter().any(|&d| d != 1)
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let (Some(weights), Some(bias)) = (facts[1].konst.clone(), facts[2].konst.clone()) else { return Ok(None) };
    let output_fact = model.outlet_fact(OutletId::new(id, 0))?;
    if facts[0].datum_type != f32::datum_type()
        || output_fact.datum_type != f32::datum_type()
        || weights.datum_type() != f32::datum_type()
        || bias.datum_type() != f32::datum_type()
    {
        return Ok(None);
    }
    let (Some(x_shape), Some(out_shape)) = (facts[0].shape.as_concrete(), output_fact.shape.as_concrete()) else {
        return Ok(None);
    };
    Ok(Some(FloatConv { conv, weights, bias, x_shape, out_shape }))
}

/// The op that replaces `Conv` node `id` and the chain after it, with the
/// outlet it replaces.
fn matching(model: &TypedModel, id: usize) -> TractResult<Option<(StemConv, OutletId)>> {
    let Some(FloatConv { conv, weights, bias, x_shape, out_shape }) = float_conv(model, id)? else { return Ok(None) };
    let spec = &conv.pool_spec;
    if conv.group != 1 || conv.kernel_fmt != KernelFormat::OIHW {
        return Ok(None);
    }
    // Channels-first, a batch of one (or none).
    let (cin, h, w, cout, oh, ow) = match (spec.data_format, x_shape, out_shape) {
        (DataFormat::NCHW, &[1, cin, h, w], &[1, cout, oh, ow]) => (cin, h, w, cout, oh, ow),
        (DataFormat::CHW, &[cin, h, w], &[cout, oh, ow]) => (cin, h, w, cout, oh, ow),
        _ => return Ok(None),
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let (sh, sw) = (spec.stride(0), spec.stride(1));
    if !(1..=4).contains(&cin) || !(1..=7).contains(&kh) || !(1..=7).contains(&kw) || !(1..=4).contains(&sh) {
        return Ok(None);
    }
    if !(1..=4).contains(&sw) || ow == 0 || oh == 0 || cout == 0 {
        return Ok(None);
    }
    if weights.shape() != [cout, cin, kh, kw] || !(bias.len() == cout || bias.len() == 1) {
        return Ok(None);
    }
    let padding = spec.computed_padding(&[h, w]);
    if padding[0].convoluted != oh || padding[1].convoluted != ow {
        return Ok(None);
    }
    let Some((last, bias, clamp, _)) = following(model, OutletId::new(id, 0), out_shape, &bias, out_shape.len() - 3)?
    else {
        return Ok(None);
    };
    let oihw = weights.try_as_plain_ram()?.as_slice::<f32>()?;
    let taps = cin * kh * kw;
    let mut packed = vec![0f32; cout.div_ceil(CO) * taps * CO];
    for co in 0..cout {
        for t in 0..taps {
            packed[((co / CO) * taps + t) * CO + co % CO] = oihw[co * taps + t];
        }
    }
    let op = StemConv {
        cin,
        cout,
        kernel: (kh, kw),
        stride: (sh, sw),
        pad: (padding[0].pad_before, padding[1].pad_before),
        input: (h, w),
        output: (oh, ow),
        packed,
        bias,
        clamp,
        output_shape: out_shape.into(),
    };
    Ok(Some((op, last)))
}

/// What follows a convolution's output `start` that its op does itself:
/// Adds of a per-channel (all of it along `channel_axis`: `[1, Cout, 1,
/// 1]`, `[Cout, 1, 1]`, `[1, 1, 1, Cout]`...) or scalar constant before any
/// clamp, then Max/Min with scalar constants, each the only consumer of the
/// last and not a model output. Returns the outlet the op replaces, the
/// convolution's own bias (`[Cout]` or one value) plus what was added, the
/// clamp, and how many Max/Min it took in; `None` for a Max above a Min
/// (an empty clamp, which the op's order would not match). The depthwise op
/// (`depthwise_op.rs`) calls it with the channels last.
pub(super) type Following = (OutletId, Vec<f32>, (Option<f32>, Option<f32>), usize);

pub(super) fn following(
    model: &TypedModel,
    start: OutletId,
    out_shape: &[usize],
    own_bias: &Tensor,
    channel_axis: usize,
) -> TractResult<Option<Following>> {
    let cout = out_shape[channel_axis];
    let own = own_bias.try_as_plain_ram()?.as_slice::<f32>()?;
    if !(own.len() == cout || own.len() == 1) {
        return Ok(None);
    }
    let mut last = start;
    let mut added: Vec<f32> = (0..cout).map(|c| own[if own.len() == 1 { 0 } else { c }]).collect();
    let mut clamp: (Option<f32>, Option<f32>) = (None, None);
    let mut clamps = 0;
    while let Some(next) = model.single_succ(last.node)? {
        if model.outlet_successors(last).len() != 1 || model.output_outlets()?.contains(&last) {
            break;
        }
        // A binary op with one float constant (the 1x1 rewrite's test).
        let Some((name, _, k)) = super::pointwise::binary_with_constant(model, next) else { break };
        let next_fact = model.outlet_fact(OutletId::new(next.id, 0))?;
        if next_fact.datum_type != f32::datum_type() || next_fact.shape.as_concrete() != Some(out_shape) {
            break;
        }
        let values = k.try_as_plain_ram()?.as_slice::<f32>()?;
        let per_channel = k.len() == cout
            && k.rank() <= out_shape.len()
            && k.shape().iter().rev().zip(out_shape.iter().rev()).enumerate().all(|(i, (&d, _))| {
                let axis = out_shape.len() - 1 - i;
                if axis == channel_axis { d == cout } else { d == 1 }
            });
        match name.as_str() {
            "Add" if clamp == (None, None) && (per_channel || k.len() == 1) => {
                for (c, a) in added.iter_mut().enumerate() {
                    *a += values[if k.len() == 1 { 0 } else { c }];
                }
            }
            "Max" if k.len() == 1 && !values[0].is_nan() => {
                clamp.0 = Some(clamp.0.map_or(values[0], |lo: f32| lo.max(values[0])));
                clamps += 1;
            }
            "Min" if k.len() == 1 && !values[0].is_nan() => {
                clamp.1 = Some(clamp.1.map_or(values[0], |hi: f32| hi.min(values[0])));
                clamps += 1;
            }
            _ => break,
        }
        last = OutletId::new(next.id, 0);
    }
    if let (Some(lo), Some(hi)) = clamp
        && lo > hi
    {
        return Ok(None);
    }
    Ok(Some((last, added, clamp, clamps)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math;

    use super::super::pointwise::tests::values;

    /// `image -> Conv -> Max lo -> Min hi` in tract: its output before and
    /// after [`rewrite`] (the rewritten graph run with `simd`), and how many
    /// it rewrote.
    fn rewritten(
        cin: usize,
        cout: usize,
        hw: (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: PaddingSpec,
        simd: Isa,
    ) -> (Vec<f32>, Vec<f32>, usize) {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, cin, hw.0, hw.1])).unwrap();
        let w =
            Tensor::from_shape(&[cout, cin, kernel.0, kernel.1], &values(2, cout * cin * kernel.0 * kernel.1)).unwrap();
        let w = model.add_const("w", w).unwrap();
        let b = model.add_const("b", Tensor::from_shape(&[cout], &values(3, cout)).unwrap()).unwrap();
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec!(kernel.0, kernel.1),
                padding,
                dilations: None,
                strides: Some(tvec!(stride.0, stride.1)),
                input_channels: cin,
                output_channels: cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let mut wire = model.wire_node("conv", conv, &[x, w, b]).unwrap()[0];
        let scalar = |v: f32| Tensor::from_shape(&[1, 1, 1, 1], &[v]).unwrap();
        let lo = model.add_const("lo", scalar(-0.5)).unwrap();
        wire = model.wire_node("max", math::max(), &[wire, lo]).unwrap()[0];
        let hi = model.add_const("hi", scalar(0.7)).unwrap();
        wire = model.wire_node("min", math::min(), &[wire, hi]).unwrap()[0];
        model.select_output_outlets(&[wire]).unwrap();
        let input = Tensor::from_shape(&[1, cin, hw.0, hw.1], &values(1, cin * hw.0 * hw.1)).unwrap();
        let plan = model.clone().into_optimized().unwrap().into_runnable().unwrap();
        let out = plan.run(tvec!(input.clone().into_tvalue())).unwrap();
        let before = out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let done = rewrite(&mut model).unwrap();
        // The rewritten graph is the op alone: run it with `simd`.
        let op = model.nodes.iter().find_map(|n| n.op_as::<StemConv>()).cloned();
        let after = match op {
            Some(op) => {
                let mut after = vec![f32::NAN; cout * op.output.0 * op.output.1];
                op.run_with(simd, input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(), &mut after);
                after
            }
            None => vec![],
        };
        (before, after, done)
    }

    #[test]
    fn the_stem_kernels_match_tracts_convolution_on_every_padding_stride_and_odd_size() {
        let simds = match Isa::detect() {
            Some(Isa::Avx512f) => vec![Isa::Avx512f, Isa::Avx2Fma],
            Some(Isa::Avx2Fma) => vec![Isa::Avx2Fma],
            None => {
                eprintln!("no AVX2+FMA here: the stem stays with tract");
                return;
            }
        };
        let explicit = |b: [usize; 2], a: [usize; 2]| PaddingSpec::Explicit(tvec!(b[0], b[1]), tvec!(a[0], a[1]));
        type Case = (usize, usize, (usize, usize), (usize, usize), (usize, usize), PaddingSpec);
        let cases: Vec<Case> = vec![
            // EfficientNet-Lite0's stem: TensorFlow's SAME, padded after only.
            (3, 32, (224, 224), (3, 3), (2, 2), explicit([0, 0], [1, 1])),
            (3, 13, (31, 45), (3, 3), (2, 2), PaddingSpec::SameUpper),
            (3, 8, (17, 20), (3, 3), (1, 1), explicit([1, 1], [1, 1])),
            (1, 5, (9, 40), (7, 7), (2, 2), explicit([3, 3], [3, 3])),
            (4, 3, (12, 33), (5, 3), (3, 1), PaddingSpec::Valid),
            (2, 24, (10, 10), (1, 1), (4, 4), PaddingSpec::Valid),
            (3, 7, (8, 50), (3, 5), (2, 3), PaddingSpec::SameLower),
        ];
        for simd in simds {
            for (cin, cout, hw, kernel, stride, padding) in cases.clone() {
                let what = format!("{simd:?} {cin}->{cout} {hw:?} kernel {kernel:?} stride {stride:?} {padding:?}");
                let (before, after, done) = rewritten(cin, cout, hw, kernel, stride, padding, simd);
                assert_eq!(done, 1, "{what}: not rewritten");
                assert_eq!(before.len(), after.len(), "{what}");
                // The clamp is fused: values at both bounds, and inside.
                assert!(after.iter().all(|v| (-0.5..=0.7).contains(v)), "{what}");
                assert!(after.contains(&-0.5) && after.contains(&0.7), "{what}: the clamp never bit");
                for (i, (a, b)) in before.iter().zip(&after).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{what}: [{i}] tract {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn convolutions_the_stem_kernel_is_not_for_are_left_to_tract() {
        // The match does not depend on the CPU (nothing is run here).
        let simd = Isa::Avx2Fma;
        // Eight input channels: a matrix product has something to reuse.
        let (_, _, done) = rewritten(8, 16, (20, 20), (3, 3), (2, 2), PaddingSpec::Valid, simd);
        assert_eq!(done, 0);
        // A 9x9 kernel.
        let (_, _, done) = rewritten(3, 4, (20, 20), (9, 9), (1, 1), PaddingSpec::Valid, simd);
        assert_eq!(done, 0);
    }
}
