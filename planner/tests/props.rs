//! Property tests over many models and budgets: bills never exceed the budget, and predictions never
//! drop when the budget grows. Seeded: prints its seed, replay with `PSHARD_SEED=<seed>`.

mod common;

use pshard_model::synth::{self, QuantRecipe};
use pshard_planner::cost::PlanParams;
use pshard_planner::search::{plan, Outcome, PlanError};
use pshard_planner::CostTable;

const MIB: u64 = 1 << 20;

/// xorshift64*: enough randomness for picking cases, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    let s = std::env::var("PSHARD_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("seed {s} (replay with PSHARD_SEED={s})");
    s.max(1)
}

/// A random model: a real preset with its depth changed, under a random recipe.
fn random_spec(rng: &mut Rng) -> pshard_model::spec::ModelSpec {
    let names = [
        "llama3-8b",
        "qwen2.5-32b",
        "qwen3-30b-a3b",
        "llama3-70b",
        "llama3.2-1b",
        "mixtral-8x7b",
        "gemma3-270m",
    ];
    let mut p = synth::preset(names[rng.below(names.len() as u64) as usize]).expect("preset");
    p.n_layer = 2 + rng.below(14) as usize;
    let recipes = [
        QuantRecipe::Q4_K,
        QuantRecipe::Q4_K_M,
        QuantRecipe::Q8_0,
        QuantRecipe::Q4_0,
    ];
    let r = recipes[rng.below(recipes.len() as u64) as usize];
    common::spec_of_preset(&p, r)
}

#[test]
fn bills_fit_and_predictions_grow_with_budget() {
    let mut rng = Rng(seed());
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let mut checked = 0;
    let reference = ["llama3-8b", "qwen2.5-32b", "qwen3-30b-a3b", "llama3-70b"];
    for case in 0..34 {
        // 30 random shapes, then the four full-size reference models.
        let spec = if case < 30 {
            random_spec(&mut rng)
        } else {
            common::spec(reference[case - 30])
        };
        let mut params = PlanParams::new([2048, 4096, 8192][rng.below(3) as usize]);
        params.parallel = [1, 1, 4][rng.below(3) as usize];
        let size: u64 = spec.tensors.iter().map(|t| t.bytes).sum();
        let mut budgets: Vec<u64> = (0..4)
            .map(|_| 600 * MIB + rng.below(size + 2048 * MIB))
            .collect();
        budgets.sort_unstable();
        println!(
            "case {case}: {} ({} layers, {} MiB), ctx {}, parallel {}, budgets {:?} MiB",
            spec.name,
            spec.layers.len(),
            size / MIB,
            params.n_ctx,
            params.parallel,
            budgets.iter().map(|b| b / MIB).collect::<Vec<_>>()
        );
        let mut prev: Option<Vec<f64>> = None;
        for b in budgets {
            let p = match plan(&spec, &common::graph, &table, &params, b) {
                Ok(p) => p,
                Err(PlanError::BudgetTooSmall { min_mib, .. }) => {
                    assert!(
                        b < min_mib * MIB,
                        "error says minimum {min_mib} MiB but budget was {} MiB",
                        b / MIB
                    );
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            assert!(p.bill() <= b, "bill {} > budget {}", p.bill(), b);
            for t in &p.tiers {
                assert!(t.best.bill.total() <= b);
                assert!(t.best.eval.tps.is_finite() && t.best.eval.tps > 0.0);
            }
            // No tier degrades to the CPU alone while another tier's GPU plan fits: a tier whose
            // own buffers do not fit runs a smaller tier's plan in that tier's ubatches. The CPU
            // alone stays only where it won its tier's own search, predicted at least as fast
            // as every GPU plan that fit there (a tiny budget can leave decode no faster).
            if p.tiers.iter().any(|t| t.best.placement.uses_gpu()) {
                for t in &p.tiers {
                    if !t.best.placement.uses_gpu() {
                        let won = t.per_strategy.iter().any(|(_, c, o)| {
                            *o == Outcome::Won
                                && c.as_ref().is_some_and(|c| !c.placement.uses_gpu())
                        });
                        assert!(
                            won && t.runs_as.is_none(),
                            "tier {} runs on the CPU alone at {} MiB although a GPU plan fits",
                            t.tier.n,
                            b / MIB
                        );
                        for c in t.per_strategy.iter().filter_map(|(_, c, _)| c.as_ref()) {
                            assert!(
                                t.best.eval.tps >= c.eval.tps,
                                "tier {} runs on the CPU alone at {} MiB at {:.1} t/s though {} \
                                 fits at {:.1}",
                                t.tier.n,
                                b / MIB,
                                t.best.eval.tps,
                                c.strategy.name(),
                                c.eval.tps
                            );
                        }
                    }
                    if let Some(n) = t.runs_as {
                        assert!(
                            n < t.tier.n && t.ubatch <= n,
                            "tier {} runs as {n}",
                            t.tier.n
                        );
                        for size in [n, t.ubatch] {
                            assert!(
                                p.tiers
                                    .iter()
                                    .any(|s| s.tier.n == size && s.runs_as.is_none()),
                                "tier {} runs ubatches of {size}, which has no plan of its own",
                                t.tier.n
                            );
                        }
                    }
                }
            }
            // The best rate a batch of the tier's size can get: its own plan, or ubatches of a
            // smaller prompt tier's own plan (switch-in uploads aside: which weights are common
            // to all tiers changes with the budget).
            let own = |t: &pshard_planner::TierPlan| t.runs_as.is_none() && t.best.eval.tps > 0.0;
            let tps: Vec<f64> = p
                .tiers
                .iter()
                .map(|t| {
                    let mut best = if own(t) { t.best.eval.tps } else { 0.0 };
                    if t.tier.prefill {
                        for s in p.tiers.iter().filter(|s| s.tier.prefill && own(s)) {
                            let n = t.tier.n;
                            if s.tier.n <= n {
                                let secs =
                                    n.div_ceil(s.tier.n) as f64 * s.tier.n as f64 / s.best.eval.tps;
                                best = best.max(n as f64 / secs);
                            }
                        }
                    }
                    best
                })
                .collect();
            if let Some(prev) = &prev {
                for (i, (a, bb)) in prev.iter().zip(&tps).enumerate() {
                    assert!(
                        *bb >= a * (1.0 - 1e-9),
                        "tier {} dropped from {a} to {bb} t/s when the budget grew to {} MiB",
                        p.tiers[i].tier.n,
                        b / MIB
                    );
                }
            }
            prev = Some(tps);
            checked += 1;
        }
    }
    assert!(checked > 0);
}
