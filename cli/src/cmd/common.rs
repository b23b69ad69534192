//! Helpers shared by the commands that load and run a model.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use pshard_model::bytes;
use pshard_model::ggml_type::GgmlType;
use pshard_model::spec::ModelSpec;
use pshard_planner::cost::PlanParams;
use pshard_planner::{Profile, Strategy};
use pshard_runtime::device::Device as _;
use pshard_runtime::engine::Engine;
use pshard_runtime::gpu::{CudaDevice, GpuOptions};
use pshard_runtime::model::Model;
use pshard_runtime::sampler::SamplerParams;
use pshard_runtime::tiers::{resolve, Forced, Profiles, TierRequest, TierSet};
use pshard_tokenizer::chat::ChatTemplate;
use pshard_tokenizer::Tokenizer;

/// Sets the thread count of the CPU kernels' pool, the one pool the engine computes on (0 = one
/// per core; larger counts are refused where the argument is parsed,
/// [`pshard_profiler::cli::thread_count`]).
pub fn init_threads(threads: usize) {
    pshard_kernels::pool::set_threads(threads);
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
    /// Tokens per evaluation step on the CPU (`-ub` as llama.cpp spells it; at most the
    /// context; with a GPU, the plans choose per tier).
    #[arg(long = "ubatch-size", short = 'u', visible_alias = "ub", default_value_t = 512, value_parser = crate::args::at_least_one)]
    pub ubatch: usize,
    /// Device: auto (a working GPU, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// VRAM budget in MiB: a hard cap on everything the process holds on the GPU, CUDA context
    /// included (default: the free memory minus a margin).
    #[arg(long = "vram-budget", value_parser = crate::args::vram_mib)]
    pub vram_budget: Option<u64>,
    /// Force one placement strategy in every tier (for testing and comparison).
    #[arg(long = "strategy")]
    pub strategy: Option<String>,
    /// Registry file to read and write plans (default: next to the model, else the user cache).
    #[arg(long = "registry")]
    pub registry: Option<PathBuf>,
    /// CPU profile to plan with (default: ~/.cache/pshard/profiles/cpu.toml).
    #[arg(long = "cpu-profile")]
    pub cpu_profile: Option<PathBuf>,
    /// GPU profile to plan with (default: ~/.cache/pshard/profiles/gpu.toml).
    #[arg(long = "gpu-profile")]
    pub gpu_profile: Option<PathBuf>,
    /// Keep host pages of weights every tier pins on the GPU (default: release them after upload).
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
    /// Compute from the file's layout instead of repacking the matrices only the CPU computes
    /// into 16-row interleaved blocks at load (AVX-512 VNNI CPUs; same results, for timing
    /// comparisons).
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    /// More detail about the device and the run.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// llama.cpp's flags, answered honestly.
    #[command(flatten)]
    pub llama: crate::compat::LlamaArgs,
}

/// The `kind` (`cpu` or `gpu`) profile named by `flag`, else `~/.cache/pshard/profiles/KIND.toml`
/// when present; `None` when neither is there. A profile of the other kind is refused.
fn own_profile(flag: &Option<PathBuf>, kind: &str) -> anyhow::Result<Option<Profile>> {
    use pshard_planner::profile::ProfileKind;
    let want = if kind == "cpu" {
        ProfileKind::Cpu
    } else {
        ProfileKind::Gpu
    };
    let cached = want.cache_path().filter(|p| p.exists());
    let Some(path) = flag.clone().or(cached) else {
        return Ok(None);
    };
    let p = Profile::load(&path).with_context(|| format!("reading the {kind} profile"))?;
    if p.kind != want {
        bail!(
            "{}: this is a {:?} profile, but it was given as the {kind} profile",
            path.display(),
            p.kind
        );
    }
    Ok(Some(p))
}

/// The warning for planning with committed profiles (`kinds`, e.g. `cpu and gpu`) of the machine
/// they were measured on (`machine`).
fn borrowed_warning(kinds: &str, machine: &str) -> String {
    format!(
        "planning with the committed {kinds} profile(s) of the machine they were measured on ({machine} and its host), not of this one: run `pshard profile cpu` / `pshard profile gpu`"
    )
}

/// The CPU profile to predict all-CPU runs with: `--cpu-profile`, else the cached one, else the
/// committed H200 host's with a warning (returned) saying so.
pub fn cpu_profile(a: &EngineArgs) -> anyhow::Result<(Profile, Option<String>)> {
    if let Some(p) = own_profile(&a.cpu_profile, "cpu")? {
        return Ok((p, None));
    }
    let p = Profile::from_toml_str(COMMITTED_CPU, "profiles/h200-cpu.toml")?;
    let gpu = p.machine.gpu.as_ref().map_or("?", |g| g.name.as_str());
    let w = borrowed_warning("cpu", gpu);
    Ok((p, Some(w)))
}

/// The machine profiles to plan with: the flags, else `~/.cache/pshard/profiles/{cpu,gpu}.toml`,
/// else the committed H200 profiles with a warning naming the machine they describe.
pub fn plan_profiles(a: &EngineArgs) -> anyhow::Result<Profiles> {
    let mut out = Profiles {
        cpu: own_profile(&a.cpu_profile, "cpu")?,
        gpu: own_profile(&a.gpu_profile, "gpu")?,
        warning: None,
    };
    let mut borrowed = Vec::new();
    if out.cpu.is_none() {
        out.cpu = Some(Profile::from_toml_str(
            COMMITTED_CPU,
            "profiles/h200-cpu.toml",
        )?);
        borrowed.push("cpu");
    }
    if out.gpu.is_none() {
        out.gpu = Some(Profile::from_toml_str(
            COMMITTED_GPU,
            "profiles/h200-gpu.toml",
        )?);
        borrowed.push("gpu");
    }
    if !borrowed.is_empty() {
        let gpu_name = out
            .gpu
            .as_ref()
            .and_then(|p| p.machine.gpu.as_ref())
            .map_or("?", |g| g.name.as_str());
        out.warning = Some(borrowed_warning(&borrowed.join(" and "), gpu_name));
    }
    Ok(out)
}

/// The committed profiles of the lent H200 machine.
const COMMITTED_CPU: &str = include_str!("../../../profiles/h200-cpu.toml");
const COMMITTED_GPU: &str = include_str!("../../../profiles/h200-gpu.toml");

/// Checks a context size against the model: at most its training context (positions past it have
/// no trained meaning, and the KV cache is sized by it), and, on the CPU, a KV cache that fits the
/// memory this machine has available. `flag` names the argument in the message.
pub fn check_context(
    spec: &ModelSpec,
    n_ctx: usize,
    flag: &str,
    device: &Device,
    kv_type: GgmlType,
) -> anyhow::Result<()> {
    let train = spec.hparams.n_ctx_train;
    if n_ctx > train {
        bail!(
            "{flag} {n_ctx} exceeds the model's training context of {train} tokens (accepted: 1 to {train})"
        );
    }
    if matches!(device, Device::Cpu) {
        let kv = bytes::kv_bytes(spec, kv_type, n_ctx, n_ctx, 1);
        if let Some(avail) = pshard_runtime::model::mem_available_bytes() {
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

/// Builds the engine for `--device`, `--vram-budget`, `--strategy` and `--registry` on a context
/// checked by [`check_context`] (`flag` names the context's argument): on the CPU alone, or with
/// the tiers of the model's registry (planned here when none matches) on a GPU. Says in one line
/// which plans run. One sequence; see [`make_engine_parallel`].
pub fn make_engine(
    model: Model,
    path: &Path,
    n_ctx: usize,
    flag: &str,
    a: &EngineArgs,
) -> anyhow::Result<Engine> {
    make_engine_parallel(model, path, n_ctx, flag, a, 1)
}

/// [`make_engine`] for `parallel` sequences of `n_ctx` positions each: the GPU plans are made
/// (or looked up in the registry) for that many sequences, so the planner adds its multi-user
/// decode tiers (1/4/16/32/64 up to `parallel`).
pub fn make_engine_parallel(
    mut model: Model,
    path: &Path,
    n_ctx: usize,
    flag: &str,
    a: &EngineArgs,
    parallel: usize,
) -> anyhow::Result<Engine> {
    let parallel = parallel.max(1);
    model.set_repack(!a.no_repack);
    let strategy = match &a.strategy {
        Some(name) => Some(Strategy::from_name(name).with_context(|| {
            let valid: Vec<&str> = std::iter::once(Strategy::AllGpu)
                .chain(Strategy::SEARCHED)
                .map(|s| s.name())
                .collect();
            format!("unknown --strategy '{name}' (valid: {})", valid.join(", "))
        })?),
        None => None,
    };
    let n_layer = model.spec.layers.len();
    let ngl = a.llama.n_gpu_layers.and_then(|g| g.count(n_layer));
    let forced = match (strategy, ngl) {
        (Some(_), Some(_)) => bail!("--strategy and -ngl both choose the placement: give one"),
        (Some(s), None) => Some(Forced::Strategy(s)),
        (None, Some(n)) => Some(Forced::GpuLayers(n)),
        (None, None) => None,
    };
    let mut device = pick_device(&a.device, a.verbose)?;
    if ngl == Some(0) && !matches!(device, Device::Cpu) {
        eprintln!("-ngl 0: no layer on the GPU, running on the CPU");
        device = Device::Cpu;
    }
    let kv = a.llama.kv_type()?;
    kv.check_model(&model.spec)
        .map_err(|e| anyhow::anyhow!("-ctk/-ctv {}: {e}", kv.name()))?;
    check_context(&model.spec, n_ctx, flag, &device, kv.ggml())?;
    let plan_params = |n_ctx| {
        let mut p = PlanParams::new(n_ctx);
        p.kv_type = kv.ggml();
        p
    };
    match device {
        Device::Cpu => {
            if (forced.is_some() && ngl != Some(0)) || a.vram_budget.is_some() {
                eprintln!(
                    "device: cpu — --strategy, -ngl and --vram-budget apply to GPU plans only"
                );
            }
            let tiers = TierSet::all_cpu(&model.spec, plan_params(n_ctx), a.ubatch.min(n_ctx));
            let mut e = Engine::with_tiers(Arc::new(model), tiers, parallel, None, false)
                .context("setting up the CPU engine")?;
            e.set_exact_activations(a.exact_acts);
            repack_report(&e);
            Ok(e)
        }
        Device::Cuda(ordinal) => {
            let model = Arc::new(model);
            let opts = GpuOptions {
                ordinal,
                vram_budget: a.vram_budget.map(|m| m << 20),
                cache_dir: None,
            };
            let dev = CudaDevice::open(model.clone(), &opts)
                .with_context(|| format!("opening CUDA device {ordinal}"))?;
            let info = dev.gpu().dev.info().clone();
            // The plans' budget: what this process may hold, the context included.
            let budget = dev.budget() + info.context_overhead;
            let mut params = plan_params(n_ctx);
            params.threads = pshard_kernels::pool::threads();
            params.parallel = parallel;
            let profiles = plan_profiles(a)?;
            let req = TierRequest {
                model_path: path,
                params,
                budget,
                registry: a.registry.as_deref(),
                forced,
                profiles: &profiles,
                context_bytes: Some(info.context_overhead),
            };
            let (tiers, line) = resolve(&model, &req).context("choosing the plans")?;
            eprintln!("{line}");
            let mut e = Engine::with_tiers(
                model,
                tiers,
                parallel,
                Some(Box::new(dev)),
                a.keep_host_weights,
            )
            .context("loading the model onto the GPU")?;
            e.set_exact_activations(a.exact_acts);
            if let Some(r) = e.device_report() {
                eprintln!("{r}");
            }
            repack_report(&e);
            Ok(e)
        }
    }
}

/// Says how many matrices the engine repacked for the CPU's kernels, if any, or why none.
fn repack_report(e: &Engine) {
    if let Some(why) = e.model().repack_skipped() {
        eprintln!("{why}");
    }
    if let Some((n, bytes, secs)) = e.model().repack_stats() {
        eprintln!(
            "repacked {n} CPU matrices ({:.1} MiB) into 16-row blocks in {secs:.2} s",
            bytes as f64 / (1u64 << 20) as f64
        );
    }
}

/// The plan an engine runs: where it came from, then one line per tier (tokens, prefill or
/// decode, strategy, ubatch, the planner's predicted t/s).
pub fn plan_report(engine: &Engine) -> String {
    let t = engine.tiers();
    let mut s = format!(
        "plan: {} ({} sequence(s) of {} positions, {})",
        t.source,
        engine.n_seq(),
        engine.n_ctx(),
        kv_line(engine)
    );
    for tier in &t.tiers {
        s += &format!(
            "\n  tier {:>4} {:<7} {:<16} ubatch {:>4}{}",
            tier.n,
            if tier.prefill { "prefill" } else { "decode" },
            tier.strategy,
            tier.ubatch,
            tier.predicted_tps
                .map_or(String::new(), |p| format!(", predicted {p:.1} t/s"))
        );
    }
    s
}

/// Context-shift flags (llama.cpp's), shared by `run`, `chat` and `serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct ContextShiftArgs {
    /// When a sequence's context fills, keep the first --keep tokens and discard the older half
    /// of the rest (their KV moves down, K re-rotated), instead of stopping; a prompt longer
    /// than the context is cut the same way (chat, serve) (llama.cpp's --context-shift).
    #[arg(long = "context-shift")]
    pub context_shift: bool,
    /// Prompt tokens a context shift keeps (-1: the whole prompt); as in llama.cpp, a BOS token
    /// the tokenizer added is kept besides.
    #[arg(long = "keep", default_value = "0", value_parser = crate::args::keep_count, allow_negative_numbers = true)]
    pub keep: crate::args::Keep,
}

impl ContextShiftArgs {
    /// The shift asked for, if any.
    pub fn get(&self) -> Option<pshard_runtime::session::ContextShift> {
        self.context_shift
            .then_some(pshard_runtime::session::ContextShift { keep: self.keep.0 })
    }
}

/// The KV cache's type and size, e.g. `KV cache q8_0 12.8 MiB` (KiB below 1 MiB).
pub fn kv_line(engine: &Engine) -> String {
    let b = engine.kv_bytes() as f64;
    let size = if b < (1u64 << 20) as f64 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    };
    format!("KV cache {} {size}", engine.kv_type().name())
}

/// Sampling flags (llama.cpp's names and defaults), shared by `run` and `chat`.
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature (≤ 0: greedy).
    #[arg(long, default_value_t = SamplerParams::default().temperature, value_parser = crate::args::finite, allow_negative_numbers = true)]
    pub temp: f32,
    /// Top-k (0 = off).
    #[arg(long = "top-k", default_value_t = SamplerParams::default().top_k)]
    pub top_k: usize,
    /// Top-p, 0 to 1 (1 = off).
    #[arg(long = "top-p", default_value_t = SamplerParams::default().top_p, value_parser = crate::args::unit, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Min-p, 0 to 1 (0 = off).
    #[arg(long = "min-p", default_value_t = SamplerParams::default().min_p, value_parser = crate::args::unit, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Repetition penalty, above 0 (1 = off).
    #[arg(long = "repeat-penalty", default_value_t = SamplerParams::default().repeat_penalty, value_parser = crate::args::positive, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Tokens the repetition penalty looks back over.
    #[arg(long = "repeat-last-n", default_value_t = SamplerParams::default().repeat_last_n)]
    pub repeat_last_n: usize,
    /// Random seed (-1 or absent: random).
    #[arg(short = 's', long, value_parser = crate::args::seed, allow_negative_numbers = true)]
    pub seed: Option<crate::args::Seed>,
}

impl SamplingArgs {
    /// The sampler settings (a seed from the clock when none was given).
    pub fn params(&self) -> SamplerParams {
        SamplerParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed.and_then(|s| s.0),
            ..SamplerParams::default()
        }
    }
}

/// The chat template to use: `--chat-template` (a built-in name or Jinja source), else the
/// GGUF's, else the well-known one of the model's family; `None` when there is none.
pub fn chat_template(model: &Model, flag: Option<&str>) -> anyhow::Result<Option<ChatTemplate>> {
    if let Some(src) = flag {
        return Ok(Some(
            ChatTemplate::from_name_or_source(src).context("parsing --chat-template")?,
        ));
    }
    let from_file = ChatTemplate::from_gguf(model.file().header())
        .context("reading the model's chat template")?;
    if from_file.is_some() {
        return Ok(from_file);
    }
    // Some GGUFs (gemma-3-270m) ship no template; their family's is well known.
    let name = match model.spec.arch {
        pshard_model::spec::Arch::Gemma3 => "gemma",
        pshard_model::spec::Arch::Qwen2
        | pshard_model::spec::Arch::Qwen3
        | pshard_model::spec::Arch::Qwen3Moe => "chatml",
        _ => return Ok(None),
    };
    let t = ChatTemplate::builtin(name);
    if t.is_some() {
        eprintln!(
            "note: the model has no chat template; using the built-in '{name}' template of its family (--chat-template chooses another)"
        );
    }
    Ok(t)
}

/// The error for a model without a chat template.
pub fn no_template(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} has no chat template (tokenizer.chat_template); pass one with --chat-template (a \
         Jinja template or one of: {})",
        path.display(),
        ChatTemplate::BUILTIN_NAMES.join(", ")
    )
}

/// The text of a special token, or "" when the model has none.
pub fn special_text(tokenizer: &Tokenizer, id: Option<u32>) -> String {
    id.map(|i| tokenizer.token_text(i).to_string())
        .unwrap_or_default()
}

/// One line per tier that ran: tier, strategy, ubatches and tokens (for `run`'s report).
pub fn tier_report(engine: &Engine) -> String {
    let mut per: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
    for r in engine.history() {
        let e = per.entry(r.tier).or_default();
        e.0 += 1;
        e.1 += r.n_tokens;
    }
    let tiers = engine.tiers();
    per.iter()
        .map(|(&t, &(ub, toks))| {
            let tier = &tiers.tiers[t];
            format!(
                "tier {} ({}): {} ubatches, {} tokens, {}{}",
                tier.n,
                if tier.prefill { "prefill" } else { "decode" },
                ub,
                toks,
                tier.strategy,
                tier.predicted_tps
                    .map_or(String::new(), |p| format!(", predicted {p:.1} t/s"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Resident memory of this process in bytes (Linux `VmRSS`), if readable.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
