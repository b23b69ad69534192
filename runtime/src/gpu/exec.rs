//! Launches of GPU-lane steps on the compute stream: one graph node (all output columns, or the
//! GPU's part of a split matmul or column-wise op), or a fused q/k norm + rope. Every address —
//! buffers, weights (pinned or in a ring slot), KV (resident or staged), inputs, scratch — comes
//! with the step.

use pshard_kernels::cuda::kernels::row_bytes;
use pshard_kernels::cuda::kernels::RopeYarnArg;
use pshard_kernels::cuda::{AttnParams, GemmScratch, Gpu, KvCells, RopeArgs, RopeKind};
use pshard_model::graph::{BufId, Op, RopeParams};
use pshard_model::spec::RopeMode;

use crate::device::{GpuStep, GpuWork};
use crate::error::EngineError;
use crate::model::Model;

/// The kernels' form of a graph rope over heads of `head_dim`, its frequency factors (when it
/// has them) at `freq_factors` on the device.
pub(crate) fn kernel_rope(head_dim: usize, r: &RopeParams, freq_factors: Option<u64>) -> RopeArgs {
    RopeArgs {
        head_dim,
        n_dims: r.n_dims,
        mode: match r.mode {
            RopeMode::Adjacent => RopeKind::Adjacent,
            RopeMode::Neox => RopeKind::Neox,
        },
        base: r.base,
        pos_scale: r.pos_scale,
        freq_factors,
        yarn: RopeYarnArg::of(r.yarn),
    }
}

fn rope_args(step: &GpuStep<'_>, head_dim: usize, r: &RopeParams) -> Result<RopeArgs, EngineError> {
    let ff = match r.freq_factors {
        Some(f) => Some(step.weight(f)?.addr),
        None => None,
    };
    Ok(kernel_rope(head_dim, r, ff))
}

/// Enqueues `step`.
pub fn launch(gpu: &Gpu, model: &Model, step: &GpuStep<'_>) -> Result<(), EngineError> {
    match step.work {
        GpuWork::Node {
            node,
            cols,
            reuse_acts,
        } => node_op(gpu, model, step, *node, cols.clone(), *reuse_acts),
        GpuWork::QkNormRope { nodes } => qk_norm_rope(gpu, step, nodes.clone()),
    }
}

/// The q and k per-head norms (four nodes) or just the ropes (two nodes) in one launch.
fn qk_norm_rope(
    gpu: &Gpu,
    step: &GpuStep<'_>,
    nodes: std::ops::Range<usize>,
) -> Result<(), EngineError> {
    let g = step.graph;
    let ops: Vec<&Op> = nodes.clone().map(|i| step.op(i)).collect();
    let bad = || EngineError::Device(format!("nodes {nodes:?} are not a q/k norm + rope run"));
    let (norm, ropes) = match ops.as_slice() {
        [Op::HeadRmsNorm {
            weight: qn, eps, ..
        }, Op::HeadRmsNorm { weight: kn, .. }, r0, r1] => (
            Some((step.weight(*qn)?.addr, step.weight(*kn)?.addr, *eps)),
            (*r0, *r1),
        ),
        [r0, r1] => (None, (*r0, *r1)),
        _ => return Err(bad()),
    };
    let (
        Op::Rope {
            x: q,
            head_dim,
            rope,
        },
        Op::Rope { x: k, .. },
    ) = ropes
    else {
        return Err(bad());
    };
    let args = rope_args(step, *head_dim, rope)?;
    gpu.kernels.qk_norm_rope(
        step.buf(*q),
        step.buf(*k),
        norm,
        step.inputs.positions,
        g.rows(*q),
        g.buffer(*q).cols / head_dim,
        g.buffer(*k).cols / head_dim,
        &args,
        gpu.stream(),
    )?;
    Ok(())
}

/// One node; `cols` limits the output columns (a split op's GPU part).
fn node_op(
    gpu: &Gpu,
    model: &Model,
    step: &GpuStep<'_>,
    ni: usize,
    cols: Option<std::ops::Range<usize>>,
    reuse_acts: bool,
) -> Result<(), EngineError> {
    let g = step.graph;
    let k = &gpu.kernels;
    let s = gpu.stream();
    let n = g.n_tokens;
    let ncols = |b: BufId| g.buffer(b).cols;
    let op = step.op(ni);
    // Column-wise ops over a column range: one launch per row (only split decode steps do this).
    let per_row = |f: &dyn Fn(u64) -> Result<(), EngineError>, rows: usize, c: usize| {
        let r = cols.clone().unwrap_or(0..c);
        for t in 0..rows {
            f(((t * c + r.start) * 4) as u64)?;
        }
        Ok::<(), EngineError>(())
    };
    match *op {
        Op::Embed { table, out, scale } => {
            let t = model.spec.tensor(table);
            k.get_rows(
                t.ty,
                step.weight(table)?.addr,
                t.cols(),
                step.inputs.tokens,
                n,
                step.buf(out),
                ncols(out),
                scale,
                s,
            )?;
        }
        Op::RmsNorm {
            x,
            weight,
            out,
            eps,
        } => {
            k.rms_norm(
                step.buf(x),
                step.weight(weight)?.addr,
                step.buf(out),
                g.rows(x),
                ncols(x),
                eps,
                s,
            )?;
        }
        Op::HeadRmsNorm {
            x,
            weight,
            head_dim,
            eps,
        } => {
            k.head_rms_norm(
                step.buf(x),
                step.weight(weight)?.addr,
                g.rows(x),
                ncols(x) / head_dim,
                head_dim,
                eps,
                s,
            )?;
        }
        Op::MatMul {
            weight,
            x,
            out,
            bias,
        } => {
            let t = model.spec.tensor(weight);
            let wr = step.weight(weight)?;
            let r = cols.unwrap_or(0..t.rows());
            if r.start < wr.first_row || r.end > t.rows() {
                return Err(EngineError::Device(format!(
                    "rows {r:?} of {} are not on the device (from row {})",
                    t.name, wr.first_row
                )));
            }
            let rb = row_bytes(t.ty, t.cols())? as u64;
            let wp = wr.addr + (r.start - wr.first_row) as u64 * rb;
            let bp = match bias {
                Some(b) => Some(step.weight(b)?.addr + (r.start * 4) as u64),
                None => None,
            };
            let op_ptr = step.buf(out) + (r.start * 4) as u64;
            let rows = g.rows(x);
            if reuse_acts {
                let partner = pshard_kernels::quant::kernel(t.ty)
                    .map(|q| q.act)
                    .ok_or_else(|| EngineError::Unsupported(format!("type of {}", t.name)))?;
                k.gemv_prequantized(
                    t.ty,
                    k.quantized_acts(partner),
                    wp,
                    r.len(),
                    t.cols(),
                    op_ptr,
                    ncols(out),
                    rows,
                    bp,
                    s,
                )?;
            } else {
                let scratch = (step.scratch.gemm_w != 0).then_some(GemmScratch {
                    weights: step.scratch.gemm_w,
                    acts: step.scratch.gemm_x,
                });
                gpu.matmul(
                    t.ty,
                    wp,
                    t.cols(),
                    0,
                    r.len(),
                    step.buf(x),
                    rows,
                    op_ptr,
                    ncols(out),
                    bp,
                    scratch,
                    // Exact mode: quantized weights always through the f16 GEMM.
                    step.exact && t.ty.is_quantized(),
                )?;
            }
        }
        Op::Rope { x, head_dim, rope } => {
            let args = rope_args(step, head_dim, &rope)?;
            k.rope(
                step.buf(x),
                step.inputs.positions,
                n,
                ncols(x) / head_dim,
                &args,
                s,
            )?;
        }
        Op::MlaKv {
            x,
            norm,
            out,
            kv_lora,
            eps,
            rope,
        } => {
            let args = rope_args(step, rope.n_dims, &rope)?;
            k.mla_kv(
                (step.buf(x), ncols(x)),
                step.weight(norm)?.addr,
                (step.buf(out), ncols(out)),
                kv_lora,
                eps,
                step.inputs.positions,
                n,
                &args,
                s,
            )?;
        }
        Op::MlaQRope {
            q,
            out,
            n_head,
            nope,
            kv_lora,
            rope,
        } => {
            let d = rope.n_dims;
            let args = rope_args(step, d, &rope)?;
            k.rope_heads(
                (step.buf(q), ncols(q), nope + d, nope),
                (step.buf(out), ncols(out), kv_lora + d, kv_lora),
                n_head,
                step.inputs.positions,
                n,
                &args,
                s,
            )?;
        }
        Op::HeadMatMul {
            weight,
            x,
            x_stride,
            out,
            out_stride,
        } => super::moe::head_matmul(gpu, model, step, weight, (x, x_stride), (out, out_stride))?,
        Op::Attention {
            q,
            k: kb,
            v,
            out,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            window,
            scale,
            softcap,
            sinks,
            v_in_k,
            ..
        } => {
            let kv = step
                .kv
                .ok_or_else(|| EngineError::Device("attention without its KV".into()))?;
            let (kr, vr) = (n_head_kv * head_dim_k, n_head_kv * head_dim_v);
            let (pos, seqs) = (step.inputs.positions, step.inputs.seqs);
            let ty = kv.ty;
            k.kv_write(
                ty,
                step.buf(kb),
                ncols(kb),
                kv.k,
                kr,
                pos,
                seqs,
                kv.cells,
                n,
                s,
            )?;
            // Latent attention keeps no V rows: its values are inside K.
            if !v_in_k {
                k.kv_write(
                    ty,
                    step.buf(v),
                    ncols(v),
                    kv.v,
                    vr,
                    pos,
                    seqs,
                    kv.cells,
                    n,
                    s,
                )?;
            }
            let sinks = match sinks {
                Some(t) => Some(step.weight(t)?.addr),
                None => None,
            };
            let p = AttnParams {
                n_head,
                n_kv: n_head_kv,
                dk: head_dim_k,
                dv: head_dim_v,
                n_ctx: kv.cells,
                scale,
                softcap: softcap.unwrap_or(0.0),
                window: window.unwrap_or(0),
                v_in_k,
            };
            let (ldq, ldo) = (ncols(q), ncols(out));
            // The prefill kernel takes one sequence per call; a batch of several runs calls it per
            // run (the decode kernel reads each token's sequence itself).
            let runs: Vec<(u32, std::ops::Range<usize>)> = if step.seq_runs.is_empty() {
                vec![(0, 0..n)]
            } else {
                step.seq_runs.to_vec()
            };
            let single = runs.len() == 1;
            for (sq, r) in runs {
                let (a, len) = if single { (0, n) } else { (r.start, r.len()) };
                k.attention(
                    &p,
                    step.buf(q) + (a * ldq * 4) as u64,
                    ldq,
                    KvCells {
                        ty,
                        k: kv.k,
                        v: kv.v,
                        seq: seqs + (a * 4) as u64,
                        base: sq as usize * kv.cells,
                    },
                    pos + (a * 4) as u64,
                    len,
                    step.buf(out) + (a * ldo * 4) as u64,
                    ldo,
                    step.scratch.attn,
                    sinks,
                    s,
                )?;
            }
        }
        Op::Glu { gate, up, out, act } => {
            let c = ncols(out);
            match &cols {
                None => k.glu(
                    step.buf(gate),
                    step.buf(up),
                    step.buf(out),
                    g.rows(gate) * c,
                    act,
                    s,
                )?,
                Some(r) => per_row(
                    &|off| {
                        Ok(k.glu(
                            step.buf(gate) + off,
                            step.buf(up) + off,
                            step.buf(out) + off,
                            r.len(),
                            act,
                            s,
                        )?)
                    },
                    g.rows(out),
                    c,
                )?,
            }
        }
        Op::Add { a, b, out } => {
            let c = ncols(a);
            match &cols {
                None => k.add(step.buf(a), step.buf(b), step.buf(out), g.rows(a) * c, s)?,
                Some(r) => per_row(
                    &|off| {
                        Ok(k.add(
                            step.buf(a) + off,
                            step.buf(b) + off,
                            step.buf(out) + off,
                            r.len(),
                            s,
                        )?)
                    },
                    g.rows(a),
                    c,
                )?,
            }
        }
        Op::SelectRows { x, out } => {
            k.select_rows(
                step.buf(x),
                step.inputs.logit_rows,
                step.buf(out),
                g.rows(out),
                ncols(x),
                s,
            )?;
        }
        Op::MoeRoute {
            logits,
            out,
            routing,
            select_bias,
        } => {
            let bias = match select_bias {
                Some(t) => Some(step.weight(t)?.addr),
                None => None,
            };
            k.moe_route(
                step.buf(logits),
                g.rows(logits),
                &routing,
                bias,
                step.forced_route,
                step.buf(out),
                s,
            )?;
        }
        Op::MoeFfn {
            x,
            route,
            gate_exps,
            up_exps,
            down_exps,
            act,
            out,
            bias,
        } => super::moe::expert_ffn(
            gpu,
            model,
            step,
            [gate_exps, up_exps, down_exps],
            bias,
            (x, route),
            act,
            out,
        )?,
        Op::Softcap { x, cap } => {
            let c = ncols(x);
            match &cols {
                None => k.softcap(step.buf(x), g.rows(x) * c, cap, s)?,
                Some(r) => per_row(
                    &|off| Ok(k.softcap(step.buf(x) + off, r.len(), cap, s)?),
                    g.rows(x),
                    c,
                )?,
            }
        }
    }
    Ok(())
}
