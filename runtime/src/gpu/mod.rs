//! The GPU executor: runs the same [`Program`]s as the CPU executor with every step on the GPU's
//! compute stream. Weights are uploaded once (in their GGUF block layout), the KV cache lives in
//! VRAM, logits are computed only for the rows that need them and copied back, and small batches
//! (decode) are captured as a CUDA graph after their first run and replayed.
//!
//! Per-op timing ([`GpuEngine::set_op_timing`]): runs go through the plain (uncaptured) path with
//! a timing event between consecutive steps on the compute stream, and the elapsed times are
//! accumulated per [`OpKey`] (op kind, weight type and shape, program tokens, rows).

use std::collections::HashMap;
use std::path::PathBuf;

use pshard_kernels::cuda::{
    kernels::type_geom, AttnParams, CapturedGraph, CudaError, DevBuf, GemmScratch, Gpu, RegionId,
    RegionKind, RopeArgs, RopeKind, GEMV_INT8_MAX_ROWS, GEMV_MAX_ROWS,
};
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::{Activation, BufId, Op};
use pshard_model::spec::{RopeMode, TensorId};

use crate::cpu::BatchInput;
use crate::engine::Logits;
use crate::model::Model;
use crate::program::{Lane, MemSpace, Program};

/// Why GPU execution failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A CUDA call or kernel failed (or no GPU).
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The input does not match the program.
    #[error("batch shape mismatch: {0}")]
    Shape(String),
    /// The model uses something the CUDA backend cannot run.
    #[error("{0}")]
    Unsupported(String),
    /// The graph could not be built.
    #[error(transparent)]
    Graph(#[from] pshard_model::arch::GraphError),
    /// The context is full.
    #[error("context full: {needed} positions needed but the context holds {n_ctx} (raise -c)")]
    ContextFull {
        /// Positions needed.
        needed: usize,
        /// Context size.
        n_ctx: usize,
    },
    /// The GPU's submission thread failed (see [`crate::submit`]).
    #[error(transparent)]
    Thread(#[from] crate::submit::SubmitError),
}

/// How to open the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// VRAM budget in bytes (`None`: free memory minus a margin).
    pub vram_budget: Option<u64>,
    /// NVRTC cache directory (`None`: the default).
    pub cache_dir: Option<PathBuf>,
    /// Keep the host pages of uploaded weights (by default they are released after upload, so
    /// the process holds no dead copy of what lives in VRAM).
    pub keep_host_weights: bool,
}

/// The model's weights in VRAM: matrices as raw GGUF blocks, small vectors as f32.
pub struct GpuWeights {
    tensors: HashMap<TensorId, DevBuf>,
    region: RegionId,
    /// Bytes uploaded.
    pub bytes: u64,
}

fn is_matrix_use(op: &Op, id: TensorId) -> bool {
    matches!(op, Op::MatMul { weight, .. } if *weight == id)
        || matches!(op, Op::Embed { .. } | Op::MoeFfn { .. })
}

impl GpuWeights {
    /// Uploads every tensor the forward pass reads, once.
    pub fn upload(gpu: &Gpu, model: &Model) -> Result<GpuWeights, GpuError> {
        let graph = pshard_model::arch::build_graph(&model.spec, 1, 1)?;
        // (tensor, is matrix) in first-use order, deduplicated (tied embeddings are read twice).
        let mut list: Vec<(TensorId, bool)> = Vec::new();
        for node in &graph.nodes {
            for id in node.op.weights() {
                if list.iter().any(|&(t, _)| t == id) {
                    continue;
                }
                list.push((id, is_matrix_use(&node.op, id)));
            }
        }
        let size = |&(id, m): &(TensorId, bool)| -> Result<u64, GpuError> {
            let t = model.spec.tensor(id);
            if m {
                if type_geom(t.ty).is_none() {
                    return Err(GpuError::Unsupported(format!(
                        "tensor {} has type {}, which the CUDA backend cannot compute with",
                        t.name,
                        t.ty.name()
                    )));
                }
                Ok(model.file().tensor_data(t.file_index).len() as u64)
            } else {
                Ok(model.vector(id).len() as u64 * 4)
            }
        };
        let mut total = 0u64;
        for e in &list {
            total += size(e)?.div_ceil(256) * 256;
        }
        let dev = &gpu.dev;
        let region = dev.create_region(RegionKind::Weights, "weights", total)?;
        let mut tensors = HashMap::new();
        let copy = dev.copy_stream().clone();
        for e in &list {
            let (id, m) = *e;
            let t = model.spec.tensor(id);
            let buf = dev.alloc(region, size(e)?, &t.name)?;
            if m {
                dev.upload(&copy, buf.ptr, model.file().tensor_data(t.file_index))?;
            } else {
                let v: Vec<u8> = model
                    .vector(id)
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                dev.upload(&copy, buf.ptr, &v)?;
            }
            tensors.insert(id, buf);
        }
        Ok(GpuWeights {
            tensors,
            region,
            bytes: total,
        })
    }

    fn get(&self, id: TensorId) -> u64 {
        self.tensors[&id].ptr
    }

    /// The weights region.
    pub fn region(&self) -> RegionId {
        self.region
    }
}

/// Per-layer f16 K and V caches in VRAM, `[n_ctx, n_kv · head_dim]` each (slot = position).
pub struct GpuKv {
    layers: Vec<(DevBuf, DevBuf)>,
    n_ctx: usize,
    /// Bytes of all layers.
    pub bytes: u64,
}

impl GpuKv {
    /// Allocates the cache for `n_ctx` positions.
    pub fn new(gpu: &Gpu, model: &Model, n_ctx: usize) -> Result<GpuKv, GpuError> {
        let h = &model.spec.hparams;
        let kb = (n_ctx * h.n_head_kv * h.head_dim_k * 2) as u64;
        let vb = (n_ctx * h.n_head_kv * h.head_dim_v * 2) as u64;
        let per = kb.div_ceil(256) * 256 + vb.div_ceil(256) * 256;
        let n_layer = model.spec.layers.len();
        let region = gpu
            .dev
            .create_region(RegionKind::Kv, "kv", per * n_layer as u64)?;
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let k = gpu.dev.alloc(region, kb, &format!("layer {l} K cache"))?;
            let v = gpu.dev.alloc(region, vb, &format!("layer {l} V cache"))?;
            layers.push((k, v));
        }
        Ok(GpuKv {
            layers,
            n_ctx,
            bytes: per * n_layer as u64,
        })
    }
}

/// What a per-op GPU time is accumulated under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpKey {
    /// Op kind ([`Op::kind`]).
    pub op: &'static str,
    /// Weight type (matmuls, embeddings, expert FFNs).
    pub quant: Option<GgmlType>,
    /// Weight shape `[rows, cols]` (expert FFNs: one expert's gate matrix `[n_ff, n_embd]`).
    pub shape: Option<[usize; 2]>,
    /// Tokens of the program (its batch).
    pub n_tokens: usize,
    /// Rows the op computed: `n_tokens`, except after the logit-row selection (e.g. 1 for the
    /// output projection of a prompt step that only needs the last token's logits).
    pub rows: usize,
}

/// Accumulated GPU time of one [`OpKey`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    /// Steps timed.
    pub calls: u64,
    /// Seconds between the events around those steps on the compute stream.
    pub seconds: f64,
}

fn merge_times(into: &mut HashMap<OpKey, OpTime>, from: &HashMap<OpKey, OpTime>) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_default();
        e.calls += v.calls;
        e.seconds += v.seconds;
    }
}

fn event_err<E: std::fmt::Debug>(call: &'static str) -> impl Fn(E) -> GpuError {
    move |e| {
        GpuError::Cuda(CudaError::Driver {
            call,
            err: format!("{e:?}"),
        })
    }
}

/// One program with its device buffers.
pub struct GpuRunner {
    program: Program,
    region: RegionId,
    bufs: Vec<DevBuf>,
    tokens: DevBuf,
    positions: DevBuf,
    logit_rows: DevBuf,
    gemm: Option<GemmScratch>,
    attn_part: DevBuf,
    moe: Option<[DevBuf; 4]>,
    moe_grouped: Option<[DevBuf; 3]>,
    /// Exact-activation mode: quantized weights take the f16 GEMM path at every batch size
    /// (experts: the grouped path), never the int8 GEMV (see [`GpuEngine::set_exact_activations`]).
    exact: bool,
    /// How each step runs: its own op, its GEMV on activations the step before quantized, as a
    /// fused launch covering the next steps too, or not at all (covered by a fused launch).
    step_runs: Vec<StepRun>,
    graph: Option<CapturedGraph>,
    runs: usize,
    logits: Vec<f32>,
    op_timing: bool,
    op_times: HashMap<OpKey, OpTime>,
}

/// Scratch needs of a program.
struct Needs {
    gemm_w: u64,
    gemm_x: u64,
    attn: u64,
    moe_ff: u64,
    moe_out: u64,
    /// Grouped expert path (prefill): f16 rows sorted by expert, the pairs' sorted order, the
    /// per-expert row and tile offsets.
    moe_x16: u64,
    moe_idx: u64,
    moe_offsets: u64,
}

fn needs(gpu: &Gpu, model: &Model, p: &Program, n_ctx: usize, exact: bool) -> Needs {
    let g = &p.graph;
    let mut n = Needs {
        gemm_w: 0,
        gemm_x: 0,
        attn: 0,
        moe_ff: 0,
        moe_out: 0,
        moe_x16: 0,
        moe_idx: 0,
        moe_offsets: 0,
    };
    for node in &g.nodes {
        match node.op {
            Op::MatMul { weight, x, .. } => {
                let rows = g.rows(x);
                let t = model.spec.tensor(weight);
                if rows > GEMV_MAX_ROWS || (exact && t.ty.is_quantized()) {
                    let (wb, xb) = GemmScratch::bytes(t.rows(), t.cols(), rows);
                    n.gemm_w = n.gemm_w.max(wb);
                    n.gemm_x = n.gemm_x.max(xb);
                }
            }
            Op::Attention {
                n_head,
                n_head_kv,
                head_dim_k,
                head_dim_v,
                ..
            } => {
                let a = AttnParams {
                    n_head,
                    n_kv: n_head_kv,
                    dk: head_dim_k,
                    dv: head_dim_v,
                    n_ctx,
                    scale: 1.0,
                    softcap: 0.0,
                    window: 0,
                };
                n.attn = n
                    .attn
                    .max(gpu.kernels.attention_scratch(&a, g.rows(node_q(&node.op))) as u64);
            }
            Op::MoeFfn {
                x,
                route,
                gate_exps,
                ..
            } => {
                let pairs = g.rows(x) * g.buffer(route).cols / 2;
                let ff = model.spec.tensor(gate_exps).rows();
                n.moe_ff = n.moe_ff.max((pairs * ff * 4) as u64);
                n.moe_out = n.moe_out.max((pairs * g.buffer(x).cols * 4) as u64);
                if pairs > MOE_GEMV_MAX_PAIRS || exact {
                    let d = g.buffer(x).cols;
                    let n_expert = model.spec.tensor(gate_exps).n_mats();
                    n.moe_x16 = n.moe_x16.max((pairs * d.max(ff) * 2) as u64);
                    n.moe_idx = n.moe_idx.max((pairs * 4) as u64);
                    n.moe_offsets = n.moe_offsets.max((2 * (n_expert + 2) * 4) as u64);
                }
            }
            _ => {}
        }
    }
    n
}

/// How a step of a GPU program runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum StepRun {
    /// Its own op.
    Op,
    /// Its own int8 GEMV, on the activations the step before quantized.
    OpReusingActs,
    /// Nothing: a fused launch at an earlier step covers it.
    Covered,
    /// The q and k heads' per-head norms (optional) and rotary embeddings of the next steps, in
    /// one launch (`qk_norm_rope`).
    QkNormRope {
        q: BufId,
        k: BufId,
        /// (q norm weight, k norm weight, eps).
        norm: Option<(TensorId, TensorId, f32)>,
        rope: FusedRope,
    },
}

/// The rotary embedding shared by q and k in a fused step.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FusedRope {
    head_dim: usize,
    params: pshard_model::graph::RopeParams,
}

/// How each step of `p` runs: GEMVs flagged in `reuse` reuse the quantized activations of the
/// step before; the per-head norms and rotary embeddings of q and k that the graph emits back to
/// back (`HeadRmsNorm q, HeadRmsNorm k, Rope q, Rope k`, or just the two `Rope`s) become one
/// launch at the first of them.
fn plan_steps(p: &Program, reuse: &[bool]) -> Vec<StepRun> {
    let g = &p.graph;
    let op = |i: usize| p.steps.get(i).map(|st| &g.nodes[st.node].op);
    let mut runs: Vec<StepRun> = reuse
        .iter()
        .map(|&r| {
            if r {
                StepRun::OpReusingActs
            } else {
                StepRun::Op
            }
        })
        .collect();
    let ropes = |i: usize| match (op(i), op(i + 1)) {
        (
            Some(&Op::Rope {
                x: q,
                head_dim,
                rope,
            }),
            Some(&Op::Rope {
                x: k,
                head_dim: hd2,
                rope: rope2,
            }),
        ) if q != k && head_dim == hd2 && rope == rope2 => Some((
            q,
            k,
            FusedRope {
                head_dim,
                params: rope,
            },
        )),
        _ => None,
    };
    let mut i = 0;
    while i < runs.len() {
        let norms = match (op(i), op(i + 1)) {
            (
                Some(&Op::HeadRmsNorm {
                    x: q,
                    weight: qn,
                    head_dim,
                    eps,
                }),
                Some(&Op::HeadRmsNorm {
                    x: k,
                    weight: kn,
                    head_dim: hd2,
                    eps: eps2,
                }),
            ) if head_dim == hd2 && eps == eps2 => Some((q, k, qn, kn, eps, head_dim)),
            _ => None,
        };
        if let Some((q, k, qn, kn, eps, hd)) = norms {
            if let Some((rq, rk, rope)) = ropes(i + 2) {
                if (rq, rk) == (q, k) && rope.head_dim == hd {
                    runs[i] = StepRun::QkNormRope {
                        q,
                        k,
                        norm: Some((qn, kn, eps)),
                        rope,
                    };
                    runs[i + 1..i + 4].fill(StepRun::Covered);
                    i += 4;
                    continue;
                }
            }
        }
        if let Some((q, k, rope)) = ropes(i) {
            runs[i] = StepRun::QkNormRope {
                q,
                k,
                norm: None,
                rope,
            };
            runs[i + 1] = StepRun::Covered;
            i += 2;
            continue;
        }
        i += 1;
    }
    runs
}

/// For each step of `p`: whether it is an int8 GEMV whose activations the step before (an int8
/// GEMV of the same input buffer, same partner format) has just quantized, so it can reuse them
/// (see [`pshard_kernels::cuda::CudaKernels::gemv_prequantized`]). Never in exact mode.
fn shared_gemv_inputs(model: &Model, p: &Program, exact: bool) -> Vec<bool> {
    let g = &p.graph;
    // (input buffer, partner format) of an int8-GEMV step.
    let int8_gemv = |op: &Op| match *op {
        Op::MatMul { weight, x, .. } if !exact && g.rows(x) <= GEMV_INT8_MAX_ROWS => {
            let ty = model.spec.tensor(weight).ty;
            let act = pshard_kernels::quant::kernel(ty).map(|k| k.act)?;
            (ty.is_quantized() && act != pshard_kernels::quant::ActFormat::F32).then_some((x, act))
        }
        _ => None,
    };
    let inputs: Vec<_> = p
        .steps
        .iter()
        .map(|st| int8_gemv(&g.nodes[st.node].op))
        .collect();
    (0..inputs.len())
        .map(|i| i > 0 && inputs[i].is_some() && inputs[i] == inputs[i - 1])
        .collect()
}

fn node_q(op: &Op) -> BufId {
    match op {
        Op::Attention { q, .. } => *q,
        _ => unreachable!("only called on attention nodes"),
    }
}

/// (token, expert) pairs up to which MoE experts run as one GEMV per pair, in one launch per
/// matrix. Above, the pairs are sorted by expert on the device and every matrix is one grouped GEMM
/// that decodes each used expert once per tile of its tokens (`moe_gemm`): reading an expert once
/// per pair costs more from about 32 tokens × 8 experts on the H200. The planner's
/// cost model mirrors it (`pshard_planner::costtable::GPU_MOE_GEMV_MAX_PAIRS`).
pub const MOE_GEMV_MAX_PAIRS: usize = 256;

/// Batches at or below this many tokens are captured as CUDA graphs (decode).
pub const GRAPH_MAX_TOKENS: usize = 4;

impl GpuRunner {
    /// Lowers the model's graph for `n_tokens` / `n_logit_rows` onto the GPU lane and allocates its
    /// buffers in a region of their own; `exact` selects exact-activation mode (see
    /// [`GpuEngine::set_exact_activations`]).
    pub fn new(
        gpu: &Gpu,
        model: &Model,
        n_tokens: usize,
        n_logit_rows: usize,
        n_ctx: usize,
        exact: bool,
    ) -> Result<GpuRunner, GpuError> {
        let graph = pshard_model::arch::build_graph(&model.spec, n_tokens, n_logit_rows)?;
        let program = Program::lower(graph, |_| Lane::GpuCompute, MemSpace::Device);
        let nd = needs(gpu, model, &program, n_ctx, exact);
        let al = |b: u64| b.max(4).div_ceil(256) * 256;
        let mut total: u64 = program.buffers.iter().map(|b| al(b.bytes as u64)).sum();
        total += 3 * al((n_tokens * 4) as u64);
        total += al(nd.gemm_w) + al(nd.gemm_x) + al(nd.attn) + 3 * al(nd.moe_ff) + al(nd.moe_out);
        if nd.moe_x16 > 0 {
            total += al(nd.moe_x16) + al(nd.moe_idx) + al(nd.moe_offsets);
        }
        let dev = &gpu.dev;
        let region =
            dev.create_region(RegionKind::Scratch, &format!("program n={n_tokens}"), total)?;
        let mut bufs = Vec::with_capacity(program.buffers.len());
        for (i, b) in program.buffers.iter().enumerate() {
            bufs.push(dev.alloc(region, b.bytes.max(4) as u64, program.graph.buffers[i].name)?);
        }
        let tokens = dev.alloc(region, (n_tokens * 4) as u64, "token ids")?;
        let positions = dev.alloc(region, (n_tokens * 4) as u64, "positions")?;
        let logit_rows = dev.alloc(region, (n_tokens * 4) as u64, "logit rows")?;
        let gemm = if nd.gemm_w > 0 {
            let w = dev.alloc(region, nd.gemm_w, "dequantized weight scratch")?;
            let x = dev.alloc(region, nd.gemm_x, "f16 activation scratch")?;
            Some(GemmScratch {
                weights: w.ptr,
                acts: x.ptr,
            })
        } else {
            None
        };
        let attn_part = dev.alloc(region, nd.attn.max(4), "attention split scratch")?;
        let moe = if nd.moe_ff > 0 {
            Some([
                dev.alloc(region, nd.moe_ff, "expert gate")?,
                dev.alloc(region, nd.moe_ff, "expert up")?,
                dev.alloc(region, nd.moe_ff, "expert hidden")?,
                dev.alloc(region, nd.moe_out, "expert out")?,
            ])
        } else {
            None
        };
        let moe_grouped = if nd.moe_x16 > 0 {
            Some([
                dev.alloc(region, nd.moe_x16, "expert f16 rows")?,
                dev.alloc(region, nd.moe_idx, "expert pair order")?,
                dev.alloc(region, nd.moe_offsets, "expert offsets")?,
            ])
        } else {
            None
        };
        let n_logits = program.graph.n_logit_rows * model.spec.hparams.n_vocab;
        let step_runs = plan_steps(&program, &shared_gemv_inputs(model, &program, exact));
        Ok(GpuRunner {
            program,
            region,
            bufs,
            tokens,
            positions,
            logit_rows,
            gemm,
            attn_part,
            moe,
            moe_grouped,
            exact,
            step_runs,
            graph: None,
            runs: 0,
            logits: vec![0f32; n_logits],
            op_timing: false,
            op_times: HashMap::new(),
        })
    }

    /// The program.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Whether this runner replays a captured CUDA graph.
    pub fn uses_graph(&self) -> bool {
        self.graph.is_some()
    }

    /// Turns per-op timing on or off. While on, [`Self::enqueue`] neither captures nor replays a
    /// CUDA graph, records a timing event between consecutive steps, waits for the last one and
    /// adds the elapsed times to [`Self::op_times`] (so it is synchronous).
    pub fn set_op_timing(&mut self, on: bool) {
        self.op_timing = on;
    }

    /// GPU time per op key accumulated while timing was on.
    pub fn op_times(&self) -> &HashMap<OpKey, OpTime> {
        &self.op_times
    }

    /// Forgets the accumulated op times.
    pub fn clear_op_times(&mut self) {
        self.op_times.clear();
    }

    /// The key a step's time is accumulated under.
    fn op_key(&self, model: &Model, op: &Op) -> OpKey {
        let g = &self.program.graph;
        let rows = op.writes().first().map_or(g.n_tokens, |&b| g.rows(b));
        let weight = match *op {
            Op::MatMul { weight, .. } | Op::Embed { table: weight, .. } => Some(weight),
            Op::MoeFfn { gate_exps, .. } => Some(gate_exps),
            _ => None,
        };
        let (quant, shape) = match weight {
            Some(id) => {
                let t = model.spec.tensor(id);
                (Some(t.ty), Some([t.rows(), t.cols()]))
            }
            None => (None, None),
        };
        OpKey {
            op: op.kind(),
            quant,
            shape,
            n_tokens: g.n_tokens,
            rows,
        }
    }

    /// Runs one batch and returns the logits (`n_logit_rows × n_vocab`).
    pub fn run(
        &mut self,
        gpu: &Gpu,
        w: &GpuWeights,
        kv: &GpuKv,
        model: &Model,
        input: &BatchInput,
    ) -> Result<&[f32], GpuError> {
        self.enqueue(gpu, w, kv, model, input)?;
        let dev = &gpu.dev;
        let lb = self.bufs[self.program.graph.logits.0 as usize];
        let mut bytes = vec![0u8; self.logits.len() * 4];
        dev.download(gpu.stream(), &mut bytes, lb.ptr)?;
        for (o, c) in self.logits.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(&self.logits)
    }

    /// Uploads the inputs and enqueues the whole forward pass (no wait).
    pub fn enqueue(
        &mut self,
        gpu: &Gpu,
        w: &GpuWeights,
        kv: &GpuKv,
        model: &Model,
        input: &BatchInput,
    ) -> Result<(), GpuError> {
        input
            .check(&self.program.graph, model.spec.hparams.n_vocab)
            .map_err(|e| GpuError::Shape(e.to_string()))?;
        let g = &self.program.graph;
        if let Some(&p) = input.positions.iter().find(|&&p| p as usize >= kv.n_ctx) {
            return Err(GpuError::ContextFull {
                needed: p as usize + 1,
                n_ctx: kv.n_ctx,
            });
        }
        if input.route_override.is_some() {
            return Err(GpuError::Unsupported(
                "forced MoE routes are only supported on the CPU".into(),
            ));
        }
        let s = gpu.stream();
        let dev = &gpu.dev;
        let as_bytes = |v: &mut dyn Iterator<Item = i32>| -> Vec<u8> {
            v.flat_map(|x| x.to_le_bytes()).collect()
        };
        dev.upload(
            s,
            self.tokens.ptr,
            &as_bytes(&mut input.tokens.iter().map(|&t| t as i32)),
        )?;
        dev.upload(
            s,
            self.positions.ptr,
            &as_bytes(&mut input.positions.iter().map(|&p| p as i32)),
        )?;
        dev.upload(
            s,
            self.logit_rows.ptr,
            &as_bytes(&mut input.logit_rows.iter().map(|&r| r as i32)),
        )?;
        if self.op_timing {
            self.record_timed(gpu, w, kv, model)?;
            self.runs += 1;
            return Ok(());
        }
        // Exact-activation mode is a checking mode: its cuBLAS calls are not captured.
        let small = g.n_tokens <= GRAPH_MAX_TOKENS
            && !self.exact
            && std::env::var_os("PSHARD_NO_CUDA_GRAPH").is_none();
        if small && self.graph.is_none() && self.runs >= 1 {
            let graph =
                CapturedGraph::capture(dev, s, || self.record(gpu, w, kv, model).map_err(to_cuda))?;
            self.graph = Some(graph);
        }
        match &self.graph {
            Some(graph) => graph.launch(s)?,
            None => self.record(gpu, w, kv, model)?,
        }
        self.runs += 1;
        Ok(())
    }

    /// Enqueues every step on the compute stream.
    fn record(&self, gpu: &Gpu, w: &GpuWeights, kv: &GpuKv, model: &Model) -> Result<(), GpuError> {
        for i in 0..self.program.steps.len() {
            self.exec_step(gpu, w, kv, model, i)?;
        }
        Ok(())
    }

    /// Enqueues step `i` as [`Self::step_runs`] says.
    fn exec_step(
        &self,
        gpu: &Gpu,
        w: &GpuWeights,
        kv: &GpuKv,
        model: &Model,
        i: usize,
    ) -> Result<(), GpuError> {
        let node = &self.program.graph.nodes[self.program.steps[i].node];
        match self.step_runs[i] {
            StepRun::Op => self.exec(gpu, w, kv, model, &node.op, false),
            StepRun::OpReusingActs => self.exec(gpu, w, kv, model, &node.op, true),
            StepRun::Covered => Ok(()),
            StepRun::QkNormRope { q, k, norm, rope } => {
                let g = &self.program.graph;
                let (rows, hd) = (g.rows(q), rope.head_dim);
                let args = RopeArgs {
                    head_dim: hd,
                    n_dims: rope.params.n_dims,
                    mode: match rope.params.mode {
                        RopeMode::Adjacent => RopeKind::Adjacent,
                        RopeMode::Neox => RopeKind::Neox,
                    },
                    base: rope.params.base,
                    pos_scale: rope.params.pos_scale,
                    freq_factors: rope.params.freq_factors.map(|f| w.get(f)),
                };
                gpu.kernels.qk_norm_rope(
                    self.b(q),
                    self.b(k),
                    norm.map(|(qn, kn, eps)| (w.get(qn), w.get(kn), eps)),
                    self.positions.ptr,
                    rows,
                    g.buffer(q).cols / hd,
                    g.buffer(k).cols / hd,
                    &args,
                    gpu.stream(),
                )?;
                Ok(())
            }
        }
    }

    /// Steps that launch something (the others are covered by a fused launch).
    pub fn launched_steps(&self) -> usize {
        self.step_runs
            .iter()
            .filter(|r| !matches!(r, StepRun::Covered))
            .count()
    }

    /// [`Self::record`] with a timing event before the first step and after every step; waits
    /// for the last event and accumulates each step's elapsed time under its [`OpKey`].
    fn record_timed(
        &mut self,
        gpu: &Gpu,
        w: &GpuWeights,
        kv: &GpuKv,
        model: &Model,
    ) -> Result<(), GpuError> {
        let s = gpu.stream();
        let n = self.program.steps.len();
        let events = (0..=n)
            .map(|_| gpu.dev.event(true))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, event) in events.iter().enumerate().take(n) {
            event
                .record(s)
                .map_err(event_err("recording a timing event"))?;
            self.exec_step(gpu, w, kv, model, i)?;
        }
        events[n]
            .record(s)
            .map_err(event_err("recording a timing event"))?;
        events[n]
            .synchronize()
            .map_err(event_err("waiting for a timing event"))?;
        for i in 0..n {
            let ms = events[i]
                .elapsed_ms(&events[i + 1])
                .map_err(event_err("reading a timing event"))?;
            let node = &self.program.graph.nodes[self.program.steps[i].node];
            let mut key = self.op_key(model, &node.op);
            match self.step_runs[i] {
                StepRun::Covered => continue,
                StepRun::QkNormRope { norm, .. } => {
                    key.op = if norm.is_some() {
                        "qk_norm+rope"
                    } else {
                        "rope q+k"
                    }
                }
                _ => {}
            }
            let e = self.op_times.entry(key).or_default();
            e.calls += 1;
            e.seconds += f64::from(ms) * 1e-3;
        }
        Ok(())
    }

    fn b(&self, id: BufId) -> u64 {
        self.bufs[id.0 as usize].ptr
    }

    fn exec(
        &self,
        gpu: &Gpu,
        w: &GpuWeights,
        kv: &GpuKv,
        model: &Model,
        op: &Op,
        reuse_acts: bool,
    ) -> Result<(), GpuError> {
        let g = &self.program.graph;
        let k = &gpu.kernels;
        let s = gpu.stream();
        let n = g.n_tokens;
        let cols = |b: BufId| g.buffer(b).cols;
        match *op {
            Op::Embed { table, out, scale } => {
                let t = model.spec.tensor(table);
                k.get_rows(
                    t.ty,
                    w.get(table),
                    t.cols(),
                    self.tokens.ptr,
                    n,
                    self.b(out),
                    cols(out),
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
                    self.b(x),
                    w.get(weight),
                    self.b(out),
                    g.rows(x),
                    cols(x),
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
                    self.b(x),
                    w.get(weight),
                    g.rows(x),
                    cols(x) / head_dim,
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
                let (wp, bp) = (w.get(weight), bias.map(|b| w.get(b)));
                let (xp, op, n) = (self.b(x), self.b(out), g.rows(x));
                let partner = pshard_kernels::quant::kernel(t.ty).map(|q| q.act);
                match self.gemm {
                    _ if reuse_acts => k.gemv_prequantized(
                        t.ty,
                        k.quantized_acts(partner.expect("checked when planned")),
                        wp,
                        t.rows(),
                        t.cols(),
                        op,
                        cols(out),
                        n,
                        bp,
                        s,
                    )?,
                    _ => gpu.matmul(
                        t.ty,
                        wp,
                        t.cols(),
                        0,
                        t.rows(),
                        xp,
                        n,
                        op,
                        cols(out),
                        bp,
                        self.gemm,
                        // Exact mode: quantized weights always through the f16 GEMM.
                        self.exact && t.ty.is_quantized(),
                    )?,
                }
            }
            Op::Rope { x, head_dim, rope } => {
                let mode = match rope.mode {
                    RopeMode::Adjacent => RopeKind::Adjacent,
                    RopeMode::Neox => RopeKind::Neox,
                };
                k.rope(
                    self.b(x),
                    self.positions.ptr,
                    n,
                    cols(x) / head_dim,
                    head_dim,
                    rope.n_dims,
                    mode,
                    rope.base,
                    rope.pos_scale,
                    rope.freq_factors.map(|f| w.get(f)),
                    s,
                )?;
            }
            Op::Attention {
                layer,
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
            } => {
                let (kc, vc) = kv.layers[layer];
                let (kr, vr) = (n_head_kv * head_dim_k, n_head_kv * head_dim_v);
                k.kv_write(self.b(kb), cols(kb), kc.ptr, kr, self.positions.ptr, n, s)?;
                k.kv_write(self.b(v), cols(v), vc.ptr, vr, self.positions.ptr, n, s)?;
                let p = AttnParams {
                    n_head,
                    n_kv: n_head_kv,
                    dk: head_dim_k,
                    dv: head_dim_v,
                    n_ctx: kv.n_ctx,
                    scale,
                    softcap: softcap.unwrap_or(0.0),
                    window: window.unwrap_or(0),
                };
                k.attention(
                    &p,
                    self.b(q),
                    cols(q),
                    kc.ptr,
                    vc.ptr,
                    self.positions.ptr,
                    n,
                    self.b(out),
                    cols(out),
                    self.attn_part.ptr,
                    s,
                )?;
            }
            Op::Glu { gate, up, out, act } => {
                k.glu(
                    self.b(gate),
                    self.b(up),
                    self.b(out),
                    g.rows(gate) * cols(gate),
                    act == Activation::GeluTanh,
                    s,
                )?;
            }
            Op::Add { a, b, out } => {
                k.add(self.b(a), self.b(b), self.b(out), g.rows(a) * cols(a), s)?;
            }
            Op::SelectRows { x, out } => {
                k.select_rows(
                    self.b(x),
                    self.logit_rows.ptr,
                    self.b(out),
                    g.rows(out),
                    cols(x),
                    s,
                )?;
            }
            Op::MoeRoute {
                logits,
                out,
                n_expert,
                n_used,
                normalize,
            } => {
                k.moe_route(
                    self.b(logits),
                    g.rows(logits),
                    n_expert,
                    n_used,
                    normalize,
                    self.b(out),
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
            } => {
                let [hg, hu, hh, ho] = self.moe.expect("allocated for MoE programs");
                let n_used = cols(route) / 2;
                let rows = g.rows(x);
                let pairs = rows * n_used;
                let d = cols(x);
                let (gt, ut, dt) = (
                    model.spec.tensor(gate_exps),
                    model.spec.tensor(up_exps),
                    model.spec.tensor(down_exps),
                );
                let ff = gt.rows();
                let r = self.b(route);
                if let (true, Some(grp)) =
                    (pairs > MOE_GEMV_MAX_PAIRS || self.exact, self.moe_grouped)
                {
                    let exps = [(gate_exps, gt), (up_exps, ut), (down_exps, dt)];
                    return self.moe_grouped_ffn(
                        gpu,
                        w,
                        x,
                        route,
                        exps,
                        act,
                        out,
                        [hg, hu, hh, ho],
                        grp,
                    );
                }
                k.moe_gemv(
                    gt.ty,
                    w.get(gate_exps),
                    ff,
                    d,
                    self.b(x),
                    d,
                    n_used,
                    r,
                    n_used,
                    pairs,
                    hg.ptr,
                    ff,
                    s,
                )?;
                k.moe_gemv(
                    ut.ty,
                    w.get(up_exps),
                    ff,
                    d,
                    self.b(x),
                    d,
                    n_used,
                    r,
                    n_used,
                    pairs,
                    hu.ptr,
                    ff,
                    s,
                )?;
                k.glu(
                    hg.ptr,
                    hu.ptr,
                    hh.ptr,
                    pairs * ff,
                    act == Activation::GeluTanh,
                    s,
                )?;
                k.moe_gemv(
                    dt.ty,
                    w.get(down_exps),
                    d,
                    ff,
                    hh.ptr,
                    ff,
                    1,
                    r,
                    n_used,
                    pairs,
                    ho.ptr,
                    d,
                    s,
                )?;
                k.moe_combine(ho.ptr, r, n_used, self.b(out), rows, d, s)?;
            }
            Op::Softcap { x, cap } => {
                k.softcap(self.b(x), g.rows(x) * cols(x), cap, s)?;
            }
        }
        Ok(())
    }

    /// Expert FFNs of a prefill batch, grouped by expert, entirely on the device in a fixed
    /// number of launches (capturable; nothing is read back): the pairs are sorted by expert
    /// (`moe_sort`), their tokens' rows gathered as f16, and each matrix is one grouped GEMM over
    /// all experts with the weights decoded from their blocks on the fly (`moe_gemm`), so every
    /// used expert is read once per tile of its tokens instead of once per pair. The down
    /// projection scatters its rows straight back to pair order for `moe_combine`.
    #[allow(clippy::too_many_arguments)]
    fn moe_grouped_ffn(
        &self,
        gpu: &Gpu,
        w: &GpuWeights,
        x: BufId,
        route: BufId,
        exps: [(TensorId, &pshard_model::spec::TensorDesc); 3],
        act: Activation,
        out: BufId,
        [hg, hu, hh, ho]: [DevBuf; 4],
        [x16, order, offsets]: [DevBuf; 3],
    ) -> Result<(), GpuError> {
        let g = &self.program.graph;
        let (k, s) = (&gpu.kernels, gpu.stream());
        let rows = g.rows(x);
        let d = g.buffer(x).cols;
        let n_used = g.buffer(route).cols / 2;
        let pairs = rows * n_used;
        let ff = exps[0].1.rows();
        let n_expert = exps[0].1.n_mats();
        // Row offsets, then tile offsets, of the n_expert + 1 buckets.
        let tiles = offsets.ptr + ((n_expert + 2) * 4) as u64;
        k.moe_sort(
            self.b(route),
            rows,
            n_used,
            n_expert,
            offsets.ptr,
            tiles,
            order.ptr,
            s,
        )?;
        // x16[i] = f16(x[token of pair order[i]]), in launches of at most 65535 rows (grid.y).
        let mut i0 = 0;
        while i0 < pairs {
            let c = (pairs - i0).min(65535);
            k.gather_rows_f16(
                self.b(x),
                order.ptr + (i0 * 4) as u64,
                n_used,
                x16.ptr + (i0 * d * 2) as u64,
                c,
                d,
                s,
            )?;
            i0 += c;
        }
        for (j, dst) in [(0usize, hg), (1, hu)] {
            let (id, t) = exps[j];
            k.moe_gemm(
                t.ty,
                w.get(id),
                ff,
                d,
                n_expert,
                x16.ptr,
                offsets.ptr,
                tiles,
                pairs,
                dst.ptr,
                ff,
                None,
                s,
            )?;
        }
        k.glu(
            hg.ptr,
            hu.ptr,
            hh.ptr,
            pairs * ff,
            act == Activation::GeluTanh,
            s,
        )?;
        k.f32_to_f16(hh.ptr, x16.ptr, pairs * ff, s)?;
        let (id, t) = exps[2];
        // ho[order[i]] = W_e · hidden[i]: back in pair order.
        k.moe_gemm(
            t.ty,
            w.get(id),
            d,
            ff,
            n_expert,
            x16.ptr,
            offsets.ptr,
            tiles,
            pairs,
            ho.ptr,
            d,
            Some(order.ptr),
            s,
        )?;
        k.moe_combine(ho.ptr, self.b(route), n_used, self.b(out), rows, d, s)?;
        Ok(())
    }

    /// Frees the runner's buffers.
    pub fn release(self, gpu: &Gpu) -> Result<(), GpuError> {
        drop(self.graph);
        gpu.dev.arena()?.destroy_region(self.region)?;
        Ok(())
    }
}

fn to_cuda(e: GpuError) -> CudaError {
    match e {
        GpuError::Cuda(c) => c,
        other => CudaError::Invalid(other.to_string()),
    }
}

/// Model weights + KV cache + programs on one GPU, evaluating token sequences in ubatches
/// (the GPU counterpart of [`crate::engine::Engine`]).
pub struct GpuEngine {
    runners: HashMap<(usize, usize), GpuRunner>,
    kv: GpuKv,
    weights: GpuWeights,
    /// The GPU (dropped last).
    pub gpu: Gpu,
    ubatch: usize,
    n_past: usize,
    released_host_bytes: u64,
    op_timing: bool,
    exact: bool,
    /// Op times of runners released since the last reset of the times.
    retired_times: HashMap<OpKey, OpTime>,
}

impl GpuEngine {
    /// Opens the GPU, uploads the model's weights and allocates a KV cache of `n_ctx` positions.
    pub fn new(
        model: &Model,
        n_ctx: usize,
        ubatch: usize,
        opts: &GpuOptions,
    ) -> Result<GpuEngine, GpuError> {
        let cache = opts
            .cache_dir
            .clone()
            .unwrap_or_else(pshard_kernels::cuda::nvrtc::default_cache_dir);
        let gpu = Gpu::open(opts.ordinal, opts.vram_budget, &cache)?;
        let weights = GpuWeights::upload(&gpu, model)?;
        let mut released = 0u64;
        if !opts.keep_host_weights {
            for id in weights.tensors.keys() {
                let t = model.spec.tensor(*id);
                // Best effort: a failed madvise only means the pages stay resident.
                released += model.file().release_pages(t.file_index).unwrap_or(0);
            }
        }
        let kv = GpuKv::new(&gpu, model, n_ctx)?;
        Ok(GpuEngine {
            runners: HashMap::new(),
            kv,
            weights,
            gpu,
            ubatch: ubatch.clamp(1, n_ctx.max(1)),
            n_past: 0,
            released_host_bytes: released,
            op_timing: false,
            exact: false,
            retired_times: HashMap::new(),
        })
    }

    /// Turns per-op GPU timing on or off for every program (see [`GpuRunner::set_op_timing`]):
    /// while on, no CUDA graph is used and every evaluation waits for its timing events, so
    /// turn it on for a dedicated pass only.
    pub fn set_op_timing(&mut self, on: bool) {
        self.op_timing = on;
        for r in self.runners.values_mut() {
            r.set_op_timing(on);
        }
    }

    /// Exact-activation mode (off by default), the GPU counterpart of the CPU engine's
    /// (`Engine::set_exact_activations`): matmuls with quantized weights take their activations
    /// in f16 through the dequantize + cuBLAS path at every batch size (MoE experts: the grouped
    /// path), instead of rounding them to 8 bits for the int8 GEMV in small batches; no CUDA
    /// graphs. Slower; a checking mode that compares decode with the CPU without the 8-bit
    /// rounding on either side. Programs are rebuilt; the KV cache is kept.
    pub fn set_exact_activations(&mut self, on: bool) -> Result<(), GpuError> {
        if on != self.exact {
            self.exact = on;
            for (_, r) in self.runners.drain() {
                merge_times(&mut self.retired_times, r.op_times());
                r.release(&self.gpu)?;
            }
        }
        Ok(())
    }

    /// Whether per-op timing is on.
    pub fn op_timing(&self) -> bool {
        self.op_timing
    }

    /// GPU time per op key accumulated while timing was on (over all programs), largest total
    /// first.
    pub fn op_times(&self) -> Vec<(OpKey, OpTime)> {
        let mut all = self.retired_times.clone();
        for r in self.runners.values() {
            merge_times(&mut all, r.op_times());
        }
        let mut v: Vec<(OpKey, OpTime)> = all.into_iter().collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds).then(a.0.cmp(&b.0)));
        v
    }

    /// Forgets the accumulated op times.
    pub fn clear_op_times(&mut self) {
        self.retired_times.clear();
        for r in self.runners.values_mut() {
            r.clear_op_times();
        }
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Positions evaluated so far.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Context size.
    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx
    }

    /// Bytes of weights in VRAM.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes
    }

    /// Bytes of the KV cache in VRAM.
    pub fn kv_bytes(&self) -> u64 {
        self.kv.bytes
    }

    /// A few lines for logs: device, context overhead, NVRTC cache, VRAM regions.
    pub fn report(&self) -> String {
        let i = self.gpu.dev.info();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "gpu: {} ({}, {} SMs), CUDA context overhead {:.0} MiB\ngpu: {}\n",
            i.name,
            i.arch(),
            i.sm_count,
            mib(i.context_overhead),
            self.gpu.kernels.build_summary()
        );
        if let Ok(regions) = self.gpu.dev.vram_report() {
            let total: u64 = regions.iter().map(|r| r.capacity).sum();
            s += &format!("gpu: VRAM used {:.0} MiB:", mib(total));
            for r in regions {
                s += &format!(" {} {:.0} MiB;", r.name, mib(r.capacity));
            }
        }
        s += &format!(
            "\ngpu: released {:.0} MiB of host weight pages after upload",
            mib(self.released_host_bytes)
        );
        s
    }

    /// Evaluates `tokens` after the current sequence; returns logits of the last token (`Last`) or
    /// of every token (`All`, row-major `tokens.len() × n_vocab`).
    pub fn eval(
        &mut self,
        model: &Model,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, GpuError> {
        if tokens.is_empty() {
            return Err(GpuError::Shape("no tokens to evaluate".into()));
        }
        if self.n_past + tokens.len() > self.kv.n_ctx {
            return Err(GpuError::ContextFull {
                needed: self.n_past + tokens.len(),
                n_ctx: self.kv.n_ctx,
            });
        }
        let n_vocab = model.spec.hparams.n_vocab;
        let mut all = Vec::new();
        let mut last = Vec::new();
        for chunk in tokens.chunks(self.ubatch) {
            let n = chunk.len();
            let logit_rows: Vec<usize> = match which {
                Logits::All => (0..n).collect(),
                Logits::Last => vec![n - 1],
            };
            let logits = self
                .ubatch(model, chunk, &logit_rows, true)?
                .expect("read back when asked");
            match which {
                Logits::All => all.extend_from_slice(logits),
                Logits::Last => {
                    last.clear();
                    last.extend_from_slice(&logits[..n_vocab]);
                }
            }
        }
        Ok(if which == Logits::All { all } else { last })
    }

    /// Enqueues one batch without reading logits back (for benchmarks; call [`Self::sync`]).
    pub fn eval_async(&mut self, model: &Model, tokens: &[u32]) -> Result<(), GpuError> {
        let n = tokens.len();
        if n == 0 || n > self.ubatch {
            return Err(GpuError::Shape(format!(
                "eval_async takes 1..={} tokens, got {n}",
                self.ubatch
            )));
        }
        if self.n_past + n > self.kv.n_ctx {
            return Err(GpuError::ContextFull {
                needed: self.n_past + n,
                n_ctx: self.kv.n_ctx,
            });
        }
        self.ubatch(model, tokens, &[n - 1], false)?;
        Ok(())
    }

    /// Runs one ubatch after the current sequence with its program (created on first use):
    /// waits and returns the logits of `logit_rows` when `read`, else only enqueues it.
    fn ubatch(
        &mut self,
        model: &Model,
        tokens: &[u32],
        logit_rows: &[usize],
        read: bool,
    ) -> Result<Option<&[f32]>, GpuError> {
        let n = tokens.len();
        let positions: Vec<u32> = (self.n_past..self.n_past + n).map(|p| p as u32).collect();
        let input = BatchInput {
            tokens,
            positions: &positions,
            logit_rows,
            route_override: None,
        };
        let runner = get_runner(
            &mut self.runners,
            &mut self.retired_times,
            (self.op_timing, self.exact),
            &self.gpu,
            model,
            (n, logit_rows.len()),
            self.kv.n_ctx,
            self.ubatch,
        )?;
        let logits = if read {
            Some(runner.run(&self.gpu, &self.weights, &self.kv, model, &input)?)
        } else {
            runner.enqueue(&self.gpu, &self.weights, &self.kv, model, &input)?;
            None
        };
        self.n_past += n;
        Ok(logits)
    }

    /// Waits for all enqueued work.
    pub fn sync(&self) -> Result<(), GpuError> {
        Ok(self.gpu.dev.synchronize()?)
    }
}

/// The runner for `key` = (n tokens, n logit rows), created on first use (with op timing and
/// exact-activation mode as given). At most 4 programs keep their buffers (the ubatch, decode and a tail or two); others
/// are released, their op times kept in `retired`.
#[allow(clippy::too_many_arguments)]
fn get_runner<'a>(
    runners: &'a mut HashMap<(usize, usize), GpuRunner>,
    retired: &mut HashMap<OpKey, OpTime>,
    (op_timing, exact): (bool, bool),
    gpu: &Gpu,
    model: &Model,
    key: (usize, usize),
    n_ctx: usize,
    ubatch: usize,
) -> Result<&'a mut GpuRunner, GpuError> {
    if !runners.contains_key(&key) {
        if runners.len() >= 4 {
            if let Some(victim) = runners.keys().copied().find(|k| k.0 != 1 && k.0 != ubatch) {
                if let Some(r) = runners.remove(&victim) {
                    merge_times(retired, r.op_times());
                    r.release(gpu)?;
                }
            }
        }
        let mut r = GpuRunner::new(gpu, model, key.0, key.1, n_ctx, exact)?;
        r.set_op_timing(op_timing);
        runners.insert(key, r);
    }
    Ok(runners.get_mut(&key).expect("inserted above"))
}

#[cfg(test)]
mod tests;
