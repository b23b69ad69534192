//! Scale fitting shared by the reference quantizers: least-squares fits of one sub-block to a
//! symmetric (`x ≈ s·q`) or affine (`x ≈ s·q − m`) integer grid, trying several starting scales.

use super::nearest_i32;

/// Fits `x ≈ s·q` with integer `q` in `[qmin, qmax]` (`qmin < 0 < qmax`) and returns `s` (may be
/// negative: the largest-magnitude value is mapped onto the wider negative end of the grid).
/// Returns 0 for an all-zero sub-block.
pub(super) fn fit_symmetric(x: &[f32], qmin: i32, qmax: i32) -> f32 {
    let mut vmax = 0.0f32;
    for &v in x {
        if v.abs() > vmax.abs() {
            vmax = v;
        }
    }
    if vmax.abs() < 1e-30 {
        return 0.0;
    }
    let mut best_s = vmax / qmin as f32;
    let mut best_err = f32::INFINITY;
    // Candidate grids: map vmax slightly inside/outside the negative end, then refine each by
    // least squares for its rounding; keep the candidate with the smallest squared error.
    for step in -6..=6 {
        let s0 = vmax / (qmin as f32 + 0.1 * step as f32);
        let (s, err) = refine_symmetric(x, s0, qmin, qmax);
        if err < best_err {
            best_err = err;
            best_s = s;
        }
    }
    best_s
}

/// Rounds `x` on the grid of scale `s0`, then returns the least-squares scale for those integers
/// and its squared error.
fn refine_symmetric(x: &[f32], s0: f32, qmin: i32, qmax: i32) -> (f32, f32) {
    let inv = 1.0 / s0;
    let (mut sxq, mut sqq, mut sxx) = (0.0f32, 0.0f32, 0.0f32);
    for &v in x {
        let q = nearest_i32(v * inv).clamp(qmin, qmax) as f32;
        sxq += v * q;
        sqq += q * q;
        sxx += v * v;
    }
    if sqq == 0.0 {
        return (s0, sxx);
    }
    let s = sxq / sqq;
    (s, (sxx - s * sxq).max(0.0))
}

/// Fits `x ≈ s·q − m` with integer `q` in `[0, qmax]`, `s ≥ 0` and `m ≥ 0` (the grid always
/// covers 0 and values down to the block minimum). Returns `(s, m)`.
pub(super) fn fit_affine(x: &[f32], qmax: i32) -> (f32, f32) {
    let mut lo = 0.0f32;
    let mut hi = f32::NEG_INFINITY;
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi - lo < 1e-30 {
        return (0.0, -lo);
    }
    let mut best = ((hi - lo) / qmax as f32, -lo);
    let mut best_err = f32::INFINITY;
    for step in -4..=6 {
        let mut s = (hi - lo) / (qmax as f32 + 0.1 * step as f32);
        let mut m = -lo;
        // A few alternations of "round on the grid" and "least-squares grid for those integers".
        for _ in 0..3 {
            let Some((ns, nm, err)) = refine_affine(x, s, m, qmax) else {
                break;
            };
            if err < best_err {
                best_err = err;
                best = (ns, nm);
            }
            s = ns;
            m = nm;
        }
    }
    best
}

/// One refinement step of [`fit_affine`]; `None` when the rounding collapses to one level.
fn refine_affine(x: &[f32], s: f32, m: f32, qmax: i32) -> Option<(f32, f32, f32)> {
    if s <= 0.0 {
        return None;
    }
    let inv = 1.0 / s;
    let n = x.len() as f32;
    let (mut sq, mut sqq, mut sx, mut sxq, mut sxx) = (0.0f32, 0.0f32, 0.0f32, 0.0f32, 0.0f32);
    for &v in x {
        let q = nearest_i32((v + m) * inv).clamp(0, qmax) as f32;
        sq += q;
        sqq += q * q;
        sx += v;
        sxq += v * q;
        sxx += v * v;
    }
    // Least squares for x ≈ s·q + b, b = −m, constrained to b ≤ 0.
    let det = n * sqq - sq * sq;
    if det <= 0.0 {
        return None;
    }
    let mut ns = (n * sxq - sq * sx) / det;
    let mut b = (sqq * sx - sq * sxq) / det;
    if b > 0.0 {
        b = 0.0;
        ns = sxq / sqq;
    }
    if ns <= 0.0 {
        return None;
    }
    // Squared error of the fit, expanded.
    let err = sxx + ns * ns * sqq + n * b * b - 2.0 * ns * sxq - 2.0 * b * sx + 2.0 * ns * b * sq;
    Some((ns, -b, err.max(0.0)))
}

/// Quantizes non-negative per-sub-block values `v` to `bits`-bit unsigned integers under one
/// super-block scale; returns (scale, integers). The scale is rounded through f16 first, as the
/// block stores it, so the integers match the stored scale.
pub(super) fn quantize_scales_unsigned<const N: usize>(v: &[f32; N], bits: u32) -> (f32, [u8; N]) {
    let top = ((1u32 << bits) - 1) as f32;
    let vmax = v.iter().fold(0.0f32, |a, &b| a.max(b));
    let mut out = [0u8; N];
    let d = half::f16::from_f32(vmax / top).to_f32();
    if d > 0.0 {
        for (o, &x) in out.iter_mut().zip(v) {
            *o = nearest_i32(x / d).clamp(0, top as i32) as u8;
        }
    }
    (d, out)
}

/// Quantizes signed per-sub-block scales to integers in `[qmin, qmax]` under one super-block
/// scale (rounded through f16); returns (scale, integers).
pub(super) fn quantize_scales_signed<const N: usize>(
    v: &[f32; N],
    qmin: i32,
    qmax: i32,
) -> (f32, [i8; N]) {
    let mut vmax = 0.0f32;
    for &x in v {
        if x.abs() > vmax.abs() {
            vmax = x;
        }
    }
    let mut out = [0i8; N];
    let d = half::f16::from_f32(vmax / qmin as f32).to_f32();
    if d != 0.0 {
        for (o, &x) in out.iter_mut().zip(v) {
            *o = nearest_i32(x / d).clamp(qmin, qmax) as i8;
        }
    }
    (d, out)
}
