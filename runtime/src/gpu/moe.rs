//! Expert FFNs on the GPU. Up to `MOE_GEMV_MAX_PAIRS` (token, expert) pairs each pair's matrices
//! run as one GEMV launch per matrix over all pairs (graph-capturable, routes read on the
//! device); above, the pairs are sorted by expert on the device (`moe_sort`), their rows gathered
//! as f16, and each matrix is one grouped GEMM over all used experts with weights decoded from
//! their blocks on the fly (`moe_gemm`), so every used expert is read once per tile of its tokens
//! instead of once per pair; nothing is read back to the host.

use pshard_kernels::cuda::Gpu;
use pshard_model::graph::{Activation, BufId};
use pshard_model::spec::TensorId;

use crate::device::GpuStep;
use crate::error::EngineError;
use crate::model::Model;

/// Runs the expert FFN of one MoE node (weights `exps` = gate, up, down).
#[allow(clippy::too_many_arguments)]
pub fn expert_ffn(
    gpu: &Gpu,
    model: &Model,
    step: &GpuStep<'_>,
    exps: [TensorId; 3],
    x: BufId,
    route: BufId,
    act: Activation,
    out: BufId,
) -> Result<(), EngineError> {
    let g = step.graph;
    let (k, s) = (&gpu.kernels, gpu.stream());
    let [hg, hu, hh, ho] = step.scratch.moe;
    if hg == 0 {
        return Err(EngineError::Device("expert FFN without its scratch".into()));
    }
    let n_used = g.buffer(route).cols / 2;
    let rows = g.rows(x);
    let pairs = rows * n_used;
    let d = g.buffer(x).cols;
    let t = exps.map(|e| model.spec.tensor(e));
    let w = [
        step.weight(exps[0])?.addr,
        step.weight(exps[1])?.addr,
        step.weight(exps[2])?.addr,
    ];
    let ff = t[0].rows();
    let gelu = act == Activation::GeluTanh;
    if pshard_planner::lanes::moe_grouped(pairs, step.exact) {
        return grouped(
            gpu,
            step,
            exps.map(|e| model.spec.tensor(e)),
            w,
            x,
            route,
            gelu,
            out,
        );
    }
    let r = step.buf(route);
    for (j, dst) in [(0usize, hg), (1, hu)] {
        k.moe_gemv(
            t[j].ty,
            w[j],
            ff,
            d,
            step.buf(x),
            d,
            n_used,
            r,
            n_used,
            pairs,
            dst,
            ff,
            s,
        )?;
    }
    k.glu(hg, hu, hh, pairs * ff, gelu, s)?;
    k.moe_gemv(t[2].ty, w[2], d, ff, hh, ff, 1, r, n_used, pairs, ho, d, s)?;
    k.moe_combine(ho, r, n_used, step.buf(out), rows, d, s)?;
    Ok(())
}

/// The grouped path (see the module notes). The down projection scatters its rows straight back
/// to pair order for `moe_combine`.
#[allow(clippy::too_many_arguments)]
fn grouped(
    gpu: &Gpu,
    step: &GpuStep<'_>,
    t: [&pshard_model::spec::TensorDesc; 3],
    w: [u64; 3],
    x: BufId,
    route: BufId,
    gelu: bool,
    out: BufId,
) -> Result<(), EngineError> {
    let g = step.graph;
    let (k, s) = (&gpu.kernels, gpu.stream());
    let [hg, hu, hh, ho] = step.scratch.moe;
    let [x16, order, offsets] = step.scratch.moe_grouped;
    if x16 == 0 {
        return Err(EngineError::Device(
            "grouped expert FFN without its scratch".into(),
        ));
    }
    let rows = g.rows(x);
    let d = g.buffer(x).cols;
    let n_used = g.buffer(route).cols / 2;
    let pairs = rows * n_used;
    let ff = t[0].rows();
    let n_expert = t[0].n_mats();
    // Row offsets, then tile offsets, of the n_expert + 1 buckets.
    let tiles = offsets + ((n_expert + 2) * 4) as u64;
    k.moe_sort(
        step.buf(route),
        rows,
        n_used,
        n_expert,
        offsets,
        tiles,
        order,
        s,
    )?;
    // x16[i] = f16(x[token of pair order[i]]), in launches of at most 65535 rows (grid.y).
    let mut i0 = 0;
    while i0 < pairs {
        let c = (pairs - i0).min(65535);
        k.gather_rows_f16(
            step.buf(x),
            order + (i0 * 4) as u64,
            n_used,
            x16 + (i0 * d * 2) as u64,
            c,
            d,
            s,
        )?;
        i0 += c;
    }
    for (j, dst) in [(0usize, hg), (1, hu)] {
        k.moe_gemm(
            t[j].ty, w[j], ff, d, n_expert, x16, offsets, tiles, pairs, dst, ff, None, s,
        )?;
    }
    k.glu(hg, hu, hh, pairs * ff, gelu, s)?;
    k.f32_to_f16(hh, x16, pairs * ff, s)?;
    // ho[order[i]] = W_e · hidden[i]: back in pair order.
    k.moe_gemm(
        t[2].ty,
        w[2],
        d,
        ff,
        n_expert,
        x16,
        offsets,
        tiles,
        pairs,
        ho,
        d,
        Some(order),
        s,
    )?;
    k.moe_combine(ho, step.buf(route), n_used, step.buf(out), rows, d, s)?;
    Ok(())
}
