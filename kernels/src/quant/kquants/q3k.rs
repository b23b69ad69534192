//! Q3_K: 3-bit quants, 16 sub-blocks of 16 with signed 6-bit scales.
//!
//! Block (110 bytes): `hmask[32]` (0..32), `qs[64]` (32..96), `scales[12]` (96..108), `f16 d`
//! (108..110). Element `e` in half `h = e/128`, group `j = (e%128)/32`, position `l = e%32`: low
//! two bits are bits `2j..2j+2` of `qs[32h + l]`, the third bit is bit `4h + j` of `hmask[l]`;
//! `q = low + 4·bit − 4` in −4..3. Scale `i` (6 bits, stored +32): low 4 bits in the low
//! (`i < 8`) or high (`i ≥ 8`) nibble of `scales[i % 8]`, top 2 bits at bit `2·(i/4)` of
//! `scales[8 + i%4]`. Value: `d · (scale[e/16] − 32) · q`.

use super::fit::{fit_symmetric, quantize_scales_signed};
use super::{check_row_args, f16_at, nearest_i32, put_f16, QK_K};

/// Bytes per Q3_K block.
pub const BLOCK_BYTES: usize = 110;
pub(super) const QS: usize = 32;
pub(crate) const SC: usize = 96;
pub(crate) const D: usize = 108;

/// The 16 signed scales (−32..31) of a block from its 12-byte scale field.
#[inline]
pub(super) fn unpack_scales(s: &[u8]) -> [i8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, t) = (w(0), w(1), w(2));
    let parts = [
        (a0 & 0x0f0f_0f0f) | ((t & 0x0303_0303) << 4),
        (a1 & 0x0f0f_0f0f) | (((t >> 2) & 0x0303_0303) << 4),
        ((a0 >> 4) & 0x0f0f_0f0f) | (((t >> 4) & 0x0303_0303) << 4),
        ((a1 >> 4) & 0x0f0f_0f0f) | (((t >> 6) & 0x0303_0303) << 4),
    ];
    let mut out = [0i8; 16];
    for (k, p) in parts.iter().enumerate() {
        for (o, byte) in out[4 * k..4 * k + 4].iter_mut().zip(p.to_le_bytes()) {
            *o = byte as i8 - 32;
        }
    }
    out
}

/// Packs 16 signed scales (−32..31) into the 12-byte scale field.
fn pack_scales(sc: &[i8; 16], out: &mut [u8]) {
    out[..12].fill(0);
    for (i, &s) in sc.iter().enumerate() {
        let u = (s as i32 + 32) as u8;
        out[i % 8] |= (u & 15) << (4 * (i / 8));
        out[8 + i % 4] |= (u >> 4) << (2 * (i / 4));
    }
}

/// The unsigned 3-bit quants (0..8, stored value + 4) of one block in element order.
fn unpack_quants(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    let hmask = &b[..32];
    for (h, half) in q.chunks_exact_mut(128).enumerate() {
        let bytes = &b[QS + 32 * h..QS + 32 * h + 32];
        for (j, group) in half.chunks_exact_mut(32).enumerate() {
            let hb = 4 * h + j;
            for ((qe, &byte), &m) in group.iter_mut().zip(bytes).zip(hmask) {
                *qe = ((byte >> (2 * j)) & 3) | (((m >> hb) & 1) << 2);
            }
        }
    }
    q
}

/// The GEMM factors of one block: per sub-block of 16 the scale `d · sc`.
pub(super) fn factors(b: &[u8], scales: &mut [f32]) {
    let d = f16_at(b, D);
    let sc = unpack_scales(&b[SC..SC + 12]);
    for j in 0..16 {
        scales[j] = d * sc[j] as f32;
    }
}

/// The portable converter ([`crate::gemm::ConvertFn`]): levels 0..=7, offset 4.
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

/// Dequantizes `dst.len()` values (a multiple of 256) from Q3_K blocks in `src`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src` is too short.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    check_row_args(src.len(), dst.len(), BLOCK_BYTES, "Q3_K dequantize");
    for (b, y) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let d = f16_at(b, D);
        let sc = unpack_scales(&b[SC..SC + 12]);
        let q = unpack_quants(b);
        for (j, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * sc[j] as f32;
            for (yi, &qi) in ys.iter_mut().zip(qs) {
                *yi = dl * (qi as i32 - 4) as f32;
            }
        }
    }
}

/// Reference quantizer: `src.len()` values (a multiple of 256) into Q3_K blocks in `dst`.
///
/// # Panics
/// If `src.len()` is not a multiple of 256 or `dst` is too short.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    let nb = check_row_args(dst.len(), src.len(), BLOCK_BYTES, "Q3_K quantize");
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .take(nb)
    {
        let mut scales = [0.0f32; 16];
        for (j, sub) in x.chunks_exact(16).enumerate() {
            scales[j] = fit_symmetric(sub, -4, 3);
        }
        let (d, sc) = quantize_scales_signed(&scales, -32, 31);
        let d = put_f16(b, D, d);
        pack_scales(&sc, &mut b[SC..SC + 12]);
        b[..QS + 64].fill(0);
        for (j, sub) in x.chunks_exact(16).enumerate() {
            let step = d * sc[j] as f32;
            for (k, &v) in sub.iter().enumerate() {
                let u = if step == 0.0 {
                    4
                } else {
                    (nearest_i32(v / step).clamp(-4, 3) + 4) as u8
                };
                let e = 16 * j + k;
                let (h, g, l) = (e / 128, (e % 128) / 32, e % 32);
                b[QS + 32 * h + l] |= (u & 3) << (2 * g);
                b[l] |= (u >> 2) << (4 * h + g);
            }
        }
    }
}
