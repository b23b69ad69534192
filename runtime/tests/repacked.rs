//! The repacked CPU layout (`Model::repack`, `gemm::packed`) end to end: an engine whose CPU-only
//! matrices — the 2-D ones and each expert of the MoE expert tensors — were repacked at load gives
//! the logits of one computing from the file's layout, bit for bit, for a prompt (the GEMM, with
//! experts' token groups of any size) and decode steps (each expert's 1–4 tokens through the
//! repacked decode kernel).

mod common;

use std::sync::Arc;

use pshard_kernels::matmul::WeightLayout;
use pshard_kernels::quant::SimdLevel;
use pshard_model::spec::TensorId;
use pshard_planner::cost::PlanParams;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;
use pshard_runtime::tiers::TierSet;

fn engine(model: &Arc<Model>) -> Engine {
    let tiers = TierSet::all_cpu(&model.spec, PlanParams::new(128), 32);
    Engine::with_tiers(model.clone(), tiers, 1, None, false).unwrap()
}

/// A prompt's last logits, then `steps` greedy decode steps' logits.
fn run(e: &mut Engine, prompt: &[u32], steps: usize) -> Vec<Vec<u32>> {
    let mut out = vec![e.eval(prompt, Logits::Last).unwrap()];
    for _ in 0..steps {
        let l = out.last().unwrap();
        let t = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
        out.push(e.eval(&[t], Logits::Last).unwrap());
    }
    out.into_iter()
        .map(|l| l.iter().map(|v| v.to_bits()).collect())
        .collect()
}

#[test]
fn repacked_experts_and_matrices_give_the_file_layouts_bits() {
    if !SimdLevel::Avx512.available() {
        println!("SKIP: the repacked layout needs AVX-512 VNNI");
        return;
    }
    let cases = [
        // Legacy fallbacks (128-wide rows are not whole K-quant super-blocks).
        ("tiny-qwen3moe", "q4_k_m", None),
        // 256-wide rows: Q4_K / Q6_K experts.
        ("tiny-qwen3moe", "q4_k_m", Some(256)),
        ("tiny-mixtral", "q8_0", None),
    ];
    for (preset, recipe, width) in cases {
        let name = format!("{preset}-w{}", width.unwrap_or(0));
        let path = common::synth_variant(preset, &name, recipe, 11, |p| {
            if let Some(w) = width {
                p.n_embd = w;
                p.n_ff_expert = w;
            }
        });
        let packed = Arc::new(Model::open(&path).unwrap());
        let mut file = Model::open(&path).unwrap();
        file.set_repack(false);
        let file = Arc::new(file);
        let (mut a, mut b) = (engine(&packed), engine(&file));
        // The expert tensors were repacked (each expert a matrix of its own), not left behind.
        let experts: Vec<TensorId> = (0..packed.spec.tensors.len() as u32)
            .map(TensorId)
            .filter(|&t| packed.spec.tensor(t).n_mats() > 1)
            .collect();
        assert!(!experts.is_empty(), "{name}: no expert tensors");
        let repacked = experts
            .iter()
            .filter(|&&t| packed.matrix(t, 1).layout == WeightLayout::Interleaved)
            .count();
        assert!(repacked > 0, "{name} {recipe}: no expert tensor repacked");
        assert!(packed.repack_stats().is_some() && file.repack_stats().is_none());
        let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 500).collect();
        let (x, y) = (run(&mut a, &prompt, 6), run(&mut b, &prompt, 6));
        for (step, (x, y)) in x.iter().zip(&y).enumerate() {
            let diff = x.iter().zip(y).position(|(p, q)| p != q);
            assert!(
                diff.is_none(),
                "{name} {recipe}: step {step} (0: the prompt) logits differ first at vocab {:?}",
                diff
            );
        }
    }
}
