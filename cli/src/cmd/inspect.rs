//! `pshard inspect MODEL.gguf [--json]`: architecture, hparams, quant mix, bytes per role, a per-layer
//! table and KV bytes, all from the GGUF header.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use pshard_model::bytes;
use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::ModelFile;
use pshard_model::spec::{GroupId, GroupRole, Hparams, ModelSpec};
use serde::Serialize;

/// Arguments of `pshard inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file (for a split model, any of its files).
    #[arg(required_unless_present = "model_flag", conflicts_with = "model_flag")]
    pub model: Option<PathBuf>,
    /// The model file, as the other commands take it (`-m MODEL`).
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model_flag: Option<PathBuf>,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One element type of the quant mix.
#[derive(Serialize)]
struct TypeRow {
    ty: &'static str,
    tensors: usize,
    bytes: u64,
}

/// Bytes of all groups of one role.
#[derive(Serialize)]
struct RoleRow {
    role: &'static str,
    groups: usize,
    bytes: u64,
}

/// One transformer block.
#[derive(Serialize)]
struct LayerRow {
    layer: usize,
    /// `None` for global attention.
    window: Option<usize>,
    rope_base: f32,
    attn_bytes: u64,
    /// Dense FFN, or router + experts + shared experts.
    ffn_bytes: u64,
    attn_types: Vec<&'static str>,
    ffn_types: Vec<&'static str>,
}

/// The whole report (also the `--json` schema).
#[derive(Serialize)]
struct Report {
    file: String,
    file_bytes: u64,
    /// Sum of all tensor data in the file.
    file_tensor_bytes: u64,
    name: String,
    arch: &'static str,
    hparams: Hparams,
    global_layers: Vec<usize>,
    quant_mix: Vec<TypeRow>,
    roles: Vec<RoleRow>,
    layers: Vec<LayerRow>,
    kv_f16_bytes_per_token: u64,
    kv_q8_0_bytes_per_token: u64,
    /// f16 KV of 1024 tokens of one sequence in batches of 512 (sliding-window layers keep their
    /// window plus one batch).
    kv_f16_bytes_per_1k_tokens: u64,
    /// Tensor bytes the model uses, each tensor once.
    total_tensor_bytes: u64,
    /// File tensors the architecture does not use.
    unused_tensors: Vec<String>,
}

/// Distinct types of a group's matrices (1-D F32 norms and biases are left out), in order of first use.
fn group_types(spec: &ModelSpec, groups: &[GroupId]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for &g in groups {
        for &t in &spec.group(g).tensors {
            let t = spec.tensor(t);
            if t.dims.len() >= 2 && !out.contains(&t.ty.name()) {
                out.push(t.ty.name());
            }
        }
    }
    out
}

fn report(path: &std::path::Path, file: &ModelFile, spec: &ModelSpec) -> Report {
    let roles = [
        GroupRole::Embed,
        GroupRole::Attn,
        GroupRole::Ffn,
        GroupRole::Router,
        GroupRole::Experts,
        GroupRole::SharedExperts,
        GroupRole::OutputNorm,
        GroupRole::Output,
    ];
    let layers = spec
        .layers
        .iter()
        .map(|l| {
            let attn: Vec<GroupId> = l
                .groups
                .iter()
                .copied()
                .filter(|&g| spec.group(g).role == GroupRole::Attn)
                .collect();
            let ffn: Vec<GroupId> = l
                .groups
                .iter()
                .copied()
                .filter(|&g| spec.group(g).role != GroupRole::Attn)
                .collect();
            LayerRow {
                layer: l.index,
                window: l.window,
                rope_base: l.rope_base,
                attn_bytes: attn.iter().map(|&g| bytes::group_bytes(spec, g)).sum(),
                ffn_bytes: ffn.iter().map(|&g| bytes::group_bytes(spec, g)).sum(),
                attn_types: group_types(spec, &attn),
                ffn_types: group_types(spec, &ffn),
            }
        })
        .collect();
    Report {
        file: path.display().to_string(),
        file_bytes: file.file_size(),
        file_tensor_bytes: file.tensor_data_bytes(),
        name: spec.name.clone(),
        arch: spec.arch.gguf_name(),
        hparams: spec.hparams.clone(),
        global_layers: spec
            .layers
            .iter()
            .filter(|l| l.window.is_none())
            .map(|l| l.index)
            .collect(),
        quant_mix: bytes::type_mix(spec)
            .into_iter()
            .map(|(ty, tensors, bytes)| TypeRow {
                ty: ty.name(),
                tensors,
                bytes,
            })
            .collect(),
        roles: roles
            .iter()
            .map(|&r| RoleRow {
                role: r.as_str(),
                groups: spec.groups.iter().filter(|g| g.role == r).count(),
                bytes: bytes::role_bytes(spec, r),
            })
            .filter(|r| r.groups > 0)
            .collect(),
        layers,
        kv_f16_bytes_per_token: bytes::kv_bytes_per_token(spec, GgmlType::F16),
        kv_q8_0_bytes_per_token: bytes::kv_bytes_per_token(spec, GgmlType::Q8_0),
        kv_f16_bytes_per_1k_tokens: bytes::kv_bytes(spec, GgmlType::F16, 1024, 512, 1),
        total_tensor_bytes: bytes::file_bytes(spec),
        unused_tensors: spec
            .unused_file_tensors(file.tensors().len())
            .into_iter()
            .map(|i| file.tensors()[i].name.clone())
            .collect(),
    }
}

/// Human-readable bytes (binary units).
fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn print_text(out: &mut impl Write, r: &Report) -> std::io::Result<()> {
    let h = &r.hparams;
    writeln!(
        out,
        "file          {} ({}, tensor data {})",
        r.file,
        human(r.file_bytes),
        human(r.file_tensor_bytes)
    )?;
    writeln!(out, "name          {}", r.name)?;
    writeln!(out, "architecture  {}", r.arch)?;
    writeln!(out, "layers        {}", h.n_layer)?;
    writeln!(out, "embedding     {}", h.n_embd)?;
    writeln!(out, "heads         {} (kv heads {})", h.n_head, h.n_head_kv)?;
    writeln!(
        out,
        "head_dim      {} (k) / {} (v)",
        h.head_dim_k, h.head_dim_v
    )?;
    writeln!(out, "vocab         {}", h.n_vocab)?;
    if h.n_expert > 0 {
        writeln!(
            out,
            "experts       {} (used {}, width {}{}, renormalised: {})",
            h.n_expert,
            h.n_expert_used,
            h.n_ff_expert,
            if h.n_ff_shared_expert > 0 {
                format!(", shared width {}", h.n_ff_shared_expert)
            } else {
                String::new()
            },
            h.expert_weights_norm
        )?;
    } else {
        writeln!(out, "ffn           {}", h.n_ff)?;
    }
    writeln!(out, "context       {} (training)", h.n_ctx_train)?;
    writeln!(
        out,
        "rope          {:?}, {} dims, base {}{}{}",
        h.rope_mode,
        h.rope_dims,
        h.rope_base,
        if h.rope_base_local != h.rope_base {
            format!(" (local layers {})", h.rope_base_local)
        } else {
            String::new()
        },
        if h.rope_linear_scale != 1.0 {
            format!(", linear scale {}", h.rope_linear_scale)
        } else {
            String::new()
        },
    )?;
    if let Some(w) = h.sliding_window {
        writeln!(
            out,
            "window        {} (sliding; global layers: {:?})",
            w, r.global_layers
        )?;
    }
    writeln!(out, "norm eps      {:e}", h.norm_eps)?;
    writeln!(
        out,
        "embeddings    {}{}",
        if h.tied_embeddings { "tied" } else { "untied" },
        if h.embed_scale != 1.0 {
            format!(", scaled by {:.3}", h.embed_scale)
        } else {
            String::new()
        }
    )?;
    if let Some(c) = h.attn_softcap {
        writeln!(out, "attn softcap  {c}")?;
    }
    if let Some(c) = h.final_softcap {
        writeln!(out, "final softcap {c}")?;
    }
    writeln!(out)?;
    writeln!(out, "quant mix")?;
    for t in &r.quant_mix {
        writeln!(
            out,
            "  {:<8} {:>5} tensors {:>14} bytes  {:>11}",
            t.ty,
            t.tensors,
            t.bytes,
            human(t.bytes)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "bytes per role{}",
        if h.tied_embeddings {
            " (output = the tied embedding table)"
        } else {
            ""
        }
    )?;
    for g in &r.roles {
        writeln!(
            out,
            "  {:<12} {:>4} groups {:>14} bytes  {:>11}",
            g.role,
            g.groups,
            g.bytes,
            human(g.bytes)
        )?;
    }
    writeln!(out)?;
    let ffn_head = if h.n_expert > 0 {
        "moe bytes"
    } else {
        "ffn bytes"
    };
    writeln!(
        out,
        "{:>5}  {:<11} {:>10}  {:>12}  {:>12}  {:<20} ffn types",
        "layer", "attention", "rope base", "attn bytes", ffn_head, "attn types"
    )?;
    for l in &r.layers {
        let att = match l.window {
            Some(w) => format!("window {w}"),
            None => "global".to_string(),
        };
        writeln!(
            out,
            "{:>5}  {:<11} {:>10}  {:>12}  {:>12}  {:<20} {}",
            l.layer,
            att,
            l.rope_base,
            l.attn_bytes,
            l.ffn_bytes,
            l.attn_types.join(","),
            l.ffn_types.join(",")
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "KV cache      f16 {} per token ({} per 1k tokens{}), q8_0 {} per token",
        human(r.kv_f16_bytes_per_token),
        human(r.kv_f16_bytes_per_1k_tokens),
        if h.sliding_window.is_some() {
            ", windowed layers capped"
        } else {
            ""
        },
        human(r.kv_q8_0_bytes_per_token)
    )?;
    writeln!(
        out,
        "total         {} tensor bytes ({}), file tensor data {} bytes{}",
        r.total_tensor_bytes,
        human(r.total_tensor_bytes),
        r.file_tensor_bytes,
        if r.total_tensor_bytes == r.file_tensor_bytes {
            " (all accounted for)"
        } else {
            ""
        }
    )?;
    if !r.unused_tensors.is_empty() {
        writeln!(
            out,
            "unused        {} file tensors: {}",
            r.unused_tensors.len(),
            r.unused_tensors.join(", ")
        )?;
    }
    Ok(())
}

/// Runs `pshard inspect`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let path = args
        .model
        .as_ref()
        .or(args.model_flag.as_ref())
        .context("give the model as an argument or with -m")?;
    if !path.exists() {
        bail!("model file not found: {}", path.display());
    }
    if path.is_dir() {
        bail!("{} is a directory, not a GGUF file", path.display());
    }
    let file = ModelFile::open(path).map_err(anyhow::Error::new)?;
    let spec = ModelSpec::from_file(&file)
        .with_context(|| format!("{}: cannot describe the model", path.display()))?;
    let r = report(path, &file, &spec);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
    } else {
        print_text(&mut out, &r)?;
    }
    out.flush()?;
    Ok(())
}
