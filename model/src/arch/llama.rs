//! Llama family (Llama 2/3, Mistral, SmolLM; Mixtral when the layers have experts): pre-norm decoder,
//! SwiGLU, rope on adjacent pairs, llama3 frequency factors via `rope_freqs`.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the llama forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "llama",
        qk_norm: false,
        post_attn_norm: false,
        post_ffn_norm: false,
        act: Activation::Silu,
        expert_act: Activation::Silu,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
