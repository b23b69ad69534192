//! Q2_K: 2-bit quants, 16 sub-blocks of 16 with 4-bit scales and mins.
//!
//! Block (84 bytes): `scales[16]` (0..16; low nibble scale, high nibble min), `qs[64]` (16..80),
//! `f16 d` (80..82), `f16 dmin` (82..84). Element `e` in half `h = e/128`, group
//! `j = (e%128)/32`, position `l = e%32` is bits `2j..2j+2` of `qs[32h + l]`.
//! Value: `d · (scales[e/16] & 15) · q − dmin · (scales[e/16] >> 4)`.

use super::fit::{fit_affine, quantize_scales_unsigned};
use super::{act_bsums, check_dot_args, check_row_args, f16_at, nearest_i32, put_f16, q8k, QK_K};

/// Bytes per Q2_K block.
pub const BLOCK_BYTES: usize = 84;
const QS: usize = 16;
const D: usize = 80;

/// The 2-bit quants of one block in element order.
fn unpack_quants(b: &[u8]) -> [u8; QK_K] {
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

/// Portable dot product of a Q2_K row with a Q8_K row of `n` elements.
///
/// # Panics
/// If `n` is not a multiple of 256 or a row is too short.
pub fn dot_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q2_K");
    let mut acc = 0.0f32;
    for (b, ab) in w
        .chunks_exact(BLOCK_BYTES)
        .zip(a.chunks_exact(q8k::BLOCK_BYTES))
        .take(nb)
    {
        let (d, dmin) = (f16_at(b, D), f16_at(b, D + 2));
        let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        let q = unpack_quants(b);
        let qa = &ab[q8k::QS..q8k::QS + QK_K];
        let bs = act_bsums(ab);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..16 {
            let s: i32 = (16 * j..16 * j + 16)
                .map(|e| q[e] as i32 * qa[e] as i8 as i32)
                .sum();
            sumi += (b[j] & 15) as i32 * s;
            summ += (b[j] >> 4) as i32 * bs[j];
        }
        acc += da * (d * sumi as f32 - dmin * summ as f32);
    }
    acc
}

/// AVX2 dot product (safe wrapper; falls back to scalar if AVX2 is missing).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_avx2(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q2_K");
    if !super::Variant::Avx2.available() {
        return dot_scalar(w, a, n);
    }
    // SAFETY: AVX2/FMA/F16C were detected just above; check_dot_args verified that `w` holds nb
    // Q2_K blocks and `a` nb Q8_K blocks, which is all x86::dot_avx2 reads.
    unsafe { x86::dot_avx2(w.as_ptr(), a.as_ptr(), nb) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::q8k;
    use super::super::simd::{f16x2, f32_at, hsum_ps, load128, load256, pair_mask, prefetch_ahead};
    use super::{BLOCK_BYTES, D, QS};

    /// # Safety
    /// `w` must hold `nb` Q2_K blocks and `a` `nb` Q8_K blocks; AVX2, FMA and F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(0x0f);
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        for i in 0..nb {
            // SAFETY: i < nb, so both blocks lie inside the rows the caller vouched for; every
            // offset below stays within one block.
            unsafe {
                let wb = w.add(i * BLOCK_BYTES);
                prefetch_ahead(wb, BLOCK_BYTES);
                let ab = a.add(i * q8k::BLOCK_BYTES);
                let (d, dmin) = f16x2(wb.add(D));
                let da = f32_at(ab);
                let raw = load128(wb);
                let sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, m4));
                let mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
                let pm = _mm256_madd_epi16(load256(ab.add(q8k::BSUMS)), mn16);
                let mut sumi = _mm256_setzero_si256();
                for h in 0..2 {
                    let scv = if h == 0 {
                        _mm256_permute2x128_si256(sc16, sc16, 0x00)
                    } else {
                        _mm256_permute2x128_si256(sc16, sc16, 0x11)
                    };
                    let mut q = load256(wb.add(QS + 32 * h));
                    for j in 0..4 {
                        let u = _mm256_and_si256(q, m3);
                        q = _mm256_srli_epi16(q, 2);
                        let av = load256(ab.add(q8k::QS + 128 * h + 32 * j));
                        let p = _mm256_maddubs_epi16(u, av);
                        let s = _mm256_shuffle_epi8(scv, pair_mask(2 * j, 2 * j + 1));
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                    }
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc);
                accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin * da), _mm256_cvtepi32_ps(pm), accm);
            }
        }
        hsum_ps(acc) - hsum_ps(accm)
    }
}
