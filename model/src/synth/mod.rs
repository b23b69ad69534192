//! Synthetic models: GGUF files with random weights and the exact tensor layout and metadata of real
//! models, loadable by pshard and by llama.cpp (all hparam keys, `{arch}.vocab_size`, tokenizer model
//! `none`), so one file serves side-by-side comparisons.
//!
//! - [`preset`] / [`preset_names`]: the models (real hparams, plus `tiny-*` variants of a few MB).
//! - [`QuantRecipe`]: which ggml type each tensor gets, following llama.cpp's quantization rules
//!   (including its fallbacks for rows that are not a multiple of 256).
//! - [`plan`]: metadata and tensor table of a (preset, recipe) without generating any data;
//!   [`SynthPlan::header`] gives the in-memory [`GgufHeader`] so big models can be checked instantly.
//! - [`write_synth`]: generates the weights (valid random blocks, σ ≈ 1/√fan_in so activations stay
//!   O(1); deterministic per seed and independent of the thread count) in parallel and streams the file.

mod blocks;
mod presets;

use std::io::{self, Write};

use rayon::prelude::*;

pub use blocks::{Init, Rng};
pub use presets::{preset, preset_names, Llama3Rope, SynthMla, SynthPreset, SynthYarn};

use crate::ggml_type::GgmlType;
use crate::gguf::{GgufHeader, GgufWriter, MetaValue, TensorInfo};
use crate::spec::Arch;

/// Alignment of the tensor data in synthetic files (GGUF's default).
pub const SYNTH_ALIGNMENT: u64 = 32;

/// A quantization recipe: the type of each tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantRecipe {
    /// Every tensor F32 (llama.cpp's `ALL_F32`): what the llama.cpp reference logits use, where
    /// both sides multiply in f32.
    F32,
    /// Every matrix F16; norms, biases and the router F32.
    F16,
    /// Every matrix Q8_0 (output too, as llama.cpp's Q8_0).
    Q8_0,
    /// Q4_0 matrices, Q6_K output (llama.cpp's Q4_0 mix).
    Q4_0,
    /// Q4_K for every matrix including the token embedding, Q6_K output (the recipe of the published
    /// comparison numbers).
    Q4_K,
    /// llama.cpp's Q4_K_M mix: Q4_K base, Q6_K output, Q6_K on `attn_v` and `ffn_down` of the
    /// `use_more_bits` layers (first and last eighth, every third in between), and its 70B and
    /// 8-expert bumps.
    Q4_K_M,
    /// llama.cpp's IQ4_NL mix: IQ4_NL base, Q6_K output, Q5_K on `attn_v` when 4+ query heads
    /// share a KV head and on `ffn_down` of the first eighth of the layers, and its 8-expert bumps.
    IQ4_NL,
    /// llama.cpp's IQ4_XS mix: as [`QuantRecipe::IQ4_NL`] with IQ4_XS base (IQ4_NL where a row is
    /// not whole 256-blocks).
    IQ4_XS,
    /// llama.cpp's MXFP4_MOE mix: expert tensors MXFP4, every other matrix (output and embeddings
    /// included) Q8_0.
    MXFP4_MOE,
    /// Every matrix MXFP4 (what `llama-quantize --pure` writes for MXFP4_MOE): MXFP4 in dense
    /// models too.
    MXFP4,
}

impl QuantRecipe {
    /// All recipes.
    pub const ALL: [QuantRecipe; 10] = [
        QuantRecipe::F32,
        QuantRecipe::F16,
        QuantRecipe::Q8_0,
        QuantRecipe::Q4_0,
        QuantRecipe::Q4_K,
        QuantRecipe::Q4_K_M,
        QuantRecipe::IQ4_NL,
        QuantRecipe::IQ4_XS,
        QuantRecipe::MXFP4_MOE,
        QuantRecipe::MXFP4,
    ];

    /// Lowercase name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            QuantRecipe::F32 => "f32",
            QuantRecipe::F16 => "f16",
            QuantRecipe::Q8_0 => "q8_0",
            QuantRecipe::Q4_0 => "q4_0",
            QuantRecipe::Q4_K => "q4_k",
            QuantRecipe::Q4_K_M => "q4_k_m",
            QuantRecipe::IQ4_NL => "iq4_nl",
            QuantRecipe::IQ4_XS => "iq4_xs",
            QuantRecipe::MXFP4_MOE => "mxfp4_moe",
            QuantRecipe::MXFP4 => "mxfp4",
        }
    }

    /// Parses a recipe name (case-insensitive).
    pub fn from_name(s: &str) -> Option<QuantRecipe> {
        QuantRecipe::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(s))
    }

    /// `general.file_type` (llama.cpp's ftype enum; `q4_k` is reported as Q4_K_S, its closest mix,
    /// and `mxfp4` as MXFP4_MOE, the ftype `--pure` keeps).
    pub fn file_type(self) -> u32 {
        match self {
            QuantRecipe::F32 => 0,
            QuantRecipe::F16 => 1,
            QuantRecipe::Q8_0 => 7,
            QuantRecipe::Q4_0 => 2,
            QuantRecipe::Q4_K => 14,
            QuantRecipe::Q4_K_M => 15,
            QuantRecipe::IQ4_NL => 25,
            QuantRecipe::IQ4_XS => 30,
            QuantRecipe::MXFP4_MOE | QuantRecipe::MXFP4 => 38,
        }
    }

    fn base(self) -> GgmlType {
        match self {
            QuantRecipe::F32 => GgmlType::F32,
            QuantRecipe::F16 => GgmlType::F16,
            QuantRecipe::Q8_0 => GgmlType::Q8_0,
            QuantRecipe::Q4_0 => GgmlType::Q4_0,
            QuantRecipe::Q4_K | QuantRecipe::Q4_K_M => GgmlType::Q4_K,
            QuantRecipe::IQ4_NL => GgmlType::IQ4_NL,
            QuantRecipe::IQ4_XS => GgmlType::IQ4_XS,
            QuantRecipe::MXFP4_MOE | QuantRecipe::MXFP4 => GgmlType::MXFP4,
        }
    }
}

/// Kind of a planned tensor, for type selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// 1-D weights that stay F32 (norms, biases, rope factors).
    Vector,
    /// The MoE router (llama.cpp never quantizes it).
    Router,
    TokenEmbd,
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGateUp,
    FfnDown,
    /// Matrices llama.cpp's quantizer puts in no category: the recipe's base type (latent
    /// attention's projections, multi-token-prediction projections).
    Other,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third in between.
pub fn use_more_bits(i_layer: usize, n_layer: usize) -> bool {
    i_layer < n_layer / 8
        || i_layer >= 7 * n_layer / 8
        // Here i_layer ≥ n_layer / 8, so the subtraction cannot underflow.
        || (i_layer - n_layer / 8) % 3 == 2
}

/// Replaces a type whose block does not divide the row length `cols`, as llama.cpp does
/// (K-quants to legacy 32-blocks, IQ4_XS to IQ4_NL, then F16).
fn fallback(ty: GgmlType, cols: usize) -> GgmlType {
    if (cols as u64).is_multiple_of(ty.block_size()) {
        return ty;
    }
    let alt = match ty {
        GgmlType::IQ4_XS => GgmlType::IQ4_NL,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    if (cols as u64).is_multiple_of(alt.block_size()) {
        alt
    } else {
        GgmlType::F16
    }
}

/// The type llama.cpp's `llama-quantize` gives a tensor of `kind` in `layer` with rows of `cols`
/// under `recipe` (`expert`: a stacked 3-D expert tensor).
fn tensor_type(
    p: &SynthPreset,
    recipe: QuantRecipe,
    kind: Kind,
    layer: usize,
    cols: usize,
    expert: bool,
) -> GgmlType {
    use GgmlType as T;
    if matches!(kind, Kind::Vector | Kind::Router) {
        return T::F32;
    }
    let base = recipe.base();
    match recipe {
        QuantRecipe::F32 => return T::F32,
        QuantRecipe::F16 => return T::F16,
        QuantRecipe::MXFP4 => return fallback(T::MXFP4, cols),
        QuantRecipe::MXFP4_MOE => {
            return fallback(if expert { T::MXFP4 } else { T::Q8_0 }, cols);
        }
        _ => {}
    }
    // The output projection (or the embedding table when it doubles as the output).
    if kind == Kind::Output || (kind == Kind::TokenEmbd && p.tied) {
        return if !cols.is_multiple_of(256) || base == T::Q8_0 {
            T::Q8_0
        } else {
            T::Q6_K
        };
    }
    let mut ty = base;
    if recipe == QuantRecipe::Q4_K_M {
        let is_70b = p.arch == Arch::Llama && p.n_layer == 80;
        match kind {
            Kind::AttnV => {
                if use_more_bits(layer, p.n_layer) {
                    ty = T::Q6_K;
                }
                if is_70b && ty == T::Q4_K {
                    ty = T::Q5_K;
                }
                if p.n_expert == 8 {
                    ty = T::Q8_0;
                }
            }
            Kind::AttnK if p.n_expert == 8 => ty = T::Q8_0,
            Kind::FfnDown if use_more_bits(layer, p.n_layer) => ty = T::Q6_K,
            Kind::AttnOutput if p.n_expert == 8 => ty = T::Q5_K,
            _ => {}
        }
    }
    if matches!(recipe, QuantRecipe::IQ4_NL | QuantRecipe::IQ4_XS) {
        match kind {
            Kind::AttnV => {
                if p.n_head >= 4 * p.n_head_kv {
                    ty = T::Q5_K;
                }
                if p.n_expert == 8 {
                    ty = T::Q8_0;
                }
            }
            Kind::AttnK if p.n_expert == 8 => ty = T::Q8_0,
            // Without an importance matrix (synthetic files have none).
            Kind::FfnDown if layer < p.n_layer / 8 => ty = T::Q5_K,
            Kind::AttnOutput if p.n_expert == 8 => ty = T::Q5_K,
            _ => {}
        }
    }
    fallback(ty, cols)
}

/// One tensor of a synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    /// GGUF name.
    pub name: String,
    /// Dims, ggml order.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Values to generate.
    pub init: Init,
}

impl PlannedTensor {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        self.ty
            .tensor_bytes(self.n_elements())
            .expect("planned dims are whole blocks")
    }
}

/// Metadata and tensor table of a synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthPlan {
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensors in file order.
    pub tensors: Vec<PlannedTensor>,
}

impl SynthPlan {
    /// Total tensor data bytes (what llama-bench reports as the model size).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes()).sum()
    }

    fn writer<W: Write>(&self, out: W) -> io::Result<GgufWriter<W>> {
        let mut w = GgufWriter::new(out, SYNTH_ALIGNMENT);
        for (k, v) in &self.metadata {
            w.add_meta(k, v.clone());
        }
        for t in &self.tensors {
            w.add_tensor(&t.name, &t.dims, t.ty)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        }
        Ok(w)
    }

    /// The header the written file will have (metadata, tensor table with offsets, data offset),
    /// built in memory without generating weights.
    pub fn header(&self) -> io::Result<GgufHeader> {
        let mut bytes = Vec::new();
        let mut w = self.writer(&mut bytes)?;
        w.write_header()?;
        // Only the header goes into `bytes`; the writer is dropped without streaming any data.
        let tensors: Vec<TensorInfo> = w.tensors().to_vec();
        drop(w);
        Ok(GgufHeader {
            version: 3,
            metadata: self.metadata.clone(),
            tensors,
            alignment: SYNTH_ALIGNMENT,
            data_offset: bytes.len() as u64,
        })
    }

    /// Size of the file [`write_synth`] writes.
    pub fn file_bytes(&self) -> io::Result<u64> {
        let h = self.header()?;
        let end = h.tensors.last().map(|t| t.offset + t.bytes).unwrap_or(0);
        Ok(h.data_offset + end.next_multiple_of(SYNTH_ALIGNMENT))
    }
}

/// Plans the metadata and tensors of a preset under a recipe.
pub fn plan(p: &SynthPreset, recipe: QuantRecipe) -> SynthPlan {
    let a = p.arch.gguf_name();
    let mut md: Vec<(String, MetaValue)> = Vec::new();
    let mut kv = |k: &str, v: MetaValue| md.push((format!("{a}.{k}"), v));
    let u = |x: usize| MetaValue::U32(x as u32);
    let f = MetaValue::F32;
    kv("context_length", u(p.n_ctx_train));
    kv("embedding_length", u(p.n_embd));
    kv("block_count", u(p.n_layer + p.n_nextn));
    kv("feed_forward_length", u(p.n_ff));
    kv("attention.head_count", u(p.n_head));
    kv("attention.head_count_kv", u(p.n_head_kv));
    kv("attention.layer_norm_rms_epsilon", f(p.norm_eps));
    kv("rope.freq_base", f(p.rope_base));
    if let Some(m) = p.mla {
        // As llama.cpp's converter writes latent attention: one KV head of the latent plus the
        // rope key, the values the latent itself.
        kv("attention.key_length", u(m.kv_lora_rank + m.rope));
        kv("attention.value_length", u(m.kv_lora_rank));
        kv("attention.key_length_mla", u(m.nope + m.rope));
        kv("attention.value_length_mla", u(m.head_dim_v));
        kv("attention.kv_lora_rank", u(m.kv_lora_rank));
        if m.q_lora_rank > 0 {
            kv("attention.q_lora_rank", u(m.q_lora_rank));
        }
        kv("rope.dimension_count", u(m.rope));
    } else if p.head_dim * p.n_head != p.n_embd || p.arch != Arch::Llama {
        kv("attention.key_length", u(p.head_dim));
        kv("attention.value_length", u(p.head_dim));
    }
    if p.arch == Arch::Llama {
        kv("rope.dimension_count", u(p.head_dim));
    }
    if let Some(d) = p.rope_dims {
        kv("rope.dimension_count", u(d));
    }
    if p.n_expert > 0 {
        kv("expert_count", u(p.n_expert));
        kv("expert_used_count", u(p.n_expert_used));
        if p.arch != Arch::Llama {
            kv("expert_feed_forward_length", u(p.n_ff_expert));
        }
    }
    if matches!(p.arch, Arch::Glm4Moe | Arch::Deepseek2) {
        kv("expert_shared_count", u(p.n_expert_shared));
        kv("leading_dense_block_count", u(p.n_layer_dense_lead));
    }
    if p.arch == Arch::Glm4Moe {
        // GLM's converter writes the sigmoid gating (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID).
        kv("expert_gating_func", u(2));
    }
    if let Some(s) = p.expert_weights_scale {
        kv("expert_weights_scale", f(s));
    }
    if let Some(n) = p.expert_weights_norm {
        kv("expert_weights_norm", MetaValue::Bool(n));
    }
    if let Some((g, used)) = p.expert_groups {
        kv("expert_group_count", u(g));
        kv("expert_group_used_count", u(used));
    }
    if p.n_nextn > 0 {
        kv("nextn_predict_layers", u(p.n_nextn));
    }
    if let Some(w) = p.sliding_window {
        kv("attention.sliding_window", u(w));
    }
    if let Some(fac) = p.rope_linear {
        kv("rope.scaling.type", MetaValue::String("linear".to_string()));
        kv("rope.scaling.factor", f(fac));
    }
    if let Some(y) = p.yarn {
        kv("rope.scaling.type", MetaValue::String("yarn".to_string()));
        kv("rope.scaling.factor", f(y.factor));
        kv("rope.scaling.original_context_length", u(y.orig_ctx));
        if let Some(m) = y.log_mul {
            kv("rope.scaling.yarn_log_multiplier", f(m));
        }
    }
    kv("vocab_size", u(p.n_vocab));
    md.insert(
        0,
        ("general.architecture".into(), MetaValue::String(a.into())),
    );
    md.insert(
        1,
        (
            "general.name".into(),
            MetaValue::String(p.model_name.to_string()),
        ),
    );
    md.push((
        "tokenizer.ggml.model".into(),
        MetaValue::String("none".to_string()),
    ));
    md.push((
        "general.file_type".into(),
        MetaValue::U32(recipe.file_type()),
    ));
    if !matches!(recipe, QuantRecipe::F16 | QuantRecipe::F32) {
        md.push(("general.quantization_version".into(), MetaValue::U32(2)));
    }

    let mut t = Tensors {
        p,
        recipe,
        list: Vec::new(),
    };
    let (e, v) = (p.n_embd as u64, p.n_vocab as u64);
    if let Some(r) = p.llama3_rope {
        let f = r.freq_factors(p.head_dim, p.rope_base);
        t.add(
            "rope_freqs.weight".into(),
            vec![p.head_dim as u64 / 2],
            Kind::Vector,
            0,
            Init::Values(f),
        );
    }
    // Untied embeddings: rows of σ 1 (the first norm rescales them). Tied: σ 1/√n_embd so the logits
    // stay O(1); gemma3 multiplies by √n_embd at lookup, which brings its rows back to σ 1.
    let embd_sigma = if p.tied { 1.0 / (e as f32).sqrt() } else { 1.0 };
    t.add(
        "token_embd.weight".into(),
        vec![e, v],
        Kind::TokenEmbd,
        0,
        Init::Random { sigma: embd_sigma },
    );
    for il in 0..p.n_layer + p.n_nextn {
        plan_layer(&mut t, il);
    }
    t.add(
        "output_norm.weight".into(),
        vec![e],
        Kind::Vector,
        0,
        norm_init(),
    );
    if !p.tied {
        t.add(
            "output.weight".into(),
            vec![e, v],
            Kind::Output,
            0,
            mat_init(e),
        );
    }
    SynthPlan {
        metadata: md,
        tensors: t.list,
    }
}

/// Tensors being planned.
struct Tensors<'a> {
    p: &'a SynthPreset,
    recipe: QuantRecipe,
    list: Vec<PlannedTensor>,
}

impl Tensors<'_> {
    fn add(&mut self, name: String, dims: Vec<u64>, kind: Kind, layer: usize, init: Init) {
        let ty = tensor_type(
            self.p,
            self.recipe,
            kind,
            layer,
            dims[0] as usize,
            dims.len() == 3,
        );
        self.list.push(PlannedTensor {
            name,
            dims,
            ty,
            init,
        });
    }
}

/// Norm weights: around 1.
fn norm_init() -> Init {
    Init::Around {
        center: 1.0,
        noise: 0.02,
    }
}

/// A matrix of `fan_in` inputs: σ 1/√fan_in, so activations stay O(1).
fn mat_init(fan_in: u64) -> Init {
    Init::Random {
        sigma: 1.0 / (fan_in as f32).sqrt(),
    }
}

/// Small biases.
fn bias_init() -> Init {
    Init::Random { sigma: 0.02 }
}

/// Layer `il`'s tensors (a multi-token-prediction layer's too, past `n_layer`).
fn plan_layer(t: &mut Tensors, il: usize) {
    let p = t.p;
    let n = |s: &str| format!("blk.{il}.{s}");
    let (e, hq, hkv, hd) = (
        p.n_embd as u64,
        p.n_head as u64,
        p.n_head_kv as u64,
        p.head_dim as u64,
    );
    t.add(
        n("attn_norm.weight"),
        vec![e],
        Kind::Vector,
        il,
        norm_init(),
    );
    if let Some(m) = p.mla {
        let (ql, kl) = (m.q_lora_rank as u64, m.kv_lora_rank as u64);
        let (nope, rope, vm) = (m.nope as u64, m.rope as u64, m.head_dim_v as u64);
        if ql > 0 {
            t.add(
                n("attn_q_a.weight"),
                vec![e, ql],
                Kind::Other,
                il,
                mat_init(e),
            );
            t.add(
                n("attn_q_a_norm.weight"),
                vec![ql],
                Kind::Vector,
                il,
                norm_init(),
            );
            t.add(
                n("attn_q_b.weight"),
                vec![ql, hq * (nope + rope)],
                Kind::Other,
                il,
                mat_init(ql),
            );
        } else {
            t.add(
                n("attn_q.weight"),
                vec![e, hq * (nope + rope)],
                Kind::AttnQ,
                il,
                mat_init(e),
            );
        }
        t.add(
            n("attn_kv_a_mqa.weight"),
            vec![e, kl + rope],
            Kind::Other,
            il,
            mat_init(e),
        );
        t.add(
            n("attn_kv_a_norm.weight"),
            vec![kl],
            Kind::Vector,
            il,
            norm_init(),
        );
        t.add(
            n("attn_k_b.weight"),
            vec![nope, kl, hq],
            Kind::Other,
            il,
            mat_init(nope),
        );
        t.add(
            n("attn_v_b.weight"),
            vec![kl, vm, hq],
            Kind::Other,
            il,
            mat_init(kl),
        );
        t.add(
            n("attn_output.weight"),
            vec![hq * vm, e],
            Kind::AttnOutput,
            il,
            mat_init(hq * vm),
        );
    } else {
        t.add(
            n("attn_q.weight"),
            vec![e, hq * hd],
            Kind::AttnQ,
            il,
            mat_init(e),
        );
        t.add(
            n("attn_k.weight"),
            vec![e, hkv * hd],
            Kind::AttnK,
            il,
            mat_init(e),
        );
        t.add(
            n("attn_v.weight"),
            vec![e, hkv * hd],
            Kind::AttnV,
            il,
            mat_init(e),
        );
        if matches!(p.arch, Arch::Qwen2 | Arch::GptOss | Arch::Glm4Moe) {
            t.add(
                n("attn_q.bias"),
                vec![hq * hd],
                Kind::Vector,
                il,
                bias_init(),
            );
            t.add(
                n("attn_k.bias"),
                vec![hkv * hd],
                Kind::Vector,
                il,
                bias_init(),
            );
            t.add(
                n("attn_v.bias"),
                vec![hkv * hd],
                Kind::Vector,
                il,
                bias_init(),
            );
        }
        if matches!(p.arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3) || p.qk_norm {
            t.add(
                n("attn_q_norm.weight"),
                vec![hd],
                Kind::Vector,
                il,
                norm_init(),
            );
            t.add(
                n("attn_k_norm.weight"),
                vec![hd],
                Kind::Vector,
                il,
                norm_init(),
            );
        }
        t.add(
            n("attn_output.weight"),
            vec![hq * hd, e],
            Kind::AttnOutput,
            il,
            mat_init(hq * hd),
        );
    }
    if p.arch == Arch::GptOss {
        t.add(
            n("attn_output.bias"),
            vec![e],
            Kind::Vector,
            il,
            bias_init(),
        );
        t.add(
            n("attn_sinks.weight"),
            vec![hq],
            Kind::Vector,
            il,
            Init::Random { sigma: 1.0 },
        );
    }
    if p.arch == Arch::Gemma3 {
        t.add(
            n("post_attention_norm.weight"),
            vec![e],
            Kind::Vector,
            il,
            norm_init(),
        );
    }
    // gpt-oss and glm4moe call their FFN input norm post_attention_norm.
    let ffn_norm = if matches!(p.arch, Arch::GptOss | Arch::Glm4Moe) {
        "post_attention_norm.weight"
    } else {
        "ffn_norm.weight"
    };
    t.add(n(ffn_norm), vec![e], Kind::Vector, il, norm_init());
    if p.n_expert > 0 && il >= p.n_layer_dense_lead {
        let (x, f) = (p.n_expert as u64, p.n_ff_expert as u64);
        t.add(
            n("ffn_gate_inp.weight"),
            vec![e, x],
            Kind::Router,
            il,
            mat_init(e),
        );
        match p.arch {
            Arch::GptOss => t.add(
                n("ffn_gate_inp.bias"),
                vec![x],
                Kind::Vector,
                il,
                Init::Random { sigma: 0.1 },
            ),
            Arch::Glm4Moe => t.add(
                n("exp_probs_b.bias"),
                vec![x],
                Kind::Vector,
                il,
                Init::Random { sigma: 0.1 },
            ),
            _ => {}
        }
        t.add(
            n("ffn_gate_exps.weight"),
            vec![e, f, x],
            Kind::FfnGateUp,
            il,
            mat_init(e),
        );
        t.add(
            n("ffn_up_exps.weight"),
            vec![e, f, x],
            Kind::FfnGateUp,
            il,
            mat_init(e),
        );
        t.add(
            n("ffn_down_exps.weight"),
            vec![f, e, x],
            Kind::FfnDown,
            il,
            mat_init(f),
        );
        if p.arch == Arch::GptOss {
            t.add(
                n("ffn_gate_exps.bias"),
                vec![f, x],
                Kind::Vector,
                il,
                bias_init(),
            );
            t.add(
                n("ffn_up_exps.bias"),
                vec![f, x],
                Kind::Vector,
                il,
                bias_init(),
            );
            t.add(
                n("ffn_down_exps.bias"),
                vec![e, x],
                Kind::Vector,
                il,
                bias_init(),
            );
        }
        if p.n_expert_shared > 0 {
            let fs = f * p.n_expert_shared as u64;
            t.add(
                n("ffn_gate_shexp.weight"),
                vec![e, fs],
                Kind::FfnGateUp,
                il,
                mat_init(e),
            );
            t.add(
                n("ffn_up_shexp.weight"),
                vec![e, fs],
                Kind::FfnGateUp,
                il,
                mat_init(e),
            );
            t.add(
                n("ffn_down_shexp.weight"),
                vec![fs, e],
                Kind::FfnDown,
                il,
                mat_init(fs),
            );
        }
    } else {
        let f = p.n_ff as u64;
        t.add(
            n("ffn_gate.weight"),
            vec![e, f],
            Kind::FfnGateUp,
            il,
            mat_init(e),
        );
        t.add(
            n("ffn_up.weight"),
            vec![e, f],
            Kind::FfnGateUp,
            il,
            mat_init(e),
        );
        t.add(
            n("ffn_down.weight"),
            vec![f, e],
            Kind::FfnDown,
            il,
            mat_init(f),
        );
    }
    if p.arch == Arch::Gemma3 {
        t.add(
            n("post_ffw_norm.weight"),
            vec![e],
            Kind::Vector,
            il,
            norm_init(),
        );
    }
    if il >= p.n_layer {
        // The multi-token-prediction block's own tensors (llama.cpp's NEXTN_*).
        t.add(
            n("nextn.eh_proj.weight"),
            vec![2 * e, e],
            Kind::Other,
            il,
            mat_init(2 * e),
        );
        for s in [
            "nextn.enorm.weight",
            "nextn.hnorm.weight",
            "nextn.shared_head_norm.weight",
        ] {
            t.add(n(s), vec![e], Kind::Vector, il, norm_init());
        }
    }
}

/// Elements per generation chunk: a multiple of every block size, so chunks are whole blocks, and
/// fixed, so the bytes do not depend on the thread count.
const CHUNK_ELEMS: u64 = 1 << 18;
/// Bytes generated per batch before it is written (while the next batch is generated).
const BATCH_BYTES: u64 = 64 << 20;

/// One chunk of generation work.
#[derive(Clone, Copy)]
struct Job {
    tensor: usize,
    chunk: u64,
    first_elem: u64,
    bytes: usize,
}

fn batches(plan: &SynthPlan) -> Vec<Vec<Job>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut cur_bytes = 0u64;
    for (ti, t) in plan.tensors.iter().enumerate() {
        let n = t.n_elements();
        let mut first = 0;
        let mut chunk = 0;
        while first < n {
            let elems = CHUNK_ELEMS.min(n - first);
            let bytes = t.ty.tensor_bytes(elems).expect("whole blocks");
            cur.push(Job {
                tensor: ti,
                chunk,
                first_elem: first,
                bytes: bytes as usize,
            });
            cur_bytes += bytes;
            if cur_bytes >= BATCH_BYTES {
                out.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            first += elems;
            chunk += 1;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn generate(plan: &SynthPlan, seed: u64, jobs: &[Job], buf: &mut Vec<u8>) -> io::Result<()> {
    let total: usize = jobs.iter().map(|j| j.bytes).sum();
    buf.clear();
    buf.resize(total, 0);
    let mut slices = Vec::with_capacity(jobs.len());
    let mut rest = buf.as_mut_slice();
    for j in jobs {
        let (a, b) = rest.split_at_mut(j.bytes);
        slices.push((j, a));
        rest = b;
    }
    slices.into_par_iter().try_for_each(|(j, out)| {
        let t = &plan.tensors[j.tensor];
        let mut rng = Rng::new(seed, j.tensor as u64, j.chunk);
        if blocks::fill(t.ty, &t.init, j.first_elem as usize, &mut rng, out) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("synth cannot generate {} data for tensor {}", t.ty, t.name),
            ))
        }
    })
}

/// Writes the synthetic model `p` under `recipe` to `out` with weights from `seed`, calling
/// `progress(bytes_written, total_bytes)` after each batch of tensor data. Returns `out`, flushed.
///
/// Batches of chunks are generated in parallel (rayon) while the previous batch is written, so the
/// speed is bounded by the disk. The bytes depend only on (preset, recipe, seed).
pub fn write_synth<W: Write + Send>(
    p: &SynthPreset,
    recipe: QuantRecipe,
    seed: u64,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<W> {
    let plan = plan(p, recipe);
    write_plan(&plan, seed, out, progress)
}

/// Writes a planned model (see [`write_synth`]).
pub fn write_plan<W: Write + Send>(
    plan: &SynthPlan,
    seed: u64,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<W> {
    if let Some(t) = plan.tensors.iter().find(|t| !blocks::supported(t.ty)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("synth cannot generate {} data (tensor {})", t.ty, t.name),
        ));
    }
    let mut w = plan.writer(out)?;
    w.write_header()?;
    let total = plan.tensor_bytes();
    let mut done = 0u64;
    progress(0, total);
    let batches = batches(plan);
    let mut ready: Vec<u8> = Vec::new();
    let mut spare: Vec<u8> = Vec::new();
    if let Some(first) = batches.first() {
        generate(plan, seed, first, &mut ready)?;
    }
    for i in 0..batches.len() {
        let next = batches.get(i + 1);
        let (wrote, gen) = rayon::join(
            || w.write_tensor_data(&ready),
            || match next {
                Some(jobs) => generate(plan, seed, jobs, &mut spare),
                None => Ok(()),
            },
        );
        wrote?;
        gen?;
        done += ready.len() as u64;
        progress(done, total);
        std::mem::swap(&mut ready, &mut spare);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_hand_computed_layers() {
        // 18 layers (gemma3-270m): first 2, last 3 and 4, 7, 10, 13.
        let v: Vec<usize> = (0..18).filter(|&i| use_more_bits(i, 18)).collect();
        assert_eq!(v, vec![0, 1, 4, 7, 10, 13, 15, 16, 17]);
        // 32 layers: 0..4, 28..32, and 6, 9, ..., 27.
        let n = (0..32).filter(|&i| use_more_bits(i, 32)).count();
        assert_eq!(n, 4 + 4 + 8);
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        assert_eq!(fallback(GgmlType::Q4_K, 576), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6_K, 640), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q5_K, 640), GgmlType::Q5_1);
        assert_eq!(fallback(GgmlType::Q4_K, 1024), GgmlType::Q4_K);
        assert_eq!(fallback(GgmlType::Q4_0, 48), GgmlType::F16);
        assert_eq!(fallback(GgmlType::IQ4_XS, 576), GgmlType::IQ4_NL);
        assert_eq!(fallback(GgmlType::MXFP4, 48), GgmlType::F16);
    }

    /// The lookup-table recipes pick llama.cpp's types tensor by tensor.
    #[test]
    fn lookup_table_recipes_follow_llama_cpp() {
        let count = |recipe, name: &str, want: GgmlType, p: &SynthPreset| {
            let pl = plan(p, recipe);
            let t = pl
                .tensors
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{name}"));
            assert_eq!(t.ty, want, "{} {name}", recipe.name());
        };
        // SmolLM2-135M's shapes: rows of 576 are not whole 256-blocks, 1536 are.
        let smol = preset("smollm2-135m").expect("preset");
        count(
            QuantRecipe::IQ4_XS,
            "blk.5.attn_q.weight",
            GgmlType::IQ4_NL,
            &smol,
        );
        count(
            QuantRecipe::IQ4_XS,
            "blk.5.ffn_down.weight",
            GgmlType::IQ4_XS,
            &smol,
        );
        // The first eighth of ffn_down gets Q5_K (rows of 1536 are whole 256-blocks).
        count(
            QuantRecipe::IQ4_XS,
            "blk.0.ffn_down.weight",
            GgmlType::Q5_K,
            &smol,
        );
        count(
            QuantRecipe::IQ4_XS,
            "blk.0.attn_v.weight",
            GgmlType::IQ4_NL,
            &smol,
        );
        count(
            QuantRecipe::IQ4_NL,
            "blk.5.ffn_down.weight",
            GgmlType::IQ4_NL,
            &smol,
        );
        count(
            QuantRecipe::IQ4_NL,
            "token_embd.weight",
            GgmlType::Q8_0,
            &smol,
        );
        count(
            QuantRecipe::MXFP4,
            "blk.3.attn_v.weight",
            GgmlType::MXFP4,
            &smol,
        );
        count(
            QuantRecipe::MXFP4,
            "token_embd.weight",
            GgmlType::MXFP4,
            &smol,
        );
        count(
            QuantRecipe::MXFP4_MOE,
            "blk.3.ffn_up.weight",
            GgmlType::Q8_0,
            &smol,
        );
        // A MoE: experts MXFP4 under MXFP4_MOE, the rest Q8_0; 8 experts bump attn_v to Q8_0.
        let moe = preset("mixtral-8x7b").expect("preset");
        count(
            QuantRecipe::MXFP4_MOE,
            "blk.0.ffn_up_exps.weight",
            GgmlType::MXFP4,
            &moe,
        );
        count(
            QuantRecipe::MXFP4_MOE,
            "blk.0.attn_q.weight",
            GgmlType::Q8_0,
            &moe,
        );
        count(
            QuantRecipe::MXFP4_MOE,
            "output.weight",
            GgmlType::Q8_0,
            &moe,
        );
        count(
            QuantRecipe::IQ4_XS,
            "blk.1.attn_v.weight",
            GgmlType::Q8_0,
            &moe,
        );
    }

    #[test]
    fn recipe_names_round_trip() {
        for r in QuantRecipe::ALL {
            assert_eq!(QuantRecipe::from_name(r.name()), Some(r));
        }
        assert_eq!(QuantRecipe::from_name("Q4_K_M"), Some(QuantRecipe::Q4_K_M));
        assert_eq!(QuantRecipe::from_name("q3_k"), None);
    }
}
