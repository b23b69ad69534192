//! Synthetic model presets: the hparams of real models, and tiny variants of each architecture.

use crate::spec::Arch;

/// Llama 3.1/3.2-style rope frequency scaling, stored in the GGUF as `rope_freqs.weight`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    /// Overall scaling factor (low-frequency dimensions are divided by it).
    pub factor: f32,
    /// `low_freq_factor` of the scheme.
    pub low_freq_factor: f32,
    /// `high_freq_factor` of the scheme.
    pub high_freq_factor: f32,
    /// Original training context of the scheme.
    pub original_context: f32,
}

impl Llama3Rope {
    /// The per-pair frequency divisors for `n_dims` rotated dimensions and `base` (length n_dims / 2).
    ///
    /// Pairs whose wavelength is shorter than `original_context / high_freq_factor` keep their frequency
    /// (factor 1), those longer than `original_context / low_freq_factor` are slowed by `factor`, and those
    /// in between are interpolated smoothly in inverse-factor space.
    pub fn freq_factors(&self, n_dims: usize, base: f32) -> Vec<f32> {
        let low_wavelen = self.original_context / self.low_freq_factor;
        let high_wavelen = self.original_context / self.high_freq_factor;
        (0..n_dims / 2)
            .map(|i| {
                let freq = (base as f64).powf(-(2.0 * i as f64) / n_dims as f64);
                let wavelen = (2.0 * std::f64::consts::PI / freq) as f32;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_context / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect()
    }
}

/// The hparams and layout choices of one synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthPreset {
    /// Preset name (`pshard synth NAME`).
    pub name: &'static str,
    /// `general.name` written into the file.
    pub model_name: &'static str,
    /// Architecture family.
    pub arch: Arch,
    /// Vocabulary size (embedding rows).
    pub n_vocab: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Head dimension (keys and values).
    pub head_dim: usize,
    /// `feed_forward_length` (dense FFN width; for Mixtral also the expert width).
    pub n_ff: usize,
    /// Training context length.
    pub n_ctx_train: usize,
    /// RMS norm epsilon.
    pub norm_eps: f32,
    /// Rope frequency base.
    pub rope_base: f32,
    /// Experts per MoE layer (0 = dense).
    pub n_expert: usize,
    /// Experts used per token.
    pub n_expert_used: usize,
    /// Expert FFN width (0 when dense).
    pub n_ff_expert: usize,
    /// Sliding window of local layers (gemma3).
    pub sliding_window: Option<usize>,
    /// Output projection tied to the embedding table (no `output.weight`).
    pub tied: bool,
    /// Llama3 rope scaling (adds `rope_freqs.weight`).
    pub llama3_rope: Option<Llama3Rope>,
    /// Linear rope scaling factor of global layers (`rope.scaling.type = linear`).
    pub rope_linear: Option<f32>,
    /// YaRN rope scaling (`rope.scaling.type = yarn`).
    pub yarn: Option<SynthYarn>,
    /// Rotated dimensions per head when not all (`rope.dimension_count`; glm4moe's partial rope).
    pub rope_dims: Option<usize>,
    /// Per-head q/k RMS norms in an architecture where they are optional (glm4moe).
    pub qk_norm: bool,
    /// Shared experts of the routed width (`expert_shared_count`; glm4moe, deepseek2).
    pub n_expert_shared: usize,
    /// Leading dense layers (`leading_dense_block_count`).
    pub n_layer_dense_lead: usize,
    /// Multi-token-prediction layers after the decoder's (`nextn_predict_layers`).
    pub n_nextn: usize,
    /// `expert_weights_scale`, when written.
    pub expert_weights_scale: Option<f32>,
    /// `expert_weights_norm`, when written.
    pub expert_weights_norm: Option<bool>,
    /// `expert_group_count` and `expert_group_used_count`, when written.
    pub expert_groups: Option<(usize, usize)>,
    /// Multi-head latent attention shapes (deepseek2; `head_dim` is then unused).
    pub mla: Option<SynthMla>,
}

/// YaRN rope scaling of a synthetic model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SynthYarn {
    /// `rope.scaling.factor`.
    pub factor: f32,
    /// `rope.scaling.original_context_length`.
    pub orig_ctx: usize,
    /// deepseek2's `rope.scaling.yarn_log_multiplier` as its converter writes it (0.1 · mscale_all_dim).
    pub log_mul: Option<f32>,
}

/// Multi-head latent attention shapes of a synthetic deepseek2.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SynthMla {
    /// `attention.q_lora_rank` (0: none, queries projected directly).
    pub q_lora_rank: usize,
    /// `attention.kv_lora_rank`.
    pub kv_lora_rank: usize,
    /// Query/key dimensions per head without rope.
    pub nope: usize,
    /// Rope dimensions (shared key part).
    pub rope: usize,
    /// Value dimensions per head.
    pub head_dim_v: usize,
}

const LLAMA31_ROPE: Llama3Rope = Llama3Rope {
    factor: 32.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_context: 8192.0,
};

const BASE: SynthPreset = SynthPreset {
    name: "",
    model_name: "",
    arch: Arch::Llama,
    n_vocab: 512,
    n_embd: 128,
    n_layer: 2,
    n_head: 4,
    n_head_kv: 2,
    head_dim: 32,
    n_ff: 256,
    n_ctx_train: 512,
    norm_eps: 1e-5,
    rope_base: 10_000.0,
    n_expert: 0,
    n_expert_used: 0,
    n_ff_expert: 0,
    sliding_window: None,
    tied: false,
    llama3_rope: None,
    rope_linear: None,
    yarn: None,
    rope_dims: None,
    qk_norm: false,
    n_expert_shared: 0,
    n_layer_dense_lead: 0,
    n_nextn: 0,
    expert_weights_scale: None,
    expert_weights_norm: None,
    expert_groups: None,
    mla: None,
};

/// gpt-oss's YaRN: factor 32 over an original context of 4096.
const GPT_OSS_YARN: SynthYarn = SynthYarn {
    factor: 32.0,
    orig_ctx: 4096,
    log_mul: None,
};

const GPT_OSS_20B: SynthPreset = SynthPreset {
    name: "gpt-oss-20b",
    model_name: "gpt-oss 20B (synthetic)",
    arch: Arch::GptOss,
    n_vocab: 201_088,
    n_embd: 2880,
    n_layer: 24,
    n_head: 64,
    n_head_kv: 8,
    head_dim: 64,
    n_ff: 2880,
    n_ctx_train: 131_072,
    norm_eps: 1e-5,
    rope_base: 150_000.0,
    n_expert: 32,
    n_expert_used: 4,
    n_ff_expert: 2880,
    sliding_window: Some(128),
    yarn: Some(GPT_OSS_YARN),
    ..BASE
};

const PRESETS: &[SynthPreset] = &[
    SynthPreset {
        name: "llama3.2-1b",
        model_name: "Llama 3.2 1B (synthetic)",
        n_vocab: 128_256,
        n_embd: 2048,
        n_layer: 16,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 64,
        n_ff: 8192,
        n_ctx_train: 131_072,
        rope_base: 500_000.0,
        tied: true,
        llama3_rope: Some(LLAMA31_ROPE),
        ..BASE
    },
    SynthPreset {
        name: "llama3-8b",
        model_name: "Llama 3 8B (synthetic)",
        n_vocab: 128_256,
        n_embd: 4096,
        n_layer: 32,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        n_ff: 14_336,
        n_ctx_train: 8192,
        rope_base: 500_000.0,
        ..BASE
    },
    SynthPreset {
        name: "llama3-70b",
        model_name: "Llama 3 70B (synthetic)",
        n_vocab: 128_256,
        n_embd: 8192,
        n_layer: 80,
        n_head: 64,
        n_head_kv: 8,
        head_dim: 128,
        n_ff: 28_672,
        n_ctx_train: 8192,
        rope_base: 500_000.0,
        ..BASE
    },
    SynthPreset {
        name: "qwen2.5-32b",
        model_name: "Qwen2.5 32B (synthetic)",
        arch: Arch::Qwen2,
        n_vocab: 152_064,
        n_embd: 5120,
        n_layer: 64,
        n_head: 40,
        n_head_kv: 8,
        head_dim: 128,
        n_ff: 27_648,
        n_ctx_train: 32_768,
        norm_eps: 1e-6,
        rope_base: 1_000_000.0,
        ..BASE
    },
    SynthPreset {
        name: "qwen3-30b-a3b",
        model_name: "Qwen3 30B A3B (synthetic)",
        arch: Arch::Qwen3Moe,
        n_vocab: 151_936,
        n_embd: 2048,
        n_layer: 48,
        n_head: 32,
        n_head_kv: 4,
        head_dim: 128,
        n_ff: 6144,
        n_ctx_train: 40_960,
        norm_eps: 1e-6,
        rope_base: 1_000_000.0,
        n_expert: 128,
        n_expert_used: 8,
        n_ff_expert: 768,
        ..BASE
    },
    SynthPreset {
        name: "mixtral-8x7b",
        model_name: "Mixtral 8x7B (synthetic)",
        n_vocab: 32_000,
        n_embd: 4096,
        n_layer: 32,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        n_ff: 14_336,
        n_ctx_train: 32_768,
        rope_base: 1_000_000.0,
        n_expert: 8,
        n_expert_used: 2,
        n_ff_expert: 14_336,
        ..BASE
    },
    SynthPreset {
        name: "smollm2-135m",
        model_name: "SmolLM2 135M (synthetic)",
        n_vocab: 49_152,
        n_embd: 576,
        n_layer: 30,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 64,
        n_ff: 1536,
        n_ctx_train: 8192,
        rope_base: 100_000.0,
        tied: true,
        ..BASE
    },
    SynthPreset {
        name: "gemma3-270m",
        model_name: "Gemma 3 270M (synthetic)",
        arch: Arch::Gemma3,
        n_vocab: 262_144,
        n_embd: 640,
        n_layer: 18,
        n_head: 4,
        n_head_kv: 1,
        head_dim: 256,
        n_ff: 2048,
        n_ctx_train: 32_768,
        norm_eps: 1e-6,
        rope_base: 1_000_000.0,
        sliding_window: Some(512),
        tied: true,
        ..BASE
    },
    GPT_OSS_20B,
    SynthPreset {
        name: "gpt-oss-120b",
        model_name: "gpt-oss 120B (synthetic)",
        n_layer: 36,
        n_expert: 128,
        ..GPT_OSS_20B
    },
    SynthPreset {
        name: "glm-4.5-air",
        model_name: "GLM-4.5-Air (synthetic)",
        arch: Arch::Glm4Moe,
        n_vocab: 151_552,
        n_embd: 4096,
        n_layer: 46,
        n_head: 96,
        n_head_kv: 8,
        head_dim: 128,
        n_ff: 10_944,
        n_ctx_train: 131_072,
        norm_eps: 1e-5,
        rope_base: 1_000_000.0,
        n_expert: 128,
        n_expert_used: 8,
        n_ff_expert: 1408,
        rope_dims: Some(64),
        n_expert_shared: 1,
        n_layer_dense_lead: 1,
        n_nextn: 1,
        expert_weights_scale: Some(1.0),
        expert_weights_norm: Some(true),
        ..BASE
    },
    SynthPreset {
        name: "deepseek-v2-lite",
        model_name: "DeepSeek-V2-Lite (synthetic)",
        arch: Arch::Deepseek2,
        n_vocab: 102_400,
        n_embd: 2048,
        n_layer: 27,
        n_head: 16,
        n_head_kv: 1,
        head_dim: 0,
        n_ff: 10_944,
        n_ctx_train: 163_840,
        norm_eps: 1e-6,
        rope_base: 10_000.0,
        n_expert: 64,
        n_expert_used: 6,
        n_ff_expert: 1408,
        n_expert_shared: 2,
        n_layer_dense_lead: 1,
        expert_weights_scale: Some(1.0),
        yarn: Some(SynthYarn {
            factor: 40.0,
            orig_ctx: 4096,
            log_mul: Some(0.0707),
        }),
        mla: Some(SynthMla {
            q_lora_rank: 0,
            kv_lora_rank: 512,
            nope: 128,
            rope: 64,
            head_dim_v: 128,
        }),
        ..BASE
    },
    // Tiny variants: a few MB, for tests. tiny-llama has K-quant-friendly widths (multiples of 256) and
    // llama3 rope scaling; the others use widths that exercise llama.cpp's K-quant fallbacks.
    SynthPreset {
        name: "tiny-llama",
        model_name: "tiny llama (synthetic)",
        n_embd: 256,
        n_head: 8,
        n_head_kv: 2,
        head_dim: 32,
        n_ff: 512,
        llama3_rope: Some(Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 64.0,
        }),
        ..BASE
    },
    SynthPreset {
        name: "tiny-qwen2",
        model_name: "tiny qwen2 (synthetic)",
        arch: Arch::Qwen2,
        n_ff: 384,
        norm_eps: 1e-6,
        rope_base: 1_000_000.0,
        tied: true,
        ..BASE
    },
    SynthPreset {
        name: "tiny-qwen3",
        model_name: "tiny qwen3 (synthetic)",
        arch: Arch::Qwen3,
        n_layer: 3,
        head_dim: 64,
        norm_eps: 1e-6,
        rope_base: 1_000_000.0,
        tied: true,
        ..BASE
    },
    SynthPreset {
        name: "tiny-qwen3moe",
        model_name: "tiny qwen3moe (synthetic)",
        arch: Arch::Qwen3Moe,
        head_dim: 64,
        norm_eps: 1e-6,
        rope_base: 1_000_000.0,
        n_expert: 8,
        n_expert_used: 2,
        n_ff_expert: 64,
        ..BASE
    },
    SynthPreset {
        name: "tiny-mixtral",
        model_name: "tiny mixtral (synthetic)",
        rope_base: 1_000_000.0,
        n_expert: 4,
        n_expert_used: 2,
        n_ff_expert: 256,
        ..BASE
    },
    SynthPreset {
        name: "tiny-gemma3",
        model_name: "tiny gemma3 (synthetic)",
        arch: Arch::Gemma3,
        n_layer: 7,
        n_head: 4,
        n_head_kv: 1,
        head_dim: 64,
        norm_eps: 1e-6,
        rope_base: 1_000_000.0,
        sliding_window: Some(8),
        tied: true,
        rope_linear: Some(8.0),
        ..BASE
    },
    // gpt-oss as it is, smaller: alternating windows (16 here) and YaRN with the real factor.
    SynthPreset {
        name: "tiny-gpt-oss",
        model_name: "tiny gpt-oss (synthetic)",
        arch: Arch::GptOss,
        n_layer: 4,
        n_ff: 128,
        n_ctx_train: 2048,
        rope_base: 150_000.0,
        n_expert: 8,
        n_expert_used: 4,
        n_ff_expert: 128,
        sliding_window: Some(16),
        yarn: Some(GPT_OSS_YARN),
        ..BASE
    },
    // GLM-4.5's options: q/k norms, a weight scale, partial rope, one dense layer, one MTP layer.
    SynthPreset {
        name: "tiny-glm4moe",
        model_name: "tiny glm4moe (synthetic)",
        arch: Arch::Glm4Moe,
        n_layer: 3,
        rope_dims: Some(16),
        qk_norm: true,
        n_expert: 8,
        n_expert_used: 2,
        n_ff_expert: 64,
        n_expert_shared: 1,
        n_layer_dense_lead: 1,
        n_nextn: 1,
        expert_weights_scale: Some(2.5),
        expert_weights_norm: Some(true),
        ..BASE
    },
    // DeepSeek-V2's options: q lora, group-limited routing, YaRN with its log multiplier.
    SynthPreset {
        name: "tiny-deepseek2",
        model_name: "tiny deepseek2 (synthetic)",
        arch: Arch::Deepseek2,
        n_layer: 3,
        n_head_kv: 1,
        head_dim: 0,
        n_ctx_train: 2048,
        norm_eps: 1e-6,
        n_expert: 8,
        n_expert_used: 2,
        n_ff_expert: 64,
        n_expert_shared: 2,
        n_layer_dense_lead: 1,
        expert_groups: Some((4, 2)),
        yarn: Some(SynthYarn {
            factor: 40.0,
            orig_ctx: 128,
            log_mul: Some(0.0707),
        }),
        mla: Some(SynthMla {
            q_lora_rank: 64,
            kv_lora_rank: 64,
            nope: 32,
            rope: 16,
            head_dim_v: 32,
        }),
        ..BASE
    },
];

const NAMES: &[&str] = &[
    "llama3.2-1b",
    "llama3-8b",
    "llama3-70b",
    "qwen2.5-32b",
    "qwen3-30b-a3b",
    "mixtral-8x7b",
    "smollm2-135m",
    "gemma3-270m",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "glm-4.5-air",
    "deepseek-v2-lite",
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-qwen3moe",
    "tiny-mixtral",
    "tiny-gemma3",
    "tiny-gpt-oss",
    "tiny-glm4moe",
    "tiny-deepseek2",
];

/// The preset with this name.
pub fn preset(name: &str) -> Option<SynthPreset> {
    PRESETS.iter().find(|p| p.name == name).cloned()
}

/// All preset names, real models first, then the tiny ones.
pub fn preset_names() -> &'static [&'static str] {
    NAMES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_presets() {
        assert_eq!(NAMES.len(), PRESETS.len());
        for (n, p) in NAMES.iter().zip(PRESETS) {
            assert_eq!(*n, p.name);
        }
    }

    #[test]
    fn llama31_freq_factors() {
        // Hand-checked ends: the fastest pairs keep their frequency, the slowest get the full factor.
        let f = LLAMA31_ROPE.freq_factors(128, 500_000.0);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 32.0);
        assert!(f.windows(2).all(|w| w[1] >= w[0]));
        assert!(f.iter().any(|&x| x > 1.0 && x < 32.0));
    }
}
