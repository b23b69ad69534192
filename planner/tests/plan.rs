//! Plans for the reference models with the measured H200 profiles.

mod common;

use std::time::Instant;

use pshard_model::spec::{GroupRole, ModelSpec};
use pshard_planner::cost::PlanParams;
use pshard_planner::placement::Place;
use pshard_planner::search::{plan, Plan};
use pshard_planner::CostTable;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn run(spec: &ModelSpec, table: &CostTable, params: &PlanParams, budget: u64) -> Plan {
    plan(spec, &common::graph, table, params, budget)
        .unwrap_or_else(|e| panic!("{}: {e}", spec.name))
}

fn summary(spec: &ModelSpec, p: &Plan) {
    println!(
        "{} @ {} MiB: bill {} MiB, whole={}, common {} MiB",
        spec.name,
        p.budget / MIB,
        p.bill() / MIB,
        p.whole_model_fits,
        p.common_bytes / MIB
    );
    for t in &p.tiers {
        println!(
            "  {:>6} ub {:>5} {:<36} {:>10.1} t/s  vram {:>6} MiB  {}",
            t.tier.n,
            t.ubatch,
            t.best.strategy.name(),
            t.best.eval.tps,
            t.best.bill.total() / MIB,
            t.best.placement.layer_map(spec)
        );
    }
}

#[test]
fn reference_models_at_several_budgets() {
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let params = PlanParams::new(16384);
    for (name, budgets) in [
        ("llama3-8b", &[3u64, 6, 12][..]),
        ("qwen2.5-32b", &[8, 16, 24][..]),
        ("qwen3-30b-a3b", &[4, 12, 24][..]),
        ("llama3-70b", &[8, 24, 48][..]),
    ] {
        let spec = common::spec(name);
        for b in budgets {
            let t0 = Instant::now();
            let p = run(&spec, &table, &params, b * GIB);
            let dt = t0.elapsed();
            summary(&spec, &p);
            println!("  planned in {:.3} s", dt.as_secs_f64());
            assert!(
                p.bill() <= b * GIB,
                "bill {} > budget {}",
                p.bill(),
                b * GIB
            );
            for t in &p.tiers {
                assert!(t.best.bill.total() <= b * GIB);
                // The micro-batch never makes a tier slower than running it whole.
                assert!(t.ubatch <= t.tier.n);
                if t.tier.prefill {
                    let ub = p
                        .tiers
                        .iter()
                        .find(|x| x.tier.n == t.ubatch)
                        .expect("ubatch is a tier");
                    let with_ub =
                        t.tier.n.div_ceil(t.ubatch) as f64 * t.ubatch as f64 / ub.best.eval.tps;
                    assert!(with_ub <= t.tier.n as f64 / t.best.eval.tps * (1.0 + 1e-9));
                } else {
                    assert_eq!(t.ubatch, t.tier.n);
                }
                let places: Vec<Place> =
                    t.best.placement.groups.iter().flatten().copied().collect();
                if !p.whole_model_fits && t.tier.n == 1 {
                    // Decode computes non-resident FFN/expert weights on the CPU or aggregates
                    // them; only the attention side may be streamed (DYNAMIC_FFNCPU_ATTNSTREAM,
                    // where the CPU computes the FFNs meanwhile).
                    for (g, v) in t.best.placement.groups.iter().enumerate() {
                        let role = spec.groups[g].role;
                        assert!(
                            role == GroupRole::Attn || !v.contains(&Place::Streamed),
                            "{name} @ {b} GiB: decode tier streams {role:?} weights: {}",
                            t.best.placement.layer_map(&spec)
                        );
                    }
                }
                let all_pinned = places.iter().filter(|p| **p != Place::Cpu).count() > 0
                    && t.best.placement.groups.iter().enumerate().all(|(g, v)| {
                        g == spec.embed.0 as usize || v.iter().all(|p| *p == Place::Pinned)
                    });
                if !all_pinned
                    && !p.whole_model_fits
                    && t.tier.prefill
                    && t.tier.n >= 1024
                    && t.best.strategy != pshard_planner::Strategy::BandwidthAggregation
                    && t.best.placement.uses_gpu()
                {
                    assert!(
                        places.iter().any(|p| matches!(p, Place::Streamed)),
                        "{name} @ {b} GiB: prefill tier {} does not stream: {}",
                        t.tier.n,
                        t.best.placement.layer_map(&spec)
                    );
                }
            }
        }
    }
}

/// Planning time of an 80-layer 70B spec at a mid budget (printed, not asserted: CI machines vary).
#[test]
fn planning_time_of_80_layer_70b() {
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let spec = common::spec("llama3-70b");
    assert_eq!(spec.layers.len(), 80);
    let params = PlanParams::new(16384);
    let t0 = Instant::now();
    let p = run(&spec, &table, &params, 24 * GIB);
    let dt = t0.elapsed();
    println!(
        "planned llama3-70b (80 layers, {} tiers, 6 strategies) at 24 GiB in {:.3} s",
        p.tiers.len(),
        dt.as_secs_f64()
    );
    let t0 = Instant::now();
    let all = pshard_model::arch::build_graph(&spec, 16384, 1).expect("graph");
    println!(
        "(one 16384-token graph build: {:.3} s, {} nodes)",
        t0.elapsed().as_secs_f64(),
        all.nodes.len()
    );
}
