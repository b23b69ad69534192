//! The f32 × f32 dot product of the exact-activation matmul
//! ([`ActPrecision::Exact`](crate::matmul::ActPrecision)): weight rows dequantized to f32 on the
//! fly, dotted with unrounded f32 activations.
//!
//! Variants: AVX-512F, AVX2 + FMA, and a portable loop with 16 partial sums (vectorisable, and
//! the same error growth as the SIMD paths). The best one this CPU runs is picked once.

use std::sync::OnceLock;

/// A dot product of two equally long f32 slices.
pub type DotF32Fn = fn(a: &[f32], b: &[f32]) -> f32;

/// Four dot products `[w[0]·x, w[1]·x, w[2]·x, w[3]·x]` sharing the loads of `x` (all slices
/// equally long).
pub type Dot4F32Fn = fn(w: [&[f32]; 4], x: &[f32]) -> [f32; 4];

/// Portable four-row dot: [`dot_f32_scalar`] per row.
pub fn dot4_f32_scalar(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    w.map(|r| dot_f32_scalar(r, x))
}

/// Portable dot: 16 independent partial sums, then their sum.
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut ac = a.chunks_exact(L);
    let mut bc = b.chunks_exact(L);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for k in 0..L {
            acc[k] += x[k] * y[k];
        }
    }
    for (k, (x, y)) in ac.remainder().iter().zip(bc.remainder()).enumerate() {
        acc[k] += x * y;
    }
    acc.iter().sum()
}

/// One SIMD level's f32 dot products.
#[derive(Clone, Copy, Debug)]
pub struct DotF32Variant {
    /// Single dot.
    pub dot: DotF32Fn,
    /// Four rows against one vector.
    pub dot4: Dot4F32Fn,
    /// `"avx512"`, `"avx2"` or `"scalar"`.
    pub name: &'static str,
}

/// Every variant this CPU can run, best first (the last is always `"scalar"`); tests check each
/// of them.
pub fn dot_f32_variants() -> Vec<DotF32Variant> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if x86::has_avx512() {
            v.push(DotF32Variant {
                dot: x86::dot_avx512,
                dot4: x86::dot4_avx512,
                name: "avx512",
            });
        }
        if x86::has_avx2() {
            v.push(DotF32Variant {
                dot: x86::dot_avx2,
                dot4: x86::dot4_avx2,
                name: "avx2",
            });
        }
    }
    v.push(DotF32Variant {
        dot: dot_f32_scalar,
        dot4: dot4_f32_scalar,
        name: "scalar",
    });
    v
}

/// The fastest variant this CPU supports up to [`simd_cap`](super::simd_cap) (detected once).
pub fn dot_f32_best() -> DotF32Variant {
    static BEST: OnceLock<DotF32Variant> = OnceLock::new();
    *BEST.get_or_init(|| {
        let allowed = match super::simd_cap() {
            super::SimdLevel::Scalar => ["scalar"].as_slice(),
            super::SimdLevel::Avx2 => ["avx2", "scalar"].as_slice(),
            super::SimdLevel::Avx512 => ["avx512", "avx2", "scalar"].as_slice(),
        };
        dot_f32_variants()
            .into_iter()
            .find(|v| allowed.contains(&v.name))
            .expect("the scalar dot is always there")
    })
}

/// `Σ a[i] b[i]` in f32 with the fastest variant this CPU supports.
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    (dot_f32_best().dot)(a, b)
}

/// `[w[0]·x, …, w[3]·x]` in f32 with the fastest variant this CPU supports; each result is
/// bit-identical to [`dot_f32`] of that row (the same lanes and the same order of sums).
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn dot4_f32(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    (dot_f32_best().dot4)(w, x)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The wrappers are plain `fn`s so they fit [`DotF32Fn`](super::DotF32Fn); each re-checks the
    //! (cached) feature flags, so calling one on a CPU without the features falls back to the
    //! portable loop instead of executing unsupported instructions.

    use std::arch::x86_64::*;

    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub(super) fn has_avx512() -> bool {
        has_avx2() && is_x86_feature_detected!("avx512f")
    }

    pub(super) fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
        if !has_avx2() {
            return super::dot_f32_scalar(a, b);
        }
        // SAFETY: AVX2 and FMA were detected just above.
        unsafe { dot_avx2_imp(a, b) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_avx2_imp(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut ac = a.chunks_exact(32);
        let mut bc = b.chunks_exact(32);
        for (x, y) in (&mut ac).zip(&mut bc) {
            for (k, s) in acc.iter_mut().enumerate() {
                // SAFETY: `x` and `y` hold 32 f32 each; lane group k reads 8k..8k+8, unaligned.
                let (xv, yv) = unsafe {
                    (
                        _mm256_loadu_ps(x[8 * k..].as_ptr()),
                        _mm256_loadu_ps(y[8 * k..].as_ptr()),
                    )
                };
                *s = _mm256_fmadd_ps(xv, yv, *s);
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h) + super::dot_f32_scalar(ac.remainder(), bc.remainder())
    }

    pub(super) fn dot4_avx2(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        assert!(
            w.iter().all(|r| r.len() == x.len()),
            "dot of slices of different lengths"
        );
        if !has_avx2() {
            return super::dot4_f32_scalar(w, x);
        }
        // SAFETY: AVX2 and FMA were detected just above.
        unsafe { dot4_avx2_imp(w, x) }
    }

    /// Four rows at once, with exactly the lanes and sums of [`dot_avx2_imp`] per row.
    #[target_feature(enable = "avx2,fma")]
    fn dot4_avx2_imp(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let mut acc = [[_mm256_setzero_ps(); 4]; 4];
        let full = x.len() / 32 * 32;
        let mut i = 0;
        while i < full {
            for k in 0..4 {
                // SAFETY: `i + 8k + 8 <= full <= len` for `x` and every row; unaligned loads.
                let xv = unsafe { _mm256_loadu_ps(x[i + 8 * k..].as_ptr()) };
                for (r, row) in w.iter().enumerate() {
                    // SAFETY: as above (rows are as long as `x`).
                    let wv = unsafe { _mm256_loadu_ps(row[i + 8 * k..].as_ptr()) };
                    acc[r][k] = _mm256_fmadd_ps(wv, xv, acc[r][k]);
                }
            }
            i += 32;
        }
        std::array::from_fn(|r| {
            let a = &acc[r];
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            _mm_cvtss_f32(h) + super::dot_f32_scalar(&w[r][full..], &x[full..])
        })
    }

    pub(super) fn dot4_avx512(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        assert!(
            w.iter().all(|r| r.len() == x.len()),
            "dot of slices of different lengths"
        );
        if !has_avx512() {
            return super::dot4_f32_scalar(w, x);
        }
        // SAFETY: AVX-512F (and AVX2/FMA) were detected just above.
        unsafe { dot4_avx512_imp(w, x) }
    }

    /// Four rows at once, with exactly the lanes and sums of [`dot_avx512_imp`] per row.
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn dot4_avx512_imp(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let full = x.len() / 64 * 64;
        let mut i = 0;
        while i < full {
            for k in 0..4 {
                // SAFETY: `i + 16k + 16 <= full <= len` for `x` and every row; unaligned loads.
                let xv = unsafe { _mm512_loadu_ps(x[i + 16 * k..].as_ptr()) };
                for (r, row) in w.iter().enumerate() {
                    // SAFETY: as above (rows are as long as `x`).
                    let wv = unsafe { _mm512_loadu_ps(row[i + 16 * k..].as_ptr()) };
                    acc[r][k] = _mm512_fmadd_ps(wv, xv, acc[r][k]);
                }
            }
            i += 64;
        }
        std::array::from_fn(|r| {
            let a = &acc[r];
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            _mm512_reduce_add_ps(s) + super::dot_f32_scalar(&w[r][full..], &x[full..])
        })
    }

    pub(super) fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
        if !has_avx512() {
            return super::dot_f32_scalar(a, b);
        }
        // SAFETY: AVX-512F (and AVX2/FMA) were detected just above.
        unsafe { dot_avx512_imp(a, b) }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn dot_avx512_imp(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut ac = a.chunks_exact(64);
        let mut bc = b.chunks_exact(64);
        for (x, y) in (&mut ac).zip(&mut bc) {
            for (k, s) in acc.iter_mut().enumerate() {
                // SAFETY: `x` and `y` hold 64 f32 each; lane group k reads 16k..16k+16, unaligned.
                let (xv, yv) = unsafe {
                    (
                        _mm512_loadu_ps(x[16 * k..].as_ptr()),
                        _mm512_loadu_ps(y[16 * k..].as_ptr()),
                    )
                };
                *s = _mm512_fmadd_ps(xv, yv, *s);
            }
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s) + super::dot_f32_scalar(ac.remainder(), bc.remainder())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant against an f64 sum, lengths covering empty, tails and several full steps.
    #[test]
    fn variants_match_f64() {
        let variants = dot_f32_variants();
        assert_eq!(variants.last().map(|v| v.name), Some("scalar"));
        for n in [0usize, 1, 7, 31, 32, 33, 64, 100, 257, 1000] {
            // Deterministic values with both signs and varied magnitude.
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.021)
                .collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let abs: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f64 * y as f64).abs())
                .sum();
            for v in &variants {
                let got = (v.dot)(&a, &b);
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * abs + 1e-30,
                    "{} n={n}: {got} vs {want}",
                    v.name
                );
                // Four rows (b, a, b reversed, a) against `a`... each bit-identical to `dot`.
                let rb: Vec<f32> = b.iter().rev().copied().collect();
                let rows = [b.as_slice(), a.as_slice(), rb.as_slice(), b.as_slice()];
                let four = (v.dot4)(rows, &a);
                for (r, row) in rows.iter().enumerate() {
                    assert_eq!(
                        four[r].to_bits(),
                        (v.dot)(row, &a).to_bits(),
                        "{} n={n} row {r}",
                        v.name
                    );
                }
            }
        }
    }
}
