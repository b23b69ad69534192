//! The f32 dot products of the CPU lane, in one order: the float weight types' matmuls (F32, F16,
//! BF16 rows widened exactly to f32) and the exact-activation matmul
//! ([`ActPrecision::Exact`](crate::matmul::ActPrecision): weight rows dequantized to f32 on the
//! fly, dotted with unrounded f32 activations).
//!
//! **The order.** Element `i` is added to partial sum `i mod` [`LANES`] by a fused multiply-add,
//! in ascending `i`; the 64 partial sums are then added in one fixed tree ([`reduce`]). Every step
//! is one correctly rounded f32 operation, so the AVX-512 (4 × 16 lanes), AVX2 (8 × 8 lanes) and
//! portable loops give the same bits, and so does a dot of four rows sharing the activation
//! loads: a matmul output does not depend on the level, the batch or the row split.

use std::sync::OnceLock;

/// Partial sums of a dot product.
pub const LANES: usize = 64;

/// The fixed sum of the partial sums: `s[l] = (p[l] + p[l+16]) + (p[l+32] + p[l+48])` for
/// `l < 16`, then halves folded (`s[l] += s[l + w]` for `w` = 8, 4, 2, 1).
pub fn reduce(p: &[f32; LANES]) -> f32 {
    let mut s = [0f32; 16];
    for (l, v) in s.iter_mut().enumerate() {
        *v = (p[l] + p[l + 16]) + (p[l + 32] + p[l + 48]);
    }
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            s[l] += s[l + w];
        }
        w /= 2;
    }
    s[0]
}

/// Adds elements `from..n` (`w(i) · x(i)`) to the partial sums and returns their [`reduce`]d sum
/// (the tail after the SIMD loops, or a whole portable dot from `from = 0`).
#[inline]
pub fn finish(
    p: &mut [f32; LANES],
    from: usize,
    n: usize,
    w: impl Fn(usize) -> f32,
    x: impl Fn(usize) -> f32,
) -> f32 {
    for i in from..n {
        let k = i % LANES;
        p[k] = w(i).mul_add(x(i), p[k]);
    }
    reduce(p)
}

/// A dot product of two equally long f32 slices.
pub type DotF32Fn = fn(a: &[f32], b: &[f32]) -> f32;

/// Four dot products `[w[0]·x, w[1]·x, w[2]·x, w[3]·x]` sharing the loads of `x` (all slices
/// equally long).
pub type Dot4F32Fn = fn(w: [&[f32]; 4], x: &[f32]) -> [f32; 4];

/// Portable four-row dot: [`dot_f32_scalar`] per row.
pub fn dot4_f32_scalar(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    w.map(|r| dot_f32_scalar(r, x))
}

/// Portable dot in the order of the module notes.
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    finish(&mut [0f32; LANES], 0, a.len(), |i| a[i], |i| b[i])
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
    *BEST.get_or_init(|| dot_f32_at(super::simd_cap()))
}

/// The fastest variant this CPU supports up to `level`.
pub fn dot_f32_at(level: super::SimdLevel) -> DotF32Variant {
    let allowed = match level {
        super::SimdLevel::Scalar => ["scalar"].as_slice(),
        super::SimdLevel::Avx2 => ["avx2", "scalar"].as_slice(),
        super::SimdLevel::Avx512 => ["avx512", "avx2", "scalar"].as_slice(),
    };
    dot_f32_variants()
        .into_iter()
        .find(|v| allowed.contains(&v.name))
        .expect("the scalar dot is always there")
}

/// `Σ a[i] b[i]` in f32 with the fastest variant this CPU supports (the same bits at every
/// level).
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    (dot_f32_best().dot)(a, b)
}

/// `[w[0]·x, …, w[3]·x]` in f32 with the fastest variant this CPU supports; each result is
/// bit-identical to [`dot_f32`] of that row.
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

    use super::{finish, LANES};

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
        unsafe { rows_avx2::<1>([a], b)[0] }
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
        unsafe { rows_avx2::<4>(w, x) }
    }

    /// `R` rows against `x`: per row 8 accumulators of 8 lanes (partial sum `8m + l` in lane `l`
    /// of accumulator `m`) over whole 64-element steps, then the portable tail and reduction.
    #[target_feature(enable = "avx2,fma")]
    fn rows_avx2<const R: usize>(w: [&[f32]; R], x: &[f32]) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        let full = x.len() / LANES * LANES;
        let mut i = 0;
        while i < full {
            for m in 0..8 {
                // SAFETY: `i + 8m + 8 <= full <= len` for `x` and every row; unaligned loads.
                let xv = unsafe { _mm256_loadu_ps(x[i + 8 * m..].as_ptr()) };
                for (r, row) in w.iter().enumerate() {
                    // SAFETY: as above (rows are as long as `x`).
                    let wv = unsafe { _mm256_loadu_ps(row[i + 8 * m..].as_ptr()) };
                    acc[r][m] = _mm256_fmadd_ps(wv, xv, acc[r][m]);
                }
            }
            i += LANES;
        }
        std::array::from_fn(|r| {
            let mut p = [0f32; LANES];
            for (m, v) in acc[r].iter().enumerate() {
                // SAFETY: `p[8m..8m + 8]` is writable; unaligned store.
                unsafe { _mm256_storeu_ps(p[8 * m..].as_mut_ptr(), *v) };
            }
            finish(&mut p, full, x.len(), |k| w[r][k], |k| x[k])
        })
    }

    pub(super) fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
        if !has_avx512() {
            return super::dot_f32_scalar(a, b);
        }
        // SAFETY: AVX-512F (and AVX2/FMA) were detected just above.
        unsafe { rows_avx512::<1>([a], b)[0] }
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
        unsafe { rows_avx512::<4>(w, x) }
    }

    /// `R` rows against `x`: per row 4 accumulators of 16 lanes (partial sum `16k + l` in lane
    /// `l` of accumulator `k`) over whole 64-element steps, then the portable tail and reduction.
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn rows_avx512<const R: usize>(w: [&[f32]; R], x: &[f32]) -> [f32; R] {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let full = x.len() / LANES * LANES;
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
            i += LANES;
        }
        std::array::from_fn(|r| {
            let mut p = [0f32; LANES];
            for (k, v) in acc[r].iter().enumerate() {
                // SAFETY: `p[16k..16k + 16]` is writable; unaligned store.
                unsafe { _mm512_storeu_ps(p[16 * k..].as_mut_ptr(), *v) };
            }
            finish(&mut p, full, x.len(), |k| w[r][k], |k| x[k])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant against an f64 sum and bit for bit against the portable loop, lengths
    /// covering empty, tails and several full steps; four-row dots equal single dots.
    #[test]
    fn variants_match_f64_and_each_other() {
        let variants = dot_f32_variants();
        assert_eq!(variants.last().map(|v| v.name), Some("scalar"));
        for n in [0usize, 1, 7, 31, 32, 33, 63, 64, 65, 100, 257, 1000] {
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
            let portable = dot_f32_scalar(&a, &b);
            for v in &variants {
                let got = (v.dot)(&a, &b);
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * abs + 1e-30,
                    "{} n={n}: {got} vs {want}",
                    v.name
                );
                assert_eq!(got.to_bits(), portable.to_bits(), "{} n={n}", v.name);
                let rb: Vec<f32> = b.iter().rev().copied().collect();
                let rows = [b.as_slice(), a.as_slice(), rb.as_slice(), b.as_slice()];
                let four = (v.dot4)(rows, &a);
                for (r, row) in rows.iter().enumerate() {
                    assert_eq!(
                        four[r].to_bits(),
                        dot_f32_scalar(row, &a).to_bits(),
                        "{} n={n} row {r}",
                        v.name
                    );
                }
            }
        }
    }
}
