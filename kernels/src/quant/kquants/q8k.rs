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
        let x: &[f32; QK_K] = x.try_into().expect("a block of 256");
        #[cfg(target_arch = "x86_64")]
        if crate::quant::SimdLevel::Avx2.available()
            && crate::quant::simd_cap() != crate::quant::SimdLevel::Scalar
        {
            // SAFETY: AVX2, FMA and F16C were detected just above.
            if unsafe { x86::quantize_block(x, out) } {
                continue;
            }
        }
        quantize_block(x, out);
    }
}

/// One block by the definition (see [`quantize_row_q8k`]).
fn quantize_block(x: &[f32; QK_K], out: &mut [u8]) {
    let mut vmax = 0.0f32;
    for &v in x {
        if v.abs() > vmax.abs() {
            vmax = v;
        }
    }
    if vmax == 0.0 {
        out.fill(0);
        return;
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

/// The block quantizer in AVX2, bit for bit the definition's: the same first element of largest
/// magnitude, divide, multiply, ties-to-even rounding and clamp. Blocks with a non-finite value
/// are left to the definition.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK_BYTES, BSUMS, QK_K, QS};

    /// Quantizes `x` into `out` (at least [`BLOCK_BYTES`]); `false` (nothing written) when the
    /// block holds a NaN or an infinity.
    ///
    /// # Safety
    /// AVX2, FMA and F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(x: &[f32; QK_K], out: &mut [u8]) -> bool {
        let out: &mut [u8; BLOCK_BYTES] = (&mut out[..BLOCK_BYTES]).try_into().expect("a block");
        let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let inf = _mm256_set1_ps(f32::INFINITY);
        // SAFETY: `x` holds 256 f32; each load reads 8 of them, unaligned.
        let v: [__m256; 32] =
            std::array::from_fn(|k| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * k)) });
        let mut m = _mm256_setzero_ps();
        let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for &w in &v {
            let a = _mm256_and_ps(w, absmask);
            finite = _mm256_and_ps(finite, _mm256_cmp_ps::<_CMP_LT_OQ>(a, inf));
            m = _mm256_max_ps(m, a);
        }
        if _mm256_movemask_ps(finite) != 0xFF {
            return false;
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))));
        // The first element of largest magnitude, as the definition's scan picks it.
        let first = v
            .iter()
            .enumerate()
            .find_map(|(k, &w)| {
                let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(w, absmask), amax);
                let bits = _mm256_movemask_ps(eq);
                (bits != 0).then(|| 8 * k + bits.trailing_zeros() as usize)
            })
            .expect("the maximum is one of the values");
        let vmax = x[first];
        if vmax == 0.0 {
            out.fill(0);
            return true;
        }
        let iscale = -128.0 / vmax;
        out[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
        let is = _mm256_set1_ps(iscale);
        let (lo, hi) = (_mm256_set1_epi32(-128), _mm256_set1_epi32(127));
        let q: [__m256i; 32] = std::array::from_fn(|k| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v[k], is),
            );
            _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), lo), hi)
        });
        // packs interleaves 128-bit lanes; this restores element order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for c in 0..8 {
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[4 * c], q[4 * c + 1]),
                _mm256_packs_epi32(q[4 * c + 2], q[4 * c + 3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            // SAFETY: bytes QS + 32c .. + 32 of the 292-byte block; unaligned store.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(QS + 32 * c).cast(), bytes) };
        }
        for k in 0..16 {
            let s = _mm256_add_epi32(q[2 * k], q[2 * k + 1]);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            let s = _mm_cvtsi128_si32(s) as i16;
            out[BSUMS + 2 * k..BSUMS + 2 * k + 2].copy_from_slice(&s.to_le_bytes());
        }
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD block quantizer writes the definition's bytes: random magnitudes, exact ties,
    /// a largest magnitude held by both signs, zeros, and non-finite values (left to the
    /// definition).
    #[test]
    fn simd_quantizer_matches_the_definition() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut blocks: Vec<[f32; QK_K]> = Vec::new();
        for b in 0..64 {
            let scale = 10f32.powi(b % 9 - 4);
            blocks.push(std::array::from_fn(|_| {
                (next() >> 40) as f32 / (1u64 << 23) as f32 * scale - scale
            }));
        }
        // Halves and the two signs of the largest magnitude.
        let mut tie: [f32; QK_K] = std::array::from_fn(|i| (i as f32 - 128.0) * 0.5);
        tie[7] = 64.0;
        blocks.push(tie);
        let mut both = [0f32; QK_K];
        both[3] = -2.0;
        both[200] = 2.0;
        both[100] = 1.0;
        blocks.push(both);
        blocks.push([0f32; QK_K]);
        let mut nan = blocks[0];
        nan[17] = f32::NAN;
        blocks.push(nan);
        let mut inf = blocks[1];
        inf[255] = f32::NEG_INFINITY;
        blocks.push(inf);
        let x: Vec<f32> = blocks.iter().flatten().copied().collect();
        let mut got = vec![0u8; blocks.len() * BLOCK_BYTES];
        quantize_row_q8k(&x, &mut got);
        let mut want = vec![0u8; blocks.len() * BLOCK_BYTES];
        for (b, o) in blocks.iter().zip(want.chunks_exact_mut(BLOCK_BYTES)) {
            quantize_block(b, o);
        }
        for (i, (g, w)) in got
            .chunks_exact(BLOCK_BYTES)
            .zip(want.chunks_exact(BLOCK_BYTES))
            .enumerate()
        {
            assert_eq!(g, w, "block {i}");
        }
    }
}
