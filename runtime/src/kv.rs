//! The KV cache: per-layer f16 buffers, V not transposed, contiguous per sequence, so a layer's KV is
//! the same bytes wherever it lives (CPU or GPU). Sliding-window layers keep only the window plus one
//! batch of slots (a ring): position `p` lives in slot `p % cells`.

use half::f16;
use pshard_kernels::ops::KvView;
use pshard_model::spec::ModelSpec;

/// Why a KV operation failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KvError {
    /// The context is full.
    #[error("context full: {needed} positions needed but the context holds {n_ctx} (raise -c)")]
    ContextFull {
        /// Positions the request needs.
        needed: usize,
        /// Context size.
        n_ctx: usize,
    },
}

/// One layer's cache.
#[derive(Clone, Debug)]
pub struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
    cells: usize,
    k_cols: usize,
    v_cols: usize,
}

impl LayerKv {
    /// Writes rows of k and v at `positions`.
    pub fn write(&mut self, positions: &[u32], k: &[f32], v: &[f32]) {
        for (t, &p) in positions.iter().enumerate() {
            let slot = p as usize % self.cells;
            let kd = &mut self.k[slot * self.k_cols..][..self.k_cols];
            for (d, s) in kd.iter_mut().zip(&k[t * self.k_cols..][..self.k_cols]) {
                *d = f16::from_f32(*s);
            }
            let vd = &mut self.v[slot * self.v_cols..][..self.v_cols];
            for (d, s) in vd.iter_mut().zip(&v[t * self.v_cols..][..self.v_cols]) {
                *d = f16::from_f32(*s);
            }
        }
    }

    /// The attention kernel's view.
    pub fn view(&self) -> KvView<'_> {
        KvView {
            k: &self.k,
            v: &self.v,
            cells: self.cells,
        }
    }

    /// Slots held.
    pub fn cells(&self) -> usize {
        self.cells
    }
}

/// The whole model's cache for one sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    n_ctx: usize,
}

impl KvCache {
    /// Allocates a cache for `n_ctx` positions and batches of at most `max_batch` tokens.
    pub fn new(spec: &ModelSpec, n_ctx: usize, max_batch: usize) -> KvCache {
        let h = &spec.hparams;
        let k_cols = h.n_head_kv * h.head_dim_k;
        let v_cols = h.n_head_kv * h.head_dim_v;
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                // A batch writes up to max_batch new slots before its first row reads the window.
                let cells = match l.window {
                    Some(w) => n_ctx.min(w + max_batch),
                    None => n_ctx,
                };
                LayerKv {
                    k: vec![f16::ZERO; cells * k_cols],
                    v: vec![f16::ZERO; cells * v_cols],
                    cells,
                    k_cols,
                    v_cols,
                }
            })
            .collect();
        KvCache { layers, n_ctx }
    }

    /// Checks that positions `start..start + n` fit.
    pub fn check(&self, start: usize, n: usize) -> Result<(), KvError> {
        if start + n > self.n_ctx {
            return Err(KvError::ContextFull {
                needed: start + n,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }

    /// Context size.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// A layer's cache.
    pub fn layer(&self, l: usize) -> &LayerKv {
        &self.layers[l]
    }

    /// A layer's cache, mutable.
    pub fn layer_mut(&mut self, l: usize) -> &mut LayerKv {
        &mut self.layers[l]
    }

    /// Bytes held by all layers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 2)
            .sum()
    }
}
