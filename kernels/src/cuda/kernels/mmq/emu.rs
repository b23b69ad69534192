//! A lane-by-lane CPU emulation of the MMQ kernel (mmq.cu), to check its index arithmetic without
//! a GPU: the staging windows (with the bounds of every global read asserted), the weight
//! decoders, the fragment loads of every lane, the `mma.sync` instructions (built from the PTX
//! ISA's fragment layouts, independently of the loads) and the f32 epilogue, block by block. Its
//! outputs must be the CPU engine's bits. It mirrors mmq.cu statement by statement (same names):
//! a change to one needs the same change to the other.
//!
//! Copies complete at once here, so barriers and `cp.async` waits have nothing to emulate; the
//! next tile is still staged into the other stage before this one is decoded, as on the device,
//! so reading the wrong stage shows.

use super::{mmq_smem, mmq_wld, MMQ_TILES, MQ_ALD, MQ_DLD, MQ_FLD, MQ_K, MQ_RAW};
use crate::quant::lut4::{e8m0_half, FP4, NL};
use crate::quant::ActFormat;
use pshard_model::ggml_type::GgmlType;

/// The constants of a weight type's decoder (`ACT`, `SUB`, `MIN`, `TB` in mmq.cu).
#[derive(Clone, Copy, Debug)]
pub(super) struct Dec {
    pub act: ActFormat,
    pub sub: usize,
    pub min: bool,
    pub tb: usize,
}

pub(super) fn dec(ty: GgmlType) -> Dec {
    use ActFormat::{Q8K, Q8_0, Q8_1};
    let d = |act, sub, min, tb| Dec { act, sub, min, tb };
    match ty {
        GgmlType::Q4_0 => d(Q8_0, 32, false, 8 * 18),
        GgmlType::Q4_1 => d(Q8_1, 32, true, 8 * 20),
        GgmlType::Q5_0 => d(Q8_0, 32, false, 8 * 22),
        GgmlType::Q5_1 => d(Q8_1, 32, true, 8 * 24),
        GgmlType::Q8_0 => d(Q8_0, 32, false, 8 * 34),
        GgmlType::IQ4_NL => d(Q8_0, 32, false, 8 * 18),
        GgmlType::MXFP4 => d(Q8_0, 32, false, 8 * 17),
        GgmlType::IQ4_XS => d(Q8K, 32, false, 136),
        GgmlType::Q4_K => d(Q8K, 32, true, 144),
        GgmlType::Q5_K => d(Q8K, 32, true, 176),
        GgmlType::Q6_K => d(Q8K, 16, false, 210),
        GgmlType::Q3_K => d(Q8K, 16, false, 110),
        GgmlType::Q2_K => d(Q8K, 16, true, 84),
        _ => panic!("no MMQ decoder for {ty}"),
    }
}

// --- device intrinsics and common.cuh helpers -------------------------------------------------

fn lds32(sm: &[u8], p: usize) -> u32 {
    assert_eq!(p % 4, 0, "unaligned 32-bit shared load at {p}");
    u32::from_le_bytes(sm[p..p + 4].try_into().unwrap())
}

fn ldb16(sm: &[u8], p: usize) -> u32 {
    sm[p] as u32 | (sm[p + 1] as u32) << 8
}

fn ld32_a1(sm: &[u8], p: usize) -> u32 {
    ldb16(sm, p) | ldb16(sm, p + 2) << 16
}

fn funnelshift_r(lo: u32, hi: u32, sh: u32) -> u32 {
    ((((hi as u64) << 32) | lo as u64) >> (sh & 31)) as u32
}

fn lds16_any(sm: &[u8], p: usize) -> [u32; 4] {
    let a = p & !3;
    let sh = (p & 3) as u32 * 8;
    let w: Vec<u32> = (0..5).map(|i| lds32(sm, a + 4 * i)).collect();
    [0, 1, 2, 3].map(|i| funnelshift_r(w[i], w[i + 1], sh))
}

fn vsub4(a: u32, b: u32) -> u32 {
    let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
    u32::from_le_bytes([0, 1, 2, 3].map(|i| x[i].wrapping_sub(y[i])))
}

fn bits_to_bytes(v: u32) -> u32 {
    ((v & 0xf).wrapping_mul(0x0020_4081)) & 0x0101_0101
}

/// `lut4` of common.cuh (its tables are compared with the CPU's elsewhere): byte-wise levels.
fn lut4(x: u32, table: &[i8; 16]) -> u32 {
    u32::from_le_bytes(x.to_le_bytes().map(|b| table[b as usize] as u8))
}

fn h2f(h: u32) -> f32 {
    half::f16::from_bits(h as u16).to_f32()
}

fn k4_scale_min(sm: &[u8], s: usize, j: usize) -> (f32, f32) {
    let (sj, sj4, sjm4) = (
        sm[s + j] as u32,
        sm[s + j + 4] as u32,
        sm[s + (j & 3)] as u32,
    );
    if j < 4 {
        ((sj & 63) as f32, (sj4 & 63) as f32)
    } else {
        (
            ((sj4 & 0xf) | ((sjm4 >> 6) << 4)) as f32,
            ((sj4 >> 4) | ((sj >> 6) << 4)) as f32,
        )
    }
}

fn q3k_scale(sm: &[u8], s: usize, j: usize) -> i32 {
    let low = if j < 8 {
        sm[s + j] & 0xf
    } else {
        sm[s + j - 8] >> 4
    } as i32;
    let high = ((sm[s + 8 + (j & 3)] >> (2 * (j >> 2))) & 3) as i32;
    (low | (high << 4)) - 32
}

fn iq4xs_scale(sm: &[u8], b: usize, j: usize) -> i32 {
    let lo = ((sm[b + 4 + (j >> 1)] >> (4 * (j & 1))) & 0xf) as i32;
    let hi = ((ldb16(sm, b + 2) >> (2 * j)) & 3) as i32;
    (lo | (hi << 4)) - 32
}

// --- decoders (mmq.cu's M* structs) ------------------------------------------------------------

/// `piece(t, p, v)`: the int8 levels of elements 16p..16p+15 of the tile at `t`.
fn piece(ty: GgmlType, sm: &[u8], t: usize, p: usize) -> [u32; 4] {
    let legacy = |bytes: usize, qs: usize, qh: Option<usize>, off: u32| {
        let b = t + (p >> 1) * bytes;
        let h = p & 1;
        let q = lds16_any(sm, b + qs);
        let qhv = qh.map_or(0, |o| ld32_a1(sm, b + o) >> (16 * h));
        [0, 1, 2, 3].map(|i| {
            let mut x = (q[i] >> (4 * h)) & 0x0f0f_0f0f;
            if qh.is_some() {
                x |= bits_to_bytes(qhv >> (4 * i)) << 4;
            }
            if off != 0 {
                vsub4(x, off * 0x0101_0101)
            } else {
                x
            }
        })
    };
    let lut32 = |bytes: usize, qs: usize, table: &[i8; 16]| {
        let q = lds16_any(sm, t + (p >> 1) * bytes + qs);
        let h = p & 1;
        q.map(|w| lut4((w >> (4 * h)) & 0x0f0f_0f0f, table))
    };
    let k45 = |five: bool| {
        let (c, h, l0) = (p >> 2, (p >> 1) & 1, 16 * (p & 1));
        let q = lds16_any(sm, t + if five { 48 } else { 16 } + 32 * c + l0);
        let hb = if five {
            lds16_any(sm, t + 16 + l0)
        } else {
            [0; 4]
        };
        [0, 1, 2, 3].map(|i| {
            let mut x = (q[i] >> (4 * h)) & 0x0f0f_0f0f;
            if five {
                x |= ((hb[i] >> (2 * c + h)) & 0x0101_0101) << 4;
            }
            x
        })
    };
    match ty {
        GgmlType::Q4_0 => legacy(18, 2, None, 8),
        GgmlType::Q4_1 => legacy(20, 4, None, 0),
        GgmlType::Q5_0 => legacy(22, 6, Some(2), 16),
        GgmlType::Q5_1 => legacy(24, 8, Some(4), 0),
        GgmlType::Q8_0 => lds16_any(sm, t + (p >> 1) * 34 + 2 + 16 * (p & 1)),
        GgmlType::IQ4_NL => lut32(18, 2, &NL),
        GgmlType::MXFP4 => lut32(17, 1, &FP4),
        GgmlType::IQ4_XS => {
            let q = lds16_any(sm, t + 8 + 16 * (p >> 1));
            let h = p & 1;
            q.map(|w| lut4((w >> (4 * h)) & 0x0f0f_0f0f, &NL))
        }
        GgmlType::Q4_K => k45(false),
        GgmlType::Q5_K => k45(true),
        GgmlType::Q6_K => {
            let (h, g, l0) = (p >> 3, (p >> 1) & 3, 16 * (p & 1));
            let ql = lds16_any(sm, t + 64 * h + 32 * (g & 1) + l0);
            let qh = lds16_any(sm, t + 128 + 32 * h + l0);
            [0, 1, 2, 3].map(|i| {
                let x = ((ql[i] >> (4 * (g >> 1))) & 0x0f0f_0f0f)
                    | (((qh[i] >> (2 * g)) & 0x0303_0303) << 4);
                vsub4(x, 0x2020_2020)
            })
        }
        GgmlType::Q3_K => {
            let (h, j, l0) = (p >> 3, (p >> 1) & 3, 16 * (p & 1));
            let q = lds16_any(sm, t + 32 + 32 * h + l0);
            let m = lds16_any(sm, t + l0);
            [0, 1, 2, 3].map(|i| {
                let x = ((q[i] >> (2 * j)) & 0x0303_0303)
                    | (((m[i] >> (4 * h + j)) & 0x0101_0101) << 2);
                vsub4(x, 0x0404_0404)
            })
        }
        GgmlType::Q2_K => {
            let (h, j, l0) = (p >> 3, (p >> 1) & 3, 16 * (p & 1));
            let q = lds16_any(sm, t + 16 + 32 * h + l0);
            q.map(|w| (w >> (2 * j)) & 0x0303_0303)
        }
        _ => unreachable!(),
    }
}

/// `factor(t, s, sc, mn)`: sub-block `s`'s scale and minimum.
fn factor(ty: GgmlType, sm: &[u8], t: usize, s: usize) -> (f32, f32) {
    let k45 = || {
        let (scf, mf) = k4_scale_min(sm, t + 4, s);
        (h2f(ldb16(sm, t)) * scf, -h2f(ldb16(sm, t + 2)) * mf)
    };
    match ty {
        GgmlType::Q4_0 => (h2f(ldb16(sm, t + s * 18)), 0.0),
        GgmlType::Q4_1 => (h2f(ldb16(sm, t + s * 20)), h2f(ldb16(sm, t + s * 20 + 2))),
        GgmlType::Q5_0 => (h2f(ldb16(sm, t + s * 22)), 0.0),
        GgmlType::Q5_1 => (h2f(ldb16(sm, t + s * 24)), h2f(ldb16(sm, t + s * 24 + 2))),
        GgmlType::Q8_0 => (h2f(ldb16(sm, t + s * 34)), 0.0),
        GgmlType::IQ4_NL => (h2f(ldb16(sm, t + s * 18)), 0.0),
        GgmlType::MXFP4 => (e8m0_half(sm[t + s * 17]), 0.0),
        GgmlType::IQ4_XS => (h2f(ldb16(sm, t)) * iq4xs_scale(sm, t, s) as f32, 0.0),
        GgmlType::Q4_K | GgmlType::Q5_K => k45(),
        GgmlType::Q6_K => (h2f(ldb16(sm, t + 208)) * sm[t + 192 + s] as i8 as f32, 0.0),
        GgmlType::Q3_K => (
            h2f(ldb16(sm, t + 108)) * q3k_scale(sm, t + 96, s) as f32,
            0.0,
        ),
        GgmlType::Q2_K => {
            let b = sm[t + s] as u32;
            (
                h2f(ldb16(sm, t + 80)) * (b & 15) as f32,
                -h2f(ldb16(sm, t + 82)) * (b >> 4) as f32,
            )
        }
        _ => unreachable!(),
    }
}

// --- mma.sync --------------------------------------------------------------------------------

/// `mma.sync.aligned.m16n8k32` (or `k16`) `.row.col.s32.s8.s8.s32` with zero accumulators: the
/// A (16 × K) and B (K × 8) matrices are gathered from the 32 lanes' registers by the PTX ISA's
/// layouts (lane = 4 g + t; A: a0 (g, 4t..), a1 (g+8, 4t..), a2 (g, 16+4t..), a3 (g+8, 16+4t..);
/// B: b0 (4t.., g), b1 (16+4t.., g); lowest k in the lowest byte), every element exactly once,
/// and the product is handed back as C: c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
fn mma(k32: bool, a: &[[u32; 4]; 32], b: &[[u32; 2]; 32]) -> [[i32; 4]; 32] {
    let kk = if k32 { 32 } else { 16 };
    let mut am = [[None::<i32>; 32]; 16];
    let mut bm = [[None::<i32>; 8]; 32];
    let byte = |x: u32, j: usize| (x >> (8 * j)) as u8 as i8 as i32;
    let put = |slot: &mut Option<i32>, v: i32| {
        assert!(slot.is_none(), "a fragment element is held by two lanes");
        *slot = Some(v);
    };
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for j in 0..4 {
            put(&mut am[g][4 * t + j], byte(a[lane][0], j));
            put(&mut am[g + 8][4 * t + j], byte(a[lane][1], j));
            put(&mut bm[4 * t + j][g], byte(b[lane][0], j));
            if k32 {
                put(&mut am[g][16 + 4 * t + j], byte(a[lane][2], j));
                put(&mut am[g + 8][16 + 4 * t + j], byte(a[lane][3], j));
                put(&mut bm[16 + 4 * t + j][g], byte(b[lane][1], j));
            }
        }
    }
    let mut d = [[0i32; 8]; 16];
    for (i, row) in d.iter_mut().enumerate() {
        for (jn, v) in row.iter_mut().enumerate() {
            *v = (0..kk)
                .map(|k| am[i][k].expect("A element") * bm[k][jn].expect("B element"))
                .sum();
        }
    }
    let mut c = [[0i32; 4]; 32];
    for (lane, cl) in c.iter_mut().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        *cl = [
            d[g][2 * t],
            d[g][2 * t + 1],
            d[g + 8][2 * t],
            d[g + 8][2 * t + 1],
        ];
    }
    c
}

// --- the kernel ----------------------------------------------------------------------------------

/// One launch: weights at `mem[w0..]` (addresses are indices, `mem` one allocation starting
/// 16-byte aligned), the activation scratch as the quantizers leave it (`d` as 32-bit words).
pub(super) struct Launch<'a> {
    pub ty: GgmlType,
    pub tile: (usize, usize, usize, usize),
    pub mem: &'a [u8],
    pub w0: usize,
    pub row_bytes: usize,
    pub rows: usize,
    pub cols: usize,
    pub n: usize,
    pub q: &'a [i8],
    pub d: &'a [u32],
    pub bs: &'a [i16],
    pub bias: Option<&'a [f32]>,
}

/// `cp_async16_n`: `n` bytes from `src` (16-byte aligned) into shared `dst` (16-byte aligned),
/// the rest of the 16 zero.
fn cp16(sm: &mut [u8], dst: usize, src: &[u8], at: usize, n: usize) {
    assert!(
        dst.is_multiple_of(16) && n <= 16,
        "cp.async 16 to {dst} of {n} bytes"
    );
    sm[dst..dst + 16].fill(0);
    sm[dst..dst + n].copy_from_slice(&src[at..at + n]);
}

/// Runs the launch; returns `y` (`n × rows`, row stride `rows`; NaN where nothing was stored).
// The loops mirror mmq.cu's, index for index.
#[allow(clippy::needless_range_loop)]
pub(super) fn run(l: &Launch) -> Vec<f32> {
    let (bm, bn, warps_m, warps_n) = l.tile;
    assert!(MMQ_TILES.contains(&l.tile));
    let (mt, nt) = (bm / warps_m / 16, bn / warps_n / 8);
    let dc = dec(l.ty);
    let tb = dc.tb;
    let wld = mmq_wld(tb);
    let wch = wld / 16;
    let (sub, nsub_tile) = (dc.sub, MQ_K / dc.sub);
    let stage = bm * wld + bn * MQ_ALD + bn * MQ_RAW * 4;
    // The layout of mmq_impl, ending where mmq_smem says.
    let w8 = 2 * stage;
    let fs = w8 + bm * MQ_ALD;
    let fm = fs + 4 * bm * MQ_FLD;
    let asa = fm + 4 * bm * MQ_FLD;
    let ad = asa + 4 * bn * MQ_FLD;
    assert_eq!(ad + 4 * bn * MQ_DLD, mmq_smem(tb, bm, bn));
    let (rows, cols, n, row_bytes, w0) = (l.rows, l.cols, l.n, l.row_bytes, l.w0);
    let nkt = cols.div_ceil(MQ_K);
    let nb32 = cols >> 5;
    let wlo = w0 & !15;
    let wend = w0 + rows * row_bytes;
    let mut y = vec![f32::NAN; n * rows];
    let tile_src =
        |m0: usize, r: usize, kt: usize| w0 + (m0 + r).min(rows - 1) * row_bytes + kt * tb;
    let putf = |sm: &mut [u8], at: usize, v: f32| sm[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let getf = |sm: &[u8], at: usize| f32::from_le_bytes(sm[at..at + 4].try_into().unwrap());

    for bx in 0..rows.div_ceil(bm) {
        for by in 0..n.div_ceil(bn) {
            let (m0, n0) = (bx * bm, by * bn);
            // Poisoned: reading what was never written shows as wrong bits.
            let mut sm = vec![0xa5u8; mmq_smem(tb, bm, bn)];
            let stage_w = |sm: &mut [u8], kt: usize, st: usize| {
                let dst = st * stage;
                let left = row_bytes as i64 - (kt * tb) as i64;
                let tbe = (tb as i64).min(left) as usize;
                for i in 0..bm * wch {
                    let (r, c) = (i / wch, i % wch);
                    let src = tile_src(m0, r, kt);
                    let o = src & 15;
                    if 16 * c < o + tbe {
                        let cs = src - o + 16 * c;
                        let nb = 16.min(src as i64 + left - cs as i64) as usize;
                        assert!(
                            cs % 16 == 0 && cs >= wlo && cs + nb <= wend,
                            "weight read {cs}+{nb} outside {wlo}..{wend}"
                        );
                        cp16(sm, dst + r * wld + 16 * c, l.mem, cs, nb);
                    }
                }
            };
            let stage_a = |sm: &mut [u8], kt: usize, st: usize| {
                let a8 = st * stage + bm * wld;
                let raw = a8 + bn * MQ_ALD;
                let qb: &[u8] = bytemuck::cast_slice(l.q);
                for i in 0..bn * 16 {
                    let (j, c) = (i >> 4, i & 15);
                    let (tk, k) = (n0 + j, kt * MQ_K + 16 * c);
                    let ok = tk < n && k < cols;
                    let at = if ok { tk * cols + k } else { 0 };
                    assert_eq!(at % 16, 0);
                    cp16(
                        sm,
                        a8 + j * MQ_ALD + 16 * c,
                        qb,
                        at,
                        if ok { 16 } else { 0 },
                    );
                }
                for i in 0..bn * MQ_RAW {
                    let (j, wd) = (i >> 4, i & 15);
                    let tk = n0 + j;
                    let mut src: Option<u32> = None;
                    if tk < n {
                        match dc.act {
                            ActFormat::Q8_0 => {
                                let b = kt * 8 + wd;
                                if wd < 8 && b < nb32 {
                                    src = Some(l.d[tk * nb32 + b]);
                                }
                            }
                            ActFormat::Q8_1 => {
                                let b = kt * 8 + (wd >> 1);
                                if b < nb32 {
                                    src = Some(l.d[2 * (tk * nb32 + b) + (wd & 1)]);
                                }
                            }
                            _ => {
                                if wd == 0 {
                                    src = Some(l.d[tk * (cols >> 8) + kt]);
                                } else if wd <= 8 {
                                    let e = tk * (cols >> 4) + kt * 16 + 2 * (wd - 1);
                                    assert_eq!(e % 2, 0, "4-byte copy of the sums");
                                    src = Some(
                                        l.bs[e] as u16 as u32 | (l.bs[e + 1] as u16 as u32) << 16,
                                    );
                                }
                            }
                        }
                    }
                    let at = raw + 4 * (j * MQ_RAW + wd);
                    sm[at..at + 4].copy_from_slice(&src.unwrap_or(0).to_le_bytes());
                }
            };

            let nw = warps_m * warps_n;
            let mut acc = vec![[0f32; 4]; nw * 32 * mt * nt];
            let ai = |warp: usize, lane: usize, a: usize, b: usize| {
                ((warp * 32 + lane) * mt + a) * nt + b
            };

            stage_w(&mut sm, 0, 0);
            stage_a(&mut sm, 0, 0);
            for kt in 0..nkt {
                let st = kt & 1;
                if kt + 1 < nkt {
                    stage_w(&mut sm, kt + 1, st ^ 1);
                    stage_a(&mut sm, kt + 1, st ^ 1);
                }
                // Decode.
                let wraw = st * stage;
                let a8 = wraw + bm * wld;
                let raw = a8 + bn * MQ_ALD;
                for i in 0..bm * 16 {
                    let (r, p) = (i >> 4, i & 15);
                    let o = tile_src(m0, r, kt) & 15;
                    let v = piece(l.ty, &sm, wraw + r * wld + o, p);
                    let at = w8 + r * MQ_ALD + 16 * p;
                    assert_eq!(at % 16, 0);
                    for (k, w) in v.iter().enumerate() {
                        sm[at + 4 * k..at + 4 * k + 4].copy_from_slice(&w.to_le_bytes());
                    }
                }
                for i in 0..bm * nsub_tile {
                    let (r, s) = (i / nsub_tile, i % nsub_tile);
                    let o = tile_src(m0, r, kt) & 15;
                    let (sc, mn) = factor(l.ty, &sm, wraw + r * wld + o, s);
                    putf(&mut sm, fs + 4 * (r * MQ_FLD + s), sc);
                    putf(&mut sm, fm + 4 * (r * MQ_FLD + s), mn);
                }
                for i in 0..bn * 16 {
                    let (j, s) = (i >> 4, i & 15);
                    let words: Vec<u32> = (0..MQ_RAW)
                        .map(|k| lds32(&sm, raw + 4 * (j * MQ_RAW + k)))
                        .collect();
                    let rw = |k: usize| words[k];
                    match dc.act {
                        ActFormat::Q8_0 => {
                            if s < 8 {
                                let v = f32::from_bits(rw(s));
                                putf(&mut sm, ad + 4 * (j * MQ_DLD + s), v);
                            }
                        }
                        ActFormat::Q8_1 => {
                            if s < 8 {
                                let (v, u) =
                                    (f32::from_bits(rw(2 * s)), f32::from_bits(rw(2 * s + 1)));
                                putf(&mut sm, ad + 4 * (j * MQ_DLD + s), v);
                                putf(&mut sm, asa + 4 * (j * MQ_FLD + s), u);
                            }
                        }
                        _ => {
                            let da = f32::from_bits(rw(0));
                            let bsum = |m: usize| {
                                (rw(1 + (m >> 1)) >> (16 * (m & 1))) as u16 as i16 as i32
                            };
                            if s < 8 {
                                putf(&mut sm, ad + 4 * (j * MQ_DLD + s), da);
                            }
                            if dc.min {
                                if sub == 16 {
                                    let v = da * bsum(s) as f32;
                                    putf(&mut sm, asa + 4 * (j * MQ_FLD + s), v);
                                } else if s < 8 {
                                    let v = da * (bsum(2 * s) + bsum(2 * s + 1)) as f32;
                                    putf(&mut sm, asa + 4 * (j * MQ_FLD + s), v);
                                }
                            }
                        }
                    }
                }
                // MMA.
                let nsub = nsub_tile.min((cols - kt * MQ_K) / sub);
                for warp in 0..nw {
                    let wm0 = (warp % warps_m) * (mt * 16);
                    let wn0 = (warp / warps_m) * (nt * 8);
                    if n0 + wn0 >= n {
                        continue;
                    }
                    for s in 0..nsub {
                        let k0 = s * sub;
                        // Per lane: A fragments and weight factors of each m-tile.
                        let mut af = vec![[[0u32; 4]; 32]; mt];
                        let mut wsc = vec![[[0f32; 2]; 32]; mt];
                        let mut wmn = vec![[[0f32; 2]; 32]; mt];
                        for lane in 0..32 {
                            let (g, t4) = (lane >> 2, lane & 3);
                            for a in 0..mt {
                                let r = wm0 + 16 * a + g;
                                let p = w8 + r * MQ_ALD + k0 + 4 * t4;
                                af[a][lane][0] = lds32(&sm, p);
                                af[a][lane][1] = lds32(&sm, p + 8 * MQ_ALD);
                                if sub == 32 {
                                    af[a][lane][2] = lds32(&sm, p + 16);
                                    af[a][lane][3] = lds32(&sm, p + 8 * MQ_ALD + 16);
                                }
                                wsc[a][lane] = [
                                    getf(&sm, fs + 4 * (r * MQ_FLD + s)),
                                    getf(&sm, fs + 4 * ((r + 8) * MQ_FLD + s)),
                                ];
                                if dc.min {
                                    wmn[a][lane] = [
                                        getf(&sm, fm + 4 * (r * MQ_FLD + s)),
                                        getf(&sm, fm + 4 * ((r + 8) * MQ_FLD + s)),
                                    ];
                                }
                            }
                        }
                        for b in 0..nt {
                            let mut bf = [[0u32; 2]; 32];
                            let mut da = [[0f32; 2]; 32];
                            let mut sa = [[0f32; 2]; 32];
                            for lane in 0..32 {
                                let (g, t4) = (lane >> 2, lane & 3);
                                let p = a8 + (wn0 + 8 * b + g) * MQ_ALD + k0 + 4 * t4;
                                bf[lane][0] = lds32(&sm, p);
                                bf[lane][1] = if sub == 32 { lds32(&sm, p + 16) } else { 0 };
                                let tk = wn0 + 8 * b + 2 * t4;
                                let blk = k0 >> 5;
                                da[lane] = [
                                    getf(&sm, ad + 4 * (tk * MQ_DLD + blk)),
                                    getf(&sm, ad + 4 * ((tk + 1) * MQ_DLD + blk)),
                                ];
                                if dc.min {
                                    sa[lane] = [
                                        getf(&sm, asa + 4 * (tk * MQ_FLD + s)),
                                        getf(&sm, asa + 4 * ((tk + 1) * MQ_FLD + s)),
                                    ];
                                }
                            }
                            for a in 0..mt {
                                let c = mma(sub == 32, &af[a], &bf);
                                for lane in 0..32 {
                                    let v = &mut acc[ai(warp, lane, a, b)];
                                    for e in 0..4 {
                                        let mut x = (c[lane][e] as f32)
                                            .mul_add(wsc[a][lane][e >> 1] * da[lane][e & 1], v[e]);
                                        if dc.min {
                                            x = wmn[a][lane][e >> 1].mul_add(sa[lane][e & 1], x);
                                        }
                                        v[e] = x;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // Store.
            for warp in 0..nw {
                let wm0 = (warp % warps_m) * (mt * 16);
                let wn0 = (warp / warps_m) * (nt * 8);
                for lane in 0..32 {
                    let (g, t4) = (lane >> 2, lane & 3);
                    for a in 0..mt {
                        for b in 0..nt {
                            for e in 0..4 {
                                let r = m0 + wm0 + 16 * a + g + 8 * (e >> 1);
                                let tk = n0 + wn0 + 8 * b + 2 * t4 + (e & 1);
                                if r < rows && tk < n {
                                    let v = acc[ai(warp, lane, a, b)];
                                    y[tk * rows + r] = l.bias.map_or(v[e], |bb| v[e] + bb[r]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::{quantize_acts, WeightLayout, WeightMatrix};
    use crate::quant;

    /// A tiny deterministic generator (xorshift), so the test needs no RNG crate state.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// The decoders' constants agree with the CPU's converters: partner format, sub-block size,
    /// minimum, bytes per 256 elements.
    #[test]
    fn decoder_constants_match_cpu_converters() {
        for &ty in quant::SUPPORTED {
            if !super::super::mmq_supported(ty) {
                continue;
            }
            let d = dec(ty);
            let conv = crate::gemm::converter(ty).unwrap();
            assert_eq!(d.act, quant::kernel(ty).unwrap().act, "{ty}");
            assert_eq!(d.sub, conv.sub(), "{ty}");
            assert_eq!(d.min, conv.min, "{ty}");
            let g = super::super::type_geom(ty).unwrap();
            assert_eq!(d.tb, MQ_K / g.qk * g.bytes, "{ty}");
        }
    }

    /// The emulated instruction is a bijection of fragments onto the 16 × K and K × 8 matrices
    /// (its assertions) and multiplies them: a known product comes back in the C layout.
    #[test]
    fn mma_emulation_multiplies() {
        let mut r = Rng(7);
        for k32 in [false, true] {
            let kk = if k32 { 32 } else { 16 };
            let am: Vec<Vec<i8>> = (0..16)
                .map(|_| (0..kk).map(|_| r.next() as i8).collect())
                .collect();
            let bm: Vec<Vec<i8>> = (0..kk)
                .map(|_| (0..8).map(|_| r.next() as i8).collect())
                .collect();
            let pack = |v: [i8; 4]| u32::from_le_bytes(v.map(|x| x as u8));
            let mut a = [[0u32; 4]; 32];
            let mut b = [[0u32; 2]; 32];
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let ra = |row: usize, k: usize| pack([0, 1, 2, 3].map(|j| am[row][k + j]));
                a[lane] = [ra(g, 4 * t), ra(g + 8, 4 * t), 0, 0];
                b[lane][0] = pack([0, 1, 2, 3].map(|j| bm[4 * t + j][g]));
                if k32 {
                    a[lane][2] = ra(g, 16 + 4 * t);
                    a[lane][3] = ra(g + 8, 16 + 4 * t);
                    b[lane][1] = pack([0, 1, 2, 3].map(|j| bm[16 + 4 * t + j][g]));
                }
            }
            let c = mma(k32, &a, &b);
            for (lane, cl) in c.iter().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                for (e, &got) in cl.iter().enumerate() {
                    let (i, j) = (g + 8 * (e >> 1), 2 * t + (e & 1));
                    let want: i32 = (0..kk).map(|k| am[i][k] as i32 * bm[k][j] as i32).sum();
                    assert_eq!(got, want, "k32 {k32} lane {lane} c{e}");
                }
            }
        }
    }

    /// Quantized random weights (the reference quantizer, or random bytes with sane f16 scales).
    fn weights(r: &mut Rng, ty: GgmlType, rows: usize, cols: usize, random_bits: bool) -> Vec<u8> {
        let k = quant::kernel(ty).unwrap();
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut b = vec![0u8; rows * rb];
        for row in b.chunks_exact_mut(rb) {
            let src: Vec<f32> = (0..cols).map(|_| r.f()).collect();
            (k.quantize_row)(&src, row);
        }
        if random_bits {
            // Every quant bit pattern; scale fields keep the quantizer's values.
            let bb = ty.type_size() as usize;
            let scale_field: std::ops::Range<usize> = match ty {
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL => 0..2,
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => 0..4,
                GgmlType::MXFP4 => 0..1,
                GgmlType::IQ4_XS => 0..2,
                GgmlType::Q2_K => 80..84,
                GgmlType::Q3_K => 108..110,
                GgmlType::Q6_K => 208..210,
                _ => unreachable!(),
            };
            for blk in b.chunks_exact_mut(bb) {
                for (i, v) in blk.iter_mut().enumerate() {
                    if !scale_field.contains(&i) {
                        *v = r.next() as u8;
                    }
                }
            }
        }
        b
    }

    /// The scratch the GPU quantizers write for `x` (bit for bit the CPU's blocks):
    /// (quants, scale words, 16-element sums).
    fn scratch(
        format: ActFormat,
        x: &crate::matmul::QuantizedActs,
        n: usize,
        cols: usize,
    ) -> (Vec<i8>, Vec<u32>, Vec<i16>) {
        let (mut q, mut d, mut bs) = (Vec::new(), Vec::new(), Vec::new());
        let f16w = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32().to_bits();
        for t in 0..n {
            for blk in x
                .row(t)
                .chunks_exact(format.block_bytes())
                .take(cols / format.block_size())
            {
                match format {
                    ActFormat::Q8_0 => {
                        d.push(f16w(blk));
                        q.extend(blk[2..34].iter().map(|&v| v as i8));
                    }
                    ActFormat::Q8_1 => {
                        d.push(f16w(blk));
                        d.push(f16w(&blk[2..]));
                        q.extend(blk[4..36].iter().map(|&v| v as i8));
                    }
                    _ => {
                        d.push(u32::from_le_bytes(blk[0..4].try_into().unwrap()));
                        q.extend(blk[4..260].iter().map(|&v| v as i8));
                        bs.extend(
                            blk[260..292]
                                .chunks_exact(2)
                                .map(|c| i16::from_le_bytes([c[0], c[1]])),
                        );
                    }
                }
            }
        }
        (q, d, bs)
    }

    /// The emulated kernel gives the CPU engine's bits: every type, every tile, rows and tokens
    /// that are not multiples of the tile (several blocks each way), a partial last K tile for the
    /// 32-element types, weights at odd and even misalignments, a bias.
    #[test]
    fn emulated_kernel_matches_cpu_engine_bits() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let types: Vec<GgmlType> = quant::SUPPORTED
            .iter()
            .copied()
            .filter(|&t| super::super::mmq_supported(t))
            .collect();
        assert_eq!(types.len(), 13);
        let mut cases = 0;
        for (ti, &ty) in types.iter().enumerate() {
            let d = dec(ty);
            // 32-element blocks: 9 (a K tile and one block); K-quants: two blocks.
            let cols = if d.act == ActFormat::Q8K { 512 } else { 288 };
            // Each type: two tiles in rotation; Q4_K, Q6_K and Q8_0: every tile.
            let tiles: Vec<usize> =
                if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K | GgmlType::Q8_0) {
                    (0..MMQ_TILES.len()).collect()
                } else {
                    vec![ti % MMQ_TILES.len(), (ti + 3) % MMQ_TILES.len()]
                };
            for (k, &tix) in tiles.iter().enumerate() {
                let tile = MMQ_TILES[tix];
                let rows = if k % 2 == 0 { 37 } else { 70 };
                let n = [11, 19, 9, 3][k % 4];
                let w0 = [6, 13, 0, 2][(k + ti) % 4];
                let wb = weights(&mut r, ty, rows, cols, k % 2 == 1);
                let rb = wb.len() / rows;
                let mut mem = vec![0x5au8; w0 + wb.len() + 32];
                mem[w0..w0 + wb.len()].copy_from_slice(&wb);
                let x: Vec<f32> = (0..n * cols).map(|_| r.f()).collect();
                let xq = quantize_acts(d.act, &x, n, cols);
                let (q, dw, bs) = scratch(d.act, &xq, n, cols);
                let bias: Vec<f32> = (0..rows).map(|_| r.f()).collect();
                let with_bias = k == 1;
                let got = run(&Launch {
                    ty,
                    tile,
                    mem: &mem,
                    w0,
                    row_bytes: rb,
                    rows,
                    cols,
                    n,
                    q: &q,
                    d: &dw,
                    bs: &bs,
                    bias: with_bias.then_some(&bias[..]),
                });
                let wm = WeightMatrix {
                    ty,
                    data: &wb,
                    rows,
                    cols,
                    layout: WeightLayout::File,
                };
                let mut want = vec![0f32; n * rows];
                crate::matmul::matmul(&wm, &xq, &mut want, rows, 0..rows).unwrap();
                for t in 0..n {
                    for row in 0..rows {
                        let w = want[t * rows + row] + if with_bias { bias[row] } else { 0.0 };
                        let g = got[t * rows + row];
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{ty} tile {tile:?} {rows}x{cols} n={n} w0={w0}: token {t} row {row}: {g} vs CPU {w}"
                        );
                    }
                }
                cases += 1;
            }
        }
        assert!(cases >= 13 * 2 + 3 * 4);
    }
}
