//! x86-64 kernels of the repacked layout ([`super::packed`]) at the AVX2 level: one group of 16
//! rows at a time as two halves of 8 (the low and high 256 bits of each stored 64-byte vector),
//! 1 to [`MAX_TOKENS`] tokens, for the types of [`supports`].
//!
//! A stored vector holds 4 consecutive levels of each row, so the half's 32 bytes are 8 rows'
//! levels, one row per dword lane: `vpmaddubsw` with a token's 4 activation bytes broadcast gives
//! each row's two pair sums in its lane, with no horizontal reduction and no copy of the block
//! scales (16 rows' f16 scales lie side by side in the group). The products of a sub-block's
//! groups are added as i16 as far as they stay below 2^15 (the run of `Converter::avx2_run`:
//! Q4_0, Q4_1, Q4_K a whole block of 8 groups, Q5_0, Q5_K four, Q6_K two), then widened by
//! `vpmaddwd` with ones; the offset's seed (`−offset · Σa`) is added per sub-block and the f32
//! steps run in the order of [`super::dot_converted`], one row per lane, the two halves' chains
//! side by side — the bits of every other path. Q8_0 multiplies its signed quants (magnitude by
//! sign), a group at a time.
//!
//! Q4_0/Q4_1 per block and half: 4 nibble vectors, 12 operations to split them, 8 products, 8
//! additions; the file layout's kernel (`gemm::gemv_avx2`) spends about twice that per row and
//! block on pair loads, reductions and copying each block's scale. One thread, 512 × 4096
//! in L2 (gemv bench), ns per row, file layout → repacked: Q4_0 142 → 55, Q4_1 146 → 65, Q5_0
//! 222 → 113, Q8_0 169 → 81, Q4_K 112 → 76, Q5_K 154 → 143 (its fifth bits: a shift, a mask and
//! an or per vector and sub-block), Q6_K 169 → 106.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::gemv::MAX_TOKENS;
use super::packed::{Geo, ROWS};
use super::x86::Tok;
use super::{Converter, GemmActs};

/// Whether the AVX2 kernels decode repacked groups of `ty`. (The other repacked types stay in
/// the file's layout at the AVX2 level: `packed::computes_repacked`.)
pub(crate) fn supports(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q8_0
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// 32 bytes at `p`.
///
/// # Safety
/// `p .. p + 32` readable; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn ld(p: *const u8) -> __m256i {
    // SAFETY: 32 readable bytes (caller); unaligned load.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// The 8 f16 at `p` as f32.
///
/// # Safety
/// `p .. p + 16` readable; AVX2 and F16C available.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16x8(p: *const u8) -> __m256 {
    // SAFETY: 16 readable bytes (caller); unaligned load.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

/// The 4 activation bytes at `a` in every dword lane.
///
/// # Safety
/// `a .. a + 4` readable; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast(a: *const i8) -> __m256i {
    // SAFETY: 4 readable bytes (caller).
    _mm256_set1_epi32(unsafe { a.cast::<i32>().read_unaligned() })
}

/// `fma(f32(i), k · d, f)`: one sub-block's scale step.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scale_step(f: __m256, i: __m256i, k: __m256, d: f32) -> __m256 {
    _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(i),
        _mm256_mul_ps(k, _mm256_set1_ps(d)),
        f,
    )
}

/// Outputs of the groups of `data` (repacked, `g.group_unit()` bytes per unit) for each token
/// of `acts` into `outs[t]` (`16 ×` the groups each).
///
/// # Safety
/// AVX2, FMA and F16C available; `conv.ty` one of [`supports`]; `data` holds
/// `outs[0].len() / 16` groups of `conv.ty` with `acts.cols` elements per row; `acts` was
/// converted for `conv` with seeds; `outs.len()` is 1 to [`MAX_TOKENS`] and every `outs[t]` has
/// the same length, a multiple of 16.
pub(super) unsafe fn groups(
    conv: &Converter,
    g: Geo,
    acts: &GemmActs,
    data: &[u8],
    outs: &mut [&mut [f32]],
) {
    let units = acts.cols / g.elems;
    let gb = units * g.group_unit();
    // SAFETY (each call of a kernel): a group of `data` (caller) of `units` units; the tokens
    // as the caller says.
    macro_rules! go {
        ($f:ident) => {
            match outs.len() {
                1 => each(data, gb, outs, |p| unsafe {
                    $f::<1>(p, units, toks(acts, conv))
                }),
                2 => each(data, gb, outs, |p| unsafe {
                    $f::<2>(p, units, toks(acts, conv))
                }),
                3 => each(data, gb, outs, |p| unsafe {
                    $f::<3>(p, units, toks(acts, conv))
                }),
                4 => each(data, gb, outs, |p| unsafe {
                    $f::<4>(p, units, toks(acts, conv))
                }),
                n => unreachable!("the decode path takes 1 to {MAX_TOKENS} tokens, not {n}"),
            }
        };
    }
    match conv.ty {
        GgmlType::Q4_0 => go!(q4_0),
        GgmlType::Q4_1 => go!(q4_1),
        GgmlType::Q5_0 => go!(q5_0),
        GgmlType::Q8_0 => go!(q8_0),
        GgmlType::Q4_K => go!(q4k),
        GgmlType::Q5_K => go!(q5k),
        GgmlType::Q6_K => go!(q6k),
        t => unreachable!("no AVX2 repacked kernel for {t}"),
    }
}

/// Runs `kernel` on each group (`gb` bytes) of `data`, its `T` tokens' 16 outputs into `outs`.
#[inline(always)]
fn each<const T: usize>(
    data: &[u8],
    gb: usize,
    outs: &mut [&mut [f32]],
    kernel: impl Fn(*const u8) -> [[f32; ROWS]; T],
) {
    for (i, chunk) in data.chunks_exact(gb).enumerate() {
        let o = kernel(chunk.as_ptr());
        for (out, o) in outs.iter_mut().zip(&o) {
            out[ROWS * i..ROWS * (i + 1)].copy_from_slice(o);
        }
    }
}

/// Tokens `0 .. T` of `acts` from their first block.
fn toks<const T: usize>(acts: &GemmActs, conv: &Converter) -> [Tok; T] {
    Tok::several::<T>(acts, 0, 0, conv.sub16)
}

/// Stores the halves' accumulators `f` as 16 f32 per token.
#[inline]
#[target_feature(enable = "avx2")]
fn store<const T: usize>(f: [[__m256; 2]; T]) -> [[f32; ROWS]; T] {
    let mut o = [[0f32; ROWS]; T];
    for (o, f) in o.iter_mut().zip(f) {
        // SAFETY: 16 writable f32.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), f[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), f[1]);
        }
    }
    o
}

/// Which legacy type a [`legacy`] instance decodes.
const L40: u8 = 0;
const L41: u8 = 1;
const L50: u8 = 2;
const L80: u8 = 3;

/// Q4_0 blocks: the 16 rows' f16 `d`, 4 nibble vectors (vector `g`: elements `4g ..` low,
/// `16 + 4g ..` high).
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L40, T>(p, units, tok) }
}

/// Q4_1 blocks: the `d | m` vector, 4 nibble vectors as Q4_0's.
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L41, T>(p, units, tok) }
}

/// Q5_0 blocks: the f16 `d`, the fifth-bit vector, 4 nibble vectors as Q4_0's.
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L50, T>(p, units, tok) }
}

/// Q8_0 blocks: the f16 `d`, 8 vectors of quants (stored + 128).
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L80, T>(p, units, tok) }
}

/// The legacy types' blocks of 32 (one sub-block each), per block and half: the integer sum,
/// then `fma(f32(i), d · d_a, f)` and for Q4_1 `fma(m, s_a, f)`. Q4_0/Q4_1: the 8 groups'
/// products summed as i16 (levels ≤ 15, activations ≤ 127: 8 · 2 · 15 · 127 < 2^15); Q5_0: the
/// low and the high nibbles' 4 groups each (levels ≤ 31), the fifth bits spread to bit 4 of
/// each byte by a multiply (bit `r` of a 4-bit value times `2^4 + 2^11 + 2^18 + 2^25` lands on
/// bit 4 of byte `r`, no two partial products meeting); Q8_0: its signed quants (−128 included)
/// give their magnitude, the activations (never −128 for Q8_0 partners) their sign, each group
/// widened at once (2 · 128 · 127 < 2^15). The offsets of Q4_0 and Q5_0 are their seeds; Q8_0's
/// products are of the signed quants.
///
/// # Safety
/// AVX2, FMA and F16C available; `p` points at a group of `units` repacked blocks of the type;
/// the tokens' values, scales, sums (Q4_1) and seeds (Q4_0, Q5_0) hold `units` blocks.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy<const L: u8, const T: usize>(
    p: *const u8,
    units: usize,
    tok: [Tok; T],
) -> [[f32; ROWS]; T] {
    // Group unit bytes, bytes before the vectors (the f16 scales), the first nibble vector.
    let (ub, head, first) = match L {
        L40 => (16 * 18, 32, 0),
        L41 => (16 * 20, 0, 1),
        L50 => (16 * 22, 32, 1),
        _ => (16 * 34, 32, 0),
    };
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (nib4, bit4) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(0x1010_1010));
    let spread = _mm256_set1_epi32((1 << 4) | (1 << 11) | (1 << 18) | (1 << 25));
    // Bits `sh .. sh + 4` of each row's fifth-bit word at bit 4 of its bytes 0..4.
    let fifth = |qh: __m256i, sh: i32| {
        let x = _mm256_and_si256(_mm256_srl_epi32(qh, _mm_cvtsi32_si128(sh)), nib4);
        _mm256_and_si256(_mm256_mullo_epi32(x, spread), bit4)
    };
    let zi = _mm256_setzero_si256();
    let z = _mm256_setzero_ps();
    let mut f = [[z; 2]; T];
    for b in 0..units {
        // SAFETY (whole block): the unit's vectors and scales lie in the group; block b of every
        // token exists with its sums or seeds (caller).
        unsafe {
            let u = p.add(b * ub);
            let (k, m) = if L == L41 {
                let dm = [ld(u), ld(u.add(32))];
                let lo = |v: __m256i| super::gemv_avx2::f16_lanes8::<false>(v);
                let hi = |v: __m256i| super::gemv_avx2::f16_lanes8::<true>(v);
                ([lo(dm[0]), lo(dm[1])], [hi(dm[0]), hi(dm[1])])
            } else {
                ([f16x8(u), f16x8(u.add(16))], [z, z])
            };
            // Per token and half: i16 sums (the low nibbles', and for Q5_0 the high ones'
            // apart), or for Q8_0 the i32 sum.
            let mut acc = [[[zi; 2]; 2]; T];
            if L == L80 {
                for g in 0..8 {
                    let v = u.add(head + 64 * g);
                    let flip = _mm256_set1_epi8(-128);
                    let w = [
                        _mm256_xor_si256(ld(v), flip),
                        _mm256_xor_si256(ld(v.add(32)), flip),
                    ];
                    let mag = [_mm256_abs_epi8(w[0]), _mm256_abs_epi8(w[1])];
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let a = bcast(tok[t].q.add(32 * b + 4 * g));
                        for h in 0..2 {
                            let s = _mm256_maddubs_epi16(mag[h], _mm256_sign_epi8(a, w[h]));
                            acc[0][h] = _mm256_add_epi32(acc[0][h], _mm256_madd_epi16(s, ones));
                        }
                    }
                }
            } else {
                let qh = if L == L50 {
                    [ld(u.add(head)), ld(u.add(head + 32))]
                } else {
                    [zi, zi]
                };
                for g in 0..4 {
                    let v = u.add(head + 64 * (first + g));
                    let v = [ld(v), ld(v.add(32))];
                    let mut lo = [_mm256_and_si256(v[0], m4), _mm256_and_si256(v[1], m4)];
                    let mut hi = [
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v[0]), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v[1]), m4),
                    ];
                    if L == L50 {
                        for h in 0..2 {
                            lo[h] = _mm256_or_si256(lo[h], fifth(qh[h], 4 * g as i32));
                            hi[h] = _mm256_or_si256(hi[h], fifth(qh[h], 16 + 4 * g as i32));
                        }
                    }
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let a = tok[t].q.add(32 * b + 4 * g);
                        let (al, ah) = (bcast(a), bcast(a.add(16)));
                        for h in 0..2 {
                            let (pl, ph) = (
                                _mm256_maddubs_epi16(lo[h], al),
                                _mm256_maddubs_epi16(hi[h], ah),
                            );
                            if L == L50 {
                                acc[0][h] = _mm256_add_epi16(acc[0][h], pl);
                                acc[1][h] = _mm256_add_epi16(acc[1][h], ph);
                            } else {
                                acc[0][h] = _mm256_add_epi16(acc[0][h], _mm256_add_epi16(pl, ph));
                            }
                        }
                    }
                }
            }
            for (t, (f, acc)) in f.iter_mut().zip(&acc).enumerate() {
                let d = *tok[t].d.add(b);
                let seed = if L == L40 || L == L50 {
                    _mm256_set1_epi32(*tok[t].seed.add(b))
                } else {
                    zi
                };
                for h in 0..2 {
                    let i = match L {
                        L80 => acc[0][h],
                        L50 => _mm256_add_epi32(
                            _mm256_madd_epi16(acc[0][h], ones),
                            _mm256_madd_epi16(acc[1][h], ones),
                        ),
                        _ => _mm256_madd_epi16(acc[0][h], ones),
                    };
                    f[h] = scale_step(f[h], _mm256_add_epi32(i, seed), k[h], d);
                    if L == L41 {
                        f[h] = _mm256_fmadd_ps(m[h], _mm256_set1_ps(*tok[t].sa.add(b)), f[h]);
                    }
                }
            }
        }
    }
    store(f)
}

/// The Q4_K/Q5_K factors of one half's 8 rows from a repacked super-block's first 4 vectors
/// (`u`: the unit; `d | dmin`, then the scales and minima re-packed by `packed::k4_fields`): per
/// sub-block the scale `d · sc` and the minimum `−dmin · m`, the portable converter's products.
/// Fields 0–14 come out of their dword with a shift, a mask or both; field 15 (minimum 7) is
/// gathered from bits 24, 25 of the three dwords.
///
/// # Safety
/// AVX2 and F16C available; the unit's first 4 stored vectors readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_fields8(u: *const u8, half: usize) -> ([__m256; 8], [__m256; 8]) {
    use super::gemv_avx2::f16_lanes8;
    use super::packed::k4_shift;
    // SAFETY: the four vectors' halves (caller).
    let (hd, w) = unsafe {
        let at = |i: usize| ld(u.add(64 * i + 32 * half));
        (at(0), [at(1), at(2), at(3)])
    };
    let d = f16_lanes8::<false>(hd);
    let dmin = _mm256_xor_ps(f16_lanes8::<true>(hd), _mm256_set1_ps(-0.0));
    let m6 = _mm256_set1_epi32(63);
    let sr = |v: __m256i, sh: usize| _mm256_srl_epi32(v, _mm_cvtsi32_si128(sh as i32));
    let field = |n: usize| {
        let v = if n == 15 {
            let part =
                |v: __m256i, sh: usize, m: i32| _mm256_and_si256(sr(v, sh), _mm256_set1_epi32(m));
            _mm256_or_si256(
                _mm256_or_si256(part(w[0], 24, 3), part(w[1], 22, 12)),
                part(w[2], 20, 48),
            )
        } else {
            let (v, p) = (w[n / 5], n % 5);
            match p {
                0 => _mm256_and_si256(v, m6),
                4 => sr(v, k4_shift(4)),
                _ => _mm256_and_si256(sr(v, k4_shift(p)), m6),
            }
        };
        _mm256_cvtepi32_ps(v)
    };
    let mut k = [_mm256_setzero_ps(); 8];
    let mut m = [_mm256_setzero_ps(); 8];
    for j in 0..8 {
        k[j] = _mm256_mul_ps(d, field(j));
        m[j] = _mm256_mul_ps(dmin, field(8 + j));
    }
    (k, m)
}

/// The bytes where sub-block `s`'s fifth bit (bit `s` of each Q5_K high-bit byte `qh`) is set,
/// as 16 (bit 4), else 0: a 16-bit shift moving bit `s` to bit 4 within each byte, then a mask.
#[inline]
#[target_feature(enable = "avx2")]
fn fifth_k(qh: __m256i, s: usize) -> __m256i {
    let v = if s <= 4 {
        _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - s as i32))
    } else {
        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s as i32 - 4))
    };
    _mm256_and_si256(v, _mm256_set1_epi8(0x10))
}

/// Q4_K: per super-block the header vectors (`d | dmin`, the re-packed scales and minima) and
/// 32 nibble vectors; vector `4 + 8c + g` holds group `g` of sub-block `2c` (low nibbles) and
/// of `2c + 1` (high nibbles).
///
/// # Safety
/// As [`k45`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { k45::<false, T>(p, units, tok) }
}

/// Q5_K: Q4_K's header (4 vectors), 8 vectors of fifth bits (vector `4 + g`: bytes `4g .. 4g + 4`
/// of each row's 32: bit `2c` the fifth bit of sub-block `2c`'s element, bit `2c + 1` of
/// `2c + 1`'s), then the nibbles as Q4_K's (vector `12 + 8c + g`).
///
/// # Safety
/// As [`k45`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5k<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { k45::<true, T>(p, units, tok) }
}

/// Q4_K (`FIVE` false) or Q5_K super-blocks ([`q4k`], [`q5k`]), per sub-block pair `2c`,
/// `2c + 1` and half: the 8 groups' products of each sub-block summed as i16 (Q4_K's levels
/// ≤ 15 with activations ≥ −128: 8 · 2 · 15 · 128 < 2^15; Q5_K's ≤ 31: 4 groups at a time),
/// widened, then the scale's and the minimum's f32 steps of `2c`, then of `2c + 1`.
///
/// # Safety
/// AVX2, FMA and F16C available; `p` points at a group of `units` repacked super-blocks of the
/// type; the tokens' values, scales and sums hold `units` super-blocks.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k45<const FIVE: bool, const T: usize>(
    p: *const u8,
    units: usize,
    tok: [Tok; T],
) -> [[f32; ROWS]; T] {
    // Group unit bytes; the first nibble vector.
    let (ub, first) = if FIVE { (16 * 176, 12) } else { (16 * 144, 4) };
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let zi = _mm256_setzero_si256();
    let mut f = [[_mm256_setzero_ps(); 2]; T];
    for sb in 0..units {
        // SAFETY (whole super-block): the unit's vectors lie in the group; the tokens'
        // super-block sb exists (caller).
        unsafe {
            let u = p.add(sb * ub);
            let fac = [k4_fields8(u, 0), k4_fields8(u, 1)];
            for c in 0..4 {
                // Per token, sub-block (2c, 2c + 1), run of 4 groups (Q5_K) and half: i16 sums.
                let mut acc = [[[[zi; 2]; 2]; 2]; T];
                for g in 0..8 {
                    let v = u.add((first + 8 * c + g) * 64);
                    for h in 0..2 {
                        let x = ld(v.add(32 * h));
                        let mut lo = _mm256_and_si256(x, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
                        if FIVE {
                            let qh = ld(u.add((4 + g) * 64 + 32 * h));
                            lo = _mm256_or_si256(lo, fifth_k(qh, 2 * c));
                            hi = _mm256_or_si256(hi, fifth_k(qh, 2 * c + 1));
                        }
                        let r = if FIVE { g / 4 } else { 0 };
                        for (t, acc) in acc.iter_mut().enumerate() {
                            let a = tok[t].q.add(256 * sb + 64 * c + 4 * g);
                            let (pl, ph) = (
                                _mm256_maddubs_epi16(lo, bcast(a)),
                                _mm256_maddubs_epi16(hi, bcast(a.add(32))),
                            );
                            acc[0][r][h] = _mm256_add_epi16(acc[0][r][h], pl);
                            acc[1][r][h] = _mm256_add_epi16(acc[1][r][h], ph);
                        }
                    }
                }
                for (t, (f, acc)) in f.iter_mut().zip(&acc).enumerate() {
                    for (i, acc) in acc.iter().enumerate() {
                        let s = 2 * c + i;
                        let (d, sa) = (*tok[t].d.add(8 * sb + s), *tok[t].sa.add(8 * sb + s));
                        for h in 0..2 {
                            let mut sum = _mm256_madd_epi16(acc[0][h], ones);
                            if FIVE {
                                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(acc[1][h], ones));
                            }
                            let (k, m) = (&fac[h].0, &fac[h].1);
                            f[h] = scale_step(f[h], sum, k[s], d);
                            f[h] = _mm256_fmadd_ps(m[s], _mm256_set1_ps(sa), f[h]);
                        }
                    }
                }
            }
        }
    }
    store(f)
}

/// Q6_K: per super-block the 16 rows' f16 `d`, 4 vectors of signed scales, then per half `h`
/// and step `j` three vectors (`packed::q6k_order`): the low nibbles of `ql` dwords `16h + j`
/// and `16h + 8 + j` and the high bit pairs of `qh` dword `8h + j`, giving elements
/// `128h + 4j + 32q ..` (`q` = 0..4) of sub-blocks `8h + 2q + j / 4`. The products of steps
/// `j` and `j + 1` (one sub-block) are summed as i16 (levels ≤ 63: 2 · 2 · 63 · 128 < 2^15),
/// widened; the 8 sub-blocks' sums of a half wait in memory for the f32 steps in order.
///
/// # Safety
/// AVX2, FMA and F16C available; `p` points at a group of `units` repacked super-blocks; the
/// tokens' values, scales and seeds hold `units` super-blocks.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let ones = _mm256_set1_epi16(1);
    let zi = _mm256_setzero_si256();
    let mut f = [[_mm256_setzero_ps(); 2]; T];
    let lo = |x: __m256i| _mm256_and_si256(x, m4);
    let hi = |x: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
    let top = |x: __m256i| _mm256_and_si256(x, m30);
    for sb in 0..units {
        // SAFETY (whole super-block): the unit's 52 vectors and 32 bytes of scales lie in the
        // group; the tokens' super-block sb exists, with seeds (caller).
        unsafe {
            let u = p.add(sb * 16 * 210);
            let d = [f16x8(u), f16x8(u.add(16))];
            let u = u.add(32);
            for hh in 0..2 {
                // Per token, sub-block and half: the integer sums.
                let mut sums = [[[zi; 2]; 8]; T];
                for jp in 0..4 {
                    let mut acc = [[[zi; 2]; 4]; T];
                    for j in 2 * jp..2 * jp + 2 {
                        let at = u.add((4 + 24 * hh + 3 * j) * 64);
                        for h in 0..2 {
                            let (a, b, qh) = (
                                ld(at.add(32 * h)),
                                ld(at.add(64 + 32 * h)),
                                ld(at.add(128 + 32 * h)),
                            );
                            let q = [
                                _mm256_or_si256(lo(a), top(_mm256_slli_epi16::<4>(qh))),
                                _mm256_or_si256(lo(b), top(_mm256_slli_epi16::<2>(qh))),
                                _mm256_or_si256(hi(a), top(qh)),
                                _mm256_or_si256(hi(b), top(_mm256_srli_epi16::<2>(qh))),
                            ];
                            for (t, acc) in acc.iter_mut().enumerate() {
                                let x = tok[t].q.add(256 * sb + 128 * hh + 4 * j);
                                for (i, q) in q.into_iter().enumerate() {
                                    let s = _mm256_maddubs_epi16(q, bcast(x.add(32 * i)));
                                    acc[i][h] = _mm256_add_epi16(acc[i][h], s);
                                }
                            }
                        }
                    }
                    for (sums, acc) in sums.iter_mut().zip(&acc) {
                        for (i, acc) in acc.iter().enumerate() {
                            let s = &mut sums[2 * i + jp / 2];
                            for h in 0..2 {
                                let w = _mm256_madd_epi16(acc[h], ones);
                                s[h] = _mm256_add_epi32(s[h], w);
                            }
                        }
                    }
                }
                for s in 0..8 {
                    let m = 8 * hh + s;
                    // Scale byte m, sign-extended: byte m % 4 of dword m / 4 (half h: its 32 bytes).
                    let sh = _mm_cvtsi32_si128(24 - 8 * (m % 4) as i32);
                    let k = |h: usize| {
                        let v = _mm256_sll_epi32(ld(u.add((m / 4) * 64 + 32 * h)), sh);
                        _mm256_mul_ps(d[h], _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(v)))
                    };
                    let k = [k(0), k(1)];
                    for (t, (f, sums)) in f.iter_mut().zip(&sums).enumerate() {
                        let seed = _mm256_set1_epi32(*tok[t].seed.add(16 * sb + m));
                        let da = *tok[t].d.add(8 * sb + m / 2);
                        for h in 0..2 {
                            f[h] = scale_step(f[h], _mm256_add_epi32(sums[s][h], seed), k[h], da);
                        }
                    }
                }
            }
        }
    }
    store(f)
}

/// Converts elements `e0 .. e0 + n` (whole units of `conv.ty`, one of [`supports`]) of half
/// `half` (rows `8 · half ..`) of one repacked group into an 8-row tile of the AVX2 GEMM (`q`,
/// `scale`, `min` as `gemm::Tile` holds them): the bytes and factors that converting the same
/// rows from the file's layout and interleaving them give — unsigned levels, or Q8_0's signed
/// quants (`Converter::tile_signed`).
///
/// # Panics
/// If the type has no AVX2 repacked kernel, the elements are not whole units inside `group`,
/// the outputs are too small or the CPU lacks AVX2.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile8(
    conv: &Converter,
    group: &[u8],
    half: usize,
    e0: usize,
    n: usize,
    q: &mut [u8],
    scale: &mut [f32],
    min: &mut [f32],
) {
    let g = super::packed::geo(conv.ty).expect("a type with a repacked layout");
    assert!(
        supports(conv.ty) && crate::quant::SimdLevel::Avx2.available(),
        "no AVX2 repacked tile loader for {} on this CPU",
        conv.ty
    );
    assert!(
        e0.is_multiple_of(g.elems) && n.is_multiple_of(g.elems) && half < 2,
        "tile loader: elements {e0}..+{n} of half {half} are not whole {}-element units",
        g.elems
    );
    let (first, units) = (e0 / g.elems, n / g.elems);
    assert!(
        group.len() >= (first + units) * g.group_unit(),
        "tile loader: a group of {} bytes is shorter than {} elements",
        group.len(),
        e0 + n
    );
    let subs = n / conv.sub();
    assert!(
        q.len() >= 8 * n && scale.len() >= 8 * subs && (!conv.min || min.len() >= 8 * subs),
        "tile loader: output buffers too small"
    );
    let p = group[first * g.group_unit()..].as_ptr();
    // SAFETY: AVX2 asserted; `units` units of the group from `p` (asserted), the tile's
    // `n` elements of 8 rows and `subs` factors per row fit the outputs (asserted).
    unsafe {
        match conv.ty {
            GgmlType::Q6_K => tile8_q6k(p, half, units, q.as_mut_ptr(), scale.as_mut_ptr()),
            GgmlType::Q4_K | GgmlType::Q5_K => tile8_k45(
                conv.ty == GgmlType::Q5_K,
                p,
                half,
                units,
                q.as_mut_ptr(),
                scale.as_mut_ptr(),
                min.as_mut_ptr(),
            ),
            ty => tile8_legacy(
                ty,
                p,
                half,
                units,
                q.as_mut_ptr(),
                scale.as_mut_ptr(),
                min.as_mut_ptr(),
            ),
        }
    }
}

/// Stores 32 bytes at `p`.
///
/// # Safety
/// `p .. p + 32` writable; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn st(p: *mut u8, v: __m256i) {
    // SAFETY: 32 writable bytes (caller); unaligned store.
    unsafe { _mm256_storeu_si256(p.cast(), v) }
}

/// Stores 8 f32 at `p`.
///
/// # Safety
/// `p .. p + 8` writable; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn stf(p: *mut f32, v: __m256) {
    // SAFETY: 8 writable f32 (caller); unaligned store.
    unsafe { _mm256_storeu_ps(p, v) }
}

/// [`tile8`] of Q4_0, Q4_1, Q5_0 and Q8_0: per block its scale (and minimum), then its 8 groups
/// — the nibble vectors' low and high halves (Q5_0's fifth bits added), or Q8_0's quants
/// flipped back to signed.
///
/// # Safety
/// AVX2 and F16C available; `p` points at `units` repacked blocks of `ty`; `q` holds
/// `8 · 32 · units` bytes, `scale` (and for Q4_1 `min`) `8 · units` f32.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile8_legacy(
    ty: GgmlType,
    p: *const u8,
    half: usize,
    units: usize,
    q: *mut u8,
    scale: *mut f32,
    min: *mut f32,
) {
    let (ub, head, first) = match ty {
        GgmlType::Q4_0 => (16 * 18, 32, 0),
        GgmlType::Q4_1 => (16 * 20, 0, 1),
        GgmlType::Q5_0 => (16 * 22, 32, 1),
        _ => (16 * 34, 32, 0),
    };
    let m4 = _mm256_set1_epi8(0x0F);
    let (nib4, bit4) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(0x1010_1010));
    let spread = _mm256_set1_epi32((1 << 4) | (1 << 11) | (1 << 18) | (1 << 25));
    let fifth = |qh: __m256i, sh: i32| {
        let x = _mm256_and_si256(_mm256_srl_epi32(qh, _mm_cvtsi32_si128(sh)), nib4);
        _mm256_and_si256(_mm256_mullo_epi32(x, spread), bit4)
    };
    for b in 0..units {
        // SAFETY (whole block): the unit's vectors and scales lie in the group, the block's 8
        // groups and factor in the outputs (caller).
        unsafe {
            let u = p.add(b * ub);
            let out = |g: usize, v: __m256i| st(q.add((b * 8 + g) * 32), v);
            if ty == GgmlType::Q4_1 {
                let dm = ld(u.add(32 * half));
                stf(scale.add(8 * b), super::gemv_avx2::f16_lanes8::<false>(dm));
                stf(min.add(8 * b), super::gemv_avx2::f16_lanes8::<true>(dm));
            } else {
                stf(scale.add(8 * b), f16x8(u.add(16 * half)));
            }
            let v = |i: usize| ld(u.add(head + 64 * i + 32 * half));
            if ty == GgmlType::Q8_0 {
                for g in 0..8 {
                    out(g, _mm256_xor_si256(v(g), _mm256_set1_epi8(-128)));
                }
                continue;
            }
            let qh = if ty == GgmlType::Q5_0 {
                v(0)
            } else {
                _mm256_setzero_si256()
            };
            for i in 0..4 {
                let x = v(first + i);
                let mut lo = _mm256_and_si256(x, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
                if ty == GgmlType::Q5_0 {
                    lo = _mm256_or_si256(lo, fifth(qh, 4 * i as i32));
                    hi = _mm256_or_si256(hi, fifth(qh, 16 + 4 * i as i32));
                }
                out(i, lo);
                out(4 + i, hi);
            }
        }
    }
}

/// [`tile8`] of Q6_K: per super-block the 16 scales `d · sc` of each row, then per half `hh`
/// and step `j` the four level vectors of the repacked kernel ([`q6k`]): elements
/// `128hh + 32i + 4j ..`, group `j` of the super-block's block `4hh + i`.
///
/// # Safety
/// AVX2 and F16C available; `p` points at `units` repacked super-blocks; `q` holds
/// `8 · 256 · units` bytes, `scale` `8 · 16 · units` f32.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile8_q6k(p: *const u8, half: usize, units: usize, q: *mut u8, scale: *mut f32) {
    let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let lo = |x: __m256i| _mm256_and_si256(x, m4);
    let hi = |x: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
    let top = |x: __m256i| _mm256_and_si256(x, m30);
    for sb in 0..units {
        // SAFETY (whole super-block): the unit's vectors and scales lie in the group, its 64
        // groups and 16 factors in the outputs (caller).
        unsafe {
            let u0 = p.add(sb * 16 * 210);
            let d = f16x8(u0.add(16 * half));
            let u = u0.add(32);
            for m in 0..16 {
                // Scale byte m, sign-extended: byte m % 4 of dword m / 4.
                let v = _mm256_sll_epi32(
                    ld(u.add((m / 4) * 64 + 32 * half)),
                    _mm_cvtsi32_si128(24 - 8 * (m % 4) as i32),
                );
                let k = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(v)));
                stf(scale.add((16 * sb + m) * 8), k);
            }
            for hh in 0..2 {
                for j in 0..8 {
                    let at = u.add((4 + 24 * hh + 3 * j) * 64 + 32 * half);
                    let (a, b, qh) = (ld(at), ld(at.add(64)), ld(at.add(128)));
                    let v = [
                        _mm256_or_si256(lo(a), top(_mm256_slli_epi16::<4>(qh))),
                        _mm256_or_si256(lo(b), top(_mm256_slli_epi16::<2>(qh))),
                        _mm256_or_si256(hi(a), top(qh)),
                        _mm256_or_si256(hi(b), top(_mm256_srli_epi16::<2>(qh))),
                    ];
                    for (i, v) in v.into_iter().enumerate() {
                        let blk = 8 * sb + 4 * hh + i;
                        st(q.add((blk * 8 + j) * 32), v);
                    }
                }
            }
        }
    }
}

/// [`tile8`] of Q4_K (`five` false) and Q5_K: per super-block the 8 scales and minima of each row
/// ([`k4_fields8`]), then per chunk `c` and group `g` the nibble vector's low half (group `g` of
/// block `2c`) and high half (of block `2c + 1`), Q5_K's fifth bits added.
///
/// # Safety
/// AVX2 and F16C available; `p` points at `units` repacked super-blocks of the type; `q` holds
/// `8 · 256 · units` bytes, `scale` and `min` `8 · 8 · units` f32.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile8_k45(
    five: bool,
    p: *const u8,
    half: usize,
    units: usize,
    q: *mut u8,
    scale: *mut f32,
    min: *mut f32,
) {
    let (ub, first) = if five { (16 * 176, 12) } else { (16 * 144, 4) };
    let m4 = _mm256_set1_epi8(0x0F);
    for sb in 0..units {
        // SAFETY (whole super-block): the unit's vectors lie in the group, its 64 groups and 8
        // scales and minima in the outputs (caller).
        unsafe {
            let u = p.add(sb * ub);
            let (k, m) = k4_fields8(u, half);
            for j in 0..8 {
                stf(scale.add((8 * sb + j) * 8), k[j]);
                stf(min.add((8 * sb + j) * 8), m[j]);
            }
            for c in 0..4 {
                for g in 0..8 {
                    let x = ld(u.add((first + 8 * c + g) * 64 + 32 * half));
                    let mut lo = _mm256_and_si256(x, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
                    if five {
                        let qh = ld(u.add((4 + g) * 64 + 32 * half));
                        lo = _mm256_or_si256(lo, fifth_k(qh, 2 * c));
                        hi = _mm256_or_si256(hi, fifth_k(qh, 2 * c + 1));
                    }
                    let blk = 8 * sb + 2 * c;
                    st(q.add((blk * 8 + g) * 32), lo);
                    st(q.add(((blk + 1) * 8 + g) * 32), hi);
                }
            }
        }
    }
}
