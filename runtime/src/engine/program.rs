//! Programs: lowering a tier's program for a batch shape, and issuing its steps on the CPU lane
//! and the device with the weight copies and forced routes they need.

use super::*;

impl Engine {
    /// Lowers tier `ti`'s program for `key` = (tokens, logit rows).
    pub(super) fn load_program(
        &mut self,
        ti: usize,
        key: (usize, usize),
    ) -> Result<(), EngineError> {
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
                StepKind::Cpu { .. } | StepKind::CpuMatMuls { .. } => {
                    for ni in st.kind.cpu_nodes() {
                        let op = &graph.nodes[ni].op;
                        for b in op.reads().into_iter().chain(op.writes()) {
                            used[b.0 as usize] = true;
                        }
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
    pub(super) fn run_program(
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
                match &st.kind {
                    StepKind::Cpu { node, cols } => lp.cpu.exec(
                        &g,
                        *node,
                        cols.clone(),
                        &*model,
                        &mut access,
                        batch,
                        n_expert,
                    )?,
                    StepKind::CpuMatMuls { nodes } => {
                        lp.cpu.exec_matmuls(&g, nodes.clone(), &*model, batch)?
                    }
                    _ => {
                        return Err(EngineError::Unsupported(
                            "a device step in an engine without a device".into(),
                        ))
                    }
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
                StepKind::CpuMatMuls { nodes } => {
                    lp.cpu.exec_matmuls(&g, nodes.clone(), &*model, batch)?;
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
