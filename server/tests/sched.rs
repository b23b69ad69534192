//! The scheduler's context shift against the single-sequence generation loop
//! ([`pshard_runtime::session::generate`], what `pshard run --context-shift` runs): the same
//! model, prompt, keep and seeded sampler give the same tokens through several shifts, also with
//! another sequence decoding beside it (the CPU lane is batch invariant). Sampling at
//! temperature 1 from a tiny random model's nearly flat distribution makes the tokens follow
//! the logits closely: a shift that kept the wrong cells, or none, changes them.

use std::path::PathBuf;
use std::sync::Arc;

use pshard_runtime::engine::Engine;
use pshard_runtime::model::Model;
use pshard_runtime::sampler::{Sampler, SamplerParams};
use pshard_runtime::session::{generate, truncate_prompt};
use pshard_runtime::tiers::TierSet;
use pshard_server::sched::{Done, Event, Finish, Request, Scheduler, SubmitError};

const N_CTX: usize = 32;

fn model_path() -> PathBuf {
    use pshard_model::synth;
    let p = synth::preset("tiny-llama").expect("preset exists");
    let r = synth::QuantRecipe::from_name("q8_0").expect("recipe exists");
    let dir = std::env::temp_dir().join(format!("pshard-sched-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-llama.gguf");
    if !path.exists() {
        let tmp = dir.join(format!("tiny-llama.{:?}.part", std::thread::current().id()));
        let f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
        synth::write_synth(&p, r, 3, f, &mut |_, _| {}).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

fn sampling(seed: u64) -> SamplerParams {
    SamplerParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: Some(seed),
        ..SamplerParams::default()
    }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + 5 + salt * 11) % 200)
        .collect()
}

/// Tokens `run --context-shift` would generate: the generation loop on a fresh engine.
fn reference(prompt: &[u32], n: usize, keep: Option<usize>, seed: u64) -> Vec<u32> {
    let mut e = Engine::new(Model::open(&model_path()).unwrap(), N_CTX, 8);
    let mut s = Sampler::new(sampling(seed));
    let mut out = Vec::new();
    generate(
        &mut e,
        prompt,
        n,
        keep,
        &mut |l, h| s.sample(l, h),
        &|_| false,
        &mut |t| {
            out.push(t);
            true
        },
    )
    .unwrap();
    out
}

fn scheduler(n_seq: usize) -> Scheduler {
    let model = Arc::new(Model::open(&model_path()).unwrap());
    let params = pshard_planner::cost::PlanParams::new(N_CTX);
    let tiers = TierSet::all_cpu(&model.spec, params, 8);
    Scheduler::spawn(
        Engine::with_tiers(model, tiers, n_seq, None, true).unwrap(),
        8,
    )
}

fn request(prompt: Vec<u32>, max_tokens: usize, keep: Option<usize>, seed: u64) -> Request {
    Request {
        prompt,
        max_tokens,
        sampler: sampling(seed),
        stop_tokens: Vec::new(),
        context_shift: keep,
    }
}

/// Collects a request's events: (truncated prompt tokens, tokens, its end).
fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (usize, Vec<u32>, Option<Done>) {
    let (mut truncated, mut toks, mut done) = (0, Vec::new(), None);
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started { truncated: t, .. } => truncated = t,
            Event::Token(t) => toks.push(t),
            Event::Done(d) => {
                done = Some(d);
                break;
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
    (truncated, toks, done)
}

#[test]
fn a_shifting_sequence_generates_what_the_generation_loop_does() {
    let sched = scheduler(2);
    let (p, q) = (prompt(10, 0), prompt(7, 1));
    // 70 tokens in a context of 32 after a prompt of 10: several shifts keeping 3.
    let a = sched.submit(request(p.clone(), 70, Some(3), 11)).unwrap();
    let b = sched.submit(request(q.clone(), 45, Some(0), 12)).unwrap();
    let (ta, a_toks, a_done) = collect(a);
    let (_, b_toks, b_done) = collect(b);
    let (a_done, b_done) = (a_done.unwrap(), b_done.unwrap());
    assert_eq!(ta, 0);
    assert_eq!(a_toks.len(), 70);
    assert_eq!(
        (a_done.finish, a_done.completion_tokens),
        (Finish::Length, 70)
    );
    assert!(
        a_done.context_shifts >= 3,
        "shifts: {}",
        a_done.context_shifts
    );
    assert_eq!(a_toks, reference(&p, 70, Some(3), 11));
    assert_eq!(b_toks.len(), 45);
    assert!(b_done.context_shifts >= 2);
    assert_eq!(b_toks, reference(&q, 45, Some(0), 12));
    // Without the shift the same request ends at the full context.
    let (_, c_toks, c_done) = collect(sched.submit(request(p.clone(), 70, None, 11)).unwrap());
    let c_done = c_done.unwrap();
    assert_eq!(c_done.finish, Finish::Length);
    assert_eq!(c_done.context_shifts, 0);
    assert_eq!(c_toks.len(), N_CTX - p.len() + 1);
    assert_eq!(c_toks[..], a_toks[..c_toks.len()]);
    assert!(
        sched
            .stats
            .context_shifts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 5
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_cut_only_with_a_context_shift() {
    let sched = scheduler(1);
    let long = prompt(50, 2);
    match sched.submit(request(long.clone(), 5, None, 1)) {
        Err(SubmitError::TooLong { prompt: 50, n_ctx }) => assert_eq!(n_ctx, N_CTX),
        other => panic!("expected TooLong, got {:?}", other.map(|_| ())),
    }
    // Keeping 31 of a context of 32 leaves no room for the tail.
    assert!(matches!(
        sched.submit(request(long.clone(), 5, Some(31), 1)),
        Err(SubmitError::TooLong { .. })
    ));
    let (truncated, toks, done) =
        collect(sched.submit(request(long.clone(), 20, Some(4), 9)).unwrap());
    let cut = truncate_prompt(&long, N_CTX, 4).unwrap();
    assert_eq!(truncated, long.len() - cut.len());
    assert_eq!(done.unwrap().prompt_tokens, cut.len());
    assert_eq!(toks, reference(&cut, 20, Some(4), 9));
}
