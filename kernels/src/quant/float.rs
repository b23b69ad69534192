//! Plain float weights: F32, F16 and BF16, dotted with f32 activations ([`ActFormat::F32`]).
//!
//! Rows are little-endian element arrays; activation rows are little-endian f32 bytes. Neither is
//! assumed to be aligned: scalar code reads with `from_le_bytes`, SIMD code with unaligned loads.

use std::sync::OnceLock;

use half::{bf16, f16};
use pshard_model::ggml_type::GgmlType;

use super::{ActFormat, DotFn, QuantKernel};

#[inline]
fn f32_at(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[inline]
fn u16_at(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    for (d, b) in dst.iter_mut().zip(src[..n * 4].chunks_exact(4)) {
        *d = f32_at(b);
    }
}

fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    for (d, b) in dst.iter_mut().zip(src[..n * 2].chunks_exact(2)) {
        *d = f16::from_bits(u16_at(b)).to_f32();
    }
}

fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    for (d, b) in dst.iter_mut().zip(src[..n * 2].chunks_exact(2)) {
        *d = f32::from_bits((u16_at(b) as u32) << 16);
    }
}

fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (b, x) in dst[..src.len() * 4].chunks_exact_mut(4).zip(src) {
        b.copy_from_slice(&x.to_le_bytes());
    }
}

/// Round-to-nearest-even f32 → f16.
fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (b, x) in dst[..src.len() * 2].chunks_exact_mut(2).zip(src) {
        b.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
    }
}

/// Round-to-nearest-even f32 → bf16.
fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (b, x) in dst[..src.len() * 2].chunks_exact_mut(2).zip(src) {
        b.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
    }
}

/// Scalar dot with 8 partial sums (keeps the error growth like the SIMD paths, and lets the
/// compiler vectorise).
#[inline]
fn dot_scalar_with(w: &[u8], a: &[u8], n: usize, wb: usize, conv: impl Fn(&[u8]) -> f32) -> f32 {
    let w = &w[..n * wb];
    let a = &a[..n * 4];
    let mut acc = [0f32; 8];
    let mut wc = w.chunks_exact(8 * wb);
    let mut ac = a.chunks_exact(32);
    for (w8, a8) in (&mut wc).zip(&mut ac) {
        for k in 0..8 {
            acc[k] += conv(&w8[k * wb..]) * f32_at(&a8[k * 4..]);
        }
    }
    for (k, (wr, ar)) in wc
        .remainder()
        .chunks_exact(wb)
        .zip(ac.remainder().chunks_exact(4))
        .enumerate()
    {
        acc[k] += conv(wr) * f32_at(ar);
    }
    acc.iter().sum()
}

fn dot_f32_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_scalar_with(w, a, n, 4, f32_at)
}

fn dot_f16_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_scalar_with(w, a, n, 2, |b| f16::from_bits(u16_at(b)).to_f32())
}

fn dot_bf16_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_scalar_with(w, a, n, 2, |b| f32::from_bits((u16_at(b) as u32) << 16))
}

/// Dequantizer signature of [`QuantKernel`].
type DequantFn = fn(&[u8], &mut [f32]);
/// Quantizer signature of [`QuantKernel`].
type QuantFn = fn(&[f32], &mut [u8]);

fn make(ty: GgmlType, dot: DotFn, dot_variant: &'static str) -> QuantKernel {
    let (dequantize_row, quantize_row): (DequantFn, QuantFn) = match ty {
        GgmlType::F32 => (dequantize_f32, quantize_f32),
        GgmlType::F16 => (dequantize_f16, quantize_f16),
        GgmlType::BF16 => (dequantize_bf16, quantize_bf16),
        _ => panic!("float kernels do not handle {ty}"),
    };
    QuantKernel {
        ty,
        act: ActFormat::F32,
        dequantize_row,
        quantize_row,
        dot,
        dot_variant,
    }
}

/// The portable scalar kernel for F32, F16 or BF16.
///
/// # Panics
/// For any other type (the dispatcher in `quant::kernel` only passes float types).
pub fn scalar_kernel(ty: GgmlType) -> QuantKernel {
    let dot: DotFn = match ty {
        GgmlType::F32 => dot_f32_scalar,
        GgmlType::F16 => dot_f16_scalar,
        GgmlType::BF16 => dot_bf16_scalar,
        _ => panic!("float kernels do not handle {ty}"),
    };
    make(ty, dot, "scalar")
}

/// Every dot variant this CPU can run for `ty`, best first (the last is always scalar). Tests
/// check each of them.
pub fn kernel_variants(ty: GgmlType) -> Vec<QuantKernel> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if x86::has_avx512() {
            let dot: DotFn = match ty {
                GgmlType::F32 => x86::dot_f32_avx512,
                GgmlType::F16 => x86::dot_f16_avx512,
                _ => x86::dot_bf16_avx512,
            };
            v.push(make(ty, dot, "avx512"));
        }
        if x86::has_avx2() {
            let dot: DotFn = match ty {
                GgmlType::F32 => x86::dot_f32_avx2,
                GgmlType::F16 => x86::dot_f16_avx2,
                _ => x86::dot_bf16_avx2,
            };
            v.push(make(ty, dot, "avx2"));
        }
    }
    v.push(scalar_kernel(ty));
    v
}

/// The kernel for F32, F16 or BF16 with the fastest dot variant this CPU supports (detected once).
///
/// # Panics
/// For any other type.
pub fn kernel(ty: GgmlType) -> QuantKernel {
    static BEST: OnceLock<[QuantKernel; 3]> = OnceLock::new();
    let best = BEST.get_or_init(|| {
        [GgmlType::F32, GgmlType::F16, GgmlType::BF16].map(|t| kernel_variants(t)[0])
    });
    match ty {
        GgmlType::F32 => best[0],
        GgmlType::F16 => best[1],
        GgmlType::BF16 => best[2],
        _ => panic!("float kernels do not handle {ty}"),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2+FMA+F16C and AVX-512F variants. The public wrappers are plain `fn`s so they fit
    //! [`DotFn`](super::DotFn); each re-checks the (cached) feature flags, so calling one on a CPU
    //! without the features falls back to scalar instead of executing unsupported instructions.

    use std::arch::x86_64::*;

    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    pub(super) fn has_avx512() -> bool {
        has_avx2() && is_x86_feature_detected!("avx512f")
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Loads 8 elements of `ty` at `w` (element index `i`) as f32 — the three formats share the
    /// loop below.
    macro_rules! dot_avx2 {
        ($name:ident, $imp:ident, $wb:expr, $scalar:path, |$p:ident| $load:expr) => {
            pub(super) fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
                if !has_avx2() {
                    return $scalar(w, a, n);
                }
                // SAFETY: AVX2, FMA and F16C were detected just above.
                unsafe { $imp(w, a, n) }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            fn $imp(w: &[u8], a: &[u8], n: usize) -> f32 {
                let w = &w[..n * $wb];
                let a = &a[..n * 4];
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut wc = w.chunks_exact(32 * $wb);
                let mut ac = a.chunks_exact(128);
                for (w32, a32) in (&mut wc).zip(&mut ac) {
                    for k in 0..4 {
                        let $p = w32[k * 8 * $wb..].as_ptr();
                        // SAFETY: w32 holds 32 elements and a32 32 f32; chunk k reads elements
                        // 8k..8k+8 of each, in bounds. Unaligned loads.
                        let (wv, av) =
                            unsafe { ($load, _mm256_loadu_ps(a32[k * 32..].as_ptr().cast())) };
                        acc[k] = _mm256_fmadd_ps(wv, av, acc[k]);
                    }
                }
                let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let tail = $scalar(wc.remainder(), ac.remainder(), n % 32);
                hsum256(s) + tail
            }
        };
    }

    dot_avx2!(
        dot_f32_avx2,
        dot_f32_avx2_imp,
        4,
        super::dot_f32_scalar,
        |p| _mm256_loadu_ps(p.cast())
    );
    dot_avx2!(
        dot_f16_avx2,
        dot_f16_avx2_imp,
        2,
        super::dot_f16_scalar,
        |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    );
    dot_avx2!(
        dot_bf16_avx2,
        dot_bf16_avx2_imp,
        2,
        super::dot_bf16_scalar,
        |p| _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
            16
        ))
    );

    macro_rules! dot_avx512 {
        ($name:ident, $imp:ident, $wb:expr, $scalar:path, |$p:ident| $load:expr) => {
            pub(super) fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
                if !has_avx512() {
                    return $scalar(w, a, n);
                }
                // SAFETY: AVX-512F (and AVX2/FMA/F16C) were detected just above.
                unsafe { $imp(w, a, n) }
            }

            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            fn $imp(w: &[u8], a: &[u8], n: usize) -> f32 {
                let w = &w[..n * $wb];
                let a = &a[..n * 4];
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut wc = w.chunks_exact(64 * $wb);
                let mut ac = a.chunks_exact(256);
                for (w64, a64) in (&mut wc).zip(&mut ac) {
                    for k in 0..4 {
                        let $p = w64[k * 16 * $wb..].as_ptr();
                        // SAFETY: w64 holds 64 elements and a64 64 f32; chunk k reads elements
                        // 16k..16k+16 of each, in bounds. Unaligned loads.
                        let (wv, av) =
                            unsafe { ($load, _mm512_loadu_ps(a64[k * 64..].as_ptr().cast())) };
                        acc[k] = _mm512_fmadd_ps(wv, av, acc[k]);
                    }
                }
                let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                let tail = $scalar(wc.remainder(), ac.remainder(), n % 64);
                _mm512_reduce_add_ps(s) + tail
            }
        };
    }

    dot_avx512!(
        dot_f32_avx512,
        dot_f32_avx512_imp,
        4,
        super::dot_f32_scalar,
        |p| _mm512_loadu_ps(p.cast())
    );
    dot_avx512!(
        dot_f16_avx512,
        dot_f16_avx512_imp,
        2,
        super::dot_f16_scalar,
        |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    );
    dot_avx512!(
        dot_bf16_avx512,
        dot_bf16_avx512_imp,
        2,
        super::dot_bf16_scalar,
        |p| {
            _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                16,
            ))
        }
    );
}
