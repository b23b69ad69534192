//! One evaluation's input: tokens with their positions and sequences, the rows that want logits,
//! and the checks every lane runs before touching a buffer.

use std::borrow::Cow;
use std::sync::Arc;

use pshard_kernels::cuda::kernels::MOE_ROUTE_FREE;
use pshard_model::graph::{Graph, Routing};
use pshard_model::spec::ModelSpec;
use rand::{rngs::StdRng, SeedableRng};

use crate::error::EngineError;

/// A function from `(layer, position)` to forced expert ids, or `None` to route normally.
pub type RouteOverride = dyn Fn(usize, u32) -> Option<Vec<u32>> + Send + Sync;

/// The forced-route table of one MoE layer of `routing` for tokens at `positions`, as the
/// device's `moe_route` kernel reads it: `n_used` expert ids per token, a row starting with
/// [`MOE_ROUTE_FREE`] where `f` forces nothing; `None` when it forces no token. An override that
/// gives the wrong number of experts, or an expert the layer does not have, is an error (the
/// device would read outside the router's logits and the expert tensors).
pub fn route_table(
    f: &RouteOverride,
    layer: usize,
    positions: &[u32],
    routing: &Routing,
) -> Result<Option<Vec<u32>>, EngineError> {
    let (n_expert, n_used) = (routing.n_expert, routing.n_used);
    if n_used == 0 {
        return Ok(None);
    }
    let mut table = vec![MOE_ROUTE_FREE; positions.len() * n_used];
    let mut any = false;
    for (row, &pos) in table.chunks_exact_mut(n_used).zip(positions) {
        let Some(ids) = f(layer, pos) else {
            continue;
        };
        if ids.len() != n_used || ids.iter().any(|&e| e as usize >= n_expert) {
            return Err(EngineError::Batch(format!(
                "the route override gives experts {ids:?} for layer {layer} at position {pos}; \
                 the layer routes each token to {n_used} of {n_expert} experts"
            )));
        }
        row.copy_from_slice(&ids);
        any = true;
    }
    Ok(any.then_some(table))
}

/// A [`RouteOverride`] for `spec`'s MoE layers: each token goes to the
/// [`scattered_experts`] of its layer and position. Tests that compare two engines give both this
/// one, so that a near-tie in a router cannot flip between them, while the tokens of a batch
/// still spread over many experts; `pshard bench --uniform-routes` gives it for the uniform
/// routing the planner prices.
pub fn scattered_routes(spec: &ModelSpec) -> Arc<RouteOverride> {
    let (n_expert, n_used) = (spec.hparams.n_expert, spec.hparams.n_expert_used);
    Arc::new(move |layer: usize, pos: u32| Some(scattered_experts(layer, pos, n_expert, n_used)))
}

/// `n_used` distinct experts of `n_expert` (all of them if fewer), drawn pseudo-randomly from
/// `(layer, pos)`.
fn scattered_experts(layer: usize, pos: u32, n_expert: usize, n_used: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(((layer as u64) << 32) | pos as u64);
    rand::seq::index::sample(&mut rng, n_expert, n_used.min(n_expert))
        .into_iter()
        .map(|e| e as u32)
        .collect()
}

/// Token `t`'s forced experts in a [`route_table`] of `n_used` per token, if it has any.
pub fn forced_row(table: &[u32], t: usize, n_used: usize) -> Option<&[u32]> {
    let row = &table[t * n_used..][..n_used];
    (row[0] != MOE_ROUTE_FREE).then_some(row)
}

/// Where a run's forced MoE expert choices come from.
#[derive(Clone, Copy, Default)]
pub enum ForcedRoutes<'a> {
    /// Every token routes by its router.
    #[default]
    None,
    /// A [`RouteOverride`], asked per MoE layer and token position.
    Override(&'a RouteOverride),
    /// One MoE layer's [`route_table`]: the host device runs one routing node per step and reads
    /// its table from device memory, as the CUDA kernel does.
    Table(&'a [u32]),
}

impl ForcedRoutes<'_> {
    /// The forced-route table of MoE layer `layer` (of `routing`) for tokens at `positions`, if
    /// any token of it is forced.
    pub fn table(
        &self,
        layer: Option<usize>,
        positions: &[u32],
        routing: &Routing,
    ) -> Result<Option<Cow<'_, [u32]>>, EngineError> {
        match *self {
            ForcedRoutes::None => Ok(None),
            ForcedRoutes::Override(f) => {
                let layer = layer.ok_or_else(|| {
                    EngineError::Batch("MoE routing outside a layer cannot be forced".into())
                })?;
                Ok(route_table(f, layer, positions, routing)?.map(Cow::Owned))
            }
            ForcedRoutes::Table(t) => {
                if t.len() != positions.len() * routing.n_used {
                    return Err(EngineError::Batch(format!(
                        "a forced-route table of {} ids for {} tokens of {} experts each",
                        t.len(),
                        positions.len(),
                        routing.n_used
                    )));
                }
                Ok(Some(Cow::Borrowed(t)))
            }
        }
    }
}

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
    /// Forced MoE expert choices (tests compare two engines, or an engine and a reference, on
    /// the same experts so that near-ties cannot flip).
    pub forced: ForcedRoutes<'a>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use pshard_model::spec::Gating;

    fn routing(n_expert: usize, n_used: usize) -> Routing {
        Routing {
            n_expert,
            n_used,
            gating: Gating::Softmax,
            normalize: true,
            scale: 1.0,
            groups: (0, 0),
        }
    }

    #[test]
    fn route_tables_force_rows_and_refuse_bad_experts() {
        let r = routing(8, 2);
        // Even positions forced (to experts depending on layer and position), odd ones free.
        let f = |layer: usize, pos: u32| pos.is_multiple_of(2).then(|| vec![layer as u32, pos % 8]);
        let t = route_table(&f, 3, &[4, 5, 6], &r).unwrap().unwrap();
        assert_eq!(t, [3, 4, MOE_ROUTE_FREE, MOE_ROUTE_FREE, 3, 6]);
        assert_eq!(forced_row(&t, 0, 2), Some(&[3, 4][..]));
        assert_eq!(forced_row(&t, 1, 2), None);
        assert_eq!(forced_row(&t, 2, 2), Some(&[3, 6][..]));
        // No token forced: no table.
        assert!(route_table(&f, 3, &[1, 7], &r).unwrap().is_none());
        // Too few experts, or one the layer does not have: an error naming layer and position.
        for bad in [vec![1], vec![1, 8]] {
            let g = move |_: usize, _: u32| Some(bad.clone());
            let e = route_table(&g, 2, &[9], &r).unwrap_err().to_string();
            assert!(e.contains("layer 2") && e.contains("position 9"), "{e}");
        }
        // A table read back from the device is checked against the batch.
        let forced = ForcedRoutes::Table(&t);
        assert!(forced.table(Some(0), &[0, 1, 2], &r).unwrap().is_some());
        assert!(forced.table(Some(0), &[0, 1], &r).is_err());
    }

    #[test]
    fn scattered_experts_are_distinct_and_fixed_per_layer_and_position() {
        for (n_expert, n_used) in [(8, 2), (32, 4)] {
            let mut seen = vec![false; n_expert];
            let mut all = Vec::new();
            for layer in 0..3 {
                for pos in 0..40 {
                    let ids = scattered_experts(layer, pos, n_expert, n_used);
                    assert_eq!(ids.len(), n_used);
                    let mut d = ids.clone();
                    d.sort_unstable();
                    d.dedup();
                    assert_eq!(d.len(), n_used, "{ids:?} repeats an expert");
                    assert_eq!(scattered_experts(layer, pos, n_expert, n_used), ids);
                    for &e in &ids {
                        seen[e as usize] = true;
                    }
                    all.push(d);
                }
            }
            assert!(
                seen.iter().all(|&s| s),
                "some of {n_expert} experts is never chosen"
            );
            // Layers and positions get their own choices: of 120 draws of 4 of 32 experts
            // (35960 sets), few repeat; 2 of 8 has 28 sets, nearly all drawn.
            all.sort();
            all.dedup();
            let want = if n_expert == 32 { 100 } else { 20 };
            assert!(
                all.len() >= want,
                "{} distinct sets of {n_used} of {n_expert}",
                all.len()
            );
        }
    }
}
