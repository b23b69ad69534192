//! Q5_K: 5-bit quants, 8 sub-blocks of 32 with 6-bit scales and mins.
//!
//! Block (176 bytes): `f16 d` (0..2), `f16 dmin` (2..4), `scales[12]` (4..16, as Q4_K),
//! `qh[32]` (16..48), `qs[128]` (48..176). Element `e`: low 4 bits as in Q4_K (nibbles of
//! `qs[32·(e/64) + e%32]`), fifth bit = bit `e/32` of `qh[e % 32]`.
//! Value: `d · sc[e/32] · q − dmin · m[e/32]`.

use super::q4k::quantize_affine_block;
use super::{act_bsums, check_dot_args, check_row_args, f16_at, q8k, unpack_scales_mins_k4, QK_K};

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

/// The int8 GEMM's converter ([`crate::gemm::Converter`]): `q.len()` elements as `q · scale +
/// min` per sub-block of 32 (`scale = d·sc`, `min = −dmin·m`).
pub(crate) fn to_int8(src: &[u8], q: &mut [i8], scales: &mut [f32], mins: &mut [f32]) {
    for (i, b) in src
        .chunks_exact(BLOCK_BYTES)
        .take(q.len() / QK_K)
        .enumerate()
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = unpack_scales_mins_k4(&b[4..16]);
        for j in 0..8 {
            scales[8 * i + j] = d * sc[j] as f32;
            mins[8 * i + j] = -dmin * mn[j] as f32;
        }
        let qh = &b[QH..QH + 32];
        let y = &mut q[QK_K * i..QK_K * (i + 1)];
        for c in 0..4 {
            let qs = &b[QS + 32 * c..QS + 32 * c + 32];
            for l in 0..32 {
                y[64 * c + l] = ((qs[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4)) as i8;
                y[64 * c + 32 + l] = ((qs[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4)) as i8;
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

/// Portable dot product of a Q5_K row with a Q8_K row of `n` elements.
///
/// # Panics
/// If `n` is not a multiple of 256 or a row is too short.
pub fn dot_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q5_K");
    let mut acc = 0.0f32;
    for (b, ab) in w
        .chunks_exact(BLOCK_BYTES)
        .zip(a.chunks_exact(q8k::BLOCK_BYTES))
        .take(nb)
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        let (sc, mn) = unpack_scales_mins_k4(&b[4..16]);
        let qa = &ab[q8k::QS..q8k::QS + QK_K];
        let qh = &b[QH..QH + 32];
        let mut sumi = 0i32;
        for c in 0..4 {
            let q = &b[QS + 32 * c..QS + 32 * c + 32];
            let (j0, j1) = (2 * c, 2 * c + 1);
            let (a0, a1) = qa[64 * c..64 * c + 64].split_at(32);
            let s0: i32 = q
                .iter()
                .zip(qh)
                .zip(a0)
                .map(|((&w, &h), &x)| ((w & 15) | (((h >> j0) & 1) << 4)) as i32 * x as i8 as i32)
                .sum();
            let s1: i32 = q
                .iter()
                .zip(qh)
                .zip(a1)
                .map(|((&w, &h), &x)| ((w >> 4) | (((h >> j1) & 1) << 4)) as i32 * x as i8 as i32)
                .sum();
            sumi += sc[j0] as i32 * s0 + sc[j1] as i32 * s1;
        }
        let bs = act_bsums(ab);
        let summ: i32 = (0..8)
            .map(|j| mn[j] as i32 * (bs[2 * j] + bs[2 * j + 1]))
            .sum();
        acc += da * (d * sumi as f32 - dmin * summ as f32);
    }
    acc
}

/// AVX2 dot product (safe wrapper; falls back to scalar if AVX2 is missing).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_avx2(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q5_K");
    if !super::Variant::Avx2.available() {
        return dot_scalar(w, a, n);
    }
    // SAFETY: AVX2/FMA/F16C were detected just above; check_dot_args verified that `w` holds nb
    // Q5_K blocks and `a` nb Q8_K blocks, which is all x86::dot_avx2 reads.
    unsafe { x86::dot_avx2(w.as_ptr(), a.as_ptr(), nb) }
}

/// AVX-512 VNNI dot product (safe wrapper; falls back to AVX2/scalar if missing).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_avx512(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q5_K");
    if !super::Variant::Avx512.available() {
        return dot_avx2(w, a, n);
    }
    // SAFETY: the AVX-512 set (F/BW/VL/VNNI) and AVX2/FMA/F16C were detected just above;
    // check_dot_args verified that `w` holds nb Q5_K blocks and `a` nb Q8_K blocks.
    unsafe { x86::dot_avx512(w.as_ptr(), a.as_ptr(), nb) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::q4k::x86_mins_dot as mins_dot;
    use super::super::simd::{
        bcast_u8x8_epi16, f16x2, f32_at, halves_epi16, hsum_ps, load256, load512, pair_mask,
        prefetch_ahead,
    };
    use super::super::{q8k, unpack_scales_mins_k4};
    use super::{BLOCK_BYTES, QH, QS};

    /// # Safety
    /// `w` must hold `nb` Q5_K blocks and `a` `nb` Q8_K blocks; AVX2, FMA and F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m4 = _mm256_set1_epi8(0x0f);
        let one = _mm256_set1_epi8(1);
        let two = _mm256_set1_epi8(2);
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        for i in 0..nb {
            // SAFETY: i < nb, so both blocks lie inside the rows the caller vouched for; every
            // offset below stays within one block.
            unsafe {
                let wb = w.add(i * BLOCK_BYTES);
                prefetch_ahead(wb, BLOCK_BYTES);
                let ab = a.add(i * q8k::BLOCK_BYTES);
                let (d, dmin) = f16x2(wb);
                let da = f32_at(ab);
                let (sc, mn) = unpack_scales_mins_k4(std::slice::from_raw_parts(wb.add(4), 12));
                let scv = bcast_u8x8_epi16(sc);
                // Shifted right by 2 per chunk so that bits 0 and 1 hold the fifth bits of
                // sub-blocks 2c and 2c+1 (16-bit shifts never move bits 0..1 across bytes here).
                let mut hq = load256(wb.add(QH));
                let mut sumi = _mm256_setzero_si256();
                for c in 0..4 {
                    let q = load256(wb.add(QS + 32 * c));
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(hq, one), 4);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(hq, two), 3);
                    hq = _mm256_srli_epi16(hq, 2);
                    let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h0);
                    let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), h1);
                    let a0 = load256(ab.add(q8k::QS + 64 * c));
                    let a1 = load256(ab.add(q8k::QS + 64 * c + 32));
                    let p0 = _mm256_maddubs_epi16(lo, a0);
                    let p1 = _mm256_maddubs_epi16(hi, a1);
                    let s0 = _mm256_shuffle_epi8(scv, pair_mask(2 * c, 2 * c));
                    let s1 = _mm256_shuffle_epi8(scv, pair_mask(2 * c + 1, 2 * c + 1));
                    let p = _mm256_add_epi32(_mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1));
                    sumi = _mm256_add_epi32(sumi, p);
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc);
                let pm = mins_dot(ab, mn);
                accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin * da), _mm256_cvtepi32_ps(pm), accm);
            }
        }
        hsum_ps(acc) - hsum_ps(accm)
    }

    /// # Safety
    /// `w` must hold `nb` Q5_K blocks and `a` `nb` Q8_K blocks; AVX-512 F/BW/VL/VNNI, AVX2, FMA
    /// and F16C available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m4 = _mm512_set1_epi8(0x0f);
        let one = _mm512_set1_epi8(1);
        // Low half: low nibbles, fifth bit j = 2c; high half: high nibbles, fifth bit 2c+1.
        let nib_shift = halves_epi16(0, 4);
        // Pairs (2c, 2c+1): the fifth bits' positions in qh and the scale indices of chunk c.
        let pairs: [__m512i; 4] =
            std::array::from_fn(|c| halves_epi16(2 * c as i16, 2 * c as i16 + 1));
        let mut acc = _mm512_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        for i in 0..nb {
            // SAFETY: i < nb, so both blocks lie inside the rows the caller vouched for; every
            // offset below stays within one block.
            unsafe {
                let wb = w.add(i * BLOCK_BYTES);
                prefetch_ahead(wb, BLOCK_BYTES);
                let ab = a.add(i * q8k::BLOCK_BYTES);
                let (d, dmin) = f16x2(wb);
                let da = f32_at(ab);
                let (sc, mn) = unpack_scales_mins_k4(std::slice::from_raw_parts(wb.add(4), 12));
                let scz = _mm512_castsi256_si512(bcast_u8x8_epi16(sc));
                let qh = _mm512_broadcast_i64x4(load256(wb.add(QH)));
                let mut sumi = _mm512_setzero_si512();
                for (c, pair) in pairs.iter().enumerate() {
                    let q = _mm512_broadcast_i64x4(load256(wb.add(QS + 32 * c)));
                    let q = _mm512_and_si512(_mm512_srlv_epi16(q, nib_shift), m4);
                    let h = _mm512_and_si512(_mm512_srlv_epi16(qh, *pair), one);
                    let q = _mm512_or_si512(q, _mm512_slli_epi16(h, 4));
                    let av = load512(ab.add(q8k::QS + 64 * c));
                    let p = _mm512_maddubs_epi16(q, av);
                    let s = _mm512_permutexvar_epi16(*pair, scz);
                    sumi = _mm512_dpwssd_epi32(sumi, p, s);
                }
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d * da), _mm512_cvtepi32_ps(sumi), acc);
                let pm = mins_dot(ab, mn);
                accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin * da), _mm256_cvtepi32_ps(pm), accm);
            }
        }
        _mm512_reduce_add_ps(acc) - hsum_ps(accm)
    }
}
