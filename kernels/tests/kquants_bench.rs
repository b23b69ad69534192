//! Single-thread decode (batch 1) throughput of the K-quant dot products, in GB/s of weight
//! bytes: a 4096×4096 matrix (cache-resident on large-L3 CPUs) for every type and variant, and a
//! 512 MiB Q4_K matrix that streams from DRAM. Timing, not a correctness test: `#[ignore]`d; run
//! with `cargo test --release -p pshard-kernels --test kquants_bench -- --ignored --nocapture`.

use std::time::Instant;

use pshard_kernels::quant::kquants::{self, QK_K};
use pshard_model::ggml_type::GgmlType;

const TYPES: [GgmlType; 5] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Fills `rows` rows of `cols` elements with pseudo-random blocks (valid small f16 scales).
fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let bb = ty.type_size() as usize;
    let mut v = vec![0u8; rows * cols / QK_K * bb];
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in v.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let b = s.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let d_offsets: &[usize] = match ty {
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        _ => &[208],
    };
    let d = half::f16::from_f32(0.01).to_le_bytes();
    for blk in v.chunks_exact_mut(bb) {
        for &o in d_offsets {
            blk[o..o + 2].copy_from_slice(&d);
        }
    }
    v
}

/// Best-of-`reps` seconds for one matrix × vector pass over rows of `row_bytes`.
fn time_pass(
    dot: fn(&[u8], &[u8], usize) -> f32,
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    cols: usize,
    reps: usize,
) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let mut s = 0.0f32;
        for row in w.chunks_exact(row_bytes) {
            s += dot(row, a, cols);
        }
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(s);
    }
    best
}

fn activations(cols: usize) -> Vec<u8> {
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 7919) % 251) as f32 / 125.0 - 1.0)
        .collect();
    let mut a = vec![0u8; cols / QK_K * 292];
    kquants::quantize_row_q8k(&x, &mut a);
    a
}

#[test]
#[ignore = "timing; run explicitly with --ignored --nocapture"]
fn kquant_dot_throughput() {
    let (rows, cols) = (4096usize, 4096usize);
    let a = activations(cols);
    println!("single thread, {rows}x{cols} matrix x vector, best of 20 passes:");
    for ty in TYPES {
        let w = weights(ty, rows, cols);
        let row_bytes = cols / QK_K * ty.type_size() as usize;
        for k in kquants::kernel_variants(ty) {
            let reps = if k.dot_variant == "scalar" { 3 } else { 20 };
            let t = time_pass(k.dot, &w, row_bytes, &a, cols, reps);
            println!(
                "  {:<5} {:<11} {:>8.1} us  {:>6.2} GB/s  {:>6.2} Gelem/s",
                ty.name(),
                k.dot_variant,
                t * 1e6,
                w.len() as f64 / t / 1e9,
                (rows * cols) as f64 / t / 1e9
            );
        }
    }
    // A 512×4096 slice (≤ 1.2 MB) stays in L2: the kernels' compute ceiling.
    println!("single thread, 512x{cols} (L2-resident), best of 200 passes:");
    for ty in TYPES {
        let w = weights(ty, 512, cols);
        let row_bytes = cols / QK_K * ty.type_size() as usize;
        for k in kquants::kernel_variants(ty).into_iter().skip(1) {
            let t = time_pass(k.dot, &w, row_bytes, &a, cols, 200);
            println!(
                "  {:<5} {:<11} {:>6.2} GB/s  {:>6.2} Gelem/s",
                ty.name(),
                k.dot_variant,
                w.len() as f64 / t / 1e9,
                (512 * cols) as f64 / t / 1e9
            );
        }
    }
    // Batched (prefill): 4096×4096 against 4 tokens, tiles vs one dot per output.
    println!("single thread, 4096x{cols}, ns per weight row and token:");
    let acts: Vec<Vec<u8>> = (0..4).map(|_| activations(cols)).collect();
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
        let w = weights(ty, rows, cols);
        let row_bytes = cols / QK_K * ty.type_size() as usize;
        let k = kquants::kernel(ty);
        let mut best_dot = f64::INFINITY;
        let mut best_tile = f64::INFINITY;
        let (mut best_dot1, mut best_tile1) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..10 {
            let t0 = Instant::now();
            let mut s = 0.0f32;
            for row in w.chunks_exact(row_bytes) {
                for a in &acts {
                    s += (k.dot)(row, a, cols);
                }
            }
            best_dot = best_dot.min(t0.elapsed().as_secs_f64());
            std::hint::black_box(s);
            if let Some((full, _)) = kquants::tiles(ty) {
                let t0 = Instant::now();
                let a4: [&[u8]; 4] = std::array::from_fn(|t| acts[t].as_slice());
                let mut out = [[0f32; 4]; 4];
                let mut s = 0.0f32;
                for quad in w.chunks_exact(4 * row_bytes) {
                    let w4: [&[u8]; 4] =
                        std::array::from_fn(|r| &quad[r * row_bytes..(r + 1) * row_bytes]);
                    full(&w4, &a4, &[], cols, &mut out);
                    s += out[0][0];
                }
                best_tile = best_tile.min(t0.elapsed().as_secs_f64());
                std::hint::black_box(s);
            }
            let t0 = Instant::now();
            let mut s = 0.0f32;
            for row in w.chunks_exact(row_bytes) {
                s += (k.dot)(row, &acts[0], cols);
            }
            best_dot1 = best_dot1.min(t0.elapsed().as_secs_f64());
            std::hint::black_box(s);
            if let Some((_, one)) = kquants::tiles(ty) {
                let t0 = Instant::now();
                let a1: [&[u8]; 4] = [acts[0].as_slice(); 4];
                let mut out = [[0f32; 4]; 4];
                let mut s = 0.0f32;
                for quad in w.chunks_exact(4 * row_bytes) {
                    let w4: [&[u8]; 4] =
                        std::array::from_fn(|r| &quad[r * row_bytes..(r + 1) * row_bytes]);
                    one(&w4, &a1, &[], cols, &mut out);
                    s += out[0][0];
                }
                best_tile1 = best_tile1.min(t0.elapsed().as_secs_f64());
                std::hint::black_box(s);
            }
        }
        let per = |t: f64| t / (rows * 4) as f64 * 1e9;
        println!(
            "  {} dot ({}) {:.1} ns, 4x4 tile {:.1} ns; 1 token: dot {:.1} ns, 4x1 tile {:.1} ns",
            ty.name(),
            k.dot_variant,
            per(best_dot),
            per(best_tile),
            per(best_dot1) * 4.0,
            per(best_tile1) * 4.0
        );
    }
    // Larger than any L3: weights stream from DRAM.
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
        streaming(ty, cols, &a);
    }
}

fn streaming(ty: GgmlType, cols: usize, a: &[u8]) {
    let row_bytes = cols / QK_K * ty.type_size() as usize;
    let big_rows = (512usize << 20) / row_bytes;
    let w = weights(ty, big_rows, cols);
    let k = kquants::kernel(ty);
    let t = time_pass(k.dot, &w, row_bytes, a, cols, 3);
    // The same bytes read by a plain u64 sum, for the machine's single-core read bandwidth.
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        let s: u64 = w
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .fold(0u64, |acc, v| acc.wrapping_add(v));
        best = best.min(t0.elapsed().as_secs_f64());
        std::hint::black_box(s);
    }
    println!(
        "  {} {} streaming {} MiB: {:.2} GB/s (plain u64 sum of the same bytes: {:.2} GB/s)",
        ty.name(),
        k.dot_variant,
        w.len() >> 20,
        w.len() as f64 / t / 1e9,
        w.len() as f64 / best / 1e9
    );
}
