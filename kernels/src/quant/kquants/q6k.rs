//! Q6_K: 6-bit quants, 16 sub-blocks of 16 with signed 8-bit scales.
//!
//! Block (210 bytes): `ql[128]` (0..128), `qh[64]` (128..192), `i8 scales[16]` (192..208),
//! `f16 d` (208..210). Per half `h` (128 elements), with `l < 32`: elements `l`, `l+32`, `l+64`,
//! `l+96` take the low nibble of `ql[64h+l]`, low nibble of `ql[64h+32+l]`, high nibble of
//! `ql[64h+l]`, high nibble of `ql[64h+32+l]`; their top two bits are bits 0-1, 2-3, 4-5, 6-7 of
//! `qh[32h+l]`. Value: `d · scales[e/16] · (q − 32)`.

use super::fit::{fit_symmetric, quantize_scales_signed};
use super::{check_row_args, f16_at, nearest_i32, put_f16, QK_K};

/// Bytes per Q6_K block.
pub const BLOCK_BYTES: usize = 210;
const QH: usize = 128;
pub(crate) const SC: usize = 192;
pub(crate) const D: usize = 208;

/// The unsigned 6-bit quants (0..64) of one block in element order.
fn unpack_quants(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[QH + 32 * h..QH + 32 * h + 32];
        let y = &mut q[128 * h..128 * h + 128];
        for l in 0..32 {
            y[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// The GEMM factors of one block: per sub-block of 16 the scale `d · sc`.
pub(super) fn factors(b: &[u8], scales: &mut [f32]) {
    let d = f16_at(b, D);
    for j in 0..16 {
        scales[j] = d * b[SC + j] as i8 as f32;
    }
}

/// The portable converter ([`crate::gemm::ConvertFn`]): levels 0..=63, offset 32.
pub(crate) fn convert(src: &[u8], u: &mut [u8], scales: &mut [f32], _mins: &mut [f32]) {
    for (i, b) in src
        .chunks_exact(BLOCK_BYTES)
        .take(u.len() / QK_K)
        .enumerate()
    {
        factors(b, &mut scales[16 * i..16 * i + 16]);
        u[QK_K * i..QK_K * (i + 1)].copy_from_slice(&unpack_quants(b));
    }
}

/// Dequantizes `dst.len()` values (a multiple of 256) from Q6_K blocks in `src`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src` is too short.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    check_row_args(src.len(), dst.len(), BLOCK_BYTES, "Q6_K dequantize");
    for (b, y) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let d = f16_at(b, D);
        let q = unpack_quants(b);
        for (j, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * (b[SC + j] as i8) as f32;
            for (yi, &qi) in ys.iter_mut().zip(qs) {
                *yi = dl * (qi as i32 - 32) as f32;
            }
        }
    }
}

/// Reference quantizer: `src.len()` values (a multiple of 256) into Q6_K blocks in `dst`.
///
/// # Panics
/// If `src.len()` is not a multiple of 256 or `dst` is too short.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    let nb = check_row_args(dst.len(), src.len(), BLOCK_BYTES, "Q6_K quantize");
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .take(nb)
    {
        let mut scales = [0.0f32; 16];
        for (j, sub) in x.chunks_exact(16).enumerate() {
            scales[j] = fit_symmetric(sub, -32, 31);
        }
        let (d, sc) = quantize_scales_signed(&scales, -128, 127);
        let d = put_f16(b, D, d);
        let mut q = [32u8; QK_K];
        for (j, sub) in x.chunks_exact(16).enumerate() {
            b[SC + j] = sc[j] as u8;
            let step = d * sc[j] as f32;
            if step == 0.0 {
                continue;
            }
            let inv = 1.0 / step;
            for (qi, &v) in q[16 * j..16 * j + 16].iter_mut().zip(sub) {
                *qi = (nearest_i32(v * inv).clamp(-32, 31) + 32) as u8;
            }
        }
        for h in 0..2 {
            let u = &q[128 * h..128 * h + 128];
            for l in 0..32 {
                b[64 * h + l] = (u[l] & 15) | ((u[l + 64] & 15) << 4);
                b[64 * h + 32 + l] = (u[l + 32] & 15) | ((u[l + 96] & 15) << 4);
                b[QH + 32 * h + l] = (u[l] >> 4)
                    | ((u[l + 32] >> 4) << 2)
                    | ((u[l + 64] >> 4) << 4)
                    | ((u[l + 96] >> 4) << 6);
            }
        }
    }
}
