//! GLM-4.5 MoE: q/k/v biases, optional per-head q/k norms, partial rope on NEOX pairs, leading
//! dense layers, then MoE layers whose router gates by sigmoid, picks the top k by gate plus a
//! selection bias, renormalises and scales the chosen weights, beside one shared expert. The FFN's
//! input norm is the file's `post_attention_norm`.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the glm4moe forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "glm4moe",
        qk_norm: false,
        post_attn_norm: false,
        post_ffn_norm: false,
        act: Activation::Silu,
        expert_act: Activation::Silu,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
