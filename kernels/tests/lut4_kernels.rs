//! The lookup-table types IQ4_NL, IQ4_XS and MXFP4.
//!
//! - Layout: hand-built blocks with chosen fields, and random blocks, decoded by an independent
//!   per-element decoder written here from the GGUF/ggml format description; and the committed
//!   llama.cpp fixtures (`tests/fixtures/llama-ref`, made by `scripts/llama-ref/make-fixtures.sh`
//!   with ggml's own `to_float`), which must match bit for bit.
//! - Reference quantizers: relative RMS error on Gaussian rows below stated bounds, IQ4_NL below
//!   Q4_0's at the same size; zero blocks stay zero.
//! - Dot products, every variant this CPU runs: *tight* against f64 over the dequantized weights
//!   and dequantized activations (`1e-5 · Σ|w·a|`: the integer sums are exact, only the f32
//!   scales and accumulation round); *loose* against f64 with the f32 activations (plus half an
//!   activation step per element, a full one where Q8_K clamped at +127). Also activations at the
//!   ends of the int8 range (Q8_K's −128), and the register tiles.
//!
//! Random data with a fresh seed per run, printed; `PSHARD_SEED=<n>` replays a run.

mod common;

use common::{gaussian, rng};

use half::f16;
use pshard_kernels::quant::act::{dequantize_acts_row, quantize_acts_row};
use pshard_kernels::quant::lut4::{self, FP4, NL};
use pshard_kernels::quant::{self as quant, ActFormat, QuantKernel};
use pshard_model::ggml_type::GgmlType;
use rand::rngs::StdRng;
use rand::Rng;

const TYPES: [GgmlType; 3] = [GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4];

/// Gaussian values with a different scale per 32-element group, some zero and outlier groups.
fn random_row(r: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let kind = r.gen_range(0..10);
        let scale = 10f32.powf(r.gen_range(-2.0..1.0));
        for _ in 0..32 {
            v.push(match kind {
                0 => 0.0,
                1 if r.gen_bool(0.1) => scale * 30.0,
                _ => scale * gaussian(r),
            });
        }
    }
    v
}

fn qk(ty: GgmlType) -> usize {
    ty.block_size() as usize
}

fn bb(ty: GgmlType) -> usize {
    ty.type_size() as usize
}

fn f16_at(b: &[u8], off: usize) -> f64 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f64()
}

// ---------------------------------------------------------------------------------------------
// Independent decoder, one element at a time, from the format description.
// ---------------------------------------------------------------------------------------------

/// Nibble `e` (0..32) of a 16-byte run: low nibble of byte `e` for `e < 16`, else the high nibble
/// of byte `e − 16`.
fn nibble(qs: &[u8], e: usize) -> usize {
    if e < 16 {
        (qs[e] & 15) as usize
    } else {
        (qs[e - 16] >> 4) as usize
    }
}

fn decode_elem(ty: GgmlType, b: &[u8], e: usize) -> f64 {
    match ty {
        GgmlType::IQ4_NL => f16_at(b, 0) * NL[nibble(&b[2..18], e)] as f64,
        GgmlType::MXFP4 => 2f64.powi(b[0] as i32 - 128) * FP4[nibble(&b[1..17], e)] as f64,
        GgmlType::IQ4_XS => {
            let j = e / 32;
            let low = (b[4 + j / 2] >> (4 * (j % 2))) & 15;
            let scales_h = u16::from_le_bytes([b[2], b[3]]);
            let high = ((scales_h >> (2 * j)) & 3) as u8;
            let ls = (low | high << 4) as i32 - 32;
            f16_at(b, 0) * ls as f64 * NL[nibble(&b[8 + 16 * j..24 + 16 * j], e % 32)] as f64
        }
        _ => unreachable!(),
    }
}

fn decode_all(ty: GgmlType, blocks: &[u8], n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let blk = i / qk(ty);
            decode_elem(ty, &blocks[blk * bb(ty)..(blk + 1) * bb(ty)], i % qk(ty))
        })
        .collect()
}

fn dequant(ty: GgmlType, blocks: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n];
    (lut4::scalar_kernel(ty).dequantize_row)(blocks, &mut y);
    y
}

/// Random bytes with finite, moderate scales (IQ4: f16 within ±0.05; MXFP4: e in 110..130).
fn random_blocks(r: &mut StdRng, ty: GgmlType, nb: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..nb * bb(ty)).map(|_| r.gen()).collect();
    for blk in v.chunks_exact_mut(bb(ty)) {
        if ty == GgmlType::MXFP4 {
            blk[0] = r.gen_range(110..130);
        } else {
            blk[0..2].copy_from_slice(&f16::from_f32(r.gen_range(-0.05..0.05)).to_le_bytes());
        }
    }
    v
}

#[test]
fn dequantize_matches_independent_decoder_on_random_blocks() {
    let mut r = rng("dequantize_matches_independent_decoder_on_random_blocks");
    for ty in TYPES {
        let nb = 7;
        let n = nb * qk(ty);
        let blocks = random_blocks(&mut r, ty, nb);
        let got = dequant(ty, &blocks, n);
        let want = decode_all(ty, &blocks, n);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g as f64, w, "{ty} element {i}");
        }
        // The int8 view: scale per run of 32 times the level, exactly the dequantized value.
        let mut q = vec![0i8; qk(ty)];
        let mut s = vec![0f32; qk(ty) / 32];
        for (bi, blk) in blocks.chunks_exact(bb(ty)).enumerate() {
            lut4::unpack(ty, blk, &mut q, &mut s);
            for (e, &qe) in q.iter().enumerate() {
                assert_eq!(
                    s[e / 32] * qe as f32,
                    got[bi * qk(ty) + e],
                    "{ty} unpack block {bi} element {e}"
                );
            }
        }
    }
}

#[test]
fn iq4_nl_hand_built_block() {
    let mut b = vec![0u8; 18];
    b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
    // Element 3: low nibble of qs[3] = 15 → 113; element 19: its high nibble = 0 → −127.
    b[2 + 3] = 0x0F;
    // Element 31: high nibble of qs[15] = 8 → 1; element 15 (low nibble) = 7 → −10.
    b[2 + 15] = 0x87;
    let y = dequant(GgmlType::IQ4_NL, &b, 32);
    assert_eq!(y[3], 0.5 * 113.0);
    assert_eq!(y[19], 0.5 * -127.0);
    assert_eq!(y[31], 0.5);
    assert_eq!(y[15], -5.0);
    assert_eq!(y[0], 0.5 * -127.0, "index 0 is the most negative level");
}

#[test]
fn iq4_xs_hand_built_block() {
    let mut b = vec![0u8; 136];
    b[0..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
    // Sub-block 3: ls = 0b10_0101 = 37 → +5: low nibble 5 in the high nibble of scales_l[1],
    // top bits 0b10 at bits 6..8 of scales_h.
    b[4 + 1] = 0x50;
    b[2..4].copy_from_slice(&(0b10u16 << 6).to_le_bytes());
    // Sub-block 3, element 7 (block element 103): low nibble of qs[48 + 7] = 12 → 53.
    b[8 + 48 + 7] = 0xC0 | 12;
    let y = dequant(GgmlType::IQ4_XS, &b, 256);
    assert_eq!(y[96 + 7], 0.25 * 5.0 * 53.0);
    // Its high nibble (element 96 + 23) is 12 too.
    assert_eq!(y[96 + 23], 0.25 * 5.0 * 53.0);
    assert_eq!(y[96], 0.25 * 5.0 * -127.0, "index 0 of sub-block 3");
    // Sub-block 2 shares scales_l[1] (low nibble 0) and has top bits 0: ls = 0 → −32.
    assert_eq!(y[64], 0.25 * -32.0 * -127.0);
}

#[test]
fn mxfp4_hand_built_block() {
    let mut b = vec![0u8; 17];
    b[0] = 128; // value scale 2^0: each element is its doubled E2M1 level
    b[1] = 0x97; // element 0: 7 → 12 (E2M1 6.0, doubled); element 16: 9 → −1
    b[1 + 5] = 0xF4; // element 5: 4 → 4; element 21: 15 → −12
    let y = dequant(GgmlType::MXFP4, &b, 32);
    assert_eq!(y[0], 12.0);
    assert_eq!(y[16], -1.0);
    assert_eq!(y[5], 4.0);
    assert_eq!(y[21], -12.0);
    assert_eq!(y[1], 0.0);
    // e = 130: scale 4; e = 0: 2^-128 (subnormal f32), still exact.
    b[0] = 130;
    assert_eq!(dequant(GgmlType::MXFP4, &b, 32)[0], 48.0);
    b[0] = 0;
    assert_eq!(
        dequant(GgmlType::MXFP4, &b, 32)[0] as f64,
        12.0 * 2f64.powi(-128)
    );
}

/// The committed llama.cpp fixtures: every block dequantizes to exactly ggml's values.
#[test]
fn dequantize_matches_llama_cpp_fixtures() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-ref");
    for (ty, file) in [
        (GgmlType::IQ4_NL, "iq4_nl.txt"),
        (GgmlType::IQ4_XS, "iq4_xs.txt"),
        (GgmlType::MXFP4, "mxfp4.txt"),
    ] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).expect("fixture present");
        let mut blocks = 0;
        for (ln, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let mut it = line.split_whitespace();
            let hex = it.next().expect("block hex");
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            assert_eq!(bytes.len(), bb(ty), "{file}:{}", ln + 1);
            let want: Vec<f32> = it.map(|v| v.parse().expect("value")).collect();
            assert_eq!(want.len(), qk(ty), "{file}:{}", ln + 1);
            let got = dequant(ty, &bytes, qk(ty));
            for (e, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{file}:{} element {e}", ln + 1);
            }
            blocks += 1;
        }
        assert!(blocks >= 4, "{file}: only {blocks} blocks");
    }
}

// ---------------------------------------------------------------------------------------------
// Quantizers
// ---------------------------------------------------------------------------------------------

fn rel_rms(x: &[f32], y: &[f32]) -> f64 {
    let num: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let k = quant::scalar_kernel(ty).unwrap();
    let mut q = vec![0u8; x.len() / qk(ty) * bb(ty)];
    (k.quantize_row)(x, &mut q);
    let mut y = vec![0f32; x.len()];
    (k.dequantize_row)(&q, &mut y);
    y
}

#[test]
fn quantize_dequantize_error_bounds() {
    let mut r = rng("quantize_dequantize_error_bounds");
    let n = 64 * 256;
    let x: Vec<f32> = (0..n).map(|_| gaussian(&mut r)).collect();
    let err = |ty| rel_rms(&x, &round_trip(ty, &x));
    let (nl, xs, mx, q4_0) = (
        err(GgmlType::IQ4_NL),
        err(GgmlType::IQ4_XS),
        err(GgmlType::MXFP4),
        err(GgmlType::Q4_0),
    );
    println!("relative RMS error: IQ4_NL {nl:.4}, IQ4_XS {xs:.4}, MXFP4 {mx:.4}, Q4_0 {q4_0:.4}");
    // Measured 0.074 / 0.075 / 0.111 (Q4_0's reference quantizer 0.087).
    assert!(nl < 0.08, "IQ4_NL {nl}");
    assert!(xs < 0.08, "IQ4_XS {xs}");
    assert!(mx < 0.12, "MXFP4 {mx}");
    assert!(
        nl < q4_0,
        "IQ4_NL {nl} should beat Q4_0 {q4_0} at the same size"
    );
}

#[test]
fn quantize_handles_structured_rows() {
    let mut r = rng("quantize_handles_structured_rows");
    let n = 8 * 256;
    let x = random_row(&mut r, n);
    for ty in TYPES {
        let y = round_trip(ty, &x);
        for (g, (xs, ys)) in x.chunks_exact(32).zip(y.chunks_exact(32)).enumerate() {
            let gmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bmax = x[(g * 32 / qk(ty)) * qk(ty)..][..qk(ty)]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            for (&a, &b) in xs.iter().zip(ys) {
                assert!(b.is_finite(), "{ty}: non-finite");
                // Within the group's range plus a step of the block (IQ4_XS sub-block scales are
                // 6-bit multiples of the block scale, so a small group may round to zero).
                assert!(
                    (a - b).abs() <= 0.3 * gmax + 0.1 * bmax + 1e-6,
                    "{ty} group {g}: {a} → {b} (group max {gmax}, block max {bmax})"
                );
            }
        }
        let z = vec![0f32; qk(ty)];
        assert!(round_trip(ty, &z).iter().all(|&v| v == 0.0), "{ty} zeros");
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

fn act_rows(format: ActFormat, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut a = vec![0u8; format.row_bytes(x.len()).unwrap()];
    quantize_acts_row(format, x, &mut a);
    let mut ad = vec![0f32; x.len()];
    dequantize_acts_row(format, &a, &mut ad);
    (a, ad)
}

fn dot_f64(w: &[f32], a: &[f32]) -> (f64, f64) {
    let s = w.iter().zip(a).map(|(&p, &q)| p as f64 * q as f64).sum();
    let abs = w
        .iter()
        .zip(a)
        .map(|(&p, &q)| (p as f64 * q as f64).abs())
        .sum();
    (s, abs)
}

/// Activation rounding bound: half a step per element, a full one where Q8_K clamped at +127.
fn act_err(format: ActFormat, a: &[u8], wd: &[f32]) -> f64 {
    let (qk_a, ab) = (format.block_size(), format.block_bytes());
    let mut e = 0.0;
    for (blk, ws) in a.chunks_exact(ab).zip(wd.chunks_exact(qk_a)) {
        let (d, qs) = if format == ActFormat::Q8K {
            (
                f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]).abs() as f64,
                &blk[4..260],
            )
        } else {
            (
                f16::from_le_bytes([blk[0], blk[1]]).to_f64().abs(),
                &blk[2..34],
            )
        };
        for (&q, &w) in qs.iter().zip(ws) {
            let steps = if q as i8 == 127 && format == ActFormat::Q8K {
                1.0
            } else {
                0.5
            };
            e += steps * d * (w as f64).abs();
        }
    }
    e
}

fn check_dot(k: &QuantKernel, w: &[u8], x: &[f32]) {
    let n = x.len();
    let (a, ad) = act_rows(k.act, x);
    let wd = dequant(k.ty, w, n);
    let got = (k.dot)(w, &a, n) as f64;
    let (want, abs) = dot_f64(&wd, &ad);
    let tight = 1e-5 * abs + 1e-30;
    assert!(
        (got - want).abs() <= tight,
        "{} {} n={n}: dot {got} vs f64 {want} (bound {tight})",
        k.ty,
        k.dot_variant
    );
    let (loose_ref, _) = dot_f64(&wd, x);
    let loose = tight + act_err(k.act, &a, &wd) * 1.0001;
    assert!(
        (got - loose_ref).abs() <= loose,
        "{} {} n={n}: dot {got} vs f64 with f32 activations {loose_ref} (bound {loose})",
        k.ty,
        k.dot_variant
    );
}

#[test]
fn dot_variants_match_f64_reference() {
    let mut r = rng("dot_variants_match_f64_reference");
    for ty in TYPES {
        let variants = lut4::kernel_variants(ty);
        let names: Vec<_> = variants.iter().map(|k| k.dot_variant).collect();
        println!("{ty}: variants {names:?}");
        assert_eq!(variants.last().unwrap().dot_variant, "scalar");
        let want_act = if ty == GgmlType::IQ4_XS {
            ActFormat::Q8K
        } else {
            ActFormat::Q8_0
        };
        // Odd block counts (the AVX-512 steps pair blocks) as well as round sizes.
        for n in [256usize, 1280, 4096, 14336] {
            let x = random_row(&mut r, n);
            let mut wq = vec![0u8; n / qk(ty) * bb(ty)];
            (variants[0].quantize_row)(&random_row(&mut r, n), &mut wq);
            let wr = random_blocks(&mut r, ty, n / qk(ty));
            for k in &variants {
                assert_eq!(k.act, want_act);
                check_dot(k, &wq, &x);
                check_dot(k, &wr, &x);
            }
        }
        if ty != GgmlType::IQ4_XS {
            // 32-element blocks: a single block and three (an odd step count).
            for n in [32usize, 96] {
                let x = random_row(&mut r, n);
                let wr = random_blocks(&mut r, ty, n / 32);
                for k in &variants {
                    check_dot(k, &wr, &x);
                }
            }
        }
    }
}

#[test]
fn dot_with_extreme_activations() {
    // Activations whose quants reach −128 (Q8_K: the largest magnitude is negative) and ±127,
    // against the largest levels of both signs: `|a| · sign(K, a)` must stay exact.
    for ty in TYPES {
        let n = 512;
        let x: Vec<f32> = (0..n)
            .map(|i| match i % 5 {
                0 => -1.0,
                1 => 0.999,
                2 => -0.5,
                _ => 0.25,
            })
            .collect();
        for fill in [0x00u8, 0xFF, 0x0F, 0xF0] {
            let mut w = vec![fill; n / qk(ty) * bb(ty)];
            for blk in w.chunks_exact_mut(bb(ty)) {
                if ty == GgmlType::MXFP4 {
                    blk[0] = 126;
                } else {
                    blk[0..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                }
            }
            for k in lut4::kernel_variants(ty) {
                check_dot(&k, &w, &x);
            }
        }
    }
}

#[test]
fn quant_table_dispatches_here() {
    for ty in TYPES {
        let k = quant::kernel(ty).expect("supported");
        assert!(quant::SUPPORTED.contains(&ty));
        let capped = quant::kernel_at(ty, quant::simd_cap()).unwrap();
        assert_eq!(k.dot_variant, capped.dot_variant);
        assert_eq!(quant::scalar_kernel(ty).unwrap().dot_variant, "scalar");
        assert_eq!(
            k.act.ggml_type(),
            lut4::geometry(ty).unwrap().act.ggml_type()
        );
    }
    assert!(lut4::geometry(GgmlType::Q4_0).is_none());
}

#[test]
#[should_panic(expected = "not a whole number")]
fn dot_rejects_partial_block() {
    let k = lut4::kernel(GgmlType::IQ4_XS);
    (k.dot)(&[0u8; 136], &[0u8; 292], 100);
}
