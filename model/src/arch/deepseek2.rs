//! DeepSeek-V2/V3: multi-head latent attention ([`crate::spec::Mla`]) with rope on adjacent pairs
//! of a shared rope key, YaRN with its attention-scale correction, leading dense layers, then MoE
//! layers (softmax or sigmoid gating, optional selection bias and group limit) beside shared
//! experts.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the deepseek2 forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "deepseek2",
        qk_norm: false,
        post_attn_norm: false,
        post_ffn_norm: false,
        act: Activation::Silu,
        expert_act: Activation::Silu,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
