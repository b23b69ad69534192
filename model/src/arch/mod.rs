//! Forward passes per architecture family, as op graphs ([`crate::graph`]).
//!
//! Each family's file composes the shared blocks in [`blocks`]; the runtime executes and the planner
//! costs exactly the graph built here.

mod blocks;
pub mod deepseek2;
pub mod gemma3;
pub mod glm4moe;
pub mod gpt_oss;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3moe;

use crate::graph::Graph;
use crate::spec::{Arch, ModelSpec};

/// Why a graph could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A tensor the forward pass needs is not in the spec.
    #[error("layer {layer:?}: missing tensor {role} needed by the {arch} forward pass")]
    MissingTensor {
        /// Architecture name.
        arch: &'static str,
        /// Layer index, if per-layer.
        layer: Option<usize>,
        /// Tensor role.
        role: String,
    },
    /// The batch shape is not valid.
    #[error("invalid batch: {0}")]
    BadBatch(String),
}

/// Builds the forward-pass graph of `spec` for `n_tokens` tokens of which `n_logit_rows` need logits.
pub fn build_graph(
    spec: &ModelSpec,
    n_tokens: usize,
    n_logit_rows: usize,
) -> Result<Graph, GraphError> {
    if n_tokens == 0 || n_logit_rows == 0 || n_logit_rows > n_tokens {
        return Err(GraphError::BadBatch(format!(
            "{n_tokens} tokens with {n_logit_rows} logit rows (need 1 ≤ logit rows ≤ tokens)"
        )));
    }
    match spec.arch {
        Arch::Llama => llama::build(spec, n_tokens, n_logit_rows),
        Arch::Qwen2 => qwen2::build(spec, n_tokens, n_logit_rows),
        Arch::Qwen3 => qwen3::build(spec, n_tokens, n_logit_rows),
        Arch::Qwen3Moe => qwen3moe::build(spec, n_tokens, n_logit_rows),
        Arch::Gemma3 => gemma3::build(spec, n_tokens, n_logit_rows),
        Arch::GptOss => gpt_oss::build(spec, n_tokens, n_logit_rows),
        Arch::Glm4Moe => glm4moe::build(spec, n_tokens, n_logit_rows),
        Arch::Deepseek2 => deepseek2::build(spec, n_tokens, n_logit_rows),
    }
}
