//! Fusion passes over a program's steps. Each fuses only steps that are adjacent in the step list
//! and on the GPU's compute stream, so no copy, wait or CPU step can fall between them:
//! - the per-head q/k norms and rotary embeddings the graph emits back to back
//!   (`HeadRmsNorm q, HeadRmsNorm k, Rope q, Rope k`, or just the two `Rope`s) become one
//!   `qk_norm_rope` launch;
//! - an int8 GEMV that reads the same input in the same partner format as the GEMV right before
//!   it reuses that one's quantized activations (q/k/v, gate/up), never in exact mode;
//! - on the CPU, whole-node matmuls of consecutive nodes that read the same input in the same
//!   partner format (q/k/v, gate/up) become one `CpuMatMuls` step: one pool job, one conversion
//!   of the input (not in exact mode, whose matmuls take f32 activations one by one).

use pshard_kernels::cuda::GEMV_INT8_MAX_ROWS;
use pshard_kernels::matmul::quantized_matmul_input;
use pshard_kernels::quant::ActFormat;
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::ModelSpec;

use super::StepKind;
use crate::device::GpuWork;

/// The node of a whole-node GPU step.
fn gpu_node(k: &StepKind) -> Option<usize> {
    match k {
        StepKind::Gpu(GpuWork::Node {
            node, cols: None, ..
        }) => Some(*node),
        _ => None,
    }
}

/// Whether nodes `a` and `b` are the q and k rotary embeddings of one layer (same parameters).
fn rope_pair(g: &Graph, a: usize, b: usize) -> Option<(BufId, BufId, usize)> {
    match (&g.nodes[a].op, &g.nodes[b].op) {
        (
            Op::Rope {
                x: q,
                head_dim,
                rope,
            },
            Op::Rope {
                x: k,
                head_dim: hd2,
                rope: rope2,
            },
        ) if q != k && head_dim == hd2 && rope == rope2 => Some((*q, *k, *head_dim)),
        _ => None,
    }
}

/// Whether nodes `a` and `b` are the q and k per-head norms of one layer.
fn norm_pair(g: &Graph, a: usize, b: usize) -> Option<(BufId, BufId, usize)> {
    match (&g.nodes[a].op, &g.nodes[b].op) {
        (
            Op::HeadRmsNorm {
                x: q,
                head_dim,
                eps,
                ..
            },
            Op::HeadRmsNorm {
                x: k,
                head_dim: hd2,
                eps: eps2,
                ..
            },
        ) if head_dim == hd2 && eps == eps2 => Some((*q, *k, *head_dim)),
        _ => None,
    }
}

/// `(input buffer, partner format)` of a step that runs an int8 GEMV.
fn int8_gemv(spec: &ModelSpec, g: &Graph, k: &StepKind, exact: bool) -> Option<(BufId, ActFormat)> {
    let ni = gpu_node(k)?;
    let (x, act) = quantized_matmul_input(spec, g, ni)?;
    (!exact && g.rows(x) <= GEMV_INT8_MAX_ROWS).then_some((x, act))
}

/// Applies the passes.
pub fn fuse(spec: &ModelSpec, g: &Graph, kinds: Vec<StepKind>, exact: bool) -> Vec<StepKind> {
    let mut out: Vec<StepKind> = Vec::with_capacity(kinds.len());
    let mut i = 0;
    while i < kinds.len() {
        let node = |j: usize| kinds.get(j).and_then(gpu_node);
        // Norms + ropes of q and k.
        if let (Some(a), Some(b)) = (node(i), node(i + 1)) {
            if let Some((q, k, hd)) = norm_pair(g, a, b) {
                if let (Some(c), Some(d)) = (node(i + 2), node(i + 3)) {
                    if rope_pair(g, c, d) == Some((q, k, hd)) && b == a + 1 && d == c + 1 {
                        out.push(StepKind::Gpu(GpuWork::QkNormRope { nodes: a..d + 1 }));
                        i += 4;
                        continue;
                    }
                }
            }
            if rope_pair(g, a, b).is_some() && b == a + 1 {
                out.push(StepKind::Gpu(GpuWork::QkNormRope { nodes: a..b + 1 }));
                i += 2;
                continue;
            }
        }
        // Matmuls of one input on the CPU.
        if let (
            StepKind::Cpu {
                node: a,
                cols: None,
            },
            false,
        ) = (&kinds[i], exact)
        {
            if let Some(input) = quantized_matmul_input(spec, g, *a) {
                let mut end = i + 1;
                while let Some(StepKind::Cpu {
                    node: b,
                    cols: None,
                }) = kinds.get(end)
                {
                    if *b != a + (end - i) || quantized_matmul_input(spec, g, *b) != Some(input) {
                        break;
                    }
                    end += 1;
                }
                if end > i + 1 {
                    out.push(StepKind::CpuMatMuls {
                        nodes: *a..a + (end - i),
                    });
                    i = end;
                    continue;
                }
            }
        }
        out.push(kinds[i].clone());
        i += 1;
    }
    // Shared GEMV inputs.
    for j in 1..out.len() {
        let prev = int8_gemv(spec, g, &out[j - 1], exact);
        if prev.is_some() && prev == int8_gemv(spec, g, &out[j], exact) {
            if let StepKind::Gpu(GpuWork::Node { reuse_acts, .. }) = &mut out[j] {
                *reuse_acts = true;
            }
        }
    }
    out
}
