//! The cost model against the published llama.cpp numbers of ARCHITECTURE.md (H200 machine,
//! synthetic Q4_K models), predicted from the committed profiles measured on that machine
//! (profiles/h200-*.toml). Each row asserts what the model must meet, and why:
//!
//! - **Decode** reads every active weight once per token. pshard's kernels and llama.cpp's read the
//!   same bytes over the same memory, so a model that charges the bytes right must land within
//!   [`DECODE_TOL`] of llama.cpp's measured rate.
//! - **Prefill at llama.cpp's GEMM throughput** (~160 TFLOP/s, ARCHITECTURE.md) is compute-bound:
//!   with that ceiling put into the profile the model must land within [`PREFILL_TOL`] of
//!   llama.cpp's numbers.
//! - **Prefill at pshard's own measured GEMM throughput** (~755 TFLOP/s) must beat llama.cpp: the
//!   same flops at a higher measured rate.
//! - **Streamed prefill** (llama.cpp `-ngl N` with the rest copied per batch) must beat llama.cpp,
//!   whose copies do not overlap its compute, and can neither beat the all-GPU prediction (the same
//!   work with nothing to copy) nor move the streamed bytes faster than the profile's PCIe rate.
//!
//! MoE prefill is left out: pshard's grouped expert GEMMs differ from llama.cpp's, and the model is
//! held to `pshard bench` for it in `calibration.rs`.

mod common;

use pshard_model::spec::ModelSpec;
use pshard_planner::cost::{PlanParams, TierModel};
use pshard_planner::placement::{place, steps, Frac, Placement, Strategy};
use pshard_planner::CostTable;

/// Largest relative miss of a decode prediction (measured worst: 27%, both qwen2.5-32b all-GPU and
/// qwen3-30b-a3b with experts on the CPU).
const DECODE_TOL: f64 = 0.30;
/// Largest relative miss of a compute-bound prefill prediction at llama.cpp's GEMM rate (measured
/// worst: 14%).
const PREFILL_TOL: f64 = 0.20;

fn predict(spec: &ModelSpec, table: &CostTable, pl: &Placement, n: usize, prefill: bool) -> f64 {
    let mut params = PlanParams::new(4096);
    params.decode_depth = 64;
    let g = common::graph(spec, n, if prefill { 1 } else { n }).expect("graph");
    TierModel::new(spec, table, &params, &g, prefill)
        .eval(pl)
        .tps
}

/// Placement of a static strategy with `layers` full layers (plus the output) pinned.
fn static_layers(spec: &ModelSpec, s: Strategy, layers: usize) -> Placement {
    let st = steps(spec, s);
    place(spec, s, &st, 1 + 4 * layers, Frac(0))
}

fn all_gpu(spec: &ModelSpec) -> Placement {
    let st = steps(spec, Strategy::AllGpu);
    place(spec, Strategy::AllGpu, &st, st.len(), Frac(0))
}

fn show(what: &str, predicted: f64, published: f64) {
    let err = (predicted - published) / published * 100.0;
    println!(
        "{what:<58} predicted {predicted:>9.1} t/s   llama.cpp {published:>9.1} t/s   ({err:+.0}%)"
    );
}

/// Within `tol` (relative) of the published number.
fn near(what: &str, predicted: f64, published: f64, tol: f64) {
    show(what, predicted, published);
    let err = (predicted - published).abs() / published;
    assert!(
        err <= tol,
        "{what}: predicted {predicted:.1} t/s, llama.cpp {published} (off by {:.0}% > {:.0}%)",
        err * 100.0,
        tol * 100.0
    );
}

/// Above the published number.
fn faster(what: &str, predicted: f64, published: f64) {
    show(what, predicted, published);
    assert!(
        predicted > published,
        "{what}: predicted {predicted:.1} t/s, not above llama.cpp's {published}"
    );
}

#[test]
fn decode_lands_near_llama_cpp() {
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let l8 = common::spec("llama3-8b");
    let all_cpu = Placement::uniform(&l8, pshard_planner::Place::Cpu);
    near(
        "llama3-8b all-CPU tg",
        predict(&l8, &table, &all_cpu, 1, false),
        18.4,
        DECODE_TOL,
    );
    near(
        "llama3-8b all-GPU tg",
        predict(&l8, &table, &all_gpu(&l8), 1, false),
        294.0,
        DECODE_TOL,
    );
    let ngl16 = static_layers(&l8, Strategy::StaticFitparamsDenseprioMoeonly, 16);
    near(
        "llama3-8b -ngl 16 tg (16 layers + output pinned, rest CPU)",
        predict(&l8, &table, &ngl16, 1, false),
        35.5,
        DECODE_TOL,
    );
    let ngl11 = static_layers(&l8, Strategy::StaticFitparamsDenseprioMoeonly, 11);
    near(
        "llama3-8b -ngl 11 tg",
        predict(&l8, &table, &ngl11, 1, false),
        24.6,
        DECODE_TOL,
    );

    let q32 = common::spec("qwen2.5-32b");
    near(
        "qwen2.5-32b all-GPU tg",
        predict(&q32, &table, &all_gpu(&q32), 1, false),
        86.0,
        DECODE_TOL,
    );
    let ngl24 = static_layers(&q32, Strategy::StaticFitparamsDenseprioMoeonly, 24);
    near(
        "qwen2.5-32b -ngl 24 tg",
        predict(&q32, &table, &ngl24, 1, false),
        7.3,
        DECODE_TOL,
    );

    let moe = common::spec("qwen3-30b-a3b");
    near(
        "qwen3-30b-a3b all-GPU tg",
        predict(&moe, &table, &all_gpu(&moe), 1, false),
        312.0,
        DECODE_TOL,
    );
    // -ncmoe 48: every layer's dense part on the GPU, all experts on the CPU.
    let st = steps(&moe, Strategy::StaticFitparamsDenseprioMoeonly);
    let dense = place(
        &moe,
        Strategy::StaticFitparamsDenseprioMoeonly,
        &st,
        1 + moe.layers.len(),
        Frac(0),
    );
    near(
        "qwen3-30b-a3b experts on CPU tg",
        predict(&moe, &table, &dense, 1, false),
        61.0,
        DECODE_TOL,
    );
}

#[test]
fn prefill_follows_the_gemm_throughput() {
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let l8 = common::spec("llama3-8b");
    let q32 = common::spec("qwen2.5-32b");
    // At pshard's own measured GEMM rate: faster than llama.cpp.
    faster(
        "llama3-8b all-GPU pp512",
        predict(&l8, &table, &all_gpu(&l8), 512, true),
        9909.0,
    );
    faster(
        "llama3-8b all-GPU pp4096",
        predict(&l8, &table, &all_gpu(&l8), 4096, true),
        10933.0,
    );
    faster(
        "qwen2.5-32b all-GPU pp512",
        predict(&q32, &table, &all_gpu(&q32), 512, true),
        2433.0,
    );
    // At llama.cpp's GEMM rate, with the measured GEMM and attention points that would override it
    // taken out: near llama.cpp.
    let mut slow = gpu.clone();
    slow.roofline.gpu_gemm_gflops = Some(160_000.0);
    slow.points
        .retain(|p| p.op != "matmul_gemm" && p.op != "attention");
    let t160 = CostTable::new(Some(&cpu), Some(&slow), 16);
    near(
        "llama3-8b all-GPU pp4096, GEMM at 160 TFLOP/s",
        predict(&l8, &t160, &all_gpu(&l8), 4096, true),
        10933.0,
        PREFILL_TOL,
    );
    near(
        "llama3-8b all-GPU pp512, GEMM at 160 TFLOP/s",
        predict(&l8, &t160, &all_gpu(&l8), 512, true),
        9909.0,
        PREFILL_TOL,
    );
    near(
        "qwen2.5-32b all-GPU pp512, GEMM at 160 TFLOP/s",
        predict(&q32, &t160, &all_gpu(&q32), 512, true),
        2433.0,
        PREFILL_TOL,
    );
}

#[test]
fn streamed_prefill_is_bounded_by_compute_and_pcie() {
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let l8 = common::spec("llama3-8b");
    let n = 4096;
    let ceiling = predict(&l8, &table, &all_gpu(&l8), n, true);
    let h2d = gpu
        .roofline
        .h2d_pinned_gbs
        .expect("GPU profile's PCIe rate")
        * 1e9;
    for (layers, published) in [(16usize, 4514.0), (0, 2908.0)] {
        let pl = static_layers(&l8, Strategy::GpuonlyLayerpinLayerstream, layers);
        let what = format!("llama3-8b -ngl {layers} pp{n} (the rest streamed)");
        let p = predict(&l8, &table, &pl, n, true);
        faster(&what, p, published);
        assert!(
            p <= ceiling,
            "{what}: {p:.0} t/s above the all-GPU prediction {ceiling:.0}"
        );
        // The layers not pinned cross PCIe once per batch of n tokens.
        let streamed: u64 = l8
            .layers
            .iter()
            .skip(layers)
            .flat_map(|l| &l.groups)
            .map(|&g| pshard_model::bytes::group_bytes(&l8, g))
            .sum();
        let pcie_max = n as f64 / (streamed as f64 / h2d);
        assert!(
            p <= pcie_max,
            "{what}: {p:.0} t/s would move {streamed} bytes per batch faster than PCIe allows ({pcie_max:.0} t/s)"
        );
    }
    println!(
        "split share for aggregation: {}",
        pshard_planner::search::balanced_split(&table)
    );
}
