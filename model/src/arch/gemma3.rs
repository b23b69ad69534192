//! Gemma 3: embeddings scaled by √n_embd, q/k norm, post-attention and post-FFN norms, GeGLU with
//! tanh-GELU, sliding-window local layers (rope base 10,000) and every 6th layer global.
//!
//! The window, per-layer rope base and embedding scale come from the spec (the catalogue applies the
//! gemma3 facts the file does not hold); this file picks the block flavor.

use super::blocks::{decoder, Flavor};
use super::GraphError;
use crate::graph::{Activation, Graph};
use crate::spec::ModelSpec;

/// Builds the gemma3 forward pass.
pub fn build(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> Result<Graph, GraphError> {
    let flavor = Flavor {
        arch: "gemma3",
        qk_norm: true,
        post_attn_norm: true,
        post_ffn_norm: true,
        act: Activation::GeluTanh,
        expert_act: Activation::GeluTanh,
    };
    decoder(spec, flavor, n_tokens, n_logit_rows)
}
