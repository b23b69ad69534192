//! The Q8_0 KV cache (`-ctk q8_0 -ctv q8_0`) against the f16 one: the same model and tokens give
//! logits within the Q8_0 rounding of K and V (a wrong block layout gives garbage), on
//! every attention kind (llama, gemma3's sliding window, qwen3's q/k norms, gpt-oss's sinks and
//! windows, deepseek2's latent rows); its bytes are 34/64 of f16's; a model whose heads are not
//! whole blocks is refused by name; SmolLM2's perplexity moves by less than 1%.

mod common;

use std::sync::Arc;

use common::{q8_kv_ready, rel_l2, synth_variant};
use pshard_model::ggml_type::GgmlType;
use pshard_planner::cost::PlanParams;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;
use pshard_runtime::session::perplexity;
use pshard_runtime::tiers::TierSet;
use pshard_tokenizer::Tokenizer;

/// Logits with a Q8_0 cache against an f16 cache. Q8_0 rounds each K/V value by up to half a
/// step of max|x|/127 of its block (f16: 2^-11 relative), which these random tiny models amplify
/// through their layers: measured 3.8e-3 (llama), 1.1e-2 (gemma3), 1.2e-2 (qwen3), 9.2e-3
/// (gpt-oss), 8.2e-3 (deepseek2). Reading the blocks with the scale after the quants instead of
/// before gave NaN logits; a wrong block stride or head offset reads other values, ~1.
const TOL_Q8_VS_F16: f64 = 3e-2;

fn engine(model: &Arc<Model>, n_ctx: usize, ubatch: usize, kv: GgmlType) -> Engine {
    let mut params = PlanParams::new(n_ctx);
    params.kv_type = kv;
    let tiers = TierSet::all_cpu(&model.spec, params, ubatch);
    Engine::with_tiers(model.clone(), tiers, 1, None, false).unwrap()
}

/// A 40-token prompt in ubatches of 16 (so later rows read cells earlier ubatches wrote, and a
/// window ring wraps), then 8 decode steps; the logits of every position. MoE layers take fixed
/// experts per (layer, position), so that a near-tie in the router cannot flip between the two
/// caches (one flipped expert moves these random models' logits by ~1e-1).
fn logits(model: &Arc<Model>, kv: GgmlType) -> Vec<f32> {
    let mut e = engine(model, 64, 16, kv);
    e.set_exact_activations(true);
    let h = &model.spec.hparams;
    let (n_expert, n_used) = (h.n_expert as u32, h.n_expert_used as u32);
    if n_expert > 0 {
        e.set_route_override(Some(Arc::new(move |layer: usize, pos: u32| {
            Some(
                (0..n_used)
                    .map(|k| (pos + layer as u32 + k) % n_expert)
                    .collect(),
            )
        })));
    }
    let nv = model.spec.hparams.n_vocab as u32;
    let toks: Vec<u32> = (0..48u32).map(|i| (i * 7919 + 13) % nv).collect();
    let mut out = e.eval(&toks[..40], Logits::All).unwrap();
    for &t in &toks[40..] {
        out.extend(e.eval(&[t], Logits::Last).unwrap());
    }
    out
}

#[test]
fn q8_0_kv_logits_track_f16_kv() {
    let mut errs = Vec::new();
    for preset in [
        "tiny-llama",
        "tiny-gemma3",
        "tiny-qwen3",
        "tiny-gpt-oss",
        "tiny-deepseek2",
    ] {
        let path = synth_variant(preset, &format!("{preset}-kvq8"), "q8_0", 3, q8_kv_ready);
        let model = Arc::new(Model::open(&path).unwrap());
        let f16 = logits(&model, GgmlType::F16);
        let q8 = logits(&model, GgmlType::Q8_0);
        let want: Vec<f64> = f16.iter().map(|&v| v as f64).collect();
        let err = rel_l2(&q8, &want);
        eprintln!("{preset}: q8_0 KV vs f16 KV logits rel L2 {err:.3e}");
        errs.push((preset, err));
        std::fs::remove_file(&path).ok();
    }
    for (preset, err) in errs {
        assert!(
            err <= TOL_Q8_VS_F16,
            "{preset}: q8_0 KV logits rel L2 {err:.3e} vs f16 KV"
        );
        // The Q8_0 cache is really in use: its rounding shows.
        assert!(
            err > 1e-6,
            "{preset}: q8_0 KV gave the f16 logits ({err:.3e})"
        );
    }
}

/// The cache's bytes: per row 34 bytes per 32 values against 64, so 34/64 of f16's up to the
/// alignment of each layer's K and V parts.
#[test]
fn q8_0_kv_takes_34_64ths_of_f16() {
    let path = synth_variant("tiny-llama", "tiny-llama-kvbytes", "q8_0", 3, |_| {});
    let model = Arc::new(Model::open(&path).unwrap());
    let f16 = engine(&model, 512, 64, GgmlType::F16).kv_bytes();
    let q8 = engine(&model, 512, 64, GgmlType::Q8_0).kv_bytes();
    let ratio = q8 as f64 / f16 as f64;
    assert!(
        (ratio - 34.0 / 64.0).abs() < 2e-3,
        "q8_0 {q8} B vs f16 {f16} B: ratio {ratio}"
    );
    // The planner's bill of a layer is the engine's allocation.
    let mut params = PlanParams::new(512);
    params.kv_type = GgmlType::Q8_0;
    params.tier_max = Some(64);
    let billed: u64 = (0..model.spec.layers.len())
        .map(|l| pshard_planner::cost::layer_kv_bytes(&model.spec, l, &params))
        .sum();
    assert_eq!(billed as usize, q8);
    std::fs::remove_file(&path).ok();
}

/// A model whose K heads are not whole 32-value blocks: the engine and the planner refuse a Q8_0
/// cache, naming the dimension.
#[test]
fn q8_0_kv_refuses_heads_that_are_not_whole_blocks() {
    // deepseek2's tiny preset keeps a 16-value rope key.
    let path = synth_variant("tiny-deepseek2", "tiny-deepseek2-rope16", "q8_0", 3, |_| {});
    let model = Arc::new(Model::open(&path).unwrap());
    let mut params = PlanParams::new(64);
    params.kv_type = GgmlType::Q8_0;
    let tiers = TierSet::all_cpu(&model.spec, params, 16);
    let err = match Engine::with_tiers(model.clone(), tiers, 1, None, false) {
        Ok(_) => panic!("a q8_0 cache of 16-value rope keys was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("rope key width (rope_dims) is 16") && err.contains("-ctk f16"),
        "{err}"
    );
    std::fs::remove_file(&path).ok();
}

const GPL2: &str = "/usr/share/common-licenses/GPL-2";

/// SmolLM2-135M's perplexity over GPL-2 (4 chunks of 256) with a Q8_0 cache within 1% of the f16
/// cache's (measured in the output).
#[test]
fn smollm2_perplexity_with_q8_0_kv_within_1_percent() {
    let Some(path) = common::real_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let Some(text) = pshard_testkit::text_file(GPL2) else {
        return;
    };
    let model = Arc::new(Model::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(model.file().header()).unwrap();
    let tokens = tok.encode(&text, true, false);
    let n_ctx = 256;
    let tokens = &tokens[..4 * n_ctx];
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let ppl = |kv| {
        let mut e = engine(&model, n_ctx, n_ctx, kv);
        perplexity(&mut e, tokens, n_ctx, bos, &mut |_, _| {})
            .unwrap()
            .ppl
    };
    let (f16, q8) = (ppl(GgmlType::F16), ppl(GgmlType::Q8_0));
    let rel = (q8 - f16).abs() / f16;
    eprintln!("SmolLM2 PPL (GPL-2, 4 × 256): f16 KV {f16:.4}, q8_0 KV {q8:.4} ({rel:.2e})");
    assert!(rel < 0.01, "q8_0 KV PPL {q8:.4} vs f16 KV {f16:.4}");
    assert!(q8 != f16, "the q8_0 cache gave the f16 cache's perplexity");
}
