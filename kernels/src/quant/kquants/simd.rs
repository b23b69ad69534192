//! x86-64 helpers shared by the AVX2 / AVX-512 dot products.

use std::arch::x86_64::*;

/// Horizontal sum of 8 f32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Converts the two little-endian f16 values at `p[0..4]` to f32.
///
/// # Safety
/// `p` must be valid for reading 4 bytes; F16C must be available.
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(super) unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    // SAFETY: the caller guarantees 4 readable bytes; unaligned read.
    let bits = unsafe { p.cast::<u32>().read_unaligned() };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// Converts the single little-endian f16 at `p` to f32.
///
/// # Safety
/// `p` must be valid for reading 2 bytes; F16C must be available.
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(super) unsafe fn f16_1(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes; unaligned read.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Reads the little-endian f32 at `p`.
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
pub(super) unsafe fn f32_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 4 readable bytes; unaligned read.
    unsafe { p.cast::<f32>().read_unaligned() }
}

/// Unaligned 32-byte load.
///
/// # Safety
/// `p` must be valid for reading 32 bytes.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn load256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Unaligned 16-byte load.
///
/// # Safety
/// `p` must be valid for reading 16 bytes.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn load128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(p.cast()) }
}

/// Unaligned 64-byte load.
///
/// # Safety
/// `p` must be valid for reading 64 bytes.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn load512(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// Shuffle mask that, applied with `_mm256_shuffle_epi8` to a register holding the same eight
/// i16 values in both 128-bit lanes, broadcasts word `lo` over the low lane and word `hi` over
/// the high lane.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn pair_mask(lo: usize, hi: usize) -> __m256i {
    let w = |k: usize| (2 * k as i16) | ((2 * k as i16 + 1) << 8);
    _mm256_set_m128i(_mm_set1_epi16(w(hi)), _mm_set1_epi16(w(lo)))
}

/// Widens 8 unsigned bytes to i16 and repeats them in both 128-bit lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn bcast_u8x8_epi16(v: [u8; 8]) -> __m256i {
    let w = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(v)));
    _mm256_broadcastsi128_si256(w)
}

/// Weight blocks are prefetched this many blocks ahead: decode streams each weight byte once,
/// and hardware prefetchers alone leave DRAM bandwidth unused (measured on Xeon: ~1.7 → ~2.5
/// GB/s per core).
pub(super) const PREFETCH_BLOCKS: usize = 8;

/// Prefetches the weight block `PREFETCH_BLOCKS` blocks after the one at `block` (of
/// `block_bytes` bytes) into L1. Consecutive calls on contiguous blocks cover every cache line.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn prefetch_ahead(block: *const u8, block_bytes: usize) {
    let ahead = block.wrapping_add(PREFETCH_BLOCKS * block_bytes);
    let mut off = 0;
    while off < block_bytes {
        // Prefetching is only a hint: addresses past the end of the row are never accessed,
        // wrapping_add keeps the pointer arithmetic defined.
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
        off += 64;
    }
}

/// Word indices for `_mm512_permutexvar_epi16` over a register whose low 16 words are the 16
/// sub-block scales of a block with 16-element sub-blocks: for the 64 elements `64g..64g+64`,
/// 128-bit lane `k` takes scale `4g + k`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn scale_index_16() -> [__m512i; 4] {
    std::array::from_fn(|g| {
        let lane = |k: usize| 0x0001_0001_0001_0001i64 * (4 * g + k) as i64;
        _mm512_set_epi64(
            lane(3),
            lane(3),
            lane(2),
            lane(2),
            lane(1),
            lane(1),
            lane(0),
            lane(0),
        )
    })
}

/// A 512-bit vector of i16 `lo` in the low 256 bits and `hi` in the high 256 bits.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn halves_epi16(lo: i16, hi: i16) -> __m512i {
    _mm512_inserti64x4(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi), 1)
}
