//! The engine: one evaluation loop for every placement. A model, its tiers (placements per token
//! count), the KV cache of its sequences, and — when any tier uses one — a device. All-CPU and
//! all-GPU are two placements of this one machinery.
//!
//! Each ubatch runs the program of the smallest tier covering its token count. Switching tiers
//! re-uploads only the weights the new tier pins beyond the ones every GPU tier pins (uploaded
//! once at start) and moves the KV of layers whose home changes. A program's steps are issued in
//! order from the calling thread: device steps are enqueued (they return at once), CPU steps run
//! here after waiting for the device events they depend on.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use pshard_kernels::cuda::RegionKind;
use pshard_kernels::matmul::{ActPrecision, WeightMatrix};
use pshard_model::graph::{BufId, Op};
use pshard_model::spec::TensorId;
use pshard_planner::lanes::{self, AttnKv, DeviceScratch, ProgramLanes};
use pshard_planner::{Place, Placement};

pub use crate::batch::Logits;
use crate::batch::{Batch, ForcedRoutes, RouteOverride};
use crate::cpu::{ActTrace, CpuLane, Weights};
use crate::device::{
    DevPtr, Device, Event, GpuStep, GpuWork, HostBuf, HostSrc, Inputs, KRope, KvRef, KvShift,
    OpKey, OpTime, ScratchPtrs, Shape2d, Stream, WeightRef,
};
pub use crate::error::EngineError;
use crate::kv::{plain_alloc, with_bytes_as_kv, HostKv, HostKvAccess, KvLayout, KvType};
use crate::model::Model;
use crate::program::{Lane, Program, StepKind};
use crate::tiers::TierSet;

mod program;
mod seq;
mod tiers;

impl Weights for Model {
    fn matrix(&self, id: TensorId, expert: usize) -> (WeightMatrix<'_>, usize) {
        (Model::matrix(self, id, expert), 0)
    }
    fn vector(&self, id: TensorId) -> &[f32] {
        Model::vector(self, id)
    }
}

/// The matrices every tier computes on the CPU alone (never pinned, streamed or split): the
/// ones worth repacking for the CPU's kernels, since no GPU lane reads their file bytes.
fn cpu_only_matrices(spec: &pshard_model::spec::ModelSpec, tiers: &TierSet) -> Vec<TensorId> {
    let mut places: HashMap<TensorId, bool> = HashMap::new();
    for tier in &tiers.tiers {
        for (g, pl) in spec.groups.iter().zip(&tier.placement.groups) {
            for (&t, &p) in g.tensors.iter().zip(pl) {
                *places.entry(t).or_insert(true) &= p == Place::Cpu;
            }
        }
    }
    let mut ids: Vec<TensorId> = places
        .into_iter()
        .filter(|&(t, cpu)| cpu && spec.tensor(t).is_matrix())
        .map(|(t, _)| t)
        .collect();
    ids.sort_by_key(|t| t.0);
    ids
}

/// What the engine ran for one ubatch (for `run`'s report and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UbatchRecord {
    /// Tier index.
    pub tier: usize,
    /// Tokens.
    pub n_tokens: usize,
}

/// Weights and KV resident in VRAM for a set of tiers.
#[derive(Default)]
struct Residency {
    region: Option<pshard_kernels::cuda::RegionId>,
    weights: HashMap<TensorId, DevPtr>,
    kv: HashMap<usize, DevPtr>,
}

/// The device side of an engine.
struct DevSide {
    dev: Box<dyn Device>,
    vectors: HashMap<TensorId, DevPtr>,
    /// Weights pinned and KV resident in every GPU tier.
    common: Residency,
    /// The current tier's own extras beyond the common set, and which tier they are for.
    extra: Option<(usize, Residency)>,
    /// Recorded after the last run's final device step (the next run's copies wait for it).
    run_end: Event,
    run_end_pending: bool,
    released_host_bytes: u64,
    /// Bytes of the mapped file locked in place for the copy lane.
    registered_bytes: u64,
    /// Forced-route tables of runs with a route override.
    routes: Option<RouteTables>,
}

/// Device memory of the forced-route tables of runs with a route override (see
/// [`Engine::set_route_override`]): a region of its own beyond the plans' bill, and its staging
/// memory.
struct RouteTables {
    region: pshard_kernels::cuda::RegionId,
    addr: DevPtr,
    bytes: usize,
    stage: HostBuf,
    /// Recorded after the last upload from `stage` (the next run rewrites it).
    sent: Event,
}

/// Device resources of one tier: its buffers, inputs, scratch, ring and KV staging, sized for
/// the tier's token count and shared by its programs of any smaller batch.
struct LoadedTier {
    region: Option<pshard_kernels::cuda::RegionId>,
    bufs: Vec<DevPtr>,
    inputs: Inputs,
    scratch: ScratchPtrs,
    /// What `scratch` was sized for.
    scratch_sizes: DeviceScratch,
    slots: Vec<DevPtr>,
    stages: [DevPtr; 2],
    staging: Vec<Option<HostBuf>>,
    input_stage: Option<HostBuf>,
    /// Recorded after the last upload of the inputs (the next run rewrites the staging memory).
    inputs_sent: Option<Event>,
    /// The streaming segment whose weights the end of the last run already loaded into its ring
    /// slot for the next run of this tier (every program of a tier streams the same segments
    /// into the same slots).
    prefetched: Option<usize>,
    programs: HashMap<(usize, usize), LoadedProgram>,
}

/// A program ready to run.
struct LoadedProgram {
    id: u64,
    program: Arc<Program>,
    graph: Arc<pshard_model::graph::Graph>,
    cpu: CpuLane,
    events: Vec<Event>,
    /// Weights of each GPU step (by step index).
    weights: HashMap<usize, Vec<WeightRef>>,
    /// Offsets of each segment's loads in its slot.
    load_offsets: Vec<Vec<u64>>,
    /// Ranges of steps issued as one device graph.
    graph_blocks: Vec<std::ops::Range<usize>>,
    /// Its own device buffers when it wants more logit rows than its tier's region holds (a
    /// prompt tier is sized for one; perplexity wants every row): region, buffer addresses and
    /// staging memory replacing the tier's.
    own: Option<OwnRows>,
}

/// A program's own row-selected buffers (see [`LoadedProgram::own`]).
struct OwnRows {
    region: pshard_kernels::cuda::RegionId,
    bufs: Vec<DevPtr>,
    staging: Vec<Option<HostBuf>>,
    logit_rows: DevPtr,
    /// Its own scratch where its graph needs more than its tier's (the output projection over
    /// every row takes the dequantize + GEMM path that one row does not).
    scratch: Option<ScratchPtrs>,
}

/// Where a layer's KV cells currently are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvHome {
    Host,
    Device,
}

/// Model + tiers + KV cache (+ device): evaluates token sequences in ubatches.
pub struct Engine {
    /// The loaded model.
    pub model: Arc<Model>,
    tiers: TierSet,
    dev: Option<DevSide>,
    kv: HostKv,
    kv_home: Vec<KvHome>,
    loaded: HashMap<usize, LoadedTier>,
    n_past: Vec<usize>,
    precision: ActPrecision,
    trace: bool,
    route_override: Option<Arc<RouteOverride>>,
    op_secs: BTreeMap<&'static str, f64>,
    next_id: u64,
    history: Vec<UbatchRecord>,
}

impl Engine {
    /// An engine that runs everything on the CPU with a context of `n_ctx` positions, evaluating
    /// at most `ubatch` tokens per step.
    pub fn new(model: Model, n_ctx: usize, ubatch: usize) -> Engine {
        let ubatch = ubatch.clamp(1, n_ctx.max(1));
        let params = pshard_planner::cost::PlanParams::new(n_ctx);
        let tiers = TierSet::all_cpu(&model.spec, params, ubatch);
        Engine::build(Arc::new(model), tiers, 1).expect("an f16 KV cache fits every model")
    }

    /// An engine running `tiers` with `n_seq` sequences, on `device` when given (required when
    /// any tier uses the GPU). Uploads the vectors and the weights every GPU tier pins.
    pub fn with_tiers(
        model: Arc<Model>,
        tiers: TierSet,
        n_seq: usize,
        device: Option<Box<dyn Device>>,
        keep_host_weights: bool,
    ) -> Result<Engine, EngineError> {
        if tiers.uses_gpu() && device.is_none() {
            return Err(EngineError::Unsupported(
                "these plans place weights on the GPU but no device was given".into(),
            ));
        }
        let mut e = Engine::build(model, tiers, n_seq)?;
        if let Some(dev) = device {
            e.attach(dev, keep_host_weights)?;
        }
        Ok(e)
    }

    /// The engine without a device; its KV cache in the plans' KV type.
    fn build(model: Arc<Model>, tiers: TierSet, n_seq: usize) -> Result<Engine, EngineError> {
        let ty = KvType::from_ggml(tiers.params.kv_type).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "a {} KV cache (accepted: {})",
                tiers.params.kv_type.name(),
                KvType::accepted()
            ))
        })?;
        let layout = KvLayout::new(
            &model.spec,
            tiers.params.n_ctx,
            tiers.max_batch(),
            n_seq,
            ty,
        )?;
        let n_layer = model.spec.layers.len();
        model.repack(&cpu_only_matrices(&model.spec, &tiers));
        Ok(Engine {
            model,
            tiers,
            dev: None,
            kv: HostKv::new(layout),
            kv_home: vec![KvHome::Host; n_layer],
            loaded: HashMap::new(),
            n_past: vec![0; n_seq.max(1)],
            precision: ActPrecision::Quantized,
            trace: false,
            route_override: None,
            op_secs: BTreeMap::new(),
            next_id: 1,
            history: Vec::new(),
        })
    }

    /// Sets up the device: vectors and common weights uploaded, common resident KV allocated.
    fn attach(&mut self, dev: Box<dyn Device>, keep_host_weights: bool) -> Result<(), EngineError> {
        let run_end = dev.new_event()?;
        let mut side = DevSide {
            dev,
            vectors: HashMap::new(),
            common: Residency::default(),
            extra: None,
            run_end,
            run_end_pending: false,
            released_host_bytes: 0,
            registered_bytes: 0,
            routes: None,
        };
        let spec = &self.model.spec;
        if self.tiers.uses_gpu() {
            // Vectors: every one, as f32.
            let vecs: Vec<TensorId> = (0..spec.tensors.len() as u32)
                .map(TensorId)
                .filter(|t| !spec.tensor(*t).is_matrix())
                .collect();
            let bytes: u64 = vecs
                .iter()
                .map(|t| lanes::align(self.model.vector(*t).len() as u64 * 4))
                .sum();
            if bytes > 0 {
                let region = side
                    .dev
                    .create_region(RegionKind::Weights, "vectors", bytes)?;
                for t in vecs {
                    let v = self.model.vector(t);
                    let ptr = side
                        .dev
                        .alloc(region, v.len() as u64 * 4, &spec.tensor(t).name)?;
                    let hb = side.dev.host_alloc(v.len() * 4)?;
                    hb.write(&mut |b: &mut [u8]| b.copy_from_slice(bytemuck::cast_slice(v)));
                    side.dev.upload(
                        Stream::Copy,
                        ptr,
                        &HostSrc::Buf(hb, 0),
                        Shape2d::flat(v.len() * 4),
                    )?;
                    side.vectors.insert(t, ptr);
                }
            }
            // The common residency: matrices pinned and KV resident in every GPU tier.
            let gpu_tiers: Vec<&Placement> = self
                .tiers
                .tiers
                .iter()
                .map(|t| &t.placement)
                .filter(|p| p.uses_gpu())
                .collect();
            let pinned = |pl: &Placement| lanes::pinned_matrices(spec, pl);
            let mut weights = pinned(gpu_tiers[0]);
            weights.retain(|t| gpu_tiers.iter().all(|p| pinned(p).contains(t)));
            let kv: Vec<usize> = (0..spec.layers.len())
                .filter(|l| {
                    gpu_tiers
                        .iter()
                        .all(|p| lanes::attn_kv(spec, p, *l) == AttnKv::Resident)
                })
                .collect();
            side.common = self.make_residency(&side, "common", &weights, &kv)?;
            // What the copy lane reads more than once — streamed and split rows, and weights some
            // tiers pin beyond the common set (uploaded at each switch) — is locked in place.
            let mut ranges: Vec<(usize, usize, usize)> = Vec::new();
            for tier in &self.tiers.tiers {
                let g = pshard_model::arch::build_graph(spec, 1, 1)?;
                let l = ProgramLanes::new(spec, &g, &tier.placement, self.tiers.params.ring_slots);
                for seg in &l.segments {
                    for ld in &seg.loads {
                        let td = spec.tensor(ld.tensor);
                        let off = ld.rows.start * td.row_bytes() as usize;
                        ranges.push((td.file_index, off, ld.bytes as usize));
                    }
                }
                if tier.placement.uses_gpu() {
                    for t in lanes::pinned_matrices(spec, &tier.placement) {
                        if !weights.contains(&t) {
                            let td = spec.tensor(t);
                            ranges.push((td.file_index, 0, td.bytes as usize));
                        }
                    }
                }
            }
            side.registered_bytes = side.dev.register_mapped(&ranges)?;
            for &l in &kv {
                self.kv_home[l] = KvHome::Device;
            }
            side.dev.synchronize()?;
            if !keep_host_weights {
                // Pages of tensors pinned in every tier (and read nowhere else) are dead copies.
                for t in &weights {
                    let everywhere = spec.groups.iter().enumerate().all(|(gi, g)| {
                        g.tensors.iter().enumerate().all(|(mi, x)| {
                            x != t
                                || self
                                    .tiers
                                    .tiers
                                    .iter()
                                    .all(|tier| tier.placement.groups[gi][mi] == Place::Pinned)
                        })
                    });
                    if everywhere {
                        side.released_host_bytes += self
                            .model
                            .file()
                            .release_pages(spec.tensor(*t).file_index)
                            .unwrap_or(0);
                    }
                }
            }
        }
        self.dev = Some(side);
        Ok(())
    }

    /// Allocates a region holding `weights` (uploaded from the mapped file) and the KV of
    /// `kv_layers` (cells uploaded from their host copies when those exist).
    fn make_residency(
        &self,
        side: &DevSide,
        name: &str,
        weights: &[TensorId],
        kv_layers: &[usize],
    ) -> Result<Residency, EngineError> {
        let spec = &self.model.spec;
        let layout = &self.kv.layout;
        let bytes: u64 = weights
            .iter()
            .map(|t| lanes::align(spec.tensor(*t).bytes))
            .sum::<u64>()
            + kv_layers
                .iter()
                .map(|l| layout.layer_bytes(*l) as u64)
                .sum::<u64>();
        let mut r = Residency::default();
        if bytes == 0 {
            return Ok(r);
        }
        let region = side.dev.create_region(
            RegionKind::Weights,
            &format!("{name} weights and KV"),
            bytes,
        )?;
        r.region = Some(region);
        for t in weights {
            let td = spec.tensor(*t);
            let ptr = side.dev.alloc(region, td.bytes, &td.name)?;
            side.dev.upload(
                Stream::Copy,
                ptr,
                &HostSrc::Mapped {
                    file_index: td.file_index,
                    offset: 0,
                },
                Shape2d::flat(td.bytes as usize),
            )?;
            r.weights.insert(*t, ptr);
        }
        for &l in kv_layers {
            let ptr = side.dev.alloc(
                region,
                layout.layer_bytes(l) as u64,
                &format!("layer {l} KV"),
            )?;
            if let Some(hb) = self.kv.get(l) {
                move_live_kv(&*side.dev, layout, &self.n_past, l, hb, ptr, true)?;
            }
            r.kv.insert(l, ptr);
        }
        Ok(r)
    }

    /// The tiers this engine runs.
    pub fn tiers(&self) -> &TierSet {
        &self.tiers
    }

    /// The ubatches run so far (tier and size), oldest first.
    pub fn history(&self) -> &[UbatchRecord] {
        &self.history
    }

    /// Forgets the recorded ubatches.
    pub fn clear_history(&mut self) {
        self.history.clear();
    }

    /// The model the engine runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The device's report, when there is one.
    pub fn device_report(&self) -> Option<String> {
        let d = self.dev.as_ref()?;
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        Some(format!(
            "{}\ndevice: released {:.0} MiB of host weight pages after upload; {:.0} MiB of the \
             mapped file locked in place for streaming and tier switches",
            d.dev.report(),
            mib(d.released_host_bytes),
            mib(d.registered_bytes)
        ))
    }

    /// Device memory this process uses, as measured, when there is a device.
    pub fn device_measured_bytes(&self) -> Option<u64> {
        self.dev.as_ref().map(|d| d.dev.measured_bytes())
    }

    /// Bytes copied host→device and device→host so far.
    pub fn copied_bytes(&self) -> (u64, u64) {
        self.dev.as_ref().map_or((0, 0), |d| d.dev.copied_bytes())
    }

    /// Seconds spent per CPU op kind so far, largest first.
    pub fn op_seconds(&self) -> Vec<(&'static str, f64)> {
        let mut total = self.op_secs.clone();
        for t in self.loaded.values() {
            for p in t.programs.values() {
                for (k, v) in &p.cpu.op_secs {
                    *total.entry(*k).or_insert(0.0) += v;
                }
            }
        }
        let mut v: Vec<_> = total.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Per-op device timing on or off (see [`Device::set_op_timing`]).
    pub fn set_op_timing(&mut self, on: bool) {
        if let Some(d) = &mut self.dev {
            d.dev.set_op_timing(on);
        }
    }

    /// Device time per op key while timing was on.
    pub fn device_op_times(&self) -> Vec<(OpKey, OpTime)> {
        self.dev.as_ref().map_or(Vec::new(), |d| d.dev.op_times())
    }

    /// Forgets the device op times.
    pub fn clear_op_times(&mut self) {
        if let Some(d) = &mut self.dev {
            d.dev.clear_op_times();
        }
    }

    /// Forces MoE expert choices (see [`RouteOverride`]) on every lane; `None` routes normally.
    /// The CPU lane's routing asks `f` directly. For the device's, each run builds the tables of
    /// its routing steps and uploads them ahead of them, into device memory of their own beyond
    /// the plans' bill (made by the first run that needs it, released by the first run without
    /// an override), and issues its device steps one by one rather than as CUDA graphs, whose
    /// captures would keep the table address of their capture.
    pub fn set_route_override(&mut self, f: Option<Arc<RouteOverride>>) {
        self.route_override = f;
    }

    /// Exact-activation mode (off by default). When on, every matmul with quantized weights takes
    /// its activations unrounded — on the CPU f32 against weights dequantized on the fly, on the
    /// GPU through the f16 GEMM path at every batch size — instead of rounding them per block to
    /// the weight type's 8-bit partner format as llama.cpp does. Slower; an oracle for tests and
    /// for comparing lanes without the 8-bit rounding. Programs are rebuilt; the KV is kept.
    pub fn set_exact_activations(&mut self, on: bool) {
        let p = if on {
            ActPrecision::Exact
        } else {
            ActPrecision::Quantized
        };
        if p != self.precision {
            self.precision = p;
            self.unload_all();
        }
    }

    /// Whether exact-activation mode is on.
    pub fn exact_activations(&self) -> bool {
        self.precision == ActPrecision::Exact
    }

    /// Starts (`true`) or stops recording the rounded activations of every quantized matmul of
    /// the CPU lane, keyed by (weight, expert, position) — a test aid. Starting discards what was
    /// recorded.
    pub fn set_act_trace(&mut self, on: bool) {
        self.trace = on;
        for t in self.loaded.values_mut() {
            for p in t.programs.values_mut() {
                p.cpu.trace = on.then(ActTrace::new);
            }
        }
    }

    /// Takes the activations recorded since [`Engine::set_act_trace`]`(true)`.
    pub fn take_act_trace(&mut self) -> ActTrace {
        let mut all = ActTrace::new();
        for t in self.loaded.values_mut() {
            for p in t.programs.values_mut() {
                if let Some(tr) = &mut p.cpu.trace {
                    all.extend(std::mem::take(tr));
                }
            }
        }
        all
    }

    /// Evaluates `tokens` after sequence 0; returns logits of the last token (`Last`) or of every
    /// token (`All`, row-major `tokens.len() × n_vocab`). A prompt is cut into the ubatch its
    /// tiers chose; each ubatch runs the program of the smallest tier covering it.
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>, EngineError> {
        self.eval_seq(0, tokens, which)
    }

    /// [`Engine::eval`] for sequence `s`.
    pub fn eval_seq(
        &mut self,
        s: usize,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::Empty);
        }
        if s >= self.n_past.len() {
            return Err(EngineError::Batch(format!(
                "sequence {s} does not exist (the engine holds {})",
                self.n_past.len()
            )));
        }
        let start = self.n_past[s];
        if start + tokens.len() > self.n_ctx() {
            return Err(EngineError::ContextFull {
                needed: start + tokens.len(),
                n_ctx: self.n_ctx(),
            });
        }
        let n_vocab = self.model.spec.hparams.n_vocab;
        let ub = self.tiers.prompt_ubatch(tokens.len());
        let chunks: Vec<&[u32]> = tokens.chunks(ub).collect();
        let n_chunks = chunks.len();
        let mut out = Vec::new();
        for (ci, chunk) in chunks.into_iter().enumerate() {
            let n = chunk.len();
            let p0 = self.n_past[s];
            let positions: Vec<u32> = (p0..p0 + n).map(|p| p as u32).collect();
            let seqs = vec![s as u32; n];
            let logit_rows: Vec<usize> = match which {
                Logits::All => (0..n).collect(),
                // Intermediate prompt chunks still need one row for the output head; it is cheap
                // (one row) and discarded.
                Logits::Last => vec![n - 1],
            };
            let read = which == Logits::All || ci + 1 == n_chunks;
            let logits = match self.run_ubatch(chunk, &positions, &seqs, &logit_rows, read) {
                // Logits of every row of a prompt tier need buffers its plan did not bill: when
                // they do not fit, the chunk runs in the largest decode tier's ubatches, whose
                // plans carry a logit row per token (nothing ran yet: the program never loaded).
                Err(EngineError::Cuda(pshard_kernels::cuda::CudaError::OutOfVram { .. }))
                    if which == Logits::All && self.decode_ubatch() < n =>
                {
                    let ub = self.decode_ubatch();
                    let mut all = Vec::with_capacity(n * n_vocab);
                    for piece in chunk.chunks(ub) {
                        let m = piece.len();
                        let p0 = self.n_past[s];
                        let pos: Vec<u32> = (p0..p0 + m).map(|p| p as u32).collect();
                        let rows: Vec<usize> = (0..m).collect();
                        all.extend(self.run_ubatch(piece, &pos, &seqs[..m], &rows, true)?);
                    }
                    all
                }
                r => r?,
            };
            match which {
                Logits::All => out.extend_from_slice(&logits),
                Logits::Last if ci + 1 == n_chunks => {
                    // One row was asked for: the buffer is that row (a second megabyte-sized
                    // copy per token showed in small models' decode profiles).
                    out = logits;
                    out.truncate(n_vocab);
                }
                Logits::Last => {}
            }
        }
        Ok(out)
    }

    /// The largest ubatch a decode tier runs (its plans compute a logit row per token), at least 1.
    fn decode_ubatch(&self) -> usize {
        self.tiers
            .tiers
            .iter()
            .filter(|t| !t.prefill)
            .map(|t| t.n.min(t.ubatch))
            .max()
            .unwrap_or(1)
    }

    /// Evaluates one ubatch of rows from any sequences (each row a token at the end of its
    /// sequence; rows of one sequence consecutive). Returns the logits of `logit_rows`.
    pub fn eval_batch(
        &mut self,
        tokens: &[u32],
        seqs: &[u32],
        logit_rows: &[usize],
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::Empty);
        }
        if seqs.len() != tokens.len() {
            return Err(EngineError::Batch(format!(
                "{} tokens but {} sequence ids",
                tokens.len(),
                seqs.len()
            )));
        }
        let mut next = self.n_past.clone();
        let mut positions = Vec::with_capacity(tokens.len());
        for &s in seqs {
            let p = next.get_mut(s as usize).ok_or_else(|| {
                EngineError::Batch(format!(
                    "sequence {s} does not exist (the engine holds {})",
                    self.n_past.len()
                ))
            })?;
            positions.push(*p as u32);
            *p += 1;
        }
        self.run_ubatch(tokens, &positions, seqs, logit_rows, true)
    }

    /// Runs rows with the tier covering their count; when that tier runs a smaller tier's plan
    /// (its own did not fit the budget), in that tier's ubatches. `logit_rows` ascending; the
    /// logits come back in their order.
    fn run_ubatch(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        seqs: &[u32],
        logit_rows: &[usize],
        read_logits: bool,
    ) -> Result<Vec<f32>, EngineError> {
        let n = tokens.len();
        let ub = {
            let t = &self.tiers.tiers[self.tiers.tier_for(n)];
            t.ubatch.min(t.n).max(1)
        };
        if n <= ub {
            return self.run_one(tokens, positions, seqs, logit_rows, read_logits);
        }
        if logit_rows.windows(2).any(|w| w[0] >= w[1]) {
            return Err(EngineError::Batch("logit rows must be ascending".into()));
        }
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + ub).min(n);
            let mut rows: Vec<usize> = logit_rows
                .iter()
                .filter(|&&r| r >= start && r < end)
                .map(|&r| r - start)
                .collect();
            // The output head needs a row even when none is wanted; its logits are dropped.
            let wanted = !rows.is_empty();
            if !wanted {
                rows.push(end - start - 1);
            }
            let l = self.run_one(
                &tokens[start..end],
                &positions[start..end],
                &seqs[start..end],
                &rows,
                read_logits && wanted,
            )?;
            if wanted {
                out.extend(l);
            }
            start = end;
        }
        Ok(out)
    }

    /// Runs one ubatch with its tier's program; advances the sequences' lengths.
    fn run_one(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        seqs: &[u32],
        logit_rows: &[usize],
        read_logits: bool,
    ) -> Result<Vec<f32>, EngineError> {
        let n = tokens.len();
        let ti = self.tiers.tier_for(n);
        self.enter_tier(ti)?;
        let key = (n, logit_rows.len());
        if !self
            .loaded
            .get(&ti)
            .is_some_and(|t| t.programs.contains_key(&key))
        {
            self.load_program(ti, key)?;
        }
        let route_override = self.route_override.clone();
        let batch = Batch {
            tokens,
            positions,
            seqs,
            logit_rows,
            forced: route_override
                .as_deref()
                .map_or(ForcedRoutes::None, ForcedRoutes::Override),
        };
        let n_vocab = self.model.spec.hparams.n_vocab;
        batch.check(
            &self.loaded[&ti].programs[&key].graph,
            n_vocab,
            self.n_past.len(),
            self.n_ctx(),
        )?;
        let logits = self.run_program(ti, key, &batch, read_logits)?;
        for &s in seqs {
            self.n_past[s as usize] += 1;
        }
        self.history.push(UbatchRecord {
            tier: ti,
            n_tokens: n,
        });
        Ok(logits)
    }

    /// Enqueues one ubatch without waiting for its logits (benchmarks). Call
    /// [`Engine::synchronize`] before reading times.
    pub fn eval_async(&mut self, tokens: &[u32]) -> Result<(), EngineError> {
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::Empty);
        }
        let p0 = self.n_past[0];
        if p0 + n > self.n_ctx() {
            return Err(EngineError::ContextFull {
                needed: p0 + n,
                n_ctx: self.n_ctx(),
            });
        }
        let positions: Vec<u32> = (p0..p0 + n).map(|p| p as u32).collect();
        let seqs = vec![0u32; n];
        self.run_ubatch(tokens, &positions, &seqs, &[n - 1], false)?;
        Ok(())
    }

    /// Waits for all device work.
    pub fn synchronize(&mut self) -> Result<(), EngineError> {
        if let Some(d) = &mut self.dev {
            d.dev.synchronize()?;
            d.run_end_pending = false;
        }
        Ok(())
    }
}

/// Copies the live cells of layer `l` (each sequence's positions so far; a sliding-window ring's
/// last cells) between its host copy `hb` and its device copy at `dev_ptr` on the copy stream
/// (`up`: host → device). Cells no sequence has written are not copied.
fn move_live_kv(
    dev: &dyn Device,
    layout: &KvLayout,
    n_past: &[usize],
    l: usize,
    hb: &HostBuf,
    dev_ptr: DevPtr,
    up: bool,
) -> Result<(), EngineError> {
    for (s, &len) in n_past.iter().enumerate() {
        for cr in layout.cell_runs(l, 0..len) {
            for (cols, base) in [
                (layout.k_cols[l], 0),
                (layout.v_cols[l], layout.v_offset(l)),
            ] {
                // Latent attention keeps no V rows.
                if cols == 0 {
                    continue;
                }
                let off = base + layout.cell_offset(l, s, cr.start, cols);
                let shape = Shape2d::flat(cr.len() * layout.row_bytes(cols));
                if up {
                    dev.upload(
                        Stream::Copy,
                        dev_ptr + off as u64,
                        &HostSrc::Buf(hb.clone(), off),
                        shape,
                    )?;
                } else {
                    dev.download(Stream::Copy, hb, off, dev_ptr + off as u64, shape)?;
                }
            }
        }
    }
    Ok(())
}

/// Logit rows a tier's region is sized for, as the planner bills it: one for a prompt tier, one
/// per token for a decode tier.
fn tier_logit_rows(t: &crate::tiers::RunTier) -> usize {
    if t.prefill {
        1
    } else {
        t.n.max(1)
    }
}

/// Allocates in `region` every part of `s` that is not empty (absent parts stay 0).
fn alloc_scratch(
    dev: &dyn Device,
    region: pshard_kernels::cuda::RegionId,
    s: &DeviceScratch,
) -> Result<ScratchPtrs, EngineError> {
    let mut ptrs = [0; 11];
    for (ptr, (bytes, what)) in ptrs.iter_mut().zip(s.parts()) {
        if bytes > 0 {
            *ptr = dev.alloc(region, bytes, &format!("{what} scratch"))?;
        }
    }
    Ok(ScratchPtrs::from_parts(ptrs))
}
