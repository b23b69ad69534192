//! Decode GEMV at the memory roof: batch-1 matmul of a 4096 × 14336 matrix (4096 output rows of
//! 14336 elements: llama3-8b's FFN down projection) per weight type, streamed from DRAM (rotating
//! over copies ≥ 3 × the last-level cache), in GB/s of weight bytes next to the machine's DRAM
//! read bandwidth measured the way `pshard profile cpu` does (a summing read of a 1 GiB buffer
//! split over all threads). Median of 15 runs each (`GEMV_REPS`).
//!
//! `cargo bench -p pshard-kernels --bench gemv` (threads: `PSHARD_THREADS`, default all cores;
//! types: `GEMV_TYPES=Q4_K,Q8_0`; another shape: `GEMV_SHAPE=262144x640`).
//!
//! Types with a repacked layout (`gemm::packed`) are timed both ways in the same run: the file
//! layout (the row-wise decode path) and the repacked one (`repacked` columns); the DRAM read,
//! the file layout and the repacked one take turns rep by rep, so a change of the VM's memory
//! mode hits all three alike.
//!
//! `GEMV_L2=1`: the compute roof instead, on one thread: a 128 × 4096 matrix (`GEMV_SHAPE=RxC`;
//! rows a multiple of 64; `GEMV_BATCH` tokens, default 1) that stays in L2,
//! fastest of 400 calls (`GEMV_REPS`) (robust to other processes sharing the cores), in ns per weight row
//! and GB/s of weight bytes. Used for A/B decisions on a busy machine.

use std::hint::black_box;
use std::time::Instant;

use pshard_kernels::gemm::packed;
use pshard_kernels::matmul::{matmul, quantize_acts, WeightLayout, WeightMatrix};
use pshard_kernels::pool;
use pshard_kernels::quant;
use pshard_model::ggml_type::GgmlType;

const ROWS: usize = 4096;
const COLS: usize = 14336;
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

/// A `rows × cols` matrix of `ty`: 64 distinct rows quantized from random values, repeated.
fn weights(ty: GgmlType, cols: usize, rows: usize) -> Vec<u8> {
    let k = quant::kernel(ty).expect("CPU kernel");
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut base = vec![0u8; 64 * rb];
    let mut s = 0x2545_f491_4f6c_dd1du64;
    for row in base.chunks_exact_mut(rb) {
        let x: Vec<f32> = (0..cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        (k.quantize_row)(&x, row);
    }
    base.repeat(rows / 64)
}

/// `GEMV_SHAPE=RxC` (rows a multiple of 64), else `default`.
fn shape(default: (usize, usize)) -> (usize, usize) {
    std::env::var("GEMV_SHAPE")
        .ok()
        .and_then(|v| {
            let (r, c) = v.split_once('x')?;
            Some((r.parse().ok()?, c.parse().ok()?))
        })
        .unwrap_or(default)
}

/// `GEMV_REPS`, else `default`.
fn reps(default: usize) -> usize {
    std::env::var("GEMV_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The compute roof (see the module notes): one thread, a matrix in L2, fastest call.
fn l2_roof(types: &[GgmlType]) {
    let (r, c) = shape((128, 4096));
    let reps = reps(400);
    let batch: usize = std::env::var("GEMV_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    pool::set_threads(1);
    println!("L2-resident GEMV {r}x{c}, batch {batch}, 1 thread, fastest of {reps}");
    println!("| type | KB | ns/row | GB/s | repacked ns/row | repacked GB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for &ty in types {
        let k = quant::kernel(ty).expect("CPU kernel");
        let data = weights(ty, c, r);
        let x: Vec<f32> = (0..batch * c)
            .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
            .collect();
        let mut out = vec![0f32; batch * r];
        let mut time = |data: &[u8], layout| {
            let w = WeightMatrix {
                ty,
                data,
                rows: r,
                cols: c,
                layout,
            };
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t0 = Instant::now();
                let q = quantize_acts(k.act, &x, batch, c);
                matmul(&w, &q, &mut out, r, 0..r).unwrap();
                best = best.min(t0.elapsed().as_secs_f64());
            }
            black_box(&out);
            best
        };
        let file = time(&data, WeightLayout::File);
        let gbs = |t: f64| data.len() as f64 / t / 1e9;
        let repacked = match packed::repack(ty, &data, r, data.len() / r) {
            Ok(p) => {
                let t = time(&p, WeightLayout::Interleaved);
                format!("{:.1} | {:.1}", t * 1e9 / r as f64, gbs(t))
            }
            Err(_) => "– | –".to_string(),
        };
        println!(
            "| {ty} | {:.0} | {:.1} | {:.1} | {repacked} |",
            data.len() as f64 / 1e3,
            file * 1e9 / r as f64,
            gbs(file)
        );
    }
}

fn main() {
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
    if std::env::var("GEMV_L2").is_ok_and(|v| v == "1") {
        l2_roof(&types);
        return;
    }
    let (rows, cols) = shape((ROWS, COLS));
    let threads = std::env::var("PSHARD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let t = pool::set_threads(threads);
    let reps = reps(15);
    let buf: Vec<u64> = (0..(MEM_BYTES / 8) as u64).collect();
    black_box(read_all(&buf));
    let read = || {
        let t0 = Instant::now();
        black_box(read_all(black_box(&buf)));
        MEM_BYTES as f64 / t0.elapsed().as_secs_f64() / 1e9
    };
    println!(
        "GEMV {rows}x{cols}, batch 1, {} threads, median of {reps}; per type the DRAM read, the \
         file layout and the repacked one timed in turn each rep (the VM's memory changes mode \
         within minutes)",
        t.used
    );
    println!("| type | MB | DRAM read GB/s | GB/s | % of DRAM read | repacked GB/s | repacked % |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let llc = 64usize << 20;
    for &ty in &types {
        let k = quant::kernel(ty).expect("CPU kernel");
        let one = weights(ty, cols, rows);
        let n_copies = (3 * llc).div_ceil(one.len()).max(2);
        let x: Vec<f32> = (0..cols).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
        let mut out = vec![0f32; rows];
        // Small matrices run back to back over successive copies (as a decode step's matmuls
        // do), so a pool's wake-up or a cold first row is not timed once per megabyte.
        let per_rep = (32usize << 20).div_ceil(one.len()).min(n_copies);
        let file: Vec<Vec<u8>> = (0..n_copies).map(|_| one.clone()).collect();
        let repacked: Option<Vec<Vec<u8>>> = packed::repack(ty, &one, rows, one.len() / rows)
            .ok()
            .map(|p| (0..n_copies).map(|_| p.clone()).collect());
        let mut at = 0;
        let mut rep = |copies: &[Vec<u8>], layout| {
            let t0 = Instant::now();
            for _ in 0..per_rep {
                let w = WeightMatrix {
                    ty,
                    data: &copies[at % copies.len()],
                    rows,
                    cols,
                    layout,
                };
                at += 1;
                // The runtime quantizes the input once per op: included, as in a decode step.
                let q = quantize_acts(k.act, &x, 1, cols);
                matmul(&w, &q, &mut out, rows, 0..rows).unwrap();
            }
            (per_rep * one.len()) as f64 / t0.elapsed().as_secs_f64() / 1e9
        };
        let (mut mem, mut g, mut gp) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..reps + 2 {
            let m = read();
            let a = rep(&file, WeightLayout::File);
            let b = repacked.as_ref().map(|p| rep(p, WeightLayout::Interleaved));
            if i >= 2 {
                mem.push(m);
                g.push(a);
                gp.extend(b);
            }
        }
        black_box(&out);
        let (mem, g) = (median(mem), median(g));
        let repacked = if gp.is_empty() {
            "– | –".to_string()
        } else {
            let gp = median(gp);
            format!("{gp:.1} | {:.0}%", 100.0 * gp / mem)
        };
        println!(
            "| {ty} | {:.1} | {mem:.1} | {g:.1} | {:.0}% | {repacked} |",
            one.len() as f64 / 1e6,
            100.0 * g / mem
        );
    }
}
