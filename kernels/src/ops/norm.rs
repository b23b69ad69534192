//! RMS norms: of rows into an output buffer, of one row in place, and of every head-wide slice in
//! place (q/k norm).

use super::PAR_ROWS;
use crate::pool::{self, SharedSlice};

/// `1 / sqrt(mean(x²) + eps)`: the squares summed in 16 lanes (lane `z` takes elements `z`, `z + 16`,
/// …, in order), the lanes added pairwise (halves of 8, 4, 2, 1). One fixed order at every SIMD
/// level and batch; a single running sum was a chain of dependent adds (4 cycles per element:
/// the norms were a tenth of gemma3's prefill).
#[inline(always)]
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for z in 0..16 {
            acc[z] += c[z] * c[z];
        }
    }
    for (a, v) in acc.iter_mut().zip(tail) {
        *a += v * v;
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for z in 0..w {
            acc[z] += acc[z + w];
        }
    }
    1.0 / (acc[0] / x.len() as f32 + eps).sqrt()
}

/// `out[r] = x[r] / rms(x[r]) · weight`, for rows of `weight.len()` values.
pub fn rms_norm(x: &[f32], weight: &[f32], out: &mut [f32], eps: f32) {
    let cols = weight.len();
    let rows = x.len() / cols.max(1);
    if rows >= PAR_ROWS {
        let o = SharedSlice::new(out);
        pool::for_range(rows, 1, |r| {
            // SAFETY: participants get disjoint row ranges.
            let o = unsafe { o.range_mut(r.start * cols..r.end * cols) };
            norm_rows_simd(&x[r.start * cols..r.end * cols], weight, o, eps);
        });
    } else {
        norm_rows_simd(x, weight, out, eps);
    }
}

/// The rows of [`rms_norm`].
#[inline(always)]
fn norm_rows(x: &[f32], weight: &[f32], out: &mut [f32], eps: f32) {
    let cols = weight.len().max(1);
    for (xr, or) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let inv = rms_scale(xr, eps);
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

multiversion!(
    /// [`norm_rows`] at the best SIMD level.
    fn norm_rows_simd(x: &[f32], weight: &[f32], out: &mut [f32], eps: f32) => norm_rows
);

/// In-place RMS norm of a row.
#[inline(always)]
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let inv = rms_scale(x, eps);
    for (v, w) in x.iter_mut().zip(weight) {
        *v *= inv * w;
    }
}

/// In-place RMS norm of every `weight.len()`-wide slice of `x` (rows of a buffer, or the heads
/// of q/k norm), in parallel when there are many.
pub fn head_rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let cols = weight.len().max(1);
    let rows = x.len() / cols;
    if rows >= PAR_ROWS {
        let xs = SharedSlice::new(x);
        pool::for_range(rows, 4, |r| {
            // SAFETY: participants get disjoint row ranges.
            let x = unsafe { xs.range_mut(r.start * cols..r.end * cols) };
            norm_rows_inplace_simd(x, weight, eps);
        });
    } else {
        norm_rows_inplace_simd(x, weight, eps);
    }
}

/// The rows of [`head_rms_norm`].
#[inline(always)]
fn norm_rows_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    x.chunks_mut(weight.len().max(1))
        .for_each(|h| rms_norm_inplace(h, weight, eps));
}

multiversion!(
    /// [`norm_rows_inplace`] at the best SIMD level.
    fn norm_rows_inplace_simd(x: &mut [f32], weight: &[f32], eps: f32) => norm_rows_inplace
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane sums of `rms_scale` equal the f64 mean of squares to f32 rounding, for lengths
    /// that leave a tail after the 16-lane chunks.
    #[test]
    fn rms_scale_matches_f64() {
        for n in [1usize, 15, 16, 17, 40, 256, 641] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            let want = 1.0 / (ms + 1e-6).sqrt();
            let got = rms_scale(&x, 1e-6) as f64;
            assert!((got - want).abs() <= 1e-6 * want, "n {n}: {got} vs {want}");
        }
    }

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let w = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0.0f32; 4];
        rms_norm(&x, &w, &mut out, 0.0);
        // rms = sqrt(25/4) = 2.5
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6);
    }
}
