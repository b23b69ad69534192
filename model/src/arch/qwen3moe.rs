//! Qwen3 MoE: qwen3 attention (q/k norm) with a softmax top-k router over expert FFNs, weights
//! renormalised when the model says so.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the qwen3moe forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "qwen3moe",
        qk_norm: true,
        post_attn_norm: false,
        post_ffn_norm: false,
        act: Activation::Silu,
        expert_act: Activation::Silu,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
