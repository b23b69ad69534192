//! Qwen3 dense: per-head RMS norm of q and k before rope, NEOX rope, SwiGLU.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the qwen3 forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "qwen3",
        qk_norm: true,
        post_attn_norm: false,
        post_ffn_norm: false,
        act: Activation::Silu,
        expert_act: Activation::Silu,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
