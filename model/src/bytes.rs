//! Byte accounting: weights per group, layer and role; KV cache per token and per context; activation
//! buffers for a batch; scratch a streamed group needs. Pure functions of a [`ModelSpec`].
//!
//! Conventions: a tied output group counts the embedding table (what a placement of that group must
//! hold), while [`file_bytes`] and [`type_mix`] count every tensor once (what the file holds).

use crate::arch::{build_graph, GraphError};
use crate::ggml_type::GgmlType;
use crate::graph::{BufKind, Graph};
use crate::spec::{GroupId, GroupRole, ModelSpec, TensorGroup};

/// Sum of a group's member tensor bytes (equals [`TensorGroup::bytes`]).
pub fn group_bytes(spec: &ModelSpec, g: GroupId) -> u64 {
    spec.group(g)
        .tensors
        .iter()
        .map(|&t| spec.tensor(t).bytes)
        .sum()
}

/// Weight bytes of one layer (all its groups).
pub fn layer_bytes(spec: &ModelSpec, layer: usize) -> u64 {
    spec.layers[layer]
        .groups
        .iter()
        .map(|&g| group_bytes(spec, g))
        .sum()
}

/// Weight bytes of one layer's group with this role (0 if the layer has none).
pub fn layer_role_bytes(spec: &ModelSpec, layer: usize, role: GroupRole) -> u64 {
    spec.layer_group(layer, role)
        .map(|g| group_bytes(spec, g))
        .unwrap_or(0)
}

/// Bytes of all groups with this role (for a tied output, the embedding table is counted here too).
pub fn role_bytes(spec: &ModelSpec, role: GroupRole) -> u64 {
    spec.groups
        .iter()
        .filter(|g| g.role == role)
        .map(|g| g.bytes)
        .sum()
}

/// Tensor bytes of the model, each tensor once: what the file holds for the tensors the spec uses.
pub fn file_bytes(spec: &ModelSpec) -> u64 {
    spec.tensors.iter().map(|t| t.bytes).sum()
}

/// Per element type: (type, tensor count, bytes), each tensor once, sorted by type id.
pub fn type_mix(spec: &ModelSpec) -> Vec<(GgmlType, usize, u64)> {
    let mut mix: Vec<(GgmlType, usize, u64)> = Vec::new();
    for t in &spec.tensors {
        match mix.iter_mut().find(|m| m.0 == t.ty) {
            Some(m) => {
                m.1 += 1;
                m.2 += t.bytes;
            }
            None => mix.push((t.ty, 1, t.bytes)),
        }
    }
    mix.sort_by_key(|m| m.0.id());
    mix
}

/// Bytes of a KV row of `n` values in `kv_type` (whole blocks, rounded up).
pub fn kv_row_bytes(kv_type: GgmlType, n: usize) -> u64 {
    (n as u64).div_ceil(kv_type.block_size()) * kv_type.type_size()
}

/// Values per KV cell of `layer`: (K row, V row). `n_head_kv·head_dim_k` and
/// `n_head_kv·head_dim_v`; multi-head latent attention keeps the latent and the rope key
/// (`kv_lora_rank + rope_dims`) in K and no V (its values are the latent inside K). The one
/// definition of a layer's row widths: the KV layout, its host and device copies and the
/// planner's bill all ask it.
pub fn kv_cols(spec: &ModelSpec, layer: usize) -> (usize, usize) {
    let _ = &spec.layers[layer];
    let h = &spec.hparams;
    match h.mla {
        Some(m) => (m.kv_lora_rank + h.rope_dims, 0),
        None => (h.n_head_kv * h.head_dim_k, h.n_head_kv * h.head_dim_v),
    }
}

/// KV bytes one token occupies in one layer: its K and V rows ([`kv_cols`]) in `kv_type` (F16
/// or Q8_0 in practice).
pub fn kv_bytes_per_token_layer(spec: &ModelSpec, kv_type: GgmlType, layer: usize) -> u64 {
    let (k, v) = kv_cols(spec, layer);
    kv_row_bytes(kv_type, k) + kv_row_bytes(kv_type, v)
}

/// KV bytes one token occupies across all layers (ignoring windows).
pub fn kv_bytes_per_token(spec: &ModelSpec, kv_type: GgmlType) -> u64 {
    (0..spec.layers.len())
        .map(|l| kv_bytes_per_token_layer(spec, kv_type, l))
        .sum()
}

/// KV cells a layer keeps per sequence for a context of `n_ctx` when batches hold at most
/// `max_batch` tokens: `n_ctx` for global layers; for sliding-window layers a ring of the window plus
/// one batch (a batch writes all its cells before its first row attends, so the window of that row
/// must survive the batch's writes), capped at `n_ctx`. Position `p` lives in cell `p % cells`. The
/// one KV layout: host and device copies of a layer have exactly these cells.
pub fn kv_cells(spec: &ModelSpec, layer: usize, n_ctx: usize, max_batch: usize) -> usize {
    match spec.layers[layer].window {
        Some(w) => n_ctx.min(w + max_batch.max(1)),
        None => n_ctx,
    }
}

/// KV bytes of one layer for `n_seq` sequences of context `n_ctx` and batches of at most
/// `max_batch` tokens (see [`kv_cells`]).
pub fn kv_layer_bytes(
    spec: &ModelSpec,
    kv_type: GgmlType,
    layer: usize,
    n_ctx: usize,
    max_batch: usize,
    n_seq: usize,
) -> u64 {
    kv_bytes_per_token_layer(spec, kv_type, layer)
        * kv_cells(spec, layer, n_ctx, max_batch) as u64
        * n_seq as u64
}

/// KV bytes of all layers for `n_seq` sequences of context `n_ctx` (see [`kv_cells`]).
pub fn kv_bytes(
    spec: &ModelSpec,
    kv_type: GgmlType,
    n_ctx: usize,
    max_batch: usize,
    n_seq: usize,
) -> u64 {
    (0..spec.layers.len())
        .map(|l| kv_layer_bytes(spec, kv_type, l, n_ctx, max_batch, n_seq))
        .sum()
}

/// Bytes of every buffer a graph declares (4-byte values; the graph reuses its buffers across layers,
/// so this is the activation memory of one forward pass).
pub fn graph_buffer_bytes(graph: &Graph) -> u64 {
    (0..graph.buffers.len())
        .map(|i| {
            let id = crate::graph::BufId(i as u32);
            // F32 and Route buffers both hold 32-bit words.
            let b = graph.buffer(id);
            let word = match b.kind {
                BufKind::F32 | BufKind::Route => 4,
            };
            graph.rows(id) as u64 * b.cols as u64 * word
        })
        .sum()
}

/// Activation bytes of one forward pass of `n_tokens` tokens with `n_logit_rows` logit rows: the
/// buffers of the architecture's graph.
pub fn activation_bytes(
    spec: &ModelSpec,
    n_tokens: usize,
    n_logit_rows: usize,
) -> Result<u64, GraphError> {
    Ok(graph_buffer_bytes(&build_graph(
        spec,
        n_tokens,
        n_logit_rows,
    )?))
}

/// Activation bytes estimated from the hparams alone (f32): per token the residual, normed input, q,
/// k, v, attention output, projection, dense FFN gate/up/hidden, for MoE the router logits and
/// routes (and the shared experts' rows and output), latent attention's extra rows; plus per
/// logit row the selected and normed rows and the logits. Close to
/// [`activation_bytes`]; useful where no graph can be built.
pub fn activation_bytes_estimate(spec: &ModelSpec, n_tokens: usize, n_logit_rows: usize) -> u64 {
    let h = &spec.hparams;
    let mut per_token = 3 * h.n_embd // x, xn, proj
        + h.n_head * h.head_dim_k
        + h.n_head_kv * (h.head_dim_k + h.head_dim_v)
        + h.n_head * h.head_dim_v
        + 3 * h.n_ff;
    if h.n_expert > 0 {
        per_token += h.n_expert + 2 * h.n_expert_used;
    }
    if h.n_ff_shared_expert > 0 {
        per_token += h.n_embd + 3 * h.n_ff_shared_expert;
    }
    if let Some(m) = h.mla {
        // Queries as projected, the q lora, the KV compression, the decompressed head outputs.
        per_token += h.n_head * (m.nope + h.rope_dims)
            + m.q_lora_rank
            + m.kv_lora_rank
            + h.rope_dims
            + h.n_head * m.head_dim_v;
    }
    // Selected rows, their norm, and the logits.
    let per_logit_row = 2 * h.n_embd + h.n_vocab;
    4 * (per_token as u64 * n_tokens as u64 + per_logit_row as u64 * n_logit_rows as u64)
}

/// Device scratch one streaming slot needs to hold this group: its weight bytes as they lie in the file
/// (weights are streamed in their GGUF block layout).
pub fn stream_scratch_bytes(spec: &ModelSpec, group: GroupId) -> u64 {
    group_bytes(spec, group)
}

/// The largest group selected by `filter`: the slot size of a streaming ring over those groups.
pub fn max_group_bytes(spec: &ModelSpec, filter: impl Fn(&TensorGroup) -> bool) -> u64 {
    spec.groups
        .iter()
        .filter(|g| filter(g))
        .map(|g| g.bytes)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{plan, preset, QuantRecipe};

    fn spec(name: &str, recipe: QuantRecipe) -> ModelSpec {
        let h = plan(&preset(name).unwrap(), recipe).header().unwrap();
        ModelSpec::from_gguf(&h, &h.tensors, name).unwrap()
    }

    #[test]
    fn llama3_8b_kv_per_token() {
        let s = spec("llama3-8b", QuantRecipe::Q4_K);
        // 32 layers × (K + V) × 8 kv heads × 128 × 2 bytes.
        assert_eq!(kv_bytes_per_token(&s, GgmlType::F16), 131_072);
        assert_eq!(kv_bytes_per_token_layer(&s, GgmlType::F16, 0), 4096);
        // Q8_0: 1024 values = 32 blocks × 34 bytes, K and V, 32 layers.
        assert_eq!(kv_bytes_per_token(&s, GgmlType::Q8_0), 32 * 2 * 32 * 34);
        assert_eq!(
            kv_bytes(&s, GgmlType::F16, 8192, 512, 2),
            131_072 * 8192 * 2
        );
    }

    #[test]
    fn gemma3_windowed_kv() {
        let s = spec("gemma3-270m", QuantRecipe::Q8_0);
        // One KV head of 256: K+V f16 = 1024 bytes per token per layer.
        assert_eq!(kv_bytes_per_token_layer(&s, GgmlType::F16, 3), 1024);
        // ctx 4096, batches of 64: 15 windowed layers keep 512 + 64 cells, 3 global layers 4096.
        assert_eq!(
            kv_bytes(&s, GgmlType::F16, 4096, 64, 1),
            (15 * (512 + 64) + 3 * 4096) * 1024
        );
        // Batches as long as the context: the ring is the whole context.
        assert_eq!(kv_bytes(&s, GgmlType::F16, 4096, 4096, 1), 18 * 4096 * 1024);
        // A context shorter than the window: every layer keeps n_ctx.
        assert_eq!(kv_bytes(&s, GgmlType::F16, 100, 1, 1), 18 * 100 * 1024);
    }

    #[test]
    fn llama3_8b_q4_k_weight_bytes() {
        let s = spec("llama3-8b", QuantRecipe::Q4_K);
        // Per layer: (2·4096² + 2·4096·1024 + 3·4096·14336) Q4_K at 144/256 bytes, two 4096 f32 norms.
        let mats = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336u64;
        let layer = mats / 256 * 144 + 2 * 4096 * 4;
        assert_eq!(layer_bytes(&s, 0), layer);
        let attn = (2 * 4096 * 4096 + 2 * 4096 * 1024u64) / 256 * 144 + 4096 * 4;
        assert_eq!(layer_role_bytes(&s, 0, GroupRole::Attn), attn);
        assert_eq!(layer_role_bytes(&s, 0, GroupRole::Ffn), layer - attn);
        let embd = 4096 * 128_256u64 / 256 * 144;
        let out = 4096 * 128_256u64 / 256 * 210;
        assert_eq!(role_bytes(&s, GroupRole::Embed), embd);
        assert_eq!(role_bytes(&s, GroupRole::Output), out);
        assert_eq!(file_bytes(&s), embd + out + 32 * layer + 4096 * 4);
        assert_eq!(
            max_group_bytes(&s, |g| g.role == GroupRole::Ffn),
            layer - attn
        );
    }

    #[test]
    fn tied_output_counted_once_in_file_bytes() {
        let s = spec("smollm2-135m", QuantRecipe::Q8_0);
        assert!(s.hparams.tied_embeddings);
        let embd = role_bytes(&s, GroupRole::Embed);
        assert_eq!(role_bytes(&s, GroupRole::Output), embd);
        let groups: u64 = s.groups.iter().map(|g| g.bytes).sum();
        assert_eq!(groups, file_bytes(&s) + embd);
        let mix: u64 = type_mix(&s).iter().map(|m| m.2).sum();
        assert_eq!(mix, file_bytes(&s));
    }

    #[test]
    fn activation_estimate_matches_graph() {
        for name in [
            "tiny-llama",
            "tiny-qwen3moe",
            "tiny-gemma3",
            "llama3-8b",
            "tiny-gpt-oss",
            "tiny-glm4moe",
            "tiny-deepseek2",
        ] {
            let s = spec(name, QuantRecipe::Q8_0);
            for (n, rows) in [(1, 1), (512, 1), (512, 512)] {
                let est = activation_bytes_estimate(&s, n, rows);
                match activation_bytes(&s, n, rows) {
                    // The graph may declare a few more small buffers than the estimate counts.
                    Ok(g) => assert!(
                        est <= g && g <= est + est / 4,
                        "{name} n={n}: estimate {est} graph {g}"
                    ),
                    Err(e) => panic!("{name}: graph failed: {e}"),
                }
            }
        }
        // Hand-computed: llama3-8b, 1 token, 1 logit row.
        let s = spec("llama3-8b", QuantRecipe::Q8_0);
        let per_tok = 3 * 4096 + 4096 + 2 * 1024 + 4096 + 3 * 14336;
        assert_eq!(
            activation_bytes_estimate(&s, 1, 1),
            4 * (per_tok + 2 * 4096 + 128_256) as u64
        );
    }
}
