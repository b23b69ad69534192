//! Q2_K: 2-bit quants, 16 sub-blocks of 16 with 4-bit scales and mins.
//!
//! Block (84 bytes): `scales[16]` (0..16; low nibble scale, high nibble min), `qs[64]` (16..80),
//! `f16 d` (80..82), `f16 dmin` (82..84). Element `e` in half `h = e/128`, group
//! `j = (e%128)/32`, position `l = e%32` is bits `2j..2j+2` of `qs[32h + l]`.
//! Value: `d · (scales[e/16] & 15) · q − dmin · (scales[e/16] >> 4)`.

use super::fit::{fit_affine, quantize_scales_unsigned};
use super::{check_row_args, f16_at, nearest_i32, put_f16, QK_K};

/// Bytes per Q2_K block.
pub const BLOCK_BYTES: usize = 84;
pub(super) const QS: usize = 16;
pub(crate) const D: usize = 80;

/// The 2-bit quants of one block in element order.
pub(super) fn unpack_quants(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for (h, half) in q.chunks_exact_mut(128).enumerate() {
        let bytes = &b[QS + 32 * h..QS + 32 * h + 32];
        for (j, group) in half.chunks_exact_mut(32).enumerate() {
            for (qe, &byte) in group.iter_mut().zip(bytes) {
                *qe = (byte >> (2 * j)) & 3;
            }
        }
    }
    q
}

/// Dequantizes `dst.len()` values (a multiple of 256) from Q2_K blocks in `src`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src` is too short.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    check_row_args(src.len(), dst.len(), BLOCK_BYTES, "Q2_K dequantize");
    for (b, y) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let (d, dmin) = (f16_at(b, D), f16_at(b, D + 2));
        let q = unpack_quants(b);
        for (j, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * (b[j] & 15) as f32;
            let ml = dmin * (b[j] >> 4) as f32;
            for (yi, &qi) in ys.iter_mut().zip(qs) {
                *yi = dl * qi as f32 - ml;
            }
        }
    }
}

/// Reference quantizer: `src.len()` values (a multiple of 256) into Q2_K blocks in `dst`.
///
/// # Panics
/// If `src.len()` is not a multiple of 256 or `dst` is too short.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    let nb = check_row_args(dst.len(), src.len(), BLOCK_BYTES, "Q2_K quantize");
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .take(nb)
    {
        let mut scales = [0.0f32; 16];
        let mut mins = [0.0f32; 16];
        for (j, sub) in x.chunks_exact(16).enumerate() {
            (scales[j], mins[j]) = fit_affine(sub, 3);
        }
        let (d, sc) = quantize_scales_unsigned(&scales, 4);
        let (dmin, mn) = quantize_scales_unsigned(&mins, 4);
        put_f16(b, D, d);
        put_f16(b, D + 2, dmin);
        b[QS..QS + 64].fill(0);
        for (j, sub) in x.chunks_exact(16).enumerate() {
            b[j] = sc[j] | (mn[j] << 4);
            let step = d * sc[j] as f32;
            let off = dmin * mn[j] as f32;
            for (k, &v) in sub.iter().enumerate() {
                let q = if step == 0.0 {
                    0
                } else {
                    nearest_i32((v + off) / step).clamp(0, 3) as u8
                };
                let e = 16 * j + k;
                let (h, g, l) = (e / 128, (e % 128) / 32, e % 32);
                b[QS + 32 * h + l] |= q << (2 * g);
            }
        }
    }
}

/// The GEMM factors of one block: per sub-block of 16 the scale `d · (sc & 15)` and the minimum
/// `−dmin · (sc >> 4)`.
pub(super) fn factors(b: &[u8], scales: &mut [f32], mins: &mut [f32]) {
    let (d, dmin) = (f16_at(b, D), f16_at(b, D + 2));
    for j in 0..16 {
        scales[j] = d * (b[j] & 15) as f32;
        mins[j] = -dmin * (b[j] >> 4) as f32;
    }
}

/// The portable converter ([`crate::gemm::ConvertFn`]): levels 0..=3, offset 0.
pub(crate) fn convert(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
    for (i, b) in src
        .chunks_exact(BLOCK_BYTES)
        .take(u.len() / QK_K)
        .enumerate()
    {
        factors(
            b,
            &mut scales[16 * i..16 * i + 16],
            &mut mins[16 * i..16 * i + 16],
        );
        u[QK_K * i..QK_K * (i + 1)].copy_from_slice(&unpack_quants(b));
    }
}
