//! Test oracle: a plain f64 forward pass written straight from the ModelSpec (dequantize → naive
//! matmul), independent of the op graph and the fast kernels, plus model fixtures.
//!
//! By default the oracle is exact: f64 activations everywhere. Two options make it round where
//! the CPU engine's fast path rounds, so a comparison can isolate everything else:
//! [`ActRounding::Partner`] (activations through the weight type's 8-bit partner format before
//! each matmul with quantized weights) and [`Reference::kv_f16`] (K and V through f16, as the KV
//! cache stores them). [`Reference::follow`] makes the partner rounding take the engine's recorded
//! rounding decisions (after checking each is a valid rounding of the reference's own input).

#![allow(dead_code)]

use std::path::PathBuf;

use pshard_kernels::quant::act::{dequantize_acts_row, quantize_acts_row};
use pshard_kernels::quant::{self, ActFormat};
use pshard_model::gguf::ModelFile;
use pshard_model::graph::{RopeYarn, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT};
use pshard_model::spec::{Gating, ModelSpec, RopeMode, TensorId, TensorRole};
use pshard_runtime::cpu::ActTrace;

/// A real test model, or `None` after a visible skip (a failure in CI).
pub fn real_model(name: &str) -> Option<PathBuf> {
    pshard_testkit::real_model(name)
}

/// Writes a synthetic model to a temp file and returns its path.
pub fn synth_model(preset: &str, recipe: &str, seed: u64) -> PathBuf {
    synth_variant(preset, preset, recipe, seed, |_| {})
}

/// How the reference treats the input of a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActRounding {
    /// Exact f64 activations.
    None,
    /// Before each matmul whose weights pair with an 8-bit format (every quantized type), the
    /// activations are rounded to f32, quantized to the partner format (Q8_0 / Q8_1 / Q8_K) with
    /// the kernels' own `quantize_acts_row` and dequantized back with `dequantize_acts_row` —
    /// exactly the values the engine's fast path multiplies with — then the product is taken in
    /// f64. Float weights (F32/F16/BF16) keep exact activations, as in the engine.
    Partner,
}

/// The f64 reference model.
pub struct Reference<'a> {
    file: &'a ModelFile,
    spec: &'a ModelSpec,
    rounding: ActRounding,
    kv_f16: bool,
    experts_in: Option<&'a [Vec<Vec<u32>>]>,
    trace: Option<&'a ActTrace>,
}

/// A dequantized tensor and the partner format its type pairs activations with.
struct Tensor {
    id: TensorId,
    v: Vec<f64>,
    act: ActFormat,
}

impl std::ops::Deref for Tensor {
    type Target = [f64];
    fn deref(&self) -> &[f64] {
        &self.v
    }
}

fn dequant(file: &ModelFile, spec: &ModelSpec, id: TensorId) -> Tensor {
    let t = spec.tensor(id);
    let n: u64 = t.dims.iter().product();
    let mut v = vec![0f32; n as usize];
    let k = quant::scalar_kernel(t.ty).expect("supported type");
    (k.dequantize_row)(file.tensor_data(t.file_index), &mut v);
    Tensor {
        id,
        v: v.into_iter().map(f64::from).collect(),
        act: k.act,
    }
}

/// `x` rounded to f32, through `format` and back (the values the engine's fast path uses).
fn round_through(format: ActFormat, x: &[f64]) -> Vec<f64> {
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let mut q = vec![0u8; format.row_bytes(xf.len()).expect("whole blocks")];
    quantize_acts_row(format, &xf, &mut q);
    let mut back = vec![0f32; xf.len()];
    dequantize_acts_row(format, &q, &mut back);
    back.into_iter().map(f64::from).collect()
}

fn round_f16(x: &mut [f64]) {
    x.iter_mut()
        .for_each(|v| *v = half::f16::from_f64(*v).to_f64());
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * inv * b).collect()
}

/// y = W x for W `rows × cols` (row-major).
fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    let cols = x.len();
    w.chunks(cols)
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn softmax(x: &mut [f64]) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = x
        .iter_mut()
        .map(|v| {
            *v = (*v - m).exp();
            *v
        })
        .sum();
    x.iter_mut().for_each(|v| *v /= s);
}

fn act(x: f64, gelu: bool) -> f64 {
    if gelu {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    } else {
        x / (1.0 + (-x).exp())
    }
}

impl<'a> Reference<'a> {
    /// An exact reference over an opened model (no activation rounding, f64 KV).
    pub fn new(file: &'a ModelFile, spec: &'a ModelSpec) -> Self {
        Reference {
            file,
            spec,
            rounding: ActRounding::None,
            kv_f16: false,
            experts_in: None,
            trace: None,
        }
    }

    /// With [`ActRounding::Partner`]: instead of rounding its own activations, takes the values
    /// the engine multiplied with (`Engine::set_act_trace`), after checking element by element
    /// that they are a rounding of the reference's input to that format: within 0.6 of a
    /// quantization step for Q8_0/Q8_1 (½ step plus the f16 rounding of the scale), one step for
    /// Q8_K (whose clamp at +127 may cost a full step). Rounding is discontinuous: where the
    /// engine's f32 value and the reference's f64 value fall on two sides of a rounding boundary,
    /// the two would otherwise drift apart by a whole step there, and random tiny models amplify
    /// that through every later layer and position to the size of the rounding error itself.
    pub fn follow(mut self, trace: &'a ActTrace) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Forces each MoE layer's experts per position to `experts[layer][position]` (as another
    /// reference run reported them) instead of choosing the top k, so two references with
    /// different rounding cannot flip a near-tie; weights are the forced experts' softmax
    /// probabilities, renormalised when the model says so, as the engine does.
    pub fn force_experts(mut self, experts: &'a [Vec<Vec<u32>>]) -> Self {
        self.experts_in = Some(experts);
        self
    }

    /// Sets how matmul inputs are rounded (see [`ActRounding`]).
    pub fn rounding(mut self, rounding: ActRounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Rounds K (after rope and norms) and V to f16 before attention uses them, as the engine's
    /// KV cache stores them.
    pub fn kv_f16(mut self, on: bool) -> Self {
        self.kv_f16 = on;
        self
    }

    fn t(&self, layer: Option<usize>, role: TensorRole) -> Option<Tensor> {
        self.spec
            .find(layer, role)
            .map(|id| dequant(self.file, self.spec, id))
    }

    /// `m x` for `m` (row-major, `x.len()` columns: all of `w`, or expert `expert`'s slice of it)
    /// at position `pos`, with this reference's activation rounding.
    fn mv(&self, w: &Tensor, m: &[f64], expert: usize, pos: usize, x: &[f64]) -> Vec<f64> {
        if self.rounding == ActRounding::None || w.act == ActFormat::F32 {
            return matvec(m, x);
        }
        let Some(trace) = self.trace else {
            return matvec(m, &round_through(w.act, x));
        };
        let key = (w.id, expert, pos as u32);
        let got = trace
            .get(&key)
            .unwrap_or_else(|| panic!("the engine recorded no {:?} input for {key:?}", w.act));
        assert_eq!(got.len(), x.len(), "{key:?}: recorded input length");
        let (block, steps, slack) = match w.act {
            ActFormat::Q8K => (256, 128.0, 1.01),
            _ => (32, 127.0, 0.6),
        };
        for (b, (g, r)) in got.chunks(block).zip(x.chunks(block)).enumerate() {
            let amax = r.iter().fold(0f64, |a, v| a.max(v.abs()));
            let bound = slack * amax / steps + 1e-6 * amax;
            for (i, (gv, rv)) in g.iter().zip(r).enumerate() {
                assert!(
                    (*gv as f64 - rv).abs() <= bound,
                    "{key:?}: the engine's rounded input [{}] = {gv} is not a {:?} rounding of {rv} (step {})",
                    b * block + i,
                    w.act,
                    amax / steps
                );
            }
        }
        let xr: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        matvec(m, &xr)
    }

    /// Logits of every position for `tokens` evaluated from position 0 (row-major `n × n_vocab`).
    /// `experts_out` receives each MoE layer's chosen experts per token.
    pub fn logits(&self, tokens: &[u32], experts_out: &mut Vec<Vec<Vec<u32>>>) -> Vec<f64> {
        let h = &self.spec.hparams;
        let gemma = self.spec.arch == pshard_model::spec::Arch::Gemma3;
        let eps = h.norm_eps as f64;
        let n = tokens.len();
        let e = h.n_embd;
        let emb = self.t(None, TensorRole::TokenEmbd).unwrap();
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| {
                emb[t as usize * e..][..e]
                    .iter()
                    .map(|v| v * h.embed_scale as f64)
                    .collect()
            })
            .collect();
        for l in 0..self.spec.layers.len() {
            let lo = Some(l);
            let att = if h.mla.is_some() {
                self.mla_attention(l, &x)
            } else {
                self.attention(l, &x)
            };
            let wo = self.t(lo, TensorRole::AttnOutput).unwrap();
            let bo = self.t(lo, TensorRole::AttnOutputBias);
            for (t, a) in att.iter().enumerate() {
                let mut o = self.mv(&wo, &wo, 0, t, a);
                add_bias(&mut o, bo.as_deref());
                if let Some(pn) = self.t(lo, TensorRole::AttnPostNorm).filter(|_| gemma) {
                    o = rms_norm(&o, &pn, eps);
                }
                x[t].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            }
            let fnorm = self.t(lo, TensorRole::FfnNorm).unwrap();
            let mut chosen = Vec::new();
            for (t, xt) in x.iter_mut().enumerate() {
                let xn = rms_norm(xt, &fnorm, eps);
                let mut f = if let Some(gi) = self.t(lo, TensorRole::FfnGateInp) {
                    let mut out = self.moe(l, t, &gi, &xn, &mut chosen);
                    if let Some(gs) = self.t(lo, TensorRole::FfnGateShexp) {
                        let us = self.t(lo, TensorRole::FfnUpShexp).unwrap();
                        let ds = self.t(lo, TensorRole::FfnDownShexp).unwrap();
                        let s = self.glu_mlp([&gs, &us, &ds], t, &xn, gemma);
                        out.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
                    }
                    out
                } else {
                    let (g, u, d) = (
                        self.t(lo, TensorRole::FfnGate).unwrap(),
                        self.t(lo, TensorRole::FfnUp).unwrap(),
                        self.t(lo, TensorRole::FfnDown).unwrap(),
                    );
                    self.glu_mlp([&g, &u, &d], t, &xn, gemma)
                };
                if let Some(pn) = self.t(lo, TensorRole::FfnPostNorm).filter(|_| gemma) {
                    f = rms_norm(&f, &pn, eps);
                }
                xt.iter_mut().zip(&f).for_each(|(a, b)| *a += b);
            }
            experts_out.push(chosen);
        }
        let on = self.t(None, TensorRole::OutputNorm).unwrap();
        let out = self
            .t(None, TensorRole::Output)
            .unwrap_or_else(|| self.t(None, TensorRole::TokenEmbd).unwrap());
        let mut logits = Vec::with_capacity(n * h.n_vocab);
        for (t, xt) in x.iter().enumerate() {
            let mut lg = self.mv(&out, &out, 0, t, &rms_norm(xt, &on, eps));
            if let Some(c) = h.final_softcap {
                lg.iter_mut()
                    .for_each(|v| *v = c as f64 * (*v / c as f64).tanh());
            }
            logits.extend(lg);
        }
        logits
    }

    /// `down(act(gate x) · up x)`.
    fn glu_mlp(&self, [g, u, d]: [&Tensor; 3], t: usize, xn: &[f64], gemma: bool) -> Vec<f64> {
        let gv = self.mv(g, g, 0, t, xn);
        let uv = self.mv(u, u, 0, t, xn);
        let hdn: Vec<f64> = gv
            .iter()
            .zip(&uv)
            .map(|(a, b)| act(*a, gemma) * b)
            .collect();
        self.mv(d, d, 0, t, &hdn)
    }

    /// Rope of one head's first `nd` values in place at position `t` of layer `l`.
    fn rope(&self, l: usize, head: &mut [f64], nd: usize, t: usize) {
        let h = &self.spec.hparams;
        let layer = &self.spec.layers[l];
        let rope_freqs = self
            .spec
            .rope_freqs
            .filter(|_| layer.window.is_none())
            .map(|id| dequant(self.file, self.spec, id));
        let s = 1.0 / layer.rope_linear_scale as f64;
        let yarn = h.yarn.map(|y| RopeYarn::new(&y, nd, layer.rope_base));
        for i in 0..nd / 2 {
            let mut theta = t as f64 * (layer.rope_base as f64).powf(-2.0 * i as f64 / nd as f64);
            if let Some(ff) = &rope_freqs {
                theta /= ff[i];
            }
            let (factor, m) = match yarn {
                Some(y) => (y.angle_factor(i, s as f32) as f64, y.mscale as f64),
                None => (s, 1.0),
            };
            theta *= factor;
            let (a, b) = match h.rope_mode {
                RopeMode::Adjacent => (2 * i, 2 * i + 1),
                RopeMode::Neox => (i, i + nd / 2),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = m * (x0 * theta.cos() - x1 * theta.sin());
            head[b] = m * (x0 * theta.sin() + x1 * theta.cos());
        }
    }

    /// Causal (window-limited) attention of every position over `qs`/`ks`/`vs` (per position:
    /// heads of `dk` / KV heads of `dk` and `dv`), with the layer's sinks.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        l: usize,
        qs: &[Vec<f64>],
        ks: &[Vec<f64>],
        vs: &[Vec<f64>],
        (n_head, n_kv, dk, dv): (usize, usize, usize, usize),
        scale: f64,
    ) -> Vec<Vec<f64>> {
        let window = self.spec.layers[l].window;
        let sinks = self.t(Some(l), TensorRole::AttnSinks);
        let group = n_head / n_kv;
        (0..qs.len())
            .map(|t| {
                let first = window.map_or(0, |w| (t + 1).saturating_sub(w));
                let mut att = vec![0f64; n_head * dv];
                for hh in 0..n_head {
                    let kh = hh / group;
                    let q = &qs[t][hh * dk..][..dk];
                    let mut sc: Vec<f64> = (first..=t)
                        .map(|j| {
                            q.iter()
                                .zip(&ks[j][kh * dk..][..dk])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    // A sink joins the softmax as one more logit without a value.
                    if let Some(s) = &sinks {
                        sc.push(s[hh]);
                    }
                    softmax(&mut sc);
                    for (j, w) in (first..=t).zip(&sc) {
                        for d in 0..dv {
                            att[hh * dv + d] += w * vs[j][kh * dv + d];
                        }
                    }
                }
                att
            })
            .collect()
    }

    /// Standard attention of layer `l` up to its output projection: each position's head outputs.
    fn attention(&self, l: usize, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let h = &self.spec.hparams;
        let eps = h.norm_eps as f64;
        let lo = Some(l);
        let an = self.t(lo, TensorRole::AttnNorm).unwrap();
        let (wq, wk, wv) = (
            self.t(lo, TensorRole::AttnQ).unwrap(),
            self.t(lo, TensorRole::AttnK).unwrap(),
            self.t(lo, TensorRole::AttnV).unwrap(),
        );
        let (bq, bk, bv) = (
            self.t(lo, TensorRole::AttnQBias),
            self.t(lo, TensorRole::AttnKBias),
            self.t(lo, TensorRole::AttnVBias),
        );
        let (qn, kn) = (
            self.t(lo, TensorRole::AttnQNorm),
            self.t(lo, TensorRole::AttnKNorm),
        );
        let hd = h.head_dim_k;
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (t, xt) in x.iter().enumerate() {
            let xn = rms_norm(xt, &an, eps);
            let mut q = self.mv(&wq, &wq, 0, t, &xn);
            let mut k = self.mv(&wk, &wk, 0, t, &xn);
            let mut v = self.mv(&wv, &wv, 0, t, &xn);
            add_bias(&mut q, bq.as_deref());
            add_bias(&mut k, bk.as_deref());
            add_bias(&mut v, bv.as_deref());
            if let (Some(qn), Some(kn)) = (&qn, &kn) {
                q = q.chunks(hd).flat_map(|c| rms_norm(c, qn, eps)).collect();
                k = k.chunks(hd).flat_map(|c| rms_norm(c, kn, eps)).collect();
            }
            for y in [&mut q, &mut k] {
                for head in y.chunks_mut(hd) {
                    self.rope(l, head, h.rope_dims, t);
                }
            }
            if self.kv_f16 {
                round_f16(&mut k);
                round_f16(&mut v);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let shape = (h.n_head, h.n_head_kv, hd, h.head_dim_v);
        self.attend(l, &qs, &ks, &vs, shape, h.attn_scale as f64)
    }

    /// Multi-head latent attention of layer `l` up to its output projection, in the absorbed
    /// form (queries into the latent space, attention over the latent and the rope key, heads
    /// decompressed after): each position's decompressed head outputs.
    fn mla_attention(&self, l: usize, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let h = &self.spec.hparams;
        let m = h.mla.unwrap();
        let eps = h.norm_eps as f64;
        let lo = Some(l);
        let r = h.rope_dims;
        let (kl, nope) = (m.kv_lora_rank, m.nope);
        let an = self.t(lo, TensorRole::AttnNorm).unwrap();
        let kva = self.t(lo, TensorRole::AttnKvAMqa).unwrap();
        let kvn = self.t(lo, TensorRole::AttnKvANorm).unwrap();
        let kb = self.t(lo, TensorRole::AttnKB).unwrap();
        let vb = self.t(lo, TensorRole::AttnVB).unwrap();
        let (mut qs, mut ks) = (Vec::new(), Vec::new());
        for (t, xt) in x.iter().enumerate() {
            let xn = rms_norm(xt, &an, eps);
            let q = match self.t(lo, TensorRole::AttnQ) {
                Some(wq) => self.mv(&wq, &wq, 0, t, &xn),
                None => {
                    let qa = self.t(lo, TensorRole::AttnQA).unwrap();
                    let qan = self.t(lo, TensorRole::AttnQANorm).unwrap();
                    let qb = self.t(lo, TensorRole::AttnQB).unwrap();
                    let c = rms_norm(&self.mv(&qa, &qa, 0, t, &xn), &qan, eps);
                    self.mv(&qb, &qb, 0, t, &c)
                }
            };
            let c = self.mv(&kva, &kva, 0, t, &xn);
            let mut k = rms_norm(&c[..kl], &kvn, eps);
            let mut kpe = c[kl..].to_vec();
            self.rope(l, &mut kpe, r, t);
            k.extend(kpe);
            if self.kv_f16 {
                round_f16(&mut k);
            }
            let mut qa = Vec::with_capacity(h.n_head * (kl + r));
            for hh in 0..h.n_head {
                let qh = &q[hh * (nope + r)..][..nope + r];
                let w = &kb[hh * kl * nope..][..kl * nope];
                qa.extend(self.mv(&kb, w, hh, t, &qh[..nope]));
                let mut pe = qh[nope..].to_vec();
                self.rope(l, &mut pe, r, t);
                qa.extend(pe);
            }
            qs.push(qa);
            ks.push(k);
        }
        let shape = (h.n_head, 1, kl + r, kl);
        // Values are the first kv_lora values of each K row.
        let latent = self.attend(l, &qs, &ks, &ks, shape, h.attn_scale as f64);
        latent
            .iter()
            .enumerate()
            .map(|(t, o)| {
                (0..h.n_head)
                    .flat_map(|hh| {
                        let w = &vb[hh * m.head_dim_v * kl..][..m.head_dim_v * kl];
                        self.mv(&vb, w, hh, t, &o[hh * kl..][..kl])
                    })
                    .collect()
            })
            .collect()
    }

    /// The routed experts of layer `l` for position `t`: routing as llama.cpp's build_moe_ffn
    /// (gating, selection bias, group limit, top k or the forced experts, softmax after top-k,
    /// renormalisation, scale), each expert's FFN with its biases, weighted and summed.
    fn moe(
        &self,
        l: usize,
        t: usize,
        gi: &Tensor,
        xn: &[f64],
        chosen: &mut Vec<Vec<u32>>,
    ) -> Vec<f64> {
        let h = &self.spec.hparams;
        let lo = Some(l);
        let gemma = self.spec.arch == pshard_model::spec::Arch::Gemma3;
        let mut p = self.mv(gi, gi, 0, t, xn);
        add_bias(&mut p, self.t(lo, TensorRole::FfnGateInpBias).as_deref());
        match h.gating {
            Gating::Softmax => softmax(&mut p),
            Gating::Sigmoid => p.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
            Gating::SoftmaxAfterTopK => {}
        }
        let mut sel = p.clone();
        add_bias(&mut sel, self.t(lo, TensorRole::FfnExpProbsBias).as_deref());
        if h.n_expert_groups > 1 {
            let per = h.n_expert / h.n_expert_groups;
            let score: Vec<f64> = sel
                .chunks(per)
                .map(|g| {
                    let mut v = g.to_vec();
                    v.sort_by(|a, b| b.total_cmp(a));
                    v.iter().take(2).sum()
                })
                .collect();
            let mut order: Vec<usize> = (0..score.len()).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            for &g in &order[h.n_group_used..] {
                sel[g * per..(g + 1) * per]
                    .iter_mut()
                    .for_each(|v| *v = f64::NEG_INFINITY);
            }
        }
        let mut order: Vec<usize> = (0..sel.len()).collect();
        order.sort_by(|&a, &b| sel[b].total_cmp(&sel[a]).then(a.cmp(&b)));
        let forced: Option<Vec<usize>> = self
            .experts_in
            .map(|ex| ex[l][t].iter().map(|&i| i as usize).collect());
        let top = forced.as_deref().unwrap_or(&order[..h.n_expert_used]);
        let mut w: Vec<f64> = top.iter().map(|&i| p[i]).collect();
        if h.gating == Gating::SoftmaxAfterTopK {
            softmax(&mut w);
        }
        if h.expert_weights_norm {
            let s: f64 = w.iter().sum::<f64>().max(6.103515625e-5);
            w.iter_mut().for_each(|v| *v /= s);
        }
        w.iter_mut()
            .for_each(|v| *v *= h.expert_weights_scale as f64);
        chosen.push(top.iter().map(|&i| i as u32).collect());
        let (ge, ue, de) = (
            self.t(lo, TensorRole::FfnGateExps).unwrap(),
            self.t(lo, TensorRole::FfnUpExps).unwrap(),
            self.t(lo, TensorRole::FfnDownExps).unwrap(),
        );
        let bias = [
            TensorRole::FfnGateExpsBias,
            TensorRole::FfnUpExpsBias,
            TensorRole::FfnDownExpsBias,
        ]
        .map(|r| self.t(lo, r));
        let (ff, e) = (h.n_ff_expert, h.n_embd);
        let mut out = vec![0f64; e];
        for (&ex, wt) in top.iter().zip(&w) {
            let mut g = self.mv(&ge, &ge[ex * ff * e..][..ff * e], ex, t, xn);
            let mut u = self.mv(&ue, &ue[ex * ff * e..][..ff * e], ex, t, xn);
            add_bias(&mut g, bias[0].as_ref().map(|b| &b[ex * ff..][..ff]));
            add_bias(&mut u, bias[1].as_ref().map(|b| &b[ex * ff..][..ff]));
            let hdn: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(a, b)| {
                    if self.spec.arch == pshard_model::spec::Arch::GptOss {
                        swiglu_oai(*a, *b)
                    } else {
                        act(*a, gemma) * b
                    }
                })
                .collect();
            let mut d = self.mv(&de, &de[ex * e * ff..][..e * ff], ex, t, &hdn);
            add_bias(&mut d, bias[2].as_ref().map(|b| &b[ex * e..][..e]));
            out.iter_mut().zip(&d).for_each(|(a, b)| *a += wt * b);
        }
        out
    }
}

/// `y += b` when there is a bias.
fn add_bias(y: &mut [f64], b: Option<&[f64]>) {
    if let Some(b) = b {
        y.iter_mut().zip(b).for_each(|(a, c)| *a += c);
    }
}

/// gpt-oss's clamped SwiGLU, in f64.
fn swiglu_oai(g: f64, u: f64) -> f64 {
    let (alpha, limit) = (SWIGLU_OAI_ALPHA as f64, SWIGLU_OAI_LIMIT as f64);
    let g = g.min(limit);
    let u = u.clamp(-limit, limit);
    g / (1.0 + (-alpha * g).exp()) * (u + 1.0)
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// `tiers` with a KV cache of `kv` (f16 or Q8_0).
pub fn with_kv(
    mut tiers: pshard_runtime::tiers::TierSet,
    kv: pshard_model::ggml_type::GgmlType,
) -> pshard_runtime::tiers::TierSet {
    tiers.params.kv_type = kv;
    tiers
}

/// Makes a tiny preset's KV rows whole Q8_0 blocks: the one that is not, deepseek2's 16-value
/// rope key, becomes 32 values (real deepseek2 models have 64).
pub fn q8_kv_ready(p: &mut pshard_model::synth::SynthPreset) {
    if let Some(m) = &mut p.mla {
        m.rope = 32;
    }
}

/// A tiny preset changed by `tweak`, written under `name` (seed `seed`, recipe `recipe`).
pub fn synth_variant(
    preset: &str,
    name: &str,
    recipe: &str,
    seed: u64,
    tweak: impl FnOnce(&mut pshard_model::synth::SynthPreset),
) -> PathBuf {
    use pshard_model::synth;
    let mut p = synth::preset(preset).expect("preset exists");
    tweak(&mut p);
    let r = synth::QuantRecipe::from_name(recipe).expect("recipe exists");
    let dir = std::env::temp_dir().join(format!("pshard-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{recipe}-{seed}.gguf"));
    // Tests of one binary run in parallel and may ask for the same model while another has it
    // mapped: truncating that file in place killed the other with SIGBUS. Write a private file and
    // rename it over the name (a mapping keeps the old file).
    let tmp = dir.join(format!(
        "{name}-{recipe}-{seed}.{:?}.part",
        std::thread::current().id()
    ));
    let f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
    synth::write_synth(&p, r, seed, f, &mut |_, _| {}).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Every searched strategy plus all-GPU.
pub fn strategies() -> Vec<pshard_planner::placement::Strategy> {
    use pshard_planner::placement::Strategy;
    std::iter::once(Strategy::AllGpu)
        .chain(Strategy::SEARCHED)
        .collect()
}

/// The placement of `s` with about `share` of its pinning steps taken.
pub fn placement(
    spec: &ModelSpec,
    s: pshard_planner::placement::Strategy,
    share: f64,
) -> pshard_planner::Placement {
    use pshard_planner::placement::{place, steps};
    let st = steps(spec, s);
    let k = ((st.len() as f64) * share).round() as usize;
    place(spec, s, &st, k, pshard_planner::Frac(5000))
}

/// Tiers of these token counts (ascending) with their placements, each running ubatches of its
/// count; the largest is the prompt tier.
pub fn tiers_of(
    tiers: Vec<(usize, pshard_planner::Placement)>,
    n_ctx: usize,
) -> pshard_runtime::tiers::TierSet {
    use pshard_runtime::tiers::{RunTier, TierSet};
    let mut params = pshard_planner::cost::PlanParams::new(n_ctx);
    let max = tiers.iter().map(|t| t.0).max().unwrap_or(1);
    params.tier_max = Some(max);
    TierSet {
        tiers: tiers
            .into_iter()
            .map(|(n, placement)| RunTier {
                n,
                prefill: n == max,
                placement,
                strategy: "TEST".into(),
                ubatch: n,
                predicted_tps: None,
                switch_s: 0.0,
            })
            .collect(),
        params,
        source: "test".into(),
    }
}
