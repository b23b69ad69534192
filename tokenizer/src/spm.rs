//! SentencePiece-style tokenization (`tokenizer.ggml.model = "llama"`): the text, spaces written as
//! U+2581, starts as one symbol per character; adjacent pairs whose concatenation is a vocabulary entry
//! are merged best score first (leftmost on ties) until none is left; symbols that are no entry fall
//! back to `<0xXX>` byte tokens. This is llama.cpp's behaviour, which differs from SentencePiece's own
//! Viterbi search for unigram models in rare cases.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

/// What the merge loop needs from the vocabulary.
pub(crate) struct SpmVocab<'a> {
    /// Token text → id.
    pub token_to_id: &'a HashMap<String, u32>,
    /// Score per token id.
    pub scores: &'a [f32],
    /// Token of each byte (`<0xXX>`, else the one-byte text, else unknown).
    pub byte_token: &'a [Option<u32>; 256],
}

struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    // Max-heap: higher score first, then the smaller left index.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| Reverse(self.left).cmp(&Reverse(other.left)))
    }
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
}

const NONE: u32 = u32::MAX;

/// Appends the tokens of `text` (already whitespace-escaped) to `out`.
pub(crate) fn encode(vocab: &SpmVocab<'_>, text: &str, out: &mut Vec<u32>) {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        let prev = if i == 0 { NONE } else { i as u32 - 1 };
        syms.push(Sym {
            start: start as u32,
            len: c.len_utf8() as u32,
            prev,
            next: i as u32 + 1,
        });
    }
    let n = syms.len();
    if n == 0 {
        return;
    }
    syms[n - 1].next = NONE;
    let mut heap = BinaryHeap::new();
    let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, left: u32, right: u32| {
        if left == NONE || right == NONE {
            return;
        }
        let (l, r) = (syms[left as usize], syms[right as usize]);
        let piece = &text[l.start as usize..(r.start + r.len) as usize];
        if let Some(&id) = vocab.token_to_id.get(piece) {
            if let Some(&score) = vocab.scores.get(id as usize) {
                heap.push(Bigram {
                    score,
                    left,
                    right,
                    size: l.len + r.len,
                });
            }
        }
    };
    for i in 1..n as u32 {
        try_add(&syms, &mut heap, i - 1, i);
    }
    while let Some(bg) = heap.pop() {
        let (l, r) = (syms[bg.left as usize], syms[bg.right as usize]);
        // Stale: one side already merged elsewhere.
        if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
            continue;
        }
        let left = &mut syms[bg.left as usize];
        left.len += r.len;
        left.next = r.next;
        syms[bg.right as usize].len = 0;
        if r.next != NONE {
            syms[r.next as usize].prev = bg.left;
        }
        let prev = syms[bg.left as usize].prev;
        try_add(&syms, &mut heap, prev, bg.left);
        try_add(&syms, &mut heap, bg.left, r.next);
    }
    let mut i = 0u32;
    while i != NONE {
        let s = syms[i as usize];
        let piece = &text[s.start as usize..(s.start + s.len) as usize];
        match vocab.token_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| vocab.byte_token[b as usize])),
        }
        i = s.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let texts = ["▁", "a", "b", "ab", "▁a", "▁ab", "<0x63>"];
        let scores = [-1.0, -2.0, -2.0, -1.5, -0.5, -0.1, 0.0];
        let map: HashMap<String, u32> = texts
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i as u32))
            .collect();
        let mut bytes = [None; 256];
        bytes[b'c' as usize] = Some(6);
        let v = SpmVocab {
            token_to_id: &map,
            scores: &scores,
            byte_token: &bytes,
        };
        let mut out = Vec::new();
        encode(&v, "▁abc", &mut out);
        // "▁a" (-0.5) beats "ab" (-1.5); then "▁ab" (-0.1); 'c' is a byte token.
        assert_eq!(out, [5, 6]);
        out.clear();
        encode(&v, "ba▁", &mut out);
        assert_eq!(out, [2, 1, 0]);
        out.clear();
        encode(&v, "", &mut out);
        assert!(out.is_empty());
    }
}
