//! Q3_K: 3-bit quants, 16 sub-blocks of 16 with signed 6-bit scales.
//!
//! Block (110 bytes): `hmask[32]` (0..32), `qs[64]` (32..96), `scales[12]` (96..108), `f16 d`
//! (108..110). Element `e` in half `h = e/128`, group `j = (e%128)/32`, position `l = e%32`: low
//! two bits are bits `2j..2j+2` of `qs[32h + l]`, the third bit is bit `4h + j` of `hmask[l]`;
//! `q = low + 4·bit − 4` in −4..3. Scale `i` (6 bits, stored +32): low 4 bits in the low
//! (`i < 8`) or high (`i ≥ 8`) nibble of `scales[i % 8]`, top 2 bits at bit `2·(i/4)` of
//! `scales[8 + i%4]`. Value: `d · (scale[e/16] − 32) · q`.

use super::fit::{fit_symmetric, quantize_scales_signed};
use super::{check_dot_args, check_row_args, f16_at, nearest_i32, put_f16, q8k, QK_K};

/// Bytes per Q3_K block.
pub const BLOCK_BYTES: usize = 110;
const QS: usize = 32;
const SC: usize = 96;
const D: usize = 108;

/// The 16 signed scales (−32..31) of a block from its 12-byte scale field.
#[inline]
fn unpack_scales(s: &[u8]) -> [i8; 16] {
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

/// The int8 GEMM's converter ([`crate::gemm::Converter`]): `q.len()` elements as `(q − 4) ·
/// scale` per sub-block of 16 (`scale = d·sc`).
pub(crate) fn to_int8(src: &[u8], q: &mut [i8], scales: &mut [f32], _mins: &mut [f32]) {
    for (i, b) in src
        .chunks_exact(BLOCK_BYTES)
        .take(q.len() / QK_K)
        .enumerate()
    {
        let d = f16_at(b, D);
        let sc = unpack_scales(&b[SC..SC + 12]);
        for j in 0..16 {
            scales[16 * i + j] = d * sc[j] as f32;
        }
        let u = unpack_quants(b);
        for (o, &v) in q[QK_K * i..QK_K * (i + 1)].iter_mut().zip(&u) {
            *o = v as i8 - 4;
        }
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

/// Portable dot product of a Q3_K row with a Q8_K row of `n` elements.
///
/// # Panics
/// If `n` is not a multiple of 256 or a row is too short.
pub fn dot_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q3_K");
    let mut acc = 0.0f32;
    for (b, ab) in w
        .chunks_exact(BLOCK_BYTES)
        .zip(a.chunks_exact(q8k::BLOCK_BYTES))
        .take(nb)
    {
        let d = f16_at(b, D);
        let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        let sc = unpack_scales(&b[SC..SC + 12]);
        let q = unpack_quants(b);
        let qa = &ab[q8k::QS..q8k::QS + QK_K];
        let mut sumi = 0i32;
        for (j, &scale) in sc.iter().enumerate() {
            let s: i32 = (16 * j..16 * j + 16)
                .map(|e| (q[e] as i32 - 4) * qa[e] as i8 as i32)
                .sum();
            sumi += scale as i32 * s;
        }
        acc += da * d * sumi as f32;
    }
    acc
}

/// AVX2 dot product (safe wrapper; falls back to scalar if AVX2 is missing).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_avx2(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q3_K");
    if !super::Variant::Avx2.available() {
        return dot_scalar(w, a, n);
    }
    // SAFETY: AVX2/FMA/F16C were detected just above; check_dot_args verified that `w` holds nb
    // Q3_K blocks and `a` nb Q8_K blocks, which is all x86::dot_avx2 reads.
    unsafe { x86::dot_avx2(w.as_ptr(), a.as_ptr(), nb) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::q8k;
    use super::super::simd::{f16_1, f32_at, hsum_ps, load256, pair_mask, prefetch_ahead};
    use super::{unpack_scales, BLOCK_BYTES, D, QS, SC};

    /// # Safety
    /// `w` must hold `nb` Q3_K blocks and `a` `nb` Q8_K blocks; AVX2, FMA and F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let one = _mm256_set1_epi8(1);
        let mut acc = _mm256_setzero_ps();
        for i in 0..nb {
            // SAFETY: i < nb, so both blocks lie inside the rows the caller vouched for; every
            // offset below stays within one block.
            unsafe {
                let wb = w.add(i * BLOCK_BYTES);
                prefetch_ahead(wb, BLOCK_BYTES);
                let ab = a.add(i * q8k::BLOCK_BYTES);
                let d = f16_1(wb.add(D));
                let da = f32_at(ab);
                let sc = unpack_scales(std::slice::from_raw_parts(wb.add(SC), 12));
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr().cast()));
                // Quants are stored +4: subtract 4 · Σ scale · bsum at the end.
                let offs = _mm256_madd_epi16(load256(ab.add(q8k::BSUMS)), sc16);
                // Shifted right by one per group so that bit 0 holds the current high bit.
                let mut hm = load256(wb);
                let mut sumi = _mm256_setzero_si256();
                for h in 0..2 {
                    let scv = if h == 0 {
                        _mm256_permute2x128_si256(sc16, sc16, 0x00)
                    } else {
                        _mm256_permute2x128_si256(sc16, sc16, 0x11)
                    };
                    let mut q = load256(wb.add(QS + 32 * h));
                    for j in 0..4 {
                        let low = _mm256_and_si256(q, m3);
                        q = _mm256_srli_epi16(q, 2);
                        let high = _mm256_slli_epi16(_mm256_and_si256(hm, one), 2);
                        hm = _mm256_srli_epi16(hm, 1);
                        let u = _mm256_or_si256(low, high);
                        let av = load256(ab.add(q8k::QS + 128 * h + 32 * j));
                        let p = _mm256_maddubs_epi16(u, av);
                        let s = _mm256_shuffle_epi8(scv, pair_mask(2 * j, 2 * j + 1));
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                    }
                }
                sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(offs, 2));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc);
            }
        }
        hsum_ps(acc)
    }
}
