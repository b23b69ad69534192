//! Placement invariance on the host device: every strategy's placements (pinned, streamed, CPU
//! and split weights; resident, streamed and host KV) give the logits of the all-CPU engine,
//! with both device streams delayed at random so that a missing event or a ring slot reused too
//! early shows as wrong numbers. The bytes each step copies equal what the lane decisions (which
//! the planner prices) say. The same with a Q8_0 KV cache (its rows copied between host and
//! device as bytes), and the plans' VRAM bill with one.

mod common;

use std::sync::Arc;

use common::{
    placement, q8_kv_ready, rel_l2, strategies, synth_model, synth_variant, tiers_of, with_kv,
};
use pshard_model::ggml_type::GgmlType;
use pshard_planner::cost::PlanParams;
use pshard_planner::lanes::{self, ProgramLanes};
use pshard_planner::placement::Strategy;
use pshard_planner::{Place, Placement};
use pshard_runtime::batch::{scattered_routes, RouteOverride};
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::host_device::HostDevice;
use pshard_runtime::model::Model;
use pshard_runtime::tiers::{Forced, RunTier, TierSet};

/// Identical arithmetic on both sides (the host device's kernels are the CPU lane's ops), so the
/// only differences could come from wrong data: exact-activation logits must agree to f32
/// summation noise at most.
const TOL: f64 = 1e-5;

const PRESETS: [&str; 9] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-qwen3moe",
    "tiny-mixtral",
    "tiny-gemma3",
    "tiny-gpt-oss",
    "tiny-glm4moe",
    "tiny-deepseek2",
];

/// Tiers 1, 16 and 512 with their own placements (so ubatches switch tiers).
fn tier_set(pls: [Placement; 3], n_ctx: usize) -> TierSet {
    let [a, b, c] = pls;
    tiers_of(vec![(1, a), (16, b), (512, c)], n_ctx)
}

/// A prompt of 23 tokens, 3 decode steps, then a 16-token chunk, then one more step: every
/// tier runs, and tiers switch both ways. Returns the logits of every evaluated position.
fn run(engine: &mut Engine, n_vocab: usize) -> Vec<f32> {
    let toks: Vec<u32> = (0..43u32)
        .map(|i| (i * 7919 + 13) % n_vocab as u32)
        .collect();
    let mut out = engine.eval(&toks[..23], Logits::All).unwrap();
    for &t in &toks[23..26] {
        out.extend(engine.eval(&[t], Logits::Last).unwrap());
    }
    out.extend(engine.eval(&toks[26..42], Logits::All).unwrap());
    out.extend(engine.eval(&toks[42..43], Logits::Last).unwrap());
    out
}

fn cpu_logits(path: &std::path::Path, kv: GgmlType) -> Vec<f32> {
    cpu_logits_routed(path, kv, None)
}

/// [`cpu_logits`] with MoE experts forced by `routes`.
fn cpu_logits_routed(
    path: &std::path::Path,
    kv: GgmlType,
    routes: Option<Arc<RouteOverride>>,
) -> Vec<f32> {
    let model = Arc::new(Model::open(path).unwrap());
    let nv = model.spec.hparams.n_vocab;
    let mut params = PlanParams::new(64);
    params.kv_type = kv;
    // Ubatches of the whole context (64), as the prompt tier of 512 runs them.
    let tiers = TierSet::all_cpu(&model.spec, params, 64);
    let mut e = Engine::with_tiers(model, tiers, 1, None, false).unwrap();
    e.set_exact_activations(true);
    e.set_route_override(routes);
    run(&mut e, nv)
}

fn hybrid_logits(
    path: &std::path::Path,
    pls: [Placement; 3],
    seed: Option<u64>,
    kv: GgmlType,
) -> Vec<f32> {
    let model = Arc::new(Model::open(path).unwrap());
    let nv = model.spec.hparams.n_vocab;
    let tiers = with_kv(tier_set(pls, 64), kv);
    let mut dev = HostDevice::new(model.clone(), 1 << 30);
    if let Some(s) = seed {
        dev = dev.with_delays(s, 60);
    }
    let mut e = Engine::with_tiers(model, tiers, 1, Some(Box::new(dev)), true).unwrap();
    e.set_exact_activations(true);
    run(&mut e, nv)
}

/// Delay seeds per strategy and model: 4 in CI (28 per model), `PSHARD_DELAY_SEEDS` for more.
fn seeds() -> u64 {
    std::env::var("PSHARD_DELAY_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn check_model(preset: &str, seeds_per_strategy: u64) {
    check_model_kv(preset, seeds_per_strategy, GgmlType::F16);
}

/// [`check_model`] with a `kv` cache on both sides.
fn check_model_kv(preset: &str, seeds_per_strategy: u64, kv: GgmlType) {
    let path = synth_variant(
        preset,
        &format!("{preset}-{}", kv.name()),
        "q8_0",
        11,
        |p| {
            if kv == GgmlType::Q8_0 {
                q8_kv_ready(p);
            }
        },
    );
    let spec = Model::open(&path).unwrap().spec.clone();
    let want = cpu_logits(&path, kv);
    let mut seed = 0;
    for s in strategies() {
        // Tier 1 lightly pinned, tier 16 half, tier 512 mostly: all kinds of placements, and a
        // switch at every tier change.
        let pls = [
            placement(&spec, s, 0.15),
            placement(&spec, s, 0.5),
            placement(&spec, s, 0.85),
        ];
        for _ in 0..seeds_per_strategy {
            let got = hybrid_logits(&path, pls.clone(), Some(seed), kv);
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            assert_eq!(got.len(), want.len());
            let err = rel_l2(&got, &want64);
            assert!(
                err <= TOL,
                "{preset} {kv:?} KV {} (delay seed {seed}): logits rel L2 {err:.3e} vs all-CPU",
                s.name()
            );
            seed += 1;
        }
    }
    std::fs::remove_file(&path).ok();
}

#[test]
fn placements_match_the_cpu_engine_llama() {
    check_model("tiny-llama", seeds());
}

#[test]
fn placements_match_the_cpu_engine_qwen2() {
    check_model("tiny-qwen2", seeds());
}

#[test]
fn placements_match_the_cpu_engine_qwen3() {
    check_model("tiny-qwen3", seeds());
}

#[test]
fn placements_match_the_cpu_engine_qwen3moe() {
    check_model("tiny-qwen3moe", seeds());
}

#[test]
fn placements_match_the_cpu_engine_mixtral() {
    check_model("tiny-mixtral", seeds());
}

#[test]
fn placements_match_the_cpu_engine_gemma3() {
    check_model("tiny-gemma3", seeds());
}

#[test]
fn placements_match_the_cpu_engine_gpt_oss() {
    check_model("tiny-gpt-oss", seeds());
}

#[test]
fn placements_match_the_cpu_engine_glm4moe() {
    check_model("tiny-glm4moe", seeds());
}

#[test]
fn placements_match_the_cpu_engine_deepseek2() {
    check_model("tiny-deepseek2", seeds());
}

/// A Q8_0 KV cache resident, streamed (live cells up, new cells down, as bytes of 34-byte
/// blocks) and on the host: every placement gives the all-CPU engine's logits with one, for a
/// dense, a sliding-window, a sink and a latent-attention model.
#[test]
fn placements_match_the_cpu_engine_with_q8_0_kv() {
    for preset in [
        "tiny-llama",
        "tiny-gemma3",
        "tiny-gpt-oss",
        "tiny-deepseek2",
    ] {
        check_model_kv(preset, 1, GgmlType::Q8_0);
    }
}

/// Forced MoE experts (`Engine::set_route_override`) reach the device's routing too (the tables
/// uploaded into device memory, read by the routing steps there): placements that route some
/// layers on the CPU lane and some on the device, with the same scattered experts forced, give
/// the all-CPU engine's logits under that override, which are far from the routers' own
/// choices; clearing the override brings those back and releases the tables' device memory.
#[test]
fn forced_routes_reach_the_device() {
    for preset in ["tiny-qwen3moe", "tiny-gpt-oss"] {
        let path = synth_variant(preset, &format!("{preset}-forced"), "q8_0", 13, |_| {});
        let spec = Model::open(&path).unwrap().spec.clone();
        let routes = scattered_routes(&spec);
        let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let own32 = cpu_logits(&path, GgmlType::F16);
        let own = to64(&own32);
        let forced = to64(&cpu_logits_routed(
            &path,
            GgmlType::F16,
            Some(routes.clone()),
        ));
        let apart = rel_l2(&own32, &forced);
        assert!(
            apart > 1e-2,
            "{preset}: forcing experts moved the logits by {apart:.2e}"
        );
        let mut both_lanes = false;
        for (seed, s) in strategies().into_iter().enumerate() {
            let pls = [
                placement(&spec, s, 0.15),
                placement(&spec, s, 0.5),
                placement(&spec, s, 0.85),
            ];
            let model = Arc::new(Model::open(&path).unwrap());
            let nv = spec.hparams.n_vocab;
            let dev = HostDevice::new(model.clone(), 1 << 30).with_delays(seed as u64, 60);
            let tiers = tier_set(pls, 64);
            let mut e = Engine::with_tiers(model, tiers, 1, Some(Box::new(dev)), true).unwrap();
            e.set_exact_activations(true);
            e.set_op_timing(true);
            e.set_route_override(Some(routes.clone()));
            let got = run(&mut e, nv);
            let err = rel_l2(&got, &forced);
            let name = s.name();
            assert!(
                err <= TOL,
                "{preset} {name}: forced routes rel L2 {err:.3e} vs all-CPU"
            );
            let on_device = e
                .device_op_times()
                .iter()
                .any(|(k, t)| k.op == "moe_route" && t.calls > 0);
            let on_cpu = e.op_seconds().iter().any(|(k, _)| *k == "moe_route");
            both_lanes |= on_device && on_cpu;
            let report = e.device_report().unwrap();
            if on_device {
                assert!(report.contains("forced MoE routes"), "{report}");
            }
            e.set_route_override(None);
            e.reset();
            let got = run(&mut e, nv);
            let err = rel_l2(&got, &own);
            assert!(
                err <= TOL,
                "{preset} {name}: own routes rel L2 {err:.3e} vs all-CPU"
            );
            let report = e.device_report().unwrap();
            assert!(!report.contains("forced MoE routes"), "{report}");
        }
        assert!(both_lanes, "{preset}: no placement routes on both lanes");
        std::fs::remove_file(&path).ok();
    }
}

/// The bytes a decode step copies over the host device equal what the lane decisions say:
/// streamed weights into their slots, activations at lane boundaries, live KV of streamed
/// attention up and its new cells down, the inputs, the logits.
#[test]
fn bytes_moved_per_step_equal_the_lane_decisions() {
    for preset in PRESETS {
        let path = synth_model(preset, "q8_0", 5);
        let model = Arc::new(Model::open(&path).unwrap());
        let spec = model.spec.clone();
        let nv = spec.hparams.n_vocab as u32;
        for s in strategies() {
            let pl = placement(&spec, s, 0.4);
            let tiers = tier_set([pl.clone(), pl.clone(), pl.clone()], 64);
            let dev = HostDevice::new(model.clone(), 1 << 30);
            let mut e =
                Engine::with_tiers(model.clone(), tiers, 1, Some(Box::new(dev)), true).unwrap();
            let prompt: Vec<u32> = (0..9u32).map(|i| (i * 31 + 7) % nv).collect();
            e.eval(&prompt, Logits::Last).unwrap();
            // A first decode step: afterwards the decode tier is in its steady state (each run
            // ends by loading the next run's first streamed segment).
            e.eval(&[2], Logits::Last).unwrap();
            e.synchronize().unwrap();
            let before = e.copied_bytes();
            e.eval(&[3], Logits::Last).unwrap();
            // The copy stream may still be writing this step's KV back.
            e.synchronize().unwrap();
            let after = e.copied_bytes();
            let got = (after.0 - before.0, after.1 - before.1);
            let g = pshard_model::arch::build_graph(&spec, 1, 1).unwrap();
            let l = ProgramLanes::new(&spec, &g, &pl, 2);
            let (act_h2d, act_d2h) = l.move_bytes(&g);
            let loads: u64 = l.segments.iter().map(|sg| sg.load_bytes()).sum();
            let cell = pshard_model::bytes::kv_bytes_per_token_layer(
                &spec,
                pshard_model::ggml_type::GgmlType::F16,
                0,
            );
            let past = prompt.len() + 1;
            let (mut kv_up, mut kv_down) = (0u64, 0u64);
            for layer in l.streamed_kv_layers(&g) {
                kv_up += cell * lanes::kv_up_cells(spec.layers[layer].window, past) as u64;
                kv_down += cell;
            }
            let want = (
                act_h2d + loads + kv_up + l.input_bytes(&g),
                act_d2h + kv_down,
            );
            assert_eq!(
                got,
                want,
                "{preset} {}: (h2d, d2h) bytes of one decode step",
                s.name()
            );
            // The cost model counts the same bytes for a decode step at this KV depth.
            let mut params = PlanParams::new(64);
            params.tier_max = Some(512);
            params.decode_depth = past;
            let table = pshard_planner::CostTable::new(None, None, 1);
            let tm = pshard_planner::cost::TierModel::new(&spec, &table, &params, &g, false);
            assert_eq!(
                tm.eval(&pl).copied,
                got,
                "{preset} {}: the cost model's bytes of one decode step",
                s.name()
            );
            // Prompt chunks of 16 (the second in its tier's steady state): the prefill cost
            // model.
            let chunk: Vec<u32> = (0..16u32).map(|i| (i * 13 + 5) % nv).collect();
            e.eval(&chunk, Logits::Last).unwrap();
            e.synchronize().unwrap();
            let before = e.copied_bytes();
            e.eval(&chunk, Logits::Last).unwrap();
            e.synchronize().unwrap();
            let after = e.copied_bytes();
            let got = (after.0 - before.0, after.1 - before.1);
            params.prefill_past = past + 1 + 16;
            let g16 = pshard_model::arch::build_graph(&spec, 16, 1).unwrap();
            let tm = pshard_planner::cost::TierModel::new(&spec, &table, &params, &g16, true);
            assert_eq!(
                tm.eval(&pl).copied,
                got,
                "{preset} {}: the cost model's bytes of a 16-token prompt chunk",
                s.name()
            );
        }
        std::fs::remove_file(&path).ok();
    }
}

/// All-CPU plans never touch the device; every weight placed on the GPU is there.
#[test]
fn all_cpu_tiers_copy_nothing() {
    let path = synth_model("tiny-llama", "q8_0", 2);
    let model = Arc::new(Model::open(&path).unwrap());
    let spec = model.spec.clone();
    let cpu = Placement::uniform(&spec, Place::Cpu);
    let tiers = tier_set([cpu.clone(), cpu.clone(), cpu], 64);
    let dev = HostDevice::new(model.clone(), 1 << 30);
    let mut e = Engine::with_tiers(model, tiers, 1, Some(Box::new(dev)), true).unwrap();
    e.eval(&[1, 2, 3, 4], Logits::Last).unwrap();
    assert_eq!(e.copied_bytes(), (0, 0));
    std::fs::remove_file(&path).ok();
}

/// Plans at run time: the registry written for a model is used for the same inputs, and never
/// for another file's content (same path, same size), another context, or a forced strategy.
#[test]
fn a_registry_is_used_only_for_its_model_and_inputs() {
    use pshard_runtime::tiers::{resolve, Profiles, TierRequest};
    let dir = std::env::temp_dir().join(format!("pshard-registry-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    let write = |seed: u64| {
        let src = synth_model("tiny-llama", "q8_0", seed);
        std::fs::copy(&src, &path).unwrap();
        std::fs::remove_file(&src).ok();
    };
    write(1);
    let profiles = Profiles::default();
    let req = |ctx: usize, forced| TierRequest {
        model_path: &path,
        params: PlanParams::new(ctx),
        budget: 256 << 20,
        registry: None,
        forced,
        profiles: &profiles,
        context_bytes: Some(0),
    };
    let model = Model::open(&path).unwrap();
    let (first, line) = resolve(&model, &req(64, None)).unwrap();
    assert!(line.contains("planned in-process"), "{line}");
    let reg = pshard_planner::registry::path_next_to(&path);
    assert!(reg.exists(), "the registry is written next to the model");
    let (again, line) = resolve(&model, &req(64, None)).unwrap();
    assert!(line.starts_with("plans: registry"), "{line}");
    let key = |t: &TierSet| -> Vec<(usize, Placement, String, usize)> {
        t.tiers
            .iter()
            .map(|r| (r.n, r.placement.clone(), r.strategy.clone(), r.ubatch))
            .collect()
    };
    assert_eq!(
        key(&again),
        key(&first),
        "the registry gives back the plan it recorded"
    );
    // Another context: planned anew (and added to the registry).
    let (_, line) = resolve(&model, &req(128, None)).unwrap();
    assert!(line.contains("planned in-process"), "{line}");
    // A forced strategy neither reads nor writes the registry.
    let before = std::fs::read_to_string(&reg).unwrap();
    let (forced, line) = resolve(
        &model,
        &req(
            64,
            Some(Forced::Strategy(Strategy::GpuonlyLayerpinLayerstream)),
        ),
    )
    .unwrap();
    assert!(line.contains("forced"), "{line}");
    assert!(forced
        .tiers
        .iter()
        .all(|t| t.strategy == "GPUONLY_LAYERPIN_LAYERSTREAM"));
    assert_eq!(std::fs::read_to_string(&reg).unwrap(), before);
    // Nor does -ngl.
    let (_, line) = resolve(&model, &req(64, Some(Forced::GpuLayers(1)))).unwrap();
    assert!(line.contains("-ngl 1"), "{line}");
    assert_eq!(std::fs::read_to_string(&reg).unwrap(), before);
    // Other content at the same path, of the same size: the registry is not used.
    drop(model);
    write(2);
    let model = Model::open(&path).unwrap();
    let (_, line) = resolve(&model, &req(64, None)).unwrap();
    assert!(
        line.contains("planned in-process") && line.contains("not used"),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The plans' VRAM bill covers everything the runtime allocates: planned in-process at budgets
/// from just above the smallest that fits to twice the model, every tier runs on a host device
/// whose arena holds exactly the budget (minus the context, which a host device has none of).
#[test]
fn plans_run_within_their_budget() {
    use pshard_runtime::tiers::{resolve, Profiles, TierRequest};
    let profiles = Profiles::default();
    for (preset, kv) in [
        ("tiny-llama", GgmlType::F16),
        ("tiny-qwen3moe", GgmlType::F16),
        ("tiny-gemma3", GgmlType::F16),
        ("tiny-llama", GgmlType::Q8_0),
        ("tiny-gemma3", GgmlType::Q8_0),
    ] {
        let path = synth_model(preset, "q8_0", 9);
        let model = Arc::new(Model::open(&path).unwrap());
        let size: u64 = model.spec.tensors.iter().map(|t| t.bytes).sum();
        let nv = model.spec.hparams.n_vocab as u32;
        let reg = std::env::temp_dir().join(format!(
            "pshard-budget-{}-{preset}.pshard",
            std::process::id()
        ));
        let mut ran = 0;
        for share in [
            0.15, 0.2, 0.25, 0.3, 0.35, 0.45, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.3, 1.5, 2.5,
        ] {
            let budget = (size as f64 * share) as u64 + pshard_kernels::cuda::WORKSPACE_BYTES;
            let mut params = PlanParams::new(96);
            params.n_batch = 64;
            params.kv_type = kv;
            let req = TierRequest {
                model_path: &path,
                params,
                budget,
                registry: Some(&reg),
                forced: None,
                profiles: &profiles,
                context_bytes: Some(0),
            };
            let tiers = match resolve(&model, &req) {
                Ok((t, _)) => t,
                Err(e) if e.to_string().contains("too small") => continue,
                Err(e) => panic!("{preset} at {budget} B: {e}"),
            };
            let dev = HostDevice::new(model.clone(), budget);
            let mut e = Engine::with_tiers(model.clone(), tiers, 1, Some(Box::new(dev)), true)
                .unwrap_or_else(|err| panic!("{preset} at {budget} B: {err}"));
            assert_eq!(e.kv_type().ggml(), kv);
            let toks: Vec<u32> = (0..90u32).map(|i| (i * 31 + 7) % nv).collect();
            let r = (|| {
                e.eval(&toks[..70], Logits::Last)?;
                for &t in &toks[70..75] {
                    e.eval(&[t], Logits::Last)?;
                }
                e.eval(&toks[75..90], Logits::Last)
            })();
            if let Err(err) = r {
                panic!("{preset} {kv:?} KV at {budget} B ({share} × the weights): {err}");
            }
            assert!(e.device_measured_bytes().unwrap() <= budget);
            ran += 1;
        }
        assert!(ran >= 4, "{preset} {kv:?} KV: only {ran} budgets planned");
        std::fs::remove_file(&path).ok();
        std::fs::remove_file(&reg).ok();
    }
}

/// A long prompt on a streaming tier of 16: its ubatches are issued back to back without waiting
/// for the device in between (only the last reads logits), so ring slots, staging memory and the
/// next run's prefetched first segment are reused while earlier runs may still be in flight.
#[test]
fn chained_ubatches_match_the_cpu_engine() {
    for preset in ["tiny-llama", "tiny-qwen3moe", "tiny-gemma3"] {
        let path = synth_model(preset, "q8_0", 13);
        let model = Arc::new(Model::open(&path).unwrap());
        let spec = model.spec.clone();
        let nv = spec.hparams.n_vocab as u32;
        let toks: Vec<u32> = (0..60u32).map(|i| (i * 7919 + 13) % nv).collect();
        let run = |e: &mut Engine| {
            e.set_exact_activations(true);
            let mut out = e.eval(&toks[..50], Logits::Last).unwrap();
            for &t in &toks[50..54] {
                out.extend(e.eval(&[t], Logits::Last).unwrap());
            }
            out
        };
        let mut cpu = Engine::new(Model::open(&path).unwrap(), 64, 16);
        let want: Vec<f64> = run(&mut cpu).into_iter().map(f64::from).collect();
        for s in [
            Strategy::GpuonlyLayerpinLayerstream,
            Strategy::GpuonlyAttnpinFfnstream,
            Strategy::DynamicFfncpuAttnstream,
        ] {
            for seed in 0..4 {
                let mut params = PlanParams::new(64);
                params.tier_max = Some(16);
                let pl = placement(&spec, s, 0.3);
                let tiers = TierSet {
                    tiers: [1, 16]
                        .into_iter()
                        .map(|n| RunTier {
                            n,
                            prefill: n == 16,
                            placement: pl.clone(),
                            strategy: s.name().into(),
                            ubatch: n,
                            predicted_tps: None,
                            switch_s: 0.0,
                        })
                        .collect(),
                    params,
                    source: "test".into(),
                };
                let dev = HostDevice::new(model.clone(), 1 << 30).with_delays(100 + seed, 80);
                let mut e =
                    Engine::with_tiers(model.clone(), tiers, 1, Some(Box::new(dev)), true).unwrap();
                let got = run(&mut e);
                let err = rel_l2(&got, &want);
                assert!(
                    err <= TOL,
                    "{preset} {} seed {seed}: rel L2 {err:.3e}",
                    s.name()
                );
            }
        }
        std::fs::remove_file(&path).ok();
    }
}

/// llama.cpp's `-ngl N`: the last N layers pinned whole in every tier, the output projection
/// only from N = layers + 1, nothing else on the GPU; the engine running those plans gives the
/// all-CPU engine's logits. Too many layers for the budget, and `-ngl 0`, are errors that say so.
#[test]
fn gpu_layers_pin_the_last_layers_and_match_the_cpu_engine() {
    use pshard_runtime::tiers::{resolve, Profiles, TierRequest};
    let profiles = Profiles::default();
    for preset in [
        "tiny-llama",
        "tiny-qwen3moe",
        "tiny-gemma3",
        "tiny-gpt-oss",
        "tiny-glm4moe",
        "tiny-deepseek2",
    ] {
        let path = synth_model(preset, "q8_0", 21);
        let model = Arc::new(Model::open(&path).unwrap());
        let spec = model.spec.clone();
        let n_layer = spec.layers.len();
        let want = cpu_logits(&path, GgmlType::F16);
        let req = |n: usize, budget: u64| TierRequest {
            model_path: &path,
            params: PlanParams::new(64),
            budget,
            registry: None,
            forced: Some(Forced::GpuLayers(n)),
            profiles: &profiles,
            context_bytes: Some(0),
        };
        for n in [1, n_layer / 2, n_layer, n_layer + 1, 99] {
            let (tiers, line) = resolve(&model, &req(n, 1 << 30)).unwrap();
            assert!(line.contains(&format!("-ngl {n}")), "{line}");
            for t in &tiers.tiers {
                let pl = &t.placement;
                assert_eq!(t.strategy, "STATIC_NGL");
                for l in 0..n_layer {
                    let on_gpu = l + n.min(n_layer) >= n_layer;
                    assert_eq!(
                        pl.layer_pinned(&spec, l),
                        on_gpu,
                        "{preset} -ngl {n} layer {l}"
                    );
                    if !on_gpu {
                        for g in &spec.layers[l].groups {
                            assert!(
                                pl.groups[g.0 as usize].iter().all(|p| *p == Place::Cpu),
                                "{preset} -ngl {n}: layer {l} is on the CPU whole"
                            );
                        }
                    }
                }
                let out = pl.groups[spec.output.0 as usize][0];
                assert_eq!(
                    out == Place::Pinned,
                    n > n_layer,
                    "{preset} -ngl {n} output"
                );
                assert!(pl.groups[spec.embed.0 as usize]
                    .iter()
                    .all(|p| *p == Place::Cpu));
            }
            let dev = HostDevice::new(model.clone(), 1 << 30).with_delays(n as u64, 40);
            let mut e =
                Engine::with_tiers(model.clone(), tiers, 1, Some(Box::new(dev)), true).unwrap();
            e.set_exact_activations(true);
            let got = run(&mut e, spec.hparams.n_vocab);
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            assert_eq!(got.len(), want.len());
            let d = rel_l2(&got, &want64);
            assert!(
                d <= TOL,
                "{preset} -ngl {n}: rel L2 {d:e} against the CPU engine"
            );
        }
        let e = resolve(&model, &req(n_layer, 1 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("-ngl {n_layer}")) && e.contains("lower -ngl"),
            "{e}"
        );
        let e = resolve(&model, &req(0, 1 << 30)).unwrap_err().to_string();
        assert!(e.contains("-ngl 0") && e.contains("--device cpu"), "{e}");
        std::fs::remove_file(&path).ok();
    }
}

/// Every row's logits from a prompt tier (as perplexity asks): the tier is sized for one logit
/// row, so the program over every row brings its own buffers and, where the output projection
/// over many rows needs a larger dequantization scratch than any matrix of the tier (a
/// vocabulary larger than the FFN), its own scratch. The host device checks each step's scratch
/// against what the CUDA kernels would use, so a program sized short fails here.
#[test]
fn every_row_logits_of_a_prompt_tier_match_the_cpu_engine() {
    use pshard_model::synth;
    let mut p = synth::preset("tiny-llama").unwrap();
    p.n_vocab = 4096;
    let path =
        std::env::temp_dir().join(format!("pshard-test-bigvocab-{}.gguf", std::process::id()));
    let f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let r = synth::QuantRecipe::from_name("q8_0").unwrap();
    synth::write_synth(&p, r, 3, f, &mut |_, _| {}).unwrap();
    // 8-bit activations on both sides: in exact mode every quantized matmul, the output
    // projection of one row included, takes the GEMM path, and the tier would be sized for it.
    let mut cpu = Engine::new(Model::open(&path).unwrap(), 64, 64);
    let want = run(&mut cpu, p.n_vocab);
    let model = Arc::new(Model::open(&path).unwrap());
    let all = Placement::uniform(&model.spec, Place::Pinned);
    let tiers = TierSet::single(all, "ALL_GPU", PlanParams::new(64), 64);
    let dev = HostDevice::new(model.clone(), 1 << 30);
    let mut e = Engine::with_tiers(model, tiers, 1, Some(Box::new(dev)), true).unwrap();
    let got = run(&mut e, p.n_vocab);
    let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let err = rel_l2(&got, &want64);
    assert!(err <= TOL, "every-row logits rel L2 {err:.3e} vs all-CPU");
    std::fs::remove_file(&path).ok();
}
