//! Programs: a tier's op graph lowered once, from the lane decisions of
//! [`pshard_planner::lanes`], into steps on three lanes — the CPU, the GPU's compute stream and its
//! copy stream — with the copies between them and the events that order them. The topology
//! depends only on the batch shape and the placement: token ids, positions, sequences and KV
//! lengths are inputs of each run, so a program is reused for every batch of its tier.
//!
//! Order of a node's steps: activations it needs on the device are staged and uploaded, those it
//! needs on the host are downloaded, then its GPU part is enqueued, then downloaded columns are
//! collected and its CPU part runs — so the GPU part of a split matmul runs while the CPU computes
//! its own rows. Weight loads go onto the copy stream one streaming segment ahead (into the other
//! ring slot); streamed attention's KV is staged up one streamed layer ahead and its written
//! cells go back right after the attention.
//!
//! Dependencies come from what each step reads and writes ([`Res`]): read-after-write,
//! write-after-read and write-after-write between steps of different lanes become events — a
//! stream waits for an event recorded after the producer, the CPU waits on the host — except
//! where the producer is a CPU step (the engine issues steps in order, so CPU work is done before
//! anything after it is enqueued). Waits already implied by an earlier wait on the same stream are
//! dropped.

pub mod fuse;

use std::collections::HashMap;
use std::ops::Range;

use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::ModelSpec;
use pshard_planner::lanes::{AttnKv, Dir, Move, ProgramLanes, Run};
use pshard_planner::Placement;

use crate::device::GpuWork;

/// Where a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// CPU threads (the engine's thread issues everything in order).
    Cpu,
    /// The GPU compute stream.
    Gpu,
    /// The GPU copy stream.
    Copy,
}

/// What a step does.
#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    /// The per-step inputs (token ids, positions, sequences, logit rows) go up (compute stream).
    Inputs,
    /// Node `node` on the CPU, all output columns or `cols`.
    Cpu {
        /// Graph node.
        node: usize,
        /// Output columns, when split.
        cols: Option<Range<usize>>,
    },
    /// Graph nodes `nodes`: matmuls of one input on the CPU, all output columns, as one pool job
    /// (one wake-up of the CPU's threads and one conversion of the input for all of them).
    CpuMatMuls {
        /// Graph nodes.
        nodes: Range<usize>,
    },
    /// GPU work on the compute stream.
    Gpu(GpuWork),
    /// The CPU copies columns of a buffer into its staging memory for an upload.
    Stage {
        /// Buffer.
        buf: BufId,
        /// Columns.
        cols: Range<usize>,
    },
    /// The compute stream uploads staged columns.
    Upload {
        /// Buffer.
        buf: BufId,
        /// Columns.
        cols: Range<usize>,
    },
    /// The compute stream downloads columns into staging memory.
    Download {
        /// Buffer.
        buf: BufId,
        /// Columns.
        cols: Range<usize>,
    },
    /// The CPU takes downloaded columns from staging memory.
    Collect {
        /// Buffer.
        buf: BufId,
        /// Columns.
        cols: Range<usize>,
    },
    /// The copy stream loads segment `seg`'s weights into ring slot `slot`.
    Load {
        /// Segment (index into the lanes' segments).
        seg: usize,
        /// Ring slot.
        slot: usize,
    },
    /// The copy stream brings layer `layer`'s live KV cells into staging buffer `stage`.
    KvUp {
        /// Layer.
        layer: usize,
        /// Staging buffer (0 or 1).
        stage: usize,
    },
    /// The copy stream writes the cells this step wrote in `stage` back to the layer's host KV.
    KvDown {
        /// Layer.
        layer: usize,
        /// Staging buffer.
        stage: usize,
    },
}

impl StepKind {
    /// The graph nodes a CPU step runs (empty for the other steps).
    pub fn cpu_nodes(&self) -> Range<usize> {
        match self {
            StepKind::Cpu { node, .. } => *node..node + 1,
            StepKind::CpuMatMuls { nodes } => nodes.clone(),
            _ => 0..0,
        }
    }

    /// The lane it runs on.
    pub fn lane(&self) -> Lane {
        match self {
            StepKind::Cpu { .. }
            | StepKind::CpuMatMuls { .. }
            | StepKind::Stage { .. }
            | StepKind::Collect { .. } => Lane::Cpu,
            StepKind::Inputs
            | StepKind::Gpu(_)
            | StepKind::Upload { .. }
            | StepKind::Download { .. } => Lane::Gpu,
            StepKind::Load { .. } | StepKind::KvUp { .. } | StepKind::KvDown { .. } => Lane::Copy,
        }
    }
}

/// One step with its synchronisation.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// What it does.
    pub kind: StepKind,
    /// Events (indices into the program's events) to wait for first: on the step's stream for
    /// device steps, on the host for CPU steps.
    pub waits: Vec<usize>,
    /// Event recorded right after this step, when a later step waits for it.
    pub signal: Option<usize>,
}

/// A resource steps read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Res {
    /// A buffer's host copy.
    Host(BufId),
    /// A buffer's device copy.
    Dev(BufId),
    /// A buffer's staging memory.
    Staging(BufId),
    /// A ring slot.
    Slot(usize),
    /// A KV staging buffer.
    Stage(usize),
    /// A layer's host KV.
    KvHost(usize),
    /// A layer's device KV.
    KvDev(usize),
    /// The per-step inputs on the device.
    Inputs,
}

/// A lowered program.
#[derive(Clone, Debug)]
pub struct Program {
    /// The forward pass.
    pub graph: Graph,
    /// The lane decisions it was lowered from.
    pub lanes: ProgramLanes,
    /// Steps in issue order.
    pub steps: Vec<Step>,
    /// Events the steps signal.
    pub n_events: usize,
    /// Per graph node: the ring slot its streamed weights are in.
    pub node_slot: Vec<Option<usize>>,
    /// Per layer with streamed attention: its KV staging buffer.
    pub kv_stage: HashMap<usize, usize>,
}

impl Program {
    /// Lowers `graph` under `placement` with a ring of `ring_slots` slots.
    pub fn lower(
        spec: &ModelSpec,
        graph: Graph,
        placement: &Placement,
        ring_slots: usize,
        exact: bool,
    ) -> Program {
        let lanes = ProgramLanes::new(spec, &graph, placement, ring_slots);
        let mut kinds: Vec<StepKind> = Vec::new();
        if lanes.uses_gpu() {
            kinds.push(StepKind::Inputs);
        }
        // Streaming segments in order, and where each one's load is issued: R − 1 ahead.
        let streaming: Vec<usize> = lanes
            .segments
            .iter()
            .enumerate()
            .filter(|(_, s)| s.slot.is_some())
            .map(|(i, _)| i)
            .collect();
        let ahead = lanes.ring_slots.saturating_sub(1);
        let mut loads_at: HashMap<usize, Vec<usize>> = HashMap::new(); // segment → loads issued there
        for (j, &seg) in streaming.iter().enumerate() {
            let at = if j >= ahead { streaming[j - ahead] } else { 0 };
            loads_at.entry(at.min(seg)).or_default().push(seg);
        }
        // Streamed-attention layers: staged alternately in two buffers, one layer ahead.
        let streamed_layers = lanes.streamed_kv_layers(&graph);
        let mut kv_stage = HashMap::new();
        let mut kv_up_at: HashMap<usize, Vec<usize>> = HashMap::new(); // segment → layers
        let seg_of_layer = |l: usize| {
            lanes
                .segments
                .iter()
                .position(|s| s.seg.layer == Some(l))
                .unwrap_or(0)
        };
        for (i, &l) in streamed_layers.iter().enumerate() {
            kv_stage.insert(l, i % 2);
            let at = if i == 0 {
                0
            } else {
                seg_of_layer(streamed_layers[i - 1])
            };
            kv_up_at.entry(at).or_default().push(l);
        }
        let mut node_slot = vec![None; graph.nodes.len()];
        for s in &lanes.segments {
            for ni in s.seg.nodes.clone() {
                node_slot[ni] = s.slot;
            }
        }
        for (si, seg) in lanes.segments.iter().enumerate() {
            for &ls in loads_at.get(&si).into_iter().flatten() {
                kinds.push(StepKind::Load {
                    seg: ls,
                    slot: lanes.segments[ls].slot.expect("streaming segment"),
                });
            }
            for &l in kv_up_at.get(&si).into_iter().flatten() {
                kinds.push(StepKind::KvUp {
                    layer: l,
                    stage: kv_stage[&l],
                });
            }
            for ni in seg.seg.nodes.clone() {
                let np = &lanes.nodes[ni];
                node_steps(&graph, ni, np.run, &np.moves, &mut kinds);
                if let (Op::Attention { layer, .. }, Some(AttnKv::Streamed)) =
                    (&graph.nodes[ni].op, np.kv)
                {
                    kinds.push(StepKind::KvDown {
                        layer: *layer,
                        stage: kv_stage[layer],
                    });
                }
            }
        }
        move_steps(&lanes.finals, &mut kinds);
        let kinds = fuse::fuse(spec, &graph, kinds, exact);
        let (steps, n_events) = synchronise(&graph, &lanes, &node_slot, &kv_stage, kinds);
        Program {
            graph,
            lanes,
            steps,
            n_events,
            node_slot,
            kv_stage,
        }
    }

    /// Whether any step runs on the device.
    pub fn uses_device(&self) -> bool {
        self.steps.iter().any(|s| s.kind.lane() != Lane::Cpu)
    }
}

/// The copies of `moves` (uploads staged first), as steps.
fn move_steps(moves: &[Move], kinds: &mut Vec<StepKind>) {
    for m in moves.iter().filter(|m| m.dir == Dir::H2D) {
        kinds.push(StepKind::Stage {
            buf: m.buf,
            cols: m.cols.clone(),
        });
        kinds.push(StepKind::Upload {
            buf: m.buf,
            cols: m.cols.clone(),
        });
    }
    for m in moves.iter().filter(|m| m.dir == Dir::D2H) {
        kinds.push(StepKind::Download {
            buf: m.buf,
            cols: m.cols.clone(),
        });
        kinds.push(StepKind::Collect {
            buf: m.buf,
            cols: m.cols.clone(),
        });
    }
}

/// A node's steps: uploads, downloads, its GPU part, collects, its CPU part.
fn node_steps(g: &Graph, ni: usize, run: Run, moves: &[Move], kinds: &mut Vec<StepKind>) {
    let out_cols = g.nodes[ni]
        .op
        .writes()
        .first()
        .map_or(0, |b| g.buffer(*b).cols);
    for m in moves.iter().filter(|m| m.dir == Dir::H2D) {
        kinds.push(StepKind::Stage {
            buf: m.buf,
            cols: m.cols.clone(),
        });
        kinds.push(StepKind::Upload {
            buf: m.buf,
            cols: m.cols.clone(),
        });
    }
    for m in moves.iter().filter(|m| m.dir == Dir::D2H) {
        kinds.push(StepKind::Download {
            buf: m.buf,
            cols: m.cols.clone(),
        });
    }
    match run {
        Run::On(pshard_planner::lanes::Lane::Gpu) => kinds.push(StepKind::Gpu(GpuWork::Node {
            node: ni,
            cols: None,
            reuse_acts: false,
        })),
        Run::Split { cpu_cols } => kinds.push(StepKind::Gpu(GpuWork::Node {
            node: ni,
            cols: Some(cpu_cols..out_cols),
            reuse_acts: false,
        })),
        Run::On(pshard_planner::lanes::Lane::Cpu) => {}
    }
    for m in moves.iter().filter(|m| m.dir == Dir::D2H) {
        kinds.push(StepKind::Collect {
            buf: m.buf,
            cols: m.cols.clone(),
        });
    }
    match run {
        Run::On(pshard_planner::lanes::Lane::Cpu) => kinds.push(StepKind::Cpu {
            node: ni,
            cols: None,
        }),
        Run::Split { cpu_cols } => kinds.push(StepKind::Cpu {
            node: ni,
            cols: Some(0..cpu_cols),
        }),
        Run::On(pshard_planner::lanes::Lane::Gpu) => {}
    }
}

/// What a step reads and writes.
fn accesses(
    g: &Graph,
    lanes: &ProgramLanes,
    node_slot: &[Option<usize>],
    kv_stage: &HashMap<usize, usize>,
    k: &StepKind,
) -> (Vec<Res>, Vec<Res>) {
    let node_rw = |ni: usize, dev: bool, r: &mut Vec<Res>, w: &mut Vec<Res>| {
        let op = &g.nodes[ni].op;
        let side = |b: BufId| if dev { Res::Dev(b) } else { Res::Host(b) };
        r.extend(op.reads().into_iter().map(side));
        w.extend(op.writes().into_iter().map(side));
        if let Op::Attention { layer, .. } = op {
            let res = if !dev {
                Res::KvHost(*layer)
            } else if lanes.nodes[ni].kv == Some(AttnKv::Streamed) {
                Res::Stage(kv_stage[layer])
            } else {
                Res::KvDev(*layer)
            };
            r.push(res);
            w.push(res);
        }
        if dev {
            r.push(Res::Inputs);
            if let Some(s) = node_slot[ni] {
                r.push(Res::Slot(s));
            }
        }
    };
    let (mut r, mut w) = (Vec::new(), Vec::new());
    match k {
        StepKind::Inputs => w.push(Res::Inputs),
        StepKind::Cpu { .. } | StepKind::CpuMatMuls { .. } => {
            for ni in k.cpu_nodes() {
                node_rw(ni, false, &mut r, &mut w);
            }
        }
        StepKind::Gpu(GpuWork::Node { node, .. }) => node_rw(*node, true, &mut r, &mut w),
        StepKind::Gpu(GpuWork::QkNormRope { nodes }) => {
            for ni in nodes.clone() {
                node_rw(ni, true, &mut r, &mut w);
            }
        }
        StepKind::Stage { buf, .. } => {
            r.push(Res::Host(*buf));
            w.push(Res::Staging(*buf));
        }
        StepKind::Upload { buf, .. } => {
            r.push(Res::Staging(*buf));
            w.push(Res::Dev(*buf));
        }
        StepKind::Download { buf, .. } => {
            r.push(Res::Dev(*buf));
            w.push(Res::Staging(*buf));
        }
        StepKind::Collect { buf, .. } => {
            r.push(Res::Staging(*buf));
            w.push(Res::Host(*buf));
        }
        StepKind::Load { slot, .. } => w.push(Res::Slot(*slot)),
        StepKind::KvUp { layer, stage } => {
            r.push(Res::KvHost(*layer));
            w.push(Res::Stage(*stage));
        }
        StepKind::KvDown { layer, stage } => {
            r.push(Res::Stage(*stage));
            w.push(Res::KvHost(*layer));
        }
    }
    (r, w)
}

/// Turns the hazards between steps of different lanes into events (see the module notes).
fn synchronise(
    g: &Graph,
    lanes: &ProgramLanes,
    node_slot: &[Option<usize>],
    kv_stage: &HashMap<usize, usize>,
    kinds: Vec<StepKind>,
) -> (Vec<Step>, usize) {
    let mut last_writer: HashMap<Res, usize> = HashMap::new();
    let mut readers: HashMap<Res, Vec<usize>> = HashMap::new();
    let mut steps: Vec<Step> = kinds
        .into_iter()
        .map(|kind| Step {
            kind,
            waits: Vec::new(),
            signal: None,
        })
        .collect();
    // For each (waiting lane, producing lane): the latest producer already waited for.
    let mut covered: HashMap<(Lane, Lane), usize> = HashMap::new();
    let mut n_events = 0;
    for i in 0..steps.len() {
        let (r, w) = accesses(g, lanes, node_slot, kv_stage, &steps[i].kind);
        let mut deps: Vec<usize> = Vec::new();
        for res in &r {
            deps.extend(last_writer.get(res));
        }
        for res in &w {
            deps.extend(last_writer.get(res));
            deps.extend(readers.get(res).into_iter().flatten());
        }
        for res in r {
            readers.entry(res).or_default().push(i);
        }
        for res in w {
            last_writer.insert(res, i);
            readers.remove(&res);
        }
        let me = steps[i].kind.lane();
        deps.sort_unstable();
        deps.dedup();
        // Only the latest producer per lane matters (each lane is in order).
        let mut latest: HashMap<Lane, usize> = HashMap::new();
        for d in deps {
            let l = steps[d].kind.lane();
            if l == me || l == Lane::Cpu {
                continue;
            }
            let e = latest.entry(l).or_insert(d);
            *e = (*e).max(d);
        }
        let mut lanes_waited: Vec<(Lane, usize)> = latest.into_iter().collect();
        lanes_waited.sort_by_key(|&(l, d)| (d, l as u8));
        for (l, d) in lanes_waited {
            if covered.get(&(me, l)).is_some_and(|&c| c >= d) {
                continue;
            }
            covered.insert((me, l), d);
            let ev = *steps[d].signal.get_or_insert_with(|| {
                n_events += 1;
                n_events - 1
            });
            steps[i].waits.push(ev);
        }
    }
    (steps, n_events)
}

#[cfg(test)]
mod tests;
