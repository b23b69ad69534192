//! Tokenizers and chat templates from GGUF metadata.
//!
//! [`Tokenizer::from_gguf`] reads the `tokenizer.ggml.*` keys and builds one of:
//! - byte-level BPE (`gpt2`), with the pre-tokenizer named by `tokenizer.ggml.pre`
//!   ([`PreTokenizer`]);
//! - SentencePiece-style (`llama`: scores, no merges), merging by score with `<0xXX>` byte fallback;
//! - `none` (synthetic models without a vocabulary): a byte tokenizer, see [`TokenizerKind::None`].
//!
//! Encoding follows llama.cpp: special-token texts are split out first (longest first; control and
//! unknown tokens only with `parse_special`, user-defined ones always), BOS/EOS are added per metadata.
//! Chat templates are in [`chat`].

#![warn(missing_docs)]

mod bpe;
pub mod chat;
mod special;
mod spm;

use std::collections::HashMap;

use pshard_model::gguf::{GgufHeader, MetaValue};

pub use bpe::PreTokenizer;
pub use chat::{ChatError, ChatMessage, ChatTemplate, ToolCall};

use special::{Fragment, SpecialMatcher};

/// An error building a tokenizer from GGUF metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required metadata key is absent.
    #[error("GGUF metadata key `{0}` is missing")]
    Missing(String),
    /// A metadata key has a type other than the one expected.
    #[error("GGUF metadata key `{key}` should be {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What it should be.
        expected: &'static str,
    },
    /// `tokenizer.ggml.model` names a tokenizer this crate does not implement.
    #[error("tokenizer model `{0}` is not supported (supported: gpt2, llama, none)")]
    Unsupported(String),
    /// The metadata is inconsistent.
    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),
}

/// Token types of `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// 0, or any value outside 1..=6.
    Undefined,
    /// 1: an ordinary token.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: control (BOS, EOS, chat markers); only parsed from text with `parse_special`.
    Control,
    /// 4: user-defined; always parsed from text as a whole token.
    UserDefined,
    /// 5: unused slot.
    Unused,
    /// 6: a byte token such as `<0x0A>`.
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Which tokenization algorithm a [`Tokenizer`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE (`gpt2`).
    Bpe(PreTokenizer),
    /// SentencePiece-style (`llama`).
    Spm,
    /// No vocabulary (`none`, `no_vocab`): synthetic models. Encoding maps each UTF-8 byte `b` to token
    /// id `b` (reduced modulo the vocabulary size when it is below 256); decoding maps ids below 256
    /// back to bytes and writes larger ids as `[id]`. There is no BOS, EOS or end-of-generation token.
    /// Good enough to drive benchmarks, meaningless as language.
    None,
}

enum Model {
    Bpe(Box<bpe::Bpe>),
    Spm,
    None,
}

/// A tokenizer built from GGUF metadata. Immutable and `Sync`: share it freely.
pub struct Tokenizer {
    kind: TokenizerKind,
    model: Model,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    token_to_id: HashMap<String, u32>,
    /// Decoded bytes of every token (special tokens as their text), concatenated; see `piece_off`.
    pieces: Vec<u8>,
    piece_off: Vec<u32>,
    special: SpecialMatcher,
    /// Token of each byte value (SPM `<0xXX>` fallback).
    byte_token: [Option<u32>; 256],
    eog: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    pre_name: String,
}

fn meta<'a>(h: &'a GgufHeader, key: &str) -> Option<&'a MetaValue> {
    h.get(key)
}

fn as_i64(v: &MetaValue) -> Option<i64> {
    Some(match *v {
        MetaValue::U8(x) => x.into(),
        MetaValue::I8(x) => x.into(),
        MetaValue::U16(x) => x.into(),
        MetaValue::I16(x) => x.into(),
        MetaValue::U32(x) => x.into(),
        MetaValue::I32(x) => x.into(),
        MetaValue::U64(x) => i64::try_from(x).ok()?,
        MetaValue::I64(x) => x,
        _ => return None,
    })
}

fn meta_str<'a>(h: &'a GgufHeader, key: &str) -> Result<Option<&'a str>, TokenizerError> {
    match meta(h, key) {
        None => Ok(None),
        Some(MetaValue::String(s)) => Ok(Some(s)),
        Some(_) => Err(TokenizerError::WrongType {
            key: key.into(),
            expected: "a string",
        }),
    }
}

fn meta_bool(h: &GgufHeader, key: &str) -> Result<Option<bool>, TokenizerError> {
    match meta(h, key) {
        None => Ok(None),
        Some(MetaValue::Bool(b)) => Ok(Some(*b)),
        Some(v) => as_i64(v)
            .map(|x| Some(x != 0))
            .ok_or_else(|| TokenizerError::WrongType {
                key: key.into(),
                expected: "a bool",
            }),
    }
}

fn meta_int(h: &GgufHeader, key: &str) -> Result<Option<i64>, TokenizerError> {
    match meta(h, key) {
        None => Ok(None),
        Some(v) => as_i64(v)
            .map(Some)
            .ok_or_else(|| TokenizerError::WrongType {
                key: key.into(),
                expected: "an integer",
            }),
    }
}

fn meta_array<'a>(h: &'a GgufHeader, key: &str) -> Result<Option<&'a [MetaValue]>, TokenizerError> {
    match meta(h, key) {
        None => Ok(None),
        Some(MetaValue::Array(_, items)) => Ok(Some(items)),
        Some(_) => Err(TokenizerError::WrongType {
            key: key.into(),
            expected: "an array",
        }),
    }
}

fn string_array(h: &GgufHeader, key: &str) -> Result<Option<Vec<String>>, TokenizerError> {
    let Some(items) = meta_array(h, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|v| match v {
            MetaValue::String(s) => Ok(s.clone()),
            _ => Err(TokenizerError::WrongType {
                key: key.into(),
                expected: "an array of strings",
            }),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Vocabulary size of a model without a tokenizer: `{arch}.vocab_size`, else the embedding rows.
fn vocab_size_without_tokens(h: &GgufHeader) -> Result<usize, TokenizerError> {
    if let Some(arch) = meta_str(h, "general.architecture")? {
        if let Some(n) = meta_int(h, &format!("{arch}.vocab_size"))? {
            return usize::try_from(n)
                .map_err(|_| TokenizerError::Invalid(format!("{arch}.vocab_size = {n}")));
        }
    }
    if let Some(t) = h.tensors.iter().find(|t| t.name == "token_embd.weight") {
        if let Some(&rows) = t.dims.get(1) {
            return usize::try_from(rows)
                .map_err(|_| TokenizerError::Invalid(format!("token_embd.weight rows {rows}")));
        }
    }
    Err(TokenizerError::Invalid(
        "tokenizer model `none` needs `{arch}.vocab_size` or a `token_embd.weight` tensor".into(),
    ))
}

// Texts that llama.cpp treats as end-of-turn / end-of-generation when the metadata does not name them.
const EOT_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];
const FIM_PRE_NAMES: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
];
const FIM_SUF_NAMES: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
];
const FIM_MID_NAMES: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
];
const FIM_PAD_NAMES: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_NAMES: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_NAMES: &[&str] = &["<|file_sep|>"];

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF header's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(header: &GgufHeader) -> Result<Tokenizer, TokenizerError> {
        let model_name = meta_str(header, "tokenizer.ggml.model")?
            .ok_or_else(|| TokenizerError::Missing("tokenizer.ggml.model".into()))?;
        let pre_name = meta_str(header, "tokenizer.ggml.pre")?
            .unwrap_or("default")
            .to_string();
        match model_name {
            "none" | "no_vocab" => return Self::without_vocab(vocab_size_without_tokens(header)?),
            "gpt2" | "llama" => {}
            other => return Err(TokenizerError::Unsupported(other.into())),
        }
        let is_spm = model_name == "llama";
        let mut tokens = string_array(header, "tokenizer.ggml.tokens")?
            .ok_or_else(|| TokenizerError::Missing("tokenizer.ggml.tokens".into()))?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(TokenizerError::Invalid(format!(
                "tokenizer.ggml.tokens has {n} entries"
            )));
        }
        for (i, t) in tokens.iter_mut().enumerate() {
            if t.is_empty() {
                *t = format!("[EMPTY_{i}]");
            }
        }
        let scores: Vec<f32> = match meta_array(header, "tokenizer.ggml.scores")? {
            None => vec![0.0; n],
            Some(items) => {
                if items.len() != n {
                    return Err(TokenizerError::Invalid(format!(
                        "tokenizer.ggml.scores has {} entries, tokens {n}",
                        items.len()
                    )));
                }
                items
                    .iter()
                    .map(|v| match *v {
                        MetaValue::F32(x) => Ok(x),
                        MetaValue::F64(x) => Ok(x as f32),
                        _ => Err(TokenizerError::WrongType {
                            key: "tokenizer.ggml.scores".into(),
                            expected: "an array of floats",
                        }),
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let mut types: Vec<TokenType> = match meta_array(header, "tokenizer.ggml.token_type")? {
            None => vec![TokenType::Normal; n],
            Some(items) => {
                if items.len() != n {
                    return Err(TokenizerError::Invalid(format!(
                        "tokenizer.ggml.token_type has {} entries, tokens {n}",
                        items.len()
                    )));
                }
                items
                    .iter()
                    .map(|v| {
                        as_i64(v)
                            .map(TokenType::from_i64)
                            .ok_or(TokenizerError::WrongType {
                                key: "tokenizer.ggml.token_type".into(),
                                expected: "an array of integers",
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.insert(t.clone(), i as u32); // a duplicate text maps to its last id
        }

        let pre = PreTokenizer::from_name(&pre_name).unwrap_or(PreTokenizer::Default);
        let kind = if is_spm {
            TokenizerKind::Spm
        } else {
            TokenizerKind::Bpe(pre)
        };
        let model = if is_spm {
            Model::Spm
        } else {
            let merges = string_array(header, "tokenizer.ggml.merges")?
                .ok_or_else(|| TokenizerError::Missing("tokenizer.ggml.merges".into()))?;
            Model::Bpe(Box::new(bpe::Bpe::new(
                pre,
                &token_to_id,
                n as u32,
                &merges,
            )?))
        };

        // Defaults per model family, overridden by the metadata (llama.cpp's rules).
        let (mut bos, mut eos, mut unk) = if is_spm {
            (Some(1), Some(2), Some(0))
        } else {
            (Some(11), Some(11), None)
        };
        let add_bos = meta_bool(header, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(is_spm || pre.default_add_bos());
        let add_eos = meta_bool(header, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix =
            meta_bool(header, "tokenizer.ggml.add_space_prefix")?.unwrap_or(is_spm);
        let id_key = |key: &str| -> Result<Option<Option<u32>>, TokenizerError> {
            Ok(match meta_int(header, key)? {
                None => None,
                Some(v) if v >= 0 && (v as usize) < n => Some(Some(v as u32)),
                // Out of range: ignored, the default stays (as llama.cpp does, with a warning).
                Some(_) => None,
            })
        };
        if let Some(v) = id_key("tokenizer.ggml.bos_token_id")? {
            bos = v;
        }
        if let Some(v) = id_key("tokenizer.ggml.eos_token_id")? {
            eos = v;
        }
        if let Some(v) = id_key("tokenizer.ggml.unknown_token_id")? {
            unk = v;
        }
        let pad = id_key("tokenizer.ggml.padding_token_id")?.flatten();
        let mut eot = id_key("tokenizer.ggml.eot_token_id")?.flatten();
        let mut eom = id_key("tokenizer.ggml.eom_token_id")?.flatten();
        let mut fim_pad = id_key("tokenizer.ggml.fim_pad_token_id")?.flatten();
        let mut fim_rep = id_key("tokenizer.ggml.fim_rep_token_id")?.flatten();
        let mut fim_sep = id_key("tokenizer.ggml.fim_sep_token_id")?.flatten();
        let bos = bos.filter(|&b| (b as usize) < n);
        let eos = eos.filter(|&e| (e as usize) < n);
        let unk = unk.filter(|&u| (u as usize) < n);

        // Recognise special tokens by text where the metadata does not name them; such tokens become
        // control tokens. Lowest id wins where several texts match.
        let find = |names: &[&str]| -> Option<u32> {
            names
                .iter()
                .filter_map(|s| token_to_id.get(*s).copied())
                .min()
        };
        let mut force_control = Vec::new();
        for (slot, names) in [
            (&mut eot, EOT_NAMES),
            (&mut eom, &["<|eom_id|>"][..]),
            (&mut fim_pad, FIM_PAD_NAMES),
            (&mut fim_rep, FIM_REP_NAMES),
            (&mut fim_sep, FIM_SEP_NAMES),
        ] {
            if slot.is_none() {
                *slot = find(names);
                force_control.extend(*slot);
            }
        }
        for names in [FIM_PRE_NAMES, FIM_SUF_NAMES, FIM_MID_NAMES] {
            force_control.extend(find(names));
        }
        let mut eog = vec![false; n];
        for id in [fim_pad, fim_rep, fim_sep, eos, eot, eom]
            .into_iter()
            .flatten()
        {
            eog[id as usize] = true;
        }
        for name in EOG_NAMES {
            if let Some(&id) = token_to_id.get(*name) {
                eog[id as usize] = true;
                force_control.push(id);
            }
        }
        for id in force_control {
            types[id as usize] = TokenType::Control;
        }
        // gpt-oss (o200k_harmony): these markers are always rendered, and `<|end|>` does not end the
        // generation when `<|return|>` and `<|call|>` exist.
        for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(name) {
                types[id as usize] = TokenType::UserDefined;
            }
        }
        if token_to_id.contains_key("<|return|>") && token_to_id.contains_key("<|call|>") {
            if let Some(&end) = token_to_id.get("<|end|>") {
                eog[end as usize] = false;
                types[end as usize] = TokenType::UserDefined;
            }
        }

        let mut byte_token = [None; 256];
        if is_spm {
            for (b, slot) in byte_token.iter_mut().enumerate() {
                *slot = token_to_id
                    .get(&format!("<0x{b:02X}>"))
                    .or_else(|| {
                        std::str::from_utf8(&[b as u8])
                            .ok()
                            .and_then(|s| token_to_id.get(s))
                    })
                    .copied()
                    .or(unk);
            }
        }

        let specials: Vec<(u32, &str, bool)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter_map(|(i, (t, ty))| match ty {
                TokenType::Control | TokenType::Unknown => Some((i as u32, t.as_str(), true)),
                TokenType::UserDefined => Some((i as u32, t.as_str(), false)),
                _ => None,
            })
            .collect();
        let special = SpecialMatcher::new(specials)?;

        let mut tok = Tokenizer {
            kind,
            model,
            tokens,
            types,
            scores,
            token_to_id,
            pieces: Vec::new(),
            piece_off: Vec::new(),
            special,
            byte_token,
            eog,
            bos,
            eos,
            eot,
            eom,
            unk,
            pad,
            add_bos,
            add_eos,
            add_space_prefix,
            pre_name,
        };
        tok.build_pieces();
        Ok(tok)
    }

    /// A byte tokenizer for a model without vocabulary ([`TokenizerKind::None`]).
    pub fn without_vocab(n_vocab: usize) -> Result<Tokenizer, TokenizerError> {
        if n_vocab == 0 || n_vocab > u32::MAX as usize / 2 {
            return Err(TokenizerError::Invalid(format!(
                "vocabulary size {n_vocab}"
            )));
        }
        let tokens: Vec<String> = (0..n_vocab)
            .map(|i| {
                if i < 256 {
                    format!("<0x{i:02X}>")
                } else {
                    format!("[{i}]")
                }
            })
            .collect();
        let mut tok = Tokenizer {
            kind: TokenizerKind::None,
            model: Model::None,
            types: vec![TokenType::Normal; n_vocab],
            scores: vec![0.0; n_vocab],
            token_to_id: HashMap::new(),
            tokens,
            pieces: Vec::new(),
            piece_off: Vec::new(),
            special: SpecialMatcher::new(Vec::new())?,
            byte_token: [None; 256],
            eog: vec![false; n_vocab],
            bos: None,
            eos: None,
            eot: None,
            eom: None,
            unk: None,
            pad: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
            pre_name: String::new(),
        };
        tok.build_pieces();
        Ok(tok)
    }

    fn build_pieces(&mut self) {
        let char_to_byte = bpe::char_to_byte_map();
        let mut pieces = Vec::with_capacity(self.tokens.iter().map(String::len).sum());
        let mut off = Vec::with_capacity(self.tokens.len() + 1);
        off.push(0u32);
        for (i, (text, ty)) in self.tokens.iter().zip(&self.types).enumerate() {
            match (self.kind, ty) {
                (TokenizerKind::None, _) => {
                    if i < 256 {
                        pieces.push(i as u8);
                    } else {
                        pieces.extend_from_slice(text.as_bytes());
                    }
                }
                (_, TokenType::Control | TokenType::Unknown | TokenType::UserDefined) => {
                    pieces.extend_from_slice(text.as_bytes())
                }
                (TokenizerKind::Spm, TokenType::Normal) => {
                    let mut buf = [0u8; 4];
                    for c in text.chars() {
                        let c = if c == '\u{2581}' { ' ' } else { c };
                        pieces.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
                (TokenizerKind::Spm, TokenType::Byte) => {
                    if let Some(b) = parse_byte_token(text) {
                        pieces.push(b);
                    }
                }
                (TokenizerKind::Bpe(_), TokenType::Normal) => {
                    let mut buf = [0u8; 4];
                    for c in text.chars() {
                        match char_to_byte.get(&c) {
                            Some(&b) => pieces.push(b),
                            // Not a byte-level character (a malformed vocabulary): keep it as text.
                            None => pieces.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
                        }
                    }
                }
                // Unused, undefined (and byte tokens in a BPE vocabulary) render as nothing.
                _ => {}
            }
            off.push(pieces.len() as u32);
        }
        self.pieces = pieces;
        self.piece_off = off;
    }

    /// Which algorithm this tokenizer runs.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// The `tokenizer.ggml.pre` value as read (`default` when absent); the pre-tokenizer used is in
    /// [`Tokenizer::kind`] (unknown names fall back to [`PreTokenizer::Default`]).
    pub fn pre_name(&self) -> &str {
        &self.pre_name
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (named in the metadata or recognised by text, e.g. `<end_of_turn>`).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// End-of-message token (`<|eom_id|>`).
    pub fn eom(&self) -> Option<u32> {
        self.eom
    }

    /// Unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Padding token.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Whether [`Tokenizer::encode`] with `add_special` puts BOS in front.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether [`Tokenizer::encode`] with `add_special` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }

    /// Whether SentencePiece text gets a leading space (`tokenizer.ggml.add_space_prefix`).
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Whether generating `id` ends the generation: EOS, EOT, EOM, FIM pad/repo/separator, and every
    /// token whose text is a known end-of-turn marker (`<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`,
    /// `<|endoftext|>`, ...), as llama.cpp decides it.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.get(id as usize).copied().unwrap_or(false)
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_ids(&self) -> Vec<u32> {
        (0..self.eog.len() as u32)
            .filter(|&i| self.eog[i as usize])
            .collect()
    }

    /// The vocabulary text of a token (byte-level or `▁` form, as stored); "" when out of range.
    pub fn token_text(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", String::as_str)
    }

    /// The type of a token; [`TokenType::Undefined`] when out of range.
    pub fn token_type(&self, id: u32) -> TokenType {
        self.types
            .get(id as usize)
            .copied()
            .unwrap_or(TokenType::Undefined)
    }

    /// The score of a token (SentencePiece log-probability; 0 where the file has none).
    pub fn token_score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// The id of a vocabulary text, if it is one.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The raw bytes a token stands for: byte-level BPE characters mapped back to bytes, SentencePiece
    /// `▁` as a space and `<0xXX>` as that byte, control/user-defined tokens as their text, unused
    /// tokens as nothing. A token may hold part of a UTF-8 character. Empty when out of range.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.piece_off.len() {
            return &[];
        }
        &self.pieces[self.piece_off[i] as usize..self.piece_off[i + 1] as usize]
    }

    /// Whether a token is hidden when decoding with `skip_special` (control and unknown tokens).
    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.token_type(id), TokenType::Control | TokenType::Unknown)
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the model asks ([`Tokenizer::add_bos`]);
    /// `parse_special` lets control-token texts in `text` (e.g. `<|im_start|>`) become those tokens
    /// instead of being tokenized as plain text. User-defined tokens are always matched whole.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if let Model::None = self.model {
            let n = self.tokens.len() as u32;
            out.extend(text.bytes().map(|b| u32::from(b) % n));
            return out;
        }
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let fragments = self.special.partition(text, parse_special);
        match &self.model {
            Model::Bpe(bpe) => {
                for f in fragments {
                    match f {
                        Fragment::Text(t) => bpe.encode(t, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Model::Spm => {
                let vocab = spm::SpmVocab {
                    token_to_id: &self.token_to_id,
                    scores: &self.scores,
                    byte_token: &self.byte_token,
                };
                let mut escaped = String::new();
                // A leading space goes in front of text that starts the input or follows a special token.
                let mut prev_special = true;
                for f in fragments {
                    match f {
                        Fragment::Text(t) => {
                            escaped.clear();
                            if self.add_space_prefix && prev_special {
                                escaped.push('\u{2581}');
                            }
                            for c in t.chars() {
                                escaped.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm::encode(&vocab, &escaped, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Model::None => unreachable!("handled above"),
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Tokenizes a rendered chat prompt: special tokens parsed, BOS added as the model asks unless the
    /// rendered text already starts with it (many templates write `{{ bos_token }}` themselves).
    pub fn encode_chat_prompt(&self, rendered: &str) -> Vec<u32> {
        let mut ids = self.encode(rendered, true, true);
        if self.add_bos() && ids.len() >= 2 && ids[0] == ids[1] && Some(ids[0]) == self.bos {
            ids.remove(0);
        }
        ids
    }

    /// The bytes of a token sequence. `skip_special` leaves out control and unknown tokens. With
    /// `add_space_prefix`, the space that encoding put in front of the text is removed again.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut first = true;
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            let mut piece = self.token_bytes(id);
            if first && !self.is_special(id) {
                if self.add_space_prefix
                    && matches!(self.kind, TokenizerKind::Spm)
                    && piece.first() == Some(&b' ')
                {
                    piece = &piece[1..];
                }
                first = false;
            }
            out.extend_from_slice(piece);
        }
        out
    }

    /// Decodes to text (invalid UTF-8 replaced by U+FFFD); special tokens are written as their text.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, false)).into_owned()
    }

    /// Decodes to text without control and unknown tokens.
    pub fn decode_skip_special(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, true)).into_owned()
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// `<0xXX>` → the byte.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Turns generated token ids into text as they arrive, holding back the bytes of a UTF-8 character
/// that is not complete yet, so every returned string is whole characters.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
    started: bool,
}

impl StreamDecoder {
    /// A decoder; `skip_special` leaves out control and unknown tokens (as
    /// [`Tokenizer::decode_skip_special`]).
    pub fn new(skip_special: bool) -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            skip_special,
            started: false,
        }
    }

    /// Adds one token and returns the text that is complete now (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if self.skip_special && tokenizer.is_special(id) {
            return String::new();
        }
        let mut piece = tokenizer.token_bytes(id);
        if !self.started && !tokenizer.is_special(id) {
            if tokenizer.add_space_prefix
                && matches!(tokenizer.kind, TokenizerKind::Spm)
                && piece.first() == Some(&b' ')
            {
                piece = &piece[1..];
            }
            self.started = true;
        }
        self.pending.extend_from_slice(piece);
        self.take_complete()
    }

    /// Returns whatever is still held back (an incomplete character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.started = false;
        s
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (ok, tail) = rest.split_at(e.valid_up_to());
                    // `ok` is the validated prefix, so this cannot fail.
                    out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            rest = tail;
                            break;
                        }
                        // Bytes that can never be valid: replace them.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = &tail[bad..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drain_to = self.pending.len() - keep;
        self.pending.drain(..drain_to);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<StreamDecoder>();
        let t = Tokenizer::without_vocab(256).unwrap();
        assert!(format!("{t:?}").contains("n_vocab: 256"));
    }

    #[test]
    fn byte_token_names() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x1>"), None);
        assert_eq!(parse_byte_token("a"), None);
    }

    #[test]
    fn stream_decoder_holds_partial_characters() {
        let tok = Tokenizer::without_vocab(300).unwrap();
        let mut d = StreamDecoder::new(false);
        // "é" = C3 A9, "🚀" = F0 9F 9A 80
        assert_eq!(d.push(&tok, b'a' as u32), "a");
        assert_eq!(d.push(&tok, 0xC3), "");
        assert_eq!(d.push(&tok, 0xA9), "é");
        for b in [0xF0, 0x9F, 0x9A] {
            assert_eq!(d.push(&tok, b), "");
        }
        assert_eq!(d.push(&tok, 0x80), "🚀");
        // An invalid byte is replaced at once; a dangling lead byte only at the end.
        assert_eq!(d.push(&tok, 0xFF), "\u{FFFD}");
        assert_eq!(d.push(&tok, 0xE2), "");
        assert_eq!(d.push(&tok, b'x' as u32), "\u{FFFD}x");
        assert_eq!(d.push(&tok, 0xE2), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.push(&tok, 299), "[299]");
    }

    #[test]
    fn vocabless_tokenizer_round_trips_bytes() {
        let tok = Tokenizer::without_vocab(1000).unwrap();
        let text = "Ünïcödé 🚀\n";
        let ids = tok.encode(text, true, true);
        assert_eq!(ids.len(), text.len());
        assert_eq!(tok.decode(&ids), text);
        assert!(tok.bos().is_none() && !tok.add_bos() && tok.eog_ids().is_empty());
        let small = Tokenizer::without_vocab(100).unwrap();
        assert!(small
            .encode("\u{ff}", false, false)
            .iter()
            .all(|&i| i < 100));
        assert!(Tokenizer::without_vocab(0).is_err());
    }
}
