//! The KV cache: one layout wherever a layer's cells live. Per layer, `n_seq · cells` rows of K
//! (then of V) as f16, of the layer's widths ([`pshard_model::bytes::kv_cols`]: latent attention
//! keeps only K rows of its latent and rope key), V not transposed, the cells of each sequence contiguous; position `p` of
//! sequence `s` lives in cell `s · cells + p % cells`, where `cells` is the context for global
//! layers and a ring of the window plus one batch for sliding-window layers
//! ([`pshard_model::bytes::kv_cells`]). A layer's bytes are the same on the host and on the device,
//! so moving it between them is a copy: one allocation holds K at offset 0 and V at
//! [`KvLayout::v_offset`].

use half::f16;
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
    /// f16 values per K row, per layer ([`pshard_model::bytes::kv_cols`]).
    pub k_cols: Vec<usize>,
    /// f16 values per V row, per layer (0 where values live inside K).
    pub v_cols: Vec<usize>,
    /// Context per sequence.
    pub n_ctx: usize,
}

impl KvLayout {
    /// The layout for `n_seq` sequences of `n_ctx` positions evaluated in batches of at most
    /// `max_batch` tokens.
    pub fn new(spec: &ModelSpec, n_ctx: usize, max_batch: usize, n_seq: usize) -> KvLayout {
        let layers = 0..spec.layers.len();
        let cols: Vec<(usize, usize)> = layers
            .clone()
            .map(|l| pshard_model::bytes::kv_cols(spec, l))
            .collect();
        KvLayout {
            cells: layers
                .map(|l| pshard_model::bytes::kv_cells(spec, l, n_ctx, max_batch))
                .collect(),
            n_seq: n_seq.max(1),
            k_cols: cols.iter().map(|c| c.0).collect(),
            v_cols: cols.iter().map(|c| c.1).collect(),
            n_ctx,
        }
    }

    /// Bytes of layer `l`'s K rows.
    pub fn k_bytes(&self, l: usize) -> usize {
        self.n_seq * self.cells[l] * self.k_cols[l] * 2
    }

    /// Bytes of layer `l`'s V rows.
    pub fn v_bytes(&self, l: usize) -> usize {
        self.n_seq * self.cells[l] * self.v_cols[l] * 2
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
        (s * self.cells[l] + c) * cols * 2
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
    let mut res = Ok(());
    buf.write(&mut |bytes: &mut [u8]| {
        let (kpart, rest) = bytes.split_at_mut(vo);
        let k: &mut [f16] = bytemuck::cast_slice_mut(&mut kpart[..kb]);
        let v: &mut [f16] = bytemuck::cast_slice_mut(&mut rest[..vb]);
        res = f(LayerKvMut { k, v, cells });
    });
    res
}

/// Host memory for engines without a device.
pub fn plain_alloc(bytes: usize) -> Result<HostBuf, EngineError> {
    Ok(std::sync::Arc::new(PlainHostMem::new(bytes)))
}
