//! K-quant kernels on the real gemma-3-270m Q4_K_M model: every K-quant tensor (Q4_K and Q6_K:
//! the attention output and FFN down projections; the 640-column tensors use 32-blocks) dequantizes
//! to finite, centred values of plausible scale with similar row norms, and every dot variant
//! agrees with an f64 reference on real weight rows (tolerance as in `kquants_kernels.rs`).
//!
//! Looks for the model in `$PSHARD_MODELS` or `~/.cache/pshard/models`; skips visibly if it is
//! absent (a failure in CI, which fetches it). Activations are random (seed printed; `PSHARD_SEED=<n>` replays).

use std::path::PathBuf;

use pshard_kernels::quant::kquants::{self, QK_K};
use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::ModelFile;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MODEL: &str = "gemma-3-270m-q4_k_m.gguf";

fn model_path() -> Option<PathBuf> {
    pshard_testkit::real_model(MODEL)
}

fn is_kquant(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
    )
}

#[test]
fn gemma3_kquant_tensors_decode_sensibly() {
    let Some(path) = model_path() else {
        return;
    };
    let seed = match std::env::var("PSHARD_SEED") {
        Ok(s) => s.parse().expect("PSHARD_SEED must be an unsigned integer"),
        Err(_) => rand::random::<u64>(),
    };
    println!("seed {seed} (replay with PSHARD_SEED={seed})");
    let mut r = StdRng::seed_from_u64(seed);
    let model = ModelFile::open(&path).expect("open gemma model");
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for (i, t) in model.tensors().iter().enumerate() {
        if !is_kquant(t.ty) {
            continue;
        }
        *seen.entry(t.ty.name()).or_default() += 1;
        let cols = t.dims[0] as usize;
        assert_eq!(cols % QK_K, 0, "{}: row length {cols}", t.name);
        let rows: usize = t.dims[1..].iter().map(|&d| d as usize).product();
        let row_bytes = cols / QK_K * t.ty.type_size() as usize;
        let data = model.tensor_data(i);
        assert_eq!(data.len(), rows * row_bytes, "{}: data size", t.name);
        let scalar = kquants::scalar_kernel(t.ty);
        let variants = kquants::kernel_variants(t.ty);

        let mut y = vec![0f32; cols];
        let (mut sum, mut sumsq, mut count) = (0f64, 0f64, 0usize);
        let mut row_rms = Vec::with_capacity(rows);
        let mut act = vec![0u8; cols / QK_K * 292];
        let mut actd = vec![0f32; cols];
        for (ri, row) in data.chunks_exact(row_bytes).enumerate() {
            (scalar.dequantize_row)(row, &mut y);
            let mut rs = 0f64;
            for &v in &y {
                assert!(v.is_finite(), "{}: row {ri}: non-finite value {v}", t.name);
                sum += v as f64;
                rs += (v as f64) * (v as f64);
            }
            sumsq += rs;
            count += cols;
            row_rms.push((rs / cols as f64).sqrt());
            // Real weight rows through every dot variant (a sample of rows).
            if ri % 97 == 0 {
                let x: Vec<f32> = (0..cols).map(|_| r.gen_range(-1.0f32..1.0)).collect();
                kquants::quantize_row_q8k(&x, &mut act);
                kquants::dequantize_row_q8k(&act, &mut actd);
                let want: f64 = y
                    .iter()
                    .zip(&actd)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                let abs: f64 = y
                    .iter()
                    .zip(&actd)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                // Q4_K: the kernels subtract the min sum from the scale sum; rounding is
                // relative to both parts (dequantized with dmin, then d, zeroed).
                let mut split = abs;
                if t.ty == GgmlType::Q4_K {
                    let part = |off: usize| {
                        let mut b = row.to_vec();
                        for blk in b.chunks_exact_mut(144) {
                            blk[off..off + 2].fill(0);
                        }
                        let mut p = vec![0f32; cols];
                        (scalar.dequantize_row)(&b, &mut p);
                        p
                    };
                    let (sp, mp) = (part(2), part(0));
                    split = sp
                        .iter()
                        .zip(&mp)
                        .zip(&actd)
                        .map(|((&s, &m), &a)| (s.abs() as f64 + m.abs() as f64) * a.abs() as f64)
                        .sum();
                }
                let bound = 1e-5 * abs + 1e-6 * split + 1e-30;
                for k in &variants {
                    let got = (k.dot)(row, &act, cols) as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{} row {ri} {}: dot {got} vs f64 {want}",
                        t.name,
                        k.dot_variant
                    );
                }
            }
        }
        let mean = sum / count as f64;
        let std = (sumsq / count as f64 - mean * mean).sqrt();
        row_rms.sort_by(|a, b| a.total_cmp(b));
        let median_rms = row_rms[row_rms.len() / 2];
        println!(
            "{:<28} {:<5} {:>6}x{:<6} mean {mean:+.5} std {std:.5} median row rms {median_rms:.5}",
            t.name,
            t.ty.name(),
            cols,
            rows,
        );
        // Trained weights: centred (a wrong min/offset term shows as a bias of the order of the
        // spread) and of moderate scale.
        assert!(
            mean.abs() < 0.1 * std,
            "{}: mean {mean} vs std {std}",
            t.name
        );
        assert!((1e-3..1.0).contains(&std), "{}: std {std}", t.name);
        // Rows of one trained matrix carry signal of similar size.
        let lo = row_rms[row_rms.len() / 100];
        let hi = row_rms[row_rms.len() - 1 - row_rms.len() / 100];
        assert!(
            lo > 0.05 * median_rms && hi < 20.0 * median_rms,
            "{}: row rms 1% {lo} median {median_rms} 99% {hi}",
            t.name
        );
    }
    println!("K-quant tensors: {seen:?}");
    assert!(
        seen.contains_key("Q4_K"),
        "the Q4_K_M model has Q4_K tensors"
    );
    assert!(
        seen.contains_key("Q6_K"),
        "the Q4_K_M model has Q6_K tensors"
    );
}
