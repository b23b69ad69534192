//! Splitting raw text at special-token texts before the model's own tokenization.
//!
//! llama.cpp's rule: special tokens (control, user-defined, unknown) are taken longest text first; each
//! one splits every remaining raw fragment at all its non-overlapping occurrences, leftmost first.
//! Control and unknown tokens take part only when `parse_special` is set; user-defined ones always.
//! This implementation finds every occurrence of every special text in one Aho-Corasick pass and then
//! replays that rule over the occurrences, so a vocabulary with thousands of special tokens costs one
//! scan of the text rather than one per token.

use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, MatchKind};

use crate::TokenizerError;

/// A piece of the input: raw text to tokenize, or a special token matched whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    /// Raw text (non-empty).
    Text(&'a str),
    /// A special token.
    Token(u32),
}

pub(crate) struct SpecialMatcher {
    ac: Option<AhoCorasick>,
    /// Per pattern: token id, priority (0 first), whether it needs `parse_special`.
    patterns: Vec<(u32, u32, bool)>,
}

impl SpecialMatcher {
    /// `specials`: (token id, text, needs parse_special) of every special token.
    pub(crate) fn new(
        mut specials: Vec<(u32, &str, bool)>,
    ) -> Result<SpecialMatcher, TokenizerError> {
        specials.retain(|(_, t, _)| !t.is_empty());
        if specials.is_empty() {
            return Ok(SpecialMatcher {
                ac: None,
                patterns: Vec::new(),
            });
        }
        // Priority: longer text first; equal lengths by id (llama.cpp leaves that order unspecified).
        let mut order: Vec<usize> = (0..specials.len()).collect();
        order.sort_by(|&a, &b| {
            specials[b]
                .1
                .len()
                .cmp(&specials[a].1.len())
                .then(specials[a].0.cmp(&specials[b].0))
        });
        let mut priority = vec![0u32; specials.len()];
        for (rank, &i) in order.iter().enumerate() {
            priority[i] = rank as u32;
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(specials.iter().map(|s| s.1))
            .map_err(|e| TokenizerError::Invalid(format!("special-token matcher: {e}")))?;
        let patterns = specials
            .iter()
            .zip(&priority)
            .map(|(s, &p)| (s.0, p, s.2))
            .collect();
        Ok(SpecialMatcher {
            ac: Some(ac),
            patterns,
        })
    }

    /// Splits `text` into raw-text fragments and special tokens.
    pub(crate) fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let Some(ac) = &self.ac else {
            return vec![Fragment::Text(text)];
        };
        // (priority, start, end, token)
        let mut hits: Vec<(u32, usize, usize, u32)> = ac
            .find_overlapping_iter(text)
            .filter_map(|m| {
                let (tok, prio, needs_parse) = self.patterns[m.pattern().as_usize()];
                (parse_special || !needs_parse).then_some((prio, m.start(), m.end(), tok))
            })
            .collect();
        if hits.is_empty() {
            return vec![Fragment::Text(text)];
        }
        hits.sort_unstable();
        // start → (end, token or raw)
        let mut frags: BTreeMap<usize, (usize, Option<u32>)> = BTreeMap::new();
        frags.insert(0, (text.len(), None));
        for (_, start, end, tok) in hits {
            let Some((&fs, &(fe, kind))) = frags.range(..=start).next_back() else {
                continue;
            };
            if kind.is_some() || end > fe {
                continue; // inside a token already taken, or crossing a fragment boundary
            }
            frags.remove(&fs);
            if start > fs {
                frags.insert(fs, (start, None));
            }
            frags.insert(start, (end, Some(tok)));
            if end < fe {
                frags.insert(end, (fe, None));
            }
        }
        frags
            .into_iter()
            .map(|(s, (e, kind))| match kind {
                Some(t) => Fragment::Token(t),
                None => Fragment::Text(&text[s..e]),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Fragment::*;

    #[test]
    fn longest_first_and_parse_special() {
        let m = SpecialMatcher::new(vec![
            (1, "<s>", true),
            (2, "<s><s>", true),
            (3, "\n", false),
            (4, "ab", true),
        ])
        .unwrap();
        assert_eq!(
            m.partition("x<s><s><s>y", true),
            [Text("x"), Token(2), Token(1), Text("y")]
        );
        assert_eq!(
            m.partition("x<s>\ny", false),
            [Text("x<s>"), Token(3), Text("y")]
        );
        assert_eq!(m.partition("<s>", true), [Token(1)]);
        assert_eq!(m.partition("", true), []);
        assert_eq!(m.partition("aab", true), [Text("a"), Token(4)]);
        // "aba" with "ab": first occurrence only; the overlapping "ba" is no pattern.
        assert_eq!(m.partition("abab", true), [Token(4), Token(4)]);
    }
}
