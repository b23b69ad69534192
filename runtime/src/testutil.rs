//! Test helpers.

use pshard_model::spec::{Arch, GroupId, Hparams, ModelSpec, RopeMode};

/// A spec with no tensors, for graph-structure tests.
pub fn empty_spec() -> ModelSpec {
    ModelSpec {
        arch: Arch::Llama,
        name: "empty".into(),
        hparams: Hparams {
            n_vocab: 16,
            n_embd: 8,
            n_layer: 0,
            n_head: 2,
            n_head_kv: 1,
            head_dim_k: 4,
            head_dim_v: 4,
            n_ff: 16,
            n_ctx_train: 64,
            norm_eps: 1e-5,
            rope_base: 10000.0,
            rope_base_local: 10000.0,
            rope_linear_scale: 1.0,
            rope_dims: 4,
            rope_mode: RopeMode::Adjacent,
            n_expert: 0,
            n_expert_used: 0,
            n_ff_expert: 0,
            n_ff_shared_expert: 0,
            expert_weights_norm: false,
            sliding_window: None,
            attn_softcap: None,
            final_softcap: None,
            embed_scale: 1.0,
            tied_embeddings: true,
        },
        tensors: vec![],
        groups: vec![],
        layers: vec![],
        embed: GroupId(0),
        output_norm: GroupId(0),
        output: GroupId(0),
        rope_freqs: None,
    }
}
