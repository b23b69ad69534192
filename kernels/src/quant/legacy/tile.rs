//! AVX-512 VNNI register tiles for the legacy types: `R` weight rows × `T` activation rows at once,
//! two blocks per 512-bit step. Each weight block is unpacked once per step and used for all `T`
//! tokens, each activation block loaded once and used for all `R` rows, and the scales of the whole
//! step are converted with one `vcvtph2ps`.
//!
//! All weight types are made unsigned bytes `u` with `value = (u - o) d` (`o` = 8 for Q4_0, 16 for
//! Q5_0, 128 for Q8_0 via `xor 0x80`, 0 for Q4_1/Q5_1 whose minimum is added as `m_w s_a`). Then
//! `Σ (u - o) a = vpdpbusd(-o Σ a, u, a)`, where `-o Σ a` is computed once per activation block.

use std::arch::x86_64::*;

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
    Some(match ty {
        GgmlType::Q4_0 => (tile_fn::<Q4_0, 4>, tile_fn::<Q4_0, 1>),
        GgmlType::Q4_1 => (tile_fn::<Q4_1, 4>, tile_fn::<Q4_1, 1>),
        GgmlType::Q5_0 => (tile_fn::<Q5_0, 4>, tile_fn::<Q5_0, 1>),
        GgmlType::Q5_1 => (tile_fn::<Q5_1, 4>, tile_fn::<Q5_1, 1>),
        GgmlType::Q8_0 => (tile_fn::<Q8_0, 4>, tile_fn::<Q8_0, 1>),
        _ => return None,
    })
}

fn tile_fn<const TY: u8, const T: usize>(
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
    // SAFETY: AVX-512 VNNI (and the AVX2 set) was checked above.
    let res = unsafe { tile_vnni::<TY, T>(w, a, next, nb) };
    for (o, row) in out.iter_mut().zip(res.iter()) {
        o[..T].copy_from_slice(row);
    }
}

/// Two weight blocks (the second may be missing: zeros) as 64 unsigned bytes in element order,
/// block `b0` in the low half. Nibbles: `[qs0 | qs1]` and the same shifted by 4 form the lanes
/// `[lo0, lo1, hi0, hi1]`, reordered to `[lo0, hi0, lo1, hi1]` with one lane shuffle.
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
            let hi = b1.map_or(_mm256_setzero_si256(), q);
            let v = _mm512_inserti64x4(_mm512_castsi256_si512(q(b0)), hi, 1);
            return _mm512_xor_si512(v, _mm512_set1_epi8(-128));
        }
    };
    let nib = |b: &[u8]| load16(b[qs..qs + 16].try_into().expect("16 nibble bytes"));
    let x = _mm256_inserti128_si256(
        _mm256_castsi128_si256(nib(b0)),
        b1.map_or(_mm_setzero_si128(), nib),
        1,
    );
    let z = _mm512_inserti64x4(_mm512_castsi256_si512(x), _mm256_srli_epi16(x, 4), 1);
    let z = _mm512_and_si512(
        _mm512_shuffle_i64x2(z, z, 0b11_01_10_00),
        _mm512_set1_epi8(0x0F),
    );
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

/// `hs[o..o + 16]` as a vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn halves(hs: &[u16; 32], o: usize) -> __m256i {
    let g = |i: usize| hs[o + i] as i16;
    _mm256_setr_epi16(
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
    )
}

#[inline]
fn h(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

/// The tile over `nb` blocks: two blocks per step in 512-bit registers (low half block `b`, high
/// half block `b + 1`; an odd last block pairs with zeros).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn tile_vnni<const TY: u8, const T: usize>(
    w: &[&[u8]; TILE],
    a: &[&[u8]; TILE],
    next: &[u8],
    nb: usize,
) -> [[f32; T]; TILE] {
    const R: usize = TILE;
    let (wb, ab, min, off) = geometry(TY);
    let aq = ab - 32;
    let offv = _mm512_set1_epi8(off);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut accm = [[_mm512_setzero_ps(); T]; R];
    // Index vector broadcasting element 0 to the low 8 lanes and element 1 to the high 8.
    let pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
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
        // Scales of this step as f16: [d_w r b, d_w r b+1] for each row, then the activations;
        // for types with a minimum also m_w and s_a, in a second group of 16.
        let mut hs = [0u16; 32];
        let mut q = [_mm512_setzero_si512(); R];
        for r in 0..R {
            let b0 = &w[r][b * wb..(b + 1) * wb];
            hs[2 * r] = h(b0, 0);
            if min {
                hs[16 + 2 * r] = h(b0, 2);
            }
            let b1 = if two {
                let b1 = &w[r][(b + 1) * wb..(b + 2) * wb];
                hs[2 * r + 1] = h(b1, 0);
                if min {
                    hs[16 + 2 * r + 1] = h(b1, 2);
                }
                Some(b1)
            } else {
                // Missing half: the activations are zero there, so the weights do not matter.
                None
            };
            q[r] = unpack2::<TY>(b0, b1);
        }
        let mut av = [_mm512_setzero_si512(); T];
        let mut negoff = [_mm512_setzero_si512(); T];
        for t in 0..T {
            let b0 = &a[t][b * ab..(b + 1) * ab];
            hs[8 + 2 * t] = h(b0, 0);
            if min {
                hs[24 + 2 * t] = h(b0, 2);
            }
            let lo = load32(b0[aq..ab].try_into().expect("32 activation bytes"));
            let hi = if two {
                let b1 = &a[t][(b + 1) * ab..(b + 2) * ab];
                hs[8 + 2 * t + 1] = h(b1, 0);
                if min {
                    hs[24 + 2 * t + 1] = h(b1, 2);
                }
                load32(b1[aq..ab].try_into().expect("32 activation bytes"))
            } else {
                _mm256_setzero_si256()
            };
            av[t] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            if off != 0 {
                let z = _mm512_setzero_si512();
                negoff[t] = _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, offv, av[t]));
            }
        }
        // Built in registers (a vector load of the scalar stores would stall store forwarding).
        let s0 = _mm512_cvtph_ps(halves(&hs, 0));
        let s1 = if min {
            _mm512_cvtph_ps(halves(&hs, 16))
        } else {
            s0
        };
        let mut dw = [_mm512_setzero_ps(); R];
        let mut mw = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let idx = _mm512_add_epi32(pair, _mm512_set1_epi32(2 * r as i32));
            dw[r] = _mm512_permutexvar_ps(idx, s0);
            if min {
                mw[r] = _mm512_permutexvar_ps(idx, s1);
            }
        }
        for t in 0..T {
            let idx = _mm512_add_epi32(pair, _mm512_set1_epi32(8 + 2 * t as i32));
            let da = _mm512_permutexvar_ps(idx, s0);
            let sa = if min {
                _mm512_permutexvar_ps(idx, s1)
            } else {
                da
            };
            for r in 0..R {
                let p = _mm512_dpbusd_epi32(negoff[t], q[r], av[t]);
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
