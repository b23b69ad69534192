//! Building blocks shared by the architecture files: embedding, attention, FFNs, output head.
//!
//! Buffers are declared once per graph and reused by every layer (the residual stream `x`, scratch for
//! the normed input, q/k/v, attention output, FFN intermediates), so a graph's memory does not grow
//! with depth.

use super::GraphError;
use crate::graph::{Activation, BufId, GraphBuilder, Op, RopeParams, RopeYarn, Routing, Rows};
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
    /// GLU activation of the dense and shared-expert FFNs.
    pub act: Activation,
    /// GLU activation of the routed experts.
    pub expert_act: Activation,
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
    /// Dense FFN gate, up and hidden rows (`n_ff` wide), when some layer is dense.
    pub ffn: Option<[BufId; 3]>,
    /// The shared experts' gate, up and hidden rows (`n_ff_shared_expert` wide).
    pub shexp: Option<[BufId; 3]>,
    pub router: Option<BufId>,
    pub route: Option<BufId>,
    pub shared: Option<BufId>,
    /// Latent attention's extra buffers.
    pub mla: Option<MlaBufs>,
}

/// Buffers of multi-head latent attention; the shared `q` holds the absorbed queries
/// (`n_head · (kv_lora + rope)`), `k` the latent K rows and `attn` each head's latent output.
pub(crate) struct MlaBufs {
    /// Queries as projected (`n_head · (nope + rope)`).
    pub q: BufId,
    /// The compressed query (`q_lora_rank`), with q lora.
    pub q_lora: Option<BufId>,
    /// The KV compression's output (`kv_lora + rope`).
    pub kva: BufId,
    /// Each head's decompressed output (`n_head · head_dim_v`).
    pub attn_v: BufId,
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
    let moe = h.n_expert > 0;
    let bufs = Bufs {
        x: b.buf("x", Rows::Tokens, h.n_embd),
        xn: b.buf("xn", Rows::Tokens, h.n_embd),
        q: b.buf("q", Rows::Tokens, q_cols),
        k: b.buf("k", Rows::Tokens, kv_k),
        v: b.buf("v", Rows::Tokens, kv_v),
        attn: b.buf("attn", Rows::Tokens, h.n_head * h.head_dim_v),
        proj: b.buf("proj", Rows::Tokens, h.n_embd),
        ffn: (h.n_ff > 0).then(|| {
            [
                b.buf("gate", Rows::Tokens, h.n_ff),
                b.buf("up", Rows::Tokens, h.n_ff),
                b.buf("hidden", Rows::Tokens, h.n_ff),
            ]
        }),
        shexp: (h.n_ff_shared_expert > 0).then(|| {
            [
                b.buf("shexp_gate", Rows::Tokens, h.n_ff_shared_expert),
                b.buf("shexp_up", Rows::Tokens, h.n_ff_shared_expert),
                b.buf("shexp_hidden", Rows::Tokens, h.n_ff_shared_expert),
            ]
        }),
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
        mla: h.mla.map(|m| MlaBufs {
            q: b.buf("q_mla", Rows::Tokens, h.n_head * (m.nope + h.rope_dims)),
            q_lora: (m.q_lora_rank > 0).then(|| b.buf("q_lora", Rows::Tokens, m.q_lora_rank)),
            kva: b.buf("kv_a", Rows::Tokens, m.kv_lora_rank + h.rope_dims),
            attn_v: b.buf("attn_v", Rows::Tokens, h.n_head * m.head_dim_v),
        }),
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

/// The rope of layer `l` over `n_dims` rotated dimensions.
fn rope_params(spec: &crate::spec::ModelSpec, l: usize, n_dims: usize) -> RopeParams {
    let layer = &spec.layers[l];
    RopeParams {
        mode: spec.hparams.rope_mode,
        n_dims,
        base: layer.rope_base,
        pos_scale: 1.0 / layer.rope_linear_scale,
        // llama3 frequency factors apply to global layers only (all layers in llama).
        freq_factors: if layer.window.is_none() {
            spec.rope_freqs
        } else {
            None
        },
        yarn: spec
            .hparams
            .yarn
            .map(|y| RopeYarn::new(&y, n_dims, layer.rope_base)),
    }
}

/// The attention input norm of layer `l` (`x` → `xn`).
fn attn_input_norm(
    b: &mut GraphBuilder,
    f: &Flavor,
    s: &Bufs,
    l: usize,
    g: crate::spec::GroupId,
) -> Result<(), GraphError> {
    let norm = tensor(b, f, Some(l), TensorRole::AttnNorm)?;
    let eps = b.spec.hparams.norm_eps;
    b.push(
        Op::RmsNorm {
            x: s.x,
            weight: norm,
            out: s.xn,
            eps,
        },
        Some(l),
        g,
    );
    Ok(())
}

/// Layer `l`'s attention group.
fn attn_group(b: &GraphBuilder, f: &Flavor, l: usize) -> Result<crate::spec::GroupId, GraphError> {
    b.spec
        .layer_group(l, GroupRole::Attn)
        .ok_or_else(|| GraphError::MissingTensor {
            arch: f.arch,
            layer: Some(l),
            role: "attention group".into(),
        })
}

/// Attention sub-block of layer `l`: norm, q/k/v, optional q/k norm, rope, attention, output
/// projection, optional post-norm, residual add.
pub(crate) fn attention(
    b: &mut GraphBuilder,
    f: &Flavor,
    s: &Bufs,
    l: usize,
) -> Result<(), GraphError> {
    if b.spec.hparams.mla.is_some() {
        return mla_attention(b, f, s, l);
    }
    let h = b.spec.hparams.clone();
    let layer = b.spec.layers[l].clone();
    let g = attn_group(b, f, l)?;
    let lo = Some(l);
    attn_input_norm(b, f, s, l, g)?;
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
    // Required by the flavor, or present (glm4moe's are optional).
    if f.qk_norm || b.spec.find(lo, TensorRole::AttnQNorm).is_some() {
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
    let rope = rope_params(b.spec, l, h.rope_dims);
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
            scale: h.attn_scale,
            softcap: h.attn_softcap,
            sinks: b.spec.find(lo, TensorRole::AttnSinks),
            v_in_k: false,
        },
        lo,
        g,
    );
    output_projection(b, f, s, l, s.attn)
}

/// Multi-head latent attention of layer `l` (see [`crate::spec::Mla`]): queries (directly or
/// through the q lora), the KV compression, its latent K row, the queries absorbed into the
/// latent space, attention over the latent cache, each head's output decompressed, then the
/// output projection and residual add.
fn mla_attention(b: &mut GraphBuilder, f: &Flavor, s: &Bufs, l: usize) -> Result<(), GraphError> {
    let h = b.spec.hparams.clone();
    let layer = b.spec.layers[l].clone();
    let (Some(m), Some(mb)) = (h.mla, s.mla.as_ref()) else {
        return Err(GraphError::MissingTensor {
            arch: f.arch,
            layer: Some(l),
            role: "latent attention hparams".into(),
        });
    };
    let g = attn_group(b, f, l)?;
    let lo = Some(l);
    attn_input_norm(b, f, s, l, g)?;
    let matmul = |b: &mut GraphBuilder, weight, x, out| {
        b.push(
            Op::MatMul {
                weight,
                x,
                out,
                bias: None,
            },
            lo,
            g,
        )
    };
    match mb.q_lora {
        Some(ql) => {
            matmul(b, tensor(b, f, lo, TensorRole::AttnQA)?, s.xn, ql);
            let qn = tensor(b, f, lo, TensorRole::AttnQANorm)?;
            b.push(
                Op::RmsNorm {
                    x: ql,
                    weight: qn,
                    out: ql,
                    eps: h.norm_eps,
                },
                lo,
                g,
            );
            matmul(b, tensor(b, f, lo, TensorRole::AttnQB)?, ql, mb.q);
        }
        None => matmul(b, tensor(b, f, lo, TensorRole::AttnQ)?, s.xn, mb.q),
    }
    matmul(b, tensor(b, f, lo, TensorRole::AttnKvAMqa)?, s.xn, mb.kva);
    let rope = rope_params(b.spec, l, h.rope_dims);
    b.push(
        Op::MlaKv {
            x: mb.kva,
            norm: tensor(b, f, lo, TensorRole::AttnKvANorm)?,
            out: s.k,
            kv_lora: m.kv_lora_rank,
            eps: h.norm_eps,
            rope,
        },
        lo,
        g,
    );
    let qk = m.kv_lora_rank + h.rope_dims;
    b.push(
        Op::HeadMatMul {
            weight: tensor(b, f, lo, TensorRole::AttnKB)?,
            x: mb.q,
            x_stride: m.nope + h.rope_dims,
            out: s.q,
            out_stride: qk,
        },
        lo,
        g,
    );
    b.push(
        Op::MlaQRope {
            q: mb.q,
            out: s.q,
            n_head: h.n_head,
            nope: m.nope,
            kv_lora: m.kv_lora_rank,
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
            v: s.k,
            out: s.attn,
            n_head: h.n_head,
            n_head_kv: 1,
            head_dim_k: qk,
            head_dim_v: m.kv_lora_rank,
            window: layer.window,
            scale: h.attn_scale,
            softcap: h.attn_softcap,
            sinks: None,
            v_in_k: true,
        },
        lo,
        g,
    );
    b.push(
        Op::HeadMatMul {
            weight: tensor(b, f, lo, TensorRole::AttnVB)?,
            x: s.attn,
            x_stride: m.kv_lora_rank,
            out: mb.attn_v,
            out_stride: m.head_dim_v,
        },
        lo,
        g,
    );
    output_projection(b, f, s, l, mb.attn_v)
}

/// The output projection of layer `l`'s attention output `attn` (with its bias), optional
/// post-norm and residual add.
fn output_projection(
    b: &mut GraphBuilder,
    f: &Flavor,
    s: &Bufs,
    l: usize,
    attn: BufId,
) -> Result<(), GraphError> {
    let h = b.spec.hparams.clone();
    let g = attn_group(b, f, l)?;
    let lo = Some(l);
    let wo = tensor(b, f, lo, TensorRole::AttnOutput)?;
    b.push(
        Op::MatMul {
            weight: wo,
            x: attn,
            out: s.proj,
            bias: b.spec.find(lo, TensorRole::AttnOutputBias),
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
    let bufs = s.ffn.ok_or_else(|| GraphError::MissingTensor {
        arch: f.arch,
        layer: lo,
        role: "dense FFN buffers (feed_forward_length is 0)".into(),
    })?;
    glu_mlp(
        b,
        f,
        (lo, g),
        [TensorRole::FfnGate, TensorRole::FfnUp, TensorRole::FfnDown],
        (s.xn, bufs),
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

/// `out = down(act(gate · xn) ⊙ (up · xn))` through the `[gate, up, hidden]` buffers `bufs`.
fn glu_mlp(
    b: &mut GraphBuilder,
    f: &Flavor,
    (lo, g): (Option<usize>, crate::spec::GroupId),
    roles: [TensorRole; 3],
    (xn, [gate_b, up_b, hidden_b]): (BufId, [BufId; 3]),
    out: BufId,
) -> Result<(), GraphError> {
    let gate = tensor(b, f, lo, roles[0])?;
    let up = tensor(b, f, lo, roles[1])?;
    let down = tensor(b, f, lo, roles[2])?;
    b.push(
        Op::MatMul {
            weight: gate,
            x: xn,
            out: gate_b,
            bias: None,
        },
        lo,
        g,
    );
    b.push(
        Op::MatMul {
            weight: up,
            x: xn,
            out: up_b,
            bias: None,
        },
        lo,
        g,
    );
    b.push(
        Op::Glu {
            gate: gate_b,
            up: up_b,
            out: hidden_b,
            act: f.act,
        },
        lo,
        g,
    );
    b.push(
        Op::MatMul {
            weight: down,
            x: hidden_b,
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
            bias: b.spec.find(lo, TensorRole::FfnGateInpBias),
        },
        lo,
        router_g,
    );
    b.push(
        Op::MoeRoute {
            logits: router,
            out: route,
            routing: Routing {
                n_expert: h.n_expert,
                n_used: h.n_expert_used,
                gating: h.gating,
                normalize: h.expert_weights_norm,
                scale: h.expert_weights_scale,
                groups: (h.n_expert_groups, h.n_group_used),
            },
            select_bias: b.spec.find(lo, TensorRole::FfnExpProbsBias),
        },
        lo,
        router_g,
    );
    let bias = [
        TensorRole::FfnGateExpsBias,
        TensorRole::FfnUpExpsBias,
        TensorRole::FfnDownExpsBias,
    ]
    .map(|r| b.spec.find(lo, r));
    b.push(
        Op::MoeFfn {
            x: s.xn,
            route,
            gate_exps: tensor(b, f, lo, TensorRole::FfnGateExps)?,
            up_exps: tensor(b, f, lo, TensorRole::FfnUpExps)?,
            down_exps: tensor(b, f, lo, TensorRole::FfnDownExps)?,
            act: f.expert_act,
            out: s.proj,
            bias: match bias {
                [Some(g), Some(u), Some(d)] => Some([g, u, d]),
                _ => None,
            },
        },
        lo,
        experts_g,
    );
    if let (Some(shared_out), Some(bufs), Some(sg)) = (
        s.shared,
        s.shexp,
        b.spec.layer_group(l, GroupRole::SharedExperts),
    ) {
        glu_mlp(
            b,
            f,
            (lo, sg),
            [
                TensorRole::FfnGateShexp,
                TensorRole::FfnUpShexp,
                TensorRole::FfnDownShexp,
            ],
            (s.xn, bufs),
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
