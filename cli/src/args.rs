//! Value parsers of the numeric arguments: each checks its argument once, where it enters, and
//! says the accepted range in its error (clap puts the flag's name in front). Limits that depend on
//! the model (the context against the training context, the KV cache against memory) are checked
//! in [`crate::cmd::common`] once the model's header is read.

use pshard_model::catalogue::MAX_HPARAM;

/// Largest context accepted before the model is known (then it is checked against the model's
/// training context): GGUF stores context lengths in 32 bits.
pub const MAX_CTX: usize = MAX_HPARAM as usize;

/// Largest VRAM budget in MiB (1 EiB): keeps the byte count (`MiB << 20`) inside 64 bits.
pub const MAX_VRAM_MIB: u64 = 1 << 40;

/// A token count that may be unlimited (`-n -1`, as llama.cpp spells "until end of generation or
/// a full context").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenLimit {
    /// No limit but the context.
    Unlimited,
    /// At most this many.
    Tokens(usize),
}

impl TokenLimit {
    /// The limit as a count (`usize::MAX` when unlimited).
    pub fn get(self) -> usize {
        match self {
            TokenLimit::Unlimited => usize::MAX,
            TokenLimit::Tokens(n) => n,
        }
    }
}

/// `-n`: -1 (until end of generation or a full context) or a token count.
pub fn token_limit(s: &str) -> Result<TokenLimit, String> {
    match s.parse::<i64>() {
        Ok(-1) => Ok(TokenLimit::Unlimited),
        Ok(n) if n >= 0 => usize::try_from(n)
            .map(TokenLimit::Tokens)
            .map_err(|_| "too large".to_string()),
        _ => Err(
            "expected -1 (until end of generation or a full context) or a token count ≥ 0".into(),
        ),
    }
}

/// Prompt tokens a context shift keeps: `None` is the whole prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep(pub Option<usize>);

/// `--keep`: -1 (the whole prompt) or a token count.
pub fn keep_count(s: &str) -> Result<Keep, String> {
    match s.parse::<i64>() {
        Ok(-1) => Ok(Keep(None)),
        Ok(n) if n >= 0 => usize::try_from(n)
            .map(|n| Keep(Some(n)))
            .map_err(|_| "too large".to_string()),
        _ => Err("expected -1 (the whole prompt) or a token count ≥ 0".into()),
    }
}

/// A random seed as given: `None` asks for a random one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed(pub Option<u64>);

/// `-s`: -1 (a random seed, as llama.cpp spells it) or a seed 0..=2^64−1.
pub fn seed(s: &str) -> Result<Seed, String> {
    if s == "-1" {
        return Ok(Seed(None));
    }
    s.parse::<u64>()
        .map(|v| Seed(Some(v)))
        .map_err(|_| format!("expected -1 (random) or a seed from 0 to {}", u64::MAX))
}

/// A context size: 0 (the command's default) up to [`MAX_CTX`].
pub fn ctx_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n <= MAX_CTX => Ok(n),
        _ => Err(format!("expected a token count from 0 to {MAX_CTX}")),
    }
}

/// A count that must be at least 1 (tokens per step, repetitions, sequences), up to [`MAX_CTX`].
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_CTX).contains(&n) => Ok(n),
        _ => Err(format!("expected a count from 1 to {MAX_CTX}")),
    }
}

/// Most timed repetitions of a benchmark: llama-bench's default is 5; a thousand measure nothing
/// more, and a count from a typo (2^31) would run for weeks.
pub const MAX_REPETITIONS: usize = 1000;

/// `bench -r`: 1 to [`MAX_REPETITIONS`].
pub fn repetitions(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_REPETITIONS).contains(&n) => Ok(n),
        _ => Err(format!("expected a count from 1 to {MAX_REPETITIONS}")),
    }
}

/// Any finite number (`--temp`: at or below 0 means greedy).
pub fn finite(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err("expected a finite number".into()),
    }
}

/// A number from 0 to 1 (`--top-p`, `--min-p`).
pub fn unit(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("expected a number from 0 to 1".into()),
    }
}

/// A finite number above 0 (`--repeat-penalty`: logits are divided by it).
pub fn positive(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("expected a finite number above 0".into()),
    }
}

/// A VRAM budget in MiB: 0 to [`MAX_VRAM_MIB`].
pub fn vram_mib(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(v) if v <= MAX_VRAM_MIB => Ok(v),
        _ => Err(format!("expected MiB from 0 to {MAX_VRAM_MIB}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_enforced() {
        assert_eq!(token_limit("-1"), Ok(TokenLimit::Unlimited));
        assert_eq!(token_limit("7"), Ok(TokenLimit::Tokens(7)));
        assert!(token_limit("-2").is_err());
        assert_eq!(keep_count("-1"), Ok(Keep(None)));
        assert_eq!(keep_count("4"), Ok(Keep(Some(4))));
        assert!(keep_count("-3").is_err() && keep_count("x").is_err());
        assert_eq!(seed("-1"), Ok(Seed(None)));
        assert_eq!(seed("42"), Ok(Seed(Some(42))));
        assert!(seed("-2").is_err());
        for bad in ["nan", "inf", "-inf", "x"] {
            assert!(finite(bad).is_err(), "{bad}");
        }
        assert!(unit("2").is_err() && unit("-1").is_err() && unit("nan").is_err());
        assert_eq!(unit("1"), Ok(1.0));
        assert!(positive("0").is_err() && positive("nan").is_err());
        assert!(at_least_one("0").is_err());
        assert!(ctx_size(&(MAX_CTX as u64 + 1).to_string()).is_err());
        assert!(vram_mib(&u64::MAX.to_string()).is_err());
    }
}
