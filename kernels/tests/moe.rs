//! The batched MoE FFN (`moe::moe_ffn`) against the per-expert path it replaces (each expert's
//! tokens gathered, matmuls one expert at a time, weighted sums in expert order): bit for bit, for
//! decode and prefill batches, both activation precisions (kernels of `quant::simd_cap()`); and a
//! token's output alone against the same token in batches.

use pshard_kernels::gemm::packed;
use pshard_kernels::matmul::{
    matmul_at, matmul_exact, quantize_acts, ActPrecision, WeightLayout, WeightMatrix,
};
use pshard_kernels::moe::{moe_ffn, ExpertFfn, Experts, MoeInput, MoeRoutes};
use pshard_kernels::ops;
use pshard_kernels::pool;
use pshard_kernels::quant::{self, SimdLevel};
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::Activation;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct ExpertBank {
    gate: Vec<Vec<u8>>,
    up: Vec<Vec<u8>>,
    down: Vec<Vec<u8>>,
    tys: [GgmlType; 3],
    cols: usize,
    ff: usize,
    layout: WeightLayout,
}

/// `n` values drawn uniformly from [-1, 1).
fn uniform(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

fn quantized(r: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let k = quant::kernel(ty).unwrap();
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut out = vec![0u8; rows * rb];
    if rb == 0 {
        return out;
    }
    for row in out.chunks_exact_mut(rb) {
        let x = uniform(r, cols);
        (k.quantize_row)(&x, row);
    }
    out
}

fn experts(r: &mut StdRng, n: usize, tys: [GgmlType; 3], cols: usize, ff: usize) -> ExpertBank {
    ExpertBank {
        gate: (0..n).map(|_| quantized(r, tys[0], ff, cols)).collect(),
        up: (0..n).map(|_| quantized(r, tys[1], ff, cols)).collect(),
        down: (0..n).map(|_| quantized(r, tys[2], cols, ff)).collect(),
        tys,
        cols,
        ff,
        layout: WeightLayout::File,
    }
}

impl ExpertBank {
    /// Every expert's matrices repacked (`gemm::packed`), as the engine repacks the expert
    /// tensors only the CPU computes.
    fn repacked(&self) -> ExpertBank {
        let pack = |ty: GgmlType, m: &[Vec<u8>], rows: usize| -> Vec<Vec<u8>> {
            m.iter()
                .map(|d| packed::repack(ty, d, rows, d.len() / rows).unwrap())
                .collect()
        };
        ExpertBank {
            gate: pack(self.tys[0], &self.gate, self.ff),
            up: pack(self.tys[1], &self.up, self.ff),
            down: pack(self.tys[2], &self.down, self.cols),
            layout: WeightLayout::Interleaved,
            ..*self
        }
    }

    fn view(&self) -> Vec<ExpertFfn<'_>> {
        (0..self.gate.len())
            .map(|e| ExpertFfn {
                gate: WeightMatrix {
                    ty: self.tys[0],
                    data: &self.gate[e],
                    rows: self.ff,
                    cols: self.cols,
                    layout: self.layout,
                },
                up: WeightMatrix {
                    ty: self.tys[1],
                    data: &self.up[e],
                    rows: self.ff,
                    cols: self.cols,
                    layout: self.layout,
                },
                down: WeightMatrix {
                    ty: self.tys[2],
                    data: &self.down[e],
                    rows: self.cols,
                    cols: self.ff,
                    layout: self.layout,
                },
            })
            .collect()
    }
}

/// The per-expert path: one expert at a time, as the CPU executor ran it before.
fn per_expert(
    ex: &[ExpertFfn],
    x: &[f32],
    n_tok: usize,
    routes: &MoeRoutes,
    precision: ActPrecision,
    level: SimdLevel,
) -> Vec<f32> {
    let cols = ex[0].gate.cols;
    let ff = ex[0].gate.rows;
    let mut acc = vec![0f32; n_tok * cols];
    for (e, w) in ex.iter().enumerate() {
        let toks: Vec<(usize, f32)> = (0..n_tok * routes.n_used)
            .filter(|&i| routes.ids[i] as usize == e)
            .map(|i| (i / routes.n_used, routes.weights[i]))
            .collect();
        if toks.is_empty() {
            continue;
        }
        let m = toks.len();
        let xe: Vec<f32> = toks
            .iter()
            .flat_map(|&(t, _)| x[t * cols..(t + 1) * cols].iter().copied())
            .collect();
        let mm = |w: &WeightMatrix, a: &[f32], m: usize, out: &mut [f32]| {
            let k = quant::kernel(w.ty).unwrap();
            if precision == ActPrecision::Exact && k.act != quant::ActFormat::F32 {
                matmul_exact(w, a, m, out, w.rows, 0..w.rows).unwrap();
            } else {
                let q = quantize_acts(k.act, a, m, w.cols);
                matmul_at(level, w, &q, out, w.rows, 0..w.rows).unwrap();
            }
        };
        let mut g = vec![0f32; m * ff];
        let mut u = vec![0f32; m * ff];
        mm(&w.gate, &xe, m, &mut g);
        mm(&w.up, &xe, m, &mut u);
        let mut h = vec![0f32; m * ff];
        ops::glu(&g, &u, &mut h, Activation::Silu);
        let mut d = vec![0f32; m * cols];
        mm(&w.down, &h, m, &mut d);
        for (i, &(t, wt)) in toks.iter().enumerate() {
            for (a, v) in acc[t * cols..(t + 1) * cols]
                .iter_mut()
                .zip(&d[i * cols..(i + 1) * cols])
            {
                *a += wt * v;
            }
        }
    }
    acc
}

/// The bits of `moe_ffn` over `ex` for this batch (SiLU).
fn moe_bits(
    ex: &[ExpertFfn],
    x: &[f32],
    n_tok: usize,
    rt: MoeRoutes,
    precision: ActPrecision,
) -> Vec<u32> {
    let mut got = vec![f32::NAN; n_tok * ex[0].gate.cols];
    moe_ffn(
        Experts::Slice(ex),
        x,
        n_tok,
        rt,
        Activation::Silu,
        precision,
        &mut got,
        None,
    )
    .unwrap();
    got.iter().map(|v| v.to_bits()).collect()
}

/// Asserts that `moe_ffn` over `ex` gives the bits of [`per_expert`] for this batch.
fn assert_matches_per_expert(
    ex: &[ExpertFfn],
    x: &[f32],
    n_tok: usize,
    rt: MoeRoutes,
    precision: ActPrecision,
    what: &str,
) {
    let want = per_expert(ex, x, n_tok, &rt, precision, quant::simd_cap());
    assert_eq!(
        moe_bits(ex, x, n_tok, rt, precision),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{what} {precision:?}"
    );
}

/// Random routes: `n_used` distinct experts per token.
fn routes(r: &mut StdRng, n_tok: usize, n_expert: usize, n_used: usize) -> (Vec<u32>, Vec<f32>) {
    let mut ids = Vec::new();
    let mut wts = Vec::new();
    for _ in 0..n_tok {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < n_used {
            let e = r.gen_range(0..n_expert as u32);
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
        wts.extend((0..n_used).map(|_| r.gen_range(0.05f32..1.0)));
    }
    (ids, wts)
}

#[test]
fn batched_moe_matches_the_per_expert_path() {
    let mut r = StdRng::seed_from_u64(0x0e0e);
    let cases = [
        [GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K],
        [GgmlType::Q4_0, GgmlType::Q4_0, GgmlType::Q8_0],
        [GgmlType::Q5_1, GgmlType::F16, GgmlType::Q5_K],
        // Gate and up read the same Q8_K rows but take different conversions (Q6_K: sub-blocks
        // of 16, seeds): the shared conversion must not pass from one to the other.
        [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q4_K],
    ];
    for tys in cases {
        let ex = experts(&mut r, 6, tys, 256, 512);
        let view = ex.view();
        // Decode, a short batch, a prefill batch where experts get GEMM-sized groups, and one
        // whose weighted sums are too many for the down tasks (a pass of their own).
        for (n_tok, n_used) in [(1usize, 2usize), (5, 3), (40, 3), (160, 3)] {
            let x = uniform(&mut r, n_tok * ex.cols);
            let (ids, wts) = routes(&mut r, n_tok, 6, n_used);
            let rt = MoeRoutes {
                ids: &ids,
                weights: &wts,
                n_used,
            };
            for precision in [ActPrecision::Quantized, ActPrecision::Exact] {
                let level = quant::simd_cap();
                let want = per_expert(&view, &x, n_tok, &rt, precision, level);
                let mut got = vec![f32::NAN; n_tok * ex.cols];
                let mut records = 0;
                let mut rec = |which: MoeInput, e: usize, toks: &[usize], q: &_| {
                    let q: &pshard_kernels::matmul::QuantizedActs = q;
                    assert_eq!(q.n_rows, toks.len());
                    assert!(toks
                        .iter()
                        .all(|&t| (0..n_used).any(|k| ids[t * n_used + k] as usize == e)));
                    if which == MoeInput::Down {
                        assert_eq!(q.cols, ex.ff);
                    }
                    records += 1;
                };
                moe_ffn(
                    Experts::Slice(&view),
                    &x,
                    n_tok,
                    rt,
                    Activation::Silu,
                    precision,
                    &mut got,
                    Some(&mut rec),
                )
                .unwrap();
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{tys:?} n_tok {n_tok} {precision:?}"
                );
                if precision == ActPrecision::Quantized {
                    // Gate, up (F16 in one case: no record) and down of each active expert.
                    assert!(records > 0);
                }
            }
        }
    }
}

/// `n_expert` Q4_K/Q4_K/Q6_K experts (256 → `ff` → 256), `n_tok` tokens of input and random
/// routes to `n_used` experts each, from `seed`.
fn prefill_batch(
    seed: u64,
    n_expert: usize,
    ff: usize,
    n_tok: usize,
    n_used: usize,
) -> (ExpertBank, Vec<f32>, Vec<u32>, Vec<f32>) {
    let mut r = StdRng::seed_from_u64(seed);
    let tys = [GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K];
    let ex = experts(&mut r, n_expert, tys, 256, ff);
    let x = uniform(&mut r, n_tok * ex.cols);
    let (ids, wts) = routes(&mut r, n_tok, n_expert, n_used);
    (ex, x, ids, wts)
}

/// A prefill batch touching enough experts that the jobs are built on the pool (from 32 per
/// stage: here ~40 experts, so ~80 gate/up jobs and ~40 down jobs) gives the bits of the
/// per-expert path, both precisions.
#[test]
fn many_active_experts_match_the_per_expert_path() {
    let (n_tok, n_used) = (40usize, 4usize);
    let (ex, x, ids, wts) = prefill_batch(0x0e0f, 48, 256, n_tok, n_used);
    let view = ex.view();
    let mut active: Vec<u32> = ids.clone();
    active.sort_unstable();
    active.dedup();
    assert!(active.len() >= 32, "{} experts active", active.len());
    let rt = MoeRoutes {
        ids: &ids,
        weights: &wts,
        n_used,
    };
    for precision in [ActPrecision::Quantized, ActPrecision::Exact] {
        assert_matches_per_expert(&view, &x, n_tok, rt, precision, "40 tokens");
    }
}

/// A prefill batch whose routes send every token to one expert (and others to random ones, as a
/// synthetic model's routers do) splits that expert's matmuls into more tasks than the others'
/// and still gives the bits of the per-expert path, at one thread and at all cores.
#[test]
fn skewed_routes_match_the_per_expert_path() {
    let (n_tok, n_used) = (96usize, 3usize);
    let (ex, x, mut ids, wts) = prefill_batch(0x5e5e, 12, 512, n_tok, n_used);
    let view = ex.view();
    for t in 0..n_tok {
        let row = &mut ids[t * n_used..(t + 1) * n_used];
        if !row.contains(&5) {
            row[0] = 5;
        }
    }
    let rt = MoeRoutes {
        ids: &ids,
        weights: &wts,
        n_used,
    };
    for threads in [1usize, 0] {
        pool::set_threads(threads);
        for precision in [ActPrecision::Quantized, ActPrecision::Exact] {
            let what = format!("threads {threads}");
            assert_matches_per_expert(&view, &x, n_tok, rt, precision, &what);
        }
    }
    pool::set_threads(0);
}

/// Repacked experts (each expert's matrices in 16-row groups, as the engine repacks the expert
/// tensors only the CPU computes) give the bits of the per-expert path on the file's layout: at
/// decode (each expert's 1–4 tokens through the repacked decode kernel), in short batches and in
/// prefill batches (the GEMM), both precisions, at one thread and at all cores.
#[test]
fn repacked_experts_match_the_file_layout() {
    let mut r = StdRng::seed_from_u64(0x2e2e);
    for tys in [
        [GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K],
        [GgmlType::Q4_0, GgmlType::Q4_0, GgmlType::Q8_0],
        [GgmlType::Q5_K, GgmlType::Q4_1, GgmlType::Q5_0],
        [GgmlType::Q6_K, GgmlType::Q4_K, GgmlType::Q4_K],
    ] {
        let ex = experts(&mut r, 6, tys, 256, 512);
        let rp = ex.repacked();
        let (file, packed) = (ex.view(), rp.view());
        for (n_tok, n_used) in [(1usize, 2usize), (2, 3), (5, 3), (40, 3)] {
            let x = uniform(&mut r, n_tok * ex.cols);
            let (ids, wts) = routes(&mut r, n_tok, 6, n_used);
            let rt = MoeRoutes {
                ids: &ids,
                weights: &wts,
                n_used,
            };
            for precision in [ActPrecision::Quantized, ActPrecision::Exact] {
                let want = per_expert(&file, &x, n_tok, &rt, precision, quant::simd_cap());
                for threads in [1usize, 0] {
                    pool::set_threads(threads);
                    assert_eq!(
                        moe_bits(&packed, &x, n_tok, rt, precision),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{tys:?} repacked, n_tok {n_tok} {precision:?} threads {threads}"
                    );
                }
            }
        }
    }
    pool::set_threads(0);
}

/// A token's MoE output is the same bits alone (decode: its experts' GEMVs) as inside batches
/// (its experts' GEMMs with other tokens), at one thread and at all cores.
#[test]
fn moe_token_outputs_do_not_depend_on_the_batch() {
    let mut r = StdRng::seed_from_u64(0x1e1e);
    for tys in [
        [GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K],
        [GgmlType::Q4_1, GgmlType::MXFP4, GgmlType::Q8_0],
    ] {
        let ex = experts(&mut r, 4, tys, 256, 256);
        let view = ex.view();
        let n_tok = 37;
        let n_used = 2;
        let x = uniform(&mut r, n_tok * ex.cols);
        let (ids, wts) = routes(&mut r, n_tok, 4, n_used);
        let run = |toks: &[usize]| -> Vec<f32> {
            let xs: Vec<f32> = toks
                .iter()
                .flat_map(|&t| x[t * ex.cols..(t + 1) * ex.cols].iter().copied())
                .collect();
            let i: Vec<u32> = toks
                .iter()
                .flat_map(|&t| ids[t * n_used..(t + 1) * n_used].to_vec())
                .collect();
            let w: Vec<f32> = toks
                .iter()
                .flat_map(|&t| wts[t * n_used..(t + 1) * n_used].to_vec())
                .collect();
            let rt = MoeRoutes {
                ids: &i,
                weights: &w,
                n_used,
            };
            let mut out = vec![f32::NAN; toks.len() * ex.cols];
            moe_ffn(
                Experts::Slice(&view),
                &xs,
                toks.len(),
                rt,
                Activation::Silu,
                ActPrecision::Quantized,
                &mut out,
                None,
            )
            .unwrap();
            out
        };
        let alone: Vec<Vec<u32>> = (0..n_tok)
            .map(|t| run(&[t]).iter().map(|v| v.to_bits()).collect())
            .collect();
        for threads in [1usize, 0] {
            pool::set_threads(threads);
            for toks in [
                (0..n_tok).collect::<Vec<_>>(),
                (0..n_tok).rev().step_by(2).collect(),
                (3..9).collect(),
            ] {
                let out = run(&toks);
                for (j, &t) in toks.iter().enumerate() {
                    let got: Vec<u32> = out[j * ex.cols..(j + 1) * ex.cols]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    assert_eq!(
                        got,
                        alone[t],
                        "{tys:?}: token {t} in a batch of {}",
                        toks.len()
                    );
                }
            }
        }
        pool::set_threads(0);
    }
}

#[test]
fn moe_errors_name_the_problem() {
    let mut r = StdRng::seed_from_u64(7);
    let x = vec![0.5f32; 64];
    // The error of one token through `ex` routed to `ids` with `weights`.
    let error = |ex: &ExpertBank, ids: &[u32], weights: &[f32], n_used: usize| {
        let mut out = vec![0f32; 64];
        let rt = MoeRoutes {
            ids,
            weights,
            n_used,
        };
        moe_ffn(
            Experts::Slice(&ex.view()),
            &x,
            1,
            rt,
            Activation::Silu,
            ActPrecision::Quantized,
            &mut out,
            None,
        )
        .unwrap_err()
        .to_string()
    };
    let ex = experts(&mut r, 2, [GgmlType::Q4_0; 3], 64, 64);
    let e = error(&ex, &[5], &[1.0], 1);
    assert!(e.contains("expert 5 of 2"), "{e}");
    let e = error(&ex, &[0, 1], &[1.0], 2);
    assert!(e.contains("2 ids and 1 weights"), "{e}");
    // Experts without hidden rows: an error, not a down matmul that no task built.
    let empty = experts(&mut r, 2, [GgmlType::Q4_0; 3], 64, 0);
    let e = error(&empty, &[1], &[1.0], 1);
    assert!(e.contains("empty matrix"), "{e}");
}
