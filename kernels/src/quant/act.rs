//! Activation partner formats: the formats activations are converted to before they are dotted with
//! a weight row.
//!
//! - `F32`: plain little-endian f32 (for F32/F16/BF16 weights).
//! - `Q8_0`: blocks of 32 `{f16 d; i8 q[32]}` (34 bytes), value `q * d` (Q4_0, Q5_0, Q8_0 weights).
//! - `Q8_1`: blocks of 32 `{f16 d; f16 s; i8 q[32]}` (36 bytes) with `s = d * Σq`, so that weights
//!   with a per-block minimum (Q4_1, Q5_1) get the minimum's contribution from one multiply.
//! - `Q8K`: blocks of 256 (K-quants); its quantizer lives in the K-quant module.

use half::f16;
use pshard_model::ggml_type::GgmlType;

use super::ActFormat;

/// Elements per Q8_0 / Q8_1 block.
pub const QK8: usize = 32;
/// Bytes per Q8_0 activation block: f16 scale + 32 i8.
pub const Q8_0_BYTES: usize = 34;
/// Bytes per Q8_1 activation block: f16 scale + f16 scaled sum + 32 i8.
pub const Q8_1_BYTES: usize = 36;

impl ActFormat {
    /// Elements per block of this format (1 for `F32`).
    pub fn block_size(self) -> usize {
        match self {
            ActFormat::F32 => 1,
            ActFormat::Q8_0 | ActFormat::Q8_1 => QK8,
            ActFormat::Q8K => GgmlType::Q8_K.block_size() as usize,
        }
    }

    /// Bytes per block of this format.
    pub fn block_bytes(self) -> usize {
        match self {
            ActFormat::F32 => 4,
            ActFormat::Q8_0 => Q8_0_BYTES,
            ActFormat::Q8_1 => Q8_1_BYTES,
            ActFormat::Q8K => GgmlType::Q8_K.type_size() as usize,
        }
    }

    /// Bytes of one row of `cols` elements; `None` if `cols` is not a whole number of blocks or
    /// the size overflows.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_size()) {
            return None;
        }
        (cols / self.block_size()).checked_mul(self.block_bytes())
    }

    /// The ggml type with the same block layout.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            ActFormat::F32 => GgmlType::F32,
            ActFormat::Q8_0 => GgmlType::Q8_0,
            ActFormat::Q8_1 => GgmlType::Q8_1,
            ActFormat::Q8K => GgmlType::Q8_K,
        }
    }

    /// Short name for reports and errors.
    pub fn name(self) -> &'static str {
        self.ggml_type().name()
    }
}

/// Quantizes one row of activations into `format` (`src.len()` elements, whole blocks) and writes
/// `format.row_bytes(src.len())` bytes at the start of `dst`.
///
/// # Panics
/// If `src.len()` is not a whole number of blocks or `dst` is too short (callers validate shapes).
pub fn quantize_acts_row(format: ActFormat, src: &[f32], dst: &mut [u8]) {
    match format {
        ActFormat::F32 => {
            assert!(
                dst.len() >= src.len() * 4,
                "f32 activation row: destination too short"
            );
            for (d, x) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        ActFormat::Q8_0 => quantize_row_q8_0(src, dst),
        ActFormat::Q8_1 => quantize_row_q8_1(src, dst),
        ActFormat::Q8K => super::kquants::quantize_row_q8k(src, dst),
    }
}

/// Dequantizes one activation row in `format` (`dst.len()` elements) — the reference view of what
/// the kernels multiply with (tests and reference paths).
///
/// # Panics
/// If `dst.len()` is not a whole number of blocks or `src` is too short.
pub fn dequantize_acts_row(format: ActFormat, src: &[u8], dst: &mut [f32]) {
    match format {
        ActFormat::F32 => {
            let n = dst.len();
            for (d, b) in dst.iter_mut().zip(src[..n * 4].chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        ActFormat::Q8_0 => dequantize_row_q8_0(src, dst),
        ActFormat::Q8_1 => dequantize_row_q8_1(src, dst),
        ActFormat::Q8K => super::kquants::dequantize_row_q8k(src, dst),
    }
}

/// Splits `src` into blocks of 32 and checks `dst` holds `bytes` per block.
fn check_lengths(src: &[f32], dst: &[u8], bytes: usize, what: &str) -> usize {
    assert!(
        src.len().is_multiple_of(QK8),
        "{what}: {} elements is not a whole number of blocks",
        src.len()
    );
    let nb = src.len() / QK8;
    assert!(
        dst.len() >= nb * bytes,
        "{what}: destination holds {} bytes, need {}",
        dst.len(),
        nb * bytes
    );
    nb
}

/// Quantizes one block: returns the f32 scale (before f16 rounding) and the integer sum.
/// Rounding is to nearest, ties to even (as ggml's x86 SIMD quantizers do).
#[inline(always)]
fn quantize_block_q8(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    let x: &[f32; QK8] = x.try_into().expect("a block of 32");
    // Eight running maxima instead of one chain, so the reduction vectorises.
    let mut mx = [0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            mx[k] = mx[k].max(c[k].abs());
        }
    }
    let amax = mx.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // |x * id| <= 127 (up to rounding), so the i32 → i8 narrowing keeps every value.
    let mut qv = [0i32; QK8];
    for (o, &xi) in qv.iter_mut().zip(x) {
        *o = (xi * id).round_ties_even() as i32;
    }
    for (qi, &v) in q.iter_mut().zip(&qv) {
        *qi = v as i8 as u8;
    }
    (d, qv.iter().sum())
}

/// The block loop of both quantizers: `AB` = 34 (Q8_0) or 36 (Q8_1, with the scaled sum).
#[inline(always)]
fn quantize_blocks<const AB: usize>(src: &[f32], dst: &mut [u8], nb: usize) {
    for (x, b) in src
        .chunks_exact(QK8)
        .zip(dst[..nb * AB].chunks_exact_mut(AB))
    {
        let (d, sum) = quantize_block_q8(x, &mut b[AB - QK8..]);
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        if AB == Q8_1_BYTES {
            b[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
        }
    }
}

/// The block loop in AVX2 (bit-identical to the scalar loop: the same max, divide, multiply and
/// ties-to-even rounding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_blocks_avx2<const AB: usize>(src: &[f32], dst: &mut [u8], nb: usize) {
    use std::arch::x86_64::*;
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // packs interleaves 128-bit lanes; this restores element order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, b) in src
        .chunks_exact(QK8)
        .zip(dst[..nb * AB].chunks_exact_mut(AB))
    {
        let x: &[f32; QK8] = x.try_into().expect("a block of 32");
        // SAFETY: `x` holds 32 f32; each load reads 8 of them, unaligned.
        let v: [__m256; 4] =
            std::array::from_fn(|k| unsafe { _mm256_loadu_ps(x[8 * k..].as_ptr()) });
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
            _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|k| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v[k], id),
            );
            _mm256_cvttps_epi32(r)
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        let qs: &mut [u8; QK8] = (&mut b[AB - QK8..]).try_into().expect("32 quant bytes");
        // SAFETY: `qs` is 32 writable bytes; unaligned store.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        if AB == Q8_1_BYTES {
            b[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
        }
    }
}

fn quantize_dispatch<const AB: usize>(src: &[f32], dst: &mut [u8], what: &str) {
    let nb = check_lengths(src, dst, AB, what);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && super::simd_cap() != super::SimdLevel::Scalar
    {
        // SAFETY: AVX2, FMA and F16C were detected just above.
        unsafe { quantize_blocks_avx2::<AB>(src, dst, nb) };
        return;
    }
    quantize_blocks::<AB>(src, dst, nb)
}

/// Quantizes `src` (whole blocks of 32) to Q8_0 activation blocks in `dst`: `d = max|x| / 127`,
/// `q = round(x / d)`.
pub fn quantize_row_q8_0(src: &[f32], dst: &mut [u8]) {
    quantize_dispatch::<Q8_0_BYTES>(src, dst, "Q8_0")
}

/// Quantizes `src` (whole blocks of 32) to Q8_1 activation blocks in `dst`: as Q8_0 plus
/// `s = d * Σq` stored as f16.
pub fn quantize_row_q8_1(src: &[f32], dst: &mut [u8]) {
    quantize_dispatch::<Q8_1_BYTES>(src, dst, "Q8_1")
}

/// Reads the little-endian f16 at `b[0..2]` as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Dequantizes Q8_0 activation blocks (`dst.len()` elements, whole blocks) — used by tests and
/// reference paths.
pub fn dequantize_row_q8_0(src: &[u8], dst: &mut [f32]) {
    assert!(
        dst.len().is_multiple_of(QK8),
        "Q8_0: element count is not a whole number of blocks"
    );
    let nb = dst.len() / QK8;
    for (b, y) in src[..nb * Q8_0_BYTES]
        .chunks_exact(Q8_0_BYTES)
        .zip(dst.chunks_exact_mut(QK8))
    {
        let d = f16_at(b);
        for (yi, &q) in y.iter_mut().zip(&b[2..]) {
            *yi = q as i8 as f32 * d;
        }
    }
}

/// Dequantizes Q8_1 activation blocks (`dst.len()` elements, whole blocks); the stored sum is not
/// needed for the values.
pub fn dequantize_row_q8_1(src: &[u8], dst: &mut [f32]) {
    assert!(
        dst.len().is_multiple_of(QK8),
        "Q8_1: element count is not a whole number of blocks"
    );
    let nb = dst.len() / QK8;
    for (b, y) in src[..nb * Q8_1_BYTES]
        .chunks_exact(Q8_1_BYTES)
        .zip(dst.chunks_exact_mut(QK8))
    {
        let d = f16_at(b);
        for (yi, &q) in y.iter_mut().zip(&b[4..]) {
            *yi = q as i8 as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_roundtrip_and_zero_block() {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        x[32..].iter_mut().for_each(|v| *v = 0.0);
        let mut q = vec![0u8; 2 * Q8_0_BYTES];
        quantize_row_q8_0(&x, &mut q);
        let mut y = vec![0f32; 64];
        dequantize_row_q8_0(&q, &mut y);
        let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in x.iter().zip(&y) {
            assert!(
                (a - b).abs() <= amax / 127.0 * 0.51 + amax * 1e-3,
                "{a} vs {b}"
            );
        }
        assert!(y[32..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q8_1_sum_matches() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut q = vec![0u8; Q8_1_BYTES];
        quantize_row_q8_1(&x, &mut q);
        let d = f16_at(&q[0..2]);
        let s = f16_at(&q[2..4]);
        let sum: i32 = q[4..].iter().map(|&v| v as i8 as i32).sum();
        assert!((s - d * sum as f32).abs() <= (d * sum as f32).abs() * 2e-3 + 1e-6);
    }

    /// The dispatched (AVX2 where present) quantizers agree bit for bit with the scalar loop,
    /// ties included.
    #[test]
    fn dispatched_quantizers_match_scalar() {
        let mut x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
            .collect();
        // A block with max 127 (d = 1): exact ties at ±k.5 round to even.
        for (j, v) in x[..32].iter_mut().enumerate() {
            *v = if j == 0 {
                127.0
            } else {
                (j as f32 - 16.0) + 0.5
            };
        }
        x[64..96].iter_mut().for_each(|v| *v = 0.0);
        let nb = x.len() / QK8;
        let mut a = vec![0u8; nb * Q8_0_BYTES];
        let mut b = vec![0u8; nb * Q8_0_BYTES];
        quantize_blocks::<Q8_0_BYTES>(&x, &mut a, nb);
        quantize_row_q8_0(&x, &mut b);
        assert_eq!(a, b);
        assert_eq!(a[2 + 16] as i8, 0, "0.5 rounds to even");
        assert_eq!(a[2 + 17] as i8, 2, "1.5 rounds to even");
        let mut a = vec![0u8; nb * Q8_1_BYTES];
        let mut b = vec![0u8; nb * Q8_1_BYTES];
        quantize_blocks::<Q8_1_BYTES>(&x, &mut a, nb);
        quantize_row_q8_1(&x, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn row_bytes() {
        assert_eq!(ActFormat::Q8_0.row_bytes(4096), Some(128 * 34));
        assert_eq!(ActFormat::Q8_1.row_bytes(64), Some(72));
        assert_eq!(ActFormat::F32.row_bytes(3), Some(12));
        assert_eq!(ActFormat::Q8_0.row_bytes(33), None);
        assert_eq!(ActFormat::Q8K.row_bytes(256), Some(292));
    }
}
