//! How a batch's tokens spread over a MoE layer's experts, in expectation, under uniform routing.
//!
//! Each token picks `n_used` distinct experts of `n_expert`. With every expert equally likely, a
//! given expert is among one token's picks with probability `p = n_used / n_expert`,
//! independently of the other tokens, so the tokens it receives from a batch of `b` are
//! Binomial(b, p): `n_expert · P(m)` experts expect `m` tokens each. The CPU engine groups tokens
//! by expert and multiplies each active expert's matrices at its own token count, so the cost of
//! the batch's expert work is priced per token count ([`expert_groups`]); the share of experts a
//! batch touches at all ([`touched_fraction`]) is `1 - P(0)`.

/// Experts that, in expectation, receive the same number of tokens from a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertGroup {
    /// Tokens each of these experts receives (at least 1).
    pub tokens: usize,
    /// Expected number of experts receiving exactly `tokens` tokens.
    pub experts: f64,
}

/// Groups expecting fewer experts than this are left out: their share of the batch's expert
/// work is below one part in 10⁹ of one expert's.
const MIN_EXPERTS: f64 = 1e-9;

/// The expected number of experts of `n_expert` receiving each token count `m ≥ 1` from a batch
/// of `tokens` tokens that each route to `n_used` distinct experts uniformly at random:
/// `n_expert · C(tokens, m) · pᵐ · (1 − p)^(tokens − m)` with `p = n_used / n_expert`, in
/// increasing `m`, groups of fewer than 10⁻⁹ expected experts left out. Their experts add up to
/// `n_expert ·` [`touched_fraction`] and their `tokens × experts` to `tokens · n_used` (every
/// (token, expert) pair once). No groups without experts or tokens; `n_used ≥ n_expert` puts
/// every expert at `tokens`.
pub fn expert_groups(n_expert: usize, n_used: usize, tokens: usize) -> Vec<ExpertGroup> {
    if n_expert == 0 || n_used == 0 || tokens == 0 {
        return Vec::new();
    }
    if n_used >= n_expert {
        return vec![ExpertGroup {
            tokens,
            experts: n_expert as f64,
        }];
    }
    let (e, b) = (n_expert as f64, tokens as f64);
    let p = n_used as f64 / e;
    let mean = b * p;
    // ln P(m), from ln P(0) = b·ln(1 − p) by the ratio P(m+1)/P(m) = (b − m)/(m + 1) · p/(1 − p):
    // in logs, so that batches where (1 − p)^b underflows keep their mass.
    let ln_odds = p.ln() - (-p).ln_1p();
    let mut ln_pm = b * (-p).ln_1p();
    let mut out = Vec::new();
    for m in 1..=tokens {
        ln_pm += ((b - (m - 1) as f64) / m as f64).ln() + ln_odds;
        let experts = e * ln_pm.exp();
        if experts >= MIN_EXPERTS {
            out.push(ExpertGroup { tokens: m, experts });
        } else if m as f64 > mean {
            break;
        }
    }
    out
}

/// Expected share of `n_expert` experts that a batch of `tokens` tokens, each routed to `n_used`
/// of them uniformly at random, touches: `1 − (1 − n_used / n_expert)^tokens` (0 without
/// tokens or experts).
pub fn touched_fraction(n_expert: usize, n_used: usize, tokens: usize) -> f64 {
    if n_expert == 0 || n_used == 0 || tokens == 0 {
        return 0.0;
    }
    let p = (n_used as f64 / n_expert as f64).min(1.0);
    -((tokens as f64) * (-p).ln_1p()).exp_m1()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(g: &[ExpertGroup]) -> (f64, f64) {
        (
            g.iter().map(|x| x.experts).sum(),
            g.iter().map(|x| x.tokens as f64 * x.experts).sum(),
        )
    }

    /// The groups' experts add up to the touched experts and their (token, expert) pairs to
    /// `tokens · n_used`, from decode to batches where `(1 − p)^tokens` underflows.
    #[test]
    fn groups_hold_every_touched_expert_and_every_pair() {
        for (e, k, b) in [
            (128, 8, 1),
            (128, 8, 64),
            (128, 8, 512),
            (128, 8, 16384),
            (32, 4, 7),
            (64, 6, 100),
            (256, 8, 200_000),
        ] {
            let g = expert_groups(e, k, b);
            let (experts, pairs) = sums(&g);
            let touched = e as f64 * touched_fraction(e, k, b);
            assert!(
                (experts - touched).abs() < 1e-6 * touched,
                "{e}/{k} at {b}: {experts} experts, {touched} touched"
            );
            let want = (b * k) as f64;
            assert!(
                (pairs - want).abs() < 1e-6 * want,
                "{e}/{k} at {b}: {pairs} pairs, want {want}"
            );
            assert!(g.windows(2).all(|w| w[0].tokens < w[1].tokens));
            assert!(g.iter().all(|x| x.tokens >= 1 && x.tokens <= b));
        }
    }

    /// Exact values: one token puts `n_used` experts at one token each; two tokens of a 4-of-8
    /// layer put 8·2·½·½ = 4 experts at one token and 8·¼ = 2 at two.
    #[test]
    fn small_batches_match_the_binomial() {
        let g = expert_groups(128, 8, 1);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].tokens, 1);
        assert!((g[0].experts - 8.0).abs() < 1e-9);

        let g = expert_groups(8, 4, 2);
        assert_eq!(g.len(), 2);
        assert!((g[0].experts - 4.0).abs() < 1e-9, "{g:?}");
        assert_eq!(g[1].tokens, 2);
        assert!((g[1].experts - 2.0).abs() < 1e-9, "{g:?}");

        // qwen3-30b-a3b's 8 of 128 over a 64-token prefill: m ~ Binomial(64, 1/16), mode 4
        // (C(64,4)·(1/16)⁴·(15/16)⁶⁰ = 0.20176).
        let g = expert_groups(128, 8, 64);
        let at4 = g.iter().find(|x| x.tokens == 4).unwrap().experts;
        assert!((at4 / 128.0 - 0.20176).abs() < 1e-5, "{at4}");
        let mode = g
            .iter()
            .max_by(|a, b| a.experts.total_cmp(&b.experts))
            .unwrap();
        assert_eq!(mode.tokens, 4);
    }

    #[test]
    fn degenerate_layers() {
        assert!(expert_groups(0, 0, 10).is_empty());
        assert!(expert_groups(128, 8, 0).is_empty());
        assert_eq!(touched_fraction(128, 8, 0), 0.0);
        // Every expert used by every token.
        assert_eq!(
            expert_groups(4, 4, 9),
            vec![ExpertGroup {
                tokens: 9,
                experts: 4.0
            }]
        );
        assert_eq!(touched_fraction(4, 4, 9), 1.0);
        // Decode touches n_used / n_expert.
        assert!((touched_fraction(128, 8, 1) - 8.0 / 128.0).abs() < 1e-15);
    }
}
