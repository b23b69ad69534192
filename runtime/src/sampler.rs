//! Token sampling with llama.cpp's default chain and defaults: repetition penalties over the last
//! `repeat_last_n` tokens, then top-k, top-p, min-p, temperature, and a seeded random draw.
//! `temperature <= 0` picks the most likely token (after penalties).
//!
//! top-p and min-p see the distribution at temperature 1, because temperature comes last in the chain
//! (as in llama.cpp's default sampler order).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. [`Default`] gives llama.cpp's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerParams {
    /// Temperature; `<= 0` means greedy. Default 0.8.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables. Default 40.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 disables.
    /// Default 0.95.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables. Default 0.05.
    pub min_p: f32,
    /// Repetition penalty: a recent token's positive logit is divided by it, a negative one multiplied;
    /// 1 disables. Default 1.0.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalties look at; 0 disables them, `usize::MAX` means the
    /// whole history. Default 64.
    pub repeat_last_n: usize,
    /// Subtracted once per occurrence of a recent token; 0 disables. Default 0.
    pub frequency_penalty: f32,
    /// Subtracted once from every recent token; 0 disables. Default 0.
    pub presence_penalty: f32,
    /// Random seed; `None` picks one from the clock (see [`Sampler::seed`]).
    pub seed: Option<u64>,
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplerParams {
    /// Greedy decoding (argmax after penalties).
    pub fn greedy() -> SamplerParams {
        SamplerParams {
            temperature: 0.0,
            ..SamplerParams::default()
        }
    }
}

/// A sampler: the settings plus its random state. Deterministic for a given seed, settings, and
/// sequence of calls.
pub struct Sampler {
    params: SamplerParams,
    seed: u64,
    rng: StdRng,
    cand: Vec<(u32, f32)>,
    counts: Vec<(u32, u32)>,
}

impl Sampler {
    /// A sampler with these settings.
    pub fn new(params: SamplerParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
        });
        Sampler {
            params,
            seed,
            rng: StdRng::seed_from_u64(seed),
            cand: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// The seed in use (the given one, or the one picked from the clock).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The settings.
    pub fn params(&self) -> &SamplerParams {
        &self.params
    }

    /// Picks the next token from `logits` (one per vocabulary entry). `history` is the sequence so far
    /// (prompt and generated tokens, oldest first); the penalties use its last `repeat_last_n` entries.
    /// NaN logits count as impossible. Panics if `logits` is empty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "Sampler::sample: empty logits");
        let p = &self.params;
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, if l.is_nan() { f32::NEG_INFINITY } else { l })),
        );

        // Penalties, over the distinct tokens of the recent window.
        let penalize = p.repeat_last_n > 0
            && (p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0);
        if penalize {
            let window = &history[history.len().saturating_sub(p.repeat_last_n)..];
            self.counts.clear();
            self.counts.extend(
                window
                    .iter()
                    .filter(|&&t| (t as usize) < logits.len())
                    .map(|&t| (t, 1)),
            );
            self.counts.sort_unstable();
            self.counts.dedup_by(|b, a| {
                if a.0 == b.0 {
                    a.1 += 1;
                    true
                } else {
                    false
                }
            });
            for &(t, n) in &self.counts {
                let l = &mut self.cand[t as usize].1;
                if *l <= 0.0 {
                    *l *= p.repeat_penalty;
                } else {
                    *l /= p.repeat_penalty;
                }
                *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }

        if p.temperature <= 0.0 {
            return argmax(&self.cand);
        }

        // top-k, leaving the candidates sorted by logit, best first (ties: lower id first).
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            self.cand.truncate(p.top_k);
        }
        self.cand.sort_unstable_by(by_logit);

        // top-p at temperature 1: the shortest prefix whose probability mass reaches top_p.
        if p.top_p < 1.0 {
            let max = self.cand[0].1;
            let total: f64 = self.cand.iter().map(|c| f64::from(c.1 - max).exp()).sum();
            let mut cum = 0.0;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += f64::from(c.1 - max).exp() / total;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }

        // min-p: p(token) >= min_p * p(best)  <=>  logit >= best + ln(min_p).
        if p.min_p > 0.0 {
            let threshold = self.cand[0].1 + p.min_p.ln();
            let keep = self.cand.iter().take_while(|c| c.1 >= threshold).count();
            self.cand.truncate(keep.max(1));
        }

        // Temperature, softmax, draw.
        let max = self.cand[0].1;
        if max == f32::NEG_INFINITY {
            return self.cand[0].0; // every token impossible: nothing better to do than the first
        }
        let inv_t = 1.0 / f64::from(p.temperature);
        let weights: Vec<f64> = self
            .cand
            .iter()
            .map(|c| (f64::from(c.1 - max) * inv_t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.gen::<f64>() * total;
        for (c, w) in self.cand.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        // Rounding left r just above the last weight.
        self.cand[self.cand.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties).
fn argmax(cand: &[(u32, f32)]) -> u32 {
    let mut best = 0;
    for (i, c) in cand.iter().enumerate() {
        if c.1 > cand[best].1 {
            best = i;
        }
    }
    cand[best].0
}
