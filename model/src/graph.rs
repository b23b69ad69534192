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
    /// MoE router: softmax over `logits` (n_expert columns), top `n_used`, optional renormalisation.
    MoeRoute {
        logits: BufId,
        out: BufId,
        n_expert: usize,
        n_used: usize,
        normalize: bool,
    },
    /// Expert FFNs: for each token, `Σ_e w_e · down_e(act(gate_e x) · up_e x)` over its routed experts.
    MoeFfn {
        x: BufId,
        route: BufId,
        gate_exps: TensorId,
        up_exps: TensorId,
        down_exps: TensorId,
        act: Activation,
        out: BufId,
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
            Op::Attention { q, k, v, .. } => vec![q, k, v],
            Op::Glu { gate, up, .. } => vec![gate, up],
            Op::Add { a, b, .. } => vec![a, b],
            Op::MoeRoute { logits, .. } => vec![logits],
            Op::MoeFfn { x, route, .. } => vec![x, route],
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
            | Op::MoeFfn { out, .. } => vec![out],
            Op::HeadRmsNorm { x, .. } | Op::Rope { x, .. } | Op::Softcap { x, .. } => vec![x],
        }
    }

    /// Weight tensors this op reads.
    pub fn weights(&self) -> Vec<TensorId> {
        match *self {
            Op::Embed { table, .. } => vec![table],
            Op::RmsNorm { weight, .. } | Op::HeadRmsNorm { weight, .. } => vec![weight],
            Op::MatMul { weight, bias, .. } => std::iter::once(weight).chain(bias).collect(),
            Op::Rope { rope, .. } => rope.freq_factors.into_iter().collect(),
            Op::MoeFfn {
                gate_exps,
                up_exps,
                down_exps,
                ..
            } => vec![gate_exps, up_exps, down_exps],
            Op::Attention { .. }
            | Op::Glu { .. }
            | Op::Add { .. }
            | Op::SelectRows { .. }
            | Op::MoeRoute { .. }
            | Op::Softcap { .. } => vec![],
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
        }
    }
}
