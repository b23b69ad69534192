//! Qwen2 / Qwen2.5: the llama decoder with q/k/v biases and rope on split halves (NEOX).
//!
//! Biases and the rope mode come from the spec, so the flavor matches llama's.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the qwen2 forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "qwen2",
        qk_norm: false,
        post_attn_norm: false,
        post_ffn_norm: false,
        act: Activation::Silu,
        expert_act: Activation::Silu,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
