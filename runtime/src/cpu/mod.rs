//! The CPU lane: runs graph nodes with the CPU kernels over its own activation buffers.
//!
//! Each node reads its weights through [`Weights`] (the mapped file for CPU-placed tensors; the
//! host device's memory when the host device runs GPU-lane steps with these same ops) and its
//! KV through [`KvAccess`]. A node can be restricted to a range of output columns: the CPU part
//! of a matmul split between CPU and GPU, or a column-wise op on split inputs.
//!
//! Quantized activations are cached per (buffer, format) until the buffer is written again, so q,
//! k and v (or gate and up) share one quantization of their input. With [`ActPrecision::Exact`]
//! matmuls with quantized weights take the f32 activations as they are and dequantize weight rows
//! on the fly ([`matmul_exact`]) instead of rounding activations to 8 bits.

use std::ops::Range;

use pshard_kernels::matmul::{
    matmul, matmul_exact, quantize_acts_into, ActPrecision, QuantizedActs, WeightMatrix,
};
use pshard_kernels::ops;
use pshard_kernels::quant::{self, ActFormat};
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::{RopeMode, TensorId};

use crate::batch::{forced_row, Batch};
use crate::error::EngineError;

mod matmul;
mod moe;

/// Weights as the ops read them (by any of the CPU pool's threads).
pub trait Weights: Sync {
    /// Matrix `id` (for 3-D expert tensors, `expert` selects one) and the index of its first
    /// stored row (rows before it are not held here).
    fn matrix(&self, id: TensorId, expert: usize) -> (WeightMatrix<'_>, usize);
    /// An f32 vector tensor (norm weight, bias, rope factors).
    fn vector(&self, id: TensorId) -> &[f32];
}

/// One layer's KV cells as attention writes and reads them: `n_seq · cells` rows of K and of V.
pub struct LayerKvMut<'a> {
    /// K rows.
    pub k: &'a mut [u8],
    /// V rows.
    pub v: &'a mut [u8],
    /// Cells per sequence.
    pub cells: usize,
    /// The rows' element type.
    pub ty: ops::KvType,
}

/// Access to the KV of the layers an op attends over.
pub trait KvAccess {
    /// Calls `f` with layer `layer`'s KV.
    fn with_layer(
        &mut self,
        layer: usize,
        f: &mut dyn FnMut(LayerKvMut<'_>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError>;
}

/// Key of a recorded matmul input: (weight tensor, expert index — 0 for dense weights —, token
/// position).
pub type ActTraceKey = (TensorId, usize, u32);

/// The activations the fast path actually multiplied with: for every matmul whose weights pair
/// with an 8-bit format, each input row after rounding to that format, dequantized back to f32.
/// Tests let a reference follow these rounding decisions instead of making its own (see
/// `Engine::set_act_trace`).
pub type ActTrace = std::collections::HashMap<ActTraceKey, Vec<f32>>;

/// The CPU lane of one program: its activation buffers and the state of its matmuls.
pub struct CpuLane {
    bufs: Vec<Vec<f32>>,
    /// Per buffer, its last quantization (the allocation is kept for the next one) and whether it
    /// still matches the buffer.
    act_cache: Vec<Option<QuantizedActs>>,
    act_valid: Vec<bool>,
    precision: ActPrecision,
    /// Recorded matmul inputs, when tracing.
    pub trace: Option<ActTrace>,
    /// Seconds spent per op kind.
    pub op_secs: std::collections::BTreeMap<&'static str, f64>,
}

impl CpuLane {
    /// Buffers for every buffer of `g` that `used` marks (others stay empty).
    pub fn new(g: &Graph, used: &[bool]) -> CpuLane {
        let bufs = (0..g.buffers.len())
            .map(|i| {
                if used[i] {
                    vec![0f32; g.rows(BufId(i as u32)) * g.buffers[i].cols]
                } else {
                    Vec::new()
                }
            })
            .collect();
        CpuLane {
            bufs,
            act_cache: vec![None; g.buffers.len()],
            act_valid: vec![false; g.buffers.len()],
            precision: ActPrecision::Quantized,
            trace: None,
            op_secs: Default::default(),
        }
    }

    /// Sets how matmuls treat their activations (see [`ActPrecision`]).
    pub fn set_act_precision(&mut self, precision: ActPrecision) {
        self.precision = precision;
    }

    /// Forgets cached activation quantizations (at the start of every run: inputs change).
    pub fn begin_run(&mut self) {
        self.act_valid.iter_mut().for_each(|v| *v = false);
    }

    /// A buffer.
    pub fn buf(&self, b: BufId) -> &[f32] {
        &self.bufs[b.0 as usize]
    }

    /// A buffer, to be written (its cached quantization is dropped).
    pub fn buf_mut(&mut self, b: BufId) -> &mut [f32] {
        self.act_valid[b.0 as usize] = false;
        &mut self.bufs[b.0 as usize]
    }

    /// Two distinct buffers, one mutable.
    fn pair(&mut self, src: BufId, dst: BufId) -> (&[f32], &mut [f32]) {
        let (s, d) = (src.0 as usize, dst.0 as usize);
        assert_ne!(s, d, "graph ops read and write distinct buffers here");
        if s < d {
            let (a, b) = self.bufs.split_at_mut(d);
            (&a[s], &mut b[0])
        } else {
            let (a, b) = self.bufs.split_at_mut(s);
            (&b[0], &mut a[d])
        }
    }

    /// Whether a matmul whose weights pair with `format` takes the exact path.
    fn exact(&self, format: ActFormat) -> bool {
        self.precision == ActPrecision::Exact && format != ActFormat::F32
    }

    fn quantize(&mut self, g: &Graph, x: BufId, format: ActFormat) -> Result<(), EngineError> {
        let i = x.0 as usize;
        let fresh =
            self.act_valid[i] && matches!(&self.act_cache[i], Some(q) if q.format == format);
        if !fresh {
            let rows = g.rows(x);
            let cols = g.buffer(x).cols;
            let q = self.act_cache[i].get_or_insert_with(|| QuantizedActs::empty(format));
            quantize_acts_into(format, &self.bufs[i][..rows * cols], rows, cols, q)?;
            self.act_valid[i] = true;
        }
        Ok(())
    }

    /// Runs node `ni` (output columns `cols` only, when given). Times it under its op kind.
    #[allow(clippy::too_many_arguments)]
    pub fn exec(
        &mut self,
        g: &Graph,
        ni: usize,
        cols: Option<Range<usize>>,
        w: &dyn Weights,
        kv: &mut dyn KvAccess,
        batch: &Batch,
        n_expert: usize,
    ) -> Result<(), EngineError> {
        let node = &g.nodes[ni];
        let t0 = std::time::Instant::now();
        self.exec_op(g, &node.op, node.layer, cols, w, kv, batch, n_expert)?;
        *self.op_secs.entry(node.op.kind()).or_default() += t0.elapsed().as_secs_f64();
        for b in node.op.writes() {
            self.act_valid[b.0 as usize] = false;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn exec_op(
        &mut self,
        g: &Graph,
        op: &Op,
        layer: Option<usize>,
        cols: Option<Range<usize>>,
        w: &dyn Weights,
        kv: &mut dyn KvAccess,
        batch: &Batch,
        n_expert: usize,
    ) -> Result<(), EngineError> {
        let n = g.n_tokens;
        let ncols = |b: BufId| g.buffer(b).cols;
        match *op {
            Op::Embed { table, out, scale } => {
                let (m, _) = w.matrix(table, 0);
                let k = quant::kernel(m.ty).ok_or(EngineError::Kernel(
                    pshard_kernels::matmul::KernelError::UnsupportedType(m.ty),
                ))?;
                let c = m.cols;
                let o = &mut self.bufs[out.0 as usize];
                for (t, &tok) in batch.tokens.iter().enumerate() {
                    let dst = &mut o[t * c..][..c];
                    m.with_file_row(tok as usize, |row| (k.dequantize_row)(row, dst));
                    if scale != 1.0 {
                        dst.iter_mut().for_each(|v| *v *= scale);
                    }
                }
            }
            Op::RmsNorm {
                x,
                weight,
                out,
                eps,
            } => {
                let rows = g.rows(x);
                let c = ncols(x);
                let wv = w.vector(weight);
                if x == out {
                    ops::head_rms_norm(&mut self.bufs[x.0 as usize][..rows * c], wv, eps);
                } else {
                    let (src, dst) = self.pair(x, out);
                    ops::rms_norm(&src[..rows * c], wv, &mut dst[..rows * c], eps);
                }
            }
            Op::HeadRmsNorm { x, weight, eps, .. } => {
                ops::head_rms_norm(&mut self.bufs[x.0 as usize], w.vector(weight), eps);
            }
            Op::MatMul {
                weight,
                x,
                out,
                bias,
            } => {
                let (m, first) = w.matrix(weight, 0);
                let total = first + m.rows;
                let range = cols.unwrap_or(first..total);
                if range.start < first || range.end > total {
                    return Err(EngineError::Batch(format!(
                        "rows {range:?} of tensor {} are not held (rows {first}..{total})",
                        weight.0
                    )));
                }
                let local = range.start - first..range.end - first;
                let format = quant::kernel(m.ty)
                    .ok_or(EngineError::Kernel(
                        pshard_kernels::matmul::KernelError::UnsupportedType(m.ty),
                    ))?
                    .act;
                let rows = g.rows(x);
                let stride = ncols(out);
                if self.exact(format) {
                    let c = ncols(x);
                    let (src, o) = self.pair(x, out);
                    matmul_exact(
                        &m,
                        &src[..rows * c],
                        rows,
                        &mut o[first..rows * stride],
                        stride,
                        local,
                    )?;
                } else {
                    self.quantize(g, x, format)?;
                    let acts = self.act_cache[x.0 as usize]
                        .take()
                        .expect("quantized above");
                    if let Some(trace) = &mut self.trace {
                        record(trace, &acts, (weight, 0), |t| {
                            // Rows after SelectRows are the logit rows.
                            let tok = if rows == n { t } else { batch.logit_rows[t] };
                            batch.positions[tok]
                        });
                    }
                    let o = &mut self.bufs[out.0 as usize];
                    let res = matmul(&m, &acts, &mut o[first..rows * stride], stride, local);
                    self.act_cache[x.0 as usize] = Some(acts);
                    res?;
                }
                if let Some(b) = bias {
                    let bv = &w.vector(b)[range.clone()];
                    let o = &mut self.bufs[out.0 as usize];
                    for r in o[..rows * stride].chunks_mut(stride) {
                        ops::add_inplace(&mut r[range.clone()], bv);
                    }
                }
            }
            Op::Rope { x, head_dim, rope } => {
                let r = rope_op(&rope, w);
                ops::rope(&mut self.bufs[x.0 as usize], head_dim, batch.positions, &r);
            }
            Op::Attention {
                layer,
                q,
                k,
                v,
                out,
                n_head,
                n_head_kv,
                head_dim_k,
                head_dim_v,
                window,
                scale,
                softcap,
                sinks,
                v_in_k,
            } => {
                let p = ops::AttnParams {
                    n_head,
                    n_head_kv,
                    head_dim_k,
                    head_dim_v,
                    window,
                    scale,
                    softcap,
                    sinks: sinks.map(|t| w.vector(t)),
                };
                // With values inside K the cache has no V rows.
                let kc = n_head_kv * head_dim_k;
                let vc = if v_in_k { 0 } else { n_head_kv * head_dim_v };
                let (qc, oc) = (ncols(q), ncols(out));
                let runs = batch.seq_runs();
                let (qi, ki, vi, oi) = (q.0 as usize, k.0 as usize, v.0 as usize, out.0 as usize);
                let mut ob = std::mem::take(&mut self.bufs[oi]);
                let bufs = &self.bufs;
                let res = kv.with_layer(layer, &mut |l: LayerKvMut<'_>| {
                    let (cells, ty) = (l.cells, l.ty);
                    let (kb, vb) = (ty.row_bytes(kc), ty.row_bytes(vc));
                    for (s, rows) in &runs {
                        let base = *s as usize * cells;
                        let kcache = &mut l.k[base * kb..(base + cells) * kb];
                        let vcache = &mut l.v[base * vb..(base + cells) * vb];
                        for t in rows.clone() {
                            let slot = batch.positions[t] as usize % cells;
                            ty.store(&bufs[ki][t * kc..][..kc], &mut kcache[slot * kb..][..kb]);
                            ty.store(&bufs[vi][t * vc..][..vc], &mut vcache[slot * vb..][..vb]);
                        }
                        let view = ops::KvView {
                            k: kcache,
                            v: if v_in_k { kcache } else { vcache },
                            ty,
                            cells,
                            k_row: kc,
                            v_row: if v_in_k { kc } else { vc },
                        };
                        ops::attention(
                            &bufs[qi][rows.start * qc..rows.end * qc],
                            &batch.positions[rows.clone()],
                            &view,
                            &p,
                            &mut ob[rows.start * oc..rows.end * oc],
                        );
                    }
                    Ok(())
                });
                self.bufs[oi] = ob;
                res?;
            }
            Op::Glu { gate, up, out, act } => {
                let (gi, ui, o) = (gate.0 as usize, up.0 as usize, out.0 as usize);
                let mut o_buf = std::mem::take(&mut self.bufs[o]);
                match &cols {
                    None => ops::glu(&self.bufs[gi], &self.bufs[ui], &mut o_buf, act),
                    Some(r) => {
                        let c = ncols(out);
                        for t in 0..g.rows(out) {
                            let span = t * c + r.start..t * c + r.end;
                            ops::glu(
                                &self.bufs[gi][span.clone()],
                                &self.bufs[ui][span.clone()],
                                &mut o_buf[span],
                                act,
                            );
                        }
                    }
                }
                self.bufs[o] = o_buf;
            }
            Op::Add { a, b, out } => {
                let rows = g.rows(a);
                let c = ncols(a);
                let r = cols.unwrap_or(0..c);
                let span = |t: usize| t * c + r.start..t * c + r.end;
                if out == a || out == b {
                    let other = if out == a { b } else { a };
                    let (src, dst) = self.pair(other, out);
                    for t in 0..rows {
                        ops::add_inplace(&mut dst[span(t)], &src[span(t)]);
                    }
                } else {
                    let mut o_buf = std::mem::take(&mut self.bufs[out.0 as usize]);
                    let (av, bv) = (&self.bufs[a.0 as usize], &self.bufs[b.0 as usize]);
                    for t in 0..rows {
                        for ((o, x), y) in o_buf[span(t)]
                            .iter_mut()
                            .zip(&av[span(t)])
                            .zip(&bv[span(t)])
                        {
                            *o = x + y;
                        }
                    }
                    self.bufs[out.0 as usize] = o_buf;
                }
            }
            Op::SelectRows { x, out } => {
                let c = ncols(x);
                let (src, dst) = self.pair(x, out);
                for (i, &r) in batch.logit_rows.iter().enumerate() {
                    dst[i * c..][..c].copy_from_slice(&src[r * c..][..c]);
                }
            }
            Op::MoeRoute {
                logits,
                out,
                routing,
                select_bias,
            } => {
                let (n_expert, n_used) = (routing.n_expert, routing.n_used);
                let bias = select_bias.map(|t| w.vector(t));
                let table = batch.forced.table(layer, batch.positions, &routing)?;
                let (src, dst) = self.pair(logits, out);
                for t in 0..n {
                    let mut ids = vec![0u32; n_used];
                    let mut wt = vec![0f32; n_used];
                    let logits = &src[t * n_expert..][..n_expert];
                    let forced = table.as_deref().and_then(|tb| forced_row(tb, t, n_used));
                    ops::route(logits, &routing, bias, forced, &mut ids, &mut wt);
                    let row = &mut dst[t * 2 * n_used..][..2 * n_used];
                    for k in 0..n_used {
                        row[k] = f32::from_bits(ids[k]);
                        row[n_used + k] = wt[k];
                    }
                }
            }
            Op::MoeFfn {
                x,
                route,
                gate_exps,
                up_exps,
                down_exps,
                act,
                out,
                bias,
            } => {
                let exps = [gate_exps, up_exps, down_exps];
                let bias = bias.map(|b| b.map(|t| w.vector(t)));
                self.moe_ffn(
                    g,
                    w,
                    x,
                    route,
                    exps,
                    bias,
                    act,
                    out,
                    batch.positions,
                    n_expert,
                )?;
            }
            Op::HeadMatMul {
                weight,
                x,
                x_stride,
                out,
                out_stride,
            } => self.head_matmul(g, w, weight, x, x_stride, out, out_stride, batch.positions)?,
            Op::MlaKv {
                x,
                norm,
                out,
                kv_lora,
                eps,
                rope,
            } => {
                let (xc, oc) = (ncols(x), ncols(out));
                let nw = w.vector(norm);
                let r = rope_op(&rope, w);
                let (src, dst) = self.pair(x, out);
                for t in 0..n {
                    ops::rms_norm(
                        &src[t * xc..][..kv_lora],
                        nw,
                        &mut dst[t * oc..][..kv_lora],
                        eps,
                    );
                }
                ops::rope_heads(
                    &src[..n * xc],
                    (xc, kv_lora),
                    &mut dst[..n * oc],
                    (oc, kv_lora),
                    1,
                    batch.positions,
                    &r,
                );
            }
            Op::MlaQRope {
                q,
                out,
                n_head,
                nope,
                kv_lora,
                rope,
            } => {
                let d = rope.n_dims;
                let r = rope_op(&rope, w);
                let (src, dst) = self.pair(q, out);
                ops::rope_heads(
                    &src[..n * n_head * (nope + d)],
                    (nope + d, nope),
                    &mut dst[..n * n_head * (kv_lora + d)],
                    (kv_lora + d, kv_lora),
                    n_head,
                    batch.positions,
                    &r,
                );
            }
            Op::Softcap { x, cap } => {
                let c = ncols(x);
                match &cols {
                    None => ops::softcap(&mut self.bufs[x.0 as usize], cap),
                    Some(r) => {
                        let b = &mut self.bufs[x.0 as usize];
                        for t in 0..g.rows(x) {
                            ops::softcap(&mut b[t * c + r.start..t * c + r.end], cap);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The kernels' rope parameters of a graph rope.
pub(crate) fn rope_op<'w>(
    rope: &pshard_model::graph::RopeParams,
    w: &'w dyn Weights,
) -> ops::Rope<'w> {
    ops::Rope {
        pairing: match rope.mode {
            RopeMode::Adjacent => ops::RopePairing::Adjacent,
            RopeMode::Neox => ops::RopePairing::Neox,
        },
        n_dims: rope.n_dims,
        base: rope.base,
        pos_scale: rope.pos_scale,
        freq_factors: rope.freq_factors.map(|t| w.vector(t)),
        yarn: rope.yarn,
    }
}

/// Records each row of `acts` (dequantized) under (weight, expert, `position(row)`); float
/// formats are not rounded and are left out.
fn record(
    trace: &mut ActTrace,
    acts: &QuantizedActs,
    (weight, expert): (TensorId, usize),
    position: impl Fn(usize) -> u32,
) {
    if acts.format == ActFormat::F32 {
        return;
    }
    for t in 0..acts.n_rows {
        let mut v = vec![0f32; acts.cols];
        quant::act::dequantize_acts_row(acts.format, acts.row(t), &mut v);
        trace.insert((weight, expert, position(t)), v);
    }
}
