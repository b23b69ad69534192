//! The KV cache: one layout wherever a layer's cells live. Per layer, `n_seq · cells` rows of K
//! (then of V) in the cache's type ([`KvType`]: f16, or GGUF Q8_0 blocks along each row), of the
//! layer's widths ([`pshard_model::bytes::kv_cols`]: latent attention
//! keeps only K rows of its latent and rope key), V not transposed, the cells of each sequence contiguous; position `p` of
//! sequence `s` lives in cell `s · cells + p % cells`, where `cells` is the context for global
//! layers and a ring of the window plus one batch for sliding-window layers
//! ([`pshard_model::bytes::kv_cells`]). A layer's bytes are the same on the host and on the device,
//! so moving it between them is a copy: one allocation holds K at offset 0 and V at
//! [`KvLayout::v_offset`].

use std::collections::HashMap;

pub use pshard_kernels::ops::{KvType, ShiftRun};
use pshard_model::spec::ModelSpec;
use pshard_planner::lanes::align;

use crate::cpu::{KvAccess, LayerKvMut};
use crate::device::{HostBuf, PlainHostMem};
use crate::error::EngineError;

/// The shape of the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Cells per sequence, per layer.
    pub cells: Vec<usize>,
    /// Sequences.
    pub n_seq: usize,
    /// Values per K row, per layer ([`pshard_model::bytes::kv_cols`]).
    pub k_cols: Vec<usize>,
    /// Values per V row, per layer (0 where values live inside K).
    pub v_cols: Vec<usize>,
    /// Context per sequence.
    pub n_ctx: usize,
    /// The rows' element type.
    pub ty: KvType,
}

impl KvLayout {
    /// The layout for `n_seq` sequences of `n_ctx` positions evaluated in batches of at most
    /// `max_batch` tokens, rows in `ty` (refused when the model's head dims are not whole blocks
    /// of `ty`: [`check_kv_type`]).
    pub fn new(
        spec: &ModelSpec,
        n_ctx: usize,
        max_batch: usize,
        n_seq: usize,
        ty: KvType,
    ) -> Result<KvLayout, EngineError> {
        check_kv_type(spec, ty)?;
        let layers = 0..spec.layers.len();
        let cols: Vec<(usize, usize)> = layers
            .clone()
            .map(|l| pshard_model::bytes::kv_cols(spec, l))
            .collect();
        Ok(KvLayout {
            cells: layers
                .map(|l| pshard_model::bytes::kv_cells(spec, l, n_ctx, max_batch))
                .collect(),
            n_seq: n_seq.max(1),
            k_cols: cols.iter().map(|c| c.0).collect(),
            v_cols: cols.iter().map(|c| c.1).collect(),
            n_ctx,
            ty,
        })
    }

    /// Bytes of one row of `cols` values.
    pub fn row_bytes(&self, cols: usize) -> usize {
        self.ty.row_bytes(cols)
    }

    /// Bytes of layer `l`'s K rows.
    pub fn k_bytes(&self, l: usize) -> usize {
        self.n_seq * self.cells[l] * self.row_bytes(self.k_cols[l])
    }

    /// Bytes of layer `l`'s V rows.
    pub fn v_bytes(&self, l: usize) -> usize {
        self.n_seq * self.cells[l] * self.row_bytes(self.v_cols[l])
    }

    /// Offset of V in a layer's allocation.
    pub fn v_offset(&self, l: usize) -> usize {
        align(self.k_bytes(l) as u64) as usize
    }

    /// Bytes of one layer's allocation (equals `pshard_planner::cost::layer_kv_bytes`).
    pub fn layer_bytes(&self, l: usize) -> usize {
        self.v_offset(l) + align(self.v_bytes(l) as u64) as usize
    }

    /// Byte offset of K cell `c` of sequence `s` in layer `l` (V: add [`Self::v_offset`] and use
    /// `v_cols`).
    pub fn cell_offset(&self, l: usize, s: usize, c: usize, cols: usize) -> usize {
        (s * self.cells[l] + c) * self.row_bytes(cols)
    }

    /// The cells of layer `l` holding positions `range` of a sequence, as at most two runs of
    /// consecutive cells (the ring wraps once at most).
    pub fn cell_runs(
        &self,
        l: usize,
        range: std::ops::Range<usize>,
    ) -> Vec<std::ops::Range<usize>> {
        let cells = self.cells[l];
        if range.is_empty() {
            return Vec::new();
        }
        let n = range.len().min(cells);
        let start = (range.end - n) % cells;
        if start + n <= cells {
            std::iter::once(start..start + n).collect()
        } else {
            vec![start..cells, 0..start + n - cells]
        }
    }

    /// The cell moves of a context shift of one sequence in layer `l` (a sliding-window layer when
    /// `window` is set): of its `len` positions the first `keep` stay, the next `discard` go, and
    /// the rest move down by `discard`. Each new position `q` the layer still holds after the shift
    /// (the last `cells`) takes the cell of its old position; positions the ring has already
    /// overwritten are left alone when no later token's window reaches them, and fail the shift
    /// when one does (a sliding-window layer whose window reaches back into a kept prefix older
    /// than its ring). Moves come ordered as [`ShiftRun`]s: chains end first, cycles marked.
    pub fn shift_runs(
        &self,
        l: usize,
        window: Option<usize>,
        len: usize,
        keep: usize,
        discard: usize,
    ) -> Result<Vec<ShiftRun>, String> {
        let cells = self.cells[l];
        let new_len = len - discard;
        let held_from = len.saturating_sub(cells);
        // The next token (at new_len) reads from new_len + 1 − window on; later ones further on.
        let needed_from = window.map_or(0, |w| (new_len + 1).saturating_sub(w));
        let mut next: HashMap<u32, u32> = HashMap::new();
        for q in new_len.saturating_sub(cells)..new_len {
            let old = if q < keep { q } else { q + discard };
            if old < held_from {
                if q >= needed_from {
                    return Err(format!(
                        "layer {l}'s sliding-window ring ({cells} cells) no longer holds position \
                         {old}, which the window of {} positions still reads after the shift",
                        window.unwrap_or(0)
                    ));
                }
                continue;
            }
            if old != q {
                next.insert((old % cells) as u32, (q % cells) as u32);
            }
        }
        Ok(order_moves(next))
    }
}

/// Refuses a KV type whose blocks do not tile the model's head slices
/// ([`KvType::check_model`]).
pub fn check_kv_type(spec: &ModelSpec, ty: KvType) -> Result<(), EngineError> {
    ty.check_model(spec).map_err(EngineError::Unsupported)
}

/// Orders cell moves (source → destination; sources distinct, destinations distinct) into runs
/// that may run in parallel: each chain from its end back to its start, so no cell is
/// overwritten before it is read, and each cycle as a cyclic run.
fn order_moves(mut next: HashMap<u32, u32>) -> Vec<ShiftRun> {
    let dsts: std::collections::HashSet<u32> = next.values().copied().collect();
    let mut starts: Vec<u32> = next.keys().copied().filter(|c| !dsts.contains(c)).collect();
    starts.sort_unstable();
    let mut runs = Vec::new();
    for start in starts {
        let mut chain = Vec::new();
        let mut c = start;
        while let Some(d) = next.remove(&c) {
            chain.push((c, d));
            c = d;
        }
        chain.reverse();
        runs.push(ShiftRun {
            moves: chain,
            cyclic: false,
        });
    }
    // What is left are cycles.
    let mut rest: Vec<u32> = next.keys().copied().collect();
    rest.sort_unstable();
    for start in rest {
        let mut cycle = Vec::new();
        let mut c = start;
        while let Some(d) = next.remove(&c) {
            cycle.push((c, d));
            c = d;
        }
        if cycle.is_empty() {
            continue;
        }
        // Followed forward: c0→c1, …, c(m−1)→c0. Run backward from c(m−2)→c(m−1), which
        // overwrites the source of the last move c(m−1)→c0: the run saves that source first.
        let last = cycle.remove(cycle.len() - 1);
        cycle.reverse();
        cycle.push(last);
        runs.push(ShiftRun {
            moves: cycle,
            cyclic: true,
        });
    }
    runs
}

/// The host copies of the layers whose attention runs on the CPU or streams its KV: one buffer
/// per layer (K then V), made on first use. With a device they are the device's host memory
/// (page-locked on CUDA) so copies can reach them asynchronously.
pub struct HostKv {
    /// The layout.
    pub layout: KvLayout,
    layers: Vec<Option<HostBuf>>,
}

impl HostKv {
    /// No layer allocated yet.
    pub fn new(layout: KvLayout) -> HostKv {
        let n = layout.cells.len();
        HostKv {
            layout,
            layers: vec![None; n],
        }
    }

    /// Layer `l`'s buffer, made with `alloc` when absent.
    pub fn layer(
        &mut self,
        l: usize,
        alloc: &dyn Fn(usize) -> Result<HostBuf, EngineError>,
    ) -> Result<HostBuf, EngineError> {
        if let Some(b) = &self.layers[l] {
            return Ok(b.clone());
        }
        let b = alloc(self.layout.layer_bytes(l))?;
        self.layers[l] = Some(b.clone());
        Ok(b)
    }

    /// Layer `l`'s buffer if it exists.
    pub fn get(&self, l: usize) -> Option<&HostBuf> {
        self.layers[l].as_ref()
    }

    /// Bytes of the allocated layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|b| b.len()).sum()
    }

    /// Drops every layer (their cells are forgotten).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }
}

/// [`KvAccess`] over host buffers of the layout.
pub struct HostKvAccess<'a> {
    /// The cache.
    pub kv: &'a mut HostKv,
    /// Allocator for layers not yet made.
    pub alloc: &'a dyn Fn(usize) -> Result<HostBuf, EngineError>,
}

impl KvAccess for HostKvAccess<'_> {
    fn with_layer(
        &mut self,
        layer: usize,
        f: &mut dyn FnMut(LayerKvMut<'_>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let buf = self.kv.layer(layer, self.alloc)?;
        let layout = &self.kv.layout;
        with_bytes_as_kv(&buf, layout, layer, f)
    }
}

/// Calls `f` with the K and V cells of a layer allocation `buf` (laid out as [`KvLayout`] says).
pub fn with_bytes_as_kv(
    buf: &HostBuf,
    layout: &KvLayout,
    layer: usize,
    f: &mut dyn FnMut(LayerKvMut<'_>) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let (kb, vo, vb) = (
        layout.k_bytes(layer),
        layout.v_offset(layer),
        layout.v_bytes(layer),
    );
    let cells = layout.cells[layer];
    let ty = layout.ty;
    let mut res = Ok(());
    buf.write(&mut |bytes: &mut [u8]| {
        let (kpart, rest) = bytes.split_at_mut(vo);
        res = f(LayerKvMut {
            k: &mut kpart[..kb],
            v: &mut rest[..vb],
            cells,
            ty,
        });
    });
    res
}

/// Host memory for engines without a device.
pub fn plain_alloc(bytes: usize) -> Result<HostBuf, EngineError> {
    Ok(std::sync::Arc::new(PlainHostMem::new(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the moves on cells holding their own index: each destination must end up with its
    /// source's original content, every other cell untouched.
    fn apply(runs: &[ShiftRun], n: usize) -> Vec<u32> {
        let mut cells: Vec<u32> = (0..n as u32).collect();
        for r in runs {
            let saved = r.cyclic.then(|| cells[r.moves.last().unwrap().0 as usize]);
            for (i, &(s, d)) in r.moves.iter().enumerate() {
                cells[d as usize] = match saved {
                    Some(v) if i + 1 == r.moves.len() => v,
                    _ => cells[s as usize],
                };
            }
        }
        cells
    }

    #[test]
    fn moves_in_runs_act_as_one_simultaneous_move() {
        for (cells, len, keep, discard) in [
            (48, 40, 3, 18),
            (48, 48, 0, 24),
            (12, 40, 3, 18),
            (12, 47, 0, 23),
            (12, 30, 2, 12),
            (12, 40, 0, 13),
        ] {
            let layout = KvLayout {
                cells: vec![cells],
                n_seq: 1,
                k_cols: vec![2],
                v_cols: vec![2],
                n_ctx: 48,
                ty: KvType::F16,
            };
            let window = (cells < 48).then_some(8);
            let runs = layout.shift_runs(0, window, len, keep, discard).unwrap();
            let got = apply(&runs, cells);
            let new_len = len - discard;
            for q in new_len.saturating_sub(cells)..new_len {
                let old = if q < keep { q } else { q + discard };
                if old + cells >= len {
                    assert_eq!(got[q % cells], (old % cells) as u32, "{cells} {len} {q}");
                }
            }
            // Rings moved by a multiple-free amount cycle; the whole context only chains.
            let cyclic = runs.iter().any(|r| r.cyclic);
            assert_eq!(
                cyclic,
                cells < 48,
                "{cells} {len} {keep} {discard}: {runs:?}"
            );
        }
    }
}
