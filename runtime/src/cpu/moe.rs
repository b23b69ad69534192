//! The CPU lane's MoE FFN step: every routed expert of the batch in the kernels' parallel job,
//! or expert by expert where the experts have biases.

use pshard_kernels::matmul::{matmul, matmul_exact, quantize_acts, ActPrecision, QuantizedActs};
use pshard_kernels::ops;
use pshard_kernels::quant::ActFormat;
use pshard_model::graph::{Activation, BufId, Graph};
use pshard_model::spec::TensorId;

use super::matmul::{act_format, add_rows, matmul_rows};
use super::{record, CpuLane, Weights};
use crate::error::EngineError;

impl CpuLane {
    /// Expert FFNs: all active experts of the batch as one parallel job per stage
    /// ([`pshard_kernels::moe::moe_ffn`]: gate and up of every used expert, GLU, down, the
    /// weighted sums in expert order), each expert's matrices read once per batch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_ffn(
        &mut self,
        g: &Graph,
        w: &dyn Weights,
        x: BufId,
        route: BufId,
        exps: [TensorId; 3],
        bias: Option<[&[f32]; 3]>,
        act: Activation,
        out: BufId,
        positions: &[u32],
        n_expert: usize,
    ) -> Result<(), EngineError> {
        use pshard_kernels::moe::{self, ExpertFfn, MoeInput, MoeRoutes};
        let n = g.n_tokens;
        let cols = g.buffer(x).cols;
        let n_used = g.buffer(route).cols / 2;
        let (mut ids, mut weights) = (
            Vec::with_capacity(n * n_used),
            Vec::with_capacity(n * n_used),
        );
        {
            let r = &self.bufs[route.0 as usize];
            for t in 0..n {
                for k in 0..n_used {
                    let e = r[t * 2 * n_used + k].to_bits();
                    if e as usize >= n_expert {
                        return Err(EngineError::Batch(format!(
                            "expert id {e} out of {n_expert} in the routes"
                        )));
                    }
                    ids.push(e);
                    weights.push(r[t * 2 * n_used + n_used + k]);
                }
            }
        }
        // Expert biases are not in the parallel job: those FFNs run expert by expert (the same
        // batch-invariant matmuls, one expert at a time).
        if bias.is_some() {
            let routes = (ids.as_slice(), weights.as_slice(), n_used);
            return self.moe_ffn_per_expert(g, w, x, routes, exps, bias, act, out, positions);
        }
        let expert = |e: usize| ExpertFfn {
            gate: w.matrix(exps[0], e).0,
            up: w.matrix(exps[1], e).0,
            down: w.matrix(exps[2], e).0,
        };
        let routes = MoeRoutes {
            ids: &ids,
            weights: &weights,
            n_used,
        };
        let (xi, oi) = (x.0 as usize, out.0 as usize);
        let mut o = std::mem::take(&mut self.bufs[oi]);
        let mut trace = self.trace.take();
        let traced = trace.is_some();
        let mut rec = |which: MoeInput, e: usize, toks: &[usize], q: &QuantizedActs| {
            if let Some(tr) = trace.as_mut() {
                let id = match which {
                    MoeInput::Gate => exps[0],
                    MoeInput::Up => exps[1],
                    MoeInput::Down => exps[2],
                };
                record(tr, q, (id, e), |i| positions[toks[i]]);
            }
        };
        // The output buffer is taken out while the kernel writes it (the graph gives the FFN
        // distinct input and output buffers; an aliased one is copied first).
        let xs: std::borrow::Cow<[f32]> = if xi == oi {
            std::borrow::Cow::Owned(o[..n * cols].to_vec())
        } else {
            std::borrow::Cow::Borrowed(&self.bufs[xi][..n * cols])
        };
        let res = moe::moe_ffn(
            moe::Experts::Lookup {
                n: n_expert,
                get: &expert,
            },
            &xs,
            n,
            routes,
            act,
            self.precision,
            &mut o[..n * cols],
            traced.then_some(&mut rec as moe::MoeTrace),
        );
        drop(xs);
        self.bufs[oi] = o;
        self.trace = trace;
        res?;
        Ok(())
    }

    /// Expert FFNs one expert at a time, for what the parallel job does not do: biases after
    /// each projection. `routes`: (expert ids, weights, experts
    /// per token), already checked.
    #[allow(clippy::too_many_arguments)]
    fn moe_ffn_per_expert(
        &mut self,
        g: &Graph,
        w: &dyn Weights,
        x: BufId,
        routes: (&[u32], &[f32], usize),
        exps: [TensorId; 3],
        bias: Option<[&[f32]; 3]>,
        act: Activation,
        out: BufId,
        positions: &[u32],
    ) -> Result<(), EngineError> {
        let n = g.n_tokens;
        let cols = g.buffer(x).cols;
        let (ids, wts, n_used) = routes;
        let n_expert = ids.iter().map(|&e| e as usize + 1).max().unwrap_or(0);
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_expert];
        for (i, (&e, &wt)) in ids.iter().zip(wts).enumerate() {
            by_expert[e as usize].push((i / n_used, wt));
        }
        let mut acc = vec![0f32; n * cols];
        let xs = &self.bufs[x.0 as usize];
        let exact = self.precision == ActPrecision::Exact;
        for (e, toks) in by_expert.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let m = toks.len();
            let mut xe = vec![0f32; m * cols];
            for (i, &(t, _)) in toks.iter().enumerate() {
                xe[i * cols..][..cols].copy_from_slice(&xs[t * cols..][..cols]);
            }
            let (gate, _) = w.matrix(exps[0], e);
            let (up, _) = w.matrix(exps[1], e);
            let (down, _) = w.matrix(exps[2], e);
            let ff = gate.rows;
            let mut gt = vec![0f32; m * ff];
            let mut ut = vec![0f32; m * ff];
            let mut qx: Option<QuantizedActs> = None;
            let pos = |i: usize| positions[toks[i].0];
            for (wm, id, o) in [(&gate, exps[0], &mut gt), (&up, exps[1], &mut ut)] {
                let fmt = act_format(wm)?;
                if exact && fmt != ActFormat::F32 {
                    matmul_exact(wm, &xe, m, o, ff, 0..ff)?;
                    continue;
                }
                // Gate and up usually share a type: quantize their input once.
                if qx.as_ref().is_none_or(|q| q.format != fmt) {
                    qx = Some(quantize_acts(fmt, &xe, m, cols));
                }
                let q = qx.as_ref().expect("set above");
                if let Some(trace) = &mut self.trace {
                    record(trace, q, (id, e), pos);
                }
                matmul(wm, q, o, ff, 0..ff)?;
            }
            if let Some([bg, bu, _]) = bias {
                add_rows(&mut gt, &bg[e * ff..][..ff]);
                add_rows(&mut ut, &bu[e * ff..][..ff]);
            }
            let mut h = vec![0f32; m * ff];
            ops::glu(&gt, &ut, &mut h, act);
            let mut d = vec![0f32; m * cols];
            matmul_rows(
                self.precision,
                &mut self.trace,
                &down,
                (exps[2], e),
                &h,
                m,
                &pos,
                &mut d,
            )?;
            if let Some([_, _, bd]) = bias {
                add_rows(&mut d, &bd[e * cols..][..cols]);
            }
            for (i, &(t, wt)) in toks.iter().enumerate() {
                for (a, v) in acc[t * cols..][..cols]
                    .iter_mut()
                    .zip(&d[i * cols..][..cols])
                {
                    *a += wt * v;
                }
            }
        }
        self.bufs[out.0 as usize][..n * cols].copy_from_slice(&acc);
        Ok(())
    }
}
