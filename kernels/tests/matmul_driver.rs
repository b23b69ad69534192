//! The CPU matmul driver against an f64 reference, with odd shapes, output row sub-ranges (other
//! outputs poisoned with NaN and checked untouched), several thread counts, and its errors.
//!
//! Random data with a fresh seed per run, printed; `PSHARD_SEED=<n>` replays a run.
//!
//! Tolerance per output: `1e-5 · Σ|w·a| + slack` against f64 over the dequantized weights and the
//! dequantized partner activations (`slack`: the stored f16 block sums of Q8_1, as in
//! `legacy_dot.rs`; K-quants get 1e-4 because their kernels fold several f32 block scales).
//!
//! The exact-activation path (`matmul_exact`) is checked against f64 over the dequantized weights
//! and the unrounded f32 activations, within `1e-5 · Σ|w·a|` (f32 products and sums only).

mod common;

use common::rng;

use half::f16;
use pshard_kernels::gemm::packed;
use pshard_kernels::matmul::{
    matmul, matmul_at, matmul_exact, matmul_f32, matmul_f32_with, matmul_many, quantize_acts,
    ActPrecision, KernelError, MatmulPart, QuantizedActs, WeightLayout, WeightMatrix,
};
use pshard_kernels::pool;
use pshard_kernels::quant::{self, act, ActFormat, QuantKernel, SimdLevel};
use pshard_model::ggml_type::GgmlType;
use rand::rngs::StdRng;
use rand::Rng;

fn random_vec(r: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let scale = 10f32.powf(r.gen_range(-2.0..1.0));
        let offset = if r.gen_bool(0.3) {
            r.gen_range(-1.0..1.0) * scale
        } else {
            0.0
        };
        for _ in 0..32.min(n - v.len()) {
            v.push(offset + scale * r.gen_range(-1.0f32..1.0));
        }
    }
    v
}

fn f16_at(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Quantized weights for a `rows × cols` matrix and their dequantized values.
fn make_weights(r: &mut StdRng, k: &QuantKernel, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let rb = k.ty.row_bytes(cols as u64).unwrap() as usize;
    let mut data = vec![0u8; rows * rb];
    let mut deq = vec![0f32; rows * cols];
    for (row, (d, y)) in data
        .chunks_exact_mut(rb)
        .zip(deq.chunks_exact_mut(cols))
        .enumerate()
    {
        let _ = row;
        let x = random_vec(r, cols);
        (k.quantize_row)(&x, d);
        (k.dequantize_row)(d, y);
    }
    (data, deq)
}

/// f64 reference for output (t, r), its Σ|w·a| and the Q8_1 sum slack.
fn reference(k: &QuantKernel, wrow_q: &[u8], w: &[f32], a: &[f32], arow_q: &[u8]) -> (f64, f64) {
    let dot: f64 = w.iter().zip(a).map(|(&x, &y)| x as f64 * y as f64).sum();
    let abs: f64 = w
        .iter()
        .zip(a)
        .map(|(&x, &y)| (x as f64 * y as f64).abs())
        .sum();
    let rel = if k.ty.block_size() == 256 { 1e-4 } else { 1e-5 };
    let mut tol = rel * abs + 1e-30;
    if k.act == ActFormat::Q8_1 {
        let wb = k.ty.type_size() as usize;
        for b in 0..w.len() / 32 {
            let m = f16_at(&wrow_q[b * wb + 2..]) as f64;
            let ab = &arow_q[b * 36..(b + 1) * 36];
            let sum: i32 = ab[4..].iter().map(|&q| q as i8 as i32).sum();
            tol += m.abs() * (f16_at(&ab[2..]) as f64 - f16_at(ab) as f64 * sum as f64).abs();
        }
    }
    (dot, tol)
}

fn deq_acts(x: &QuantizedActs) -> Vec<Vec<f32>> {
    (0..x.n_rows)
        .map(|t| {
            let mut v = vec![0f32; x.cols];
            act::dequantize_acts_row(x.format, x.row(t), &mut v);
            v
        })
        .collect()
}

/// Runs one shape: full range into a tight output, then a sub-range into a strided NaN-poisoned
/// output.
fn check_shape(r: &mut StdRng, k: &QuantKernel, rows: usize, tokens: usize, cols: usize) {
    check_shape_at(r, k, None, rows, tokens, cols)
}

/// [`check_shape`] through `matmul_at(level)` when a level is given.
fn check_shape_at(
    r: &mut StdRng,
    k: &QuantKernel,
    level: Option<SimdLevel>,
    rows: usize,
    tokens: usize,
    cols: usize,
) {
    let mm = |w: &WeightMatrix,
              x: &QuantizedActs,
              out: &mut [f32],
              stride: usize,
              range: std::ops::Range<usize>| match level {
        None => matmul(w, x, out, stride, range),
        Some(l) => matmul_at(l, w, x, out, stride, range),
    };
    let (data, wdeq) = make_weights(r, k, rows, cols);
    let w = WeightMatrix {
        ty: k.ty,
        data: &data,
        rows,
        cols,
        layout: pshard_kernels::matmul::WeightLayout::File,
    };
    let xs = random_vec(r, tokens * cols);
    let xq = quantize_acts(k.act, &xs, tokens, cols);
    assert_eq!(xq.row_bytes % 4, 0);
    let adeq = deq_acts(&xq);
    let rb = data.len() / rows;
    let check = |out: &[f32], stride: usize, range: std::ops::Range<usize>| {
        for t in 0..tokens {
            for rr in 0..rows {
                let got = out[t * stride + rr];
                if range.contains(&rr) {
                    let (want, tol) = reference(
                        k,
                        &data[rr * rb..],
                        &wdeq[rr * cols..(rr + 1) * cols],
                        &adeq[t],
                        xq.row(t),
                    );
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{} rows={rows} tokens={tokens} cols={cols} out[{t},{rr}] = {got}, want {want} ± {tol}",
                        k.ty
                    );
                } else {
                    assert!(
                        got.is_nan(),
                        "{} out[{t},{rr}] outside {range:?} was written",
                        k.ty
                    );
                }
            }
        }
    };
    // Whole matrix, tight layout.
    let mut out = vec![f32::NAN; tokens * rows];
    mm(&w, &xq, &mut out, rows, 0..rows).unwrap();
    check(&out, rows, 0..rows);
    // The convenience path agrees bit for bit (same quantization, same kernel).
    if level.is_none() {
        let mut out2 = vec![f32::NAN; tokens * rows];
        matmul_f32(&w, &xs, tokens, &mut out2).unwrap();
        assert_eq!(
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            out2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
    // A sub-range into a wider, poisoned output; the tail past the last token's row stays too.
    let stride = rows + 3;
    let lo = r.gen_range(0..rows);
    let hi = r.gen_range(lo..=rows);
    let mut out = vec![f32::NAN; tokens * stride];
    mm(&w, &xq, &mut out, stride, lo..hi).unwrap();
    check(&out, stride, lo..hi);
    for t in 0..tokens {
        for extra in rows..stride {
            assert!(out[t * stride + extra].is_nan());
        }
    }
    check_exact(k, &w, &wdeq, &xs, tokens, (lo, hi));
}

/// The exact path for the same weights: every row into a tight output (also through
/// `matmul_f32_with`, bit for bit), then rows `lo..hi` into a strided NaN-poisoned output.
fn check_exact(
    k: &QuantKernel,
    w: &WeightMatrix,
    wdeq: &[f32],
    xs: &[f32],
    tokens: usize,
    (lo, hi): (usize, usize),
) {
    let (rows, cols) = (w.rows, w.cols);
    let check = |out: &[f32], stride: usize, range: std::ops::Range<usize>| {
        for t in 0..tokens {
            let a = &xs[t * cols..(t + 1) * cols];
            for rr in 0..stride {
                let got = out[t * stride + rr];
                if !range.contains(&rr) {
                    assert!(got.is_nan(), "{} exact out[{t},{rr}] was written", k.ty);
                    continue;
                }
                let wr = &wdeq[rr * cols..(rr + 1) * cols];
                let want: f64 = wr.iter().zip(a).map(|(&x, &y)| x as f64 * y as f64).sum();
                let abs: f64 = wr
                    .iter()
                    .zip(a)
                    .map(|(&x, &y)| (x as f64 * y as f64).abs())
                    .sum();
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * abs + 1e-30,
                    "{} exact rows={rows} tokens={tokens} cols={cols} out[{t},{rr}] = {got}, want {want}",
                    k.ty
                );
            }
        }
    };
    let mut out = vec![f32::NAN; tokens * rows];
    matmul_exact(w, xs, tokens, &mut out, rows, 0..rows).unwrap();
    check(&out, rows, 0..rows);
    let mut out2 = vec![f32::NAN; tokens * rows];
    matmul_f32_with(w, xs, tokens, &mut out2, ActPrecision::Exact).unwrap();
    assert_eq!(
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        out2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let stride = rows + 3;
    let mut out = vec![f32::NAN; tokens * stride];
    matmul_exact(w, xs, tokens, &mut out, stride, lo..hi).unwrap();
    check(&out, stride, lo..hi);
}

fn kernels() -> Vec<QuantKernel> {
    quant::SUPPORTED
        .iter()
        .filter_map(|&ty| quant::kernel(ty))
        .collect()
}

#[test]
fn odd_shapes_all_types() {
    let mut r = rng("odd_shapes_all_types");
    for k in kernels() {
        for &cols in &[32usize, 96, 256, 512, 4096] {
            if cols % k.ty.block_size() as usize != 0 {
                continue;
            }
            for &rows in &[1usize, 3, 17, 128] {
                for &tokens in &[1usize, 2, 3, 4, 5, 33] {
                    check_shape(&mut r, &k, rows, tokens, cols);
                }
            }
        }
    }
}

/// Every type's driver path at each SIMD level this CPU runs, forced below its best: the int8
/// GEMM's 16-row (AVX-512 VNNI) and 8-row (AVX2) kernels and the portable definition row by row
/// for the quantized types, the f32 dot of each level for the float types.
#[test]
fn forced_simd_levels() {
    let mut r = rng("forced_simd_levels");
    for level in SimdLevel::ALL {
        if !level.available() {
            pshard_testkit::note(&format!(
                "forced_simd_levels: level {} not checked, this CPU lacks it",
                level.name()
            ));
            continue;
        }
        for &ty in quant::SUPPORTED {
            let k = quant::kernel_at(ty, level).expect("supported type");
            let ok = match level {
                SimdLevel::Scalar => k.dot_variant == "scalar",
                SimdLevel::Avx2 => matches!(k.dot_variant, "avx2" | "scalar"),
                SimdLevel::Avx512 => true,
            };
            assert!(ok, "{ty} at {}: got {}", level.name(), k.dot_variant);
            if level == SimdLevel::Avx2 && k.act == ActFormat::F32 {
                // Every float type has an AVX2 dot.
                assert_eq!(k.dot_variant, "avx2", "{ty}");
            }
            // Partial row tiles and partial token groups (1, 2, 4 and 8 tokens per kernel call).
            for (rows, tokens, cols) in [
                (17, 1, 256),
                (17, 5, 256),
                (131, 7, 512),
                (37, 20, 512),
                (9, 45, 256),
            ] {
                check_shape_at(&mut r, &k, Some(level), rows, tokens, cols);
            }
        }
    }
}

/// Shapes big enough to be split over the pool, with 1 thread and with every core (the pool is
/// process-wide: other tests may run inline meanwhile, which must give the same results).
#[test]
fn parallel_chunks_in_several_pools() {
    let mut r = rng("parallel_chunks_in_several_pools");
    for threads in [1usize, 0] {
        pool::set_threads(threads);
        {
            for ty in [
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::Q8_0,
                GgmlType::F16,
                GgmlType::Q4_K,
            ] {
                let Some(k) = quant::kernel(ty) else { continue };
                check_shape(&mut r, &k, 301, 1, 512);
                check_shape(&mut r, &k, 131, 7, 512);
            }
        }
    }
    pool::set_threads(0);
}

/// `matmul_many` (a layer's q/k/v as one job) gives each output the bits of its own `matmul`,
/// for matrices of different types and conversions (Q4_K, Q6_K's sub-blocks of 16) and sizes,
/// file and repacked layouts, decode and batches, at 1 thread and every core; outputs with a
/// stride keep their other entries.
#[test]
fn matmul_many_matches_one_matmul_each() {
    let mut r = rng("matmul_many_matches_one_matmul_each");
    let cols = 512;
    let shapes = [
        (GgmlType::Q4_K, 400usize),
        (GgmlType::Q6_K, 64),
        (GgmlType::Q4_K, 48),
    ];
    let file: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(ty, rows)| make_weights(&mut r, &quant::kernel(ty).unwrap(), rows, cols).0)
        .collect();
    let repacked: Vec<Vec<u8>> = shapes
        .iter()
        .zip(&file)
        .map(|(&(ty, rows), d)| packed::repack(ty, d, rows, d.len() / rows).unwrap())
        .collect();
    for (layout, datas) in [
        (WeightLayout::File, &file),
        (WeightLayout::Interleaved, &repacked),
    ] {
        let ws: Vec<WeightMatrix> = shapes
            .iter()
            .zip(datas)
            .map(|(&(ty, rows), data)| WeightMatrix {
                ty,
                data,
                rows,
                cols,
                layout,
            })
            .collect();
        for tokens in [1usize, 3, 20] {
            let xq = quantize_acts(
                ActFormat::Q8K,
                &random_vec(&mut r, tokens * cols),
                tokens,
                cols,
            );
            let want: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| {
                    let mut o = vec![f32::NAN; tokens * (w.rows + 5)];
                    matmul(w, &xq, &mut o, w.rows + 5, 0..w.rows).unwrap();
                    o
                })
                .collect();
            for threads in [1usize, 0] {
                pool::set_threads(threads);
                let mut got: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| vec![f32::NAN; tokens * (w.rows + 5)])
                    .collect();
                let mut parts: Vec<MatmulPart> = ws
                    .iter()
                    .zip(got.iter_mut())
                    .map(|(w, out)| MatmulPart {
                        w: *w,
                        out,
                        stride: w.rows + 5,
                    })
                    .collect();
                matmul_many(&xq, &mut parts).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(g), bits(w), "{layout:?} tokens {tokens} part {i}");
                }
            }
        }
    }
    pool::set_threads(0);
    // Activations of another format than a matrix takes are refused.
    let w = WeightMatrix {
        ty: GgmlType::Q4_K,
        data: &file[0],
        rows: 400,
        cols,
        layout: WeightLayout::File,
    };
    let xq = quantize_acts(ActFormat::Q8_0, &random_vec(&mut r, cols), 1, cols);
    let mut out = vec![0f32; 400];
    let e = matmul_many(
        &xq,
        &mut [MatmulPart {
            w,
            out: &mut out,
            stride: 400,
        }],
    );
    assert!(
        matches!(e, Err(KernelError::ActFormatMismatch { .. })),
        "{e:?}"
    );
}

#[test]
fn errors_name_the_problem() {
    let k = quant::kernel(GgmlType::Q4_0).unwrap();
    let data = vec![0u8; 4 * 18 * 2];
    let w = WeightMatrix {
        ty: GgmlType::Q4_0,
        data: &data,
        rows: 4,
        cols: 64,
        layout: pshard_kernels::matmul::WeightLayout::File,
    };
    let x = quantize_acts(ActFormat::Q8_0, &[0.5; 128], 2, 64);
    let mut out = vec![0f32; 8];

    let bad = WeightMatrix {
        ty: GgmlType::IQ2_XXS,
        ..w
    };
    let e = matmul(&bad, &x, &mut out, 4, 0..4).unwrap_err();
    assert_eq!(e, KernelError::UnsupportedType(GgmlType::IQ2_XXS));
    assert!(e.to_string().contains("IQ2_XXS"), "{e}");

    let e = matmul(
        &WeightMatrix {
            data: &data[1..],
            ..w
        },
        &x,
        &mut out,
        4,
        0..4,
    )
    .unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    let e = matmul(&WeightMatrix { cols: 48, ..w }, &x, &mut out, 4, 0..4).unwrap_err();
    assert!(e.to_string().contains("whole blocks"), "{e}");

    let x1 = quantize_acts(ActFormat::Q8_1, &[0.5; 128], 2, 64);
    let e = matmul(&w, &x1, &mut out, 4, 0..4).unwrap_err();
    assert!(
        e.to_string().contains("Q8_0") && e.to_string().contains("Q8_1"),
        "{e}"
    );

    let x32 = quantize_acts(ActFormat::Q8_0, &[0.5; 64], 2, 32);
    assert!(matmul(&w, &x32, &mut out, 4, 0..4)
        .unwrap_err()
        .to_string()
        .contains("columns"));
    assert!(matmul(&w, &x, &mut out, 4, 2..5)
        .unwrap_err()
        .to_string()
        .contains("outside"));
    assert!(matmul(&w, &x, &mut out, 3, 0..4)
        .unwrap_err()
        .to_string()
        .contains("stride"));
    assert!(matmul(&w, &x, &mut out[..7], 4, 0..4)
        .unwrap_err()
        .to_string()
        .contains("output"));
    assert!(matmul_f32(&w, &[0.0; 100], 2, &mut out).is_err());

    // The exact path checks the same things.
    let xf = [0.5f32; 128];
    let e = matmul_exact(&bad, &xf, 2, &mut out, 4, 0..4).unwrap_err();
    assert_eq!(e, KernelError::UnsupportedType(GgmlType::IQ2_XXS));
    let e = matmul_exact(&w, &xf[..100], 2, &mut out, 4, 0..4).unwrap_err();
    assert!(e.to_string().contains("100 values"), "{e}");
    let e = matmul_exact(&w, &xf, 2, &mut out, 4, 2..5).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    let e = matmul_exact(&w, &xf, 2, &mut out, 3, 0..4).unwrap_err();
    assert!(e.to_string().contains("stride"), "{e}");
    let e = matmul_exact(&w, &xf, 2, &mut out[..7], 4, 0..4).unwrap_err();
    assert!(e.to_string().contains("output"), "{e}");
    let e = matmul_f32_with(&w, &xf, 2, &mut out[..6], ActPrecision::Exact).unwrap_err();
    assert!(e.to_string().contains("output"), "{e}");
    let mut poison = vec![f32::NAN; 8];
    matmul_exact(&w, &xf, 2, &mut poison, 4, 1..1).unwrap();
    matmul_exact(&w, &[], 0, &mut poison, 4, 0..4).unwrap();
    assert!(poison.iter().all(|v| v.is_nan()));
    assert_eq!(ActPrecision::default(), ActPrecision::Quantized);
    assert!(matmul_f32(&w, &[0.0; 128], 2, &mut out[..6]).is_err());
    // Empty range and zero tokens are fine and write nothing.
    let mut poison = vec![f32::NAN; 8];
    matmul(&w, &x, &mut poison, 4, 2..2).unwrap();
    assert!(poison.iter().all(|v| v.is_nan()));
    assert_eq!(k.act, ActFormat::Q8_0);
}

/// The exact path's outputs do not depend on the thread count or the row tiling (each output is
/// one dot in a fixed order): the full range with 1 thread and with every core, and every row
/// alone, agree bit for bit.
#[test]
fn exact_path_is_deterministic() {
    let mut r = rng("exact_path_is_deterministic");
    let k = quant::kernel(GgmlType::Q4_K).unwrap();
    let (rows, tokens, cols) = (301, 7, 512);
    let (data, _) = make_weights(&mut r, &k, rows, cols);
    let w = WeightMatrix {
        ty: k.ty,
        data: &data,
        rows,
        cols,
        layout: pshard_kernels::matmul::WeightLayout::File,
    };
    let xs = random_vec(&mut r, tokens * cols);
    let run = |threads: usize| {
        pool::set_threads(threads);
        let mut out = vec![0f32; tokens * rows];
        matmul_exact(&w, &xs, tokens, &mut out, rows, 0..rows).unwrap();
        pool::set_threads(0);
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let one = run(1);
    assert_eq!(one, run(0));
    let mut single = vec![0f32; tokens * rows];
    for row in 0..rows {
        matmul_exact(&w, &xs, tokens, &mut single, rows, row..row + 1).unwrap();
    }
    assert_eq!(one, single.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
}
