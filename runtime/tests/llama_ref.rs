//! pshard's CPU engine against llama.cpp on the same files: for a tiny synthetic model of every
//! catalogued architecture, llama.cpp's logits at every position of a fixed prompt and of 32
//! greedy steps (committed fixtures made by scripts/llama-ref/make-logits-fixtures.sh; CI does
//! not build llama.cpp). The engine regenerates each model with `pshard synth` (its sha256 must
//! be the fixture's), evaluates the prompt, then feeds llama.cpp's greedy tokens one by one.
//! Checked: for f32 models (every architecture) every row's logits within relative L2 [`TOL`] and
//! the argmax of every row equal to llama.cpp's greedy choice; for the new architectures, in f32
//! and in the quantized types their files use, the perplexity of 1,024 fixed tokens in one context
//! (ubatches of 256, past every sliding window) within 0.5% of llama.cpp's.

mod common;

use std::path::{Path, PathBuf};

use common::{rel_l2, synth_model};
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;
use sha2::{Digest, Sha256};

/// f32 models: both sides multiply in f32; pshard's KV cache holds f16 (llama.cpp's here f32).
/// Quantized models have no logits fixtures (see scripts/llama-ref/make_logits_fixtures.py).
const TOL: f64 = 1e-3;
/// Perplexity: relative difference.
const TOL_PPL: f64 = 5e-3;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-ref")
}

/// One fixture file.
struct Fixture {
    preset: String,
    recipe: String,
    seed: u64,
    sha256: String,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<f32>,
    n_vocab: usize,
    /// (ubatch, mean nll, perplexity, tokens)
    nll: Option<(usize, f64, f64, Vec<u32>)>,
}

fn nums<T: std::str::FromStr>(it: std::str::SplitWhitespace) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    it.map(|x| x.parse().unwrap()).collect()
}

fn load(name: &str) -> Fixture {
    let text = std::fs::read_to_string(dir().join(format!("{name}.txt"))).unwrap();
    let mut f = Fixture {
        preset: String::new(),
        recipe: String::new(),
        seed: 0,
        sha256: String::new(),
        prompt: vec![],
        greedy: vec![],
        logits: vec![],
        n_vocab: 0,
        nll: None,
    };
    let mut nll = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("model") => {
                let v: Vec<&str> = it.collect();
                f.preset = v[0].into();
                f.recipe = v[1].into();
                f.seed = v[2].parse().unwrap();
                f.sha256 = v[3].into();
            }
            Some("prompt") => f.prompt = nums(it),
            Some("greedy") => f.greedy = nums(it),
            Some("logits") => {
                let v: Vec<&str> = it.collect();
                let bytes = std::fs::read(dir().join(v[0])).unwrap();
                let rows: usize = v[1].parse().unwrap();
                f.n_vocab = v[2].parse().unwrap();
                assert_eq!(
                    bytes.len(),
                    rows * f.n_vocab * 4,
                    "{name}: logits file size"
                );
                f.logits = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
            }
            Some("nll") => {
                let v: Vec<&str> = it.collect();
                nll = Some((
                    v[0].parse().unwrap(),
                    v[1].parse().unwrap(),
                    v[2].parse().unwrap(),
                ));
            }
            Some("nll_tokens") => {
                let (u, n, p) = nll.expect("nll before nll_tokens");
                f.nll = Some((u, n, p, nums(it)));
            }
            other => panic!("{name}: unknown fixture line {other:?}"),
        }
    }
    f
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b }) as u32
}

/// Mean negative log-likelihood of each next token of `tokens` under `engine` (fresh context),
/// evaluated in ubatches of `ubatch` tokens.
fn mean_nll(path: &Path, tokens: &[u32], ubatch: usize) -> f64 {
    let model = Model::open(path).unwrap();
    let nv = model.spec.hparams.n_vocab;
    let mut e = Engine::new(model, tokens.len(), ubatch);
    let logits = e.eval(tokens, Logits::All).unwrap();
    let mut nll = 0f64;
    for (i, row) in logits.chunks(nv).take(tokens.len() - 1).enumerate() {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        nll += lse - row[tokens[i + 1] as usize] as f64;
    }
    nll / (tokens.len() - 1) as f64
}

/// Every row's logits within [`TOL`] and the argmax of every row from the last prompt position
/// on equal to llama.cpp's greedy token; returns the worst row's relative L2.
fn check_logits(name: &str, f: &Fixture, path: &Path) -> f64 {
    let nv = f.n_vocab;
    let n_rows = f.prompt.len() + f.greedy.len();
    let mut e = Engine::new(Model::open(path).unwrap(), n_rows + 1, 64);
    let mut got = e.eval(&f.prompt, Logits::All).unwrap();
    for &t in &f.greedy {
        got.extend(e.eval(&[t], Logits::Last).unwrap());
    }
    assert_eq!(got.len(), f.logits.len(), "{name}: rows");
    let mut worst = 0f64;
    for (row, (g, w)) in got.chunks(nv).zip(f.logits.chunks(nv)).enumerate() {
        let want: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let err = rel_l2(g, &want);
        worst = worst.max(err);
        assert!(
            err <= TOL,
            "{name}: row {row}: logits rel L2 {err:.3e} > {TOL:.0e}"
        );
        // Rows from the last prompt position on chose llama.cpp's greedy tokens.
        if let Some(step) = (row + 1).checked_sub(f.prompt.len()) {
            if step < f.greedy.len() {
                assert_eq!(
                    argmax(g),
                    f.greedy[step],
                    "{name}: greedy step {step} (llama.cpp's token {}, rel L2 {err:.2e})",
                    f.greedy[step]
                );
            }
        }
    }
    worst
}

fn check(name: &str) {
    let f = load(name);
    let path = synth_model(&f.preset, &f.recipe, f.seed);
    let bytes = std::fs::read(&path).unwrap();
    let sha = format!("{:x}", Sha256::digest(&bytes));
    let mut worst = 0.0;
    assert_eq!(
        sha, f.sha256,
        "{name}: pshard synth no longer writes the fixture's model; rerun \
         scripts/llama-ref/make-logits-fixtures.sh"
    );
    if !f.logits.is_empty() {
        worst = check_logits(name, &f, &path);
    }
    let mut report = if f.logits.is_empty() {
        format!("{name}:")
    } else {
        format!("{name}: worst row rel L2 {worst:.2e} (tol {TOL:.0e}), 32 greedy steps identical")
    };
    if let Some((ubatch, want_nll, want_ppl, toks)) = &f.nll {
        let nll = mean_nll(&path, toks, *ubatch);
        let ppl = nll.exp();
        let rel = (ppl - want_ppl).abs() / want_ppl;
        assert!(
            rel <= TOL_PPL,
            "{name}: perplexity {ppl:.4} vs llama.cpp's {want_ppl:.4} (nll {nll:.6} vs {want_nll:.6}): {rel:.2e}"
        );
        report += &format!(", ppl {ppl:.3} vs {want_ppl:.3} ({:.3}%)", 100.0 * rel);
    }
    println!("{report}");
    std::fs::remove_file(&path).ok();
}

#[test]
fn llama() {
    check("tiny-llama-f32");
}

#[test]
fn qwen2() {
    check("tiny-qwen2-f32");
}

#[test]
fn qwen3() {
    check("tiny-qwen3-f32");
}

#[test]
fn qwen3moe() {
    check("tiny-qwen3moe-f32");
}

#[test]
fn mixtral() {
    check("tiny-mixtral-f32");
}

#[test]
fn gemma3() {
    check("tiny-gemma3-f32");
}

#[test]
fn gpt_oss() {
    check("tiny-gpt-oss-f32");
    check("tiny-gpt-oss-mxfp4_moe");
}

#[test]
fn glm4moe() {
    check("tiny-glm4moe-f32");
    check("tiny-glm4moe-q8_0");
}

#[test]
fn deepseek2() {
    check("tiny-deepseek2-f32");
    check("tiny-deepseek2-q8_0");
}
