//! Attention (prefill, decode, split-KV, latent; f16 and Q8_0 caches) against an f64 reference.

use super::*;

/// f64 attention reference of `rows` over f16-rounded K/V: query t at position pos[t] sees cache
/// slots j <= pos[t] (and pos[t] - j < window); `sinks` join each head's softmax denominator; with
/// `p.v_in_k` the values are the first `dv` of each K row (`vc` unused).
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    p: &AttnParams,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos: &[i32],
    rows: &[usize],
    sinks: Option<&[f32]>,
) -> Vec<f64> {
    let grp = p.n_head / p.n_kv;
    let mut out = Vec::new();
    for &t in rows {
        for h in 0..p.n_head {
            let kvh = h / grp;
            let qv = &q[(t * p.n_head + h) * p.dk..][..p.dk];
            let pt = pos[t] as usize;
            let lo = if p.window > 0 {
                (pt + 1).saturating_sub(p.window)
            } else {
                0
            };
            let mut scores = Vec::new();
            for j in lo..=pt {
                let kv = &kc[(j * p.n_kv + kvh) * p.dk..][..p.dk];
                let mut s: f64 = qv
                    .iter()
                    .zip(kv)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * p.scale as f64;
                if p.softcap > 0.0 {
                    s = p.softcap as f64 * (s / p.softcap as f64).tanh();
                }
                scores.push(s);
            }
            let sink = sinks.map(|s| s[h] as f64);
            let mx = scores
                .iter()
                .cloned()
                .chain(sink)
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - mx).exp());
            for d in 0..p.dv {
                let mut acc = 0.0;
                for (i, j) in (lo..=pt).enumerate() {
                    let v = if p.v_in_k {
                        kc[j * p.dk + d]
                    } else {
                        vc[(j * p.n_kv + kvh) * p.dv + d]
                    };
                    acc += e[i] * v as f64;
                }
                out.push(acc / sum);
            }
        }
    }
    out
}

/// Writes the cells any query can see (positions from the first query's window start to
/// start+n) with kv_write over a cache of NaNs, then runs `n` queries at positions
/// start..start+n and checks every `stride`th row and the last: a kernel that lets an invisible
/// cell's value into a sum (0 · NaN) fails. (A cache staged from the host holds only the visible
/// cells.)
fn run_attention_case(
    c: &Ctx,
    r: &mut StdRng,
    p: AttnParams,
    start: usize,
    n: usize,
    stride: usize,
    tol: f64,
) {
    run_attention_sinks(c, r, p, None, start, n, stride, tol)
}

/// [`run_attention_case`] with per-head sinks.
#[allow(clippy::too_many_arguments)]
fn run_attention_sinks(
    c: &Ctx,
    r: &mut StdRng,
    p: AttnParams,
    sinks: Option<&[f32]>,
    start: usize,
    n: usize,
    stride: usize,
    tol: f64,
) {
    run_attention_typed(c, r, p, KvType::F16, sinks, start, n, stride, tol)
}

/// Rows of `cells · row` values as the cache of type `ty` holds them: stored and read back.
fn as_cached(ty: KvType, x: &[f32], row: usize) -> (Vec<u8>, Vec<f32>) {
    let rb = ty.row_bytes(row);
    let mut bytes = vec![0u8; x.len() / row * rb];
    let mut back = vec![0f32; x.len()];
    for ((xr, br), yr) in x
        .chunks(row)
        .zip(bytes.chunks_mut(rb))
        .zip(back.chunks_mut(row))
    {
        ty.store(xr, br);
        ty.load(br, yr);
    }
    (bytes, back)
}

/// [`run_attention_sinks`] over a cache of type `ty`. For Q8_0 the cells `kv_write` quantized on
/// the device must be the CPU's Q8_0 rows byte for byte, and the reference reads the values those
/// rows hold.
#[allow(clippy::too_many_arguments)]
fn run_attention_typed(
    c: &Ctx,
    r: &mut StdRng,
    p: AttnParams,
    ty: KvType,
    sinks: Option<&[f32]>,
    start: usize,
    n: usize,
    stride: usize,
    tol: f64,
) {
    let n_fill = start + n;
    let kf = randv(r, n_fill * p.n_kv * p.dk, 1.0);
    let vf = randv(r, n_fill * p.n_kv * p.dv, 1.0);
    let q = randv(r, n * p.n_head * p.dk, 1.0);
    // The reference uses the values as the cache holds them.
    let (kbytes, k16) = as_cached(ty, &kf, p.n_kv * p.dk);
    let (vbytes, v16) = as_cached(ty, &vf, p.n_kv * p.dv);
    let s = c.gpu.stream().clone();
    let (krb, vrb) = (ty.row_bytes(p.n_kv * p.dk), ty.row_bytes(p.n_kv * p.dv));
    let kcache = c.poisoned(p.n_ctx * krb);
    let vcache = c.poisoned((p.n_ctx * vrb).max(4));
    let lo = if p.window > 0 {
        (start + 1).saturating_sub(p.window)
    } else {
        0
    };
    let (kd, vd) = (
        c.up_f32(&kf[lo * p.n_kv * p.dk..]),
        c.up_f32(&vf[lo * p.n_kv * p.dv..]),
    );
    let fill_pos: Vec<i32> = (lo as i32..n_fill as i32).collect();
    let n_fill = n_fill - lo;
    let fpd = c.up_i32(&fill_pos);
    c.gpu
        .kernels
        .kv_write(
            ty,
            kd.ptr,
            p.n_kv * p.dk,
            kcache.ptr,
            p.n_kv * p.dk,
            fpd.ptr,
            c.gpu.kernels.zero_seqs(n_fill).unwrap(),
            p.n_ctx,
            n_fill,
            &s,
        )
        .unwrap();
    c.gpu
        .kernels
        .kv_write(
            ty,
            vd.ptr,
            p.n_kv * p.dv,
            vcache.ptr,
            p.n_kv * p.dv,
            fpd.ptr,
            c.gpu.kernels.zero_seqs(n_fill).unwrap(),
            p.n_ctx,
            n_fill,
            &s,
        )
        .unwrap();
    if ty == KvType::Q8_0 && lo + n_fill <= p.n_ctx {
        // The written cells (positions lo.. of a cache that does not wrap) against the CPU's rows.
        c.sync();
        let got = c.down_bytes(kcache.ptr + (lo * krb) as u64, n_fill * krb);
        assert!(
            got == kbytes[lo * krb..],
            "kv_write Q8_0 K rows differ from the CPU's"
        );
        let got = c.down_bytes(vcache.ptr + (lo * vrb) as u64, n_fill * vrb);
        assert!(
            got == vbytes[lo * vrb..],
            "kv_write Q8_0 V rows differ from the CPU's"
        );
    }
    let pos: Vec<i32> = (start as i32..(start + n) as i32).collect();
    let (qd, pd) = (c.up_f32(&q), c.up_i32(&pos));
    let out = c.poisoned(n * p.n_head * p.dv * 4);
    let part = c.alloc(pshard_kernels::cuda::kernels::attention_scratch(&p, n).max(4));
    let sd = sinks.map(|v| c.up_f32(v));
    c.gpu
        .kernels
        .attention(
            &p,
            qd.ptr,
            p.n_head * p.dk,
            KvCells {
                ty,
                k: kcache.ptr,
                v: vcache.ptr,
                seq: c.gpu.kernels.zero_seqs(n).unwrap(),
                base: 0,
            },
            pd.ptr,
            n,
            out.ptr,
            p.n_head * p.dv,
            part.ptr,
            sd.as_ref().map(|b| b.ptr),
            &s,
        )
        .unwrap();
    c.sync();
    let got = c.down_f32(out.ptr, n * p.n_head * p.dv);
    let rows: Vec<usize> = (0..n).filter(|t| t % stride == 0 || *t == n - 1).collect();
    let want = ref_attention(&p, &q, &k16, &v16, &pos, &rows, sinks);
    let got_rows: Vec<f32> = rows
        .iter()
        .flat_map(|&t| got[t * p.n_head * p.dv..(t + 1) * p.n_head * p.dv].to_vec())
        .collect();
    let err = rel_l2(&got_rows, &want);
    eprintln!("attention {ty:?} {p:?} start {start} n {n}: rel L2 {err:.2e}");
    assert!(
        err < tol,
        "attention {ty:?} {p:?} start {start} n {n}: rel L2 {err}"
    );
    assert!(
        got.iter().all(|v| v.is_finite()),
        "unwritten or non-finite attention output"
    );
    c.free(&[kcache, vcache, kd, vd, fpd, qd, pd, out, part]);
    if let Some(b) = sd {
        c.free(&[b]);
    }
}

/// Attention over a Q8_0 KV cache: `kv_write` quantizes rows as the CPU does (checked byte for
/// byte), and the flash (64/128/256), split-KV (windows, soft-cap, sinks, GQA, many splits) and
/// latent kernels read them as the values the CPU reads back (staged as f16, so the f16 cache's
/// tolerances).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_attention_q8_0_kv_matches_cpu() {
    let Some(c) = ctx("cuda_attention_q8_0_kv_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_attention_q8_0");
    let base = |n_head, n_kv, d, n_ctx| AttnParams {
        n_head,
        n_kv,
        dk: d,
        dv: d,
        n_ctx,
        scale: 1.0 / (d as f32).sqrt(),
        softcap: 0.0,
        window: 0,
        v_in_k: false,
    };
    let q8 = KvType::Q8_0;
    let sinks: Vec<f32> = (0..8).map(|h| h as f32 * 0.7 - 2.0).collect();
    let gpt_oss = AttnParams {
        window: 128,
        ..base(8, 2, 64, 1024)
    };
    run_attention_typed(&c, &mut r, gpt_oss, q8, Some(&sinks), 100, 200, 1, 5e-3);
    run_attention_typed(&c, &mut r, gpt_oss, q8, Some(&sinks), 900, 1, 1, 1e-3);
    let mla = |n_head| AttnParams {
        dk: 576,
        dv: 512,
        v_in_k: true,
        scale: 0.07,
        ..base(n_head, 1, 576, 2048)
    };
    run_attention_typed(&c, &mut r, mla(16), q8, None, 1500, 1, 1, 1e-3);
    run_attention_typed(&c, &mut r, mla(20), q8, None, 63, 3, 1, 1e-3);
    run_attention_typed(&c, &mut r, mla(16), q8, None, 0, 300, 7, 1e-3);
    for d in [64, 128, 256] {
        run_attention_typed(&c, &mut r, base(8, 2, d, 512), q8, None, 0, 100, 1, 5e-3);
        run_attention_typed(&c, &mut r, base(8, 2, d, 4096), q8, None, 3000, 1, 1, 1e-3);
    }
    let windowed = AttnParams {
        window: 700,
        softcap: 30.0,
        ..base(8, 4, 64, 4096)
    };
    run_attention_typed(&c, &mut r, windowed, q8, None, 2000, 2, 1, 1e-3);
    run_attention_typed(&c, &mut r, windowed, q8, None, 2000, 100, 1, 5e-3);
    run_attention_typed(
        &c,
        &mut r,
        base(32, 8, 128, 16384),
        q8,
        None,
        12000,
        1,
        1,
        1e-3,
    );
    // dk != dv (split-KV only).
    run_attention_typed(
        &c,
        &mut r,
        AttnParams {
            dk: 96,
            dv: 64,
            ..base(6, 2, 96, 1024)
        },
        q8,
        None,
        300,
        3,
        1,
        1e-3,
    );
    // A head dim that is not whole blocks is refused by name.
    let e = c
        .gpu
        .kernels
        .kv_write(q8, 0, 40, 0, 40, 0, 0, 16, 1, c.gpu.stream())
        .unwrap_err()
        .to_string();
    assert!(e.contains("KV row is 40"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_attention_prefill_and_decode_match_cpu() {
    let Some(c) = ctx("cuda_attention_prefill_and_decode_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_attention");
    let base = |n_head, n_kv, d, n_ctx| AttnParams {
        n_head,
        n_kv,
        dk: d,
        dv: d,
        n_ctx,
        scale: 1.0 / (d as f32).sqrt(),
        softcap: 0.0,
        window: 0,
        v_in_k: false,
    };
    // Sinks (gpt-oss: head dim 64, windows of 128): flash prefill and split-KV decode.
    let sinks: Vec<f32> = (0..8).map(|h| h as f32 * 0.7 - 2.0).collect();
    let gpt_oss = AttnParams {
        window: 128,
        ..base(8, 2, 64, 1024)
    };
    run_attention_sinks(&c, &mut r, gpt_oss, Some(&sinks), 100, 200, 1, 5e-3);
    run_attention_sinks(&c, &mut r, gpt_oss, Some(&sinks), 900, 1, 1, 1e-4);
    run_attention_sinks(
        &c,
        &mut r,
        base(8, 2, 64, 1024),
        Some(&sinks),
        500,
        3,
        1,
        1e-4,
    );
    // Latent attention (deepseek2: 576-wide keys, values their first 512, one KV head): decode,
    // a few rows, a prefill chunk, 16 and 20 heads (a partial head group).
    let mla = |n_head| AttnParams {
        dk: 576,
        dv: 512,
        v_in_k: true,
        scale: 0.07,
        ..base(n_head, 1, 576, 2048)
    };
    run_attention_case(&c, &mut r, mla(16), 1500, 1, 1, 1e-4);
    run_attention_case(&c, &mut r, mla(20), 63, 3, 1, 1e-4);
    run_attention_case(&c, &mut r, mla(16), 0, 300, 7, 1e-4);
    // Flash (tensor-core) prefill: P and Q rounded to f16 inside, so 5e-3. Split-KV: f32, 1e-4.
    run_attention_case(&c, &mut r, base(8, 2, 128, 512), 0, 100, 1, 5e-3);
    run_attention_case(&c, &mut r, base(4, 4, 64, 512), 37, 130, 1, 5e-3);
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            window: 37,
            softcap: 30.0,
            ..base(6, 3, 64, 512)
        },
        20,
        150,
        1,
        5e-3,
    );
    run_attention_case(&c, &mut r, base(4, 1, 256, 300), 0, 77, 1, 5e-3);
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            window: 64,
            ..base(4, 1, 256, 300)
        },
        5,
        200,
        1,
        5e-3,
    );
    // Decode (split-KV): single rows and a few rows deep in the cache, GQA, odd head dim.
    run_attention_case(&c, &mut r, base(8, 2, 128, 4608), 4000, 1, 1, 1e-4);
    run_attention_case(&c, &mut r, base(8, 8, 64, 1024), 700, 3, 1, 1e-4);
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            dk: 96,
            dv: 96,
            ..base(4, 2, 96, 1024)
        },
        100,
        7,
        1,
        1e-4,
    );
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            window: 512,
            softcap: 50.0,
            ..base(4, 1, 256, 2048)
        },
        1500,
        1,
        1,
        1e-4,
    );
    // Split-KV edges: the device cuts the visible keys into 64-key tiles per split, so contexts
    // of 1, 63, 64, 65 keys (one partial/full tile, one key into the next) and 1000 keys in a
    // large cache (most splits empty, skipped by attn_combine) must all be exact.
    for ctx_len in [1usize, 63, 64, 65, 1000] {
        run_attention_case(&c, &mut r, base(8, 2, 128, 4096), ctx_len - 1, 1, 1, 1e-4);
    }
    // Four decode rows at once (a graph-captured batch): 127 to 130 keys.
    run_attention_case(&c, &mut r, base(32, 8, 128, 2048), 126, 4, 1, 1e-4);
    // Several tiles per split (32 heads: 32 splits, 12001 keys → 384-key splits), GQA 4:1.
    run_attention_case(&c, &mut r, base(32, 8, 128, 16384), 12000, 1, 1, 1e-4);
    // Sliding windows: window inside one tile, window across tiles and splits, window larger
    // than the context, with soft-capping; decode rows (split-KV) and a prefill batch (flash,
    // whose first key tile starts below the window).
    for (window, start) in [(40usize, 300usize), (700, 2000), (5000, 900)] {
        for n in [2, 100] {
            run_attention_case(
                &c,
                &mut r,
                AttnParams {
                    window,
                    softcap: 30.0,
                    ..base(8, 4, 64, 4096)
                },
                start,
                n,
                1,
                if n > 4 { 5e-3 } else { 1e-4 },
            );
        }
    }
    // Head dims that are not multiples of 8 (4-byte copy path), dk != dv, GQA 3:1.
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            dk: 20,
            dv: 12,
            ..base(6, 2, 20, 512)
        },
        130,
        3,
        1,
        1e-4,
    );
    // Long context prefill: 4100 tokens, GQA 4:1, checking every 97th row (skipped under the
    // memory checker, PSHARD_CUDA_TINY=1, where it would take minutes).
    if std::env::var_os("PSHARD_CUDA_TINY").is_some() {
        return;
    }
    run_attention_case(&c, &mut r, base(8, 2, 128, 4160), 0, 4100, 97, 5e-3);
}
