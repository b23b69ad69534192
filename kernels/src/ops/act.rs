//! Elementwise ops: a branch-free `e^x`, the activations (SiLU, tanh GELU, gpt-oss's clamped
//! SwiGLU) and the GLU over gate/up rows, residual add, soft-cap and softmax.

use crate::pool::{self, SharedSlice};
use pshard_model::graph::{Activation, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT};

/// `e^x` for every f32 to ~2e-7 relative: 0 below −87.3, ∞ above 88.72, NaN for NaN. The
/// range reduction of `exp_neg` with the power of two applied in two halves (so `2^128`
/// overflows only as the result does). Branch-free, so loops over it vectorise: the activations
/// below called libm's `expf`/`tanhf` per element, a fifth of gemma3's prefill (perf, pp512).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let (n, poly) = exp_reduce(x.clamp(-87.3, 88.8));
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = poly * pow2(n1) * pow2(n2);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// `e^x = 2^n · e^r` for `x` in f32's exponent range: `n` and `e^r`, `|r| ≤ ln2/2`, by its
/// degree-6 Taylor polynomial (~1e-7 relative); `n` rounds to nearest by the 1.5·2^23 trick (no
/// libm call), and is read as an integer from the low bits of that sum (a float-to-int cast
/// compiled to scalar compares and moves per element, half of gemma3's GELU time).
#[inline(always)]
pub(super) fn exp_reduce(x: f32) -> (i32, f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0;
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    // `t` lies in [2^23, 2^24) for |n| < 2^22, so its bits are SHIFTER's plus n.
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    (ni, poly)
}

/// SiLU.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// GELU, tanh approximation: `0.5·x·(1 + tanh(y))`, computed as the equal `x / (1 + e^(−2y))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    x / (1.0 + exp_f32(-2.0 * SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

/// gpt-oss's clamped SwiGLU of one (gate, up) pair (see [`Activation::SwigluOai`]).
#[inline(always)]
pub fn swiglu_oai(gate: f32, up: f32) -> f32 {
    let g = gate.min(SWIGLU_OAI_LIMIT);
    let u = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT);
    g / (1.0 + exp_f32(-SWIGLU_OAI_ALPHA * g)) * (u + 1.0)
}

/// `out = act(gate, up)` elementwise.
pub fn glu(gate: &[f32], up: &[f32], out: &mut [f32], act: Activation) {
    if out.len() >= 1 << 16 {
        let o = SharedSlice::new(out);
        pool::for_range(gate.len().min(up.len()).min(o.len()), 1024, |r| {
            // SAFETY: participants get disjoint ranges.
            let o = unsafe { o.range_mut(r.clone()) };
            glu_simd(o, &gate[r.clone()], &up[r], act);
        });
    } else {
        glu_simd(out, gate, up, act);
    }
}

/// The loop of [`glu`]: one per activation (the match outside), so each vectorises.
#[inline(always)]
fn glu_slice(out: &mut [f32], gate: &[f32], up: &[f32], act: Activation) {
    #[inline(always)]
    fn each(o: &mut [f32], g: &[f32], u: &[f32], f: impl Fn(f32, f32) -> f32) {
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = f(*g, *u);
        }
    }
    match act {
        Activation::Silu => each(out, gate, up, |g, u| silu(g) * u),
        Activation::GeluTanh => each(out, gate, up, |g, u| gelu_tanh(g) * u),
        Activation::SwigluOai => each(out, gate, up, swiglu_oai),
    }
}

multiversion!(
    /// [`glu_slice`] at the best SIMD level.
    fn glu_simd(out: &mut [f32], gate: &[f32], up: &[f32], act: Activation) => glu_slice
);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_oai_clamps() {
        // Below the limit: g·σ(1.702 g)·(u + 1).
        let want = 0.5 / (1.0 + (-1.702f32 * 0.5).exp()) * 1.25;
        assert!((swiglu_oai(0.5, 0.25) - want).abs() < 1e-7);
        // Gate clamped from above only, up on both sides.
        let g = 7.0 / (1.0 + (-1.702f32 * 7.0).exp());
        assert!((swiglu_oai(9.0, -20.0) - g * -6.0).abs() < 1e-5);
        assert!(swiglu_oai(-30.0, 1.0).abs() < 1e-9);
    }

    #[test]
    fn exp_f32_and_the_activations_match_f64() {
        let mut x = -95.0f32;
        while x < 95.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if x < -87.3 {
                assert!(got == 0.0 && want < 1.2e-38, "exp({x}) = {got}");
            } else if want > f32::MAX as f64 {
                assert_eq!(got, f64::INFINITY, "exp({x})");
            } else {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            }
            let xd = x as f64;
            let silu_want = xd / (1.0 + (-xd).exp());
            let y = 0.797_884_560_802_865_4 * (xd + 0.044_715 * xd * xd * xd);
            // 0.5·x·(1 + tanh y), in the form that keeps its tiny negative tail.
            let gelu = xd / (1.0 + (-2.0 * y).exp());
            // The exponent's own f32 rounding (a few steps of 6e-8 relative to it) is the floor.
            for (name, got, want, arg) in [
                ("silu", silu(x), silu_want, xd),
                ("gelu", gelu_tanh(x), gelu, 2.0 * y),
            ] {
                let tol = (1e-6 + 2.5e-7 * arg.abs()) * want.abs() + 1e-36;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{name}({x}) = {got}, want {want}"
                );
            }
            x += 0.0173;
        }
        assert!(exp_f32(f32::NAN).is_nan() && silu(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(silu(-200.0), 0.0);
        assert_eq!(gelu_tanh(-200.0), 0.0);
        assert_eq!(gelu_tanh(200.0), 200.0);
    }
}
