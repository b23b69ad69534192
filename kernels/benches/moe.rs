//! The MoE FFN of a batch on a qwen3-30b-a3b-shaped layer (128 experts of 2048 → 768 →
//! 2048, Q4_K, repacked as the engine repacks CPU experts, 8 routed per token), as effective GB/s
//! of the routed experts' weight bytes. Every iteration routes to other experts, so the weights
//! come from DRAM (the layer's 340 MB exceed any cache) as in decoding: the gap to `matmul`'s
//! `stream` GB/s is the op's own cost (building the matmuls, the GLU, the weighted sums, and the
//! pool's synchronisation between its stages).
//!
//! - `moe/b<tokens>/of<experts>`: each token routed to 8 of the first `experts`: 1 token
//!   (decode) and 4 (several sequences' decode step) over all 128; 64 (a prefill batch, mostly
//!   compute) over all 128 and over 24 (more tokens per expert).
//!
//! Threads: the CPU pool's (every core; `PSHARD_BENCH_THREADS` sets another count).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pshard_kernels::gemm::packed;
use pshard_kernels::matmul::{ActPrecision, WeightLayout, WeightMatrix};
use pshard_kernels::moe::{moe_ffn, ExpertFfn, Experts, MoeRoutes};
use pshard_kernels::pool;
use pshard_kernels::quant;
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::Activation;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

const N_EXPERT: usize = 128;
const N_USED: usize = 8;
const COLS: usize = 2048;
const FF: usize = 768;
const TY: GgmlType = GgmlType::Q4_K;

/// A `rows × cols` matrix of [`TY`], repacked: 16 distinct random rows repeated (quantizing 200M
/// values with the reference quantizer would dominate the run).
fn matrix(r: &mut StdRng, rows: usize, cols: usize) -> Vec<u8> {
    let k = quant::kernel(TY).expect("Q4_K has a CPU kernel");
    let rb = TY.row_bytes(cols as u64).expect("whole blocks") as usize;
    let mut base = vec![0u8; 16 * rb];
    for row in base.chunks_exact_mut(rb) {
        let x: Vec<f32> = (0..cols).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        (k.quantize_row)(&x, row);
    }
    packed::repack(TY, &base.repeat(rows / 16), rows, rb).expect("whole groups")
}

/// A repacked matrix of [`TY`].
fn view(data: &[u8], rows: usize, cols: usize) -> WeightMatrix<'_> {
    WeightMatrix {
        ty: TY,
        data,
        rows,
        cols,
        layout: WeightLayout::Interleaved,
    }
}

fn bench_moe(c: &mut Criterion) {
    if let Some(t) = std::env::var("PSHARD_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        pool::set_threads(t);
    }
    let mut r = StdRng::seed_from_u64(11);
    let mats: Vec<[Vec<u8>; 3]> = (0..N_EXPERT)
        .map(|_| {
            [
                matrix(&mut r, FF, COLS),
                matrix(&mut r, FF, COLS),
                matrix(&mut r, COLS, FF),
            ]
        })
        .collect();
    let experts: Vec<ExpertFfn> = mats
        .iter()
        .map(|[g, u, d]| ExpertFfn {
            gate: view(g, FF, COLS),
            up: view(u, FF, COLS),
            down: view(d, COLS, FF),
        })
        .collect();
    let mut group = c.benchmark_group("moe");
    for (n_tok, pick) in [(1usize, N_EXPERT), (4, N_EXPERT), (64, N_EXPERT), (64, 24)] {
        let x: Vec<f32> = (0..n_tok * COLS)
            .map(|_| r.gen_range(-1.0f32..1.0))
            .collect();
        let mut out = vec![0f32; n_tok * COLS];
        // Bytes of the distinct experts a step reads: the expected number of experts of `pick`
        // that at least one token routes to.
        let per_expert: usize = mats[0].iter().map(Vec::len).sum();
        let distinct = pick as f64 * (1.0 - (1.0 - N_USED as f64 / pick as f64).powi(n_tok as i32));
        group.throughput(Throughput::BytesDecimal(
            (distinct * per_expert as f64) as u64,
        ));
        let mut rr = StdRng::seed_from_u64(5);
        group.bench_function(format!("b{n_tok}/of{pick}"), |b| {
            b.iter(|| {
                let mut ids = Vec::with_capacity(n_tok * N_USED);
                for _ in 0..n_tok {
                    ids.extend(
                        sample(&mut rr, N_EXPERT, N_USED)
                            .into_iter()
                            .map(|e| e as u32),
                    );
                }
                let weights = vec![1.0 / N_USED as f32; n_tok * N_USED];
                let routes = MoeRoutes {
                    ids: &ids,
                    weights: &weights,
                    n_used: N_USED,
                };
                moe_ffn(
                    Experts::Slice(&experts),
                    black_box(&x),
                    n_tok,
                    routes,
                    Activation::Silu,
                    ActPrecision::Quantized,
                    &mut out,
                    None,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_moe
}
criterion_main!(benches);
