//! Q6_K: 6-bit quants, 16 sub-blocks of 16 with signed 8-bit scales.
//!
//! Block (210 bytes): `ql[128]` (0..128), `qh[64]` (128..192), `i8 scales[16]` (192..208),
//! `f16 d` (208..210). Per half `h` (128 elements), with `l < 32`: elements `l`, `l+32`, `l+64`,
//! `l+96` take the low nibble of `ql[64h+l]`, low nibble of `ql[64h+32+l]`, high nibble of
//! `ql[64h+l]`, high nibble of `ql[64h+32+l]`; their top two bits are bits 0-1, 2-3, 4-5, 6-7 of
//! `qh[32h+l]`. Value: `d · scales[e/16] · (q − 32)`.

use super::fit::{fit_symmetric, quantize_scales_signed};
use super::{check_dot_args, check_row_args, f16_at, nearest_i32, put_f16, q8k, QK_K};

/// Bytes per Q6_K block.
pub const BLOCK_BYTES: usize = 210;
const QH: usize = 128;
const SC: usize = 192;
const D: usize = 208;

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

/// The int8 GEMM's converter ([`crate::gemm::Converter`]): `q.len()` elements as `(q − 32) ·
/// scale` per sub-block of 16 (`scale = d·sc`).
pub(crate) fn to_int8(src: &[u8], q: &mut [i8], scales: &mut [f32], _mins: &mut [f32]) {
    for (i, b) in src
        .chunks_exact(BLOCK_BYTES)
        .take(q.len() / QK_K)
        .enumerate()
    {
        let d = f16_at(b, D);
        for j in 0..16 {
            scales[16 * i + j] = d * b[SC + j] as i8 as f32;
        }
        let u = unpack_quants(b);
        for (o, &v) in q[QK_K * i..QK_K * (i + 1)].iter_mut().zip(&u) {
            *o = v as i8 - 32;
        }
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

/// Portable dot product of a Q6_K row with a Q8_K row of `n` elements.
///
/// # Panics
/// If `n` is not a multiple of 256 or a row is too short.
pub fn dot_scalar(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q6_K");
    let mut acc = 0.0f32;
    for (b, ab) in w
        .chunks_exact(BLOCK_BYTES)
        .zip(a.chunks_exact(q8k::BLOCK_BYTES))
        .take(nb)
    {
        let d = f16_at(b, D);
        let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        let q = unpack_quants(b);
        let qa = &ab[q8k::QS..q8k::QS + QK_K];
        let mut sumi = 0i32;
        for j in 0..16 {
            let s: i32 = (16 * j..16 * j + 16)
                .map(|e| (q[e] as i32 - 32) * qa[e] as i8 as i32)
                .sum();
            sumi += (b[SC + j] as i8) as i32 * s;
        }
        acc += da * d * sumi as f32;
    }
    acc
}

/// AVX2 dot product (safe wrapper; falls back to scalar if AVX2 is missing).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_avx2(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q6_K");
    if !super::Variant::Avx2.available() {
        return dot_scalar(w, a, n);
    }
    // SAFETY: AVX2/FMA/F16C were detected just above; check_dot_args verified that `w` holds nb
    // Q6_K blocks and `a` nb Q8_K blocks, which is all x86::dot_avx2 reads.
    unsafe { x86::dot_avx2(w.as_ptr(), a.as_ptr(), nb) }
}

/// AVX-512 VNNI dot product (safe wrapper; falls back to AVX2/scalar if missing).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_avx512(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot_args(w, a, n, BLOCK_BYTES, "Q6_K");
    if !super::Variant::Avx512.available() {
        return dot_avx2(w, a, n);
    }
    // SAFETY: the AVX-512 set (F/BW/VL/VNNI) and AVX2/FMA/F16C were detected just above;
    // check_dot_args verified that `w` holds nb Q6_K blocks and `a` nb Q8_K blocks.
    unsafe { x86::dot_avx512(w.as_ptr(), a.as_ptr(), nb) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::q8k;
    use super::super::simd::{
        f16_1, f32_at, halves_epi16, hsum_ps, load128, load256, load512, pair_mask, prefetch_ahead,
        scale_index_16,
    };
    use super::{BLOCK_BYTES, D, QH, SC};

    /// The block's 16 signed scales as i16 and Σ scales[j]·bsums[j] as 8 i32 lanes.
    ///
    /// # Safety
    /// `wb` must point at a whole Q6_K block and `ab` at a whole Q8_K block; AVX2 available.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scales_and_offset(wb: *const u8, ab: *const u8) -> (__m256i, __m256i) {
        // SAFETY: the caller guarantees whole blocks; scales are 16 bytes at SC, bsums 32 at
        // BSUMS.
        let (sc16, bs) = unsafe {
            (
                _mm256_cvtepi8_epi16(load128(wb.add(SC))),
                load256(ab.add(q8k::BSUMS)),
            )
        };
        (sc16, _mm256_madd_epi16(bs, sc16))
    }

    /// # Safety
    /// `w` must hold `nb` Q6_K blocks and `a` `nb` Q8_K blocks; AVX2, FMA and F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m4 = _mm256_set1_epi8(0x0f);
        let m3 = _mm256_set1_epi8(0x03);
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
                let (sc16, offs) = scales_and_offset(wb, ab);
                let mut sumi = _mm256_setzero_si256();
                for h in 0..2 {
                    let ql0 = load256(wb.add(64 * h));
                    let ql1 = load256(wb.add(64 * h + 32));
                    let qh = load256(wb.add(QH + 32 * h));
                    // Scales of this half (8 words) in both lanes.
                    let scv = if h == 0 {
                        _mm256_permute2x128_si256(sc16, sc16, 0x00)
                    } else {
                        _mm256_permute2x128_si256(sc16, sc16, 0x11)
                    };
                    let q = [
                        _mm256_or_si256(
                            _mm256_and_si256(ql0, m4),
                            _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(ql1, m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4),
                        ),
                    ];
                    for (k, qk) in q.iter().enumerate() {
                        let av = load256(ab.add(q8k::QS + 128 * h + 32 * k));
                        let p = _mm256_maddubs_epi16(*qk, av);
                        let s = _mm256_shuffle_epi8(scv, pair_mask(2 * k, 2 * k + 1));
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                    }
                }
                // Quants are stored +32: subtract 32 · Σ scale · bsum.
                sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(offs, 5));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc);
            }
        }
        hsum_ps(acc)
    }

    /// # Safety
    /// `w` must hold `nb` Q6_K blocks and `a` `nb` Q8_K blocks; AVX-512 F/BW/VL/VNNI, AVX2, FMA
    /// and F16C available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m4 = _mm512_set1_epi8(0x0f);
        let m3 = _mm512_set1_epi8(0x03);
        // qh bit pairs: elements l / l+32 use bits 0-1 / 2-3, elements l+64 / l+96 bits 4-5 / 6-7.
        let sh12 = halves_epi16(0, 2);
        let sh34 = halves_epi16(4, 6);
        let idx = scale_index_16();
        let mut acc = _mm512_setzero_ps();
        for i in 0..nb {
            // SAFETY: i < nb, so both blocks lie inside the rows the caller vouched for; every
            // offset below stays within one block.
            unsafe {
                let wb = w.add(i * BLOCK_BYTES);
                prefetch_ahead(wb, BLOCK_BYTES);
                let ab = a.add(i * q8k::BLOCK_BYTES);
                let d = f16_1(wb.add(D));
                let da = f32_at(ab);
                let (sc16, offs) = scales_and_offset(wb, ab);
                let scz = _mm512_castsi256_si512(sc16);
                let mut sumi = _mm512_setzero_si512();
                for h in 0..2 {
                    let ql = load512(wb.add(64 * h));
                    let qh = _mm512_broadcast_i64x4(load256(wb.add(QH + 32 * h)));
                    let h12 = _mm512_and_si512(_mm512_srlv_epi16(qh, sh12), m3);
                    let h34 = _mm512_and_si512(_mm512_srlv_epi16(qh, sh34), m3);
                    let q12 = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(h12, 4));
                    let q34 = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                        _mm512_slli_epi16(h34, 4),
                    );
                    let a12 = load512(ab.add(q8k::QS + 128 * h));
                    let a34 = load512(ab.add(q8k::QS + 128 * h + 64));
                    let s12 = _mm512_permutexvar_epi16(idx[2 * h], scz);
                    let s34 = _mm512_permutexvar_epi16(idx[2 * h + 1], scz);
                    sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q12, a12), s12);
                    sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q34, a34), s34);
                }
                let offs = _mm512_zextsi256_si512(_mm256_slli_epi32(offs, 5));
                sumi = _mm512_sub_epi32(sumi, offs);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d * da), _mm512_cvtepi32_ps(sumi), acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }
}
