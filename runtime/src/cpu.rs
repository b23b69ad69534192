//! The CPU executor: runs a [`Program`] step by step with the CPU kernels.
//!
//! Activation buffers are allocated once per program and reused for every batch of its size.
//! Quantized activations are cached per (buffer, format) until the buffer is written again, so q, k
//! and v (or gate and up) share one quantization of their input.
//!
//! With [`ActPrecision::Exact`] (see [`CpuRunner::set_act_precision`]) matmuls with quantized
//! weights take the f32 activations as they are and dequantize weight rows on the fly
//! ([`matmul_exact`]) instead of rounding activations to 8 bits.

use pshard_kernels::matmul::{matmul, matmul_exact, quantize_acts, ActPrecision, QuantizedActs};
use pshard_kernels::ops;
use pshard_kernels::quant::{self, ActFormat};
use pshard_model::graph::{Activation, BufId, Op};
use pshard_model::spec::{RopeMode, TensorId};

use crate::kv::KvCache;
use crate::model::Model;
use crate::program::Program;

/// Inputs of one run of a program.
#[derive(Clone, Copy)]
pub struct BatchInput<'a> {
    /// Token ids, one per row.
    pub tokens: &'a [u32],
    /// Position of each token.
    pub positions: &'a [u32],
    /// Rows (indices into `tokens`) whose logits are wanted, `n_logit_rows` of them.
    pub logit_rows: &'a [usize],
    /// Forces MoE expert choices: `(layer, position)` → expert ids (tests compare against a
    /// reference's choice so near-ties cannot flip).
    pub route_override: Option<&'a RouteOverride>,
}

impl BatchInput<'_> {
    /// Checks the input against a program's batch shape and the vocabulary: every backend runs
    /// this before touching its buffers.
    pub fn check(&self, g: &pshard_model::graph::Graph, n_vocab: usize) -> Result<(), ExecError> {
        if self.tokens.len() != g.n_tokens
            || self.positions.len() != g.n_tokens
            || self.logit_rows.len() != g.n_logit_rows
        {
            return Err(ExecError::Shape(format!(
                "program is for {} tokens / {} logit rows, got {} tokens, {} positions, {} logit rows",
                g.n_tokens,
                g.n_logit_rows,
                self.tokens.len(),
                self.positions.len(),
                self.logit_rows.len()
            )));
        }
        if let Some(&r) = self.logit_rows.iter().find(|&&r| r >= g.n_tokens) {
            return Err(ExecError::Shape(format!(
                "logit row {r} ≥ {} tokens",
                g.n_tokens
            )));
        }
        if let Some(&t) = self.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ExecError::BadToken(t, n_vocab));
        }
        Ok(())
    }
}

/// A function from `(layer, position)` to forced expert ids, or `None` to route normally.
pub type RouteOverride = dyn Fn(usize, u32) -> Option<Vec<u32>> + Send + Sync;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The input does not match the program's batch shape.
    #[error("batch shape mismatch: {0}")]
    Shape(String),
    /// A kernel refused its input.
    #[error(transparent)]
    Kernel(#[from] pshard_kernels::matmul::KernelError),
    /// A token id is outside the vocabulary.
    #[error("token id {0} is outside the vocabulary of {1}")]
    BadToken(u32, usize),
}

/// Key of a recorded matmul input: (weight tensor, expert index — 0 for dense weights —, token
/// position).
pub type ActTraceKey = (TensorId, usize, u32);

/// The activations the fast path actually multiplied with: for every matmul whose weights pair
/// with an 8-bit format, each input row after rounding to that format, dequantized back to f32.
/// Tests let a reference follow these rounding decisions instead of making its own (see
/// `Engine::set_act_trace`).
pub type ActTrace = std::collections::HashMap<ActTraceKey, Vec<f32>>;

/// A program with its buffers, ready to run on the CPU.
pub struct CpuRunner {
    program: Program,
    bufs: Vec<Vec<f32>>,
    act_cache: Vec<Option<QuantizedActs>>,
    precision: ActPrecision,
    trace: Option<ActTrace>,
    /// Seconds spent per op kind since creation (for `--profile` reports).
    op_secs: std::collections::BTreeMap<&'static str, f64>,
}

impl CpuRunner {
    /// Allocates the program's buffers.
    pub fn new(program: Program) -> CpuRunner {
        let bufs = program
            .buffers
            .iter()
            .map(|b| vec![0f32; b.bytes / 4])
            .collect();
        let act_cache = vec![None; program.buffers.len()];
        CpuRunner {
            program,
            bufs,
            act_cache,
            precision: ActPrecision::Quantized,
            trace: None,
            op_secs: Default::default(),
        }
    }

    /// Sets how matmuls treat their activations: [`ActPrecision::Quantized`] (the default: 8-bit
    /// partner formats, integer dots) or [`ActPrecision::Exact`] (f32 activations against weights
    /// dequantized on the fly). Float weights (F32/F16/BF16) take f32 activations either way.
    pub fn set_act_precision(&mut self, precision: ActPrecision) {
        self.precision = precision;
    }

    /// Starts (`true`, with an empty trace) or stops recording the rounded activations of every
    /// quantized matmul ([`ActTrace`]); a test aid, off by default.
    pub fn set_act_trace(&mut self, on: bool) {
        self.trace = on.then(ActTrace::new);
    }

    /// Takes the activations recorded since tracing started (empty if it is off).
    pub fn take_act_trace(&mut self) -> ActTrace {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// How matmuls treat their activations (see [`CpuRunner::set_act_precision`]).
    pub fn act_precision(&self) -> ActPrecision {
        self.precision
    }

    /// Seconds spent per op kind since this runner was created.
    pub fn op_seconds(&self) -> &std::collections::BTreeMap<&'static str, f64> {
        &self.op_secs
    }

    /// The program.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Runs one batch; returns the logits (`n_logit_rows × n_vocab`).
    pub fn run(
        &mut self,
        model: &Model,
        kv: &mut KvCache,
        input: BatchInput,
    ) -> Result<&[f32], ExecError> {
        input.check(&self.program.graph, model.spec.hparams.n_vocab)?;
        self.act_cache.iter_mut().for_each(|c| *c = None);
        for si in 0..self.program.steps.len() {
            let node = self.program.steps[si].node;
            let op = self.program.graph.nodes[node].op.clone();
            let layer = self.program.graph.nodes[node].layer;
            let t0 = std::time::Instant::now();
            self.exec(model, kv, &input, &op, layer)?;
            *self.op_secs.entry(op.kind()).or_default() += t0.elapsed().as_secs_f64();
            for w in op.writes() {
                self.act_cache[w.0 as usize] = None;
            }
        }
        Ok(&self.bufs[self.program.graph.logits.0 as usize])
    }

    fn cols(&self, b: BufId) -> usize {
        self.program.graph.buffer(b).cols
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

    fn quantized(&mut self, x: BufId, format: ActFormat) -> &QuantizedActs {
        let i = x.0 as usize;
        let stale = !matches!(&self.act_cache[i], Some(q) if q.format == format);
        if stale {
            let rows = self.program.graph.rows(x);
            let cols = self.cols(x);
            self.act_cache[i] = Some(quantize_acts(
                format,
                &self.bufs[i][..rows * cols],
                rows,
                cols,
            ));
        }
        self.act_cache[i].as_ref().expect("filled above")
    }

    fn exec(
        &mut self,
        model: &Model,
        kv: &mut KvCache,
        input: &BatchInput,
        op: &Op,
        layer: Option<usize>,
    ) -> Result<(), ExecError> {
        let n = self.program.graph.n_tokens;
        match *op {
            Op::Embed { table, out, scale } => {
                let w = model.matrix(table, 0);
                let k = quant::kernel(w.ty).expect("checked at load");
                let row_bytes = w.data.len() / w.rows;
                let cols = w.cols;
                let o = &mut self.bufs[out.0 as usize];
                for (t, &tok) in input.tokens.iter().enumerate() {
                    let dst = &mut o[t * cols..][..cols];
                    (k.dequantize_row)(&w.data[tok as usize * row_bytes..][..row_bytes], dst);
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
                let rows = self.program.graph.rows(x);
                let cols = self.cols(x);
                let w = model.vector(weight);
                if x == out {
                    let b = &mut self.bufs[x.0 as usize][..rows * cols];
                    b.chunks_mut(cols)
                        .for_each(|r| ops::rms_norm_inplace(r, w, eps));
                } else {
                    let (src, dst) = self.pair(x, out);
                    ops::rms_norm(&src[..rows * cols], w, &mut dst[..rows * cols], eps);
                }
            }
            Op::HeadRmsNorm { x, weight, eps, .. } => {
                ops::head_rms_norm(&mut self.bufs[x.0 as usize], model.vector(weight), eps);
            }
            Op::MatMul {
                weight,
                x,
                out,
                bias,
            } => {
                let w = model.matrix(weight, 0);
                let format = quant::kernel(w.ty).expect("checked at load").act;
                let rows = self.program.graph.rows(x);
                if self.exact(format) {
                    let cols = self.cols(x);
                    let (src, o) = self.pair(x, out);
                    let o = &mut o[..rows * w.rows];
                    matmul_exact(&w, &src[..rows * cols], rows, o, w.rows, 0..w.rows)?;
                    if let Some(b) = bias {
                        let bv = model.vector(b);
                        o.chunks_mut(w.rows).for_each(|r| ops::add_inplace(r, bv));
                    }
                    return Ok(());
                }
                self.quantized(x, format);
                let acts = self.act_cache[x.0 as usize]
                    .take()
                    .expect("quantized above");
                if let Some(trace) = &mut self.trace {
                    let n_tok = self.program.graph.n_tokens;
                    record(trace, &acts, (weight, 0), |t| {
                        // Rows after SelectRows are the logit rows.
                        let tok = if rows == n_tok {
                            t
                        } else {
                            input.logit_rows[t]
                        };
                        input.positions[tok]
                    });
                }
                let o = &mut self.bufs[out.0 as usize];
                let res = matmul(&w, &acts, &mut o[..rows * w.rows], w.rows, 0..w.rows);
                self.act_cache[x.0 as usize] = Some(acts);
                res?;
                if let Some(b) = bias {
                    let bv = model.vector(b);
                    o[..rows * w.rows]
                        .chunks_mut(w.rows)
                        .for_each(|r| ops::add_inplace(r, bv));
                }
            }
            Op::Rope { x, head_dim, rope } => {
                let ff = rope.freq_factors.map(|t| model.vector(t));
                let r = ops::Rope {
                    pairing: match rope.mode {
                        RopeMode::Adjacent => ops::RopePairing::Adjacent,
                        RopeMode::Neox => ops::RopePairing::Neox,
                    },
                    n_dims: rope.n_dims,
                    base: rope.base,
                    pos_scale: rope.pos_scale,
                    freq_factors: ff,
                };
                ops::rope(&mut self.bufs[x.0 as usize], head_dim, input.positions, &r);
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
            } => {
                kv.layer_mut(layer).write(
                    input.positions,
                    &self.bufs[k.0 as usize],
                    &self.bufs[v.0 as usize],
                );
                let p = ops::AttnParams {
                    n_head,
                    n_head_kv,
                    head_dim_k,
                    head_dim_v,
                    window,
                    scale,
                    softcap,
                };
                let (qb, ob) = self.pair(q, out);
                ops::attention(qb, input.positions, &kv.layer(layer).view(), &p, ob);
            }
            Op::Glu { gate, up, out, act } => {
                let (g, u, o) = (gate.0 as usize, up.0 as usize, out.0 as usize);
                let mut o_buf = std::mem::take(&mut self.bufs[o]);
                ops::glu(
                    &self.bufs[g],
                    &self.bufs[u],
                    &mut o_buf,
                    act == Activation::GeluTanh,
                );
                self.bufs[o] = o_buf;
            }
            Op::Add { a, b, out } => {
                let rows = self.program.graph.rows(a);
                let len = rows * self.cols(a);
                if out == a {
                    let (src, dst) = self.pair(b, a);
                    ops::add_inplace(&mut dst[..len], &src[..len]);
                } else if out == b {
                    let (src, dst) = self.pair(a, b);
                    ops::add_inplace(&mut dst[..len], &src[..len]);
                } else {
                    let sum: Vec<f32> = self.bufs[a.0 as usize][..len]
                        .iter()
                        .zip(&self.bufs[b.0 as usize][..len])
                        .map(|(x, y)| x + y)
                        .collect();
                    self.bufs[out.0 as usize][..len].copy_from_slice(&sum);
                }
            }
            Op::SelectRows { x, out } => {
                let cols = self.cols(x);
                let (src, dst) = self.pair(x, out);
                for (i, &r) in input.logit_rows.iter().enumerate() {
                    dst[i * cols..][..cols].copy_from_slice(&src[r * cols..][..cols]);
                }
            }
            Op::MoeRoute {
                logits,
                out,
                n_expert,
                n_used,
                normalize,
            } => {
                let (src, dst) = self.pair(logits, out);
                for t in 0..n {
                    let mut ids = vec![0u32; n_used];
                    let mut w = vec![0f32; n_used];
                    let logits = &src[t * n_expert..][..n_expert];
                    let forced = match (input.route_override, layer) {
                        (Some(f), Some(l)) => f(l, input.positions[t]),
                        _ => None,
                    };
                    match forced {
                        Some(f) if f.len() == n_used => {
                            ids.copy_from_slice(&f);
                            ops::route_forced(logits, &ids, &mut w, normalize);
                        }
                        _ => ops::route_top_k(logits, &mut ids, &mut w, normalize),
                    }
                    let row = &mut dst[t * 2 * n_used..][..2 * n_used];
                    for k in 0..n_used {
                        row[k] = f32::from_bits(ids[k]);
                        row[n_used + k] = w[k];
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
            } => {
                let exps = [gate_exps, up_exps, down_exps];
                self.moe_ffn(model, x, route, exps, act, out, input.positions)?;
            }
            Op::Softcap { x, cap } => ops::softcap(&mut self.bufs[x.0 as usize], cap),
        }
        Ok(())
    }

    /// Expert FFNs: all routed experts of the batch as one parallel job per stage
    /// ([`pshard_kernels::moe::moe_ffn`]; each expert's matrices read once per batch).
    #[allow(clippy::too_many_arguments)]
    fn moe_ffn(
        &mut self,
        model: &Model,
        x: BufId,
        route: BufId,
        exps: [TensorId; 3],
        act: Activation,
        out: BufId,
        positions: &[u32],
    ) -> Result<(), ExecError> {
        use pshard_kernels::moe::{self, ExpertFfn, MoeInput, MoeRoutes};
        let n = self.program.graph.n_tokens;
        let cols = self.cols(x);
        let n_used = self.cols(route) / 2;
        let n_expert = model.spec.hparams.n_expert;
        let (mut ids, mut weights) = (
            Vec::with_capacity(n * n_used),
            Vec::with_capacity(n * n_used),
        );
        {
            let r = &self.bufs[route.0 as usize];
            for t in 0..n {
                for k in 0..n_used {
                    ids.push(r[t * 2 * n_used + k].to_bits());
                    weights.push(r[t * 2 * n_used + n_used + k]);
                }
            }
        }
        let experts: Vec<ExpertFfn> = (0..n_expert)
            .map(|e| ExpertFfn {
                gate: model.matrix(exps[0], e),
                up: model.matrix(exps[1], e),
                down: model.matrix(exps[2], e),
            })
            .collect();
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
            &experts,
            &xs,
            n,
            routes,
            act == Activation::GeluTanh,
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
