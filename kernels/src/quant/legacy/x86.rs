//! x86-64 converters of the legacy types (AVX2 + F16C): a block's 32 levels as unsigned bytes in
//! one register (low nibbles in the low 128-bit lane, high nibbles in the high lane, the fifth
//! bits spread from their word), bit for bit the portable converter's output.
//!
//! The public wrappers are plain `fn`s so they fit [`ConvertFn`]; each re-checks the (cached)
//! feature flags, so calling one on a CPU without the features falls back to the portable
//! converter instead of executing unsupported instructions.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::{convert_with, layout, Layout, QK};
use crate::gemm::x86::{f16_lanes, packed_tile_args, store16f, FileRows, Rows16};
use crate::gemm::{ConvertFn, PackedTile16Fn, Tile16Fn};
use crate::quant::kquants::x86::{put_group, tile16_args};
use crate::quant::SimdLevel;

/// AVX2, FMA and F16C (Haswell and later).
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The SIMD converter of `ty` if this CPU runs it.
pub(super) fn converter(ty: GgmlType) -> Option<ConvertFn> {
    if !has_avx2() {
        return None;
    }
    Some(match ty {
        GgmlType::Q4_0 => convert_q4_0,
        GgmlType::Q4_1 => convert_q4_1,
        GgmlType::Q5_0 => convert_q5_0,
        GgmlType::Q5_1 => convert_q5_1,
        GgmlType::Q8_0 => convert_q8_0,
        _ => return None,
    })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load16(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load32(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn store32(b: &mut [u8], v: __m256i) {
    let b: &mut [u8; 32] = (&mut b[..32]).try_into().expect("32 bytes");
    // SAFETY: `b` is 32 writable bytes; the store is unaligned.
    unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) }
}

/// The little-endian f16 at `b[off..off + 2]` as f32 (F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn f16c(b: &[u8], off: usize) -> f32 {
    let bits = u16::from_le_bytes([b[off], b[off + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 bytes of nibbles → 32 bytes 0..=15: low nibbles (elements 0..16) in the low lane, high
/// nibbles (elements 16..32) in the high lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn nibbles(qs: &[u8; 16]) -> __m256i {
    let x = load16(qs);
    let v = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// Bit `j` of `qh` → byte `j` = 0x10 if set, else 0 (spread the 4 bytes, test one bit each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn high_bits(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bytes = _mm256_shuffle_epi8(v, spread);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The blocks of `src` as the portable converter writes them.
#[target_feature(enable = "avx2,fma,f16c")]
fn convert_avx2(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32], l: Layout) {
    let nb = u.len() / QK;
    for (i, b) in src[..nb * l.bytes].chunks_exact(l.bytes).enumerate() {
        let v = if l.eight {
            let q: &[u8; 32] = b[l.qs..l.qs + 32].try_into().expect("32 quants");
            _mm256_xor_si256(load32(q), _mm256_set1_epi8(-128))
        } else {
            let q: &[u8; 16] = b[l.qs..l.qs + 16].try_into().expect("16 nibble bytes");
            match l.qh {
                Some(o) => {
                    let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                    _mm256_or_si256(nibbles(q), high_bits(qh))
                }
                None => nibbles(q),
            }
        };
        store32(&mut u[i * QK..], v);
        scales[i] = f16c(b, 0);
        if let Some(m) = l.m {
            mins[i] = f16c(b, m);
        }
    }
}

macro_rules! convert_fn {
    ($name:ident, $ty:expr) => {
        fn $name(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
            if !has_avx2() {
                return convert_with(src, u, scales, mins, layout($ty));
            }
            // SAFETY: AVX2, FMA and F16C were detected just above.
            unsafe { convert_avx2(src, u, scales, mins, layout($ty)) }
        }
    };
}
convert_fn!(convert_q4_0, GgmlType::Q4_0);
convert_fn!(convert_q4_1, GgmlType::Q4_1);
convert_fn!(convert_q5_0, GgmlType::Q5_0);
convert_fn!(convert_q5_1, GgmlType::Q5_1);
convert_fn!(convert_q8_0, GgmlType::Q8_0);

/// The direct 16-row tile loader of `ty` if this CPU runs it (AVX-512 VNNI level).
pub(super) fn tile16(ty: GgmlType) -> Option<Tile16Fn> {
    if !SimdLevel::Avx512.available() {
        return None;
    }
    Some(match ty {
        GgmlType::Q4_0 => tile16_q4_0,
        GgmlType::Q4_1 => tile16_q4_1,
        GgmlType::Q5_0 => tile16_q5_0,
        GgmlType::Q5_1 => tile16_q5_1,
        GgmlType::Q8_0 => tile16_q8_0,
        _ => return None,
    })
}

/// The direct 16-row tile loader of `ty`'s repacked groups ([`crate::gemm::packed`]) if this CPU
/// runs it.
pub(super) fn tile16_packed(ty: GgmlType) -> Option<PackedTile16Fn> {
    if !SimdLevel::Avx512.available() {
        return None;
    }
    Some(match ty {
        GgmlType::Q4_0 => tile16p_q4_0,
        GgmlType::Q4_1 => tile16p_q4_1,
        GgmlType::Q5_0 => tile16p_q5_0,
        GgmlType::Q8_0 => tile16p_q8_0,
        _ => return None,
    })
}

macro_rules! tile16_fn {
    ($name:ident, $ty:expr) => {
        fn $name(
            rows: &[&[u8]; 16],
            e0: usize,
            n: usize,
            q: &mut [u8],
            scale: &mut [f32],
            min: &mut [f32],
        ) {
            let l = layout($ty);
            let (p, nb) = tile16_args(rows, e0, n, QK, l.bytes, q, scale, 1);
            tile16_with(&FileRows { p, bytes: l.bytes }, nb, q, scale, min, l)
        }
    };
}
tile16_fn!(tile16_q4_0, GgmlType::Q4_0);
tile16_fn!(tile16_q4_1, GgmlType::Q4_1);
tile16_fn!(tile16_q5_0, GgmlType::Q5_0);
tile16_fn!(tile16_q5_1, GgmlType::Q5_1);
tile16_fn!(tile16_q8_0, GgmlType::Q8_0);

macro_rules! tile16p_fn {
    ($name:ident, $ty:expr) => {
        fn $name(
            group: &[u8],
            e0: usize,
            n: usize,
            q: &mut [u8],
            scale: &mut [f32],
            min: &mut [f32],
        ) {
            let (src, nb) = packed_tile_args($ty, group, e0, n, q, scale, 1);
            tile16_with(&src, nb, q, scale, min, layout($ty))
        }
    };
}
tile16p_fn!(tile16p_q4_0, GgmlType::Q4_0);
tile16p_fn!(tile16p_q4_1, GgmlType::Q4_1);
tile16p_fn!(tile16p_q5_0, GgmlType::Q5_0);
tile16p_fn!(tile16p_q8_0, GgmlType::Q8_0);

/// `nb` blocks of layout `l` of the 16 rows of `src` (checked by [`tile16_args`] or
/// [`packed_tile_args`]) into a 16-row tile (see [`Tile16Fn`]).
///
/// # Panics
/// If the type has a minimum and `min` is too small.
fn tile16_with<S: Rows16>(
    src: &S,
    nb: usize,
    q: &mut [u8],
    scale: &mut [f32],
    min: &mut [f32],
    l: Layout,
) {
    assert!(
        l.m.is_none() || min.len() >= 16 * nb,
        "tile loader: output buffers too small"
    );
    // SAFETY: AVX-512 and the shapes were checked by the caller's argument check: every row
    // holds `nb` blocks, the outputs 16 rows × nb blocks (and the minima, asserted above).
    unsafe {
        legacy_tile16(
            src,
            nb,
            q.as_mut_ptr(),
            scale.as_mut_ptr(),
            min.as_mut_ptr(),
            l,
        )
    }
}

/// # Safety
/// AVX-512 F/BW/VL available; `src` holds `nb` blocks of layout `l`; `q` holds `16 · 32 · nb`
/// bytes, `scale` (and with a minimum `min`) `16 · nb` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn legacy_tile16<S: Rows16>(
    src: &S,
    nb: usize,
    q: *mut u8,
    scale: *mut f32,
    min: *mut f32,
    l: Layout,
) {
    let m4 = _mm512_set1_epi8(0x0F);
    // Bit r of a 4-bit value → bit 4 of byte r (no two partial products meet, so no carries).
    let spread = _mm512_set1_epi32((1 << 4) | (1 << 11) | (1 << 18) | (1 << 25));
    let (nib4, bit4) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(0x1010_1010));
    let fifth = |qh: __m512i, sh: u32| {
        let x = _mm512_and_si512(_mm512_srl_epi32(qh, _mm_cvtsi32_si128(sh as i32)), nib4);
        _mm512_and_si512(_mm512_mullo_epi32(x, spread), bit4)
    };
    for i in 0..nb {
        // SAFETY (whole block): every 16-byte read lies within block i of each row (header at
        // 0, fifth bits at qh, quants at qs .. qs + 16 or, for Q8_0, qs .. qs + 32 of a 34-byte
        // block) on the repacked dword grid (d alone, or d and m in one dword; the rest from
        // the first byte after them); outputs of block i within the caller's buffers.
        unsafe {
            let out = |g: usize, v: __m512i| put_group(q, i, g, v);
            if l.m.is_some() {
                // Q4_1 and Q5_1 keep the minimum in bytes 2..4, right after d.
                let hd = src.x4(i, 0)[0];
                store16f(scale.add(i * 16), f16_lanes::<false>(hd));
                store16f(min.add(i * 16), f16_lanes::<true>(hd));
            } else {
                store16f(scale.add(i * 16), src.f16(i, 0));
            }
            if l.eight {
                let flip = _mm512_set1_epi8(-128);
                for h in 0..2 {
                    let v = src.x4(i, l.qs + 16 * h);
                    for (k, x) in v.into_iter().enumerate() {
                        out(4 * h + k, _mm512_xor_si512(x, flip));
                    }
                }
                continue;
            }
            let v = src.x4(i, l.qs);
            let qh = l.qh.map(|o| src.x4(i, o)[0]);
            for (k, x) in v.into_iter().enumerate() {
                let mut lo = _mm512_and_si512(x, m4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), m4);
                if let Some(h) = qh {
                    lo = _mm512_or_si512(lo, fifth(h, 4 * k as u32));
                    hi = _mm512_or_si512(hi, fifth(h, 16 + 4 * k as u32));
                }
                out(k, lo);
                out(4 + k, hi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::quant::kquants::x86::tile_check::{tile16_matches_portable, Field};
    use pshard_model::ggml_type::GgmlType;

    #[test]
    fn legacy_tile_loaders_match_portable() {
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0] {
            tile16_matches_portable(ty, &[Field::F16(0)]);
        }
        for ty in [GgmlType::Q4_1, GgmlType::Q5_1] {
            tile16_matches_portable(ty, &[Field::F16(0), Field::F16(2)]);
        }
    }
}
