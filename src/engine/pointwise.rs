//! Pointwise (1x1) convolutions without packing the activations, for tract
//! on x86-64 (channels-last activations first of all, channels-first too).
//!
//! After the depthwise kernels (`depthwise.rs`) moved tract's depthwise
//! regions to channels-last, the 1x1 convolutions between them were most of
//! tract's time on the demo model (`bench --profile`: 12.5 ms of matrix
//! products plus 1.7 ms packing their activations, of 18.0 ms; ONNX Runtime
//! runs the whole model in 10.1 ms). tract 0.23.9 runs each as a general
//! matrix product: it copies the activations into panels first, and its
//! x86-64 kernels, which vectorise along the positions, write a
//! channels-last output one element at a time. With 16 or 24 input channels
//! (the first layers, the largest maps) a tile does little arithmetic per
//! output, so the copies and the scalar stores dominate: the first expansion
//! ran at about 10 GMAC/s.
//!
//! Here a 1x1 convolution on a channels-last tensor is what it is: every
//! position's row of `Cin` values times a `[Cin, Cout]` weight matrix. The
//! weights are packed once into blocks of 16 (AVX2) or 32 (AVX-512F) output
//! channels; the kernel broadcasts each input value straight from its row
//! (no copy), accumulates `MR` positions times one block in registers, adds
//! the bias, clamps (a following ReLU/ReLU6) and stores whole vectors along
//! the output channels. The layout XNNPACK and ONNX Runtime use for the same
//! layers.
//!
//! It goes in as a graph rewrite between tract's declutter (which settles
//! the layout) and its codegen: a decluttered `EinSum` with a constant
//! two-axis weight, contracting the activation's channel axis (last or
//! first) into the output's (last or first; a channels-first output is
//! transposed from a channels-last scratch), with the `Add` of a
//! per-channel constant (bias) and `Max`/`Min`
//! of scalar constants that follow it, becomes one [`PointwiseConv`]. Only on
//! x86-64 with AVX2 and FMA (AVX-512F where present); aarch64 keeps tract's
//! NEON path. With two or more inference threads the positions are split
//! over tract's own thread pool (`bench --threads 2`, five alternated runs:
//! weights-only p50 median 12.3 ms against 14.6 with tract's multithreaded
//! product). `LABELCAST_TRACT_POINTWISE=off` keeps tract's own
//! product everywhere (for comparing the two in one build).
//!
//! Weights that are int8 values times a per-channel scale, as the default
//! weights-only INT8 mode leaves them (tract folds each DequantizeLinear into
//! a float constant), are found from their values ([`int8_grid`]) and kept
//! as int8: on the demo model the 1x1 weights are 4.0 M of its 4.4 M, so
//! this is 12 MB less resident memory (`labelcast bench`: 59-63 MB -> 50 MB).
//! Each block of output channels (32 on AVX-512F, 16 on AVX2) is widened
//! back to floats once per inference (per thread with several) into a
//! reused buffer and used for every position, which ran
//! as fast as float weights (p50 14.70 vs 14.69 ms, medians of four
//! alternated runs); widening inside the tile, once per 8 positions, was
//! 4 % slower. `LABELCAST_TRACT_POINTWISE=float` keeps float weights.

use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// The instruction set the kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// 16 output channels per block (two 8-lane vectors), 6 positions.
    Avx2Fma,
    /// 32 output channels per block (two 16-lane vectors), 8 positions.
    Avx512f,
}

impl Isa {
    /// What this CPU offers, `None` without AVX2 and FMA (or off x86-64).
    /// tract's view of the CPU (`TRACT_CPU_ISA` masks features, as for its
    /// own kernels) and the CPU's own answer must both have it.
    pub fn detect() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            use tract_onnx::prelude::tract_linalg::isa::{self, Isa as Feature, IsaReq};
            let tracts = isa::native();
            let wants = |features: &'static [Feature]| IsaReq::ANY.needing(features).satisfied_by(tracts);
            if has!("avx512f") && has!("fma") && wants(&[Feature::X86_64Avx512f, Feature::X86_64Fma]) {
                return Some(Isa::Avx512f);
            }
            if has!("avx2") && has!("fma") && wants(&[Feature::X86_64Avx2, Feature::X86_64Fma]) {
                return Some(Isa::Avx2Fma);
            }
        }
        None
    }

    /// Whether this CPU runs this ISA's kernels (AVX2+FMA also where
    /// AVX-512F was found).
    pub fn runs_here(self) -> bool {
        match (self, Isa::detect()) {
            (_, None) => false,
            (Isa::Avx2Fma, Some(_)) => true,
            (Isa::Avx512f, Some(best)) => best == Isa::Avx512f,
        }
    }

    /// Positions per tile.
    pub fn rows(self) -> usize {
        match self {
            Isa::Avx2Fma => 6,
            Isa::Avx512f => 8,
        }
    }

    /// Output channels per weight block.
    pub fn block(self) -> usize {
        match self {
            Isa::Avx2Fma => 16,
            Isa::Avx512f => 32,
        }
    }

    /// The instruction set alone, for kernels other than this one's tiles
    /// (the stem kernel's engine line).
    pub fn features(self) -> &'static str {
        match self {
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512f => "avx512f",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2Fma => "avx2+fma 6x16",
            Isa::Avx512f => "avx512f 8x32",
        }
    }
}

/// Whether this CPU has the 8-bit dot products [`Precision::Int8`] needs
/// (AVX-512 VNNI, with AVX-512BW for the byte conversions), besides
/// AVX-512F (checked by [`Isa::detect`]).
pub fn dot_products_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        use tract_onnx::prelude::tract_linalg::isa::{self, Isa as Feature, IsaReq};
        // tract's view too: `TRACT_CPU_ISA=-avx512vnni` masks it, as for the
        // other kernels.
        let tracts = IsaReq::ANY.needing(&[Feature::X86_64Avx512Vnni]).satisfied_by(isa::native());
        has!("avx512vnni") && has!("avx512bw") && tracts
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Weights `[Cin, Cout]` packed in blocks of [`Isa::block`] output channels:
/// block `b` holds, for each input channel `k`, the block's outputs
/// contiguously (`data[b * cin * NR + k * NR + j]`), zero past `cout`. The
/// bias and the scales are padded the same way.
#[derive(Debug, Clone)]
pub struct Packed {
    isa: Isa,
    cin: usize,
    cout: usize,
    // Read by the x86-64 kernels only; nothing is packed elsewhere.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    weights: Weights,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    bias: Vec<f32>,
    /// Lower and upper clamp (a fused ReLU/ReLU6), if fused.
    clamp: (Option<f32>, Option<f32>),
}

/// The packed weights as floats, or as int8 with one scale per output
/// channel where every weight is such a multiple (see [`int8_grid`]).
#[derive(Debug, Clone)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Weights {
    F32(Vec<f32>),
    /// `w[k, n] = q[k, n] * scale[n]`: a quarter of the memory, and of the
    /// bytes each tile streams from the caches.
    I8 {
        q: Vec<i8>,
        scale: Vec<f32>,
    },
    /// The same int8 weights for AVX-512 VNNI dot products with activations
    /// quantised to 8 bits per position ([`Precision::Int8`]): block `b`
    /// holds, for each group `g` of 4 input channels, the block's 32 outputs
    /// times 4 bytes (`q[b * k4 * 128 + g * 128 + j * 4 + t]` is the weight
    /// from input `4g + t` to output `32b + j`), zero past `cin` and `cout`.
    /// `offset[n]` is 128 times the sum of output `n`'s int8 weights: the
    /// activations go in as unsigned bytes (`q + 128`), and that is what the
    /// 128 adds to each sum.
    Dot {
        q: Vec<i8>,
        scale: Vec<f32>,
        offset: Vec<i32>,
    },
}

/// What a 1x1 convolution whose weights are on an int8 grid
/// ([`int8_grid`]) computes in; float weights are always computed in float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Float weights, float activations (`LABELCAST_TRACT_POINTWISE=float`).
    Float,
    /// int8 weights, widened to float once per block and inference; float
    /// activations (`LABELCAST_TRACT_POINTWISE=int8-weights`).
    Int8Weights,
    /// int8 weights times activations quantised to 8 bits per position:
    /// each position's `Cin` inputs get their own scale, `max |x| / 127`
    /// (symmetric, rounded to nearest), and the products are summed in
    /// 32-bit integers by AVX-512 VNNI (`vpdpbusd`), then scaled back to
    /// float with the weight's per-channel scale before the bias and clamp.
    /// The quantisation error is at most half a step of each position's
    /// scale per input. Against the per-tensor scale a QDQ model itself puts
    /// before the convolution it follows each position's own range (finer
    /// where a position is quieter than the tensor's calibrated range, and
    /// never clipped); being symmetric, it spends half its steps on negative
    /// values that a non-negative input (after a ReLU6) never has, so near
    /// the calibrated range it is up to twice as coarse as an asymmetric
    /// uint8 scale. Where the CPU lacks AVX-512 VNNI (or AVX-512F or VNNI is
    /// masked with `TRACT_CPU_ISA`), this is [`Precision::Int8Weights`].
    Int8,
}

/// Per output channel `n`, the scale `s[n]` for which every weight
/// `weight(k, n)` is `q * s[n]` with `q` an integer in [-128, 127], to within
/// 4 float epsilons of the channel's largest weight; `None` if a channel has
/// no such scale (or a weight that is not finite).
///
/// This is what a DequantizeLinear of int8 weights (per-tensor or
/// per-channel, zero point 0, as ONNX Runtime's and TensorRT's quantisers
/// write them) leaves once tract has folded it into a float constant: the
/// grid is found from the values, so the weights-only INT8 mode keeps its
/// weights in int8 without carrying the quantisation parameters through
/// tract's graph. The tolerance covers recomputing the scale from the
/// largest weight (one rounding of `max / qmax`, then of `q * s`); an FP32
/// model's weights, each a free float, essentially never pass for 4 or more
/// input channels (with 1 to 3 they may), and where they do the int8 values
/// reproduce them to that tolerance, as a float rounding would.
pub fn int8_grid(cin: usize, cout: usize, weight: &impl Fn(usize, usize) -> f32) -> Option<Vec<f32>> {
    let mut scales = Vec::with_capacity(cout);
    let mut column = vec![0f32; cin];
    for n in 0..cout {
        for (k, w) in column.iter_mut().enumerate() {
            *w = weight(k, n);
        }
        let max = column.iter().try_fold(0f32, |m, w| w.is_finite().then(|| m.max(w.abs())))?;
        if max == 0.0 {
            scales.push(1.0);
            continue;
        }
        let tolerance = 4.0 * f32::EPSILON * max;
        // The largest weight is +127 s or -128 s on a full-range grid, less
        // where calibration clipped or the channel is small: most channels
        // pass on the first try, a float channel fails on its first weights.
        let scale = std::iter::once(127).chain(std::iter::once(128)).chain((1..127).rev()).find_map(|steps| {
            let s = max / steps as f32;
            column
                .iter()
                .all(|&w| {
                    let q = (w / s).round();
                    (-128.0..=127.0).contains(&q) && (q * s - w).abs() <= tolerance
                })
                .then_some(s)
        })?;
        scales.push(scale);
    }
    Some(scales)
}

impl Packed {
    /// `weight(k, n)` gives the weight from input channel `k` to output `n`;
    /// `clamp` the lower and upper bounds of a fused Max/Min, if any. Unless
    /// `precision` is [`Precision::Float`], weights on an int8 grid
    /// ([`int8_grid`]) are packed as int8, for VNNI dot products where
    /// `precision` is [`Precision::Int8`] and the CPU has them.
    ///
    /// # Panics
    /// If this CPU cannot run `isa` (see [`Isa::runs_here`]), or `bias` is
    /// not `cout` long.
    pub fn new(
        isa: Isa,
        cin: usize,
        cout: usize,
        weight: impl Fn(usize, usize) -> f32,
        bias: Option<&[f32]>,
        clamp: (Option<f32>, Option<f32>),
        precision: Precision,
    ) -> Packed {
        assert!(isa.runs_here(), "{isa:?} kernels on a CPU without them");
        let nr = isa.block();
        let blocks = cout.div_ceil(nr);
        let pack = |value: &mut dyn FnMut(usize, usize, usize)| {
            for b in 0..blocks {
                for k in 0..cin {
                    for j in 0..nr.min(cout - b * nr) {
                        value(b * cin * nr + k * nr + j, k, b * nr + j);
                    }
                }
            }
        };
        let int8 = precision != Precision::Float;
        let dot = precision == Precision::Int8 && isa == Isa::Avx512f && dot_products_here();
        let weights = match int8.then(|| int8_grid(cin, cout, &weight)).flatten() {
            Some(scales) if dot => {
                let (k4, blocks) = (cin.div_ceil(4), cout.div_ceil(32));
                let mut q = vec![0i8; blocks * k4 * 128];
                let mut offset = vec![0i32; blocks * 32];
                for n in 0..cout {
                    for k in 0..cin {
                        let v = (weight(k, n) / scales[n]).round() as i8;
                        q[(n / 32) * k4 * 128 + (k / 4) * 128 + (n % 32) * 4 + k % 4] = v;
                        offset[n] += 128 * v as i32;
                    }
                }
                let mut scale = vec![1f32; blocks * 32];
                scale[..cout].copy_from_slice(&scales);
                Weights::Dot { q, scale, offset }
            }
            Some(scales) => {
                let mut q = vec![0i8; blocks * cin * nr];
                pack(&mut |at, k, n| q[at] = (weight(k, n) / scales[n]).round() as i8);
                let mut scale = vec![1f32; blocks * nr];
                scale[..cout].copy_from_slice(&scales);
                Weights::I8 { q, scale }
            }
            None => {
                let mut data = vec![0f32; blocks * cin * nr];
                pack(&mut |at, k, n| data[at] = weight(k, n));
                Weights::F32(data)
            }
        };
        let mut padded = vec![0f32; blocks * nr];
        if let Some(bias) = bias {
            padded[..cout].copy_from_slice(bias);
        }
        Packed { isa, cin, cout, weights, bias: padded, clamp }
    }

    /// Whether the weights are kept as int8 (see [`int8_grid`]).
    pub fn int8_weights(&self) -> bool {
        matches!(self.weights, Weights::I8 { .. } | Weights::Dot { .. })
    }

    /// Whether the activations are quantised to 8 bits too
    /// ([`Precision::Int8`] on a CPU with AVX-512 VNNI).
    pub fn int8_activations(&self) -> bool {
        matches!(self.weights, Weights::Dot { .. })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Input and output channels.
    pub fn channels(&self) -> (usize, usize) {
        (self.cin, self.cout)
    }

    /// `output[m, n] = clamp(sum_k input[m, k] * w[k, n] + bias[n])` for
    /// `rows` positions; `input` is `[rows, cin]` and `output` `[rows, cout]`,
    /// both row-major (channels-last).
    ///
    /// # Panics
    /// If the slices are shorter than that (the op checks its shapes first).
    pub fn run(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        self.run_strided(input, (self.cin, 1), rows, output)
    }

    /// [`Packed::run`] with input element `(m, k)` at `input[m * strides.0 +
    /// k * strides.1]`: `(cin, 1)` channels-last, `(1, rows)` channels-first.
    pub fn run_strided(&self, input: &[f32], strides: (usize, usize), rows: usize, output: &mut [f32]) {
        if rows == 0 {
            return;
        }
        let last = (rows - 1) * strides.0 + (self.cin - 1) * strides.1;
        assert!(input.len() > last && output.len() >= rows * self.cout);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA was detected on this CPU before packing (`Isa::detect`),
        // and every element read or written is inside the slices, checked above.
        unsafe {
            x86::run(self, input, strides, rows, output)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("Isa::detect() is None off x86-64, so nothing is packed there")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    // The accumulators are indexed by row in loops of a constant length,
    // which the compiler unrolls into registers.
    #![allow(clippy::needless_range_loop)]
    use super::{Isa, Packed, Weights};
    use std::arch::x86_64::*;

    thread_local! {
        /// One block of int8 weights widened to floats (at most `Cin x 32`
        /// floats: 160 KB for 1280 input channels), reused across layers.
        static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Runs `tile(w, scale, b, rows_from, rows_to)` over the whole output
    /// in tiles of the ISA's rows by one block of its channels: int8
    /// weights block by block, each block widened to floats once and then
    /// used for every row (converting inside the tile would redo it for
    /// every 8 rows: 4 % slower on the demo), float weights rows outer (a
    /// tile's input rows stay in L1 across the blocks, the packed weights,
    /// at most Cin x Cout floats, in L2).
    fn drive(p: &Packed, rows: usize, mut tile: impl FnMut(*const f32, *const f32, usize, usize, usize)) {
        let (nr, mr) = (p.isa.block(), p.isa.rows());
        let (cin, blocks) = (p.cin, p.cout.div_ceil(nr));
        match &p.weights {
            Weights::F32(data) => {
                let mut row = 0;
                while row < rows {
                    let end = (row + mr).min(rows);
                    for b in 0..blocks {
                        tile(data[b * cin * nr..].as_ptr(), std::ptr::null(), b, row, end);
                    }
                    row = end;
                }
            }
            Weights::I8 { q, scale } => {
                // Taken out, not borrowed: nothing can find it borrowed if
                // this thread ever runs another task before putting it back.
                let mut widened = WIDENED.take();
                widened.resize(cin * nr, 0.0);
                for b in 0..blocks {
                    for (to, &from) in widened.iter_mut().zip(&q[b * cin * nr..(b + 1) * cin * nr]) {
                        *to = from as f32;
                    }
                    let mut row = 0;
                    while row < rows {
                        let end = (row + mr).min(rows);
                        tile(widened.as_ptr(), scale[b * nr..].as_ptr(), b, row, end);
                        row = end;
                    }
                }
                WIDENED.set(widened);
            }
            // `run` hands these to `run_dot` before any tile is driven.
            Weights::Dot { .. } => unreachable!("dot-product weights are run by run_dot"),
        }
    }

    /// `MR` rows from `row0` times block `b` (its weights at `w`), AVX-512F:
    /// 2 x 16 lanes. `SCALED`: the weights are int8 values (widened), and the
    /// sums are multiplied by the channels' scales (at `scale`) before the
    /// bias.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile512<const MR: usize, const SCALED: bool>(
        p: &Packed,
        (w, scale): (*const f32, *const f32),
        input: *const f32,
        s: (usize, usize),
        row0: usize,
        b: usize,
        output: *mut f32,
    ) {
        unsafe {
            let (cin, cout) = (p.cin, p.cout);
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for k in 0..cin {
                let w0 = _mm512_loadu_ps(w.add(k * 32));
                let w1 = _mm512_loadu_ps(w.add(k * 32 + 16));
                for r in 0..MR {
                    let a = _mm512_set1_ps(*input.add((row0 + r) * s.0 + k * s.1));
                    acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
                }
            }
            let scales = SCALED.then(|| (_mm512_loadu_ps(scale), _mm512_loadu_ps(scale.add(16))));
            for r in 0..MR {
                finish512(p, b, acc[r][0], acc[r][1], scales, output.add((row0 + r) * cout + b * 32));
            }
        }
    }

    /// The lanes of an 8-lane masked store that are below `valid`.
    #[target_feature(enable = "avx2")]
    unsafe fn mask8(valid: usize) -> __m256i {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(valid.min(8) as i32), lanes)
    }

    /// `MR` rows from `row0` times block `b`, AVX2+FMA: 2 x 8 lanes;
    /// `SCALED` as in [`tile512`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256<const MR: usize, const SCALED: bool>(
        p: &Packed,
        (w, scale): (*const f32, *const f32),
        input: *const f32,
        s: (usize, usize),
        row0: usize,
        b: usize,
        output: *mut f32,
    ) {
        unsafe {
            let (cin, cout) = (p.cin, p.cout);
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for k in 0..cin {
                let w0 = _mm256_loadu_ps(w.add(k * 16));
                let w1 = _mm256_loadu_ps(w.add(k * 16 + 8));
                for r in 0..MR {
                    let a = _mm256_broadcast_ss(&*input.add((row0 + r) * s.0 + k * s.1));
                    acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
                }
            }
            let bias0 = _mm256_loadu_ps(p.bias.as_ptr().add(b * 16));
            let bias1 = _mm256_loadu_ps(p.bias.as_ptr().add(b * 16 + 8));
            let (scale0, scale1) = if SCALED {
                (_mm256_loadu_ps(scale), _mm256_loadu_ps(scale.add(8)))
            } else {
                (_mm256_set1_ps(1.0), _mm256_set1_ps(1.0))
            };
            // Only the bounds that were fused: max(NaN, -inf) would turn a
            // NaN into -inf where the graph had no Max at all.
            let (lo, hi) = (_mm256_set1_ps(p.clamp.0.unwrap_or(0.0)), _mm256_set1_ps(p.clamp.1.unwrap_or(0.0)));
            let (has_lo, has_hi) = (p.clamp.0.is_some(), p.clamp.1.is_some());
            let valid = (cout - b * 16).min(16);
            for r in 0..MR {
                let out = output.add((row0 + r) * cout + b * 16);
                let mut v0 =
                    if SCALED { _mm256_fmadd_ps(acc[r][0], scale0, bias0) } else { _mm256_add_ps(acc[r][0], bias0) };
                if has_lo {
                    v0 = _mm256_max_ps(v0, lo);
                }
                if has_hi {
                    v0 = _mm256_min_ps(v0, hi);
                }
                let mut v1 =
                    if SCALED { _mm256_fmadd_ps(acc[r][1], scale1, bias1) } else { _mm256_add_ps(acc[r][1], bias1) };
                if has_lo {
                    v1 = _mm256_max_ps(v1, lo);
                }
                if has_hi {
                    v1 = _mm256_min_ps(v1, hi);
                }
                if valid == 16 {
                    _mm256_storeu_ps(out, v0);
                    _mm256_storeu_ps(out.add(8), v1);
                } else {
                    _mm256_maskstore_ps(out, mask8(valid), v0);
                    if valid > 8 {
                        _mm256_maskstore_ps(out.add(8), mask8(valid - 8), v1);
                    }
                }
            }
        }
    }

    thread_local! {
        /// The activations quantised to unsigned bytes (`rows * 4 * k4`: at
        /// most the largest 1x1 input, 144 channels x 56 x 56 = 441 KiB on
        /// the demo) and each
        /// position's scale, reused across layers and frames.
        static QUANTISED: std::cell::RefCell<(Vec<u8>, Vec<f32>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }

    /// Where the quantised activations put position `m`'s group `g` of 4
    /// input channels (4 bytes, channel `4g + t` at byte `t`): at
    /// `m * position + g * group` bytes. Channels-last input is quantised
    /// row by row (`position = 4 * k4`, `group = 4`), channels-first 16
    /// positions at a time into 16 consecutive groups (`position = 4`,
    /// `group = 4 * rows`): each layout written with whole-vector stores.
    #[derive(Clone, Copy)]
    struct Layout {
        position: usize,
        group: usize,
    }

    /// Quantises `rows` positions of `cin` inputs (element `(m, k)` at
    /// `input[m * s.0 + k * s.1]`) to bytes `round(x / scale[m]) + 128`, with
    /// `scale[m] = max_k |x| / 127`, laid out as the returned [`Layout`]
    /// says; channels past `cin` up to `4 * k4` are 128 (zero). A position of
    /// zeros gets scale 0 (its output is the bias); one with a NaN or an
    /// infinity gets scale NaN, so its outputs are NaN, as a float
    /// product's would be NaN or infinite. Both layouts hold the same bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn quantise(
        input: &[f32],
        s: (usize, usize),
        rows: usize,
        cin: usize,
        bytes: &mut [u8],
        scale: &mut [f32],
    ) -> Layout {
        let k4 = cin.div_ceil(4);
        let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
        let lanes = |n: usize| -> __mmask16 { if n >= 16 { 0xffff } else { (1u32 << n) as u16 - 1 } };
        // The scale of a position whose largest magnitude is `largest`, and
        // the factor its inputs are multiplied by (0: all its bytes 128).
        let scale_of = |largest: f32, unordered: bool| -> (f32, f32) {
            if unordered || !largest.is_finite() {
                (f32::NAN, 0.0)
            } else if largest == 0.0 || !(127.0 / largest).is_finite() {
                // Zeros, or all below 127 / f32::MAX (~4e-37): the bias.
                (0.0, 0.0)
            } else {
                (largest / 127.0, 127.0 / largest)
            }
        };
        // 16 values times their factors, rounded to nearest (even, as MXCSR
        // is left), plus 128; 128 in the lanes whose factor is 0 (a NaN times
        // 0 would not be).
        let to_bytes = |v: __m512, inverse: __m512| -> __m512i {
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)), _mm512_set1_epi32(128));
            let q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(255));
            _mm512_mask_mov_epi32(
                q,
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(inverse, _mm512_setzero_ps()),
                _mm512_set1_epi32(128),
            )
        };
        // Largest magnitude and whether a NaN was seen, lane by lane.
        let largest_of = |v: __m512, largest: &mut __m512, unordered: &mut __mmask16| {
            *unordered |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            *largest = _mm512_max_ps(*largest, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask)));
        };
        if s.1 == 1 {
            // Channels-last: each position's inputs contiguous.
            for m in 0..rows {
                let x = &input[m * s.0..m * s.0 + cin];
                let (mut largest, mut unordered) = (_mm512_setzero_ps(), 0);
                for chunk in x.chunks(16) {
                    // SAFETY: the mask covers the chunk's elements only.
                    let v = unsafe { _mm512_maskz_loadu_ps(lanes(chunk.len()), chunk.as_ptr()) };
                    largest_of(v, &mut largest, &mut unordered);
                }
                let (position_scale, inverse) = scale_of(_mm512_reduce_max_ps(largest), unordered != 0);
                scale[m] = position_scale;
                let row = &mut bytes[m * 4 * k4..(m + 1) * 4 * k4];
                row[cin..].fill(128);
                for (c, chunk) in x.chunks(16).enumerate() {
                    // SAFETY: the masks cover the chunk's elements and the
                    // row's bytes only (`4 * k4 >= cin`).
                    unsafe {
                        let v = _mm512_maskz_loadu_ps(lanes(chunk.len()), chunk.as_ptr());
                        let q = to_bytes(v, _mm512_set1_ps(inverse));
                        _mm512_mask_cvtepi32_storeu_epi8(row.as_mut_ptr().add(c * 16) as *mut _, lanes(chunk.len()), q);
                    }
                }
            }
            Layout { position: 4 * k4, group: 4 }
        } else {
            // Channels-first (or any other strides): 16 positions at a time,
            // one per lane; the 4 channels of a group packed into each lane's
            // 4 bytes, stored as 16 consecutive groups.
            let load = |m0: usize, k: usize, mask: __mmask16| -> __m512 {
                if s.0 == 1 {
                    // SAFETY: the mask keeps the positions below `rows`, whose
                    // elements are inside `input` (checked by the caller).
                    unsafe { _mm512_maskz_loadu_ps(mask, input.as_ptr().add(m0 + k * s.1)) }
                } else {
                    let mut v = [0f32; 16];
                    for (l, v) in v.iter_mut().enumerate().take(16.min(rows - m0)) {
                        *v = input[(m0 + l) * s.0 + k * s.1];
                    }
                    // SAFETY: 16 floats from 16 floats.
                    unsafe { _mm512_loadu_ps(v.as_ptr()) }
                }
            };
            for m0 in (0..rows).step_by(16) {
                let mask = lanes(rows - m0);
                let (mut largest, mut unordered) = (_mm512_setzero_ps(), 0);
                for k in 0..cin {
                    largest_of(load(m0, k, mask), &mut largest, &mut unordered);
                }
                let mut largest_lanes = [0f32; 16];
                // SAFETY: 16 floats into 16 floats.
                unsafe { _mm512_storeu_ps(largest_lanes.as_mut_ptr(), largest) };
                let mut inverse = [0f32; 16];
                for l in 0..16.min(rows - m0) {
                    let (position_scale, inv) = scale_of(largest_lanes[l], unordered & (1 << l) != 0);
                    scale[m0 + l] = position_scale;
                    inverse[l] = inv;
                }
                // SAFETY: 16 floats from 16 floats.
                let inverse = unsafe { _mm512_loadu_ps(inverse.as_ptr()) };
                for g in 0..k4 {
                    let mut packed = _mm512_setzero_si512();
                    for t in 0..4 {
                        let q = if 4 * g + t < cin {
                            to_bytes(load(m0, 4 * g + t, mask), inverse)
                        } else {
                            _mm512_set1_epi32(128)
                        };
                        packed = _mm512_or_si512(packed, _mm512_sllv_epi32(q, _mm512_set1_epi32(8 * t as i32)));
                    }
                    // SAFETY: groups `g * rows + m0 ..` of 4 bytes, the mask
                    // keeping those below `(g + 1) * rows`: inside `bytes`.
                    unsafe {
                        _mm512_mask_storeu_epi32(bytes.as_mut_ptr().add(4 * (g * rows + m0)) as *mut _, mask, packed)
                    };
                }
            }
            Layout { position: 4, group: 4 * rows }
        }
    }

    /// [`run`] for `Weights::Dot`: quantise this call's positions, then
    /// tiles of 8 positions times 32 output channels, rows outer (a tile's
    /// bytes stay in L1 across the blocks).
    ///
    /// # Safety
    /// As [`run`], and the CPU has AVX-512F, AVX-512BW and AVX-512 VNNI.
    unsafe fn run_dot(
        p: &Packed,
        (q, scale, offset): (&[i8], &[f32], &[i32]),
        input: &[f32],
        s: (usize, usize),
        rows: usize,
        output: &mut [f32],
    ) {
        let k4 = p.cin.div_ceil(4);
        // Taken out, not borrowed (see `drive`).
        let (mut bytes, mut scales) = QUANTISED.take();
        bytes.resize(rows * 4 * k4, 128);
        scales.resize(rows, 0.0);
        // SAFETY: the caller checked the CPU and the input's extent.
        let layout = unsafe { quantise(input, s, rows, p.cin, &mut bytes, &mut scales) };
        let tiles: [TileDot; 8] = [
            tile_dot::<1>,
            tile_dot::<2>,
            tile_dot::<3>,
            tile_dot::<4>,
            tile_dot::<5>,
            tile_dot::<6>,
            tile_dot::<7>,
            tile_dot::<8>,
        ];
        let blocks = p.cout.div_ceil(32);
        let mut row = 0;
        while row < rows {
            let end = (row + 8).min(rows);
            for b in 0..blocks {
                let weights = (q[b * k4 * 128..].as_ptr(), scale[b * 32..].as_ptr(), offset[b * 32..].as_ptr());
                // SAFETY: `end - row` positions' groups from `row` (inside
                // `bytes` for either layout), the block's packed weights,
                // scales and offsets, the output rows inside `output`.
                unsafe {
                    tiles[end - row - 1](
                        p,
                        weights,
                        (bytes[row * layout.position..].as_ptr(), layout),
                        scales[row..].as_ptr(),
                        b,
                        output[row * p.cout..].as_mut_ptr(),
                    )
                };
            }
            row = end;
        }
        QUANTISED.set((bytes, scales));
    }

    type TileDot =
        unsafe fn(&Packed, (*const i8, *const f32, *const i32), (*const u8, Layout), *const f32, usize, *mut f32);

    /// `MR` positions (their groups of bytes from `bytes` as `layout` says,
    /// their scales at `position_scale`) times block `b` of `Weights::Dot`:
    /// 2 x 16 lanes of 32-bit sums, each `vpdpbusd` adding 4 byte products
    /// per lane. Then per output: `(sum - offset) * weight scale * position
    /// scale + bias`, clamped, stored at `output` (the first position's row).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn tile_dot<const MR: usize>(
        p: &Packed,
        (w, scale, offset): (*const i8, *const f32, *const i32),
        (bytes, layout): (*const u8, Layout),
        position_scale: *const f32,
        b: usize,
        output: *mut f32,
    ) {
        unsafe {
            let k4 = p.cin.div_ceil(4);
            let mut acc = [[_mm512_setzero_si512(); 2]; MR];
            for g in 0..k4 {
                let w0 = _mm512_loadu_si512(w.add(g * 128) as *const _);
                let w1 = _mm512_loadu_si512(w.add(g * 128 + 64) as *const _);
                let group = bytes.add(g * layout.group);
                for r in 0..MR {
                    let a = _mm512_set1_epi32((group.add(r * layout.position) as *const i32).read_unaligned());
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, w0);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, w1);
                }
            }
            let offset0 = _mm512_loadu_si512(offset as *const _);
            let offset1 = _mm512_loadu_si512(offset.add(16) as *const _);
            let (scale0, scale1) = (_mm512_loadu_ps(scale), _mm512_loadu_ps(scale.add(16)));
            for r in 0..MR {
                let position = _mm512_set1_ps(*position_scale.add(r));
                let scales = Some((_mm512_mul_ps(scale0, position), _mm512_mul_ps(scale1, position)));
                let v0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], offset0));
                let v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][1], offset1));
                finish512(p, b, v0, v1, scales, output.add(r * p.cout + b * 32));
            }
        }
    }

    /// Two vectors of 16 sums of block `b`, times `scales` if any (fused
    /// with the bias), plus the bias, clamped (only the bounds that were
    /// fused), stored at `out` as far as the block's outputs go.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn finish512(p: &Packed, b: usize, v0: __m512, v1: __m512, scales: Option<(__m512, __m512)>, out: *mut f32) {
        unsafe {
            let bias0 = _mm512_loadu_ps(p.bias.as_ptr().add(b * 32));
            let bias1 = _mm512_loadu_ps(p.bias.as_ptr().add(b * 32 + 16));
            let (mut v0, mut v1) = match scales {
                Some((s0, s1)) => (_mm512_fmadd_ps(v0, s0, bias0), _mm512_fmadd_ps(v1, s1, bias1)),
                None => (_mm512_add_ps(v0, bias0), _mm512_add_ps(v1, bias1)),
            };
            // Only the bounds that were fused: max(NaN, -inf) would turn a
            // NaN into -inf where the graph had no Max at all.
            if let Some(lo) = p.clamp.0 {
                v0 = _mm512_max_ps(v0, _mm512_set1_ps(lo));
                v1 = _mm512_max_ps(v1, _mm512_set1_ps(lo));
            }
            if let Some(hi) = p.clamp.1 {
                v0 = _mm512_min_ps(v0, _mm512_set1_ps(hi));
                v1 = _mm512_min_ps(v1, _mm512_set1_ps(hi));
            }
            let valid = (p.cout - b * 32).min(32);
            let m0: __mmask16 = if valid >= 16 { 0xffff } else { (1u32 << valid) as u16 - 1 };
            let m1: __mmask16 = if valid >= 32 {
                0xffff
            } else if valid > 16 {
                (1u32 << (valid - 16)) as u16 - 1
            } else {
                0
            };
            _mm512_mask_storeu_ps(out, m0, v0);
            if m1 != 0 {
                _mm512_mask_storeu_ps(out.add(16), m1, v1);
            }
        }
    }

    /// A tile kernel: its rows are its place in [`tiles`] plus one.
    type Tile = unsafe fn(&Packed, (*const f32, *const f32), *const f32, (usize, usize), usize, usize, *mut f32);

    /// The tile kernels of `isa` for 1 to [`Isa::rows`] rows, for float or
    /// int8 (scaled) weights.
    fn tiles(isa: Isa, scaled: bool) -> &'static [Tile] {
        match (isa, scaled) {
            (Isa::Avx512f, false) => &[
                tile512::<1, false>,
                tile512::<2, false>,
                tile512::<3, false>,
                tile512::<4, false>,
                tile512::<5, false>,
                tile512::<6, false>,
                tile512::<7, false>,
                tile512::<8, false>,
            ],
            (Isa::Avx512f, true) => &[
                tile512::<1, true>,
                tile512::<2, true>,
                tile512::<3, true>,
                tile512::<4, true>,
                tile512::<5, true>,
                tile512::<6, true>,
                tile512::<7, true>,
                tile512::<8, true>,
            ],
            (Isa::Avx2Fma, false) => &[
                tile256::<1, false>,
                tile256::<2, false>,
                tile256::<3, false>,
                tile256::<4, false>,
                tile256::<5, false>,
                tile256::<6, false>,
            ],
            (Isa::Avx2Fma, true) => &[
                tile256::<1, true>,
                tile256::<2, true>,
                tile256::<3, true>,
                tile256::<4, true>,
                tile256::<5, true>,
                tile256::<6, true>,
            ],
        }
    }

    /// `Packed::run_strided` on this CPU.
    ///
    /// # Safety
    /// The CPU has `p.isa` (checked when packing), and every element the
    /// tiles read or write is inside `input` and `output`.
    pub unsafe fn run(p: &Packed, input: &[f32], s: (usize, usize), rows: usize, output: &mut [f32]) {
        if let Weights::Dot { q, scale, offset } = &p.weights {
            // SAFETY: `Weights::Dot` is only packed where `dot_products_here()`
            // (and AVX-512F); the slices are as checked by the caller.
            return unsafe { run_dot(p, (q, scale, offset), input, s, rows, output) };
        }
        let (a, o) = (input.as_ptr(), output.as_mut_ptr());
        let tiles = tiles(p.isa, p.int8_weights());
        drive(p, rows, |w, scale, b, row, end| {
            // SAFETY: as in `Packed::run_strided`, with `w` and `scale` this
            // block's (from `drive`) and `end - row` at most the ISA's rows.
            unsafe { tiles[end - row - 1](p, (w, scale), a, s, row, b, o) }
        })
    }
}

/// A 1x1 convolution as one tract op: `[Cin, P]` or `[P, Cin]` in (P the
/// positions, in the same order in both), `[P, Cout]` or `[Cout, P]` out,
/// with its bias and clamp. A channels-first output is written
/// channels-last into a scratch buffer first and transposed: the projections
/// that hand channels-last maps back to the channels-first trunk.
#[derive(Debug, Clone)]
pub struct PointwiseConv {
    pub packed: Arc<Packed>,
    pub input_channels_last: bool,
    pub output_channels_last: bool,
    /// The output's shape (the model's input size is fixed before this runs).
    pub output_shape: TVec<usize>,
}

impl PartialEq for PointwiseConv {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.packed, &other.packed)
            && self.input_channels_last == other.input_channels_last
            && self.output_channels_last == other.output_channels_last
            && self.output_shape == other.output_shape
    }
}
impl Eq for PointwiseConv {}

impl Op for PointwiseConv {
    fn name(&self) -> StaticName {
        "PointwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let p = &self.packed;
        let layout = |last: bool| if last { "channels-last" } else { "channels-first" };
        Ok(vec![format!(
            "{} {} -> {} {} {:?}, clamp {:?}, {}, {} weights",
            p.cin,
            layout(self.input_channels_last),
            p.cout,
            layout(self.output_channels_last),
            self.output_shape,
            p.clamp,
            p.isa.name(),
            if p.int8_activations() {
                "int8 activations (VNNI) and"
            } else if p.int8_weights() {
                "int8"
            } else {
                "float"
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PointwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = &self.packed;
        let input = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let rows = self.output_shape.iter().product::<usize>() / p.cout.max(1);
        ensure!(
            input.len() == rows * p.cin,
            "PointwiseConv: {} input values for {} positions of {} channels",
            input.len(),
            rows,
            p.cin
        );
        let strides = if self.input_channels_last { (p.cin, 1) } else { (1, rows) };
        // SAFETY: every element is written below (by the kernel, or by the
        // transpose of the scratch it wrote).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            if self.output_channels_last {
                run_parallel(p, input, strides, rows, out);
            } else {
                // Written whole by the kernel before it is read; kept for the
                // next frame (at most the largest such output, 300 KB on the
                // demo). Taken out, not borrowed, across the thread pool's
                // scope: a thread waiting there may run other tasks.
                let mut scratch = SCRATCH.take();
                scratch.resize(rows * p.cout, 0.0);
                run_parallel(p, input, strides, rows, &mut scratch);
                transpose(&scratch, rows, p.cout, out);
                SCRATCH.set(scratch);
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

/// [`Packed::run_strided`] split by positions over tract's thread pool, where
/// the plan runs with one (`model.threads` > 1): at least two whole tiles
/// per thread (below that the hand-over costs more). Returns how many runs
/// (1: not split).
fn run_parallel(p: &Packed, input: &[f32], strides: (usize, usize), rows: usize, output: &mut [f32]) -> usize {
    let cout = p.cout;
    // Rows from `first` on: the same strides from there.
    split_rows(rows, cout, p.isa.rows(), 2, output, |first, out| {
        p.run_strided(&input[first * strides.0..], strides, out.len() / cout, out)
    })
}

/// Runs `run(first_row, rows)` over `rows` output rows of `row_len` values
/// (the start of `output`), split over tract's thread pool where the plan
/// runs with one (`model.threads` > 1): in whole `granule`s of rows, at least
/// `min_granules` per run, as evenly as they go, one run per thread, so every
/// thread writes its own rows. Returns how many runs (1: not split). The
/// depthwise op (`depthwise_op.rs`) splits its output rows with it too.
pub(super) fn split_rows<F>(
    rows: usize,
    row_len: usize,
    granule: usize,
    min_granules: usize,
    output: &mut [f32],
    run: F,
) -> usize
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    #[cfg(feature = "tract-threads")]
    {
        use tract_linalg::multithread::{Executor, current_tract_executor};
        if let Executor::MultiThread(pool) = current_tract_executor() {
            let granules = rows.div_ceil(granule.max(1));
            let runs = pool.current_num_threads().min(granules / min_granules.max(1));
            if runs > 1 {
                pool.scope(|scope| {
                    let mut rest = &mut output[..rows * row_len];
                    let mut first = 0;
                    let run = &run;
                    for part in 0..runs {
                        let end = ((part + 1) * granules / runs * granule).min(rows);
                        let (out, after) = std::mem::take(&mut rest).split_at_mut((end - first) * row_len);
                        rest = after;
                        scope.spawn(move |_| run(first, out));
                        first = end;
                    }
                });
                return runs;
            }
        }
    }
    // Without the thread pool (built without `tract-threads`) one run.
    #[cfg(not(feature = "tract-threads"))]
    let _ = (granule, min_granules);
    run(0, &mut output[..rows * row_len]);
    1
}

thread_local! {
    /// The channels-last result a channels-first output is transposed from.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `to[c * rows + r] = from[r * cols + c]`, in tiles that stay in L1.
fn transpose(from: &[f32], rows: usize, cols: usize, to: &mut [f32]) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                for r in r0..(r0 + TILE).min(rows) {
                    to[c * rows + r] = from[r * cols + c];
                }
            }
        }
    }
}

impl TypedOp for PointwiseConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// A per-channel vector (`[1, ..., 1, cout]` or `[cout]`) or a scalar constant.
fn constant_of(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    let fact = model.outlet_fact(outlet).ok()?;
    let k = fact.konst.clone()?;
    (k.datum_type() == f32::datum_type()).then_some(k)
}

/// The name of a binary op (`Add`, `Max`, `Min`) and its constant operand,
/// if `node` is one with exactly one constant input.
pub(super) fn binary_with_constant(model: &TypedModel, node: &TypedNode) -> Option<(String, usize, Arc<Tensor>)> {
    let op = node.op_as::<TypedBinOp>()?;
    if node.inputs.len() != 2 {
        return None;
    }
    let consts: Vec<Option<Arc<Tensor>>> = node.inputs.iter().map(|i| constant_of(model, *i)).collect();
    match (&consts[0], &consts[1]) {
        (None, Some(k)) => Some((op.0.name().to_string(), 0, k.clone())),
        (Some(k), None) => Some((op.0.name().to_string(), 1, k.clone())),
        _ => None,
    }
}

/// How the rewrite went, for the `model loaded` log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub convs: usize,
    pub fused_bias: usize,
    pub fused_clamps: usize,
    /// Of `convs`, how many keep their weights as int8 ([`int8_grid`]).
    pub int8_weights: usize,
    /// Of those, how many quantise their activations to 8 bits too
    /// ([`Precision::Int8`]).
    pub int8_activations: usize,
}

/// Whether the rewrite is turned off (`LABELCAST_TRACT_POINTWISE=off`).
pub fn disabled_by_env() -> bool {
    std::env::var("LABELCAST_TRACT_POINTWISE").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

/// What the 1x1 convolutions of a graph compute in: 8-bit activations
/// ([`Precision::Int8`]) only in the weights-only graph of a QDQ INT8 model
/// (`weights_only_int8`), where its quantiser put 8-bit activations before
/// each of them; an FP32 model (whose weights may sit on an int8 grid by
/// chance: 0/1 matrices, one to three input channels) and the graph as
/// quantised (`native`, and the reference the INT8 check compares with)
/// keep float activations. `LABELCAST_TRACT_POINTWISE` lowers it
/// ([`precision_by_env`]).
pub fn precision_for(weights_only_int8: bool) -> Precision {
    match precision_by_env() {
        Precision::Int8 if !weights_only_int8 => Precision::Int8Weights,
        precision => precision,
    }
}

/// What 1x1 convolutions with weights on an int8 grid compute in at most:
/// [`Precision::Int8`] unless `LABELCAST_TRACT_POINTWISE` is `float` or
/// `int8-weights` (for comparing them in one build).
pub fn precision_by_env() -> Precision {
    match std::env::var("LABELCAST_TRACT_POINTWISE") {
        Ok(v) if v.eq_ignore_ascii_case("float") => Precision::Float,
        Ok(v) if v.eq_ignore_ascii_case("int8-weights") => Precision::Int8Weights,
        _ => Precision::Int8,
    }
}

/// The kernel 1x1 convolutions get for `threads` inference threads, `None`
/// for tract's own matrix product.
pub fn choice(threads: usize) -> Option<Isa> {
    Isa::detect().filter(|_| !disabled_by_env() && (threads == 1 || cfg!(feature = "tract-threads")))
}

/// Replaces every matching 1x1 convolution of a decluttered model (see the
/// module doc) by a [`PointwiseConv`] computing in `precision` (see
/// [`precision_for`]); returns how many.
pub fn rewrite(model: &mut TypedModel, isa: Isa, precision: Precision) -> TractResult<Rewritten> {
    let mut done = Rewritten::default();
    for id in model.eval_order()? {
        // Anything unexpected leaves the node to tract, never fails the load.
        let found = match matching(model, id, isa, precision) {
            Ok(Some(found)) => found,
            outcome => {
                if let Some(einsum) = model.nodes[id].op_as::<EinSum>() {
                    let error = outcome.err().map(|e| format!("{e:#}"));
                    tracing::debug!(node = %model.nodes[id].name, axes = %einsum.axes, error, "an EinSum left to tract's matrix product");
                }
                continue;
            }
        };
        let ((op, x_slot), last, fused_bias, clamps) = found;
        done.int8_weights += op.packed.int8_weights() as usize;
        done.int8_activations += op.packed.int8_activations() as usize;
        let (name, x) = (format!("{}.pointwise", model.nodes[id].name), model.nodes[id].inputs[x_slot]);
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, x)?;
        let wire = patch.wire_node(name, op, &[input])?;
        patch.shunt_outside(model, last, wire[0])?;
        patch.apply(model)?;
        done.convs += 1;
        done.fused_bias += fused_bias as usize;
        done.fused_clamps += clamps;
    }
    if done.convs > 0 {
        model.compact()?;
    }
    Ok(done)
}

type Match = ((PointwiseConv, usize), OutletId, bool, usize);

/// The op that replaces node `id` and the chain after it, with the input
/// slot of the activations, the outlet it replaces, and what it fused.
fn matching(model: &TypedModel, id: usize, isa: Isa, precision: Precision) -> TractResult<Option<Match>> {
    let node = &model.nodes[id];
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let (x_slot, w_slot) = match (facts[0].konst.is_some(), facts[1].konst.is_some()) {
        (false, true) => (0, 1),
        (true, false) => (1, 0),
        _ => return Ok(None),
    };
    let weights = facts[w_slot].konst.clone().unwrap();
    let x_fact = facts[x_slot];
    let output_fact = model.outlet_fact(OutletId::new(id, 0))?;
    if weights.rank() != 2
        || weights.datum_type() != f32::datum_type()
        || x_fact.datum_type != f32::datum_type()
        || output_fact.datum_type != f32::datum_type()
    {
        return Ok(None);
    }
    let (Some(x_shape), Some(out_shape)) = (x_fact.shape.as_concrete(), output_fact.shape.as_concrete()) else {
        return Ok(None);
    };
    // Roles: the contracted axis (X and W), the output channels (W and the
    // output), the positions (X and the output, same order), and size-1
    // axes in X alone (a batch of one summed away).
    let (mut k_in_w, mut n_in_w) = (None, None);
    // (place, role, size, the axis's name): positions are matched by name.
    let mut x_roles: Vec<(usize, char, usize, char)> = vec![];
    let mut out_roles: Vec<(usize, char, usize, char)> = vec![];
    for axis in einsum.axes.iter_all_axes() {
        let (in_x, in_w, in_out) = (&axis.inputs[x_slot], &axis.inputs[w_slot], &axis.outputs[0]);
        match (in_x.len(), in_w.len(), in_out.len()) {
            (1, 1, 0) => {
                // Not broadcast: the same size in X and W.
                if x_shape[in_x[0]] != weights.shape()[in_w[0]] {
                    return Ok(None);
                }
                k_in_w = Some(in_w[0]);
                x_roles.push((in_x[0], 'k', x_shape[in_x[0]], axis.repr));
            }
            (0, 1, 1) => {
                n_in_w = Some(in_w[0]);
                out_roles.push((in_out[0], 'n', out_shape[in_out[0]], axis.repr));
            }
            (1, 0, 1) => {
                if x_shape[in_x[0]] != out_shape[in_out[0]] {
                    return Ok(None);
                }
                x_roles.push((in_x[0], 'p', x_shape[in_x[0]], axis.repr));
                out_roles.push((in_out[0], 'p', out_shape[in_out[0]], axis.repr));
            }
            (1, 0, 0) if x_shape[in_x[0]] == 1 => {}
            (0, 0, 1) if out_shape[in_out[0]] == 1 => {}
            _ => return Ok(None),
        }
    }
    let (Some(k_in_w), Some(n_in_w)) = (k_in_w, n_in_w) else { return Ok(None) };
    if k_in_w == n_in_w {
        return Ok(None);
    }
    // Positions keep their order; size-1 axes do not count for the layout.
    // Ties in place cannot happen (one axis per place).
    let order = |roles: &mut Vec<(usize, char, usize, char)>| {
        roles.sort_by_key(|r| r.0);
        roles.iter().filter(|r| r.2 != 1 || r.1 != 'p').map(|r| r.1).collect::<String>()
    };
    let (x_order, out_order) = (order(&mut x_roles), order(&mut out_roles));
    let positions = |order: &str, channel: char| order.replace(channel, "");
    if positions(&x_order, 'k') != positions(&out_order, 'n') || !positions(&x_order, 'k').chars().all(|c| c == 'p') {
        return Ok(None);
    }
    let x_last = x_order.ends_with('k');
    let out_last = out_order.ends_with('n');
    if !(x_last || x_order.starts_with('k')) || !(out_last || out_order.starts_with('n')) {
        return Ok(None);
    }
    // The same position axes in the same order on both sides (by name: two
    // axes of one size swapped would pass a check of sizes).
    let names = |roles: &[(usize, char, usize, char)]| {
        roles.iter().filter(|r| r.1 == 'p' && r.2 != 1).map(|r| r.3).collect::<Vec<_>>()
    };
    if names(&x_roles) != names(&out_roles) {
        return Ok(None);
    }
    // Channels-first in and out too (on the demo: the first projection, 32
    // -> 16 channels at 112x112 after the stem's channels-first depthwise,
    // and the head's 320 -> 1280): tract's product packs the activations
    // first, and with int8 weights here both ran faster on this kernel
    // (`bench --threads 1`, three alternated runs, weights-only p50 4.90-5.05
    // against 5.17-5.41 ms; FP32 7.34-7.63 against 7.57-7.82).
    let (cin, cout) = (weights.shape()[k_in_w], weights.shape()[n_in_w]);
    if cin == 0 || cout == 0 {
        return Ok(None);
    }
    // What follows: a bias (per-channel constant Add), then Max/Min with
    // scalar constants (ReLU, ReLU6), each the only consumer of the last.
    let mut last = OutletId::new(id, 0);
    let mut bias: Option<Vec<f32>> = None;
    let mut clamp: (Option<f32>, Option<f32>) = (None, None);
    let mut clamps = 0;
    while let Some(next) = model.single_succ(last.node)? {
        if model.outlet_successors(last).len() != 1 || model.output_outlets()?.contains(&last) {
            break;
        }
        let Some((name, _, k)) = binary_with_constant(model, next) else { break };
        let next_fact = model.outlet_fact(OutletId::new(next.id, 0))?;
        if next_fact.datum_type != f32::datum_type() || next_fact.shape.as_concrete() != Some(out_shape) {
            break;
        }
        let values = k.try_as_plain_ram()?.as_slice::<f32>()?;
        // Per channel: all of it along the output's channel axis.
        let n_place = out_roles.iter().find(|r| r.1 == 'n').map(|r| r.0).unwrap_or(usize::MAX);
        let per_channel = k.len() == cout
            && k.rank() == out_shape.len()
            && k.shape().iter().enumerate().all(|(i, &d)| if i == n_place { d == cout } else { d == 1 });
        match name.as_str() {
            "Add" if bias.is_none() && clamps == 0 && per_channel => bias = Some(values.to_vec()),
            "Add" if bias.is_none() && clamps == 0 && k.len() == 1 => bias = Some(vec![values[0]; cout]),
            "Max" if k.len() == 1 && !values[0].is_nan() => {
                clamp.0 = Some(clamp.0.map_or(values[0], |lo| lo.max(values[0])));
                clamps += 1
            }
            "Min" if k.len() == 1 && !values[0].is_nan() => {
                clamp.1 = Some(clamp.1.map_or(values[0], |hi| hi.min(values[0])));
                clamps += 1
            }
            _ => break,
        }
        last = OutletId::new(next.id, 0);
    }
    // A Max above a Min (an empty clamp) would not match the ops' order.
    if let (Some(lo), Some(hi)) = clamp
        && lo > hi
    {
        return Ok(None);
    }
    // Row-major [Cin, Cout] or [Cout, Cin].
    let w = weights.try_as_plain_ram()?.as_slice::<f32>()?;
    let weight = |k: usize, n: usize| if k_in_w == 0 { w[k * cout + n] } else { w[n * cin + k] };
    let fused_bias = bias.is_some();
    // 8-bit activations only for a convolution over a map of positions: a
    // product of one vector (the demo head's [1, 1000] softmax times its 0/1
    // label grouping, which is on an int8 grid by chance) sums
    // probabilities, and quantising them per position would zero every one
    // under 1/254 of the largest (the FP32 demo's `person` is a sum of such).
    let positions = out_shape.iter().product::<usize>() / cout;
    let precision = match precision {
        Precision::Int8 if positions < 2 => Precision::Int8Weights,
        precision => precision,
    };
    let packed = Packed::new(isa, cin, cout, weight, bias.as_deref(), clamp, precision);
    let op = PointwiseConv {
        packed: Arc::new(packed),
        input_channels_last: x_last,
        output_channels_last: out_last,
        output_shape: out_shape.into(),
    };
    Ok(Some(((op, x_slot), last, fused_bias, clamps)))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A small deterministic generator (no dependency for test data); the
    /// stem's tests use it too.
    pub(in crate::engine) fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(
        x: &[f32],
        rows: usize,
        cin: usize,
        w: &[f32],
        cout: usize,
        bias: &[f32],
        clamp: (Option<f32>, Option<f32>),
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * cout];
        for m in 0..rows {
            for n in 0..cout {
                let mut acc = bias[n] as f64;
                for k in 0..cin {
                    acc += x[m * cin + k] as f64 * w[k * cout + n] as f64;
                }
                let v = acc as f32;
                let v = clamp.0.map_or(v, |lo| v.max(lo));
                out[m * cout + n] = clamp.1.map_or(v, |hi| v.min(hi));
            }
        }
        out
    }

    /// `x -> EinSum(expr) [-> + bias -> max 0 -> min 6]`: its output for a
    /// random input, before and after [`rewrite`], and what it rewrote.
    fn rewritten(expr: &str, x_shape: &[usize], w_shape: &[usize], tail: bool) -> (Vec<f32>, Vec<f32>, Rewritten) {
        use tract_onnx::tract_core::ops::math;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(x_shape)).unwrap();
        let w = Tensor::from_shape(w_shape, &values(7, w_shape.iter().product())).unwrap();
        let w = model.add_const("w", w).unwrap();
        let einsum = EinSum { axes: expr.parse().unwrap(), operating_dt: f32::datum_type(), q_params: None };
        let mut wire = model.wire_node("e", einsum, &[x, w]).unwrap()[0];
        if tail {
            let out = model.outlet_fact(wire).unwrap().shape.as_concrete().unwrap().to_vec();
            let n_place = expr
                .split("->")
                .nth(1)
                .unwrap()
                .find(|c: char| {
                    w_shape.len() == 2
                        && expr.split(',').nth(1).unwrap().contains(c)
                        && !expr.split(',').next().unwrap().contains(c)
                })
                .unwrap();
            let mut bias_shape = vec![1; out.len()];
            bias_shape[n_place] = out[n_place];
            let bias = Tensor::from_shape(&bias_shape, &values(9, out[n_place])).unwrap();
            let bias = model.add_const("bias", bias).unwrap();
            wire = model.wire_node("b", math::add(), &[wire, bias]).unwrap()[0];
            let scalar = |v: f32| Tensor::from_shape(&vec![1; out.len()], &[v]).unwrap();
            let zero = model.add_const("zero", scalar(0.0)).unwrap();
            wire = model.wire_node("relu", math::max(), &[wire, zero]).unwrap()[0];
            let six = model.add_const("six", scalar(0.6)).unwrap();
            wire = model.wire_node("relu6", math::min(), &[wire, six]).unwrap()[0];
        }
        model.select_output_outlets(&[wire]).unwrap();
        let input = Tensor::from_shape(x_shape, &values(3, x_shape.iter().product())).unwrap();
        let run = |model: TypedModel| -> Vec<f32> {
            let plan = model.into_runnable_with_options(&Default::default()).unwrap();
            let out = plan.run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let before = run(model.clone());
        let done = rewrite(&mut model, Isa::detect().unwrap(), Precision::Int8).unwrap();
        (before, run(model), done)
    }

    #[test]
    fn the_rewrite_takes_1x1_convolutions_in_every_layout_and_leaves_what_it_cannot_do() {
        if Isa::detect().is_none() {
            return;
        }
        /// The einsum, X's and W's shapes, a bias and ReLU6 after it, rewritten.
        type Case = (&'static str, &'static [usize], &'static [usize], bool, bool);
        let cases: &[Case] = &[
            ("hwk,kn->hwn", &[5, 7, 16], &[16, 40], true, true),
            ("khw,nk->hwn", &[16, 5, 7], &[40, 16], true, true),
            ("hwk,nk->nhw", &[5, 7, 16], &[40, 16], false, true),
            ("ahwk,kn->hwn", &[1, 5, 7, 16], &[16, 3], false, true),
            // Positions swapped, of one size: a check of sizes would pass.
            ("hwk,kn->whn", &[7, 7, 16], &[16, 40], false, false),
            // Channels-first in and out.
            ("khw,nk->nhw", &[16, 5, 7], &[40, 16], true, true),
            // A batch axis in the weights too.
            ("bpk,bkn->bpn", &[2, 5, 16], &[2, 16, 8], false, false),
        ];
        for &(expr, x, w, tail, expected) in cases {
            let (before, after, done) = rewritten(expr, x, w, tail);
            assert_eq!(done.convs == 1, expected, "{expr}: {done:?}");
            if expected && tail {
                assert_eq!((done.fused_bias, done.fused_clamps), (1, 2), "{expr}");
            }
            assert_eq!(before.len(), after.len(), "{expr}");
            for (a, b) in before.iter().zip(&after) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{expr}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn transpose_moves_every_element_across_tile_edges() {
        let (rows, cols) = (70, 33);
        let from: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut to = vec![f32::NAN; rows * cols];
        transpose(&from, rows, cols, &mut to);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(to[c * rows + r], from[r * cols + c]);
            }
        }
    }

    #[test]
    fn the_kernels_match_a_plain_product_on_odd_shapes_with_bias_and_clamp() {
        let isas: Vec<Isa> = match Isa::detect() {
            Some(Isa::Avx512f) => vec![Isa::Avx512f, Isa::Avx2Fma],
            Some(Isa::Avx2Fma) => vec![Isa::Avx2Fma],
            None => return,
        };
        for isa in isas {
            for (seed, &(rows, cin, cout)) in [
                (1, 1, 1),
                (7, 3, 5),
                (9, 16, 96),
                (13, 24, 144),
                (49, 320, 1280),
                (50, 17, 33),
                (6, 8, 16),
                (17, 40, 31),
            ]
            .iter()
            .enumerate()
            {
                let x = values(seed as u64, rows * cin);
                let w = values(100 + seed as u64, cin * cout);
                let bias = values(200 + seed as u64, cout);
                // The same shape with weights on an int8 grid (one scale per
                // output channel, as a DequantizeLinear leaves them).
                let scales = values(300 + seed as u64, cout);
                let quantised: Vec<f32> = w
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v * 127.0).round() * (0.01 + scales[i % cout].abs() * 0.1))
                    .collect();
                // Float weights with 4 or more input channels are never on a
                // grid; with 1 to 3 they may be (exactly, so either is right).
                for (w, int8) in [(&w, (cin >= 4).then_some(false)), (&quantised, Some(true))] {
                    for clamp in [(None, None), (Some(0.0), Some(6.0)), (Some(0.0), Some(0.1)), (None, Some(0.5))] {
                        let packed = Packed::new(
                            isa,
                            cin,
                            cout,
                            |k, n| w[k * cout + n],
                            Some(&bias),
                            clamp,
                            Precision::Int8Weights,
                        );
                        if let Some(int8) = int8 {
                            assert_eq!(packed.int8_weights(), int8, "{isa:?} {rows}x{cin}->{cout}");
                        }
                        // One spare element each side of the output: nothing is written past it.
                        let mut out = vec![f32::NAN; rows * cout + 1];
                        packed.run(&x, rows, &mut out[..rows * cout]);
                        assert!(out[rows * cout].is_nan(), "{isa:?} wrote past the output");
                        let want = reference(&x, rows, cin, w, cout, &bias, clamp);
                        // The same positions read channels-first.
                        let mut channels_first = vec![0f32; rows * cin];
                        transpose(&x, rows, cin, &mut channels_first);
                        let mut strided = vec![f32::NAN; rows * cout];
                        packed.run_strided(&channels_first, (1, rows), rows, &mut strided);
                        assert_eq!(strided, out[..rows * cout], "{isa:?} {rows}x{cin}->{cout}: channels-first input");
                        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                "{isa:?} {rows}x{cin}->{cout} clamp {clamp:?}: [{}, {}] {a} vs {b}",
                                i / cout,
                                i % cout
                            );
                        }
                    }
                }
            }
        }
    }

    #[cfg(feature = "tract-threads")]
    #[test]
    fn split_over_threads_the_kernel_writes_what_it_writes_on_one() {
        use tract_linalg::multithread::{Executor, multithread_tract_scope};
        let Some(best) = Isa::detect() else { return };
        let isas = if best == Isa::Avx512f { vec![Isa::Avx512f, Isa::Avx2Fma] } else { vec![best] };
        let pool = Executor::multithread(3);
        for isa in isas {
            for (seed, &(rows, cin, cout)) in
                [(49, 320, 64), (1000, 16, 96), (17, 8, 40), (101, 24, 31), (12, 64, 64)].iter().enumerate()
            {
                let x = values(seed as u64, rows * cin);
                let w = values(50 + seed as u64, cin * cout);
                let int8: Vec<f32> = w.iter().map(|v| (v * 127.0).round() * 0.02).collect();
                let mut channels_first = vec![0f32; rows * cin];
                transpose(&x, rows, cin, &mut channels_first);
                // Float weights; int8 ones widened; int8 ones with 8-bit
                // activations (where the CPU has VNNI).
                for (weights, is_int8, precision) in [
                    (&w, false, Precision::Int8),
                    (&int8, true, Precision::Int8Weights),
                    (&int8, true, Precision::Int8),
                ] {
                    let packed =
                        Packed::new(isa, cin, cout, |k, n| weights[k * cout + n], None, (Some(0.0), None), precision);
                    assert_eq!(packed.int8_weights(), is_int8);
                    let dot = is_int8 && precision == Precision::Int8 && isa == Isa::Avx512f && dot_products_here();
                    assert_eq!(packed.int8_activations(), dot, "{isa:?} {precision:?}");
                    for (input, strides) in [(&x, (cin, 1)), (&channels_first, (1, rows))] {
                        let mut one = vec![f32::NAN; rows * cout];
                        packed.run_strided(input, strides, rows, &mut one);
                        let mut split = vec![f32::NAN; rows * cout];
                        let runs = multithread_tract_scope(pool.clone(), || {
                            run_parallel(&packed, input, strides, rows, &mut split)
                        });
                        // Split three ways where there are at least 6 tiles;
                        // 12 and 17 positions are 2 or 3 tiles: not split.
                        assert_eq!(runs, if rows >= 49 { 3 } else { 1 }, "{isa:?} {rows} positions");
                        // Each position's sums are the same operations in the
                        // same order whichever tile it falls in: bit for bit.
                        assert_eq!(one, split, "{isa:?} {rows}x{cin}->{cout} strides {strides:?}");
                    }
                }
            }
        }
    }

    /// What [`Precision::Int8`] computes, in plain Rust: each position
    /// quantised to `round(x / s) in [-127, 127]` with `s = max |x| / 127`,
    /// integer sums with the int8 weights, scaled back.
    fn reference_int8(
        x: &[f32],
        rows: usize,
        cin: usize,
        q: &[i8],
        weight_scale: &[f32],
        cout: usize,
        bias: &[f32],
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * cout];
        for m in 0..rows {
            let row = &x[m * cin..(m + 1) * cin];
            let largest = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = largest / 127.0;
            let xq: Vec<i64> = row
                .iter()
                .map(|v| if s > 0.0 { (v * (127.0 / largest)).round_ties_even() as i64 } else { 0 })
                .collect();
            for n in 0..cout {
                let sum: i64 = (0..cin).map(|k| xq[k] * q[k * cout + n] as i64).sum();
                out[m * cout + n] = (sum as f64 * weight_scale[n] as f64 * s as f64 + bias[n] as f64) as f32;
            }
        }
        out
    }

    #[test]
    fn with_8_bit_activations_the_kernel_computes_the_quantised_product_and_stays_near_the_float_one() {
        if Isa::detect() != Some(Isa::Avx512f) || !dot_products_here() {
            eprintln!("no AVX-512 VNNI here: Precision::Int8 packs int8 weights for the float kernel");
            return;
        }
        // Input channels not a multiple of 4 or 16, outputs not of 32,
        // positions not of 8; rows of all zeros and one large value.
        for (seed, &(rows, cin, cout)) in [
            (1, 1, 1),
            (7, 3, 5),
            (9, 16, 96),
            (13, 24, 144),
            (49, 320, 1280),
            (50, 17, 33),
            (17, 40, 31),
            (3, 1280, 7),
        ]
        .iter()
        .enumerate()
        {
            let mut x = values(seed as u64, rows * cin);
            x[..cin].fill(0.0);
            if rows > 2 {
                x[2 * cin] = 40.0;
            }
            let q: Vec<i8> = values(400 + seed as u64, cin * cout).iter().map(|v| (v * 127.0).round() as i8).collect();
            let weight_scale: Vec<f32> =
                values(500 + seed as u64, cout).iter().map(|v| 0.001 + v.abs() * 0.02).collect();
            let w: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * weight_scale[i % cout]).collect();
            let bias = values(600 + seed as u64, cout);
            let packed = Packed::new(
                Isa::Avx512f,
                cin,
                cout,
                |k, n| w[k * cout + n],
                Some(&bias),
                (None, None),
                Precision::Int8,
            );
            assert!(packed.int8_activations(), "{rows}x{cin}->{cout}: not packed for dot products");
            let mut out = vec![f32::NAN; rows * cout + 1];
            packed.run(&x, rows, &mut out[..rows * cout]);
            assert!(out[rows * cout].is_nan(), "wrote past the output");
            let mut channels_first = vec![0f32; rows * cin];
            transpose(&x, rows, cin, &mut channels_first);
            let mut strided = vec![f32::NAN; rows * cout];
            packed.run_strided(&channels_first, (1, rows), rows, &mut strided);
            assert_eq!(strided, out[..rows * cout], "{rows}x{cin}->{cout}: channels-first input");
            let exact = reference_int8(&x, rows, cin, &q, &weight_scale, cout, &bias);
            let float = reference(&x, rows, cin, &w, cout, &bias, (None, None));
            for m in 0..rows {
                // Half a step per input, times the weights it meets: the bound
                // on the quantisation error of this position's sums.
                let step = x[m * cin..(m + 1) * cin].iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                for n in 0..cout {
                    let (a, e, f) = (out[m * cout + n], exact[m * cout + n], float[m * cout + n]);
                    assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "[{m}, {n}] of {rows}x{cin}->{cout}: {a} vs {e}");
                    let bound: f32 = (0..cin).map(|k| (w[k * cout + n]).abs()).sum::<f32>() * step / 2.0;
                    assert!((a - f).abs() <= bound * 1.001 + 1e-5, "[{m}, {n}]: {a} vs float {f} (bound {bound})");
                }
            }
            // The row of zeros is the bias exactly.
            assert_eq!(&out[..cout], &bias[..], "{rows}x{cin}->{cout}: a position of zeros");
        }
    }

    #[test]
    fn with_8_bit_activations_a_position_with_a_nan_or_an_infinity_gives_nans_and_the_others_are_untouched() {
        if Isa::detect() != Some(Isa::Avx512f) || !dot_products_here() {
            return;
        }
        let (rows, cin, cout) = (10, 20, 40);
        let mut x = values(1, rows * cin);
        let w: Vec<f32> = values(2, cin * cout).iter().map(|v| (v * 127.0).round() * 0.01).collect();
        let packed = Packed::new(Isa::Avx512f, cin, cout, |k, n| w[k * cout + n], None, (None, None), Precision::Int8);
        let mut clean = vec![0f32; rows * cout];
        packed.run(&x, rows, &mut clean);
        x[3 * cin + 17] = f32::NAN;
        x[7 * cin] = f32::INFINITY;
        let mut out = vec![0f32; rows * cout];
        packed.run(&x, rows, &mut out);
        for m in 0..rows {
            let row = &out[m * cout..(m + 1) * cout];
            if m == 3 || m == 7 {
                assert!(row.iter().all(|v| v.is_nan()), "position {m}: {row:?}");
            } else {
                assert_eq!(row, &clean[m * cout..(m + 1) * cout], "position {m}");
            }
        }
    }

    #[test]
    fn int8_grid_finds_each_channels_scale_and_refuses_float_weights() {
        let (cin, cout) = (24, 6);
        // Channel n: integers up to a largest magnitude of its own (127, 128
        // as -128, 90, 1, all zero, 127) times a scale of its own.
        let largest = [127.0f32, -128.0, 90.0, 1.0, 0.0, 127.0];
        let scale = [0.013f32, 0.0007, 2.5, 0.3, 1.0, 1e-6];
        let noise = values(11, cin * cout);
        let q = |k: usize, n: usize| {
            if k == 5 { largest[n] } else { (noise[k * cout + n] * largest[n].abs()).round().clamp(-128.0, 127.0) }
        };
        let w = |k: usize, n: usize| q(k, n) * scale[n];
        let found = int8_grid(cin, cout, &w).expect("quantised weights are on a grid");
        // The scale itself where the largest integer is 127, -128 or 90 (a
        // channel of -1, 0 and 1 is as well 127 steps of scale/127).
        for n in [0, 1, 2, 5] {
            assert!((found[n] - scale[n]).abs() <= 1e-6 * scale[n], "channel {n}: {} vs {}", found[n], scale[n]);
        }
        for n in 0..cout {
            for k in 0..cin {
                let back = (w(k, n) / found[n]).round() * found[n];
                assert!((back - w(k, n)).abs() <= 4.0 * f32::EPSILON * 128.0 * scale[n], "[{k}, {n}]");
            }
        }
        // Float weights, one weight off its grid, a NaN, a zero point
        // (integers from 0 to 255): no grid.
        let float = values(12, cin * cout);
        assert_eq!(int8_grid(cin, cout, &|k, n| float[k * cout + n]), None);
        assert_eq!(
            int8_grid(cin, cout, &|k, n| if (k, n) == (3, 2) { w(k, n) + scale[2] * 0.3 } else { w(k, n) }),
            None
        );
        assert_eq!(int8_grid(cin, cout, &|k, n| if (k, n) == (7, 1) { f32::NAN } else { w(k, n) }), None);
        let unsigned = |k: usize, n: usize| (noise[k * cout + n].abs() * 255.0).round().max(129.0 - n as f32) * 0.01;
        assert_eq!(int8_grid(cin, cout, &unsigned), None);
        // +128 steps is outside int8 (only -128 is in): no grid.
        assert_eq!(int8_grid(cin, cout, &|k, n| if (k, n) == (5, 1) { 128.0 * scale[1] } else { w(k, n) }), None);
    }
}
