//! Expert FFNs on the GPU. Up to `MOE_GEMV_MAX_PAIRS` (token, expert) pairs each pair's matrices
//! run as one GEMV launch per matrix over all pairs (graph-capturable, routes read on the
//! device); above, the pairs are sorted by expert on the device (`moe_sort`), their rows gathered
//! as f16, and each matrix is one grouped GEMM over all used experts with weights decoded from
//! their blocks on the fly (`moe_gemm`), so every used expert is read once per tile of its tokens
//! instead of once per pair; nothing is read back to the host. Expert biases (gpt-oss) are added
//! to each pair's rows after their projection.
//!
//! Per-head matmuls (latent attention's `attn_k_b` / `attn_v_b`) run on the same kernels with
//! every (token, head) pair routed to its head.

use pshard_kernels::cuda::Gpu;
use pshard_model::graph::{Activation, BufId};
use pshard_model::spec::{TensorDesc, TensorId};

use crate::device::GpuStep;
use crate::error::EngineError;
use crate::model::Model;

/// Runs the expert FFN of one MoE node (weights `exps` = gate, up, down; optional per-expert
/// biases of each) over input rows `x` routed by `route`.
#[allow(clippy::too_many_arguments)]
pub fn expert_ffn(
    gpu: &Gpu,
    model: &Model,
    step: &GpuStep<'_>,
    exps: [TensorId; 3],
    bias: Option<[TensorId; 3]>,
    (x, route): (BufId, BufId),
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
    let b = match bias {
        Some(bs) => Some([
            step.weight(bs[0])?.addr,
            step.weight(bs[1])?.addr,
            step.weight(bs[2])?.addr,
        ]),
        None => None,
    };
    let ff = t[0].rows();
    let r = step.buf(route);
    if pshard_planner::lanes::moe_grouped(pairs, step.exact) {
        return grouped(gpu, step, t, w, b, (x, route), act, out);
    }
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
        if let Some(b) = b {
            k.moe_add_bias(dst, ff, r, n_used, None, b[j], pairs, ff, s)?;
        }
    }
    k.glu(hg, hu, hh, pairs * ff, act, s)?;
    k.moe_gemv(t[2].ty, w[2], d, ff, hh, ff, 1, r, n_used, pairs, ho, d, s)?;
    if let Some(b) = b {
        k.moe_add_bias(ho, d, r, n_used, None, b[2], pairs, d, s)?;
    }
    k.moe_combine(ho, r, n_used, step.buf(out), rows, d, s)?;
    Ok(())
}

/// The grouped path (see the module notes). The down projection scatters its rows straight back
/// to pair order for `moe_combine`.
#[allow(clippy::too_many_arguments)]
fn grouped(
    gpu: &Gpu,
    step: &GpuStep<'_>,
    t: [&TensorDesc; 3],
    w: [u64; 3],
    b: Option<[u64; 3]>,
    (x, route): (BufId, BufId),
    act: Activation,
    out: BufId,
) -> Result<(), EngineError> {
    let g = step.graph;
    let (k, s) = (&gpu.kernels, gpu.stream());
    let [hg, hu, hh, ho] = step.scratch.moe;
    let rows = g.rows(x);
    let d = g.buffer(x).cols;
    let n_used = g.buffer(route).cols / 2;
    let pairs = rows * n_used;
    let ff = t[0].rows();
    let n_expert = t[0].n_mats();
    let r = step.buf(route);
    let sorted = Sorted::new(
        gpu,
        step,
        r,
        (rows, n_used, n_expert),
        (step.buf(x), d, d),
        n_used,
    )?;
    for (j, dst) in [(0usize, hg), (1, hu)] {
        sorted.gemm(gpu, t[j], w[j], pairs, (dst, ff), false)?;
        if let Some(b) = b {
            // Rows in sorted order: their pairs are in `order`.
            k.moe_add_bias(dst, ff, r, n_used, Some(sorted.order), b[j], pairs, ff, s)?;
        }
    }
    k.glu(hg, hu, hh, pairs * ff, act, s)?;
    k.f32_to_f16(hh, sorted.x16, pairs * ff, s)?;
    // ho[order[i]] = W_e · hidden[i]: back in pair order.
    sorted.gemm(gpu, t[2], w[2], pairs, (ho, d), true)?;
    if let Some(b) = b {
        k.moe_add_bias(ho, d, r, n_used, None, b[2], pairs, d, s)?;
    }
    k.moe_combine(ho, r, n_used, step.buf(out), rows, d, s)?;
    Ok(())
}

/// The grouped path's pairs sorted by expert (in the step's scratch) and their input rows
/// gathered as f16.
struct Sorted {
    x16: u64,
    order: u64,
    offsets: u64,
    tiles: u64,
}

impl Sorted {
    /// Sorts the `rows · n_used` pairs of `route` among `n_expert` experts, then gathers
    /// `x16[i] = f16(x[order[i] / x_div][..cols])` (`x`: row stride `ldx`) in launches of at
    /// most 65535 rows (grid.y).
    fn new(
        gpu: &Gpu,
        step: &GpuStep<'_>,
        route: u64,
        (rows, n_used, n_expert): (usize, usize, usize),
        (x, ldx, cols): (u64, usize, usize),
        x_div: usize,
    ) -> Result<Sorted, EngineError> {
        let [x16, order, offsets] = step.scratch.moe_grouped;
        if x16 == 0 {
            return Err(EngineError::Device(
                "grouped expert path without its scratch".into(),
            ));
        }
        // Row offsets, then tile offsets, of the n_expert + 1 buckets.
        let tiles = offsets + ((n_expert + 2) * 4) as u64;
        let (k, s) = (&gpu.kernels, gpu.stream());
        k.moe_sort(route, rows, n_used, n_expert, offsets, tiles, order, s)?;
        let pairs = rows * n_used;
        let mut i0 = 0;
        while i0 < pairs {
            let c = (pairs - i0).min(65535);
            k.gather_rows_f16(
                (x, ldx),
                order + (i0 * 4) as u64,
                x_div,
                x16 + (i0 * cols * 2) as u64,
                c,
                cols,
                s,
            )?;
            i0 += c;
        }
        Ok(Sorted {
            x16,
            order,
            offsets,
            tiles,
        })
    }

    /// One grouped GEMM over the sorted rows in `x16`: row `i` through matrix `e` of `t` (its
    /// pair's expert), written to `out` (row stride `ldo`) in sorted order, or back in pair order
    /// with `scatter`.
    fn gemm(
        &self,
        gpu: &Gpu,
        t: &TensorDesc,
        w: u64,
        pairs: usize,
        (out, ldo): (u64, usize),
        scatter: bool,
    ) -> Result<(), EngineError> {
        gpu.kernels.moe_gemm(
            t.ty,
            w,
            t.rows(),
            t.cols(),
            t.n_mats(),
            self.x16,
            self.offsets,
            self.tiles,
            pairs,
            out,
            ldo,
            scatter.then_some(self.order),
            gpu.stream(),
        )?;
        Ok(())
    }
}

/// [`pshard_model::graph::Op::HeadMatMul`]: every (token, head) pair routed to its head
/// (`head_route`), then one MoE GEMV over the pairs — input row of pair `t·H + h` at
/// `x + (t·H + h)·x_stride`, output at `out + (t·H + h)·out_stride` — or, above
/// `MOE_GEMV_MAX_PAIRS`, the grouped GEMM scattering back to pair order.
pub fn head_matmul(
    gpu: &Gpu,
    model: &Model,
    step: &GpuStep<'_>,
    weight: TensorId,
    (x, x_stride): (BufId, usize),
    (out, out_stride): (BufId, usize),
) -> Result<(), EngineError> {
    let g = step.graph;
    let (k, s) = (&gpu.kernels, gpu.stream());
    let t = model.spec.tensor(weight);
    let w = step.weight(weight)?.addr;
    let (heads, rows) = (t.n_mats(), g.rows(x));
    let pairs = rows * heads;
    let route = step.scratch.head_route;
    if route == 0 {
        return Err(EngineError::Device(
            "per-head matmul without its routes".into(),
        ));
    }
    if g.buffer(x).cols != heads * x_stride || g.buffer(out).cols != heads * out_stride {
        return Err(EngineError::Device(format!(
            "per-head matmul of {}: buffers are not {heads} heads of {x_stride} / {out_stride}",
            t.name
        )));
    }
    k.head_route(route, rows, heads, s)?;
    if !pshard_planner::lanes::moe_grouped(pairs, step.exact) {
        k.moe_gemv(
            t.ty,
            w,
            t.rows(),
            t.cols(),
            step.buf(x),
            x_stride,
            1,
            route,
            heads,
            pairs,
            step.buf(out),
            out_stride,
            s,
        )?;
        return Ok(());
    }
    let sorted = Sorted::new(
        gpu,
        step,
        route,
        (rows, heads, heads),
        (step.buf(x), x_stride, t.cols()),
        1,
    )?;
    sorted.gemm(gpu, t, w, pairs, (step.buf(out), out_stride), true)?;
    Ok(())
}
