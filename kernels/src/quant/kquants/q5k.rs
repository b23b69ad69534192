//! Q5_K: 5-bit quants, 8 sub-blocks of 32 with 6-bit scales and mins.
//!
//! Block (176 bytes): `f16 d` (0..2), `f16 dmin` (2..4), `scales[12]` (4..16, as Q4_K),
//! `qh[32]` (16..48), `qs[128]` (48..176). Element `e`: low 4 bits as in Q4_K (nibbles of
//! `qs[32·(e/64) + e%32]`), fifth bit = bit `e/32` of `qh[e % 32]`.
//! Value: `d · sc[e/32] · q − dmin · m[e/32]`.

use super::q4k::quantize_affine_block;
use super::{check_row_args, f16_at, k4_factors, unpack_scales_mins_k4, QK_K};

/// Bytes per Q5_K block.
pub const BLOCK_BYTES: usize = 176;
const QH: usize = 16;
const QS: usize = 48;

/// Dequantizes `dst.len()` values (a multiple of 256) from Q5_K blocks in `src`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src` is too short.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    check_row_args(src.len(), dst.len(), BLOCK_BYTES, "Q5_K dequantize");
    for (b, y) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = unpack_scales_mins_k4(&b[4..16]);
        let qh = &b[QH..QH + 32];
        for c in 0..4 {
            let q = &b[QS + 32 * c..QS + 32 * c + 32];
            let (j0, j1) = (2 * c, 2 * c + 1);
            let (d0, m0) = (d * sc[j0] as f32, dmin * mn[j0] as f32);
            let (d1, m1) = (d * sc[j1] as f32, dmin * mn[j1] as f32);
            let (ylo, yhi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                let q0 = (q[l] & 15) | (((qh[l] >> j0) & 1) << 4);
                let q1 = (q[l] >> 4) | (((qh[l] >> j1) & 1) << 4);
                ylo[l] = d0 * q0 as f32 - m0;
                yhi[l] = d1 * q1 as f32 - m1;
            }
        }
    }
}

/// The portable converter ([`crate::gemm::ConvertFn`]): levels 0..=31, offset 0, factors as
/// Q4_K's.
pub(crate) fn convert(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
    for (i, b) in src
        .chunks_exact(BLOCK_BYTES)
        .take(u.len() / QK_K)
        .enumerate()
    {
        k4_factors(
            b,
            &mut scales[8 * i..8 * i + 8],
            &mut mins[8 * i..8 * i + 8],
        );
        let qh = &b[QH..QH + 32];
        let y = &mut u[QK_K * i..QK_K * (i + 1)];
        for c in 0..4 {
            let qs = &b[QS + 32 * c..QS + 32 * c + 32];
            for l in 0..32 {
                y[64 * c + l] = (qs[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4);
                y[64 * c + 32 + l] = (qs[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
            }
        }
    }
}

/// Reference quantizer: `src.len()` values (a multiple of 256) into Q5_K blocks in `dst`.
///
/// # Panics
/// If `src.len()` is not a multiple of 256 or `dst` is too short.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    let nb = check_row_args(dst.len(), src.len(), BLOCK_BYTES, "Q5_K quantize");
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .take(nb)
    {
        let q = quantize_affine_block(x, 31, b);
        b[QH..QH + 32].fill(0);
        for (e, &qe) in q.iter().enumerate() {
            b[QH + e % 32] |= (qe >> 4) << (e / 32);
        }
        for c in 0..4 {
            for l in 0..32 {
                b[QS + 32 * c + l] = (q[64 * c + l] & 15) | ((q[64 * c + 32 + l] & 15) << 4);
            }
        }
    }
}
