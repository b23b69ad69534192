//! x86-64 kernels of the repacked layout ([`super::packed`]): AVX-512 VNNI, one group of 16 rows
//! at a time, 1 to [`MAX_TOKENS`] tokens.
//!
//! Each level vector (4 consecutive levels of each of the 16 rows) is decoded once and fed to
//! `vpdpbusd` with each token's 4 activation bytes broadcast: lane `k` accumulates row `k`'s
//! integer sum of the sub-block directly. Per sub-block the f32 steps then run in the order of
//! [`super::dot_converted`], one row per lane.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::gemv::MAX_TOKENS;
use super::packed::{Geo, ROWS};
use super::x86::{k4_d, k4_factor, k4_fields16, Tok};
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

/// Prefetches the group unit of `ub` bytes about [`AHEAD_BYTES`] after the one at `u` into L1, a
/// line at a time, when that unit is still in the group (`left` units after `u`'s): past a group's
/// end may lie another expert's or another task's rows, which a prefetch would read for nothing.
/// A group's 16 rows are one stream, for which the hardware prefetcher alone keeps too few lines in
/// flight: on a 2-core Xeon VM (gemv bench, 4096 × 14336, from DRAM, one thread) repacked Q6_K
/// read 8.5 GB/s without it and 12.4 with it, Q5_K 8.7 and 11.2, Q4_0 11.0 and 14.0, Q5_0 9.8 and
/// 12.9, against 13.7–14.5 for the file layout, which prefetches each of its 16 row streams. Their
/// L2-resident compute lost up to 6%. Q4_K, the quickest to compute, lost 18% to this loop and
/// gained nothing; its kernel prefetches the same lines one per vector it reads instead (11.2 →
/// 12.5–13.6 GB/s, compute −6%).
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_ahead(u: *const u8, ub: usize, left: usize) {
    let ahead = AHEAD_BYTES.div_ceil(ub);
    if ahead <= left {
        let p = u.wrapping_add(ahead * ub);
        for off in (0..ub).step_by(64) {
            // A prefetch never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
        }
    }
}

/// How far ahead [`prefetch_ahead`] fetches: two Q6_K units (into L2, 2, 4 and 8 units read alike;
/// into L1, 2 was faster).
const AHEAD_BYTES: usize = 6144;

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
        GgmlType::Q4_K => go!(q4k),
        GgmlType::Q5_K => go!(q5k),
        GgmlType::Q6_K => go!(q6k),
        GgmlType::Q4_0 => go!(q4_0),
        GgmlType::Q4_1 => go!(q4_1),
        GgmlType::Q5_0 => go!(q5_0),
        GgmlType::Q8_0 => go!(q8_0),
        t => unreachable!("no repacked kernel for {t}"),
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

/// Q4_K: per super-block 4 header vectors (d | dmin, scales and minima re-packed:
/// [`super::packed::k4_fields`]) and 32 nibble vectors; vector `4 + 8c + g` holds group `g` of
/// sub-block `2c` (low nibbles) and of `2c + 1` (high nibbles).
///
/// # Safety
/// As [`k45`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q5k<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { k45::<true, T>(p, units, tok) }
}

/// The most tokens for which [`k45`] forms each Q4_K sub-block pair's factors just before its f32
/// steps (with more, and for Q5_K, all 16 at a super-block's start).
const LAZY_TOKENS: usize = 2;

/// Q4_K (`FIVE` false) or Q5_K super-blocks ([`q4k`], [`q5k`]). Q4_K's high nibbles are used in
/// place (16 × the level; the sums, exact multiples of 16, are shifted back), saving a shift per
/// vector. For Q4_K and 1–2 tokens each sub-block pair's 4 factors are formed just before its
/// f32 steps from the 3 scale vectors kept in registers (the chunks written out so that every
/// field index is a constant): forming all 16 at the super-block's start left too few
/// registers, 15% slower for one token (`GEMV_L2`). For 3–4 tokens the chains take the
/// registers: the 16 factors are formed first and the chunks loop (written out, they spilled:
/// 6% slower for 4 tokens). Q5_K always loops: written out, its one-token kernel was 14% faster
/// in L2 but streamed at 77–85% of the DRAM read where the loop streams at 88–96% (gemv bench).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `p` points at a group of `units` repacked super-blocks of
/// the type; the tokens' values, scales and sums hold `units` super-blocks.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k45<const FIVE: bool, const T: usize>(
    p: *const u8,
    units: usize,
    tok: [Tok; T],
) -> [[f32; ROWS]; T] {
    // Group unit bytes; the first nibble vector.
    let (ub, first) = if FIVE { (16 * 176, 12) } else { (16 * 144, 4) };
    let m4 = _mm512_set1_epi8(0x0F);
    let b16 = _mm512_set1_epi8(0x10);
    let mut f = [_mm512_setzero_ps(); T];
    for sb in 0..units {
        // SAFETY (whole super-block): the unit's vectors lie in the group; the tokens'
        // super-block sb exists (caller).
        unsafe {
            let u = p.add(sb * ub);
            if FIVE {
                prefetch_ahead(u, ub, units - 1 - sb);
            }
            // Q4_K: the unit ahead a line per nibble vector read, its header with the first.
            let ahead = AHEAD_BYTES.div_ceil(ub);
            let pf = (!FIVE && sb + ahead < units).then(|| u.wrapping_add(ahead * ub));
            if let Some(q) = pf {
                for l in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(64 * l).cast());
                }
            }
            let hd = ld(u);
            let (d, dmin) = k4_d(hd);
            let w = [ld(u.add(64)), ld(u.add(128)), ld(u.add(192))];
            // Chunk c's integer sums: sub-blocks 2c and 2c + 1, per token the low-nibble sums
            // (two chains) and the high-nibble sums (two chains).
            macro_rules! sums {
                ($c:expr) => {{
                    let c = $c;
                    // Q5_K: the fifth bits of sub-blocks 2c and 2c + 1 in every byte.
                    let (bl, bh) = (
                        _mm512_set1_epi8((1u8 << (2 * c)) as i8),
                        _mm512_set1_epi8((2u8 << (2 * c)) as i8),
                    );
                    let mut acc = [[_mm512_setzero_si512(); 4]; T];
                    for gi in 0..8 {
                        let v = ld(u.add((first + 8 * c + gi) * 64));
                        if let Some(q) = pf {
                            _mm_prefetch::<_MM_HINT_T0>(
                                q.wrapping_add((first + 8 * c + gi) * 64).cast(),
                            );
                        }
                        let lo = _mm512_and_si512(v, m4);
                        let (lo, hi) = if FIVE {
                            let qh = ld(u.add((4 + gi) * 64));
                            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                            (
                                _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(qh, bl), lo, b16),
                                _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(qh, bh), hi, b16),
                            )
                        } else {
                            (lo, _mm512_andnot_si512(m4, v))
                        };
                        for (t, acc) in acc.iter_mut().enumerate() {
                            let a = tok[t].q.add(256 * sb + 64 * c + 4 * gi);
                            let h = gi / 4;
                            acc[h] = _mm512_dpbusd_epi32(acc[h], lo, bcast(a));
                            acc[2 + h] = _mm512_dpbusd_epi32(acc[2 + h], hi, bcast(a.add(32)));
                        }
                    }
                    acc
                }};
            }
            if T <= LAZY_TOKENS && !FIVE {
                macro_rules! chunk {
                    ($c:literal) => {{
                        let acc = sums!($c);
                        let (s, n) = (2 * $c, 8 + 2 * $c);
                        let k = [k4_factor(&w, s, d), k4_factor(&w, s + 1, d)];
                        let m = [k4_factor(&w, n, dmin), k4_factor(&w, n + 1, dmin)];
                        pair_steps::<T, FIVE>(&mut f, &acc, (k, m), &tok, 8 * sb + s);
                    }};
                }
                chunk!(0);
                chunk!(1);
                chunk!(2);
                chunk!(3);
            } else {
                let (k, m) = k4_fields16([hd, w[0], w[1], w[2]]);
                for c in 0..4 {
                    let acc = sums!(c);
                    let pair = |x: &[__m512; 8]| [x[2 * c], x[2 * c + 1]];
                    pair_steps::<T, FIVE>(&mut f, &acc, (pair(&k), pair(&m)), &tok, 8 * sb + 2 * c);
                }
            }
        }
    }
    store(f)
}

/// The f32 steps of a Q4_K/Q5_K sub-block pair `s`, `s + 1` (the pair's factors `k`, `m`):
/// `acc[t]` holds token `t`'s two chains of each; unless `FIVE` the second sub-block's sums are
/// 16 × the levels' (Q4_K's high nibbles used in place) and are shifted back first.
///
/// # Safety
/// AVX-512F available; every token's scales and sums hold sub-block `s + 1`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn pair_steps<const T: usize, const FIVE: bool>(
    f: &mut [__m512; T],
    acc: &[[__m512i; 4]; T],
    (k, m): ([__m512; 2], [__m512; 2]),
    tok: &[Tok; T],
    s: usize,
) {
    for (t, acc) in acc.iter().enumerate() {
        let i0 = _mm512_add_epi32(acc[0], acc[1]);
        let mut i1 = _mm512_add_epi32(acc[2], acc[3]);
        if !FIVE {
            i1 = _mm512_srai_epi32::<4>(i1);
        }
        // SAFETY: sub-blocks s and s + 1 exist for every token (caller).
        let (d, sa) = unsafe { (tok[t].d.add(s), tok[t].sa.add(s)) };
        // SAFETY: as above.
        unsafe {
            f[t] = scale_step(f[t], i0, k[0], *d);
            f[t] = _mm512_fmadd_ps(m[0], _mm512_set1_ps(*sa), f[t]);
            f[t] = scale_step(f[t], i1, k[1], *d.add(1));
            f[t] = _mm512_fmadd_ps(m[1], _mm512_set1_ps(*sa.add(1)), f[t]);
        }
    }
}

/// Q6_K: per super-block the 16 rows' f16 `d`, 4 vectors of signed scales, then per half `h` and step `j` three
/// vectors (`packed::q6k_order`): the low nibbles of `ql` dwords `16h + j` and `16h + 8 + j` and
/// the high bit pairs of `qh` dword `8h + j`, giving elements `128h + 4j + 32q ..` (`q` = 0..4)
/// of sub-blocks `8h + 2q + j / 4`.
///
/// # Safety
/// As [`q4k`], for Q6_K with seeds.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    let mut f = [_mm512_setzero_ps(); T];
    // (x & 0x0F) | (y & 0x30), x already masked: A | (B & C).
    let merge = |x: __m512i, y: __m512i| _mm512_ternarylogic_epi32::<0xF8>(x, y, m30);
    for sb in 0..units {
        // SAFETY (whole super-block): the unit's 52 vectors and 32 bytes of scales lie in the
        // group; the tokens' super-block sb exists, with seeds (caller).
        unsafe {
            let u = p.add(sb * 16 * 210);
            prefetch_ahead(u, 16 * 210, units - 1 - sb);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(u.cast()));
            let u = u.add(32);
            let sc: [__m512i; 4] = std::array::from_fn(|i| ld(u.add(i * 64)));
            for h in 0..2 {
                let mut acc: [[__m512i; 8]; T] = std::array::from_fn(|t| {
                    std::array::from_fn(|s| {
                        _mm512_set1_epi32(*tok[t].seed.add(16 * sb + 8 * h + s))
                    })
                });
                for j in 0..8 {
                    let at = u.add((4 + 24 * h + 3 * j) * 64);
                    let (a, b, qh) = (ld(at), ld(at.add(64)), ld(at.add(128)));
                    let q = [
                        merge(_mm512_and_si512(a, m4), _mm512_slli_epi16::<4>(qh)),
                        merge(_mm512_and_si512(b, m4), _mm512_slli_epi16::<2>(qh)),
                        merge(_mm512_and_si512(_mm512_srli_epi16::<4>(a), m4), qh),
                        merge(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(b), m4),
                            _mm512_srli_epi16::<2>(qh),
                        ),
                    ];
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let x = tok[t].q.add(256 * sb + 128 * h + 4 * j);
                        for (i, q) in q.into_iter().enumerate() {
                            let s = 2 * i + j / 4;
                            acc[s] = _mm512_dpbusd_epi32(acc[s], q, bcast(x.add(32 * i)));
                        }
                    }
                }
                for s in 0..8 {
                    let m = 8 * h + s;
                    // Scale byte m, sign-extended: byte m % 4 of dword m / 4.
                    let v = _mm512_sll_epi32(sc[m / 4], _mm_cvtsi32_si128(24 - 8 * (m % 4) as i32));
                    let k = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(v)));
                    for (t, acc) in acc.iter().enumerate() {
                        f[t] = scale_step(f[t], acc[s], k, *tok[t].d.add(8 * sb + m / 2));
                    }
                }
            }
        }
    }
    store(f)
}

/// Which legacy type a [`legacy`] instance decodes.
const L40: u8 = 0;
const L41: u8 = 1;
const L50: u8 = 2;
const L80: u8 = 3;

/// Q4_0 blocks: the f16 `d`, 4 nibble vectors (vector `g`: elements `4g ..` low, `16 + 4g ..`
/// high).
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_0<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L40, T>(p, units, tok) }
}

/// Q4_1 blocks: the `d | m` vector, 4 nibble vectors as Q4_0's.
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L41, T>(p, units, tok) }
}

/// Q5_0 blocks: the f16 `d`, the fifth-bit vector, 4 nibble vectors as Q4_0's.
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_0<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L50, T>(p, units, tok) }
}

/// Q8_0 blocks: the f16 `d`, 8 vectors of quants (stored + 128).
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0<const T: usize>(p: *const u8, units: usize, tok: [Tok; T]) -> [[f32; ROWS]; T] {
    // SAFETY: the caller's.
    unsafe { legacy::<L80, T>(p, units, tok) }
}

/// The legacy types' blocks of 32 (one sub-block each): per block the integer sum (the offset's
/// seed included) then `fma(f32(i), d · d_a, f)` and, for Q4_1, `fma(m, s_a, f)`. Nibbles' high
/// halves are used in place (16 × the level, the sum shifted back); Q5_0's fifth bits are spread
/// to bit 4 of each byte through a 16-entry dword table indexed by 4 bits of the fifth-bit word.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `p` points at a group of `units` repacked blocks of the type;
/// the tokens' values, scales, sums (Q4_1) and seeds (the others) hold `units` blocks.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
    let m4 = _mm512_set1_epi8(0x0F);
    // Entry v: byte b = bit b of v moved to bit 4.
    let spread = _mm512_setr_epi32(
        0x0000_0000,
        0x0000_0010,
        0x0000_1000,
        0x0000_1010,
        0x0010_0000,
        0x0010_0010,
        0x0010_1000,
        0x0010_1010,
        0x1000_0000,
        0x1000_0010,
        0x1000_1000,
        0x1000_1010,
        0x1010_0000,
        0x1010_0010,
        0x1010_1000,
        0x1010_1010,
    );
    let mut f = [_mm512_setzero_ps(); T];
    for b in 0..units {
        // SAFETY (whole block): the unit's vectors (and f16 scales) lie in the group; block b of
        // every token exists with its sums or seeds (caller).
        unsafe {
            let u = p.add(b * ub);
            prefetch_ahead(u, ub, units - 1 - b);
            let (k, m) = if L == L41 {
                let dm = ld(u);
                (
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm)),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm))),
                )
            } else {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(u.cast()));
                (d, _mm512_setzero_ps())
            };
            let seed = |t: usize| {
                if L == L41 {
                    _mm512_setzero_si512()
                } else {
                    _mm512_set1_epi32(*tok[t].seed.add(b))
                }
            };
            let mut x: [__m512i; T] = std::array::from_fn(seed);
            let mut y = [_mm512_setzero_si512(); T];
            if L == L80 {
                for g in 0..8 {
                    let v = ld(u.add(head + 64 * g));
                    for t in 0..T {
                        let a = bcast(tok[t].q.add(32 * b + 4 * g));
                        if g < 4 {
                            x[t] = _mm512_dpbusd_epi32(x[t], v, a);
                        } else {
                            y[t] = _mm512_dpbusd_epi32(y[t], v, a);
                        }
                    }
                }
            } else {
                let qh = if L == L50 {
                    ld(u.add(head))
                } else {
                    _mm512_setzero_si512()
                };
                for g in 0..4 {
                    let v = ld(u.add(head + 64 * (first + g)));
                    let (lo, hi) = if L == L50 {
                        let fl = _mm512_permutexvar_epi32(
                            _mm512_srl_epi32(qh, _mm_cvtsi32_si128(4 * g as i32)),
                            spread,
                        );
                        let fh = _mm512_permutexvar_epi32(
                            _mm512_srl_epi32(qh, _mm_cvtsi32_si128(16 + 4 * g as i32)),
                            spread,
                        );
                        (
                            _mm512_or_si512(_mm512_and_si512(v, m4), fl),
                            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(v), m4), fh),
                        )
                    } else {
                        (_mm512_and_si512(v, m4), _mm512_andnot_si512(m4, v))
                    };
                    for t in 0..T {
                        let a = tok[t].q.add(32 * b + 4 * g);
                        x[t] = _mm512_dpbusd_epi32(x[t], lo, bcast(a));
                        y[t] = _mm512_dpbusd_epi32(y[t], hi, bcast(a.add(16)));
                    }
                }
                if L != L50 {
                    for y in &mut y {
                        *y = _mm512_srai_epi32::<4>(*y);
                    }
                }
            }
            for t in 0..T {
                let i = _mm512_add_epi32(x[t], y[t]);
                f[t] = scale_step(f[t], i, k, *tok[t].d.add(b));
                if L == L41 {
                    f[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(*tok[t].sa.add(b)), f[t]);
                }
            }
        }
    }
    store(f)
}
