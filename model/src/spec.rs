//! `ModelSpec`: what a model is, built from the GGUF header alone (hparams, tensors, tensor groups).
//!
//! Weights are not touched here; each tensor records its type, shape, byte size and index in the file's
//! tensor table so the runtime can find its bytes and the planner can place it.

use crate::ggml_type::GgmlType;

/// Supported architecture families (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM; with `expert_count` > 0 also Mixtral-style MoE.
    Llama,
    /// Qwen2 / Qwen2.5 (q/k/v biases).
    Qwen2,
    /// Qwen3 dense (q/k norms).
    Qwen3,
    /// Qwen3 MoE (router, 3-D expert tensors).
    Qwen3Moe,
    /// Gemma 3 (pre/post norms, sliding window, GeGLU).
    Gemma3,
    /// gpt-oss (attention sinks, alternating sliding-window and full layers, biases, clamped
    /// SwiGLU experts, YaRN rope, softmax after top-k).
    GptOss,
    /// GLM-4.5 MoE (shared expert, sigmoid routing with a selection bias, partial rope, dense
    /// leading layers).
    Glm4Moe,
    /// DeepSeek-V2/V3 (multi-head latent attention, shared experts, dense leading layers,
    /// group-limited routing).
    Deepseek2,
}

impl Arch {
    /// The `general.architecture` string.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Gemma3 => "gemma3",
            Arch::GptOss => "gpt-oss",
            Arch::Glm4Moe => "glm4moe",
            Arch::Deepseek2 => "deepseek2",
        }
    }

    /// Every supported architecture.
    pub const ALL: [Arch; 8] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Qwen3Moe,
        Arch::Gemma3,
        Arch::GptOss,
        Arch::Glm4Moe,
        Arch::Deepseek2,
    ];

    /// Parses a `general.architecture` string.
    pub fn from_gguf_name(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.gguf_name() == s)
    }
}

/// How rotary embeddings pair up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeMode {
    /// Adjacent pairs (x[2i], x[2i+1]) — llama.
    Adjacent,
    /// Split halves (x[i], x[i + d/2]) — NEOX style: qwen*, gemma3.
    Neox,
}

/// How MoE router logits become the weights of the chosen experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Gating {
    /// Softmax over every expert; the top k keep their probabilities (llama, qwen3moe,
    /// deepseek2 by default).
    Softmax,
    /// Sigmoid of each logit (glm4moe, deepseek v3).
    Sigmoid,
    /// The top k of the raw logits, then a softmax over those k (gpt-oss).
    SoftmaxAfterTopK,
}

impl Gating {
    /// Short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Gating::Softmax => "softmax",
            Gating::Sigmoid => "sigmoid",
            Gating::SoftmaxAfterTopK => "softmax after top-k",
        }
    }
}

/// YaRN rope scaling as llama.cpp applies it (`rope.scaling.type = yarn`): each rotated pair's
/// angle mixes the position scaled by 1/factor with the unscaled one by a ramp over the pair
/// index, and the rotated values are multiplied by `mscale`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Yarn {
    /// `rope.scaling.original_context_length` (default: the training context).
    pub orig_ctx: usize,
    /// Pairs rotating faster than this many turns over the original context keep their
    /// frequency (llama.cpp's default 32).
    pub beta_fast: f32,
    /// Pairs rotating slower than this many turns are fully interpolated (default 1).
    pub beta_slow: f32,
    /// Weight of the ramp (1 for YaRN).
    pub ext_factor: f32,
    /// Multiplier of the rotated values: llama.cpp's `attn_factor` times its YaRN magnitude
    /// correction `1 + 0.1 ln(factor)`.
    pub mscale: f32,
}

impl Yarn {
    /// The pair-index range `[low, high]` over which the ramp goes from extrapolation to
    /// interpolation, for `n_dims` rotated dimensions and frequency `base` (ggml's
    /// `ggml_rope_yarn_corr_dims`, in f32 as it computes them).
    pub fn corr_dims(&self, n_dims: usize, base: f32) -> [f32; 2] {
        let corr = |turns: f32| {
            n_dims as f32 * (self.orig_ctx as f32 / (turns * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        [
            corr(self.beta_fast).floor().max(0.0),
            corr(self.beta_slow).ceil().min(n_dims as f32 - 1.0),
        ]
    }
}

/// Multi-head latent attention (deepseek2): K and V of every head are decompressed from one
/// latent vector per token, so the cache holds the latent (`kv_lora_rank`) and the shared rope
/// part (`rope_dims`) per token. Queries are absorbed into the latent space (`attn_k_b`), the
/// attention runs as one KV head of `kv_lora_rank + rope_dims` keys whose first
/// `kv_lora_rank` values are the V rows, and each head's output is decompressed by `attn_v_b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mla {
    /// Rank of the query compression (`attention.q_lora_rank`; 0: queries projected directly).
    pub q_lora_rank: usize,
    /// Rank of the KV compression (`attention.kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Query/key head dimensions without rope (`key_length_mla` − rope dims).
    pub nope: usize,
    /// Value head dimension after decompression (`value_length_mla`).
    pub head_dim_v: usize,
}

/// Architecture hyper-parameters, read from `{arch}.*` metadata keys.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Hparams {
    /// Vocabulary size (rows of the embedding table).
    pub n_vocab: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (GQA when < n_head).
    pub n_head_kv: usize,
    /// Dimension of one key head (`attention.key_length`, default n_embd / n_head).
    pub head_dim_k: usize,
    /// Dimension of one value head (`attention.value_length`, default head_dim_k).
    pub head_dim_v: usize,
    /// Dense FFN hidden width (0 for pure-MoE layers).
    pub n_ff: usize,
    /// Training context length.
    pub n_ctx_train: usize,
    /// RMS norm epsilon.
    pub norm_eps: f32,
    /// Rope frequency base of global layers.
    pub rope_base: f32,
    /// Rope base of sliding-window layers (gemma3: `rope.freq_base_swa`, default 10,000); equals
    /// rope_base where no layer slides.
    pub rope_base_local: f32,
    /// Linear rope scaling factor applied to positions of global layers (1.0 = none).
    pub rope_linear_scale: f32,
    /// Rotated dimensions per head (`rope.dimension_count`, default head_dim_k).
    pub rope_dims: usize,
    /// Rope pairing mode.
    pub rope_mode: RopeMode,
    /// Experts per MoE layer (0 = dense).
    pub n_expert: usize,
    /// Experts used per token.
    pub n_expert_used: usize,
    /// Hidden width of one expert.
    pub n_ff_expert: usize,
    /// Hidden width of the shared expert (0 = none).
    pub n_ff_shared_expert: usize,
    /// Renormalise the top-k expert weights to sum to 1.
    pub expert_weights_norm: bool,
    /// Sliding window length of local layers, if any.
    pub sliding_window: Option<usize>,
    /// Attention logit soft-cap, if any.
    pub attn_softcap: Option<f32>,
    /// Final logit soft-cap, if any.
    pub final_softcap: Option<f32>,
    /// Multiplier applied to embeddings after lookup (gemma: sqrt(n_embd)).
    pub embed_scale: f32,
    /// The output projection reuses the token embedding.
    pub tied_embeddings: bool,
    /// YaRN rope scaling (positions are then scaled by 1/`rope_linear_scale` as its factor).
    pub yarn: Option<Yarn>,
    /// Scale of the attention scores (1/√head_dim; deepseek2 with YaRN: its mscale² / √head_dim).
    pub attn_scale: f32,
    /// Leading layers with a dense FFN before the MoE layers (`leading_dense_block_count`).
    pub n_layer_dense_lead: usize,
    /// Shared experts per MoE layer (`expert_shared_count`; their FFN is `n_ff_shared_expert`
    /// wide).
    pub n_expert_shared: usize,
    /// How router logits become expert weights.
    pub gating: Gating,
    /// Multiplier of the routed experts' weights (`expert_weights_scale`; 1 = none).
    pub expert_weights_scale: f32,
    /// Expert groups for group-limited routing (`expert_group_count`; ≤ 1: none).
    pub n_expert_groups: usize,
    /// Groups a token's experts may come from (`expert_group_used_count`).
    pub n_group_used: usize,
    /// Multi-head latent attention, for deepseek2.
    pub mla: Option<Mla>,
    /// Multi-token-prediction layers the file holds after the decoder's (`nextn_predict_layers`;
    /// not run, their tensors are reported unused).
    pub n_nextn_layers: usize,
}

/// Role of a tensor group: the unit of placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum GroupRole {
    /// Token embedding table.
    Embed,
    /// Attention side of a layer: norm, q, k, v, o, biases, q/k norms, post-attention norm.
    Attn,
    /// Dense FFN of a layer: norm, gate, up, down, post-FFN norm.
    Ffn,
    /// MoE router of a layer (and the FFN norm in MoE layers).
    Router,
    /// MoE experts of a layer (gate/up/down_exps).
    Experts,
    /// Shared experts of a MoE layer.
    SharedExperts,
    /// Final norm.
    OutputNorm,
    /// Output projection (the embedding table when tied).
    Output,
}

impl GroupRole {
    /// Short lowercase name used in registries and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupRole::Embed => "embed",
            GroupRole::Attn => "attn",
            GroupRole::Ffn => "ffn",
            GroupRole::Router => "router",
            GroupRole::Experts => "experts",
            GroupRole::SharedExperts => "shared",
            GroupRole::OutputNorm => "output_norm",
            GroupRole::Output => "output",
        }
    }
}

/// Role of one tensor inside the model (maps to a GGUF tensor name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TensorRole {
    /// `token_embd.weight`
    TokenEmbd,
    /// `output_norm.weight`
    OutputNorm,
    /// `output.weight`
    Output,
    /// `rope_freqs.weight` (llama3 per-dimension frequency factors)
    RopeFreqs,
    /// `blk.N.attn_norm.weight`
    AttnNorm,
    /// `blk.N.attn_q.weight`
    AttnQ,
    /// `blk.N.attn_k.weight`
    AttnK,
    /// `blk.N.attn_v.weight`
    AttnV,
    /// `blk.N.attn_output.weight`
    AttnOutput,
    /// `blk.N.attn_q.bias`
    AttnQBias,
    /// `blk.N.attn_k.bias`
    AttnKBias,
    /// `blk.N.attn_v.bias`
    AttnVBias,
    /// `blk.N.attn_q_norm.weight`
    AttnQNorm,
    /// `blk.N.attn_k_norm.weight`
    AttnKNorm,
    /// `blk.N.post_attention_norm.weight` (gemma3: the attention output's norm)
    AttnPostNorm,
    /// The FFN's input norm: `blk.N.ffn_norm.weight`, or `blk.N.post_attention_norm.weight` in
    /// gpt-oss and glm4moe (which norm the residual after attention under that name).
    FfnNorm,
    /// `blk.N.ffn_gate.weight`
    FfnGate,
    /// `blk.N.ffn_up.weight`
    FfnUp,
    /// `blk.N.ffn_down.weight`
    FfnDown,
    /// `blk.N.post_ffw_norm.weight` (gemma3)
    FfnPostNorm,
    /// `blk.N.ffn_gate_inp.weight` (router)
    FfnGateInp,
    /// `blk.N.ffn_gate_exps.weight`
    FfnGateExps,
    /// `blk.N.ffn_up_exps.weight`
    FfnUpExps,
    /// `blk.N.ffn_down_exps.weight`
    FfnDownExps,
    /// `blk.N.ffn_gate_shexp.weight`
    FfnGateShexp,
    /// `blk.N.ffn_up_shexp.weight`
    FfnUpShexp,
    /// `blk.N.ffn_down_shexp.weight`
    FfnDownShexp,
    /// `blk.N.attn_output.bias` (gpt-oss)
    AttnOutputBias,
    /// `blk.N.attn_sinks.weight`: per-head sink logits (gpt-oss)
    AttnSinks,
    /// `blk.N.ffn_gate_inp.bias`: router logit bias (gpt-oss)
    FfnGateInpBias,
    /// `blk.N.ffn_gate_exps.bias`: per-expert gate bias (gpt-oss)
    FfnGateExpsBias,
    /// `blk.N.ffn_up_exps.bias` (gpt-oss)
    FfnUpExpsBias,
    /// `blk.N.ffn_down_exps.bias` (gpt-oss)
    FfnDownExpsBias,
    /// `blk.N.exp_probs_b.bias`: expert selection bias (glm4moe, deepseek v3)
    FfnExpProbsBias,
    /// `blk.N.attn_q_a.weight`: query compression (deepseek2 with q lora)
    AttnQA,
    /// `blk.N.attn_q_a_norm.weight`
    AttnQANorm,
    /// `blk.N.attn_q_b.weight`: query decompression
    AttnQB,
    /// `blk.N.attn_kv_a_mqa.weight`: KV compression plus the shared rope key
    AttnKvAMqa,
    /// `blk.N.attn_kv_a_norm.weight`
    AttnKvANorm,
    /// `blk.N.attn_k_b.weight`: per-head key decompression, transposed (absorbed into queries)
    AttnKB,
    /// `blk.N.attn_v_b.weight`: per-head value decompression
    AttnVB,
}

impl TensorRole {
    /// Whether tensors of this role are weight matrices read in their file block layout (by a
    /// matmul, the embedding lookup or the expert FFNs) rather than small vectors (norm weights,
    /// biases, rope factors) that every backend keeps as f32. The one definition of "matrix":
    /// placements, uploads and byte accounting all ask it.
    pub fn is_matrix(self) -> bool {
        use TensorRole::*;
        matches!(
            self,
            TokenEmbd
                | Output
                | AttnQ
                | AttnK
                | AttnV
                | AttnOutput
                | FfnGate
                | FfnUp
                | FfnDown
                | FfnGateInp
                | FfnGateExps
                | FfnUpExps
                | FfnDownExps
                | FfnGateShexp
                | FfnUpShexp
                | FfnDownShexp
                | AttnQA
                | AttnQB
                | AttnKvAMqa
                | AttnKB
                | AttnVB
        )
    }
}

/// Index of a tensor in [`ModelSpec::tensors`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TensorId(pub u32);

/// Index of a group in [`ModelSpec::groups`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct GroupId(pub u32);

/// One weight tensor of the model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorDesc {
    /// GGUF tensor name.
    pub name: String,
    /// What the tensor is.
    pub role: TensorRole,
    /// Layer index for per-layer tensors.
    pub layer: Option<usize>,
    /// The group this tensor is placed with.
    pub group: GroupId,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions in ggml order: `dims[0]` is the row length (input features).
    pub dims: Vec<u64>,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Index into the GGUF file's tensor table (across splits, in order).
    pub file_index: usize,
}

impl TensorDesc {
    /// Row length (`dims[0]`).
    pub fn cols(&self) -> usize {
        self.dims[0] as usize
    }
    /// Number of rows of one matrix (`dims[1]`, 1 for vectors).
    pub fn rows(&self) -> usize {
        self.dims.get(1).copied().unwrap_or(1) as usize
    }
    /// Number of matrices (`dims[2]`: experts; 1 otherwise).
    pub fn n_mats(&self) -> usize {
        self.dims.get(2).copied().unwrap_or(1) as usize
    }
    /// Whether this is a weight matrix (see [`TensorRole::is_matrix`]).
    pub fn is_matrix(&self) -> bool {
        self.role.is_matrix()
    }
    /// Bytes of one row of one matrix.
    pub fn row_bytes(&self) -> u64 {
        self.bytes / (self.rows() * self.n_mats()).max(1) as u64
    }
}

/// A tensor group: the unit of placement.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorGroup {
    /// What the group is.
    pub role: GroupRole,
    /// Layer index for per-layer groups.
    pub layer: Option<usize>,
    /// Member tensors, in execution order (for a tied output, the embedding table).
    pub tensors: Vec<TensorId>,
    /// Sum of member tensor bytes.
    pub bytes: u64,
}

/// One transformer block.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerSpec {
    /// Block index.
    pub index: usize,
    /// Sliding window for local-attention layers; `None` = global attention.
    pub window: Option<usize>,
    /// Rope base used by this layer.
    pub rope_base: f32,
    /// Linear rope position scale of this layer (1.0 = none).
    pub rope_linear_scale: f32,
    /// Groups of this layer in execution order (attn, then ffn or router/experts/shared).
    pub groups: Vec<GroupId>,
}

/// A model described from its GGUF header.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelSpec {
    /// Architecture family.
    pub arch: Arch,
    /// `general.name`, or the file stem.
    pub name: String,
    /// Hyper-parameters.
    pub hparams: Hparams,
    /// Every weight tensor the forward pass uses.
    pub tensors: Vec<TensorDesc>,
    /// Every tensor group.
    pub groups: Vec<TensorGroup>,
    /// Transformer blocks in order.
    pub layers: Vec<LayerSpec>,
    /// The embedding group.
    pub embed: GroupId,
    /// The final norm group.
    pub output_norm: GroupId,
    /// The output projection group.
    pub output: GroupId,
    /// `rope_freqs.weight`, if present (global, not placed with a layer).
    pub rope_freqs: Option<TensorId>,
}

impl ModelSpec {
    /// The tensor with this id.
    pub fn tensor(&self, id: TensorId) -> &TensorDesc {
        &self.tensors[id.0 as usize]
    }

    /// The group with this id.
    pub fn group(&self, id: GroupId) -> &TensorGroup {
        &self.groups[id.0 as usize]
    }

    /// Finds a tensor by role in a layer (`None` for global tensors).
    pub fn find(&self, layer: Option<usize>, role: TensorRole) -> Option<TensorId> {
        self.tensors
            .iter()
            .position(|t| t.layer == layer && t.role == role)
            .map(|i| TensorId(i as u32))
    }

    /// The group of a layer with this role, if the layer has one.
    pub fn layer_group(&self, layer: usize, role: GroupRole) -> Option<GroupId> {
        self.layers[layer]
            .groups
            .iter()
            .copied()
            .find(|g| self.group(*g).role == role)
    }

    /// Whether layers use mixture-of-experts FFNs.
    pub fn is_moe(&self) -> bool {
        self.hparams.n_expert > 0
    }
}
