//! gpt-oss: pre-norm decoder with biases on q, k, v and the attention output, per-head attention
//! sinks, sliding-window (even) and global (odd) layers, YaRN rope on NEOX pairs, and MoE layers
//! whose router (with a bias) takes the top k logits and softmaxes only those, experts with
//! biases and the clamped SwiGLU ([`Activation::SwigluOai`]). The FFN's input norm is the file's
//! `post_attention_norm`.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the gpt-oss forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "gpt-oss",
        qk_norm: false,
        post_attn_norm: false,
        post_ffn_norm: false,
        act: Activation::Silu,
        expert_act: Activation::SwigluOai,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
