//! Reference quantizers of the lookup-table types: a least-squares scale search per run of 32 for
//! IQ4_NL and IQ4_XS (whose sub-block scales are then quantized to 6 bits under one f16 scale),
//! and the shared power-of-two exponent for MXFP4.

use half::f16;

use super::{e8m0_half, FP4, IQ4_NL_BYTES, IQ4_XS_BYTES, MXFP4_BYTES, NL, RUN};
use crate::quant::kquants::QK_K;

/// Index of the codebook entry nearest to `v` (the first one on a tie).
#[inline]
fn nearest(v: f32, table: &[i8; 16]) -> usize {
    let mut best = 0;
    let mut best_err = f32::INFINITY;
    for (i, &t) in table.iter().enumerate() {
        let e = (v - t as f32).abs();
        if e < best_err {
            best_err = e;
            best = i;
        }
    }
    best
}

/// [`nearest`] for an ascending table, by bisection (the same index, ties included).
#[inline]
fn nearest_sorted(v: f32, table: &[i8; 16]) -> usize {
    let i = table.partition_point(|&t| (t as f32) < v);
    if i == 0 {
        0
    } else if i == 16 || v - table[i - 1] as f32 <= table[i] as f32 - v {
        i - 1
    } else {
        i
    }
}

/// Indices of `x` on the grid `s · table` (index of the table's zero-nearest entry where `s` is 0).
fn levels(x: &[f32], s: f32, table: &[i8; 16], out: &mut [usize]) {
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    let sorted = table.windows(2).all(|w| w[0] < w[1]);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if sorted {
            nearest_sorted(v * inv, table)
        } else {
            nearest(v * inv, table)
        };
    }
}

/// Squared error of `x` against `s · table[idx]`.
fn sq_err(x: &[f32], s: f32, idx: &[usize], table: &[i8; 16]) -> f32 {
    x.iter()
        .zip(idx)
        .map(|(&v, &i)| (v - s * table[i] as f32).powi(2))
        .sum()
}

/// The scale `s` minimising `Σ (x − s · table[q])²` over a search: the value of largest magnitude
/// is mapped onto each end of the codebook and a little inside and outside it (±10% in 2% steps);
/// for each start the rounding is fixed and the least-squares scale of those levels taken. Returns
/// 0 for an all-zero run.
pub(super) fn fit_run(x: &[f32], table: &[i8; 16]) -> f32 {
    let m = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if m == 0.0 {
        return 0.0;
    }
    let ends = [
        *table.iter().min().expect("16 entries") as f32,
        *table.iter().max().expect("16 entries") as f32,
    ];
    let mut idx = [0usize; RUN];
    let idx = &mut idx[..x.len()];
    let mut best = (f32::INFINITY, m / ends[0]);
    for end in ends {
        for k in -5..=5 {
            let s0 = m / (end * (1.0 + 0.02 * k as f32));
            levels(x, s0, table, idx);
            let (mut xq, mut qq) = (0f32, 0f32);
            for (&v, &i) in x.iter().zip(idx.iter()) {
                let t = table[i] as f32;
                xq += v * t;
                qq += t * t;
            }
            for s in [s0, if qq > 0.0 { xq / qq } else { s0 }] {
                let err = sq_err(x, s, idx, table);
                if err < best.0 {
                    best = (err, s);
                }
            }
        }
    }
    best.1
}

/// Packs 32 codebook indices into 16 nibble bytes (element `j` low, `j + 16` high).
fn pack(idx: &[usize], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = idx[j] as u8 | (idx[j + 16] as u8) << 4;
    }
}

/// Splits `src` into blocks of `qk` elements and `dst` into blocks of `bytes`.
fn blocks<'a>(
    src: &'a [f32],
    dst: &'a mut [u8],
    qk: usize,
    bytes: usize,
    what: &str,
) -> impl Iterator<Item = (&'a [f32], &'a mut [u8])> {
    assert!(
        src.len().is_multiple_of(qk),
        "{what} quantize: {} elements is not a whole number of {qk}-element blocks",
        src.len()
    );
    let nb = src.len() / qk;
    assert!(
        dst.len() >= nb * bytes,
        "{what} quantize: destination holds {} bytes, need {}",
        dst.len(),
        nb * bytes
    );
    src.chunks_exact(qk)
        .zip(dst[..nb * bytes].chunks_exact_mut(bytes))
}

/// IQ4_NL: the searched scale, rounded to f16, and the nearest codebook entries under it.
pub(super) fn quantize_iq4_nl(src: &[f32], dst: &mut [u8]) {
    let mut idx = [0usize; RUN];
    for (x, b) in blocks(src, dst, RUN, IQ4_NL_BYTES, "IQ4_NL") {
        let d = f16::from_f32(fit_run(x, &NL));
        b[0..2].copy_from_slice(&d.to_le_bytes());
        levels(x, d.to_f32(), &NL, &mut idx);
        pack(&idx, &mut b[2..18]);
    }
}

/// IQ4_XS: a searched scale per sub-block of 32; the one of largest magnitude maps to −32 under
/// the f16 block scale `d`, the others round to 6-bit integers `ls − 32` in −32..=31, and every
/// sub-block's entries are chosen again under its stored scale `d (ls − 32)`.
pub(super) fn quantize_iq4_xs(src: &[f32], dst: &mut [u8]) {
    const SUBS: usize = QK_K / RUN;
    let mut idx = [0usize; RUN];
    for (x, b) in blocks(src, dst, QK_K, IQ4_XS_BYTES, "IQ4_XS") {
        let mut s = [0f32; SUBS];
        for (sj, xs) in s.iter_mut().zip(x.chunks_exact(RUN)) {
            *sj = fit_run(xs, &NL);
        }
        let smax = s
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = f16::from_f32(smax / -32.0).to_f32();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let mut scales_h = 0u16;
        b[4..8].fill(0);
        for (j, xs) in x.chunks_exact(RUN).enumerate() {
            let l = ((s[j] * id).round_ties_even() as i32).clamp(-32, 31);
            let ls = (l + 32) as u8;
            b[4 + j / 2] |= (ls & 0x0F) << (4 * (j % 2));
            scales_h |= ((ls >> 4) as u16) << (2 * j);
            levels(xs, d * l as f32, &NL, &mut idx);
            pack(&idx, &mut b[8 + 16 * j..24 + 16 * j]);
        }
        b[2..4].copy_from_slice(&scales_h.to_le_bytes());
    }
}

/// MXFP4: the OCP microscaling exponent `floor(log2 max|x|) − 2` (the largest value lands in
/// E2M1's top binade, 4..6) or one more (nothing clips); whichever gives the smaller squared
/// error. An all-zero block stores `e = 0` and zero entries.
pub(super) fn quantize_mxfp4(src: &[f32], dst: &mut [u8]) {
    let mut idx = [0usize; RUN];
    for (x, b) in blocks(src, dst, RUN, MXFP4_BYTES, "MXFP4") {
        let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
        if amax == 0.0 || !amax.is_finite() {
            b.fill(0);
            continue;
        }
        // Stored e = 127 + unbiased exponent; FP4 is doubled, so the value scale is 2^(e − 128).
        let e0 = (amax as f64).log2().floor() as i32 - 2 + 127;
        let mut best = (f32::INFINITY, 0u8);
        for e in [e0, e0 + 1] {
            let e = e.clamp(0, 254) as u8;
            levels(x, e8m0_half(e), &FP4, &mut idx);
            let err = sq_err(x, e8m0_half(e), &idx, &FP4);
            if err < best.0 {
                best = (err, e);
            }
        }
        b[0] = best.1;
        levels(x, e8m0_half(best.1), &FP4, &mut idx);
        pack(&idx, &mut b[1..17]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_finds_the_linear_scan_index() {
        let mut v = -140.0f32;
        while v < 140.0 {
            assert_eq!(nearest_sorted(v, &NL), nearest(v, &NL), "v = {v}");
            v += 0.25;
        }
        // Exact midpoints tie to the lower entry in both.
        assert_eq!(nearest_sorted(-115.5, &NL), 0);
        assert_eq!(nearest(-115.5, &NL), 0);
    }
}
