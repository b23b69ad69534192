//! Model catalogue: builds a [`ModelSpec`] from a GGUF header alone.
//!
//! Supported architectures: `llama` (Llama 2/3, Mistral, SmolLM; Mixtral-style MoE when
//! `llama.expert_count` > 0), `qwen2`, `qwen3`, `qwen3moe`, `gemma3`, `gpt-oss`, `glm4moe` and
//! `deepseek2` (multi-head latent attention files). Hparams are read as llama.cpp reads them (its
//! per-architecture `load_arch_hparams`), facts it hard-codes included. Every tensor the forward
//! pass needs is looked up by its GGUF name and its shape is checked against the hparams; a
//! missing or ill-shaped tensor is an error naming the tensor and the expected shape.
//!
//! Layout of the result:
//! - tensors: `token_embd`, then each layer's tensors in execution order, then `output_norm`,
//!   `rope_freqs` (if present) and `output` (if not tied);
//! - groups: `embed`, then per layer `attn` followed by `ffn` (dense, including the leading dense
//!   layers of glm4moe and deepseek2) or `router`, `experts` and `shared` (MoE), then
//!   `output_norm` and `output`. Multi-token-prediction layers (`nextn_predict_layers`) are not
//!   part of the spec.
//!
//! `rope_freqs.weight` (llama3 rope scaling) is global and tiny; it is placed in the **output_norm**
//! group so that it is a normal placed tensor, and recorded in [`ModelSpec::rope_freqs`]. Every layer's
//! rope reads it, so a runtime should keep a copy of it wherever attention runs.
//!
//! When embeddings are tied, the `output` group lists the `token_embd` tensor and its `bytes` counts the
//! embedding table again (what a placement of that group must hold); [`crate::bytes::file_bytes`] counts
//! each tensor once.

use std::collections::HashMap;

use crate::gguf::{GgufHeader, MetaValue, ModelFile, TensorInfo};
use crate::spec::{
    Arch, Gating, GroupId, GroupRole, Hparams, LayerSpec, Mla, ModelSpec, RopeMode, TensorDesc,
    TensorGroup, TensorId, TensorRole, Yarn,
};

/// Rope base of gemma3's sliding-window layers when the GGUF has no `gemma3.rope.freq_base_swa`
/// (llama.cpp's default, `rope_freq_base_train_swa` in src/llama-hparams.h).
pub const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;
/// gemma3's sliding-window period when the GGUF has no `gemma3.attention.sliding_window_pattern`:
/// layer `il` attends globally when `il % 6 == 5` (llama.cpp's `load_swa_pattern(ml, 6)` in
/// src/models/gemma3.cpp).
pub const GEMMA3_GLOBAL_EVERY: usize = 6;

/// Why a GGUF header could not be turned into a [`ModelSpec`].
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `general.architecture` names an architecture the catalogue does not know.
    #[error("unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArch {
        /// The file's architecture string.
        arch: String,
        /// Comma-separated supported names.
        supported: String,
    },
    /// A required metadata key is absent.
    #[error("missing metadata key '{key}'")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key has the wrong type or an impossible value.
    #[error("metadata key '{key}': {what}")]
    BadKey {
        /// The key.
        key: String,
        /// What was wrong.
        what: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("missing tensor '{name}' (expected shape {expected:?})")]
    MissingTensor {
        /// GGUF tensor name.
        name: String,
        /// Expected dims, ggml order.
        expected: Vec<u64>,
    },
    /// A tensor has a shape that does not match the hparams.
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    IllShapedTensor {
        /// GGUF tensor name.
        name: String,
        /// Expected dims, ggml order.
        expected: Vec<u64>,
        /// Dims in the file.
        found: Vec<u64>,
    },
    /// `{arch}.rope.scaling.type` names a scaling the engine does not implement.
    #[error("unsupported rope scaling type '{kind}' (supported: none, linear, yarn; llama3 scaling via rope_freqs.weight)")]
    UnsupportedRopeScaling {
        /// The scaling type string.
        kind: String,
    },
    /// A layout the catalogue recognises but does not support.
    #[error("unsupported model layout: {what}")]
    Unsupported {
        /// What is unsupported and what to do.
        what: String,
    },
}

const SUPPORTED: &str = "llama, qwen2, qwen3, qwen3moe, gemma3, gpt-oss, glm4moe, deepseek2";

/// Looks up a metadata value by key.
fn meta<'a>(h: &'a GgufHeader, key: &str) -> Option<&'a MetaValue> {
    h.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// An unsigned integer key (any integer type; negative values are an error).
fn meta_uint(h: &GgufHeader, key: &str) -> Result<Option<u64>, SpecError> {
    let bad = |what: &str| SpecError::BadKey {
        key: key.to_string(),
        what: what.to_string(),
    };
    let v = match meta(h, key) {
        None => return Ok(None),
        Some(v) => v,
    };
    let signed = |x: i64| u64::try_from(x).map_err(|_| bad("negative value"));
    Ok(Some(match v {
        MetaValue::U8(x) => *x as u64,
        MetaValue::U16(x) => *x as u64,
        MetaValue::U32(x) => *x as u64,
        MetaValue::U64(x) => *x,
        MetaValue::I8(x) => signed(*x as i64)?,
        MetaValue::I16(x) => signed(*x as i64)?,
        MetaValue::I32(x) => signed(*x as i64)?,
        MetaValue::I64(x) => signed(*x)?,
        // Some converters write per-layer arrays (e.g. head_count_kv); accept them when uniform.
        MetaValue::Array(_, items) => {
            let mut vals = Vec::with_capacity(items.len());
            for it in items {
                vals.push(match it {
                    MetaValue::U8(x) => *x as u64,
                    MetaValue::U16(x) => *x as u64,
                    MetaValue::U32(x) => *x as u64,
                    MetaValue::U64(x) => *x,
                    MetaValue::I32(x) => signed(*x as i64)?,
                    MetaValue::I64(x) => signed(*x)?,
                    _ => return Err(bad("array of non-integers")),
                });
            }
            match vals.first() {
                Some(&first) if vals.iter().all(|&v| v == first) => first,
                Some(_) => {
                    return Err(bad(
                        "per-layer values differ; only uniform models are supported",
                    ))
                }
                None => return Err(bad("empty array")),
            }
        }
        _ => return Err(bad("expected an integer")),
    }))
}

fn meta_uint_req(h: &GgufHeader, key: &str) -> Result<u64, SpecError> {
    meta_uint(h, key)?.ok_or_else(|| SpecError::MissingKey {
        key: key.to_string(),
    })
}

fn meta_f32(h: &GgufHeader, key: &str) -> Result<Option<f32>, SpecError> {
    Ok(match meta(h, key) {
        None => None,
        Some(MetaValue::F32(x)) => Some(*x),
        Some(MetaValue::F64(x)) => Some(*x as f32),
        Some(_) => {
            return Err(SpecError::BadKey {
                key: key.to_string(),
                what: "expected a float".to_string(),
            })
        }
    })
}

fn meta_str<'a>(h: &'a GgufHeader, key: &str) -> Result<Option<&'a str>, SpecError> {
    match meta(h, key) {
        None => Ok(None),
        Some(MetaValue::String(s)) => Ok(Some(s)),
        Some(_) => Err(SpecError::BadKey {
            key: key.to_string(),
            what: "expected a string".to_string(),
        }),
    }
}

fn to_usize(key: &str, v: u64) -> Result<usize, SpecError> {
    usize::try_from(v).map_err(|_| SpecError::BadKey {
        key: key.to_string(),
        what: format!("value {v} too large"),
    })
}

/// Largest size or count hparam accepted: ggml keeps them in 32 bits, and the bound keeps every
/// product of two (a tensor dimension such as `head_count × key_length`) inside `u64`.
pub const MAX_HPARAM: u64 = u32::MAX as u64;

/// A size or count hparam that may be 0 (e.g. `expert_count` of a dense model), at most [`MAX_HPARAM`].
fn count(key: &str, v: u64) -> Result<usize, SpecError> {
    if v > MAX_HPARAM {
        return Err(SpecError::BadKey {
            key: key.to_string(),
            what: format!("{v} is out of range (accepted: 0..={MAX_HPARAM})"),
        });
    }
    to_usize(key, v)
}

/// A size or count hparam in 1..=[`MAX_HPARAM`].
fn nonzero(key: &str, v: u64) -> Result<usize, SpecError> {
    if v == 0 || v > MAX_HPARAM {
        return Err(SpecError::BadKey {
            key: key.to_string(),
            what: format!("{v} is out of range (accepted: 1..={MAX_HPARAM})"),
        });
    }
    to_usize(key, v)
}

/// A float hparam, checked to be finite, above `lo` and below `hi` when given.
fn float_in(key: &str, v: f32, lo: f32, hi: Option<f32>) -> Result<f32, SpecError> {
    if v.is_finite() && v > lo && hi.is_none_or(|h| v < h) {
        return Ok(v);
    }
    let range = match hi {
        Some(h) => format!("finite, above {lo} and below {h}"),
        None => format!("finite and above {lo}"),
    };
    Err(SpecError::BadKey {
        key: key.to_string(),
        what: format!("{v} is out of range (accepted: {range})"),
    })
}

/// The number of transformer blocks the tensor table holds: one more than the largest `N` of a
/// `blk.N.` tensor name (0 when there is none; `u64::MAX` for an index too long to parse).
fn blocks_in_tensors(tensors: &[TensorInfo]) -> u64 {
    tensors
        .iter()
        .filter_map(|t| {
            let rest = t.name.strip_prefix("blk.")?;
            let digits = rest.split('.').next()?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(
                digits
                    .parse::<u64>()
                    .map_or(u64::MAX, |n| n.saturating_add(1)),
            )
        })
        .max()
        .unwrap_or(0)
}

/// Dims with trailing 1s removed (keeping at least one), so `[n]` and `[n, 1]` compare equal.
fn trimmed(dims: &[u64]) -> &[u64] {
    let mut n = dims.len();
    while n > 1 && dims[n - 1] == 1 {
        n -= 1;
    }
    &dims[..n]
}

/// Collects tensors and groups while the spec is assembled.
struct Builder<'a> {
    by_name: HashMap<&'a str, usize>,
    infos: &'a [TensorInfo],
    tensors: Vec<TensorDesc>,
    groups: Vec<TensorGroup>,
}

impl<'a> Builder<'a> {
    fn new(infos: &'a [TensorInfo]) -> Self {
        let by_name = infos
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        Builder {
            by_name,
            infos,
            tensors: Vec::new(),
            groups: Vec::new(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn new_group(&mut self, role: GroupRole, layer: Option<usize>) -> GroupId {
        self.groups.push(TensorGroup {
            role,
            layer,
            tensors: Vec::new(),
            bytes: 0,
        });
        GroupId(self.groups.len() as u32 - 1)
    }

    /// Adds a required tensor after checking its shape.
    fn add(
        &mut self,
        group: GroupId,
        name: String,
        role: TensorRole,
        layer: Option<usize>,
        expected: &[u64],
    ) -> Result<TensorId, SpecError> {
        let Some(&file_index) = self.by_name.get(name.as_str()) else {
            return Err(SpecError::MissingTensor {
                name,
                expected: expected.to_vec(),
            });
        };
        let info = &self.infos[file_index];
        if trimmed(&info.dims) != trimmed(expected) {
            return Err(SpecError::IllShapedTensor {
                name,
                expected: expected.to_vec(),
                found: info.dims.clone(),
            });
        }
        let id = TensorId(self.tensors.len() as u32);
        self.tensors.push(TensorDesc {
            name,
            role,
            layer,
            group,
            ty: info.ty,
            dims: info.dims.clone(),
            bytes: info.bytes,
            file_index,
        });
        let g = &mut self.groups[group.0 as usize];
        g.tensors.push(id);
        g.bytes += info.bytes;
        Ok(id)
    }

    /// Adds a tensor if the file has it.
    fn add_opt(
        &mut self,
        group: GroupId,
        name: String,
        role: TensorRole,
        layer: Option<usize>,
        expected: &[u64],
    ) -> Result<Option<TensorId>, SpecError> {
        if self.has(&name) {
            self.add(group, name, role, layer, expected).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl ModelSpec {
    /// Builds a spec from a GGUF header and its tensor table (`tensors[i]` has file index `i`; for split
    /// models pass [`ModelFile::tensors`]). `fallback_name` is used when `general.name` is absent.
    pub fn from_gguf(
        header: &GgufHeader,
        tensors: &[TensorInfo],
        fallback_name: &str,
    ) -> Result<ModelSpec, SpecError> {
        let arch_name =
            meta_str(header, "general.architecture")?.ok_or_else(|| SpecError::MissingKey {
                key: "general.architecture".to_string(),
            })?;
        let arch = Arch::from_gguf_name(arch_name).ok_or_else(|| SpecError::UnsupportedArch {
            arch: arch_name.to_string(),
            supported: SUPPORTED.to_string(),
        })?;
        let name = meta_str(header, "general.name")?
            .unwrap_or(fallback_name)
            .to_string();
        let a = arch.gguf_name();
        let k = |s: &str| format!("{a}.{s}");

        let n_embd = nonzero(
            &k("embedding_length"),
            meta_uint_req(header, &k("embedding_length"))?,
        )?;
        // block_count counts the multi-token-prediction layers too (llama.cpp's n_layer_all);
        // the decoder runs the ones before them.
        let n_layer_all = nonzero(&k("block_count"), meta_uint_req(header, &k("block_count"))?)?;
        // Before anything is sized by it: the layer count must be the one the tensors hold.
        let present = blocks_in_tensors(tensors);
        if present != n_layer_all as u64 {
            return Err(SpecError::BadKey {
                key: k("block_count"),
                what: format!(
                    "{n_layer_all}, but the file's tensors hold {present} blocks (blk.0 … blk.{})",
                    present.saturating_sub(1)
                ),
            });
        }
        let n_nextn_layers = count(
            &k("nextn_predict_layers"),
            meta_uint(header, &k("nextn_predict_layers"))?.unwrap_or(0),
        )?;
        if n_nextn_layers >= n_layer_all {
            return Err(SpecError::BadKey {
                key: k("nextn_predict_layers"),
                what: format!("{n_nextn_layers} leaves no decoder layer of {n_layer_all}"),
            });
        }
        let n_layer = n_layer_all - n_nextn_layers;
        let n_head = nonzero(
            &k("attention.head_count"),
            meta_uint_req(header, &k("attention.head_count"))?,
        )?;
        let n_head_kv = match meta_uint(header, &k("attention.head_count_kv"))? {
            Some(v) => nonzero(&k("attention.head_count_kv"), v)?,
            None => n_head,
        };
        if n_head % n_head_kv != 0 {
            return Err(SpecError::BadKey {
                key: k("attention.head_count_kv"),
                what: format!("{n_head_kv} does not divide head_count {n_head}"),
            });
        }
        let head_dim_k = match meta_uint(header, &k("attention.key_length"))? {
            Some(v) => nonzero(&k("attention.key_length"), v)?,
            None => {
                if n_embd % n_head != 0 {
                    return Err(SpecError::MissingKey {
                        key: k("attention.key_length"),
                    });
                }
                n_embd / n_head
            }
        };
        let head_dim_v = match meta_uint(header, &k("attention.value_length"))? {
            Some(v) => nonzero(&k("attention.value_length"), v)?,
            None => head_dim_k,
        };
        let n_ctx_train = nonzero(
            &k("context_length"),
            meta_uint_req(header, &k("context_length"))?,
        )?;
        let eps_key = k("attention.layer_norm_rms_epsilon");
        let norm_eps = float_in(
            &eps_key,
            meta_f32(header, &eps_key)?.ok_or_else(|| SpecError::MissingKey {
                key: eps_key.clone(),
            })?,
            0.0,
            Some(1.0),
        )?;
        // Frequencies are base^(−2i/d): a base at or below 1 does not rotate slower with i.
        let rope_base = match meta_f32(header, &k("rope.freq_base"))? {
            Some(b) => float_in(&k("rope.freq_base"), b, 1.0, None)?,
            None => 10_000.0,
        };
        let rope_dims = match meta_uint(header, &k("rope.dimension_count"))? {
            Some(v) => nonzero(&k("rope.dimension_count"), v)?,
            None => head_dim_k,
        };
        if rope_dims > head_dim_k || rope_dims % 2 != 0 {
            return Err(SpecError::BadKey {
                key: k("rope.dimension_count"),
                what: format!("{rope_dims} must be even and at most head_dim {head_dim_k}"),
            });
        }
        let (rope_linear_scale, rope_kind) = rope_scale(header, a)?;
        let rope_mode = match arch {
            Arch::Llama | Arch::Deepseek2 => RopeMode::Adjacent,
            Arch::Qwen2
            | Arch::Qwen3
            | Arch::Qwen3Moe
            | Arch::Gemma3
            | Arch::GptOss
            | Arch::Glm4Moe => RopeMode::Neox,
        };
        // The vocabulary size as llama.cpp's hparams see it (before the tensors are read).
        let vocab_hint = meta_uint(header, &k("vocab_size"))?.or_else(|| {
            match meta(header, "tokenizer.ggml.tokens") {
                Some(MetaValue::Array(_, v)) => Some(v.len() as u64),
                _ => None,
            }
        });
        let mla = if arch == Arch::Deepseek2 {
            Some(mla_hparams(
                header,
                tensors,
                a,
                n_layer,
                vocab_hint,
                (n_head_kv, head_dim_k, head_dim_v, rope_dims),
            )?)
        } else {
            None
        };

        let moe = moe_hparams(header, arch, a, n_layer)?;
        let dense_layers = if moe.n_expert == 0 {
            n_layer
        } else {
            moe.n_layer_dense_lead.min(n_layer)
        };
        let n_ff = if dense_layers > 0 {
            nonzero(
                &k("feed_forward_length"),
                meta_uint(header, &k("feed_forward_length"))?.ok_or_else(|| {
                    SpecError::MissingKey {
                        key: k("feed_forward_length"),
                    }
                })?,
            )?
        } else {
            0
        };
        // gemma3 and gpt-oss as llama.cpp reads them (load_arch_hparams in src/models/gemma3.cpp,
        // openai-moe.cpp): gemma3's window is optional (absent or 0: every layer attends
        // globally), gpt-oss's is required; with one, the per-layer pattern (default period: 6
        // and 2) and the local rope base come from the GGUF when present.
        let (sliding_window, swa_layers) = match arch {
            Arch::Gemma3 | Arch::GptOss => {
                let key = k("attention.sliding_window");
                let w = match (arch, meta_uint(header, &key)?) {
                    (Arch::GptOss, None) => return Err(SpecError::MissingKey { key }),
                    (_, w) => w.unwrap_or(0),
                };
                if w > 0 {
                    let period = if arch == Arch::Gemma3 {
                        GEMMA3_GLOBAL_EVERY
                    } else {
                        GPT_OSS_GLOBAL_EVERY
                    };
                    (
                        Some(to_usize(&key, w)?),
                        swa_pattern(
                            header,
                            &k("attention.sliding_window_pattern"),
                            n_layer,
                            period,
                        )?,
                    )
                } else {
                    (None, vec![false; n_layer])
                }
            }
            _ => (None, vec![false; n_layer]),
        };
        let rope_base_swa = if sliding_window.is_some() {
            let default = if arch == Arch::Gemma3 {
                GEMMA3_LOCAL_ROPE_BASE
            } else {
                rope_base
            };
            meta_f32(header, &k("rope.freq_base_swa"))?.unwrap_or(default)
        } else {
            rope_base
        };
        // llama.cpp's rope_freq_scale_train_swa: 1 for gemma3, the global scale for gpt-oss.
        let rope_linear_scale_swa = if arch == Arch::GptOss {
            rope_linear_scale
        } else {
            1.0
        };
        let (yarn, attn_factor_org) =
            yarn_params(header, a, arch, rope_kind, rope_linear_scale, n_ctx_train)?;
        let attn_scale = match (arch, mla) {
            // deepseek2 pre-scales the scores by its YaRN mscale squared
            // (src/models/deepseek2.cpp), over the decompressed key width.
            (Arch::Deepseek2, Some(m)) => {
                let log_mul = meta_f32(header, &k("rope.scaling.yarn_log_multiplier"))?
                    .map_or(0.0, |v| v / 0.1);
                let mscale = attn_factor_org * (1.0 + 0.1 * log_mul * rope_linear_scale.ln());
                mscale * mscale / ((m.nope + rope_dims) as f32).sqrt()
            }
            // gemma3 27B (62 layers) scales by the width per head (src/models/gemma3.cpp).
            (Arch::Gemma3, _) if n_layer == 62 => 1.0 / ((n_embd / n_head) as f32).sqrt(),
            _ => 1.0 / (head_dim_k as f32).sqrt(),
        };
        // No catalogued architecture applies attention logit softcapping in llama.cpp (gemma2
        // and grok do; gemma3 ignores `attn_logit_softcapping`); only gemma3 reads
        // `final_logit_softcapping` (0 or absent: none).
        let attn_softcap = None;
        let final_softcap = if arch == Arch::Gemma3 {
            let key = k("final_logit_softcapping");
            meta_f32(header, &key)?
                .filter(|&c| c != 0.0)
                .map(|c| float_in(&key, c, 0.0, None))
                .transpose()?
        } else {
            None
        };
        let embed_scale = if arch == Arch::Gemma3 {
            (n_embd as f32).sqrt()
        } else {
            1.0
        };

        // Older Mixtral conversions stored one 2-D tensor per expert.
        let per_expert = [
            "blk.0.ffn_gate.0.weight",
            "blk.0.ffn_up.0.weight",
            "blk.0.ffn_down.0.weight",
        ];
        if tensors
            .iter()
            .any(|t| per_expert.contains(&t.name.as_str()))
        {
            return Err(SpecError::Unsupported {
                what: "per-expert 2-D tensors (blk.N.ffn_gate.E.weight, an older Mixtral GGUF layout); \
                       re-convert the model with a current llama.cpp to get 3-D ffn_*_exps tensors"
                    .to_string(),
            });
        }

        let mut b = Builder::new(tensors);
        let e = n_embd as u64;
        // The vocabulary size comes from the embedding table (converters may pad it).
        let n_vocab = match tensors.iter().find(|t| t.name == "token_embd.weight") {
            Some(t) if t.dims.len() == 2 && t.dims[0] == e => t.dims[1],
            Some(t) => {
                return Err(SpecError::IllShapedTensor {
                    name: t.name.clone(),
                    expected: vec![e, vocab_hint.unwrap_or(0)],
                    found: t.dims.clone(),
                })
            }
            None => {
                return Err(SpecError::MissingTensor {
                    name: "token_embd.weight".to_string(),
                    expected: vec![e, vocab_hint.unwrap_or(0)],
                })
            }
        };
        if n_vocab == 0 {
            return Err(SpecError::IllShapedTensor {
                name: "token_embd.weight".to_string(),
                expected: vec![e, vocab_hint.unwrap_or(1)],
                found: vec![e, 0],
            });
        }
        let embed = b.new_group(GroupRole::Embed, None);
        let token_embd = b.add(
            embed,
            "token_embd.weight".to_string(),
            TensorRole::TokenEmbd,
            None,
            &[e, n_vocab],
        )?;

        let shape = LayerShapes {
            arch,
            e,
            hq: n_head as u64,
            hkv: n_head_kv as u64,
            dk: head_dim_k as u64,
            dv: head_dim_v as u64,
            ff: n_ff as u64,
            mla,
            rope_dims: rope_dims as u64,
        };
        let shexp_key = meta_uint(header, &k("expert_shared_feed_forward_length"))?;
        let mut n_ff_shared_expert = if moe.n_expert_shared > 0 {
            moe.n_ff_expert * moe.n_expert_shared
        } else {
            0
        };
        let mut layers = Vec::with_capacity(n_layer);
        for (il, &sliding) in swa_layers.iter().enumerate() {
            let l = Some(il);
            let attn = b.new_group(GroupRole::Attn, l);
            attn_tensors(&mut b, &shape, attn, il)?;
            let mut groups = vec![attn];
            if moe.n_expert > 0 && il >= dense_layers {
                groups.extend(moe_tensors(
                    &mut b,
                    &shape,
                    &moe,
                    il,
                    shexp_key,
                    &mut n_ff_shared_expert,
                    &k("expert_shared_feed_forward_length"),
                )?);
            } else {
                let ffn = b.new_group(GroupRole::Ffn, l);
                let t = |s: &str| format!("blk.{il}.{s}");
                b.add(ffn, t(ffn_norm_name(arch)), TensorRole::FfnNorm, l, &[e])?;
                let ff = shape.ff;
                b.add(ffn, t("ffn_gate.weight"), TensorRole::FfnGate, l, &[e, ff])?;
                b.add(ffn, t("ffn_up.weight"), TensorRole::FfnUp, l, &[e, ff])?;
                b.add(ffn, t("ffn_down.weight"), TensorRole::FfnDown, l, &[ff, e])?;
                if arch == Arch::Gemma3 {
                    b.add(
                        ffn,
                        t("post_ffw_norm.weight"),
                        TensorRole::FfnPostNorm,
                        l,
                        &[e],
                    )?;
                }
                groups.push(ffn);
            }
            let global = !sliding;
            layers.push(LayerSpec {
                index: il,
                window: if global { None } else { sliding_window },
                rope_base: if global { rope_base } else { rope_base_swa },
                rope_linear_scale: if global {
                    rope_linear_scale
                } else {
                    rope_linear_scale_swa
                },
                groups,
            });
        }

        let output_norm = b.new_group(GroupRole::OutputNorm, None);
        b.add(
            output_norm,
            "output_norm.weight".to_string(),
            TensorRole::OutputNorm,
            None,
            &[e],
        )?;
        let rope_freqs = b.add_opt(
            output_norm,
            "rope_freqs.weight".to_string(),
            TensorRole::RopeFreqs,
            None,
            &[rope_dims as u64 / 2],
        )?;
        let output = b.new_group(GroupRole::Output, None);
        // gpt-oss requires its own output projection (src/models/openai-moe.cpp); the others
        // fall back to the embedding table.
        let tied_embeddings = !b.has("output.weight") && arch != Arch::GptOss;
        if tied_embeddings {
            let bytes = b.tensors[token_embd.0 as usize].bytes;
            let g = &mut b.groups[output.0 as usize];
            g.tensors.push(token_embd);
            g.bytes = bytes;
        } else {
            b.add(
                output,
                "output.weight".to_string(),
                TensorRole::Output,
                None,
                &[e, n_vocab],
            )?;
        }

        let hparams = Hparams {
            n_vocab: to_usize("token_embd.weight", n_vocab)?,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_ff,
            n_ctx_train,
            norm_eps,
            rope_base,
            rope_base_local: rope_base_swa,
            rope_linear_scale,
            rope_dims,
            rope_mode,
            n_expert: moe.n_expert,
            n_expert_used: moe.n_expert_used,
            n_ff_expert: moe.n_ff_expert,
            n_ff_shared_expert,
            expert_weights_norm: moe.expert_weights_norm,
            sliding_window,
            attn_softcap,
            final_softcap,
            embed_scale,
            tied_embeddings,
            yarn,
            attn_scale,
            n_layer_dense_lead: if moe.n_expert > 0 { dense_layers } else { 0 },
            n_expert_shared: moe.n_expert_shared,
            gating: moe.gating,
            expert_weights_scale: moe.expert_weights_scale,
            n_expert_groups: moe.n_expert_groups,
            n_group_used: moe.n_group_used,
            mla,
            n_nextn_layers,
        };
        Ok(ModelSpec {
            arch,
            name,
            hparams,
            tensors: b.tensors,
            groups: b.groups,
            layers,
            embed,
            output_norm,
            output,
            rope_freqs,
        })
    }

    /// Builds the spec of an opened model file (its first split's header and all splits' tensors);
    /// the file stem is the fallback name.
    pub fn from_file(file: &ModelFile) -> Result<ModelSpec, SpecError> {
        let fallback = file
            .paths()
            .first()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_string());
        ModelSpec::from_gguf(file.header(), file.tensors(), &fallback)
    }

    /// File indices of tensors in the file that the spec does not use (reported by `inspect`).
    pub fn unused_file_tensors(&self, n_file_tensors: usize) -> Vec<usize> {
        let mut used = vec![false; n_file_tensors];
        for t in &self.tensors {
            if let Some(u) = used.get_mut(t.file_index) {
                *u = true;
            }
        }
        used.iter()
            .enumerate()
            .filter(|(_, u)| !**u)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Which of `n_layer` layers use the sliding window, from `key` as llama.cpp reads it
/// (`load_swa_pattern`, src/llama-model.cpp; `set_swa_pattern`, src/llama-hparams.cpp): an array
/// gives each layer (true or non-zero: sliding; layers past its end attend globally); an integer
/// `n` is a period, layer `il` sliding when `il % n < n − 1` (every layer when `n` is 0); absent,
/// the period is the architecture's default.
fn swa_pattern(
    h: &GgufHeader,
    key: &str,
    n_layer: usize,
    default_period: usize,
) -> Result<Vec<bool>, SpecError> {
    let bad = |what: String| SpecError::BadKey {
        key: key.to_string(),
        what,
    };
    if let Some(MetaValue::Array(_, items)) = meta(h, key) {
        let mut out = vec![false; n_layer];
        for (il, it) in items.iter().enumerate() {
            let v = match it {
                MetaValue::Bool(b) => *b,
                MetaValue::U8(x) => *x != 0,
                MetaValue::I8(x) => *x != 0,
                MetaValue::U16(x) => *x != 0,
                MetaValue::I16(x) => *x != 0,
                MetaValue::U32(x) => *x != 0,
                MetaValue::I32(x) => *x != 0,
                MetaValue::U64(x) => *x != 0,
                MetaValue::I64(x) => *x != 0,
                _ => return Err(bad(format!("element {il} is not a bool or an integer"))),
            };
            if let Some(slot) = out.get_mut(il) {
                *slot = v;
            }
        }
        return Ok(out);
    }
    let n = match meta_uint(h, key)? {
        Some(n) => to_usize(key, n)?,
        None => default_period,
    };
    Ok((0..n_layer).map(|il| n == 0 || il % n < n - 1).collect())
}

/// How positions are scaled for rope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RopeScaling {
    /// None, or linear (positions divided by the factor).
    Linear,
    /// YaRN (see [`Yarn`]).
    Yarn,
}

/// Rope scaling factor and kind from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`).
fn rope_scale(h: &GgufHeader, a: &str) -> Result<(f32, RopeScaling), SpecError> {
    let factor_key = format!("{a}.rope.scaling.factor");
    let kind = match meta_str(h, &format!("{a}.rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear),
        Some("yarn") => Some(RopeScaling::Yarn),
        Some(other) => {
            return Err(SpecError::UnsupportedRopeScaling {
                kind: other.to_string(),
            })
        }
    };
    if let Some(kind) = kind {
        let f = meta_f32(h, &factor_key)?.ok_or(SpecError::MissingKey {
            key: factor_key.clone(),
        })?;
        if !(f.is_finite() && f > 0.0) {
            return Err(SpecError::BadKey {
                key: factor_key,
                what: format!("factor {f} must be > 0"),
            });
        }
        return Ok((f, kind));
    }
    match meta_f32(h, &format!("{a}.rope.scale_linear"))? {
        Some(f) if f.is_finite() && f > 0.0 => Ok((f, RopeScaling::Linear)),
        Some(f) => Err(SpecError::BadKey {
            key: format!("{a}.rope.scale_linear"),
            what: format!("factor {f} must be > 0"),
        }),
        None => Ok((1.0, RopeScaling::Linear)),
    }
}

/// gpt-oss's sliding-window period when the GGUF has no `gpt-oss.attention.sliding_window_pattern`:
/// even layers slide, odd layers attend globally (llama.cpp's `load_swa_pattern(ml, 2)` in
/// src/models/openai-moe.cpp).
pub const GPT_OSS_GLOBAL_EVERY: usize = 2;

/// The FFN input norm's tensor name suffix: gpt-oss and glm4moe norm the residual after attention
/// under the name `post_attention_norm` and have no `ffn_norm`.
fn ffn_norm_name(arch: Arch) -> &'static str {
    match arch {
        Arch::GptOss | Arch::Glm4Moe => "post_attention_norm.weight",
        _ => "ffn_norm.weight",
    }
}

/// Shapes every layer's tensors are checked against.
struct LayerShapes {
    arch: Arch,
    e: u64,
    hq: u64,
    hkv: u64,
    dk: u64,
    dv: u64,
    ff: u64,
    mla: Option<Mla>,
    rope_dims: u64,
}

/// Adds layer `il`'s attention tensors to group `attn`.
fn attn_tensors(
    b: &mut Builder,
    s: &LayerShapes,
    attn: GroupId,
    il: usize,
) -> Result<(), SpecError> {
    let t = |x: &str| format!("blk.{il}.{x}");
    let l = Some(il);
    let (e, hq, hkv, dk, dv) = (s.e, s.hq, s.hkv, s.dk, s.dv);
    b.add(attn, t("attn_norm.weight"), TensorRole::AttnNorm, l, &[e])?;
    if let Some(m) = s.mla {
        let (kl, ql) = (m.kv_lora_rank as u64, m.q_lora_rank as u64);
        let (nope, vm) = (m.nope as u64, m.head_dim_v as u64);
        let km = nope + s.rope_dims;
        if ql > 0 {
            b.add(attn, t("attn_q_a.weight"), TensorRole::AttnQA, l, &[e, ql])?;
            b.add(
                attn,
                t("attn_q_a_norm.weight"),
                TensorRole::AttnQANorm,
                l,
                &[ql],
            )?;
            b.add(
                attn,
                t("attn_q_b.weight"),
                TensorRole::AttnQB,
                l,
                &[ql, hq * km],
            )?;
        } else {
            b.add(
                attn,
                t("attn_q.weight"),
                TensorRole::AttnQ,
                l,
                &[e, hq * km],
            )?;
        }
        b.add(
            attn,
            t("attn_kv_a_mqa.weight"),
            TensorRole::AttnKvAMqa,
            l,
            &[e, kl + s.rope_dims],
        )?;
        b.add(
            attn,
            t("attn_kv_a_norm.weight"),
            TensorRole::AttnKvANorm,
            l,
            &[kl],
        )?;
        b.add(
            attn,
            t("attn_k_b.weight"),
            TensorRole::AttnKB,
            l,
            &[nope, kl, hq],
        )?;
        b.add(
            attn,
            t("attn_v_b.weight"),
            TensorRole::AttnVB,
            l,
            &[kl, vm, hq],
        )?;
        b.add(
            attn,
            t("attn_output.weight"),
            TensorRole::AttnOutput,
            l,
            &[hq * vm, e],
        )?;
        return Ok(());
    }
    b.add(
        attn,
        t("attn_q.weight"),
        TensorRole::AttnQ,
        l,
        &[e, hq * dk],
    )?;
    b.add(
        attn,
        t("attn_k.weight"),
        TensorRole::AttnK,
        l,
        &[e, hkv * dk],
    )?;
    b.add(
        attn,
        t("attn_v.weight"),
        TensorRole::AttnV,
        l,
        &[e, hkv * dv],
    )?;
    let biases = [
        ("attn_q.bias", TensorRole::AttnQBias, hq * dk),
        ("attn_k.bias", TensorRole::AttnKBias, hkv * dk),
        ("attn_v.bias", TensorRole::AttnVBias, hkv * dv),
    ];
    for (n, role, len) in biases {
        if s.arch == Arch::Qwen2 {
            b.add(attn, t(n), role, l, &[len])?;
        } else {
            b.add_opt(attn, t(n), role, l, &[len])?;
        }
    }
    // Required in qwen3, qwen3moe and gemma3; optional in glm4moe (GLM-4.5 has them, 4.5-Air
    // does not): both or neither.
    let qk_norm = matches!(s.arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3)
        || (s.arch == Arch::Glm4Moe && b.has(&t("attn_q_norm.weight")));
    if qk_norm {
        b.add(
            attn,
            t("attn_q_norm.weight"),
            TensorRole::AttnQNorm,
            l,
            &[dk],
        )?;
        b.add(
            attn,
            t("attn_k_norm.weight"),
            TensorRole::AttnKNorm,
            l,
            &[dk],
        )?;
    }
    b.add(
        attn,
        t("attn_output.weight"),
        TensorRole::AttnOutput,
        l,
        &[hq * dv, e],
    )?;
    if s.arch == Arch::GptOss {
        b.add(
            attn,
            t("attn_output.bias"),
            TensorRole::AttnOutputBias,
            l,
            &[e],
        )?;
        b.add(
            attn,
            t("attn_sinks.weight"),
            TensorRole::AttnSinks,
            l,
            &[hq],
        )?;
    }
    if s.arch == Arch::Gemma3 {
        b.add(
            attn,
            t("post_attention_norm.weight"),
            TensorRole::AttnPostNorm,
            l,
            &[e],
        )?;
    }
    Ok(())
}

/// Adds layer `il`'s router, experts and shared experts; returns their groups in order.
fn moe_tensors(
    b: &mut Builder,
    s: &LayerShapes,
    moe: &MoeHparams,
    il: usize,
    shexp_key: Option<u64>,
    n_ff_shared_expert: &mut usize,
    shexp_key_name: &str,
) -> Result<Vec<GroupId>, SpecError> {
    let t = |x: &str| format!("blk.{il}.{x}");
    let l = Some(il);
    let e = s.e;
    let (ffx, nx) = (moe.n_ff_expert as u64, moe.n_expert as u64);
    let router = b.new_group(GroupRole::Router, l);
    b.add(
        router,
        t(ffn_norm_name(s.arch)),
        TensorRole::FfnNorm,
        l,
        &[e],
    )?;
    b.add(
        router,
        t("ffn_gate_inp.weight"),
        TensorRole::FfnGateInp,
        l,
        &[e, nx],
    )?;
    match s.arch {
        Arch::GptOss => {
            b.add(
                router,
                t("ffn_gate_inp.bias"),
                TensorRole::FfnGateInpBias,
                l,
                &[nx],
            )?;
        }
        Arch::Glm4Moe => {
            b.add(
                router,
                t("exp_probs_b.bias"),
                TensorRole::FfnExpProbsBias,
                l,
                &[nx],
            )?;
        }
        Arch::Deepseek2 => {
            b.add_opt(
                router,
                t("exp_probs_b.bias"),
                TensorRole::FfnExpProbsBias,
                l,
                &[nx],
            )?;
        }
        _ => {}
    }
    let experts = b.new_group(GroupRole::Experts, l);
    for (n, role, dims) in [
        (
            "ffn_gate_exps.weight",
            TensorRole::FfnGateExps,
            [e, ffx, nx],
        ),
        ("ffn_up_exps.weight", TensorRole::FfnUpExps, [e, ffx, nx]),
        (
            "ffn_down_exps.weight",
            TensorRole::FfnDownExps,
            [ffx, e, nx],
        ),
    ] {
        b.add(experts, t(n), role, l, &dims)?;
    }
    if s.arch == Arch::GptOss {
        for (n, role, dims) in [
            ("ffn_gate_exps.bias", TensorRole::FfnGateExpsBias, [ffx, nx]),
            ("ffn_up_exps.bias", TensorRole::FfnUpExpsBias, [ffx, nx]),
            ("ffn_down_exps.bias", TensorRole::FfnDownExpsBias, [e, nx]),
        ] {
            b.add(experts, t(n), role, l, &dims)?;
        }
    }
    let mut groups = vec![router, experts];
    // glm4moe and deepseek2: `expert_shared_count` experts of the routed width, one FFN of
    // their total width; llama and qwen3moe files: whenever the tensors are there.
    let fs = match s.arch {
        Arch::Glm4Moe | Arch::Deepseek2 => {
            if moe.n_expert_shared == 0 {
                return Ok(groups);
            }
            *n_ff_shared_expert as u64
        }
        _ => {
            if !b.has(&t("ffn_gate_shexp.weight")) {
                return Ok(groups);
            }
            if *n_ff_shared_expert == 0 {
                let fs = match shexp_key {
                    Some(v) => v,
                    None => b.infos[b.by_name[t("ffn_gate_shexp.weight").as_str()]]
                        .dims
                        .get(1)
                        .copied()
                        .unwrap_or(0),
                };
                *n_ff_shared_expert = nonzero(shexp_key_name, fs)?;
            }
            *n_ff_shared_expert as u64
        }
    };
    let shared = b.new_group(GroupRole::SharedExperts, l);
    b.add(
        shared,
        t("ffn_gate_shexp.weight"),
        TensorRole::FfnGateShexp,
        l,
        &[e, fs],
    )?;
    b.add(
        shared,
        t("ffn_up_shexp.weight"),
        TensorRole::FfnUpShexp,
        l,
        &[e, fs],
    )?;
    b.add(
        shared,
        t("ffn_down_shexp.weight"),
        TensorRole::FfnDownShexp,
        l,
        &[fs, e],
    )?;
    groups.push(shared);
    Ok(groups)
}

/// MoE hparams as llama.cpp reads them for an architecture.
struct MoeHparams {
    n_expert: usize,
    n_expert_used: usize,
    n_ff_expert: usize,
    expert_weights_norm: bool,
    gating: Gating,
    expert_weights_scale: f32,
    n_expert_groups: usize,
    n_group_used: usize,
    n_expert_shared: usize,
    n_layer_dense_lead: usize,
}

/// A boolean key.
fn meta_bool(h: &GgufHeader, key: &str) -> Result<Option<bool>, SpecError> {
    match meta(h, key) {
        None => Ok(None),
        Some(MetaValue::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(SpecError::BadKey {
            key: key.to_string(),
            what: "expected a bool".to_string(),
        }),
    }
}

/// The MoE hparams of `arch` (all zero for dense architectures).
fn moe_hparams(
    h: &GgufHeader,
    arch: Arch,
    a: &str,
    n_layer: usize,
) -> Result<MoeHparams, SpecError> {
    let k = |s: &str| format!("{a}.{s}");
    let n_layer_dense_lead = match arch {
        Arch::Glm4Moe | Arch::Deepseek2 => count(
            &k("leading_dense_block_count"),
            meta_uint(h, &k("leading_dense_block_count"))?.unwrap_or(0),
        )?,
        _ => 0,
    };
    let n_expert = match arch {
        Arch::Llama | Arch::Qwen3Moe | Arch::GptOss | Arch::Glm4Moe | Arch::Deepseek2 => count(
            &k("expert_count"),
            meta_uint(h, &k("expert_count"))?.unwrap_or(0),
        )?,
        _ => 0,
    };
    // Architectures whose every (non-leading) layer is MoE need experts.
    let needs_experts = match arch {
        Arch::Qwen3Moe | Arch::GptOss | Arch::Glm4Moe => true,
        Arch::Deepseek2 => n_layer_dense_lead < n_layer,
        _ => false,
    };
    if needs_experts && n_expert == 0 {
        return Err(SpecError::MissingKey {
            key: k("expert_count"),
        });
    }
    let mut m = MoeHparams {
        n_expert,
        n_expert_used: 0,
        n_ff_expert: 0,
        expert_weights_norm: false,
        gating: Gating::Softmax,
        expert_weights_scale: 1.0,
        n_expert_groups: 0,
        n_group_used: 0,
        n_expert_shared: 0,
        n_layer_dense_lead,
    };
    if n_expert == 0 {
        return Ok(m);
    }
    let used = nonzero(
        &k("expert_used_count"),
        meta_uint_req(h, &k("expert_used_count"))?,
    )?;
    if used > n_expert {
        return Err(SpecError::BadKey {
            key: k("expert_used_count"),
            what: format!("{used} exceeds expert_count {n_expert}"),
        });
    }
    m.n_expert_used = used;
    let ff_key = || {
        meta_uint(h, &k("feed_forward_length"))?.ok_or_else(|| SpecError::MissingKey {
            key: k("feed_forward_length"),
        })
    };
    let exp_key = || meta_uint(h, &k("expert_feed_forward_length"));
    m.n_ff_expert = match arch {
        // llama.cpp's llama graph sizes the expert tensors by feed_forward_length and never
        // reads expert_feed_forward_length (src/models/llama.cpp, load_arch_tensors).
        Arch::Llama => nonzero(&k("feed_forward_length"), ff_key()?)?,
        // qwen3moe: expert_feed_forward_length, or else feed_forward_length divided by the
        // experts used (src/models/qwen3moe.cpp, load_arch_tensors); glm4moe the same when the
        // key is 0 (it is required there).
        Arch::Qwen3Moe | Arch::Glm4Moe => {
            let v = match (arch, exp_key()?) {
                (Arch::Glm4Moe, None) => {
                    return Err(SpecError::MissingKey {
                        key: k("expert_feed_forward_length"),
                    })
                }
                (_, v) => v.unwrap_or(0),
            };
            if v > 0 {
                count(&k("expert_feed_forward_length"), v)?
            } else {
                let ff = count(&k("feed_forward_length"), ff_key()?)?;
                if ff / used == 0 {
                    return Err(SpecError::MissingKey {
                        key: k("expert_feed_forward_length"),
                    });
                }
                ff / used
            }
        }
        _ => nonzero(
            &k("expert_feed_forward_length"),
            exp_key()?.ok_or_else(|| SpecError::MissingKey {
                key: k("expert_feed_forward_length"),
            })?,
        )?,
    };
    // llama.cpp's llama and qwen3moe graphs always renormalize the top-k weights (they pass
    // norm_w = true to build_moe_ffn and never read expert_weights_norm); gpt-oss never does;
    // glm4moe and deepseek2 read the key (default false).
    m.expert_weights_norm = match arch {
        Arch::Llama | Arch::Qwen3Moe => true,
        Arch::GptOss => false,
        _ => meta_bool(h, &k("expert_weights_norm"))?.unwrap_or(false),
    };
    if matches!(arch, Arch::Glm4Moe | Arch::Deepseek2) {
        // 0 (the default) and 1 both mean no scaling in build_moe_ffn.
        let key = k("expert_weights_scale");
        let s = meta_f32(h, &key)?.unwrap_or(0.0);
        m.expert_weights_scale = if s == 0.0 {
            1.0
        } else {
            float_in(&key, s, 0.0, None)?
        };
        m.n_expert_shared = count(
            &k("expert_shared_count"),
            meta_uint_req(h, &k("expert_shared_count"))?,
        )?;
    }
    m.gating = match arch {
        Arch::GptOss => Gating::SoftmaxAfterTopK,
        Arch::Glm4Moe | Arch::Deepseek2 => {
            let key = k("expert_gating_func");
            match meta_uint(h, &key)?.unwrap_or(0) {
                0 => {
                    // Absent: glm4moe sigmoid; deepseek2 softmax, except GLM 4.7 Lite files
                    // (47 or 48 layers, 154,880-token vocabulary) converted without the key.
                    let vocab = meta_uint(h, &k("vocab_size"))?;
                    if arch == Arch::Glm4Moe
                        || (matches!(n_layer, 47 | 48) && vocab == Some(154_880))
                    {
                        Gating::Sigmoid
                    } else {
                        Gating::Softmax
                    }
                }
                1 => Gating::Softmax,
                2 => Gating::Sigmoid,
                3 => Gating::SoftmaxAfterTopK,
                v => {
                    return Err(SpecError::BadKey {
                        key,
                        what: format!(
                            "gating function {v} is not supported (1 softmax, 2 sigmoid, 3 softmax \
                             after top-k)"
                        ),
                    })
                }
            }
        }
        _ => Gating::Softmax,
    };
    // Group-limited routing applies to every architecture's MoE in llama.cpp (build_moe_ffn).
    let groups = count(
        &k("expert_group_count"),
        meta_uint(h, &k("expert_group_count"))?.unwrap_or(0),
    )?;
    let group_used = count(
        &k("expert_group_used_count"),
        meta_uint(h, &k("expert_group_used_count"))?.unwrap_or(0),
    )?;
    if groups >= n_expert {
        return Err(SpecError::BadKey {
            key: k("expert_group_count"),
            what: format!("{groups} groups of {n_expert} experts"),
        });
    }
    if groups > 1 && (n_expert % groups != 0 || group_used == 0 || group_used >= groups) {
        return Err(SpecError::BadKey {
            key: k("expert_group_used_count"),
            what: format!(
                "{group_used} of {groups} groups over {n_expert} experts (need groups to divide \
                 the experts and 0 < used < groups)"
            ),
        });
    }
    if groups > 1 {
        m.n_expert_groups = groups;
        m.n_group_used = group_used;
    }
    Ok(m)
}

/// deepseek2's multi-head latent attention hparams (src/models/deepseek2.cpp). Only files
/// converted for MLA (split `attn_k_b` / `attn_v_b`, `key_length_mla`) are supported.
fn mla_hparams(
    h: &GgufHeader,
    tensors: &[TensorInfo],
    a: &str,
    n_layer: usize,
    n_vocab: Option<u64>,
    (n_head_kv, head_dim_k, head_dim_v, rope_dims): (usize, usize, usize, usize),
) -> Result<Mla, SpecError> {
    let k = |s: &str| format!("{a}.{s}");
    let (km, vm) = (
        meta_uint(h, &k("attention.key_length_mla"))?,
        meta_uint(h, &k("attention.value_length_mla"))?,
    );
    let (km, vm) = match (km, vm) {
        (Some(km), Some(vm)) => (
            nonzero(&k("attention.key_length_mla"), km)?,
            nonzero(&k("attention.value_length_mla"), vm)?,
        ),
        _ => {
            if tensors.iter().any(|t| t.name.ends_with("attn_kv_b.weight")) {
                return Err(SpecError::Unsupported {
                    what: "a deepseek2 GGUF with the joint attn_kv_b tensor (converted before \
                           multi-head latent attention); re-convert it with a current llama.cpp \
                           to get attn_k_b / attn_v_b"
                        .to_string(),
                });
            }
            return Err(SpecError::MissingKey {
                key: k("attention.key_length_mla"),
            });
        }
    };
    let kv_lora_rank = nonzero(
        &k("attention.kv_lora_rank"),
        meta_uint_req(h, &k("attention.kv_lora_rank"))?,
    )?;
    // The "lite" variants never read q_lora_rank (they project queries directly). llama.cpp
    // tells them by their layer count; a file without the key and without `attn_q_a` (a lite
    // model cut to fewer layers) projects queries directly too.
    let lite = matches!(n_layer, 26 | 27) || (n_layer == 48 && n_vocab == Some(128_256));
    let no_q_lora = meta_uint(h, &k("attention.q_lora_rank"))?.is_none()
        && !tensors.iter().any(|t| t.name.ends_with("attn_q_a.weight"));
    let q_lora_rank = if lite || no_q_lora {
        0
    } else {
        nonzero(
            &k("attention.q_lora_rank"),
            meta_uint_req(h, &k("attention.q_lora_rank"))?,
        )?
    };
    let bad = |key: &str, what: String| SpecError::BadKey { key: k(key), what };
    if n_head_kv != 1 {
        return Err(bad(
            "attention.head_count_kv",
            format!("{n_head_kv}: latent attention has one KV head"),
        ));
    }
    if head_dim_k != kv_lora_rank + rope_dims || head_dim_v != kv_lora_rank {
        return Err(bad(
            "attention.key_length",
            format!(
                "key/value length {head_dim_k}/{head_dim_v}: latent attention needs \
                 kv_lora_rank + rope dims = {} and kv_lora_rank = {kv_lora_rank}",
                kv_lora_rank + rope_dims
            ),
        ));
    }
    if km <= rope_dims {
        return Err(bad(
            "attention.key_length_mla",
            format!("{km} leaves no dimension beside the {rope_dims} rope dims"),
        ));
    }
    Ok(Mla {
        q_lora_rank,
        kv_lora_rank,
        nope: km - rope_dims,
        head_dim_v: vm,
    })
}

/// YaRN parameters (when the scaling type is yarn) and llama.cpp's `attn_factor` before its YaRN
/// correction (deepseek2 scales its attention by it), as src/llama-context.cpp derives them.
fn yarn_params(
    h: &GgufHeader,
    a: &str,
    arch: Arch,
    kind: RopeScaling,
    factor: f32,
    n_ctx_train: usize,
) -> Result<(Option<Yarn>, f32), SpecError> {
    let k = |s: &str| format!("{a}.{s}");
    let rope_attn_factor = meta_f32(h, &k("rope.scaling.attn_factor"))?.unwrap_or(1.0);
    if kind != RopeScaling::Yarn {
        return Ok((None, rope_attn_factor * (1.0 + 0.1 * factor.ln())));
    }
    let get_mscale = |scale: f32, m: f32| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    // deepseek2's yarn_log_multiplier is written ×0.1 by its converter (llama.cpp divides it back).
    let log_mul = if arch == Arch::Deepseek2 {
        meta_f32(h, &k("rope.scaling.yarn_log_multiplier"))?.map_or(0.0, |v| v / 0.1)
    } else {
        0.0
    };
    let mut attn_factor = if log_mul != 0.0 {
        let mscale = if arch == Arch::Deepseek2 && log_mul != 1.0 {
            log_mul
        } else {
            1.0
        };
        get_mscale(factor, mscale) / get_mscale(factor, log_mul)
    } else {
        get_mscale(factor, 1.0)
    };
    // Cancels the magnitude correction ggml's rope applies under YaRN.
    attn_factor *= 1.0 / (1.0 + 0.1 * factor.ln());
    attn_factor *= rope_attn_factor;
    let orig_ctx = match meta_uint(h, &k("rope.scaling.original_context_length"))? {
        Some(v) => nonzero(&k("rope.scaling.original_context_length"), v)?,
        None => n_ctx_train,
    };
    // ggml's rope multiplies by attn_factor · (1 + 0.1 ln(1/freq_scale)) under YaRN.
    let mscale = attn_factor * (1.0 + 0.1 * factor.ln());
    Ok((
        Some(Yarn {
            orig_ctx,
            beta_fast: 32.0,
            beta_slow: 1.0,
            ext_factor: 1.0,
            mscale,
        }),
        mscale,
    ))
}
