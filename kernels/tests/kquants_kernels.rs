//! K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and their activation partner Q8_K.
//!
//! - Layout: hand-built blocks with specific elements set to known values, and random blocks,
//!   decoded by an independent per-element decoder written here from the format description.
//! - Reference quantizers: quantize → dequantize RMS error relative to the data RMS, per type
//!   below a stated bound (Q6_K ≪ Q5_K < Q4_K < Q3_K < Q2_K), on Gaussian rows.
//! - Dot products: every variant this CPU runs (scalar, AVX2, AVX-512) for n = 256, 4096, 14336:
//!   *tight*: against f64 over the dequantized weights and dequantized Q8_K activations,
//!   `|dot − ref| ≤ 1e-5 · Σ|w·a| + 1e-6 · Σ(|s| + |m|)·|a|` where `w = s − m` splits each
//!   weight into its scale and min parts (the integer sums are exact; only f32 scale products
//!   and accumulation remain, and the kernels subtract the min sum from the scale sum, which can
//!   cancel); *loose*: against f64 with the original f32 activations, the tight bound plus the
//!   activation rounding, `d_a/2 · |w|` per element (`d_a · |w|` where the quant clamped at +127).
//!
//! Random data with a fresh seed per run, printed; `PSHARD_SEED=<n>` replays a run.

mod common;

use common::{gaussian, rng};

use half::f16;
use pshard_kernels::quant::kquants::{self, Variant, QK_K};
use pshard_kernels::quant::{self as quant, ActFormat, QuantKernel};
use pshard_model::ggml_type::GgmlType;
use rand::rngs::StdRng;
use rand::Rng;

const TYPES: [GgmlType; 5] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Values with a different scale and offset per 16-element group, some zero, constant and outlier
/// groups (to exercise the scale fitting and the min terms).
fn random_row(r: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let kind = r.gen_range(0..12);
        let scale = 10f32.powf(r.gen_range(-2.0..1.0));
        let offset = if r.gen_bool(0.3) {
            r.gen_range(-2.0..2.0) * scale
        } else {
            0.0
        };
        for _ in 0..16 {
            let x = match kind {
                0 => 0.0,
                1 => scale,
                2 if r.gen_bool(0.1) => scale * 20.0,
                _ => offset + scale * gaussian(r),
            };
            v.push(x);
        }
    }
    v
}

fn block_bytes(ty: GgmlType) -> usize {
    ty.type_size() as usize
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn f16_at(b: &[u8], off: usize) -> f64 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f64()
}

// ---------------------------------------------------------------------------------------------
// Independent per-element decoders, written from the format description one element at a time.
// ---------------------------------------------------------------------------------------------

/// Q4_K/Q5_K 6-bit scale and min of sub-block `j` from the 12-byte field `s`.
fn k4_scale_min(s: &[u8], j: usize) -> (u32, u32) {
    if j < 4 {
        ((s[j] & 63) as u32, (s[j + 4] & 63) as u32)
    } else {
        let sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as u32, m as u32)
    }
}

fn decode_elem(ty: GgmlType, b: &[u8], e: usize) -> f64 {
    match ty {
        GgmlType::Q2_K => {
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            let s = b[e / 16];
            let byte = b[16 + 32 * (e / 128) + e % 32];
            let q = (byte >> (2 * ((e % 128) / 32))) & 3;
            d * (s & 15) as f64 * q as f64 - dmin * (s >> 4) as f64
        }
        GgmlType::Q3_K => {
            let d = f16_at(b, 108);
            let i = e / 16;
            let sc = &b[96..108];
            let low4 = if i < 8 { sc[i] & 15 } else { sc[i - 8] >> 4 };
            let high2 = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
            let scale = ((low4 | (high2 << 4)) as i32 - 32) as f64;
            let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = ((b[32 + 32 * h + l] >> (2 * j)) & 3) as i32;
            let hbit = (b[l] >> (4 * h + j)) & 1;
            // High bit set: value is the low bits; clear: 4 is subtracted.
            let q = if hbit == 1 { low } else { low - 4 };
            d * scale * q as f64
        }
        GgmlType::Q4_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, m) = k4_scale_min(&b[4..16], e / 32);
            let byte = b[16 + 32 * (e / 64) + e % 32];
            let q = if e % 64 < 32 { byte & 15 } else { byte >> 4 };
            d * sc as f64 * q as f64 - dmin * m as f64
        }
        GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, m) = k4_scale_min(&b[4..16], e / 32);
            let byte = b[48 + 32 * (e / 64) + e % 32];
            let low = if e % 64 < 32 { byte & 15 } else { byte >> 4 };
            let high = (b[16 + e % 32] >> (e / 32)) & 1;
            let q = low as u32 + 16 * high as u32;
            d * sc as f64 * q as f64 - dmin * m as f64
        }
        GgmlType::Q6_K => {
            let d = f16_at(b, 208);
            let scale = b[192 + e / 16] as i8 as f64;
            let (h, r) = (e / 128, e % 128);
            let (k, l) = (r / 32, r % 32);
            // k = 0: low nibble of ql[l]; 1: low nibble of ql[l+32]; 2: high nibble of ql[l];
            // 3: high nibble of ql[l+32] (within the half's 64 ql bytes).
            let ql = b[64 * h + l + 32 * (k % 2)];
            let low = if k < 2 { ql & 15 } else { ql >> 4 };
            let high = (b[128 + 32 * h + l] >> (2 * k)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            d * scale * q as f64
        }
        _ => unreachable!("not a K-quant"),
    }
}

fn decode_all(ty: GgmlType, blocks: &[u8], n: usize) -> Vec<f64> {
    let bb = block_bytes(ty);
    (0..n)
        .map(|i| decode_elem(ty, &blocks[(i / QK_K) * bb..(i / QK_K + 1) * bb], i % QK_K))
        .collect()
}

fn dequant(ty: GgmlType, blocks: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n];
    (kquants::scalar_kernel(ty).dequantize_row)(blocks, &mut y);
    y
}

/// Random bytes with finite, moderate f16 scales.
fn random_blocks(r: &mut StdRng, ty: GgmlType, nb: usize) -> Vec<u8> {
    let bb = block_bytes(ty);
    let mut v: Vec<u8> = (0..nb * bb).map(|_| r.gen()).collect();
    let d_offsets: &[usize] = match ty {
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => unreachable!(),
    };
    for blk in v.chunks_exact_mut(bb) {
        for &o in d_offsets {
            blk[o..o + 2].copy_from_slice(&f16_bytes(r.gen_range(-0.05..0.05)));
        }
    }
    v
}

#[test]
fn dequantize_matches_independent_decoder_on_random_blocks() {
    let mut r = rng("dequantize_matches_independent_decoder_on_random_blocks");
    for ty in TYPES {
        let nb = 5;
        let blocks = random_blocks(&mut r, ty, nb);
        let got = dequant(ty, &blocks, nb * QK_K);
        let want = decode_all(ty, &blocks, nb * QK_K);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{}: element {i}: dequantize {g} vs decoder {w}",
                ty.name()
            );
        }
    }
}

/// A zeroed block with the given f16 scales set.
fn zero_block(ty: GgmlType) -> Vec<u8> {
    vec![0u8; block_bytes(ty)]
}

#[test]
fn q4k_hand_built_block() {
    let mut b = zero_block(GgmlType::Q4_K);
    b[0..2].copy_from_slice(&f16_bytes(1.0)); // d
    b[2..4].copy_from_slice(&f16_bytes(0.5)); // dmin
                                              // Sub-block 1: scale 3 (byte 5 low 6 bits), min 2 (byte 9).
    b[4 + 1] = 3;
    b[4 + 5] = 2;
    // Sub-block 6: scale 0x25 = 37 (low nibble 5 in byte 10, top bits 0b10 in byte 6),
    // min 0x13 = 19 (high nibble 3 in byte 14, top bits 0b01 in byte 6+4 = byte 10).
    b[4 + 10] = 0x5 | (0x3 << 4);
    b[4 + 2] |= 0b10 << 6;
    b[4 + 6] |= 0b01 << 6;
    // Element 33 (sub-block 1, first of the high nibbles of chunk 0): q = 7 in qs[1] high nibble.
    b[16 + 1] = 7 << 4;
    // Element 6·32 + 4 = 196 (chunk 3, low nibble): q = 11 in qs[96 + 4].
    b[16 + 96 + 4] = 11;
    let y = dequant(GgmlType::Q4_K, &b, QK_K);
    assert_eq!(y[33], 1.0 * 3.0 * 7.0 - 0.5 * 2.0);
    assert_eq!(y[32], -1.0, "other elements of sub-block 1 are −dmin·m");
    assert_eq!(
        y[1], 0.0,
        "low nibble of qs[1] is element 1, sub-block 0 (all zero)"
    );
    assert_eq!(y[196], 37.0 * 11.0 - 0.5 * 19.0);
    assert_eq!(y[197], -0.5 * 19.0);
}

#[test]
fn q5k_hand_built_block() {
    let mut b = zero_block(GgmlType::Q5_K);
    b[0..2].copy_from_slice(&f16_bytes(0.25));
    b[2..4].copy_from_slice(&f16_bytes(1.0));
    // Sub-block 3: scale 4 (byte 3), min 1 (byte 7).
    b[4 + 3] = 4;
    b[4 + 7] = 1;
    // Element 3·32 + 9 = 105 is chunk 1 high nibble at qs[32 + 9]; fifth bit = bit 3 of qh[9].
    b[48 + 32 + 9] = 0x9 << 4;
    b[16 + 9] = 1 << 3;
    // Element 3·32 + 10: only the fifth bit set.
    b[16 + 10] = 1 << 3;
    let y = dequant(GgmlType::Q5_K, &b, QK_K);
    assert_eq!(y[105], 0.25 * 4.0 * 25.0 - 1.0);
    assert_eq!(y[106], 0.25 * 4.0 * 16.0 - 1.0);
    assert_eq!(y[107], -1.0);
    assert_eq!(y[9], 0.0, "bit 3 of qh[9] belongs to sub-block 3 only");
}

#[test]
fn q6k_hand_built_block() {
    let mut b = zero_block(GgmlType::Q6_K);
    b[208..210].copy_from_slice(&f16_bytes(0.5));
    for j in 0..16 {
        b[192 + j] = (j as i8 - 8) as u8;
    }
    // Element 128 + 96 + 5 = 229: high nibble of ql[64 + 32 + 5], top bits 6-7 of qh[32 + 5].
    b[64 + 32 + 5] = 0xa0;
    b[128 + 32 + 5] = 0b11 << 6;
    // Element 2: low nibble of ql[2] = 1, bits 0-1 of qh[2] = 2 → q = 33.
    b[2] = 0x01;
    b[128 + 2] = 0b10;
    let y = dequant(GgmlType::Q6_K, &b, QK_K);
    let sc = |j: usize| (j as f32) - 8.0;
    assert_eq!(y[229], 0.5 * sc(14) * (10.0 + 48.0 - 32.0));
    assert_eq!(y[2], 0.5 * sc(0) * 1.0);
    assert_eq!(y[66], 0.5 * sc(4) * -32.0, "high nibble of ql[2] is zero");
    assert_eq!(y[3], 0.5 * sc(0) * -32.0);
}

#[test]
fn q3k_hand_built_block() {
    let mut b = zero_block(GgmlType::Q3_K);
    b[108..110].copy_from_slice(&f16_bytes(2.0));
    // Scale 13 = 0b10_1101 stored → 45 − 32 = 13: low nibble in high nibble of byte 5
    // (13 ≥ 8), top bits at bit 2·(13/4) = 6 of byte 8 + 13 % 4 = 9.
    b[96 + 5] = 0xd << 4;
    b[96 + 9] = 0b10 << 6;
    // Element 13·16 + 3 = 211: half 1, group 2, l = 19: bits 4-5 of qs[32 + 19], hmask bit 6.
    b[32 + 32 + 19] = 0b11 << 4;
    b[19] = 1 << 6;
    // Element 210 (l = 18): low bits 1, high bit clear → 1 − 4.
    b[32 + 32 + 18] = 0b01 << 4;
    let y = dequant(GgmlType::Q3_K, &b, QK_K);
    assert_eq!(y[211], 2.0 * 13.0 * 3.0);
    assert_eq!(y[210], 2.0 * 13.0 * -3.0);
    assert_eq!(
        y[0],
        2.0 * -32.0 * -4.0,
        "unset scale is −32, unset quant −4"
    );
}

#[test]
fn q2k_hand_built_block() {
    let mut b = zero_block(GgmlType::Q2_K);
    b[80..82].copy_from_slice(&f16_bytes(1.5));
    b[82..84].copy_from_slice(&f16_bytes(0.25));
    // Sub-block 11 (elements 176..192): scale 6, min 3.
    b[11] = 6 | (3 << 4);
    // Element 180: half 1, group 1, l = 20 → bits 2-3 of qs[32 + 20].
    b[16 + 32 + 20] = 0b10 << 2;
    let y = dequant(GgmlType::Q2_K, &b, QK_K);
    assert_eq!(y[180], 1.5 * 6.0 * 2.0 - 0.25 * 3.0);
    assert_eq!(y[181], -0.75);
    assert_eq!(
        y[180 - 32],
        0.0,
        "bits 0-1 of that byte belong to sub-block 9 (zero)"
    );
}

#[test]
fn q8k_round_trip_and_block_sums() {
    let mut r = rng("q8k_round_trip_and_block_sums");
    let n = 4 * QK_K;
    let x = random_row(&mut r, n);
    let mut q = vec![0u8; n / QK_K * 292];
    kquants::quantize_row_q8k(&x, &mut q);
    let mut y = vec![0f32; n];
    kquants::dequantize_row_q8k(&q, &mut y);
    for (bi, (blk, xs)) in q.chunks_exact(292).zip(x.chunks_exact(QK_K)).enumerate() {
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            (d.abs() - amax / 128.0).abs() <= 1e-6 * amax,
            "block {bi}: d {d}"
        );
        for k in 0..16 {
            let want: i32 = blk[4 + 16 * k..4 + 16 * k + 16]
                .iter()
                .map(|&v| v as i8 as i32)
                .sum();
            let got = i16::from_le_bytes([blk[260 + 2 * k], blk[261 + 2 * k]]) as i32;
            assert_eq!(got, want, "block {bi} bsum {k}");
        }
        for (i, (&xi, &yi)) in xs.iter().zip(&y[bi * QK_K..]).enumerate() {
            // Round to nearest, except that the value of largest magnitude maps to −128 and so
            // values near its negation clamp at +127: up to one step off.
            let q = blk[4 + i] as i8;
            let bound = if q == 127 { 1.0001 } else { 0.5001 } * d.abs();
            assert!(
                (xi - yi).abs() <= bound + 1e-30,
                "block {bi} element {i}: {xi} → {yi} (q {q}, d {d})"
            );
        }
    }
    // All-zero block: zero scale and quants.
    let z = vec![0f32; QK_K];
    let mut qz = vec![0xffu8; 292];
    kquants::quantize_row_q8k(&z, &mut qz);
    assert!(qz.iter().all(|&b| b == 0));
}

/// Relative RMS error bound of quantize → dequantize on Gaussian data, per type.
fn rms_bound(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::Q2_K => 0.32,
        GgmlType::Q3_K => 0.17,
        GgmlType::Q4_K => 0.085,
        GgmlType::Q5_K => 0.043,
        GgmlType::Q6_K => 0.021,
        _ => unreachable!(),
    }
}

#[test]
fn quantize_dequantize_error_bounds() {
    let mut r = rng("quantize_dequantize_error_bounds");
    let n = 64 * QK_K;
    let x: Vec<f32> = (0..n).map(|_| gaussian(&mut r)).collect();
    let rms_x = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
    let mut prev = 0.0;
    for ty in TYPES.iter().rev() {
        let k = kquants::scalar_kernel(*ty);
        let mut q = vec![0u8; n / QK_K * block_bytes(*ty)];
        (k.quantize_row)(&x, &mut q);
        let y = dequant(*ty, &q, n);
        let err = (x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt()
            / rms_x;
        println!("{}: relative RMS error {err:.4}", ty.name());
        assert!(
            err < rms_bound(*ty),
            "{}: relative RMS error {err}",
            ty.name()
        );
        assert!(
            err > prev,
            "{}: fewer bits should not be more precise",
            ty.name()
        );
        prev = err;
    }
}

#[test]
fn quantize_handles_structured_rows() {
    // Zero, constant, outlier and offset groups: every value must dequantize finite and within
    // the group's range (plus one step) so that min/scale fitting never goes astray.
    let mut r = rng("quantize_handles_structured_rows");
    let n = 16 * QK_K;
    let x = random_row(&mut r, n);
    for ty in TYPES {
        let k = kquants::scalar_kernel(ty);
        let mut q = vec![0u8; n / QK_K * block_bytes(ty)];
        (k.quantize_row)(&x, &mut q);
        let y = dequant(ty, &q, n);
        for (g, (xs, ys)) in x.chunks_exact(16).zip(y.chunks_exact(16)).enumerate() {
            let blk = &x[(g * 16 / QK_K) * QK_K..][..QK_K];
            let bmax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (&xi, &yi) in xs.iter().zip(ys) {
                assert!(yi.is_finite(), "{}: non-finite output", ty.name());
                assert!(
                    (xi - yi).abs() <= 0.75 * bmax + 1e-6,
                    "{}: group {g}: {xi} → {yi} (block max {bmax})",
                    ty.name()
                );
            }
        }
        // A block of zeros dequantizes to exact zeros.
        let z = vec![0f32; QK_K];
        let mut qz = vec![0u8; block_bytes(ty)];
        (k.quantize_row)(&z, &mut qz);
        assert!(
            dequant(ty, &qz, QK_K).iter().all(|&v| v == 0.0),
            "{}",
            ty.name()
        );
    }
}

/// `Σ (|s_e| + |m_e|)·|a_e|` where each weight is `s_e − m_e` (scale part minus min part). The
/// kernels compute the two parts as separate sums and subtract them, so f32 rounding is relative
/// to this, not to `Σ|w·a|` (the parts can cancel). The parts come from dequantizing copies of
/// the blocks with `dmin` or `d` zeroed.
fn split_abs(ty: GgmlType, blocks: &[u8], ad: &[f32]) -> f64 {
    let n = ad.len();
    let (d_off, dmin_off) = match ty {
        GgmlType::Q2_K => (80, Some(82)),
        GgmlType::Q4_K | GgmlType::Q5_K => (0, Some(2)),
        _ => (0, None),
    };
    let Some(dmin_off) = dmin_off else {
        let w = dequant(ty, blocks, n);
        return w
            .iter()
            .zip(ad)
            .map(|(&p, &q)| (p as f64 * q as f64).abs())
            .sum();
    };
    let bb = block_bytes(ty);
    let zeroed = |off: usize| {
        let mut b = blocks.to_vec();
        for blk in b.chunks_exact_mut(bb) {
            blk[off..off + 2].fill(0);
        }
        dequant(ty, &b, n)
    };
    let s = zeroed(dmin_off);
    let m = zeroed(d_off);
    s.iter()
        .zip(&m)
        .zip(ad)
        .map(|((&sv, &mv), &a)| (sv.abs() as f64 + mv.abs() as f64) * (a as f64).abs())
        .sum()
}

/// The tight bound: `1e-5 · Σ|w·a| + 1e-6 · Σ(|s| + |m|)·|a|` (see [`split_abs`]).
fn tight_bound(ty: GgmlType, blocks: &[u8], wd: &[f32], ad: &[f32]) -> f64 {
    let abs: f64 = wd
        .iter()
        .zip(ad)
        .map(|(&p, &q)| (p as f64 * q as f64).abs())
        .sum();
    1e-5 * abs + 1e-6 * split_abs(ty, blocks, ad) + 1e-30
}

fn check_dot(k: &QuantKernel, w: &[u8], x: &[f32], n: usize) {
    let mut a = vec![0u8; n / QK_K * 292];
    kquants::quantize_row_q8k(x, &mut a);
    let wd = dequant(k.ty, w, n);
    let mut ad = vec![0f32; n];
    kquants::dequantize_row_q8k(&a, &mut ad);
    let tight_ref: f64 = wd.iter().zip(&ad).map(|(&p, &q)| p as f64 * q as f64).sum();
    let got = (k.dot)(w, &a, n) as f64;
    let tight = tight_bound(k.ty, w, &wd, &ad);
    assert!(
        (got - tight_ref).abs() <= tight,
        "{} {} n={n}: dot {got} vs f64 {tight_ref} (bound {tight})",
        k.ty.name(),
        k.dot_variant
    );
    let loose_ref: f64 = wd.iter().zip(x).map(|(&p, &q)| p as f64 * q as f64).sum();
    // Activation rounding per element: half a step, a full step where +127 clamped.
    let mut act_err = 0.0;
    for (blk, ws) in a.chunks_exact(292).zip(wd.chunks_exact(QK_K)) {
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]).abs() as f64;
        for (&q, &wv) in blk[4..260].iter().zip(ws) {
            let steps = if q as i8 == 127 { 1.0 } else { 0.5 };
            act_err += steps * d * (wv as f64).abs();
        }
    }
    let loose = tight + act_err * 1.0001;
    assert!(
        (got - loose_ref).abs() <= loose,
        "{} {} n={n}: dot {got} vs f64 with f32 activations {loose_ref} (bound {loose})",
        k.ty.name(),
        k.dot_variant
    );
}

#[test]
fn dot_variants_match_f64_reference() {
    let mut r = rng("dot_variants_match_f64_reference");
    for ty in TYPES {
        let variants = kquants::kernel_variants(ty);
        let names: Vec<_> = variants.iter().map(|k| k.dot_variant).collect();
        println!("{}: variants {names:?}", ty.name());
        assert_eq!(variants[0].dot_variant, "scalar");
        for n in [256usize, 4096, 14336] {
            // Quantized from real-valued data (realistic), and random bytes (every bit pattern).
            let x = random_row(&mut r, n);
            let wf = random_row(&mut r, n);
            let mut wq = vec![0u8; n / QK_K * block_bytes(ty)];
            (variants[0].quantize_row)(&wf, &mut wq);
            let wr = random_blocks(&mut r, ty, n / QK_K);
            for k in &variants {
                assert_eq!(k.act, ActFormat::Q8K);
                check_dot(k, &wq, &x, n);
                check_dot(k, &wr, &x, n);
            }
        }
    }
}

#[test]
fn dot_with_extreme_activations() {
    // Activations at ±128 quants and weights at their largest quants: the 16-bit pair sums and
    // the i32 block sums must not saturate in any variant.
    for ty in TYPES {
        let n = 2 * QK_K;
        let x: Vec<f32> = (0..n)
            .map(|i| if i % 3 == 0 { 1.0 } else { -1.0 })
            .collect();
        let mut wq = vec![0xffu8; n / QK_K * block_bytes(ty)];
        let mut wneg = vec![0u8; n / QK_K * block_bytes(ty)];
        for blk in wq
            .chunks_exact_mut(block_bytes(ty))
            .chain(wneg.chunks_exact_mut(block_bytes(ty)))
        {
            let offs: &[usize] = match ty {
                GgmlType::Q2_K => &[80, 82],
                GgmlType::Q3_K => &[108],
                GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
                GgmlType::Q6_K => &[208],
                _ => unreachable!(),
            };
            for &o in offs {
                blk[o..o + 2].copy_from_slice(&f16_bytes(0.01));
            }
        }
        for k in kquants::kernel_variants(ty) {
            check_dot(&k, &wq, &x, n);
            check_dot(&k, &wneg, &x, n);
        }
    }
}

#[test]
fn quant_table_dispatches_here() {
    for ty in TYPES {
        let k = kquants::kernel(ty);
        assert_eq!(kquants::kernel_variants(ty).len(), 1, "one reference dot");
        assert_eq!(k.dot_variant, "scalar");
        let via_table = quant::kernel(ty).expect("K-quants are supported");
        assert_eq!(via_table.act, ActFormat::Q8K);
        assert_eq!(via_table.dot_variant, k.dot_variant);
        assert!(quant::kernel_at(ty, Variant::Scalar).is_some());
    }
    assert!(kquants::kernel_variant(GgmlType::Q8_0, Variant::Scalar).is_none());
    assert!(kquants::kernel_variant(GgmlType::Q4_K, Variant::Avx2).is_none());
}

#[test]
#[should_panic(expected = "not a whole number of 256-element blocks")]
fn dot_rejects_partial_block() {
    let k = kquants::kernel(GgmlType::Q4_K);
    let w = vec![0u8; 144];
    let a = vec![0u8; 292];
    (k.dot)(&w, &a, 100);
}

#[test]
#[should_panic(expected = "weight row has")]
fn dot_rejects_short_weight_row() {
    let k = kquants::kernel(GgmlType::Q6_K);
    let w = vec![0u8; 209];
    let a = vec![0u8; 292];
    (k.dot)(&w, &a, 256);
}
