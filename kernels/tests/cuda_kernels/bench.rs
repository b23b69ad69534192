//! Kernel benchmarks (run with `--ignored`): GEMV, MMQ, the other kernels, decode attention.

use super::*;

/// `bytes` uploaded as enough copies (at most 64) that together they outgrow L2 (256 MiB): a
/// benchmark that calls each copy in turn reads its weights from DRAM every call.
fn weight_copies(c: &Ctx, bytes: &[u8]) -> Vec<DevBuf> {
    let copies = (256usize << 20).div_ceil(bytes.len()).clamp(1, 64);
    let first = c.up_bytes(bytes);
    let mut ws = vec![first];
    for _ in 1..copies {
        let b = c.alloc(bytes.len());
        c.gpu
            .dev
            .copy_d2d(c.gpu.stream(), b.ptr, first.ptr, bytes.len())
            .unwrap();
        ws.push(b);
    }
    ws
}

/// Milliseconds per call of `f` launched back to back on the compute stream, call i on weight
/// copy i (cycling), after one untimed pass over the copies; at least `min_reps` calls.
fn time_back_to_back(c: &Ctx, ws: &[DevBuf], min_reps: usize, f: &dyn Fn(u64)) -> f64 {
    let s = c.gpu.stream();
    for b in ws {
        f(b.ptr);
    }
    c.sync();
    let (a, b) = (
        c.gpu.dev.event(true).unwrap(),
        c.gpu.dev.event(true).unwrap(),
    );
    let reps = (4 * ws.len()).max(min_reps);
    a.record(s).unwrap();
    for i in 0..reps {
        f(ws[i % ws.len()].ptr);
    }
    b.record(s).unwrap();
    b.synchronize().unwrap();
    a.elapsed_ms(&b).unwrap() as f64 / reps as f64
}

/// Decode GEMV throughput (run with `--ignored`): weight GB/s per quantized type and shape at
/// batch 1..8, with the dequantize + GEMM path at the same batch for comparison, timed in CUDA
/// graphs (or back to back: `PSHARD_BENCH_NO_GRAPH=1`). Weight copies rotate through more than
/// the L2 cache so every call reads HBM. `PSHARD_GEMV_RW` = "R,TW"
/// forces the kernel shape (rows and warps per team).
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_gemv() {
    let Some(c) = ctx("cuda_bench_gemv") else {
        return;
    };
    let mut r = rng("cuda_bench_gemv");
    let s = c.gpu.stream().clone();
    let no_graph = std::env::var("PSHARD_BENCH_NO_GRAPH").is_ok_and(|v| v == "1");
    let mut lines = Vec::new();
    let shapes = [
        (4096usize, 4096usize),
        (4096, 14336),
        (14336, 4096),
        (1024, 4096),
    ];
    let max_cols = 14336;
    let x = c.up_f32(&randv(&mut r, 8 * max_cols, 1.0));
    let out = c.alloc(8 * 14336 * 4);
    let wsb = c.alloc(14336 * 4096 * 2);
    let asb = c.alloc(8 * max_cols * 2);
    let types: Vec<GgmlType> = quant::SUPPORTED
        .iter()
        .copied()
        .filter(|&t| t != GgmlType::F32 && t != GgmlType::BF16)
        .collect();
    for &(rows, cols) in &shapes {
        lines.push(format!(
            "{rows}x{cols}: weight GB/s   n=1    n=2    n=3    n=4    n=8  (gemm n=8)"
        ));
        for &ty in &types {
            let bytes = random_blocks(&mut r, ty, rows, cols);
            let ws = weight_copies(&c, &bytes);
            let copies = ws.len();
            // Timed as the runtime runs decode: one call per weight copy captured in a CUDA graph,
            // the graph replayed (`PSHARD_BENCH_NO_GRAPH=1`: launched back to back instead, as
            // the profiler times them).
            let time = |f: &dyn Fn(u64)| -> f64 {
                if no_graph {
                    return time_back_to_back(&c, &ws, 64, f);
                }
                let g = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, || {
                    for b in &ws {
                        f(b.ptr);
                    }
                    Ok(())
                })
                .unwrap();
                g.launch(&s).unwrap();
                c.sync();
                let (a, b) = (
                    c.gpu.dev.event(true).unwrap(),
                    c.gpu.dev.event(true).unwrap(),
                );
                let reps = 64usize.div_ceil(copies).max(2);
                a.record(&s).unwrap();
                for _ in 0..reps {
                    g.launch(&s).unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                a.elapsed_ms(&b).unwrap() as f64 / (reps * copies) as f64
            };
            let mut row = format!("  {:<6}", format!("{ty:?}"));
            for n in [1usize, 2, 3, 4, 8] {
                let ms = time(&|w| {
                    c.gpu
                        .kernels
                        .gemv(ty, w, rows, cols, x.ptr, cols, out.ptr, rows, n, None, &s)
                        .unwrap()
                });
                row += &format!(" {:6.0}", bytes.len() as f64 / ms / 1e6);
            }
            let sc = GemmScratch {
                weights: wsb.ptr,
                acts: asb.ptr,
            };
            let ms = time(&|w| {
                c.gpu
                    .matmul(
                        ty,
                        w,
                        cols,
                        0,
                        rows,
                        x.ptr,
                        8,
                        out.ptr,
                        rows,
                        None,
                        Some(sc),
                        false,
                    )
                    .unwrap()
            });
            row += &format!("  {:6.0}", bytes.len() as f64 / ms / 1e6);
            lines.push(row);
            c.free(&ws);
        }
    }
    // The activation quantizer alone (it runs before every GEMV launch).
    for format in [quant::ActFormat::Q8K, quant::ActFormat::Q8_0] {
        for cols in [4096usize, 14336] {
            for n in [1usize, 8] {
                let reps = 200;
                c.sync();
                let (a, b) = (
                    c.gpu.dev.event(true).unwrap(),
                    c.gpu.dev.event(true).unwrap(),
                );
                a.record(&s).unwrap();
                for _ in 0..reps {
                    c.gpu
                        .kernels
                        .quantize_acts(format, x.ptr, cols, cols, n, &s)
                        .unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                let us = a.elapsed_ms(&b).unwrap() as f64 / reps as f64 * 1e3;
                lines.push(format!(
                    "quantize {} cols={cols} n={n}: {us:.2} us per call (back to back)",
                    format.name()
                ));
            }
        }
    }
    c.free(&[x, out, wsb, asb]);
    print_bench(&lines);
}

/// MMQ beside the int8 GEMV and dequantize + cuBLAS (run with `--ignored`): µs per call and
/// weight GB/s for llama3-8b's matrices (14336x4096 gate/up, 4096x14336 down, 4096x4096 q/o,
/// 1024x4096 k/v) at 8..128 tokens, each path as `Gpu::matmul` runs it (GEMV: one quantize + launch
/// per 8 rows; GEMM: dequantize, convert, cuBLAS; MMQ: quantize + one launch, the chosen tile, then
/// every tile). Launched back to back over enough weight copies that L2 holds none (batches of
/// more than 4 tokens run outside CUDA graphs). One line per (shape, type, tokens) decides
/// MMQ_TOKENS and the tile choice.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_mmq() {
    let Some(c) = ctx("cuda_bench_mmq") else {
        return;
    };
    let mut r = rng("cuda_bench_mmq");
    let s = c.gpu.stream().clone();
    let shapes = [
        (14336usize, 4096usize),
        (4096, 14336),
        (4096, 4096),
        (1024, 4096),
    ];
    let ns = [8usize, 16, 32, 64, 128];
    let max_n = 128;
    let max_cols = 14336;
    let x = c.up_f32(&randv(&mut r, max_n * max_cols, 1.0));
    let out = c.alloc(max_n * 14336 * 4);
    let wsb = c.alloc(14336 * 4096 * 2);
    let asb = c.alloc(max_n * max_cols * 2);
    let sc = GemmScratch {
        weights: wsb.ptr,
        acts: asb.ptr,
    };
    let mut lines = Vec::new();
    for &(rows, cols) in &shapes {
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0] {
            let bytes = random_blocks(&mut r, ty, rows, cols);
            let ws = weight_copies(&c, &bytes);
            // Microseconds per call, each call on the next weight copy.
            let time = |f: &dyn Fn(u64)| time_back_to_back(&c, &ws, 32, f) * 1e3;
            let gbs = |us: f64| bytes.len() as f64 / us / 1e3;
            for &n in &ns {
                let gemv = time(&|w| {
                    c.gpu
                        .kernels
                        .gemv(ty, w, rows, cols, x.ptr, cols, out.ptr, rows, n, None, &s)
                        .unwrap()
                });
                let gemm = time(&|w| {
                    c.gpu
                        .matmul(
                            ty,
                            w,
                            cols,
                            0,
                            rows,
                            x.ptr,
                            n,
                            out.ptr,
                            rows,
                            None,
                            Some(sc),
                            true,
                        )
                        .unwrap()
                });
                let auto = c.gpu.kernels.mmq_tile(ty, rows, n).unwrap();
                let mmq = |t: MmqTile| {
                    time(&|w| {
                        c.gpu
                            .kernels
                            .mmq(
                                ty,
                                w,
                                rows,
                                cols,
                                x.ptr,
                                cols,
                                out.ptr,
                                rows,
                                n,
                                None,
                                Some(t),
                                &s,
                            )
                            .unwrap()
                    })
                };
                let chosen = mmq(auto);
                let mut row = format!(
                    "mmq {rows}x{cols} {ty:?} n={n}: gemv {gemv:.1} us ({:.0} GB/s) | gemm {gemm:.1} us ({:.0}) | mmq {chosen:.1} us ({:.0}) [{auto}] | tiles",
                    gbs(gemv),
                    gbs(gemm),
                    gbs(chosen)
                );
                for t in c.gpu.kernels.mmq_tiles(ty) {
                    row += &format!(" {t} {:.1}", mmq(t));
                }
                lines.push(row);
            }
            c.free(&ws);
        }
    }
    c.free(&[x, out, wsb, asb]);
    print_bench(&lines);
}

/// Kernel timings (run with `--ignored`): the numbers the executor's design rests on.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_kernels() {
    let Some(c) = ctx("cuda_bench_kernels") else {
        return;
    };
    let mut r = rng("cuda_bench");
    let s = c.gpu.stream().clone();
    let time = |f: &dyn Fn(), reps: usize| -> f64 {
        f();
        c.sync();
        let (a, b) = (
            c.gpu.dev.event(true).unwrap(),
            c.gpu.dev.event(true).unwrap(),
        );
        a.record(&s).unwrap();
        for _ in 0..reps {
            f();
        }
        b.record(&s).unwrap();
        b.synchronize().unwrap();
        a.elapsed_ms(&b).unwrap() as f64 / reps as f64
    };
    let mut table = Vec::new();
    for (ty, rows, cols) in [
        (GgmlType::Q4_K, 14336, 4096),
        (GgmlType::Q6_K, 4096, 14336),
        (GgmlType::Q4_K, 4096, 4096),
        (GgmlType::Q4_K, 1024, 4096),
        (GgmlType::Q6_K, 128256, 4096),
        (GgmlType::Q8_0, 14336, 4096),
        (GgmlType::Q4_1, 14336, 4096),
    ] {
        let bytes = random_blocks(&mut r, ty, rows, cols);
        let w = c.up_bytes(&bytes);
        let x = c.up_f32(&randv(&mut r, 2048 * cols, 1.0));
        let out = c.alloc(2048 * rows * 4);
        for n in [1usize, 2, 4, 8] {
            let ms = time(
                &|| {
                    c.gpu
                        .kernels
                        .gemv(
                            ty, w.ptr, rows, cols, x.ptr, cols, out.ptr, rows, n, None, &s,
                        )
                        .unwrap()
                },
                50,
            );
            table.push(format!(
                "gemv {ty:?} {rows}x{cols} n={n}: {ms:.4} ms, {:.0} GB/s weights",
                bytes.len() as f64 / ms / 1e6
            ));
        }
        let wsb = c.alloc(rows * cols * 2);
        let asb = c.alloc(2048 * cols * 2);
        let ms = time(
            &|| {
                c.gpu
                    .kernels
                    .dequant_f16(ty, w.ptr, wsb.ptr, rows, cols, &s)
                    .unwrap()
            },
            20,
        );
        table.push(format!(
            "dequant {ty:?} {rows}x{cols}: {ms:.4} ms, {:.0} GB/s (read+write)",
            (bytes.len() + rows * cols * 2) as f64 / ms / 1e6
        ));
        for n in [32usize, 2048] {
            let sc = GemmScratch {
                weights: wsb.ptr,
                acts: asb.ptr,
            };
            let ms = time(
                &|| {
                    c.gpu
                        .matmul(
                            ty,
                            w.ptr,
                            cols,
                            0,
                            rows,
                            x.ptr,
                            n,
                            out.ptr,
                            rows,
                            None,
                            Some(sc),
                            false,
                        )
                        .unwrap()
                },
                10,
            );
            let msg = time(
                &|| {
                    c.gpu
                        .blas
                        .matmul(
                            pshard_kernels::cuda::GemmInput::F16,
                            wsb.ptr,
                            rows,
                            cols,
                            asb.ptr,
                            n,
                            out.ptr,
                            rows,
                        )
                        .unwrap()
                },
                10,
            );
            table.push(format!("matmul {ty:?} {rows}x{cols} n={n}: {ms:.3} ms total ({:.0} TFLOP/s), gemm alone {msg:.3} ms ({:.0} TFLOP/s)", 2.0 * (rows * cols * n) as f64 / ms / 1e9, 2.0 * (rows * cols * n) as f64 / msg / 1e9));
        }
        c.free(&[w, x, out, wsb, asb]);
    }
    for ((n, heads, kv, d), ty) in [
        (4096usize, 32usize, 8usize, 128usize),
        (512, 32, 8, 128),
        (4096, 8, 1, 256),
    ]
    .into_iter()
    .flat_map(|shape| KvType::ALL.map(|ty| (shape, ty)))
    {
        let p = AttnParams {
            n_head: heads,
            n_kv: kv,
            dk: d,
            dv: d,
            n_ctx: n,
            scale: 0.088,
            softcap: 0.0,
            window: 0,
            v_in_k: false,
        };
        let kc = c.alloc(n * ty.row_bytes(kv * d));
        let vc = c.alloc(n * ty.row_bytes(kv * d));
        let kf = c.up_f32(&randv(&mut r, n * kv * d, 1.0));
        let pos: Vec<i32> = (0..n as i32).collect();
        let pd = c.up_i32(&pos);
        c.gpu
            .kernels
            .kv_write(
                ty,
                kf.ptr,
                kv * d,
                kc.ptr,
                kv * d,
                pd.ptr,
                c.gpu.kernels.zero_seqs(n).unwrap(),
                n,
                n,
                &s,
            )
            .unwrap();
        c.gpu
            .kernels
            .kv_write(
                ty,
                kf.ptr,
                kv * d,
                vc.ptr,
                kv * d,
                pd.ptr,
                c.gpu.kernels.zero_seqs(n).unwrap(),
                n,
                n,
                &s,
            )
            .unwrap();
        let q = c.up_f32(&randv(&mut r, n * heads * d, 1.0));
        let out = c.alloc(n * heads * d * 4);
        let part = c.alloc(pshard_kernels::cuda::kernels::attention_scratch(&p, 1).max(4));
        let ms = time(
            &|| {
                c.gpu
                    .kernels
                    .attention(
                        &p,
                        q.ptr,
                        heads * d,
                        KvCells {
                            ty,
                            k: kc.ptr,
                            v: vc.ptr,
                            seq: c.gpu.kernels.zero_seqs(n.max(1)).unwrap(),
                            base: 0,
                        },
                        pd.ptr,
                        n,
                        out.ptr,
                        heads * d,
                        part.ptr,
                        None,
                        &s,
                    )
                    .unwrap()
            },
            5,
        );
        let flops = 4.0 * (n as f64 * n as f64 / 2.0) * d as f64 * heads as f64;
        table.push(format!(
            "flash attention {} n={n} heads={heads}/{kv} d={d}: {ms:.3} ms, {:.0} TFLOP/s (causal)",
            ty.name(),
            flops / ms / 1e9
        ));
        let last = c.up_i32(&[n as i32 - 1]);
        let ms = time(
            &|| {
                c.gpu
                    .kernels
                    .attention(
                        &p,
                        q.ptr,
                        heads * d,
                        KvCells {
                            ty,
                            k: kc.ptr,
                            v: vc.ptr,
                            seq: c.gpu.kernels.zero_seqs(n.max(1)).unwrap(),
                            base: 0,
                        },
                        last.ptr,
                        1,
                        out.ptr,
                        heads * d,
                        part.ptr,
                        None,
                        &s,
                    )
                    .unwrap()
            },
            50,
        );
        table.push(format!(
            "decode attention {} ctx={n} heads={heads}/{kv} d={d}: {ms:.4} ms, {:.0} GB/s KV",
            ty.name(),
            (2 * n * ty.row_bytes(kv * d)) as f64 / ms / 1e6
        ));
        c.free(&[kc, vc, kf, pd, q, out, part, last]);
    }
    for l in &table {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
    }
}

/// Decode attention cost against the number of visible keys in a large cache (run with
/// `--ignored`): the split-KV kernel sizes its splits from the position on the device, so a call
/// over L keys should cost a few µs plus L keys' bytes at HBM speed, independent of n_ctx.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_decode_attention() {
    let Some(c) = ctx("cuda_bench_decode_attention") else {
        return;
    };
    let mut r = rng("cuda_bench_decode_attention");
    let s = c.gpu.stream().clone();
    let n_ctx = 32768usize;
    let mut lines = Vec::new();
    for ((heads, kv, d), ty) in [(32usize, 8usize, 128usize), (4, 1, 256)]
        .into_iter()
        .flat_map(|shape| KvType::ALL.map(|ty| (shape, ty)))
    {
        let p = AttnParams {
            n_head: heads,
            n_kv: kv,
            dk: d,
            dv: d,
            n_ctx,
            scale: 1.0 / (d as f32).sqrt(),
            softcap: 0.0,
            window: 0,
            v_in_k: false,
        };
        let kc = c.alloc(n_ctx * ty.row_bytes(kv * d));
        let vc = c.alloc(n_ctx * ty.row_bytes(kv * d));
        let kf = c.up_f32(&randv(&mut r, n_ctx * kv * d, 1.0));
        let fill: Vec<i32> = (0..n_ctx as i32).collect();
        let fd = c.up_i32(&fill);
        for cache in [kc, vc] {
            c.gpu
                .kernels
                .kv_write(
                    ty,
                    kf.ptr,
                    kv * d,
                    cache.ptr,
                    kv * d,
                    fd.ptr,
                    c.gpu.kernels.zero_seqs(n_ctx).unwrap(),
                    n_ctx,
                    n_ctx,
                    &s,
                )
                .unwrap();
        }
        let q = c.up_f32(&randv(&mut r, heads * d, 1.0));
        let out = c.alloc(heads * d * 4);
        let part = c.alloc(pshard_kernels::cuda::kernels::attention_scratch(&p, 1).max(4));
        for len in [1usize, 128, 1024, 2048, 8192, 32768] {
            let pd = c.up_i32(&[len as i32 - 1]);
            let run = || {
                c.gpu
                    .kernels
                    .attention(
                        &p,
                        q.ptr,
                        heads * d,
                        KvCells {
                            ty,
                            k: kc.ptr,
                            v: vc.ptr,
                            seq: c.gpu.kernels.zero_seqs(1).unwrap(),
                            base: 0,
                        },
                        pd.ptr,
                        1,
                        out.ptr,
                        heads * d,
                        part.ptr,
                        None,
                        &s,
                    )
                    .unwrap()
            };
            run();
            c.sync();
            let (a, b) = (
                c.gpu.dev.event(true).unwrap(),
                c.gpu.dev.event(true).unwrap(),
            );
            let reps = 200;
            a.record(&s).unwrap();
            for _ in 0..reps {
                run();
            }
            b.record(&s).unwrap();
            b.synchronize().unwrap();
            let us = a.elapsed_ms(&b).unwrap() as f64 * 1e3 / reps as f64;
            let bytes = (2 * len * ty.row_bytes(kv * d)) as f64;
            lines.push(format!(
                "decode attention {} keys={len} n_ctx={n_ctx} heads={heads}/{kv} d={d}: {us:.1} µs, {:.0} GB/s KV",
                ty.name(),
                bytes / us / 1e3
            ));
            c.free(&[pd]);
        }
        c.free(&[kc, vc, kf, fd, q, out, part]);
    }
    print_bench(&lines);
}
