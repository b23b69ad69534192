//! The CPU lane's matmul steps: several matmuls of one input as one pool job, and the per-head
//! matmuls of latent attention.

use std::ops::Range;

use pshard_kernels::matmul::{
    matmul, matmul_exact, matmul_many, quantize_acts, ActPrecision, MatmulPart, WeightMatrix,
};
use pshard_kernels::ops;
use pshard_kernels::quant::{self, ActFormat};
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::TensorId;

use super::{record, ActTrace, CpuLane, Weights};
use crate::batch::Batch;
use crate::error::EngineError;

impl CpuLane {
    /// Runs nodes `nodes`, whole-node matmuls of one input in one partner format, as one pool
    /// job ([`matmul_many`]). Times them under the matmul op kind.
    pub fn exec_matmuls(
        &mut self,
        g: &Graph,
        nodes: Range<usize>,
        w: &dyn Weights,
        batch: &Batch,
    ) -> Result<(), EngineError> {
        let t0 = std::time::Instant::now();
        let mats: Vec<(TensorId, BufId, BufId, Option<TensorId>)> = nodes
            .clone()
            .map(|ni| match g.nodes[ni].op {
                Op::MatMul {
                    weight,
                    x,
                    out,
                    bias,
                } => Ok((weight, x, out, bias)),
                ref op => Err(EngineError::Batch(format!(
                    "node {ni} ({}) in a CPU matmul group",
                    op.kind()
                ))),
            })
            .collect::<Result<_, _>>()?;
        let Some(&(w0, x, _, _)) = mats.first() else {
            return Ok(());
        };
        let format = quant::kernel(w.matrix(w0, 0).0.ty)
            .ok_or(EngineError::Kernel(
                pshard_kernels::matmul::KernelError::UnsupportedType(w.matrix(w0, 0).0.ty),
            ))?
            .act;
        if mats.iter().any(|m| m.1 != x) {
            return Err(EngineError::Batch(format!(
                "CPU matmul group {nodes:?} reads several inputs"
            )));
        }
        self.quantize(g, x, format)?;
        let acts = self.act_cache[x.0 as usize]
            .take()
            .expect("quantized above");
        let rows = g.rows(x);
        if let Some(trace) = &mut self.trace {
            for &(weight, ..) in &mats {
                record(trace, &acts, (weight, 0), |t| batch.positions[t]);
            }
        }
        // Each output taken out of the buffers while the job writes it.
        let mut outs: Vec<Vec<f32>> = mats
            .iter()
            .map(|m| std::mem::take(&mut self.bufs[m.2 .0 as usize]))
            .collect();
        let res = {
            let mut parts = Vec::with_capacity(mats.len());
            for (m, o) in mats.iter().zip(outs.iter_mut()) {
                let (wm, first) = w.matrix(m.0, 0);
                let stride = g.buffer(m.2).cols;
                parts.push(MatmulPart {
                    w: wm,
                    out: &mut o[first..rows * stride],
                    stride,
                });
            }
            matmul_many(&acts, &mut parts)
        };
        for (m, o) in mats.iter().zip(outs) {
            self.bufs[m.2 .0 as usize] = o;
            self.act_valid[m.2 .0 as usize] = false;
        }
        self.act_cache[x.0 as usize] = Some(acts);
        res?;
        for &(weight, _, out, bias) in &mats {
            if let Some(b) = bias {
                let (wm, first) = w.matrix(weight, 0);
                let bv = &w.vector(b)[first..first + wm.rows];
                let stride = g.buffer(out).cols;
                for r in self.bufs[out.0 as usize][..rows * stride].chunks_mut(stride) {
                    ops::add_inplace(&mut r[first..first + wm.rows], bv);
                }
            }
        }
        *self
            .op_secs
            .entry(g.nodes[nodes.start].op.kind())
            .or_default() += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// [`Op::HeadMatMul`]: head `h`'s columns of every row through matrix `h` of `weight`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn head_matmul(
        &mut self,
        g: &Graph,
        w: &dyn Weights,
        weight: TensorId,
        x: BufId,
        x_stride: usize,
        out: BufId,
        out_stride: usize,
        positions: &[u32],
    ) -> Result<(), EngineError> {
        let n = g.rows(x);
        let (xc, oc) = (g.buffer(x).cols, g.buffer(out).cols);
        let n_heads = xc / x_stride;
        let mut xh = Vec::new();
        let mut oh = Vec::new();
        for h in 0..n_heads {
            let (wm, _) = w.matrix(weight, h);
            let (cols, rows) = (wm.cols, wm.rows);
            xh.clear();
            for t in 0..n {
                xh.extend_from_slice(&self.bufs[x.0 as usize][t * xc + h * x_stride..][..cols]);
            }
            oh.clear();
            oh.resize(n * rows, 0.0);
            matmul_rows(
                self.precision,
                &mut self.trace,
                &wm,
                (weight, h),
                &xh,
                n,
                &|t| positions[t],
                &mut oh,
            )?;
            let o = &mut self.bufs[out.0 as usize];
            for t in 0..n {
                o[t * oc + h * out_stride..][..rows].copy_from_slice(&oh[t * rows..][..rows]);
            }
        }
        Ok(())
    }
}

/// `out = W x` for `m` rows of `x` (each `wm.cols` wide) into rows of `wm.rows`: activations
/// rounded to the weight's partner format (recorded under `key` at `pos(row)` when tracing), or
/// exact.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_rows(
    precision: ActPrecision,
    trace: &mut Option<ActTrace>,
    wm: &WeightMatrix,
    key: (TensorId, usize),
    x: &[f32],
    m: usize,
    pos: &dyn Fn(usize) -> u32,
    out: &mut [f32],
) -> Result<(), EngineError> {
    let fmt = act_format(wm)?;
    let rows = wm.rows;
    if precision == ActPrecision::Exact && fmt != ActFormat::F32 {
        return Ok(matmul_exact(wm, x, m, out, rows, 0..rows)?);
    }
    let q = quantize_acts(fmt, x, m, wm.cols);
    if let Some(trace) = trace {
        record(trace, &q, key, pos);
    }
    Ok(matmul(wm, &q, out, rows, 0..rows)?)
}

/// The activation format `w`'s kernel multiplies with.
pub(super) fn act_format(w: &WeightMatrix) -> Result<ActFormat, EngineError> {
    quant::kernel(w.ty)
        .map(|k| k.act)
        .ok_or(EngineError::Kernel(
            pshard_kernels::matmul::KernelError::UnsupportedType(w.ty),
        ))
}

/// Adds `bias` to every row of `rows` (rows of `bias.len()` values).
pub(super) fn add_rows(rows: &mut [f32], bias: &[f32]) {
    rows.chunks_mut(bias.len())
        .for_each(|r| ops::add_inplace(r, bias));
}
