//! x86-64 kernels of the repacked layout ([`super::packed`]): AVX-512 VNNI, one group of 16 rows
//! at a time, 1 to [`MAX_TOKENS`] tokens.
//!
//! Each level vector (4 consecutive levels of each of the 16 rows) is decoded once and fed to
//! `vpdpbusd` with each token's 4 activation bytes broadcast: lane `k` accumulates row `k`'s
//! integer sum of the sub-block directly. Per sub-block the f32 steps then run in the order of
//! [`super::dot_converted`], one row per lane.

use std::arch::x86_64::*;

use super::gemv::MAX_TOKENS;
use super::packed::{Geo, ROWS};
use super::x86::{k4_factors16, Tok};
use super::{Converter, GemmActs};

/// Loads 64 bytes at `p`.
///
/// # Safety
/// `p .. p + 64` readable; AVX-512F available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn ld(p: *const u8) -> __m512i {
    // SAFETY: 64 readable bytes (caller); unaligned load.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// The 4 activation bytes at `a` in every dword lane.
///
/// # Safety
/// `a .. a + 4` readable; AVX-512F available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bcast(a: *const i8) -> __m512i {
    // SAFETY: 4 readable bytes (caller).
    _mm512_set1_epi32(unsafe { a.cast::<i32>().read_unaligned() })
}

/// `fma(f32(i), k · d, f)`: one sub-block's scale step.
#[inline]
#[target_feature(enable = "avx512f")]
fn scale_step(f: __m512, i: __m512i, k: __m512, d: f32) -> __m512 {
    _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(i),
        _mm512_mul_ps(k, _mm512_set1_ps(d)),
        f,
    )
}

/// Outputs of the groups of `data` (repacked, `g.group_unit()` bytes per unit, `units` units per
/// row) for each token of `acts` into `outs[t]` (`16 ×` the groups each).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `data` holds `outs[0].len() / 16` groups of `conv.ty` with
/// `acts.cols` elements per row; `acts` was converted for `conv` with seeds; `outs.len()` is 1 to
/// [`MAX_TOKENS`] and every `outs[t]` has the same length, a multiple of 16.
pub(super) unsafe fn groups(
    conv: &Converter,
    g: Geo,
    acts: &GemmActs,
    data: &[u8],
    outs: &mut [&mut [f32]],
) {
    let units = acts.cols / g.elems;
    let gb = units * g.group_unit();
    macro_rules! go {
        ($f:ident) => {{
            for (i, chunk) in data.chunks_exact(gb).enumerate() {
                let p = chunk.as_ptr();
                // SAFETY: group i of `data` (caller), `units` units; tokens as the caller says.
                let o: [[f32; ROWS]; MAX_TOKENS] = unsafe {
                    match outs.len() {
                        1 => pad($f::<1>(p, units, toks::<1>(acts, conv))),
                        2 => pad($f::<2>(p, units, toks::<2>(acts, conv))),
                        3 => pad($f::<3>(p, units, toks::<3>(acts, conv))),
                        4 => pad($f::<4>(p, units, toks::<4>(acts, conv))),
                        n => {
                            unreachable!("the decode path takes 1 to {MAX_TOKENS} tokens, not {n}")
                        }
                    }
                };
                for (out, o) in outs.iter_mut().zip(&o) {
                    out[ROWS * i..ROWS * (i + 1)].copy_from_slice(o);
                }
            }
        }};
    }
    match conv.ty {
        pshard_model::ggml_type::GgmlType::Q4_K => go!(q4k),
        t => unreachable!("no repacked kernel for {t}"),
    }
}

/// `T` tokens' outputs as [`MAX_TOKENS`] (the rest zero).
fn pad<const T: usize>(o: [[f32; ROWS]; T]) -> [[f32; ROWS]; MAX_TOKENS] {
    std::array::from_fn(|t| if t < T { o[t] } else { [0.0; ROWS] })
}

/// Tokens `0 .. T` of `acts` from their first block.
fn toks<const T: usize>(acts: &GemmActs, conv: &Converter) -> [Tok; T] {
    Tok::several::<T>(acts, 0, 0, conv.sub16)
}

/// Stores `f` as 16 f32 per token.
#[inline]
#[target_feature(enable = "avx512f")]
fn store<const T: usize>(f: [__m512; T]) -> [[f32; ROWS]; T] {
    let mut o = [[0f32; ROWS]; T];
    for (o, f) in o.iter_mut().zip(f) {
        // SAFETY: 16 writable f32.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), f) };
    }
    o
}

/// Q4_K: per super-block 4 header vectors (d | dmin, scales) and 32 nibble vectors; vector
/// `4 + 8c + g` holds group `g` of sub-block `2c` (low nibbles) and of `2c + 1` (high nibbles).
/// The high nibbles are used in place (16 × the level; the sums, exact multiples of 16, are
/// shifted back), saving a shift per vector.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `p` points at a group of `units` repacked super-blocks; the
/// tokens' values, scales and sums hold `units` super-blocks.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    let m4 = _mm512_set1_epi8(0x0F);
    let mut f = [_mm512_setzero_ps(); T];
    for sb in 0..units {
        // SAFETY (whole super-block): the unit's 36 vectors lie in the group; the tokens'
        // super-block sb exists (caller).
        unsafe {
            let u = p.add(sb * 16 * 144);
            let (k, m) = k4_factors16([ld(u), ld(u.add(64)), ld(u.add(128)), ld(u.add(192))]);
            for c in 0..4 {
                // Per token: low-nibble sums (two chains), high-nibble sums (two chains).
                let mut acc = [[_mm512_setzero_si512(); 4]; T];
                for gi in 0..8 {
                    let v = ld(u.add((4 + 8 * c + gi) * 64));
                    let lo = _mm512_and_si512(v, m4);
                    let hi = _mm512_andnot_si512(m4, v);
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let a = tok[t].q.add(256 * sb + 64 * c + 4 * gi);
                        let h = gi / 4;
                        acc[h] = _mm512_dpbusd_epi32(acc[h], lo, bcast(a));
                        acc[2 + h] = _mm512_dpbusd_epi32(acc[2 + h], hi, bcast(a.add(32)));
                    }
                }
                for (t, acc) in acc.iter().enumerate() {
                    let s = 8 * sb + 2 * c;
                    let i0 = _mm512_add_epi32(acc[0], acc[1]);
                    let i1 = _mm512_srai_epi32::<4>(_mm512_add_epi32(acc[2], acc[3]));
                    f[t] = scale_step(f[t], i0, k[2 * c], *tok[t].d.add(s));
                    f[t] = _mm512_fmadd_ps(m[2 * c], _mm512_set1_ps(*tok[t].sa.add(s)), f[t]);
                    f[t] = scale_step(f[t], i1, k[2 * c + 1], *tok[t].d.add(s + 1));
                    f[t] =
                        _mm512_fmadd_ps(m[2 * c + 1], _mm512_set1_ps(*tok[t].sa.add(s + 1)), f[t]);
                }
            }
        }
    }
    store(f)
}
