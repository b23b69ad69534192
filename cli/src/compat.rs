//! llama.cpp's habits. Its tools spell several flags with one dash and several letters (`-ngl`,
//! `-fa`, `-ub`); clap reads `-ngl` as `-n gl` and `-fa` as `-f a`, which gave misleading errors.
//! Before parsing, such a flag is rewritten to its long name when pshard gives it a meaning
//! ([`LlamaArgs`] says which), dropped when it asks for what pshard does anyway, and refused by
//! name otherwise.

use std::ffi::OsString;

use anyhow::bail;

/// llama.cpp spellings rewritten to pshard's long flags.
const SPELLINGS: &[(&str, &str)] = &[
    ("-ub", "--ubatch-size"),
    ("-ngl", "--n-gpu-layers"),
    ("-fa", "--flash-attn"),
    ("-cnv", "--conversation"),
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-sys", "--system"),
    ("-np", "--parallel"),
];

/// llama.cpp flags that ask for pshard's default behaviour: dropped.
const DEFAULTS: &[&str] = &["-no-cnv", "--no-conversation", "-cb", "--cont-batching"];

/// llama.cpp flags with no meaning in pshard: (spelling, llama.cpp's long name, what to use instead).
const UNSUPPORTED: &[(&str, &str, &str)] = &[
    (
        "-ot",
        "--override-tensor",
        "pshard places tensors itself (pshard plan)",
    ),
    (
        "-ncmoe",
        "--n-cpu-moe",
        "pshard places tensors itself (pshard plan)",
    ),
    (
        "-cmoe",
        "--cpu-moe",
        "pshard places tensors itself (pshard plan)",
    ),
    ("-sm", "--split-mode", "pshard runs on one GPU"),
    ("-ts", "--tensor-split", "pshard runs on one GPU"),
    ("-mg", "--main-gpu", "use --device cuda:N"),
    (
        "-dev",
        "--device",
        "pshard's --device takes auto, cpu, cuda or cuda:N",
    ),
    (
        "-nkvo",
        "--no-kv-offload",
        "the KV cache lives where its layer runs",
    ),
    (
        "-nocb",
        "--no-cont-batching",
        "`pshard serve` always batches continuously",
    ),
    (
        "-tb",
        "--threads-batch",
        "-t sets the threads of every step",
    ),
    ("-md", "--model-draft", "no speculative decoding"),
    ("-hf", "--hf-repo", "give a local GGUF with -m"),
    ("-hff", "--hf-file", "give a local GGUF with -m"),
    ("-mu", "--model-url", "give a local GGUF with -m"),
    ("-lv", "--verbosity", "use -v"),
    ("-mli", "--multiline-input", "no interactive mode"),
    ("-dt", "--defrag-thold", "the KV cache is not fragmented"),
    (
        "-nr",
        "--no-repack",
        "weights are used as they lie in the file",
    ),
];

/// Rewrites llama.cpp's multi-letter flags in a command line (program name first) to pshard's
/// spelling; an error names a llama.cpp flag pshard does not have. Arguments after `--` are left
/// alone.
pub fn rewrite(argv: impl IntoIterator<Item = OsString>) -> anyhow::Result<Vec<OsString>> {
    let mut out = Vec::new();
    let mut literal = false;
    for arg in argv {
        let Some(s) = arg.to_str().filter(|_| !literal) else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            literal = true;
        } else if let Some(&(_, long)) = SPELLINGS.iter().find(|(short, _)| *short == s) {
            out.push(long.into());
            continue;
        } else if DEFAULTS.contains(&s) {
            continue;
        } else if let Some(&(short, long, instead)) = UNSUPPORTED.iter().find(|u| u.0 == s) {
            bail!("`{short}` is llama.cpp's {long}, which pshard does not have: {instead}");
        }
        out.push(arg);
    }
    Ok(out)
}

/// llama.cpp flags that `run`, `perplexity` and `bench` accept, each answered honestly.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LlamaArgs {
    /// llama.cpp's `-ngl N`: a static plan with the last N layers on the GPU (N above the layer
    /// count adds the output projection; `all` is everything), the rest on the CPU — for
    /// comparison with llama.cpp. 0 runs on the CPU; -1 or `auto` lets pshard plan (the default).
    #[arg(
        long = "n-gpu-layers",
        visible_alias = "gpu-layers",
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = gpu_layers
    )]
    pub n_gpu_layers: Option<GpuLayers>,
    /// llama.cpp's `-fa [on|auto]`: accepted; attention is always fused (flash-style) here.
    #[arg(long = "flash-attn", value_name = "on|off|auto", num_args = 0..=1, default_missing_value = "on")]
    pub flash_attn: Option<String>,
    /// llama.cpp's `-ctk`: KV cache type of K. f16 (the only type the engine runs).
    #[arg(long = "cache-type-k", value_name = "TYPE")]
    pub cache_type_k: Option<String>,
    /// llama.cpp's `-ctv`: KV cache type of V. f16 (the only type the engine runs).
    #[arg(long = "cache-type-v", value_name = "TYPE")]
    pub cache_type_v: Option<String>,
}

/// What `-ngl` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuLayers {
    /// `-1` or `auto`: pshard's planner chooses (as without the flag).
    Auto,
    /// `all`: every layer and the output projection.
    All,
    /// The last N layers (N above the layer count adds the output projection).
    Count(usize),
}

impl GpuLayers {
    /// The layer count to pin of a model with `n_layer` layers; `None` for [`GpuLayers::Auto`].
    pub fn count(self, n_layer: usize) -> Option<usize> {
        match self {
            GpuLayers::Auto => None,
            GpuLayers::All => Some(n_layer + 1),
            GpuLayers::Count(n) => Some(n),
        }
    }
}

/// Parses `-ngl`: a count, `all`, or `-1`/`auto`.
fn gpu_layers(s: &str) -> Result<GpuLayers, String> {
    match s {
        "-1" | "auto" => Ok(GpuLayers::Auto),
        "all" => Ok(GpuLayers::All),
        _ => s.parse::<usize>().map(GpuLayers::Count).map_err(|_| {
            format!("'{s}' is not a layer count (accepted: 0 or more, all, or -1/auto)")
        }),
    }
}

impl LlamaArgs {
    /// Refuses what pshard cannot do, naming the flag; accepts the rest.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.flash_attn.as_deref() {
            None | Some("on" | "auto" | "1" | "true") => {}
            Some("off" | "0" | "false") => {
                bail!("-fa off: attention is always fused in pshard and cannot be turned off")
            }
            Some(other) => bail!("-fa {other}: expected on, off or auto"),
        }
        for (flag, ty) in [("-ctk", &self.cache_type_k), ("-ctv", &self.cache_type_v)] {
            match ty.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("f16") => {}
                Some("q8_0") => bail!(
                    "{flag} q8_0: a q8_0 KV cache is not runnable yet; the engine keeps K and V in f16"
                ),
                Some(other) => bail!("{flag} {other}: the engine's KV cache is f16 (the only type accepted)"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn spellings_are_rewritten_and_unknown_ones_named() {
        let out = rewrite(argv("pshard run -ngl 99 -fa -ub 16 -no-cnv -- -ngl")).unwrap();
        assert_eq!(
            out,
            argv("pshard run --n-gpu-layers 99 --flash-attn --ubatch-size 16 -- -ngl")
        );
        let e = rewrite(argv("pshard run -ot x=CPU"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`-ot` is llama.cpp's --override-tensor"), "{e}");
    }
}
