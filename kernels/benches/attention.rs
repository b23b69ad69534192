//! CPU attention of one prefill batch: `ATTN_TOKENS` tokens (default 512) at positions
//! `0..tokens` over an f16 cache holding them, for gemma-3-270m's shape (4 query heads, 1 kv head,
//! head dim 256, sliding window 512) and SmolLM2-135M's (9 / 3 / 64, no window). Fastest of
//! `ATTN_REPS` calls (default 20; robust to other processes sharing the cores), in ms and GFLOP/s
//! of the causal QK and PV multiply-adds (2 flops each).
//!
//! `cargo bench -p pshard-kernels --bench attention` (threads: `ATTN_THREADS`, default 1).

use std::hint::black_box;
use std::time::Instant;

use half::f16;
use pshard_kernels::ops::{attention, AttnParams, KvType, KvView};
use pshard_kernels::pool;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Values in `-1..1` from a fixed integer hash (no generator needed for timing).
fn values(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let h = (i ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            h as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn main() {
    let tokens = env("ATTN_TOKENS", 512);
    let reps = env("ATTN_REPS", 20);
    pool::set_threads(env("ATTN_THREADS", 1));
    // (name, q heads, kv heads, head dim, window)
    let shapes = [
        ("gemma-3-270m", 4, 1, 256, Some(512)),
        ("SmolLM2-135M", 9, 3, 64, None),
    ];
    for (name, n_head, n_head_kv, hd, window) in shapes {
        let p = AttnParams {
            n_head,
            n_head_kv,
            head_dim_k: hd,
            head_dim_v: hd,
            window,
            scale: 1.0 / (hd as f32).sqrt(),
            softcap: None,
            sinks: None,
        };
        let kvc = n_head_kv * hd;
        let cache = |salt| -> Vec<u8> {
            let v: Vec<f16> = values(tokens * kvc, salt)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            bytemuck::cast_slice(&v).to_vec()
        };
        let (k, v) = (cache(1), cache(2));
        let view = KvView {
            k: &k,
            v: &v,
            ty: KvType::F16,
            cells: tokens,
            k_row: kvc,
            v_row: kvc,
        };
        let q = values(tokens * n_head * hd, 3);
        let positions: Vec<u32> = (0..tokens as u32).collect();
        let mut out = vec![0f32; tokens * n_head * hd];
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t0 = Instant::now();
            attention(black_box(&q), &positions, &view, &p, &mut out);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        black_box(&out);
        let keys: usize = (0..tokens)
            .map(|t| (t + 1).min(window.unwrap_or(usize::MAX)))
            .sum();
        let flops = (keys * n_head * hd * 2 * 2) as f64;
        println!(
            "{name:>14} pp{tokens}: {:8.3} ms  {:6.1} GFLOP/s ({} thread(s), best of {reps})",
            best * 1e3,
            flops / best / 1e9,
            pool::threads()
        );
    }
}
