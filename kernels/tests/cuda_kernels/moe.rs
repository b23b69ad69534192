//! MoE: routing (free and forced), the expert GEMVs (int8 and float), the pair sort and the
//! grouped expert GEMM against the CPU engine, and their benchmarks.

use super::*;

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_route_and_experts_match_cpu() {
    let Some(c) = ctx("cuda_moe_route_and_experts_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_moe");
    let s = c.gpu.stream().clone();
    let (n, n_expert, n_used, d, ff) = (7usize, 16usize, 4usize, 256usize, 512usize);
    // Every gating, with a selection bias, a group limit and a scale, against the CPU's routing.
    let bias = randv(&mut r, n_expert, 0.3);
    let bd = c.up_f32(&bias);
    for (gating, groups, scale) in [
        (Gating::Sigmoid, (0, 0), 2.5),
        (Gating::SoftmaxAfterTopK, (0, 0), 1.0),
        (Gating::Softmax, (4, 2), 1.0),
        (Gating::Sigmoid, (8, 3), 1.0),
    ] {
        let rt = Routing {
            n_expert,
            n_used,
            gating,
            normalize: gating == Gating::Sigmoid,
            scale,
            groups,
        };
        let logits = randv(&mut r, n * n_expert, 3.0);
        let ld = c.up_f32(&logits);
        let route = c.poisoned(n * 2 * n_used * 4);
        let sel = (gating == Gating::Sigmoid).then_some(bd.ptr);
        c.gpu
            .kernels
            .moe_route(ld.ptr, n, &rt, sel, None, route.ptr, &s)
            .unwrap();
        c.sync();
        let rb = c.down_bytes(route.ptr, n * 2 * n_used * 4);
        for t in 0..n {
            let (mut ids, mut w) = (vec![0u32; n_used], vec![0f32; n_used]);
            let b = sel.map(|_| &bias[..]);
            pshard_kernels::ops::route(
                &logits[t * n_expert..(t + 1) * n_expert],
                &rt,
                b,
                None,
                &mut ids,
                &mut w,
            );
            let word = |i: usize| u32::from_le_bytes(rb[4 * i..4 * i + 4].try_into().unwrap());
            for k in 0..n_used {
                assert_eq!(
                    word(t * 2 * n_used + k),
                    ids[k],
                    "{rt:?} token {t} expert {k}"
                );
                let got = f32::from_bits(word(t * 2 * n_used + n_used + k));
                assert!((got - w[k]).abs() < 1e-5, "{rt:?} token {t} weight {k}");
            }
        }
        c.free(&[ld, route]);
    }
    c.free(&[bd]);
    for normalize in [true, false] {
        let logits = randv(&mut r, n * n_expert, 3.0);
        let ld = c.up_f32(&logits);
        let route = c.poisoned(n * 2 * n_used * 4);
        let rt = Routing {
            n_expert,
            n_used,
            gating: Gating::Softmax,
            normalize,
            scale: 1.0,
            groups: (0, 0),
        };
        c.gpu
            .kernels
            .moe_route(ld.ptr, n, &rt, None, None, route.ptr, &s)
            .unwrap();
        c.sync();
        let rb = c.down_bytes(route.ptr, n * 2 * n_used * 4);
        let words: Vec<u32> = rb
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // CPU routing reference.
        let mut ref_ids = Vec::new();
        let mut ref_w = Vec::new();
        for t in 0..n {
            let l = &logits[t * n_expert..(t + 1) * n_expert];
            let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = l.iter().map(|&v| (v as f64 - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            let mut idx: Vec<usize> = (0..n_expert).collect();
            idx.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap().then(a.cmp(&b)));
            let top = &idx[..n_used];
            let ws: Vec<f64> = top.iter().map(|&i| e[i] / sum).collect();
            let wsum: f64 = ws.iter().sum();
            for (k, &i) in top.iter().enumerate() {
                ref_ids.push(i as u32);
                ref_w.push(if normalize { ws[k] / wsum } else { ws[k] });
            }
        }
        for t in 0..n {
            let ids = &words[t * 2 * n_used..t * 2 * n_used + n_used];
            assert_eq!(
                ids,
                &ref_ids[t * n_used..(t + 1) * n_used],
                "token {t} experts"
            );
            for k in 0..n_used {
                let w = f32::from_bits(words[t * 2 * n_used + n_used + k]) as f64;
                assert!(
                    (w - ref_w[t * n_used + k]).abs() < 1e-5,
                    "token {t} weight {k}"
                );
            }
        }
        if !normalize {
            c.free(&[ld, route]);
            continue;
        }
        // Expert FFN: gate/up [E, ff, d], down [E, d, ff], Q4_K / Q6_K, each stage against the
        // CPU engine's expert matmuls on the same inputs (the down projection on the GPU's GLU
        // output, so the check does not depend on f32 `exp` rounding of the two GLUs).
        let gb = make_weights(&mut r, GgmlType::Q4_K, n_expert * ff, d).0;
        let ub = make_weights(&mut r, GgmlType::Q4_K, n_expert * ff, d).0;
        let db = make_weights(&mut r, GgmlType::Q6_K, n_expert * d, ff).0;
        let x = randv(&mut r, n * d, 1.0);
        let (gd, ud, dd, xd) = (
            c.up_bytes(&gb),
            c.up_bytes(&ub),
            c.up_bytes(&db),
            c.up_f32(&x),
        );
        let np = n * n_used;
        let (hg, hu, hh, ho, out) = (
            c.poisoned(np * ff * 4),
            c.poisoned(np * ff * 4),
            c.alloc(np * ff * 4),
            c.poisoned(np * d * 4),
            c.poisoned(n * d * 4),
        );
        let k = &c.gpu.kernels;
        for (wd, hd) in [(gd.ptr, hg.ptr), (ud.ptr, hu.ptr)] {
            k.moe_gemv(
                GgmlType::Q4_K,
                wd,
                ff,
                d,
                xd.ptr,
                d,
                n_used,
                route.ptr,
                n_used,
                np,
                hd,
                ff,
                &s,
            )
            .unwrap();
        }
        k.glu(hg.ptr, hu.ptr, hh.ptr, np * ff, Activation::Silu, &s)
            .unwrap();
        k.moe_gemv(
            GgmlType::Q6_K,
            dd.ptr,
            d,
            ff,
            hh.ptr,
            ff,
            1,
            route.ptr,
            n_used,
            np,
            ho.ptr,
            d,
            &s,
        )
        .unwrap();
        k.moe_combine(ho.ptr, route.ptr, n_used, out.ptr, n, d, &s)
            .unwrap();
        c.sync();
        let h_gpu = c.down_f32(hh.ptr, np * ff);
        let stages = [
            (
                "gate",
                c.down_f32(hg.ptr, np * ff),
                cpu_moe_gemv(GgmlType::Q4_K, &gb, ff, d, &x, n_used, &ref_ids),
            ),
            (
                "up",
                c.down_f32(hu.ptr, np * ff),
                cpu_moe_gemv(GgmlType::Q4_K, &ub, ff, d, &x, n_used, &ref_ids),
            ),
            (
                "down",
                c.down_f32(ho.ptr, np * d),
                cpu_moe_gemv(GgmlType::Q6_K, &db, d, ff, &h_gpu, 1, &ref_ids),
            ),
        ];
        for (name, got, want) in &stages {
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let err = rel_l2(got, &want64);
            assert!(err <= 1e-5, "MoE {name} rel L2 {err}");
        }
        // Combined with the GPU's own route weights (checked against ref_w above).
        let mut want = vec![0f64; n * d];
        for (p, row) in stages[2].2.chunks_exact(d).enumerate() {
            let (t, k) = (p / n_used, p % n_used);
            let wt = f32::from_bits(words[t * 2 * n_used + n_used + k]) as f64;
            for (o, &v) in want[t * d..][..d].iter_mut().zip(row) {
                *o += wt * v as f64;
            }
        }
        let err = rel_l2(&c.down_f32(out.ptr, n * d), &want);
        assert!(err < 1e-5, "MoE FFN rel L2 {err}");
        c.free(&[ld, route, gd, ud, dd, xd, hg, hu, hh, ho, out]);
    }
}

/// The CPU engine's result of a routed expert GEMV: for pair `p` (expert `ids[p]`, input row
/// `p / x_div` of `x`, rows of `cols`), `y[p] = W_e · x_q` with the input quantized to the type's
/// partner format and dotted by `pshard_kernels::matmul::matmul` on expert `e`'s slice of `w`
/// (`rows` rows per expert).
fn cpu_moe_gemv(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    x_div: usize,
    ids: &[u32],
) -> Vec<f32> {
    let k = quant::kernel(ty).expect("CPU kernel");
    let rb = row_bytes(ty, cols).unwrap();
    let n_in = x.len() / cols;
    let xq: Vec<_> = (0..n_in)
        .map(|i| pshard_kernels::matmul::quantize_acts(k.act, &x[i * cols..][..cols], 1, cols))
        .collect();
    let mut y = vec![0f32; ids.len() * rows];
    for (p, &e) in ids.iter().enumerate() {
        let wm = pshard_kernels::matmul::WeightMatrix {
            ty,
            data: &w[e as usize * rows * rb..][..rows * rb],
            rows,
            cols,
            layout: pshard_kernels::matmul::WeightLayout::File,
        };
        pshard_kernels::matmul::matmul(
            &wm,
            &xq[p / x_div],
            &mut y[p * rows..][..rows],
            rows,
            0..rows,
        )
        .unwrap();
    }
    y
}

/// `moe_route` with a forced-expert table against the CPU's routing with the same forced ids:
/// forced tokens (distinct random experts, some in groups the group limit masks) take exactly
/// those experts, weighted by each gating, renormalisation and scale as the CPU does, the
/// selection bias ignored; tokens whose row starts with `MOE_ROUTE_FREE` route as without a
/// table.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_route_forced_matches_cpu() {
    let Some(c) = ctx("cuda_moe_route_forced_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_moe_forced");
    let s = c.gpu.stream().clone();
    let (n, n_expert, n_used) = (9usize, 16usize, 4usize);
    let bias = randv(&mut r, n_expert, 0.3);
    let bd = c.up_f32(&bias);
    for (gating, groups, normalize, scale) in [
        (Gating::Softmax, (0, 0), false, 1.0),
        (Gating::Softmax, (4, 2), true, 1.0),
        (Gating::Sigmoid, (0, 0), true, 2.5),
        (Gating::SoftmaxAfterTopK, (0, 0), false, 1.0),
        (Gating::Sigmoid, (8, 3), true, 1.0),
    ] {
        let rt = Routing {
            n_expert,
            n_used,
            gating,
            normalize,
            scale,
            groups,
        };
        let logits = randv(&mut r, n * n_expert, 3.0);
        // Every third token routes itself; the others take n_used distinct random experts.
        let mut table = vec![MOE_ROUTE_FREE; n * n_used];
        for (t, row) in table.chunks_exact_mut(n_used).enumerate() {
            if t % 3 == 2 {
                continue;
            }
            let mut k = 0;
            while k < n_used {
                let e = r.gen_range(0..n_expert as u32);
                if !row[..k].contains(&e) {
                    row[k] = e;
                    k += 1;
                }
            }
        }
        let ld = c.up_f32(&logits);
        let fd = c.up_bytes(bytemuck::cast_slice(&table));
        let route = c.poisoned(n * 2 * n_used * 4);
        let sel = (gating == Gating::Sigmoid).then_some(bd.ptr);
        c.gpu
            .kernels
            .moe_route(ld.ptr, n, &rt, sel, Some(fd.ptr), route.ptr, &s)
            .unwrap();
        c.sync();
        let rb = c.down_bytes(route.ptr, n * 2 * n_used * 4);
        let word = |i: usize| u32::from_le_bytes(rb[4 * i..4 * i + 4].try_into().unwrap());
        let mut differs = false;
        for t in 0..n {
            let row = &table[t * n_used..][..n_used];
            let forced = (row[0] != MOE_ROUTE_FREE).then_some(row);
            let (mut ids, mut w) = (vec![0u32; n_used], vec![0f32; n_used]);
            let l = &logits[t * n_expert..][..n_expert];
            let b = sel.map(|_| &bias[..]);
            pshard_kernels::ops::route(l, &rt, b, forced, &mut ids, &mut w);
            let (mut own, mut own_w) = (vec![0u32; n_used], vec![0f32; n_used]);
            pshard_kernels::ops::route(l, &rt, b, None, &mut own, &mut own_w);
            differs |= forced.is_some() && own != ids;
            for k in 0..n_used {
                assert_eq!(
                    word(t * 2 * n_used + k),
                    ids[k],
                    "{rt:?} token {t} expert {k} (forced {forced:?})"
                );
                let got = f32::from_bits(word(t * 2 * n_used + n_used + k));
                assert!(
                    (got - w[k]).abs() < 1e-5,
                    "{rt:?} token {t} weight {k}: {got} vs {} (forced {forced:?})",
                    w[k]
                );
            }
        }
        assert!(
            differs,
            "{rt:?}: no forced token differs from its own routing"
        );
        c.free(&[ld, fd, route]);
    }
    c.free(&[bd]);
}

/// A route buffer as `moe_route` writes it for pairs with experts `ids` (`n_used` per token, the
/// last token possibly partial): per token `n_used` i32 ids, then `n_used` f32 weights.
fn route_bytes(ids: &[u32], n_used: usize, r: &mut StdRng) -> Vec<u8> {
    let tokens = ids.len().div_ceil(n_used);
    let mut b = Vec::with_capacity(tokens * 2 * n_used * 4);
    for t in 0..tokens {
        for k in 0..n_used {
            let e = ids.get(t * n_used + k).copied().unwrap_or(0);
            b.extend_from_slice(&e.to_le_bytes());
        }
        for _ in 0..n_used {
            b.extend_from_slice(&r.gen_range(0.0f32..1.0).to_le_bytes());
        }
    }
    b
}

/// The int8 MoE expert GEMV of every quantized type against the CPU engine's matmul on each
/// pair's expert slice with the same activations: random routes drawn from few experts (repeats
/// within and across tokens), 1..64 pairs (partial last tokens), 1..8 experts per token, one input
/// row per token (gate/up) and per pair (down), padded strides, every kernel shape; a launch
/// beyond the activation scratch (chunked); and a CUDA graph replayed on new routes and inputs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_gemv_int8_matches_cpu_engine() {
    let Some(c) = ctx("cuda_moe_gemv_int8_matches_cpu_engine") else {
        return;
    };
    let mut r = rng("cuda_moe_gemv_int8");
    let s = c.gpu.stream().clone();
    let n_expert = 5usize;
    let mut worst = 0f64;
    // Runs one call and checks it; returns the relative L2 error of the worst pair.
    let check = |r: &mut StdRng,
                 ty: GgmlType,
                 w: &(Vec<u8>, DevBuf),
                 rows: usize,
                 cols: usize,
                 n_pairs: usize,
                 n_used: usize,
                 x_div: usize|
     -> f64 {
        let ids: Vec<u32> = (0..n_pairs)
            .map(|_| r.gen_range(0..n_expert as u32))
            .collect();
        let n_in = (n_pairs - 1) / x_div + 1;
        let (ldx, ldy) = (cols + 32, rows + 3);
        let x = randv(r, n_in * ldx, 1.0);
        let route = c.up_bytes(&route_bytes(&ids, n_used, r));
        let xd = c.up_f32(&x);
        let yd = c.poisoned(n_pairs * ldy * 4);
        c.gpu
            .kernels
            .moe_gemv(
                ty, w.1.ptr, rows, cols, xd.ptr, ldx, x_div, route.ptr, n_used, n_pairs, yd.ptr,
                ldy, &s,
            )
            .unwrap();
        c.sync();
        let got = c.down_f32(yd.ptr, n_pairs * ldy);
        // The reference reads unpadded rows.
        let xc: Vec<f32> = x
            .chunks_exact(ldx)
            .flat_map(|row| &row[..cols])
            .copied()
            .collect();
        let want = cpu_moe_gemv(ty, &w.0, rows, cols, &xc, x_div, &ids);
        let mut worst = 0f64;
        for p in 0..n_pairs {
            let want64: Vec<f64> = want[p * rows..][..rows].iter().map(|&v| v as f64).collect();
            let err = rel_l2(&got[p * ldy..][..rows], &want64);
            assert!(
                err <= 1e-5,
                "{ty:?} {rows}x{cols} pairs={n_pairs} n_used={n_used} x_div={x_div}: pair {p} (expert {}) rel L2 {err}",
                ids[p]
            );
            worst = worst.max(err);
        }
        // Padding between output rows is left alone.
        assert!(got
            .chunks_exact(ldy)
            .all(|row| row[rows..].iter().all(|v| v.is_nan())));
        c.free(&[route, xd, yd]);
        worst
    };
    for &ty in quant::SUPPORTED {
        let Some(k) = quant::kernel(ty) else { continue };
        if k.act == quant::ActFormat::F32 {
            continue;
        }
        // (rows, cols): 768 and 4096 columns (Q8_0 rows of 4096 use teams of four warps).
        for (si, &(rows, cols)) in [(37usize, 768usize), (21, 4096)].iter().enumerate() {
            let bytes = if si == 0 {
                random_blocks(&mut r, ty, n_expert * rows, cols)
            } else {
                make_weights(&mut r, ty, n_expert * rows, cols).0
            };
            let w = (bytes.clone(), c.up_bytes(&bytes));
            for &(n_pairs, n_used) in &[(1usize, 1usize), (3, 2), (8, 8), (13, 4), (40, 8), (64, 6)]
            {
                for x_div in [n_used, 1] {
                    worst = worst.max(check(&mut r, ty, &w, rows, cols, n_pairs, n_used, x_div));
                }
            }
            c.free(&[w.1]);
        }
    }
    // Every kernel shape, and inputs beyond the scratch (2^20 values): 300 pairs of 4096 columns
    // take two launches per call with one row per pair; 2000 pairs sharing rows per token, two.
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::MXFP4,
        GgmlType::IQ4_XS,
    ] {
        let bytes = random_blocks(&mut r, ty, n_expert * 19, 4096);
        let w = (bytes.clone(), c.up_bytes(&bytes));
        for rw in ["1,1", "2,1", "2,4"] {
            std::env::set_var("PSHARD_MOE_RW", rw);
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 24, 8, 8));
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 24, 8, 1));
        }
        std::env::remove_var("PSHARD_MOE_RW");
        if ty == GgmlType::Q4_K {
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 300, 6, 1));
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 2000, 7, 7));
        }
        c.free(&[w.1]);
    }
    eprintln!("int8 MoE GEMV vs CPU engine: worst per-pair rel L2 {worst:.2e}");

    // Captured once, replayed with new routes and activations written into the same buffers.
    let (ty, rows, cols, n_used, n_pairs) = (GgmlType::Q4_K, 64usize, 1024usize, 4usize, 12usize);
    let bytes = random_blocks(&mut r, ty, n_expert * rows, cols);
    let wd = c.up_bytes(&bytes);
    let ids0: Vec<u32> = (0..n_pairs as u32).map(|p| p % n_expert as u32).collect();
    let route = c.up_bytes(&route_bytes(&ids0, n_used, &mut r));
    let xd = c.up_f32(&randv(&mut r, n_pairs * cols, 1.0));
    let yd = c.poisoned(n_pairs * rows * 4);
    let call = || {
        c.gpu.kernels.moe_gemv(
            ty, wd.ptr, rows, cols, xd.ptr, cols, 1, route.ptr, n_used, n_pairs, yd.ptr, rows, &s,
        )
    };
    let g = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, call).unwrap();
    for _ in 0..2 {
        let ids: Vec<u32> = (0..n_pairs)
            .map(|_| r.gen_range(0..n_expert as u32))
            .collect();
        let x = randv(&mut r, n_pairs * cols, 1.0);
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        c.gpu.dev.upload(&s, xd.ptr, &xb).unwrap();
        c.gpu
            .dev
            .upload(&s, route.ptr, &route_bytes(&ids, n_used, &mut r))
            .unwrap();
        c.gpu
            .dev
            .memset(&s, yd.ptr, 0xff, n_pairs * rows * 4)
            .unwrap();
        g.launch(&s).unwrap();
        c.sync();
        let got = c.down_f32(yd.ptr, n_pairs * rows);
        let want = cpu_moe_gemv(ty, &bytes, rows, cols, &x, 1, &ids);
        let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let err = rel_l2(&got, &want64);
        assert!(err <= 1e-5, "graph replay: rel L2 {err}");
    }
    c.free(&[wd, route, xd, yd]);
}

/// MoE expert GEMV timings (run with `--ignored`) on qwen3-30b-a3b shapes (128 experts, d 2048,
/// ff 768, 8 per token): gate/up (768 × 2048, one input row per token) and down (2048 × 768, one
/// per pair) for 1 and 4 tokens, each kernel shape, in a CUDA graph of 16 calls with different
/// random routes. GB/s counts the bytes of the distinct experts each call reads; the plain int8
/// GEMV over one contiguous matrix of the same bytes (8 experts' rows) is the reference.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_moe_gemv() {
    let Some(c) = ctx("cuda_bench_moe_gemv") else {
        return;
    };
    let mut r = rng("cuda_bench_moe_gemv");
    let s = c.gpu.stream().clone();
    let (n_expert, d, ff, n_used, calls) = (128usize, 2048usize, 768usize, 8usize, 16usize);
    let x = c.up_f32(&randv(&mut r, 32 * d.max(ff), 1.0));
    let y = c.alloc(32 * d.max(ff) * 4);
    let mut lines = Vec::new();
    for (ty, rows, cols, what) in [
        (GgmlType::Q4_K, ff, d, "gate/up"),
        (GgmlType::Q4_K, d, ff, "down"),
        (GgmlType::Q6_K, d, ff, "down"),
        (GgmlType::Q8_0, ff, d, "gate/up"),
    ] {
        let rb = row_bytes(ty, cols).unwrap();
        let eb = rows * rb;
        let w = c.up_bytes(&random_blocks(&mut r, ty, n_expert * rows, cols));
        for tokens in [1usize, 4] {
            let n_pairs = tokens * n_used;
            let x_div = if what == "down" { 1 } else { n_used };
            let mut routes = Vec::new();
            let mut bytes = 0usize;
            for _ in 0..calls {
                let mut ids = Vec::new();
                for _ in 0..tokens {
                    let mut pick: Vec<u32> = (0..n_expert as u32).collect();
                    for k in 0..n_used {
                        let j = r.gen_range(k..n_expert);
                        pick.swap(k, j);
                    }
                    ids.extend_from_slice(&pick[..n_used]);
                }
                let mut distinct = ids.clone();
                distinct.sort_unstable();
                distinct.dedup();
                bytes += distinct.len() * eb;
                routes.push(c.up_bytes(&route_bytes(&ids, n_used, &mut r)));
            }
            let mut row = format!("{ty:?} {what} {rows}x{cols} tokens={tokens}:");
            for rw in ["1,1", "2,1", "2,4", ""] {
                if rw.is_empty() {
                    std::env::remove_var("PSHARD_MOE_RW");
                } else {
                    std::env::set_var("PSHARD_MOE_RW", rw);
                }
                let g = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, || {
                    for rt in &routes {
                        c.gpu.kernels.moe_gemv(
                            ty, w.ptr, rows, cols, x.ptr, cols, x_div, rt.ptr, n_used, n_pairs,
                            y.ptr, rows, &s,
                        )?;
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
                let reps = 20;
                a.record(&s).unwrap();
                for _ in 0..reps {
                    g.launch(&s).unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                let ms = a.elapsed_ms(&b).unwrap() as f64 / reps as f64;
                let label = if rw.is_empty() { "auto" } else { rw };
                row += &format!(
                    "  [{label}] {:.1} us {:.0} GB/s",
                    ms * 1e3 / calls as f64,
                    bytes as f64 / ms / 1e6
                );
            }
            std::env::remove_var("PSHARD_MOE_RW");
            // Reference: the dense int8 GEMV over n_used experts' rows (contiguous) per token.
            let gref = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, || {
                for i in 0..calls {
                    let wp = w.ptr + ((i * n_used) % (n_expert - n_used) * eb) as u64;
                    c.gpu.kernels.gemv(
                        ty,
                        wp,
                        n_used * rows,
                        cols,
                        x.ptr,
                        cols,
                        y.ptr,
                        n_used * rows,
                        tokens,
                        None,
                        &s,
                    )?;
                }
                Ok(())
            })
            .unwrap();
            gref.launch(&s).unwrap();
            c.sync();
            let (a, b) = (
                c.gpu.dev.event(true).unwrap(),
                c.gpu.dev.event(true).unwrap(),
            );
            a.record(&s).unwrap();
            for _ in 0..20 {
                gref.launch(&s).unwrap();
            }
            b.record(&s).unwrap();
            b.synchronize().unwrap();
            let ms = a.elapsed_ms(&b).unwrap() as f64 / 20.0;
            row += &format!(
                "  | dense gemv {:.1} us {:.0} GB/s",
                ms * 1e3 / calls as f64,
                (calls * n_used * eb) as f64 / ms / 1e6
            );
            lines.push(row);
            c.free(&routes);
        }
        c.free(&[w]);
    }
    c.free(&[x, y]);
    print_bench(&lines);
}

/// Float experts (F16, BF16, F32) keep the f32 MoE GEMV: against an f64 reference on the same
/// (f16/bf16-exact) weights with unquantized activations.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_gemv_float_matches_reference() {
    let Some(c) = ctx("cuda_moe_gemv_float_matches_reference") else {
        return;
    };
    let mut r = rng("cuda_moe_gemv_float");
    let s = c.gpu.stream().clone();
    let (n_expert, rows, cols) = (4usize, 29usize, 256usize);
    for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
        let (bytes, wf) = make_weights(&mut r, ty, n_expert * rows, cols);
        let wd = c.up_bytes(&bytes);
        for &(n_pairs, n_used, x_div) in &[(1usize, 1usize, 1usize), (12, 4, 4), (10, 3, 1)] {
            let ids: Vec<u32> = (0..n_pairs)
                .map(|_| r.gen_range(0..n_expert as u32))
                .collect();
            let x = randv(&mut r, ((n_pairs - 1) / x_div + 1) * cols, 1.0);
            let route = c.up_bytes(&route_bytes(&ids, n_used, &mut r));
            let xd = c.up_f32(&x);
            let yd = c.poisoned(n_pairs * rows * 4);
            c.gpu
                .kernels
                .moe_gemv(
                    ty, wd.ptr, rows, cols, xd.ptr, cols, x_div, route.ptr, n_used, n_pairs,
                    yd.ptr, rows, &s,
                )
                .unwrap();
            c.sync();
            let mut want = vec![0f64; n_pairs * rows];
            for (p, &e) in ids.iter().enumerate() {
                let xr = &x[p / x_div * cols..][..cols];
                for (j, o) in want[p * rows..][..rows].iter_mut().enumerate() {
                    let wr = &wf[(e as usize * rows + j) * cols..][..cols];
                    *o = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                }
            }
            let err = rel_l2(&c.down_f32(yd.ptr, n_pairs * rows), &want);
            assert!(err < 1e-5, "{ty:?} pairs={n_pairs}: rel L2 {err}");
            c.free(&[route, xd, yd]);
        }
        c.free(&[wd]);
    }
}

/// Exclusive prefix sums of the 64-row token tiles of buckets with `offsets` (as `moe_sort`
/// writes them into `tiles`).
fn ref_moe_tiles(offsets: &[i32]) -> Vec<i32> {
    let mut t = vec![0i32];
    for w in offsets.windows(2) {
        let c = w[1] - w[0];
        t.push(t.last().unwrap() + (c + MOE_GEMM_BN as i32 - 1) / MOE_GEMM_BN as i32);
    }
    t
}

/// CPU reference of `moe_sort`: the bucket of each pair (ids >= n_expert: bucket n_expert) and
/// the exclusive prefix sums of the bucket counts (`n_expert + 2` values).
fn ref_moe_offsets(ids: &[u32], n_expert: usize) -> (Vec<usize>, Vec<i32>) {
    let buckets: Vec<usize> = ids.iter().map(|&e| (e as usize).min(n_expert)).collect();
    let mut offs = vec![0i32; n_expert + 2];
    for &b in &buckets {
        offs[b + 1] += 1;
    }
    for i in 1..offs.len() {
        offs[i] += offs[i - 1];
    }
    (buckets, offs)
}

/// `moe_sort` against a CPU counting sort: offsets and tile offsets exact, `order` a permutation
/// of the pairs with
/// every pair inside its expert's range; few and many experts (1024: more buckets than threads),
/// unused experts, 1..32768 pairs, and ids >= n_expert collected in the extra last bucket.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_sort_groups_pairs_by_expert() {
    let Some(c) = ctx("cuda_moe_sort_groups_pairs_by_expert") else {
        return;
    };
    let mut r = rng("cuda_moe_sort");
    let s = c.gpu.stream().clone();
    for &(n_tokens, n_used, n_expert, invalid) in &[
        (1usize, 1usize, 1usize, false),
        (7, 4, 16, false),
        (300, 8, 128, false),
        (300, 8, 128, true),
        (4096, 8, 128, false),
        (1000, 6, 1024, true),
        (33, 2, 5, true),
    ] {
        let n_pairs = n_tokens * n_used;
        // Skewed routes: a few experts take most pairs, some get none.
        let ids: Vec<u32> = (0..n_pairs)
            .map(|_| {
                if invalid && r.gen_range(0..50) == 0 {
                    [n_expert as u32, n_expert as u32 + 7, u32::MAX][r.gen_range(0..3)]
                } else if r.gen_bool(0.5) {
                    r.gen_range(0..n_expert.div_ceil(4) as u32)
                } else {
                    r.gen_range(0..n_expert as u32)
                }
            })
            .collect();
        let route = c.up_bytes(&route_bytes(&ids, n_used, &mut r));
        let offs = c.poisoned((n_expert + 2) * 4);
        let tiles = c.poisoned((n_expert + 2) * 4);
        let order = c.poisoned(n_pairs * 4);
        c.gpu
            .kernels
            .moe_sort(
                route.ptr, n_tokens, n_used, n_expert, offs.ptr, tiles.ptr, order.ptr, &s,
            )
            .unwrap();
        c.sync();
        let (buckets, want) = ref_moe_offsets(&ids, n_expert);
        let got: Vec<i32> = c
            .down_bytes(offs.ptr, (n_expert + 2) * 4)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let case = format!("{n_tokens} tokens × {n_used} of {n_expert} experts");
        assert_eq!(got, want, "{case}: offsets");
        let got_tiles: Vec<i32> = c
            .down_bytes(tiles.ptr, (n_expert + 2) * 4)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got_tiles, ref_moe_tiles(&want), "{case}: tiles");
        let ord: Vec<i32> = c
            .down_bytes(order.ptr, n_pairs * 4)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut seen = vec![false; n_pairs];
        for b in 0..=n_expert {
            for &p in &ord[want[b] as usize..want[b + 1] as usize] {
                assert!(
                    p >= 0 && (p as usize) < n_pairs,
                    "{case}: pair {p} out of range"
                );
                let p = p as usize;
                assert!(!seen[p], "{case}: pair {p} twice");
                seen[p] = true;
                assert_eq!(buckets[p], b, "{case}: pair {p} in bucket {b}");
            }
        }
        assert!(
            seen.iter().all(|&v| v),
            "{case}: order is not a permutation"
        );
        c.free(&[route, offs, tiles, order]);
    }
}

/// The grouped expert GEMM of every weight type against f64 dot products of the CPU engine's
/// dequantized weights with the (f16) activations. Odd shapes: 77 and 200 output rows (not
/// multiples of the 64/128-row tiles), K of one block, K with a partial last 256-column tile
/// (QK 32 types: 288; float types: 280, whose last tile is not a multiple of 16 columns), and
/// 768 (three tiles). Experts with 0, 1, 3, 70 and 300 rows (more than a 64-token tile), both
/// tile variants, a grid with fewer tile slots than tiles (`n_pairs` of 1: the blocks loop over
/// the tile list), the scattered output (`y_rows`), and invalid-id rows set to NaN. Tolerance: rel L2 <= 1e-3 (the weights are rounded
/// to f16 in the kernel, accumulation is f32).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_gemm_matches_cpu() {
    let Some(c) = ctx("cuda_moe_gemm_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_moe_gemm");
    let s = c.gpu.stream().clone();
    let n_expert = 6usize;
    // Rows per expert (bucket n_expert: invalid ids).
    let counts = [0usize, 1, 70, 3, 0, 300, 2];
    let mut offs = vec![0i32];
    for &n in &counts {
        offs.push(offs.last().unwrap() + n as i32);
    }
    let n_rows = *offs.last().unwrap() as usize;
    let expert_of = |i: usize| (0..=n_expert).find(|&e| (i as i32) < offs[e + 1]).unwrap();
    let od = c.up_i32(&offs);
    let td = c.up_i32(&ref_moe_tiles(&offs));
    let types = [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_K,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ];
    let mut variant = 0usize;
    for ty in types {
        let qk = type_geom(ty).unwrap().qk;
        let cols_list: Vec<usize> = match qk {
            256 => vec![256, 768],
            32 => vec![32, 288],
            _ => vec![8, 280],
        };
        for cols in cols_list {
            let rows = if cols >= 512 { 200 } else { 77 };
            let (wb, wf) = make_weights(&mut r, ty, n_expert * rows, cols);
            let wd = c.up_bytes(&wb);
            let x: Vec<f16> = (0..n_rows * cols)
                .map(|_| f16::from_f32(r.gen_range(-1.0f32..1.0)))
                .collect();
            let xd = c.up_bytes(&x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
            // Scatter target: a random permutation of the rows.
            let mut perm: Vec<i32> = (0..n_rows as i32).collect();
            for i in (1..n_rows).rev() {
                perm.swap(i, r.gen_range(0..=i));
            }
            let pd = c.up_i32(&perm);
            let mut want = vec![0f64; n_rows * rows];
            for i in 0..n_rows {
                let e = expert_of(i);
                if e == n_expert {
                    continue;
                }
                let xr = &x[i * cols..][..cols];
                for (j, o) in want[i * rows..][..rows].iter_mut().enumerate() {
                    let wr = &wf[(e * rows + j) * cols..][..cols];
                    *o = wr.iter().zip(xr).map(|(&a, b)| a as f64 * b.to_f64()).sum();
                }
            }
            for scatter in [false, true] {
                // Both tile variants in turn, with a grid for all rows and one of the fewest slots.
                let tile = ["64x64", "128x64"][variant % 2];
                let n_pairs_hint = if (variant / 2).is_multiple_of(2) {
                    n_rows
                } else {
                    1
                };
                variant += 1;
                std::env::set_var("PSHARD_MOE_GEMM_TILE", tile);
                let ldy = rows + 3;
                let yd = c.poisoned(n_rows * ldy * 4);
                c.gpu
                    .kernels
                    .moe_gemm(
                        ty,
                        wd.ptr,
                        rows,
                        cols,
                        n_expert,
                        xd.ptr,
                        od.ptr,
                        td.ptr,
                        n_pairs_hint,
                        yd.ptr,
                        ldy,
                        scatter.then_some(pd.ptr),
                        &s,
                    )
                    .unwrap();
                c.sync();
                std::env::remove_var("PSHARD_MOE_GEMM_TILE");
                let y = c.down_f32(yd.ptr, n_rows * ldy);
                let case = format!(
                    "{ty:?} {rows}x{cols} tile {tile} pairs {n_pairs_hint} scatter {scatter}"
                );
                let (mut got, mut want_v) = (Vec::new(), Vec::new());
                for i in 0..n_rows {
                    let dst = if scatter { perm[i] as usize } else { i };
                    let yr = &y[dst * ldy..][..rows];
                    if expert_of(i) == n_expert {
                        assert!(
                            yr.iter().all(|v| v.is_nan()),
                            "{case}: invalid-id row {i} not NaN"
                        );
                        continue;
                    }
                    got.extend_from_slice(yr);
                    want_v.extend_from_slice(&want[i * rows..][..rows]);
                }
                let err = rel_l2(&got, &want_v);
                eprintln!("{case}: rel L2 {err:.2e}");
                assert!(err <= 1e-3, "{case}: rel L2 {err}");
                // Per expert too, so a wrong small expert is not hidden by the large ones.
                for e in 0..n_expert {
                    let (a, b) = (offs[e] as usize * rows, offs[e + 1] as usize * rows);
                    if a < b {
                        let err = rel_l2(&got[a..b], &want_v[a..b]);
                        assert!(err <= 1e-3, "{case}: expert {e} rel L2 {err}");
                    }
                }
                c.free(&[yd]);
            }
            c.free(&[wd, xd, pd]);
        }
    }
    // Bad shapes are errors, not faults.
    let k = &c.gpu.kernels;
    assert!(matches!(
        k.moe_gemm(GgmlType::Q4_K, 0, 8, 100, 4, 0, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_gemm(GgmlType::Q8_0, 0, 8, 32, 4, 8, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_gemm(GgmlType::Q8_0, 0, 8, 32, 0, 0, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_gemm(GgmlType::Q4_K, 8, 8, 256, 4, 0, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_sort(0, 4, 2, 2000, 0, 0, 0, &s),
        Err(CudaError::Invalid(_))
    ));
    c.free(&[od, td]);
}

/// Benchmark (ignored; `--ignored cuda_bench_moe_gemm`): the grouped expert GEMM on
/// qwen3-30b-a3b's experts (128 of 768 × 2048 gate/up, 2048 × 768 down, 8 per token) for 512 and
/// 4096 tokens of uniform random routes, each tile variant: time per launch (CUDA events, median
/// of 3 runs of 10), TFLOP/s (2 · pairs · rows · cols) and the weight bytes read per second.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_moe_gemm() {
    let Some(c) = ctx("cuda_bench_moe_gemm") else {
        return;
    };
    let mut r = rng("cuda_bench_moe_gemm");
    let s = c.gpu.stream().clone();
    let (n_expert, d, ff, n_used) = (128usize, 2048usize, 768usize, 8usize);
    let mut lines = Vec::new();
    for tokens in [512usize, 4096] {
        let n_pairs = tokens * n_used;
        let mut ids = Vec::new();
        for _ in 0..tokens {
            let mut pick: Vec<u32> = (0..n_expert as u32).collect();
            for k in 0..n_used {
                let j = r.gen_range(k..n_expert);
                pick.swap(k, j);
            }
            ids.extend_from_slice(&pick[..n_used]);
        }
        let route = c.up_bytes(&route_bytes(&ids, n_used, &mut r));
        let offs = c.alloc((n_expert + 2) * 4);
        let tiles = c.alloc((n_expert + 2) * 4);
        let order = c.alloc(n_pairs * 4);
        let x16 = c.alloc(n_pairs * d * 2);
        c.gpu
            .dev
            .memset(&s, x16.ptr, 0x3c, n_pairs * d * 2)
            .unwrap();
        let y = c.alloc(n_pairs * d * 4);
        let time = |f: &dyn Fn() -> Result<(), CudaError>| -> f64 {
            f().unwrap();
            c.sync();
            let mut runs = Vec::new();
            for _ in 0..3 {
                let (a, b) = (
                    c.gpu.dev.event(true).unwrap(),
                    c.gpu.dev.event(true).unwrap(),
                );
                a.record(&s).unwrap();
                for _ in 0..10 {
                    f().unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                runs.push(a.elapsed_ms(&b).unwrap() as f64 / 10.0);
            }
            runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
            runs[1]
        };
        let k = &c.gpu.kernels;
        let ms = time(&|| {
            k.moe_sort(
                route.ptr, tokens, n_used, n_expert, offs.ptr, tiles.ptr, order.ptr, &s,
            )
        });
        lines.push(format!("tokens={tokens}: moe_sort {:.1} us", ms * 1e3));
        for (ty, rows, cols, what) in [
            (GgmlType::Q4_K, ff, d, "gate/up"),
            (GgmlType::Q4_K, d, ff, "down"),
            (GgmlType::Q6_K, d, ff, "down"),
            (GgmlType::Q8_0, ff, d, "gate/up"),
        ] {
            let w = c.up_bytes(&random_blocks(&mut r, ty, n_expert * rows, cols));
            let wbytes = n_expert * rows * row_bytes(ty, cols).unwrap();
            let mut row = format!("tokens={tokens} {ty:?} {what} {rows}x{cols}:");
            for tile in ["64x64", "128x64", ""] {
                if tile.is_empty() {
                    std::env::remove_var("PSHARD_MOE_GEMM_TILE");
                } else {
                    std::env::set_var("PSHARD_MOE_GEMM_TILE", tile);
                }
                let ms = time(&|| {
                    k.moe_gemm(
                        ty, w.ptr, rows, cols, n_expert, x16.ptr, offs.ptr, tiles.ptr, n_pairs,
                        y.ptr, rows, None, &s,
                    )
                });
                let flop = 2.0 * (n_pairs * rows * cols) as f64;
                row += &format!(
                    "  [{}] {:.1} us {:.0} TFLOP/s {:.0} GB/s",
                    if tile.is_empty() { "auto" } else { tile },
                    ms * 1e3,
                    flop / ms / 1e9,
                    wbytes as f64 / ms / 1e6
                );
            }
            std::env::remove_var("PSHARD_MOE_GEMM_TILE");
            lines.push(row);
            c.free(&[w]);
        }
        c.free(&[route, offs, tiles, order, x16, y]);
    }
    print_bench(&lines);
}
