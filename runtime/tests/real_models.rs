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
    ppl_at(&real_model(name)?, name)
}

/// llama-perplexity-compatible perplexity of the model at `path` over GPL-2 at `-c 512`.
fn ppl_at(path: &std::path::Path, name: &str) -> Option<f64> {
    let text = pshard_testkit::text_file(GPL2)?;
    let model = Model::open(path).unwrap();
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

/// FNV-1a (64-bit) of the file [`requantize_smollm2`] writes: proves a rerun wrote the very
/// bytes llama.cpp was measured on.
const REQUANT_FNV: u64 = 0xf44e_247c_c0b1_57f4;
/// `llama-perplexity -m <that file> -f /usr/share/common-licenses/GPL-2 -c 512` (llama.cpp from
/// the llama-cpp-python 0.3.36 sdist, CPU build; see docs/PERF.md).
const REQUANT_LLAMA_PPL: f64 = 19.5565;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SmolLM2 with its layer matrices requantized by pshard's own reference quantizers, so all three
/// lookup-table types are in one file: attention (rows of 576) IQ4_NL, ffn_gate/ffn_up MXFP4,
/// ffn_down (rows of 1536) IQ4_XS; the embeddings and norms are copied. Deterministic (each row
/// is quantized on its own), so the bytes depend only on the source file and the quantizers.
fn requantize_smollm2(src: &std::path::Path) -> Vec<u8> {
    use pshard_kernels::quant;
    use pshard_model::ggml_type::GgmlType;
    use pshard_model::gguf::{GgufWriter, ModelFile};
    use rayon::prelude::*;
    let file = ModelFile::open(src).unwrap();
    let h = file.header();
    let target = |name: &str, dims: &[u64]| -> Option<GgmlType> {
        if dims.len() != 2 || !name.starts_with("blk.") {
            return None;
        }
        if name.contains(".attn_") {
            Some(GgmlType::IQ4_NL)
        } else if name.contains(".ffn_down.") {
            Some(GgmlType::IQ4_XS)
        } else if name.contains(".ffn_gate.") || name.contains(".ffn_up.") {
            Some(GgmlType::MXFP4)
        } else {
            None
        }
    };
    let mut w = GgufWriter::new(Vec::new(), h.alignment);
    for (k, v) in &h.metadata {
        w.add_meta(k, v.clone());
    }
    for t in file.tensors() {
        let ty = target(&t.name, &t.dims).unwrap_or(t.ty);
        w.add_tensor(&t.name, &t.dims, ty).unwrap();
    }
    w.write_header().unwrap();
    for (i, t) in file.tensors().iter().enumerate() {
        let data = file.tensor_data(i);
        let Some(ty) = target(&t.name, &t.dims) else {
            w.write_tensor_data(data).unwrap();
            continue;
        };
        let cols = t.dims[0] as usize;
        let (from, to) = (quant::kernel(t.ty).unwrap(), quant::kernel(ty).unwrap());
        let (src_rb, dst_rb) = (
            t.ty.row_bytes(cols as u64).unwrap() as usize,
            ty.row_bytes(cols as u64).unwrap() as usize,
        );
        let mut out = vec![0u8; data.len() / src_rb * dst_rb];
        out.par_chunks_mut(dst_rb)
            .zip(data.par_chunks(src_rb))
            .for_each(|(o, row)| {
                let mut x = vec![0f32; cols];
                (from.dequantize_row)(row, &mut x);
                (to.quantize_row)(&x, o);
            });
        w.write_tensor_data(&out).unwrap();
    }
    w.finish().unwrap()
}

/// pshard's perplexity on a file pshard regenerates bit for bit, within 1% of llama.cpp's on the
/// same bytes (measured once with the script in docs/PERF.md and committed): the three
/// lookup-table types on real weights, without llama.cpp in CI. `PSHARD_KEEP_REQUANT=<path>`
/// keeps the file (to measure llama.cpp on it).
#[test]
fn smollm2_requantized_lookup_table_types_match_llama_cpp() {
    let Some(src) = real_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let bytes = requantize_smollm2(&src);
    let keep = std::env::var_os("PSHARD_KEEP_REQUANT").map(std::path::PathBuf::from);
    let path = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pshard-requant-{}.gguf", std::process::id()))
    });
    std::fs::write(&path, &bytes).unwrap();
    let hash = fnv1a(&bytes);
    println!(
        "requantized SmolLM2: {} bytes, FNV-1a {hash:#018x}",
        bytes.len()
    );
    let ppl = ppl_at(&path, "requantized SmolLM2");
    if keep.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    let Some(ppl) = ppl else { return };
    assert_eq!(
        hash, REQUANT_FNV,
        "the requantized file differs from the one llama.cpp was measured on"
    );
    assert!(
        (ppl - REQUANT_LLAMA_PPL).abs() / REQUANT_LLAMA_PPL < 0.01,
        "PPL {ppl} vs llama.cpp {REQUANT_LLAMA_PPL}"
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
        None,
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
