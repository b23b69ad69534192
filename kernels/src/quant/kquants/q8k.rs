//! Q8_K: the activation partner of the K-quants.
//!
//! Block of 256: `f32 d` (bytes 0..4), `i8 qs[256]` (4..260), `i16 bsums[16]` (260..292) where
//! `bsums[k]` is the sum of `qs[16k..16k+16]`; value `i = d · qs[i]`. All little-endian.

use super::{check_row_args, nearest_i32, QK_K};

/// Bytes per Q8_K block.
pub const BLOCK_BYTES: usize = 292;
/// Offset of the quants in a block.
pub(crate) const QS: usize = 4;
/// Offset of the 16-element sums in a block.
pub(crate) const BSUMS: usize = 260;

/// Quantizes `src.len()` activations (a multiple of 256) into Q8_K blocks at the start of `dst`.
///
/// The value of largest magnitude maps to −128, so the full signed range is used.
///
/// # Panics
/// If `src.len()` is not a multiple of 256 or `dst` is shorter than the blocks need.
pub fn quantize_row_q8k(src: &[f32], dst: &mut [u8]) {
    let nb = check_row_args(dst.len(), src.len(), BLOCK_BYTES, "Q8_K quantize");
    for (x, out) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .take(nb)
    {
        let mut vmax = 0.0f32;
        for &v in x {
            if v.abs() > vmax.abs() {
                vmax = v;
            }
        }
        if vmax == 0.0 {
            out.fill(0);
            continue;
        }
        let iscale = -128.0 / vmax;
        out[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
        let mut q = [0i8; QK_K];
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = nearest_i32(iscale * v).clamp(-128, 127) as i8;
        }
        for (o, &qi) in out[QS..QS + QK_K].iter_mut().zip(&q) {
            *o = qi as u8;
        }
        for (k, group) in q.chunks_exact(16).enumerate() {
            let s: i16 = group.iter().map(|&v| v as i16).sum();
            out[BSUMS + 2 * k..BSUMS + 2 * k + 2].copy_from_slice(&s.to_le_bytes());
        }
    }
}

/// Dequantizes `dst.len()` values (a multiple of 256) from Q8_K blocks in `src`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src` is too short.
pub fn dequantize_row_q8k(src: &[u8], dst: &mut [f32]) {
    check_row_args(src.len(), dst.len(), BLOCK_BYTES, "Q8_K dequantize");
    for (b, y) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (yi, &q) in y.iter_mut().zip(&b[QS..QS + QK_K]) {
            *yi = d * (q as i8) as f32;
        }
    }
}
