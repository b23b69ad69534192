//! Sequences in the KV cache: forgetting, truncating and shifting them, and their sizes.

use super::*;

impl Engine {
    /// Forgets sequence 0 (positions restart at 0).
    pub fn reset(&mut self) {
        self.reset_seq(0);
    }

    /// Forgets sequence `s`.
    pub fn reset_seq(&mut self, s: usize) {
        if let Some(p) = self.n_past.get_mut(s) {
            *p = 0;
        }
    }

    /// Keeps the first `len` positions of sequence `s` and forgets the rest, so a continuation
    /// of a cached prefix evaluates only its new tokens. The cells past `len` are simply
    /// overwritten later. Fails (the sequence unchanged) when `len` exceeds the sequence, or when
    /// a sliding-window layer's ring has already overwritten cells the next position would read:
    /// the ring holds the last `cells` positions and the next one reads the `window` before it,
    /// so at most `cells − window` positions can be dropped (one batch, see
    /// [`pshard_model::bytes::kv_cells`]). Callers then [`Engine::reset_seq`].
    pub fn truncate_seq(&mut self, s: usize, len: usize) -> Result<(), EngineError> {
        let cur = self.seq_len(s);
        if s >= self.n_past.len() || len > cur {
            return Err(EngineError::Batch(format!(
                "cannot truncate sequence {s} of {cur} positions to {len}"
            )));
        }
        for (l, layer) in self.model.spec.layers.iter().enumerate() {
            if let Some(w) = layer.window {
                let cells = self.kv.layout.cells[l];
                if cells < self.n_ctx() && cur - len > cells.saturating_sub(w) {
                    return Err(EngineError::Batch(format!(
                        "sequence {s}: layer {l}'s sliding-window ring ({cells} cells, window {w}) \
                         no longer holds the positions before {len}"
                    )));
                }
            }
        }
        self.n_past[s] = len;
        Ok(())
    }

    /// Context shift of sequence `s` (llama.cpp's `--context-shift`): its first `keep` positions
    /// stay, the next `discard` are forgotten, and the rest move down by `discard` positions —
    /// their cells move in every layer wherever its KV lives (host or device), and their cached K
    /// turns back by the rope angles of `discard` positions (the layer's own rope: pairing,
    /// rotated dimensions, base, position scale, frequency factors, YaRN's per-pair mix but not
    /// its magnitude, which K already carries; latent attention turns the rope part after the
    /// latent), so it equals K computed at the new positions up to the cache type's rounding
    /// (Q8_0: rows dequantized, turned and quantized afresh). K of layers without rope and every
    /// V only move.
    /// A sliding-window layer moves the positions its ring still holds; the shift fails (the
    /// sequence unchanged) when the window of the next token reaches a kept position the ring
    /// has already overwritten.
    pub fn shift_seq(&mut self, s: usize, keep: usize, discard: usize) -> Result<(), EngineError> {
        let len = self.seq_len(s);
        if s >= self.n_past.len() || keep + discard > len {
            return Err(EngineError::Batch(format!(
                "cannot shift sequence {s} of {len} positions: keep {keep}, discard {discard}"
            )));
        }
        if discard == 0 {
            return Ok(());
        }
        let spec = &self.model.spec;
        let layout = &self.kv.layout;
        let runs = (0..spec.layers.len())
            .map(|l| layout.shift_runs(l, spec.layers[l].window, len, keep, discard))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| EngineError::Batch(format!("context shift of sequence {s}: {e}")))?;
        // Each layer's K rope: the op that ropes the K its attention writes.
        let g = pshard_model::arch::build_graph(spec, 1, 1)?;
        let mut ropes: Vec<Option<KRope>> = vec![None; spec.layers.len()];
        for n in &g.nodes {
            if let Op::Attention { layer, k, .. } = n.op {
                ropes[layer] = g
                    .nodes
                    .iter()
                    .filter(|m| m.layer == Some(layer))
                    .find_map(|m| KRope::of(&m.op, k));
            }
        }
        if let Some(d) = &mut self.dev {
            d.dev.synchronize()?;
            d.run_end_pending = false;
        }
        let delta = -(discard as i64);
        for (l, runs) in runs.into_iter().enumerate() {
            if runs.is_empty() {
                continue;
            }
            let rope = ropes[l];
            match (self.kv_home[l], self.resident_kv(l)) {
                (KvHome::Device, Some(ptr)) => {
                    let side = self.dev.as_ref().expect("device-homed KV has a device");
                    let freq_factors = rope.and_then(|r| r.rope.freq_factors).map(|t| WeightRef {
                        tensor: t,
                        addr: side.vectors.get(&t).copied().unwrap_or(0),
                        first_row: 0,
                    });
                    side.dev.shift_kv(&KvShift {
                        kv: KvRef {
                            k: ptr,
                            v: ptr + layout.v_offset(l) as u64,
                            k_cols: layout.k_cols[l],
                            v_cols: layout.v_cols[l],
                            cells: layout.cells[l],
                            seqs: layout.n_seq,
                            ty: layout.ty,
                        },
                        seq: s,
                        rope,
                        freq_factors,
                        delta,
                        runs,
                    })?;
                }
                (KvHome::Device, None) => {
                    return Err(EngineError::Device(format!("layer {l}'s KV is lost")));
                }
                (KvHome::Host, _) => {
                    let Some(hb) = self.kv.get(l) else {
                        // Never written: nothing to move.
                        continue;
                    };
                    let model: &Model = &self.model;
                    let r = rope.map(|r| (crate::cpu::rope_op(&r.rope, model), r.span()));
                    with_bytes_as_kv(hb, layout, l, &mut |kv| {
                        let (cells, ty) = (kv.cells, kv.ty);
                        for (rows, cols, r) in [
                            (kv.k, layout.k_cols[l], r.as_ref()),
                            (kv.v, layout.v_cols[l], None),
                        ] {
                            let rb = ty.row_bytes(cols);
                            let seq = &mut rows[s * cells * rb..(s + 1) * cells * rb];
                            let (rope, span) = (r.map(|r| &r.0), r.map_or((cols, 0), |r| r.1));
                            pshard_kernels::ops::kv_shift(seq, ty, cols, span, rope, delta, &runs);
                        }
                        Ok(())
                    })?;
                }
            }
        }
        if let Some(d) = &mut self.dev {
            d.dev.synchronize()?;
        }
        self.n_past[s] = len - discard;
        Ok(())
    }

    /// Positions of sequence 0 evaluated so far.
    pub fn n_past(&self) -> usize {
        self.n_past[0]
    }

    /// Positions of sequence `s` evaluated so far.
    pub fn seq_len(&self, s: usize) -> usize {
        self.n_past.get(s).copied().unwrap_or(0)
    }

    /// Sequences the engine holds.
    pub fn n_seq(&self) -> usize {
        self.n_past.len()
    }

    /// Context size per sequence.
    pub fn n_ctx(&self) -> usize {
        self.kv.layout.n_ctx
    }

    /// The KV cache's element type.
    pub fn kv_type(&self) -> KvType {
        self.kv.layout.ty
    }

    /// Bytes of the KV cache as laid out (all layers, all sequences).
    pub fn kv_bytes(&self) -> usize {
        (0..self.kv.layout.cells.len())
            .map(|l| self.kv.layout.layer_bytes(l))
            .sum()
    }
}
