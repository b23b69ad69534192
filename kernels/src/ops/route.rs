//! MoE routing of one token: gating, selection bias, the group limit, top-k (or forced
//! experts) and the weights' renormalisation and scale.

use super::act::{exp_f32, softmax};
use pshard_model::graph::Routing;
use pshard_model::spec::Gating;

/// MoE routing of one token as llama.cpp's `build_moe_ffn` does it: gated values (softmax,
/// sigmoid, or the raw logits when the softmax comes after the top k), `select_bias` added for
/// choosing only, the group limit, the `ids.len()` best (ties → lower id) — or the `forced`
/// experts —, their gated values as weights (softmaxed among themselves for
/// [`Gating::SoftmaxAfterTopK`]), renormalised (sum clamped at 2⁻¹⁴ as llama.cpp does) and scaled
/// when `r` says so.
pub fn route(
    logits: &[f32],
    r: &Routing,
    select_bias: Option<&[f32]>,
    forced: Option<&[u32]>,
    ids: &mut [u32],
    weights: &mut [f32],
) {
    let mut probs = logits.to_vec();
    match r.gating {
        Gating::Softmax => softmax(&mut probs),
        Gating::Sigmoid => probs
            .iter_mut()
            .for_each(|v| *v = 1.0 / (1.0 + exp_f32(-*v))),
        Gating::SoftmaxAfterTopK => {}
    }
    match forced {
        Some(f) => ids.copy_from_slice(f),
        None => {
            let mut sel = probs.clone();
            if let Some(b) = select_bias {
                sel.iter_mut().zip(b).for_each(|(s, b)| *s += b);
            }
            let (groups, used) = r.groups;
            if groups > 1 {
                limit_groups(&mut sel, groups, used);
            }
            // The k best in order (ties → lower id): a strict total order, so selecting the k
            // first and sorting only them gives the full sort's first k. Sorting all 128 of
            // qwen3's experts instead: routing a decode token took 5.6 µs a layer, not 2.8 (dev
            // VM, `pshard bench --op-times`).
            let better =
                |a: &u32, b: &u32| sel[*b as usize].total_cmp(&sel[*a as usize]).then(a.cmp(b));
            let mut order: Vec<u32> = (0..sel.len() as u32).collect();
            let k = ids.len();
            if k > 0 && k < order.len() {
                order.select_nth_unstable_by(k - 1, better);
            }
            order[..k].sort_unstable_by(better);
            ids.copy_from_slice(&order[..k]);
        }
    }
    for (w, &e) in weights.iter_mut().zip(ids.iter()) {
        *w = probs[e as usize];
    }
    if r.gating == Gating::SoftmaxAfterTopK {
        softmax(weights);
    }
    if r.normalize {
        let s: f32 = weights.iter().sum::<f32>().max(6.103_515_6e-5);
        weights.iter_mut().for_each(|w| *w /= s);
    }
    if r.scale != 1.0 {
        weights.iter_mut().for_each(|w| *w *= r.scale);
    }
}

/// Group-limited routing: each of `groups` consecutive expert groups scores the sum of its two
/// best values; all but the `used` best groups (ties → lower group) are masked to −∞.
fn limit_groups(sel: &mut [f32], groups: usize, used: usize) {
    let per = sel.len() / groups;
    let score = |g: &[f32]| {
        let mut top = [f32::NEG_INFINITY; 2];
        for &v in g {
            if v > top[0] {
                top = [v, top[0]];
            } else if v > top[1] {
                top[1] = v;
            }
        }
        if per < 2 {
            top[0]
        } else {
            top[0] + top[1]
        }
    };
    let scores: Vec<f32> = sel.chunks(per).map(score).collect();
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    for &g in &order[used..] {
        sel[g * per..(g + 1) * per]
            .iter_mut()
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(gating: Gating, normalize: bool, scale: f32, groups: (usize, usize)) -> Routing {
        Routing {
            n_expert: 4,
            n_used: 2,
            gating,
            normalize,
            scale,
            groups,
        }
    }

    #[test]
    fn route_picks_top_k_and_renormalises() {
        let mut ids = [0u32; 2];
        let mut w = [0f32; 2];
        let r = routing(Gating::Softmax, true, 1.0, (0, 0));
        route(&[0.0, 3.0, 1.0, 2.9], &r, None, None, &mut ids, &mut w);
        assert_eq!(ids, [1, 3]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6 && w[0] > w[1]);
    }

    /// The k chosen of 128 are the k best in order, ties to the lower id, for every k: logits
    /// of few distinct values, so most comparisons are ties.
    #[test]
    fn route_top_k_orders_ties_by_id() {
        let logits: Vec<f32> = (0..128u32).map(|i| ((i * 37) % 11) as f32 * 0.5).collect();
        let mut want: Vec<u32> = (0..128).collect();
        want.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let r = routing(Gating::SoftmaxAfterTopK, false, 1.0, (0, 0));
        for k in [1usize, 2, 8, 11, 127, 128] {
            let (mut ids, mut w) = (vec![0u32; k], vec![0f32; k]);
            route(&logits, &r, None, None, &mut ids, &mut w);
            assert_eq!(ids, want[..k], "k {k}");
        }
    }

    #[test]
    fn route_gatings_bias_groups_and_scale() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        // Softmax after top-k: the two best logits, softmaxed between themselves.
        let r = routing(Gating::SoftmaxAfterTopK, false, 1.0, (0, 0));
        route(&logits, &r, None, None, &mut ids, &mut w);
        assert_eq!(ids, [1, 3]);
        let e = (0.1f32).exp();
        assert!((w[0] - e / (e + 1.0)).abs() < 1e-6 && (w[1] - 1.0 / (e + 1.0)).abs() < 1e-6);
        // Sigmoid with a selection bias that lifts expert 2 (σ(1) + 0.5) above 1 (σ(3)) and 3;
        // the weights stay unbiased.
        let r = routing(Gating::Sigmoid, false, 2.5, (0, 0));
        route(
            &logits,
            &r,
            Some(&[0.0, 0.0, 0.5, 0.0]),
            None,
            &mut ids,
            &mut w,
        );
        assert_eq!(ids, [2, 1]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((w[0] - 2.5 * sig(1.0)).abs() < 1e-6 && (w[1] - 2.5 * sig(3.0)).abs() < 1e-6);
        // Two groups of two, one used: group {0, 1} scores 3.0, {2, 3} 3.9 → experts 3 and 2.
        let r = routing(Gating::SoftmaxAfterTopK, false, 1.0, (2, 1));
        route(&logits, &r, None, None, &mut ids, &mut w);
        assert_eq!(ids, [3, 2]);
    }

    #[test]
    fn route_forced_ids_take_their_gated_weights() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        // Softmax over all experts, renormalised between the two forced ones (not the top two).
        let r = routing(Gating::Softmax, true, 1.0, (0, 0));
        route(&logits, &r, None, Some(&[2, 0]), &mut ids, &mut w);
        assert_eq!(ids, [2, 0]);
        let e = 1f32.exp();
        assert!((w[0] - e / (e + 1.0)).abs() < 1e-6 && (w[1] - 1.0 / (e + 1.0)).abs() < 1e-6);
        // Without renormalisation: their probabilities among all four.
        let r = routing(Gating::Softmax, false, 1.0, (0, 0));
        route(&logits, &r, None, Some(&[2, 0]), &mut ids, &mut w);
        let sum: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!((w[0] - e / sum).abs() < 1e-6 && (w[1] - 1.0 / sum).abs() < 1e-6);
        // Sigmoid, scaled: the selection bias and the group limit choose nothing when forced.
        let r = routing(Gating::Sigmoid, false, 2.5, (2, 1));
        let bias = [0.0, 0.0, 9.0, 0.0];
        route(&logits, &r, Some(&bias), Some(&[0, 3]), &mut ids, &mut w);
        assert_eq!(ids, [0, 3]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((w[0] - 2.5 * sig(0.0)).abs() < 1e-6 && (w[1] - 2.5 * sig(2.9)).abs() < 1e-6);
    }
}
