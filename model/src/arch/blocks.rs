//! Building blocks shared by the architecture files: embedding, attention, FFNs, output head.
//!
//! Buffers are declared once per graph and reused by every layer (the residual stream `x`, scratch for
//! the normed input, q/k/v, attention output, FFN intermediates), so a graph's memory does not grow
//! with depth.

use super::GraphError;
use crate::graph::{Activation, BufId, GraphBuilder, Op, RopeParams, Rows};
use crate::spec::{GroupRole, TensorId, TensorRole};

/// Per-architecture switches of the shared blocks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flavor {
    /// Architecture name for errors.
    pub arch: &'static str,
    /// Per-head RMS norm of q and k before rope (qwen3, gemma3).
    pub qk_norm: bool,
    /// Norm of the attention output before the residual add (gemma3).
    pub post_attn_norm: bool,
    /// Norm of the FFN output before the residual add (gemma3).
    pub post_ffn_norm: bool,
    /// GLU activation.
    pub act: Activation,
}

/// The buffers every layer reuses.
pub(crate) struct Bufs {
    /// Residual stream.
    pub x: BufId,
    /// Normed input of a sub-block.
    pub xn: BufId,
    pub q: BufId,
    pub k: BufId,
    pub v: BufId,
    pub attn: BufId,
    /// Output of a sub-block before the residual add.
    pub proj: BufId,
    pub gate: BufId,
    pub up: BufId,
    pub hidden: BufId,
    pub router: Option<BufId>,
    pub route: Option<BufId>,
    pub shared: Option<BufId>,
}

pub(crate) fn tensor(
    b: &GraphBuilder,
    f: &Flavor,
    layer: Option<usize>,
    role: TensorRole,
) -> Result<TensorId, GraphError> {
    b.spec
        .find(layer, role)
        .ok_or_else(|| GraphError::MissingTensor {
            arch: f.arch,
            layer,
            role: format!("{role:?}"),
        })
}

/// Declares the shared buffers and emits the embedding lookup into `x`.
pub(crate) fn embed(b: &mut GraphBuilder, f: &Flavor) -> Result<Bufs, GraphError> {
    let h = b.spec.hparams.clone();
    let q_cols = h.n_head * h.head_dim_k;
    let kv_k = h.n_head_kv * h.head_dim_k;
    let kv_v = h.n_head_kv * h.head_dim_v;
    let ff = h.n_ff.max(h.n_ff_expert).max(h.n_ff_shared_expert);
    let moe = h.n_expert > 0;
    let bufs = Bufs {
        x: b.buf("x", Rows::Tokens, h.n_embd),
        xn: b.buf("xn", Rows::Tokens, h.n_embd),
        q: b.buf("q", Rows::Tokens, q_cols),
        k: b.buf("k", Rows::Tokens, kv_k),
        v: b.buf("v", Rows::Tokens, kv_v),
        attn: b.buf("attn", Rows::Tokens, h.n_head * h.head_dim_v),
        proj: b.buf("proj", Rows::Tokens, h.n_embd),
        gate: b.buf("gate", Rows::Tokens, ff),
        up: b.buf("up", Rows::Tokens, ff),
        hidden: b.buf("hidden", Rows::Tokens, ff),
        router: moe.then(|| b.buf("router", Rows::Tokens, h.n_expert)),
        route: moe.then(|| {
            b.buf_kind(
                "route",
                Rows::Tokens,
                2 * h.n_expert_used,
                crate::graph::BufKind::Route,
            )
        }),
        shared: (h.n_ff_shared_expert > 0).then(|| b.buf("shared", Rows::Tokens, h.n_embd)),
    };
    let table = tensor(b, f, None, TensorRole::TokenEmbd)?;
    let group = b.spec.embed;
    b.push(
        Op::Embed {
            table,
            out: bufs.x,
            scale: h.embed_scale,
        },
        None,
        group,
    );
    Ok(bufs)
}

/// Attention sub-block of layer `l`: norm, q/k/v, optional q/k norm, rope, attention, output
/// projection, optional post-norm, residual add.
pub(crate) fn attention(
    b: &mut GraphBuilder,
    f: &Flavor,
    s: &Bufs,
    l: usize,
) -> Result<(), GraphError> {
    let h = b.spec.hparams.clone();
    let layer = b.spec.layers[l].clone();
    let g = b
        .spec
        .layer_group(l, GroupRole::Attn)
        .ok_or_else(|| GraphError::MissingTensor {
            arch: f.arch,
            layer: Some(l),
            role: "attention group".into(),
        })?;
    let lo = Some(l);
    let norm = tensor(b, f, lo, TensorRole::AttnNorm)?;
    b.push(
        Op::RmsNorm {
            x: s.x,
            weight: norm,
            out: s.xn,
            eps: h.norm_eps,
        },
        lo,
        g,
    );
    for (role, bias_role, out) in [
        (TensorRole::AttnQ, TensorRole::AttnQBias, s.q),
        (TensorRole::AttnK, TensorRole::AttnKBias, s.k),
        (TensorRole::AttnV, TensorRole::AttnVBias, s.v),
    ] {
        let weight = tensor(b, f, lo, role)?;
        let bias = b.spec.find(lo, bias_role);
        b.push(
            Op::MatMul {
                weight,
                x: s.xn,
                out,
                bias,
            },
            lo,
            g,
        );
    }
    if f.qk_norm {
        let qn = tensor(b, f, lo, TensorRole::AttnQNorm)?;
        let kn = tensor(b, f, lo, TensorRole::AttnKNorm)?;
        b.push(
            Op::HeadRmsNorm {
                x: s.q,
                weight: qn,
                head_dim: h.head_dim_k,
                eps: h.norm_eps,
            },
            lo,
            g,
        );
        b.push(
            Op::HeadRmsNorm {
                x: s.k,
                weight: kn,
                head_dim: h.head_dim_k,
                eps: h.norm_eps,
            },
            lo,
            g,
        );
    }
    let rope = RopeParams {
        mode: h.rope_mode,
        n_dims: h.rope_dims,
        base: layer.rope_base,
        pos_scale: 1.0 / layer.rope_linear_scale,
        // llama3 frequency factors apply to global layers only (all layers in llama).
        freq_factors: if layer.window.is_none() {
            b.spec.rope_freqs
        } else {
            None
        },
    };
    b.push(
        Op::Rope {
            x: s.q,
            head_dim: h.head_dim_k,
            rope,
        },
        lo,
        g,
    );
    b.push(
        Op::Rope {
            x: s.k,
            head_dim: h.head_dim_k,
            rope,
        },
        lo,
        g,
    );
    b.push(
        Op::Attention {
            layer: l,
            q: s.q,
            k: s.k,
            v: s.v,
            out: s.attn,
            n_head: h.n_head,
            n_head_kv: h.n_head_kv,
            head_dim_k: h.head_dim_k,
            head_dim_v: h.head_dim_v,
            window: layer.window,
            scale: 1.0 / (h.head_dim_k as f32).sqrt(),
            softcap: h.attn_softcap,
        },
        lo,
        g,
    );
    let wo = tensor(b, f, lo, TensorRole::AttnOutput)?;
    b.push(
        Op::MatMul {
            weight: wo,
            x: s.attn,
            out: s.proj,
            bias: None,
        },
        lo,
        g,
    );
    if f.post_attn_norm {
        let pn = tensor(b, f, lo, TensorRole::AttnPostNorm)?;
        b.push(
            Op::RmsNorm {
                x: s.proj,
                weight: pn,
                out: s.proj,
                eps: h.norm_eps,
            },
            lo,
            g,
        );
    }
    b.push(
        Op::Add {
            a: s.x,
            b: s.proj,
            out: s.x,
        },
        lo,
        g,
    );
    Ok(())
}

/// Dense gated FFN sub-block of layer `l` with residual add.
pub(crate) fn dense_ffn(
    b: &mut GraphBuilder,
    f: &Flavor,
    s: &Bufs,
    l: usize,
) -> Result<(), GraphError> {
    let eps = b.spec.hparams.norm_eps;
    let g = b
        .spec
        .layer_group(l, GroupRole::Ffn)
        .ok_or_else(|| GraphError::MissingTensor {
            arch: f.arch,
            layer: Some(l),
            role: "ffn group".into(),
        })?;
    let lo = Some(l);
    let norm = tensor(b, f, lo, TensorRole::FfnNorm)?;
    b.push(
        Op::RmsNorm {
            x: s.x,
            weight: norm,
            out: s.xn,
            eps,
        },
        lo,
        g,
    );
    glu_mlp(
        b,
        f,
        s,
        lo,
        g,
        [TensorRole::FfnGate, TensorRole::FfnUp, TensorRole::FfnDown],
        s.proj,
    )?;
    if f.post_ffn_norm {
        let pn = tensor(b, f, lo, TensorRole::FfnPostNorm)?;
        b.push(
            Op::RmsNorm {
                x: s.proj,
                weight: pn,
                out: s.proj,
                eps,
            },
            lo,
            g,
        );
    }
    b.push(
        Op::Add {
            a: s.x,
            b: s.proj,
            out: s.x,
        },
        lo,
        g,
    );
    Ok(())
}

/// `out = down(act(gate · xn) ⊙ (up · xn))`.
fn glu_mlp(
    b: &mut GraphBuilder,
    f: &Flavor,
    s: &Bufs,
    lo: Option<usize>,
    g: crate::spec::GroupId,
    roles: [TensorRole; 3],
    out: BufId,
) -> Result<(), GraphError> {
    let gate = tensor(b, f, lo, roles[0])?;
    let up = tensor(b, f, lo, roles[1])?;
    let down = tensor(b, f, lo, roles[2])?;
    b.push(
        Op::MatMul {
            weight: gate,
            x: s.xn,
            out: s.gate,
            bias: None,
        },
        lo,
        g,
    );
    b.push(
        Op::MatMul {
            weight: up,
            x: s.xn,
            out: s.up,
            bias: None,
        },
        lo,
        g,
    );
    b.push(
        Op::Glu {
            gate: s.gate,
            up: s.up,
            out: s.hidden,
            act: f.act,
        },
        lo,
        g,
    );
    b.push(
        Op::MatMul {
            weight: down,
            x: s.hidden,
            out,
            bias: None,
        },
        lo,
        g,
    );
    Ok(())
}

/// Mixture-of-experts FFN sub-block of layer `l` (router, routed experts, optional shared expert)
/// with residual add.
pub(crate) fn moe_ffn(
    b: &mut GraphBuilder,
    f: &Flavor,
    s: &Bufs,
    l: usize,
) -> Result<(), GraphError> {
    let h = b.spec.hparams.clone();
    let missing = |what: &str| GraphError::MissingTensor {
        arch: f.arch,
        layer: Some(l),
        role: what.into(),
    };
    let router_g = b
        .spec
        .layer_group(l, GroupRole::Router)
        .ok_or_else(|| missing("router group"))?;
    let experts_g = b
        .spec
        .layer_group(l, GroupRole::Experts)
        .ok_or_else(|| missing("experts group"))?;
    let (router, route) = match (s.router, s.route) {
        (Some(r), Some(rt)) => (r, rt),
        _ => return Err(missing("router buffers (expert_count is 0)")),
    };
    let lo = Some(l);
    let norm = tensor(b, f, lo, TensorRole::FfnNorm)?;
    b.push(
        Op::RmsNorm {
            x: s.x,
            weight: norm,
            out: s.xn,
            eps: h.norm_eps,
        },
        lo,
        router_g,
    );
    let gate_inp = tensor(b, f, lo, TensorRole::FfnGateInp)?;
    b.push(
        Op::MatMul {
            weight: gate_inp,
            x: s.xn,
            out: router,
            bias: None,
        },
        lo,
        router_g,
    );
    b.push(
        Op::MoeRoute {
            logits: router,
            out: route,
            n_expert: h.n_expert,
            n_used: h.n_expert_used,
            normalize: h.expert_weights_norm,
        },
        lo,
        router_g,
    );
    b.push(
        Op::MoeFfn {
            x: s.xn,
            route,
            gate_exps: tensor(b, f, lo, TensorRole::FfnGateExps)?,
            up_exps: tensor(b, f, lo, TensorRole::FfnUpExps)?,
            down_exps: tensor(b, f, lo, TensorRole::FfnDownExps)?,
            act: f.act,
            out: s.proj,
        },
        lo,
        experts_g,
    );
    if let (Some(shared_out), Some(sg)) =
        (s.shared, b.spec.layer_group(l, GroupRole::SharedExperts))
    {
        glu_mlp(
            b,
            f,
            s,
            lo,
            sg,
            [
                TensorRole::FfnGateShexp,
                TensorRole::FfnUpShexp,
                TensorRole::FfnDownShexp,
            ],
            shared_out,
        )?;
        b.push(
            Op::Add {
                a: s.proj,
                b: shared_out,
                out: s.proj,
            },
            lo,
            sg,
        );
    }
    b.push(
        Op::Add {
            a: s.x,
            b: s.proj,
            out: s.x,
        },
        lo,
        experts_g,
    );
    Ok(())
}

/// Output head: select the rows that need logits, final norm, output projection, optional soft-cap.
pub(crate) fn output(b: &mut GraphBuilder, f: &Flavor, s: &Bufs) -> Result<BufId, GraphError> {
    let h = b.spec.hparams.clone();
    let sel = b.buf("sel", Rows::LogitRows, h.n_embd);
    let seln = b.buf("sel_norm", Rows::LogitRows, h.n_embd);
    let logits = b.buf("logits", Rows::LogitRows, h.n_vocab);
    let norm_g = b.spec.output_norm;
    let out_g = b.spec.output;
    b.push(Op::SelectRows { x: s.x, out: sel }, None, norm_g);
    let norm = tensor(b, f, None, TensorRole::OutputNorm)?;
    b.push(
        Op::RmsNorm {
            x: sel,
            weight: norm,
            out: seln,
            eps: h.norm_eps,
        },
        None,
        norm_g,
    );
    let weight = match b.spec.find(None, TensorRole::Output) {
        Some(t) => t,
        None => tensor(b, f, None, TensorRole::TokenEmbd)?,
    };
    b.push(
        Op::MatMul {
            weight,
            x: seln,
            out: logits,
            bias: None,
        },
        None,
        out_g,
    );
    if let Some(cap) = h.final_softcap {
        b.push(Op::Softcap { x: logits, cap }, None, out_g);
    }
    Ok(logits)
}

/// The standard decoder: embed, per layer attention then dense or MoE FFN, output head.
pub(crate) fn decoder(
    spec: &crate::spec::ModelSpec,
    f: Flavor,
    n_tokens: usize,
    n_logit_rows: usize,
) -> Result<crate::graph::Graph, GraphError> {
    let mut b = GraphBuilder::new(spec, n_tokens, n_logit_rows);
    let s = embed(&mut b, &f)?;
    for l in 0..spec.layers.len() {
        attention(&mut b, &f, &s, l)?;
        if spec.layer_group(l, GroupRole::Experts).is_some() {
            moe_ffn(&mut b, &f, &s, l)?;
        } else {
            dense_ffn(&mut b, &f, &s, l)?;
        }
    }
    let logits = output(&mut b, &f, &s)?;
    Ok(b.finish(logits))
}
