//! Q4_K: 4-bit quants, 8 sub-blocks of 32 with 6-bit scales and mins.
//!
//! Block (144 bytes): `f16 d` (0..2), `f16 dmin` (2..4), `scales[12]` (4..16), `qs[128]`
//! (16..144). Element `e` of the block lies in chunk `c = e / 64`: the low nibble of
//! `qs[32c + e % 32]` for `e % 64 < 32`, else its high nibble.
//! Value: `d · sc[e/32] · q − dmin · m[e/32]`.
//!
//! Scale field (shared with Q5_K): bytes 0..4 hold scales 0..3 in their low 6 bits, bytes 4..8
//! mins 0..3; scales and mins 4..7 keep their low 4 bits in bytes 8..12 (scale in the low nibble,
//! min in the high one) and their top 2 bits in the top 2 bits of bytes 0..4 (scales) and 4..8
//! (mins).

use super::fit::{fit_affine, quantize_scales_unsigned};
use super::{
    check_row_args, f16_at, k4_factors, nearest_i32, pack_scales_mins_k4, put_f16,
    unpack_scales_mins_k4, QK_K,
};

/// Bytes per Q4_K block.
pub const BLOCK_BYTES: usize = 144;
const QS: usize = 16;

/// Dequantizes `dst.len()` values (a multiple of 256) from Q4_K blocks in `src`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src` is too short.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    check_row_args(src.len(), dst.len(), BLOCK_BYTES, "Q4_K dequantize");
    for (b, y) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = unpack_scales_mins_k4(&b[4..16]);
        for c in 0..4 {
            let q = &b[QS + 32 * c..QS + 32 * c + 32];
            let (d0, m0) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
            let (d1, m1) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
            let (ylo, yhi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                ylo[l] = d0 * (q[l] & 15) as f32 - m0;
                yhi[l] = d1 * (q[l] >> 4) as f32 - m1;
            }
        }
    }
}

/// Reference quantizer: `src.len()` values (a multiple of 256) into Q4_K blocks in `dst`.
///
/// Each sub-block gets a least-squares affine fit; scales and mins are then quantized to 6 bits
/// and the quants recomputed against the stored values.
///
/// # Panics
/// If `src.len()` is not a multiple of 256 or `dst` is too short.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    let nb = check_row_args(dst.len(), src.len(), BLOCK_BYTES, "Q4_K quantize");
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .take(nb)
    {
        let q = quantize_affine_block(x, 15, b);
        for c in 0..4 {
            for l in 0..32 {
                b[QS + 32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
            }
        }
    }
}

/// Shared by Q4_K and Q5_K: fits 8 sub-blocks of 32 to `x ≈ d·sc·q − dmin·m` with `q ≤ qmax`,
/// writes d, dmin and the scale field into `b[0..16]` and returns the quants.
pub(super) fn quantize_affine_block(x: &[f32], qmax: i32, b: &mut [u8]) -> [u8; QK_K] {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        (scales[j], mins[j]) = fit_affine(sub, qmax);
    }
    let (d, sc) = quantize_scales_unsigned(&scales, 6);
    let (dmin, mn) = quantize_scales_unsigned(&mins, 6);
    put_f16(b, 0, d);
    put_f16(b, 2, dmin);
    pack_scales_mins_k4(&sc, &mn, &mut b[4..16]);
    let mut q = [0u8; QK_K];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let step = d * sc[j] as f32;
        let off = dmin * mn[j] as f32;
        if step == 0.0 {
            continue;
        }
        let inv = 1.0 / step;
        for (qi, &v) in q[32 * j..32 * j + 32].iter_mut().zip(sub) {
            *qi = nearest_i32((v + off) * inv).clamp(0, qmax) as u8;
        }
    }
    q
}

/// The portable converter ([`crate::gemm::ConvertFn`]): levels 0..=15, offset 0, per sub-block
/// of 32 `scale = d·sc`, `min = −dmin·m`.
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
        let y = &mut u[QK_K * i..QK_K * (i + 1)];
        for c in 0..4 {
            let qs = &b[QS + 32 * c..QS + 32 * c + 32];
            for l in 0..32 {
                y[64 * c + l] = qs[l] & 15;
                y[64 * c + 32 + l] = qs[l] >> 4;
            }
        }
    }
}
