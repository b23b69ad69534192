//! llama.cpp's habits. Its tools spell several flags with one dash and several letters (`-ngl`,
//! `-fa`, `-ub`); clap reads `-ngl` as `-n gl` and `-fa` as `-f a`, which gave misleading errors.
//! Before parsing, such a flag is rewritten to its long name when pshard gives it a meaning
//! ([`LlamaArgs`] says which), dropped when it asks for what pshard does anyway, and refused by
//! name otherwise.

use std::ffi::OsString;

use anyhow::bail;
use pshard_kernels::ops::KvType;

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
    /// llama.cpp's `-ctk`: KV cache type of K: f16 (default) or q8_0 (GGUF Q8_0 blocks, ~53%
    /// of f16's bytes). K and V share one type: given alone, it sets V's too.
    #[arg(long = "cache-type-k", value_name = "TYPE")]
    pub cache_type_k: Option<String>,
    /// llama.cpp's `-ctv`: KV cache type of V: f16 (default) or q8_0; as `-ctk`.
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
        self.kv_choice()?;
        Ok(())
    }

    /// The KV cache type `-ctk`/`-ctv` ask for (f16 without either); a note on stderr when one
    /// flag alone also set the other's type ([`LlamaArgs::kv_choice`]).
    pub fn kv_type(&self) -> anyhow::Result<KvType> {
        let (ty, note) = self.kv_choice()?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        Ok(ty)
    }

    /// pshard keeps K and V in one type: one flag alone sets both (with a note, since llama.cpp
    /// would keep the other in f16); two different types are refused.
    fn kv_choice(&self) -> anyhow::Result<(KvType, Option<String>)> {
        let parse = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<KvType>> {
            v.as_deref()
                .map(|s| KvType::parse(s).map_err(|e| anyhow::anyhow!("{flag} {s}: {e}")))
                .transpose()
        };
        let (k, v) = (
            parse("-ctk", &self.cache_type_k)?,
            parse("-ctv", &self.cache_type_v)?,
        );
        match (k, v) {
            (Some(k), Some(v)) if k != v => bail!(
                "-ctk {} with -ctv {}: pshard keeps K and V in one type; give the same type to both \
                 (e.g. -ctk {} -ctv {})",
                k.name(),
                v.name(),
                k.name(),
                k.name()
            ),
            (Some(t), None) | (None, Some(t)) if t != KvType::F16 => {
                let (given, other) = if k.is_some() {
                    ("-ctk", "V")
                } else {
                    ("-ctv", "K")
                };
                let note = format!(
                    "{given} {}: {other} is kept in {} too (pshard keeps K and V in one type)",
                    t.name(),
                    t.name()
                );
                Ok((t, Some(note)))
            }
            (k, v) => Ok((k.or(v).unwrap_or_default(), None)),
        }
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

    #[test]
    fn kv_cache_types_parse_and_pair() {
        let kv = |k: Option<&str>, v: Option<&str>| {
            LlamaArgs {
                cache_type_k: k.map(String::from),
                cache_type_v: v.map(String::from),
                ..Default::default()
            }
            .kv_type()
        };
        assert_eq!(kv(None, None).unwrap(), KvType::F16);
        assert_eq!(kv(Some("q8_0"), Some("Q8_0")).unwrap(), KvType::Q8_0);
        assert_eq!(kv(Some("q8_0"), None).unwrap(), KvType::Q8_0);
        assert_eq!(kv(None, Some("f16")).unwrap(), KvType::F16);
        let e = kv(Some("q4_0"), None).unwrap_err().to_string();
        assert!(
            e.contains("-ctk q4_0") && e.contains("accepted: f16, q8_0"),
            "{e}"
        );
        let e = kv(Some("q8_0"), Some("f16")).unwrap_err().to_string();
        assert!(e.contains("give the same type to both"), "{e}");
    }
}
