//! The cost model: time and VRAM of one tier's op graph under a placement, priced from the lane
//! decisions of [`crate::lanes`] (which the runtime lowers and runs as they are).
//!
//! Per segment (the ops before the first layer, each layer, the ops after the last layer):
//! `time = max(compute, copy of the next segment's loads)`, where compute is the sum of its ops on
//! their lanes plus the activation copies before them, plus the copy back of the KV cells a
//! streamed-attention layer wrote. The copy lane prefetches the next streaming segment's weights
//! into the other ring slot and, for streamed attention, that layer's live KV cells (cyclically: the
//! first segment's copy overlaps the previous step's last segment). CPU matmuls that run while the
//! copy lane is busy keep their measured efficiency against the CPU's read rate while H2D runs (the
//! profile's `cpu_mem_while_h2d_gbs`), and the copy then runs at the H2D-while-CPU bandwidth. CPU
//! matmuls that the CPU lane runs as one pool job (a layer's q/k/v, its gate/up) pay the profile's
//! per-op fixed cost once. MoE expert bytes per step follow the expected number of distinct experts
//! and the CPU's expert matmuls the expected experts per token count ([`crate::routing`]).

use pshard_kernels::matmul::quantized_matmul_input;
use pshard_kernels::quant::ActFormat;
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::{Activation, BufId, Graph, Op};
use pshard_model::spec::{GroupId, ModelSpec};

use crate::costtable::{AttnShape, CostTable, GpuPath};
use crate::lanes::{self, AttnKv, Dir, Loc, NodePlan, Run, Segment};
use crate::placement::Placement;
use crate::profile::Lane;
use crate::routing;

/// Parameters every plan depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanParams {
    /// Context length per sequence (KV cells).
    pub n_ctx: usize,
    /// Parallel sequences (each gets `n_ctx` cells).
    pub parallel: usize,
    /// KV cache element type (F16; other types are refused when planning).
    pub kv_type: GgmlType,
    /// CPU threads.
    pub threads: usize,
    /// KV length assumed for decode tiers' attention.
    pub decode_depth: usize,
    /// Tokens already in the KV cache when a prefill batch runs (0: the prompt's first ubatch;
    /// later ubatches of a long prompt attend over the earlier ones too).
    pub prefill_past: usize,
    /// Logical batch size (prefill tiers reach at least min(max(n_batch, 16384), n_ctx)).
    pub n_batch: usize,
    /// Largest prefill tier, overriding the default.
    pub tier_max: Option<usize>,
    /// Slots of the streaming scratch ring.
    pub ring_slots: usize,
}

impl PlanParams {
    /// Defaults for a context length: one sequence, f16 KV, 16 threads.
    pub fn new(n_ctx: usize) -> PlanParams {
        PlanParams {
            n_ctx,
            parallel: 1,
            kv_type: GgmlType::F16,
            threads: 16,
            decode_depth: (n_ctx / 4).min(4096),
            prefill_past: 0,
            n_batch: 2048,
            tier_max: None,
            ring_slots: 2,
        }
    }

    /// The largest batch any tier runs (its KV ring of sliding-window layers must survive it).
    pub fn max_batch(&self) -> usize {
        crate::search::tiers(self).last().map_or(1, |t| t.n)
    }

    /// KV cells per sequence of layer `l` (see [`pshard_model::bytes::kv_cells`]).
    pub fn kv_cells(&self, spec: &ModelSpec, l: usize) -> usize {
        pshard_model::bytes::kv_cells(spec, l, self.n_ctx, self.max_batch())
    }
}

/// Bytes of one KV cell of one layer (K and V of every KV head), from the model's byte accounting.
pub fn kv_cell_bytes(spec: &ModelSpec, kv_type: GgmlType) -> f64 {
    if spec.layers.is_empty() {
        return 0.0;
    }
    pshard_model::bytes::kv_bytes_per_token_layer(spec, kv_type, 0) as f64
}

/// Bytes of layer `layer`'s KV cache for every sequence as one device allocation holds it (K then
/// V, each aligned): what a resident layer keeps in VRAM and what one staging buffer of a
/// streamed layer holds.
pub fn layer_kv_bytes(spec: &ModelSpec, layer: usize, p: &PlanParams) -> u64 {
    let cells = (p.kv_cells(spec, layer) * p.parallel.max(1)) as u64;
    let (kc, vc) = pshard_model::bytes::kv_cols(spec, layer);
    let k = pshard_model::bytes::kv_row_bytes(p.kv_type, kc);
    let v = pshard_model::bytes::kv_row_bytes(p.kv_type, vc);
    lanes::align(cells * k) + lanes::align(cells * v)
}

/// Timing facts of a weight read by a node.
#[derive(Clone, Debug)]
struct WeightTime {
    cpu: f64,
    cpu_conc: f64,
    gpu: f64,
}

#[derive(Clone, Debug)]
enum Kind {
    /// Matmuls (one weight) and expert FFNs (three).
    Weight(Vec<WeightTime>),
    /// Attention of a layer.
    Attention,
    /// Everything else (embedding, norms, routing, elementwise).
    Other,
}

#[derive(Clone, Debug)]
struct NodeInfo {
    kind: Kind,
    /// Columns of the node's output (for split ops).
    out_cols: usize,
    cpu: f64,
    gpu: f64,
}

/// One segment's lane decisions and cost.
#[derive(Clone, Debug)]
struct SegOut {
    plans: Vec<NodePlan>,
    slot_bytes: u64,
    /// Copy-lane bytes before the segment: its loads and streamed KV (placement alone decides).
    copy_in: f64,
    /// Activation bytes copied host→device and device→host, and KV cells written back.
    act_h2d: u64,
    act_d2h: u64,
    kv_down: u64,
    compute: f64,
    cpu_busy: bool,
    transfer_s: f64,
    exit: Vec<Loc>,
}

/// Result of costing one placement.
#[derive(Clone, Debug, PartialEq)]
pub struct Eval {
    /// Seconds per forward pass of the tier's batch.
    pub step_s: f64,
    /// Tokens per second.
    pub tps: f64,
    /// Bytes the copy lane brings in per step (streamed weights and KV).
    pub h2d_bytes: f64,
    /// Seconds of activation transfers per step.
    pub transfer_s: f64,
    /// Every byte one step copies host→device and device→host: weights, KV, activations, the
    /// step's inputs and the logits (what the runtime's copies add up to).
    pub copied: (u64, u64),
}

/// Evaluation state of one placement: per-segment results that [`Incremental::update`] refreshes
/// where a placement change can have an effect (the changed segments, and downstream segments only
/// while the buffer locations they start from differ).
#[derive(Debug)]
pub struct Incremental<'m, 'a> {
    m: &'m TierModel<'a>,
    outs: Vec<SegOut>,
}

impl Incremental<'_, '_> {
    /// Refreshes after the placements of `groups` changed in `pl`.
    pub fn update(&mut self, pl: &Placement, groups: &[GroupId]) {
        let n = self.outs.len();
        // A segment's CPU timing depends on whether the next one loads anything.
        let mut todo: Vec<usize> = groups
            .iter()
            .flat_map(|g| self.m.group_segs[g.0 as usize].iter().copied())
            .flat_map(|si| [si, (si + n - 1) % n])
            .collect();
        todo.sort_unstable();
        todo.dedup();
        let mut i = 0;
        let mut next = todo.first().copied();
        while let Some(si) = next {
            let entry = if si == 0 {
                lanes::entry_locs(self.m.graph)
            } else {
                self.outs[si - 1].exit.clone()
            };
            let out = self.m.segment(si, pl, entry);
            let exit_changed = out.exit != self.outs[si].exit;
            self.outs[si] = out;
            while i < todo.len() && todo[i] <= si {
                i += 1;
            }
            next = if exit_changed && si + 1 < n {
                Some(si + 1)
            } else {
                todo.get(i).copied()
            };
        }
    }

    /// The prediction.
    pub fn eval(&self) -> Eval {
        let m = self.m;
        let n = self.outs.len();
        let copy_in: Vec<f64> = self.outs.iter().map(|o| o.copy_in).collect();
        let (mut total, mut h2d_bytes, mut transfer_s) = (0.0, 0.0, 0.0);
        let (mut h2d, mut d2h) = (0u64, 0u64);
        for (si, out) in self.outs.iter().enumerate() {
            let next = copy_in[(si + 1) % n];
            h2d_bytes += next;
            h2d += out.copy_in as u64 + out.act_h2d;
            d2h += out.act_d2h + out.kv_down;
            transfer_s += out.transfer_s;
            let copy = if next > 0.0 {
                m.table.h2d(next, out.cpu_busy)
            } else {
                0.0
            };
            total += out.compute.max(copy);
        }
        // The logits come back to the host; a GPU step also uploads its inputs.
        if let Some(last) = self.outs.last() {
            let finals: u64 = lanes::final_moves(m.graph, &last.exit)
                .iter()
                .map(|mv| mv.bytes(m.graph))
                .sum();
            let x = m.table.d2h(finals as f64);
            total += x;
            transfer_s += x;
            d2h += finals;
        }
        if self.uses_gpu() {
            let x = m.table.h2d(m.input_bytes as f64, false);
            total += x;
            transfer_s += x;
            h2d += m.input_bytes;
        }
        let step_s = total.max(1e-12);
        Eval {
            step_s,
            tps: m.n_tokens as f64 / step_s,
            h2d_bytes,
            transfer_s,
            copied: (h2d, d2h),
        }
    }

    fn uses_gpu(&self) -> bool {
        self.outs
            .iter()
            .any(|o| o.plans.iter().any(|p| p.run.uses_gpu()))
    }

    /// The VRAM of this placement in this tier.
    pub fn bill(&self, pl: &Placement) -> TierBill {
        let m = self.m;
        if !self.uses_gpu() {
            return TierBill::default();
        }
        let spec = m.spec;
        let g = m.graph;
        let mut on = vec![false; g.buffers.len()];
        let mut scratch = lanes::DeviceScratch::default();
        let (mut kv, mut stage) = (0u64, 0u64);
        let mut slot = 0u64;
        let mut streaming = 0usize;
        for (si, out) in self.outs.iter().enumerate() {
            let nodes = m.segs[si].nodes.clone();
            for (ni, p) in nodes.clone().zip(&out.plans) {
                lanes::mark_device_buffers(g, ni, p, &mut on);
                if let (Op::Attention { layer, .. }, Some(k)) = (&g.nodes[ni].op, p.kv) {
                    match k {
                        AttnKv::Resident => kv += layer_kv_bytes(spec, *layer, m.params),
                        AttnKv::Streamed => {
                            stage = stage.max(layer_kv_bytes(spec, *layer, m.params))
                        }
                        AttnKv::Host => {}
                    }
                }
            }
            scratch = scratch.max(lanes::DeviceScratch::of(
                spec,
                g,
                nodes.zip(&out.plans),
                m.params.n_ctx,
                false,
            ));
            if out.slot_bytes > 0 {
                slot = slot.max(out.slot_bytes);
                streaming += 1;
            }
        }
        if let Some(last) = self.outs.last() {
            for mv in lanes::final_moves(g, &last.exit) {
                on[mv.buf.0 as usize] = true;
            }
        }
        let buffers = lanes::buffer_bytes(g, &on);
        let ring = slot * streaming.min(m.params.ring_slots.max(1)) as u64;
        TierBill {
            pinned_weights: lanes::pinned_bytes(spec, pl) + lanes::vector_bytes(spec),
            kv,
            compute: buffers + scratch.bytes(),
            scratch: ring + 2 * stage,
            context: m.table.ceil.cuda_context_bytes + pshard_kernels::cuda::WORKSPACE_BYTES,
        }
    }
}

/// VRAM of one tier's plan, split the way the registry bills it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierBill {
    /// Weights resident in VRAM: pinned matrices and every vector.
    pub pinned_weights: u64,
    /// KV of layers whose attention is pinned, at the full context.
    pub kv: u64,
    /// Activations, per-step inputs and kernel scratch at the tier's batch.
    pub compute: u64,
    /// Streaming ring (slots × largest segment's loads) plus staging of streamed attention's KV.
    pub scratch: u64,
    /// CUDA context and fixed device workspaces (0 when the plan does not touch the GPU).
    pub context: u64,
}

impl TierBill {
    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.pinned_weights + self.kv + self.compute + self.scratch + self.context
    }
}

/// A tier's graph prepared for costing many placements.
#[derive(Debug)]
pub struct TierModel<'a> {
    spec: &'a ModelSpec,
    table: &'a CostTable,
    params: &'a PlanParams,
    graph: &'a Graph,
    /// Tokens per step.
    pub n_tokens: usize,
    nodes: Vec<NodeInfo>,
    segs: Vec<Segment>,
    /// Expected fraction of experts touched per step (1 for dense models).
    pub moe_fraction: f64,
    /// Cells each sequence's attention has before the step (what streamed KV brings up).
    past_cells: usize,
    /// Sequences the batch's tokens belong to.
    seqs: usize,
    /// Segments whose decisions depend on each group.
    group_segs: Vec<Vec<usize>>,
    input_bytes: u64,
}

impl<'a> TierModel<'a> {
    /// Prepares a graph built for this tier (`graph.n_tokens` tokens).
    pub fn new(
        spec: &'a ModelSpec,
        table: &'a CostTable,
        params: &'a PlanParams,
        graph: &'a Graph,
        prefill: bool,
    ) -> TierModel<'a> {
        let n = graph.n_tokens.max(1);
        let h = &spec.hparams;
        let buf_bytes = |b: BufId| (graph.rows(b) * graph.buffer(b).cols * 4) as f64;
        let moe_fraction = if h.n_expert > 0 {
            let (e, k) = (h.n_expert as f64, h.n_expert_used as f64);
            routing::touched_fraction(h.n_expert, h.n_expert_used, n).clamp(k / e, 1.0)
        } else {
            1.0
        };
        // Sequences in the batch: prefill is one sequence; decode batches spread over the parallel ones.
        let seqs = if prefill {
            1
        } else {
            n.min(params.parallel.max(1))
        };
        // Keys each query attends (average over a causal prefill batch) and cells before the step.
        let (kv_read_cells, past_cells) = if prefill {
            (
                (params.prefill_past + n / 2).min(params.n_ctx),
                params.prefill_past.min(params.n_ctx),
            )
        } else {
            let d = params.decode_depth.min(params.n_ctx);
            (d, d)
        };
        let in_graph = n <= pshard_kernels::cuda::GRAPH_MAX_TOKENS;
        let mut expert_cpu = ExpertCpu::new(table, h.n_expert, h.n_expert_used);
        let mut nodes = Vec::with_capacity(graph.nodes.len());
        for node in &graph.nodes {
            let io_bytes: f64 = node
                .op
                .reads()
                .into_iter()
                .chain(node.op.writes())
                .map(buf_bytes)
                .sum();
            let ew_cpu = cpu_elementwise(table, graph, &node.op, io_bytes)
                .unwrap_or_else(|| table.elementwise(Lane::Cpu, io_bytes));
            let ew_gpu = if in_graph {
                table.gpu_elementwise_in_graph(io_bytes)
            } else {
                table.elementwise(Lane::Gpu, io_bytes)
            };
            let out_cols = node
                .op
                .writes()
                .first()
                .map_or(1, |b| graph.buffer(*b).cols);
            let (kind, cpu, gpu) = match &node.op {
                Op::Embed { table: t, .. } => {
                    let td = spec.tensor(*t);
                    let row = crate::costtable::weight_bytes(td.ty, 1, td.cols());
                    (
                        Kind::Other,
                        table.elementwise(Lane::Cpu, io_bytes + row * n as f64),
                        ew_gpu,
                    )
                }
                Op::MatMul { weight, x, .. } => {
                    let td = spec.tensor(*weight);
                    let b = graph.rows(*x);
                    (
                        Kind::Weight(vec![WeightTime {
                            cpu: table.cpu_matmul(td.ty, td.rows(), td.cols(), b, false),
                            cpu_conc: table.cpu_matmul(td.ty, td.rows(), td.cols(), b, true),
                            gpu: table.gpu_matmul(td.ty, td.rows(), td.cols(), b),
                        }]),
                        0.0,
                        0.0,
                    )
                }
                Op::MoeFfn {
                    gate_exps,
                    up_exps,
                    down_exps,
                    x,
                    ..
                } => {
                    let b = graph.rows(*x);
                    let e = h.n_expert.max(1) as f64;
                    let distinct = (e * moe_fraction).max(1.0);
                    let per_expert_batch =
                        ((b * h.n_expert_used) as f64 / distinct).ceil().max(1.0) as usize;
                    // CPU: the expert kernel multiplies each active expert's matrices at that
                    // expert's own token count, all experts in one pooled job: priced per token
                    // count ([`ExpertCpu::get`]).
                    // GPU, as the CUDA backend runs it: up to MOE_GEMV_MAX_PAIRS (token, expert)
                    // pairs one GEMV over every pair's matrix; above, the pairs are sorted by
                    // expert on the device and each matrix is one grouped GEMM over the used
                    // experts.
                    let pairs = b * h.n_expert_used.max(1);
                    let grouped = lanes::moe_grouped(pairs, false);
                    // The grouped path's own traffic around its three GEMMs, in five more
                    // launches: sort, gather of the pairs' rows to f16 (read f32, write f16),
                    // GLU (two f32 reads, one write), the hidden rows to f16, and the weighted
                    // combine reading every pair's output row.
                    let grouped_overhead = {
                        let gate = spec.tensor(*gate_exps);
                        let (d, ff, p) = (gate.cols() as f64, gate.rows() as f64, pairs as f64);
                        let bytes = p * d * 6.0 + p * ff * 12.0 + p * ff * 6.0 + p * d * 4.0;
                        5.0 * table.gpu_launch() + table.elementwise(Lane::Gpu, bytes)
                    };
                    let mut parts = Vec::new();
                    for (i, t) in [up_exps, gate_exps, down_exps].into_iter().enumerate() {
                        let td = spec.tensor(*t);
                        let gpu = if !grouped {
                            let stacked = pairs * td.rows();
                            if in_graph {
                                table.gpu_matmul_path_in_graph(
                                    GpuPath::Gemv,
                                    td.ty,
                                    stacked,
                                    td.cols(),
                                    1,
                                )
                            } else {
                                table.gpu_matmul_path(GpuPath::Gemv, td.ty, stacked, td.cols(), 1)
                            }
                        } else {
                            distinct
                                * table.gpu_grouped_expert(
                                    td.ty,
                                    td.rows(),
                                    td.cols(),
                                    per_expert_batch,
                                )
                                + if i == 0 { grouped_overhead } else { 0.0 }
                        };
                        let (cpu, cpu_conc) = expert_cpu.get(td.ty, td.rows(), td.cols(), b);
                        parts.push(WeightTime { cpu, cpu_conc, gpu });
                    }
                    (Kind::Weight(parts), ew_cpu, ew_gpu)
                }
                Op::Attention {
                    n_head,
                    n_head_kv,
                    head_dim_k,
                    head_dim_v,
                    window,
                    v_in_k,
                    ..
                } => {
                    let kv_len = match window {
                        Some(w) => kv_read_cells.min(*w),
                        None => kv_read_cells,
                    }
                    .max(1);
                    let shape = AttnShape {
                        kv_len,
                        n_q: (n / seqs).max(1),
                        n_head: *n_head,
                        n_head_kv: *n_head_kv,
                        head_dim_k: *head_dim_k,
                        head_dim_v: *head_dim_v,
                        v_in_k: *v_in_k,
                        kv_type: params.kv_type,
                    };
                    let s = seqs as f64;
                    (
                        Kind::Attention,
                        s * table.attention(Lane::Cpu, &shape),
                        s * table.attention(Lane::Gpu, &shape),
                    )
                }
                Op::HeadMatMul { weight, x, .. } => {
                    // One matrix per head: the CPU runs them one after the other; the CUDA
                    // backend runs them as routed experts with every head routed (one GEMV over
                    // the stacked pairs up to MOE_GEMV_MAX_PAIRS, else one grouped GEMM).
                    let td = spec.tensor(*weight);
                    let (heads, b) = (td.n_mats(), graph.rows(*x));
                    let pairs = b * heads;
                    let gpu = if lanes::moe_grouped(pairs, false) {
                        heads as f64 * table.gpu_grouped_expert(td.ty, td.rows(), td.cols(), b)
                            + 3.0 * table.gpu_launch()
                    } else if in_graph {
                        table.gpu_matmul_path_in_graph(
                            GpuPath::Gemv,
                            td.ty,
                            pairs * td.rows(),
                            td.cols(),
                            1,
                        )
                    } else {
                        table.gpu_matmul_path(GpuPath::Gemv, td.ty, pairs * td.rows(), td.cols(), 1)
                    };
                    let cpu = |conc| {
                        heads as f64 * table.cpu_matmul(td.ty, td.rows(), td.cols(), b, conc)
                    };
                    (
                        Kind::Weight(vec![WeightTime {
                            cpu: cpu(false),
                            cpu_conc: cpu(true),
                            gpu,
                        }]),
                        ew_cpu,
                        ew_gpu,
                    )
                }
                _ => (Kind::Other, ew_cpu, ew_gpu),
            };
            nodes.push(NodeInfo {
                kind,
                out_cols,
                cpu,
                gpu,
            });
        }
        let segs = lanes::segments(graph);
        // A segment's decisions depend on the groups of its nodes and of every tensor they read.
        let mut group_segs = vec![Vec::new(); spec.groups.len()];
        for (si, s) in segs.iter().enumerate() {
            let mut gs: Vec<GroupId> = match s.layer {
                Some(l) => spec.layers[l].groups.clone(),
                None => vec![],
            };
            for ni in s.nodes.clone() {
                let node = &graph.nodes[ni];
                gs.push(node.group);
                for t in node.op.weights() {
                    gs.push(spec.tensor(t).group);
                    // A tied output's tensor is listed in the output group as well.
                    for (gi, grp) in spec.groups.iter().enumerate() {
                        if grp.tensors.contains(&t) {
                            gs.push(GroupId(gi as u32));
                        }
                    }
                }
            }
            gs.sort_unstable();
            gs.dedup();
            for g in gs {
                group_segs[g.0 as usize].push(si);
            }
        }
        let input_bytes = ((3 * graph.n_tokens + graph.n_logit_rows) * 4) as u64;
        TierModel {
            spec,
            table,
            params,
            graph,
            n_tokens: n,
            nodes,
            segs,
            moe_fraction,
            past_cells,
            seqs,
            group_segs,
            input_bytes,
        }
    }

    /// Costs a placement.
    pub fn eval(&self, pl: &Placement) -> Eval {
        self.incremental(pl).eval()
    }

    /// The VRAM this placement needs for this tier.
    pub fn bill(&self, pl: &Placement) -> TierBill {
        self.incremental(pl).bill(pl)
    }

    /// Predicted seconds of one step per op kind ([`Op::kind`]) under a placement: each node's
    /// time on its lane(s) as [`Self::eval`] prices it, before any overlap with the copy lane
    /// (activation copies, streamed loads and KV write-backs are not included). For an all-CPU
    /// placement the kinds add up to the step time; `pshard bench --op-times` prints them beside
    /// the measured time per kind.
    pub fn op_seconds(&self, pl: &Placement) -> Vec<(&'static str, f64)> {
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        let mut loc = lanes::entry_locs(self.graph);
        for (si, seg) in self.segs.iter().enumerate() {
            let (plans, _) = lanes::plan_segment(self.spec, self.graph, pl, seg, &mut loc);
            let copying = self.copy_in((si + 1) % self.segs.len(), pl) > 0.0;
            let times = self.node_times(seg, &plans, copying);
            for (ni, dt) in seg.nodes.clone().zip(times) {
                let kind = self.graph.nodes[ni].op.kind();
                match out.iter_mut().find(|e| e.0 == kind) {
                    Some(e) => e.1 += dt,
                    None => out.push((kind, dt)),
                }
            }
        }
        out
    }

    /// Full evaluation state of a placement, for incremental updates.
    pub fn incremental(&self, pl: &Placement) -> Incremental<'_, 'a> {
        let mut outs: Vec<SegOut> = Vec::with_capacity(self.segs.len());
        let mut loc = lanes::entry_locs(self.graph);
        for si in 0..self.segs.len() {
            let out = self.segment(si, pl, loc);
            loc = out.exit.clone();
            outs.push(out);
        }
        Incremental { m: self, outs }
    }

    /// Decides and prices segment `si` from the buffer locations `loc` before it.
    fn segment(&self, si: usize, pl: &Placement, mut loc: Vec<Loc>) -> SegOut {
        let t = self.table;
        let g = self.graph;
        let seg = &self.segs[si];
        let (plans, loads) = lanes::plan_segment(self.spec, g, pl, seg, &mut loc);
        let kv_cell = kv_cell_bytes(self.spec, self.params.kv_type);
        let (mut compute, mut transfer_s) = (0.0, 0.0);
        let (mut act_h2d, mut act_d2h, mut kv_down) = (0u64, 0u64, 0u64);
        let mut cpu_busy = false;
        // The copy lane is busy during this segment when the next one brings anything in.
        let copying = self.copy_in((si + 1) % self.segs.len(), pl) > 0.0;
        let times = self.node_times(seg, &plans, copying);
        for ((ni, np), dt) in seg.nodes.clone().zip(&plans).zip(times) {
            let node = &self.nodes[ni];
            for mv in &np.moves {
                let b = mv.bytes(g) as f64;
                let x = match mv.dir {
                    Dir::H2D => {
                        act_h2d += mv.bytes(g);
                        t.h2d(b, false)
                    }
                    Dir::D2H => {
                        act_d2h += mv.bytes(g);
                        t.d2h(b)
                    }
                };
                compute += x;
                transfer_s += x;
            }
            if np.run.uses_cpu() {
                cpu_busy = true;
            }
            compute += dt;
            if let (Kind::Attention, Some(AttnKv::Streamed)) = (&node.kind, np.kv) {
                // The cells this step wrote go back to the host copy.
                kv_down += (kv_cell * self.n_tokens as f64) as u64;
                let x = t.d2h(kv_cell * self.n_tokens as f64);
                compute += x;
                transfer_s += x;
            }
        }
        let slot_bytes = loads.iter().map(|l| lanes::align(l.bytes)).sum();
        SegOut {
            plans,
            slot_bytes,
            copy_in: self.copy_in(si, pl),
            act_h2d,
            act_d2h,
            kv_down,
            compute,
            cpu_busy,
            transfer_s,
            exit: loc,
        }
    }

    /// Seconds of each node of `seg` under the decisions `plans`, as a step runs them: whole-node
    /// CPU matmuls of consecutive nodes that read one input in one partner format (a layer's
    /// q/k/v, its gate/up) are one pool job, so each after the first skips the job's fixed cost
    /// ([`quantized_matmul_input`] is the rule the CPU lane groups them by).
    fn node_times(&self, seg: &Segment, plans: &[NodePlan], copying: bool) -> Vec<f64> {
        // The last whole-node CPU matmul with quantized weights: its node and input.
        let mut last: Option<(usize, (BufId, ActFormat))> = None;
        seg.nodes
            .clone()
            .zip(plans)
            .map(|(ni, np)| {
                let dt = self.node_time(ni, np, copying);
                let input = match np.run {
                    Run::On(lanes::Lane::Cpu) if np.moves.is_empty() => {
                        quantized_matmul_input(self.spec, self.graph, ni)
                    }
                    _ => None,
                };
                let follows = input.is_some()
                    && last.is_some_and(|(prev, pi)| prev + 1 == ni && Some(pi) == input);
                last = input.map(|i| (ni, i));
                if follows {
                    (dt - self.table.cpu_op_overhead()).max(0.0)
                } else {
                    dt
                }
            })
            .collect()
    }

    /// Seconds of node `ni` on its lane(s) under the decisions `np` (`copying`: the copy lane
    /// runs meanwhile, so CPU work uses the profile's concurrent numbers).
    fn node_time(&self, ni: usize, np: &NodePlan, copying: bool) -> f64 {
        let node = &self.nodes[ni];
        let cpu_t = |w: &WeightTime| if copying { w.cpu_conc } else { w.cpu };
        match (&node.kind, np.run) {
            (Kind::Weight(parts), Run::On(lanes::Lane::Cpu)) => {
                parts.iter().map(cpu_t).sum::<f64>() + node.cpu
            }
            (Kind::Weight(parts), Run::On(_)) => {
                parts.iter().map(|w| w.gpu).sum::<f64>() + node.gpu
            }
            (Kind::Weight(parts), Run::Split { cpu_cols }) => {
                let f = cpu_cols as f64 / node.out_cols.max(1) as f64;
                parts
                    .iter()
                    .map(|w| (f * cpu_t(w)).max((1.0 - f) * w.gpu))
                    .sum()
            }
            (_, Run::On(lanes::Lane::Cpu)) => node.cpu,
            (_, Run::On(_)) => node.gpu,
            (_, Run::Split { cpu_cols }) => {
                let f = cpu_cols as f64 / node.out_cols.max(1) as f64;
                (f * node.cpu).max((1.0 - f) * node.gpu)
            }
        }
    }

    /// Bytes the copy lane brings in before segment `si`: its loads and, for streamed attention,
    /// the layer's live KV cells.
    fn copy_in(&self, si: usize, pl: &Placement) -> f64 {
        let seg = &self.segs[si];
        let loads: u64 = lanes::segment_loads(self.spec, self.graph, pl, seg)
            .iter()
            .map(|l| l.bytes)
            .sum();
        let kv = match seg.layer {
            Some(l) if lanes::attn_kv(self.spec, pl, l) == AttnKv::Streamed => {
                let cells = lanes::kv_up_cells(self.spec.layers[l].window, self.past_cells);
                kv_cell_bytes(self.spec, self.params.kv_type) * (cells * self.seqs) as f64
            }
            _ => 0.0,
        };
        loads as f64 + kv
    }
}

/// CPU seconds of the expert matrices of a layer's MoE FFN, remembered per matrix shape and
/// batch: every MoE layer of a model has the same, and a prefill batch spreads over hundreds of
/// token counts.
struct ExpertCpu<'a> {
    table: &'a CostTable,
    n_expert: usize,
    n_used: usize,
    groups: Vec<(usize, Vec<routing::ExpertGroup>)>,
    /// ((type, rows, cols, batch), (alone, while H2D) seconds).
    times: Vec<(MatrixBatch, (f64, f64))>,
}

/// An expert matrix's type, rows and columns, and the batch's tokens.
type MatrixBatch = (GgmlType, usize, usize, usize);

impl<'a> ExpertCpu<'a> {
    fn new(table: &'a CostTable, n_expert: usize, n_used: usize) -> Self {
        ExpertCpu {
            table,
            n_expert,
            n_used,
            groups: Vec::new(),
            times: Vec::new(),
        }
    }

    /// (alone, while H2D) seconds of one expert matrix (`rows × cols` of `ty` per expert) over a
    /// batch of `b` tokens spread over the experts as [`routing::expert_groups`] expects: the
    /// experts sharing a token count `m` as one matmul of their rows stacked at batch `m`, summed
    /// over the counts. The engine's pooled job runs each expert at its own `m` (one to four
    /// tokens on the decode path, more on the GEMM tiles), and the per-token cost moves several-fold
    /// with `m` (the dev VM's profile, Q4_K 2048 × 768: 26.6 µs per token at 1, 15.2 at 4, 6.4
    /// at 64). A count expecting less than one expert costs that share of one expert's matmul.
    fn get(&mut self, ty: GgmlType, rows: usize, cols: usize, b: usize) -> (f64, f64) {
        let key = (ty, rows, cols, b);
        if let Some((_, t)) = self.times.iter().find(|(k, _)| *k == key) {
            return *t;
        }
        let gi = match self.groups.iter().position(|(gb, _)| *gb == b) {
            Some(i) => i,
            None => {
                let g = routing::expert_groups(self.n_expert, self.n_used, b);
                self.groups.push((b, g));
                self.groups.len() - 1
            }
        };
        let table = self.table;
        let time = |while_h2d| -> f64 {
            self.groups[gi]
                .1
                .iter()
                .map(|g| {
                    let stacked = g.experts.max(1.0);
                    let stacked_rows = ((stacked * rows as f64).round() as usize).max(1);
                    g.experts / stacked
                        * table.cpu_matmul(ty, stacked_rows, cols, g.tokens, while_h2d)
                })
                .sum()
        };
        let t = (time(false), time(true));
        self.times.push((key, t));
        t
    }
}

/// The CPU time of an elementwise node from the profile's points of its kernel (rows, and the
/// row width or, for rope, the heads as the points' size), `None` for other ops.
fn cpu_elementwise(table: &CostTable, g: &Graph, op: &Op, io_bytes: f64) -> Option<f64> {
    use crate::profile::KnownOp;
    let (kind, rows, size) = match *op {
        Op::RmsNorm { x, .. } => (KnownOp::RmsNorm, g.rows(x), g.buffer(x).cols),
        Op::HeadRmsNorm { x, head_dim, .. } => {
            let hd = head_dim.max(1);
            (KnownOp::RmsNorm, g.rows(x) * g.buffer(x).cols / hd, hd)
        }
        Op::Glu { out, act, .. } => {
            let k = match act {
                Activation::GeluTanh => KnownOp::Geglu,
                Activation::Silu | Activation::SwigluOai => KnownOp::Glu,
            };
            (k, g.rows(out), g.buffer(out).cols)
        }
        Op::Add { a, .. } => (KnownOp::Add, g.rows(a), g.buffer(a).cols),
        Op::Rope { x, head_dim, .. } => {
            (KnownOp::Rope, g.rows(x), g.buffer(x).cols / head_dim.max(1))
        }
        _ => return None,
    };
    Some(table.cpu_elementwise(kind, rows, size, io_bytes))
}

/// A `pshard bench` test, as [`predict_bench`] prices it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchTest {
    /// `-p N -ub UB`: a prompt of `n` tokens from an empty context in micro-batches of `ubatch`,
    /// the last row's logits read back.
    Prompt {
        /// Prompt tokens.
        n: usize,
        /// Tokens per micro-batch.
        ubatch: usize,
    },
    /// `-n N`: `n` decode steps of one token from an empty context, logits each step.
    Gen {
        /// Steps.
        n: usize,
    },
}

/// What [`predict_bench`] predicts for one bench test.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchPrediction {
    /// Seconds of the whole test (every micro-batch, or every step).
    pub secs: f64,
    /// Tokens per second.
    pub tps: f64,
    /// Seconds per op kind over the whole test ([`TierModel::op_seconds`] summed).
    pub op_seconds: Vec<(&'static str, f64)>,
}

/// Predicts a bench test under one placement (the same at every batch size, as all-CPU runs): a
/// prompt sums its micro-batches, each attending over the ones before it; generation prices one
/// step at the mean depth of its steps (attention is linear in depth) times the steps. `base`
/// gives the context, threads and KV type; `graph` builds the op graph (see
/// [`crate::search::GraphFn`]).
pub fn predict_bench(
    spec: &ModelSpec,
    table: &CostTable,
    base: &PlanParams,
    pl: &Placement,
    test: BenchTest,
    graph: &crate::search::GraphFn<'_>,
) -> Result<BenchPrediction, String> {
    let mut secs = 0.0;
    let mut ops: Vec<(&'static str, f64)> = Vec::new();
    let mut add = |m: &TierModel<'_>, times: f64| {
        secs += times * m.eval(pl).step_s;
        for (k, v) in m.op_seconds(pl) {
            match ops.iter_mut().find(|e| e.0 == k) {
                Some(e) => e.1 += times * v,
                None => ops.push((k, times * v)),
            }
        }
    };
    let tokens = match test {
        BenchTest::Prompt { n, ubatch } => {
            let mut done = 0;
            while done < n {
                let m = ubatch.max(1).min(n - done);
                let mut p = base.clone();
                p.prefill_past = done;
                let g = graph(spec, m, 1)?;
                add(&TierModel::new(spec, table, &p, &g, true), 1.0);
                done += m;
            }
            n
        }
        BenchTest::Gen { n } => {
            let mut p = base.clone();
            p.decode_depth = n / 2;
            let g = graph(spec, 1, 1)?;
            add(&TierModel::new(spec, table, &p, &g, false), n as f64);
            n
        }
    };
    Ok(BenchPrediction {
        secs,
        tps: tokens as f64 / secs.max(1e-12),
        op_seconds: ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;

    /// A 2-thread CPU profile whose Q4_K matmuls at batch 1, 2 and 4 take 20, 25 and 60 µs (and
    /// 100 µs at 8) on a 768 × 2048 matrix: the per-token cost jumps between the token counts,
    /// as the engine's decode path and GEMM tiles do.
    fn jumpy_table() -> CostTable {
        let mut text = String::from(
            "format = \"pshard-profile\"\nversion = \"1.0\"\nkind = \"cpu\"\n\
             pshard_version = \"test\"\ncreated = \"2026-12-05T00:00:00Z\"\nnote = \"test\"\n\
             [machine]\ncpu_model = \"test\"\ncpu_cores = 2\ncpu_threads = 2\nthreads_used = 2\n\
             ram_bytes = 17179869184\n\
             [roofline]\ncpu_mem_gbs = 40.0\ncpu_gflops = 400.0\ncpu_op_overhead_us = 0.5\n",
        );
        for (batch, us) in [(1, 20.0), (2, 25.0), (4, 60.0), (8, 100.0)] {
            text += &format!(
                "[[point]]\nop = \"matmul\"\nlane = \"cpu\"\nquant = \"Q4_K\"\n\
                 shape = [768, 2048]\nbatch = {batch}\nthreads = 2\nmedian_s = {}\n\
                 lo_s = 0.0\nhi_s = 1.0\ncv = 0.0\nn = 5\nnoisy = false\n",
                us * 1e-6
            );
        }
        let p = Profile::from_toml_str(&text, "test").expect("test profile");
        CostTable::new(Some(&p), None, 2)
    }

    const TY: GgmlType = GgmlType::Q4_K;

    /// Decode (one token, `k` experts at one token each) prices the `k` experts' rows as one
    /// stacked matmul at batch 1.
    #[test]
    fn decode_experts_are_one_stacked_matmul_at_batch_one() {
        let t = jumpy_table();
        let mut ex = ExpertCpu::new(&t, 128, 8);
        for conc in [false, true] {
            let got = ex.get(TY, 768, 2048, 1);
            let got = if conc { got.1 } else { got.0 };
            let want = t.cpu_matmul(TY, 8 * 768, 2048, 1, conc);
            assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        }
    }

    /// Each token count prices its own experts at its own batch: two tokens on 4 of 8 experts
    /// put 4 experts at one token and 2 at two (8·2·½·½ and 8·¼), not 6 experts at the mean
    /// ⌈8/6⌉ = 2 tokens.
    #[test]
    fn prefill_experts_are_priced_per_token_count() {
        let t = jumpy_table();
        let mut ex = ExpertCpu::new(&t, 8, 4);
        let got = ex.get(TY, 768, 2048, 2).0;
        let want =
            t.cpu_matmul(TY, 4 * 768, 2048, 1, false) + t.cpu_matmul(TY, 2 * 768, 2048, 2, false);
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        let at_mean = t.cpu_matmul(TY, 6 * 768, 2048, 2, false);
        assert!((got - at_mean).abs() > 0.05 * want, "{got} vs {at_mean}");
    }

    /// A token count expecting less than one expert costs that share of one expert's matmul:
    /// two tokens on 1 of 4 experts put 4·2·¼·¾ = 1.5 experts at one token and 4·(¼)² = 0.25
    /// at two.
    #[test]
    fn fractional_expert_counts_cost_their_share() {
        let t = jumpy_table();
        let mut ex = ExpertCpu::new(&t, 4, 1);
        let got = ex.get(TY, 768, 2048, 2).0;
        let want =
            t.cpu_matmul(TY, 1152, 2048, 1, false) + 0.25 * t.cpu_matmul(TY, 768, 2048, 2, false);
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        // Remembered: the same answer again, and another batch its own.
        assert_eq!(ex.get(TY, 768, 2048, 2).0, got);
        assert_ne!(ex.get(TY, 768, 2048, 3).0, got);
    }
}
