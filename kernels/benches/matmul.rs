//! Matmul throughput per weight type and batch size on a 4096 × 4096 matrix, as effective GB/s of
//! weight bytes (decimal), next to the machine's memory read bandwidth.
//!
//! - `hot/<type>/b<batch>`: the same matrix every iteration (it stays in the last-level cache if it
//!   fits there — on large-L3 servers that is cache bandwidth, not DRAM).
//! - `stream/<type>/b<batch>`: rotates through copies totalling ≥ 1 GiB, so weights come from DRAM
//!   as in decoding a real model.
//! - `exact/<type>/b<batch>`: the exact-activation path (`matmul_exact`: f32 activations, weight
//!   rows dequantized on the fly), hot, for the quantized types — the oracle mode's cost.
//! - `mem_read/{1_thread,all_threads}`: plain summing read of a 1 GiB buffer (the DRAM ceiling).
//! - `quantize_acts/<format>/b<rows>`: converting 4096-wide f32 activation rows (GB/s of f32 input).
//!
//! Threads: the global rayon pool (`RAYON_NUM_THREADS=1` for single-thread numbers). Filter with
//! e.g. `cargo bench -p pshard-kernels --bench matmul -- 'stream/Q4_0'`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pshard_kernels::matmul::{
    matmul, matmul_exact, quantize_acts, quantize_acts_into, QuantizedActs, WeightMatrix,
};
use pshard_kernels::quant::{self, ActFormat, QuantKernel};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

const ROWS: usize = 4096;
const COLS: usize = 4096;
const BATCHES: [usize; 4] = [1, 8, 32, 128];
const STREAM_BYTES: usize = 1 << 30;

/// A 4096 × 4096 matrix of `k.ty`: 64 distinct quantized random rows, repeated (quantizing 16M
/// values with the reference quantizers would dominate the bench's run time).
fn weights(k: &QuantKernel, r: &mut StdRng) -> Vec<u8> {
    let rb = k.ty.row_bytes(COLS as u64).unwrap() as usize;
    let mut base = vec![0u8; 64 * rb];
    for row in base.chunks_exact_mut(rb) {
        let x: Vec<f32> = (0..COLS).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        (k.quantize_row)(&x, row);
    }
    base.repeat(ROWS / 64)
}

fn bench_matmul(c: &mut Criterion) {
    let mut r = StdRng::seed_from_u64(7);
    for &ty in quant::SUPPORTED {
        let Some(k) = quant::kernel(ty) else { continue };
        let data = weights(&k, &mut r);
        let bytes = data.len() as u64;
        let copies = STREAM_BYTES.div_ceil(data.len()).max(2);
        let mut group = c.benchmark_group(format!("{ty}"));
        group.throughput(Throughput::BytesDecimal(bytes));
        for batch in BATCHES {
            let x: Vec<f32> = (0..batch * COLS)
                .map(|_| r.gen_range(-1.0f32..1.0))
                .collect();
            let xq = quantize_acts(k.act, &x, batch, COLS);
            let mut out = vec![0f32; batch * ROWS];
            let w = WeightMatrix {
                ty,
                data: &data,
                rows: ROWS,
                cols: COLS,
                layout: pshard_kernels::matmul::WeightLayout::File,
            };
            group.bench_function(format!("hot/{ty}/b{batch}/{}", k.dot_variant), |b| {
                b.iter(|| matmul(&w, black_box(&xq), &mut out, ROWS, 0..ROWS).unwrap())
            });
            if k.act != ActFormat::F32 && matches!(batch, 1 | 32) {
                group.bench_function(format!("exact/{ty}/b{batch}"), |b| {
                    b.iter(|| {
                        matmul_exact(&w, black_box(&x), batch, &mut out, ROWS, 0..ROWS).unwrap()
                    })
                });
            }
        }
        // Streaming from DRAM matters where the weights dominate: decode and small batches.
        let pool: Vec<Vec<u8>> = (0..copies).map(|_| data.clone()).collect();
        for batch in [1usize, 8] {
            let x: Vec<f32> = (0..batch * COLS)
                .map(|_| r.gen_range(-1.0f32..1.0))
                .collect();
            let xq = quantize_acts(k.act, &x, batch, COLS);
            let mut out = vec![0f32; batch * ROWS];
            let mut i = 0;
            group.bench_function(format!("stream/{ty}/b{batch}/{}", k.dot_variant), |b| {
                b.iter(|| {
                    let w = WeightMatrix {
                        ty,
                        data: &pool[i % copies],
                        rows: ROWS,
                        cols: COLS,
                        layout: pshard_kernels::matmul::WeightLayout::File,
                    };
                    i += 1;
                    matmul(&w, black_box(&xq), &mut out, ROWS, 0..ROWS).unwrap()
                })
            });
        }
        group.finish();
    }
}

fn bench_mem_read(c: &mut Criterion) {
    let buf: Vec<u64> = (0..STREAM_BYTES / 8).map(|i| i as u64).collect();
    let mut group = c.benchmark_group("mem_read");
    group.throughput(Throughput::BytesDecimal(STREAM_BYTES as u64));
    group.bench_function("mem_read/1_thread", |b| {
        b.iter(|| black_box(&buf).iter().fold(0u64, |s, &v| s.wrapping_add(v)))
    });
    group.bench_function("mem_read/all_threads", |b| {
        b.iter(|| {
            black_box(&buf)
                .par_chunks(1 << 20)
                .map(|c| c.iter().fold(0u64, |s, &v| s.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    group.finish();
}

/// Converting one 4096-wide activation row (decode) and 128 rows (prefill) to each partner format.
fn bench_quantize(c: &mut Criterion) {
    let mut r = StdRng::seed_from_u64(9);
    let mut group = c.benchmark_group("quantize_acts");
    for format in [
        ActFormat::F32,
        ActFormat::Q8_0,
        ActFormat::Q8_1,
        ActFormat::Q8K,
    ] {
        for rows in [1usize, 128] {
            let x: Vec<f32> = (0..rows * COLS)
                .map(|_| r.gen_range(-1.0f32..1.0))
                .collect();
            let mut q = QuantizedActs::empty(format);
            group.throughput(Throughput::BytesDecimal((x.len() * 4) as u64));
            group.bench_function(format!("quantize_acts/{}/b{rows}", format.name()), |b| {
                b.iter(|| quantize_acts_into(format, black_box(&x), rows, COLS, &mut q).unwrap())
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_mem_read, bench_quantize, bench_matmul
}
criterion_main!(benches);
