//! All-GPU vs all-CPU logits on synthetic models through the one engine: tiny models of every
//! architecture and recipe, and two-layer models with llama3-8b and qwen3-30b-a3b dimensions;
//! greedy tokens identical on a model with large top-1 margins; per-op timing; mixed placements.
//! MoE comparisons force the same scattered experts on both engines ([`scatter_routes`]) except
//! one, which checks the routers' own choices end to end.
//! The tests that need a GPU are ignored by default (`needs a CUDA GPU`; scripts/gpu-check.sh
//! runs them with `--include-ignored`) and SKIP visibly when run on a machine without one.
//!
//! Every comparison prints one `LOGITS ...` line (gpu-check.sh collects them into its table).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pshard_kernels::cuda::{mmq_enabled, GEMV_INT8_MAX_ROWS, GEMV_MAX_ROWS, MOE_GEMV_MAX_PAIRS};
use pshard_model::synth::{plan, preset, write_plan, write_synth, QuantRecipe, SynthPreset};
use pshard_planner::cost::PlanParams;
use pshard_planner::{Place, Placement};

use super::*;
use crate::batch::scattered_routes;
use crate::engine::{Engine, Logits};
use crate::tiers::TierSet;

/// Relative L2 tolerance of the CPU-vs-GPU prefill comparisons (and of the greedy test's steps).
const TOL: f64 = 1e-2;

/// Relative L2 tolerance of the decode comparisons (both engines rounding activations to 8 bits).
/// Most models agree to ~1e-7 (same integer dots, only float summation order differs), but on
/// some random synthetic models one 8-bit rounding that flips on a 1e-7 difference is amplified
/// to ~1-2e-2 — and the CPU engine disagrees with itself just as much: measured on the dev
/// machine, fresh-context decode of tiny-qwen3 q4_0 differs by 1.1-1.8e-2 between the CPU's
/// scalar and AVX-512 paths (the GPU vs CPU numbers on the H200: 1.1-1.8e-2), tiny-qwen3moe
/// q8_0 by up to 7.7e-3, and the qwen3-30b-a3b 2-layer shapes by 1.02e-2 between AVX2 and
/// AVX-512. A real error in a decode kernel shows at 1e-1 and above, and every kernel is checked
/// against the CPU engine to 1e-5 in kernels/tests/cuda_kernels/.
const DECODE_TOL: f64 = 2e-2;

/// Relative L2 tolerance of the prefill comparison with MMQ on ([`mmq_enabled`]): both engines
/// round the quantized matmuls' activations to 8 bits (MMQ gives the CPU engine's bits,
/// `cuda_mmq_matches_cpu_engine`), but the prompt's other ops — attention, f16/f32-weight
/// matmuls on cuBLAS with f16 activations — differ by the exact-mode ~1e-3–8e-3 and 8-bit
/// rounding amplifies that. Measured on the H100 (2026-12-05): tiny-qwen2 q4_k_m 0, tiny-llama
/// q4_k 1.2e-7, q8_0 8.9e-4, q4_0 7.3e-3, llama3-8b 2-layer shapes 1.48e-2, tiny-gemma3 q4_k_m
/// 2.58e-2. A wrong stride or chunk in the MMQ path shows at 1e-1 and above.
const MMQ_PREFILL_TOL: f64 = 4e-2;

/// Whether a GPU test must return early: only when this machine has no GPU at all, with a visible
/// SKIP (a failure where `PSHARD_NO_SKIP` is set, as on the GPU machine). A GPU that is present
/// but unusable (missing toolkit library, failing driver) fails the test.
fn skip() -> bool {
    match pshard_kernels::cuda::probe(0) {
        Ok(_) => false,
        Err(e) if e.is_no_gpu() => {
            pshard_testkit::skip(&format!("no CUDA GPU ({})", e.short_reason()));
            true
        }
        Err(e) => panic!("a GPU is present but unusable: {e}"),
    }
}

fn test_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pshard-gpu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_preset(p: &SynthPreset, recipe: &str, path: &Path) {
    let r = QuantRecipe::from_name(recipe).unwrap();
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut f = write_synth(p, r, 7, f, &mut |_, _| {}).unwrap();
    f.flush().unwrap();
}

fn synth_model(name: &str, recipe: &str) -> PathBuf {
    let path = test_dir().join(format!("{name}-{recipe}.gguf"));
    if !path.exists() {
        // Tests run in parallel: write a private file and rename it into place, so no test ever
        // opens a half-written model.
        let p = preset(name).unwrap_or_else(|| panic!("no preset {name}"));
        let tmp = path.with_extension(format!("{:?}.tmp", std::thread::current().id()));
        write_preset(&p, recipe, &tmp);
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite GPU logit");
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
}

/// Top-1 minus top-2 logit.
fn top1_margin(v: &[f32]) -> f64 {
    let i = argmax(v);
    let second = v
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max);
    v[i] as f64 - second as f64
}

fn prompt(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7919 + 13) % n_vocab as u32)
        .collect()
}

/// Forces `e`'s MoE layers to [`scattered_routes`]. Every engine of a comparison gets them, so
/// that a near-tie in a router (one token's experts flipped by a 1e-6 difference in its logits)
/// cannot separate the engines and the comparison measures the kernels: gpt-oss-20b's 2-layer
/// prefill had one token of 128 at 0.17 against a median of 6.7e-3 with each engine routing
/// itself (docs/PERF.md). Dense models have no routing to force.
fn scatter_routes(e: &mut Engine) {
    let routes = scattered_routes(&e.model.spec);
    e.set_route_override(Some(routes));
}

/// Whose expert choices a MoE comparison runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Routes {
    /// The same scattered experts on both engines ([`scatter_routes`]).
    Forced,
    /// Each engine's own routers (the GPU's top-k `moe_route` end to end).
    Own,
}

/// An engine with every weight on the GPU (one tier of `ubatch` tokens).
fn gpu_engine(path: &Path, n_ctx: usize, ubatch: usize) -> Engine {
    let model = Arc::new(Model::open(path).unwrap());
    let pl = Placement::uniform(&model.spec, Place::Pinned);
    let tiers = TierSet::single(pl, "ALL_GPU", PlanParams::new(n_ctx), ubatch);
    let dev = CudaDevice::open(model.clone(), &GpuOptions::default()).unwrap();
    Engine::with_tiers(model, tiers, 1, Some(Box::new(dev)), true).unwrap()
}

/// Prefill, then decode, on both engines, comparing logits.
///
/// The CPU engine normally rounds activations to 8 bits (Q8_0/Q8_1/Q8_K) before each dot product
/// with quantized weights. The GPU's prefill path (batches above the int8-GEMV threshold) converts
/// activations to f16 for cuBLAS, so the prompt is compared against the CPU in exact-activation
/// mode; with MMQ on ([`mmq_enabled`]) the GPU's quantized prefill matmuls round activations to 8
/// bits as the CPU does, so the prompt is compared against the CPU in its default mode, within
/// [`MMQ_PREFILL_TOL`]. The GPU's decode GEMVs round activations exactly as the CPU does, so decode is compared
/// against the CPU in its default mode — from a fresh context on both engines, the prompt fed
/// token by token through the decode path (continuing from the two prefills would start from KV
/// caches that differ by the prefill error, which 8-bit rounding amplifies to ~1e-2 on random tiny
/// models). Prefill at relative L2 ≤ [`TOL`], decode ≤ `decode_tol`.
#[allow(clippy::too_many_arguments)]
fn compare_steps(
    label: &str,
    path: &Path,
    n_ctx: usize,
    ubatch: usize,
    n_prompt: usize,
    n_decode: usize,
    decode_tol: f64,
    routes: Routes,
) {
    let cpu_model = Model::open(path).unwrap();
    let n_vocab = cpu_model.spec.hparams.n_vocab;
    let mut cpu = Engine::new(cpu_model, n_ctx, ubatch);
    let mut gpu = gpu_engine(path, n_ctx, ubatch);
    if routes == Routes::Forced {
        scatter_routes(&mut cpu);
        scatter_routes(&mut gpu);
    }
    let prompt = prompt(n_prompt, n_vocab);
    let mmq = mmq_enabled();
    let prefill_tol = if mmq { MMQ_PREFILL_TOL } else { TOL };
    cpu.set_exact_activations(!mmq);
    let c = cpu.eval(&prompt, Logits::All).unwrap();
    let g = gpu.eval(&prompt, Logits::All).unwrap();
    let prefill = rel_l2(&g, &c);
    // Per prompt token: a systematic kernel error lifts every token alike, while a near-tie that
    // flips one token's expert choice (or a top-k) leaves most tokens close and a few far off.
    let mut per_token: Vec<f64> = g
        .chunks(n_vocab)
        .zip(c.chunks(n_vocab))
        .map(|(g, c)| rel_l2(g, c))
        .collect();
    let worst_token = per_token
        .iter()
        .enumerate()
        .fold((0, 0.0), |w, (i, &e)| if e > w.1 { (i, e) } else { w });
    per_token.sort_by(f64::total_cmp);
    let median = per_token[per_token.len() / 2];
    let above = per_token.iter().filter(|&&e| e > TOL).count();
    let decode_run = |cpu: &mut Engine, gpu: &mut Engine| {
        cpu.reset();
        gpu.reset();
        let mut errs = Vec::new();
        let mut tok = prompt[0];
        for i in 0..n_decode {
            let c = cpu.eval(&[tok], Logits::Last).unwrap();
            let g = gpu.eval(&[tok], Logits::Last).unwrap();
            errs.push(rel_l2(&g, &c));
            tok = prompt
                .get(i + 1)
                .copied()
                .filter(|_| i < 3)
                .unwrap_or(argmax(&c) as u32);
        }
        errs
    };
    cpu.set_exact_activations(false);
    let decode = decode_run(&mut cpu, &mut gpu);
    let worst = decode.iter().cloned().fold(0.0, f64::max);
    // The same decode with neither engine rounding activations to 8 bits: every decode kernel
    // (split-KV attention, rope, norms, KV writes, MoE routing) compared without the chaotic
    // 8-bit rounding.
    cpu.set_exact_activations(true);
    gpu.set_exact_activations(true);
    let exact = decode_run(&mut cpu, &mut gpu);
    let worst_exact = exact.iter().cloned().fold(0.0, f64::max);
    let _ = writeln!(
        std::io::stderr(),
        "LOGITS {label}: prefill rel L2 {prefill:.2e} (CPU {} activations, tolerance {prefill_tol:.0e}; \
         per token median {median:.2e}, worst {:.2e} at token {}, {above} of {} above {TOL:.0e}), \
         decode max rel L2 {worst:.2e} over {n_decode} steps (both 8-bit activations, tolerance \
         {decode_tol:.0e}), decode-exact max rel L2 {worst_exact:.2e} (both exact activations, \
         tolerance {TOL:.0e})",
        if mmq { "8-bit (MMQ)" } else { "exact" },
        worst_token.1,
        worst_token.0,
        per_token.len()
    );
    assert!(
        prefill <= prefill_tol,
        "{label}: prefill logits rel L2 {prefill:.3e} > {prefill_tol}"
    );
    for (step, &e) in decode.iter().enumerate() {
        assert!(
            e <= decode_tol,
            "{label}: decode step {step} logits rel L2 {e:.3e} > {decode_tol} (all steps: {decode:.3?})"
        );
    }
    for (step, &e) in exact.iter().enumerate() {
        assert!(
            e <= TOL,
            "{label}: exact-activation decode step {step} logits rel L2 {e:.3e} > {TOL} (all steps: {exact:.3?})"
        );
    }
    eprintln!("{}", gpu.device_report().unwrap_or_default());
}

/// Dense models: a prompt of 41 tokens in ubatches of 16 (two full + a tail of 9, all above the
/// int8-GEMV threshold, so on the GEMM path). MoE models: two ubatches whose (token, expert) pairs
/// exceed `MOE_GEMV_MAX_PAIRS`, so the experts run as f16 GEMMs too. Then 10 decode steps (4
/// prompt tokens, 6 greedy), replayed from a CUDA graph where no route is forced (dense models,
/// [`Routes::Own`]: a run with forced routes issues its steps one by one).
fn compare(name: &str, recipe: &str, routes: Routes) {
    let path = synth_model(name, recipe);
    let k = Model::open(&path).unwrap().spec.hparams.n_expert_used;
    let label = match routes {
        Routes::Own if k > 0 => format!("{name} {recipe} (own routes)"),
        _ => format!("{name} {recipe}"),
    };
    if let Some(per_expert) = MOE_GEMV_MAX_PAIRS.checked_div(k) {
        let ub = per_expert + 1;
        compare_steps(
            &label,
            &path,
            2 * ub + 16,
            ub,
            2 * ub,
            10,
            DECODE_TOL,
            routes,
        );
    } else {
        let tail = GEMV_INT8_MAX_ROWS.max(GEMV_MAX_ROWS) + 1;
        compare_steps(&label, &path, 128, 16, 32 + tail, 10, DECODE_TOL, routes);
    }
}

macro_rules! gpu_vs_cpu {
    ($($test:ident: $name:expr, $recipe:expr;)*) => {$(
        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn $test() {
            if skip() {
                return;
            }
            compare($name, $recipe, Routes::Forced);
        }
    )*};
}

gpu_vs_cpu! {
    gpu_matches_cpu_tiny_qwen2_f16: "tiny-qwen2", "f16";
    gpu_matches_cpu_tiny_qwen3_f16: "tiny-qwen3", "f16";
    gpu_matches_cpu_tiny_qwen3moe_f16: "tiny-qwen3moe", "f16";
    gpu_matches_cpu_tiny_mixtral_f16: "tiny-mixtral", "f16";
    gpu_matches_cpu_tiny_gemma3_f16: "tiny-gemma3", "f16";
    gpu_matches_cpu_tiny_llama_q4_k: "tiny-llama", "q4_k";
    gpu_matches_cpu_tiny_llama_q8_0: "tiny-llama", "q8_0";
    gpu_matches_cpu_tiny_llama_q4_0: "tiny-llama", "q4_0";
    gpu_matches_cpu_tiny_llama_f16: "tiny-llama", "f16";
    gpu_matches_cpu_tiny_qwen2_q4_k_m: "tiny-qwen2", "q4_k_m";
    gpu_matches_cpu_tiny_qwen3_q4_0: "tiny-qwen3", "q4_0";
    gpu_matches_cpu_tiny_qwen3moe_q4_k: "tiny-qwen3moe", "q4_k";
    gpu_matches_cpu_tiny_qwen3moe_q8_0: "tiny-qwen3moe", "q8_0";
    gpu_matches_cpu_tiny_mixtral_q4_k: "tiny-mixtral", "q4_k";
    gpu_matches_cpu_tiny_gemma3_q4_k_m: "tiny-gemma3", "q4_k_m";
    gpu_matches_cpu_tiny_gpt_oss_f16: "tiny-gpt-oss", "f16";
    gpu_matches_cpu_tiny_gpt_oss_mxfp4_moe: "tiny-gpt-oss", "mxfp4_moe";
    gpu_matches_cpu_tiny_glm4moe_f16: "tiny-glm4moe", "f16";
    gpu_matches_cpu_tiny_glm4moe_q8_0: "tiny-glm4moe", "q8_0";
    gpu_matches_cpu_tiny_deepseek2_f16: "tiny-deepseek2", "f16";
    gpu_matches_cpu_tiny_deepseek2_q8_0: "tiny-deepseek2", "q8_0";
}

/// Each engine's routers choose for themselves: the GPU's top-k routing end to end, on tiny-qwen3moe
/// q8_0, whose routers met no near-tie here (rel L2 at most 1.3e-3 on the H100, docs/PERF.md
/// 2026-12-05). Its decode replays a CUDA graph with MoE layers.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_cpu_tiny_qwen3moe_q8_0_own_routes() {
    if skip() {
        return;
    }
    compare("tiny-qwen3moe", "q8_0", Routes::Own);
}

/// A real model's dimensions with only 2 layers, `q4_k` (Q4_K matrices, Q6_K output): the shapes
/// the benchmarks run, small enough for the CPU reference. The file (1 to 4 GB) is deleted
/// afterwards.
fn compare_big(name: &str) {
    let mut p = preset(name).unwrap_or_else(|| panic!("no preset {name}"));
    // Two evaluated layers (with a dense leading layer: one of each kind).
    p.n_layer = 2;
    let path = test_dir().join(format!("{name}-2layers-q4_k.gguf"));
    write_preset(&p, "q4_k", &path);
    // Ubatches of 64: 64 tokens × 8 experts is above MOE_GEMV_MAX_PAIRS (grouped f16 expert
    // GEMMs). The dense model adds a tail of 9 (above the int8-GEMV threshold); the MoE model
    // takes two full ubatches, as a tail's experts would run on the int8 GEMV.
    let moe = p.n_expert_used > 0;
    let tail = GEMV_INT8_MAX_ROWS.max(GEMV_MAX_ROWS) + 1;
    let n_prompt = if moe { 128 } else { 64 + tail };
    compare_steps(
        &format!("{name} (2 layers) q4_k"),
        &path,
        160,
        64,
        n_prompt,
        4,
        DECODE_TOL,
        Routes::Forced,
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_cpu_llama3_8b_shapes_2_layers() {
    if skip() {
        return;
    }
    compare_big("llama3-8b");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_cpu_qwen3_30b_a3b_shapes_2_layers() {
    if skip() {
        return;
    }
    compare_big("qwen3-30b-a3b");
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn gpu_matches_cpu_gpt_oss_20b_shapes_2_layers() {
    compare_big("gpt-oss-20b");
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn gpu_matches_cpu_glm_4_5_air_shapes_2_layers() {
    compare_big("glm-4.5-air");
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn gpu_matches_cpu_deepseek_v2_lite_shapes_2_layers() {
    compare_big("deepseek-v2-lite");
}

/// Next-token map of the large-margin model: a bijection of the vocabulary (5 is odd, so
/// invertible modulo any power of two; checked below for the preset's vocabulary).
fn successor(t: usize, n_vocab: usize) -> usize {
    (5 * t + 3) % n_vocab
}

/// tiny-llama `q8_0` whose output matrix is the token embedding with its rows permuted:
/// `output[successor(t)] = token_embd[t]`. The residual stream of token t keeps a large
/// component along its own embedding, so the logit of `successor(t)` stands several standard
/// deviations above the others: top-1 margins are large compared with any plausible GPU/CPU
/// difference, while every op still contributes. Both tensors are Q8_0 of the same shape, so the
/// rows are copied as raw blocks.
fn large_margin_model() -> PathBuf {
    let path = test_dir().join("tiny-llama-q8_0-large-margin.gguf");
    if path.exists() {
        return path;
    }
    let p = preset("tiny-llama").unwrap();
    let pl = plan(&p, QuantRecipe::Q8_0);
    let header = pl.header().unwrap();
    let tmp = path.with_extension(format!("{:?}.tmp", std::thread::current().id()));
    let f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
    let mut f = write_plan(&pl, 11, f, &mut |_, _| {}).unwrap();
    f.flush().unwrap();
    drop(f);
    let info = |name: &str| {
        header
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .clone()
    };
    let (emb, out) = (info("token_embd.weight"), info("output.weight"));
    assert_eq!(emb.dims, out.dims);
    assert_eq!(emb.ty, out.ty);
    let n_vocab = emb.dims[1] as usize;
    let row = (emb.bytes / emb.dims[1]) as usize;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tmp)
        .unwrap();
    let mut table = vec![0u8; emb.bytes as usize];
    file.seek(SeekFrom::Start(header.data_offset + emb.offset))
        .unwrap();
    file.read_exact(&mut table).unwrap();
    let mut permuted = vec![0u8; table.len()];
    let mut hit = vec![false; n_vocab];
    for t in 0..n_vocab {
        let s = successor(t, n_vocab);
        assert!(!hit[s], "successor map is not a bijection");
        hit[s] = true;
        permuted[s * row..][..row].copy_from_slice(&table[t * row..][..row]);
    }
    file.seek(SeekFrom::Start(header.data_offset + out.offset))
        .unwrap();
    file.write_all(&permuted).unwrap();
    file.flush().unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Greedy generation on both engines, each feeding back its own tokens: the 32 tokens must be
/// identical at every step whose CPU top-1 margin exceeds a bound derived from the measured
/// logits error, and most steps must qualify.
///
/// Bound: E = the largest max-abs logit difference measured over the steps whose contexts are
/// still identical; a step qualifies when its CPU margin exceeds 4·E (twice the 2·E that
/// guarantees the same argmax). Generation stops being comparable at the first differing token,
/// which is allowed only on a step that does not qualify; at least 28 of the 32 steps must be
/// compared and qualify, and every compared step must also meet the relative L2 tolerance.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_greedy_tokens_match_cpu() {
    if skip() {
        return;
    }
    let path = large_margin_model();
    let cpu_model = Model::open(&path).unwrap();
    let n_vocab = cpu_model.spec.hparams.n_vocab;
    let (n_ctx, n_gen) = (48, 32);
    let mut cpu = Engine::new(cpu_model, n_ctx, 8);
    let mut gpu = gpu_engine(&path, n_ctx, 8);
    let first = prompt(1, n_vocab)[0];
    let (mut ct, mut gt) = (first, first);
    let mut steps: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    let (mut c_tokens, mut g_tokens) = (Vec::new(), Vec::new());
    for _ in 0..n_gen {
        let c = cpu.eval(&[ct], Logits::Last).unwrap();
        let g = gpu.eval(&[gt], Logits::Last).unwrap();
        ct = argmax(&c) as u32;
        gt = argmax(&g) as u32;
        c_tokens.push(ct);
        g_tokens.push(gt);
        steps.push((c, g));
    }
    let k = (0..n_gen)
        .find(|&i| c_tokens[i] != g_tokens[i])
        .unwrap_or(n_gen - 1);
    let comparable = &steps[..=k];
    let e = comparable
        .iter()
        .map(|(c, g)| max_abs_diff(g, c))
        .fold(0.0, f64::max);
    let bound = 4.0 * e;
    let rows: Vec<(f64, f64, bool)> = comparable
        .iter()
        .map(|(c, g)| {
            let m = top1_margin(c);
            (m, rel_l2(g, c), m > bound)
        })
        .collect();
    let qualifying = rows.iter().filter(|r| r.2).count();
    let min_margin = rows.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let worst_rel = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    let _ = writeln!(
        std::io::stderr(),
        "LOGITS greedy tiny-llama q8_0 (permuted-embedding output): {} of {n_gen} tokens identical, \
         {qualifying} steps above the margin bound {bound:.2e} (4 × the largest abs difference \
         {e:.2e}), smallest margin {min_margin:.3}, worst rel L2 {worst_rel:.2e}",
        (0..n_gen).take_while(|&i| c_tokens[i] == g_tokens[i]).count()
    );
    for (i, &(m, rel, q)) in rows.iter().enumerate() {
        assert!(rel <= TOL, "step {i}: logits rel L2 {rel:.3e} > {TOL}");
        if q {
            assert_eq!(
                c_tokens[i], g_tokens[i],
                "step {i}: tokens differ although the CPU margin {m} exceeds the bound {bound}"
            );
        }
    }
    assert!(
        qualifying >= 28,
        "only {qualifying} of {n_gen} greedy steps were comparable with a margin above {bound:.2e} \
         (tokens cpu {c_tokens:?} gpu {g_tokens:?})"
    );
}

/// Per-op timing: every GPU launch of every run is timed, the logits do not change, and nothing
/// is recorded while it is off.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_op_timing_covers_every_launch() {
    if skip() {
        return;
    }
    let path = synth_model("tiny-qwen3moe", "q4_k");
    let n_vocab = Model::open(&path).unwrap().spec.hparams.n_vocab;
    let mut gpu = gpu_engine(&path, 64, 16);
    let prompt = prompt(20, n_vocab);
    let run = |gpu: &mut Engine| -> Vec<f32> {
        gpu.reset();
        let mut all = gpu.eval(&prompt, Logits::Last).unwrap();
        let mut tok = argmax(&all) as u32;
        for _ in 0..4 {
            let l = gpu.eval(&[tok], Logits::Last).unwrap();
            tok = argmax(&l) as u32;
            all.extend_from_slice(&l);
        }
        all
    };
    let plain = run(&mut gpu);
    assert!(
        gpu.device_op_times().is_empty(),
        "times recorded while timing was off"
    );
    gpu.set_op_timing(true);
    let timed = run(&mut gpu);
    gpu.set_op_timing(false);
    let d = rel_l2(&timed, &plain);
    assert!(d < 1e-5, "op timing changed the logits: rel L2 {d:.2e}");
    let times = gpu.device_op_times();
    let calls: u64 = times.iter().map(|(_, t)| t.calls).sum();
    assert!(calls > 0);
    assert!(times
        .iter()
        .any(|(k, _)| k.op == "matmul" && k.quant.is_some() && k.shape.is_some()));
    assert!(times
        .iter()
        .any(|(k, _)| k.op == "moe_ffn" && k.n_tokens == 16));
    assert!(times
        .iter()
        .any(|(k, _)| k.op == "attention" && k.n_tokens == 1));
    assert!(times.windows(2).all(|w| w[0].1.seconds >= w[1].1.seconds));
    gpu.clear_op_times();
    assert!(gpu.device_op_times().is_empty());
    let again = run(&mut gpu);
    assert!(rel_l2(&again, &plain) < 1e-5);
}

/// Placement invariance on CUDA: every strategy's partial placements (pinned, streamed, split and
/// CPU weights; resident, streamed and host KV), with tiers 1, 16 and 512 switching between
/// them, give the all-CPU engine's logits (both in exact-activation mode; the GPU's f16 GEMMs
/// against the CPU's f32 set the tolerance, as in the all-GPU comparisons), with the same forced
/// experts on both: their tables reach the routing of both lanes.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_mixed_placements_match_cpu() {
    if skip() {
        return;
    }
    use crate::tiers::RunTier;
    use pshard_planner::placement::{place, steps, Strategy};
    for name in [
        "tiny-llama",
        "tiny-qwen3moe",
        "tiny-gemma3",
        "tiny-gpt-oss",
        "tiny-glm4moe",
        "tiny-deepseek2",
    ] {
        let path = synth_model(name, "q8_0");
        let model = Arc::new(Model::open(&path).unwrap());
        let spec = model.spec.clone();
        let nv = spec.hparams.n_vocab;
        let toks = prompt(43, nv);
        let run = |e: &mut Engine| {
            e.set_exact_activations(true);
            let mut out = e.eval(&toks[..23], Logits::All).unwrap();
            for &t in &toks[23..26] {
                out.extend(e.eval(&[t], Logits::Last).unwrap());
            }
            out.extend(e.eval(&toks[26..42], Logits::All).unwrap());
            out
        };
        let mut cpu = Engine::new(Model::open(&path).unwrap(), 64, 512);
        scatter_routes(&mut cpu);
        let want = run(&mut cpu);
        for s in std::iter::once(Strategy::AllGpu).chain(Strategy::SEARCHED) {
            let st = steps(&spec, s);
            let pl = |share: f64| {
                let k = (st.len() as f64 * share).round() as usize;
                place(&spec, s, &st, k, pshard_planner::Frac(5000))
            };
            let mut params = PlanParams::new(64);
            params.tier_max = Some(512);
            let tiers = TierSet {
                tiers: [(1, 0.15), (16, 0.5), (512, 0.85)]
                    .into_iter()
                    .map(|(n, share)| RunTier {
                        n,
                        prefill: n == 512,
                        placement: pl(share),
                        strategy: s.name().into(),
                        ubatch: n,
                        predicted_tps: None,
                        switch_s: 0.0,
                    })
                    .collect(),
                params,
                source: "test".into(),
            };
            let dev = CudaDevice::open(model.clone(), &GpuOptions::default()).unwrap();
            let mut gpu =
                Engine::with_tiers(model.clone(), tiers, 1, Some(Box::new(dev)), true).unwrap();
            scatter_routes(&mut gpu);
            let got = run(&mut gpu);
            let err = rel_l2(&got, &want);
            let _ = writeln!(
                std::io::stderr(),
                "LOGITS mixed {name} {}: rel L2 {err:.2e} vs all-CPU (exact activations, tolerance {TOL:.0e})",
                s.name()
            );
            assert!(err <= TOL, "{name} {}: rel L2 {err:.3e}", s.name());
        }
    }
}

/// The context-shift case of the GPU tests: `gpu` evaluates a 40-token prompt, shifts keeping 3
/// and dropping 18, then takes one more token; `fresh` evaluates the kept tokens and that one.
/// Returns the rel L2 of the shifted logits against the fresh ones, and of the unshifted ones.
fn shift_vs_fresh(fresh: &mut Engine, gpu: &mut Engine) -> (f64, f64) {
    let nv = fresh.model.spec.hparams.n_vocab;
    let toks = prompt(40, nv);
    let next = 77 % nv as u32;
    let (keep, discard) = (3, 18);
    let mut kept: Vec<u32> = toks[..keep].to_vec();
    kept.extend(&toks[keep + discard..]);
    kept.push(next);
    let want = fresh.eval(&kept, Logits::Last).unwrap();
    let before = gpu.eval(&toks, Logits::Last).unwrap();
    gpu.shift_seq(0, keep, discard).unwrap();
    let got = gpu.eval(&[next], Logits::Last).unwrap();
    (rel_l2(&got, &want), rel_l2(&before, &want))
}

/// Context shift on the GPU (the `kv_shift` kernel over resident KV): one-layer models (whose K
/// and V depend only on token and position) evaluate 40 tokens, keep 3, drop 18 and take one
/// more; the logits match a fresh CPU engine fed the 22 kept tokens and the next one (tolerance
/// [`TOL`]: the GPU-vs-CPU difference plus f16 re-rounding of the rotated K, 1e-4 on the host
/// device), while the unshifted logits are far from them. Covers adjacent pairs with llama3
/// frequency factors, NEOX pairs, gemma3's sliding-window ring (ubatch 4: 12 cells, moved in
/// cycles), gpt-oss's YaRN, glm4moe's partial rope and deepseek2's latent K rows. MoE layers take
/// the same forced experts on both sides (keyed by position, which the last token shares).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_context_shift_matches_fresh_evaluation() {
    if skip() {
        return;
    }
    for (name, ubatch) in [
        ("tiny-llama", 16),
        ("tiny-qwen3", 16),
        ("tiny-gemma3", 4),
        ("tiny-gpt-oss", 16),
        ("tiny-glm4moe", 16),
        ("tiny-deepseek2", 16),
    ] {
        let mut p = preset(name).unwrap();
        p.n_layer = 1;
        p.n_nextn = 0;
        let path = test_dir().join(format!("{name}-1layer-shift.gguf"));
        write_preset(&p, "q8_0", &path);
        let mut cpu = Engine::new(Model::open(&path).unwrap(), 48, ubatch);
        let mut gpu = gpu_engine(&path, 48, ubatch);
        for e in [&mut cpu, &mut gpu] {
            e.set_exact_activations(true);
            scatter_routes(e);
        }
        let (err, unshifted) = shift_vs_fresh(&mut cpu, &mut gpu);
        let _ = writeln!(
            std::io::stderr(),
            "LOGITS context shift {name} ubatch {ubatch}: rel L2 {err:.2e} vs fresh CPU evaluation \
             (tolerance {TOL:.0e}; unshifted {unshifted:.2e})"
        );
        assert!(err <= TOL, "{name} ubatch {ubatch}: rel L2 {err:.3e}");
        assert!(unshifted > 10.0 * TOL, "{name}: the oracle cannot tell");
        std::fs::remove_file(&path).ok();
    }
}

/// A tiny preset whose KV rows are whole Q8_0 blocks (deepseek2's 16-value rope key made 32),
/// `n_layer` layers (0: the preset's).
fn q8_kv_model(name: &str, n_layer: usize) -> PathBuf {
    let mut p = preset(name).unwrap();
    if let Some(m) = &mut p.mla {
        m.rope = 32;
    }
    if n_layer > 0 {
        p.n_layer = n_layer;
        p.n_nextn = 0;
    }
    let path = test_dir().join(format!("{name}-{n_layer}layer-kvq8.gguf"));
    let tmp = path.with_extension(format!("{:?}.tmp", std::thread::current().id()));
    write_preset(&p, "q8_0", &tmp);
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// All-CPU and all-GPU engines with a Q8_0 KV cache, exact activations, the same forced experts
/// ([`scatter_routes`]).
fn q8_kv_engines(path: &Path, n_ctx: usize, ubatch: usize) -> (Engine, Engine) {
    let model = Arc::new(Model::open(path).unwrap());
    let mut params = PlanParams::new(n_ctx);
    params.kv_type = pshard_model::ggml_type::GgmlType::Q8_0;
    let cpu_tiers = TierSet::all_cpu(&model.spec, params.clone(), ubatch);
    let mut cpu = Engine::with_tiers(model.clone(), cpu_tiers, 1, None, false).unwrap();
    let pl = Placement::uniform(&model.spec, Place::Pinned);
    let tiers = TierSet::single(pl, "ALL_GPU", params, ubatch);
    let dev = CudaDevice::open(model.clone(), &GpuOptions::default()).unwrap();
    let mut gpu = Engine::with_tiers(model, tiers, 1, Some(Box::new(dev)), true).unwrap();
    for e in [&mut cpu, &mut gpu] {
        assert_eq!(e.kv_type(), pshard_kernels::ops::KvType::Q8_0);
        e.set_exact_activations(true);
        scatter_routes(e);
    }
    (cpu, gpu)
}

/// The GPU engine with a Q8_0 KV cache (`kv_write_q8_0`, the `_q8` flash, split-KV and latent
/// kernels) against the CPU engine with one: a 41-token prompt in ubatches of 16 (flash for head
/// dims 64/128/256, split-KV otherwise, latent for deepseek2), then 8 decode steps, exact
/// activations and the same forced experts on both sides, every position within [`DECODE_TOL`]:
/// each engine rounds its own K and V to 8 bits, and an input that differs by the engines' ~1e-3
/// flips a value a whole level where it lies near a rounding boundary — the 8-bit activations'
/// mechanism. Measured on an H100 (2026-12-05): 1.6e-3 to 8.5e-3, tiny-gpt-oss's worst decode
/// step 1.10e-2, against about 1e-3 with an f16 cache (tiny-gpt-oss prefill 7.6e-4).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_q8_0_kv_matches_cpu_q8_0_kv() {
    if skip() {
        return;
    }
    let mut failed = Vec::new();
    for name in [
        "tiny-llama",
        "tiny-gemma3",
        "tiny-qwen3",
        "tiny-gpt-oss",
        "tiny-deepseek2",
    ] {
        let path = q8_kv_model(name, 0);
        let (mut cpu, mut gpu) = q8_kv_engines(&path, 64, 16);
        let nv = cpu.model.spec.hparams.n_vocab;
        let toks = prompt(49, nv);
        let c = cpu.eval(&toks[..41], Logits::All).unwrap();
        let g = gpu.eval(&toks[..41], Logits::All).unwrap();
        let mut errs = vec![rel_l2(&g, &c)];
        for &t in &toks[41..] {
            let c = cpu.eval(&[t], Logits::Last).unwrap();
            let g = gpu.eval(&[t], Logits::Last).unwrap();
            errs.push(rel_l2(&g, &c));
        }
        let worst = errs.iter().cloned().fold(0.0, f64::max);
        let _ = writeln!(
            std::io::stderr(),
            "LOGITS q8_0 KV {name}: prefill rel L2 {:.2e}, worst decode step {worst:.2e} \
             (tolerance {DECODE_TOL:.0e})",
            errs[0]
        );
        if worst > DECODE_TOL {
            failed.push(format!("{name}: q8_0 KV GPU vs CPU rel L2 {errs:.3?}"));
        }
        std::fs::remove_file(&path).ok();
    }
    // Every model measured before any fails the test.
    assert!(failed.is_empty(), "{}", failed.join("; "));
}

/// Context shift of a Q8_0 KV cache on the GPU (`kv_shift_q8_0`): one-layer models after
/// 40 tokens, keeping 3 and dropping 18, then one more, against a fresh CPU engine with a Q8_0
/// cache fed the kept tokens (the host-device bound of runtime/tests/ctx_shift.rs, 2e-2).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_q8_0_kv_context_shift_matches_fresh_evaluation() {
    if skip() {
        return;
    }
    for (name, ubatch) in [
        ("tiny-llama", 16),
        ("tiny-gemma3", 4),
        ("tiny-gpt-oss", 16),
        ("tiny-deepseek2", 16),
    ] {
        let path = q8_kv_model(name, 1);
        let (mut fresh, mut gpu) = q8_kv_engines(&path, 48, ubatch);
        let (err, unshifted) = shift_vs_fresh(&mut fresh, &mut gpu);
        let _ = writeln!(
            std::io::stderr(),
            "LOGITS q8_0 KV context shift {name}: rel L2 {err:.2e} (unshifted {unshifted:.2e})"
        );
        assert!(err <= 2e-2, "{name} ubatch {ubatch}: rel L2 {err:.3e}");
        assert!(unshifted > 0.2, "{name}: the oracle cannot tell");
        std::fs::remove_file(&path).ok();
    }
}

/// Opening the CUDA device without a GPU is an error, not a panic (runs where there is none).
#[test]
fn cuda_device_without_gpu_is_an_error_not_a_panic() {
    if pshard_kernels::cuda::probe(0).is_ok() {
        pshard_testkit::note(
            "cuda_device_without_gpu_is_an_error_not_a_panic: a GPU is present, nothing to check",
        );
        return;
    }
    let path = synth_model("tiny-llama", "q4_k");
    let m = Arc::new(Model::open(&path).unwrap());
    match CudaDevice::open(m, &GpuOptions::default()) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(_) => panic!("a CUDA device opened although probe failed"),
    }
}

/// The large-margin model is built as described (runs without a GPU): the output rows are the
/// embedding rows moved to their successors, byte for byte.
#[test]
fn large_margin_model_has_permuted_output() {
    let path = large_margin_model();
    let m = Model::open(&path).unwrap();
    let find = |name: &str| {
        m.spec
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    let (e, o) = (find("token_embd.weight"), find("output.weight"));
    let (eb, ob) = (
        m.file().tensor_data(e.file_index),
        m.file().tensor_data(o.file_index),
    );
    let n_vocab = m.spec.hparams.n_vocab;
    let row = eb.len() / n_vocab;
    for t in [0usize, 1, 77, n_vocab - 1] {
        let s = successor(t, n_vocab);
        assert_eq!(&ob[s * row..][..row], &eb[t * row..][..row], "row {t}");
    }
    assert_ne!(&ob[..row], &eb[..row], "output equals the embedding");
}
