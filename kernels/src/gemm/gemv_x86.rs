//! x86-64 kernel of the decode path ([`super::gemv`]): AVX-512 VNNI, 16 rows per call.

use std::arch::x86_64::*;

use super::gemv::{
    for_groups, prefetch_at, GemvActs, Geo, Kind, CHUNK, MAX_TOKENS, NIBBLE_LANES, PREFETCH, STEP,
};
use super::x86::{f16_lanes, k4_factors16, rows16x4};
use super::{Converter, QB};
use crate::quant::kquants::{q2k, q3k, q6k, QK_K};
use crate::quant::lut4;

/// Decoder ids (the kernel's const parameter).
const L4: u8 = 0;
const L5: u8 = 1;
const L8: u8 = 2;
const K4: u8 = 3;
const K5: u8 = 4;
const K6: u8 = 5;
/// IQ4_NL and MXFP4: blocks of 32 as Q4_0's, levels through a 16-byte table.
const LN: u8 = 6;
const LM: u8 = 7;
/// IQ4_XS: super-blocks of eight runs of 32 as Q4_0's blocks, levels through the table.
const LX: u8 = 8;
/// Q2_K and Q3_K: 2-bit groups of 32 (Q3_K: a third bit from the high-bit mask), sub-blocks
/// of 16.
const Q2: u8 = 9;
const Q3: u8 = 10;

/// Whether decoder `k` has sub-blocks of 16 (two accumulators per row and step, element order).
const fn sub16(k: u8) -> bool {
    k == K6 || k == Q2 || k == Q3
}

/// Whether decoder `k` reads blocks of 32 with their scale in the first bytes (Q4_0 … Q8_0,
/// IQ4_NL, MXFP4) rather than super-blocks of 256.
const fn blocky(k: u8) -> bool {
    k <= L8 || k == LN || k == LM
}

/// Outputs of rows `r0 .. r0 + outs[0].len()` of the matrix `data` (row `r` at `r · wrb`) for
/// each token `t` of `acts` into `outs[t]`, 16 rows at a time.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; the rows lie in `data` and hold `acts.base.cols` elements of
/// `conv.ty` (decoded by `kind`) in `wrb` bytes each; `acts` was built for `conv` and `kind`
/// and holds `outs.len()` (1 to [`MAX_TOKENS`]) tokens; every `outs[t]` has the same length.
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
    // One instance per decoder and token count.
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
    // converter's flags (minimum, offset) match the const parameters.
    unsafe {
        match (kind, conv.min, seed) {
            (Kind::Legacy4, false, true) => go!(L4, false, true),
            (Kind::Legacy4, true, false) => go!(L4, true, false),
            (Kind::Legacy5, false, true) => go!(L5, false, true),
            (Kind::Legacy5, true, false) => go!(L5, true, false),
            (Kind::Legacy8, false, true) => go!(L8, false, true),
            (Kind::K2, true, false) => go!(Q2, true, false),
            (Kind::K3, false, true) => go!(Q3, false, true),
            (Kind::K4, true, false) => go!(K4, true, false),
            (Kind::K5, true, false) => go!(K5, true, false),
            (Kind::K6, false, true) => go!(K6, false, true),
            (Kind::Iq4Nl, false, true) => go!(LN, false, true),
            (Kind::Mxfp4, false, true) => go!(LM, false, true),
            (Kind::Iq4Xs, false, true) => go!(LX, false, true),
            (k, m, s) => unreachable!("no decode kernel for {k:?} with minimum {m}, seed {s}"),
        }
    }
}

/// The 16 bytes at `p + j · stride` for `j < n` (`n ≤ 4`) as the lanes of one vector, zeros
/// after.
///
/// # Safety
/// AVX-512F available; the `n` 16-byte ranges readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn lanes4<const FULL: bool>(p: *const u8, stride: usize, n: usize) -> __m512i {
    let n = if FULL { 4 } else { n };
    // SAFETY: lane j < n reads p + j·stride .. + 16 (caller).
    unsafe {
        let l = |j: usize| _mm_loadu_si128(p.add(j * stride).cast());
        let mut v = _mm512_zextsi128_si512(l(0));
        if n > 1 {
            v = _mm512_inserti32x4::<1>(v, l(1));
        }
        if n > 2 {
            v = _mm512_inserti32x4::<2>(v, l(2));
        }
        if n > 3 {
            v = _mm512_inserti32x4::<3>(v, l(3));
        }
        v
    }
}

/// The MXFP4 scale `2^(e − 128)` ([`lut4::e8m0_half`]) of 16 rows from the first byte `e` of
/// each dword lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn e8m0_half16(x: __m512i) -> __m512 {
    let e = _mm512_and_si512(x, _mm512_set1_epi32(0xFF));
    // e ≥ 2: the exponent field e − 1; e < 2: the subnormals 2^−128 and 2^−127.
    let normal = _mm512_slli_epi32::<23>(_mm512_sub_epi32(e, _mm512_set1_epi32(1)));
    let small = _mm512_sllv_epi32(_mm512_set1_epi32(0x0020_0000), e);
    let lt2 = _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2));
    _mm512_castsi512_ps(_mm512_mask_blend_epi32(lt2, normal, small))
}

/// The IQ4_XS factors of 16 rows from their super-block headers (`h`: dwords 0..4 of each row's
/// header, row per lane): per run `j` the scale `d · (ls_j − 32)` ([`lut4::iq4xs_scale`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn iq4xs_factors16(h: [__m512i; 4]) -> [__m512; 8] {
    let d = f16_lanes::<false>(h[0]);
    // scales_h: the high 16 bits of dword 0; scales_l: dword 1.
    let (sh, sl) = (_mm512_srli_epi32::<16>(h[0]), h[1]);
    let sr = |v: __m512i, n: i32| _mm512_srl_epi32(v, _mm_cvtsi32_si128(n));
    std::array::from_fn(|j| {
        let lo = _mm512_and_si512(sr(sl, 4 * j as i32), _mm512_set1_epi32(0x0F));
        let hi = _mm512_and_si512(sr(sh, 2 * j as i32), _mm512_set1_epi32(3));
        let ls = _mm512_or_si512(lo, _mm512_slli_epi32::<4>(hi));
        let v = _mm512_sub_epi32(ls, _mm512_set1_epi32(32));
        _mm512_mul_ps(d, _mm512_cvtepi32_ps(v))
    })
}

/// Four rows' accumulators (lane `j` of each: four partial sums of sub-block `j`) into one
/// vector whose lane `j` holds the four rows' sums of sub-block `j`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn reduce4(a: [__m512i; 4]) -> __m512i {
    let t0 = _mm512_add_epi32(
        _mm512_unpacklo_epi32(a[0], a[1]),
        _mm512_unpackhi_epi32(a[0], a[1]),
    );
    let t1 = _mm512_add_epi32(
        _mm512_unpacklo_epi32(a[2], a[3]),
        _mm512_unpackhi_epi32(a[2], a[3]),
    );
    _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1))
}

/// A 4 × 4 transpose of 128-bit lanes: `out[j]` lane `q` = `u[q]` lane `j`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn transpose4(u: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[0], u[1]);
    let t1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[0], u[1]);
    let t2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[2], u[3]);
    let t3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[2], u[3]);
    [
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t0, t2),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t0, t2),
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t1, t3),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t1, t3),
    ]
}

/// Constants of the row decoders.
#[derive(Clone, Copy)]
struct Consts {
    m4: __m512i,
    b16: __m512i,
    flip: __m512i,
    m30: __m512i,
    /// Q5_K: per lane the bit of its sub-block `4h + j` (`h` = step parity).
    sel: [__m512i; 2],
    /// Q5_0/Q5_1: per byte `i` of a lane, the byte of the fifth bits holding bit `i` of the
    /// first (`qh_lo`) or second half; `bit`: `1 << (i % 8)`.
    qh_lo: __m512i,
    qh_hi: __m512i,
    bit: __m512i,
    /// Q6_K: 16-bit shift counts of the high bits for the first and second vectors.
    shl: __m512i,
    shr: __m512i,
    /// IQ4_NL/IQ4_XS/MXFP4: the table's levels plus 128 (the converter's bytes) in every lane.
    tbl: __m512i,
    /// Q2_K/Q3_K: 16-bit shift counts of the second vector's groups (the first's are `shr`),
    /// the 2-bit mask, the third bit's value and (Q3_K) per step parity `h` the mask bits of
    /// the two vectors' groups in the high-bit bytes.
    sh46: __m512i,
    m3: __m512i,
    b4: __m512i,
    hb: [__m512i; 4],
}

impl Consts {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn new<const K: u8>() -> Consts {
        let lanes = |v: [i32; 4]| {
            _mm512_setr_epi32(
                v[0], v[0], v[0], v[0], v[1], v[1], v[1], v[1], v[2], v[2], v[2], v[2], v[3], v[3],
                v[3], v[3],
            )
        };
        let bits = |h: u32| {
            // Lane l: bit 4h + j in every byte for the sub-block j it holds (the top one sets
            // the sign bit of the dword).
            let b = |l: usize| (0x0101_0101u32 << (4 * h + NIBBLE_LANES[l] as u32)) as i32;
            lanes([b(0), b(1), b(2), b(3)])
        };
        let w = |s: i32| s | (s << 16);
        Consts {
            m4: _mm512_set1_epi8(0x0F),
            b16: _mm512_set1_epi8(0x10),
            flip: _mm512_set1_epi8(-128),
            m30: _mm512_set1_epi8(0x30),
            sel: [bits(0), bits(1)],
            qh_lo: _mm512_broadcast_i32x4(_mm_set_epi64x(0x0101_0101_0101_0101, 0)),
            qh_hi: _mm512_broadcast_i32x4(_mm_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
            )),
            bit: _mm512_set1_epi64(0x8040_2010_0804_0201_u64 as i64),
            shl: lanes([w(4), w(4), w(2), w(2)]),
            shr: lanes([w(0), w(0), w(2), w(2)]),
            sh46: lanes([w(4), w(4), w(6), w(6)]),
            m3: _mm512_set1_epi8(3),
            b4: _mm512_set1_epi8(4),
            hb: std::array::from_fn(|v| {
                // Vector v = 2h + x holds groups 2x, 2x + 1 of step h: bits 4h + 2x (+1).
                let b = |g: usize| (0x0101_0101u32 << (2 * v + g)) as i32;
                lanes([b(0), b(0), b(1), b(1)])
            }),
            tbl: {
                let t = if K == LM { &lut4::FP4 } else { &lut4::NL };
                let u: [u8; 16] = std::array::from_fn(|i| (t[i] as u8) ^ 0x80);
                // SAFETY: 16 readable bytes.
                _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(u.as_ptr().cast()) })
            },
        }
    }
}

/// The accumulators of one row's step `k` (one; Q6_K two): `seed` plus the products of the
/// row's levels with the step's activations `a`. `row` points at the row's first byte; legacy
/// steps hold `nblk` blocks.
///
/// # Safety
/// AVX-512 VNNI available; the step's bytes of the row readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn levels<const K: u8, const FULL: bool>(
    row: *const u8,
    g: Geo,
    k: usize,
    nblk: usize,
    c: &Consts,
) -> [__m512i; 2] {
    // SAFETY (whole body): every read lies within step k of the row (caller): legacy blocks
    // 4k .. 4k + nblk, K-quant super-block k / 2.
    unsafe {
        match K {
            L4 | L5 => {
                let b = row.add(4 * k * g.bytes);
                let v = lanes4::<FULL>(b.add(g.qs), g.bytes, nblk);
                let mut lo = _mm512_and_si512(v, c.m4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), c.m4);
                if K == L5 {
                    // Byte i of each lane tests bit i of its block's fifth bits (first half:
                    // bits 0..16, second: 16..32).
                    let h = lanes4::<FULL>(b.add(g.qh), g.bytes, nblk);
                    let kp = _mm512_test_epi8_mask(_mm512_shuffle_epi8(h, c.qh_lo), c.bit);
                    let kq = _mm512_test_epi8_mask(_mm512_shuffle_epi8(h, c.qh_hi), c.bit);
                    lo = _mm512_mask_add_epi8(lo, kp, lo, c.b16);
                    hi = _mm512_mask_add_epi8(hi, kq, hi, c.b16);
                }
                [lo, hi]
            }
            Q2 | Q3 => {
                // Groups 0, 1 of the step's 32 bytes (bits 0..2, 2..4) in the first vector,
                // groups 2, 3 in the second: the elements in order.
                let (i, h) = (k / 2, k % 2);
                let b = row.add(i * g.bytes);
                let hq = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(g.qs + 32 * h).cast()));
                let mut lo = _mm512_and_si512(_mm512_srlv_epi16(hq, c.shr), c.m3);
                let mut hi = _mm512_and_si512(_mm512_srlv_epi16(hq, c.sh46), c.m3);
                if K == Q3 {
                    let hm = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.cast()));
                    let (kl, kh) = (
                        _mm512_test_epi8_mask(hm, c.hb[2 * h]),
                        _mm512_test_epi8_mask(hm, c.hb[2 * h + 1]),
                    );
                    lo = _mm512_mask_add_epi8(lo, kl, lo, c.b4);
                    hi = _mm512_mask_add_epi8(hi, kh, hi, c.b4);
                }
                [lo, hi]
            }
            LN | LM | LX => {
                // Four runs of 32 (blocks, or an IQ4_XS step's runs), low nibbles first.
                let v = if K == LX {
                    _mm512_loadu_si512(row.add((k / 2) * g.bytes + g.qs + 64 * (k % 2)).cast())
                } else {
                    lanes4::<FULL>(row.add(4 * k * g.bytes + g.qs), g.bytes, nblk)
                };
                let lo = _mm512_shuffle_epi8(c.tbl, _mm512_and_si512(v, c.m4));
                let hi =
                    _mm512_shuffle_epi8(c.tbl, _mm512_and_si512(_mm512_srli_epi16::<4>(v), c.m4));
                [lo, hi]
            }
            L8 => {
                let b = row.add(4 * k * g.bytes + g.qs);
                let lo = _mm512_xor_si512(lanes4::<FULL>(b, g.bytes, nblk), c.flip);
                let hi = _mm512_xor_si512(lanes4::<FULL>(b.add(16), g.bytes, nblk), c.flip);
                [lo, hi]
            }
            K4 | K5 => {
                let (i, h) = (k / 2, k % 2);
                let b = row.add(i * g.bytes);
                let v = _mm512_loadu_si512(b.add(g.qs + 64 * h).cast());
                let lo = _mm512_and_si512(v, c.m4);
                // Q4_K: the high nibbles in place (16 × the level; the sums of the sub-blocks
                // they feed are divided by 16 after the reduction), saving a shift per row.
                let hi = if K == K4 {
                    _mm512_andnot_si512(c.m4, v)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v), c.m4)
                };
                // First halves of sub-blocks 0, 2 (low nibbles), 1, 3 (high), then the second
                // halves: the lane order of `Kind::lane`.
                let mut x = _mm512_shuffle_i64x2::<0b10_00_10_00>(lo, hi);
                let mut y = _mm512_shuffle_i64x2::<0b11_01_11_01>(lo, hi);
                if K == K5 {
                    let q0 = _mm512_broadcast_i32x4(_mm_loadu_si128(b.add(g.qh).cast()));
                    let q1 = _mm512_broadcast_i32x4(_mm_loadu_si128(b.add(g.qh + 16).cast()));
                    x = _mm512_mask_add_epi8(x, _mm512_test_epi8_mask(q0, c.sel[h]), x, c.b16);
                    y = _mm512_mask_add_epi8(y, _mm512_test_epi8_mask(q1, c.sel[h]), y, c.b16);
                }
                [x, y]
            }
            _ => {
                let (i, h) = (k / 2, k % 2);
                let b = row.add(i * g.bytes);
                let ab = _mm512_loadu_si512(b.add(g.qs + 64 * h).cast());
                let hq = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(g.qh + 32 * h).cast()));
                let lo = _mm512_or_si512(
                    _mm512_and_si512(ab, c.m4),
                    _mm512_and_si512(_mm512_sllv_epi16(hq, c.shl), c.m30),
                );
                let hi = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ab), c.m4),
                    _mm512_and_si512(_mm512_srlv_epi16(hq, c.shr), c.m30),
                );
                [lo, hi]
            }
        }
    }
}

/// The accumulators of one row's step for one token: `seed` plus the products of the step's
/// levels `v` ([`levels`]) with the token's activations `a` — one accumulator (the second
/// vector unused), or for sub-blocks of 16 one per vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot<const K: u8>(v: [__m512i; 2], a: [__m512i; 2], seed: [__m512i; 2]) -> [__m512i; 2] {
    if sub16(K) {
        [
            _mm512_dpbusd_epi32(seed[0], v[0], a[0]),
            _mm512_dpbusd_epi32(seed[1], v[1], a[1]),
        ]
    } else {
        let acc = _mm512_dpbusd_epi32(seed[0], v[0], a[0]);
        [_mm512_dpbusd_epi32(acc, v[1], a[1]), seed[1]]
    }
}

/// What the rows of one step share: the type's geometry, the step `k` (legacy: its `nblk`
/// blocks), the decoders' constants, each token's activations and seeds, the prefetch offset.
#[derive(Clone, Copy)]
struct Step<'a, const T: usize> {
    g: Geo,
    k: usize,
    nblk: usize,
    c: &'a Consts,
    a: [[__m512i; 2]; T],
    seed: [[__m512i; 2]; T],
    off: usize,
}

/// Row `r` of `p` in step `t`: its levels decoded once ([`levels`]) and dotted with each token
/// ([`dot`]), prefetching `pf[r] + t.off`; legacy: the first 4 bytes of each block into
/// `dm[j][r]`.
///
/// # Safety
/// As [`levels`]; `dm` holds the step's blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn row_step<const K: u8, const FULL: bool, const T: usize>(
    t: &Step<T>,
    p: &[*const u8; 16],
    pf: &[*const u8; 16],
    r: usize,
    dm: &mut [[u32; 16]],
) -> [[__m512i; 2]; T] {
    let row = p[r];
    let nblk = if FULL { 4 } else { t.nblk };
    let lines = if K == L8 { 3 } else { 2 };
    let at = pf[r].wrapping_add(t.off);
    for l in 0..lines {
        // A hint that never faults (any address); into L2, where 16 rows' next steps fit
        // without evicting the current ones from L1.
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
    // SAFETY: step k of the row (caller).
    let v = unsafe { levels::<K, FULL>(row, t.g, t.k, nblk, t.c) };
    std::array::from_fn(|x| dot::<K>(v, t.a[x], t.seed[x]))
}

/// Rows `4q .. 4q + 4` of step `t`: per token their accumulators summed and transposed
/// ([`reduce4`]); the second accumulators of sub-blocks of 16 into the second vector.
///
/// # Safety
/// As [`row_step`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quad<const K: u8, const FULL: bool, const T: usize>(
    t: &Step<T>,
    p: &[*const u8; 16],
    pf: &[*const u8; 16],
    q: usize,
    dm: &mut [[u32; 16]],
) -> [[__m512i; 2]; T] {
    // SAFETY: as for the step (caller).
    let v = unsafe {
        [
            row_step::<K, FULL, T>(t, p, pf, 4 * q, dm),
            row_step::<K, FULL, T>(t, p, pf, 4 * q + 1, dm),
            row_step::<K, FULL, T>(t, p, pf, 4 * q + 2, dm),
            row_step::<K, FULL, T>(t, p, pf, 4 * q + 3, dm),
        ]
    };
    std::array::from_fn(|x| {
        let lo = reduce4([v[0][x][0], v[1][x][0], v[2][x][0], v[3][x][0]]);
        let hi = if sub16(K) {
            reduce4([v[0][x][1], v[1][x][1], v[2][x][1], v[3][x][1]])
        } else {
            lo
        };
        [lo, hi]
    })
}

/// Step `t` of 16 rows `p`: `sums[x][sub + j]` = the 16 rows' sums of the step's sub-block `j`
/// for token `x`; legacy: the first 4 bytes of each block into `dm[j][row]`. Prefetches at
/// `pf[row] + t.off`.
///
/// # Safety
/// AVX-512 VNNI available; the step readable in every row; `sums` holds the step's sub-blocks
/// from `sub` (4, sub-blocks of 16: 8), `dm` its blocks; `pf[row] + t.off` need not be valid.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn step16<const K: u8, const FULL: bool, const T: usize>(
    t: &Step<T>,
    p: &[*const u8; 16],
    pf: &[*const u8; 16],
    sums: &mut [[[i32; 16]; CHUNK / 16]; T],
    sub: usize,
    dm: &mut [[u32; 16]],
) {
    // SAFETY: as for the step (caller).
    let u = unsafe {
        [
            quad::<K, FULL, T>(t, p, pf, 0, dm),
            quad::<K, FULL, T>(t, p, pf, 1, dm),
            quad::<K, FULL, T>(t, p, pf, 2, dm),
            quad::<K, FULL, T>(t, p, pf, 3, dm),
        ]
    };
    let halves = if sub16(K) { 2 } else { 1 };
    for (x, sums) in sums.iter_mut().enumerate() {
        for h in 0..halves {
            let v = transpose4([u[0][x][h], u[1][x][h], u[2][x][h], u[3][x][h]]);
            for (l, v) in v.into_iter().enumerate() {
                let j = if K == K4 || K == K5 {
                    NIBBLE_LANES[l]
                } else {
                    l
                };
                // Q4_K's odd sub-blocks were summed at 16 × their levels: exact multiples of 16.
                let v = if K == K4 && j % 2 == 1 {
                    _mm512_srai_epi32::<4>(v)
                } else {
                    v
                };
                // SAFETY: sub-block 4h + j of the step is in `sums` (caller).
                unsafe { _mm512_storeu_si512(sums[sub + 4 * h + j].as_mut_ptr().cast(), v) };
            }
        }
    }
}

/// [`rows`] for one decoder: `K`, `MIN` and `SEED` those of the weight type, `g` its geometry.
/// The row pointers of each group of 16 are made by arithmetic.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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

/// The outputs of 16 rows `p` (the next group's rows `next`, for prefetching) for each of the
/// `T` tokens of `acts` into `out[token]`: the levels of each row step are decoded once for all.
///
/// # Safety
/// As [`rows`]; every `p[k]` and `next[k]` points at a readable row.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn group<const K: u8, const MIN: bool, const SEED: bool, const T: usize>(
    p: &[*const u8; 16],
    next: &[*const u8; 16],
    g: Geo,
    acts: &GemvActs,
    out: &mut [[f32; 16]; T],
) {
    // Made per group (cheap): as locals the compiler keeps or rematerializes them as it likes.
    let c = &Consts::new::<K>();
    let legacy = blocky(K);
    let per = if sub16(K) { 16 } else { QB };
    let cols = acts.base.cols;
    let nb = cols / QB;
    let step_bytes = if legacy { 4 * g.bytes } else { g.bytes / 2 };
    let (steps, ahead) = (cols.div_ceil(STEP), PREFETCH.div_ceil(step_bytes));
    let (d, sa) = (&acts.base.d, &acts.base.sa);
    let (subs, tq, ts) = (acts.base.subs, acts.q.len() / T, acts.seed.len() / T);
    let mut f = [_mm512_setzero_ps(); T];
    // Per sub-block of the chunk, the 16 rows' integer sums; legacy: per block the first four
    // bytes (d, and the minimum of Q4_1/Q5_1) of each row's block. Local arrays (zeroed per
    // group, which a chunk of one super-block keeps small) compile to tighter code than a
    // buffer passed in (Q5_0 ran 7% slower with one).
    let mut sums = [[[0i32; 16]; CHUNK / 16]; T];
    let mut dm = [[0u32; 16]; CHUNK / QB];
    let mut e0 = 0;
    while e0 < cols {
        let n = (cols - e0).min(CHUNK);
        for s in 0..n.div_ceil(STEP) {
            let k = e0 / STEP + s;
            // SAFETY: step k's activations and seeds exist for every token (the layout holds
            // whole steps per token).
            let a: [[__m512i; 2]; T] = std::array::from_fn(|x| unsafe {
                let q = acts.q.as_ptr().add(x * tq + k * STEP);
                [
                    _mm512_loadu_si512(q.cast()),
                    _mm512_loadu_si512(q.add(64).cast()),
                ]
            });
            let seed: [[__m512i; 2]; T] = std::array::from_fn(|x| {
                if SEED {
                    // SAFETY: as above.
                    unsafe {
                        let e = acts.seed.as_ptr().add(x * ts + 32 * k);
                        [
                            _mm512_loadu_si512(e.cast()),
                            _mm512_loadu_si512(e.add(16).cast()),
                        ]
                    }
                } else {
                    [_mm512_setzero_si512(); 2]
                }
            });
            // Each row's step `ahead` steps on, or the next group's rows ([`prefetch_at`]).
            let (to_next, pfo) = prefetch_at(k, steps, ahead, step_bytes);
            let pfp = if to_next { next } else { p };
            let sub = STEP / per * s;
            let t = Step {
                g,
                k,
                nblk: (nb - 4 * k).min(4),
                c,
                a,
                seed,
                off: pfo,
            };
            // SAFETY: step k lies in every row (caller); the chunk's step s has room for its
            // sub-blocks in `sub` and its blocks in `dm`.
            unsafe {
                if !legacy || t.nblk == 4 {
                    step16::<K, true, T>(&t, p, pfp, &mut sums, sub, &mut dm[4 * s..]);
                } else {
                    step16::<K, false, T>(&t, p, pfp, &mut sums, sub, &mut dm[4 * s..]);
                }
            }
        }
        // The f32 steps of the chunk's sub-blocks, ascending.
        let s0 = e0 / per;
        let nbt = cols / QB;
        // Per token: `fma(f32(I), k · d, acc)` of the chunk's sub-block s, and the minimum's
        // `fma(m, sa, acc)`.
        let scale = |f: &mut [__m512; T], s: usize, k: __m512| {
            for (x, f) in f.iter_mut().enumerate() {
                // SAFETY: 16 i32 of the chunk's sub-block s of token x.
                let i = unsafe { _mm512_loadu_si512(sums[x][s].as_ptr().cast()) };
                let da = _mm512_set1_ps(d[x * nbt + (s0 + s) * per / QB]);
                *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(k, da), *f);
            }
        };
        let minimum = |f: &mut [__m512; T], s: usize, m: __m512| {
            for (x, f) in f.iter_mut().enumerate() {
                *f = _mm512_fmadd_ps(m, _mm512_set1_ps(sa[x * subs + s0 + s]), *f);
            }
        };
        if legacy {
            for (b, dm) in dm.iter().take(n / QB).enumerate() {
                // SAFETY: 16 u32 of block b.
                let x = unsafe { _mm512_loadu_si512(dm.as_ptr().cast()) };
                let k = if K == LM {
                    e8m0_half16(x)
                } else {
                    f16_lanes::<false>(x)
                };
                scale(&mut f, b, k);
                if MIN {
                    let m = f16_lanes::<true>(x);
                    minimum(&mut f, b, m);
                }
            }
        } else {
            for i in 0..n / QK_K {
                let base = (e0 / QK_K + i) * g.bytes;
                if K == K6 {
                    // SAFETY: bytes 194..210 and 192..208 of super-block i of every row.
                    let (dd, sc) = unsafe {
                        (
                            rows16x4(p, base + q6k::D - 14)[3],
                            rows16x4(p, base + q6k::SC),
                        )
                    };
                    let dd = f16_lanes::<true>(dd);
                    for m in 0..16 {
                        // Scale byte m, sign-extended: byte m % 4 of dword m / 4.
                        let v =
                            _mm512_sll_epi32(sc[m / 4], _mm_cvtsi32_si128(24 - 8 * (m % 4) as i32));
                        let k = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(v)));
                        let s = 16 * i + m;
                        scale(&mut f, s, k);
                    }
                } else if K == Q2 {
                    // SAFETY: bytes 0..16 and 68..84 of super-block i of every row.
                    let (sc, dd) =
                        unsafe { (rows16x4(p, base), rows16x4(p, base + q2k::D - 12)[3]) };
                    let (dk, dmin) = (f16_lanes::<false>(dd), f16_lanes::<true>(dd));
                    for m in 0..16 {
                        // Scale byte m: byte m % 4 of dword m / 4; low nibble scale, high min.
                        let v = _mm512_srl_epi32(sc[m / 4], _mm_cvtsi32_si128(8 * (m % 4) as i32));
                        let lo = _mm512_and_si512(v, _mm512_set1_epi32(15));
                        let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), _mm512_set1_epi32(15));
                        let k = _mm512_mul_ps(dk, _mm512_cvtepi32_ps(lo));
                        let mn = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(hi));
                        let s = 16 * i + m;
                        scale(&mut f, s, k);
                        // −dmin · mn, exactly the converter's minimum.
                        let neg = _mm512_castsi512_ps(_mm512_xor_si512(
                            _mm512_castps_si512(mn),
                            _mm512_set1_epi32(i32::MIN),
                        ));
                        minimum(&mut f, s, neg);
                    }
                } else if K == Q3 {
                    // SAFETY: bytes 92..108 and 94..110 of super-block i of every row.
                    let (w, dd) = unsafe {
                        (
                            rows16x4(p, base + q3k::SC - 4),
                            rows16x4(p, base + q3k::D - 14)[3],
                        )
                    };
                    let dk = f16_lanes::<true>(dd);
                    let (a0, a1, t) = (w[1], w[2], w[3]);
                    let (m0f, m03) = (
                        _mm512_set1_epi32(0x0f0f_0f0f),
                        _mm512_set1_epi32(0x0303_0303),
                    );
                    let part = |x: __m512i, th: __m512i| {
                        _mm512_or_si512(
                            _mm512_and_si512(x, m0f),
                            _mm512_slli_epi32::<4>(_mm512_and_si512(th, m03)),
                        )
                    };
                    let parts = [
                        part(a0, t),
                        part(a1, _mm512_srli_epi32::<2>(t)),
                        part(_mm512_srli_epi32::<4>(a0), _mm512_srli_epi32::<4>(t)),
                        part(_mm512_srli_epi32::<4>(a1), _mm512_srli_epi32::<6>(t)),
                    ];
                    for m in 0..16 {
                        // Scale m: byte m % 4 of part m / 4, stored + 32.
                        let v =
                            _mm512_srl_epi32(parts[m / 4], _mm_cvtsi32_si128(8 * (m % 4) as i32));
                        let sc = _mm512_sub_epi32(
                            _mm512_and_si512(v, _mm512_set1_epi32(0xFF)),
                            _mm512_set1_epi32(32),
                        );
                        let k = _mm512_mul_ps(dk, _mm512_cvtepi32_ps(sc));
                        let s = 16 * i + m;
                        scale(&mut f, s, k);
                    }
                } else if K == LX {
                    // SAFETY: the 16-byte header of super-block i of every row.
                    let k = iq4xs_factors16(unsafe { rows16x4(p, base) });
                    for (j, k) in k.into_iter().enumerate() {
                        let s = 8 * i + j;
                        scale(&mut f, s, k);
                    }
                } else {
                    // SAFETY: the 16-byte header of super-block i of every row.
                    let (k, m) = k4_factors16(unsafe { rows16x4(p, base) });
                    for j in 0..8 {
                        let s = 8 * i + j;
                        scale(&mut f, s, k[j]);
                        minimum(&mut f, s, m[j]);
                    }
                }
            }
        }
        e0 += n;
    }
    for (o, f) in out.iter_mut().zip(f) {
        // SAFETY: 16 writable f32.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), f) };
    }
}
