//! The search: for every token tier, every strategy and every pinning depth that fits the budget,
//! cost the placement and keep the fastest (ties: more pinned layers, then less VRAM).
//!
//! Each strategy is a fill order of pinning steps; candidate `k` pins the first `k` steps. Because the
//! best candidate is taken over *every* `k` whose bill fits (not just the deepest), a larger budget
//! can only add candidates, so predictions never drop when the budget grows.

use pshard_model::graph::Graph;
use pshard_model::spec::ModelSpec;

use crate::cost::{layer_kv_bytes, Eval, Incremental, PlanParams, TierBill, TierModel};
use crate::costtable::CostTable;
use crate::placement::{apply_step, place, steps, Frac, Place, Placement, Strategy};

/// Builds the op graph of a model for `n_tokens` tokens of which `n_logit_rows` need logits.
pub type GraphFn<'a> = dyn Fn(&ModelSpec, usize, usize) -> Result<Graph, String> + 'a;

/// A token tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tier {
    /// Tokens per batch (a batch of n tokens runs with the smallest tier ≥ n).
    pub n: usize,
    /// Prompt processing (one sequence, logits for the last row only) rather than decode.
    pub prefill: bool,
}

/// The tiers for a set of parameters: decode {1, 16} (or {1, 4, 16, 32, 64} with parallel
/// sequences) and prefill tiers doubling from 512 up to min(max(n_batch, 16384), n_ctx).
pub fn tiers(p: &PlanParams) -> Vec<Tier> {
    let mut v = Vec::new();
    if p.parallel > 1 {
        for n in [1, 4, 16, 32, 64] {
            v.push(Tier { n, prefill: false });
            if n >= p.parallel {
                break;
            }
        }
        if p.parallel > 64 {
            v.push(Tier {
                n: p.parallel,
                prefill: false,
            });
        }
    } else {
        v.push(Tier {
            n: 1,
            prefill: false,
        });
        v.push(Tier {
            n: 16,
            prefill: false,
        });
    }
    let max = p
        .tier_max
        .unwrap_or_else(|| p.n_batch.max(16384).min(p.n_ctx))
        .max(1);
    if max < 512 {
        if !v.iter().any(|t| t.n == max) {
            v.push(Tier {
                n: max,
                prefill: true,
            });
        }
    } else {
        let mut n = 512;
        while n <= max {
            v.push(Tier { n, prefill: true });
            n *= 2;
        }
    }
    v.sort();
    v.dedup_by_key(|t| t.n);
    v
}

/// Which steps of the boundary layer are pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Boundary {
    /// The partly pinned layer.
    pub layer: usize,
    /// Share of that layer's bytes that is pinned.
    pub pinned: Frac,
}

/// One costed candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The rule that produced it.
    pub strategy: Strategy,
    /// Pinning steps taken.
    pub k: usize,
    /// CPU share of split tensors (aggregation only).
    pub split: Option<Frac>,
    /// Where everything goes.
    pub placement: Placement,
    /// Predicted time.
    pub eval: Eval,
    /// VRAM of this tier alone.
    pub bill: TierBill,
    /// Layers pinned whole.
    pub pinned_layers: usize,
    /// Layers whose attention is pinned.
    pub pinned_attn: usize,
    /// The partly pinned layer, if any.
    pub boundary: Option<Boundary>,
}

/// Why a strategy did not win a tier.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// It won.
    Won,
    /// It fit but predicted fewer tokens/s (or tied and lost the tie-break).
    Slower,
    /// Not even its smallest candidate fit the budget; the smallest bill is given.
    NoFit(u64),
}

/// The plan of one tier, with every strategy's best for `--explain`.
#[derive(Clone, Debug, PartialEq)]
pub struct TierPlan {
    /// The tier.
    pub tier: Tier,
    /// The winner.
    pub best: Candidate,
    /// Best candidate per strategy and its outcome.
    pub per_strategy: Vec<(Strategy, Option<Candidate>, Outcome)>,
    /// Seconds to upload the weights this tier pins beyond the common set (charged on switching in).
    pub switch_in_s: f64,
    /// Micro-batch to run batches of this tier with: for prefill tiers the prefill tier size ≤ n
    /// minimising ⌈n/ub⌉·ub/tps(ub) (a tier whose own plan is poor runs as ubatches of a smaller
    /// tier's plan); for decode tiers n itself.
    pub ubatch: usize,
    /// When no GPU plan of this tier fits the budget (its compute buffers are too big) while a
    /// smaller tier's does: that tier's size. Its batches run in ubatches of that tier with its
    /// placement (copied into `best`), never on the CPU alone.
    pub runs_as: Option<usize>,
}

/// The plans for every tier at one budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Budget in bytes.
    pub budget: u64,
    /// Per tier.
    pub tiers: Vec<TierPlan>,
    /// The whole model fits: every tier is the single all-GPU plan.
    pub whole_model_fits: bool,
    /// Bytes present in every tier (weights pinned everywhere and their KV).
    pub common_bytes: u64,
    /// Largest per-tier part (compute, scratch, extra pinned weights and KV).
    pub max_tier_bytes: u64,
    /// CUDA context margin (0 when no tier uses the GPU).
    pub context_bytes: u64,
    /// Whether predictions rest on measured profiles.
    pub measured: bool,
}

impl Plan {
    /// The registry's VRAM bill: common + largest per-tier part + context margin.
    pub fn bill(&self) -> u64 {
        self.common_bytes + self.max_tier_bytes + self.context_bytes
    }

    /// The ubatch minimising predicted time for a prompt of `n` tokens: argmin over prefill tiers
    /// of ⌈n/ub⌉·ub / tps(ub) + the tier's switch-in upload. Returns (ubatch, seconds).
    pub fn best_ubatch(&self, n: usize) -> Option<(usize, f64)> {
        best_ubatch_of(
            self.tiers
                .iter()
                .filter(|t| t.tier.prefill)
                .map(|t| (t.tier.n, t.best.eval.tps, t.switch_in_s)),
            n,
        )
    }
}

/// argmin over `(ubatch, tps, switch-in seconds)` of ⌈n/ub⌉·ub / tps + switch-in (ties → the
/// larger ubatch). Returns (ubatch, seconds).
fn best_ubatch_of(
    tiers: impl Iterator<Item = (usize, f64, f64)>,
    n: usize,
) -> Option<(usize, f64)> {
    tiers
        .filter(|(_, tps, _)| *tps > 0.0)
        .map(|(ub, tps, switch)| (ub, n.div_ceil(ub) as f64 * ub as f64 / tps + switch))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
}

/// Why planning failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The KV cache type cannot run (not a KV type, or its blocks do not tile the model's heads).
    #[error("KV cache type: {0}")]
    KvType(String),
    /// The graph builder failed.
    #[error("building the op graph for {n} tokens: {msg}")]
    Graph {
        /// Tokens.
        n: usize,
        /// Message.
        msg: String,
    },
    /// No plan that uses the GPU fits.
    #[error(
        "VRAM budget {budget_mib} MiB is too small: the smallest plan that uses the GPU needs {min_mib} MiB \
         (of which {context_mib} MiB CUDA context margin); raise --vram-budget, or pass --vram-budget 0 for an all-CPU plan"
    )]
    BudgetTooSmall {
        /// Budget given.
        budget_mib: u64,
        /// Minimum that would work.
        min_mib: u64,
        /// Context margin.
        context_mib: u64,
    },
    /// `-ngl 0` asked for a GPU plan with nothing on the GPU.
    #[error("-ngl 0 puts no layer on the GPU: that is the CPU engine (--device cpu)")]
    NoGpuLayers,
    /// The layers asked for with `-ngl` fit in no tier.
    #[error(
        "-ngl {n}: {n} layers on the GPU need {need_mib} MiB (of which {context_mib} MiB CUDA context margin) \
         but the VRAM budget is {budget_mib} MiB; lower -ngl, or raise --vram-budget (without -ngl pshard picks the placement)"
    )]
    GpuLayersDoNotFit {
        /// Layers asked for.
        n: usize,
        /// Budget given.
        budget_mib: u64,
        /// What the smallest tier needs with those layers.
        need_mib: u64,
        /// Context margin.
        context_mib: u64,
    },
}

fn counts(spec: &ModelSpec, pl: &Placement) -> (usize, usize, Option<Boundary>) {
    let mut full = 0;
    let mut attn = 0;
    let mut boundary = None;
    for l in 0..spec.layers.len() {
        if pl.layer_pinned(spec, l) {
            full += 1;
        }
        if pl.attn_pinned(spec, l) {
            attn += 1;
        }
        let (mut pinned, mut tot) = (0u64, 0u64);
        for g in &spec.layers[l].groups {
            for (t, p) in spec.group(*g).tensors.iter().zip(pl.group(*g)) {
                let b = spec.tensor(*t).bytes;
                tot += b;
                if *p == Place::Pinned {
                    pinned += b;
                }
            }
        }
        if pinned > 0 && pinned < tot && boundary.is_none() {
            // With attention-first strategies many layers are partly pinned; the boundary is the
            // one whose FFN is partly pinned, else the first partial layer.
            boundary = Some(Boundary {
                layer: l,
                pinned: Frac::from_f64(pinned as f64 / tot as f64),
            });
        }
    }
    (full, attn, boundary)
}

/// `a` beats `b`: faster, then more pinned layers, then less VRAM.
fn better(a: &Candidate, b: &Candidate) -> bool {
    let (ta, tb) = (a.eval.tps, b.eval.tps);
    let tol = 1e-9 * ta.abs().max(tb.abs());
    if (ta - tb).abs() > tol {
        return ta > tb;
    }
    if a.pinned_layers != b.pinned_layers {
        return a.pinned_layers > b.pinned_layers;
    }
    a.bill.total() < b.bill.total()
}

/// CPU share of split rows that keeps DRAM and PCIe equally busy, from the concurrent numbers.
pub fn balanced_split(table: &CostTable) -> Frac {
    let c = table.ceil.cpu_mem_while_h2d;
    let p = table.ceil.h2d_while_cpu;
    Frac::from_f64(c / (c + p))
}

/// Plans every tier under `budget` bytes.
pub fn plan(
    spec: &ModelSpec,
    graph: &GraphFn<'_>,
    table: &CostTable,
    params: &PlanParams,
    budget: u64,
) -> Result<Plan, PlanError> {
    plan_with(spec, graph, table, params, budget, None)
}

/// [`plan`] with every tier forced to one strategy (`Some`): for testing and comparison. Forcing
/// [`Strategy::AllGpu`] plans the whole model on the GPU, or fails when it does not fit.
pub fn plan_with(
    spec: &ModelSpec,
    graph: &GraphFn<'_>,
    table: &CostTable,
    params: &PlanParams,
    budget: u64,
    only: Option<Strategy>,
) -> Result<Plan, PlanError> {
    plan_inner(spec, graph, table, params, budget, only, None)
}

/// llama.cpp's `-ngl n` as a plan: the last `n` layers pinned whole on the GPU in every tier,
/// then (from `n` = layers + 1) the output projection, everything else on the CPU
/// ([`Strategy::StaticNgl`]). A tier whose compute buffers do not fit beside them runs in smaller
/// ubatches; [`PlanError::BudgetTooSmall`] when the layers fit in no tier. `n` = 0 plans nothing
/// on the GPU: that is the CPU engine, and an error here.
pub fn plan_gpu_layers(
    spec: &ModelSpec,
    graph: &GraphFn<'_>,
    table: &CostTable,
    params: &PlanParams,
    budget: u64,
    n: usize,
) -> Result<Plan, PlanError> {
    let k = n.min(spec.layers.len() + 1);
    if k == 0 {
        return Err(PlanError::NoGpuLayers);
    }
    plan_inner(
        spec,
        graph,
        table,
        params,
        budget,
        Some(Strategy::StaticNgl),
        Some(k),
    )
    .map_err(|e| match e {
        PlanError::BudgetTooSmall {
            budget_mib,
            min_mib,
            context_mib,
        } => PlanError::GpuLayersDoNotFit {
            n,
            budget_mib,
            need_mib: min_mib,
            context_mib,
        },
        e => e,
    })
}

/// The search: every strategy (or `only`) at every knob (or only `fixed_k`).
fn plan_inner(
    spec: &ModelSpec,
    graph: &GraphFn<'_>,
    table: &CostTable,
    params: &PlanParams,
    budget: u64,
    only: Option<Strategy>,
    fixed_k: Option<usize>,
) -> Result<Plan, PlanError> {
    let kv = pshard_kernels::kv::KvType::from_ggml(params.kv_type).ok_or_else(|| {
        PlanError::KvType(format!(
            "{} is not a KV cache type the kernels read (accepted: {})",
            params.kv_type.name(),
            pshard_kernels::kv::KvType::accepted()
        ))
    })?;
    kv.check_model(spec).map_err(PlanError::KvType)?;
    let tiers = tiers(params);
    let mut models = Vec::with_capacity(tiers.len());
    let mut graphs = Vec::with_capacity(tiers.len());
    for t in &tiers {
        let logit_rows = if t.prefill { 1 } else { t.n };
        let g = graph(spec, t.n, logit_rows).map_err(|msg| PlanError::Graph { n: t.n, msg })?;
        graphs.push(g);
    }
    for (t, g) in tiers.iter().zip(&graphs) {
        models.push(TierModel::new(spec, table, params, g, t.prefill));
    }

    // Whole model: one all-GPU plan for every tier when it fits everywhere.
    let all_steps = steps(spec, Strategy::AllGpu);
    let all = place(spec, Strategy::AllGpu, &all_steps, all_steps.len(), Frac(0));
    let whole = only.is_none_or(|s| s == Strategy::AllGpu)
        && models.iter().all(|m| m.bill(&all).total() <= budget);
    if only == Some(Strategy::AllGpu) && !whole {
        let need = models
            .iter()
            .map(|m| m.bill(&all).total())
            .max()
            .unwrap_or(0);
        return Err(PlanError::BudgetTooSmall {
            budget_mib: budget >> 20,
            min_mib: need.div_ceil(1 << 20),
            context_mib: table.ceil.cuda_context_bytes >> 20,
        });
    }
    let mut tier_plans = Vec::with_capacity(tiers.len());
    let mut min_gpu_bill = u64::MAX;
    let mut any_gpu_fit = false;
    // Per tier: whether any candidate that uses the GPU fits.
    let mut tier_gpu_fit = vec![false; tiers.len()];
    for (t, m) in tiers.iter().zip(&models) {
        if whole {
            let eval = m.eval(&all);
            let (pinned_layers, pinned_attn, boundary) = counts(spec, &all);
            let best = Candidate {
                strategy: Strategy::AllGpu,
                k: all_steps.len(),
                split: None,
                placement: all.clone(),
                eval,
                bill: m.bill(&all),
                pinned_layers,
                pinned_attn,
                boundary,
            };
            tier_plans.push(TierPlan {
                tier: *t,
                best: best.clone(),
                per_strategy: vec![(Strategy::AllGpu, Some(best), Outcome::Won)],
                switch_in_s: 0.0,
                ubatch: 0,
                runs_as: None,
            });
            any_gpu_fit = true;
            continue;
        }
        let mut per_strategy: Vec<(Strategy, Option<Candidate>)> = Vec::new();
        let mut min_bill_per: Vec<u64> = Vec::new();
        for s in Strategy::SEARCHED
            .into_iter()
            .chain(std::iter::once(Strategy::StaticNgl))
            .filter(|s| match only {
                Some(o) => o == *s,
                None => *s != Strategy::StaticNgl,
            })
        {
            let st = steps(spec, s);
            let fracs: Vec<Option<Frac>> = if s == Strategy::BandwidthAggregation {
                let f = balanced_split(table).get();
                [-0.1, 0.0, 0.1]
                    .iter()
                    .map(|d| Some(Frac::from_f64(f + d)))
                    .collect()
            } else {
                vec![None]
            };
            let mut best: Option<Candidate> = None;
            let mut min_bill = u64::MAX;
            for f in &fracs {
                let frac = f.unwrap_or(Frac(0));
                let mut pl = place(spec, s, &st, 0, frac);
                let mut inc: Incremental<'_, '_> = m.incremental(&pl);
                for k in 0..=st.len() {
                    if k > 0 {
                        let touched = apply_step(spec, &mut pl, st[k - 1]);
                        inc.update(&pl, &touched);
                    }
                    if fixed_k.is_some_and(|f| f != k) {
                        continue;
                    }
                    let bill = inc.bill(&pl);
                    let total = bill.total();
                    if pl.uses_gpu() {
                        min_bill = min_bill.min(total);
                        min_gpu_bill = min_gpu_bill.min(total);
                    } else {
                        min_bill = 0;
                    }
                    if total > budget {
                        continue;
                    }
                    if pl.uses_gpu() {
                        any_gpu_fit = true;
                        tier_gpu_fit[tier_plans.len()] = true;
                    }
                    let eval = inc.eval();
                    if let Some(b) = &best {
                        if eval.tps < b.eval.tps * (1.0 - 1e-9) {
                            continue;
                        }
                    }
                    // Compare without cloning the placement; the winner is rebuilt once below.
                    let (pinned_layers, pinned_attn, boundary) = counts(spec, &pl);
                    let c = Candidate {
                        strategy: s,
                        k,
                        split: *f,
                        placement: Placement { groups: Vec::new() },
                        eval,
                        bill,
                        pinned_layers,
                        pinned_attn,
                        boundary,
                    };
                    if best.as_ref().is_none_or(|b| better(&c, b)) {
                        best = Some(c);
                    }
                }
            }
            if let Some(b) = best.as_mut() {
                b.placement = place(spec, s, &st, b.k, b.split.unwrap_or(Frac(0)));
            }
            min_bill_per.push(min_bill);
            per_strategy.push((s, best));
        }
        let winner = per_strategy
            .iter()
            .filter_map(|(_, c)| c.as_ref())
            .fold(None::<&Candidate>, |acc, c| match acc {
                Some(a) if !better(c, a) => Some(a),
                _ => Some(c),
            })
            .cloned();
        let Some(best) = winner else {
            // Nothing fits in this tier: report below once all tiers are known.
            tier_plans.push(TierPlan {
                tier: *t,
                best: Candidate {
                    strategy: Strategy::StaticFitparamsDenseprioMoeonly,
                    k: 0,
                    split: None,
                    placement: Placement::uniform(spec, Place::Cpu),
                    eval: m.eval(&Placement::uniform(spec, Place::Cpu)),
                    bill: TierBill::default(),
                    pinned_layers: 0,
                    pinned_attn: 0,
                    boundary: None,
                },
                per_strategy: vec![],
                switch_in_s: 0.0,
                ubatch: 0,
                runs_as: None,
            });
            continue;
        };
        let per_strategy = per_strategy
            .into_iter()
            .zip(min_bill_per)
            .map(|((s, c), mb)| {
                let outcome = match &c {
                    None => Outcome::NoFit(mb),
                    Some(c)
                        if c.strategy == best.strategy
                            && c.k == best.k
                            && c.split == best.split =>
                    {
                        Outcome::Won
                    }
                    Some(_) => Outcome::Slower,
                };
                (s, c, outcome)
            })
            .collect();
        tier_plans.push(TierPlan {
            tier: *t,
            best,
            per_strategy,
            switch_in_s: 0.0,
            ubatch: 0,
            runs_as: None,
        });
    }
    if budget > 0 && !any_gpu_fit {
        return Err(PlanError::BudgetTooSmall {
            budget_mib: budget >> 20,
            min_mib: min_gpu_bill.div_ceil(1 << 20),
            context_mib: table.ceil.cuda_context_bytes >> 20,
        });
    }
    // A tier where no GPU plan fits while a smaller one's does runs that tier's plan in ubatches of
    // its size (its own compute buffers are what did not fit); all-CPU only when nothing fits.
    for i in 0..tier_plans.len() {
        if tier_gpu_fit[i] || whole || budget == 0 {
            continue;
        }
        let own = |j: usize| tier_gpu_fit[j] && tier_plans[j].best.placement.uses_gpu();
        let donor = (0..i)
            .rev()
            .find(|&j| own(j) && tier_plans[j].tier.prefill == tier_plans[i].tier.prefill)
            .or_else(|| (0..i).rev().find(|&j| own(j)));
        match donor {
            Some(j) => {
                tier_plans[i].best = tier_plans[j].best.clone();
                tier_plans[i].runs_as = Some(tier_plans[j].tier.n);
            }
            None => {
                let m = &models[i];
                let cpu = Placement::uniform(spec, Place::Cpu);
                tier_plans[i].best = Candidate {
                    strategy: Strategy::StaticFitparamsDenseprioMoeonly,
                    k: 0,
                    split: None,
                    eval: m.eval(&cpu),
                    placement: cpu,
                    bill: TierBill::default(),
                    pinned_layers: 0,
                    pinned_attn: 0,
                    boundary: None,
                };
            }
        }
    }

    // Common part: weights pinned in every tier that uses the GPU, and the KV of layers whose
    // attention is pinned in all of them.
    let gpu_tiers: Vec<&TierPlan> = tier_plans
        .iter()
        .filter(|t| t.best.placement.uses_gpu())
        .collect();
    let (common_weights, common_kv, common_pl) = if gpu_tiers.is_empty() {
        (0, 0, None)
    } else {
        let mut common = gpu_tiers[0].best.placement.clone();
        for t in &gpu_tiers[1..] {
            for (cg, tg) in common.groups.iter_mut().zip(&t.best.placement.groups) {
                for (c, p) in cg.iter_mut().zip(tg) {
                    if *p != Place::Pinned {
                        *c = Place::Cpu;
                    }
                }
            }
        }
        let w = crate::lanes::pinned_bytes(spec, &common) + crate::lanes::vector_bytes(spec);
        let kv: u64 = (0..spec.layers.len())
            .filter(|l| {
                gpu_tiers.iter().all(|t| {
                    crate::lanes::attn_kv(spec, &t.best.placement, *l)
                        == crate::lanes::AttnKv::Resident
                })
            })
            .map(|l| layer_kv_bytes(spec, l, params))
            .sum();
        (w, kv, Some(common))
    };
    let context_bytes = gpu_tiers.first().map_or(0, |t| t.best.bill.context);
    let common_bytes = common_weights + common_kv;
    let mut max_tier_bytes = 0u64;
    for tp in &mut tier_plans {
        if !tp.best.placement.uses_gpu() || tp.runs_as.is_some() {
            continue;
        }
        let b = &tp.best.bill;
        let per = (b.pinned_weights + b.kv + b.compute + b.scratch).saturating_sub(common_bytes);
        max_tier_bytes = max_tier_bytes.max(per);
        let extra = (b.pinned_weights + b.kv).saturating_sub(common_bytes) as f64;
        tp.switch_in_s = if extra > 0.0 && common_pl.is_some() {
            table.h2d(extra, false)
        } else {
            0.0
        };
    }
    // Micro-batches: every prefill tier runs with the best smaller-or-equal prefill tier, the
    // re-upload of that tier's extra pinned weights included.
    let prefill: Vec<(usize, f64, f64)> = tier_plans
        .iter()
        .filter(|t| t.tier.prefill && t.runs_as.is_none())
        .map(|t| (t.tier.n, t.best.eval.tps, t.switch_in_s))
        .collect();
    for tp in &mut tier_plans {
        tp.ubatch = tp.runs_as.unwrap_or(tp.tier.n);
        if tp.tier.prefill {
            let n = tp.tier.n;
            if let Some((ub, _)) =
                best_ubatch_of(prefill.iter().copied().filter(|(ub, ..)| *ub <= n), n)
            {
                tp.ubatch = ub;
            }
        }
    }
    Ok(Plan {
        budget,
        tiers: tier_plans,
        whole_model_fits: whole,
        common_bytes,
        max_tier_bytes,
        context_bytes,
        measured: table.is_measured(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(p: &PlanParams) -> Vec<(usize, bool)> {
        tiers(p).iter().map(|t| (t.n, t.prefill)).collect()
    }

    #[test]
    fn switch_in_upload_can_change_the_ubatch() {
        // 4096 tokens: ub 512 takes 0.4096 s; ub 2048 takes 0.3413 s, plus 0.1 s to switch in.
        let t = [(512, 10_000.0, 0.0), (2048, 12_000.0, 0.1)];
        assert_eq!(best_ubatch_of(t.into_iter(), 4096).unwrap().0, 512);
        let t = [(512, 10_000.0, 0.0), (2048, 12_000.0, 0.01)];
        let (ub, s) = best_ubatch_of(t.into_iter(), 4096).unwrap();
        assert_eq!(ub, 2048);
        assert!((s - (4096.0 / 12_000.0 + 0.01)).abs() < 1e-12);
        // A tier with no prediction is never chosen.
        assert_eq!(best_ubatch_of([(512, 0.0, 0.0)].into_iter(), 10), None);
    }

    #[test]
    fn tier_lists_follow_the_rules() {
        let mut p = PlanParams::new(16384);
        assert_eq!(
            ns(&p),
            vec![
                (1, false),
                (16, false),
                (512, true),
                (1024, true),
                (2048, true),
                (4096, true),
                (8192, true),
                (16384, true)
            ]
        );
        // Capped by the context; n_batch above 16384 raises the cap up to the context.
        p.n_ctx = 4096;
        assert_eq!(ns(&p).last(), Some(&(4096, true)));
        p.n_ctx = 65536;
        p.n_batch = 32768;
        assert_eq!(ns(&p).last(), Some(&(32768, true)));
        p.tier_max = Some(1024);
        assert_eq!(
            ns(&p),
            vec![(1, false), (16, false), (512, true), (1024, true)]
        );
        // Parallel decode tiers.
        p.parallel = 8;
        assert_eq!(
            ns(&p)[..4],
            [(1, false), (4, false), (16, false), (512, true)]
        );
        p.parallel = 64;
        assert_eq!(
            ns(&p)[..5],
            [
                (1, false),
                (4, false),
                (16, false),
                (32, false),
                (64, false)
            ]
        );
        // Tiny contexts still get one prefill tier.
        let p = PlanParams::new(300);
        assert_eq!(ns(&p), vec![(1, false), (16, false), (300, true)]);
    }

    #[test]
    fn balanced_split_uses_concurrent_numbers() {
        let t = CostTable::new(None, None, 0);
        let f = balanced_split(&t).get();
        let (c, p) = (t.ceil.cpu_mem_while_h2d, t.ceil.h2d_while_cpu);
        assert!((f - c / (c + p)).abs() < 1e-4);
    }
}
