//! The backend-neutral op graph of one forward pass for `n_tokens` tokens.
//!
//! Each architecture file in [`crate::arch`] builds this graph from a [`ModelSpec`]. The planner costs
//! exactly these nodes and the runtime executes exactly these nodes: one definition, no drift.
//!
//! Buffers are f32 row-major matrices of `rows × cols`, where rows is the batch's token count (or the
//! number of rows that need logits). Token ids, positions and the KV length are *inputs* of a run, not
//! part of the graph, so a graph serves every batch of its size.

use crate::spec::{GroupId, ModelSpec, RopeMode, TensorId};

/// Index of a buffer in [`Graph::buffers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufId(pub u32);

/// How many rows a buffer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// One row per token of the batch.
    Tokens,
    /// One row per token that needs logits.
    LogitRows,
}

/// What a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufKind {
    /// f32 activations.
    F32,
    /// MoE routing per token: `n_used` expert ids (u32) then `n_used` f32 weights, as 32-bit words.
    Route,
}

/// A buffer of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct BufDesc {
    /// Name for reports and debugging, e.g. `"q"`.
    pub name: &'static str,
    /// Row count rule.
    pub rows: Rows,
    /// 32-bit values per row.
    pub cols: usize,
    /// Contents.
    pub kind: BufKind,
}

/// Gated-linear-unit activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU(gate) · up (SwiGLU).
    Silu,
    /// GELU-tanh(gate) · up (GeGLU).
    GeluTanh,
    /// gpt-oss's clamped SwiGLU: with g = min(gate, L) and u = clamp(up, −L, L),
    /// `g · σ(α g) · (u + 1)` ([`SWIGLU_OAI_ALPHA`], [`SWIGLU_OAI_LIMIT`]).
    SwigluOai,
}

/// α of [`Activation::SwigluOai`] (gpt-oss's value; llama.cpp hard-codes it too).
pub const SWIGLU_OAI_ALPHA: f32 = 1.702;
/// The clamp limit of [`Activation::SwigluOai`].
pub const SWIGLU_OAI_LIMIT: f32 = 7.0;

/// YaRN's per-pair mix of one rope op (see [`crate::spec::Yarn`]): pair `i` rotates at
/// `θ_i · (s (1 − r_i) + r_i)` where `s` is the op's `pos_scale` and
/// `r_i = (1 − clamp((i − low) / max(0.001, high − low), 0, 1)) · ext_factor`; rotated values are
/// multiplied by `mscale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeYarn {
    /// First pair of the ramp.
    pub low: f32,
    /// Last pair of the ramp.
    pub high: f32,
    /// Weight of the ramp.
    pub ext_factor: f32,
    /// Multiplier of the rotated values.
    pub mscale: f32,
}

impl RopeYarn {
    /// The op parameters for `n_dims` rotated dimensions at frequency `base`.
    pub fn new(y: &crate::spec::Yarn, n_dims: usize, base: f32) -> RopeYarn {
        let [low, high] = y.corr_dims(n_dims, base);
        RopeYarn {
            low,
            high,
            ext_factor: y.ext_factor,
            mscale: y.mscale,
        }
    }

    /// The factor pair `i`'s angle is multiplied by, given the op's position scale.
    pub fn angle_factor(&self, i: usize, pos_scale: f32) -> f32 {
        let y = (i as f32 - self.low) / (self.high - self.low).max(0.001);
        let r = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
        pos_scale * (1.0 - r) + r
    }
}

/// How a MoE router turns logits into routes (one op's parameters).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing {
    /// Experts.
    pub n_expert: usize,
    /// Experts used per token.
    pub n_used: usize,
    /// Logits to weights.
    pub gating: crate::spec::Gating,
    /// Renormalise the chosen weights to sum to 1.
    pub normalize: bool,
    /// Multiplier of the final weights (1 = none).
    pub scale: f32,
    /// Group-limited routing: (groups, groups used); (0, 0) or fewer than 2 groups: none.
    pub groups: (usize, usize),
}

/// Rotary embedding parameters of one op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    /// Pairing mode.
    pub mode: RopeMode,
    /// Rotated dimensions per head (the rest pass through).
    pub n_dims: usize,
    /// Frequency base.
    pub base: f32,
    /// Positions are multiplied by this (1/linear scaling factor).
    pub pos_scale: f32,
    /// Per-dimension-pair frequency divisors (`rope_freqs.weight`, llama3 scaling).
    pub freq_factors: Option<TensorId>,
    /// YaRN scaling, if any.
    pub yarn: Option<RopeYarn>,
}

/// One operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `out[t] = table[token[t]] · scale`.
    Embed {
        table: TensorId,
        out: BufId,
        scale: f32,
    },
    /// `out = x / rms(x) · weight`, per row.
    RmsNorm {
        x: BufId,
        weight: TensorId,
        out: BufId,
        eps: f32,
    },
    /// RMS norm of each `head_dim` slice of each row, times `weight` (length head_dim), in place.
    HeadRmsNorm {
        x: BufId,
        weight: TensorId,
        head_dim: usize,
        eps: f32,
    },
    /// `out[t, r] = Σ_c weight[r, c] · x[t, c] (+ bias[r])`; weight is `rows × cols` in its GGUF type.
    MatMul {
        weight: TensorId,
        x: BufId,
        out: BufId,
        bias: Option<TensorId>,
    },
    /// Rotary embedding of each head of `x` in place, at the run's token positions.
    Rope {
        x: BufId,
        head_dim: usize,
        rope: RopeParams,
    },
    /// Writes this batch's `k`, `v` rows into layer `layer`'s KV cache at the run's positions, then
    /// causal attention of `q` over the cache (window-limited when `window` is set).
    /// QK and softmax accumulate in f32. `out` has `n_head · head_dim_v` columns.
    /// `sinks` (one logit per head) join each softmax's denominator without a value.
    /// With `v_in_k` the cache holds no V: each head's values are the first `head_dim_v` columns
    /// of its K row (multi-head latent attention), and `v` is not read.
    Attention {
        layer: usize,
        q: BufId,
        k: BufId,
        v: BufId,
        out: BufId,
        n_head: usize,
        n_head_kv: usize,
        head_dim_k: usize,
        head_dim_v: usize,
        window: Option<usize>,
        scale: f32,
        softcap: Option<f32>,
        sinks: Option<TensorId>,
        v_in_k: bool,
    },
    /// `out = act(gate) · up`, elementwise.
    Glu {
        gate: BufId,
        up: BufId,
        out: BufId,
        act: Activation,
    },
    /// `out = a + b`, elementwise (out may equal a).
    Add { a: BufId, b: BufId, out: BufId },
    /// Copies the rows that need logits (given by the run) from `x` into `out`.
    SelectRows { x: BufId, out: BufId },
    /// MoE router over `logits` (n_expert columns): gating, optional group limit, top `n_used` by
    /// the gated values plus `select_bias` (the bias only chooses; weights come unbiased),
    /// optional renormalisation and scale.
    MoeRoute {
        logits: BufId,
        out: BufId,
        routing: Routing,
        select_bias: Option<TensorId>,
    },
    /// Expert FFNs: for each token, `Σ_e w_e · down_e(act(gate_e x) · up_e x)` over its routed
    /// experts; `bias` (gate, up, down: one row per expert) is added after each projection.
    MoeFfn {
        x: BufId,
        route: BufId,
        gate_exps: TensorId,
        up_exps: TensorId,
        down_exps: TensorId,
        act: Activation,
        out: BufId,
        bias: Option<[TensorId; 3]>,
    },
    /// One matrix per head (`weight` is 3-D, one `rows × cols` matrix per head): for each token
    /// and head `h`, `out[h·out_stride ..][..rows] = W_h · x[h·x_stride ..][..cols]`. Other
    /// columns of `out` are undefined afterwards: a later op must write them (the lane rules
    /// treat `out` as written whole).
    HeadMatMul {
        weight: TensorId,
        x: BufId,
        x_stride: usize,
        out: BufId,
        out_stride: usize,
    },
    /// Multi-head latent attention's K row: `out[..kv_lora] = rms_norm(x[..kv_lora]) · norm`,
    /// `out[kv_lora..]` = `x[kv_lora..]` roped (one head of `rope.n_dims`).
    MlaKv {
        x: BufId,
        norm: TensorId,
        out: BufId,
        kv_lora: usize,
        eps: f32,
        rope: RopeParams,
    },
    /// Multi-head latent attention's query rope part: for each head `h` of `n_head`,
    /// `out[h·(kv_lora + d) + kv_lora ..][..d]` = rope of `q[h·(nope + d) + nope ..][..d]` with
    /// `d = rope.n_dims`; the other columns of `out` are left as they are.
    MlaQRope {
        q: BufId,
        out: BufId,
        n_head: usize,
        nope: usize,
        kv_lora: usize,
        rope: RopeParams,
    },
    /// `x = cap · tanh(x / cap)` in place.
    Softcap { x: BufId, cap: f32 },
}

/// A node: an op and the tensor group whose weights it reads (its placement decides the lane).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Layer index, for per-layer ops.
    pub layer: Option<usize>,
    /// Group of the weights read (for weightless ops, the group of the surrounding computation).
    pub group: GroupId,
}

/// One forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// Tokens per batch this graph is built for.
    pub n_tokens: usize,
    /// Rows that produce logits.
    pub n_logit_rows: usize,
    /// Buffers.
    pub buffers: Vec<BufDesc>,
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// The logits buffer (`LogitRows × n_vocab`).
    pub logits: BufId,
}

impl Graph {
    /// Rows of a buffer in this graph.
    pub fn rows(&self, b: BufId) -> usize {
        match self.buffers[b.0 as usize].rows {
            Rows::Tokens => self.n_tokens,
            Rows::LogitRows => self.n_logit_rows,
        }
    }

    /// The buffer descriptor.
    pub fn buffer(&self, b: BufId) -> &BufDesc {
        &self.buffers[b.0 as usize]
    }
}

/// Builds graphs: a small helper the architecture files use to declare buffers and push nodes.
#[derive(Debug)]
pub struct GraphBuilder<'a> {
    /// The model.
    pub spec: &'a ModelSpec,
    graph: Graph,
}

impl<'a> GraphBuilder<'a> {
    /// Starts a graph for `n_tokens` tokens of which `n_logit_rows` need logits.
    pub fn new(spec: &'a ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Self {
        GraphBuilder {
            spec,
            graph: Graph {
                n_tokens,
                n_logit_rows,
                buffers: Vec::new(),
                nodes: Vec::new(),
                logits: BufId(0),
            },
        }
    }

    /// Declares an f32 buffer.
    pub fn buf(&mut self, name: &'static str, rows: Rows, cols: usize) -> BufId {
        self.buf_kind(name, rows, cols, BufKind::F32)
    }

    /// Declares a buffer of a given kind.
    pub fn buf_kind(
        &mut self,
        name: &'static str,
        rows: Rows,
        cols: usize,
        kind: BufKind,
    ) -> BufId {
        self.graph.buffers.push(BufDesc {
            name,
            rows,
            cols,
            kind,
        });
        BufId(self.graph.buffers.len() as u32 - 1)
    }

    /// Appends a node.
    pub fn push(&mut self, op: Op, layer: Option<usize>, group: GroupId) {
        self.graph.nodes.push(Node { op, layer, group });
    }

    /// Finishes the graph with its logits buffer.
    pub fn finish(mut self, logits: BufId) -> Graph {
        self.graph.logits = logits;
        self.graph
    }
}

impl Op {
    /// Buffers this op reads.
    pub fn reads(&self) -> Vec<BufId> {
        match *self {
            Op::Embed { .. } => vec![],
            Op::RmsNorm { x, .. } | Op::MatMul { x, .. } | Op::SelectRows { x, .. } => vec![x],
            Op::HeadRmsNorm { x, .. } | Op::Rope { x, .. } | Op::Softcap { x, .. } => vec![x],
            Op::Attention {
                q, k, v, v_in_k, ..
            } => {
                if v_in_k {
                    vec![q, k]
                } else {
                    vec![q, k, v]
                }
            }
            Op::Glu { gate, up, .. } => vec![gate, up],
            Op::Add { a, b, .. } => vec![a, b],
            Op::MoeRoute { logits, .. } => vec![logits],
            Op::MoeFfn { x, route, .. } => vec![x, route],
            Op::HeadMatMul { x, .. } => vec![x],
            // A partial writer reads what it keeps, so the lane rules move the whole buffer.
            Op::MlaKv { x, .. } => vec![x],
            Op::MlaQRope { q, out, .. } => vec![q, out],
        }
    }

    /// Buffers this op writes.
    pub fn writes(&self) -> Vec<BufId> {
        match *self {
            Op::Embed { out, .. }
            | Op::RmsNorm { out, .. }
            | Op::MatMul { out, .. }
            | Op::SelectRows { out, .. }
            | Op::Attention { out, .. }
            | Op::Glu { out, .. }
            | Op::Add { out, .. }
            | Op::MoeRoute { out, .. }
            | Op::MoeFfn { out, .. }
            | Op::HeadMatMul { out, .. }
            | Op::MlaKv { out, .. }
            | Op::MlaQRope { out, .. } => vec![out],
            Op::HeadRmsNorm { x, .. } | Op::Rope { x, .. } | Op::Softcap { x, .. } => vec![x],
        }
    }

    /// Weight tensors this op reads.
    pub fn weights(&self) -> Vec<TensorId> {
        match *self {
            Op::Embed { table, .. } => vec![table],
            Op::RmsNorm { weight, .. } | Op::HeadRmsNorm { weight, .. } => vec![weight],
            Op::MatMul { weight, bias, .. } => std::iter::once(weight).chain(bias).collect(),
            Op::Rope { rope, .. } | Op::MlaQRope { rope, .. } => {
                rope.freq_factors.into_iter().collect()
            }
            Op::MoeFfn {
                gate_exps,
                up_exps,
                down_exps,
                bias,
                ..
            } => [gate_exps, up_exps, down_exps]
                .into_iter()
                .chain(bias.into_iter().flatten())
                .collect(),
            Op::Attention { sinks, .. } => sinks.into_iter().collect(),
            Op::MoeRoute { select_bias, .. } => select_bias.into_iter().collect(),
            Op::HeadMatMul { weight, .. } => vec![weight],
            Op::MlaKv { norm, rope, .. } => {
                std::iter::once(norm).chain(rope.freq_factors).collect()
            }
            Op::Glu { .. } | Op::Add { .. } | Op::SelectRows { .. } | Op::Softcap { .. } => {
                vec![]
            }
        }
    }

    /// Short name of the op kind, for reports and profile keys.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::HeadRmsNorm { .. } => "head_rms_norm",
            Op::MatMul { .. } => "matmul",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Glu { .. } => "glu",
            Op::Add { .. } => "add",
            Op::SelectRows { .. } => "select_rows",
            Op::MoeRoute { .. } => "moe_route",
            Op::MoeFfn { .. } => "moe_ffn",
            Op::Softcap { .. } => "softcap",
            Op::HeadMatMul { .. } => "head_matmul",
            Op::MlaKv { .. } => "mla_kv",
            Op::MlaQRope { .. } => "mla_q_rope",
        }
    }
}
