//! The all-CPU prediction as `pshard bench --device cpu` prints it: per op kind
//! ([`TierModel::op_seconds`]) and per bench test ([`predict_bench`]), from synthetic CPU
//! profiles whose every figure is known, so each expected time is computed here by hand.

mod common;

use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::Op;
use pshard_model::spec::ModelSpec;
use pshard_planner::cost::{predict_bench, BenchTest, PlanParams, TierModel};
use pshard_planner::profile::{
    Lane, Machine, Point, Profile, ProfileKind, Roofline, Stats, PROFILE_FORMAT,
};
use pshard_planner::{CostTable, Place, Placement};

/// A CPU profile of the given roofline and points (2 threads).
fn profile(roofline: Roofline, points: Vec<Point>) -> Profile {
    Profile {
        format: PROFILE_FORMAT.to_string(),
        version: "1.0".to_string(),
        kind: ProfileKind::Cpu,
        pshard_version: "test".to_string(),
        created: "2026-12-05T00:00:00Z".to_string(),
        note: "synthetic, for tests".to_string(),
        machine: Machine {
            cpu_model: "test".to_string(),
            cpu_cores: 2,
            cpu_threads: 2,
            threads_used: 2,
            ram_bytes: 1 << 34,
            gpu: None,
        },
        roofline,
        points,
    }
}

fn roofline(op_us: f64) -> Roofline {
    Roofline {
        cpu_mem_gbs: Some(40.0),
        cpu_gflops: Some(400.0),
        cpu_op_overhead_us: Some(op_us),
        ..Roofline::default()
    }
}

fn graph(s: &ModelSpec, n: usize, l: usize) -> Result<pshard_model::graph::Graph, String> {
    common::graph(s, n, l)
}

fn params() -> PlanParams {
    let mut p = PlanParams::new(1024);
    p.threads = 2;
    p
}

/// For an all-CPU placement the kinds add up to the step, every node counted under its kind.
#[test]
fn op_kinds_add_up_to_the_all_cpu_step() {
    let spec = common::spec("smollm2-135m");
    let table = CostTable::new(Some(&profile(roofline(0.5), vec![])), None, 2);
    let pl = Placement::uniform(&spec, Place::Cpu);
    let p = params();
    for (n, prefill) in [(1, false), (512, true)] {
        let g = common::graph(&spec, n, 1).expect("graph");
        let m = TierModel::new(&spec, &table, &p, &g, prefill);
        let kinds = m.op_seconds(&pl);
        let sum: f64 = kinds.iter().map(|k| k.1).sum();
        let step = m.eval(&pl).step_s;
        assert!((sum - step).abs() <= 1e-12 * step, "{n}: {sum} vs {step}");
        let matmuls = g
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::MatMul { .. }))
            .count();
        assert_eq!(matmuls, 30 * 7 + 1);
        for k in [
            "matmul",
            "attention",
            "rms_norm",
            "rope",
            "glu",
            "add",
            "embed",
        ] {
            assert!(
                kinds.iter().any(|e| e.0 == k && e.1 > 0.0),
                "{k}: {kinds:?}"
            );
        }
    }
}

/// The profile's fixed cost of one op is paid once by every pool job of an all-CPU step: raising
/// it by 10 µs raises a decode step by 10 µs per node, exactly (a roofline-only profile, so no
/// measured efficiency scales it), and each kind by 10 µs per node of that kind — except the
/// matmuls that run in the job of the matmul before them: each layer's k and v (with q) and up
/// (with gate), three a layer.
#[test]
fn fixed_op_cost_is_paid_once_per_node() {
    let spec = common::spec("smollm2-135m");
    let pl = Placement::uniform(&spec, Place::Cpu);
    let p = params();
    let g = common::graph(&spec, 1, 1).expect("graph");
    let (a, b) = (
        CostTable::new(Some(&profile(roofline(1.0), vec![])), None, 2),
        CostTable::new(Some(&profile(roofline(11.0), vec![])), None, 2),
    );
    let (ma, mb) = (
        TierModel::new(&spec, &a, &p, &g, false),
        TierModel::new(&spec, &b, &p, &g, false),
    );
    let d = mb.eval(&pl).step_s - ma.eval(&pl).step_s;
    let grouped = 3 * spec.layers.len();
    let want = 10e-6 * (g.nodes.len() - grouped) as f64;
    assert!((d - want).abs() < 1e-9 * want, "{d} vs {want}");
    let (ka, kb) = (ma.op_seconds(&pl), mb.op_seconds(&pl));
    for (kind, ta) in &ka {
        let tb = kb.iter().find(|e| e.0 == *kind).expect("same kinds").1;
        let mut nodes = g.nodes.iter().filter(|n| n.op.kind() == *kind).count();
        if *kind == "matmul" {
            nodes -= grouped;
        }
        let want = 10e-6 * nodes as f64;
        assert!(
            ((tb - ta) - want).abs() < 1e-9,
            "{kind}: {} vs {want}",
            tb - ta
        );
    }
}

/// A prompt is the sum of its micro-batches, each attending over the earlier ones; generation is
/// one step at the mean depth, times the steps.
#[test]
fn bench_tests_sum_their_micro_batches_and_steps() {
    let spec = common::spec("smollm2-135m");
    let table = CostTable::new(Some(&profile(roofline(0.5), vec![])), None, 2);
    let pl = Placement::uniform(&spec, Place::Cpu);
    let base = params();
    let step = |n: usize, past: usize| {
        let mut p = base.clone();
        p.prefill_past = past;
        let g = common::graph(&spec, n, 1).expect("graph");
        TierModel::new(&spec, &table, &p, &g, true).eval(&pl).step_s
    };
    let test = BenchTest::Prompt {
        n: 1000,
        ubatch: 512,
    };
    let got = predict_bench(&spec, &table, &base, &pl, test, &graph).expect("prediction");
    let want = step(512, 0) + step(488, 512);
    assert!(
        (got.secs - want).abs() <= 1e-12 * want,
        "{} vs {want}",
        got.secs
    );
    assert!((got.tps - 1000.0 / want).abs() <= 1e-9 * got.tps);
    // The later micro-batch attends over more keys than a first one of its size.
    assert!(step(488, 512) > step(488, 0));
    let sum: f64 = got.op_seconds.iter().map(|k| k.1).sum();
    assert!((sum - want).abs() <= 1e-12 * want);

    let got = predict_bench(&spec, &table, &base, &pl, BenchTest::Gen { n: 64 }, &graph)
        .expect("prediction");
    let mut p = base.clone();
    p.decode_depth = 32;
    let g = common::graph(&spec, 1, 1).expect("graph");
    let one = TierModel::new(&spec, &table, &p, &g, false)
        .eval(&pl)
        .step_s;
    assert!((got.secs - 64.0 * one).abs() <= 1e-12 * got.secs);
    assert!((got.tps - 1.0 / one).abs() <= 1e-9 * got.tps);
}

/// A measured point is reproduced: a profile with one Q8_0 matmul point at the shape of the
/// model's output matrix prices that node at the point's median.
#[test]
fn a_measured_matmul_point_prices_its_node() {
    let spec = common::spec("smollm2-135m");
    let out = spec
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .expect("tied output");
    let (rows, cols) = (out.rows(), out.cols());
    let median = 1.234e-3;
    let pt = Point {
        op: "matmul".into(),
        lane: Lane::Cpu,
        quant: Some(out.ty.name().to_string()),
        shape: vec![rows as u64, cols as u64],
        batch: 1,
        threads: 2,
        stats: Stats {
            median_s: median,
            lo_s: median,
            hi_s: median,
            cv: 0.0,
            n: 5,
            noisy: false,
        },
    };
    let table = CostTable::new(Some(&profile(roofline(0.5), vec![pt])), None, 2);
    let got = table.cpu_matmul(out.ty, rows, cols, 1, false);
    assert!((got - median).abs() < 1e-12, "{got}");
    assert_ne!(out.ty, GgmlType::F32);
}

fn point(op: &str, shape: Vec<u64>, batch: u64, median: f64) -> Point {
    Point {
        op: op.into(),
        lane: Lane::Cpu,
        quant: None,
        shape,
        batch,
        threads: 2,
        stats: Stats {
            median_s: median,
            lo_s: median,
            hi_s: median,
            cv: 0.0,
            n: 5,
            noisy: false,
        },
    }
}

/// Norms, GLUs, adds and ropes take the time their kernel's points give at the node's row width
/// (rope: heads) and rows; without such points, the roofline time (fixed cost + bytes over the
/// DRAM bandwidth).
#[test]
fn elementwise_nodes_use_their_kernels_points() {
    let spec = common::spec("smollm2-135m");
    let pl = Placement::uniform(&spec, Place::Cpu);
    let p = params();
    let g = common::graph(&spec, 1, 1).expect("graph");
    let count = |kind: &str| g.nodes.iter().filter(|n| n.op.kind() == kind).count() as f64;
    let (d, ff) = (576u64, 1536u64);
    let pts = vec![
        point("rms_norm", vec![d], 1, 0.7e-6),
        point("glu", vec![ff], 1, 1.1e-6),
        point("add", vec![d], 1, 0.2e-6),
        // q has 9 heads of 64, k 3.
        point("rope", vec![9, 64], 1, 2.0e-6),
        point("rope", vec![3, 64], 1, 1.5e-6),
    ];
    let measured = CostTable::new(Some(&profile(roofline(0.5), pts)), None, 2);
    let kinds = TierModel::new(&spec, &measured, &p, &g, false).op_seconds(&pl);
    let of = |k: &str| kinds.iter().find(|e| e.0 == k).expect("kind").1;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
    assert!(
        close(of("rms_norm"), count("rms_norm") * 0.7e-6),
        "{kinds:?}"
    );
    assert!(close(of("glu"), count("glu") * 1.1e-6), "{kinds:?}");
    assert!(close(of("add"), count("add") * 0.2e-6), "{kinds:?}");
    assert!(
        close(of("rope"), count("rope") / 2.0 * (2.0e-6 + 1.5e-6)),
        "{kinds:?}"
    );
    // Without the points: 0.5 µs + the bytes each moves at 40 GB/s.
    let bare = CostTable::new(Some(&profile(roofline(0.5), vec![])), None, 2);
    let kinds = TierModel::new(&spec, &bare, &p, &g, false).op_seconds(&pl);
    let of = |k: &str| kinds.iter().find(|e| e.0 == k).expect("kind").1;
    let want = count("rms_norm") * (0.5e-6 + (2 * d * 4) as f64 / 40e9);
    assert!(close(of("rms_norm"), want), "{} vs {want}", of("rms_norm"));
    let want = count("glu") * (0.5e-6 + (3 * ff * 4) as f64 / 40e9);
    assert!(close(of("glu"), want), "{} vs {want}", of("glu"));
}
