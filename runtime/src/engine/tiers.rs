//! Tiers on the device: entering one (its weights and KV made resident), loading its device
//! resources, and freeing the others.

use super::*;

impl Engine {
    pub(super) fn unload_all(&mut self) {
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

    /// Makes tier `ti`'s weights and KV resident (switching from the current tier's).
    pub(super) fn enter_tier(&mut self, ti: usize) -> Result<(), EngineError> {
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
    pub(super) fn resident_kv(&self, l: usize) -> Option<DevPtr> {
        let side = self.dev.as_ref()?;
        side.common
            .kv
            .get(&l)
            .or_else(|| side.extra.as_ref().and_then(|(_, r)| r.kv.get(&l)))
            .copied()
    }

    /// The device address of a pinned weight.
    pub(super) fn pinned_weight(&self, t: TensorId) -> Option<DevPtr> {
        let side = self.dev.as_ref()?;
        side.common
            .weights
            .get(&t)
            .or_else(|| side.extra.as_ref().and_then(|(_, r)| r.weights.get(&t)))
            .copied()
    }

    /// Allocates tier `ti`'s device resources, sized for its token count.
    pub(super) fn load_tier(&mut self, ti: usize) -> Result<(), EngineError> {
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
}
