//! Batch invariance on the CPU lane: a sequence's logits do not depend on what shares its
//! evaluations (other sequences' decode rows, other prompts, how its own prompt is cut into
//! ubatches). The server's continuous batching relies on it: a request's greedy text must be the
//! one `pshard run --temp 0` gives, whatever else is running. Each check compares bit for bit
//! and names the first layer-level input that differs (from the activation traces) when not.
//!
//! Also: truncating a sequence to a cached prefix and re-evaluating the rest gives the same
//! logits as evaluating it whole (the server's prefix reuse).
//!
//! The crowd and ubatch checks run with an f16 and a Q8_0 KV cache: a row's K/V are quantized
//! per row, so a Q8_0 cache keeps the invariance.

mod common;

use std::sync::Arc;

use pshard_model::ggml_type::GgmlType;
use pshard_planner::cost::PlanParams;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;
use pshard_runtime::tiers::TierSet;
use pshard_tokenizer::Tokenizer;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The test model: a failure when the models folder was given (CI fetches them), else a skip.
fn model() -> Option<(Arc<Model>, Tokenizer)> {
    let path = match common::real_model(MODEL) {
        Some(p) => p,
        None if std::env::var_os("PSHARD_MODELS").is_some() => {
            panic!("{MODEL} is missing from $PSHARD_MODELS")
        }
        None => return None,
    };
    let model = Model::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file().header()).unwrap();
    Some((Arc::new(model), tok))
}

fn engine(model: &Arc<Model>, n_seq: usize, ubatch: usize) -> Engine {
    engine_kv(model, n_seq, ubatch, GgmlType::F16)
}

fn engine_kv(model: &Arc<Model>, n_seq: usize, ubatch: usize, kv: GgmlType) -> Engine {
    let mut params = PlanParams::new(256);
    params.kv_type = kv;
    let tiers = TierSet::all_cpu(&model.spec, params, ubatch);
    Engine::with_tiers(model.clone(), tiers, n_seq, None, false).unwrap()
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Index and values of the first element that differs bitwise, if any.
fn first_diff(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| x.to_bits() != y.to_bits())
        .map(|(i, (x, y))| (i, *x, *y))
}

/// Sequence 0 alone: its prompt in one ubatch, then `n` greedy decode steps. Returns the logits
/// after the prompt and after each step, and the tokens.
fn alone(model: &Arc<Model>, prompt: &[u32], n: usize, kv: GgmlType) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut e = engine_kv(model, 1, 512, kv);
    let mut logits = vec![e.eval(prompt, Logits::Last).unwrap()];
    let mut toks = Vec::new();
    for _ in 0..n {
        let t = argmax(logits.last().unwrap());
        toks.push(t);
        logits.push(e.eval(&[t], Logits::Last).unwrap());
    }
    (logits, toks)
}

#[test]
fn a_sequence_alone_and_in_a_crowd_gives_the_same_bits() {
    let Some((model, tok)) = model() else { return };
    for kv in [GgmlType::F16, GgmlType::Q8_0] {
        alone_and_in_a_crowd(&model, &tok, kv);
    }
}

fn alone_and_in_a_crowd(model: &Arc<Model>, tok: &Tokenizer, kv: GgmlType) {
    let model = model.clone();
    let n_vocab = model.spec.hparams.n_vocab;
    let p0 = tok.encode("The capital of France is", true, true);
    let p1 = tok.encode(
        "Once upon a time, in a land far away, there lived",
        true,
        true,
    );
    let p2 = tok.encode("def fibonacci(n):", true, true);
    let steps = 6;
    let (want, want_toks) = alone(&model, &p0, steps, kv);

    // Three sequences; sequence 0's prompt shares its ubatch with sequence 1's whole prompt and
    // the first half of sequence 2's, then every decode step of sequence 0 shares its batch with
    // sequence 1's decode row and (for the first step) the rest of sequence 2's prompt.
    let mut e = engine_kv(&model, 3, 512, kv);
    assert_eq!(e.kv_type().ggml(), kv);
    let half = p2.len() / 2;
    let mut tokens = Vec::new();
    let mut seqs = Vec::new();
    for (s, part) in [(1u32, &p1[..]), (0, &p0[..]), (2, &p2[..half])] {
        tokens.extend_from_slice(part);
        seqs.extend(std::iter::repeat_n(s, part.len()));
    }
    let rows = [p1.len() - 1, p1.len() + p0.len() - 1];
    let out = e.eval_batch(&tokens, &seqs, &rows).unwrap();
    let got0 = &out[n_vocab..2 * n_vocab];
    if let Some((i, a, b)) = first_diff(&want[0], got0) {
        panic!("{kv:?} KV: prompt logits of sequence 0 alone vs mixed with two other prompts differ first at vocab {i}: {a} vs {b}");
    }
    let mut t1 = argmax(&out[..n_vocab]);
    let mut t0 = want_toks[0];
    for step in 0..steps {
        let (mut tokens, mut seqs) = (vec![t1, t0], vec![1u32, 0]);
        let mut rows = vec![0, 1];
        if step == 0 {
            tokens.extend_from_slice(&p2[half..]);
            seqs.extend(std::iter::repeat_n(2, p2.len() - half));
            rows.push(tokens.len() - 1);
        }
        let out = e.eval_batch(&tokens, &seqs, &rows).unwrap();
        let got0 = &out[n_vocab..2 * n_vocab];
        if let Some((i, a, b)) = first_diff(&want[step + 1], got0) {
            panic!(
                "{kv:?} KV: decode step {step}: logits of sequence 0 alone (1 row) vs in a batch of {} rows differ first at vocab {i}: {a} vs {b}",
                tokens.len()
            );
        }
        t1 = argmax(&out[..n_vocab]);
        t0 = if step + 1 < steps {
            want_toks[step + 1]
        } else {
            0
        };
    }
}

#[test]
fn a_prompt_cut_into_ubatches_gives_the_same_bits() {
    let Some((model, tok)) = model() else { return };
    let p = tok.encode(
        "A long prompt, cut into pieces of different sizes, must give the logits it gives whole.",
        true,
        true,
    );
    for kv in [GgmlType::F16, GgmlType::Q8_0] {
        let (want, _) = alone(&model, &p, 0, kv);
        for ub in [1, 3, 7, 16] {
            let mut e = engine_kv(&model, 1, ub, kv);
            let got = e.eval(&p, Logits::Last).unwrap();
            if let Some((i, a, b)) = first_diff(&want[0], &got) {
                panic!("{kv:?} KV: a {}-token prompt whole vs in ubatches of {ub}: logits differ first at vocab {i}: {a} vs {b}", p.len());
            }
        }
    }
}

#[test]
fn truncating_to_a_prefix_and_continuing_matches_evaluating_whole() {
    let Some((model, tok)) = model() else { return };
    let a = tok.encode("The quick brown fox jumps over the lazy dog.", true, true);
    let b = tok.encode("The quick brown fox sleeps all day.", true, true);
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(common > 2 && common < a.len().min(b.len()), "{a:?} {b:?}");
    let (want, _) = alone(&model, &b, 0, GgmlType::F16);
    let mut e = engine(&model, 1, 512);
    e.eval(&a, Logits::Last).unwrap();
    e.truncate_seq(0, common).unwrap();
    assert_eq!(e.seq_len(0), common);
    let got = e.eval(&b[common..], Logits::Last).unwrap();
    assert!(first_diff(&want[0], &got).is_none());
    // Beyond the sequence: refused, nothing changed.
    assert!(e.truncate_seq(0, b.len() + 1).is_err());
    assert_eq!(e.seq_len(0), b.len());
}

/// Sliding-window layers keep a ring of the window plus one batch: truncating may drop at most
/// that batch's worth of positions. At the limit the continuation still matches evaluating whole
/// (the positions the next token reads survived); past it the engine refuses.
#[test]
fn truncating_a_sliding_window_sequence_is_bounded_by_its_ring() {
    let path = common::synth_model("tiny-gemma3", "q8_0", 7);
    let model = Arc::new(Model::open(&path).unwrap());
    let w = model.spec.layers.iter().find_map(|l| l.window).unwrap();
    let ub = 4;
    let n_ctx = 64;
    let tiers = || TierSet::all_cpu(&model.spec, PlanParams::new(n_ctx), ub);
    let cells = w + ub;
    let a: Vec<u32> = (0..30).map(|i| (i * 7 + 3) % 200).collect();
    let keep = a.len() - (cells - w);
    let b: Vec<u32> = a[..keep].iter().copied().chain([11, 12, 13]).collect();
    let mut whole = Engine::with_tiers(model.clone(), tiers(), 1, None, false).unwrap();
    let want = whole.eval(&b, Logits::Last).unwrap();
    let mut e = Engine::with_tiers(model.clone(), tiers(), 1, None, false).unwrap();
    e.eval(&a, Logits::Last).unwrap();
    let err = e.truncate_seq(0, keep - 1).unwrap_err();
    assert!(err.to_string().contains("sliding-window"), "{err}");
    assert_eq!(e.seq_len(0), a.len());
    e.truncate_seq(0, keep).unwrap();
    let got = e.eval(&b[keep..], Logits::Last).unwrap();
    assert!(
        first_diff(&want, &got).is_none(),
        "window {w}, ring {cells}"
    );
    std::fs::remove_file(&path).ok();
}
