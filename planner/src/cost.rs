//! The cost model: time and VRAM of one tier's op graph under a placement.
//!
//! Per segment (the ops before the first layer, each layer, the ops after the last layer):
//! `time = max(compute, copy of the next segment's streamed bytes)`, where compute is the sum of its
//! ops on their lanes plus activation transfers wherever a buffer crosses between CPU and GPU, plus
//! the download of new KV rows of streamed-attention layers. The copy lane prefetches the next
//! segment's streamed weights and, for streamed attention, that layer's KV (cyclically: the first
//! layer's copy overlaps the previous step's last segment). CPU ops that run while the copy lane is
//! busy use the profile's concurrent (CPU-while-H2D) numbers, and the copy then runs at the
//! H2D-while-CPU bandwidth. MoE expert bytes per step follow the expected number of distinct experts,
//! `E·(1−(1−k/E)^n)`; experts computed on the CPU need the routing ids copied to the host.

use std::collections::HashMap;

use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::{GroupId, GroupRole, ModelSpec, TensorId};

use crate::costtable::{AttnShape, CostTable, GpuPath};
use crate::placement::{Place, Placement};
use crate::profile::Lane;

/// Parameters every plan depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanParams {
    /// Context length per sequence (KV cells).
    pub n_ctx: usize,
    /// Parallel sequences (each gets `n_ctx` cells).
    pub parallel: usize,
    /// KV cache element type (F16 or Q8_0).
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

    /// KV cells a pinned layer keeps in VRAM (all sequences).
    pub fn kv_cells(&self) -> usize {
        self.n_ctx * self.parallel.max(1)
    }
}

/// Bytes of one KV cell of one layer (K and V of every KV head), from the model's byte accounting.
pub fn kv_cell_bytes(spec: &ModelSpec, kv_type: GgmlType) -> f64 {
    if spec.layers.is_empty() {
        return 0.0;
    }
    pshard_model::bytes::kv_bytes_per_token_layer(spec, kv_type, 0) as f64
}

/// Bytes of one layer's KV cache at the full context for every sequence (sliding-window layers keep
/// only their window per sequence).
pub fn layer_kv_bytes(spec: &ModelSpec, layer: usize, p: &PlanParams) -> u64 {
    pshard_model::bytes::kv_layer_bytes(spec, p.kv_type, layer, p.n_ctx, p.parallel.max(1))
}

/// Where a buffer's current contents are.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Loc {
    Nowhere,
    Cpu,
    Gpu,
    Both,
    /// Rows split by columns: the first `f` share on the CPU, the rest on the GPU.
    Split(f64),
}

#[derive(Clone, Debug)]
struct SegOut {
    compute: f64,
    cpu_busy: bool,
    transfer_s: f64,
    exit: Vec<Loc>,
}

/// One weight read by a node: its placement slot and its times on each lane.
#[derive(Clone, Debug)]
struct WeightPart {
    group: usize,
    member: usize,
    cpu: f64,
    cpu_conc: f64,
    gpu: f64,
}

#[derive(Clone, Debug)]
enum Kind {
    Embed,
    Weight(Vec<WeightPart>),
    Attention {
        layer: usize,
    },
    /// Routing: result feeds experts, whose CPU placement needs the ids on the host.
    Route,
    Elementwise,
}

#[derive(Clone, Debug)]
struct NodeInfo {
    kind: Kind,
    group: usize,
    inputs: Vec<u32>,
    outputs: Vec<u32>,
    cpu: f64,
    gpu: f64,
}

/// A segment: a range of nodes with the groups whose streamed weights it needs.
#[derive(Clone, Debug)]
struct Segment {
    nodes: std::ops::Range<usize>,
    groups: Vec<GroupId>,
    /// Layer whose KV the segment reads, if any.
    layer: Option<usize>,
    /// Bytes of distinct buffers used by the segment.
    buf_bytes: f64,
}

/// Result of costing one placement.
#[derive(Clone, Debug, PartialEq)]
pub struct Eval {
    /// Seconds per forward pass of the tier's batch.
    pub step_s: f64,
    /// Tokens per second.
    pub tps: f64,
    /// Bytes copied host→device per step (weights and KV).
    pub h2d_bytes: f64,
    /// Seconds of activation transfers per step.
    pub transfer_s: f64,
}

/// Evaluation state of one placement: per-segment results that [`Incremental::update`] refreshes
/// where a placement change can have an effect (the changed segments, and downstream segments only
/// while the buffer locations they start from differ).
#[derive(Debug)]
pub struct Incremental<'m, 'a> {
    m: &'m TierModel<'a>,
    copy_in: Vec<f64>,
    outs: Vec<SegOut>,
    /// Copy-lane seconds overlapping each segment (prefetch of the next one).
    copy_s: Vec<f64>,
}

impl Incremental<'_, '_> {
    /// Refreshes after the placements of `groups` changed in `pl`.
    pub fn update(&mut self, pl: &Placement, groups: &[GroupId]) {
        let n = self.outs.len();
        let mut changed: Vec<usize> = groups
            .iter()
            .flat_map(|g| self.m.group_segs[g.0 as usize].iter().copied())
            .collect();
        changed.sort_unstable();
        changed.dedup();
        for &si in &changed {
            self.copy_in[si] = self.m.copy_in(si, pl);
        }
        // A segment's copying flag depends on the next segment's streamed bytes.
        let mut todo: Vec<usize> = changed
            .iter()
            .map(|si| (si + n - 1) % n)
            .chain(changed.iter().copied())
            .collect();
        todo.sort_unstable();
        todo.dedup();
        let mut i = 0;
        let mut si_opt = todo.first().copied();
        while let Some(si) = si_opt {
            let entry = if si == 0 {
                vec![Loc::Nowhere; self.m.buf_bytes.len()]
            } else {
                self.outs[si - 1].exit.clone()
            };
            let out = self
                .m
                .segment(si, pl, &entry, self.copy_in[(si + 1) % n] > 0.0);
            let exit_changed = out.exit != self.outs[si].exit;
            self.outs[si] = out;
            while i < todo.len() && todo[i] <= si {
                i += 1;
            }
            si_opt = if exit_changed && si + 1 < n {
                Some(si + 1)
            } else {
                todo.get(i).copied()
            };
        }
        for si in todo {
            self.copy_s[si] = self
                .m
                .copy_s(self.copy_in[(si + 1) % n], self.outs[si].cpu_busy);
        }
    }

    /// The prediction.
    pub fn eval(&self) -> Eval {
        let n = self.outs.len();
        let (mut total, mut h2d_bytes, mut transfer_s) = (0.0, 0.0, 0.0);
        for (si, out) in self.outs.iter().enumerate() {
            h2d_bytes += self.copy_in[(si + 1) % n];
            transfer_s += out.transfer_s;
            total += out.compute.max(self.copy_s[si]);
        }
        let step_s = total.max(1e-12);
        Eval {
            step_s,
            tps: self.m.n_tokens as f64 / step_s,
            h2d_bytes,
            transfer_s,
        }
    }
}

/// VRAM of one tier's plan, split the way the registry bills it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierBill {
    /// Weights resident in VRAM.
    pub pinned_weights: u64,
    /// KV of layers whose attention is pinned, at the full context.
    pub kv: u64,
    /// Activations, logits and dequantisation scratch at the tier's batch.
    pub compute: u64,
    /// Streaming ring (slots × largest streamed group) plus KV staging of streamed attention.
    pub scratch: u64,
    /// CUDA context margin (0 when the plan does not touch the GPU).
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
    /// Tokens per step.
    pub n_tokens: usize,
    nodes: Vec<NodeInfo>,
    segs: Vec<Segment>,
    buf_bytes: Vec<f64>,
    /// Expected fraction of experts touched per step (1 for dense models).
    pub moe_fraction: f64,
    kv_read_cells: usize,
    /// Sequences the batch's tokens belong to.
    seqs: usize,
    /// Largest matrix (bytes as f16) per group, for dequantisation scratch.
    group_f16_max: Vec<u64>,
    /// Distinct-buffer bytes of the largest segment plus the others' persistent buffers.
    compute_base: u64,
    /// Segments whose cost depends on each group.
    group_segs: Vec<Vec<usize>>,
}

fn op_io(op: &Op) -> (Vec<BufId>, Vec<BufId>) {
    match op {
        Op::Embed { out, .. } => (vec![], vec![*out]),
        Op::RmsNorm { x, out, .. } => (vec![*x], vec![*out]),
        Op::HeadRmsNorm { x, .. } | Op::Rope { x, .. } | Op::Softcap { x, .. } => {
            (vec![*x], vec![*x])
        }
        Op::MatMul { x, out, .. } => (vec![*x], vec![*out]),
        Op::Attention { q, k, v, out, .. } => (vec![*q, *k, *v], vec![*out]),
        Op::Glu { gate, up, out, .. } => (vec![*gate, *up], vec![*out]),
        Op::Add { a, b, out } => (vec![*a, *b], vec![*out]),
        Op::SelectRows { x, out } => (vec![*x], vec![*out]),
        Op::MoeRoute { logits, out, .. } => (vec![*logits], vec![*out]),
        Op::MoeFfn { x, route, out, .. } => (vec![*x, *route], vec![*out]),
    }
}

/// Finds (group, member) of a tensor, preferring `hint`.
fn slot_of(
    spec: &ModelSpec,
    index: &HashMap<TensorId, (usize, usize)>,
    hint: GroupId,
    t: TensorId,
) -> Option<(usize, usize)> {
    let g = spec.group(hint);
    if let Some(m) = g.tensors.iter().position(|x| *x == t) {
        return Some((hint.0 as usize, m));
    }
    index.get(&t).copied()
}

impl<'a> TierModel<'a> {
    /// Prepares a graph built for this tier (`graph.n_tokens` tokens).
    pub fn new(
        spec: &'a ModelSpec,
        table: &'a CostTable,
        params: &'a PlanParams,
        graph: &Graph,
        prefill: bool,
    ) -> TierModel<'a> {
        let n = graph.n_tokens.max(1);
        let h = &spec.hparams;
        let mut index: HashMap<TensorId, (usize, usize)> = HashMap::new();
        for (gi, g) in spec.groups.iter().enumerate() {
            for (mi, t) in g.tensors.iter().enumerate() {
                index.entry(*t).or_insert((gi, mi));
            }
        }
        let buf_bytes: Vec<f64> = (0..graph.buffers.len())
            .map(|i| (graph.rows(BufId(i as u32)) * graph.buffers[i].cols * 4) as f64)
            .collect();
        let moe_fraction = if h.n_expert > 0 {
            let (e, k) = (h.n_expert as f64, h.n_expert_used as f64);
            (1.0 - (1.0 - k / e).powf(n as f64)).clamp(k / e, 1.0)
        } else {
            1.0
        };
        // Sequences in the batch: prefill is one sequence; decode batches spread over the parallel ones.
        let seqs = if prefill {
            1
        } else {
            n.min(params.parallel.max(1))
        };
        let kv_read_cells = if prefill {
            (params.prefill_past + n / 2).min(params.n_ctx)
        } else {
            params.decode_depth.min(params.n_ctx)
        };
        let mut nodes = Vec::with_capacity(graph.nodes.len());
        for node in &graph.nodes {
            let (ins, outs) = op_io(&node.op);
            let io_bytes: f64 = ins
                .iter()
                .chain(outs.iter())
                .map(|b| buf_bytes[b.0 as usize])
                .sum();
            let ew_cpu = table.elementwise(Lane::Cpu, io_bytes);
            let ew_gpu = if n <= crate::costtable::GPU_GRAPH_MAX_TOKENS {
                table.gpu_elementwise_in_graph(io_bytes)
            } else {
                table.elementwise(Lane::Gpu, io_bytes)
            };
            let (kind, cpu, gpu) = match &node.op {
                Op::Embed { table: t, .. } => {
                    let td = spec.tensor(*t);
                    let row = crate::costtable::weight_bytes(td.ty, 1, td.cols());
                    (
                        Kind::Embed,
                        table.elementwise(Lane::Cpu, io_bytes + row * n as f64),
                        ew_gpu,
                    )
                }
                Op::MatMul { weight, x, .. } => {
                    let td = spec.tensor(*weight);
                    let b = graph.rows(*x);
                    let part =
                        slot_of(spec, &index, node.group, *weight).map(|(g, m)| WeightPart {
                            group: g,
                            member: m,
                            cpu: table.cpu_matmul(td.ty, td.rows(), td.cols(), b, false),
                            cpu_conc: table.cpu_matmul(td.ty, td.rows(), td.cols(), b, true),
                            gpu: table.gpu_matmul(td.ty, td.rows(), td.cols(), b),
                        });
                    match part {
                        Some(p) => (Kind::Weight(vec![p]), 0.0, 0.0),
                        None => (Kind::Elementwise, ew_cpu, ew_gpu),
                    }
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
                    // CPU: the expert kernel handles all routed experts in one call: cost it as
                    // one matmul over the distinct experts' rows stacked, at the per-expert batch.
                    // GPU, as the CUDA backend runs it: up to GPU_MOE_GEMV_MAX_PAIRS (token,
                    // expert) pairs one GEMV over every pair's matrix; above, the pairs are sorted
                    // by expert on the device and each matrix is one grouped GEMM over the used
                    // experts (plus one launch each for the sort and the gather, charged once).
                    let mut parts = Vec::new();
                    let pairs = b * h.n_expert_used.max(1);
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
                    for (i, t) in [up_exps, gate_exps, down_exps].into_iter().enumerate() {
                        let td = spec.tensor(*t);
                        let rows = (distinct * td.rows() as f64).round().max(1.0) as usize;
                        let gpu = if pairs <= crate::costtable::GPU_MOE_GEMV_MAX_PAIRS {
                            let stacked = pairs * td.rows();
                            if b <= crate::costtable::GPU_GRAPH_MAX_TOKENS {
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
                        if let Some((g, m)) = slot_of(spec, &index, node.group, *t) {
                            parts.push(WeightPart {
                                group: g,
                                member: m,
                                cpu: table.cpu_matmul(
                                    td.ty,
                                    rows,
                                    td.cols(),
                                    per_expert_batch,
                                    false,
                                ),
                                cpu_conc: table.cpu_matmul(
                                    td.ty,
                                    rows,
                                    td.cols(),
                                    per_expert_batch,
                                    true,
                                ),
                                gpu,
                            });
                        }
                    }
                    (Kind::Weight(parts), ew_cpu, ew_gpu)
                }
                Op::Attention {
                    layer,
                    n_head,
                    n_head_kv,
                    head_dim_k,
                    head_dim_v,
                    window,
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
                        kv_type: params.kv_type,
                    };
                    let s = seqs as f64;
                    (
                        Kind::Attention { layer: *layer },
                        s * table.attention(Lane::Cpu, &shape),
                        s * table.attention(Lane::Gpu, &shape),
                    )
                }
                Op::MoeRoute { .. } => (Kind::Route, ew_cpu, ew_gpu),
                _ => (Kind::Elementwise, ew_cpu, ew_gpu),
            };
            nodes.push(NodeInfo {
                kind,
                group: node.group.0 as usize,
                inputs: ins.iter().map(|b| b.0).collect(),
                outputs: outs.iter().map(|b| b.0).collect(),
                cpu,
                gpu,
            });
        }
        // Segments: before the first layer node, one per layer, after the last.
        let mut segs: Vec<Segment> = Vec::new();
        let mut start = 0;
        let mut cur: Option<Option<usize>> = None;
        for (i, node) in graph.nodes.iter().enumerate() {
            if cur != Some(node.layer) {
                if let Some(l) = cur {
                    segs.push(Segment {
                        nodes: start..i,
                        groups: vec![],
                        layer: l,
                        buf_bytes: 0.0,
                    });
                }
                start = i;
                cur = Some(node.layer);
            }
        }
        if let Some(l) = cur {
            segs.push(Segment {
                nodes: start..graph.nodes.len(),
                groups: vec![],
                layer: l,
                buf_bytes: 0.0,
            });
        }
        for s in &mut segs {
            let mut gs: Vec<GroupId> = match s.layer {
                Some(l) => spec.layers[l].groups.clone(),
                None => vec![],
            };
            let mut bufs: Vec<u32> = Vec::new();
            for ni in s.nodes.clone() {
                let g = GroupId(nodes[ni].group as u32);
                if !gs.contains(&g) {
                    gs.push(g);
                }
                if let Kind::Weight(parts) = &nodes[ni].kind {
                    for p in parts {
                        let g = GroupId(p.group as u32);
                        if !gs.contains(&g) {
                            gs.push(g);
                        }
                    }
                }
                bufs.extend(nodes[ni].inputs.iter().chain(nodes[ni].outputs.iter()));
            }
            bufs.sort_unstable();
            bufs.dedup();
            s.buf_bytes = bufs.iter().map(|b| buf_bytes[*b as usize]).sum();
            s.groups = gs;
        }
        let mut group_segs = vec![Vec::new(); spec.groups.len()];
        for (si, sg) in segs.iter().enumerate() {
            for g in &sg.groups {
                group_segs[g.0 as usize].push(si);
            }
        }
        // Compute buffers: the busiest layer's live buffers, plus non-layer segments (embedding rows,
        // logits) which live alongside.
        let layer_max = segs
            .iter()
            .filter(|s| s.layer.is_some())
            .map(|s| s.buf_bytes)
            .fold(0.0, f64::max);
        let other: f64 = segs
            .iter()
            .filter(|s| s.layer.is_none())
            .map(|s| s.buf_bytes)
            .sum();
        let compute_base = (layer_max + other) as u64;
        // Dequantisation scratch: matrices multiplied at GEMM batch sizes are dequantised to f16 one
        // at a time (MoE: one expert). Per group, the largest such matrix.
        let mut group_f16_max = vec![0u64; spec.groups.len()];
        for node in &graph.nodes {
            let ws: Vec<(TensorId, usize)> = match &node.op {
                Op::MatMul { weight, x, .. } => vec![(*weight, graph.rows(*x))],
                Op::MoeFfn {
                    gate_exps,
                    up_exps,
                    down_exps,
                    x,
                    ..
                } => {
                    let b = graph.rows(*x);
                    vec![(*gate_exps, b), (*up_exps, b), (*down_exps, b)]
                }
                _ => continue,
            };
            for (w, batch) in ws {
                if batch < 16 {
                    continue;
                }
                if let Some((g, _)) = slot_of(spec, &index, node.group, w) {
                    let td = spec.tensor(w);
                    group_f16_max[g] = group_f16_max[g].max((td.rows() * td.cols() * 2) as u64);
                }
            }
        }
        TierModel {
            spec,
            table,
            params,
            n_tokens: n,
            nodes,
            segs,
            buf_bytes,
            moe_fraction,
            kv_read_cells,
            seqs,
            group_f16_max,
            compute_base,
            group_segs,
        }
    }

    fn streamed_bytes(&self, pl: &Placement, g: GroupId) -> f64 {
        let grp = self.spec.group(g);
        grp.tensors
            .iter()
            .zip(pl.group(g))
            .map(|(t, p)| self.spec.tensor(*t).bytes as f64 * p.streamed_share())
            .sum()
    }

    /// Whether layer `l`'s attention runs on the GPU without its KV resident (streamed attention).
    fn attn_lane(&self, pl: &Placement, l: usize) -> (Lane, bool) {
        let Some(g) = self.spec.layer_group(l, GroupRole::Attn) else {
            return (Lane::Cpu, false);
        };
        // The lane of the attention op follows the query projection (the group's first matrix).
        let grp = self.spec.group(g);
        let q = grp
            .tensors
            .iter()
            .position(|t| self.spec.tensor(*t).dims.len() >= 2)
            .unwrap_or(0);
        match pl.group(g)[q] {
            Place::Pinned => (Lane::Gpu, false),
            Place::Streamed => (Lane::Gpu, true),
            _ => (Lane::Cpu, false),
        }
    }

    /// Lane of a group's weightless ops: the CPU when any of its tensors is split (aggregation keeps
    /// the layer's activations and KV on the host; the GPU helps with rows), else where most of its
    /// bytes are computed.
    fn home_lane(&self, pl: &Placement, g: usize) -> Lane {
        let grp = &self.spec.groups[g];
        let (mut cpu, mut tot) = (0.0, 0.0);
        for (t, p) in grp.tensors.iter().zip(&pl.groups[g]) {
            if matches!(p, Place::Split { .. }) {
                return Lane::Cpu;
            }
            let b = self.spec.tensor(*t).bytes as f64;
            cpu += b * p.cpu_share();
            tot += b;
        }
        if tot == 0.0 || cpu * 2.0 >= tot {
            Lane::Cpu
        } else {
            Lane::Gpu
        }
    }

    /// Costs a placement.
    pub fn eval(&self, pl: &Placement) -> Eval {
        self.incremental(pl).eval()
    }

    /// Bytes the copy lane brings in before segment `si` runs: its streamed weights and, for
    /// streamed attention, the layer's KV.
    fn copy_in(&self, si: usize, pl: &Placement) -> f64 {
        let s = &self.segs[si];
        let mut b: f64 = s.groups.iter().map(|g| self.streamed_bytes(pl, *g)).sum();
        if let Some(l) = s.layer {
            if self.attn_lane(pl, l).1 {
                let cells = match self.spec.layers[l].window {
                    Some(w) => self.kv_read_cells.min(w),
                    None => self.kv_read_cells,
                };
                b += kv_cell_bytes(self.spec, self.params.kv_type) * (cells * self.seqs) as f64;
            }
        }
        b
    }

    /// Full evaluation state of a placement, for incremental updates.
    pub fn incremental(&self, pl: &Placement) -> Incremental<'_, 'a> {
        let n = self.segs.len();
        let copy_in: Vec<f64> = (0..n).map(|si| self.copy_in(si, pl)).collect();
        let mut outs: Vec<SegOut> = Vec::with_capacity(n);
        let mut loc = vec![Loc::Nowhere; self.buf_bytes.len()];
        for si in 0..n {
            let out = self.segment(si, pl, &loc, copy_in[(si + 1) % n] > 0.0);
            loc.clone_from(&out.exit);
            outs.push(out);
        }
        let copy_s = (0..n)
            .map(|si| self.copy_s(copy_in[(si + 1) % n], outs[si].cpu_busy))
            .collect();
        Incremental {
            m: self,
            copy_in,
            outs,
            copy_s,
        }
    }

    fn copy_s(&self, bytes: f64, cpu_busy: bool) -> f64 {
        if bytes > 0.0 {
            self.table.h2d(bytes, cpu_busy)
        } else {
            0.0
        }
    }

    fn segment(&self, si: usize, pl: &Placement, entry: &[Loc], copying: bool) -> SegOut {
        let t = self.table;
        let kv_cell = kv_cell_bytes(self.spec, self.params.kv_type);
        let seg = &self.segs[si];
        let mut loc = entry.to_vec();
        let mut transfer_s = 0.0;
        let mut compute = 0.0;
        let mut cpu_busy = false;
        let home = |g: usize| self.home_lane(pl, g);
        for ni in seg.nodes.clone() {
            let node = &self.nodes[ni];
            // Decide how the node runs.
            enum Run {
                On(Lane),
                Split(f64),
            }
            let run = match &node.kind {
                Kind::Embed => Run::On(Lane::Cpu),
                Kind::Attention { layer } => Run::On(self.attn_lane(pl, *layer).0),
                Kind::Weight(parts) if parts.len() == 1 => {
                    match pl.groups[parts[0].group][parts[0].member] {
                        Place::Cpu => Run::On(Lane::Cpu),
                        Place::Split { cpu } => Run::Split(cpu.get()),
                        _ => Run::On(Lane::Gpu),
                    }
                }
                Kind::Weight(_) => Run::On(home(node.group)),
                _ => {
                    // Elementwise over inputs that are all split the same way runs split in place.
                    let mut f = None;
                    let mut all_split = !node.inputs.is_empty();
                    for b in &node.inputs {
                        match loc[*b as usize] {
                            Loc::Split(x) if f.is_none() || f == Some(x) => f = Some(x),
                            _ => all_split = false,
                        }
                    }
                    match (all_split, f) {
                        (true, Some(x)) => Run::Split(x),
                        _ => Run::On(home(node.group)),
                    }
                }
            };
            // Gather inputs where they are needed.
            let need_cpu = matches!(run, Run::On(Lane::Cpu))
                || matches!((&run, &node.kind), (Run::Split(_), Kind::Weight(_)));
            let need_gpu = matches!(run, Run::On(Lane::Gpu))
                || matches!((&run, &node.kind), (Run::Split(_), Kind::Weight(_)));
            for b in &node.inputs {
                let bi = *b as usize;
                let bytes = self.buf_bytes[bi];
                let (mut to_gpu, mut to_cpu) = (0.0, 0.0);
                match loc[bi] {
                    Loc::Cpu if need_gpu => to_gpu = bytes,
                    Loc::Gpu if need_cpu => to_cpu = bytes,
                    Loc::Split(f) => {
                        if need_gpu {
                            to_gpu = bytes * f;
                        }
                        if need_cpu {
                            to_cpu = bytes * (1.0 - f);
                        }
                    }
                    _ => {}
                }
                if to_gpu > 0.0 || to_cpu > 0.0 {
                    let x = t.h2d(to_gpu, false) + t.d2h(to_cpu);
                    compute += x;
                    transfer_s += x;
                    loc[bi] = Loc::Both;
                } else if matches!(loc[bi], Loc::Split(_)) && !matches!(run, Run::Split(_)) {
                    loc[bi] = Loc::Both;
                }
            }
            // Time the node.
            let cpu_t = |p: &WeightPart| if copying { p.cpu_conc } else { p.cpu };
            let dt = match (&run, &node.kind) {
                (Run::On(Lane::Cpu), Kind::Weight(parts)) if parts.len() == 1 => cpu_t(&parts[0]),
                (Run::On(_), Kind::Weight(parts)) if parts.len() == 1 => parts[0].gpu,
                (Run::Split(f), Kind::Weight(parts)) if parts.len() == 1 => {
                    (f * cpu_t(&parts[0])).max((1.0 - f) * parts[0].gpu)
                }
                (_, Kind::Weight(parts)) => {
                    // MoE experts: each expert tensor on its own placement; mixed placements pay
                    // for moving the per-token intermediate between lanes.
                    let mut sum = 0.0;
                    let mut lanes = (false, false);
                    for p in parts {
                        let d = match pl.groups[p.group][p.member] {
                            Place::Cpu => {
                                lanes.0 = true;
                                cpu_t(p)
                            }
                            Place::Split { cpu } => {
                                lanes = (true, true);
                                (cpu.get() * cpu_t(p)).max((1.0 - cpu.get()) * p.gpu)
                            }
                            _ => {
                                lanes.1 = true;
                                p.gpu
                            }
                        };
                        sum += d;
                    }
                    if lanes.0 && lanes.1 {
                        let inter = (self.n_tokens
                            * self.spec.hparams.n_expert_used
                            * self.spec.hparams.n_ff_expert
                            * 4) as f64;
                        let x = t.h2d(inter, false) + t.d2h(inter);
                        transfer_s += x;
                        sum += x;
                    }
                    if lanes.0 {
                        // Routing ids (and weights) to the host for the CPU experts.
                        let ids = (self.n_tokens * self.spec.hparams.n_expert_used * 8) as f64;
                        if let Some(r) = node.inputs.get(1) {
                            if loc[*r as usize] == Loc::Gpu {
                                let x = t.d2h(ids);
                                transfer_s += x;
                                sum += x;
                                loc[*r as usize] = Loc::Both;
                            }
                        }
                    }
                    sum + node.cpu.min(node.gpu)
                }
                (Run::On(Lane::Cpu), _) => node.cpu,
                (Run::On(_), _) => node.gpu,
                (Run::Split(f), _) => (f * node.cpu).max((1.0 - f) * node.gpu),
            };
            let on_cpu = matches!(run, Run::On(Lane::Cpu) | Run::Split(_));
            if on_cpu {
                cpu_busy = true;
            }
            compute += dt;
            // Attention of a streamed layer writes its new KV rows back to the host copy.
            if let Kind::Attention { layer } = node.kind {
                if self.attn_lane(pl, layer).1 {
                    let x = t.d2h(kv_cell * self.n_tokens as f64);
                    compute += x;
                    transfer_s += x;
                }
            }
            let out_loc = match run {
                Run::On(Lane::Cpu) => Loc::Cpu,
                Run::On(_) => Loc::Gpu,
                Run::Split(f) => Loc::Split(f),
            };
            for o in &node.outputs {
                loc[*o as usize] = out_loc;
            }
        }
        SegOut {
            compute,
            cpu_busy,
            transfer_s,
            exit: loc,
        }
    }

    /// The VRAM this placement needs for this tier.
    pub fn bill(&self, pl: &Placement) -> TierBill {
        if !pl.uses_gpu() {
            return TierBill::default();
        }
        let spec = self.spec;
        let pinned_weights = pl.pinned_bytes(spec);
        let mut kv = 0u64;
        let mut kv_stage = 0u64;
        for l in 0..spec.layers.len() {
            match self.attn_lane(pl, l) {
                (Lane::Gpu, false) => kv += layer_kv_bytes(spec, l, self.params),
                (Lane::Gpu, true) => kv_stage = kv_stage.max(layer_kv_bytes(spec, l, self.params)),
                _ => {}
            }
        }
        let largest_stream = (0..spec.groups.len())
            .map(|g| self.streamed_bytes(pl, GroupId(g as u32)) as u64)
            .max()
            .unwrap_or(0);
        let ring = if largest_stream > 0 {
            largest_stream * self.params.ring_slots.max(1) as u64
        } else {
            0
        };
        // GEMM-path matrices are dequantised one at a time to f16 scratch.
        let dequant = (0..spec.groups.len())
            .filter(|g| pl.groups[*g].iter().any(|p| *p != Place::Cpu))
            .map(|g| self.group_f16_max[g])
            .max()
            .unwrap_or(0);
        TierBill {
            pinned_weights,
            kv,
            compute: self.compute_base + dequant,
            scratch: ring + 2 * kv_stage,
            context: self.table.ceil.cuda_context_bytes,
        }
    }
}
