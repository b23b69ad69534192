//! One evaluation's input: tokens with their positions and sequences, the rows that want logits,
//! and the checks every lane runs before touching a buffer.

use pshard_model::graph::Graph;

use crate::error::EngineError;

/// A function from `(layer, position)` to forced expert ids, or `None` to route normally.
pub type RouteOverride = dyn Fn(usize, u32) -> Option<Vec<u32>> + Send + Sync;

/// Inputs of one run of a program.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    /// Token ids, one per row.
    pub tokens: &'a [u32],
    /// Position of each token in its sequence.
    pub positions: &'a [u32],
    /// Sequence slot of each token (its KV cells); rows of one sequence are consecutive.
    pub seqs: &'a [u32],
    /// Rows (indices into `tokens`) whose logits are wanted, `n_logit_rows` of them.
    pub logit_rows: &'a [usize],
    /// Forces MoE expert choices: `(layer, position)` → expert ids (tests compare against a
    /// reference's choice so near-ties cannot flip).
    pub route_override: Option<&'a RouteOverride>,
}

impl Batch<'_> {
    /// Checks the input against a program's batch shape, the vocabulary, the sequence slots and
    /// the context: every lane relies on this before touching its buffers.
    pub fn check(
        &self,
        g: &Graph,
        n_vocab: usize,
        n_seq: usize,
        n_ctx: usize,
    ) -> Result<(), EngineError> {
        let n = g.n_tokens;
        if self.tokens.len() != n
            || self.positions.len() != n
            || self.seqs.len() != n
            || self.logit_rows.len() != g.n_logit_rows
        {
            return Err(EngineError::Batch(format!(
                "program is for {} tokens / {} logit rows, got {} tokens, {} positions, {} sequence \
                 ids, {} logit rows",
                n,
                g.n_logit_rows,
                self.tokens.len(),
                self.positions.len(),
                self.seqs.len(),
                self.logit_rows.len()
            )));
        }
        if let Some(&r) = self.logit_rows.iter().find(|&&r| r >= n) {
            return Err(EngineError::Batch(format!("logit row {r} ≥ {n} tokens")));
        }
        if let Some(&t) = self.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EngineError::BadToken(t, n_vocab));
        }
        if let Some(&s) = self.seqs.iter().find(|&&s| s as usize >= n_seq) {
            return Err(EngineError::Batch(format!(
                "sequence {s} does not exist (the engine holds {n_seq})"
            )));
        }
        if let Some(&p) = self.positions.iter().find(|&&p| p as usize >= n_ctx) {
            return Err(EngineError::ContextFull {
                needed: p as usize + 1,
                n_ctx,
            });
        }
        // Rows of one sequence are consecutive (attention runs per run of rows).
        let runs = self.seq_runs();
        for (i, (s, _)) in runs.iter().enumerate() {
            if runs[..i].iter().any(|(t, _)| t == s) {
                return Err(EngineError::Batch(format!(
                    "the rows of sequence {s} are not consecutive"
                )));
            }
        }
        Ok(())
    }

    /// Runs of consecutive rows of one sequence: `(sequence, rows)`.
    pub fn seq_runs(&self) -> Vec<(u32, std::ops::Range<usize>)> {
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..=self.seqs.len() {
            if i == self.seqs.len() || self.seqs[i] != self.seqs[start] {
                runs.push((self.seqs[start], start..i));
                start = i;
            }
        }
        runs
    }
}

/// Which rows of an evaluation produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (perplexity).
    All,
}
