//! Every architecture's tiny synthetic model: the engine (kernels, op graph, KV cache, ubatches)
//! against the f64 reference forward pass of `common` (dequantize → naive f64 matmul, written
//! straight from the ModelSpec).
//!
//! Comparisons per model and quant recipe, each on the logits of every position:
//! (a) the fast engine (activations rounded to 8 bits before every quantized matmul, as
//!     llama.cpp does) against the reference rounding in the same places — activations through
//!     the same partner formats, K/V through f16 as the KV cache stores them. The reference takes
//!     the engine's recorded rounded inputs after checking each element is a rounding of its own
//!     f64 input (`Reference::follow`). Rounding by itself, the reference met a value whose f32
//!     and f64 versions fall on two sides of a rounding boundary in 3 of these 10 models, and from
//!     there the two drifted apart to ~1e-2 (one step of difference changes later roundings, and
//!     so on through the layers and positions). What is left is f32 arithmetic and the f16 KV
//!     cache's own boundaries, so the bound is tight;
//! (b) the exact-activation engine (`Engine::set_exact_activations`: f32 activations, weights
//!     dequantized on the fly) against the exact reference: what is left is f32 arithmetic and
//!     the f16 KV cache; (b') the same against the exact reference with f16 K/V, leaving f32
//!     arithmetic and f16 rounding boundaries;
//! (c) the fast engine against the exact reference: the end-to-end error a user sees, dominated
//!     by the 8-bit activation rounding, which random tiny models amplify layer by layer.
//! (d) every architecture again with token embeddings scaled down so the first RMS norm's epsilon
//!     matters: the exact engine against the exact reference, no value taken from the engine. (a)
//!     follows the engine's rounded matmul inputs and so absorbs an error below ~0.6 of a
//!     quantization step before a matmul (a wrong RMS epsilon passed it); (d) does not.
//! MoE layers of the engines and of the rounding reference are forced to the exact reference's
//! expert choice, so near-ties cannot flip.

mod common;

use std::sync::Arc;

use common::{rel_l2, synth_model, ActRounding, Reference};
use pshard_model::gguf::ModelFile;
use pshard_model::spec::ModelSpec;
use pshard_runtime::cpu::ActTrace;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;

/// (a): fast engine vs the reference rounding as it does (following its rounding decisions).
/// Measured ≤ 1.4e-7 for quantized weights — every matmul input is snapped to the same 8-bit
/// values on both sides, so f32 differences cannot accumulate — and 2.2e-6 for F16 weights (no
/// snapping; as (b'));
/// 1e-4 leaves room for other CPUs' summation orders and the f16 KV cache's rounding boundaries,
/// and is far below what a wrong weight, row, bias or input would cost.
const TOL_PARTNER: f64 = 1e-4;
/// (b): exact engine vs exact reference. Measured ≤ 4.3e-4, from the f16 KV cache; issue 3 asks
/// for ≤ 1e-2.
const TOL_EXACT: f64 = 1e-2;
/// (b'): exact engine vs the exact reference with f16 K/V as the KV cache stores them: f32
/// rounding is left, which these random models amplify through their layers and positions, plus
/// K/V elements whose f32 and f64 values fall on two sides of an f16 rounding boundary. Measured
/// ≤ 7e-5.
const TOL_EXACT_KV: f64 = 5e-4;
/// (c): fast engine vs exact reference. F16 weights take f32 activations, so only the f16 KV
/// cache differs: measured 1.9e-4, bound 1e-3. Quantized weights: the 8-bit activation rounding,
/// ~3.5e-3 per matmul (measured), grows over these random models' 2–6 layers to at most 2.4e-2
/// (measured, gemma3 q4_k_m; 1.0e-2 for llama q8_0); 3e-2 bounds it.
fn tol_fast_vs_exact(recipe: &str) -> f64 {
    if recipe == "f16" {
        1e-3
    } else {
        3e-2
    }
}

/// Evaluates 11 tokens as a 7-token prompt in ubatches of 4, then 4 single-token steps; returns
/// the logits of every position and the rounded matmul inputs (empty for the exact engine).
fn run_engine(
    path: &std::path::Path,
    tokens: &[u32],
    experts: &[Vec<Vec<u32>>],
    exact: bool,
) -> (Vec<f32>, ActTrace) {
    let mut engine = Engine::new(Model::open(path).unwrap(), 32, 4);
    engine.set_exact_activations(exact);
    assert_eq!(engine.exact_activations(), exact);
    engine.set_act_trace(true);
    let experts = experts.to_vec();
    engine.set_route_override(Some(Arc::new(move |layer: usize, pos: u32| {
        experts
            .get(layer)
            .and_then(|l| l.get(pos as usize))
            .cloned()
    })));
    let mut all = engine.eval(&tokens[..7], Logits::All).unwrap();
    for &t in &tokens[7..] {
        all.extend(engine.eval(&[t], Logits::Last).unwrap());
    }
    (all, engine.take_act_trace())
}

/// Relative L2 error of every position's logits (asserted ≤ `tol`) and of all of them together
/// (returned).
fn compare(what: &str, got: &[f32], want: &[f64], nv: usize, tol: f64) -> f64 {
    for (row, (g, w)) in got.chunks(nv).zip(want.chunks(nv)).enumerate() {
        let err = rel_l2(g, w);
        assert!(
            err <= tol,
            "{what}: position {row}: logits rel L2 {err:.3e} > {tol:.0e}"
        );
    }
    let err = rel_l2(got, want);
    assert!(err <= tol, "{what}: logits rel L2 {err:.3e} > {tol:.0e}");
    err
}

fn check(preset: &str, recipe: &str) {
    let path = synth_model(preset, recipe, 7);
    let file = ModelFile::open(&path).unwrap();
    let spec = ModelSpec::from_file(&file).unwrap();
    let n_vocab = spec.hparams.n_vocab as u32;
    let nv = n_vocab as usize;
    let tokens: Vec<u32> = (0..11u32).map(|i| (i * 7919 + 13) % n_vocab).collect();
    let mut experts = Vec::new();
    let exact_ref = Reference::new(&file, &spec).logits(&tokens, &mut experts);
    let (fast, trace) = run_engine(&path, &tokens, &experts, false);
    let (exact, exact_trace) = run_engine(&path, &tokens, &experts, true);
    assert_eq!(
        trace.is_empty(),
        recipe == "f16",
        "fast path: quantized matmuls record their rounded inputs"
    );
    assert!(exact_trace.is_empty(), "the exact path rounds nothing");
    let rounded_ref = Reference::new(&file, &spec)
        .rounding(ActRounding::Partner)
        .kv_f16(true)
        .force_experts(&experts)
        .follow(&trace)
        .logits(&tokens, &mut Vec::new());
    let exact_kv_ref = Reference::new(&file, &spec)
        .kv_f16(true)
        .force_experts(&experts)
        .logits(&tokens, &mut Vec::new());
    let name = format!("{preset} {recipe}");
    let a = compare(
        &format!("{name} (a) fast vs rounding reference"),
        &fast,
        &rounded_ref,
        nv,
        TOL_PARTNER,
    );
    let b = compare(
        &format!("{name} (b) exact engine vs exact reference"),
        &exact,
        &exact_ref,
        nv,
        TOL_EXACT,
    );
    let bk = compare(
        &format!("{name} (b') exact engine vs exact reference with f16 KV"),
        &exact,
        &exact_kv_ref,
        nv,
        TOL_EXACT_KV,
    );
    let tc = tol_fast_vs_exact(recipe);
    let c = compare(
        &format!("{name} (c) fast vs exact reference"),
        &fast,
        &exact_ref,
        nv,
        tc,
    );
    println!(
        "{name}: logits rel L2 (a) fast vs rounding ref {a:.2e} (tol {TOL_PARTNER:.0e}), \
         (b) exact vs exact ref {b:.2e} (tol {TOL_EXACT:.0e}), (b') exact vs exact ref with f16 KV \
         {bk:.2e} (tol {TOL_EXACT_KV:.0e}), (c) fast vs exact ref {c:.2e} (tol {tc:.0e})"
    );
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

/// (d) Every architecture once more, independent of the engine's intermediate values and with the
/// RMS epsilon made to matter: the token embeddings are scaled down 256× (each Q8_0 block's f16 scale
/// divided by 2^8, in the file), so the first attention norm sees inputs whose mean square is near
/// the model's epsilon. The exact engine must meet the exact reference with f16 K/V (as (b')) —
/// a wrong epsilon, or any error the 8-bit rounding in (a) would absorb, shows here. Measured
/// ≤ 2.5e-5; an epsilon 100× too large (1e-3 for 1e-5) measured 7e-2 (gemma3) to 1.1 (mixtral).
const TOL_SMALL_ACTS: f64 = 5e-4;

/// A tiny model whose Q8_0 token embeddings are scaled by 2^-8 in place.
fn small_embedding_model(preset: &str) -> std::path::PathBuf {
    let path = synth_model(preset, "q8_0", 11);
    let mut bytes = std::fs::read(&path).unwrap();
    let h = pshard_model::gguf::GgufHeader::parse(&bytes, "small").unwrap();
    let t = &h.tensors[h.tensor_index("token_embd.weight").unwrap()];
    assert_eq!(t.ty, pshard_model::ggml_type::GgmlType::Q8_0);
    let start = (h.data_offset + t.offset) as usize;
    for block in bytes[start..start + t.bytes as usize].chunks_mut(34) {
        let d = half::f16::from_bits(u16::from_le_bytes([block[0], block[1]]));
        let small = half::f16::from_f32(d.to_f32() / 256.0);
        block[..2].copy_from_slice(&small.to_bits().to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn small_activations_every_architecture() {
    for preset in [
        "tiny-llama",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-qwen3moe",
        "tiny-mixtral",
        "tiny-gemma3",
    ] {
        let path = small_embedding_model(preset);
        let file = ModelFile::open(&path).unwrap();
        let spec = ModelSpec::from_file(&file).unwrap();
        let n_vocab = spec.hparams.n_vocab as u32;
        let tokens: Vec<u32> = (0..11u32).map(|i| (i * 7919 + 13) % n_vocab).collect();
        let mut experts = Vec::new();
        Reference::new(&file, &spec).logits(&tokens, &mut experts);
        let want = Reference::new(&file, &spec)
            .kv_f16(true)
            .force_experts(&experts)
            .logits(&tokens, &mut Vec::new());
        let (got, _) = run_engine(&path, &tokens, &experts, true);
        let err = compare(
            &format!(
                "{preset} q8_0 (d) small activations: exact engine vs exact reference with f16 KV"
            ),
            &got,
            &want,
            n_vocab as usize,
            TOL_SMALL_ACTS,
        );
        println!("{preset} q8_0 (d) small activations: logits rel L2 {err:.2e} (tol {TOL_SMALL_ACTS:.0e})");
        std::fs::remove_file(&path).ok();
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

/// The reference's check of the engine's recorded inputs is live: an input moved by a few
/// quantization steps is refused.
#[test]
fn following_a_wrong_rounded_input_is_refused() {
    let path = synth_model("tiny-llama", "q8_0", 3);
    let file = ModelFile::open(&path).unwrap();
    let spec = ModelSpec::from_file(&file).unwrap();
    let tokens = [5u32, 17, 42];
    let (_, mut trace) = run_engine_prompt(&path, &tokens);
    let key = *trace.keys().min().expect("quantized matmuls were recorded");
    let row = trace.get_mut(&key).unwrap();
    let amax = row[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
    row[3] += 4.0 * amax / 127.0;
    let res = std::panic::catch_unwind(|| {
        Reference::new(&file, &spec)
            .rounding(ActRounding::Partner)
            .follow(&trace)
            .logits(&tokens, &mut Vec::new())
    });
    let msg = res.expect_err("a moved input must be refused");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("is not a"), "{msg}");
    std::fs::remove_file(&path).ok();
}

/// One prompt evaluation with the rounded inputs recorded.
fn run_engine_prompt(path: &std::path::Path, tokens: &[u32]) -> (Vec<f32>, ActTrace) {
    let mut engine = Engine::new(Model::open(path).unwrap(), 8, 4);
    engine.set_act_trace(true);
    let logits = engine.eval(tokens, Logits::All).unwrap();
    (logits, engine.take_act_trace())
}

#[test]
fn tiny_gpt_oss() {
    for r in ["q8_0", "mxfp4_moe"] {
        check("tiny-gpt-oss", r);
    }
}

#[test]
fn tiny_glm4moe() {
    for r in ["q8_0", "q4_k_m"] {
        check("tiny-glm4moe", r);
    }
}

#[test]
fn tiny_deepseek2() {
    for r in ["q8_0", "iq4_nl"] {
        check("tiny-deepseek2", r);
    }
}
