//! Row ops against the CPU lane: get_rows, the fused q/k norm + rope, latent attention's row ops,
//! norms, rope, GLU, adds, and the context shift.

use super::*;

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_get_rows_matches_cpu() {
    let Some(c) = ctx("cuda_get_rows_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_get_rows");
    let (vocab, cols) = (50, 512);
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::F16,
        GgmlType::F32,
        GgmlType::Q5_0,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
    ] {
        let (bytes, wf) = make_weights(&mut r, ty, vocab, cols);
        let ids: Vec<i32> = (0..9).map(|_| r.gen_range(0..vocab as i32)).collect();
        let w = c.up_bytes(&bytes);
        let idd = c.up_i32(&ids);
        let out = c.poisoned(ids.len() * cols * 4);
        c.gpu
            .kernels
            .get_rows(
                ty,
                w.ptr,
                cols,
                idd.ptr,
                ids.len(),
                out.ptr,
                cols,
                1.5,
                c.gpu.stream(),
            )
            .unwrap();
        c.sync();
        let got = c.down_f32(out.ptr, ids.len() * cols);
        for (t, &id) in ids.iter().enumerate() {
            for k in 0..cols {
                let want = wf[id as usize * cols + k] * 1.5;
                assert!(
                    (got[t * cols + k] - want).abs() <= 1e-6 + want.abs() * 1e-6,
                    "{ty:?} token {t} col {k}"
                );
            }
        }
        c.free(&[w, idd, out]);
    }
}

/// The fused q/k norm + rope launch against `head_rms_norm` then `rope` on q and on k (the same
/// arithmetic, so f32 rounding level): with and without the norm, both pairing modes, partial
/// rotation and frequency factors, 41 tokens of 8 q heads and 2 k heads (GQA), head dim 128.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_qk_norm_rope_matches_separate_kernels() {
    let Some(c) = ctx("cuda_qk_norm_rope_matches_separate_kernels") else {
        return;
    };
    let mut r = rng("cuda_qk_norm_rope");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    let (n, nq, nk, hd, eps, base) = (41usize, 8usize, 2usize, 128usize, 1e-6f32, 1e6f32);
    let pos: Vec<i32> = (0..n as i32).map(|i| i * 131 + 7).collect();
    let pd = c.up_i32(&pos);
    for (mode, n_dims, ff, norm, pscale) in [
        (RopeKind::Neox, 128, false, true, 1.0f32),
        (RopeKind::Adjacent, 128, true, false, 1.0),
        (RopeKind::Neox, 64, true, true, 0.5),
    ] {
        let q = randv(&mut r, n * nq * hd, 2.0);
        let kk = randv(&mut r, n * nk * hd, 2.0);
        let (qw, kw) = (randv(&mut r, hd, 1.0), randv(&mut r, hd, 1.0));
        let f: Vec<f32> = (0..n_dims / 2).map(|_| r.gen_range(1.0f32..8.0)).collect();
        let (qwd, kwd, fd) = (c.up_f32(&qw), c.up_f32(&kw), c.up_f32(&f));
        let ffp = ff.then_some(fd.ptr);
        let (q1, k1) = (c.up_f32(&q), c.up_f32(&kk));
        if norm {
            k.head_rms_norm(q1.ptr, qwd.ptr, n, nq, hd, eps, &s)
                .unwrap();
            k.head_rms_norm(k1.ptr, kwd.ptr, n, nk, hd, eps, &s)
                .unwrap();
        }
        let yarn = if pscale < 1.0 {
            RopeYarnArg {
                low: 3.0,
                high: 20.0,
                ext: 1.0,
                mscale: 1.2,
            }
        } else {
            RopeYarnArg::NONE
        };
        let args = RopeArgs {
            head_dim: hd,
            n_dims,
            mode,
            base,
            pos_scale: pscale,
            freq_factors: ffp,
            yarn,
        };
        for (x, heads) in [(q1.ptr, nq), (k1.ptr, nk)] {
            k.rope(x, pd.ptr, n, heads, &args, &s).unwrap();
        }
        let (q2, k2) = (c.up_f32(&q), c.up_f32(&kk));
        k.qk_norm_rope(
            q2.ptr,
            k2.ptr,
            norm.then_some((qwd.ptr, kwd.ptr, eps)),
            pd.ptr,
            n,
            nq,
            nk,
            &args,
            &s,
        )
        .unwrap();
        c.sync();
        for (what, sep, fused, len, orig) in
            [("q", q1, q2, q.len(), &q), ("k", k1, k2, kk.len(), &kk)]
        {
            let want: Vec<f64> = c.down_f32(sep.ptr, len).iter().map(|&v| v as f64).collect();
            let got = c.down_f32(fused.ptr, len);
            let err = rel_l2(&got, &want);
            // The fused launch really transformed the heads (a no-op would fail here).
            let moved = rel_l2(orig, &want);
            eprintln!("qk_norm_rope {what} {mode:?} dims {n_dims} norm {norm}: rel L2 {err:.2e} (moved {moved:.2e})");
            assert!(
                err <= 1e-6 && moved > 1e-2,
                "{what} {mode:?} {n_dims} {norm}: {err} {moved}"
            );
        }
        c.free(&[qwd, kwd, fd, q1, k1, q2, k2]);
    }
    let odd = RopeArgs {
        head_dim: hd,
        n_dims: 63,
        mode: RopeKind::Neox,
        base,
        pos_scale: 1.0,
        freq_factors: None,
        yarn: RopeYarnArg::NONE,
    };
    assert!(k
        .qk_norm_rope(0, 0, None, pd.ptr, n, nq, nk, &odd, &s)
        .is_err());
    c.free(&[pd]);
}

/// Latent attention's row ops and the per-head and expert-bias helpers against the CPU lane's
/// ops: `mla_kv` (RMS-normed latent, roped key part, strided rows), `rope_heads` (query rope
/// parts moved into the wider rows, other columns untouched), `head_route`, `moe_add_bias` in
/// pair and sorted order.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_latent_attention_ops_match_cpu() {
    let Some(c) = ctx("cuda_latent_attention_ops_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_mla_ops");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    let (n, kv_lora, d, nope, heads, eps) = (9usize, 512usize, 64usize, 128usize, 5usize, 1e-6f32);
    let yarn = pshard_model::graph::RopeYarn {
        low: 3.0,
        high: 20.0,
        ext_factor: 1.0,
        mscale: 1.3,
    };
    let cpu_rope = pshard_kernels::ops::Rope {
        pairing: pshard_kernels::ops::RopePairing::Adjacent,
        n_dims: d,
        base: 10000.0,
        pos_scale: 1.0 / 40.0,
        freq_factors: None,
        yarn: Some(yarn),
    };
    let args = RopeArgs {
        head_dim: d,
        n_dims: d,
        mode: RopeKind::Adjacent,
        base: cpu_rope.base,
        pos_scale: cpu_rope.pos_scale,
        freq_factors: None,
        yarn: RopeYarnArg::of(Some(yarn)),
    };
    let pos: Vec<i32> = (0..n as i32).map(|i| i * 373 + 5).collect();
    let upos: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
    let pd = c.up_i32(&pos);

    // mla_kv: rows of kv_lora + d + 16 (a wider source, as the fused kv_a projection is), output
    // rows of kv_lora + d + 8.
    let (ldx, ldo) = (kv_lora + d + 16, kv_lora + d + 8);
    let x = randv(&mut r, n * ldx, 2.0);
    let w = randv(&mut r, kv_lora, 1.0);
    let (xd, wd, od) = (c.up_f32(&x), c.up_f32(&w), c.poisoned(n * ldo * 4));
    k.mla_kv(
        (xd.ptr, ldx),
        wd.ptr,
        (od.ptr, ldo),
        kv_lora,
        eps,
        pd.ptr,
        n,
        &args,
        &s,
    )
    .unwrap();
    c.sync();
    let got = c.down_f32(od.ptr, n * ldo);
    let mut want = vec![0f32; n * ldo];
    for t in 0..n {
        pshard_kernels::ops::rms_norm(
            &x[t * ldx..][..kv_lora],
            &w,
            &mut want[t * ldo..][..kv_lora],
            eps,
        );
    }
    pshard_kernels::ops::rope_heads(
        &x,
        (ldx, kv_lora),
        &mut want,
        (ldo, kv_lora),
        1,
        &upos,
        &cpu_rope,
    );
    let pick = |v: &[f32]| -> Vec<f32> {
        (0..n)
            .flat_map(|t| v[t * ldo..][..kv_lora + d].to_vec())
            .collect()
    };
    let want64: Vec<f64> = pick(&want).iter().map(|&v| v as f64).collect();
    let err = rel_l2(&pick(&got), &want64);
    assert!(err < 1e-4, "mla_kv: {err}");
    c.free(&[xd, wd, od]);

    // rope_heads: each head's rope part of q (nope + d wide) into out (kv_lora + d wide).
    let (qc, oc) = (heads * (nope + d), heads * (kv_lora + d));
    let q = randv(&mut r, n * qc, 2.0);
    let (qd, od) = (c.up_f32(&q), c.poisoned(n * oc * 4));
    k.rope_heads(
        (qd.ptr, qc, nope + d, nope),
        (od.ptr, oc, kv_lora + d, kv_lora),
        heads,
        pd.ptr,
        n,
        &args,
        &s,
    )
    .unwrap();
    c.sync();
    let got = c.down_f32(od.ptr, n * oc);
    let mut want = vec![f32::NAN; n * oc];
    pshard_kernels::ops::rope_heads(
        &q,
        (nope + d, nope),
        &mut want,
        (kv_lora + d, kv_lora),
        heads,
        &upos,
        &cpu_rope,
    );
    let roped = |i: usize| (i % (kv_lora + d)) >= kv_lora;
    for (i, g) in got.iter().enumerate() {
        if !roped(i % oc) {
            assert!(
                g.is_nan(),
                "rope_heads wrote column {} of row {}",
                i % oc,
                i / oc
            );
        }
    }
    let sel = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| roped(i % oc))
            .map(|(_, &x)| x)
            .collect()
    };
    let want64: Vec<f64> = sel(&want).iter().map(|&v| v as f64).collect();
    let err = rel_l2(&sel(&got), &want64);
    assert!(err < 1e-4, "rope_heads: {err}");
    c.free(&[qd, od, pd]);

    // head_route: token t's route row is the heads in order, then weights of 1.
    let route = c.poisoned(n * 2 * heads * 4);
    k.head_route(route.ptr, n, heads, &s).unwrap();
    c.sync();
    let rb = c.down_bytes(route.ptr, n * 2 * heads * 4);
    let word = |i: usize| u32::from_le_bytes(rb[4 * i..4 * i + 4].try_into().unwrap());
    for t in 0..n {
        for h in 0..heads {
            assert_eq!(word(t * 2 * heads + h), h as u32, "head route {t} {h}");
            assert_eq!(f32::from_bits(word(t * 2 * heads + heads + h)), 1.0);
        }
    }
    c.free(&[route]);

    // moe_add_bias: pair rows (row i is pair i) and sorted rows (row i is pair order[i]).
    let (n_expert, n_used, cols, ldh) = (6usize, 2usize, 300usize, 304usize);
    let pairs = n * n_used;
    let ids: Vec<u32> = (0..pairs)
        .map(|_| r.gen_range(0..n_expert as u32))
        .collect();
    let mut rw = Vec::new();
    for t in 0..n {
        rw.extend_from_slice(&ids[t * n_used..][..n_used]);
        rw.extend((0..n_used).map(|_| 0.5f32.to_bits()));
    }
    let route = c.up_bytes(&rw.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    let bias = randv(&mut r, n_expert * cols, 1.0);
    let bd = c.up_f32(&bias);
    let order: Vec<i32> = (0..pairs as i32).rev().collect();
    let ordd = c.up_i32(&order);
    for sorted in [false, true] {
        let h = randv(&mut r, pairs * ldh, 1.0);
        let hd = c.up_f32(&h);
        k.moe_add_bias(
            hd.ptr,
            ldh,
            route.ptr,
            n_used,
            sorted.then_some(ordd.ptr),
            bd.ptr,
            pairs,
            cols,
            &s,
        )
        .unwrap();
        c.sync();
        let got = c.down_f32(hd.ptr, pairs * ldh);
        for i in 0..pairs {
            let p = if sorted { order[i] as usize } else { i };
            let e = ids[p] as usize;
            for j in 0..ldh {
                let want = if j < cols {
                    h[i * ldh + j] + bias[e * cols + j]
                } else {
                    h[i * ldh + j]
                };
                assert_eq!(
                    got[i * ldh + j],
                    want,
                    "bias sorted={sorted} row {i} col {j}"
                );
            }
        }
        c.free(&[hd]);
    }
    c.free(&[route, bd, ordd]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_norms_rope_glu_add_match_cpu() {
    let Some(c) = ctx("cuda_norms_rope_glu_add_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_ops");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    // RMS norm, odd width.
    let (n, cols, eps) = (5usize, 1000usize, 1e-5f32);
    let x = randv(&mut r, n * cols, 3.0);
    let w = randv(&mut r, cols, 1.0);
    let (xd, wd, yd) = (c.up_f32(&x), c.up_f32(&w), c.poisoned(n * cols * 4));
    k.rms_norm(xd.ptr, wd.ptr, yd.ptr, n, cols, eps, &s)
        .unwrap();
    c.sync();
    let mut want = vec![0f64; n * cols];
    for t in 0..n {
        let ss: f64 = x[t * cols..(t + 1) * cols]
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum();
        let inv = 1.0 / (ss / cols as f64 + eps as f64).sqrt();
        for j in 0..cols {
            want[t * cols + j] = x[t * cols + j] as f64 * inv * w[j] as f64;
        }
    }
    assert!(
        rel_l2(&c.down_f32(yd.ptr, n * cols), &want) < 1e-6,
        "rms_norm"
    );
    c.free(&[xd, wd, yd]);

    // Head RMS norm in place.
    let (heads, hd) = (6usize, 128usize);
    let x = randv(&mut r, n * heads * hd, 2.0);
    let w = randv(&mut r, hd, 1.0);
    let (xd, wd) = (c.up_f32(&x), c.up_f32(&w));
    k.head_rms_norm(xd.ptr, wd.ptr, n, heads, hd, eps, &s)
        .unwrap();
    c.sync();
    let mut want = vec![0f64; x.len()];
    for h in 0..n * heads {
        let sl = &x[h * hd..(h + 1) * hd];
        let inv = 1.0
            / (sl.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hd as f64 + eps as f64)
                .sqrt();
        for j in 0..hd {
            want[h * hd + j] = sl[j] as f64 * inv * w[j] as f64;
        }
    }
    assert!(
        rel_l2(&c.down_f32(xd.ptr, x.len()), &want) < 1e-6,
        "head_rms_norm"
    );
    c.free(&[xd, wd]);

    // RoPE: both modes, partial rotation, freq factors, position scale, large positions, YaRN
    // (gpt-oss's factor 32: pairs 4 to 9 ramp from extrapolation to interpolation).
    let gpt_oss_yarn = RopeYarnArg {
        low: 4.0,
        high: 9.0,
        ext: 1.0,
        mscale: 1.0 + 0.1 * 32f32.ln(),
    };
    for (mode, n_dims, ff, pscale, yarn) in [
        (RopeKind::Adjacent, 64, false, 1.0f32, RopeYarnArg::NONE),
        (RopeKind::Neox, 64, true, 0.25, RopeYarnArg::NONE),
        (RopeKind::Neox, 32, false, 1.0, RopeYarnArg::NONE),
        (RopeKind::Neox, 64, false, 1.0 / 32.0, gpt_oss_yarn),
    ] {
        let (heads, hd, base) = (4usize, 64usize, 500000f32);
        let pos: Vec<i32> = (0..n as i32).map(|i| i * 977 + 3).collect();
        let x = randv(&mut r, n * heads * hd, 1.0);
        let f: Vec<f32> = (0..n_dims / 2).map(|_| r.gen_range(1.0f32..8.0)).collect();
        let (xd, pd, fd) = (c.up_f32(&x), c.up_i32(&pos), c.up_f32(&f));
        let args = RopeArgs {
            head_dim: hd,
            n_dims,
            mode,
            base,
            pos_scale: pscale,
            freq_factors: ff.then_some(fd.ptr),
            yarn,
        };
        k.rope(xd.ptr, pd.ptr, n, heads, &args, &s).unwrap();
        c.sync();
        let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (t, &pt) in pos.iter().enumerate() {
            for h in 0..heads {
                let o = (t * heads + h) * hd;
                for (i, &fi) in f.iter().enumerate() {
                    let mut inv = (base as f64).powf(-2.0 * i as f64 / n_dims as f64);
                    if ff {
                        inv /= fi as f64;
                    }
                    let ramp = ((i as f64 - yarn.low as f64)
                        / (yarn.high as f64 - yarn.low as f64).max(0.001))
                    .clamp(0.0, 1.0);
                    let mix = (1.0 - ramp) * yarn.ext as f64;
                    let factor = pscale as f64 * (1.0 - mix) + mix;
                    let th = pt as f64 * factor * inv;
                    let m = yarn.mscale as f64;
                    let (a, b) = match mode {
                        RopeKind::Adjacent => (2 * i, 2 * i + 1),
                        RopeKind::Neox => (i, i + n_dims / 2),
                    };
                    let (x0, x1) = (x[o + a] as f64, x[o + b] as f64);
                    want[o + a] = m * (x0 * th.cos() - x1 * th.sin());
                    want[o + b] = m * (x0 * th.sin() + x1 * th.cos());
                }
            }
        }
        // f32 angle arithmetic at positions up to ~4000: 1e-4.
        let err = rel_l2(&c.down_f32(xd.ptr, x.len()), &want);
        assert!(err < 1e-4, "rope {mode:?} dims {n_dims}: {err}");
        c.free(&[xd, pd, fd]);
    }

    // GLU both activations, add, softcap, scale.
    let m = 3001usize;
    let g = randv(&mut r, m, 6.0);
    let u = randv(&mut r, m, 2.0);
    let (gd, ud, od) = (c.up_f32(&g), c.up_f32(&u), c.poisoned(m * 4));
    for act in [
        Activation::Silu,
        Activation::GeluTanh,
        Activation::SwigluOai,
    ] {
        k.glu(gd.ptr, ud.ptr, od.ptr, m, act, &s).unwrap();
        c.sync();
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| {
                let (a, b) = (a as f64, b as f64);
                match act {
                    Activation::GeluTanh => {
                        0.5 * a
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (a + 0.044715 * a * a * a))
                                    .tanh())
                            * b
                    }
                    Activation::Silu => a / (1.0 + (-a).exp()) * b,
                    Activation::SwigluOai => {
                        let x = a.min(7.0);
                        x / (1.0 + (-1.702 * x).exp()) * (b.clamp(-7.0, 7.0) + 1.0)
                    }
                }
            })
            .collect();
        assert!(rel_l2(&c.down_f32(od.ptr, m), &want) < 1e-6, "glu {act:?}");
    }
    k.add(gd.ptr, ud.ptr, od.ptr, m, &s).unwrap();
    c.sync();
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect();
    assert!(rel_l2(&c.down_f32(od.ptr, m), &want) < 1e-7, "add");
    k.softcap(gd.ptr, m, 5.0, &s).unwrap();
    k.scale(gd.ptr, m, 0.5, &s).unwrap();
    c.sync();
    let want: Vec<f64> = g
        .iter()
        .map(|&a| 0.5 * 5.0 * (a as f64 / 5.0).tanh())
        .collect();
    assert!(
        rel_l2(&c.down_f32(gd.ptr, m), &want) < 1e-6,
        "softcap+scale"
    );
    c.free(&[gd, ud, od]);
}

/// The context-shift kernel against the CPU's `ops::kv_shift` on the same runs: a cycle of
/// three, a chain, a self-move (rotation in place) and a cell left alone; K rotated (NEOX with
/// frequency factors; adjacent pairs over half the head with a position scale; YaRN with a
/// magnitude, which the shift must not apply again; latent attention's one head roped after its
/// latent), V copied.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kv_shift_matches_cpu() {
    use pshard_kernels::ops::{self, ShiftRun};
    let Some(c) = ctx("cuda_kv_shift_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_kv_shift");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    let (cells, hd, heads, delta) = (12usize, 64usize, 2usize, -18i64);
    let cols = hd * heads;
    let runs = vec![
        ShiftRun {
            moves: vec![(1, 2), (0, 1), (2, 0)],
            cyclic: true,
        },
        ShiftRun {
            moves: vec![(4, 3), (5, 4)],
            cyclic: false,
        },
        ShiftRun {
            moves: vec![(7, 7)],
            cyclic: true,
        },
    ];
    let mut moves: Vec<i32> = Vec::new();
    let mut starts = vec![0i32];
    let mut cyclic = Vec::new();
    for run in &runs {
        moves.extend(run.moves.iter().flat_map(|&(a, b)| [a as i32, b as i32]));
        starts.push(moves.len() as i32 / 2);
        cyclic.push(run.cyclic as i32);
    }
    let (md, sd, cd) = (c.up_i32(&moves), c.up_i32(&starts), c.up_i32(&cyclic));
    let f: Vec<f32> = (0..hd / 2).map(|_| r.gen_range(1.0f32..8.0)).collect();
    let fd = c.up_f32(&f);
    let yarn = pshard_model::graph::RopeYarn {
        low: 3.0,
        high: 11.0,
        ext_factor: 1.0,
        mscale: 1.35,
    };
    // (pairing, head width, rotated dims, offset in the head, frequency factors, position
    // scale, YaRN).
    for (mode, head, n_dims, off, ff, pscale, y) in [
        (Some(RopeKind::Neox), hd, hd, 0, true, 1.0f32, None),
        (Some(RopeKind::Adjacent), hd, hd / 2, 0, false, 0.5, None),
        (Some(RopeKind::Neox), hd, hd, 0, false, 0.25, Some(yarn)),
        (
            Some(RopeKind::Neox),
            cols,
            32,
            cols - 32,
            false,
            0.25,
            Some(yarn),
        ),
        (None, cols, 0, 0, false, 1.0, None),
    ] {
        // Both cache types from the same values: f16 rows, and Q8_0 rows (dequantized, turned
        // and quantized afresh on both sides).
        for ty in [KvType::F16, KvType::Q8_0] {
            let x = randv(&mut r, cells * cols, 2.0);
            let rb = ty.row_bytes(cols);
            let mut bytes = vec![0u8; cells * rb];
            for (xr, br) in x.chunks(cols).zip(bytes.chunks_mut(rb)) {
                ty.store(xr, br);
            }
            let xd = c.up_bytes(&bytes);
            let args = mode.map(|m| RopeArgs {
                head_dim: head,
                n_dims,
                mode: m,
                base: 1e4,
                pos_scale: pscale,
                freq_factors: ff.then_some(fd.ptr),
                yarn: RopeYarnArg::of(y),
            });
            k.kv_shift(
                ty,
                xd.ptr,
                cols,
                (md.ptr, sd.ptr, cd.ptr, runs.len()),
                args.as_ref().map(|a| (a, off)),
                delta as f32,
                &s,
            )
            .unwrap();
            c.sync();
            let got_bytes = c.down_bytes(xd.ptr, bytes.len());
            let rows = |b: &[u8]| -> Vec<f32> {
                let mut v = vec![0f32; cells * cols];
                for (br, vr) in b.chunks(rb).zip(v.chunks_mut(cols)) {
                    ty.load(br, vr);
                }
                v
            };
            let got = rows(&got_bytes);
            let mut want = bytes.clone();
            let cpu_rope = mode.map(|m| ops::Rope {
                pairing: match m {
                    RopeKind::Adjacent => ops::RopePairing::Adjacent,
                    RopeKind::Neox => ops::RopePairing::Neox,
                },
                n_dims,
                base: 1e4,
                pos_scale: pscale,
                freq_factors: ff.then_some(&f[..]),
                yarn: y,
            });
            ops::kv_shift(
                &mut want,
                ty,
                cols,
                (head, off),
                cpu_rope.as_ref(),
                delta,
                &runs,
            );
            let want64: Vec<f64> = rows(&want).iter().map(|&v| v as f64).collect();
            let err = rel_l2(&got, &want64);
            let orig = rows(&bytes);
            let moved = rel_l2(&orig, &want64);
            eprintln!(
                "kv_shift {ty:?} {mode:?} dims {n_dims} from {off}: rel L2 {err:.2e} (moved {moved:.2e})"
            );
            // Q8_0: the two sides' rotations differ in the last bits, which may move a value to
            // the neighbouring level now and then (a step is max|x| / 127 of its block).
            let tol = match ty {
                KvType::F16 => 1e-3,
                KvType::Q8_0 => 5e-3,
            };
            assert!(
                err <= tol && moved > 1e-1,
                "{ty:?} {mode:?} {n_dims} {off}: {err} {moved}"
            );
            if mode.is_none() {
                // Moves without rope copy the rows' bytes.
                assert_eq!(got_bytes, want, "{ty:?}: V moves");
            }
            // Cell 6 is in no run: untouched.
            assert_eq!(&got_bytes[6 * rb..7 * rb], &bytes[6 * rb..7 * rb]);
            c.free(&[xd]);
        }
    }
    c.free(&[md, sd, cd, fd]);
}
