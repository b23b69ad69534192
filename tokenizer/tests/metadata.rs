//! Tokenizers built from hand-made GGUF metadata: model types, defaults, and clear errors for bad input.

use pshard_model::gguf::{GgufHeader, MetaType, MetaValue};
use pshard_tokenizer::{PreTokenizer, Tokenizer, TokenizerError, TokenizerKind};

fn header(kv: Vec<(&str, MetaValue)>) -> GgufHeader {
    GgufHeader {
        version: 3,
        metadata: kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tensors: Vec::new(),
        alignment: 32,
        data_offset: 0,
    }
}

fn strings(items: &[&str]) -> MetaValue {
    MetaValue::Array(
        MetaType::String,
        items
            .iter()
            .map(|s| MetaValue::String(s.to_string()))
            .collect(),
    )
}

fn ints(items: &[i32]) -> MetaValue {
    MetaValue::Array(
        MetaType::I32,
        items.iter().map(|&i| MetaValue::I32(i)).collect(),
    )
}

fn floats(items: &[f32]) -> MetaValue {
    MetaValue::Array(
        MetaType::F32,
        items.iter().map(|&f| MetaValue::F32(f)).collect(),
    )
}

fn s(v: &str) -> MetaValue {
    MetaValue::String(v.to_string())
}

#[test]
fn vocabless_models_get_a_byte_tokenizer() {
    let h = header(vec![
        ("general.architecture", s("llama")),
        ("llama.vocab_size", MetaValue::U32(32000)),
        ("tokenizer.ggml.model", s("none")),
    ]);
    let tok = Tokenizer::from_gguf(&h).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::None);
    assert_eq!(tok.n_vocab(), 32000);
    assert_eq!(tok.encode("Hi", true, true), [72, 105]);
    assert_eq!(tok.decode(&[72, 105, 300]), "Hi[300]");
    let no_size = header(vec![("tokenizer.ggml.model", s("none"))]);
    assert!(matches!(
        Tokenizer::from_gguf(&no_size),
        Err(TokenizerError::Invalid(_))
    ));
}

#[test]
fn bad_metadata_gives_clear_errors() {
    let missing = Tokenizer::from_gguf(&header(vec![])).err().unwrap();
    assert_eq!(
        missing.to_string(),
        "GGUF metadata key `tokenizer.ggml.model` is missing"
    );
    let unsupported = Tokenizer::from_gguf(&header(vec![("tokenizer.ggml.model", s("bert"))]))
        .err()
        .unwrap();
    assert!(
        unsupported.to_string().contains("`bert` is not supported"),
        "{unsupported}"
    );
    let wrong = Tokenizer::from_gguf(&header(vec![("tokenizer.ggml.model", MetaValue::U32(1))]))
        .err()
        .unwrap();
    assert!(matches!(wrong, TokenizerError::WrongType { .. }), "{wrong}");
    let no_tokens = Tokenizer::from_gguf(&header(vec![("tokenizer.ggml.model", s("llama"))]))
        .err()
        .unwrap();
    assert!(
        no_tokens.to_string().contains("tokenizer.ggml.tokens"),
        "{no_tokens}"
    );
    let mismatch = Tokenizer::from_gguf(&header(vec![
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", strings(&["a", "b"])),
        ("tokenizer.ggml.scores", floats(&[0.0])),
    ]))
    .err()
    .unwrap();
    assert!(
        mismatch.to_string().contains("scores has 1 entries"),
        "{mismatch}"
    );
    let no_merges = Tokenizer::from_gguf(&header(vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.tokens", strings(&["a"])),
    ]))
    .err()
    .unwrap();
    assert!(
        no_merges.to_string().contains("tokenizer.ggml.merges"),
        "{no_merges}"
    );
    let bad_merge = Tokenizer::from_gguf(&header(vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.tokens", strings(&["a"])),
        ("tokenizer.ggml.merges", strings(&["ab"])),
    ]))
    .err()
    .unwrap();
    assert!(
        bad_merge.to_string().contains("no space separator"),
        "{bad_merge}"
    );
}

/// A llama3-style BPE vocabulary: BOS added by default, whole-word vocabulary hits skip the merges,
/// `<|eot_id|>` recognised as end of generation.
#[test]
fn llama3_style_bpe() {
    let tokens = [
        "<|begin_of_text|>",
        "<|eot_id|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġhello",
    ];
    let types = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let h = header(vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("llama-bpe")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", ints(&types)),
        // No merge builds "hello" or "Ġhello": only ignore_merges can produce them.
        ("tokenizer.ggml.merges", strings(&["h e", "l l", "he ll"])),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(0)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(1)),
    ]);
    let tok = Tokenizer::from_gguf(&h).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::Bpe(PreTokenizer::Llama3));
    assert!(tok.add_bos());
    assert_eq!(tok.encode("hello hello", true, false), [0, 10, 11]);
    assert_eq!(tok.encode("hell<|eot_id|>", false, true), [9, 1]);
    assert_eq!(tok.encode("helo", false, false), [7, 4, 5]);
    assert!(tok.is_eog(1) && !tok.is_eog(0));
    assert_eq!(tok.eot(), Some(1));
    assert_eq!(tok.decode(&[0, 10, 11]), "<|begin_of_text|>hello hello");
    assert_eq!(tok.decode_skip_special(&[0, 10, 11, 1]), "hello hello");
}

/// A llama2-style SentencePiece vocabulary with `add_space_prefix`.
#[test]
fn spm_with_space_prefix() {
    let tokens = [
        "<unk>", "<s>", "</s>", "<0x41>", "▁", "H", "i", "▁H", "▁Hi", "!",
    ];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1];
    let scores = [0.0, 0.0, 0.0, 0.0, -5.0, -6.0, -6.0, -2.0, -1.0, -3.0];
    let h = header(vec![
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", ints(&types)),
        ("tokenizer.ggml.scores", floats(&scores)),
    ]);
    let tok = Tokenizer::from_gguf(&h).unwrap();
    // SPM defaults: BOS 1, EOS 2, add BOS, add a space prefix.
    assert!(tok.add_bos() && tok.add_space_prefix());
    assert_eq!(
        (tok.bos(), tok.eos(), tok.unk()),
        (Some(1), Some(2), Some(0))
    );
    let ids = tok.encode("Hi!A", true, false);
    assert_eq!(ids, [1, 8, 9, 3]);
    assert_eq!(tok.decode_skip_special(&ids), "Hi!A");
    // A space goes in after a special token too; unknown bytes fall back to <unk>.
    assert_eq!(tok.encode("Hi</s>Hi", false, true), [8, 2, 8]);
    assert_eq!(tok.encode("é", false, false), [4, 0, 0]);
    assert!(tok.is_eog(2));
}
