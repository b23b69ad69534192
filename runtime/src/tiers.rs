//! The plans an engine runs: one placement per token tier, the ubatch of each, and the choice of
//! tier per ubatch (the smallest tier that covers its token count; a prompt is cut with the
//! ubatch that minimises its predicted time, as the planner chose it).

use pshard_model::spec::ModelSpec;
use pshard_planner::cost::PlanParams;
use pshard_planner::registry::{TierRecord, Variant};
use pshard_planner::{Place, Placement, Plan};

/// One tier as the engine runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunTier {
    /// Tokens of the tier (a batch of n tokens runs with the smallest tier ≥ n).
    pub n: usize,
    /// A prompt tier (else decode).
    pub prefill: bool,
    /// Where every weight goes.
    pub placement: Placement,
    /// The strategy that produced it.
    pub strategy: String,
    /// Micro-batch its batches are cut into.
    pub ubatch: usize,
    /// The planner's prediction (tokens/s), if planned.
    pub predicted_tps: Option<f64>,
    /// Seconds the planner charged for switching into it.
    pub switch_s: f64,
}

/// The tiers of an engine.
#[derive(Clone, Debug, PartialEq)]
pub struct TierSet {
    /// Tiers in increasing token order.
    pub tiers: Vec<RunTier>,
    /// Parameters they were planned for (context, sequences, ring slots, largest batch).
    pub params: PlanParams,
    /// Where they came from, for reports (a registry path, "planned in-process", ...).
    pub source: String,
}

impl TierSet {
    /// One placement for every batch up to `ubatch` tokens (all on the CPU, all on the GPU, or
    /// one forced strategy).
    pub fn single(
        placement: Placement,
        strategy: &str,
        params: PlanParams,
        ubatch: usize,
    ) -> TierSet {
        let ubatch = ubatch.max(1);
        let mut params = params;
        params.tier_max = Some(ubatch);
        TierSet {
            tiers: vec![RunTier {
                n: ubatch,
                prefill: true,
                placement,
                strategy: strategy.to_string(),
                ubatch,
                predicted_tps: None,
                switch_s: 0.0,
            }],
            params,
            source: strategy.to_string(),
        }
    }

    /// Everything on the CPU, in batches of at most `ubatch`.
    pub fn all_cpu(spec: &ModelSpec, params: PlanParams, ubatch: usize) -> TierSet {
        TierSet::single(
            Placement::uniform(spec, Place::Cpu),
            "ALL_CPU",
            params,
            ubatch,
        )
    }

    /// The tiers of a plan.
    pub fn from_plan(plan: &Plan, params: PlanParams, source: &str) -> TierSet {
        TierSet {
            tiers: plan
                .tiers
                .iter()
                .map(|t| RunTier {
                    n: t.tier.n,
                    prefill: t.tier.prefill,
                    placement: t.best.placement.clone(),
                    strategy: t.best.strategy.name().to_string(),
                    ubatch: t.ubatch.max(1),
                    predicted_tps: Some(t.best.eval.tps),
                    switch_s: t.switch_in_s,
                })
                .collect(),
            params,
            source: source.to_string(),
        }
    }

    /// The tiers of a registry variant (placements rebuilt against the model).
    pub fn from_variant(
        spec: &ModelSpec,
        v: &Variant,
        params: PlanParams,
        source: &str,
    ) -> Result<TierSet, String> {
        let tiers = v
            .tiers
            .iter()
            .map(|t: &TierRecord| {
                Ok(RunTier {
                    n: t.tokens,
                    prefill: t.prefill,
                    placement: t
                        .placement(spec)
                        .map_err(|e| format!("tier {}: {e}", t.tokens))?,
                    strategy: t.strategy.name().to_string(),
                    ubatch: t.ubatch.max(1),
                    predicted_tps: Some(t.tps),
                    switch_s: t.switch_ms / 1e3,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if tiers.is_empty() {
            return Err("the registry variant has no tiers".into());
        }
        Ok(TierSet {
            tiers,
            params,
            source: source.to_string(),
        })
    }

    /// Index of the tier a ubatch of `n` tokens runs with: the smallest tier ≥ n, else the largest.
    pub fn tier_for(&self, n: usize) -> usize {
        self.tiers
            .iter()
            .enumerate()
            .filter(|(_, t)| t.n >= n)
            .min_by_key(|(_, t)| t.n)
            .map(|(i, _)| i)
            .unwrap_or(self.tiers.len() - 1)
    }

    /// The ubatch a prompt of `n` tokens is cut into: the tier covering it says which (a tier
    /// whose own plan did not fit runs a smaller tier's); among the prefill tiers up to that, the
    /// one with the least predicted time ⌈n/ub⌉·ub/tps + switch-in, when predictions exist.
    pub fn prompt_ubatch(&self, n: usize) -> usize {
        let cover = &self.tiers[self.tier_for(n)];
        let cap = cover.ubatch.min(cover.n);
        let best = self
            .tiers
            .iter()
            .filter(|t| t.prefill && t.n <= cap && t.ubatch == t.n)
            .filter_map(|t| {
                let tps = t.predicted_tps.filter(|v| *v > 0.0)?;
                Some((t.n, n.div_ceil(t.n) as f64 * t.n as f64 / tps + t.switch_s))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        best.map_or(cap, |(ub, _)| ub).clamp(1, n.max(1))
    }

    /// The largest batch any tier runs (sizes the KV ring of sliding-window layers).
    pub fn max_batch(&self) -> usize {
        self.tiers
            .iter()
            .map(|t| t.n.max(t.ubatch))
            .max()
            .unwrap_or(1)
    }

    /// Whether any tier puts anything on the GPU.
    pub fn uses_gpu(&self) -> bool {
        self.tiers.iter().any(|t| t.placement.uses_gpu())
    }
}

/// The machine profiles plans are made with, and a warning to show when they describe another
/// machine.
#[derive(Clone, Debug, Default)]
pub struct Profiles {
    /// CPU profile.
    pub cpu: Option<pshard_planner::Profile>,
    /// GPU profile.
    pub gpu: Option<pshard_planner::Profile>,
    /// Said once when plans are made with them (e.g. committed profiles of another machine).
    pub warning: Option<String>,
}

impl Profiles {
    /// The identity registries record (`none` without profiles).
    pub fn identity(&self) -> String {
        let ids: Vec<String> = [self.cpu.as_ref(), self.gpu.as_ref()]
            .iter()
            .flatten()
            .map(|p| p.identity())
            .collect();
        if ids.is_empty() {
            "none".into()
        } else {
            ids.join(" ")
        }
    }
}

/// A placement asked for instead of the planner's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forced {
    /// One strategy in every tier, at the knob the planner finds best (`--strategy`).
    Strategy(pshard_planner::Strategy),
    /// llama.cpp's `-ngl N`: the last N layers on the GPU (the output projection as the
    /// (layers + 1)-th), the rest on the CPU.
    GpuLayers(usize),
}

/// What to resolve an engine's tiers for.
pub struct TierRequest<'a> {
    /// The model's path (the registry lives next to it or in the per-user cache).
    pub model_path: &'a std::path::Path,
    /// Context, sequences, threads, batch.
    pub params: PlanParams,
    /// VRAM budget in bytes (everything the process holds on the GPU).
    pub budget: u64,
    /// A registry file to use instead of the default places.
    pub registry: Option<&'a std::path::Path>,
    /// Forces a placement in every tier (plans in-process, never read from or written to a
    /// registry).
    pub forced: Option<Forced>,
    /// Profiles to plan with when no registry matches.
    pub profiles: &'a Profiles,
    /// The CUDA context as measured on this device (replaces the profile's in plans made here).
    pub context_bytes: Option<u64>,
}

/// The registry section key of a request: whether a section was planned for exactly these inputs.
fn matches(sec: &pshard_planner::registry::Section, req: &TierRequest<'_>) -> bool {
    sec.threads == req.params.threads
        && sec.decode_depth == req.params.decode_depth
        && sec.profile == req.profiles.identity()
}

/// Finds the tiers for `req`: a registry variant planned for exactly this file (fingerprint),
/// context, sequences, KV type, threads, profiles, cost model and budget — next to the model, in the
/// per-user cache, or at `--registry`; otherwise plans in-process and writes the registry (unless a
/// strategy is forced). Returns the tiers and one line saying which happened.
pub fn resolve(
    model: &crate::model::Model,
    req: &TierRequest<'_>,
) -> Result<(TierSet, String), crate::error::EngineError> {
    use crate::error::EngineError;
    use pshard_planner::registry::{self, Registry};
    let spec = &model.spec;
    let file = model.file();
    let splits: Vec<(&std::path::Path, u64, &[pshard_model::gguf::TensorInfo])> = file
        .paths()
        .iter()
        .zip(file.split_headers())
        .map(|(p, h)| (p.as_path(), h.data_offset, h.tensors.as_slice()))
        .collect();
    let fp = pshard_planner::Fingerprint::of_splits(&splits)
        .map_err(|e| EngineError::Device(format!("fingerprinting the model: {e}")))?;
    let budget_mib = req.budget >> 20;
    let kv = req.params.kv_type.name().to_ascii_lowercase();
    let path = req
        .registry
        .map(|p| p.to_path_buf())
        .or_else(|| registry::locate(req.model_path));
    let mut stale = None;
    if req.forced.is_none() {
        if let Some(path) = &path {
            match Registry::load(path) {
                Ok(reg) => {
                    match reg.find(&fp, req.params.n_ctx, req.params.parallel, &kv, budget_mib) {
                        Ok(Some((sec, var))) if matches(sec, req) => {
                            let source = format!("registry {}", path.display());
                            let t = TierSet::from_variant(spec, var, req.params.clone(), &source)
                                .map_err(|e| EngineError::Device(format!("{source}: {e}")))?;
                            return Ok((t, format!("plans: {source} ({budget_mib} MiB)")));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            stale = Some(format!("{} is for other content ({e})", path.display()))
                        }
                    }
                }
                Err(e) => stale = Some(format!("{e}")),
            }
        }
    }
    // Plan here.
    let mut table = pshard_planner::CostTable::new(
        req.profiles.cpu.as_ref(),
        req.profiles.gpu.as_ref(),
        req.params.threads,
    );
    if let Some(c) = req.context_bytes {
        table.ceil.cuda_context_bytes = c;
    }
    let graph = |s: &pshard_model::spec::ModelSpec, n: usize, l: usize| {
        pshard_model::arch::build_graph(s, n, l).map_err(|e| e.to_string())
    };
    let t0 = std::time::Instant::now();
    let (params, budget) = (&req.params, req.budget);
    let plan = match req.forced {
        Some(Forced::GpuLayers(n)) => {
            pshard_planner::plan_gpu_layers(spec, &graph, &table, params, budget, n)?
        }
        Some(Forced::Strategy(s)) => {
            pshard_planner::plan_with(spec, &graph, &table, params, budget, Some(s))?
        }
        None => pshard_planner::plan_with(spec, &graph, &table, params, budget, None)?,
    };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut line = match req.forced {
        Some(Forced::Strategy(s)) => format!(
            "plans: {} forced, planned in-process in {ms:.0} ms",
            s.name()
        ),
        Some(Forced::GpuLayers(n)) => {
            let n_layer = spec.layers.len();
            let k = n.min(n_layer);
            format!(
                "plans: -ngl {n}: layers {}..{} on the GPU{}, the rest on the CPU (planned in-process in {ms:.0} ms)",
                n_layer - k,
                n_layer,
                if n > n_layer { " with the output projection" } else { "" }
            )
        }
        None => {
            let section =
                registry::section_from_plan(spec, fp, &req.params, &req.profiles.identity(), &plan);
            let written = match req.registry {
                Some(p) => registry::update(p, section).map(|()| p.to_path_buf()),
                None => registry::save_for_model(req.model_path, section),
            };
            match written {
                Ok(p) => format!(
                    "plans: none matched, planned in-process in {ms:.0} ms ({budget_mib} MiB), registry written to {}",
                    p.display()
                ),
                Err(e) => format!(
                    "plans: none matched, planned in-process in {ms:.0} ms ({budget_mib} MiB); the registry could not be written: {e}"
                ),
            }
        }
    };
    if let Some(s) = stale {
        line += &format!(" (not used: {s})");
    }
    if let Some(w) = &req.profiles.warning {
        line += &format!("\nwarning: {w}");
    }
    if !table.is_measured() {
        line += "\nwarning: no machine profiles: placements chosen by VRAM fit with nominal speeds (run `pshard profile cpu` and `pshard profile gpu`)";
    }
    let source = line.lines().next().unwrap_or("").to_string();
    Ok((TierSet::from_plan(&plan, req.params.clone(), &source), line))
}
