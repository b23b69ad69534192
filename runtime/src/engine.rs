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

    /// Forgets sequence 0 (positions restart at 0).
    pub fn reset(&mut self) {
        self.reset_seq(0);
    }

    /// Forgets sequence `s`.
    pub fn reset_seq(&mut self, s: usize) {
        if let Some(p) = self.n_past.get_mut(s) {
            *p = 0;
        }
    }

    /// Keeps the first `len` positions of sequence `s` and forgets the rest, so a continuation
    /// of a cached prefix evaluates only its new tokens. The cells past `len` are simply
    /// overwritten later. Fails (the sequence unchanged) when `len` exceeds the sequence, or when
    /// a sliding-window layer's ring has already overwritten cells the next position would read:
    /// the ring holds the last `cells` positions and the next one reads the `window` before it,
    /// so at most `cells − window` positions can be dropped (one batch, see
    /// [`pshard_model::bytes::kv_cells`]). Callers then [`Engine::reset_seq`].
    pub fn truncate_seq(&mut self, s: usize, len: usize) -> Result<(), EngineError> {
        let cur = self.seq_len(s);
        if s >= self.n_past.len() || len > cur {
            return Err(EngineError::Batch(format!(
                "cannot truncate sequence {s} of {cur} positions to {len}"
            )));
        }
        for (l, layer) in self.model.spec.layers.iter().enumerate() {
            if let Some(w) = layer.window {
                let cells = self.kv.layout.cells[l];
                if cells < self.n_ctx() && cur - len > cells.saturating_sub(w) {
                    return Err(EngineError::Batch(format!(
                        "sequence {s}: layer {l}'s sliding-window ring ({cells} cells, window {w}) \
                         no longer holds the positions before {len}"
                    )));
                }
            }
        }
        self.n_past[s] = len;
        Ok(())
    }

    /// Context shift of sequence `s` (llama.cpp's `--context-shift`): its first `keep` positions
    /// stay, the next `discard` are forgotten, and the rest move down by `discard` positions —
    /// their cells move in every layer wherever its KV lives (host or device), and their cached K
    /// turns back by the rope angles of `discard` positions (the layer's own rope: pairing,
    /// rotated dimensions, base, position scale, frequency factors, YaRN's per-pair mix but not
    /// its magnitude, which K already carries; latent attention turns the rope part after the
    /// latent), so it equals K computed at the new positions up to the cache type's rounding
    /// (Q8_0: rows dequantized, turned and quantized afresh). K of layers without rope and every
    /// V only move.
    /// A sliding-window layer moves the positions its ring still holds; the shift fails (the
    /// sequence unchanged) when the window of the next token reaches a kept position the ring
    /// has already overwritten.
    pub fn shift_seq(&mut self, s: usize, keep: usize, discard: usize) -> Result<(), EngineError> {
        let len = self.seq_len(s);
        if s >= self.n_past.len() || keep + discard > len {
            return Err(EngineError::Batch(format!(
                "cannot shift sequence {s} of {len} positions: keep {keep}, discard {discard}"
            )));
        }
        if discard == 0 {
            return Ok(());
        }
        let spec = &self.model.spec;
        let layout = &self.kv.layout;
        let runs = (0..spec.layers.len())
            .map(|l| layout.shift_runs(l, spec.layers[l].window, len, keep, discard))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| EngineError::Batch(format!("context shift of sequence {s}: {e}")))?;
        // Each layer's K rope: the op that ropes the K its attention writes.
        let g = pshard_model::arch::build_graph(spec, 1, 1)?;
        let mut ropes: Vec<Option<KRope>> = vec![None; spec.layers.len()];
        for n in &g.nodes {
            if let Op::Attention { layer, k, .. } = n.op {
                ropes[layer] = g
                    .nodes
                    .iter()
                    .filter(|m| m.layer == Some(layer))
                    .find_map(|m| KRope::of(&m.op, k));
            }
        }
        if let Some(d) = &mut self.dev {
            d.dev.synchronize()?;
            d.run_end_pending = false;
        }
        let delta = -(discard as i64);
        for (l, runs) in runs.into_iter().enumerate() {
            if runs.is_empty() {
                continue;
            }
            let rope = ropes[l];
            match (self.kv_home[l], self.resident_kv(l)) {
                (KvHome::Device, Some(ptr)) => {
                    let side = self.dev.as_ref().expect("device-homed KV has a device");
                    let freq_factors = rope.and_then(|r| r.rope.freq_factors).map(|t| WeightRef {
                        tensor: t,
                        addr: side.vectors.get(&t).copied().unwrap_or(0),
                        first_row: 0,
                    });
                    side.dev.shift_kv(&KvShift {
                        kv: KvRef {
                            k: ptr,
                            v: ptr + layout.v_offset(l) as u64,
                            k_cols: layout.k_cols[l],
                            v_cols: layout.v_cols[l],
                            cells: layout.cells[l],
                            seqs: layout.n_seq,
                            ty: layout.ty,
                        },
                        seq: s,
                        rope,
                        freq_factors,
                        delta,
                        runs,
                    })?;
                }
                (KvHome::Device, None) => {
                    return Err(EngineError::Device(format!("layer {l}'s KV is lost")));
                }
                (KvHome::Host, _) => {
                    let Some(hb) = self.kv.get(l) else {
                        // Never written: nothing to move.
                        continue;
                    };
                    let model: &Model = &self.model;
                    let r = rope.map(|r| (crate::cpu::rope_op(&r.rope, model), r.span()));
                    with_bytes_as_kv(hb, layout, l, &mut |kv| {
                        let (cells, ty) = (kv.cells, kv.ty);
                        for (rows, cols, r) in [
                            (kv.k, layout.k_cols[l], r.as_ref()),
                            (kv.v, layout.v_cols[l], None),
                        ] {
                            let rb = ty.row_bytes(cols);
                            let seq = &mut rows[s * cells * rb..(s + 1) * cells * rb];
                            let (rope, span) = (r.map(|r| &r.0), r.map_or((cols, 0), |r| r.1));
                            pshard_kernels::ops::kv_shift(seq, ty, cols, span, rope, delta, &runs);
                        }
                        Ok(())
                    })?;
                }
            }
        }
        if let Some(d) = &mut self.dev {
            d.dev.synchronize()?;
        }
        self.n_past[s] = len - discard;
        Ok(())
    }

    /// Positions of sequence 0 evaluated so far.
    pub fn n_past(&self) -> usize {
        self.n_past[0]
    }

    /// Positions of sequence `s` evaluated so far.
    pub fn seq_len(&self, s: usize) -> usize {
        self.n_past.get(s).copied().unwrap_or(0)
    }

    /// Sequences the engine holds.
    pub fn n_seq(&self) -> usize {
        self.n_past.len()
    }

    /// Context size per sequence.
    pub fn n_ctx(&self) -> usize {
        self.kv.layout.n_ctx
    }

    /// The KV cache's element type.
    pub fn kv_type(&self) -> KvType {
        self.kv.layout.ty
    }

    /// Bytes of the KV cache as laid out (all layers, all sequences).
    pub fn kv_bytes(&self) -> usize {
        (0..self.kv.layout.cells.len())
            .map(|l| self.kv.layout.layer_bytes(l))
            .sum()
    }

    fn unload_all(&mut self) {
        if let Some(d) = &mut self.dev {
            let _ = d.dev.synchronize();
            for (_, t) in self.loaded.drain() {
                for p in t.programs.values() {
                    d.dev.forget_graphs(p.id);
                    if let Some(o) = &p.own {
                        let _ = d.dev.destroy_region(o.region);
                    }
                }
                if let Some(r) = t.region {
                    let _ = d.dev.destroy_region(r);
                }
            }
        } else {
            self.loaded.clear();
        }
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

    /// Makes tier `ti`'s weights and KV resident (switching from the current tier's).
    fn enter_tier(&mut self, ti: usize) -> Result<(), EngineError> {
        let spec = &self.model.spec;
        let pl = &self.tiers.tiers[ti].placement;
        let target: Vec<KvHome> = (0..spec.layers.len())
            .map(|l| {
                if pl.uses_gpu() && lanes::attn_kv(spec, pl, l) == AttnKv::Resident {
                    KvHome::Device
                } else {
                    KvHome::Host
                }
            })
            .collect();
        let Some(side) = self.dev.as_ref() else {
            return Ok(());
        };
        let current_extra = side.extra.as_ref().map(|(t, _)| *t);
        let want_weights: Vec<TensorId> = if pl.uses_gpu() {
            lanes::pinned_matrices(spec, pl)
                .into_iter()
                .filter(|t| !side.common.weights.contains_key(t))
                .collect()
        } else {
            Vec::new()
        };
        let want_kv: Vec<usize> = (0..spec.layers.len())
            .filter(|l| target[*l] == KvHome::Device && !side.common.kv.contains_key(l))
            .collect();
        let same = match &side.extra {
            Some((_, r)) => {
                r.weights.len() == want_weights.len()
                    && want_weights.iter().all(|t| r.weights.contains_key(t))
                    && r.kv.len() == want_kv.len()
                    && want_kv.iter().all(|l| r.kv.contains_key(l))
            }
            None => want_weights.is_empty() && want_kv.is_empty(),
        };
        if same && target == self.kv_home {
            if let (Some(side), Some(t)) = (self.dev.as_mut(), current_extra) {
                if t != ti {
                    if let Some(e) = side.extra.as_mut() {
                        e.0 = ti;
                    }
                }
            }
            return Ok(());
        }
        // A switch: everything in flight finishes first.
        let side = self.dev.as_ref().expect("checked above");
        side.dev.synchronize()?;
        let moving = |from: KvHome, to: KvHome, home: &[KvHome]| -> Vec<usize> {
            (0..target.len())
                .filter(|&l| home[l] == from && target[l] == to)
                .collect()
        };
        // KV leaving the device comes down to its host copy.
        for l in moving(KvHome::Device, KvHome::Host, &self.kv_home) {
            {
                let ptr = side
                    .common
                    .kv
                    .get(&l)
                    .or_else(|| side.extra.as_ref().and_then(|(_, r)| r.kv.get(&l)))
                    .copied()
                    .ok_or_else(|| EngineError::Device(format!("layer {l}'s KV is lost")))?;
                let alloc = |b: usize| side.dev.host_alloc(b);
                let hb = self.kv.layer(l, &alloc)?;
                move_live_kv(
                    &*side.dev,
                    &self.kv.layout,
                    &self.n_past,
                    l,
                    &hb,
                    ptr,
                    false,
                )?;
            }
        }
        side.dev.synchronize()?;
        for (home, &t) in self.kv_home.iter_mut().zip(&target) {
            if t == KvHome::Host {
                *home = KvHome::Host;
            }
        }
        // Old extras and every other tier's buffers go; the new extras come.
        let side = self.dev.as_mut().expect("checked above");
        if let Some((_, r)) = side.extra.take() {
            if let Some(region) = r.region {
                side.dev.destroy_region(region)?;
            }
        }
        self.unload_tiers_except(ti)?;
        let side = self.dev.as_mut().expect("checked above");
        // Layers entering the device: upload their host cells (made on first use if absent).
        for &l in &want_kv {
            let alloc = |b: usize| side.dev.host_alloc(b);
            self.kv.layer(l, &alloc)?;
        }
        for l in moving(KvHome::Host, KvHome::Device, &self.kv_home) {
            if side.common.kv.contains_key(&l) {
                let alloc = |b: usize| side.dev.host_alloc(b);
                let hb = self.kv.layer(l, &alloc)?;
                let ptr = side.common.kv[&l];
                move_live_kv(&*side.dev, &self.kv.layout, &self.n_past, l, &hb, ptr, true)?;
            }
        }
        let side = self.dev.as_ref().expect("checked above");
        let extra = self.make_residency(side, &format!("tier {ti}"), &want_weights, &want_kv)?;
        let side = self.dev.as_mut().expect("checked above");
        side.extra = Some((ti, extra));
        side.dev.synchronize()?;
        self.kv_home = target;
        Ok(())
    }

    /// Frees the device buffers of every loaded tier but `keep` (their programs go too).
    fn unload_tiers_except(&mut self, keep: usize) -> Result<(), EngineError> {
        let others: Vec<usize> = self.loaded.keys().copied().filter(|t| *t != keep).collect();
        let Some(side) = self.dev.as_mut() else {
            return Ok(());
        };
        side.dev.synchronize()?;
        for t in others {
            if let Some(lt) = self.loaded.remove(&t) {
                for p in lt.programs.values() {
                    side.dev.forget_graphs(p.id);
                    if let Some(o) = &p.own {
                        side.dev.destroy_region(o.region)?;
                    }
                }
                if let Some(r) = lt.region {
                    side.dev.destroy_region(r)?;
                }
            }
        }
        Ok(())
    }

    /// The device address of a resident layer's KV.
    fn resident_kv(&self, l: usize) -> Option<DevPtr> {
        let side = self.dev.as_ref()?;
        side.common
            .kv
            .get(&l)
            .or_else(|| side.extra.as_ref().and_then(|(_, r)| r.kv.get(&l)))
            .copied()
    }

    /// The device address of a pinned weight.
    fn pinned_weight(&self, t: TensorId) -> Option<DevPtr> {
        let side = self.dev.as_ref()?;
        side.common
            .weights
            .get(&t)
            .or_else(|| side.extra.as_ref().and_then(|(_, r)| r.weights.get(&t)))
            .copied()
    }

    /// Allocates tier `ti`'s device resources, sized for its token count.
    fn load_tier(&mut self, ti: usize) -> Result<(), EngineError> {
        let spec = &self.model.spec;
        let tier = &self.tiers.tiers[ti];
        let n = tier.n.max(1);
        // As the planner bills it: a prompt tier wants one logit row, a decode tier one per token.
        let g = pshard_model::arch::build_graph(spec, n, tier_logit_rows(tier))?;
        let lanes_ = ProgramLanes::new(spec, &g, &tier.placement, self.tiers.params.ring_slots);
        let mut lt = LoadedTier {
            region: None,
            bufs: vec![0; g.buffers.len()],
            inputs: Inputs {
                tokens: 0,
                positions: 0,
                seqs: 0,
                logit_rows: 0,
            },
            scratch: ScratchPtrs::default(),
            scratch_sizes: DeviceScratch::default(),
            slots: Vec::new(),
            stages: [0, 0],
            staging: vec![None; g.buffers.len()],
            input_stage: None,
            inputs_sent: None,
            prefetched: None,
            programs: HashMap::new(),
        };
        if !lanes_.uses_gpu() {
            self.loaded.insert(ti, lt);
            return Ok(());
        }
        let side = self.dev.as_ref().ok_or_else(|| {
            EngineError::Unsupported(format!(
                "tier {n} places weights on the GPU but there is no device"
            ))
        })?;
        let layout = &self.kv.layout;
        let exact = self.precision == ActPrecision::Exact;
        let bytes = lanes::program_bytes(spec, &g, &lanes_, layout.n_ctx, &|l| {
            layout.layer_bytes(l) as u64
        });
        let scratch = DeviceScratch::of(
            spec,
            &g,
            lanes_.nodes.iter().enumerate(),
            layout.n_ctx,
            exact,
        );
        let total = bytes.buffers + scratch.bytes() + bytes.ring + bytes.kv_stage;
        let name = format!("tier {n}");
        // Other tiers' buffers stay while the budget holds them (tiers alternate step by step);
        // when it does not, they go — the plan's bill holds one tier's at a time.
        let region = match side.dev.create_region(RegionKind::Scratch, &name, total) {
            Ok(r) => r,
            Err(EngineError::Cuda(pshard_kernels::cuda::CudaError::OutOfVram { .. })) => {
                self.unload_tiers_except(ti)?;
                let side = self.dev.as_ref().expect("checked above");
                side.dev.create_region(RegionKind::Scratch, &name, total)?
            }
            Err(e) => return Err(e),
        };
        let side = self.dev.as_ref().expect("checked above");
        lt.region = Some(region);
        let dev = &side.dev;
        for b in lanes_.device_buffers(&g) {
            let size = (g.rows(b) * g.buffer(b).cols * 4) as u64;
            lt.bufs[b.0 as usize] = dev.alloc(region, size, g.buffer(b).name)?;
            lt.staging[b.0 as usize] = Some(dev.host_alloc(size as usize)?);
        }
        let i32s = (n * 4) as u64;
        lt.inputs = Inputs {
            tokens: dev.alloc(region, i32s, "token ids")?,
            positions: dev.alloc(region, i32s, "positions")?,
            seqs: dev.alloc(region, i32s, "sequences")?,
            logit_rows: dev.alloc(region, (g.n_logit_rows * 4) as u64, "logit rows")?,
        };
        lt.input_stage = Some(dev.host_alloc(4 * n * 4)?);
        lt.inputs_sent = Some(dev.new_event()?);
        lt.scratch = alloc_scratch(dev.as_ref(), region, &scratch)?;
        lt.scratch_sizes = scratch;
        let slot = lanes_.slot_bytes();
        let n_slots = (bytes.ring / slot.max(1)) as usize;
        for s in 0..n_slots {
            lt.slots
                .push(dev.alloc(region, slot, &format!("ring slot {s}"))?);
        }
        if bytes.kv_stage > 0 {
            let half = bytes.kv_stage / 2;
            lt.stages = [
                dev.alloc(region, half, "KV stage 0")?,
                dev.alloc(region, half, "KV stage 1")?,
            ];
        }
        self.loaded.insert(ti, lt);
        Ok(())
    }

    /// Lowers tier `ti`'s program for `key` = (tokens, logit rows).
    fn load_program(&mut self, ti: usize, key: (usize, usize)) -> Result<(), EngineError> {
        if !self.loaded.contains_key(&ti) {
            self.load_tier(ti)?;
        }
        let spec = &self.model.spec;
        let tier = &self.tiers.tiers[ti];
        let graph = pshard_model::arch::build_graph(spec, key.0, key.1)?;
        let exact = self.precision == ActPrecision::Exact;
        let program = Program::lower(
            spec,
            graph.clone(),
            &tier.placement,
            self.tiers.params.ring_slots,
            exact,
        );
        let graph = Arc::new(graph);
        // CPU buffers: those any CPU step touches.
        let mut used = vec![false; graph.buffers.len()];
        for st in &program.steps {
            match &st.kind {
                StepKind::Cpu { node, .. } => {
                    let op = &graph.nodes[*node].op;
                    for b in op.reads().into_iter().chain(op.writes()) {
                        used[b.0 as usize] = true;
                    }
                }
                StepKind::Stage { buf, .. } | StepKind::Collect { buf, .. } => {
                    used[buf.0 as usize] = true
                }
                _ => {}
            }
        }
        used[graph.logits.0 as usize] = true;
        let mut cpu = CpuLane::new(&graph, &used);
        cpu.set_act_precision(self.precision);
        cpu.trace = self.trace.then(ActTrace::new);
        let mut events = Vec::new();
        let mut weights = HashMap::new();
        let mut load_offsets = Vec::new();
        let mut graph_blocks = Vec::new();
        if program.uses_device() {
            let side = self
                .dev
                .as_ref()
                .ok_or_else(|| EngineError::Unsupported("this program needs a device".into()))?;
            for _ in 0..program.n_events {
                events.push(side.dev.new_event()?);
            }
            for sp in &program.lanes.segments {
                let mut off = 0u64;
                let mut v = Vec::new();
                for l in &sp.loads {
                    v.push(off);
                    off += lanes::align(l.bytes);
                }
                load_offsets.push(v);
            }
            let lt = &self.loaded[&ti];
            for (si, st) in program.steps.iter().enumerate() {
                let StepKind::Gpu(work) = &st.kind else {
                    continue;
                };
                let nodes: Vec<usize> = match work {
                    GpuWork::Node { node, .. } => vec![*node],
                    GpuWork::QkNormRope { nodes } => nodes.clone().collect(),
                };
                let mut refs = Vec::new();
                for ni in nodes {
                    let node = &graph.nodes[ni];
                    for t in node.op.weights() {
                        if refs.iter().any(|r: &WeightRef| r.tensor == t) {
                            continue;
                        }
                        let td = spec.tensor(t);
                        if !td.is_matrix() {
                            let addr = side.vectors.get(&t).copied().ok_or_else(|| {
                                EngineError::Device(format!("vector {} not uploaded", td.name))
                            })?;
                            refs.push(WeightRef {
                                tensor: t,
                                addr,
                                first_row: 0,
                            });
                            continue;
                        }
                        let place = lanes::place_of(spec, &tier.placement, node.group, t);
                        let r = match place {
                            Place::Pinned => WeightRef {
                                tensor: t,
                                addr: self.pinned_weight(t).ok_or_else(|| {
                                    EngineError::Device(format!("{} is not resident", td.name))
                                })?,
                                first_row: 0,
                            },
                            Place::Streamed | Place::Split { .. } => {
                                let seg = program
                                    .lanes
                                    .segments
                                    .iter()
                                    .position(|s| s.seg.nodes.contains(&ni))
                                    .expect("every node is in a segment");
                                let sp = &program.lanes.segments[seg];
                                let li = sp.loads.iter().position(|l| l.tensor == t).ok_or_else(
                                    || {
                                        EngineError::Device(format!(
                                            "{} is not loaded for its segment",
                                            td.name
                                        ))
                                    },
                                )?;
                                let slot = sp.slot.expect("loading segment has a slot");
                                WeightRef {
                                    tensor: t,
                                    addr: lt.slots[slot] + load_offsets[seg][li],
                                    first_row: sp.loads[li].rows.start,
                                }
                            }
                            Place::Cpu => {
                                return Err(EngineError::Device(format!(
                                    "{} is placed on the CPU but a GPU step reads it",
                                    td.name
                                )))
                            }
                        };
                        refs.push(r);
                    }
                }
                weights.insert(si, refs);
            }
            // Decode programs: the run of GPU steps after the inputs, when nothing else is in
            // it, replays as one device graph.
            if key.0 <= pshard_kernels::cuda::GRAPH_MAX_TOKENS && !exact {
                let mut i = 0;
                while i < program.steps.len() {
                    let plain = |s: &crate::program::Step| {
                        matches!(s.kind, StepKind::Gpu(_))
                            && s.waits.is_empty()
                            && s.signal.is_none()
                    };
                    if plain(&program.steps[i]) {
                        let start = i;
                        while i < program.steps.len() && plain(&program.steps[i]) {
                            i += 1;
                        }
                        if i - start > 1 {
                            graph_blocks.push(start..i);
                        }
                    } else {
                        i += 1;
                    }
                }
            }
        }
        // More logit rows than the tier's region holds: this program's row-selected buffers get
        // a region of their own (beyond the plan's bill: perplexity on the GPU needs it).
        let mut own = None;
        if program.uses_device() && key.1 > tier_logit_rows(tier) {
            let side = self.dev.as_ref().expect("checked above");
            let lt = &self.loaded[&ti];
            let mut bufs = lt.bufs.clone();
            let mut staging = lt.staging.clone();
            let rowsel: Vec<BufId> = program
                .lanes
                .device_buffers(&graph)
                .into_iter()
                .filter(|b| graph.buffer(*b).rows == pshard_model::graph::Rows::LogitRows)
                .collect();
            let need = DeviceScratch::of(
                spec,
                &graph,
                program.lanes.nodes.iter().enumerate(),
                self.kv.layout.n_ctx,
                exact,
            );
            let own_scratch = (!lt.scratch_sizes.covers(&need)).then(|| need.max(lt.scratch_sizes));
            let bytes: u64 = rowsel
                .iter()
                .map(|b| lanes::align((graph.rows(*b) * graph.buffer(*b).cols * 4) as u64))
                .sum::<u64>()
                + lanes::align((key.1 * 4) as u64)
                + own_scratch.map_or(0, |s| s.bytes());
            let region = side.dev.create_region(
                RegionKind::Scratch,
                &format!("{} logit rows of tier {}", key.1, tier.n),
                bytes,
            )?;
            for b in rowsel {
                let size = (graph.rows(b) * graph.buffer(b).cols * 4) as u64;
                bufs[b.0 as usize] = side.dev.alloc(region, size, graph.buffer(b).name)?;
                staging[b.0 as usize] = Some(side.dev.host_alloc(size as usize)?);
            }
            let logit_rows = side.dev.alloc(region, (key.1 * 4) as u64, "logit rows")?;
            let scratch = own_scratch
                .map(|s| alloc_scratch(side.dev.as_ref(), region, &s))
                .transpose()?;
            own = Some(OwnRows {
                region,
                bufs,
                staging,
                logit_rows,
                scratch,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let lp = LoadedProgram {
            id,
            program: Arc::new(program),
            graph,
            cpu,
            events,
            weights,
            load_offsets,
            graph_blocks,
            own,
        };
        self.loaded
            .get_mut(&ti)
            .expect("loaded above")
            .programs
            .insert(key, lp);
        Ok(())
    }

    /// Issues every step of a program for one batch.
    fn run_program(
        &mut self,
        ti: usize,
        key: (usize, usize),
        batch: &Batch,
        read_logits: bool,
    ) -> Result<Vec<f32>, EngineError> {
        let model = self.model.clone();
        let spec = &model.spec;
        let n_expert = spec.hparams.n_expert;
        let layout = self.kv.layout.clone();
        let past: HashMap<u32, usize> = batch
            .seq_runs()
            .iter()
            .map(|(s, r)| (*s, batch.positions[r.start] as usize))
            .collect();
        let runs = batch.seq_runs();
        let resident: HashMap<usize, DevPtr> = (0..spec.layers.len())
            .filter_map(|l| self.resident_kv(l).map(|p| (l, p)))
            .collect();
        let lt = self.loaded.get_mut(&ti).expect("loaded");
        let lp = lt.programs.get_mut(&key).expect("loaded");
        // The program's own row-selected buffers, where it has them, else its tier's.
        let bufs: &[DevPtr] = lp.own.as_ref().map_or(&lt.bufs, |o| &o.bufs);
        let staging: &[Option<HostBuf>] = lp.own.as_ref().map_or(&lt.staging, |o| &o.staging);
        let mut inputs = lt.inputs;
        if let Some(o) = &lp.own {
            inputs.logit_rows = o.logit_rows;
        }
        let scratch = lp
            .own
            .as_ref()
            .and_then(|o| o.scratch)
            .unwrap_or(lt.scratch);
        lp.cpu.begin_run();
        let program = lp.program.clone();
        let g = lp.graph.clone();
        let side = self.dev.as_mut();
        let exact = self.precision == ActPrecision::Exact;
        let kv = &mut self.kv;
        let Some(side) = side else {
            // No device: every step is on the CPU.
            let mut access = HostKvAccess {
                kv,
                alloc: &plain_alloc,
            };
            for st in &program.steps {
                if let StepKind::Cpu { node, cols } = &st.kind {
                    lp.cpu.exec(
                        &g,
                        *node,
                        cols.clone(),
                        &*model,
                        &mut access,
                        batch,
                        n_expert,
                    )?;
                } else {
                    return Err(EngineError::Unsupported(
                        "a device step in an engine without a device".into(),
                    ));
                }
            }
            return Ok(lp.cpu.buf(g.logits).to_vec());
        };
        // After an unawaited run: a program with CPU steps waits for all of it (its staging
        // memory and host KV may still be in use); a GPU-only one makes only the copy stream wait
        // (its ring slots may still be read), so device runs queue back to back.
        if side.run_end_pending {
            if program.steps.iter().any(|st| st.kind.lane() == Lane::Cpu) {
                side.dev.host_wait(side.run_end)?;
            } else {
                side.dev.wait(Stream::Copy, side.run_end)?;
            }
            side.run_end_pending = false;
        }
        // Inputs go up through the tier's staging memory: wait until the last upload read it.
        if let Some(e) = lt.inputs_sent {
            side.dev.host_wait(e)?;
        }
        if let Some(stage) = &lt.input_stage {
            let n = batch.tokens.len();
            stage.write(&mut |b: &mut [u8]| {
                let w: &mut [i32] = bytemuck::cast_slice_mut(&mut b[..16 * n]);
                for t in 0..n {
                    w[t] = batch.tokens[t] as i32;
                    w[n + t] = batch.positions[t] as i32;
                    w[2 * n + t] = batch.seqs[t] as i32;
                    w[3 * n + t] = batch.logit_rows.get(t).map_or(0, |&r| r as i32);
                }
            });
        }
        let forced = upload_forced_routes(side, &g, &program, batch)?;
        let dev = &mut side.dev;
        // Forced routes: no device graphs (see `set_route_override`).
        let mut block_at: HashMap<usize, usize> = HashMap::new();
        if forced.is_empty() {
            for (bi, r) in lp.graph_blocks.iter().enumerate() {
                block_at.insert(r.start, bi);
            }
        }
        let mut i = 0;
        let n = batch.tokens.len();
        while i < program.steps.len() {
            let st = &program.steps[i];
            let lane = st.kind.lane();
            let skipped = !read_logits
                && matches!(&st.kind, StepKind::Collect { buf, .. } if *buf == g.logits);
            match lane {
                Lane::Cpu if skipped => {}
                Lane::Cpu => {
                    for &e in &st.waits {
                        dev.host_wait(lp.events[e])?;
                    }
                }
                Lane::Gpu | Lane::Copy => {
                    let s = if lane == Lane::Gpu {
                        Stream::Compute
                    } else {
                        Stream::Copy
                    };
                    for &e in &st.waits {
                        dev.wait(s, lp.events[e])?;
                    }
                }
            }
            // A run of plain GPU steps that replays as a device graph.
            if let Some(&bi) = block_at.get(&i) {
                let range = lp.graph_blocks[bi].clone();
                let steps = &program.steps;
                let ctx = StepCtx {
                    graph: &g,
                    bufs,
                    weights: &lp.weights,
                    inputs,
                    scratch,
                    exact,
                    program: &program,
                    resident: &resident,
                    stages: lt.stages,
                    layout: &layout,
                    seq_runs: &[],
                    forced: &forced,
                };
                dev.graph_run((lp.id, bi), &mut |d: &dyn Device| {
                    for j in range.clone() {
                        if let StepKind::Gpu(work) = &steps[j].kind {
                            d.launch(&ctx.step(j, work)?)?;
                        }
                    }
                    Ok(())
                })?;
                i = range.end;
                continue;
            }
            match &st.kind {
                StepKind::Inputs => {
                    let stage = lt.input_stage.clone().expect("GPU tiers stage inputs");
                    let i32s = 4 * n;
                    for (k, dst) in [
                        inputs.tokens,
                        inputs.positions,
                        inputs.seqs,
                        inputs.logit_rows,
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let len = if k == 3 { 4 * g.n_logit_rows } else { i32s };
                        dev.upload(
                            Stream::Compute,
                            dst,
                            &HostSrc::Buf(stage.clone(), k * i32s),
                            Shape2d::flat(len),
                        )?;
                    }
                    if let Some(e) = lt.inputs_sent {
                        dev.record(Stream::Compute, e)?;
                    }
                }
                StepKind::Cpu { node, cols } => {
                    let alloc = |b: usize| dev.host_alloc(b);
                    let mut access = HostKvAccess { kv, alloc: &alloc };
                    lp.cpu.exec(
                        &g,
                        *node,
                        cols.clone(),
                        &*model,
                        &mut access,
                        batch,
                        n_expert,
                    )?;
                }
                StepKind::Gpu(work) => {
                    let ctx = StepCtx {
                        graph: &g,
                        bufs,
                        weights: &lp.weights,
                        inputs,
                        scratch,
                        exact,
                        program: &program,
                        resident: &resident,
                        stages: lt.stages,
                        layout: &layout,
                        seq_runs: &runs,
                        forced: &forced,
                    };
                    dev.launch(&ctx.step(i, work)?)?;
                }
                StepKind::Stage { buf, cols } => {
                    let hb = staging[buf.0 as usize]
                        .as_ref()
                        .expect("staged buffers have staging memory");
                    stage_cols(&g, *buf, cols.clone(), lp.cpu.buf(*buf), hb);
                }
                StepKind::Collect { buf, .. } if !read_logits && *buf == g.logits => {
                    // Nobody reads these logits: the next run's download is ordered after this
                    // one on the compute stream, and its collection waits for its own.
                }
                StepKind::Collect { buf, cols } => {
                    let hb = staging[buf.0 as usize]
                        .as_ref()
                        .expect("collected buffers have staging memory")
                        .clone();
                    let rows = g.rows(*buf);
                    let c = g.buffer(*buf).cols;
                    let dst = lp.cpu.buf_mut(*buf);
                    hb.read(&mut |b: &[u8]| {
                        let src: &[f32] = bytemuck::cast_slice(&b[..rows * c * 4]);
                        for t in 0..rows {
                            let r = t * c + cols.start..t * c + cols.end;
                            dst[r.clone()].copy_from_slice(&src[r]);
                        }
                    });
                }
                StepKind::Upload { buf, cols } | StepKind::Download { buf, cols } => {
                    let hb = staging[buf.0 as usize]
                        .clone()
                        .expect("moved buffers have staging memory");
                    let c = g.buffer(*buf).cols;
                    let shape = Shape2d {
                        width: cols.len() * 4,
                        rows: g.rows(*buf),
                        src_pitch: c * 4,
                        dst_pitch: c * 4,
                    };
                    let off = cols.start * 4;
                    let dptr = bufs[buf.0 as usize] + off as u64;
                    if matches!(st.kind, StepKind::Upload { .. }) {
                        dev.upload(Stream::Compute, dptr, &HostSrc::Buf(hb, off), shape)?;
                    } else {
                        dev.download(Stream::Compute, &hb, off, dptr, shape)?;
                    }
                }
                StepKind::Load { seg, slot } => {
                    // Loaded already by the end of the last run (the copy stream is in order: an
                    // event recorded now still follows that load).
                    if lt.prefetched.take() != Some(*seg) {
                        load_segment(
                            &**dev,
                            &program,
                            spec,
                            &lt.slots,
                            &lp.load_offsets,
                            *seg,
                            *slot,
                        )?;
                    }
                }
                StepKind::KvUp { layer, stage } | StepKind::KvDown { layer, stage } => {
                    let up = matches!(st.kind, StepKind::KvUp { .. });
                    let alloc = |b: usize| dev.host_alloc(b);
                    let hb = kv.layer(*layer, &alloc)?;
                    let window = spec.layers[*layer].window;
                    for (s, rows) in batch.seq_runs() {
                        let p0 = past[&s];
                        let range = if up {
                            p0 - lanes::kv_up_cells(window, p0)..p0
                        } else {
                            p0..p0 + rows.len()
                        };
                        for cr in layout.cell_runs(*layer, range) {
                            for (cols, base) in [
                                (layout.k_cols[*layer], 0),
                                (layout.v_cols[*layer], layout.v_offset(*layer)),
                            ]
                            .into_iter()
                            .filter(|c| c.0 > 0)
                            {
                                let off =
                                    base + layout.cell_offset(*layer, s as usize, cr.start, cols);
                                let shape = Shape2d::flat(cr.len() * layout.row_bytes(cols));
                                let dptr = lt.stages[*stage] + off as u64;
                                if up {
                                    dev.upload(
                                        Stream::Copy,
                                        dptr,
                                        &HostSrc::Buf(hb.clone(), off),
                                        shape,
                                    )?;
                                } else {
                                    dev.download(Stream::Copy, &hb, off, dptr, shape)?;
                                }
                            }
                        }
                    }
                }
            }
            if let Some(e) = st.signal {
                let s = match lane {
                    Lane::Copy => Stream::Copy,
                    _ => Stream::Compute,
                };
                if lane != Lane::Cpu {
                    dev.record(s, lp.events[e])?;
                }
            }
            i += 1;
        }
        dev.record(Stream::Compute, side.run_end)?;
        side.run_end_pending = true;
        // The next run of this tier starts by loading the first streaming segment into its slot:
        // load it now, once this run's compute is done with that slot, so the copy overlaps the
        // host's turnaround and the next run's first segment (the cost model assumes this cycle).
        if let Some(first) = program.lanes.segments.iter().position(|s| s.slot.is_some()) {
            dev.wait(Stream::Copy, side.run_end)?;
            let slot = program.lanes.segments[first]
                .slot
                .expect("streaming segment");
            load_segment(
                &**dev,
                &program,
                spec,
                &lt.slots,
                &lp.load_offsets,
                first,
                slot,
            )?;
            lt.prefetched = Some(first);
        }
        if read_logits {
            // Every step before the logits' collection has been waited for; the copies of the KV
            // this step wrote may still be in flight and are ordered before the next step's.
            Ok(lp.cpu.buf(g.logits).to_vec())
        } else {
            Ok(Vec::new())
        }
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

/// Uploads the forced-route tables ([`crate::batch::route_table`]) of the program's device
/// routing steps for `batch` on the compute stream, ahead of every step that reads them, and
/// returns each routing node's table address. Nothing moves where no token is forced; without
/// an override, the tables' device memory from an earlier run is released.
fn upload_forced_routes(
    side: &mut DevSide,
    g: &pshard_model::graph::Graph,
    program: &Program,
    batch: &Batch,
) -> Result<HashMap<usize, DevPtr>, EngineError> {
    if matches!(batch.forced, ForcedRoutes::None) {
        if let Some(rt) = side.routes.take() {
            side.dev.destroy_region(rt.region)?;
        }
        return Ok(HashMap::new());
    }
    let mut words: Vec<u32> = Vec::new();
    let mut at: Vec<(usize, usize)> = Vec::new();
    for st in &program.steps {
        let StepKind::Gpu(GpuWork::Node { node, .. }) = st.kind else {
            continue;
        };
        let Op::MoeRoute { routing, .. } = &g.nodes[node].op else {
            continue;
        };
        if let Some(t) = batch
            .forced
            .table(g.nodes[node].layer, batch.positions, routing)?
        {
            at.push((node, words.len() * 4));
            words.extend_from_slice(&t);
        }
    }
    if words.is_empty() {
        return Ok(HashMap::new());
    }
    let bytes = words.len() * 4;
    if side.routes.as_ref().is_none_or(|rt| rt.bytes < bytes) {
        if let Some(rt) = side.routes.take() {
            side.dev.destroy_region(rt.region)?;
        }
        let dev = &side.dev;
        let region = dev.create_region(RegionKind::Scratch, "forced MoE routes", bytes as u64)?;
        let made = (|| {
            Ok(RouteTables {
                region,
                addr: dev.alloc(region, bytes as u64, "forced-route tables")?,
                bytes,
                stage: dev.host_alloc(bytes)?,
                sent: dev.new_event()?,
            })
        })();
        match made {
            Ok(rt) => side.routes = Some(rt),
            Err(e) => {
                dev.destroy_region(region)?;
                return Err(e);
            }
        }
    }
    let rt = side.routes.as_ref().expect("made above");
    // The last run's upload has read the staging memory.
    side.dev.host_wait(rt.sent)?;
    rt.stage
        .write(&mut |b: &mut [u8]| b[..bytes].copy_from_slice(bytemuck::cast_slice(&words)));
    side.dev.upload(
        Stream::Compute,
        rt.addr,
        &HostSrc::Buf(rt.stage.clone(), 0),
        Shape2d::flat(bytes),
    )?;
    side.dev.record(Stream::Compute, rt.sent)?;
    Ok(at
        .into_iter()
        .map(|(node, off)| (node, rt.addr + off as u64))
        .collect())
}

/// Enqueues the copies of segment `seg`'s weights into ring slot `slot` on the copy stream.
fn load_segment(
    dev: &dyn Device,
    program: &Program,
    spec: &pshard_model::spec::ModelSpec,
    slots: &[DevPtr],
    offsets: &[Vec<u64>],
    seg: usize,
    slot: usize,
) -> Result<(), EngineError> {
    for (li, l) in program.lanes.segments[seg].loads.iter().enumerate() {
        let td = spec.tensor(l.tensor);
        dev.upload(
            Stream::Copy,
            slots[slot] + offsets[seg][li],
            &HostSrc::Mapped {
                file_index: td.file_index,
                offset: l.rows.start * td.row_bytes() as usize,
            },
            Shape2d::flat(l.bytes as usize),
        )?;
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

/// What a GPU step needs besides the step itself.
struct StepCtx<'a> {
    graph: &'a Arc<pshard_model::graph::Graph>,
    bufs: &'a [DevPtr],
    weights: &'a HashMap<usize, Vec<WeightRef>>,
    inputs: Inputs,
    scratch: ScratchPtrs,
    exact: bool,
    program: &'a Program,
    resident: &'a HashMap<usize, DevPtr>,
    stages: [DevPtr; 2],
    layout: &'a KvLayout,
    seq_runs: &'a [(u32, std::ops::Range<usize>)],
    /// Forced-route table of each routing node, by node.
    forced: &'a HashMap<usize, DevPtr>,
}

impl<'a> StepCtx<'a> {
    fn step(&self, i: usize, work: &'a GpuWork) -> Result<GpuStep<'a>, EngineError> {
        let nodes: Vec<usize> = match work {
            GpuWork::Node { node, .. } => vec![*node],
            GpuWork::QkNormRope { nodes } => nodes.clone().collect(),
        };
        let mut kv = None;
        for ni in nodes {
            if let Op::Attention { layer, .. } = self.graph.nodes[ni].op {
                let base = match self.program.kv_stage.get(&layer) {
                    Some(&s) => self.stages[s],
                    None => *self.resident.get(&layer).ok_or_else(|| {
                        EngineError::Device(format!("layer {layer}'s KV is not on the device"))
                    })?,
                };
                kv = Some(KvRef {
                    k: base,
                    v: base + self.layout.v_offset(layer) as u64,
                    k_cols: self.layout.k_cols[layer],
                    v_cols: self.layout.v_cols[layer],
                    cells: self.layout.cells[layer],
                    seqs: self.layout.n_seq,
                    ty: self.layout.ty,
                });
            }
        }
        let forced_route = match work {
            GpuWork::Node { node, .. } => self.forced.get(node).copied(),
            GpuWork::QkNormRope { .. } => None,
        };
        Ok(GpuStep {
            graph: self.graph,
            work,
            bufs: self.bufs,
            weights: self.weights.get(&i).map_or(&[], |v| v.as_slice()),
            kv,
            inputs: self.inputs,
            scratch: self.scratch,
            exact: self.exact,
            seq_runs: self.seq_runs,
            forced_route,
        })
    }
}

/// Copies columns `cols` of every row of buffer `b` from the CPU lane into its staging memory.
fn stage_cols(
    g: &pshard_model::graph::Graph,
    b: BufId,
    cols: std::ops::Range<usize>,
    cpu: &[f32],
    stage: &HostBuf,
) {
    let rows = g.rows(b);
    let c = g.buffer(b).cols;
    stage.write(&mut |bytes: &mut [u8]| {
        let dst: &mut [f32] = bytemuck::cast_slice_mut(&mut bytes[..rows * c * 4]);
        for t in 0..rows {
            let r = t * c + cols.start..t * c + cols.end;
            dst[r.clone()].copy_from_slice(&cpu[r]);
        }
    });
}
