//! x86-64 converters of the lookup-table types (AVX2 + F16C) and their direct 16-row tile loaders
//! (AVX-512): nibbles become codebook levels plus 128 with one byte shuffle (`vpshufb`, the
//! biased 16-entry table in every 128-bit lane), bit for bit the portable converter's output.
//!
//! The public wrappers are plain `fn`s so they fit [`ConvertFn`]; each re-checks the (cached)
//! feature flags, so calling one on a CPU without the features falls back to the portable
//! converter instead of executing unsupported instructions.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::super::kquants::x86::{put_group, tile16_args};
use super::super::legacy::x86::{f16c, has_avx2, load16, nibbles, store32};
use super::{
    check_row, convert_with, e8m0_half, geometry_or_panic, iq4xs_scale, FP4, NL, QK_K, RUN,
};
use crate::gemm::x86::{f16_lanes, rows16x4, store16f};
use crate::gemm::{ConvertFn, Tile16Fn};
use crate::quant::SimdLevel;

/// The SIMD converter of `ty` if this CPU runs it.
pub(super) fn converter(ty: GgmlType) -> Option<ConvertFn> {
    if !has_avx2() {
        return None;
    }
    Some(match ty {
        GgmlType::IQ4_NL => convert_iq4_nl,
        GgmlType::IQ4_XS => convert_iq4_xs,
        GgmlType::MXFP4 => convert_mxfp4,
        _ => return None,
    })
}

/// The codebook plus 128 (wrapping) as 16 bytes.
fn biased(table: &[i8; 16]) -> [u8; 16] {
    table.map(|v| (v as u8) ^ 0x80)
}

/// The codebook of `ty` (MXFP4's, or the IQ4 one).
fn table(ty: GgmlType) -> &'static [i8; 16] {
    if ty == GgmlType::MXFP4 {
        &FP4
    } else {
        &NL
    }
}

/// The blocks of `src` covering `u` as the portable converter writes them.
#[target_feature(enable = "avx2,fma,f16c")]
fn convert_avx2(ty: GgmlType, src: &[u8], u: &mut [u8], scales: &mut [f32]) {
    let g = geometry_or_panic(ty);
    let nb = check_row(&g, src.len(), u.len(), "convert");
    let tab = _mm256_broadcastsi128_si256(load16(&biased(table(ty))));
    let runs = g.qk / RUN;
    for (i, b) in src[..nb * g.bytes].chunks_exact(g.bytes).enumerate() {
        let (first, d) = match ty {
            GgmlType::IQ4_NL => (2, f16c(b, 0)),
            GgmlType::MXFP4 => (1, e8m0_half(b[0])),
            _ => (8, f16c(b, 0)),
        };
        for j in 0..runs {
            let qs: &[u8; 16] = b[first + 16 * j..first + 16 * j + 16]
                .try_into()
                .expect("16 nibble bytes");
            let v = _mm256_shuffle_epi8(tab, nibbles(qs));
            store32(&mut u[i * g.qk + RUN * j..], v);
            scales[i * runs + j] = if ty == GgmlType::IQ4_XS {
                d * iq4xs_scale(b, j) as f32
            } else {
                d
            };
        }
    }
}

macro_rules! convert_fn {
    ($name:ident, $ty:expr) => {
        fn $name(src: &[u8], u: &mut [u8], scales: &mut [f32], _mins: &mut [f32]) {
            if !has_avx2() {
                return convert_with($ty, src, u, scales);
            }
            // SAFETY: AVX2, FMA and F16C were detected just above.
            unsafe { convert_avx2($ty, src, u, scales) }
        }
    };
}
convert_fn!(convert_iq4_nl, GgmlType::IQ4_NL);
convert_fn!(convert_iq4_xs, GgmlType::IQ4_XS);
convert_fn!(convert_mxfp4, GgmlType::MXFP4);

/// The direct 16-row tile loader of `ty` if this CPU runs it (AVX-512 VNNI level).
pub(super) fn tile16(ty: GgmlType) -> Option<Tile16Fn> {
    if !SimdLevel::Avx512.available() {
        return None;
    }
    Some(match ty {
        GgmlType::IQ4_NL => tile16_iq4_nl,
        GgmlType::IQ4_XS => tile16_iq4_xs,
        GgmlType::MXFP4 => tile16_mxfp4,
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
            _min: &mut [f32],
        ) {
            let g = geometry_or_panic($ty);
            let (p, nb) = tile16_args(rows, e0, n, g.qk, g.bytes, q, scale, g.qk / RUN);
            // SAFETY: AVX-512 checked and every row holds `nb` blocks from `p[k]`, the outputs
            // 16 rows × nb blocks (tile16_args).
            unsafe { lut4_tile16($ty, &p, nb, q.as_mut_ptr(), scale.as_mut_ptr()) }
        }
    };
}
tile16_fn!(tile16_iq4_nl, GgmlType::IQ4_NL);
tile16_fn!(tile16_iq4_xs, GgmlType::IQ4_XS);
tile16_fn!(tile16_mxfp4, GgmlType::MXFP4);

/// [`e8m0_half`] of the low byte of every dword lane: `0x0020_0000 << e` for the subnormal
/// `e < 2`, else the exponent field `e − 1`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn e8m0_half_lanes(v: __m512i) -> __m512 {
    let e = _mm512_and_si512(v, _mm512_set1_epi32(0xFF));
    let sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x0020_0000), e);
    let normal = _mm512_slli_epi32::<23>(_mm512_sub_epi32(e, _mm512_set1_epi32(1)));
    let small = _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2));
    _mm512_castsi512_ps(_mm512_mask_blend_epi32(small, normal, sub))
}

/// Blocks of `ty` of 16 rows into a tile: per run of 32 the scale (IQ4_NL: `d`; MXFP4: the E8M0
/// half; IQ4_XS: `d · (ls_j − 32)`, a dword of `d | scales_h` and one of `scales_l` per row), the
/// run's 16 nibble bytes as four dwords per row: group `g < 4` the low nibbles of dword `g`,
/// group `4 + g` the high ones, each through the biased codebook.
///
/// # Safety
/// AVX-512 F/BW/VL available; `p[k]` points at `nb` blocks of `ty`; `q` holds `16 · qk · nb`
/// bytes, `scale` `16 · qk / 32 · nb` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn lut4_tile16(ty: GgmlType, p: &[*const u8; 16], nb: usize, q: *mut u8, scale: *mut f32) {
    let g = geometry_or_panic(ty);
    let tab = _mm512_broadcast_i32x4(load16(&biased(table(ty))));
    let m4 = _mm512_set1_epi8(0x0F);
    // SAFETY (every call): 16 nibble bytes of each row at `off`, run `blk` within the tile.
    let run = |off: usize, blk: usize| unsafe {
        for (k, x) in rows16x4(p, off).into_iter().enumerate() {
            let lo = _mm512_and_si512(x, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), m4);
            put_group(q, blk, k, _mm512_shuffle_epi8(tab, lo));
            put_group(q, blk, 4 + k, _mm512_shuffle_epi8(tab, hi));
        }
    };
    for i in 0..nb {
        let base = i * g.bytes;
        // SAFETY (whole block): 16-byte reads at the block's start and at its runs' nibbles
        // (2..18 of 18 bytes, 1..17 of 17, 8 + 16j .. 24 + 16j of 136), all within the block;
        // outputs of block i within the caller's buffers.
        unsafe {
            let [h, sl, ..] = rows16x4(p, base);
            match ty {
                GgmlType::IQ4_NL => {
                    store16f(scale.add(16 * i), f16_lanes::<false>(h));
                    run(base + 2, i);
                }
                GgmlType::MXFP4 => {
                    store16f(scale.add(16 * i), e8m0_half_lanes(h));
                    run(base + 1, i);
                }
                _ => {
                    let d = f16_lanes::<false>(h);
                    for j in 0..QK_K / RUN {
                        let lo = _mm512_srl_epi32(sl, _mm_cvtsi32_si128(4 * j as i32));
                        let hi = _mm512_srl_epi32(h, _mm_cvtsi32_si128(16 + 2 * j as i32));
                        let ls = _mm512_or_si512(
                            _mm512_and_si512(lo, _mm512_set1_epi32(15)),
                            _mm512_slli_epi32::<4>(_mm512_and_si512(hi, _mm512_set1_epi32(3))),
                        );
                        let s = _mm512_sub_epi32(ls, _mm512_set1_epi32(32));
                        store16f(
                            scale.add((8 * i + j) * 16),
                            _mm512_mul_ps(d, _mm512_cvtepi32_ps(s)),
                        );
                        run(base + 8 + 16 * j, 8 * i + j);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::kquants::x86::tile_check::{tile16_matches_portable, Field};
    use super::*;

    #[test]
    fn iq4_nl_tile_loader_matches_portable() {
        tile16_matches_portable(GgmlType::IQ4_NL, &[Field::F16(0)]);
    }

    #[test]
    fn iq4_xs_tile_loader_matches_portable() {
        tile16_matches_portable(GgmlType::IQ4_XS, &[Field::F16(0)]);
    }

    #[test]
    fn mxfp4_tile_loader_matches_portable() {
        tile16_matches_portable(GgmlType::MXFP4, &[Field::E8m0(0)]);
    }
}
