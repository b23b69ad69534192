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
        *d = f16_elem(b);
    }
}

fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    for (d, b) in dst.iter_mut().zip(src[..n * 2].chunks_exact(2)) {
        *d = bf16_elem(b);
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

/// Portable dot in the order of [`super::exact`] (element `i` into partial sum `i mod 64`,
/// fused multiply-adds, one fixed reduction), every element widened exactly to f32 by `conv`.
#[inline]
fn dot_scalar_with(w: &[u8], a: &[u8], n: usize, wb: usize, conv: impl Fn(&[u8]) -> f32) -> f32 {
    let (w, a) = (&w[..n * wb], &a[..n * 4]);
    super::exact::finish(
        &mut [0f32; super::exact::LANES],
        0,
        n,
        |i| conv(&w[i * wb..]),
        |i| f32_at(&a[i * 4..]),
    )
}

fn dot_f32_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_scalar_with(w, a, n, 4, f32_at)
}

/// An F16 element as f32 (exact).
#[inline]
fn f16_elem(b: &[u8]) -> f32 {
    f16::from_bits(u16_at(b)).to_f32()
}

/// A BF16 element as f32 (exact).
#[inline]
fn bf16_elem(b: &[u8]) -> f32 {
    f32::from_bits((u16_at(b) as u32) << 16)
}

fn dot_f16_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_scalar_with(w, a, n, 2, f16_elem)
}

fn dot_bf16_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_scalar_with(w, a, n, 2, bf16_elem)
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

    use super::super::exact::{finish, LANES};

    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    pub(super) fn has_avx512() -> bool {
        has_avx2() && is_x86_feature_detected!("avx512f")
    }

    /// The three formats share the loops below: `$load` widens 8 (AVX2) or 16 (AVX-512)
    /// elements at `$p` to f32, `$scalar` is the type's portable dot and `$conv` its element
    /// widening for the tail.
    macro_rules! dot_avx2 {
        ($name:ident, $imp:ident, $wb:expr, $scalar:path, $conv:path, |$p:ident| $load:expr) => {
            pub(super) fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
                if !has_avx2() {
                    return $scalar(w, a, n);
                }
                // SAFETY: AVX2, FMA and F16C were detected just above.
                unsafe { $imp(w, a, n) }
            }

            /// 8 accumulators of 8 lanes: partial sum `8m + l` in lane `l` of accumulator `m`.
            #[target_feature(enable = "avx2,fma,f16c")]
            fn $imp(w: &[u8], a: &[u8], n: usize) -> f32 {
                let (w, a) = (&w[..n * $wb], &a[..n * 4]);
                let mut acc = [_mm256_setzero_ps(); 8];
                let full = n / LANES * LANES;
                let mut i = 0;
                while i < full {
                    for (m, s) in acc.iter_mut().enumerate() {
                        let $p = w[(i + 8 * m) * $wb..].as_ptr();
                        // SAFETY: elements i + 8m .. + 8 < full ≤ n of both rows; unaligned
                        // loads.
                        let (wv, av) = unsafe {
                            ($load, _mm256_loadu_ps(a[(i + 8 * m) * 4..].as_ptr().cast()))
                        };
                        *s = _mm256_fmadd_ps(wv, av, *s);
                    }
                    i += LANES;
                }
                let mut p = [0f32; LANES];
                for (m, v) in acc.iter().enumerate() {
                    // SAFETY: `p[8m..8m + 8]` is writable; unaligned store.
                    unsafe { _mm256_storeu_ps(p[8 * m..].as_mut_ptr(), *v) };
                }
                finish(
                    &mut p,
                    full,
                    n,
                    |k| $conv(&w[k * $wb..]),
                    |k| super::f32_at(&a[k * 4..]),
                )
            }
        };
    }

    dot_avx2!(
        dot_f32_avx2,
        dot_f32_avx2_imp,
        4,
        super::dot_f32_scalar,
        super::f32_at,
        |p| _mm256_loadu_ps(p.cast())
    );
    dot_avx2!(
        dot_f16_avx2,
        dot_f16_avx2_imp,
        2,
        super::dot_f16_scalar,
        super::f16_elem,
        |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    );
    dot_avx2!(
        dot_bf16_avx2,
        dot_bf16_avx2_imp,
        2,
        super::dot_bf16_scalar,
        super::bf16_elem,
        |p| _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
            16
        ))
    );

    macro_rules! dot_avx512 {
        ($name:ident, $imp:ident, $wb:expr, $scalar:path, $conv:path, |$p:ident| $load:expr) => {
            pub(super) fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
                if !has_avx512() {
                    return $scalar(w, a, n);
                }
                // SAFETY: AVX-512F (and AVX2/FMA/F16C) were detected just above.
                unsafe { $imp(w, a, n) }
            }

            /// 4 accumulators of 16 lanes: partial sum `16k + l` in lane `l` of accumulator `k`.
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            fn $imp(w: &[u8], a: &[u8], n: usize) -> f32 {
                let (w, a) = (&w[..n * $wb], &a[..n * 4]);
                let mut acc = [_mm512_setzero_ps(); 4];
                let full = n / LANES * LANES;
                let mut i = 0;
                while i < full {
                    for (k, s) in acc.iter_mut().enumerate() {
                        let $p = w[(i + 16 * k) * $wb..].as_ptr();
                        // SAFETY: elements i + 16k .. + 16 < full ≤ n of both rows; unaligned
                        // loads.
                        let (wv, av) = unsafe {
                            (
                                $load,
                                _mm512_loadu_ps(a[(i + 16 * k) * 4..].as_ptr().cast()),
                            )
                        };
                        *s = _mm512_fmadd_ps(wv, av, *s);
                    }
                    i += LANES;
                }
                let mut p = [0f32; LANES];
                for (k, v) in acc.iter().enumerate() {
                    // SAFETY: `p[16k..16k + 16]` is writable; unaligned store.
                    unsafe { _mm512_storeu_ps(p[16 * k..].as_mut_ptr(), *v) };
                }
                finish(
                    &mut p,
                    full,
                    n,
                    |k| $conv(&w[k * $wb..]),
                    |k| super::f32_at(&a[k * 4..]),
                )
            }
        };
    }

    dot_avx512!(
        dot_f32_avx512,
        dot_f32_avx512_imp,
        4,
        super::dot_f32_scalar,
        super::f32_at,
        |p| _mm512_loadu_ps(p.cast())
    );
    dot_avx512!(
        dot_f16_avx512,
        dot_f16_avx512_imp,
        2,
        super::dot_f16_scalar,
        super::f16_elem,
        |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    );
    dot_avx512!(
        dot_bf16_avx512,
        dot_bf16_avx512_imp,
        2,
        super::dot_bf16_scalar,
        super::bf16_elem,
        |p| {
            _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                16,
            ))
        }
    );
}
