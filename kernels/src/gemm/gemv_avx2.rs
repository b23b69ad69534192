//! x86-64 kernel of the decode path ([`super::gemv`]) at the AVX2 level: 8 rows per group, the
//! types of [`Kind::avx2`] (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).
//!
//! AVX2 has no `vpdpbusd`: a row step's levels (unsigned bytes, as the VNNI kernel decodes them)
//! are multiplied with the activations by `vpmaddubsw` (unsigned × signed bytes into saturating
//! i16 pair sums) and widened by `vpmaddwd` with ones. No sum saturates: levels ≤ 31 (Q4_x, Q5_x,
//! Q4_K, Q5_K) times activations of magnitude ≤ 128 stay below 2^15 even with a sub-block's two
//! halves added as i16 before the widening (4 · 31 · 128 = 15872); Q6_K's levels ≤ 63 are widened
//! one vector at a time (2 · 63 · 128 = 16128); Q8_0's signed levels (−128 included) give their
//! magnitude to `vpmaddubsw` and their sign to the activations, which never hold −128 for Q8_0
//! partners (see `convert_act_row`): pair sums ≤ 2 · 128 · 127 < 2^15, widened one at a time. So
//! Q8_0 sums `Σ (u − 128) · a` directly; the other offsets are added per sub-block
//! (`GemmActs::seed`, `−offset · Σa`) before the f32 steps.
//!
//! The activations are the VNNI kernel's ([`GemvActs`]): each 256-bit quarter of a step holds two
//! sub-blocks of 32 as halves (one per 128-bit lane), or two of 16 in element order, so each row's
//! step gives two (Q6_K: four) vectors whose lanes hold four partial sums of one sub-block. Four
//! rows' vectors are summed lane-wise and transposed ([`reduce4`]), two row quads joined by
//! 128-bit permutes into one vector of 8 rows per sub-block. The f32 steps then run in the fixed
//! order of [`super::dot_converted`], one row per lane — the bits of every other path. Rows are prefetched ahead as in the VNNI kernel.

use std::arch::x86_64::*;

use super::gemv::{for_groups, prefetch_at, GemvActs, Geo, Kind, MAX_TOKENS, PREFETCH, STEP};
use super::{Converter, QB};
use crate::quant::kquants::q6k;

/// Decoder ids (the kernel's const parameter).
const L4: u8 = 0;
const L5: u8 = 1;
const L8: u8 = 2;
const K4: u8 = 3;
const K5: u8 = 4;
const K6: u8 = 5;

/// Whether decoder `k` reads blocks of 32 with their scale in the first bytes (Q4_0 … Q8_0)
/// rather than super-blocks of 256.
const fn blocky(k: u8) -> bool {
    k <= L8
}

/// The step's sub-block (counted from the step's first) whose sums lie in lane `h` of the
/// reduced vector `v`: legacy — vector 0 holds blocks 0, 1, vector 1 blocks 2, 3; Q4_K/Q5_K —
/// vector 0 sub-blocks 0, 2 (low nibbles), vector 1 sub-blocks 1, 3; Q6_K — vector `v`
/// sub-blocks (of 16) `2v`, `2v + 1`.
const fn sub_at(k: u8, v: usize, h: usize) -> usize {
    if k == K4 || k == K5 {
        v + 2 * h
    } else {
        2 * v + h
    }
}

/// Level vectors per row step that the products pair up: two per reduced vector (sub-blocks of
/// 32, halves added), one (Q6_K).
const fn vectors(k: u8) -> usize {
    if k == K6 {
        4
    } else {
        2
    }
}

/// Outputs of rows `r0 .. r0 + outs[0].len()` of the matrix `data` (row `r` at `r · wrb`) for
/// each token `t` of `acts` into `outs[t]`, 8 rows at a time.
///
/// # Safety
/// AVX2, FMA and F16C available; `kind` one of [`Kind::avx2`]; the rows lie in `data` and hold
/// `acts.base.cols` elements of `conv.ty` in `wrb` bytes each; `acts` was built for `conv`, `kind`
/// and this kernel (seeds per sub-block where the type has an offset) and holds `outs.len()` (1
/// to [`MAX_TOKENS`]) tokens; every `outs[t]` has the same length.
pub(super) unsafe fn rows(
    conv: &Converter,
    kind: Kind,
    acts: &GemvActs,
    data: &[u8],
    wrb: usize,
    r0: usize,
    outs: &mut [&mut [f32]],
) {
    let g = Geo::of(conv, kind);
    let seed = conv.offset != 0;
    macro_rules! go {
        ($k:ident, $min:literal, $seed:literal) => {
            match outs.len() {
                1 => rows_k::<$k, $min, $seed, 1>(g, acts, data, wrb, r0, outs),
                2 => rows_k::<$k, $min, $seed, 2>(g, acts, data, wrb, r0, outs),
                3 => rows_k::<$k, $min, $seed, 3>(g, acts, data, wrb, r0, outs),
                4 => rows_k::<$k, $min, $seed, 4>(g, acts, data, wrb, r0, outs),
                n => unreachable!("the decode path takes 1 to {MAX_TOKENS} tokens, not {n}"),
            }
        };
    }
    // SAFETY: the caller's guarantees, passed on; each arm's decoder matches `kind` and the
    // converter's flags (minimum, offset) match the const parameters. Q8_0 dots its signed
    // levels: its offset is in the products, no seed.
    unsafe {
        match (kind, conv.min, seed) {
            (Kind::Legacy4, false, true) => go!(L4, false, true),
            (Kind::Legacy4, true, false) => go!(L4, true, false),
            (Kind::Legacy5, false, true) => go!(L5, false, true),
            (Kind::Legacy5, true, false) => go!(L5, true, false),
            (Kind::Legacy8, false, true) => go!(L8, false, false),
            (Kind::K4, true, false) => go!(K4, true, false),
            (Kind::K5, true, false) => go!(K5, true, false),
            (Kind::K6, false, true) => go!(K6, false, true),
            (k, m, s) => unreachable!("no AVX2 decode kernel for {k:?} with minimum {m}, seed {s}"),
        }
    }
}

/// [`rows`] for one decoder: `K`, `MIN` and `SEED` those of the weight type, `g` its geometry.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_k<const K: u8, const MIN: bool, const SEED: bool, const T: usize>(
    g: Geo,
    acts: &GemvActs,
    data: &[u8],
    wrb: usize,
    r0: usize,
    outs: &mut [&mut [f32]],
) {
    for_groups::<16, T>(data, wrb, r0, outs, |p, next, o| {
        // SAFETY: every p[k] and next[k] is a row of `data` (caller); the rest as for `rows`.
        unsafe { group::<K, MIN, SEED, T>(p, next, g, acts, o) };
    });
}

/// The 16 bytes at `p` and (`n` > 1) at `p + stride` as the two lanes of one vector; zeros for
/// the lanes past `n` (`FULL`: `n` = 2).
///
/// # Safety
/// AVX2 available; the `n` (at most 2) 16-byte ranges readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair<const FULL: bool>(p: *const u8, stride: usize, n: usize) -> __m256i {
    let n = if FULL { 2 } else { n };
    // SAFETY: lane j < n reads p + j·stride .. + 16 (caller).
    unsafe {
        let l = |j: usize| _mm_loadu_si128(p.add(j * stride).cast());
        match n {
            0 => _mm256_setzero_si256(),
            1 => _mm256_zextsi128_si256(l(0)),
            _ => _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(l(0)), l(1)),
        }
    }
}

/// Constants of the row decoders.
#[derive(Clone, Copy)]
struct Consts {
    m4: __m256i,
    m30: __m256i,
    b16: __m256i,
    ones: __m256i,
    /// Q5_0/Q5_1: per byte `i` of a lane, the byte of the fifth bits holding bit `i` of the
    /// first (`qh_lo`) or second half of the lane's block; `bit`: `1 << (i % 8)`.
    qh_lo: __m256i,
    qh_hi: __m256i,
    bit: __m256i,
    /// Q5_K: per step parity `h` and pair of vectors, the 32-bit shift counts per lane that move
    /// the fifth bit of the lane's sub-block to bit 4 (left for `h` = 0, right for `h` = 1).
    k5: [[__m256i; 2]; 2],
}

impl Consts {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new() -> Consts {
        let lanes = |a: i32, b: i32| _mm256_setr_epi32(a, a, a, a, b, b, b, b);
        let spread = |x: i8| {
            let y = x + 1;
            _mm256_setr_epi8(
                x, x, x, x, x, x, x, x, y, y, y, y, y, y, y, y, x, x, x, x, x, x, x, x, y, y, y, y,
                y, y, y, y,
            )
        };
        Consts {
            m4: _mm256_set1_epi8(0x0F),
            m30: _mm256_set1_epi8(0x30),
            b16: _mm256_set1_epi8(0x10),
            ones: _mm256_set1_epi16(1),
            qh_lo: spread(0),
            qh_hi: spread(2),
            bit: _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64),
            // Step parity 0: sub-blocks 0, 2 (bits 0, 2) and 1, 3 (bits 1, 3); parity 1:
            // sub-blocks 4, 6 and 5, 7.
            k5: [[lanes(4, 2), lanes(3, 1)], [lanes(0, 2), lanes(1, 3)]],
        }
    }
}

/// The level vectors of one row's step `k` (legacy: its `nblk` blocks), in the pairing of
/// [`dot`]: sub-blocks of 32 — the first halves of the two sub-blocks of reduced vector 0, their
/// second halves, then those of vector 1; Q6_K — the step's 128 levels in element order.
///
/// # Safety
/// AVX2 available; the step's bytes of the row readable (legacy: blocks `4k .. 4k + nblk`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn levels<const K: u8, const FULL: bool>(
    row: *const u8,
    g: Geo,
    k: usize,
    nblk: usize,
    c: &Consts,
) -> [__m256i; 4] {
    let lo = |v: __m256i| _mm256_and_si256(v, c.m4);
    let hi = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(v), c.m4);
    let or = _mm256_or_si256;
    // SAFETY (whole body): every read lies within step k of the row (caller): legacy blocks
    // 4k .. 4k + nblk (16 bytes from the fifth bits end inside a Q5 block), K-quant
    // super-block k / 2.
    unsafe {
        match K {
            L4 | L5 => {
                let b = row.add(4 * k * g.bytes);
                let n23 = nblk.saturating_sub(2);
                let v01 = pair::<FULL>(b.add(g.qs), g.bytes, nblk);
                let v23 = pair::<FULL>(b.add(2 * g.bytes + g.qs), g.bytes, n23);
                let mut w = [lo(v01), hi(v01), lo(v23), hi(v23)];
                if K == L5 {
                    // Byte i of each lane: bit i of its block's fifth bits (first half: bits
                    // 0..16, second: 16..32) as 16.
                    let fifth = |h: __m256i, sel: __m256i| {
                        let x = _mm256_and_si256(_mm256_shuffle_epi8(h, sel), c.bit);
                        _mm256_and_si256(_mm256_cmpeq_epi8(x, c.bit), c.b16)
                    };
                    let h01 = pair::<FULL>(b.add(g.qh), g.bytes, nblk);
                    let h23 = pair::<FULL>(b.add(2 * g.bytes + g.qh), g.bytes, n23);
                    w = [
                        or(w[0], fifth(h01, c.qh_lo)),
                        or(w[1], fifth(h01, c.qh_hi)),
                        or(w[2], fifth(h23, c.qh_lo)),
                        or(w[3], fifth(h23, c.qh_hi)),
                    ];
                }
                w
            }
            L8 => {
                let b = row.add(4 * k * g.bytes + g.qs);
                let (c2, n23) = (b.add(2 * g.bytes), nblk.saturating_sub(2));
                [
                    pair::<FULL>(b, g.bytes, nblk),
                    pair::<FULL>(b.add(16), g.bytes, nblk),
                    pair::<FULL>(c2, g.bytes, n23),
                    pair::<FULL>(c2.add(16), g.bytes, n23),
                ]
            }
            K4 | K5 => {
                let (i, h) = (k / 2, k % 2);
                let b = row.add(i * g.bytes);
                // Chunks 2h and 2h + 1 of the quants: their first 16 bytes, then their last.
                let q = b.add(g.qs + 64 * h);
                let (x, y) = (pair::<true>(q, 32, 2), pair::<true>(q.add(16), 32, 2));
                let mut w = [lo(x), lo(y), hi(x), hi(y)];
                if K == K5 {
                    let q0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(b.add(g.qh).cast()));
                    let q1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(b.add(g.qh + 16).cast()));
                    // The fifth bit of each lane's sub-block moved to bit 4 within its byte (the
                    // bits a 32-bit shift carries in from a neighbouring byte are masked off).
                    let fifth = |v: __m256i, n: __m256i| {
                        let s = if h == 0 {
                            _mm256_sllv_epi32(v, n)
                        } else {
                            _mm256_srlv_epi32(v, n)
                        };
                        _mm256_and_si256(s, c.b16)
                    };
                    let [n0, n1] = c.k5[h];
                    w = [
                        or(w[0], fifth(q0, n0)),
                        or(w[1], fifth(q1, n0)),
                        or(w[2], fifth(q0, n1)),
                        or(w[3], fifth(q1, n1)),
                    ];
                }
                w
            }
            _ => {
                // Q6_K half h: quants 64h .. 64h + 64 (low nibbles: elements 0..64, high:
                // 64..128), high bits 32h .. 32h + 32 (bit pairs 0-1, 2-3, 4-5, 6-7 for
                // elements 0..32, 32..64, 64..96, 96..128), moved to bits 4-5.
                let (i, h) = (k / 2, k % 2);
                let b = row.add(i * g.bytes);
                let ql0 = _mm256_loadu_si256(b.add(64 * h).cast());
                let ql1 = _mm256_loadu_si256(b.add(64 * h + 32).cast());
                let qh = _mm256_loadu_si256(b.add(g.qh + 32 * h).cast());
                let top = |v: __m256i| _mm256_and_si256(v, c.m30);
                [
                    or(lo(ql0), top(_mm256_slli_epi16::<4>(qh))),
                    or(lo(ql1), top(_mm256_slli_epi16::<2>(qh))),
                    or(hi(ql0), top(qh)),
                    or(hi(ql1), top(_mm256_srli_epi16::<2>(qh))),
                ]
            }
        }
    }
}

/// One row step's reduced-vector inputs for one token: the products of the levels `w`
/// ([`levels`]) with the token's step activations `a` (128 bytes), widened to i32 (lanes: four
/// partial sums of one sub-block); [`vectors`] of them are used.
///
/// # Safety
/// AVX2 available; `a .. a + 128` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot<const K: u8>(w: [__m256i; 4], a: *const i8, c: &Consts) -> [__m256i; 4] {
    // SAFETY: 128 readable bytes (caller).
    let av = |i: usize| unsafe { _mm256_loadu_si256(a.add(32 * i).cast()) };
    let wide = |x: __m256i| _mm256_madd_epi16(x, c.ones);
    let mul = _mm256_maddubs_epi16;
    let z = _mm256_setzero_si256();
    match K {
        L8 => {
            let p = |w: __m256i, a: __m256i| {
                wide(_mm256_maddubs_epi16(
                    _mm256_abs_epi8(w),
                    _mm256_sign_epi8(a, w),
                ))
            };
            [
                _mm256_add_epi32(p(w[0], av(0)), p(w[1], av(2))),
                _mm256_add_epi32(p(w[2], av(1)), p(w[3], av(3))),
                z,
                z,
            ]
        }
        K6 => [
            wide(mul(w[0], av(0))),
            wide(mul(w[1], av(1))),
            wide(mul(w[2], av(2))),
            wide(mul(w[3], av(3))),
        ],
        _ => [
            wide(_mm256_add_epi16(mul(w[0], av(0)), mul(w[1], av(2)))),
            wide(_mm256_add_epi16(mul(w[2], av(1)), mul(w[3], av(3)))),
            z,
            z,
        ],
    }
}

/// Four rows' vectors (lane `h` of each: four partial sums of one sub-block) into one vector
/// whose lane `h` holds the four rows' sums of that sub-block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce4(a: [__m256i; 4]) -> __m256i {
    let t0 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(a[0], a[1]),
        _mm256_unpackhi_epi32(a[0], a[1]),
    );
    let t1 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(a[2], a[3]),
        _mm256_unpackhi_epi32(a[2], a[3]),
    );
    _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1))
}

/// What the rows of one step share: the type's geometry, the step `k` (legacy: its `nblk`
/// blocks), the decoders' constants, each token's step activations, the prefetch offset.
struct Step<'a, const T: usize> {
    g: Geo,
    k: usize,
    nblk: usize,
    c: &'a Consts,
    a: [*const i8; T],
    off: usize,
}

/// Row `r` of `p` in step `t`: its levels decoded once ([`levels`]) and dotted with each token
/// ([`dot`]), prefetching `pf[r] + t.off`; legacy: the first 4 bytes of each block into
/// `dm[j][r]`.
///
/// # Safety
/// As [`levels`]; each token's step activations readable; `dm` holds the step's blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_step<const K: u8, const FULL: bool, const T: usize>(
    t: &Step<T>,
    p: &[*const u8; 8],
    pf: &[*const u8; 8],
    r: usize,
    dm: &mut [[u32; 8]],
) -> [[__m256i; 4]; T] {
    let row = p[r];
    let nblk = if FULL { 4 } else { t.nblk };
    let lines = if K == L8 { 3 } else { 2 };
    let at = pf[r].wrapping_add(t.off);
    for l in 0..lines {
        // A hint that never faults (any address); into L2, as the VNNI kernel.
        _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(64 * l).cast());
    }
    if blocky(K) {
        for (j, d) in dm.iter_mut().take(nblk).enumerate() {
            // SAFETY: the first 4 bytes of block 4k + j of the row (caller).
            d[r] = unsafe {
                row.add((4 * t.k + j) * t.g.bytes)
                    .cast::<u32>()
                    .read_unaligned()
            };
        }
    }
    // SAFETY: step k of the row and the tokens' activations (caller).
    unsafe {
        let w = levels::<K, FULL>(row, t.g, t.k, nblk, t.c);
        let mut out = [[_mm256_setzero_si256(); 4]; T];
        for (o, &a) in out.iter_mut().zip(&t.a) {
            *o = dot::<K>(w, a, t.c);
        }
        out
    }
}

/// Step `t` of the 8 rows `p`: `sums[x][j]` = the 8 rows' sums of the step's sub-block `j` for
/// token `x`; legacy: the first 4 bytes of each block `j` into `dm[j][row]`. Prefetches at
/// `pf[row] + t.off`. Per quad of rows, the four rows' vectors are summed and transposed
/// ([`reduce4`]), the two quads joined by 128-bit permutes.
///
/// Loops with one call site each: the helpers are then inlined (two call sites of a quad's
/// body left it out of line for some types, a closure handed to `std::array::from_fn` without
/// the target features; Q8_0 ran 25% slower). `MIN` and `SEED` are the group's, unused here:
/// one instance per group instance, so every instance has one call site and is inlined (shared
/// by the Q4_0 and Q4_1 groups, it stayed out of line, and the f32 steps' accumulators went
/// through memory around the call).
///
/// # Safety
/// AVX2 available; the step readable in every row; `pf[row] + t.off` need not be valid.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step8<
    const K: u8,
    const FULL: bool,
    const T: usize,
    const MIN: bool,
    const SEED: bool,
>(
    t: &Step<T>,
    p: &[*const u8; 8],
    pf: &[*const u8; 8],
    sums: &mut [[[i32; 8]; 8]; T],
    dm: &mut [[u32; 8]; 4],
) {
    let zero = _mm256_setzero_si256();
    let mut u = [[[zero; 4]; T]; 2];
    for (q, u) in u.iter_mut().enumerate() {
        let mut v = [[[zero; 4]; T]; 4];
        for (r, v) in v.iter_mut().enumerate() {
            // SAFETY: as for the step (caller).
            *v = unsafe { row_step::<K, FULL, T>(t, p, pf, 4 * q + r, dm) };
        }
        for (x, u) in u.iter_mut().enumerate() {
            for (i, u) in u.iter_mut().enumerate().take(vectors(K)) {
                *u = reduce4([v[0][x][i], v[1][x][i], v[2][x][i], v[3][x][i]]);
            }
        }
    }
    for (x, sums) in sums.iter_mut().enumerate() {
        for v in 0..vectors(K) {
            let halves = [
                _mm256_permute2x128_si256::<0x20>(u[0][x][v], u[1][x][v]),
                _mm256_permute2x128_si256::<0x31>(u[0][x][v], u[1][x][v]),
            ];
            for (h, s) in halves.into_iter().enumerate() {
                let o: &mut [i32; 8] = &mut sums[sub_at(K, v, h)];
                // SAFETY: 8 writable i32.
                unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), s) };
            }
        }
    }
}

/// The 16 bytes at `rows[k] + off` of 8 rows as four vectors of dwords, row `k` in lane `k`:
/// `out[i]` lane `k` = dword `i` of row `k`'s 16 bytes.
///
/// # Safety
/// AVX2 available; `rows[k] + off .. + 16` readable for every `k`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows8x4(rows: &[*const u8; 8], off: usize) -> [__m256i; 4] {
    // SAFETY: 16 readable bytes at each rows[k] + off (caller).
    let l = |k: usize| unsafe { _mm_loadu_si128(rows[k].add(off).cast()) };
    // z[a]: rows a (low lane) and a + 4.
    let z = |a: usize| _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(l(a)), l(a + 4));
    let z = [z(0), z(1), z(2), z(3)];
    let t0 = _mm256_unpacklo_epi32(z[0], z[1]);
    let t1 = _mm256_unpackhi_epi32(z[0], z[1]);
    let t2 = _mm256_unpacklo_epi32(z[2], z[3]);
    let t3 = _mm256_unpackhi_epi32(z[2], z[3]);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// The f16 in the low (`HIGH` false) or high half of each dword lane, as 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn f16_lanes8<const HIGH: bool>(v: __m256i) -> __m256 {
    let (a, b) = if HIGH { (2, 3) } else { (0, 1) };
    let sel = _mm256_setr_epi8(
        a,
        b,
        a + 4,
        b + 4,
        a + 8,
        b + 8,
        a + 12,
        b + 12,
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
        a,
        b,
        a + 4,
        b + 4,
        a + 8,
        b + 8,
        a + 12,
        b + 12,
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
    );
    // Each lane's four halves in its low 8 bytes; quadwords 0 and 2 to the low 128 bits.
    let x = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_shuffle_epi8(v, sel));
    _mm256_cvtph_ps(_mm256_castsi256_si128(x))
}

/// The Q4_K/Q5_K factors of 8 rows from their super-block headers (`h`: dwords 0..4 of each
/// row's header, row per lane): per sub-block the scale `d · sc` and the minimum `−dmin · m`,
/// the portable converter's f32 products. The 16 six-bit fields are first assembled as bytes,
/// four per dword (scales 0..4, minima 0..4, scales 4..8, minima 4..8: 10 operations), then
/// each moved to its dword's low byte by one byte shuffle. (The factors took 16% of the Q4_K
/// kernel's time with a shift and a mask per field; this form: 119 → 110 ns per row of 4096,
/// L2-resident.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn k4_factors8(h: [__m256i; 4]) -> ([__m256; 8], [__m256; 8]) {
    let [dd, s0, s1, s2] = h;
    let d = f16_lanes8::<false>(dd);
    let dmin = _mm256_xor_ps(f16_lanes8::<true>(dd), _mm256_set1_ps(-0.0));
    let (m6, m4, m30) = (
        _mm256_set1_epi8(0x3F),
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi8(0x30),
    );
    let (and, or) = (_mm256_and_si256, _mm256_or_si256);
    // Scales and minima 4..8: the low (scales) or high (minima) nibble of bytes 8..12, their top
    // two bits from the top two of bytes 0..4 or 4..8 (a 32-bit shift by 2 carries in bits of
    // the next byte only above bit 5, masked off).
    let f = [
        and(s0, m6),
        and(s1, m6),
        or(and(s2, m4), and(_mm256_srli_epi32::<2>(s0), m30)),
        or(
            and(_mm256_srli_epi32::<4>(s2), m4),
            and(_mm256_srli_epi32::<2>(s1), m30),
        ),
    ];
    // Byte j of each dword as a number.
    let byte = |v: __m256i, j: i8| {
        let (a, b, c, e) = (j, j + 4, j + 8, j + 12);
        let sel = _mm256_setr_epi8(
            a, -1, -1, -1, b, -1, -1, -1, c, -1, -1, -1, e, -1, -1, -1, a, -1, -1, -1, b, -1, -1,
            -1, c, -1, -1, -1, e, -1, -1, -1,
        );
        _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, sel))
    };
    let mut k = [_mm256_setzero_ps(); 8];
    let mut m = [_mm256_setzero_ps(); 8];
    for j in 0..4 {
        k[j] = _mm256_mul_ps(d, byte(f[0], j as i8));
        m[j] = _mm256_mul_ps(dmin, byte(f[1], j as i8));
        k[4 + j] = _mm256_mul_ps(d, byte(f[2], j as i8));
        m[4 + j] = _mm256_mul_ps(dmin, byte(f[3], j as i8));
    }
    (k, m)
}

/// The outputs of 16 rows `p` (the next group's rows `next`, for prefetching) for each of the
/// `T` tokens of `acts` into `out[token]`, as two halves of 8 rows: the levels of each row step
/// are decoded once for all tokens.
///
/// The f32 steps are a chain of dependent multiply-adds per half and token ([`chain`]); two
/// halves give two independent chains, and a step's chain runs after the next step's products,
/// so its latency overlaps them (one half alone, its chain right after its step or per chunk of
/// two steps, the chain's latency showed: the Q4_K kernel ran 140 ns per row of 4096,
/// L2-resident, 42% of the samples in the chain).
///
/// # Safety
/// As [`rows`]; every `p[k]` and `next[k]` points at a readable row.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const K: u8, const MIN: bool, const SEED: bool, const T: usize>(
    p: &[*const u8; 16],
    next: &[*const u8; 16],
    g: Geo,
    acts: &GemvActs,
    out: &mut [[f32; 16]; T],
) {
    let c = &Consts::new();
    let legacy = blocky(K);
    let cols = acts.base.cols;
    let nb = cols / QB;
    let step_bytes = if legacy { 4 * g.bytes } else { g.bytes / 2 };
    let (steps, ahead) = (cols.div_ceil(STEP), PREFETCH.div_ceil(step_bytes));
    let tq = acts.q.len() / T;
    let half =
        |v: &[*const u8; 16], h: usize| -> [*const u8; 8] { std::array::from_fn(|k| v[8 * h + k]) };
    let (ph, nh) = ([half(p, 0), half(p, 1)], [half(next, 0), half(next, 1)]);
    let mut f = [[_mm256_setzero_ps(); 2]; T];
    // Two steps' integer sums (per half, token, sub-block of the step and row) and legacy
    // block headers (per half, block of the step and row, the first four bytes of the row's
    // block: d, and the minimum of Q4_1/Q5_1), alternating; the current super-block's factors
    // (K-quants) per half.
    let mut sums = [[[[[0i32; 8]; 8]; T]; 2]; 2];
    let mut dm = [[[[0u32; 8]; 4]; 2]; 2];
    let zero = Factors {
        k: [_mm256_setzero_ps(); 16],
        m: [_mm256_setzero_ps(); 8],
    };
    let mut fac = [zero, zero];
    // Step k's products, then step k − 1's f32 steps (one call site each: both inlined).
    for k in 0..=steps {
        if k < steps {
            let (to_next, off) = prefetch_at(k, steps, ahead, step_bytes);
            let t = Step {
                g,
                k,
                nblk: if legacy { (nb - 4 * k).min(4) } else { 4 },
                c,
                a: std::array::from_fn(|x| acts.q.as_ptr().wrapping_add(x * tq + k * STEP)),
                off,
            };
            for h in 0..2 {
                let pf = if to_next { &nh[h] } else { &ph[h] };
                let (sk, dk) = (&mut sums[k % 2][h], &mut dm[k % 2][h]);
                // SAFETY: step k lies in every row (caller) and in every token's activations
                // (the layout holds whole steps per token).
                unsafe {
                    if t.nblk == 4 {
                        step8::<K, true, T, MIN, SEED>(&t, &ph[h], pf, sk, dk);
                    } else {
                        step8::<K, false, T, MIN, SEED>(&t, &ph[h], pf, sk, dk);
                    }
                }
            }
        }
        if k > 0 {
            let j = (k - 1) % 2;
            // SAFETY: step k − 1 lies in every row (caller).
            f = unsafe {
                chain::<K, MIN, SEED, T>(f, k - 1, acts, g, &ph, &sums[j], &dm[j], &mut fac)
            };
        }
    }
    for (o, f) in out.iter_mut().zip(f) {
        // SAFETY: 16 writable f32.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), f[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), f[1]);
        }
    }
}

/// A K-quant super-block's factors of 8 rows: per sub-block the scales and (Q4_K/Q5_K) minima.
#[derive(Clone, Copy)]
struct Factors {
    k: [__m256; 16],
    m: [__m256; 8],
}

/// The f32 steps of step `k`'s sub-blocks for each token and half (accumulators `f`),
/// ascending ([`super::dot_converted`]'s order, one row per lane; the halves' chains
/// interleaved): `fma(f32(I), k · d, acc)` with `I` the sub-block's sum (and seed), and with a
/// minimum `fma(m, sa, acc)`. The step's sums are `sums`, legacy block headers `dm`; the
/// K-quants' factors are made at a super-block's first step into `fac`.
///
/// # Safety
/// AVX2 available; step `k` lies in every row of `p`; `acts` as for [`rows`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn chain<const K: u8, const MIN: bool, const SEED: bool, const T: usize>(
    mut f: [[__m256; 2]; T],
    k: usize,
    acts: &GemvActs,
    g: Geo,
    p: &[[*const u8; 8]; 2],
    sums: &[[[[i32; 8]; 8]; T]; 2],
    dm: &[[[u32; 8]; 4]; 2],
    fac: &mut [Factors; 2],
) -> [[__m256; 2]; T] {
    let b = &acts.base;
    let per = if K == K6 { 16 } else { QB };
    let (nb, subs) = (b.cols / QB, b.subs);
    let s0 = k * STEP / per;
    // Sub-block j: per token and half, the scale's step with factors `kf[half]`, then (`m`)
    // the minimum's.
    let sub = |f: &mut [[__m256; 2]; T], j: usize, kf: [__m256; 2], m: Option<[__m256; 2]>| {
        for (x, f) in f.iter_mut().enumerate() {
            let da = _mm256_set1_ps(b.d[x * nb + (s0 + j) * per / QB]);
            for (h, f) in f.iter_mut().enumerate() {
                // SAFETY: 8 i32 of the step's sub-block j of token x, half h.
                let mut i = unsafe { _mm256_loadu_si256(sums[h][x][j].as_ptr().cast()) };
                if SEED {
                    i = _mm256_add_epi32(i, _mm256_set1_epi32(b.seed[x * subs + s0 + j]));
                }
                *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(kf[h], da), *f);
            }
            if let Some(m) = m {
                let sa = _mm256_set1_ps(b.sa[x * subs + s0 + j]);
                for (h, f) in f.iter_mut().enumerate() {
                    *f = _mm256_fmadd_ps(m[h], sa, *f);
                }
            }
        }
    };
    if blocky(K) {
        let n = (b.cols - k * STEP).min(STEP) / QB;
        for (j, (d0, d1)) in dm[0].iter().zip(&dm[1]).take(n).enumerate() {
            // SAFETY: 8 u32 of block j of each half.
            let x = unsafe {
                [
                    _mm256_loadu_si256(d0.as_ptr().cast()),
                    _mm256_loadu_si256(d1.as_ptr().cast()),
                ]
            };
            let m = MIN.then(|| [f16_lanes8::<true>(x[0]), f16_lanes8::<true>(x[1])]);
            sub(
                &mut f,
                j,
                [f16_lanes8::<false>(x[0]), f16_lanes8::<false>(x[1])],
                m,
            );
        }
        return f;
    }
    let (i, h) = (k / 2, k % 2);
    if h == 0 {
        let base = i * g.bytes;
        for (p, fac) in p.iter().zip(fac.iter_mut()) {
            if K == K6 {
                // SAFETY: bytes 192..208 and 194..210 of super-block i of every row (caller).
                let (sc, dd) = unsafe {
                    (
                        rows8x4(p, base + q6k::SC),
                        rows8x4(p, base + q6k::D - 14)[3],
                    )
                };
                let dd = f16_lanes8::<true>(dd);
                for (m, k) in fac.k.iter_mut().enumerate() {
                    // Scale byte m, sign-extended: byte m % 4 of dword m / 4.
                    let v = _mm256_sll_epi32(sc[m / 4], _mm_cvtsi32_si128(24 - 8 * (m % 4) as i32));
                    *k = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(v)));
                }
            } else {
                // SAFETY: the 16-byte header of super-block i of every row (caller).
                let (k, m) = k4_factors8(unsafe { rows8x4(p, base) });
                fac.k[..8].copy_from_slice(&k);
                fac.m = m;
            }
        }
    }
    if K == K6 {
        for j in 0..8 {
            sub(&mut f, j, [fac[0].k[8 * h + j], fac[1].k[8 * h + j]], None);
        }
    } else {
        for j in 0..4 {
            let s = 4 * h + j;
            let m = Some([fac[0].m[s], fac[1].m[s]]);
            sub(&mut f, j, [fac[0].k[s], fac[1].k[s]], m);
        }
    }
    f
}
