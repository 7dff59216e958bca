//! Channel-inner depthwise convolution kernels for tract on x86-64.
//!
//! Depthwise convolutions were most of tract's time on the demo model
//! (EfficientNet-Lite0: 16 of ~26 ms single-threaded, ONNX Runtime 1 ms):
//! tract 0.23.9's only x86-64 depthwise kernel walks one channel's row at a
//! time (width-inner) with 8-lane AVX, so the stride-2 layers and the 7x7
//! and 14x14 maps, whose rows are shorter than a vector, ran scalar.
//!
//! tract picks its kernels from an open registry (`tract_linalg::routines`,
//! an `inventory` collection) by what the CPU offers, and lays depthwise
//! regions out channels-last (NHWC) whenever a *channel-inner* kernel is
//! registered (`Conv::suggested_axis_changes`): aarch64 has one, x86-64 had
//! none. This module registers one for AVX2+FMA and one for AVX-512F. With
//! it, every depthwise layer, whatever its stride, kernel size or map size,
//! becomes contiguous runs of 8 or 16 channels per fused multiply-add, and
//! tract's own zone walk, padding and threading stay as they are. One
//! binary runs on every x86-64: a CPU without AVX2 and FMA (or with them
//! masked by `TRACT_CPU_ISA`) keeps tract's own path.
//!
//! aarch64 keeps tract's own channel-inner NEON kernel (16 channels per
//! iteration with `vfmaq_f32`, the same shape as these), which already gives
//! it the NHWC layout.

#[cfg(target_arch = "x86_64")]
use tract_onnx::prelude::tract_linalg::{
    isa::{Arch, Isa, IsaReq},
    routines::{Func, Routine, RoutineFactory},
};

/// The kernel names as tract's registry knows them.
pub const AVX2_NAME: &str = "labelcast_avx2_fma_depthwise_c_f32";
pub const AVX512_NAME: &str = "labelcast_avx512f_depthwise_c_f32";

#[cfg(target_arch = "x86_64")]
tract_onnx::tract_core::internal::inventory::submit! {
    Routine {
        func: Func::DepthwiseC,
        arch: Some(Arch::X86_64),
        isa: IsaReq::ANY.needing(&[Isa::X86_64Avx2, Isa::X86_64Fma]),
        boost: 0,
        round_trip: false,
        factory: RoutineFactory::DepthwiseCF32 { name: AVX2_NAME, run: depthwise_c_avx2 },
    }
}

#[cfg(target_arch = "x86_64")]
tract_onnx::tract_core::internal::inventory::submit! {
    Routine {
        func: Func::DepthwiseC,
        arch: Some(Arch::X86_64),
        isa: IsaReq::ANY.needing(&[Isa::X86_64Avx512f, Isa::X86_64Fma]),
        boost: 0,
        round_trip: false,
        factory: RoutineFactory::DepthwiseCF32 { name: AVX512_NAME, run: depthwise_c_avx512 },
    }
}

/// The channel-inner depthwise kernel tract will run on this CPU, by name;
/// `None` where it has none (x86-64 without AVX2 and FMA).
///
/// Naming the kernels here also keeps their registry entries linked into
/// the binary: a linker may leave out an object nothing refers to.
pub fn selected() -> Option<&'static str> {
    use tract_onnx::prelude::tract_linalg::{isa, routines};
    std::hint::black_box((depthwise_c_avx2 as *const (), depthwise_c_avx512 as *const ()));
    routines::best_for(routines::Func::DepthwiseC, tract_onnx::prelude::DatumType::F32, &isa::native())
        .map(|routine| routine.name())
}

/// The `DepthwiseCF32` contract (tract-linalg `routines.rs`): `len` output
/// positions of `channels` contiguous channels each; position `i`, channel
/// `c` is `bias[c]` plus every `kernel[tap_indices[t] * k_stride + c] *
/// input[i * in_stride + offsets[t] + c]`.
///
/// # Safety
/// As tract's contract says: every input, kernel and bias element named
/// above readable, `channels` values writable at `output.offset(i *
/// out_stride)` for each `i`; the CPU has AVX2 and FMA (the registry only
/// picks this kernel where it does).
#[allow(clippy::too_many_arguments)]
pub unsafe fn depthwise_c_avx2(
    input: *const f32,
    output: *mut f32,
    kernel: *const f32,
    tap_indices: &[usize],
    offsets: &[isize],
    bias: *const f32,
    channels: usize,
    k_stride: usize,
    len: usize,
    in_stride: isize,
    out_stride: isize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::avx2::<false>(
            input,
            output,
            kernel,
            tap_indices,
            offsets,
            bias,
            channels,
            k_stride,
            len,
            in_stride,
            out_stride,
            x86::Bounds { lo: None, hi: None },
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    unsafe {
        scalar(input, output, kernel, tap_indices, offsets, bias, channels, k_stride, len, in_stride, out_stride)
    }
}

/// [`depthwise_c_avx2`] with 16-lane AVX-512F vectors.
///
/// # Safety
/// As [`depthwise_c_avx2`], on a CPU with AVX-512F and FMA.
#[allow(clippy::too_many_arguments)]
pub unsafe fn depthwise_c_avx512(
    input: *const f32,
    output: *mut f32,
    kernel: *const f32,
    tap_indices: &[usize],
    offsets: &[isize],
    bias: *const f32,
    channels: usize,
    k_stride: usize,
    len: usize,
    in_stride: isize,
    out_stride: isize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::avx512::<false>(
            input,
            output,
            kernel,
            tap_indices,
            offsets,
            bias,
            channels,
            k_stride,
            len,
            in_stride,
            out_stride,
            x86::Bounds { lo: None, hi: None },
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    unsafe {
        scalar(input, output, kernel, tap_indices, offsets, bias, channels, k_stride, len, in_stride, out_stride)
    }
}

/// The contract in plain Rust: the reference the SIMD kernels are tested
/// against.
///
/// # Safety
/// As [`depthwise_c_avx2`], on any CPU.
#[allow(clippy::too_many_arguments)]
pub unsafe fn scalar(
    input: *const f32,
    output: *mut f32,
    kernel: *const f32,
    tap_indices: &[usize],
    offsets: &[isize],
    bias: *const f32,
    channels: usize,
    k_stride: usize,
    len: usize,
    in_stride: isize,
    out_stride: isize,
) {
    unsafe {
        for i in 0..len as isize {
            let (iptr, optr) = (input.offset(i * in_stride), output.offset(i * out_stride));
            for c in 0..channels {
                let mut sum = *bias.add(c);
                for (&kix, &off) in tap_indices.iter().zip(offsets) {
                    sum += *kernel.add(kix * k_stride + c) * *iptr.offset(off).add(c);
                }
                *optr.add(c) = sum;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// The bounds of a fused Max/Min (a ReLU/ReLU6) applied before a store:
    /// `max(a, lo)` then `min(a, hi)`, each only where the graph had it. The
    /// bound is the second operand, which is what the instructions return
    /// when either is NaN: a NaN becomes the bound, as tract's own Max/Min
    /// (`f32::max`) and the 1x1 kernel make it.
    #[derive(Clone, Copy)]
    pub struct Bounds {
        pub lo: Option<f32>,
        pub hi: Option<f32>,
    }

    #[inline(always)]
    unsafe fn clamp256<const CLAMP: bool>(mut a: __m256, b: Bounds) -> __m256 {
        if CLAMP {
            unsafe {
                if let Some(lo) = b.lo {
                    a = _mm256_max_ps(a, _mm256_set1_ps(lo));
                }
                if let Some(hi) = b.hi {
                    a = _mm256_min_ps(a, _mm256_set1_ps(hi));
                }
            }
        }
        a
    }

    #[inline(always)]
    unsafe fn clamp512<const CLAMP: bool>(mut a: __m512, b: Bounds) -> __m512 {
        if CLAMP {
            unsafe {
                if let Some(lo) = b.lo {
                    a = _mm512_max_ps(a, _mm512_set1_ps(lo));
                }
                if let Some(hi) = b.hi {
                    a = _mm512_min_ps(a, _mm512_set1_ps(hi));
                }
            }
        }
        a
    }

    /// Four 8-lane accumulators (32 channels) per pass over the taps, then
    /// one, then a masked remainder, so a layer of any width is one loop.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn avx2<const CLAMP: bool>(
        input: *const f32,
        output: *mut f32,
        kernel: *const f32,
        tap_indices: &[usize],
        offsets: &[isize],
        bias: *const f32,
        channels: usize,
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: isize,
        bounds: Bounds,
    ) {
        unsafe {
            for i in 0..len as isize {
                let iptr = input.offset(i * in_stride);
                let optr = output.offset(i * out_stride);
                let mut c = 0usize;
                while c + 32 <= channels {
                    let mut a0 = _mm256_loadu_ps(bias.add(c));
                    let mut a1 = _mm256_loadu_ps(bias.add(c + 8));
                    let mut a2 = _mm256_loadu_ps(bias.add(c + 16));
                    let mut a3 = _mm256_loadu_ps(bias.add(c + 24));
                    for (&kix, &off) in tap_indices.iter().zip(offsets) {
                        let k = kernel.add(kix * k_stride + c);
                        let x = iptr.offset(off).add(c);
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(k), a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(k.add(8)), a1);
                        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(16)), _mm256_loadu_ps(k.add(16)), a2);
                        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(24)), _mm256_loadu_ps(k.add(24)), a3);
                    }
                    _mm256_storeu_ps(optr.add(c), clamp256::<CLAMP>(a0, bounds));
                    _mm256_storeu_ps(optr.add(c + 8), clamp256::<CLAMP>(a1, bounds));
                    _mm256_storeu_ps(optr.add(c + 16), clamp256::<CLAMP>(a2, bounds));
                    _mm256_storeu_ps(optr.add(c + 24), clamp256::<CLAMP>(a3, bounds));
                    c += 32;
                }
                while c + 8 <= channels {
                    let mut a = _mm256_loadu_ps(bias.add(c));
                    for (&kix, &off) in tap_indices.iter().zip(offsets) {
                        let k = kernel.add(kix * k_stride + c);
                        a = _mm256_fmadd_ps(_mm256_loadu_ps(iptr.offset(off).add(c)), _mm256_loadu_ps(k), a);
                    }
                    _mm256_storeu_ps(optr.add(c), clamp256::<CLAMP>(a, bounds));
                    c += 8;
                }
                if c < channels {
                    // Lanes below `channels - c` on: a masked load reads nothing past the end.
                    let rest = (channels - c) as i32;
                    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                    let mut a = _mm256_maskload_ps(bias.add(c), mask);
                    for (&kix, &off) in tap_indices.iter().zip(offsets) {
                        let k = _mm256_maskload_ps(kernel.add(kix * k_stride + c), mask);
                        a = _mm256_fmadd_ps(_mm256_maskload_ps(iptr.offset(off).add(c), mask), k, a);
                    }
                    _mm256_maskstore_ps(optr.add(c), mask, clamp256::<CLAMP>(a, bounds));
                }
            }
        }
    }

    /// Four 16-lane accumulators (64 channels) per pass, then one, then a
    /// masked remainder.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn avx512<const CLAMP: bool>(
        input: *const f32,
        output: *mut f32,
        kernel: *const f32,
        tap_indices: &[usize],
        offsets: &[isize],
        bias: *const f32,
        channels: usize,
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: isize,
        bounds: Bounds,
    ) {
        unsafe {
            for i in 0..len as isize {
                let iptr = input.offset(i * in_stride);
                let optr = output.offset(i * out_stride);
                let mut c = 0usize;
                while c + 64 <= channels {
                    let mut a0 = _mm512_loadu_ps(bias.add(c));
                    let mut a1 = _mm512_loadu_ps(bias.add(c + 16));
                    let mut a2 = _mm512_loadu_ps(bias.add(c + 32));
                    let mut a3 = _mm512_loadu_ps(bias.add(c + 48));
                    for (&kix, &off) in tap_indices.iter().zip(offsets) {
                        let k = kernel.add(kix * k_stride + c);
                        let x = iptr.offset(off).add(c);
                        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(k), a0);
                        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(k.add(16)), a1);
                        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(32)), _mm512_loadu_ps(k.add(32)), a2);
                        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(48)), _mm512_loadu_ps(k.add(48)), a3);
                    }
                    _mm512_storeu_ps(optr.add(c), clamp512::<CLAMP>(a0, bounds));
                    _mm512_storeu_ps(optr.add(c + 16), clamp512::<CLAMP>(a1, bounds));
                    _mm512_storeu_ps(optr.add(c + 32), clamp512::<CLAMP>(a2, bounds));
                    _mm512_storeu_ps(optr.add(c + 48), clamp512::<CLAMP>(a3, bounds));
                    c += 64;
                }
                while c + 16 <= channels {
                    let mut a = _mm512_loadu_ps(bias.add(c));
                    for (&kix, &off) in tap_indices.iter().zip(offsets) {
                        let k = kernel.add(kix * k_stride + c);
                        a = _mm512_fmadd_ps(_mm512_loadu_ps(iptr.offset(off).add(c)), _mm512_loadu_ps(k), a);
                    }
                    _mm512_storeu_ps(optr.add(c), clamp512::<CLAMP>(a, bounds));
                    c += 16;
                }
                if c < channels {
                    let mask: __mmask16 = (1u32 << (channels - c)).wrapping_sub(1) as __mmask16;
                    let mut a = _mm512_maskz_loadu_ps(mask, bias.add(c));
                    for (&kix, &off) in tap_indices.iter().zip(offsets) {
                        let k = _mm512_maskz_loadu_ps(mask, kernel.add(kix * k_stride + c));
                        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, iptr.offset(off).add(c)), k, a);
                    }
                    _mm512_mask_storeu_ps(optr.add(c), mask, clamp512::<CLAMP>(a, bounds));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Kernel =
        unsafe fn(*const f32, *mut f32, *const f32, &[usize], &[isize], *const f32, usize, usize, usize, isize, isize);

    /// Runs `kernel` and the scalar reference on one random problem:
    /// `channels` channels, `taps` taps at random offsets, `len` positions
    /// `stride` positions apart (stride 2: a stride-2 layer's input step).
    fn compare(kernel: Kernel, channels: usize, taps: usize, len: usize, stride: usize, seed: u64) -> f32 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let k_stride = channels + rng.usize(0..4);
        let in_stride = (stride * channels) as isize;
        let offsets: Vec<isize> = (0..taps).map(|t| (t * channels) as isize).collect();
        let tap_indices: Vec<usize> = (0..taps).map(|t| (t * 7) % taps).collect();
        let input_len = (len.max(1) - 1) * stride * channels + taps * channels + channels;
        let input: Vec<f32> = (0..input_len).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let weights: Vec<f32> = (0..taps * k_stride).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let bias: Vec<f32> = (0..channels).map(|_| rng.f32() - 0.5).collect();
        let out_stride = (channels + 3) as isize;
        // A guard value around each output run shows a write past its end.
        let mut ours = vec![7.5f32; len * out_stride as usize + 8];
        let mut theirs = ours.clone();
        let run = |k: Kernel, out: &mut Vec<f32>| unsafe {
            k(
                input.as_ptr(),
                out.as_mut_ptr(),
                weights.as_ptr(),
                &tap_indices,
                &offsets,
                bias.as_ptr(),
                channels,
                k_stride,
                len,
                in_stride,
                out_stride,
            )
        };
        run(kernel, &mut ours);
        run(scalar, &mut theirs);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            if *b == 7.5 {
                assert_eq!(*a, 7.5, "wrote past a run at {i} (channels {channels}, taps {taps})");
            }
        }
        ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    fn kernels_here() -> Vec<(&'static str, Kernel)> {
        // Nothing is pushed on aarch64 (no SIMD kernel of ours there yet).
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut here: Vec<(&'static str, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                here.push((AVX2_NAME, depthwise_c_avx2));
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                here.push((AVX512_NAME, depthwise_c_avx512));
            }
        }
        here
    }

    #[test]
    fn every_simd_kernel_matches_the_scalar_contract_on_random_shapes() {
        let kernels = kernels_here();
        if kernels.is_empty() {
            eprintln!("no AVX2/AVX-512 on this CPU: only the scalar reference is built for it");
        }
        for (name, kernel) in kernels {
            let mut seed = 1;
            // Widths around every vector size, 3x3 and 5x5 kernels and
            // border zones (fewer taps), strides 1 and 2, runs of 1 to 9.
            for channels in [1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 63, 64, 65, 96, 112, 144, 191, 240] {
                for taps in [1, 2, 4, 6, 9, 15, 25] {
                    for (len, stride) in [(1, 1), (3, 1), (9, 2), (7, 1), (4, 2)] {
                        seed += 1;
                        let worst = compare(kernel, channels, taps, len, stride, seed);
                        // FMA rounds once where mul+add rounds twice: 25 taps of
                        // values below 1 stay within a few ulps of 25.
                        assert!(worst < 1e-5, "{name}: channels {channels}, taps {taps}, len {len}: {worst}");
                    }
                }
            }
        }
    }

    #[test]
    fn tract_picks_labelcasts_kernel_where_the_cpu_can_run_it() {
        let selected = selected();
        #[cfg(target_arch = "x86_64")]
        {
            let expected = if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                Some(AVX512_NAME)
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Some(AVX2_NAME)
            } else {
                None
            };
            if std::env::var_os("TRACT_CPU_ISA").is_none() {
                assert_eq!(selected, expected);
            }
        }
        #[cfg(target_arch = "aarch64")]
        assert!(selected.is_some_and(|name| !name.starts_with("labelcast")), "tract's own NEON kernel: {selected:?}");
    }
}
