//! Sampler behaviour: greedy, top-k/top-p/min-p sets, repetition penalty, seeded reproducibility and
//! the drawn distribution. Random logits use a fresh seed each run (printed); set PSHARD_SEED to replay.

use pshard_runtime::sampler::{Sampler, SamplerParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn test_seed() -> u64 {
    let seed = std::env::var("PSHARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("PSHARD_SEED={seed}");
    seed
}

fn random_logits(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-8.0f32..8.0)).collect()
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for i in 0..l.len() {
        if l[i] > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Probabilities of logits at temperature 1.
fn probs(l: &[f32]) -> Vec<f64> {
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = l.iter().map(|&x| f64::from(x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

#[test]
fn defaults_are_llama_cpp_defaults() {
    let p = SamplerParams::default();
    assert_eq!(
        (p.temperature, p.top_k, p.top_p, p.min_p),
        (0.8, 40, 0.95, 0.05)
    );
    assert_eq!((p.repeat_penalty, p.repeat_last_n, p.seed), (1.0, 64, None));
}

#[test]
fn greedy_and_top_k_1_pick_the_argmax() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let mut greedy = Sampler::new(SamplerParams::greedy());
    let mut k1 = Sampler::new(SamplerParams {
        top_k: 1,
        seed: Some(rng.gen()),
        ..SamplerParams::default()
    });
    for _ in 0..200 {
        let n = rng.gen_range(1..3000);
        let logits = random_logits(&mut rng, n);
        let want = argmax(&logits);
        assert_eq!(greedy.sample(&logits, &[]), want);
        assert_eq!(k1.sample(&logits, &[]), want);
    }
    // Negative temperature is greedy too; NaN never wins.
    let mut neg = Sampler::new(SamplerParams {
        temperature: -1.0,
        ..SamplerParams::default()
    });
    assert_eq!(neg.sample(&[0.5, f32::NAN, 2.0, 1.0], &[]), 2);
}

#[test]
fn a_seed_reproduces_the_sequence() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let logits: Vec<Vec<f32>> = (0..300)
        .map(|_| {
            random_logits(&mut rng, 64)
                .iter()
                .map(|x| x / 8.0)
                .collect()
        })
        .collect();
    let params = SamplerParams {
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        temperature: 1.0,
        ..SamplerParams::default()
    };
    let run = |seed: u64| {
        let mut s = Sampler::new(SamplerParams {
            seed: Some(seed),
            ..params.clone()
        });
        assert_eq!(s.seed(), seed);
        logits
            .iter()
            .map(|l| s.sample(l, &[]))
            .collect::<Vec<u32>>()
    };
    let seed = rng.gen();
    assert_eq!(run(seed), run(seed));
    // Near-uniform choices over 64 tokens, 300 times: another seed gives another sequence.
    assert_ne!(run(seed), run(seed.wrapping_add(1)));
}

#[test]
fn top_p_and_min_p_stay_inside_their_sets() {
    // Probabilities 0.5, 0.3, 0.12, 0.05, 0.03.
    let p = [0.5f32, 0.3, 0.12, 0.05, 0.03];
    let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
    let seed = test_seed();
    let cases = [
        // top_p 0.75: 0.5 < 0.75 <= 0.8 → tokens {0, 1}.
        (
            SamplerParams {
                top_k: 0,
                top_p: 0.75,
                min_p: 0.0,
                temperature: 1.0,
                ..SamplerParams::default()
            },
            2,
        ),
        // top_p 0.9: 0.8 < 0.9 <= 0.92 → {0, 1, 2}.
        (
            SamplerParams {
                top_k: 0,
                top_p: 0.9,
                min_p: 0.0,
                temperature: 1.0,
                ..SamplerParams::default()
            },
            3,
        ),
        // min_p 0.2: p >= 0.1 → {0, 1, 2}.
        (
            SamplerParams {
                top_k: 0,
                top_p: 1.0,
                min_p: 0.2,
                temperature: 1.0,
                ..SamplerParams::default()
            },
            3,
        ),
        // min_p 0.5: p >= 0.25 → {0, 1}; a high temperature must not widen the set.
        (
            SamplerParams {
                top_k: 0,
                top_p: 1.0,
                min_p: 0.5,
                temperature: 5.0,
                ..SamplerParams::default()
            },
            2,
        ),
        // top_k 4 then top_p 0.99 over the renormalised four (0.5/0.97, ...): {0, 1, 2, 3}.
        (
            SamplerParams {
                top_k: 4,
                top_p: 0.99,
                min_p: 0.0,
                temperature: 1.0,
                ..SamplerParams::default()
            },
            4,
        ),
    ];
    for (params, allowed) in cases {
        let mut s = Sampler::new(SamplerParams {
            seed: Some(seed),
            ..params.clone()
        });
        let mut seen = [0usize; 5];
        for _ in 0..4000 {
            seen[s.sample(&logits, &[]) as usize] += 1;
        }
        assert!(
            seen[allowed..].iter().all(|&c| c == 0),
            "{params:?}: {seen:?}"
        );
        assert!(
            seen[..allowed].iter().all(|&c| c > 0),
            "{params:?}: {seen:?}"
        );
    }
}

#[test]
fn draws_follow_the_distribution() {
    let seed = test_seed();
    let target = [0.1f64, 0.2, 0.7];
    let logits: Vec<f32> = target.iter().map(|x| x.ln() as f32).collect();
    let params = SamplerParams {
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        temperature: 1.0,
        seed: Some(seed),
        ..SamplerParams::default()
    };
    let mut s = Sampler::new(params.clone());
    let n = 40_000;
    let mut seen = [0usize; 3];
    for _ in 0..n {
        seen[s.sample(&logits, &[]) as usize] += 1;
    }
    for i in 0..3 {
        // 5 standard deviations of a binomial proportion.
        let tol = 5.0 * (target[i] * (1.0 - target[i]) / n as f64).sqrt();
        let got = seen[i] as f64 / n as f64;
        assert!(
            (got - target[i]).abs() < tol,
            "token {i}: {got} vs {}",
            target[i]
        );
    }
    // Temperature 0.5 squares the odds: p ∝ p_i^2.
    let mut s = Sampler::new(SamplerParams {
        temperature: 0.5,
        ..params
    });
    let sq: Vec<f64> = target.iter().map(|x| x * x).collect();
    let z: f64 = sq.iter().sum();
    let mut seen = [0usize; 3];
    for _ in 0..n {
        seen[s.sample(&logits, &[]) as usize] += 1;
    }
    for i in 0..3 {
        let want = sq[i] / z;
        let tol = 5.0 * (want * (1.0 - want) / n as f64).sqrt();
        let got = seen[i] as f64 / n as f64;
        assert!((got - want).abs() < tol, "T=0.5 token {i}: {got} vs {want}");
    }
}

#[test]
fn repetition_penalty_lowers_recent_tokens() {
    let pen = SamplerParams {
        repeat_penalty: 1.5,
        repeat_last_n: 3,
        ..SamplerParams::greedy()
    };
    let mut s = Sampler::new(pen.clone());
    // Positive logits are divided: 2.0 / 1.5 < 1.9.
    assert_eq!(s.sample(&[2.0, 1.9], &[]), 0);
    assert_eq!(s.sample(&[2.0, 1.9], &[0]), 1);
    // Negative logits are multiplied: -1.0 * 1.5 < -1.2.
    assert_eq!(s.sample(&[-1.0, -1.2], &[0]), 1);
    // Only the last repeat_last_n tokens count; out-of-range ids are ignored.
    assert_eq!(s.sample(&[2.0, 1.9], &[0, 7, 7, 99]), 0);
    // repeat_last_n = 0 disables.
    let mut off = Sampler::new(SamplerParams {
        repeat_last_n: 0,
        ..pen
    });
    assert_eq!(off.sample(&[2.0, 1.9], &[0]), 0);

    // Statistically: a penalised token is drawn less often.
    let seed = test_seed();
    let logits = [1.0f32, 1.0, 1.0, 1.0];
    let freq = |penalty: f32| {
        let mut s = Sampler::new(SamplerParams {
            repeat_penalty: penalty,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.0,
            seed: Some(seed),
            ..SamplerParams::default()
        });
        (0..8000)
            .filter(|_| s.sample(&logits, &[2, 2, 3]) == 2)
            .count() as f64
            / 8000.0
    };
    let (plain, penalised) = (freq(1.0), freq(2.0));
    let want = probs(&[1.0, 1.0, 0.5, 0.5])[2];
    assert!((plain - 0.25).abs() < 0.03, "{plain}");
    assert!((penalised - want).abs() < 0.03, "{penalised} vs {want}");

    // Frequency and presence penalties subtract per occurrence / once.
    let mut f = Sampler::new(SamplerParams {
        frequency_penalty: 0.3,
        presence_penalty: 0.0,
        ..SamplerParams::greedy()
    });
    assert_eq!(f.sample(&[2.0, 1.5], &[0]), 0);
    assert_eq!(f.sample(&[2.0, 1.5], &[0, 0]), 1);
    let mut pr = Sampler::new(SamplerParams {
        presence_penalty: 0.6,
        ..SamplerParams::greedy()
    });
    assert_eq!(pr.sample(&[2.0, 1.5], &[0]), 1);
}
