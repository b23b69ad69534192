//! Every architecture's tiny synthetic model: the engine (fast kernels, op graph, KV cache, ubatches)
//! against the f64 reference forward pass.

mod common;

use std::sync::Arc;

use common::{rel_l2, synth_model, Reference};
use pshard_model::gguf::ModelFile;
use pshard_model::spec::ModelSpec;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;

/// Evaluates 11 tokens as a 7-token prompt in ubatches of 4, then 4 single-token steps, and compares
/// every step's logits with the plain f64 reference (MoE layers forced to the reference's experts, so
/// near-ties cannot flip). Tolerance: 1e-3 for F16 weights (f32 activations, f16 KV); 3e-2 where the
/// weights are quantized, because the engine, like llama.cpp, rounds every matmul input to 8 bits
/// (Q8_0/Q8_1/Q8_K), which alone costs ~3.5e-3 per matmul (measured) and adds up over these models'
/// 2–6 layers to 1–2%.
fn check(preset: &str, recipe: &str) {
    let tol = if recipe == "f16" { 1e-3 } else { 3e-2 };
    let path = synth_model(preset, recipe, 7);
    let file = ModelFile::open(&path).unwrap();
    let spec = ModelSpec::from_file(&file).unwrap();
    let n_vocab = spec.hparams.n_vocab as u32;
    let tokens: Vec<u32> = (0..11u32).map(|i| (i * 7919 + 13) % n_vocab).collect();
    let mut experts = Vec::new();
    let want = Reference::new(&file, &spec).logits(&tokens, &mut experts);
    let mut engine = Engine::new(Model::open(&path).unwrap(), 32, 4);
    engine.set_route_override(Some(Arc::new(move |layer: usize, pos: u32| {
        experts
            .get(layer)
            .and_then(|l| l.get(pos as usize))
            .cloned()
    })));
    let nv = n_vocab as usize;
    let mut all = engine.eval(&tokens[..7], Logits::All).unwrap();
    for &t in &tokens[7..] {
        all.extend(engine.eval(&[t], Logits::Last).unwrap());
    }
    for row in 0..tokens.len() {
        let err = rel_l2(&all[row * nv..][..nv], &want[row * nv..][..nv]);
        assert!(
            err <= tol,
            "{preset} {recipe}: position {row}: logits rel L2 {err:.3e} > {tol:.0e}"
        );
    }
    let err = rel_l2(&all, &want);
    println!("{preset} {recipe}: logits rel L2 {err:.2e} (tolerance {tol:.0e})");
    std::fs::remove_file(&path).ok();
}

#[test]
fn tiny_llama() {
    for r in ["f16", "q8_0", "q4_0", "q4_k"] {
        check("tiny-llama", r);
    }
}

#[test]
fn tiny_qwen2() {
    check("tiny-qwen2", "q8_0");
}

#[test]
fn tiny_qwen3() {
    check("tiny-qwen3", "q8_0");
}

#[test]
fn tiny_qwen3moe() {
    check("tiny-qwen3moe", "q8_0");
}

#[test]
fn tiny_mixtral() {
    check("tiny-mixtral", "q8_0");
}

#[test]
fn tiny_gemma3() {
    for r in ["q8_0", "q4_k_m"] {
        check("tiny-gemma3", r);
    }
}

#[test]
fn context_full_is_an_error() {
    let path = synth_model("tiny-llama", "q8_0", 1);
    let mut engine = Engine::new(Model::open(&path).unwrap(), 8, 4);
    engine.eval(&[1, 2, 3, 4, 5, 6], Logits::Last).unwrap();
    let err = engine.eval(&[1, 2, 3], Logits::Last).unwrap_err();
    assert!(err.to_string().contains("context full"), "{err}");
    std::fs::remove_file(&path).ok();
}
