//! Lanes and data movement: for one tier's op graph under a placement, where every op runs and
//! what moves between host and device around it. The cost model prices exactly this and the
//! runtime lowers exactly this into a program; if the two ever disagree, this module is wrong,
//! not one of its users.
//!
//! The rules:
//! - **Matrices follow their placement.** A matmul runs on the GPU when its weight is pinned or
//!   streamed, on the CPU when it is CPU-placed, and split by output columns when its rows are split
//!   (`Place::Split`): the first [`split_cols`] rows are computed on the CPU from the mapped file,
//!   the rest on the GPU from rows the copy lane streamed in. Expert FFNs run on the GPU when all
//!   three expert tensors are pinned or streamed, else on the CPU (experts are never split); so do
//!   per-head matmuls (latent attention's 3-D `attn_k_b` / `attn_v_b`). The embedding lookup runs
//!   on the GPU only when its table is pinned.
//! - **Attention follows q**: the lane of the layer's query projection. Pinned q: on the GPU with
//!   the layer's KV resident in VRAM. Streamed q: on the GPU with the KV kept in host memory, its
//!   live cells copied up before and the cells the step wrote copied back after ([`AttnKv`]). CPU or
//!   split q: on the CPU over the host KV.
//! - **Weightless ops** (norms, rope, GLU, adds, row selection, routing, soft-cap) run on the home
//!   lane of their node's group: the CPU when any member is split or at least half of the group's
//!   bytes are computed on the CPU, else the GPU. Column-wise ops (GLU, add, soft-cap) whose inputs
//!   are all split at the same column run split in place.
//! - **Vectors** (norm weights, biases, rope factors) are kept as f32 on every lane that needs them;
//!   their placement only votes in the home lane. GPU programs hold all of them (see
//!   [`vector_bytes`]).
//! - **Activations** move when a lane needs columns the other lane holds ([`Move`]): a buffer's valid
//!   columns are tracked per side ([`Loc`]); the logits end on the host.
//! - **Weights** of streamed and split tensors are copied into a slot of a VRAM ring before the
//!   segment (the ops before the first layer, one layer, the ops after the last) that reads them.
//!   One slot holds one segment's loads; slots are assigned statically, round-robin over the
//!   streaming segments; with `R` slots the copy lane runs `R − 1` segments ahead.

use std::ops::Range;

use pshard_kernels::cuda::{self as cu, AttnParams};
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::{GroupId, GroupRole, ModelSpec, TensorId};

use crate::placement::{Frac, Place, Placement};

/// Alignment of every device allocation and of each load inside a ring slot.
pub const DEVICE_ALIGN: u64 = 256;

/// `b` rounded up to [`DEVICE_ALIGN`] (at least one unit, as the device arena allocates).
pub fn align(b: u64) -> u64 {
    b.max(4).div_ceil(DEVICE_ALIGN) * DEVICE_ALIGN
}

/// Where an op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// CPU threads, from host memory.
    Cpu,
    /// The GPU's compute stream.
    Gpu,
}

/// How one node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// Entirely on one lane.
    On(Lane),
    /// Output columns `[0, cpu_cols)` on the CPU, the rest on the GPU.
    Split {
        /// Columns computed on the CPU.
        cpu_cols: usize,
    },
}

impl Run {
    /// Whether any part runs on the GPU.
    pub fn uses_gpu(self) -> bool {
        !matches!(self, Run::On(Lane::Cpu))
    }
    /// Whether any part runs on the CPU.
    pub fn uses_cpu(self) -> bool {
        !matches!(self, Run::On(Lane::Gpu))
    }
}

/// Which columns of a buffer hold current values on each side: `[0, cpu_end)` on the host,
/// `[gpu_start, cols)` on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// End of the host's valid prefix.
    pub cpu_end: u32,
    /// Start of the device's valid suffix.
    pub gpu_start: u32,
    /// Columns of the buffer.
    pub cols: u32,
}

impl Loc {
    /// Nothing written yet.
    pub fn nowhere(cols: usize) -> Loc {
        Loc {
            cpu_end: 0,
            gpu_start: cols as u32,
            cols: cols as u32,
        }
    }

    /// After a write by `run`.
    pub fn written(run: Run, cols: usize) -> Loc {
        let c = cols as u32;
        match run {
            Run::On(Lane::Cpu) => Loc {
                cpu_end: c,
                gpu_start: c,
                cols: c,
            },
            Run::On(Lane::Gpu) => Loc {
                cpu_end: 0,
                gpu_start: 0,
                cols: c,
            },
            Run::Split { cpu_cols } => Loc {
                cpu_end: cpu_cols as u32,
                gpu_start: cpu_cols as u32,
                cols: c,
            },
        }
    }

    /// The column where a split buffer changes sides, if it is split (each side holds only its part).
    pub fn split_at(self) -> Option<usize> {
        (self.cpu_end == self.gpu_start && self.cpu_end > 0 && self.cpu_end < self.cols)
            .then_some(self.cpu_end as usize)
    }
}

/// Direction of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Host to device.
    H2D,
    /// Device to host.
    D2H,
}

/// An activation copy before a node: columns `cols` of every row of `buf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The buffer.
    pub buf: BufId,
    /// Direction.
    pub dir: Dir,
    /// Columns copied.
    pub cols: Range<usize>,
}

impl Move {
    /// Bytes copied (every row of the buffer, 4-byte values).
    pub fn bytes(&self, g: &Graph) -> u64 {
        (g.rows(self.buf) * self.cols.len() * 4) as u64
    }
}

/// Where a layer's attention finds its KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnKv {
    /// On the CPU, over the host copy.
    Host,
    /// On the GPU, resident in VRAM.
    Resident,
    /// On the GPU, the host copy's live cells staged in VRAM for the step and the cells it wrote
    /// copied back.
    Streamed,
}

/// One node's lane decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlan {
    /// How it runs.
    pub run: Run,
    /// Copies it needs first, in order.
    pub moves: Vec<Move>,
    /// For attention: where its KV is.
    pub kv: Option<AttnKv>,
}

/// Rows of one weight the copy lane brings into a ring slot before its segment runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Load {
    /// The tensor.
    pub tensor: TensorId,
    /// Rows loaded (of each matrix: expert tensors are loaded whole).
    pub rows: Range<usize>,
    /// Bytes copied.
    pub bytes: u64,
}

/// A segment: the ops before the first layer, one layer, or the ops after the last layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Its nodes.
    pub nodes: Range<usize>,
    /// Its layer, for layer segments.
    pub layer: Option<usize>,
}

/// The segments of a graph, in order.
pub fn segments(g: &Graph) -> Vec<Segment> {
    let mut segs = Vec::new();
    let mut start = 0;
    for i in 1..=g.nodes.len() {
        if i == g.nodes.len() || g.nodes[i].layer != g.nodes[start].layer {
            segs.push(Segment {
                nodes: start..i,
                layer: g.nodes[start].layer,
            });
            start = i;
        }
    }
    segs
}

/// CPU columns of a split of `n` output rows with CPU share `frac` (the one rounding rule).
pub fn split_cols(frac: Frac, n: usize) -> usize {
    n * frac.0 as usize / Frac::ONE as usize
}

/// The place of `tensor` as read by a node of `group`: its member slot in that group, else its first
/// slot in any group (a tied output reads the embedding tensor through the output group).
pub fn place_of(spec: &ModelSpec, pl: &Placement, group: GroupId, tensor: TensorId) -> Place {
    if let Some(m) = spec.group(group).tensors.iter().position(|t| *t == tensor) {
        return pl.group(group)[m];
    }
    for (gi, g) in spec.groups.iter().enumerate() {
        if let Some(m) = g.tensors.iter().position(|t| *t == tensor) {
            return pl.groups[gi][m];
        }
    }
    Place::Cpu
}

/// How a matmul with a weight at `place` and `rows` output rows runs.
fn matrix_run(place: Place, rows: usize) -> Run {
    match place {
        Place::Pinned | Place::Streamed => Run::On(Lane::Gpu),
        Place::Cpu => Run::On(Lane::Cpu),
        Place::Split { cpu } => match split_cols(cpu, rows) {
            0 => Run::On(Lane::Gpu),
            c if c >= rows => Run::On(Lane::Cpu),
            c => Run::Split { cpu_cols: c },
        },
    }
}

/// The home lane of a group's weightless ops (see the module rules).
pub fn home_lane(spec: &ModelSpec, pl: &Placement, g: GroupId) -> Lane {
    let grp = spec.group(g);
    let (mut cpu, mut tot) = (0.0, 0.0);
    for (t, p) in grp.tensors.iter().zip(pl.group(g)) {
        if matches!(p, Place::Split { .. }) {
            return Lane::Cpu;
        }
        let b = spec.tensor(*t).bytes as f64;
        cpu += b * p.cpu_share();
        tot += b;
    }
    if tot == 0.0 || cpu * 2.0 >= tot {
        Lane::Cpu
    } else {
        Lane::Gpu
    }
}

/// Where layer `l`'s attention runs and finds its KV: follows the place of its query projection.
pub fn attn_kv(spec: &ModelSpec, pl: &Placement, l: usize) -> AttnKv {
    let Some(g) = spec.layer_group(l, GroupRole::Attn) else {
        return AttnKv::Host;
    };
    let grp = spec.group(g);
    let q = grp
        .tensors
        .iter()
        .position(|t| spec.tensor(*t).role == pshard_model::spec::TensorRole::AttnQ)
        .or_else(|| grp.tensors.iter().position(|t| spec.tensor(*t).is_matrix()))
        .unwrap_or(0);
    match pl.group(g)[q] {
        Place::Pinned => AttnKv::Resident,
        Place::Streamed => AttnKv::Streamed,
        _ => AttnKv::Host,
    }
}

/// Whether a weightless op is column-wise (each output column depends only on the same column of
/// its inputs), so it can run split in place.
fn columnwise(op: &Op) -> bool {
    matches!(op, Op::Glu { .. } | Op::Add { .. } | Op::Softcap { .. })
}

/// The run of a node before its inputs are considered (weights and attention decide alone).
fn fixed_run(spec: &ModelSpec, g: &Graph, pl: &Placement, ni: usize) -> Option<Run> {
    let node = &g.nodes[ni];
    Some(match &node.op {
        Op::Embed { table, .. } => match place_of(spec, pl, node.group, *table) {
            Place::Pinned => Run::On(Lane::Gpu),
            _ => Run::On(Lane::Cpu),
        },
        Op::MatMul { weight, .. } => {
            let t = spec.tensor(*weight);
            matrix_run(place_of(spec, pl, node.group, *weight), t.rows())
        }
        Op::MoeFfn {
            gate_exps,
            up_exps,
            down_exps,
            ..
        } => {
            let gpu = [gate_exps, up_exps, down_exps].iter().all(|t| {
                matches!(
                    place_of(spec, pl, node.group, **t),
                    Place::Pinned | Place::Streamed
                )
            });
            Run::On(if gpu { Lane::Gpu } else { Lane::Cpu })
        }
        // One matrix per head, like experts never split: on the GPU when pinned or streamed.
        Op::HeadMatMul { weight, .. } => match place_of(spec, pl, node.group, *weight) {
            Place::Pinned | Place::Streamed => Run::On(Lane::Gpu),
            _ => Run::On(Lane::Cpu),
        },
        Op::Attention { layer, .. } => match attn_kv(spec, pl, *layer) {
            AttnKv::Host => Run::On(Lane::Cpu),
            _ => Run::On(Lane::Gpu),
        },
        _ => return None,
    })
}

/// Decides node `ni` given the buffer locations before it; updates `loc` to after it.
pub fn plan_node(
    spec: &ModelSpec,
    g: &Graph,
    pl: &Placement,
    ni: usize,
    loc: &mut [Loc],
) -> NodePlan {
    let node = &g.nodes[ni];
    let reads = node.op.reads();
    let run = fixed_run(spec, g, pl, ni).unwrap_or_else(|| {
        let split = reads.first().and_then(|b| loc[b.0 as usize].split_at());
        match split {
            Some(c)
                if columnwise(&node.op)
                    && reads
                        .iter()
                        .all(|b| loc[b.0 as usize].split_at() == Some(c)) =>
            {
                Run::Split { cpu_cols: c }
            }
            _ => Run::On(home_lane(spec, pl, node.group)),
        }
    });
    // A split column-wise op reads each side's own columns; everything else needs whole inputs
    // on every lane it runs on (a split matmul: on both).
    let in_place_split = matches!(run, Run::Split { .. }) && columnwise(&node.op);
    let mut moves = Vec::new();
    if !in_place_split {
        for b in reads {
            let l = &mut loc[b.0 as usize];
            if run.uses_cpu() && l.cpu_end < l.cols {
                moves.push(Move {
                    buf: b,
                    dir: Dir::D2H,
                    cols: l.cpu_end as usize..l.cols as usize,
                });
                l.cpu_end = l.cols;
            }
            if run.uses_gpu() && l.gpu_start > 0 {
                moves.push(Move {
                    buf: b,
                    dir: Dir::H2D,
                    cols: 0..l.gpu_start as usize,
                });
                l.gpu_start = 0;
            }
        }
    }
    for b in node.op.writes() {
        loc[b.0 as usize] = Loc::written(run, g.buffer(b).cols);
    }
    let kv = match node.op {
        Op::Attention { layer, .. } => Some(attn_kv(spec, pl, layer)),
        _ => None,
    };
    NodePlan { run, moves, kv }
}

/// The weights a GPU-run node needs brought in by the copy lane.
fn node_loads(spec: &ModelSpec, g: &Graph, pl: &Placement, ni: usize, run: Run) -> Vec<Load> {
    if !run.uses_gpu() {
        return Vec::new();
    }
    let node = &g.nodes[ni];
    let whole = |t: TensorId| {
        let td = spec.tensor(t);
        Load {
            tensor: t,
            rows: 0..td.rows(),
            bytes: td.bytes,
        }
    };
    match &node.op {
        Op::MatMul { weight, .. } => {
            let td = spec.tensor(*weight);
            match place_of(spec, pl, node.group, *weight) {
                Place::Streamed => vec![whole(*weight)],
                Place::Split { .. } => {
                    let c = match run {
                        Run::Split { cpu_cols } => cpu_cols,
                        _ => 0,
                    };
                    vec![Load {
                        tensor: *weight,
                        rows: c..td.rows(),
                        bytes: (td.rows() - c) as u64 * td.row_bytes(),
                    }]
                }
                _ => Vec::new(),
            }
        }
        Op::MoeFfn {
            gate_exps,
            up_exps,
            down_exps,
            ..
        } => [gate_exps, up_exps, down_exps]
            .into_iter()
            .filter(|t| place_of(spec, pl, node.group, **t) == Place::Streamed)
            .map(|t| whole(*t))
            .collect(),
        Op::HeadMatMul { weight, .. }
            if place_of(spec, pl, node.group, *weight) == Place::Streamed =>
        {
            vec![whole(*weight)]
        }
        _ => Vec::new(),
    }
}

/// One segment's decisions.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentPlan {
    /// The segment.
    pub seg: Segment,
    /// Weights loaded into its ring slot before it runs (deduplicated by tensor).
    pub loads: Vec<Load>,
    /// Its slot in the ring, when it loads anything.
    pub slot: Option<usize>,
}

impl SegmentPlan {
    /// Bytes the segment's slot must hold (each load aligned).
    pub fn slot_bytes(&self) -> u64 {
        self.loads.iter().map(|l| align(l.bytes)).sum()
    }
    /// Bytes the copy lane loads for it.
    pub fn load_bytes(&self) -> u64 {
        self.loads.iter().map(|l| l.bytes).sum()
    }
}

/// Decisions for segment `seg` given the buffer locations before it (updated to after it), and the
/// weights its ring slot receives.
pub fn plan_segment(
    spec: &ModelSpec,
    g: &Graph,
    pl: &Placement,
    seg: &Segment,
    loc: &mut [Loc],
) -> (Vec<NodePlan>, Vec<Load>) {
    let nodes = seg
        .nodes
        .clone()
        .map(|ni| plan_node(spec, g, pl, ni, loc))
        .collect();
    (nodes, segment_loads(spec, g, pl, seg))
}

/// The weights the copy lane loads into segment `seg`'s ring slot, in first-use order (each tensor
/// once). Only weight-reading nodes load, and their lanes depend on the placement alone.
pub fn segment_loads(spec: &ModelSpec, g: &Graph, pl: &Placement, seg: &Segment) -> Vec<Load> {
    let mut loads: Vec<Load> = Vec::new();
    for ni in seg.nodes.clone() {
        let Some(run) = fixed_run(spec, g, pl, ni) else {
            continue;
        };
        for l in node_loads(spec, g, pl, ni, run) {
            if !loads.iter().any(|x| x.tensor == l.tensor) {
                loads.push(l);
            }
        }
    }
    loads
}

/// KV cells a streamed-attention layer copies up before a step with `past` cells per sequence:
/// all of them, or for a sliding-window layer the window's worth (the older cells are never read).
pub fn kv_up_cells(window: Option<usize>, past: usize) -> usize {
    match window {
        Some(w) => past.min(w),
        None => past,
    }
}

/// Marks the buffers node `ni` (planned as `p`) needs on the device: everything a GPU part of it
/// touches and everything copied for it.
pub fn mark_device_buffers(g: &Graph, ni: usize, p: &NodePlan, on: &mut [bool]) {
    let node = &g.nodes[ni];
    if p.run.uses_gpu() {
        for b in node.op.reads().into_iter().chain(node.op.writes()) {
            on[b.0 as usize] = true;
        }
    }
    for m in &p.moves {
        on[m.buf.0 as usize] = true;
    }
}

/// Device bytes of the marked buffers (each aligned) plus the per-step inputs (token ids,
/// positions, KV cells, logit rows).
pub fn buffer_bytes(g: &Graph, on: &[bool]) -> u64 {
    (0..on.len())
        .filter(|&i| on[i])
        .map(|i| align((g.rows(BufId(i as u32)) * g.buffers[i].cols * 4) as u64))
        .sum::<u64>()
        + 3 * align((g.n_tokens * 4) as u64)
        + align((g.n_logit_rows * 4) as u64)
}

/// Buffer locations before the first node.
pub fn entry_locs(g: &Graph) -> Vec<Loc> {
    g.buffers.iter().map(|b| Loc::nowhere(b.cols)).collect()
}

/// Copies that bring the logits to the host at the end of a step.
pub fn final_moves(g: &Graph, loc: &[Loc]) -> Vec<Move> {
    let l = loc[g.logits.0 as usize];
    if l.cpu_end < l.cols {
        vec![Move {
            buf: g.logits,
            dir: Dir::D2H,
            cols: l.cpu_end as usize..l.cols as usize,
        }]
    } else {
        Vec::new()
    }
}

/// A whole program's decisions: what the runtime lowers and the cost model prices.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramLanes {
    /// Per node.
    pub nodes: Vec<NodePlan>,
    /// Per segment, with loads and ring slots.
    pub segments: Vec<SegmentPlan>,
    /// Copies of the logits to the host after the last node.
    pub finals: Vec<Move>,
    /// Ring slots used.
    pub ring_slots: usize,
}

impl ProgramLanes {
    /// Plans every node of `g` under `pl`, with a ring of `ring_slots` slots.
    pub fn new(spec: &ModelSpec, g: &Graph, pl: &Placement, ring_slots: usize) -> ProgramLanes {
        let mut loc = entry_locs(g);
        let mut nodes = Vec::with_capacity(g.nodes.len());
        let mut segs = Vec::new();
        let mut streaming = 0usize;
        let ring_slots = ring_slots.max(1);
        for seg in segments(g) {
            let (n, loads) = plan_segment(spec, g, pl, &seg, &mut loc);
            nodes.extend(n);
            let slot = (!loads.is_empty()).then(|| {
                streaming += 1;
                (streaming - 1) % ring_slots
            });
            segs.push(SegmentPlan { seg, loads, slot });
        }
        let finals = final_moves(g, &loc);
        ProgramLanes {
            nodes,
            segments: segs,
            finals,
            ring_slots,
        }
    }

    /// Whether anything runs on the GPU.
    pub fn uses_gpu(&self) -> bool {
        self.nodes.iter().any(|n| n.run.uses_gpu())
    }

    /// Bytes of one ring slot (the largest segment's loads), 0 when nothing streams.
    pub fn slot_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(SegmentPlan::slot_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Bytes of the ring.
    pub fn ring_bytes(&self) -> u64 {
        let slot = self.slot_bytes();
        let used = self
            .segments
            .iter()
            .filter(|s| s.slot.is_some())
            .count()
            .min(self.ring_slots);
        slot * used as u64
    }

    /// Layers whose attention streams its KV.
    pub fn streamed_kv_layers(&self, g: &Graph) -> Vec<usize> {
        self.kv_layers(g, AttnKv::Streamed)
    }

    /// Layers whose attention keeps its KV resident in VRAM.
    pub fn resident_kv_layers(&self, g: &Graph) -> Vec<usize> {
        self.kv_layers(g, AttnKv::Resident)
    }

    fn kv_layers(&self, g: &Graph, want: AttnKv) -> Vec<usize> {
        let mut v: Vec<usize> = g
            .nodes
            .iter()
            .zip(&self.nodes)
            .filter_map(|(n, p)| match (&n.op, p.kv) {
                (Op::Attention { layer, .. }, Some(k)) if k == want => Some(*layer),
                _ => None,
            })
            .collect();
        v.dedup();
        v
    }

    /// Bytes of every activation copy of one step (moves and the logits).
    pub fn move_bytes(&self, g: &Graph) -> (u64, u64) {
        let (mut h2d, mut d2h) = (0, 0);
        for m in self.nodes.iter().flat_map(|n| &n.moves).chain(&self.finals) {
            match m.dir {
                Dir::H2D => h2d += m.bytes(g),
                Dir::D2H => d2h += m.bytes(g),
            }
        }
        (h2d, d2h)
    }

    /// Bytes of the per-step inputs a GPU program uploads: token ids, positions, KV cells and
    /// logit rows, 4 bytes each.
    pub fn input_bytes(&self, g: &Graph) -> u64 {
        if self.uses_gpu() {
            ((3 * g.n_tokens + g.n_logit_rows) * 4) as u64
        } else {
            0
        }
    }

    /// Graph buffers that live on the device (touched by a GPU node or a copy).
    pub fn device_buffers(&self, g: &Graph) -> Vec<BufId> {
        let on = self.device_buffer_marks(g);
        (0..on.len())
            .filter(|&i| on[i])
            .map(|i| BufId(i as u32))
            .collect()
    }

    fn device_buffer_marks(&self, g: &Graph) -> Vec<bool> {
        let mut on = vec![false; g.buffers.len()];
        for (ni, p) in self.nodes.iter().enumerate() {
            mark_device_buffers(g, ni, p, &mut on);
        }
        for m in &self.finals {
            on[m.buf.0 as usize] = true;
        }
        on
    }
}

/// The f32 bytes of every vector tensor (norm weights, biases, rope factors), each aligned: what a
/// GPU program keeps resident besides its placed matrices.
pub fn vector_bytes(spec: &ModelSpec) -> u64 {
    spec.tensors
        .iter()
        .filter(|t| !t.is_matrix())
        .map(|t| align(t.dims.iter().product::<u64>() * 4))
        .sum()
}

/// Matrices pinned by a placement (each tensor once, aligned as the runtime uploads it).
pub fn pinned_matrices(spec: &ModelSpec, pl: &Placement) -> Vec<TensorId> {
    let mut v = Vec::new();
    for (gi, g) in spec.groups.iter().enumerate() {
        for (mi, t) in g.tensors.iter().enumerate() {
            if pl.groups[gi][mi] == Place::Pinned && spec.tensor(*t).is_matrix() && !v.contains(t) {
                v.push(*t);
            }
        }
    }
    v
}

/// VRAM bytes of the matrices a placement pins.
pub fn pinned_bytes(spec: &ModelSpec, pl: &Placement) -> u64 {
    pinned_matrices(spec, pl)
        .into_iter()
        .map(|t| align(spec.tensor(t).bytes))
        .sum()
}

/// Scratch a GPU program needs besides its buffers, sized from its GPU nodes as the CUDA backend
/// runs them (the host device allocates the same, so the budget is tested without a GPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceScratch {
    /// Dequantized f16 weight slice of the GEMM path.
    pub gemm_w: u64,
    /// f16 activations of the GEMM path.
    pub gemm_x: u64,
    /// Split-KV attention partials.
    pub attn: u64,
    /// Per-pair expert intermediates (gate, up, hidden: each this size).
    pub moe_ff: u64,
    /// Per-pair expert outputs.
    pub moe_out: u64,
    /// Grouped expert path: f16 rows sorted by expert.
    pub moe_x16: u64,
    /// Grouped expert path: pair order.
    pub moe_idx: u64,
    /// Grouped expert path: per-expert row and tile offsets.
    pub moe_offsets: u64,
    /// Per-head matmuls: every pair routed to its head (`head_route` in ops.cu).
    pub head_route: u64,
}

impl DeviceScratch {
    /// Scratch of the GPU parts of `nodes` (node index, decision) of `g`, for KV caches of
    /// `kv_cells` cells per sequence; `exact`: exact-activation mode (every quantized matmul takes
    /// the GEMM path).
    pub fn of<'p>(
        spec: &ModelSpec,
        g: &Graph,
        nodes: impl Iterator<Item = (usize, &'p NodePlan)>,
        kv_cells: usize,
        exact: bool,
    ) -> DeviceScratch {
        nodes.fold(DeviceScratch::default(), |n, (ni, p)| {
            n.max(DeviceScratch::of_node(spec, g, ni, p.run, kv_cells, exact))
        })
    }

    /// Scratch of node `ni` of `g` run as `run` (nothing when no part is on the GPU).
    pub fn of_node(
        spec: &ModelSpec,
        g: &Graph,
        ni: usize,
        run: Run,
        kv_cells: usize,
        exact: bool,
    ) -> DeviceScratch {
        let mut n = DeviceScratch::default();
        if !run.uses_gpu() {
            return n;
        }
        match g.nodes[ni].op {
            Op::MatMul { weight, x, .. } => {
                let rows = g.rows(x);
                let t = spec.tensor(weight);
                let gpu_rows = match run {
                    Run::Split { cpu_cols } => t.rows() - cpu_cols,
                    _ => t.rows(),
                };
                if gemm_path(t.ty, rows, exact) {
                    n.gemm_w = (gpu_rows * t.cols() * 2) as u64;
                    n.gemm_x = (rows * t.cols() * 2) as u64;
                }
            }
            Op::Attention {
                q,
                n_head,
                n_head_kv,
                head_dim_k,
                head_dim_v,
                v_in_k,
                ..
            } => {
                let a = AttnParams {
                    n_head,
                    n_kv: n_head_kv,
                    dk: head_dim_k,
                    dv: head_dim_v,
                    n_ctx: kv_cells,
                    scale: 1.0,
                    softcap: 0.0,
                    window: 0,
                    v_in_k,
                };
                n.attn = cu::kernels::attention_scratch(&a, g.rows(q)) as u64;
            }
            Op::MoeFfn {
                x,
                route,
                gate_exps,
                ..
            } => {
                let pairs = g.rows(x) * g.buffer(route).cols / 2;
                let gate = spec.tensor(gate_exps);
                let (ff, d) = (gate.rows(), g.buffer(x).cols);
                n.moe_ff = (pairs * ff * 4) as u64;
                n.moe_out = (pairs * d * 4) as u64;
                if moe_grouped(pairs, exact) {
                    n.moe_x16 = (pairs * d.max(ff) * 2) as u64;
                    n.moe_idx = (pairs * 4) as u64;
                    n.moe_offsets = (2 * (gate.n_mats() + 2) * 4) as u64;
                }
            }
            // Run as routed experts with every (token, head) pair routed to its head: the routes,
            // and the grouped path's sorted f16 rows, order and offsets.
            Op::HeadMatMul { weight, x, .. } => {
                let t = spec.tensor(weight);
                let (heads, rows) = (t.n_mats(), g.rows(x));
                let pairs = rows * heads;
                n.head_route = (rows * 2 * heads * 4) as u64;
                if moe_grouped(pairs, exact) {
                    n.moe_x16 = (pairs * t.cols() * 2) as u64;
                    n.moe_idx = (pairs * 4) as u64;
                    n.moe_offsets = (2 * (heads + 2) * 4) as u64;
                }
            }
            _ => {}
        }
        n
    }

    /// Whether every part is at least as large as `o`'s.
    pub fn covers(&self, o: &DeviceScratch) -> bool {
        self.max(*o) == *self
    }

    /// The larger of each part.
    pub fn max(self, o: DeviceScratch) -> DeviceScratch {
        DeviceScratch {
            gemm_w: self.gemm_w.max(o.gemm_w),
            gemm_x: self.gemm_x.max(o.gemm_x),
            attn: self.attn.max(o.attn),
            moe_ff: self.moe_ff.max(o.moe_ff),
            moe_out: self.moe_out.max(o.moe_out),
            moe_x16: self.moe_x16.max(o.moe_x16),
            moe_idx: self.moe_idx.max(o.moe_idx),
            moe_offsets: self.moe_offsets.max(o.moe_offsets),
            head_route: self.head_route.max(o.head_route),
        }
    }

    /// Every buffer allocated for these parts, in allocation order, with its name: the three
    /// per-pair expert intermediates (gate, up, hidden) are `moe_ff` bytes each.
    pub fn parts(&self) -> [(u64, &'static str); 11] {
        [
            (self.gemm_w, "dequantized weight"),
            (self.gemm_x, "f16 activation"),
            (self.attn, "attention split"),
            (self.moe_ff, "expert gate"),
            (self.moe_ff, "expert up"),
            (self.moe_ff, "expert hidden"),
            (self.moe_out, "expert out"),
            (self.moe_x16, "expert f16 rows"),
            (self.moe_idx, "expert pair order"),
            (self.moe_offsets, "expert offsets"),
            (self.head_route, "head routes"),
        ]
    }

    /// Bytes of all parts, each aligned as allocated (absent parts are not allocated).
    pub fn bytes(&self) -> u64 {
        self.parts()
            .iter()
            .map(|&(b, _)| if b > 0 { align(b) } else { 0 })
            .sum()
    }
}

/// Whether the CUDA backend multiplies a `ty` weight over `rows` token rows by dequantize + GEMM
/// (else the fused GEMV or MMQ, which need no GEMM scratch): [`cu::matmul_path`] with scratch at
/// hand.
pub fn gemm_path(ty: pshard_model::ggml_type::GgmlType, rows: usize, exact: bool) -> bool {
    cu::matmul_path(ty, rows, true, exact && ty.is_quantized()) == cu::MatmulPath::Gemm
}

/// Whether the CUDA backend runs expert FFNs of `pairs` (token, expert) pairs on the grouped path.
pub fn moe_grouped(pairs: usize, exact: bool) -> bool {
    pairs > cu::MOE_GEMV_MAX_PAIRS || exact
}

/// VRAM of one program besides the weights and the resident KV: its device buffers, per-step
/// inputs, scratch, the ring and the staging of streamed KV (two layers' worth).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramBytes {
    /// Activation buffers on the device, and the per-step inputs.
    pub buffers: u64,
    /// Kernel scratch.
    pub scratch: u64,
    /// Streaming ring.
    pub ring: u64,
    /// Staging of streamed attention's KV.
    pub kv_stage: u64,
}

impl ProgramBytes {
    /// Total.
    pub fn total(&self) -> u64 {
        self.buffers + self.scratch + self.ring + self.kv_stage
    }
}

/// The device bytes of a program; `layer_kv` gives a layer's KV bytes (all sequences) in VRAM.
pub fn program_bytes(
    spec: &ModelSpec,
    g: &Graph,
    lanes: &ProgramLanes,
    kv_cells: usize,
    layer_kv: &dyn Fn(usize) -> u64,
) -> ProgramBytes {
    if !lanes.uses_gpu() {
        return ProgramBytes::default();
    }
    let buffers = buffer_bytes(g, &lanes.device_buffer_marks(g));
    let stage = lanes
        .streamed_kv_layers(g)
        .into_iter()
        .map(layer_kv)
        .max()
        .unwrap_or(0);
    ProgramBytes {
        buffers,
        scratch: DeviceScratch::of(spec, g, lanes.nodes.iter().enumerate(), kv_cells, false)
            .bytes(),
        ring: lanes.ring_bytes(),
        kv_stage: 2 * stage,
    }
}
