//! `pshard synth PRESET --quant RECIPE [-o OUT.gguf] [--seed N]`, `pshard synth --list`: write a GGUF with
//! random weights and the exact layout and metadata of a real model.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pshard_model::synth::{plan, preset, preset_names, write_synth, QuantRecipe};

/// Arguments of `pshard synth`.
#[derive(clap::Args)]
pub struct Args {
    /// Preset to write (see --list).
    #[arg(required_unless_present = "list")]
    pub preset: Option<String>,
    /// Quantization recipe: f16, q8_0, q4_0, q4_k (Q4_K + Q6_K output), q4_k_m, iq4_nl, iq4_xs,
    /// mxfp4_moe (llama.cpp's mixes), mxfp4 (every matrix MXFP4).
    #[arg(long, short = 'q', default_value = "q4_k")]
    pub quant: String,
    /// Output file [default: PRESET-RECIPE.gguf].
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Seed of the random weights (same seed, same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// List the presets with their sizes and exit.
    #[arg(long)]
    pub list: bool,
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn list() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<15} {:<9} {:>6} {:>6} {:>8} {:>9} {:>8} {:>10}  q4_k size",
        "preset", "arch", "layers", "embd", "heads", "head_dim", "experts", "vocab"
    )?;
    for name in preset_names() {
        let Some(p) = preset(name) else { continue };
        let size = plan(&p, QuantRecipe::Q4_K).tensor_bytes();
        let experts = if p.n_expert > 0 {
            format!("{}/{}", p.n_expert_used, p.n_expert)
        } else {
            "-".to_string()
        };
        writeln!(
            out,
            "{:<15} {:<9} {:>6} {:>6} {:>8} {:>9} {:>8} {:>10}  {:.2} GiB ({} bytes)",
            p.name,
            p.arch.gguf_name(),
            p.n_layer,
            p.n_embd,
            format!("{}/{}", p.n_head, p.n_head_kv),
            p.head_dim,
            experts,
            p.n_vocab,
            gib(size),
            size
        )?;
    }
    let recipes: Vec<&str> = QuantRecipe::ALL.iter().map(|r| r.name()).collect();
    writeln!(out, "\nrecipes: {}", recipes.join(", "))?;
    out.flush()
}

/// A temporary path next to `out`, renamed over it when complete.
fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synth.gguf".into());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Runs `pshard synth`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.list {
        return Ok(list()?);
    }
    let name = args
        .preset
        .as_deref()
        .ok_or_else(|| anyhow!("a preset name is required (see --list)"))?;
    let p = preset(name).ok_or_else(|| {
        anyhow!(
            "unknown preset '{name}' (presets: {})",
            preset_names().join(", ")
        )
    })?;
    let recipe = QuantRecipe::from_name(&args.quant).ok_or_else(|| {
        let names: Vec<&str> = QuantRecipe::ALL.iter().map(|r| r.name()).collect();
        anyhow!(
            "unknown quant recipe '{}' (recipes: {})",
            args.quant,
            names.join(", ")
        )
    })?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-{}.gguf", p.name, recipe.name())));
    if out.is_dir() {
        bail!("output {} is a directory", out.display());
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("output directory {} does not exist", dir.display());
        }
    }
    let tmp = temp_path(&out);
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let bar = ProgressBar::new(plan(&p, recipe).tensor_bytes());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .map_err(|e| anyhow!("progress bar template: {e}"))?,
    );
    let start = Instant::now();
    let result = write_synth(
        &p,
        recipe,
        args.seed,
        BufWriter::with_capacity(8 << 20, file),
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
    .and_then(|f| f.sync_all());
    bar.finish_and_clear();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!(e).context(format!("writing {}", out.display())));
    }
    if let Err(e) = std::fs::rename(&tmp, &out) {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!(e).context(format!("renaming {} to {}", tmp.display(), out.display())));
    }
    let secs = start.elapsed().as_secs_f64();
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let tensors = plan(&p, recipe).tensor_bytes();
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "wrote {}: {} bytes ({:.2} GiB; tensor data {:.2} GiB) in {:.2} s ({:.2} GB/s)",
        out.display(),
        size,
        gib(size),
        gib(tensors),
        secs,
        size as f64 / secs.max(1e-9) / 1e9
    )?;
    Ok(())
}
