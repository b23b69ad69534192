//! Float and legacy block types (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): reference
//! quantize → dequantize error bounds, and every dot variant this CPU runs (SIMD and scalar)
//! against a plain f64 reference.
//!
//! Random data with a fresh seed per run, printed; `PSHARD_SEED=<n>` replays a run.
//!
//! Tolerances (Σ|w·a| is taken over the dequantized operands):
//! - *tight*: against f64 over the dequantized weights and the dequantized partner activations:
//!   `|dot − ref| ≤ 1e-5 · Σ|w·a|` (+ for Q8_1 partners the known rounding of the stored f16 block
//!   sum, `Σ_blocks |m_w| · |s − d Σq|`, computed from the data). The integer block sums are
//!   exact, so only f32 accumulation and f16 scale products remain.
//! - *loose*: against f64 with the original f32 activations: the tight bound plus the activation
//!   quantization error `Σ_blocks (0.5 d + 127 max(d 2⁻¹¹, 2⁻²⁵)) · Σ|w|` with `d = max|a| / 127`
//!   (round-to-nearest, then the f16 rounding of the scale, subnormal included). For
//!   F32/F16/BF16 activations are not quantized and the loose bound equals the tight one.

mod common;

use common::rng;

use half::f16;
use pshard_kernels::quant::{self, act, float, legacy, ActFormat, QuantKernel};
use pshard_model::ggml_type::GgmlType;
use rand::rngs::StdRng;
use rand::Rng;

const TYPES: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

/// Values with a different scale and offset per 32-block, some zero, constant and outlier blocks.
fn random_row(r: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let len = 32.min(n - v.len());
        let kind = r.gen_range(0..10);
        let scale = 10f32.powf(r.gen_range(-3.0..2.0));
        let offset = if r.gen_bool(0.3) {
            r.gen_range(-2.0..2.0) * scale
        } else {
            0.0
        };
        for _ in 0..len {
            let x = match kind {
                0 => 0.0,
                1 => scale,
                2 if r.gen_bool(0.1) => scale * 30.0,
                _ => offset + scale * r.gen_range(-1.0f32..1.0),
            };
            v.push(x);
        }
    }
    v
}

fn variants(ty: GgmlType) -> Vec<QuantKernel> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => float::kernel_variants(ty),
        _ => legacy::kernel_variants(ty),
    }
}

fn quantize(k: &QuantKernel, x: &[f32]) -> Vec<u8> {
    let bytes = k.ty.row_bytes(x.len() as u64).unwrap() as usize;
    let mut q = vec![0xAAu8; bytes];
    (k.quantize_row)(x, &mut q);
    q
}

fn dequantize(k: &QuantKernel, q: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n];
    (k.dequantize_row)(q, &mut y);
    y
}

fn f16_at(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Largest allowed |x − dequant(quant(x))| for one block of a type, from the block's data.
fn block_bound(ty: GgmlType, x: &[f32], wblock: &[u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    let e16 = 2f32.powi(-11);
    // Rounding a scale to f16 errs by at most max(|d| 2^-11, 2^-25) (2^-25: half the subnormal step).
    let sub = 2f32.powi(-25);
    match ty {
        GgmlType::F32 => 0.0,
        // Round to nearest: half an ulp (relative 2^-11 resp. 2^-8), subnormal f16 step 2^-25.
        GgmlType::F16 => amax * e16 + sub,
        GgmlType::BF16 => amax * 2f32.powi(-8),
        // Half a step of d = max/127, plus the f16 rounding of d times 127.
        GgmlType::Q8_0 => amax / 127.0 * (0.5 + 127.0 * e16) + 127.0 * sub,
        // Symmetric 4/5-bit: the most negative level is clamped away on the side opposite the
        // maximum (error up to one step d = max/8 resp. max/16), plus f16 rounding of d.
        GgmlType::Q4_0 => amax / 8.0 * (1.0 + 8.0 * e16) + 8.0 * sub,
        GgmlType::Q5_0 => amax / 16.0 * (1.0 + 16.0 * e16) + 16.0 * sub,
        // Asymmetric: half a step of d = (max − min)/15 resp. /31, f16 rounding of d and of m.
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let top = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
            let d = f16_at(wblock).abs();
            (hi - lo) / top * 0.5 + top * (d * e16 + sub) + lo.abs() * e16 + sub
        }
        _ => unreachable!(),
    }
}

#[test]
fn quantize_dequantize_error_bounds() {
    let mut r = rng("quantize_dequantize_error_bounds");
    for ty in TYPES {
        let k = quant::scalar_kernel(ty).unwrap();
        for &n in &[32usize, 64, 4096] {
            let x = random_row(&mut r, n);
            let q = quantize(&k, &x);
            let y = dequantize(&k, &q, n);
            let bs = ty.block_size() as usize;
            let bb = ty.type_size() as usize;
            for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let wblock = &q[b * 32 / bs * bb..];
                let bound = if bs == 1 {
                    0.0
                } else {
                    block_bound(ty, xb, wblock)
                };
                for (i, (a, c)) in xb.iter().zip(yb).enumerate() {
                    let bound = if bs == 1 {
                        block_bound(ty, &[*a], wblock)
                    } else {
                        bound
                    };
                    assert!(
                        (a - c).abs() <= bound,
                        "{ty} n={n} block {b} elem {i}: {a} → {c}, error {} > bound {bound}",
                        (a - c).abs()
                    );
                }
            }
        }
    }
}

/// Dot of the dequantized weights with the dequantized activations in f64, Σ|w·a|, and the
/// allowed slack from the stored Q8_1 block sums.
fn reference(k: &QuantKernel, wq: &[u8], aq: &[u8], n: usize) -> (f64, f64, f64) {
    let w = dequantize(k, wq, n);
    let mut a = vec![0f32; n];
    act::dequantize_acts_row(k.act, aq, &mut a);
    let dot: f64 = w.iter().zip(&a).map(|(&x, &y)| x as f64 * y as f64).sum();
    let abs: f64 = w
        .iter()
        .zip(&a)
        .map(|(&x, &y)| (x as f64 * y as f64).abs())
        .sum();
    let mut slack = 0f64;
    if k.act == ActFormat::Q8_1 {
        let wb = k.ty.type_size() as usize;
        for b in 0..n / 32 {
            let m = f16_at(&wq[b * wb + 2..]) as f64;
            let ab = &aq[b * 36..(b + 1) * 36];
            let sum: i32 = ab[4..].iter().map(|&q| q as i8 as i32).sum();
            let exact = f16_at(ab) as f64 * sum as f64;
            slack += m.abs() * (f16_at(&ab[2..]) as f64 - exact).abs();
        }
    }
    (dot, abs, slack)
}

/// The activation quantization bound of the module docs, for unquantized activations `a`.
fn act_quant_bound(format: ActFormat, w: &[f32], a: &[f32]) -> f64 {
    if format == ActFormat::F32 {
        return 0.0;
    }
    w.chunks(32)
        .zip(a.chunks(32))
        .map(|(wb, ab)| {
            let amax = ab.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
            let d = amax / 127.0;
            (0.5 * d + 127.0 * (d * 2f64.powi(-11) + 2f64.powi(-25))) * wsum
        })
        .sum()
}

#[test]
fn dot_variants_match_f64_reference() {
    let mut r = rng("dot_variants_match_f64_reference");
    for ty in TYPES {
        let all = variants(ty);
        assert_eq!(all.last().unwrap().dot_variant, "scalar");
        // The table's choice: the best variant, unless PSHARD_CPU_SIMD caps it.
        let want = quant::kernel_at(ty, quant::simd_cap()).unwrap().dot_variant;
        assert_eq!(quant::kernel(ty).unwrap().dot_variant, want, "{ty}: table");
        if quant::simd_cap() == quant::SimdLevel::Avx512 {
            assert_eq!(want, all[0].dot_variant, "{ty}: best variant");
        }
        println!(
            "{ty}: variants {:?}",
            all.iter().map(|k| k.dot_variant).collect::<Vec<_>>()
        );
        let lens: &[usize] = if ty.is_quantized() {
            &[32, 64, 96, 160, 4096]
        } else {
            &[1, 7, 31, 32, 33, 64, 65, 100, 257, 4096]
        };
        for &n in lens {
            for _ in 0..4 {
                let x = random_row(&mut r, n);
                let a = random_row(&mut r, n);
                let k0 = &all[0];
                let wq = quantize(k0, &x);
                let mut aq = vec![0u8; k0.act.row_bytes(n).unwrap()];
                act::quantize_acts_row(k0.act, &a, &mut aq);
                let (want, abs, slack) = reference(k0, &wq, &aq, n);
                let tight = 1e-5 * abs + slack + 1e-30;
                let w = dequantize(k0, &wq, n);
                let exact: f64 = w.iter().zip(&a).map(|(&p, &q)| p as f64 * q as f64).sum();
                let loose = tight + act_quant_bound(k0.act, &w, &a);
                for k in &all {
                    let got = (k.dot)(&wq, &aq, n) as f64;
                    assert!(
                        (got - want).abs() <= tight,
                        "{ty} {} n={n}: {got} vs reference {want}, diff {} > {tight}",
                        k.dot_variant,
                        (got - want).abs()
                    );
                    assert!(
                        (got - exact).abs() <= loose,
                        "{ty} {} n={n}: {got} vs unquantized {exact}, diff {} > {loose}",
                        k.dot_variant,
                        (got - exact).abs()
                    );
                }
            }
        }
    }
}

/// Extreme levels: every weight at its lowest or highest level and activations at ±127 exercise
/// the saturation-free claims of the SIMD code (i16 pair sums, |−128| weights in Q8_0).
#[test]
fn extreme_levels_are_exact() {
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        let all = variants(ty);
        let n = 256;
        let bb = ty.type_size() as usize;
        for pattern in 0..4u32 {
            let mut wq = vec![0u8; n / 32 * bb];
            for blk in wq.chunks_exact_mut(bb) {
                blk[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
                let fill = if pattern % 2 == 0 { 0x00 } else { 0xFF };
                match ty {
                    GgmlType::Q8_0 => blk[2..].fill(if pattern % 2 == 0 { 0x80 } else { 0x7F }),
                    GgmlType::Q4_0 => blk[2..].fill(fill),
                    GgmlType::Q4_1 => {
                        blk[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
                        blk[4..].fill(fill)
                    }
                    GgmlType::Q5_0 => blk[2..].fill(fill),
                    _ => {
                        blk[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
                        blk[4..].fill(fill)
                    }
                }
            }
            let a: Vec<f32> = (0..n)
                .map(|i| {
                    if (i as u32 + pattern).is_multiple_of(3) {
                        -127.0
                    } else {
                        127.0
                    }
                })
                .collect();
            let mut aq = vec![0u8; all[0].act.row_bytes(n).unwrap()];
            act::quantize_acts_row(all[0].act, &a, &mut aq);
            let (want, abs, slack) = reference(&all[0], &wq, &aq, n);
            for k in &all {
                let got = (k.dot)(&wq, &aq, n) as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * abs + slack,
                    "{ty} {} pattern {pattern}: {got} vs {want}",
                    k.dot_variant
                );
            }
        }
    }
}
