//! x86-64 kernels of the int8 GEMM: 16 rows × `TN` tokens with AVX-512 VNNI, 8 rows × `TN`
//! tokens with AVX2 (see the module above for the layouts and the order), and the interleaving
//! of converted rows (in-register dword transposes).
//!
//! AVX2 has no unsigned × signed dot of bytes into 32 bits: `vpmaddubsw` multiplies unsigned by
//! signed bytes into saturating i16 pair sums. Types with levels up to 63 keep them unsigned in
//! the tile and multiply them with the activations (magnitude ≤ 128) directly, adding the pair
//! sums of as many groups as stay below 2^15 as i16 ([`Converter::avx2_run`]), the offset in the
//! seeds. Above (Q8_0, the lookup-table types) the tile holds the signed levels, and one operand's
//! magnitude times the other signed by it gives the exact products as long as neither the
//! magnitude exceeds 128 nor the signed operand is −128: with Q8_K activations (full range, −128
//! included) the weights are the signed operand (every Q8_K partner's levels lie in −127..=127),
//! otherwise the activations are (Q8_0 and Q8_1 values lie in −127..=127: a block holding −128 is
//! replaced when converted, see `convert_act_row`) and the weights — Q8_0's may be −128 — give the
//! magnitude. Pair sums stay within 2 · 128 · 127 < 2^15.

use std::arch::x86_64::*;

use super::{Converter, GemmActs, Tile, QB};
use crate::quant::kquants::x86::neg;
use crate::quant::SimdLevel;

/// `$k!(SUB16, MIN, SEED)` with the three runtime flags `($sub16, $min, $seed)` as literals: the
/// 16-row kernels' const-generic dispatch.
macro_rules! with_flags {
    (($a:expr, $b:expr, $c:expr), $k:ident) => {
        match ($a, $b, $c) {
            (false, false, false) => $k!(false, false, false),
            (false, false, true) => $k!(false, false, true),
            (false, true, false) => $k!(false, true, false),
            (false, true, true) => $k!(false, true, true),
            (true, false, false) => $k!(true, false, false),
            (true, false, true) => $k!(true, false, true),
            (true, true, false) => $k!(true, true, false),
            (true, true, true) => $k!(true, true, true),
        }
    };
}
pub(crate) use with_flags;

/// Dispatches to the kernel of the tile's width with the converter's flags and `acc.len()`
/// tokens.
pub(super) fn tile_dot(
    conv: &Converter,
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    acc: &mut [[f32; 16]],
) {
    let (sub16, min) = (conv.sub16, conv.min);
    macro_rules! tn {
        ($k:ident, $($c:expr),*) => {
            match acc.len() {
                1 => $k::<1, $($c),*>(tile, acts, blk0, t0, acc),
                2 => $k::<2, $($c),*>(tile, acts, blk0, t0, acc),
                4 => $k::<4, $($c),*>(tile, acts, blk0, t0, acc),
                8 => $k::<8, $($c),*>(tile, acts, blk0, t0, acc),
                n => panic!("the GEMM kernels take 1, 2, 4 or 8 tokens, not {n}"),
            }
        };
    }
    match tile.r {
        16 => {
            assert!(
                SimdLevel::Avx512.available(),
                "the VNNI GEMM kernel needs AVX-512 VNNI"
            );
            let seed = !acts.seed.is_empty();
            // SAFETY: AVX-512 F/BW/VL/VNNI and the AVX2 set were detected just above; the
            // pointers the kernel forms stay inside `tile` and `acts` (shapes asserted by the
            // caller: tile.q holds 16 rows × nb blocks, the tokens and blocks exist in acts, the
            // seeds and sums are present when the flags ask for them).
            unsafe {
                macro_rules! vnni {
                    ($s:tt, $m:tt, $e:tt) => {
                        tn!(vnni, $s, $m, $e)
                    };
                }
                with_flags!((sub16, min, seed), vnni)
            }
        }
        8 => {
            assert!(
                SimdLevel::Avx2.available(),
                "the AVX2 GEMM kernel needs AVX2"
            );
            let seed = !acts.seed.is_empty();
            let abs_w = !acts.full_range;
            // SAFETY: AVX2/FMA were detected just above; shapes as for the VNNI kernel with
            // 8-row tiles, the tile signed exactly where the converter has no unsigned run
            // (`Converter::tile_signed`, as `Tile::load` wrote it).
            unsafe {
                match (conv.avx2_run(), sub16, min, seed) {
                    (Some(8), false, false, true) => tn!(avx2u, false, false, 8, true),
                    (Some(8), false, true, false) => tn!(avx2u, false, true, 8, false),
                    (Some(8), true, true, false) => tn!(avx2u, true, true, 8, false),
                    (Some(8), true, false, true) => tn!(avx2u, true, false, 8, true),
                    (Some(4), false, false, true) => tn!(avx2u, false, false, 4, true),
                    (Some(4), false, true, false) => tn!(avx2u, false, true, 4, false),
                    (Some(2), true, false, true) => tn!(avx2u, true, false, 2, true),
                    (None, false, false, _) if abs_w => tn!(avx2, true),
                    (None, false, false, _) => tn!(avx2, false),
                    (run, s, m, e) => unreachable!(
                        "no AVX2 GEMM kernel for run {run:?}, sub-blocks of 16 {s}, minimum {m}, \
                         seeds {e}"
                    ),
                }
            }
        }
        r => panic!("no int8 GEMM kernel for {r}-row tiles"),
    }
}

/// One token's activations from a chunk's first block on: values, block scales, per-sub-block
/// scaled sums and seeds (formed with `wrapping_add`: the kernels read sums and seeds only
/// where the activations have them).
#[derive(Clone, Copy)]
pub(crate) struct Tok {
    pub(crate) q: *const i8,
    pub(crate) d: *const f32,
    pub(crate) sa: *const f32,
    pub(crate) seed: *const i32,
}

impl Tok {
    /// Token `t` of `acts` at block `blk0` (sub-blocks of 16 when `sub16`).
    pub(crate) fn new(acts: &GemmActs, blk0: usize, t: usize, sub16: bool) -> Tok {
        let nb = acts.cols / QB;
        let s0 = if sub16 { 2 * blk0 } else { blk0 };
        Tok {
            q: acts.q.as_ptr().wrapping_add(t * acts.cols + blk0 * QB),
            d: acts.d.as_ptr().wrapping_add(t * nb + blk0),
            sa: acts.sa.as_ptr().wrapping_add(t * acts.subs + s0),
            seed: acts.seed.as_ptr().wrapping_add(t * acts.subs + s0),
        }
    }

    /// Tokens `t0 .. t0 + TN`.
    pub(crate) fn several<const TN: usize>(
        acts: &GemmActs,
        blk0: usize,
        t0: usize,
        sub16: bool,
    ) -> [Tok; TN] {
        std::array::from_fn(|j| Tok::new(acts, blk0, t0 + j, sub16))
    }
}

/// One block of 32 of the order of [`super::dot_converted`] for 16 rows (one per lane):
/// `w[g]` holds group `g` (4 elements) of each row as unsigned levels, `k`/`m` the rows' scales
/// and minima of the block's one or two sub-blocks; the token's block `b` (counted from its
/// pointers' block) is added to `f`. Every 16-row VNNI path computes a block through this.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; block `b` of `t` exists, with sums (`MIN`) and seeds (`SEED`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(crate) unsafe fn chain_block<const SUB16: bool, const MIN: bool, const SEED: bool>(
    f: __m512,
    w: &[__m512i; 8],
    k: [__m512; 2],
    m: [__m512; 2],
    t: Tok,
    b: usize,
) -> __m512 {
    // SAFETY: block b's 32 values, scale, sums and seeds exist (caller).
    unsafe {
        let ap = t.q.add(b * QB);
        let a = |g: usize| _mm512_set1_epi32(ap.add(4 * g).cast::<i32>().read_unaligned());
        let da = _mm512_set1_ps(*t.d.add(b));
        let seed = |s: usize| {
            if SEED {
                _mm512_set1_epi32(*t.seed.add(s))
            } else {
                _mm512_setzero_si512()
            }
        };
        let mut f = f;
        if SUB16 {
            let mut x = seed(2 * b);
            let mut y = seed(2 * b + 1);
            for g in 0..4 {
                x = _mm512_dpbusd_epi32(x, w[g], a(g));
                y = _mm512_dpbusd_epi32(y, w[g + 4], a(g + 4));
            }
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(x), _mm512_mul_ps(k[0], da), f);
            if MIN {
                f = _mm512_fmadd_ps(m[0], _mm512_set1_ps(*t.sa.add(2 * b)), f);
            }
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(y), _mm512_mul_ps(k[1], da), f);
            if MIN {
                f = _mm512_fmadd_ps(m[1], _mm512_set1_ps(*t.sa.add(2 * b + 1)), f);
            }
        } else {
            // Two integer chains of four groups (shorter dependencies), summed exactly.
            let mut x = seed(b);
            let mut y = _mm512_setzero_si512();
            for g in 0..4 {
                x = _mm512_dpbusd_epi32(x, w[g], a(g));
                y = _mm512_dpbusd_epi32(y, w[g + 4], a(g + 4));
            }
            let s = _mm512_add_epi32(x, y);
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(k[0], da), f);
            if MIN {
                f = _mm512_fmadd_ps(m[0], _mm512_set1_ps(*t.sa.add(b)), f);
            }
        }
        f
    }
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `tile` holds 16 rows of `tile.nb` blocks; tokens `t0..t0 + TN`
/// and blocks `blk0 .. blk0 + tile.nb` exist in `acts`; with `MIN` the sums, with `SEED` the seeds
/// are present; `acc` holds `TN` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn vnni<const TN: usize, const SUB16: bool, const MIN: bool, const SEED: bool>(
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    acc: &mut [[f32; 16]],
) {
    const R: usize = 16;
    let toks = Tok::several::<TN>(acts, blk0, t0, SUB16);
    let wq = tile.q.as_ptr();
    let mut f: [__m512; TN] = std::array::from_fn(|j| _mm512_loadu_ps(acc[j].as_ptr()));
    for b in 0..tile.nb {
        // SAFETY (whole block): b < nb, so the weight groups (b·8 + g)·64 .. + 64 lie in the
        // 16 × nb·32-byte tile, sub-block entries s·16 .. + 16 in scale/min, and block b exists
        // for every token (caller's shapes).
        unsafe {
            let w: [__m512i; 8] =
                std::array::from_fn(|g| _mm512_loadu_si512(wq.add((b * 8 + g) * 64).cast()));
            let s0 = if SUB16 { 2 * b } else { b };
            let sub = |v: &Vec<f32>, s: usize| _mm512_loadu_ps(v.as_ptr().add(s * R));
            let k = [
                sub(&tile.scale, s0),
                if SUB16 {
                    sub(&tile.scale, s0 + 1)
                } else {
                    _mm512_setzero_ps()
                },
            ];
            let m = if MIN {
                [
                    sub(&tile.min, s0),
                    if SUB16 {
                        sub(&tile.min, s0 + 1)
                    } else {
                        _mm512_setzero_ps()
                    },
                ]
            } else {
                [_mm512_setzero_ps(); 2]
            };
            for j in 0..TN {
                f[j] = chain_block::<SUB16, MIN, SEED>(f[j], &w, k, m, toks[j], b);
            }
        }
    }
    for (o, v) in acc.iter_mut().zip(f) {
        // SAFETY: `o` is 16 writable f32.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
    }
}

/// The AVX2 kernel of the unsigned tiles (see [`Converter::avx2_run`]): per block and token,
/// `vpmaddubsw` of each group's levels with its 4 broadcast activations, the products of `G`
/// groups added as i16 before `vpmaddwd` widens them, the seeds (`SEED`: types with an offset)
/// added per sub-block; then the f32 steps of [`super::dot_converted`].
///
/// # Safety
/// AVX2 and FMA available; `tile` holds 8 unsigned rows of `tile.nb` blocks with levels small
/// enough for runs of `G` groups; tokens `t0..t0 + TN` and blocks `blk0 .. blk0 + tile.nb`
/// exist in `acts`; with `MIN` the sums, with `SEED` the seeds are present; `acc` holds `TN`
/// rows (8 of each 16 lanes written).
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2u<
    const TN: usize,
    const SUB16: bool,
    const MIN: bool,
    const G: usize,
    const SEED: bool,
>(
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    acc: &mut [[f32; 16]],
) {
    let ones = _mm256_set1_epi16(1);
    // SAFETY: as the caller's; the kernel reads block b's groups and the tokens' block b.
    unsafe {
        avx2_blocks::<TN, SUB16, MIN>(tile, acts, blk0, t0, acc, |wq, ap, seed| {
            let prod = |g: usize| {
                let w = _mm256_loadu_si256(wq.add(32 * g).cast());
                let a = _mm256_set1_epi32(ap.add(4 * g).cast::<i32>().read_unaligned());
                _mm256_maddubs_epi16(w, a)
            };
            // Groups g0 .. g0 + n as i32 lanes: runs of G groups summed as i16, widened.
            let sum = |g0: usize, n: usize| {
                let mut total = _mm256_setzero_si256();
                let mut g = g0;
                while g < g0 + n {
                    let end = (g + G).min(g0 + n);
                    let mut s = prod(g);
                    for h in g + 1..end {
                        s = _mm256_add_epi16(s, prod(h));
                    }
                    total = _mm256_add_epi32(total, _mm256_madd_epi16(s, ones));
                    g = end;
                }
                total
            };
            let seeded = |v: __m256i, s: usize| {
                if SEED {
                    _mm256_add_epi32(v, _mm256_set1_epi32(*seed.add(s)))
                } else {
                    v
                }
            };
            if SUB16 {
                [seeded(sum(0, 4), 0), seeded(sum(4, 4), 1)]
            } else {
                let s = seeded(sum(0, 8), 0);
                [s, s]
            }
        })
    }
}

/// The AVX2 kernel of the signed tiles (Q8_0, the lookup-table types; see
/// [`Converter::avx2_run`]): per group, `vpmaddubsw` of one operand's magnitude with the other
/// signed by it (`ABS_W`: the weights give the magnitude, the activations then never hold
/// −128; else the activations do, the weights never holding −128), widened at once.
///
/// # Safety
/// AVX2 and FMA available; `tile` holds 8 signed rows of `tile.nb` blocks; tokens
/// `t0..t0 + TN` and blocks `blk0 .. blk0 + tile.nb` exist in `acts`; `acc` holds `TN` rows (8
/// of each 16 lanes written).
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const TN: usize, const ABS_W: bool>(
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    acc: &mut [[f32; 16]],
) {
    let ones = _mm256_set1_epi16(1);
    // SAFETY: as the caller's; the kernel reads block b's groups and the tokens' block b.
    unsafe {
        avx2_blocks::<TN, false, false>(tile, acts, blk0, t0, acc, |wq, ap, _| {
            let group = |g: usize| {
                let w = _mm256_loadu_si256(wq.add(32 * g).cast());
                let a = _mm256_set1_epi32(ap.add(4 * g).cast::<i32>().read_unaligned());
                let pairs = if ABS_W {
                    _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w))
                } else {
                    _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(w, a))
                };
                _mm256_madd_epi16(pairs, ones)
            };
            let x = _mm256_add_epi32(
                _mm256_add_epi32(group(0), group(1)),
                _mm256_add_epi32(group(2), group(3)),
            );
            let y = _mm256_add_epi32(
                _mm256_add_epi32(group(4), group(5)),
                _mm256_add_epi32(group(6), group(7)),
            );
            let s = _mm256_add_epi32(x, y);
            [s, s]
        })
    }
}

/// The loop of the AVX2 kernels over the tile's blocks and `TN` tokens: `sums(w, a, seed)`
/// gives one block's integer sums of the 8 rows with one token — the block's one sub-block in
/// the first vector, or (`SUB16`) its two — from the block's first weight group `w`, the token's
/// block activations `a` and seeds from the block's first sub-block `seed`; the f32 steps of
/// [`super::dot_converted`] follow, added to `acc`.
///
/// # Safety
/// AVX2 and FMA available; `tile` holds 8 rows of `tile.nb` blocks; tokens `t0..t0 + TN` and
/// blocks `blk0 .. blk0 + tile.nb` exist in `acts`, with sums (`MIN`); `acc` holds `TN` rows;
/// `sums` reads within what it is given.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_blocks<const TN: usize, const SUB16: bool, const MIN: bool>(
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    acc: &mut [[f32; 16]],
    sums: impl Fn(*const u8, *const i8, *const i32) -> [__m256i; 2],
) {
    const R: usize = 8;
    let p = Tok::several::<TN>(acts, blk0, t0, SUB16);
    let wq = tile.q.as_ptr();
    let mut f: [__m256; TN] = std::array::from_fn(|j| _mm256_loadu_ps(acc[j].as_ptr()));
    for b in 0..tile.nb {
        // SAFETY (whole block): as in the VNNI kernel, with 32-byte groups of 8 rows.
        unsafe {
            let s0 = if SUB16 { 2 * b } else { b };
            let k0 = _mm256_loadu_ps(tile.scale.as_ptr().add(s0 * R));
            let m0 = if MIN {
                _mm256_loadu_ps(tile.min.as_ptr().add(s0 * R))
            } else {
                _mm256_setzero_ps()
            };
            let (k1, m1) = if SUB16 {
                (
                    _mm256_loadu_ps(tile.scale.as_ptr().add((s0 + 1) * R)),
                    if MIN {
                        _mm256_loadu_ps(tile.min.as_ptr().add((s0 + 1) * R))
                    } else {
                        _mm256_setzero_ps()
                    },
                )
            } else {
                (k0, m0)
            };
            for j in 0..TN {
                let [x, y] = sums(wq.add(b * 8 * 32), p[j].q.add(b * QB), p[j].seed.add(s0));
                let da = _mm256_set1_ps(*p[j].d.add(b));
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), _mm256_mul_ps(k0, da), f[j]);
                if MIN {
                    let sa = _mm256_set1_ps(*p[j].sa.add(s0));
                    f[j] = _mm256_fmadd_ps(m0, sa, f[j]);
                }
                if SUB16 {
                    f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(y), _mm256_mul_ps(k1, da), f[j]);
                    if MIN {
                        let sa = _mm256_set1_ps(*p[j].sa.add(s0 + 1));
                        f[j] = _mm256_fmadd_ps(m1, sa, f[j]);
                    }
                }
            }
        }
    }
    for (o, v) in acc.iter_mut().zip(f) {
        // SAFETY: `o` holds 16 writable f32; 8 are written.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
    }
}

/// Interleaves `r` rows of `n` bytes at `src` (`n` a multiple of 4) into `dst` with in-register
/// dword transposes where the CPU has the level's instructions: 16 rows (AVX-512, 64 bytes of
/// each row per step) or 8 rows (AVX2, 32 bytes per step), `shift` subtracted from every byte;
/// the last bytes of a row that do not fill a step are copied dword by dword. `false`: not
/// handled (the caller's portable loop runs). The caller checked that both buffers hold `r · n`
/// bytes.
pub(super) fn interleave(
    src: *const u8,
    dst: *mut u8,
    r: usize,
    n: usize,
    shift: u8,
    level: SimdLevel,
) -> bool {
    let step = match (r, level) {
        (16, SimdLevel::Avx512) if SimdLevel::Avx512.available() && shift == 0 => 64,
        (8, SimdLevel::Avx2 | SimdLevel::Avx512) if SimdLevel::Avx2.available() => 32,
        _ => return false,
    };
    let full = n / step * step;
    // SAFETY: the features of the chosen transpose were detected just above; both buffers hold
    // r × n bytes (caller), and the transposes touch columns 0..full ≤ n of r rows.
    unsafe {
        if r == 16 {
            interleave16(src, dst, n, full);
        } else {
            interleave8(src, dst, n, full, shift);
        }
    }
    for k in 0..r {
        for i in full / 4..n / 4 {
            for b in 0..4 {
                // SAFETY: row k < r, bytes 4i + b < n: inside both r × n buffers.
                unsafe {
                    *dst.add((i * r + k) * 4 + b) =
                        (*src.add(k * n + 4 * i + b)).wrapping_sub(shift)
                };
            }
        }
    }
    true
}

/// 16 rows of `n` bytes, columns `0..full` (a multiple of 64): per 64 columns, a 16 × 16 dword
/// transpose.
///
/// # Safety
/// AVX-512F available; `s` and `d` hold 16 × `n` bytes; `full ≤ n`.
#[target_feature(enable = "avx512f")]
unsafe fn interleave16(s: *const u8, d: *mut u8, n: usize, full: usize) {
    let mut c = 0;
    while c < full {
        // SAFETY: rows k < 16 at k·n + c .. + 64 ≤ 16·n; output dwords (c/4 + e)·16 .. + 16 for
        // e < 16 end at (c + 64)·16 ≤ 16·n bytes.
        unsafe {
            let r: [__m512i; 16] =
                std::array::from_fn(|k| _mm512_loadu_si512(s.add(k * n + c).cast()));
            let t: [__m512i; 16] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_epi32(a, b)
                } else {
                    _mm512_unpackhi_epi32(a, b)
                }
            });
            // u[4a + c'] lane L = rows 4a..4a+4 at dword 4L + c'.
            let u: [__m512i; 16] = std::array::from_fn(|i| {
                let (a, cc) = (i / 4, i % 4);
                let (lo, hi) = (t[4 * a + (cc / 2)], t[4 * a + 2 + (cc / 2)]);
                if cc % 2 == 0 {
                    _mm512_unpacklo_epi64(lo, hi)
                } else {
                    _mm512_unpackhi_epi64(lo, hi)
                }
            });
            for cc in 0..4 {
                let p0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[cc], u[4 + cc]);
                let p1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[cc], u[4 + cc]);
                let q0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[8 + cc], u[12 + cc]);
                let q1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[8 + cc], u[12 + cc]);
                let outs = [
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(p0, q0),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(p0, q0),
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(p1, q1),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(p1, q1),
                ];
                for (l, o) in outs.into_iter().enumerate() {
                    let e = 4 * l + cc;
                    _mm512_storeu_si512(d.add((c / 4 + e) * 64).cast(), o);
                }
            }
        }
        c += 64;
    }
}

/// 8 rows of `n` bytes, columns `0..full` (a multiple of 32): per 32 columns, an 8 × 8 dword
/// transpose, `shift` subtracted from every byte.
///
/// # Safety
/// AVX2 available; `s` and `d` hold 8 × `n` bytes; `full ≤ n`.
#[target_feature(enable = "avx2")]
unsafe fn interleave8(s: *const u8, d: *mut u8, n: usize, full: usize, shift: u8) {
    let sh = _mm256_set1_epi8(shift as i8);
    let mut c = 0;
    while c < full {
        // SAFETY: rows k < 8 at k·n + c .. + 32 ≤ 8·n; outputs (c/4 + e)·32 .. + 32 for e < 8 end
        // at (c + 32)·8 ≤ 8·n.
        unsafe {
            let r: [__m256i; 8] =
                std::array::from_fn(|k| _mm256_loadu_si256(s.add(k * n + c).cast()));
            let t: [__m256i; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_epi32(a, b)
                } else {
                    _mm256_unpackhi_epi32(a, b)
                }
            });
            let u: [__m256i; 8] = std::array::from_fn(|i| {
                let (a, cc) = (i / 4, i % 4);
                let (lo, hi) = (t[4 * a + (cc / 2)], t[4 * a + 2 + (cc / 2)]);
                if cc % 2 == 0 {
                    _mm256_unpacklo_epi64(lo, hi)
                } else {
                    _mm256_unpackhi_epi64(lo, hi)
                }
            });
            for cc in 0..4 {
                let lo = _mm256_permute2x128_si256::<0x20>(u[cc], u[4 + cc]);
                let hi = _mm256_permute2x128_si256::<0x31>(u[cc], u[4 + cc]);
                _mm256_storeu_si256(d.add((c / 4 + cc) * 32).cast(), _mm256_sub_epi8(lo, sh));
                _mm256_storeu_si256(d.add((c / 4 + 4 + cc) * 32).cast(), _mm256_sub_epi8(hi, sh));
            }
        }
        c += 32;
    }
}

/// The 16 bytes at `rows[k] + off` of 16 rows as four vectors of dwords, row `k` in lane `k`:
/// `out[i]` lane `k` = dword `i` of row `k`'s 16 bytes (loads into 128-bit lanes, one in-lane
/// 4 × 4 transpose). The building block of the direct tile loaders.
///
/// # Safety
/// AVX-512F available; `rows[k] + off .. + 16` readable for every `k`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn rows16x4(rows: &[*const u8; 16], off: usize) -> [__m512i; 4] {
    // SAFETY: 16 readable bytes at each rows[k] + off (caller).
    let l = |k: usize| unsafe { _mm_loadu_si128(rows[k].add(off).cast()) };
    // z[a] lane L = row a + 4L.
    let z: [__m512i; 4] = std::array::from_fn(|a| {
        let v = _mm512_castsi128_si512(l(a));
        let v = _mm512_inserti32x4::<1>(v, l(a + 4));
        let v = _mm512_inserti32x4::<2>(v, l(a + 8));
        _mm512_inserti32x4::<3>(v, l(a + 12))
    });
    let t0 = _mm512_unpacklo_epi32(z[0], z[1]);
    let t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    let t2 = _mm512_unpacklo_epi32(z[2], z[3]);
    let t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// Where a direct 16-row tile loader reads its rows: 16 rows in the file's layout
/// ([`FileRows`]) or one repacked group ([`PackedRows`]). Both give a unit's bytes as the file
/// has them, a row per dword lane, so one loader body serves both layouts with the same bits.
pub(crate) trait Rows16 {
    /// Dwords `off / 4 .. off / 4 + 4` of unit `i` (counted from the first unit given) of each
    /// row as [`rows16x4`] gives them: `out[j]` lane `k` = the 4 bytes at `off + 4j` of row
    /// `k`'s unit.
    ///
    /// # Safety
    /// AVX-512F available; the unit exists and `off .. off + 16` lies in it; for
    /// [`PackedRows`], `off` is on the repacked unit's dword grid ([`PackedRows::x4`]).
    unsafe fn x4(&self, i: usize, off: usize) -> [__m512i; 4];

    /// The f16 at byte `off` of unit `i` of each row as an f32, row `k` in lane `k`.
    ///
    /// # Safety
    /// AVX-512F available; the unit exists and holds the f16 (for [`PackedRows`]: the one the
    /// repacked layout moves to the unit's front).
    unsafe fn f16(&self, i: usize, off: usize) -> __m512;

    /// The Q4_K/Q5_K factors of unit `i` of the 16 rows, as [`k4_factors16`] gives them.
    ///
    /// # Safety
    /// AVX-512F available; the unit exists and is a Q4_K or Q5_K super-block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn k4_factors(&self, i: usize) -> ([__m512; 8], [__m512; 8]) {
        // SAFETY: the header's 16 bytes lie in the unit (caller).
        k4_factors16(unsafe { self.x4(i, 0) })
    }
}

/// 16 rows in the file's layout: pointers to their first unit, units of `bytes` bytes.
pub(crate) struct FileRows {
    /// Each row's first unit.
    pub p: [*const u8; 16],
    /// Bytes of a unit.
    pub bytes: usize,
}

impl Rows16 for FileRows {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn x4(&self, i: usize, off: usize) -> [__m512i; 4] {
        // SAFETY: the 16 bytes lie in unit i of every row (caller).
        unsafe { rows16x4(&self.p, i * self.bytes + off) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn f16(&self, i: usize, off: usize) -> __m512 {
        let base = i * self.bytes;
        // SAFETY: 16 bytes from the f16 or, at a unit's end, the 16 ending with it lie in the
        // unit (caller: it holds the f16; every unit of these types is longer than 16 bytes).
        unsafe {
            if off + 16 <= self.bytes {
                f16_lanes::<false>(rows16x4(&self.p, base + off)[0])
            } else {
                f16_lanes::<true>(rows16x4(&self.p, base + off + 2 - 16)[3])
            }
        }
    }
}

/// One repacked group ([`super::packed`]): its first unit and the type's geometry, with the
/// stored vector of each of a unit's dwords.
pub(crate) struct PackedRows {
    /// The group's first unit given.
    pub p: *const u8,
    /// The type's repacked geometry.
    pub g: super::packed::Geo,
    /// `at[d]`: the stored vector of dword `d` (the inverse of the geometry's order).
    at: [u8; 64],
}

impl PackedRows {
    /// The group unit at `p` (and those after it) of geometry `g`.
    pub(crate) fn new(p: *const u8, g: super::packed::Geo) -> PackedRows {
        let mut at = [0u8; 64];
        for i in 0..g.dwords() {
            at[g.order.map_or(i, |o| o(i))] = i as u8;
        }
        PackedRows { p, g, at }
    }
}

impl Rows16 for PackedRows {
    /// `off` is a file offset on the unit's dword grid: past the moved f16 when it is at the
    /// front (Q4_0, Q5_0, Q8_0: 2 + 4j), else a multiple of 4 before it.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn x4(&self, i: usize, off: usize) -> [__m512i; 4] {
        let g = self.g;
        let at = match g.f16 {
            Some(f) if off > f => off - 2,
            _ => off,
        };
        debug_assert!(
            at.is_multiple_of(4),
            "offset {off} off the repacked dword grid"
        );
        let u = i * g.group_unit() + g.head();
        let flip = _mm512_set1_epi32(g.flip_mask() as i32);
        // SAFETY: the dwords' stored vectors lie in unit i of the group (caller).
        std::array::from_fn(|j| unsafe {
            let v = self.p.add(u + 64 * self.at[at / 4 + j] as usize);
            _mm512_xor_si512(_mm512_loadu_si512(v.cast()), flip)
        })
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn f16(&self, i: usize, off: usize) -> __m512 {
        debug_assert_eq!(
            self.g.f16,
            Some(off),
            "only a moved f16 is read from a group"
        );
        // SAFETY: the moved f16 of the 16 rows are the unit's first 32 bytes (caller: the unit
        // exists and holds it).
        unsafe {
            let u = self.p.add(i * self.g.group_unit());
            _mm512_cvtph_ps(_mm256_loadu_si256(u.cast()))
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn k4_factors(&self, i: usize) -> ([__m512; 8], [__m512; 8]) {
        // SAFETY: the header's 16 bytes lie in the unit (caller).
        let h = unsafe { self.x4(i, 0) };
        if self.g.k4 {
            k4_fields16(h)
        } else {
            k4_factors16(h)
        }
    }
}

/// Checks a repacked tile loader's arguments: elements `e0 .. e0 + n` whole units of `ty` (a
/// type with a repacked layout), `group` (one group of 16 rows) holding them, outputs large
/// enough for `subs` sub-blocks per unit, the CPU able; returns the group's rows from the
/// first unit asked for and the number of units. Every repacked tile loader starts here.
pub(crate) fn packed_tile_args(
    ty: pshard_model::ggml_type::GgmlType,
    group: &[u8],
    e0: usize,
    n: usize,
    q: &[u8],
    scale: &[f32],
    subs: usize,
) -> (PackedRows, usize) {
    let g = super::packed::geo(ty).expect("a type with a repacked layout");
    assert!(
        e0.is_multiple_of(g.elems) && n.is_multiple_of(g.elems),
        "tile loader: elements {e0}..+{n} are not whole {}-element units",
        g.elems
    );
    let (first, nb) = (e0 / g.elems, n / g.elems);
    assert!(
        group.len() >= (first + nb) * g.group_unit(),
        "tile loader: a group of {} bytes is shorter than {} elements",
        group.len(),
        e0 + n
    );
    assert!(
        q.len() >= 16 * n && scale.len() >= 16 * nb * subs,
        "tile loader: output buffers too small"
    );
    assert!(
        SimdLevel::Avx512.available(),
        "tile loaders need AVX-512 VNNI"
    );
    let p = group[first * g.group_unit()..].as_ptr();
    (PackedRows::new(p, g), nb)
}

/// The f16 in the low (`HIGH` false) or high half of each dword lane, as 16 f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn f16_lanes<const HIGH: bool>(v: __m512i) -> __m512 {
    let v = if HIGH { _mm512_srli_epi32::<16>(v) } else { v };
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
}

/// The 16 rows' `d` and `−dmin` from their header dword 0 (`d | dmin`), as [`k4_factors16`]
/// forms them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn k4_d(dd: __m512i) -> (__m512, __m512) {
    (f16_lanes::<false>(dd), neg(f16_lanes::<true>(dd)))
}

/// `d ·` field `n` (scale `n`, minimum `n − 8`) of 16 rows' re-packed Q4_K/Q5_K scales and minima
/// (`w`: their dwords 1..4, [`super::packed::k4_fields`]): the f32 product [`k4_factors16`]
/// forms (`d` the rows' `d` for a scale, `−dmin` for a minimum). Constant `n` (inlined): one or
/// two operations before the conversion, six for field 15.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn k4_factor(w: &[__m512i; 3], n: usize, d: __m512) -> __m512 {
    let m6 = _mm512_set1_epi32(63);
    let sr = |v: __m512i, sh: usize| _mm512_srl_epi32(v, _mm_cvtsi32_si128(sh as i32));
    let v = if n == 15 {
        // Bits 24, 25 of each dword i to bits 2i, 2i + 1: shifted into place, then taken
        // through two bit selects (0xCA: where the first operand's bit is set, the second's).
        let (a, b, c) = (sr(w[0], 24), sr(w[1], 22), sr(w[2], 20));
        let ab = _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi32(3), a, b);
        let abc = _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi32(15), ab, c);
        _mm512_and_si512(abc, m6)
    } else {
        let (v, p) = (w[n / 5], n % 5);
        match p {
            0 => _mm512_and_si512(v, m6),
            4 => sr(v, super::packed::k4_shift(4)),
            _ => _mm512_and_si512(sr(v, super::packed::k4_shift(p)), m6),
        }
    };
    _mm512_mul_ps(d, _mm512_cvtepi32_ps(v))
}

/// [`k4_factors16`] of 16 rows whose scales and minima are re-packed
/// ([`super::packed::k4_fields`]; `h` as there), by [`k4_factor`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn k4_fields16(h: [__m512i; 4]) -> ([__m512; 8], [__m512; 8]) {
    let (d, dmin) = k4_d(h[0]);
    let w = [h[1], h[2], h[3]];
    let mut k = [_mm512_setzero_ps(); 8];
    let mut m = [_mm512_setzero_ps(); 8];
    for j in 0..8 {
        k[j] = k4_factor(&w, j, d);
        m[j] = k4_factor(&w, 8 + j, dmin);
    }
    (k, m)
}

/// The Q4_K/Q5_K factors of 16 rows from their super-block headers (`h`: dwords 0..4 of each
/// row's header, row per lane): per sub-block the scale `d · sc` and the minimum `−dmin · m`,
/// the portable converter's f32 products. The row-wise decode kernel and the Q4_K/Q5_K tile
/// loader take them from here for the file's layout; the repacked one's re-packed fields give
/// the same products through [`k4_fields16`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn k4_factors16(h: [__m512i; 4]) -> ([__m512; 8], [__m512; 8]) {
    let [dd, s0, s1, s2] = h;
    let (d, dmin) = k4_d(dd);
    let byte = |v: __m512i, sh: u32| _mm512_srl_epi32(v, _mm_cvtsi32_si128(sh as i32));
    let (m6, m4, m2) = (
        _mm512_set1_epi32(63),
        _mm512_set1_epi32(15),
        _mm512_set1_epi32(3),
    );
    let mut k = [_mm512_setzero_ps(); 8];
    let mut m = [_mm512_setzero_ps(); 8];
    for j in 0..4 {
        let sh = 8 * j as u32;
        let hi = |s: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(byte(s, sh + 6), m2));
        let sc = _mm512_and_si512(byte(s0, sh), m6);
        let mn = _mm512_and_si512(byte(s1, sh), m6);
        let sc4 = _mm512_or_si512(_mm512_and_si512(byte(s2, sh), m4), hi(s0));
        let mn4 = _mm512_or_si512(_mm512_and_si512(byte(s2, sh + 4), m4), hi(s1));
        k[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
        m[j] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn));
        k[4 + j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc4));
        m[4 + j] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn4));
    }
    (k, m)
}

/// Stores 64 bytes at `p`.
///
/// # Safety
/// `p .. p + 64` writable.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store64(p: *mut u8, v: __m512i) {
    // SAFETY: 64 writable bytes (caller); unaligned store.
    unsafe { _mm512_storeu_si512(p.cast(), v) }
}

/// Stores 16 f32 at `p`.
///
/// # Safety
/// `p .. p + 16` writable.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store16f(p: *mut f32, v: __m512) {
    // SAFETY: 16 writable f32 (caller); unaligned store.
    unsafe { _mm512_storeu_ps(p, v) }
}
