//! Helpers shared by the commands that load and run a model.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use pshard_model::bytes;
use pshard_model::ggml_type::GgmlType;
use pshard_model::spec::ModelSpec;
use pshard_runtime::engine::Engine;
use pshard_runtime::gpu::GpuOptions;
use pshard_runtime::model::Model;

/// Sets the size of the global rayon pool (0 = one per hardware thread; larger counts are refused
/// where the argument is parsed).
pub fn init_threads(threads: usize) -> anyhow::Result<()> {
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(())
}

/// Opens a model, showing a progress bar while its pages are read in (big models take a while).
pub fn load_model(path: &Path) -> anyhow::Result<Model> {
    let t0 = Instant::now();
    let model = Model::open(path).with_context(|| format!("loading {}", path.display()))?;
    let total = model.file().tensor_data_bytes();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "loading {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Touch every page once so the first token's timing measures compute, not page faults.
    let mut checksum = 0u8;
    for i in 0..model.file().tensors().len() {
        let data = model.file().tensor_data(i);
        for chunk in data.chunks(1 << 20) {
            checksum ^= chunk.iter().step_by(4096).fold(0u8, |a, b| a ^ b);
            bar.inc(chunk.len() as u64);
        }
    }
    std::hint::black_box(checksum);
    bar.finish_and_clear();
    eprintln!(
        "loaded {} ({}, {} layers, {:.2} GiB) in {:.2} s",
        model.spec.name,
        model.spec.arch.gguf_name(),
        model.spec.layers.len(),
        total as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// Prints the seconds spent per op kind (`--profile`).
pub fn print_op_profile(engine: &pshard_runtime::engine::Engine) {
    let times = engine.op_seconds();
    let total: f64 = times.iter().map(|t| t.1).sum();
    eprintln!("time per op kind ({total:.2} s in all):");
    for (kind, secs) in times {
        eprintln!(
            "  {kind:<14} {secs:8.3} s  {:5.1}%",
            100.0 * secs / total.max(1e-12)
        );
    }
}

/// Where a model runs.
pub enum Device {
    /// The CPU engine.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

/// Parses `--device auto|cpu|cuda|cuda:N`; `auto` takes GPU 0 when one works, else the CPU, and
/// says which in one line (`device: cpu (no CUDA driver found)`); `verbose` adds the details.
pub fn pick_device(s: &str, verbose: bool) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => match pshard_kernels::cuda::probe(0) {
            Ok(d) => {
                eprintln!("device: cuda:0");
                if verbose {
                    eprintln!("device: {d:?}");
                }
                Ok(Device::Cuda(0))
            }
            Err(e) => {
                eprintln!("device: cpu ({})", e.short_reason());
                if verbose {
                    eprintln!("device: {e}");
                }
                Ok(Device::Cpu)
            }
        },
        "cuda" => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => bail!("--device must be auto, cpu, cuda or cuda:N (got '{other}')"),
        },
    }
}

/// Flags shared by the commands that evaluate a model: where it runs and how.
#[derive(clap::Args)]
pub struct EngineArgs {
    /// Threads (0 = all hardware threads).
    #[arg(short = 't', long, default_value_t = 0, value_parser = pshard_profiler::cli::thread_count)]
    pub threads: usize,
    /// Tokens per evaluation step (`-ub` as llama.cpp spells it; at most the context).
    #[arg(long = "ubatch-size", short = 'u', visible_alias = "ub", default_value_t = 512, value_parser = crate::args::at_least_one)]
    pub ubatch: usize,
    /// Device: auto (a working GPU, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// VRAM budget in MiB (default: free memory minus a margin).
    #[arg(long = "vram-budget", value_parser = crate::args::vram_mib)]
    pub vram_budget: Option<u64>,
    /// Keep host pages of weights uploaded to the GPU (default: release them after upload).
    #[arg(long = "keep-host-weights")]
    pub keep_host_weights: bool,
    /// Print the time spent per op kind at the end.
    #[arg(long)]
    pub profile: bool,
    /// Multiply quantized weights with unrounded activations instead of rounding activations to
    /// 8 bits first (CPU: f32, weights dequantized on the fly; GPU: f16 through the GEMM path at
    /// every batch size, no CUDA graphs) — slower; a reference for checking results.
    #[arg(long = "exact-acts")]
    pub exact_acts: bool,
    /// More detail about the device and the run.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// llama.cpp's flags, answered honestly.
    #[command(flatten)]
    pub llama: crate::compat::LlamaArgs,
}

/// Checks a context size against the model: at most its training context (positions past it have
/// no trained meaning, and the KV cache is sized by it), and, on the CPU, a KV cache that fits the
/// memory this machine has available. `flag` names the argument in the message.
pub fn check_context(
    spec: &ModelSpec,
    n_ctx: usize,
    flag: &str,
    device: &Device,
) -> anyhow::Result<()> {
    let train = spec.hparams.n_ctx_train;
    if n_ctx > train {
        bail!(
            "{flag} {n_ctx} exceeds the model's training context of {train} tokens (accepted: 1 to {train})"
        );
    }
    if matches!(device, Device::Cpu) {
        let kv = bytes::kv_bytes(spec, GgmlType::F16, n_ctx, 1);
        if let Some(avail) = mem_available_bytes() {
            if kv > avail {
                bail!(
                    "{flag} {n_ctx}: the KV cache would take {:.1} GiB but this machine has {:.1} GiB available (lower {flag})",
                    kv as f64 / GIB,
                    avail as f64 / GIB
                );
            }
        }
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// Memory available to new allocations (Linux `MemAvailable`), if readable.
fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reads a text argument's file; `-` is standard input (as llama.cpp's `-f -`).
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Builds the engine for `--device`, `--vram-budget` and `--ubatch-size` on a context checked by
/// [`check_context`] (`flag` names the context's argument), logging the GPU report.
pub fn make_engine(
    model: Model,
    n_ctx: usize,
    flag: &str,
    a: &EngineArgs,
) -> anyhow::Result<Engine> {
    let device = pick_device(&a.device, a.verbose)?;
    check_context(&model.spec, n_ctx, flag, &device)?;
    let (ubatch, vram_budget_mib, keep_host_weights) =
        (a.ubatch.min(n_ctx), a.vram_budget, a.keep_host_weights);
    Ok(match device {
        Device::Cpu => {
            let mut e = Engine::new(model, n_ctx, ubatch);
            e.set_exact_activations(a.exact_acts);
            e
        }
        Device::Cuda(ordinal) => {
            let opts = GpuOptions {
                ordinal,
                vram_budget: vram_budget_mib.map(|m| m << 20),
                cache_dir: None,
                keep_host_weights,
            };
            let mut e = Engine::with_gpu(model, n_ctx, ubatch, &opts)
                .with_context(|| format!("opening CUDA device {ordinal}"))?;
            e.set_exact_activations(a.exact_acts);
            if let Some(r) = e.gpu_report() {
                eprintln!("{r}");
            }
            e
        }
    })
}

/// Resident memory of this process in bytes (Linux `VmRSS`), if readable.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
