//! AVX-512 VNNI register tiles for Q4_K, Q5_K and Q6_K: `TILE` weight rows × `T` activation rows per
//! call (the matmul's batched path). Each weight block is unpacked (nibbles, high bits, scale
//! vectors) once and dotted with every token's Q8_K block while it sits in registers, so the
//! unpacking cost, which dominates the single dot, is shared by `T` tokens.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::simd::{bcast_u8x8_epi16, f16_1, f16x2, f32_at, load128, load256, load512};
use super::simd::{halves_epi16, prefetch_ahead, scale_index_16};
use super::{q4k, q5k, q6k, q8k, unpack_scales_mins_k4, Variant, QK_K};
use crate::quant::legacy::{TileFn, TILE};

/// The tile kernels for `ty` on this CPU (`TILE` × `TILE` tokens, and `TILE` rows × 1 token;
/// the contract of `TileFn`, `next` rows prefetched block by block alongside):
/// Q4_K, Q5_K and Q6_K with AVX-512 VNNI; `None` otherwise (callers then use the dot product).
pub fn tiles(ty: GgmlType) -> Option<(TileFn, TileFn)> {
    if !Variant::Avx512.available() {
        return None;
    }
    // One token: the row-at-a-time dot is faster than a 1-wide tile (no accumulator arrays).
    match ty {
        GgmlType::Q4_K => Some((tile_k45::<TILE, false>, one_q4k)),
        GgmlType::Q5_K => Some((tile_k45::<TILE, true>, one_q5k)),
        GgmlType::Q6_K => Some((tile_q6k::<TILE>, one_q6k)),
        _ => None,
    }
}

/// `TILE` rows × 1 token through the Q4_K AVX-512 dot product.
fn one_q4k(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    _next: &[u8],
    n: usize,
    out: &mut [[f32; TILE]; TILE],
) {
    for (o, row) in out.iter_mut().zip(w) {
        o[0] = q4k::dot_avx512(row, a[0], n);
    }
}

/// `TILE` rows × 1 token through the Q5_K AVX-512 dot product.
fn one_q5k(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    _next: &[u8],
    n: usize,
    out: &mut [[f32; TILE]; TILE],
) {
    for (o, row) in out.iter_mut().zip(w) {
        o[0] = q5k::dot_avx512(row, a[0], n);
    }
}

/// `TILE` rows × 1 token through the Q6_K AVX-512 dot product.
fn one_q6k(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    _next: &[u8],
    n: usize,
    out: &mut [[f32; TILE]; TILE],
) {
    for (o, row) in out.iter_mut().zip(w) {
        o[0] = q6k::dot_avx512(row, a[0], n);
    }
}

/// Checks a tile's arguments; returns the number of blocks. (`next` needs no check: it is only
/// prefetched, within its bounds.)
///
/// # Panics
/// If `n` is not a multiple of 256, a row is too short, or the CPU lacks AVX-512 VNNI.
fn check_tile<const T: usize>(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    n: usize,
    block_bytes: usize,
    name: &str,
) -> usize {
    assert!(
        Variant::Avx512.available(),
        "{name} tile kernels need AVX-512 VNNI"
    );
    assert!(
        n.is_multiple_of(QK_K),
        "{name} tile: n = {n} is not a multiple of {QK_K}"
    );
    let nb = n / QK_K;
    assert!(
        w.iter().all(|r| r.len() >= nb * block_bytes),
        "{name} tile: weight row shorter than {n} elements"
    );
    assert!(
        a[..T].iter().all(|r| r.len() >= nb * q8k::BLOCK_BYTES),
        "{name} tile: Q8_K activation row shorter than {n} elements"
    );
    nb
}

fn tile_k45<const T: usize, const FIVE: bool>(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    next: &[u8],
    n: usize,
    out: &mut [[f32; TILE]; TILE],
) {
    let (bb, name) = if FIVE {
        (q5k::BLOCK_BYTES, "Q5_K")
    } else {
        (q4k::BLOCK_BYTES, "Q4_K")
    };
    let nb = check_tile::<T>(w, a, n, bb, name);
    let wp: [*const u8; TILE] = std::array::from_fn(|r| w[r].as_ptr());
    let ap: [*const u8; T] = std::array::from_fn(|t| a[t].as_ptr());
    // SAFETY: AVX-512 VNNI (and the AVX2 set) was detected in check_tile, which also verified
    // that every weight row holds nb blocks of the type and the first T activation rows nb Q8_K
    // blocks.
    let res = unsafe { k45_tile::<T, FIVE>(wp, ap, next, nb) };
    for (o, r) in out.iter_mut().zip(res.iter()) {
        o[..T].copy_from_slice(r);
    }
}

fn tile_q6k<const T: usize>(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    next: &[u8],
    n: usize,
    out: &mut [[f32; TILE]; TILE],
) {
    let nb = check_tile::<T>(w, a, n, q6k::BLOCK_BYTES, "Q6_K");
    let wp: [*const u8; TILE] = std::array::from_fn(|r| w[r].as_ptr());
    let ap: [*const u8; T] = std::array::from_fn(|t| a[t].as_ptr());
    // SAFETY: AVX-512 VNNI (and the AVX2 set) was detected in check_tile, which also verified
    // that every weight row holds nb Q6_K blocks and the first T activation rows nb Q8_K blocks.
    let res = unsafe { q6k_tile::<T>(wp, ap, next, nb) };
    for (o, r) in out.iter_mut().zip(res.iter()) {
        o[..T].copy_from_slice(r);
    }
}

/// Prefetches the same block of the next tile's row (`next[off..off + bb]`, the rows the caller
/// computes next, back to back) or, when the caller gave none, the block a few blocks ahead in
/// the current row (`wb`).
#[target_feature(enable = "avx2")]
#[inline]
fn prefetch(wb: *const u8, bb: usize, next: &[u8], off: usize) {
    if next.is_empty() {
        prefetch_ahead(wb, bb);
        return;
    }
    let end = (off + bb).min(next.len());
    let mut o = off;
    while o < end {
        // A prefetch is only a hint and never faults; the address lies inside `next`.
        _mm_prefetch::<_MM_HINT_T0>(next[o..].as_ptr().cast());
        o += 64;
    }
}

/// Sums each accumulator's lanes.
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce<const T: usize>(acc: &[[__m512; T]; TILE]) -> [[f32; T]; TILE] {
    let mut out = [[0.0f32; T]; TILE];
    for (o, a) in out.iter_mut().zip(acc) {
        for (v, x) in o.iter_mut().zip(a) {
            *v = _mm512_reduce_add_ps(*x);
        }
    }
    out
}

/// # Safety
/// Each `w[r]` must hold `nb` Q4_K (Q5_K if `FIVE`) blocks and each `a[t]` `nb` Q8_K blocks;
/// AVX-512
/// F/BW/VL/VNNI, AVX2, FMA and F16C available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k45_tile<const T: usize, const FIVE: bool>(
    w: [*const u8; TILE],
    a: [*const u8; T],
    next: &[u8],
    nb: usize,
) -> [[f32; T]; TILE] {
    // Q5_K: the Q4_K layout with qh[32] inserted before the nibbles.
    let bb = if FIVE {
        q5k::BLOCK_BYTES
    } else {
        q4k::BLOCK_BYTES
    };
    let qs = if FIVE { 48 } else { 16 };
    let m4 = _mm512_set1_epi8(0x0f);
    let one = _mm512_set1_epi8(1);
    let shift = halves_epi16(0, 4);
    // Pairs (2c, 2c+1): scale indices of chunk c, and the qh bits of its two sub-blocks.
    let idx = [
        halves_epi16(0, 1),
        halves_epi16(2, 3),
        halves_epi16(4, 5),
        halves_epi16(6, 7),
    ];
    let mut acc = [[_mm512_setzero_ps(); T]; TILE];
    for i in 0..nb {
        // SAFETY: i < nb, so every block lies inside the rows the caller vouched for; all
        // offsets below stay within one block.
        unsafe {
            let mut ab = [std::ptr::null::<u8>(); T];
            let mut da = [0.0f32; T];
            for t in 0..T {
                ab[t] = a[t].add(i * q8k::BLOCK_BYTES);
                da[t] = f32_at(ab[t]);
            }
            for r in 0..TILE {
                let wb = w[r].add(i * bb);
                prefetch(wb, bb, next, r * nb * bb + i * bb);
                let (d, dmin) = f16x2(wb);
                let (sc, mn) = unpack_scales_mins_k4(std::slice::from_raw_parts(wb.add(4), 12));
                let scz = _mm512_castsi256_si512(bcast_u8x8_epi16(sc));
                let mv = _mm_cvtsi64_si128(i64::from_le_bytes(mn));
                let m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mv, mv));
                let mut q = [_mm512_setzero_si512(); 4];
                let mut s = [_mm512_setzero_si512(); 4];
                let qh = if FIVE {
                    _mm512_broadcast_i64x4(load256(wb.add(16)))
                } else {
                    _mm512_setzero_si512()
                };
                for c in 0..4 {
                    let raw = _mm512_broadcast_i64x4(load256(wb.add(qs + 32 * c)));
                    q[c] = _mm512_and_si512(_mm512_srlv_epi16(raw, shift), m4);
                    if FIVE {
                        let h = _mm512_and_si512(_mm512_srlv_epi16(qh, idx[c]), one);
                        q[c] = _mm512_or_si512(q[c], _mm512_slli_epi16(h, 4));
                    }
                    s[c] = _mm512_permutexvar_epi16(idx[c], scz);
                }
                for t in 0..T {
                    let mut sumi = _mm512_setzero_si512();
                    for c in 0..4 {
                        let av = load512(ab[t].add(q8k::QS + 64 * c));
                        sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[c], av), s[c]);
                    }
                    let pm = _mm256_madd_epi16(load256(ab[t].add(q8k::BSUMS)), m16);
                    let x = _mm512_fmadd_ps(
                        _mm512_set1_ps(d * da[t]),
                        _mm512_cvtepi32_ps(sumi),
                        acc[r][t],
                    );
                    acc[r][t] = _mm512_fnmadd_ps(
                        _mm512_set1_ps(dmin * da[t]),
                        _mm512_cvtepi32_ps(_mm512_zextsi256_si512(pm)),
                        x,
                    );
                }
            }
        }
    }
    reduce(&acc)
}

/// # Safety
/// Each `w[r]` must hold `nb` Q6_K blocks and each `a[t]` `nb` Q8_K blocks; AVX-512
/// F/BW/VL/VNNI, AVX2, FMA and F16C available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_tile<const T: usize>(
    w: [*const u8; TILE],
    a: [*const u8; T],
    next: &[u8],
    nb: usize,
) -> [[f32; T]; TILE] {
    const BB: usize = q6k::BLOCK_BYTES;
    let m4 = _mm512_set1_epi8(0x0f);
    let m3 = _mm512_set1_epi8(0x03);
    let sh12 = halves_epi16(0, 2);
    let sh34 = halves_epi16(4, 6);
    // 128-bit lane k of group g (elements 64g + 16k ..) takes scale 4g + k.
    let idx = scale_index_16();
    let mut acc = [[_mm512_setzero_ps(); T]; TILE];
    for i in 0..nb {
        // SAFETY: i < nb, so every block lies inside the rows the caller vouched for; all
        // offsets below stay within one block.
        unsafe {
            let mut ab = [std::ptr::null::<u8>(); T];
            let mut da = [0.0f32; T];
            for t in 0..T {
                ab[t] = a[t].add(i * q8k::BLOCK_BYTES);
                da[t] = f32_at(ab[t]);
            }
            for r in 0..TILE {
                let wb = w[r].add(i * BB);
                prefetch(wb, BB, next, r * nb * BB + i * BB);
                let d = f16_1(wb.add(208));
                let sc16 = _mm256_cvtepi8_epi16(load128(wb.add(192)));
                let scz = _mm512_castsi256_si512(sc16);
                let mut q = [_mm512_setzero_si512(); 4];
                for h in 0..2 {
                    let ql = load512(wb.add(64 * h));
                    let qh = _mm512_broadcast_i64x4(load256(wb.add(128 + 32 * h)));
                    let h12 = _mm512_and_si512(_mm512_srlv_epi16(qh, sh12), m3);
                    let h34 = _mm512_and_si512(_mm512_srlv_epi16(qh, sh34), m3);
                    q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(h12, 4));
                    q[2 * h + 1] = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                        _mm512_slli_epi16(h34, 4),
                    );
                }
                let mut s = [_mm512_setzero_si512(); 4];
                for g in 0..4 {
                    s[g] = _mm512_permutexvar_epi16(idx[g], scz);
                }
                for t in 0..T {
                    let mut sumi = _mm512_setzero_si512();
                    for g in 0..4 {
                        let av = load512(ab[t].add(q8k::QS + 64 * g));
                        sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[g], av), s[g]);
                    }
                    // Quants are stored +32: subtract 32 · Σ scale · bsum.
                    let offs = _mm256_madd_epi16(load256(ab[t].add(q8k::BSUMS)), sc16);
                    let offs = _mm512_zextsi256_si512(_mm256_slli_epi32(offs, 5));
                    sumi = _mm512_sub_epi32(sumi, offs);
                    acc[r][t] = _mm512_fmadd_ps(
                        _mm512_set1_ps(d * da[t]),
                        _mm512_cvtepi32_ps(sumi),
                        acc[r][t],
                    );
                }
            }
        }
    }
    reduce(&acc)
}
