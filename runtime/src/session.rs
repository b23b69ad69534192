//! Generation and perplexity on top of the [`Engine`].

use std::time::Instant;

use crate::engine::{Engine, EngineError, Logits};

/// Why a generation ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    /// `n_predict` tokens were generated.
    #[default]
    Limit,
    /// An end-of-generation token was sampled.
    Eog,
    /// The context is full: the last token was sampled into its last position.
    ContextFull,
    /// The token consumer asked to stop.
    Consumer,
}

/// Timings of a generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenStats {
    /// Prompt tokens evaluated.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt.
    pub prompt_secs: f64,
    /// Tokens generated (sampled and evaluated).
    pub gen_tokens: usize,
    /// Seconds spent generating.
    pub gen_secs: f64,
    /// Why generation ended.
    pub stop: StopReason,
    /// Context shifts made (see [`generate`]'s `shift_keep`).
    pub shifts: usize,
}

/// Generates up to `n_predict` tokens after `prompt` (`usize::MAX`: until an end-of-generation token
/// or a full context). `sample(logits, history)` picks the next token; `on_token` receives each one
/// and returns `false` to stop; generation also stops after a token for which `is_eog` is true, and
/// when the context is full. [`GenStats::stop`] says which. Logits without a finite value (a model
/// whose weights hold NaN or infinity) are an error, never sampled from.
///
/// With `shift_keep = Some(keep)` a full context does not stop generation: as llama.cpp's
/// `--context-shift`, the first `keep` positions stay and the older half of the rest is
/// discarded ([`Engine::shift_seq`]); generation stops at a full context only when nothing is
/// left to discard.
pub fn generate(
    engine: &mut Engine,
    prompt: &[u32],
    n_predict: usize,
    shift_keep: Option<usize>,
    sample: &mut dyn FnMut(&[f32], &[u32]) -> u32,
    is_eog: &dyn Fn(u32) -> bool,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenStats, GenError> {
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut logits = engine.eval(prompt, Logits::Last)?;
    stats.prompt_secs = t0.elapsed().as_secs_f64();
    let mut history = prompt.to_vec();
    let t1 = Instant::now();
    stats.stop = StopReason::Limit;
    for _ in 0..n_predict {
        if !logits.iter().any(|v| v.is_finite()) {
            return Err(GenError::NonFinite {
                position: engine.n_past(),
            });
        }
        let tok = sample(&logits, &history);
        history.push(tok);
        stats.gen_tokens += 1;
        if !on_token(tok) {
            stats.stop = StopReason::Consumer;
            break;
        }
        if is_eog(tok) {
            stats.stop = StopReason::Eog;
            break;
        }
        if engine.n_past() >= engine.n_ctx() {
            let keep = shift_keep.map(|k| k.min(engine.n_past()));
            let discard = keep.map_or(0, |k| shift_discard(engine.n_past(), k));
            match keep {
                Some(k) if discard > 0 => {
                    engine.shift_seq(0, k, discard)?;
                    stats.shifts += 1;
                }
                _ => {
                    stats.stop = StopReason::ContextFull;
                    break;
                }
            }
        }
        logits = engine.eval(&[tok], Logits::Last)?;
    }
    stats.gen_secs = t1.elapsed().as_secs_f64();
    Ok(stats)
}

/// llama.cpp's `--context-shift` with its `--keep`: what a sequence whose context is full keeps
/// when it goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextShift {
    /// Prompt tokens kept at every shift (`None`: the whole prompt); as in llama.cpp, a BOS
    /// token the tokenizer put first is kept besides.
    pub keep: Option<usize>,
}

impl ContextShift {
    /// Positions a shift keeps for a sequence that started with `prompt` (`bos`: the
    /// tokenizer's BOS id, if it has one).
    pub fn keep_for(&self, prompt: &[u32], bos: Option<u32>) -> usize {
        let b = usize::from(bos.is_some() && prompt.first() == bos.as_ref());
        self.keep
            .map_or(prompt.len(), |k| (k + b).min(prompt.len()))
    }
}

/// Positions a context shift of a full sequence of `len` positions discards when it keeps the
/// first `keep`: the older half of the rest.
pub fn shift_discard(len: usize, keep: usize) -> usize {
    len.saturating_sub(keep) / 2
}

/// A prompt too long for a context of `n_ctx` cut to fit as a context shift would have left it:
/// its first `keep` tokens and its last `(n_ctx − keep) / 2` (half the rest of the context stays
/// free for the reply). `None` when `keep` leaves no room (`keep + 2 > n_ctx`); a prompt that fits
/// comes back whole.
pub fn truncate_prompt(prompt: &[u32], n_ctx: usize, keep: usize) -> Option<Vec<u32>> {
    if prompt.len() < n_ctx {
        return Some(prompt.to_vec());
    }
    if keep + 2 > n_ctx {
        return None;
    }
    let tail = (n_ctx - keep) / 2;
    let mut p = prompt[..keep].to_vec();
    p.extend_from_slice(&prompt[prompt.len() - tail..]);
    Some(p)
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// The model's logits held no finite value.
    #[error("the model produced no finite logits at position {position} (its weights hold NaN or infinity)")]
    NonFinite {
        /// Position whose logits were bad.
        position: usize,
    },
    /// Evaluation failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The smallest context perplexity can score: each chunk scores its last `n_ctx − 1 − n_ctx/2`
/// predictions, which is none below 3.
pub const PERPLEXITY_MIN_CTX: usize = 3;

/// Result of a perplexity run.
#[derive(Clone, Debug)]
pub struct Perplexity {
    /// Final perplexity.
    pub ppl: f64,
    /// Its standard error (as llama-perplexity estimates it).
    pub err: f64,
    /// Running perplexity after each chunk.
    pub per_chunk: Vec<f64>,
    /// Predictions scored.
    pub count: usize,
}

/// Why perplexity could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    /// A context too small to score anything.
    #[error(
        "a context of {n_ctx} scores no token (perplexity needs at least {PERPLEXITY_MIN_CTX})"
    )]
    ContextTooSmall {
        /// Context size.
        n_ctx: usize,
    },
    /// The model's logits were not finite.
    #[error(
        "the model produced non-finite logits in chunk {chunk} (its weights hold NaN or infinity)"
    )]
    NonFinite {
        /// 1-based chunk.
        chunk: usize,
    },
    /// Too little text.
    #[error("need at least {need} tokens (2 × context {n_ctx}) but the text has {have}")]
    TooShort {
        /// Tokens needed.
        need: usize,
        /// Context size.
        n_ctx: usize,
        /// Tokens present.
        have: usize,
    },
    /// Evaluation failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Perplexity over `tokens` in chunks of `n_ctx`, as llama-perplexity computes it: each chunk is
/// evaluated from an empty context (its first token replaced by `bos` when given) and the last
/// `n_ctx − 1 − n_ctx/2` predictions of each chunk are scored. `on_chunk(i, running_ppl)` reports
/// progress.
pub fn perplexity(
    engine: &mut Engine,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<Perplexity, PerplexityError> {
    if n_ctx < PERPLEXITY_MIN_CTX {
        return Err(PerplexityError::ContextTooSmall { n_ctx });
    }
    if tokens.len() / 2 < n_ctx {
        return Err(PerplexityError::TooShort {
            need: n_ctx.saturating_mul(2),
            n_ctx,
            have: tokens.len(),
        });
    }
    let n_vocab = engine.model.spec.hparams.n_vocab;
    let n_chunks = tokens.len() / n_ctx;
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut per_chunk = Vec::with_capacity(n_chunks);
    for c in 0..n_chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        engine.reset();
        let logits = engine.eval(&chunk, Logits::All)?;
        for j in first..n_ctx - 1 {
            let row = &logits[j * n_vocab..][..n_vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let target = tokens[c * n_ctx + j + 1] as usize;
            let v = -(row[target] as f64 - max - sum.ln());
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        if !nll.is_finite() {
            return Err(PerplexityError::NonFinite { chunk: c + 1 });
        }
        let ppl = (nll / count as f64).exp();
        per_chunk.push(ppl);
        on_chunk(c, ppl);
    }
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let err = if count > 1 {
        ppl * (var / (count - 1) as f64).sqrt()
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        err,
        per_chunk,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_counts_a_leading_bos_besides() {
        let p = [1, 7, 8, 9];
        let s = ContextShift { keep: Some(2) };
        assert_eq!(s.keep_for(&p, Some(1)), 3);
        assert_eq!(s.keep_for(&p, Some(5)), 2);
        assert_eq!(s.keep_for(&p, None), 2);
        assert_eq!(ContextShift { keep: None }.keep_for(&p, Some(1)), 4);
        assert_eq!(ContextShift { keep: Some(10) }.keep_for(&p, Some(1)), 4);
    }

    #[test]
    fn a_truncated_prompt_keeps_its_head_and_tail_and_half_the_context_free() {
        let p: Vec<u32> = (0..50).collect();
        let t = truncate_prompt(&p, 32, 4).unwrap();
        // 4 kept, then the last (32 − 4) / 2 = 14.
        assert_eq!(t.len(), 18);
        assert_eq!(&t[..4], &[0, 1, 2, 3]);
        assert_eq!(&t[4..], &p[36..]);
        assert_eq!(truncate_prompt(&p[..31], 32, 4).unwrap(), p[..31].to_vec());
        assert_eq!(truncate_prompt(&p, 32, 31), None);
        assert_eq!(truncate_prompt(&p, 32, 30).unwrap().len(), 31);
        assert_eq!(shift_discard(32, 4), 14);
        assert_eq!(shift_discard(3, 4), 0);
    }
}
