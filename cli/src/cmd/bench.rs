//! `pshard bench`: llama-bench-style throughput tests. `-p 512,4096` prompt-processing tests,
//! `-n 128` generation tests, `-r` repetitions after one untimed warm-up, synthetic tokens;
//! markdown or JSON (llama-bench's keys) output. The instrument for every performance claim.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use pshard_model::ggml_type::GgmlType;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::gpu::{GpuEngine, GpuOptions};
use pshard_runtime::model::Model;
use serde_json::json;

use super::common::{init_threads, load_model, pick_device, Device};

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
        default_value_t = 512
    )]
    ubatch: usize,
    /// Timed repetitions per test (after one untimed warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    reps: usize,
    /// Device: auto (a working GPU, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// VRAM budget in MiB (default: free memory minus a margin).
    #[arg(long = "vram-budget")]
    vram_budget: Option<u64>,
    /// Output format: md or json.
    #[arg(short = 'o', long = "output", default_value = "md")]
    output: String,
    /// CPU threads (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// Keep host pages of weights uploaded to the GPU (default: release them after upload).
    #[arg(long = "keep-host-weights")]
    keep_host_weights: bool,
    /// Seed of the synthetic tokens.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn parse_list(s: &str, what: &str) -> anyhow::Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: usize = part
            .parse()
            .with_context(|| format!("{what}: '{part}' is not a token count"))?;
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
    if a.reps == 0 {
        bail!("-r must be at least 1");
    }
    if a.output != "md" && a.output != "json" {
        bail!("-o must be md or json (got '{}')", a.output);
    }
    if a.ubatch == 0 {
        bail!("-ub must be at least 1");
    }
    let device = pick_device(&a.device)?;
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
    let (mut runner, backend, gpu_info) = match device {
        Device::Cpu => (
            Runner::Cpu(Box::new(Engine::new(model, n_ctx, a.ubatch))),
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
            let e = GpuEngine::new(&model, n_ctx, a.ubatch, &opts)
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
    for &n in &pp {
        let tokens: Vec<u32> = (0..n).map(|_| next_token()).collect();
        let mut samples = Vec::new();
        for rep in 0..=a.reps {
            runner.reset();
            let t0 = Instant::now();
            runner.prompt(&tokens, a.ubatch)?;
            if rep > 0 {
                samples.push(t0.elapsed().as_nanos() as u64);
            }
        }
        results.push(TestResult {
            n_prompt: n,
            n_gen: 0,
            samples_ns: samples,
        });
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
    }
    let size_str = format!("{:.2} GiB", model_size as f64 / (1u64 << 30) as f64);
    let params_str = if n_params >= 1_000_000_000 {
        format!("{:.2} B", n_params as f64 / 1e9)
    } else {
        format!("{:.2} M", n_params as f64 / 1e6)
    };
    let ngl = if backend == "CPU" { 0 } else { 99 };
    if a.output == "md" {
        if !gpu_info.is_empty() {
            println!("device: {gpu_info}");
        }
        println!("| model | size | params | backend | ngl | n_ubatch | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |");
        for r in &results {
            let (m, sd) = mean_sd(&r.ts());
            println!("| {model_type} | {size_str} | {params_str} | {backend} | {ngl} | {} | {} | {m:.2} ± {sd:.2} |", a.ubatch, r.name());
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
                    "n_batch": a.ubatch,
                    "n_ubatch": a.ubatch,
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
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}
