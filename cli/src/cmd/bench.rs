//! `pshard bench`: llama-bench-style throughput tests. `-p 512,4096` prompt-processing tests,
//! `-n 128` generation tests, `-r` repetitions after one untimed warm-up, synthetic tokens;
//! markdown or JSON (llama-bench's keys) output. The instrument for every performance claim.
//!
//! It runs the same engine as `run` (the model's plans per tier on a GPU, or the CPU): each row
//! says which tier and strategy ran the test's tokens and the planner's predicted t/s beside the
//! measured one.
//!
//! `--op-times` adds, after the tests, one untimed pass per test with per-op timing and prints
//! where the time goes to stderr: on the GPU per (op, weight type, shape, batch) from events
//! around every launch (no CUDA graphs in that pass), with weight GB/s and GFLOP/s of the
//! matmuls; on the CPU per op kind.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use pshard_model::ggml_type::GgmlType;
use pshard_model::spec::ModelSpec;
use pshard_planner::cost::{predict_bench, BenchPrediction, BenchTest, PlanParams};
use pshard_planner::{CostTable, Place, Placement, Profile};
use pshard_runtime::device::{OpKey, OpTime};
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;
use serde_json::json;

use super::common::{init_threads, load_model, make_engine, make_engine_parallel, EngineArgs};

/// Arguments of `pshard bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Engine placement, threading, plans (the same engine as `run`).
    #[command(flatten)]
    engine: EngineArgs,
    /// Model file (GGUF).
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Prompt-processing tests: tokens per test, comma-separated (0 or empty: none).
    #[arg(short = 'p', long = "n-prompt", default_value = "512")]
    n_prompt: String,
    /// Generation tests: tokens per test, comma-separated (0 or empty: none).
    #[arg(short = 'n', long = "n-gen", default_value = "128")]
    n_gen: String,
    /// Timed repetitions per test (after one untimed warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5, value_parser = crate::args::repetitions)]
    reps: usize,
    /// Context size (default: the longest test).
    #[arg(short = 'c', long = "ctx-size", value_parser = crate::args::ctx_size)]
    ctx: Option<usize>,
    /// Output format: md or json.
    #[arg(short = 'o', long = "output", default_value = "md")]
    output: String,
    /// Seed of the synthetic tokens.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// After the tests, run one more (untimed) pass of each with per-op timing and print where
    /// the time goes to stderr (GPU: per op, weight type, shape and batch, from events around
    /// every launch, without CUDA graphs; CPU: per op kind). With `--gpu-profile`, each GPU
    /// matmul is put beside the profile's point for the same path, type, shape and batch.
    #[arg(long = "op-times")]
    op_times: bool,
    /// Aggregate decode of N sequences at once (as llama-batched-bench): comma-separated
    /// sequence counts. Each test fills N sequences with a prompt of the first -p size, then
    /// times the first -n size of decode steps, each one token of every sequence; the engine
    /// holds the largest N (GPU plans are made for it).
    #[arg(long = "parallel")]
    parallel: Option<String>,
    /// Route every MoE token to pseudo-random distinct experts (drawn from its layer and
    /// position) instead of by its router: the uniform routing the planner prices. A synthetic
    /// model's random routers send most of a batch to a few experts (qwen3-30b-a3b synth, pp64:
    /// 48 of 128 experts active per layer on average, where uniform routing touches 127), which
    /// makes its prefill faster than a trained model's.
    #[arg(long = "uniform-routes")]
    uniform_routes: bool,
}

impl Args {
    /// The checks that need no file.
    pub fn check(&self) -> anyhow::Result<()> {
        parse_list(&self.n_prompt, "-p")?;
        parse_list(&self.n_gen, "-n")?;
        if let Some(list) = &self.parallel {
            parse_list(list, "--parallel")?;
        }
        if self.output != "md" && self.output != "json" {
            bail!("-o must be md or json (got '{}')", self.output);
        }
        self.engine.llama.check()
    }
}

fn parse_list(s: &str, what: &str) -> anyhow::Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n = crate::args::ctx_size(part).map_err(|e| anyhow::anyhow!("{what} {part}: {e}"))?;
        if n > 0 {
            v.push(n);
        }
    }
    Ok(v)
}

/// With `on`, forces the engine's MoE layers to uniform pseudo-random routes
/// ([`pshard_runtime::batch::scattered_routes`]; `--uniform-routes`).
fn uniform_routes(e: &mut Engine, on: bool) {
    if on {
        let routes = pshard_runtime::batch::scattered_routes(&e.model().spec);
        e.set_route_override(Some(routes));
        eprintln!("bench: MoE tokens go to uniform pseudo-random experts (--uniform-routes)");
    }
}

/// One pass of a test: the prompt from an empty context, or the generation steps.
fn pass(e: &mut Engine, test: &TestResult, tokens: &[u32]) -> anyhow::Result<()> {
    e.reset();
    if test.n_gen == 0 {
        e.eval(tokens, Logits::Last)?;
    } else {
        for &t in tokens {
            e.eval(&[t], Logits::Last)?;
        }
    }
    Ok(())
}

/// Runs one pass of `test` with per-op timing and prints the breakdown to stderr.
fn op_times_pass(
    e: &mut Engine,
    test: &TestResult,
    tokens: &[u32],
    profile: Option<&Profile>,
    predicted: Option<&[(&'static str, f64)]>,
) -> anyhow::Result<()> {
    let before = e.op_seconds();
    e.clear_op_times();
    e.set_op_timing(true);
    let t0 = Instant::now();
    let r = pass(e, test, tokens);
    let wall = t0.elapsed().as_secs_f64();
    e.set_op_timing(false);
    r?;
    let rows: Vec<(&'static str, f64)> = e
        .op_seconds()
        .iter()
        .map(|&(k, v)| {
            let b = before.iter().find(|x| x.0 == k).map_or(0.0, |x| x.1);
            (k, v - b)
        })
        .collect();
    if rows.iter().any(|r| r.1 > 0.0) {
        eprint!("{}", cpu_op_table(&test.name(), wall, rows, predicted));
    }
    let times = e.device_op_times();
    if !times.is_empty() {
        eprint!("{}", gpu_op_table(&test.name(), wall, &times));
        if let Some(p) = profile {
            eprint!("{}", profile_comparison(&test.name(), &times, p));
        }
    }
    Ok(())
}

/// The GPU breakdown of one pass: one row per op key, largest total first, then the sum against
/// the pass's wall time.
fn gpu_op_table(test: &str, wall: f64, rows: &[(OpKey, OpTime)]) -> String {
    let mut s = format!(
        "\nop times of one {test} pass (CUDA events around every op, no CUDA graphs; wall {:.2} ms)\n",
        wall * 1e3
    );
    s += "| op | quant | shape | tokens | rows | calls | mean µs | total ms | share | weight GB/s | GFLOP/s |\n";
    s += "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let mut sum = 0.0;
    for (k, t) in rows {
        sum += t.seconds;
        let mean = t.seconds / t.calls.max(1) as f64;
        let quant = k.quant.map_or("-".to_string(), |q| q.name().to_string());
        let shape = k.shape.map_or("-".to_string(), |[r, c]| format!("{r}×{c}"));
        let (mut gbs, mut gflops) = ("-".to_string(), "-".to_string());
        if let (true, Some(q), Some([r, c])) = (k.op == "matmul", k.quant, k.shape) {
            if mean > 0.0 {
                if let Some(bytes) = q.tensor_bytes((r * c) as u64) {
                    gbs = format!("{:.0}", bytes as f64 / mean / 1e9);
                }
                if k.rows > 1 {
                    gflops = format!("{:.0}", 2.0 * (r * c * k.rows) as f64 / mean / 1e9);
                }
            }
        }
        s += &format!(
            "| {} | {quant} | {shape} | {} | {} | {} | {:.1} | {:.3} | {:.1}% | {gbs} | {gflops} |\n",
            k.op,
            k.n_tokens,
            k.rows,
            t.calls,
            mean * 1e6,
            t.seconds * 1e3,
            100.0 * t.seconds / wall.max(1e-12),
        );
    }
    s += &format!(
        "ops total {:.2} ms = {:.1}% of the pass's wall time {:.2} ms (the rest: host work, input and logit copies, launch gaps)\n",
        sum * 1e3,
        100.0 * sum / wall.max(1e-12),
        wall * 1e3
    );
    s
}

/// The profile's median seconds for a matmul as the CUDA backend runs it (GEMV path up to
/// `GEMV_MAX_ROWS` rows, GEMM above), if that exact point was measured.
fn profile_matmul_s(p: &Profile, k: &OpKey) -> Option<f64> {
    let ([r, c], q) = (k.shape?, k.quant?);
    let op = if k.rows <= pshard_kernels::cuda::GEMV_MAX_ROWS {
        "matmul_gemv"
    } else {
        "matmul_gemm"
    };
    p.points
        .iter()
        .find(|pt| {
            pt.op == op
                && pt.quant_type() == Some(q)
                && pt.shape == [r as u64, c as u64]
                && pt.batch as usize == k.rows
        })
        .map(|pt| pt.stats.median_s)
}

/// Matmuls of one pass beside the profile's points for the same kernels and shapes.
fn profile_comparison(test: &str, rows: &[(OpKey, OpTime)], p: &Profile) -> String {
    let mut s = format!(
        "
{test}: matmuls against the GPU profile ({}, {}), same path, type, shape and batch
",
        p.machine
            .gpu
            .as_ref()
            .map_or("no GPU identity", |g| g.name.as_str()),
        p.created
    );
    s += "| quant | shape | rows | calls | bench µs | profile µs | difference |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n";
    let (mut matched, mut t_bench, mut t_prof, mut worst) = (0, 0.0, 0.0, 0f64);
    for (k, t) in rows.iter().filter(|(k, _)| k.op == "matmul") {
        let Some(prof) = profile_matmul_s(p, k) else {
            continue;
        };
        let mean = t.seconds / t.calls.max(1) as f64;
        let diff = (mean - prof) / prof;
        worst = worst.max(diff.abs());
        matched += 1;
        t_bench += t.seconds;
        t_prof += prof * t.calls as f64;
        let [r, c] = k.shape.unwrap_or([0, 0]);
        s += &format!(
            "| {} | {r}×{c} | {} | {} | {:.1} | {:.1} | {:+.1}% |\n",
            k.quant.map_or("-", |q| q.name()),
            k.rows,
            t.calls,
            mean * 1e6,
            prof * 1e6,
            diff * 100.0
        );
    }
    if matched == 0 {
        s += "no matmul of this pass has a measured profile point\n";
    } else {
        s += &format!(
            "{matched} matmul kinds matched: bench {:.3} ms vs profile {:.3} ms in all ({:+.1}%), worst single kind {:.1}%\n",
            t_bench * 1e3,
            t_prof * 1e3,
            (t_bench - t_prof) / t_prof * 100.0,
            worst * 100.0
        );
    }
    s
}

/// The CPU breakdown of one pass: seconds per op kind, beside the planner's prediction per kind
/// when one is given (kinds only one side has are listed too).
fn cpu_op_table(
    test: &str,
    wall: f64,
    mut rows: Vec<(&'static str, f64)>,
    predicted: Option<&[(&'static str, f64)]>,
) -> String {
    rows.retain(|r| r.1 > 0.0);
    if let Some(pred) = predicted {
        for (k, _) in pred {
            if !rows.iter().any(|r| r.0 == *k) {
                rows.push((k, 0.0));
            }
        }
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let pred_of = |k: &str| predicted.map(|p| p.iter().find(|e| e.0 == k).map_or(0.0, |e| e.1));
    let mut s = format!(
        "\nop times of one {test} pass (CPU, per op kind; wall {:.2} ms)\n",
        wall * 1e3
    );
    s += if predicted.is_some() {
        "| op | total ms | share | predicted ms | difference |\n| --- | ---: | ---: | ---: | ---: |\n"
    } else {
        "| op | total ms | share |\n| --- | ---: | ---: |\n"
    };
    let mut sum = 0.0;
    for (k, v) in &rows {
        sum += v;
        s += &format!(
            "| {k} | {:.3} | {:.1}% |",
            v * 1e3,
            100.0 * v / wall.max(1e-12)
        );
        if let Some(p) = pred_of(k) {
            s += &format!(" {:.3} | {} |", p * 1e3, difference(p, *v));
        }
        s += "\n";
    }
    s += &format!(
        "ops total {:.2} ms = {:.1}% of the pass's wall time {:.2} ms",
        sum * 1e3,
        100.0 * sum / wall.max(1e-12),
        wall * 1e3
    );
    if let Some(pred) = predicted {
        let p: f64 = pred.iter().map(|e| e.1).sum();
        s += &format!(
            "; predicted {:.2} ms ({} of the wall time)",
            p * 1e3,
            difference(p, wall)
        );
    }
    s += "\n";
    s
}

/// `predicted` against `measured` as a signed percentage of the measured value.
fn difference(predicted: f64, measured: f64) -> String {
    if measured > 0.0 {
        format!("{:+.1}%", 100.0 * (predicted - measured) / measured)
    } else {
        "-".to_string()
    }
}

/// The planner's all-CPU prediction of every test (the placement the CPU engine runs), from the
/// CPU profile (see [`super::common::cpu_profile`]) at the engine's thread count.
fn cpu_predictions(
    a: &Args,
    e: &Engine,
    results: &[TestResult],
    n_ctx: usize,
) -> anyhow::Result<Vec<BenchPrediction>> {
    let (profile, warning) = super::common::cpu_profile(&a.engine)?;
    if let Some(w) = warning {
        eprintln!("bench: predicted t/s: {w}");
    }
    let threads = pshard_kernels::pool::threads();
    let table = CostTable::new(Some(&profile), None, threads);
    let spec = &e.model().spec;
    let mut params = PlanParams::new(n_ctx);
    params.threads = threads;
    params.kv_type = e.kv_type().ggml();
    let pl = Placement::uniform(spec, Place::Cpu);
    let graph = |s: &ModelSpec, n: usize, l: usize| {
        pshard_model::arch::build_graph(s, n, l).map_err(|e| e.to_string())
    };
    results
        .iter()
        .map(|r| {
            let test = if r.n_gen == 0 {
                BenchTest::Prompt {
                    n: r.n_prompt,
                    ubatch: a.engine.ubatch.min(n_ctx),
                }
            } else {
                BenchTest::Gen { n: r.n_gen }
            };
            predict_bench(spec, &table, &params, &pl, test, &graph)
                .map_err(|m| anyhow::anyhow!("predicting {}: {m}", r.name()))
        })
        .collect()
}

struct TestResult {
    n_prompt: usize,
    n_gen: usize,
    samples_ns: Vec<u64>,
    /// The tier that ran most of the test's tokens, its strategy and the planner's prediction.
    tier: Option<(usize, String, Option<f64>)>,
}

impl TestResult {
    fn name(&self) -> String {
        if self.n_gen == 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        }
    }
    fn tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }
    fn ts(&self) -> Vec<f64> {
        self.samples_ns
            .iter()
            .map(|&ns| self.tokens() as f64 * 1e9 / ns as f64)
            .collect()
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

/// The type holding the most bytes (the model's main quant), for the model_type column.
fn main_type(model: &Model) -> GgmlType {
    let mut by: Vec<(GgmlType, u64)> = Vec::new();
    for t in &model.spec.tensors {
        let b = model.file().tensor_data(t.file_index).len() as u64;
        match by.iter_mut().find(|e| e.0 == t.ty) {
            Some(e) => e.1 += b,
            None => by.push((t.ty, b)),
        }
    }
    by.into_iter()
        .max_by_key(|e| e.1)
        .map(|e| e.0)
        .unwrap_or(GgmlType::F32)
}

/// The tier that ran the most tokens since the history was cleared.
fn main_tier(e: &Engine) -> Option<(usize, String, Option<f64>)> {
    let mut per: std::collections::BTreeMap<usize, usize> = Default::default();
    for r in e.history() {
        *per.entry(r.tier).or_default() += r.n_tokens;
    }
    let (&t, _) = per.iter().max_by_key(|(_, n)| **n)?;
    let tier = &e.tiers().tiers[t];
    Some((tier.n, tier.strategy.clone(), tier.predicted_tps))
}

/// Runs `pshard bench`.
pub fn run(a: Args) -> anyhow::Result<()> {
    init_threads(a.engine.threads);
    let pp = parse_list(&a.n_prompt, "-p")?;
    let tg = parse_list(&a.n_gen, "-n")?;
    if pp.is_empty() && tg.is_empty() {
        bail!("nothing to measure: give -p and/or -n token counts");
    }
    if let Some(list) = &a.parallel {
        let npl = parse_list(list, "--parallel")?;
        return run_parallel(
            &a,
            &npl,
            pp.first().copied().unwrap_or(0),
            tg.first().copied(),
        );
    }
    let model = load_model(&a.model)?;
    let n_vocab = model.spec.hparams.n_vocab;
    let n_params: u64 = model
        .spec
        .tensors
        .iter()
        .map(|t| t.dims.iter().product::<u64>())
        .sum();
    let model_size = model.file().tensor_data_bytes();
    let params_short = if n_params >= 1_000_000_000 {
        format!("{:.1}B", n_params as f64 / 1e9)
    } else {
        format!("{:.0}M", n_params as f64 / 1e6)
    };
    let model_type = format!(
        "{} {params_short} {}",
        model.spec.arch.gguf_name(),
        main_type(&model).name()
    );
    let longest = pp.iter().chain(&tg).copied().max().unwrap_or(1);
    let n_ctx = a.ctx.unwrap_or(longest).max(longest);
    let t0 = Instant::now();
    let mut engine = make_engine(model, &a.model, n_ctx, "the longest -p/-n test", &a.engine)?;
    uniform_routes(&mut engine, a.uniform_routes);
    eprintln!(
        "bench: engine ready in {:.2} s ({})",
        t0.elapsed().as_secs_f64(),
        super::common::kv_line(&engine)
    );
    eprintln!("bench: CPU {}", pshard_kernels::gemm::describe());
    let (backend, gpu_info) = match engine.device_report() {
        Some(r) => ("CUDA", r.lines().next().unwrap_or("").to_string()),
        None => ("CPU", String::new()),
    };
    let mut next_token = token_source(a.seed, n_vocab);
    let mut results = Vec::new();
    let mut test_tokens: Vec<Vec<u32>> = Vec::new();
    let tests: Vec<(usize, usize)> = pp
        .iter()
        .map(|&n| (n, 0))
        .chain(tg.iter().map(|&n| (0, n)))
        .collect();
    for (n_prompt, n_gen) in tests {
        let tokens: Vec<u32> = (0..n_prompt.max(n_gen)).map(|_| next_token()).collect();
        let mut r = TestResult {
            n_prompt,
            n_gen,
            samples_ns: Vec::new(),
            tier: None,
        };
        for rep in 0..=a.reps {
            engine.clear_history();
            let t0 = Instant::now();
            pass(&mut engine, &r, &tokens)?;
            if rep > 0 {
                r.samples_ns.push(t0.elapsed().as_nanos() as u64);
            }
        }
        r.tier = main_tier(&engine);
        results.push(r);
        test_tokens.push(tokens);
    }
    // On the CPU the engine runs one all-CPU placement unplanned: its prediction per test comes
    // from the CPU profile here.
    let cpu_pred = if backend == "CPU" {
        Some(cpu_predictions(&a, &engine, &results, n_ctx)?)
    } else {
        None
    };
    if let Some(preds) = &cpu_pred {
        for (r, p) in results.iter_mut().zip(preds) {
            if let Some(t) = &mut r.tier {
                t.2 = Some(p.tps);
            }
        }
    }
    if a.op_times {
        let profile = a
            .engine
            .gpu_profile
            .as_deref()
            .map(Profile::load)
            .transpose()
            .context("reading --gpu-profile")?;
        for (i, (r, tokens)) in results.iter().zip(&test_tokens).enumerate() {
            let pred = cpu_pred.as_ref().map(|p| p[i].op_seconds.as_slice());
            op_times_pass(&mut engine, r, tokens, profile.as_ref(), pred)?;
        }
    }
    let size_str = format!("{:.2} GiB", model_size as f64 / (1u64 << 30) as f64);
    let params_str = if n_params >= 1_000_000_000 {
        format!("{:.2} B", n_params as f64 / 1e9)
    } else {
        format!("{:.2} M", n_params as f64 / 1e6)
    };
    let ub = |r: &TestResult| r.tier.as_ref().map_or(a.engine.ubatch, |t| t.0);
    let mut out = std::io::stdout().lock();
    if a.output == "md" {
        if !gpu_info.is_empty() {
            writeln!(out, "device: {gpu_info}")?;
        }
        writeln!(out, "| model | size | params | backend | n_ubatch | test | t/s | tier | strategy | predicted t/s |")?;
        writeln!(
            out,
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"
        )?;
        for r in &results {
            let (m, sd) = mean_sd(&r.ts());
            let (tier, strat, pred) = match &r.tier {
                Some((n, s, p)) => (
                    n.to_string(),
                    s.clone(),
                    p.map_or("-".to_string(), |p| format!("{p:.2}")),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            writeln!(
                out,
                "| {model_type} | {size_str} | {params_str} | {backend} | {} | {} | {m:.2} ± {sd:.2} | {tier} | {strat} | {pred} |",
                ub(r),
                r.name()
            )?;
        }
    } else {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let ts = r.ts();
                let (avg_ts, stddev_ts) = mean_sd(&ts);
                let ns: Vec<f64> = r.samples_ns.iter().map(|&x| x as f64).collect();
                let (avg_ns, stddev_ns) = mean_sd(&ns);
                json!({
                    "build_commit": env!("CARGO_PKG_VERSION"),
                    "build_number": 0,
                    "cpu_info": "",
                    "gpu_info": gpu_info,
                    "backends": backend,
                    "model_filename": a.model.display().to_string(),
                    "model_type": model_type,
                    "model_size": model_size,
                    "model_n_params": n_params,
                    "n_batch": ub(r),
                    "n_ubatch": ub(r),
                    "n_threads": pshard_kernels::pool::threads(),
                    "flash_attn": true,
                    "type_k": engine.kv_type().name(),
                    "type_v": engine.kv_type().name(),
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "avg_ns": avg_ns as u64,
                    "stddev_ns": stddev_ns as u64,
                    "avg_ts": avg_ts,
                    "stddev_ts": stddev_ts,
                    "samples_ns": r.samples_ns,
                    "samples_ts": ts,
                    "tier": r.tier.as_ref().map(|t| t.0),
                    "strategy": r.tier.as_ref().map(|t| t.1.clone()),
                    "predicted_ts": r.tier.as_ref().and_then(|t| t.2),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

/// Synthetic tokens from a seed (a simple LCG: the same for every backend and run).
fn token_source(seed: u64, n_vocab: usize) -> impl FnMut() -> u32 {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n_vocab as u64) as u32
    }
}

/// `--parallel`: for each N, the prompt of every sequence (timed, each sequence's own ubatches)
/// then `tg` steps of N decode rows in one evaluation each (timed): aggregate t/s.
fn run_parallel(a: &Args, npl: &[usize], pp: usize, tg: Option<usize>) -> anyhow::Result<()> {
    let Some(tg) = tg else {
        bail!("--parallel measures decode: give -n with a token count");
    };
    let Some(&max_n) = npl.iter().max() else {
        bail!("--parallel: give sequence counts, e.g. 1,4,16,64");
    };
    if a.reps == 0 {
        bail!("-r must be at least 1");
    }
    let model = load_model(&a.model)?;
    let n_vocab = model.spec.hparams.n_vocab;
    let n_ctx = a.ctx.unwrap_or(pp + tg).max(pp + tg);
    let mut engine = make_engine_parallel(
        model,
        &a.model,
        n_ctx,
        "the longest -p/-n test",
        &a.engine,
        max_n,
    )?;
    uniform_routes(&mut engine, a.uniform_routes);
    let backend = if engine.device_report().is_some() {
        "CUDA"
    } else {
        "CPU"
    };
    eprintln!("bench: {}", super::common::kv_line(&engine));
    let mut next = token_source(a.seed, n_vocab);
    let prompts: Vec<Vec<u32>> = (0..max_n)
        .map(|_| (0..pp).map(|_| next()).collect())
        .collect();
    let steps: Vec<u32> = (0..tg * max_n).map(|_| next()).collect();
    let mut rows = Vec::new();
    for &n in npl {
        let (mut pp_s, mut tg_s) = (Vec::new(), Vec::new());
        let mut tier = None;
        for rep in 0..=a.reps {
            for s in 0..n {
                engine.reset_seq(s);
            }
            let t0 = Instant::now();
            if pp > 0 {
                for (s, p) in prompts.iter().enumerate().take(n) {
                    engine.eval_seq(s, p, Logits::Last)?;
                }
            }
            let t_pp = t0.elapsed().as_secs_f64();
            engine.clear_history();
            let seqs: Vec<u32> = (0..n as u32).collect();
            let logit_rows: Vec<usize> = (0..n).collect();
            let t1 = Instant::now();
            for k in 0..tg {
                engine.eval_batch(&steps[k * max_n..k * max_n + n], &seqs, &logit_rows)?;
            }
            let t_tg = t1.elapsed().as_secs_f64();
            if rep > 0 {
                pp_s.push((n * pp) as f64 / t_pp.max(1e-12));
                tg_s.push((n * tg) as f64 / t_tg.max(1e-12));
            }
            tier = main_tier(&engine);
        }
        rows.push((n, mean_sd(&pp_s), mean_sd(&tg_s), tier));
    }
    if a.output == "json" {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, pps, tgs, tier)| {
                json!({
                    "model_filename": a.model.display().to_string(),
                    "backends": backend,
                    "n_parallel": n,
                    "n_prompt": pp,
                    "n_gen": tg,
                    "pp_avg_ts": pps.0,
                    "pp_stddev_ts": pps.1,
                    "tg_avg_ts": tgs.0,
                    "tg_stddev_ts": tgs.1,
                    "tg_per_sequence_ts": tgs.0 / *n as f64,
                    "tier": tier.as_ref().map(|t| t.0),
                    "strategy": tier.as_ref().map(|t| t.1.clone()),
                    "predicted_ts": tier.as_ref().and_then(|t| t.2),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("| backend | parallel | pp | tg | pp t/s | tg t/s (all sequences) | tg t/s per sequence | tier | strategy | predicted t/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    for (n, pps, tgs, tier) in &rows {
        let (t, strat, pred) = match tier {
            Some((t, s, p)) => (
                t.to_string(),
                s.clone(),
                p.map_or("-".into(), |p| format!("{p:.2}")),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {backend} | {n} | {pp} | {tg} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.2} | {t} | {strat} | {pred} |",
            pps.0,
            pps.1,
            tgs.0,
            tgs.1,
            tgs.0 / *n as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmuls_meet_the_profile_point_of_their_path() {
        let toml = r#"
format = "pshard-profile"
version = "1.0"
kind = "gpu"
pshard_version = "0.1.0"
created = "2026-11-21T00:00:00Z"
[machine]
cpu_model = "x"
cpu_cores = 1
cpu_threads = 1
threads_used = 1
ram_bytes = 1
[machine.gpu]
name = "test GPU"
memory_bytes = 1
driver = "0"
compute_capability = "9.0"
pcie_gen = 5
pcie_width = 16
[roofline]
gpu_mem_gbs = 4000.0
h2d_pinned_gbs = 55.0
[[point]]
op = "matmul_gemv"
lane = "gpu"
quant = "Q4_K"
shape = [4096, 4096]
batch = 1
median_s = 0.00001
lo_s = 0.00001
hi_s = 0.00001
cv = 0.01
n = 5
"#;
        let p = Profile::from_toml_str(toml, "t.toml").expect("profile");
        let key = |rows| OpKey {
            op: "matmul",
            quant: Some(GgmlType::Q4_K),
            shape: Some([4096, 4096]),
            n_tokens: rows,
            rows,
        };
        assert_eq!(profile_matmul_s(&p, &key(1)), Some(1e-5));
        // 16 rows run on the GEMM path, which this profile did not measure.
        assert_eq!(profile_matmul_s(&p, &key(16)), None);
        let t = OpTime {
            calls: 32,
            seconds: 32.0 * 11e-6,
        };
        let s = profile_comparison("tg1", &[(key(1), t), (key(16), t)], &p);
        assert!(
            s.contains("| Q4_K | 4096×4096 | 1 | 32 | 11.0 | 10.0 | +10.0% |"),
            "{s}"
        );
        assert!(s.contains("1 matmul kinds matched"), "{s}");
    }

    #[test]
    fn gpu_op_table_rates_and_sum() {
        // Q8_0 1024×1024: 1024·1024/32 blocks of 34 bytes = 1,114,112 bytes; 10 calls in 1 ms:
        // 100 µs each → 11.1 GB/s; 2·1024·1024·512 flops per call → 10,737 GFLOP/s.
        let mm = OpKey {
            op: "matmul",
            quant: Some(GgmlType::Q8_0),
            shape: Some([1024, 1024]),
            n_tokens: 512,
            rows: 512,
        };
        let at = OpKey {
            op: "attention",
            quant: None,
            shape: None,
            n_tokens: 1,
            rows: 1,
        };
        let rows = [
            (
                mm,
                OpTime {
                    calls: 10,
                    seconds: 1e-3,
                },
            ),
            (
                at,
                OpTime {
                    calls: 4,
                    seconds: 2e-4,
                },
            ),
        ];
        let s = gpu_op_table("pp512", 2e-3, &rows);
        assert!(
            s.contains("| matmul | Q8_0 | 1024×1024 | 512 | 512 | 10 | 100.0 | 1.000 | 50.0% | 11 | 10737 |"),
            "{s}"
        );
        assert!(
            s.contains("| attention | - | - | 1 | 1 | 4 | 50.0 | 0.200 | 10.0% | - | - |"),
            "{s}"
        );
        assert!(
            s.contains("ops total 1.20 ms = 60.0% of the pass's wall time 2.00 ms"),
            "{s}"
        );
    }

    #[test]
    fn cpu_op_table_sorts_and_drops_empty_kinds() {
        let s = cpu_op_table(
            "tg16",
            1.0,
            vec![("add", 0.1), ("matmul", 0.5), ("rope", 0.0)],
            None,
        );
        let m = s.find("| matmul |").unwrap();
        let a = s.find("| add |").unwrap();
        assert!(m < a, "{s}");
        assert!(!s.contains("rope"), "{s}");
        assert!(s.contains("ops total 600.00 ms = 60.0%"), "{s}");
        assert!(!s.contains("predicted"), "{s}");
    }

    /// With the planner's prediction, each kind gets its predicted time and the difference, a
    /// kind only the prediction has is listed (measured 0), and the total is put beside the wall.
    #[test]
    fn cpu_op_table_puts_predictions_beside_measured() {
        let s = cpu_op_table(
            "tg16",
            1.0,
            vec![("add", 0.1), ("matmul", 0.5)],
            Some(&[("matmul", 0.6), ("add", 0.05), ("rope", 0.01)]),
        );
        assert!(
            s.contains("| matmul | 500.000 | 50.0% | 600.000 | +20.0% |"),
            "{s}"
        );
        assert!(
            s.contains("| add | 100.000 | 10.0% | 50.000 | -50.0% |"),
            "{s}"
        );
        assert!(s.contains("| rope | 0.000 | 0.0% | 10.000 | - |"), "{s}");
        assert!(
            s.contains("predicted 660.00 ms (-34.0% of the wall time)"),
            "{s}"
        );
    }
}
