//! AVX-512 VNNI register tiles for the legacy types: `R` weight rows × `T` activation rows at once,
//! two blocks per 512-bit step. Each weight block is unpacked once per step and used for all `T`
//! tokens, each activation block loaded once and used for all `R` rows. Scales come from an f16 →
//! f32 table as memory broadcasts: these loops are bound by the shuffle port, so the code avoids
//! lane shuffles wherever a load can do the work.
//!
//! All weight types are made unsigned bytes `u` with `value = (u - o) d` (`o` = 8 for Q4_0, 16 for
//! Q5_0, 128 for Q8_0 via `xor 0x80`, 0 for Q4_1/Q5_1 whose minimum is added as `m_w s_a`). Then
//! `Σ (u - o) a = vpdpbusd(-o Σ a, u, a)`, where `-o Σ a` is computed once per activation block.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use half::f16;

use pshard_model::ggml_type::GgmlType;

use super::x86::{has_vnni, load16, load32};
use super::{TileFn, TILE};

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;

/// (weight block bytes, activation block bytes, has a minimum, offset `o`)
const fn geometry(ty: u8) -> (usize, usize, bool, i8) {
    match ty {
        Q4_0 => (18, 34, false, 8),
        Q4_1 => (20, 36, true, 0),
        Q5_0 => (22, 34, false, 16),
        Q5_1 => (24, 36, true, 0),
        _ => (34, 34, false, -128),
    }
}

/// The tile kernels (`TILE` × `TILE`, and `TILE` rows × 1 token for decoding) for `ty`, if this
/// CPU has AVX-512 VNNI.
pub(crate) fn tiles(ty: GgmlType) -> Option<(TileFn, TileFn)> {
    if !has_vnni() {
        return None;
    }
    // Types with a minimum convert their weight scales with F16C (two per block: a table would
    // miss L1 too often); the others look them up (measured faster on Sapphire Rapids).
    Some(match ty {
        GgmlType::Q4_0 => (tile_fn::<Q4_0, 4, false>, tile_fn::<Q4_0, 1, false>),
        GgmlType::Q4_1 => (tile_fn::<Q4_1, 4, true>, tile_fn::<Q4_1, 1, true>),
        GgmlType::Q5_0 => (tile_fn::<Q5_0, 4, false>, tile_fn::<Q5_0, 1, false>),
        GgmlType::Q5_1 => (tile_fn::<Q5_1, 4, true>, tile_fn::<Q5_1, 1, true>),
        GgmlType::Q8_0 => (tile_fn::<Q8_0, 4, false>, tile_fn::<Q8_0, 1, false>),
        _ => return None,
    })
}

fn tile_fn<const TY: u8, const T: usize, const CVT: bool>(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    next: &[u8],
    n: usize,
    out: &mut [[f32; TILE]; TILE],
) {
    assert!(has_vnni(), "tile kernels need AVX-512 VNNI");
    assert!(
        n.is_multiple_of(32),
        "dot length {n} is not a whole number of blocks"
    );
    let (wb, ab, _, _) = geometry(TY);
    let nb = n / 32;
    assert!(
        w.iter().all(|r| r.len() >= nb * wb) && a.iter().all(|r| r.len() >= nb * ab),
        "tile rows too short"
    );
    let tab = f16_table();
    // SAFETY: AVX-512 VNNI (and the AVX2 set) was checked above.
    let res = unsafe { tile_vnni::<TY, T, CVT>(w, a, next, nb, tab) };
    for (o, row) in out.iter_mut().zip(res.iter()) {
        o[..T].copy_from_slice(row);
    }
}

/// Two weight blocks (the second may be missing) as 64 unsigned bytes in element order, block
/// `b0` in the low half. Nibbles: the 16 bytes of each block are broadcast to two 128-bit lanes
/// (`[qs0, qs0, qs1, qs1]`, loads only) and the odd lanes shifted by 4, so no lane shuffle is
/// needed. Where `b1` is missing the high half is left over: the activations there are zero.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn unpack2<const TY: u8>(b0: &[u8], b1: Option<&[u8]>) -> __m512i {
    let (qs, qh) = match TY {
        Q4_0 => (2, None),
        Q4_1 => (4, None),
        Q5_0 => (6, Some(2)),
        Q5_1 => (8, Some(4)),
        _ => {
            let q = |b: &[u8]| load32(b[2..34].try_into().expect("32 quant bytes"));
            let mut v = _mm512_castsi256_si512(q(b0));
            if let Some(b1) = b1 {
                v = _mm512_inserti64x4(v, q(b1), 1);
            }
            return _mm512_xor_si512(v, _mm512_set1_epi8(-128));
        }
    };
    let nib = |b: &[u8]| load16(b[qs..qs + 16].try_into().expect("16 nibble bytes"));
    let mut v = _mm512_broadcast_i32x4(nib(b0));
    if let Some(b1) = b1 {
        v = _mm512_mask_broadcast_i32x4(v, 0xFF00, nib(b1));
    }
    let v = _mm512_mask_srli_epi16(v, 0xFF00_FF00, v, 4);
    let z = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
    match qh {
        Some(o) => {
            let bits =
                |b: &[u8]| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 qh bytes")) as u64;
            let mask = bits(b0) | b1.map_or(0, bits) << 32;
            _mm512_or_si512(z, _mm512_maskz_set1_epi8(mask, 0x10))
        }
        None => z,
    }
}

/// Every f16 bit pattern as f32: one load converts a scale, and it broadcasts straight from
/// memory (no shuffle-port work, which bounds these loops).
fn f16_table() -> &'static [f32; 65536] {
    static TABLE: OnceLock<Box<[f32; 65536]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let v: Vec<f32> = (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect();
        v.into_boxed_slice().try_into().expect("65536 entries")
    })
}

/// `[x; 8]` in the low half, `[y; 8]` in the high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn pair(x: f32, y: f32) -> __m512 {
    _mm512_mask_broadcastss_ps(_mm512_set1_ps(x), 0xFF00, _mm_set_ss(y))
}

#[inline]
fn h(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

/// The tile over `nb` blocks: two blocks per step in 512-bit registers (low half block `b`, high
/// half block `b + 1`; an odd last block pairs with zero activations and scales). `CVT`: weight
/// scales by one F16C conversion per step instead of table lookups.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn tile_vnni<const TY: u8, const T: usize, const CVT: bool>(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    next: &[u8],
    nb: usize,
    tab: &[f32; 65536],
) -> [[f32; T]; TILE] {
    const R: usize = TILE;
    let (wb, ab, min, off) = geometry(TY);
    let aq = ab - 32;
    let offv = _mm512_set1_epi8(off);
    let f = |b: &[u8], o: usize| tab[h(b, o) as usize];
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut accm = [[_mm512_setzero_ps(); T]; R];
    let mut b = 0;
    while b < nb {
        let two = b + 1 < nb;
        // The same blocks of the next rows: one tile ahead is far enough to hide DRAM latency.
        for k in 0..R {
            let off = k * nb * wb + b * wb;
            if off < next.len() {
                _mm_prefetch::<_MM_HINT_T0>(next[off..].as_ptr().cast());
            }
        }
        let mut q = [_mm512_setzero_si512(); R];
        let mut dw = [_mm512_setzero_ps(); R];
        let mut mw = [_mm512_setzero_ps(); R];
        let mut hs = [0i16; 16];
        for r in 0..R {
            let b0 = &w[r][b * wb..(b + 1) * wb];
            let b1 = if two {
                Some(&w[r][(b + 1) * wb..(b + 2) * wb])
            } else {
                None
            };
            q[r] = unpack2::<TY>(b0, b1);
            if CVT {
                hs[2 * r] = h(b0, 0) as i16;
                hs[8 + 2 * r] = h(b0, 2) as i16;
                if let Some(b1) = b1 {
                    hs[2 * r + 1] = h(b1, 0) as i16;
                    hs[8 + 2 * r + 1] = h(b1, 2) as i16;
                }
            } else {
                dw[r] = pair(f(b0, 0), b1.map_or(0.0, |b1| f(b1, 0)));
                if min {
                    mw[r] = pair(f(b0, 2), b1.map_or(0.0, |b1| f(b1, 2)));
                }
            }
        }
        if CVT {
            // Weight scales (and minima) of the step with one conversion, then spread per row.
            let g = |i: usize| hs[i];
            let v = _mm256_setr_epi16(
                g(0),
                g(1),
                g(2),
                g(3),
                g(4),
                g(5),
                g(6),
                g(7),
                g(8),
                g(9),
                g(10),
                g(11),
                g(12),
                g(13),
                g(14),
                g(15),
            );
            let s = _mm512_cvtph_ps(v);
            let lohi = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            for r in 0..R {
                let idx = _mm512_add_epi32(lohi, _mm512_set1_epi32(2 * r as i32));
                dw[r] = _mm512_permutexvar_ps(idx, s);
                if min {
                    mw[r] = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(8)), s);
                }
            }
        }
        for t in 0..T {
            let b0 = &a[t][b * ab..(b + 1) * ab];
            let mut av =
                _mm512_castsi256_si512(load32(b0[aq..ab].try_into().expect("32 activation bytes")));
            let mut da = pair(f(b0, 0), 0.0);
            let mut sa = if min { pair(f(b0, 2), 0.0) } else { da };
            if two {
                let b1 = &a[t][(b + 1) * ab..(b + 2) * ab];
                av = _mm512_inserti64x4(
                    av,
                    load32(b1[aq..ab].try_into().expect("32 activation bytes")),
                    1,
                );
                da = pair(f(b0, 0), f(b1, 0));
                if min {
                    sa = pair(f(b0, 2), f(b1, 2));
                }
            } else {
                // Zero activations in the missing half (its weights are left-over bytes).
                av = _mm512_maskz_mov_epi64(0x0F, av);
            }
            let negoff = if off != 0 {
                let z = _mm512_setzero_si512();
                _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, offv, av))
            } else {
                _mm512_setzero_si512()
            };
            for r in 0..R {
                let p = _mm512_dpbusd_epi32(negoff, q[r], av);
                acc[r][t] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw[r], da), acc[r][t]);
                if min {
                    // m_w s_a once per block: 8 lanes of each half carry it, so scale by 1/8.
                    accm[r][t] = _mm512_fmadd_ps(mw[r], sa, accm[r][t]);
                }
            }
        }
        b += 2;
    }
    let mut res = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let mut s = _mm512_reduce_add_ps(acc[r][t]);
            if min {
                s += _mm512_reduce_add_ps(accm[r][t]) * 0.125;
            }
            res[r][t] = s;
        }
    }
    res
}
