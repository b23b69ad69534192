//! `pshard plan`: choose placements per token tier under a VRAM budget and write the registry.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use pshard_model::gguf::ModelFile;
use pshard_model::spec::ModelSpec;
use pshard_planner::cost::PlanParams;
use pshard_planner::fingerprint::Fingerprint;
use pshard_planner::profile::{Profile, ProfileKind};
use pshard_planner::registry;
use pshard_planner::search::{self, Outcome, Plan};
use pshard_planner::CostTable;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Arguments of `pshard plan`.
#[derive(clap::Args)]
pub struct Args {
    /// Model file (GGUF; the first file of a split set).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// VRAM budget in MiB (default: the GPU profile's memory minus 1 GiB; 0 = all-CPU plan).
    #[arg(long = "vram-budget", value_parser = crate::args::vram_mib)]
    pub vram_budget: Option<u64>,
    /// Context length per sequence (0 = the model's training context, capped at 4096; at most the
    /// training context).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0, value_parser = crate::args::ctx_size)]
    pub ctx: usize,
    /// Parallel sequences.
    #[arg(long = "parallel", default_value_t = 1, value_parser = crate::args::at_least_one)]
    pub parallel: usize,
    /// KV cache type: f16 or q8_0.
    #[arg(long = "kv-type", default_value = "f16")]
    pub kv_type: String,
    /// CPU threads the plan assumes (default: all available; at most the CPU profile's threads, or
    /// this machine's without one).
    #[arg(short = 't', long = "threads", value_parser = crate::args::at_least_one)]
    pub threads: Option<usize>,
    /// Logical batch size (prefill tiers reach at least min(max(n_batch, 16384), ctx)).
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048, value_parser = crate::args::at_least_one)]
    pub n_batch: usize,
    /// CPU profile (default: ~/.cache/pshard/profiles/cpu.toml when present).
    #[arg(long = "cpu-profile")]
    pub cpu_profile: Option<PathBuf>,
    /// GPU profile (default: ~/.cache/pshard/profiles/gpu.toml when present).
    #[arg(long = "gpu-profile")]
    pub gpu_profile: Option<PathBuf>,
    /// Largest prefill tier (overrides the default).
    #[arg(long = "tier-max", value_parser = crate::args::at_least_one)]
    pub tier_max: Option<usize>,
    /// KV length assumed for decode predictions (default: min(ctx/4, 4096); at most the context).
    #[arg(long = "decode-depth", value_parser = crate::args::ctx_size)]
    pub decode_depth: Option<usize>,
    /// Registry output path (default: MODEL.gguf.pshard, or the per-user cache when read-only).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Show every strategy's prediction per tier and why it lost.
    #[arg(long = "explain")]
    pub explain: bool,
    /// Print the result as JSON.
    #[arg(long = "json")]
    pub json: bool,
}

fn default_profile(kind: ProfileKind) -> Option<PathBuf> {
    kind.cache_path().filter(|p| p.exists())
}

/// Free memory of GPU 0 as a fresh process sees it (our own context's cost added back, since the
/// plan's bill carries its own context margin) and the device name; `None` without a usable GPU.
fn gpu_free_mib() -> Option<(u64, String)> {
    use pshard_kernels::cuda;
    if cuda::device::device_count().ok()? == 0 {
        return None;
    }
    let dev = cuda::GpuDevice::open(0, None).ok()?;
    let info = dev.info();
    Some((
        (info.free_after_context + info.context_overhead) / MIB,
        info.name.clone(),
    ))
}

fn load_profile(
    path: Option<&Path>,
    kind: ProfileKind,
    what: &str,
) -> anyhow::Result<Option<Profile>> {
    let Some(path) = path else { return Ok(None) };
    let p = Profile::load(path).with_context(|| format!("reading the {what} profile"))?;
    if p.kind != kind {
        bail!(
            "{}: this is a {:?} profile, but it was given as the {what} profile",
            path.display(),
            p.kind
        );
    }
    Ok(Some(p))
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let kv_type = pshard_kernels::ops::KvType::parse(&args.kv_type)
        .map_err(|e| anyhow::anyhow!("--kv-type: {e}"))?
        .ggml();
    let cpu_path = args
        .cpu_profile
        .clone()
        .or_else(|| default_profile(ProfileKind::Cpu));
    let gpu_path = args
        .gpu_profile
        .clone()
        .or_else(|| default_profile(ProfileKind::Gpu));
    let cpu = load_profile(cpu_path.as_deref(), ProfileKind::Cpu, "CPU")?;
    let gpu = load_profile(gpu_path.as_deref(), ProfileKind::Gpu, "GPU")?;
    // The plan is for the machine the CPU profile measured, or this one.
    let (max_threads, whose) = match &cpu {
        Some(p) => (p.machine.cpu_threads as usize, "the CPU profile's machine"),
        None => (pshard_profiler::cli::hardware_threads(), "this machine"),
    };
    let threads = match args.threads {
        Some(t) if t > max_threads => bail!(
            "--threads {t}: {whose} has {max_threads} hardware threads (accepted: 1 to {max_threads})"
        ),
        Some(t) => t,
        None => pshard_profiler::cli::hardware_threads().min(max_threads),
    };
    let budget_mib = match args.vram_budget {
        Some(b) => b,
        None => match gpu_free_mib() {
            Some((free, name)) => {
                let b = free.saturating_sub(1024);
                eprintln!("VRAM budget: {b} MiB ({name}: {free} MiB free, minus 1 GiB)");
                b
            }
            None => match gpu.as_ref().and_then(|g| g.machine.gpu.as_ref()) {
                Some(g) => {
                    let b = (g.memory_bytes / MIB).saturating_sub(1024);
                    eprintln!("VRAM budget: {b} MiB (no GPU visible; the GPU profile's {} memory minus 1 GiB)", g.name);
                    b
                }
                None => bail!(
                    "--vram-budget MiB is required: no GPU is visible to the planner and no GPU profile gives its memory"
                ),
            },
        },
    };

    let file = ModelFile::open(&args.model)
        .with_context(|| format!("opening {}", args.model.display()))?;
    let spec = ModelSpec::from_file(&file)
        .with_context(|| format!("reading the model description of {}", args.model.display()))?;
    let splits: Vec<(&Path, u64, &[pshard_model::gguf::TensorInfo])> = file
        .paths()
        .iter()
        .zip(file.split_headers())
        .map(|(p, h)| (p.as_path(), h.data_offset, h.tensors.as_slice()))
        .collect();
    let fp = Fingerprint::of_splits(&splits)
        .with_context(|| format!("fingerprinting {}", args.model.display()))?;
    let train = spec.hparams.n_ctx_train;
    let ctx = match args.ctx {
        0 => train.min(4096),
        c if c > train => bail!(
            "-c {c}: exceeds the model's training context of {train} tokens (accepted: 1 to {train})"
        ),
        c => c,
    };
    if ctx.saturating_mul(args.parallel) > crate::args::MAX_CTX {
        bail!(
            "--parallel {} × -c {ctx}: more KV cells than the {} a context may hold",
            args.parallel,
            crate::args::MAX_CTX
        );
    }
    if let Some(d) = args.decode_depth.filter(|&d| d > ctx) {
        bail!("--decode-depth {d} exceeds the context of {ctx} (accepted: 0 to {ctx})");
    }

    let mut params = PlanParams::new(ctx);
    params.parallel = args.parallel;
    params.kv_type = kv_type;
    params.threads = threads;
    params.n_batch = args.n_batch;
    params.tier_max = args.tier_max;
    if let Some(d) = args.decode_depth {
        params.decode_depth = d;
    }
    let table = CostTable::new(cpu.as_ref(), gpu.as_ref(), threads);
    let graph = |s: &ModelSpec, n: usize, l: usize| {
        pshard_model::arch::build_graph(s, n, l).map_err(|e| e.to_string())
    };
    let t0 = std::time::Instant::now();
    let plan = search::plan(&spec, &graph, &table, &params, budget_mib * MIB)?;
    let elapsed = t0.elapsed();

    let profile_id = match (&cpu, &gpu) {
        (None, None) => "none".to_string(),
        _ => [cpu.as_ref(), gpu.as_ref()]
            .iter()
            .flatten()
            .map(|p| p.identity())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let section = registry::section_from_plan(&spec, fp, &params, &profile_id, &plan);
    let written = match &args.output {
        Some(path) => {
            registry::update(path, section).context("writing the registry")?;
            path.clone()
        }
        None => registry::save_for_model(&args.model, section).context("writing the registry")?,
    };

    let warning = (!table.is_measured()).then_some(
        "NO PROFILES: planning by VRAM fit alone. The t/s figures are NOMINAL guesses from generic numbers, \
         not predictions for this machine. Run `pshard profile cpu` and `pshard profile gpu`, or pass \
         --cpu-profile/--gpu-profile.",
    );
    let partial = match (&cpu, &gpu) {
        (Some(_), None) => Some("no GPU profile: GPU and PCIe numbers are nominal"),
        (None, Some(_)) => Some("no CPU profile: CPU numbers are nominal"),
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        print_json(
            &mut out,
            &spec,
            &plan,
            &params,
            (&args.model, &written),
            warning.or(partial),
            elapsed.as_secs_f64(),
        )?;
    } else {
        if let Some(w) = warning {
            eprintln!("\n!!! WARNING: {w}\n");
        } else if let Some(w) = partial {
            eprintln!("warning: {w}");
        }
        print_text(&mut out, &spec, &plan, &params, args.explain)?;
        writeln!(
            out,
            "registry: {} (planned in {:.0} ms)",
            written.display(),
            elapsed.as_secs_f64() * 1e3
        )?;
    }
    Ok(())
}

fn print_text(
    out: &mut impl Write,
    spec: &ModelSpec,
    plan: &Plan,
    params: &PlanParams,
    explain: bool,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{} ({} layers) · ctx {} × {} seq · KV {} · budget {} MiB · bill {} MiB (common {} + largest tier {} + context {}){}",
        spec.name,
        spec.layers.len(),
        params.n_ctx,
        params.parallel,
        params.kv_type.name().to_ascii_lowercase(),
        plan.budget / MIB,
        plan.bill().div_ceil(MIB),
        plan.common_bytes / MIB,
        plan.max_tier_bytes / MIB,
        plan.context_bytes / MIB,
        if plan.whole_model_fits { " · the whole model fits: one all-GPU plan" } else { "" }
    )?;
    writeln!(out, "map: one cell per layer — P pinned, S streamed, C CPU, X rows split CPU/stream, lowercase = partly pinned (p), streamed (s) or mixed CPU (c)")?;
    writeln!(
        out,
        "{:>7} {:>7}  {:<34} {:>11} {:>9}  map",
        "tokens", "ubatch", "strategy", "t/s", "VRAM MiB"
    )?;
    for t in &plan.tiers {
        let b = &t.best;
        let tps = if plan.measured {
            format!("{:.1}", b.eval.tps)
        } else {
            format!("~{:.0}", b.eval.tps)
        };
        writeln!(
            out,
            "{:>7} {:>7}  {:<34} {:>11} {:>9}  {}",
            t.tier.n,
            t.ubatch,
            b.strategy.name(),
            tps,
            b.bill.total().div_ceil(MIB),
            b.placement.layer_map(spec)
        )?;
        if explain {
            for (s, c, outcome) in &t.per_strategy {
                let why = match (outcome, c) {
                    (Outcome::Won, _) => "won".to_string(),
                    (Outcome::Slower, Some(c)) => format!(
                        "lost: {:.1} t/s ({:+.1}%) with {} layers pinned, {} MiB",
                        c.eval.tps,
                        (c.eval.tps / b.eval.tps - 1.0) * 100.0,
                        c.pinned_layers,
                        c.bill.total().div_ceil(MIB)
                    ),
                    (Outcome::NoFit(min), _) => {
                        format!("no fit: needs at least {} MiB", min.div_ceil(MIB))
                    }
                    (Outcome::Slower, None) => "lost".to_string(),
                };
                writeln!(out, "         {:<34} {why}", s.name())?;
            }
            if t.switch_in_s > 0.0 {
                writeln!(
                    out,
                    "         switching into this tier re-uploads pinned weights: {:.1} ms",
                    t.switch_in_s * 1e3
                )?;
            }
        }
    }
    let prompt = params.n_ctx;
    if let Some((ub, s)) = plan.best_ubatch(prompt) {
        writeln!(
            out,
            "optimal ubatch for a {prompt}-token prompt: {ub} ({:.2} s predicted)",
            s
        )?;
    }
    Ok(())
}

fn print_json(
    out: &mut impl Write,
    spec: &ModelSpec,
    plan: &Plan,
    params: &PlanParams,
    (model, written): (&Path, &Path),
    warning: Option<&str>,
    planning_s: f64,
) -> std::io::Result<()> {
    let tiers: Vec<serde_json::Value> = plan
        .tiers
        .iter()
        .map(|t| {
            let b = &t.best;
            json!({
                "tokens": t.tier.n,
                "kind": if t.tier.prefill { "prefill" } else { "decode" },
                "ubatch": t.ubatch,
                "strategy": b.strategy.name(),
                "tps": b.eval.tps,
                "vram_bytes": b.bill.total(),
                "pinned_layers": b.pinned_layers,
                "pinned_attn": b.pinned_attn,
                "split": b.split.map(|f| f.get()),
                "switch_ms": t.switch_in_s * 1e3,
                "map": b.placement.layer_map(spec),
                "strategies": t.per_strategy.iter().map(|(s, c, o)| json!({
                    "strategy": s.name(),
                    "tps": c.as_ref().map(|c| c.eval.tps),
                    "vram_bytes": c.as_ref().map(|c| c.bill.total()),
                    "outcome": match o {
                        Outcome::Won => json!("won"),
                        Outcome::Slower => json!("slower"),
                        Outcome::NoFit(m) => json!({ "no_fit_min_bytes": m }),
                    },
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let v = json!({
        "model": spec.name,
        "path": model.display().to_string(),
        "registry": written.display().to_string(),
        "budget_mib": plan.budget / MIB,
        "bill_bytes": plan.bill(),
        "common_bytes": plan.common_bytes,
        "max_tier_bytes": plan.max_tier_bytes,
        "context_bytes": plan.context_bytes,
        "whole_model": plan.whole_model_fits,
        "measured": plan.measured,
        "warning": warning,
        "planning_s": planning_s,
        "optimal_ubatch": plan.best_ubatch(params.n_ctx).map(|(ub, s)| json!({ "prompt": params.n_ctx, "ubatch": ub, "seconds": s })),
        "tiers": tiers,
    });
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    )
}
