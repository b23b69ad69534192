//! Model catalogue: builds a [`ModelSpec`] from a GGUF header alone.
//!
//! Supported architectures: `llama` (Llama 2/3, Mistral, SmolLM; Mixtral-style MoE when
//! `llama.expert_count` > 0), `qwen2`, `qwen3`, `qwen3moe` and `gemma3`. Every tensor the forward pass
//! needs is looked up by its GGUF name and its shape is checked against the hparams; a missing or
//! ill-shaped tensor is an error naming the tensor and the expected shape.
//!
//! Layout of the result:
//! - tensors: `token_embd`, then each layer's tensors in execution order, then `output_norm`,
//!   `rope_freqs` (if present) and `output` (if not tied);
//! - groups: `embed`, then per layer `attn` followed by `ffn` (dense) or `router`, `experts` and
//!   `shared` (MoE), then `output_norm` and `output`.
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
    Arch, GroupId, GroupRole, Hparams, LayerSpec, ModelSpec, RopeMode, TensorDesc, TensorGroup,
    TensorId, TensorRole,
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
    #[error("unsupported rope scaling type '{kind}' (supported: none, linear; llama3 scaling via rope_freqs.weight)")]
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

const SUPPORTED: &str = "llama, qwen2, qwen3, qwen3moe, gemma3";

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
        let n_layer = nonzero(&k("block_count"), meta_uint_req(header, &k("block_count"))?)?;
        // Before anything is sized by it: the layer count must be the one the tensors hold.
        let present = blocks_in_tensors(tensors);
        if present != n_layer as u64 {
            return Err(SpecError::BadKey {
                key: k("block_count"),
                what: format!(
                    "{n_layer}, but the file's tensors hold {present} blocks (blk.0 … blk.{})",
                    present.saturating_sub(1)
                ),
            });
        }
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
        let rope_linear_scale = rope_scale(header, a)?;
        let rope_mode = match arch {
            Arch::Llama => RopeMode::Adjacent,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 => RopeMode::Neox,
        };

        // MoE: which keys give the expert width, and the routing, as llama.cpp reads them.
        let n_expert = match arch {
            Arch::Llama | Arch::Qwen3Moe => count(
                &k("expert_count"),
                meta_uint(header, &k("expert_count"))?.unwrap_or(0),
            )?,
            _ => 0,
        };
        if arch == Arch::Qwen3Moe && n_expert == 0 {
            return Err(SpecError::MissingKey {
                key: k("expert_count"),
            });
        }
        let moe = n_expert > 0;
        let n_ff_key = meta_uint(header, &k("feed_forward_length"))?;
        let (n_ff, n_expert_used, n_ff_expert) = if moe {
            let used = nonzero(
                &k("expert_used_count"),
                meta_uint_req(header, &k("expert_used_count"))?,
            )?;
            if used > n_expert {
                return Err(SpecError::BadKey {
                    key: k("expert_used_count"),
                    what: format!("{used} exceeds expert_count {n_expert}"),
                });
            }
            let ff_key = || {
                n_ff_key.ok_or_else(|| SpecError::MissingKey {
                    key: k("feed_forward_length"),
                })
            };
            let ff_exp = match arch {
                // llama.cpp's llama graph sizes the expert tensors by feed_forward_length and never
                // reads expert_feed_forward_length (src/models/llama.cpp, load_arch_tensors).
                Arch::Llama => nonzero(&k("feed_forward_length"), ff_key()?)?,
                // qwen3moe: expert_feed_forward_length, or else feed_forward_length divided by the
                // experts used (src/models/qwen3moe.cpp, load_arch_tensors).
                _ => match meta_uint(header, &k("expert_feed_forward_length"))? {
                    Some(v) => nonzero(&k("expert_feed_forward_length"), v)?,
                    None => {
                        let ff = to_usize(&k("feed_forward_length"), ff_key()?)?;
                        if ff / used == 0 {
                            return Err(SpecError::MissingKey {
                                key: k("expert_feed_forward_length"),
                            });
                        }
                        ff / used
                    }
                },
            };
            (0, used, ff_exp)
        } else {
            let ff = n_ff_key.ok_or_else(|| SpecError::MissingKey {
                key: k("feed_forward_length"),
            })?;
            (nonzero(&k("feed_forward_length"), ff)?, 0, 0)
        };
        // llama.cpp's llama and qwen3moe graphs always renormalize the top-k weights (they pass
        // norm_w = true to build_moe_ffn and never read expert_weights_norm); meaningless for
        // dense models: false there.
        let expert_weights_norm = moe;
        // gemma3 as llama.cpp reads it (src/models/gemma3.cpp, load_arch_hparams): the window is
        // optional (absent or 0: every layer attends globally); with one, the per-layer pattern
        // and the local rope base come from the GGUF when present.
        let (sliding_window, swa_layers) = if arch == Arch::Gemma3 {
            match meta_uint(header, &k("attention.sliding_window"))? {
                Some(w) if w > 0 => (
                    Some(to_usize(&k("attention.sliding_window"), w)?),
                    swa_pattern(header, &k("attention.sliding_window_pattern"), n_layer)?,
                ),
                _ => (None, vec![false; n_layer]),
            }
        } else {
            (None, vec![false; n_layer])
        };
        let rope_base_swa = if sliding_window.is_some() {
            meta_f32(header, &k("rope.freq_base_swa"))?.unwrap_or(GEMMA3_LOCAL_ROPE_BASE)
        } else {
            rope_base
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
        let vocab_hint = meta_uint(header, &k("vocab_size"))?.or_else(|| {
            match meta(header, "tokenizer.ggml.tokens") {
                Some(MetaValue::Array(_, v)) => Some(v.len() as u64),
                _ => None,
            }
        });
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

        let (hq, hkv) = (n_head as u64, n_head_kv as u64);
        let (dk, dv) = (head_dim_k as u64, head_dim_v as u64);
        let (ff, ffx, nx) = (n_ff as u64, n_ff_expert as u64, n_expert as u64);
        let shexp_key = meta_uint(header, &k("expert_shared_feed_forward_length"))?;
        let mut n_ff_shared_expert = 0usize;
        let mut layers = Vec::with_capacity(n_layer);
        for (il, &sliding) in swa_layers.iter().enumerate() {
            let t = |s: &str| format!("blk.{il}.{s}");
            let l = Some(il);
            let attn = b.new_group(GroupRole::Attn, l);
            b.add(attn, t("attn_norm.weight"), TensorRole::AttnNorm, l, &[e])?;
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
                if arch == Arch::Qwen2 {
                    b.add(attn, t(n), role, l, &[len])?;
                } else {
                    b.add_opt(attn, t(n), role, l, &[len])?;
                }
            }
            if matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3) {
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
            if arch == Arch::Gemma3 {
                b.add(
                    attn,
                    t("post_attention_norm.weight"),
                    TensorRole::AttnPostNorm,
                    l,
                    &[e],
                )?;
            }
            let mut groups = vec![attn];
            if moe {
                let router = b.new_group(GroupRole::Router, l);
                b.add(router, t("ffn_norm.weight"), TensorRole::FfnNorm, l, &[e])?;
                b.add(
                    router,
                    t("ffn_gate_inp.weight"),
                    TensorRole::FfnGateInp,
                    l,
                    &[e, nx],
                )?;
                let experts = b.new_group(GroupRole::Experts, l);
                b.add(
                    experts,
                    t("ffn_gate_exps.weight"),
                    TensorRole::FfnGateExps,
                    l,
                    &[e, ffx, nx],
                )?;
                b.add(
                    experts,
                    t("ffn_up_exps.weight"),
                    TensorRole::FfnUpExps,
                    l,
                    &[e, ffx, nx],
                )?;
                b.add(
                    experts,
                    t("ffn_down_exps.weight"),
                    TensorRole::FfnDownExps,
                    l,
                    &[ffx, e, nx],
                )?;
                groups.extend([router, experts]);
                if b.has(&t("ffn_gate_shexp.weight")) {
                    let fs = match shexp_key {
                        Some(v) => v,
                        None => b.infos[b.by_name[t("ffn_gate_shexp.weight").as_str()]]
                            .dims
                            .get(1)
                            .copied()
                            .unwrap_or(0),
                    };
                    if n_ff_shared_expert == 0 {
                        n_ff_shared_expert = nonzero(&k("expert_shared_feed_forward_length"), fs)?;
                    }
                    let fs = n_ff_shared_expert as u64;
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
                }
            } else {
                let ffn = b.new_group(GroupRole::Ffn, l);
                b.add(ffn, t("ffn_norm.weight"), TensorRole::FfnNorm, l, &[e])?;
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
            // Sliding layers use the local rope base without rope scaling (llama.cpp's
            // rope_freq_scale_train_swa is 1).
            let global = !sliding;
            layers.push(LayerSpec {
                index: il,
                window: if global { None } else { sliding_window },
                rope_base: if global { rope_base } else { rope_base_swa },
                rope_linear_scale: if global { rope_linear_scale } else { 1.0 },
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
        let tied_embeddings = !b.has("output.weight");
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
            n_expert,
            n_expert_used,
            n_ff_expert,
            n_ff_shared_expert,
            expert_weights_norm,
            sliding_window,
            attn_softcap,
            final_softcap,
            embed_scale,
            tied_embeddings,
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
/// the period is [`GEMMA3_GLOBAL_EVERY`].
fn swa_pattern(h: &GgufHeader, key: &str, n_layer: usize) -> Result<Vec<bool>, SpecError> {
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
        None => GEMMA3_GLOBAL_EVERY,
    };
    Ok((0..n_layer).map(|il| n == 0 || il % n < n - 1).collect())
}

/// Linear rope scaling factor from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`).
fn rope_scale(h: &GgufHeader, a: &str) -> Result<f32, SpecError> {
    let factor_key = format!("{a}.rope.scaling.factor");
    match meta_str(h, &format!("{a}.rope.scaling.type"))? {
        None | Some("none") => {}
        Some("linear") => {
            let f = meta_f32(h, &factor_key)?.ok_or(SpecError::MissingKey {
                key: factor_key.clone(),
            })?;
            if !(f.is_finite() && f > 0.0) {
                return Err(SpecError::BadKey {
                    key: factor_key,
                    what: format!("factor {f} must be > 0"),
                });
            }
            return Ok(f);
        }
        Some(other) => {
            return Err(SpecError::UnsupportedRopeScaling {
                kind: other.to_string(),
            })
        }
    }
    match meta_f32(h, &format!("{a}.rope.scale_linear"))? {
        Some(f) if f.is_finite() && f > 0.0 => Ok(f),
        Some(f) => Err(SpecError::BadKey {
            key: format!("{a}.rope.scale_linear"),
            what: format!("factor {f} must be > 0"),
        }),
        None => Ok(1.0),
    }
}
