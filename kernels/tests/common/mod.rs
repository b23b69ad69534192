//! Helpers shared by the kernel tests.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generator with a fresh seed per run (printed), or `PSHARD_SEED=<n>` to replay a run.
pub fn rng(test: &str) -> StdRng {
    let seed = match std::env::var("PSHARD_SEED") {
        Ok(s) => s.parse().expect("PSHARD_SEED must be an unsigned integer"),
        Err(_) => rand::random::<u64>(),
    };
    println!("{test}: seed {seed} (replay with PSHARD_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// A standard normal sample (Box-Muller).
pub fn gaussian(r: &mut StdRng) -> f32 {
    let u1: f64 = r.gen_range(1e-12..1.0);
    let u2: f64 = r.gen_range(0.0..1.0);
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
