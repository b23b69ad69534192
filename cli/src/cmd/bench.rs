//! `pshard bench`: llama-bench-style throughput tests. `-p 512,4096` prompt-processing tests,
//! `-n 128` generation tests, `-r` repetitions after one untimed warm-up, synthetic tokens;
//! markdown or JSON (llama-bench's keys) output. The instrument for every performance claim.
//!
//! `--op-times` adds, after the tests, one untimed pass per test with per-op timing and prints
//! where the time goes to stderr: on CUDA per (op, weight type, shape, batch) from events around
//! every step (no CUDA graphs in that pass), with weight GB/s and GFLOP/s of the matmuls; on the
//! CPU per op kind.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use pshard_model::ggml_type::GgmlType;
use pshard_planner::Profile;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::gpu::{GpuEngine, GpuOptions, OpKey, OpTime};
use pshard_runtime::model::Model;
use serde_json::json;

use super::common::{check_context, init_threads, load_model, pick_device, Device};

/// Arguments of `pshard bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model file (GGUF).
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Prompt-processing tests: tokens per test, comma-separated (0 or empty: none).
    #[arg(short = 'p', long = "n-prompt", default_value = "512")]
    n_prompt: String,
    /// Generation tests: tokens per test, comma-separated (0 or empty: none).
    #[arg(short = 'n', long = "n-gen", default_value = "128")]
    n_gen: String,
    /// Micro-batch size: tokens evaluated per step of a prompt (`-u`, `--ub`, `--ubatch-size`).
    #[arg(
        long = "ubatch-size",
        short = 'u',
        visible_alias = "ub",
        default_value_t = 512,
        value_parser = crate::args::at_least_one
    )]
    ubatch: usize,
    /// Timed repetitions per test (after one untimed warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5, value_parser = crate::args::repetitions)]
    reps: usize,
    /// Device: auto (a working GPU, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// VRAM budget in MiB (default: free memory minus a margin).
    #[arg(long = "vram-budget", value_parser = crate::args::vram_mib)]
    vram_budget: Option<u64>,
    /// Output format: md or json.
    #[arg(short = 'o', long = "output", default_value = "md")]
    output: String,
    /// CPU threads (0 = all hardware threads).
    #[arg(short = 't', long, default_value_t = 0, value_parser = pshard_profiler::cli::thread_count)]
    threads: usize,
    /// Keep host pages of weights uploaded to the GPU (default: release them after upload).
    #[arg(long = "keep-host-weights")]
    keep_host_weights: bool,
    /// Seed of the synthetic tokens.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// After the tests, run one more (untimed) pass of each with per-op timing and print where
    /// the time goes to stderr (CUDA: per op, weight type, shape and batch, from events around
    /// every op, without CUDA graphs; CPU: per op kind).
    #[arg(long = "op-times")]
    op_times: bool,
    /// With `--op-times` on CUDA: put each matmul's time beside the GPU profile's point for the
    /// same path, weight type, shape and batch (how well the profile predicts the runtime).
    #[arg(long = "gpu-profile", requires = "op_times")]
    gpu_profile: Option<PathBuf>,
    /// More detail about the device.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// llama.cpp's flags, answered honestly.
    #[command(flatten)]
    llama: crate::compat::LlamaArgs,
}

impl Args {
    /// The checks that need no file.
    pub fn check(&self) -> anyhow::Result<()> {
        parse_list(&self.n_prompt, "-p")?;
        parse_list(&self.n_gen, "-n")?;
        if self.output != "md" && self.output != "json" {
            bail!("-o must be md or json (got '{}')", self.output);
        }
        self.llama.check()
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

/// One engine behind the benchmark, either backend.
enum Runner {
    Cpu(Box<Engine>),
    Gpu(Box<GpuEngine>, Box<Model>),
}

impl Runner {
    fn reset(&mut self) {
        match self {
            Runner::Cpu(e) => e.reset(),
            Runner::Gpu(e, _) => e.reset(),
        }
    }

    /// Evaluates a prompt in ubatches and waits for the GPU.
    fn prompt(&mut self, tokens: &[u32], ubatch: usize) -> anyhow::Result<()> {
        match self {
            Runner::Cpu(e) => {
                e.eval(tokens, Logits::Last)?;
            }
            Runner::Gpu(e, m) => {
                for chunk in tokens.chunks(ubatch) {
                    e.eval_async(m, chunk)?;
                }
                e.sync()?;
            }
        }
        Ok(())
    }

    /// One generation step with its logits read back, as a sampler needs.
    fn step(&mut self, token: u32) -> anyhow::Result<()> {
        match self {
            Runner::Cpu(e) => {
                e.eval(&[token], Logits::Last)?;
            }
            Runner::Gpu(e, m) => {
                e.eval(m, &[token], Logits::Last)?;
            }
        }
        Ok(())
    }

    /// One pass of a test: the prompt in ubatches, or the generation steps.
    fn pass(&mut self, test: &TestResult, tokens: &[u32], ubatch: usize) -> anyhow::Result<()> {
        if test.n_gen == 0 {
            self.prompt(tokens, ubatch)
        } else {
            tokens.iter().try_for_each(|&t| self.step(t))
        }
    }

    /// Runs one pass of `test` with per-op timing and prints the breakdown to stderr.
    fn op_times_pass(
        &mut self,
        test: &TestResult,
        tokens: &[u32],
        ubatch: usize,
        profile: Option<&Profile>,
    ) -> anyhow::Result<()> {
        self.reset();
        let before = match self {
            Runner::Cpu(e) => e.op_seconds(),
            Runner::Gpu(e, _) => {
                e.clear_op_times();
                e.set_op_timing(true);
                Vec::new()
            }
        };
        let t0 = Instant::now();
        let r = self.pass(test, tokens, ubatch);
        let wall = t0.elapsed().as_secs_f64();
        match self {
            Runner::Cpu(e) => {
                r?;
                let after = e.op_seconds();
                let rows: Vec<(&'static str, f64)> = after
                    .iter()
                    .map(|&(k, v)| {
                        let b = before.iter().find(|e| e.0 == k).map_or(0.0, |e| e.1);
                        (k, v - b)
                    })
                    .collect();
                eprint!("{}", cpu_op_table(&test.name(), wall, rows));
            }
            Runner::Gpu(e, _) => {
                e.set_op_timing(false);
                r?;
                let times = e.op_times();
                eprint!("{}", gpu_op_table(&test.name(), wall, &times));
                if let Some(p) = profile {
                    eprint!("{}", profile_comparison(&test.name(), &times, p));
                }
            }
        }
        Ok(())
    }
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

/// The CPU breakdown of one pass: seconds per op kind.
fn cpu_op_table(test: &str, wall: f64, mut rows: Vec<(&'static str, f64)>) -> String {
    rows.retain(|r| r.1 > 0.0);
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut s = format!(
        "\nop times of one {test} pass (CPU, per op kind; wall {:.2} ms)\n| op | total ms | share |\n| --- | ---: | ---: |\n",
        wall * 1e3
    );
    let mut sum = 0.0;
    for (k, v) in &rows {
        sum += v;
        s += &format!(
            "| {k} | {:.3} | {:.1}% |\n",
            v * 1e3,
            100.0 * v / wall.max(1e-12)
        );
    }
    s += &format!(
        "ops total {:.2} ms = {:.1}% of the pass's wall time {:.2} ms\n",
        sum * 1e3,
        100.0 * sum / wall.max(1e-12),
        wall * 1e3
    );
    s
}

struct TestResult {
    n_prompt: usize,
    n_gen: usize,
    samples_ns: Vec<u64>,
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

/// Runs `pshard bench`.
pub fn run(a: Args) -> anyhow::Result<()> {
    init_threads(a.threads)?;
    let pp = parse_list(&a.n_prompt, "-p")?;
    let tg = parse_list(&a.n_gen, "-n")?;
    if pp.is_empty() && tg.is_empty() {
        bail!("nothing to measure: give -p and/or -n token counts");
    }
    let device = pick_device(&a.device, a.verbose)?;
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
    let n_ctx = pp.iter().chain(&tg).copied().max().unwrap_or(1);
    check_context(&model.spec, n_ctx, "the longest -p/-n test", &device)?;
    let ubatch = a.ubatch.min(n_ctx);
    let (mut runner, backend, gpu_info) = match device {
        Device::Cpu => (
            Runner::Cpu(Box::new(Engine::new(model, n_ctx, ubatch))),
            "CPU",
            String::new(),
        ),
        Device::Cuda(ordinal) => {
            let opts = GpuOptions {
                ordinal,
                vram_budget: a.vram_budget.map(|m| m << 20),
                cache_dir: None,
                keep_host_weights: a.keep_host_weights,
            };
            let t0 = Instant::now();
            let e = GpuEngine::new(&model, n_ctx, ubatch, &opts)
                .with_context(|| format!("opening CUDA device {ordinal}"))?;
            eprintln!(
                "{}\nbench: weights uploaded in {:.2} s",
                e.report(),
                t0.elapsed().as_secs_f64()
            );
            let name = e.gpu.dev.info().name.clone();
            (Runner::Gpu(Box::new(e), Box::new(model)), "CUDA", name)
        }
    };
    // Synthetic tokens (a simple LCG: the same for every backend and run).
    let mut state = a
        .seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next_token = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n_vocab as u64) as u32
    };
    let mut results = Vec::new();
    let mut test_tokens: Vec<Vec<u32>> = Vec::new();
    for &n in &pp {
        let tokens: Vec<u32> = (0..n).map(|_| next_token()).collect();
        let mut samples = Vec::new();
        for rep in 0..=a.reps {
            runner.reset();
            let t0 = Instant::now();
            runner.prompt(&tokens, ubatch)?;
            if rep > 0 {
                samples.push(t0.elapsed().as_nanos() as u64);
            }
        }
        results.push(TestResult {
            n_prompt: n,
            n_gen: 0,
            samples_ns: samples,
        });
        test_tokens.push(tokens);
    }
    for &n in &tg {
        let tokens: Vec<u32> = (0..n).map(|_| next_token()).collect();
        let mut samples = Vec::new();
        for rep in 0..=a.reps {
            runner.reset();
            let t0 = Instant::now();
            for &t in &tokens {
                runner.step(t)?;
            }
            if rep > 0 {
                samples.push(t0.elapsed().as_nanos() as u64);
            }
        }
        results.push(TestResult {
            n_prompt: 0,
            n_gen: n,
            samples_ns: samples,
        });
        test_tokens.push(tokens);
    }
    if a.op_times {
        let profile = a
            .gpu_profile
            .as_deref()
            .map(Profile::load)
            .transpose()
            .context("reading --gpu-profile")?;
        for (r, tokens) in results.iter().zip(&test_tokens) {
            runner.op_times_pass(r, tokens, ubatch, profile.as_ref())?;
        }
    }
    let size_str = format!("{:.2} GiB", model_size as f64 / (1u64 << 30) as f64);
    let params_str = if n_params >= 1_000_000_000 {
        format!("{:.2} B", n_params as f64 / 1e9)
    } else {
        format!("{:.2} M", n_params as f64 / 1e6)
    };
    let ngl = if backend == "CPU" { 0 } else { 99 };
    let mut out = std::io::stdout().lock();
    if a.output == "md" {
        if !gpu_info.is_empty() {
            writeln!(out, "device: {gpu_info}")?;
        }
        writeln!(
            out,
            "| model | size | params | backend | ngl | n_ubatch | test | t/s |"
        )?;
        writeln!(
            out,
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
        )?;
        for r in &results {
            let (m, sd) = mean_sd(&r.ts());
            writeln!(out, "| {model_type} | {size_str} | {params_str} | {backend} | {ngl} | {} | {} | {m:.2} ± {sd:.2} |", ubatch, r.name())?;
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
                    "n_batch": ubatch,
                    "n_ubatch": ubatch,
                    "n_threads": rayon::current_num_threads(),
                    "n_gpu_layers": ngl,
                    "flash_attn": true,
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "avg_ns": avg_ns as u64,
                    "stddev_ns": stddev_ns as u64,
                    "avg_ts": avg_ts,
                    "stddev_ts": stddev_ts,
                    "samples_ns": r.samples_ns,
                    "samples_ts": ts,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
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
        );
        let m = s.find("| matmul |").unwrap();
        let a = s.find("| add |").unwrap();
        assert!(m < a, "{s}");
        assert!(!s.contains("rope"), "{s}");
        assert!(s.contains("ops total 600.00 ms = 60.0%"), "{s}");
    }
}
