//! Rotary position embedding (adjacent or NeoX pairing, llama3 frequency factors, YaRN), and
//! the context shift that moves KV cells and re-ropes their keys by the position delta.

use super::PAR_ROWS;
use crate::kv::KvType;
use crate::pool::{self, SharedSlice};
use pshard_model::graph::RopeYarn;

/// How rotary embedding pairs dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairing {
    /// (2i, 2i+1)
    Adjacent,
    /// (i, i + n_dims/2)
    Neox,
}

/// Rotary embedding parameters.
#[derive(Clone, Copy, Debug)]
pub struct Rope<'a> {
    /// Pairing mode.
    pub pairing: RopePairing,
    /// Rotated dimensions per head.
    pub n_dims: usize,
    /// Frequency base.
    pub base: f32,
    /// Positions are multiplied by this.
    pub pos_scale: f32,
    /// Per-pair frequency divisors (llama3), `n_dims / 2` long.
    pub freq_factors: Option<&'a [f32]>,
    /// YaRN's per-pair mix and magnitude.
    pub yarn: Option<RopeYarn>,
}

/// The parameters the angle rates depend on (a cache key; floats as bits but YaRN's).
#[derive(Clone, Debug, PartialEq)]
struct RatesKey {
    n_dims: usize,
    base: u32,
    pos_scale: u32,
    freq_factors: Option<Vec<u32>>,
    /// Compared as floats: a NaN never matches (the rates are then computed again).
    yarn: Option<RopeYarn>,
}

thread_local! {
    /// The angle rates of the last rope parameters on this thread: a decode step ropes q and k
    /// of every layer with the same parameters, and computing the rates (a `powf` per pair)
    /// each time made qwen3's decode rope 19% slower (dev VM, `pshard bench --op-times`).
    static RATES: std::cell::RefCell<Option<(RatesKey, Vec<f32>)>> =
        const { std::cell::RefCell::new(None) };
}

impl Rope<'_> {
    /// Per pair: the angle per unit of position (positions are not pre-scaled); the last
    /// parameters' rates are kept per thread.
    fn angle_rates(&self) -> Vec<f32> {
        let key = RatesKey {
            n_dims: self.n_dims,
            base: self.base.to_bits(),
            pos_scale: self.pos_scale.to_bits(),
            freq_factors: self
                .freq_factors
                .map(|f| f.iter().map(|v| v.to_bits()).collect()),
            yarn: self.yarn,
        };
        RATES.with(|c| {
            let mut c = c.borrow_mut();
            match &*c {
                Some((k, rates)) if *k == key => rates.clone(),
                _ => {
                    let rates = self.compute_angle_rates();
                    *c = Some((key, rates.clone()));
                    rates
                }
            }
        })
    }

    /// [`Rope::angle_rates`], computed.
    fn compute_angle_rates(&self) -> Vec<f32> {
        (0..self.n_dims / 2)
            .map(|i| {
                let mut f = self.base.powf(-2.0 * i as f32 / self.n_dims as f32);
                if let Some(ff) = self.freq_factors {
                    f /= ff[i];
                }
                match self.yarn {
                    Some(y) => f * y.angle_factor(i, self.pos_scale),
                    None => f * self.pos_scale,
                }
            })
            .collect()
    }

    /// `(sin, cos)` of each pair at `pos`, times YaRN's magnitude.
    fn table(&self, rates: &[f32], pos: u32) -> Vec<(f32, f32)> {
        Self::table_at(rates, pos as f32, self.yarn.map_or(1.0, |y| y.mscale))
    }

    /// `(sin, cos)` of each pair at `pos` (any real, negative turns back), times `magnitude`.
    fn table_at(rates: &[f32], pos: f32, magnitude: f32) -> Vec<(f32, f32)> {
        rates
            .iter()
            .map(|f| {
                let (s, c) = (pos * f).sin_cos();
                (s * magnitude, c * magnitude)
            })
            .collect()
    }

    /// Rotates the first `n_dims` values of one head by `table`.
    #[inline(always)]
    fn rotate(&self, head: &mut [f32], table: &[(f32, f32)]) {
        let half = self.n_dims / 2;
        for (i, &(s, c)) in table.iter().enumerate() {
            let (a, b) = match self.pairing {
                RopePairing::Adjacent => (2 * i, 2 * i + 1),
                RopePairing::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

/// Rope of `n_heads` heads per row taken from `src` (head `h` at `h·src_stride + src_off`) into
/// `dst` (at `h·dst_stride + dst_off`), `n_dims` values each; rows of `src` and `dst` are
/// `positions.len()` long. Multi-head latent attention ropes its key and query parts this way.
#[allow(clippy::too_many_arguments)]
pub fn rope_heads(
    src: &[f32],
    (src_stride, src_off): (usize, usize),
    dst: &mut [f32],
    (dst_stride, dst_off): (usize, usize),
    n_heads: usize,
    positions: &[u32],
    r: &Rope,
) {
    let n = positions.len().max(1);
    let (sc, dc) = (src.len() / n, dst.len() / n);
    let rates = r.angle_rates();
    for (t, &pos) in positions.iter().enumerate() {
        let table = r.table(&rates, pos);
        for h in 0..n_heads {
            let d = &mut dst[t * dc + h * dst_stride + dst_off..][..r.n_dims];
            d.copy_from_slice(&src[t * sc + h * src_stride + src_off..][..r.n_dims]);
            r.rotate(d, &table);
        }
    }
}

/// Applies rope in place to `x` (`positions.len()` rows of heads of `head_dim`).
pub fn rope(x: &mut [f32], head_dim: usize, positions: &[u32], r: &Rope) {
    let cols = x.len() / positions.len().max(1);
    // Per-pair angle rates, computed once per call.
    let rates = r.angle_rates();
    if positions.len() >= PAR_ROWS {
        let xs = SharedSlice::new(x);
        pool::for_range(positions.len(), 1, |rg| {
            // SAFETY: participants get disjoint row ranges.
            let rows = unsafe { xs.range_mut(rg.start * cols..rg.end * cols) };
            rope_rows_simd(rows, cols, head_dim, &positions[rg], r, &rates);
        });
    } else {
        rope_rows_simd(x, cols, head_dim, positions, r, &rates);
    }
}

/// The rows of [`rope`] (`cols` values each, heads of `head_dim`) at `positions`.
#[inline(always)]
fn rope_rows(
    x: &mut [f32],
    cols: usize,
    head_dim: usize,
    positions: &[u32],
    r: &Rope,
    rates: &[f32],
) {
    for (row, &pos) in x.chunks_mut(cols.max(1)).zip(positions) {
        let table = r.table(rates, pos);
        for head in row.chunks_mut(head_dim) {
            r.rotate(head, &table);
        }
    }
}

multiversion!(
    /// [`rope_rows`] at the best SIMD level.
    fn rope_rows_simd(
        x: &mut [f32],
        cols: usize,
        head_dim: usize,
        positions: &[u32],
        r: &Rope,
        rates: &[f32],
    ) => rope_rows
);

/// One ordered run of KV cell moves of a context shift. Moves run in order; runs touch disjoint
/// cells, so they may run in parallel. A cyclic run's first move overwrites its last move's
/// source: that source is read before anything is written (a single self-move rotates a cell in
/// place).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShiftRun {
    /// (source cell, destination cell), in the order they run.
    pub moves: Vec<(u32, u32)>,
    /// Whether the run is a cycle (see above).
    pub cyclic: bool,
}

/// Moves cells of one sequence's KV rows (`cells` is `n_cells` rows of `cols` values in `ty`)
/// as `runs` say, each moved row rotated by the rope angles of `delta` positions when `rope` is
/// given (K of a layer with rotary embeddings: in each head of `head_dim` values, the
/// `rope.n_dims` from `rope_off` on; latent attention's one head ropes after its latent), copied
/// byte for byte otherwise (V, or K without rope). The angles are the forward rope's (frequency
/// factors, position scale, YaRN's per-pair mix) but not YaRN's magnitude: the cached K already
/// carries it, and a rotation by the difference of two positions' angles keeps magnitudes. A
/// rotated row is widened to f32, rotated and stored back in `ty` (Q8_0: quantized afresh, its
/// blocks' scales from the rotated values), as the CUDA `kv_shift` kernel does.
#[allow(clippy::too_many_arguments)]
pub fn kv_shift(
    cells: &mut [u8],
    ty: KvType,
    cols: usize,
    (head_dim, rope_off): (usize, usize),
    rope: Option<&Rope>,
    delta: i64,
    runs: &[ShiftRun],
) {
    let table = rope
        .map(|r| Rope::table_at(&r.angle_rates(), delta as f32, 1.0))
        .unwrap_or_default();
    let rb = ty.row_bytes(cols);
    let row = |c: u32| c as usize * rb..(c as usize + 1) * rb;
    let mut buf = vec![0f32; cols];
    let mut from = vec![0u8; rb];
    for run in runs {
        let Some(&(last_src, _)) = run.moves.last() else {
            continue;
        };
        let saved: Option<Vec<u8>> = run.cyclic.then(|| cells[row(last_src)].to_vec());
        for (i, &(src, dst)) in run.moves.iter().enumerate() {
            match &saved {
                Some(v) if i + 1 == run.moves.len() => from.copy_from_slice(v),
                _ => from.copy_from_slice(&cells[row(src)]),
            }
            match rope {
                Some(r) => {
                    ty.load(&from, &mut buf);
                    for head in buf.chunks_mut(head_dim) {
                        r.rotate(&mut head[rope_off..], &table);
                    }
                    ty.store(&buf, &mut cells[row(dst)]);
                }
                None => cells[row(dst)].copy_from_slice(&from),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn rope_modes_rotate_the_right_pairs() {
        // One head of 4 dims, position 1, base such that pair 0 angle = 1 rad.
        let r = Rope {
            pairing: RopePairing::Adjacent,
            n_dims: 4,
            base: 10000.0,
            pos_scale: 1.0,
            freq_factors: None,
            yarn: None,
        };
        let mut x = vec![1.0f32, 0.0, 1.0, 0.0];
        rope(&mut x, 4, &[1], &r);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        let f1 = 10000f32.powf(-0.5);
        assert!((x[2] - f1.cos()).abs() < 1e-6 && (x[3] - f1.sin()).abs() < 1e-6);
        let r = Rope {
            pairing: RopePairing::Neox,
            ..r
        };
        let mut y = vec![1.0f32, 1.0, 0.0, 0.0];
        rope(&mut y, 4, &[1], &r);
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6);
        assert!((y[1] - f1.cos()).abs() < 1e-6 && (y[3] - f1.sin()).abs() < 1e-6);
    }

    /// The kept angle rates follow every parameter they depend on: parameters that differ only
    /// in base, position scale, frequency factors or YaRN each give, right after any other on the
    /// same thread, the rotation they give first.
    #[test]
    fn kept_angle_rates_follow_the_parameters() {
        let ff = [1.0f32, 2.0, 4.0, 8.0];
        let base = Rope {
            pairing: RopePairing::Neox,
            n_dims: 8,
            base: 10000.0,
            pos_scale: 1.0,
            freq_factors: None,
            yarn: None,
        };
        let variants = [
            base,
            Rope {
                base: 500.0,
                ..base
            },
            Rope {
                pos_scale: 0.25,
                ..base
            },
            Rope {
                freq_factors: Some(&ff),
                ..base
            },
            Rope {
                yarn: Some(RopeYarn {
                    low: 1.0,
                    high: 3.0,
                    ext_factor: 1.0,
                    mscale: 1.2,
                }),
                ..base
            },
        ];
        let run = |r: &Rope| {
            let mut x: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
            rope(&mut x, 8, &[7], r);
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let first: Vec<_> = variants.iter().map(run).collect();
        for (i, a) in first.iter().enumerate() {
            for b in &first[i + 1..] {
                assert_ne!(a, b, "variants must rotate differently");
            }
        }
        // Every variant right after every other one.
        for (i, a) in variants.iter().enumerate() {
            for (j, b) in variants.iter().enumerate() {
                run(a);
                assert_eq!(run(b), first[j], "variant {j} after {i}");
            }
        }
    }

    /// A K row roped at position 40 and shifted by -18 equals the row roped at 22 (up to f16
    /// rounding) for YaRN with a magnitude (applied once, by the forward rope) and for latent
    /// attention's row (latent untouched, rope part after it); the latent and the unrotated
    /// tail of a partial rope are copied exactly.
    #[test]
    fn kv_shift_turns_k_to_its_new_position() {
        let yarn = RopeYarn {
            low: 2.0,
            high: 9.0,
            ext_factor: 1.0,
            mscale: 1.35,
        };
        // (pairing, head width, rotated dims, offset, YaRN).
        for (pairing, head, n_dims, off, y) in [
            (RopePairing::Neox, 32, 32, 0, Some(yarn)),
            (RopePairing::Adjacent, 32, 16, 0, Some(yarn)),
            (RopePairing::Neox, 32, 16, 0, None),
            (RopePairing::Adjacent, 48, 16, 32, Some(yarn)),
        ] {
            let r = Rope {
                pairing,
                n_dims,
                base: 10000.0,
                pos_scale: 0.25,
                freq_factors: None,
                yarn: y,
            };
            let cols = 2 * head;
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 37 % 17) as f32 - 8.0) / 4.0)
                .collect();
            let roped_at = |pos: u32| {
                let mut v = x.clone();
                for h in v.chunks_mut(head) {
                    let mut part = h[off..off + n_dims].to_vec();
                    rope(&mut part, n_dims, &[pos], &r);
                    h[off..off + n_dims].copy_from_slice(&part);
                }
                v
            };
            // Cells 0 and 1: cell 1 (position 40) moves to cell 0.
            let cells: Vec<f16> = [vec![0f32; cols], roped_at(40)]
                .concat()
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let mut cells: Vec<u8> = bytemuck::cast_slice(&cells).to_vec();
            let runs = [ShiftRun {
                moves: vec![(1, 0)],
                cyclic: false,
            }];
            kv_shift(
                &mut cells,
                KvType::F16,
                cols,
                (head, off),
                Some(&r),
                -18,
                &runs,
            );
            let want = roped_at(22);
            let mut got = vec![0f32; cols];
            KvType::F16.load(&cells[..KvType::F16.row_bytes(cols)], &mut got);
            let far = roped_at(40);
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                let in_rope = (off..off + n_dims).contains(&(j % head));
                if in_rope {
                    assert!(
                        (g - w).abs() < 1e-2,
                        "{pairing:?} {off}: col {j}: {g} vs {w}"
                    );
                } else {
                    assert_eq!(*g, f16::from_f32(*w).to_f32(), "{pairing:?} col {j} copied");
                }
            }
            let moved: f32 = far.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum();
            assert!(
                moved > 1.0,
                "{pairing:?} {off}: positions 40 and 22 too alike"
            );
            // Q8_0 rows: dequantized, rotated, quantized afresh — within two roundings of the
            // row roped at 22: the first (half a step, max|x| / 127, per value) mixed by the
            // rotation into at most 0.71 of a step, the second half a step.
            let mut q8 = vec![0u8; 2 * KvType::Q8_0.row_bytes(cols)];
            KvType::Q8_0.store(&roped_at(40), &mut q8[KvType::Q8_0.row_bytes(cols)..]);
            kv_shift(
                &mut q8,
                KvType::Q8_0,
                cols,
                (head, off),
                Some(&r),
                -18,
                &runs,
            );
            KvType::Q8_0.load(&q8[..KvType::Q8_0.row_bytes(cols)], &mut got);
            let step = want.iter().chain(&far).fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1.21 * step + 1e-4,
                    "q8_0 {pairing:?} {off}: col {j}: {g} vs {w}"
                );
            }
        }
    }

    /// Moves without rope copy Q8_0 rows byte for byte, cycles included.
    #[test]
    fn kv_shift_copies_q8_0_rows_exactly() {
        let cols = 64;
        let rb = KvType::Q8_0.row_bytes(cols);
        let mut cells = vec![0u8; 3 * rb];
        for c in 0..3 {
            let x: Vec<f32> = (0..cols).map(|i| (i * (c + 2)) as f32 - 9.0).collect();
            KvType::Q8_0.store(&x, &mut cells[c * rb..(c + 1) * rb]);
        }
        let before = cells.clone();
        // 0 → 1 → 2 → 0 as one cycle (run backward, the last source saved).
        let runs = [ShiftRun {
            moves: vec![(1, 2), (0, 1), (2, 0)],
            cyclic: true,
        }];
        kv_shift(&mut cells, KvType::Q8_0, cols, (cols, 0), None, -5, &runs);
        assert_eq!(&cells[rb..2 * rb], &before[..rb]);
        assert_eq!(&cells[2 * rb..], &before[rb..2 * rb]);
        assert_eq!(&cells[..rb], &before[2 * rb..]);
    }

    #[test]
    fn yarn_rope_mixes_and_scales() {
        // Pairs below `low` keep their frequency, above `high` take pos_scale; all scaled by mscale.
        let y = RopeYarn {
            low: 1.0,
            high: 3.0,
            ext_factor: 1.0,
            mscale: 1.5,
        };
        let r = Rope {
            pairing: RopePairing::Adjacent,
            n_dims: 8,
            base: 10.0,
            pos_scale: 0.25,
            freq_factors: None,
            yarn: Some(y),
        };
        let mut x = vec![1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        rope(&mut x, 8, &[3], &r);
        for (i, mix) in [(0usize, 1.0f32), (1, 1.0), (2, 0.25 * 0.5 + 0.5), (3, 0.25)] {
            let theta = 3.0 * 10f32.powf(-2.0 * i as f32 / 8.0) * mix;
            assert!((x[2 * i] - 1.5 * theta.cos()).abs() < 1e-5, "pair {i}");
            assert!((x[2 * i + 1] - 1.5 * theta.sin()).abs() < 1e-5, "pair {i}");
        }
    }
}
