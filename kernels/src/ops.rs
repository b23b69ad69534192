//! CPU implementations of the op graph's non-matmul ops: norms, rope, GLU, residual add, soft-cap,
//! softmax/top-k routing and attention over an f16 KV cache.
//!
//! All activations are f32 row-major `[rows, cols]`. Reductions accumulate in f32 (attention scores
//! and softmax too), matching what the GPU kernels do.

use half::f16;
use rayon::prelude::*;

/// Rows at or above which the row-wise ops go parallel (below, thread hand-off costs more).
const PAR_ROWS: usize = 16;

/// `out[r] = x[r] / rms(x[r]) · weight`, for rows of `weight.len()` values.
pub fn rms_norm(x: &[f32], weight: &[f32], out: &mut [f32], eps: f32) {
    let cols = weight.len();
    let norm_row = |(xr, or): (&[f32], &mut [f32])| {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / cols as f32 + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    };
    if x.len() / cols >= PAR_ROWS {
        x.par_chunks(cols)
            .zip(out.par_chunks_mut(cols))
            .for_each(norm_row);
    } else {
        x.chunks(cols).zip(out.chunks_mut(cols)).for_each(norm_row);
    }
}

/// In-place RMS norm of a row.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v *= inv * w;
    }
}

/// RMS norm of every `weight.len()`-wide head slice of `x`, in place (q/k norm).
pub fn head_rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    x.chunks_mut(weight.len())
        .for_each(|h| rms_norm_inplace(h, weight, eps));
}

/// How rotary embedding pairs dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairing {
    /// (2i, 2i+1)
    Adjacent,
    /// (i, i + n_dims/2)
    Neox,
}

/// Rotary embedding parameters.
#[derive(Clone, Copy, Debug)]
pub struct Rope<'a> {
    /// Pairing mode.
    pub pairing: RopePairing,
    /// Rotated dimensions per head.
    pub n_dims: usize,
    /// Frequency base.
    pub base: f32,
    /// Positions are multiplied by this.
    pub pos_scale: f32,
    /// Per-pair frequency divisors (llama3), `n_dims / 2` long.
    pub freq_factors: Option<&'a [f32]>,
}

/// Applies rope in place to `x` (`positions.len()` rows of heads of `head_dim`).
pub fn rope(x: &mut [f32], head_dim: usize, positions: &[u32], r: &Rope) {
    let cols = x.len() / positions.len().max(1);
    let half = r.n_dims / 2;
    // Per-pair inverse frequencies, computed once per call.
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let f = r.base.powf(-2.0 * i as f32 / r.n_dims as f32);
            match r.freq_factors {
                Some(ff) => f / ff[i],
                None => f,
            }
        })
        .collect();
    let rotate_row = |(row, &pos): (&mut [f32], &u32)| {
        let p = pos as f32 * r.pos_scale;
        let sin_cos: Vec<(f32, f32)> = inv_freq.iter().map(|f| (p * f).sin_cos()).collect();
        for head in row.chunks_mut(head_dim) {
            for (i, &(s, c)) in sin_cos.iter().enumerate() {
                let (a, b) = match r.pairing {
                    RopePairing::Adjacent => (2 * i, 2 * i + 1),
                    RopePairing::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    };
    if positions.len() >= PAR_ROWS {
        x.par_chunks_mut(cols)
            .zip(positions.par_iter())
            .for_each(rotate_row);
    } else {
        x.chunks_mut(cols)
            .zip(positions.iter())
            .for_each(rotate_row);
    }
}

/// SiLU.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// `out = act(gate) · up` elementwise; `gelu` picks GELU-tanh, else SiLU.
pub fn glu(gate: &[f32], up: &[f32], out: &mut [f32], gelu: bool) {
    let f = |((o, g), u): ((&mut f32, &f32), &f32)| {
        *o = if gelu { gelu_tanh(*g) } else { silu(*g) } * u;
    };
    if out.len() >= 1 << 16 {
        out.par_iter_mut()
            .zip(gate.par_iter())
            .zip(up.par_iter())
            .for_each(f);
    } else {
        out.iter_mut().zip(gate).zip(up).for_each(f);
    }
}

/// `a += b` elementwise.
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// `x = cap · tanh(x / cap)`.
pub fn softcap(x: &mut [f32], cap: f32) {
    x.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// MoE routing of one token: softmax over `logits`, the `ids.len()` largest (ties → lower id), with
/// their probabilities optionally renormalised to sum to 1.
pub fn route_top_k(logits: &[f32], ids: &mut [u32], weights: &mut [f32], normalize: bool) {
    let mut probs = logits.to_vec();
    softmax(&mut probs);
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_by(|&a, &b| {
        probs[b as usize]
            .total_cmp(&probs[a as usize])
            .then(a.cmp(&b))
    });
    for (k, &e) in order.iter().take(ids.len()).enumerate() {
        ids[k] = e;
        weights[k] = probs[e as usize];
    }
    if normalize {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
}

/// MoE routing of one token with the experts given (`ids`): their softmax probabilities, optionally
/// renormalised. Tests use it to force a reference's expert choice.
pub fn route_forced(logits: &[f32], ids: &[u32], weights: &mut [f32], normalize: bool) {
    let mut probs = logits.to_vec();
    softmax(&mut probs);
    for (w, &e) in weights.iter_mut().zip(ids) {
        *w = probs[e as usize];
    }
    if normalize {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
}

/// One layer's KV cache as the attention kernel sees it: `cells` slots of `n_head_kv · head_dim`
/// f16 values for K and for V (V not transposed). Position `p` lives in slot `p % cells`.
pub struct KvView<'a> {
    /// Keys, `cells × kv_k_cols`.
    pub k: &'a [f16],
    /// Values, `cells × kv_v_cols`.
    pub v: &'a [f16],
    /// Slots.
    pub cells: usize,
}

/// Attention shape and masking parameters.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Key head dimension.
    pub head_dim_k: usize,
    /// Value head dimension.
    pub head_dim_v: usize,
    /// Keys at positions `p - window < j ≤ p` only.
    pub window: Option<usize>,
    /// Score scale.
    pub scale: f32,
    /// Score soft-cap.
    pub softcap: Option<f32>,
}

/// Causal attention of `q` (rows at `positions`) over the cache, which already holds every position
/// `≤` each row's own. Writes `out` (`rows × n_head · head_dim_v`).
///
/// Parallel over (token, kv head) pairs; each cache row is widened from f16 once (run-time-detected
/// F16C via `half`'s slice conversion) and used by every query head of its GQA group.
pub fn attention(q: &[f32], positions: &[u32], kv: &KvView, p: &AttnParams, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let (dk, dv) = (p.head_dim_k, p.head_dim_v);
    let q_cols = p.n_head * dk;
    let group = p.n_head / p.n_head_kv;
    let kk = p.n_head_kv * dk;
    let vv = p.n_head_kv * dv;
    // One output chunk per (token, kv head): the `group` query heads that share that kv head.
    out.par_chunks_mut(group * dv).enumerate().for_each_init(
        || (vec![0f32; dk.max(dv)], Vec::new()),
        |(row, scores), (idx, o)| {
            let (t, kh) = (idx / p.n_head_kv, idx % p.n_head_kv);
            let pos = positions[t] as usize;
            let first = match p.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let len = pos + 1 - first;
            let qg = &q[t * q_cols + kh * group * dk..][..group * dk];
            scores.clear();
            scores.resize(group * len, 0.0);
            let krow = &mut row[..dk];
            for (i, j) in (first..=pos).enumerate() {
                let slot = j % kv.cells;
                kv.k[slot * kk + kh * dk..][..dk].convert_to_f32_slice(krow);
                for g in 0..group {
                    let s = dot_f32(&qg[g * dk..][..dk], krow) * p.scale;
                    scores[g * len + i] = match p.softcap {
                        Some(c) => c * (s / c).tanh(),
                        None => s,
                    };
                }
            }
            for g in 0..group {
                softmax(&mut scores[g * len..][..len]);
            }
            o.iter_mut().for_each(|v| *v = 0.0);
            let vrow = &mut row[..dv];
            for (i, j) in (first..=pos).enumerate() {
                let slot = j % kv.cells;
                kv.v[slot * vv + kh * dv..][..dv].convert_to_f32_slice(vrow);
                for g in 0..group {
                    let w = scores[g * len + i];
                    for (a, b) in o[g * dv..][..dv].iter_mut().zip(vrow.iter()) {
                        *a += w * b;
                    }
                }
            }
        },
    );
}

/// f32 dot product in 8 independent lanes so the compiler vectorises it.
#[inline]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let w = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0.0f32; 4];
        rms_norm(&x, &w, &mut out, 0.0);
        // rms = sqrt(25/4) = 2.5
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6);
    }

    #[test]
    fn rope_modes_rotate_the_right_pairs() {
        // One head of 4 dims, position 1, base such that pair 0 angle = 1 rad.
        let r = Rope {
            pairing: RopePairing::Adjacent,
            n_dims: 4,
            base: 10000.0,
            pos_scale: 1.0,
            freq_factors: None,
        };
        let mut x = vec![1.0f32, 0.0, 1.0, 0.0];
        rope(&mut x, 4, &[1], &r);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        let f1 = 10000f32.powf(-0.5);
        assert!((x[2] - f1.cos()).abs() < 1e-6 && (x[3] - f1.sin()).abs() < 1e-6);
        let r = Rope {
            pairing: RopePairing::Neox,
            ..r
        };
        let mut y = vec![1.0f32, 1.0, 0.0, 0.0];
        rope(&mut y, 4, &[1], &r);
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6);
        assert!((y[1] - f1.cos()).abs() < 1e-6 && (y[3] - f1.sin()).abs() < 1e-6);
    }

    #[test]
    fn route_picks_top_k_and_renormalises() {
        let mut ids = [0u32; 2];
        let mut w = [0f32; 2];
        route_top_k(&[0.0, 3.0, 1.0, 2.9], &mut ids, &mut w, true);
        assert_eq!(ids, [1, 3]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6 && w[0] > w[1]);
    }

    #[test]
    fn attention_window_and_gqa() {
        // 2 query heads sharing 1 kv head of dim 1; values = position; window 2.
        let cells = 8;
        let k: Vec<f16> = vec![f16::from_f32(0.0); cells];
        let v: Vec<f16> = (0..cells).map(|j| f16::from_f32(j as f32)).collect();
        let kv = KvView {
            k: &k,
            v: &v,
            cells,
        };
        let p = AttnParams {
            n_head: 2,
            n_head_kv: 1,
            head_dim_k: 1,
            head_dim_v: 1,
            window: Some(2),
            scale: 1.0,
            softcap: None,
        };
        let q = vec![1.0f32, 1.0];
        let mut out = vec![0f32; 2];
        attention(&q, &[5], &kv, &p, &mut out);
        // Equal scores over positions 4 and 5 → mean 4.5 for both heads.
        assert!((out[0] - 4.5).abs() < 1e-6 && (out[1] - 4.5).abs() < 1e-6);
        let p = AttnParams { window: None, ..p };
        attention(&q, &[3], &kv, &p, &mut out);
        assert!((out[0] - 1.5).abs() < 1e-6);
    }
}
