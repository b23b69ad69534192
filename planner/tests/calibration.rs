//! The cost model against what runs today: its predictions for the all-GPU and all-CPU plans of the
//! reference models, made from the committed profiles measured on a lent machine (H200, H100),
//! against `pshard bench` measured on that same machine (recorded in docs/PERF.md with command and
//! date).
//! The bar, 20%, is asserted for every comparison, and each is printed. Hybrid decode plans
//! are held to `pshard bench --strategy` on a lent H100 machine, with that machine's profiles.

mod common;

use pshard_model::spec::ModelSpec;
use pshard_planner::cost::{predict_bench, BenchTest, PlanParams};
use pshard_planner::placement::{place, steps, Frac, Placement, Strategy};
use pshard_planner::{plan, plan_with, CostTable, Place};

/// A `pshard bench` test.
#[derive(Clone, Copy, Debug)]
enum Test {
    /// `-p N -ub UB`: a prompt of N tokens in micro-batches of UB from an empty context.
    Prompt(usize, usize),
    /// `-n N`: N generation steps from an empty context, logits read back each step.
    Gen(usize),
}

/// Where the whole model runs.
#[derive(Clone, Copy, Debug)]
enum Where {
    Gpu,
    Cpu,
}

/// One measured `pshard bench` result on a lent machine, predicted from that machine's committed
/// profiles.
#[derive(Clone)]
struct Measured {
    machine: &'static str,
    model: &'static str,
    on: Where,
    test: Test,
    tps: f64,
}

/// `scripts/gpu-bench.sh` (`pshard bench -m M -p 512,4096 -n 128 -u 2048 -r 3 --device cuda`) and
/// `scripts/cpu-peer-bench.sh` (`pshard bench -m M -p 512 -n 64 -t 16 -r 2 --device cpu`) on the
/// lent nvidia-h200 machine, 2026-11-21, synth q4_k models (GPU: third session, final build, one lease
/// after the committed GPU profile's; CPU: second session, with the CPU profile); see docs/PERF.md.
const MEASURED: &[Measured] = &[
    Measured {
        machine: "h200",
        model: "llama3-8b",
        on: Where::Gpu,
        test: Test::Prompt(512, 2048),
        tps: 20_910.0,
    },
    Measured {
        machine: "h200",
        model: "llama3-8b",
        on: Where::Gpu,
        test: Test::Prompt(4096, 2048),
        tps: 22_853.0,
    },
    Measured {
        machine: "h200",
        model: "llama3-8b",
        on: Where::Gpu,
        test: Test::Gen(128),
        tps: 326.8,
    },
    Measured {
        machine: "h200",
        model: "qwen3-30b-a3b",
        on: Where::Gpu,
        test: Test::Prompt(512, 2048),
        tps: 9_597.0,
    },
    Measured {
        machine: "h200",
        model: "qwen3-30b-a3b",
        on: Where::Gpu,
        test: Test::Prompt(4096, 2048),
        tps: 12_314.0,
    },
    Measured {
        machine: "h200",
        model: "qwen3-30b-a3b",
        on: Where::Gpu,
        test: Test::Gen(128),
        tps: 305.1,
    },
    Measured {
        machine: "h200",
        model: "llama3-8b",
        on: Where::Cpu,
        test: Test::Prompt(512, 512),
        tps: 52.63,
    },
    Measured {
        machine: "h200",
        model: "llama3-8b",
        on: Where::Cpu,
        test: Test::Gen(64),
        tps: 13.27,
    },
];

/// The CPU three-way on the lent H100 machine's 16-core host with today's kernels
/// (`scripts/cpu-peer-bench.sh qwen3-30b-a3b llama3-8b llama3.2-1b`, `pshard bench -p 512 -n 64
/// -t 16 -r 2 --device cpu`, best of 2), 2026-12-06 05:22–05:29 UTC, the machine profiled at 05:12
/// (profiles/h100-cpu.toml); docs/PERF.md.
const MEASURED_H100_CPU: &[(&str, Test, f64)] = &[
    ("qwen3-30b-a3b", Test::Prompt(512, 512), 219.2),
    ("qwen3-30b-a3b", Test::Gen(64), 34.07),
    ("llama3-8b", Test::Prompt(512, 512), 153.57),
    ("llama3-8b", Test::Gen(64), 15.89),
    ("llama3.2-1b", Test::Prompt(512, 512), 823.62),
    ("llama3.2-1b", Test::Gen(64), 77.33),
];

fn placement(spec: &ModelSpec, on: Where) -> Placement {
    match on {
        Where::Cpu => Placement::uniform(spec, Place::Cpu),
        Where::Gpu => {
            let st = steps(spec, Strategy::AllGpu);
            place(spec, Strategy::AllGpu, &st, st.len(), Frac(0))
        }
    }
}

/// Predicted tokens/s of a bench test, as `pshard bench` prints it ([`predict_bench`]).
fn predict(spec: &ModelSpec, table: &CostTable, pl: &Placement, test: Test) -> f64 {
    let (test, ctx) = match test {
        Test::Prompt(n, ubatch) => (BenchTest::Prompt { n, ubatch }, n.max(4096)),
        Test::Gen(n) => (BenchTest::Gen { n }, 4096),
    };
    let graph = |s: &ModelSpec, n: usize, l: usize| common::graph(s, n, l);
    predict_bench(spec, table, &PlanParams::new(ctx), pl, test, &graph)
        .expect("prediction")
        .tps
}

#[test]
fn cost_model_within_20_percent_of_pshard_bench() {
    let tables: Vec<(&str, CostTable)> = ["h200", "h100"]
        .into_iter()
        .map(|machine| {
            let (cpu, gpu) = common::profiles(machine);
            (machine, CostTable::new(Some(&cpu), Some(&gpu), 16))
        })
        .collect();
    let h100_cpu = MEASURED_H100_CPU
        .iter()
        .map(|&(model, test, tps)| Measured {
            machine: "h100",
            model,
            on: Where::Cpu,
            test,
            tps,
        });
    let mut failures = Vec::new();
    for m in MEASURED.iter().cloned().chain(h100_cpu) {
        let table = &tables.iter().find(|t| t.0 == m.machine).expect("machine").1;
        let spec = common::spec(m.model);
        let pl = placement(&spec, m.on);
        let p = predict(&spec, table, &pl, m.test);
        let err = (p - m.tps) / m.tps;
        let what = format!("{} {} {:?} {:?}", m.machine, m.model, m.on, m.test);
        println!(
            "{what:<40} predicted {p:>9.1} t/s   pshard bench {:>9.1} t/s   ({:+.0}%)",
            m.tps,
            err * 100.0
        );
        if err.abs() > 0.20 {
            failures.push(what);
        }
    }
    assert!(failures.is_empty(), "beyond 20%: {failures:?}");
}

/// Decode of qwen3-30b-a3b q4_k (synth) at a 4096 MiB budget and an 8192 context, each hybrid
/// strategy forced (`pshard bench -p 0 -n 64 --device cuda --vram-budget 4096 -c 8192 --strategy
/// S`, `-r 1` then `-r 2`; `STRATEGIES` of scripts/gpu-race.sh) on a lent nvidia-h100-x1 machine
/// (16-core Xeon host, 300 MiB L3), 2026-12-06 05:20 and 05:30 UTC, planned with that machine's
/// profiles (profiles/h100-*.toml, measured there at 05:12); docs/PERF.md. Two runs each, t/s.
const HYBRID_DECODE: &[(Strategy, [f64; 2])] = &[
    (Strategy::DynamicFfncpuAttnstream, [46.7, 55.5]),
    (Strategy::StaticFitparamsDenseprioMoeonly, [58.5, 58.8]),
    (Strategy::StaticAttnprioAllmodels, [61.2, 58.4]),
];

/// Every hybrid decode strategy's prediction (as the registry holds it and `pshard bench` prints
/// it) within 20% of its measured mean, and the planner's own pick one measured within 5% of the
/// fastest. The streamed plan's experts run on the CPU while its attention weights are copied:
/// priced from the profile's while-H2D points of large matrices, they cost 2× their time alone,
/// and that plan was predicted 30% slow.
#[test]
fn hybrid_decode_strategies_within_20_percent_and_the_pick_near_the_fastest() {
    let (cpu, gpu) = common::profiles("h100");
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let spec = common::spec("qwen3-30b-a3b");
    let graph = |s: &ModelSpec, n: usize, l: usize| common::graph(s, n, l);
    let params = PlanParams::new(8192);
    let budget = 4096u64 << 20;
    let mean = |m: &[f64; 2]| (m[0] + m[1]) / 2.0;
    let mut failures = Vec::new();
    for (s, measured) in HYBRID_DECODE {
        let p = plan_with(&spec, &graph, &table, &params, budget, Some(*s)).expect("plan");
        let decode = &p.tiers[0];
        assert_eq!(decode.tier.n, 1, "the first tier is decode");
        let predicted = decode.best.eval.tps;
        let err = (predicted - mean(measured)) / mean(measured);
        println!(
            "{:<36} predicted {predicted:>6.1} t/s   measured {:>6.1} t/s   ({:+.0}%)",
            s.to_string(),
            mean(measured),
            err * 100.0
        );
        if err.abs() > 0.20 {
            failures.push(format!("{s}: {err:+.2}"));
        }
    }
    assert!(failures.is_empty(), "beyond 20%: {failures:?}");
    let pick = plan(&spec, &graph, &table, &params, budget)
        .expect("plan")
        .tiers[0]
        .best
        .strategy;
    let fastest = HYBRID_DECODE
        .iter()
        .map(|(_, m)| mean(m))
        .fold(0.0, f64::max);
    let picked = HYBRID_DECODE
        .iter()
        .find(|(s, _)| *s == pick)
        .map(|(_, m)| mean(m))
        .unwrap_or_else(|| panic!("the planner picked {pick}, which was not measured"));
    assert!(
        picked >= 0.95 * fastest,
        "picked {pick}, measured {picked:.1} t/s against the fastest {fastest:.1}"
    );
}
