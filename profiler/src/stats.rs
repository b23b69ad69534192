//! Repetition control and statistics of timed samples: warm-ups, repetitions until the coefficient
//! of variation settles or a time cap is hit, the median with a distribution-free 95% interval
//! (binomial order statistics, via statrs) and the noisy flag.

use std::time::{Duration, Instant};

use pshard_planner::profile::Stats;
use statrs::distribution::{Binomial, DiscreteCDF};

/// How long and how often to repeat one measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeasureCfg {
    /// Untimed calls before timing starts (at least this many, and at least `warmup_time`).
    pub warmups: u32,
    /// Minimum wall time spent warming up.
    pub warmup_time: Duration,
    /// Timed repetitions always taken (when the time cap allows at least one).
    pub min_reps: u32,
    /// Repetitions never exceeded.
    pub max_reps: u32,
    /// Stop once the coefficient of variation is below this (after `min_reps`).
    pub cv_target: f64,
    /// Stop timing once this much wall time was spent on repetitions.
    pub time_cap: Duration,
}

impl MeasureCfg {
    /// Settings of the full run.
    pub fn full() -> MeasureCfg {
        MeasureCfg {
            warmups: 1,
            warmup_time: Duration::from_millis(20),
            min_reps: 5,
            max_reps: 200,
            cv_target: 0.05,
            time_cap: Duration::from_millis(400),
        }
    }

    /// Settings of `--quick`.
    pub fn quick() -> MeasureCfg {
        MeasureCfg {
            warmups: 1,
            warmup_time: Duration::from_millis(5),
            min_reps: 3,
            max_reps: 50,
            cv_target: 0.08,
            time_cap: Duration::from_millis(60),
        }
    }
}

/// Times `f` repeatedly under `cfg` and summarises the samples. `f` returns the seconds of one call
/// when it times itself (GPU events), or `None` to be timed with the wall clock around it.
pub fn measure<F>(cfg: &MeasureCfg, mut f: F) -> Stats
where
    F: FnMut() -> Option<f64>,
{
    let timed = |f: &mut F| {
        let t0 = Instant::now();
        let own = f();
        own.unwrap_or_else(|| t0.elapsed().as_secs_f64())
    };
    let start = Instant::now();
    let mut n = 0;
    while n < cfg.warmups || start.elapsed() < cfg.warmup_time {
        let s = timed(&mut f);
        n += 1;
        // One call longer than the whole cap: a second warm-up would only waste time.
        if s > cfg.time_cap.as_secs_f64() {
            break;
        }
    }
    let start = Instant::now();
    let mut samples = Vec::new();
    let min_reps = cfg.min_reps.max(1) as usize;
    loop {
        samples.push(timed(&mut f).max(1e-12));
        let spent = start.elapsed();
        let enough =
            samples.len() >= min_reps && coefficient_of_variation(&samples) <= cfg.cv_target;
        // Long calls: a cap reached after one call still allows up to 3 samples (they are needed for
        // any spread estimate) as long as that stays within 3x the cap.
        let capped = spent >= cfg.time_cap
            && (samples.len() >= min_reps.min(3) || spent >= cfg.time_cap * 3);
        if enough || capped || samples.len() >= cfg.max_reps as usize {
            break;
        }
    }
    summarize(&samples, cfg.cv_target)
}

/// Median of a sample (mean of the two middle values for even lengths). Empty input gives NaN.
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Sample standard deviation over mean (0 for fewer than two samples).
pub fn coefficient_of_variation(samples: &[f64]) -> f64 {
    let n = samples.len();
    if n < 2 {
        return 0.0;
    }
    let mean = samples.iter().sum::<f64>() / n as f64;
    if mean <= 0.0 {
        return 0.0;
    }
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    var.sqrt() / mean
}

/// Distribution-free 95% interval of the median: the order statistics `x(j)`, `x(k)` whose ranks
/// are the 2.5% and 97.5% quantiles of Binomial(n, ½). Below 6 samples no such pair reaches 95%,
/// so the whole range is returned.
pub fn median_interval(samples: &[f64]) -> (f64, f64) {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => (f64::NAN, f64::NAN),
        1..=5 => (v[0], v[n - 1]),
        _ => {
            let b = Binomial::new(0.5, n as u64).expect("p = 0.5 is a valid probability");
            // Smallest j with P(X < j) ≥ ... : rank j (1-based) = inverse CDF of 2.5%, k symmetric.
            let j = (b.inverse_cdf(0.025) as usize).clamp(1, n);
            let k = (n + 1 - j).clamp(j, n);
            (v[j - 1], v[k - 1])
        }
    }
}

/// Summarises samples: median, 95% interval, CV, count; `noisy` when the CV stayed above
/// `cv_target`. The interval always contains the median.
pub fn summarize(samples: &[f64], cv_target: f64) -> Stats {
    let median_s = median(samples);
    let (lo, hi) = median_interval(samples);
    let cv = coefficient_of_variation(samples);
    Stats {
        median_s,
        lo_s: lo.min(median_s),
        hi_s: hi.max(median_s),
        cv,
        n: samples.len() as u32,
        noisy: cv > cv_target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn cv_known_sample() {
        // mean 5, sample sd of [2,4,4,4,5,5,7,9] = sqrt(32/7)
        let s = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        let want = (32.0f64 / 7.0).sqrt() / 5.0;
        assert!((coefficient_of_variation(&s) - want).abs() < 1e-12);
        assert_eq!(coefficient_of_variation(&[1.0]), 0.0);
        assert_eq!(coefficient_of_variation(&[2.0, 2.0, 2.0]), 0.0);
    }

    #[test]
    fn interval_ranks_match_tables() {
        // Published ranks for the 95% CI of the median: n = 10 → (2, 9); n = 20 → (6, 15);
        // n = 100 → (40, 61).
        for (n, j, k) in [(10usize, 2usize, 9usize), (20, 6, 15), (100, 40, 61)] {
            let s: Vec<f64> = (1..=n).map(|i| i as f64).collect();
            let (lo, hi) = median_interval(&s);
            assert_eq!((lo, hi), (j as f64, k as f64), "n = {n}");
        }
        assert_eq!(median_interval(&[5.0, 1.0, 3.0]), (1.0, 5.0));
    }

    #[test]
    fn summarize_flags_noise() {
        let calm = summarize(&[1.0, 1.01, 0.99, 1.0, 1.0, 1.02], 0.05);
        assert!(!calm.noisy && calm.lo_s <= calm.median_s && calm.median_s <= calm.hi_s);
        assert_eq!(calm.n, 6);
        let wild = summarize(&[1.0, 3.0, 0.5, 2.0, 1.0, 4.0], 0.05);
        assert!(wild.noisy);
    }

    #[test]
    fn measure_stops_on_stable_samples() {
        let cfg = MeasureCfg {
            warmups: 2,
            warmup_time: Duration::ZERO,
            min_reps: 5,
            max_reps: 1000,
            cv_target: 0.05,
            time_cap: Duration::from_secs(10),
        };
        let mut calls = 0;
        let s = measure(&cfg, || {
            calls += 1;
            Some(0.002)
        });
        // 2 warm-ups, then stable after exactly min_reps.
        assert_eq!((calls, s.n), (7, 5));
        assert_eq!(s.median_s, 0.002);
        assert!(!s.noisy);
    }

    #[test]
    fn measure_respects_cap_on_noisy_samples() {
        let cfg = MeasureCfg {
            warmups: 0,
            warmup_time: Duration::ZERO,
            min_reps: 3,
            max_reps: 40,
            cv_target: 0.01,
            time_cap: Duration::from_secs(10),
        };
        let mut i = 0u32;
        let s = measure(&cfg, || {
            i += 1;
            Some(if i.is_multiple_of(2) { 1e-3 } else { 3e-3 })
        });
        assert_eq!(s.n, 40);
        assert!(s.noisy);
    }
}
