//! A real model under a VRAM budget that keeps most of it off the (host) device, each strategy
//! forced: perplexity over GPL-2 and greedy text equal the all-CPU engine's. The host device's
//! kernels are the CPU lane's ops, so equal means equal to rounding noise: any data that reaches
//! a lane late, stale or in the wrong place shows.

mod common;

use std::sync::Arc;

use common::real_model;
use pshard_planner::cost::PlanParams;
use pshard_planner::Strategy;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::host_device::HostDevice;
use pshard_runtime::model::Model;
use pshard_runtime::session::perplexity;
use pshard_runtime::tiers::{resolve, Forced, Profiles, TierRequest};
use pshard_tokenizer::Tokenizer;

const GPL2: &str = "/usr/share/common-licenses/GPL-2";

fn greedy(engine: &mut Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut logits = engine.eval(prompt, Logits::Last).unwrap();
    for _ in 0..n {
        let tok = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        out.push(tok);
        logits = engine.eval(&[tok], Logits::Last).unwrap();
    }
    out
}

#[test]
fn smollm2_under_a_budget_matches_the_cpu_for_every_strategy() {
    let Some(path) = real_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let text = std::fs::read_to_string(GPL2).expect("GPL-2 text (Debian's common-licenses)");
    let model = Arc::new(Model::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(model.file().header()).unwrap();
    let mut tokens = tok.encode(&text, true, false);
    let n_ctx = 64;
    tokens.truncate(2 * n_ctx);
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let prompt = tok.encode("The capital of France is", true, true);
    let run = |e: &mut Engine| {
        let p = perplexity(e, &tokens, n_ctx, bos, &mut |_, _| {}).unwrap();
        e.reset();
        (p.ppl, greedy(e, &prompt, 4))
    };
    let mut cpu = Engine::new(Model::open(&path).unwrap(), n_ctx, n_ctx);
    let (want_ppl, want_text) = run(&mut cpu);
    // 60% of the weights' bytes: the tied output/embedding (a third of them) and a few layers
    // fit, most layers stay off the device.
    let size: u64 = model.spec.tensors.iter().map(|t| t.bytes).sum();
    let budget = size * 6 / 10 + pshard_kernels::cuda::WORKSPACE_BYTES;
    let profiles = Profiles::default();
    let reg =
        std::env::temp_dir().join(format!("pshard-real-hybrid-{}.pshard", std::process::id()));
    for s in Strategy::SEARCHED {
        let mut params = PlanParams::new(n_ctx);
        params.n_batch = n_ctx;
        let req = TierRequest {
            model_path: &path,
            params,
            budget,
            registry: Some(&reg),
            forced: Some(Forced::Strategy(s)),
            profiles: &profiles,
            context_bytes: Some(0),
        };
        let (tiers, _) = resolve(&model, &req).unwrap();
        let on_gpu = tiers
            .tiers
            .iter()
            .map(|t| t.placement.layer_map(&model.spec))
            .collect::<Vec<_>>();
        let dev = HostDevice::new(model.clone(), budget).with_delays(s as u64, 20);
        let mut e = Engine::with_tiers(model.clone(), tiers, 1, Some(Box::new(dev)), true).unwrap();
        let (ppl, text) = run(&mut e);
        println!(
            "{}: PPL {ppl:.6} (CPU {want_ppl:.6}), layers {on_gpu:?}",
            s.name()
        );
        assert!(
            (ppl - want_ppl).abs() <= 1e-6 * want_ppl,
            "{}: perplexity {ppl} vs the CPU's {want_ppl}",
            s.name()
        );
        assert_eq!(text, want_text, "{}: greedy tokens", s.name());
    }
    std::fs::remove_file(&reg).ok();
}
