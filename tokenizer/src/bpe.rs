//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): GPT-2's byte↔unicode table, the pre-tokenizer
//! regexes named by `tokenizer.ggml.pre`, and a rank-driven merge loop.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;

use crate::TokenizerError;

/// GPT-2's table: every byte gets a printable code point. Printable Latin-1 bytes map to themselves,
/// the other 68 bytes to U+0100.. in byte order.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        *slot = if printable {
            char::from(b as u8)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are valid code points");
            next += 1;
            c
        };
    }
    table
}

/// Inverse of [`byte_to_char_table`].
pub(crate) fn char_to_byte_map() -> HashMap<char, u8> {
    byte_to_char_table()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

// Pre-tokenizer expressions, as llama.cpp selects them per `tokenizer.ggml.pre`. Several expressions are
// applied one after the other: each splits the pieces left by the previous one, keeping unmatched gaps.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PUNCT_RUN: &str = r"[\p{P}\$\+<=>\^~\|]+";
const PUNCT_RUN_FALCON: &str = r"[\p{P}\$\+<=>\^~\|`]+";

/// Pre-tokenizer families (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` that share an expression list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `default` and any name not recognised.
    Default,
    /// `gpt-2`, `phi-2`, `mpt`, `olmo`, `jais`, `trillion`, `exaone4`, ...: the GPT-2 expression.
    Gpt2,
    /// `llama3`, `llama-bpe`, `llama-v3`, `falcon3`, `dbrx`, `smaug-bpe`, `glm4`, ...
    Llama3,
    /// `qwen2`, `stablelm2`, `deepseek-r1-qwen`, `megrez`, `hunyuan`, `grok-2`: single digits.
    Qwen2,
    /// `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva-7b`: digits split
    /// first, then GPT-2.
    Smollm,
    /// `falcon`.
    Falcon,
    /// `gpt-4o`, `llama4`, `minimax-m2`.
    Gpt4o,
    /// `tekken`.
    Tekken,
}

impl PreTokenizer {
    /// Maps a `tokenizer.ggml.pre` value to its family; `None` for names this crate does not know (the
    /// caller falls back to [`PreTokenizer::Default`], as llama.cpp does).
    pub fn from_name(name: &str) -> Option<PreTokenizer> {
        Some(match name {
            "default" => PreTokenizer::Default,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => {
                PreTokenizer::Llama3
            }
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "stablelm2" | "megrez" | "hunyuan"
            | "grok-2" => PreTokenizer::Qwen2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => PreTokenizer::Smollm,
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "jina-v1-en" | "jina-v2-code"
            | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling"
            | "exaone4" => PreTokenizer::Gpt2,
            "falcon" => PreTokenizer::Falcon,
            "gpt-4o" | "llama4" | "minimax-m2" => PreTokenizer::Gpt4o,
            "tekken" => PreTokenizer::Tekken,
            _ => return None,
        })
    }

    fn expressions(self) -> &'static [&'static str] {
        match self {
            PreTokenizer::Default => &[PUNCT_RUN, GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            PreTokenizer::Gpt2 => &[GPT2],
            PreTokenizer::Llama3 => &[LLAMA3],
            PreTokenizer::Qwen2 => &[QWEN2],
            PreTokenizer::Smollm => &[r"\p{N}", GPT2],
            PreTokenizer::Falcon => &[PUNCT_RUN_FALCON, GPT2, "[0-9][0-9][0-9]"],
            PreTokenizer::Gpt4o => &[GPT4O],
            PreTokenizer::Tekken => &[TEKKEN],
        }
    }

    /// llama.cpp skips the merges for a pre-token that is itself a vocabulary entry for these families.
    pub(crate) fn ignores_merges(self) -> bool {
        matches!(self, PreTokenizer::Llama3 | PreTokenizer::Tekken)
    }

    /// Families for which llama.cpp adds BOS unless the file says otherwise.
    pub(crate) fn default_add_bos(self) -> bool {
        matches!(self, PreTokenizer::Llama3 | PreTokenizer::Tekken)
    }
}

/// The byte-level BPE model: compiled pre-tokenizer, merge table over interned symbols.
pub(crate) struct Bpe {
    regexes: Vec<Regex>,
    ignore_merges: bool,
    /// Interned symbol strings (byte-unicode form). Ids below the vocabulary size are token ids; merge
    /// parts and results that are not tokens get ids after them.
    sym_ids: HashMap<String, u32>,
    /// Number of vocabulary tokens (interned ids below this are tokens).
    n_vocab: u32,
    /// (left symbol, right symbol) → (rank, merged symbol).
    pairs: HashMap<(u32, u32), (u32, u32)>,
    /// Interned symbol of each byte's single-character string, if any.
    byte_sym: [Option<u32>; 256],
    /// Token id of each byte's single-character string, used when a final symbol is not a token.
    byte_token: [Option<u32>; 256],
    byte_char: [char; 256],
}

impl Bpe {
    /// Builds the model from the vocabulary text→id map and the merge list (`"left right"` strings).
    pub(crate) fn new(
        pre: PreTokenizer,
        token_to_id: &HashMap<String, u32>,
        n_vocab: u32,
        merges: &[String],
    ) -> Result<Bpe, TokenizerError> {
        let regexes = pre
            .expressions()
            .iter()
            .map(|e| {
                Regex::new(e).map_err(|err| {
                    TokenizerError::Invalid(format!("pre-tokenizer expression {e:?}: {err}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut sym_ids: HashMap<String, u32> = token_to_id.clone();
        let mut next_sym = n_vocab;
        let mut intern = |s: &str, sym_ids: &mut HashMap<String, u32>| -> u32 {
            if let Some(&id) = sym_ids.get(s) {
                return id;
            }
            let id = next_sym;
            next_sym += 1;
            sym_ids.insert(s.to_string(), id);
            id
        };
        let mut pairs = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // Split at the first space after the first character (a part may itself be a space-like
            // character, never a plain space, since spaces are byte-encoded as 'Ġ').
            let first_len = m.chars().next().map_or(0, char::len_utf8);
            let Some(pos) = m[first_len..].find(' ').map(|p| p + first_len) else {
                return Err(TokenizerError::Invalid(format!(
                    "merge {rank} ({m:?}) has no space separator"
                )));
            };
            let (left, right) = (&m[..pos], &m[pos + 1..]);
            let l = intern(left, &mut sym_ids);
            let r = intern(right, &mut sym_ids);
            let merged = intern(&format!("{left}{right}"), &mut sym_ids);
            // The first (lowest-rank) entry for a pair wins.
            pairs.entry((l, r)).or_insert((rank as u32, merged));
        }
        let byte_char = byte_to_char_table();
        let mut byte_sym = [None; 256];
        let mut byte_token = [None; 256];
        let mut buf = [0u8; 4];
        for b in 0..256 {
            let s: &str = byte_char[b].encode_utf8(&mut buf);
            byte_sym[b] = sym_ids.get(s).copied();
            byte_token[b] = token_to_id.get(s).copied();
        }
        Ok(Bpe {
            regexes,
            ignore_merges: pre.ignores_merges(),
            sym_ids,
            n_vocab,
            pairs,
            byte_sym,
            byte_token,
            byte_char,
        })
    }

    /// Splits `text` into pre-tokens (byte ranges) with the expression list.
    fn pre_tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces: Vec<&'t str> = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    // Expressions are fixed and tested; a backtrack-limit error cannot leave text out:
                    // the unmatched rest is kept as a gap below.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    /// Appends the tokens of a raw text fragment (no special tokens in it) to `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut word = String::new();
        let mut syms: Vec<Sym> = Vec::new();
        let mut heap: BinaryHeap<Reverse<(u32, u32, u32, u32)>> = BinaryHeap::new();
        for piece in self.pre_tokenize(text) {
            word.clear();
            word.extend(piece.bytes().map(|b| self.byte_char[b as usize]));
            if self.ignore_merges {
                if let Some(&id) = self.sym_ids.get(word.as_str()) {
                    if id < self.n_vocab {
                        out.push(id);
                        continue;
                    }
                }
            }
            self.merge_word(piece.as_bytes(), &mut syms, &mut heap, out);
        }
    }

    fn merge_word(
        &self,
        bytes: &[u8],
        syms: &mut Vec<Sym>,
        heap: &mut BinaryHeap<Reverse<(u32, u32, u32, u32)>>,
        out: &mut Vec<u32>,
    ) {
        syms.clear();
        heap.clear();
        let n = bytes.len();
        for (i, &b) in bytes.iter().enumerate() {
            let prev = if i == 0 { NONE } else { i as u32 - 1 };
            syms.push(Sym {
                sym: self.byte_sym[b as usize],
                start: i as u32,
                len: 1,
                prev,
                next: i as u32 + 1,
            });
        }
        let push_pair = |syms: &[Sym], heap: &mut BinaryHeap<_>, left: usize| {
            let right = syms[left].next as usize;
            if right >= syms.len() {
                return;
            }
            if let (Some(l), Some(r)) = (syms[left].sym, syms[right].sym) {
                if let Some(&(rank, _)) = self.pairs.get(&(l, r)) {
                    heap.push(Reverse((rank, left as u32, l, r)));
                }
            }
        };
        for i in 0..n.saturating_sub(1) {
            push_pair(syms, heap, i);
        }
        // Lowest rank first; among equal ranks the leftmost pair (llama.cpp's order).
        while let Some(Reverse((_, left, l, r))) = heap.pop() {
            let left = left as usize;
            let right = syms[left].next as usize;
            if syms[left].len == 0
                || right >= n
                || syms[left].sym != Some(l)
                || syms[right].sym != Some(r)
            {
                continue; // stale entry
            }
            let (_, merged) = self.pairs[&(l, r)];
            let right_sym = syms[right];
            syms[left].sym = Some(merged);
            syms[left].len += right_sym.len;
            syms[left].next = right_sym.next;
            syms[right].len = 0;
            if (right_sym.next as usize) < n {
                syms[right_sym.next as usize].prev = left as u32;
            }
            if syms[left].prev != NONE {
                push_pair(syms, heap, syms[left].prev as usize);
            }
            push_pair(syms, heap, left);
        }
        let mut i = 0;
        while i < n {
            let s = syms[i];
            match s.sym {
                Some(id) if id < self.n_vocab => out.push(id),
                // Not a vocabulary entry: fall back to one token per byte.
                _ => {
                    for &b in &bytes[s.start as usize..(s.start + s.len) as usize] {
                        if let Some(t) = self.byte_token[b as usize] {
                            out.push(t);
                        }
                    }
                }
            }
            i = s.next as usize;
        }
    }
}

#[derive(Clone, Copy)]
struct Sym {
    /// Interned symbol (None: a byte character that no merge or token knows).
    sym: Option<u32>,
    start: u32,
    /// Bytes covered; 0 once merged into its left neighbour.
    len: u32,
    prev: u32,
    next: u32,
}

/// No neighbour.
const NONE: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_with_known_points() {
        let t = byte_to_char_table();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'\t' as usize], 'ĉ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[0xad], 'Ń');
        let inv = char_to_byte_map();
        assert_eq!(inv.len(), 256);
        for b in 0..256 {
            assert_eq!(inv[&t[b]] as usize, b);
        }
    }

    fn split(pre: PreTokenizer, text: &str) -> Vec<String> {
        let bpe = Bpe::new(pre, &HashMap::new(), 0, &[]).unwrap();
        bpe.pre_tokenize(text)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_as_expected() {
        assert_eq!(
            split(PreTokenizer::Gpt2, "Hello world's  end"),
            ["Hello", " world", "'s", " ", " end"]
        );
        assert_eq!(
            split(PreTokenizer::Smollm, "and 1,000!"),
            ["and", " ", "1", ",", "0", "0", "0", "!"]
        );
        assert_eq!(
            split(PreTokenizer::Llama3, "x 12345\n\n y"),
            ["x", " ", "123", "45", "\n\n", " y"]
        );
        assert_eq!(split(PreTokenizer::Qwen2, "ab12"), ["ab", "1", "2"]);
        assert_eq!(split(PreTokenizer::Llama3, "I'M"), ["I", "'M"]);
        assert_eq!(
            split(PreTokenizer::Default, "a+=12345"),
            ["a", "+=", "123", "45"]
        );
        for pre in [
            PreTokenizer::Gpt4o,
            PreTokenizer::Tekken,
            PreTokenizer::Falcon,
        ] {
            assert_eq!(split(pre, "Hello World").concat(), "Hello World");
        }
    }

    #[test]
    fn merges_follow_rank_order() {
        // Tokens over byte-unicode text; merges "a b" (rank 0), "b c" (1), "ab c" (2).
        let vocab: HashMap<String, u32> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i as u32))
            .collect();
        let merges: Vec<String> = ["a b", "b c", "ab c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let bpe = Bpe::new(PreTokenizer::Gpt2, &vocab, 6, &merges).unwrap();
        let mut out = Vec::new();
        bpe.encode("abc", &mut out);
        assert_eq!(out, [5]);
        out.clear();
        bpe.encode("bcab", &mut out);
        assert_eq!(out, [4, 3]);
        out.clear();
        // 'd' is unknown: no token, dropped like an unknown byte.
        bpe.encode("abd", &mut out);
        assert_eq!(out, [3]);
    }
}
