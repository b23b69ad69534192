//! x86-64 kernels of the lookup-table types.
//!
//! Both levels turn nibbles into codebook levels with one byte shuffle (`vpshufb`, the 16-entry
//! table in every 128-bit lane).
//!
//! - AVX2 (+FMA, F16C): `vpmaddubsw(|a|, sign(K, a))`, which is `K · a` for every activation
//!   `a` in −128..=127 (|a| ≤ 128 as an unsigned byte, |K| ≤ 127, so the pair sums stay below
//!   2^15), then `vpmaddwd` with ones (IQ4_NL, MXFP4) or the sub-block scale (IQ4_XS).
//! - AVX-512 (BW, VL, VNNI): one generic loop over steps of 64 elements for every type, `R` weight
//!   rows × `T` activation rows (the decode dot is 1 × 1; the register tiles 4 × 4 and 4 × 1).
//!   Weights become unsigned bytes `u = K + 128` (a second table); per token step
//!   `Σ K a = vpdpbusd(−128 Σ a, u, a)`, the offset term computed once per step and token, so
//!   each (row, token) pair costs one `vpdpbusd`. Each 256-bit half of a step has its own scale
//!   (two 32-element blocks, or two IQ4_XS sub-blocks), applied in f32.
//!
//! The public wrappers are plain `fn`s that re-check the (cached) feature flags, so calling one on
//! a CPU without the features falls back to scalar instead of executing unsupported instructions.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::super::kquants::{q8k, QK_K};
use super::super::legacy::x86::{has_avx2, hsum, load16, load32, nibbles};
use super::super::legacy::{TileFn, TILE};
use super::{
    check_dot, e8m0_half, geometry_or_panic, iq4xs_scale, FP4, IQ4_NL_BYTES, IQ4_XS_BYTES,
    MXFP4_BYTES, NL, RUN,
};
use crate::quant::act::Q8_0_BYTES;
use crate::quant::{DotFn, SimdLevel};

/// The dot variants this CPU runs for `ty`, best first (scalar not included).
pub(super) fn variants(ty: GgmlType) -> Vec<(DotFn, SimdLevel)> {
    let mut v: Vec<(DotFn, SimdLevel)> = Vec::new();
    let (avx2, avx512): (DotFn, DotFn) = match ty {
        GgmlType::IQ4_NL => (dot_iq4_nl_avx2, dot_iq4_nl_avx512),
        GgmlType::IQ4_XS => (dot_iq4_xs_avx2, dot_iq4_xs_avx512),
        GgmlType::MXFP4 => (dot_mxfp4_avx2, dot_mxfp4_avx512),
        _ => return v,
    };
    if SimdLevel::Avx512.available() {
        v.push((avx512, SimdLevel::Avx512));
    }
    if has_avx2() {
        v.push((avx2, SimdLevel::Avx2));
    }
    v
}

/// `b[off..off + N]` as an array.
#[inline]
fn arr<const N: usize>(b: &[u8], off: usize) -> &[u8; N] {
    b[off..off + N]
        .try_into()
        .expect("block field within its block")
}

/// The codebook as 16 bytes (`bias` added to each entry, wrapping).
fn table_bytes(table: &[i8; 16], bias: u8) -> [u8; 16] {
    table.map(|v| (v as u8).wrapping_add(bias))
}

/// The little-endian f16 at `b[off..off + 2]` as f32, with F16C (the `half` crate converts in
/// software unless the whole crate is built for F16C; measured 2-3× slower dots that way).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16c(b: &[u8], off: usize) -> f32 {
    let bits = u16::from_le_bytes(*arr(b, off));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// `K · a` summed in pairs (i16 × 16): levels `k` (|k| ≤ 127) times activation quants `a`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_levels(k: __m256i, a: __m256i) -> __m256i {
    _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(k, a))
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

fn dot_iq4_nl_avx2(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot32_avx2_checked::<false>(w, a, n)
}

fn dot_mxfp4_avx2(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot32_avx2_checked::<true>(w, a, n)
}

fn dot32_avx2_checked<const MX: bool>(w: &[u8], a: &[u8], n: usize) -> f32 {
    let ty = if MX {
        GgmlType::MXFP4
    } else {
        GgmlType::IQ4_NL
    };
    let nb = check_dot(&geometry_or_panic(ty), w, a, n, ty.name());
    if !has_avx2() {
        return super::dot_scalar_32(ty, w, a, n);
    }
    // SAFETY: AVX2, FMA and F16C were detected just above.
    unsafe { dot32_avx2::<MX>(w, a, nb) }
}

/// IQ4_NL (`MX` false) or MXFP4 blocks against Q8_0 blocks, two accumulators.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot32_avx2<const MX: bool>(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let (wb, qs, table) = if MX {
        (MXFP4_BYTES, 1, &FP4)
    } else {
        (IQ4_NL_BYTES, 2, &NL)
    };
    let tab = _mm256_broadcastsi128_si256(load16(&table_bytes(table, 0)));
    let mut acc = [_mm256_setzero_ps(); 2];
    for (i, (blk, ab)) in w[..nb * wb]
        .chunks_exact(wb)
        .zip(a.chunks_exact(Q8_0_BYTES))
        .enumerate()
    {
        let k = _mm256_shuffle_epi8(tab, nibbles(arr(blk, qs)));
        let p = _mm256_madd_epi16(mul_levels(k, load32(arr(ab, 2))), _mm256_set1_epi16(1));
        let dw = if MX { e8m0_half(blk[0]) } else { f16c(blk, 0) };
        let s = _mm256_set1_ps(dw * f16c(ab, 0));
        acc[i & 1] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[i & 1]);
    }
    hsum(_mm256_add_ps(acc[0], acc[1]))
}

fn dot_iq4_xs_avx2(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = check_dot(&geometry_or_panic(GgmlType::IQ4_XS), w, a, n, "IQ4_XS");
    if !has_avx2() {
        return super::dot_iq4_xs_scalar(w, a, n);
    }
    // SAFETY: AVX2, FMA and F16C were detected just above.
    unsafe { dot_iq4_xs_avx2_imp(w, a, nb) }
}

/// IQ4_XS blocks against Q8_K blocks: per sub-block the pair sums times its integer scale
/// (`vpmaddwd`), the block's sum scaled once by `d_w d_a`.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_iq4_xs_avx2_imp(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let tab = _mm256_broadcastsi128_si256(load16(&table_bytes(&NL, 0)));
    let mut acc = _mm256_setzero_ps();
    for (blk, ab) in w[..nb * IQ4_XS_BYTES]
        .chunks_exact(IQ4_XS_BYTES)
        .zip(a.chunks_exact(q8k::BLOCK_BYTES))
    {
        let mut sumi = _mm256_setzero_si256();
        for j in 0..QK_K / RUN {
            let k = _mm256_shuffle_epi8(tab, nibbles(arr(blk, 8 + 16 * j)));
            let av = load32(arr(ab, q8k::QS + RUN * j));
            let sc = _mm256_set1_epi16(iq4xs_scale(blk, j) as i16);
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(mul_levels(k, av), sc));
        }
        let da = f32::from_le_bytes(*arr(ab, 0));
        let s = _mm256_set1_ps(f16c(blk, 0) * da);
        acc = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI: steps of 64 elements, R rows × T tokens
// ---------------------------------------------------------------------------------------------

const TY_NL: u8 = 0;
const TY_XS: u8 = 1;
const TY_MX: u8 = 2;

/// (weight block bytes, elements per block, activation block bytes)
const fn geom(ty: u8) -> (usize, usize, usize) {
    match ty {
        TY_NL => (IQ4_NL_BYTES, RUN, Q8_0_BYTES),
        TY_XS => (IQ4_XS_BYTES, QK_K, q8k::BLOCK_BYTES),
        _ => (MXFP4_BYTES, RUN, Q8_0_BYTES),
    }
}

fn ggml(ty: u8) -> GgmlType {
    match ty {
        TY_NL => GgmlType::IQ4_NL,
        TY_XS => GgmlType::IQ4_XS,
        _ => GgmlType::MXFP4,
    }
}

/// `[x; 8]` in the low half, `[y; 8]` in the high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pair(x: f32, y: f32) -> __m512 {
    _mm512_mask_broadcastss_ps(_mm512_set1_ps(x), 0xFF00, _mm_set_ss(y))
}

/// Two runs of 16 nibble bytes (`q1` may be missing) as 64 unsigned bytes `K + 128` in element
/// order, through the biased table `tab` (in every lane). The bytes are broadcast to lanes
/// `[q0, q0, q1, q1]` and the odd lanes shifted by 4, so no lane-crossing shuffle is needed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn unpack2(tab: __m512i, q0: &[u8; 16], q1: Option<&[u8; 16]>) -> __m512i {
    let mut v = _mm512_broadcast_i32x4(load16(q0));
    if let Some(q1) = q1 {
        v = _mm512_mask_broadcast_i32x4(v, 0xFF00, load16(q1));
    }
    let v = _mm512_mask_srli_epi16(v, 0xFF00_FF00, v, 4);
    _mm512_shuffle_epi8(tab, _mm512_and_si512(v, _mm512_set1_epi8(0x0F)))
}

/// Step `s` (elements `64 s..64 s + 64`) of a weight row of `nb` blocks: the biased levels and the
/// scales of its two halves (0 for a half past the row's end).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn weight_step<const TY: u8>(tab: __m512i, row: &[u8], s: usize, nb: usize) -> (__m512i, __m512) {
    let (bb, _, _) = geom(TY);
    if TY == TY_XS {
        let blk = &row[(s / 4) * bb..(s / 4 + 1) * bb];
        let j = 2 * (s % 4);
        let u = unpack2(tab, arr(blk, 8 + 16 * j), Some(arr(blk, 24 + 16 * j)));
        // Sub-blocks j and j + 1 (j even) share scales_l[j / 2] (low and high nibble) and take
        // adjacent bit pairs of scales_h.
        let d = f16c(blk, 0);
        let lo = blk[4 + j / 2] as i32;
        let hi = (u16::from_le_bytes(*arr(blk, 2)) >> (2 * j)) as i32;
        let ls0 = (lo & 0xF) | (hi & 3) << 4;
        let ls1 = (lo >> 4) | (hi & 0xC) << 2;
        return (u, pair(d * (ls0 - 32) as f32, d * (ls1 - 32) as f32));
    }
    let qs = if TY == TY_MX { 1 } else { 2 };
    let b0 = &row[2 * s * bb..(2 * s + 1) * bb];
    let (u, d1) = if 2 * s + 1 < nb {
        let b1 = &row[(2 * s + 1) * bb..(2 * s + 2) * bb];
        let d1 = if TY == TY_MX {
            e8m0_half(b1[0])
        } else {
            f16c(b1, 0)
        };
        (unpack2(tab, arr(b0, qs), Some(arr(b1, qs))), d1)
    } else {
        (unpack2(tab, arr(b0, qs), None), 0.0)
    };
    let d0 = if TY == TY_MX {
        e8m0_half(b0[0])
    } else {
        f16c(b0, 0)
    };
    (u, pair(d0, d1))
}

/// Step `s` of an activation row (partner blocks): 64 quants (zero past the row's end) and the
/// scales of the two halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn act_step<const TY: u8>(row: &[u8], s: usize, nb: usize) -> (__m512i, __m512) {
    let (_, _, ab) = geom(TY);
    if TY == TY_XS {
        let blk = &row[(s / 4) * ab..(s / 4 + 1) * ab];
        let lo = load32(arr(blk, q8k::QS + 64 * (s % 4)));
        let hi = load32(arr(blk, q8k::QS + 64 * (s % 4) + 32));
        let d = f32::from_le_bytes(*arr(blk, 0));
        return (
            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
            _mm512_set1_ps(d),
        );
    }
    let b0 = &row[2 * s * ab..(2 * s + 1) * ab];
    let v = _mm512_castsi256_si512(load32(arr(b0, 2)));
    if 2 * s + 1 < nb {
        let b1 = &row[(2 * s + 1) * ab..(2 * s + 2) * ab];
        (
            _mm512_inserti64x4(v, load32(arr(b1, 2)), 1),
            pair(f16c(b0, 0), f16c(b1, 0)),
        )
    } else {
        (_mm512_maskz_mov_epi64(0x0F, v), pair(f16c(b0, 0), 0.0))
    }
}

/// `out[r][t] = Σ w[r] · a[t]` over `nb` weight blocks for `R` rows and `T` tokens; `next` (the
/// rows computed after these, back to back) is prefetched step by step.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn steps<const TY: u8, const R: usize, const T: usize>(
    w: [&[u8]; R],
    a: [&[u8]; T],
    next: &[u8],
    nb: usize,
) -> [[f32; T]; R] {
    let (bb, qk, _) = geom(TY);
    let table = if TY == TY_MX { &FP4 } else { &NL };
    let tab = _mm512_broadcast_i32x4(load16(&table_bytes(table, 128)));
    let bias = _mm512_set1_epi8(-128);
    let n_steps = (nb * qk).div_ceil(64);
    let step_bytes = 64 * bb / qk;
    let row_bytes = nb * bb;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for s in 0..n_steps {
        for (r, row) in w.iter().enumerate() {
            // The same step of the next rows (or, without them, this row a few steps ahead).
            let (base, off) = if next.is_empty() {
                (*row, (s + 8) * step_bytes)
            } else {
                (next, r * row_bytes + s * step_bytes)
            };
            if off < base.len() {
                _mm_prefetch::<_MM_HINT_T0>(base[off..].as_ptr().cast());
            }
        }
        let mut u = [_mm512_setzero_si512(); R];
        let mut dw = [_mm512_setzero_ps(); R];
        for r in 0..R {
            (u[r], dw[r]) = weight_step::<TY>(tab, w[r], s, nb);
        }
        for t in 0..T {
            let (av, da) = act_step::<TY>(a[t], s, nb);
            let z = _mm512_setzero_si512();
            let negoff = _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, bias, av));
            for r in 0..R {
                let p = _mm512_dpbusd_epi32(negoff, u[r], av);
                acc[r][t] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw[r], da), acc[r][t]);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

fn dot_avx512<const TY: u8>(w: &[u8], a: &[u8], n: usize) -> f32 {
    let ty = ggml(TY);
    let nb = check_dot(&geometry_or_panic(ty), w, a, n, ty.name());
    if !SimdLevel::Avx512.available() {
        return match TY {
            TY_XS => dot_iq4_xs_avx2(w, a, n),
            TY_MX => dot_mxfp4_avx2(w, a, n),
            _ => dot_iq4_nl_avx2(w, a, n),
        };
    }
    // SAFETY: the AVX-512 set (F/BW/VL/VNNI) and AVX2/FMA/F16C were detected just above;
    // check_dot verified that both rows hold `nb` blocks.
    unsafe { steps::<TY, 1, 1>([w], [a], &[], nb)[0][0] }
}

fn dot_iq4_nl_avx512(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_avx512::<TY_NL>(w, a, n)
}

fn dot_iq4_xs_avx512(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_avx512::<TY_XS>(w, a, n)
}

fn dot_mxfp4_avx512(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_avx512::<TY_MX>(w, a, n)
}

/// The register tiles of `ty` (`TILE` × `TILE`, `TILE` × 1) if this CPU has AVX-512 VNNI.
pub(super) fn tiles(ty: GgmlType) -> Option<(TileFn, TileFn)> {
    if !SimdLevel::Avx512.available() {
        return None;
    }
    Some(match ty {
        GgmlType::IQ4_NL => (tile::<TY_NL, TILE>, tile::<TY_NL, 1>),
        GgmlType::IQ4_XS => (tile::<TY_XS, TILE>, tile::<TY_XS, 1>),
        GgmlType::MXFP4 => (tile::<TY_MX, TILE>, tile::<TY_MX, 1>),
        _ => return None,
    })
}

fn tile<const TY: u8, const T: usize>(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    next: &[u8],
    n: usize,
    out: &mut [[f32; TILE]; TILE],
) {
    assert!(
        SimdLevel::Avx512.available(),
        "tile kernels need AVX-512 VNNI"
    );
    let ty = ggml(TY);
    let g = geometry_or_panic(ty);
    let mut nb = 0;
    for r in w {
        nb = check_dot(&g, r, a[0], n, ty.name());
    }
    for t in &a[..T] {
        check_dot(&g, w[0], t, n, ty.name());
    }
    let at: [&[u8]; T] = std::array::from_fn(|t| a[t]);
    // SAFETY: AVX-512 VNNI (and the AVX2 set) was checked above; check_dot verified every row.
    let res = unsafe { steps::<TY, TILE, T>(*w, at, next, nb) };
    for (o, row) in out.iter_mut().zip(res.iter()) {
        o[..T].copy_from_slice(row);
    }
}
