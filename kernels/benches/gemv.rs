//! Decode GEMV at the memory roof: batch-1 matmul of a 4096 × 14336 matrix (4096 output rows of
//! 14336 elements: llama3-8b's FFN down projection) per weight type, streamed from DRAM (rotating
//! over copies ≥ 3 × the last-level cache), in GB/s of weight bytes next to the machine's DRAM
//! read bandwidth measured the way `pshard profile cpu` does (a summing read of a 1 GiB buffer
//! split over all threads). Median of `REPS` runs each.
//!
//! `cargo bench -p pshard-kernels --bench gemv` (threads: `PSHARD_THREADS`, default all cores;
//! types: `GEMV_TYPES=Q4_K,Q8_0`).

use std::hint::black_box;
use std::time::Instant;

use pshard_kernels::matmul::{matmul, quantize_acts, WeightMatrix};
use pshard_kernels::pool;
use pshard_kernels::quant;
use pshard_model::ggml_type::GgmlType;

const ROWS: usize = 4096;
const COLS: usize = 14336;
const REPS: usize = 15;
const MEM_BYTES: usize = 1 << 30;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Summing read of `buf` split over the pool, as the profiler's `mem_read`.
fn read_all(buf: &[u64]) -> u64 {
    let parts: Vec<std::sync::atomic::AtomicU64> = (0..pool::threads())
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    pool::run(|i, n| {
        let r = pool::part(buf.len(), 1 << 12, i, n);
        let s = buf[r].iter().fold(0u64, |a, &b| a.wrapping_add(b));
        parts[i].store(s, std::sync::atomic::Ordering::Relaxed);
    });
    parts
        .iter()
        .map(|p| p.load(std::sync::atomic::Ordering::Relaxed))
        .fold(0, u64::wrapping_add)
}

/// A matrix of `ty`: 64 distinct rows quantized from random values, repeated.
fn weights(ty: GgmlType) -> Vec<u8> {
    let k = quant::kernel(ty).expect("CPU kernel");
    let rb = ty.row_bytes(COLS as u64).unwrap() as usize;
    let mut base = vec![0u8; 64 * rb];
    let mut s = 0x2545_f491_4f6c_dd1du64;
    for row in base.chunks_exact_mut(rb) {
        let x: Vec<f32> = (0..COLS)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        (k.quantize_row)(&x, row);
    }
    base.repeat(ROWS / 64)
}

fn main() {
    let threads = std::env::var("PSHARD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let t = pool::set_threads(threads);
    let buf: Vec<u64> = (0..(MEM_BYTES / 8) as u64).collect();
    black_box(read_all(&buf));
    let mem = median(
        (0..REPS)
            .map(|_| {
                let t0 = Instant::now();
                black_box(read_all(black_box(&buf)));
                MEM_BYTES as f64 / t0.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    );
    drop(buf);
    println!(
        "DRAM read: {mem:.1} GB/s ({} threads); GEMV {ROWS}x{COLS}, batch 1, median of {REPS}",
        t.used
    );
    println!("| type | MB | GB/s | % of DRAM read |");
    println!("|---|---:|---:|---:|");
    let types: Vec<GgmlType> = match std::env::var("GEMV_TYPES") {
        Ok(v) => v
            .split(',')
            .filter_map(|n| GgmlType::from_name(n.trim()))
            .collect(),
        Err(_) => vec![
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_K,
        ],
    };
    let llc = 64usize << 20;
    for ty in types {
        let k = quant::kernel(ty).expect("CPU kernel");
        let one = weights(ty);
        let copies: Vec<Vec<u8>> = (0..(3 * llc).div_ceil(one.len()).max(2))
            .map(|_| one.clone())
            .collect();
        let x: Vec<f32> = (0..COLS).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
        let mut out = vec![0f32; ROWS];
        let mut gbs = Vec::new();
        for rep in 0..REPS + 2 {
            let w = WeightMatrix {
                ty,
                data: &copies[rep % copies.len()],
                rows: ROWS,
                cols: COLS,
            };
            let t0 = Instant::now();
            // The runtime quantizes the input once per op: included, as in a decode step.
            let q = quantize_acts(k.act, &x, 1, COLS);
            matmul(&w, &q, &mut out, ROWS, 0..ROWS).unwrap();
            let s = t0.elapsed().as_secs_f64();
            if rep >= 2 {
                gbs.push(one.len() as f64 / s / 1e9);
            }
        }
        black_box(&out);
        let g = median(gbs);
        println!(
            "| {ty} | {:.1} | {g:.1} | {:.0}% |",
            one.len() as f64 / 1e6,
            100.0 * g / mem
        );
    }
}
