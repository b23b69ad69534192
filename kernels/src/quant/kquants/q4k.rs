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
    act_bsums, check_dot_args, check_row_args, f16_at, nearest_i32, pack_scales_mins_k4, put_f16,
    q8k, unpack_scales_mins_k4, QK_K,
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
        let y = &mut q[QK_K * i..QK_K * (i + 1)];
        for c in 0..4 {
            let qs = &b[QS + 32 * c..QS + 32 * c + 32];
            for l in 0..32 {
                y[64 * c + l] = (qs[l] & 15) as i8;
                y[64 * c + 32 + l] = (qs[l] >> 4) as i8;
            }
        }
    }
}

/// Portable dot product of a Q4_K row with a Q8_K row of `n` elements.
///
/// # Panics
/// If `n` is not a multiple of 256 or a row is too short.
pub fn dot_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q4_K");
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
        let mut sumi = 0i32;
        for c in 0..4 {
            let q = &b[QS + 32 * c..QS + 32 * c + 32];
            let (a0, a1) = qa[64 * c..64 * c + 64].split_at(32);
            let s0: i32 = q
                .iter()
                .zip(a0)
                .map(|(&w, &x)| (w & 15) as i32 * x as i8 as i32)
                .sum();
            let s1: i32 = q
                .iter()
                .zip(a1)
                .map(|(&w, &x)| (w >> 4) as i32 * x as i8 as i32)
                .sum();
            sumi += sc[2 * c] as i32 * s0 + sc[2 * c + 1] as i32 * s1;
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
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q4_K");
    if !super::Variant::Avx2.available() {
        return dot_scalar(w, a, n);
    }
    // SAFETY: AVX2/FMA/F16C were detected just above; check_dot_args verified that `w` holds nb
    // Q4_K blocks and `a` nb Q8_K blocks, which is all x86::dot_avx2 reads.
    unsafe { x86::dot_avx2(w.as_ptr(), a.as_ptr(), nb) }
}

/// AVX-512 VNNI dot product (safe wrapper; falls back to AVX2/scalar if missing).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_avx512(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q4_K");
    if !super::Variant::Avx512.available() {
        return dot_avx2(w, a, n);
    }
    // SAFETY: the AVX-512 set (F/BW/VL/VNNI) and AVX2/FMA/F16C were detected just above;
    // check_dot_args verified that `w` holds nb Q4_K blocks and `a` nb Q8_K blocks.
    unsafe { x86::dot_avx512(w.as_ptr(), a.as_ptr(), nb) }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::mins_dot as x86_mins_dot;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::simd::{
        bcast_u8x8_epi16, f16x2, f32_at, halves_epi16, hsum_ps, load256, load512, pair_mask,
        prefetch_ahead,
    };
    use super::super::{q8k, unpack_scales_mins_k4};
    use super::{BLOCK_BYTES, QS};

    /// Σ over the block's 8 sub-blocks of `mins[j] · (bsums[2j] + bsums[2j+1])`, as 8 i32 lanes.
    ///
    /// # Safety
    /// `ab` must point at a whole Q8_K block; AVX2 must be available.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(in super::super) unsafe fn mins_dot(ab: *const u8, mn: [u8; 8]) -> __m256i {
        // SAFETY: the caller guarantees a whole Q8_K block; bsums are 32 bytes at BSUMS.
        let bs = unsafe { load256(ab.add(q8k::BSUMS)) };
        let mv = _mm_cvtsi64_si128(i64::from_le_bytes(mn));
        let m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mv, mv));
        _mm256_madd_epi16(bs, m16)
    }

    /// # Safety
    /// `w` must hold `nb` Q4_K blocks and `a` `nb` Q8_K blocks; AVX2, FMA and F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m4 = _mm256_set1_epi8(0x0f);
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
                let mut sumi = _mm256_setzero_si256();
                for c in 0..4 {
                    let q = load256(wb.add(QS + 32 * c));
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
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
    /// `w` must hold `nb` Q4_K blocks and `a` `nb` Q8_K blocks; AVX-512 F/BW/VL/VNNI, AVX2, FMA
    /// and F16C available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m4 = _mm512_set1_epi8(0x0f);
        // Low 256 bits keep the low nibbles, high 256 bits take the high nibbles.
        let shift = halves_epi16(0, 4);
        // Word indices selecting scale 2c for the low half and 2c+1 for the high half.
        let idx: [__m512i; 4] =
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
                let mut sumi = _mm512_setzero_si512();
                for (c, ix) in idx.iter().enumerate() {
                    let q = _mm512_broadcast_i64x4(load256(wb.add(QS + 32 * c)));
                    let q = _mm512_and_si512(_mm512_srlv_epi16(q, shift), m4);
                    let av = load512(ab.add(q8k::QS + 64 * c));
                    let p = _mm512_maddubs_epi16(q, av);
                    let s = _mm512_permutexvar_epi16(*ix, scz);
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
