//! The CPU matmul driver: a weight matrix in its file layout times activations converted to the
//! weight type's partner format, output rows split statically over the CPU pool ([`crate::pool`]).
//!
//! `out[t * out_stride + r] = Σ_c W[r, c] · X[t, c]` for the requested output rows `r`.
//!
//! Each pool participant takes one contiguous part of the rows (whole tiles), so a decode step
//! streams every weight byte once with no scheduling between ops. Several tokens (prefill) walk
//! each part in small row tiles that fit in L1, dotting every tile with all tokens before moving
//! on, so each weight row is read from memory once per call.
//!
//! Two activation precisions ([`ActPrecision`]): the fast path ([`matmul`]) rounds activations
//! to the weight type's 8-bit partner format and dots in integers, as llama.cpp does; the exact
//! path ([`matmul_exact`]) keeps f32 activations and dequantizes weight rows to f32 on the fly —
//! slower, used as an oracle (tests, GPU comparisons) where the 8-bit rounding would dominate the
//! error being measured.

use std::ops::Range;

use pshard_model::ggml_type::GgmlType;

use crate::gemm;
use crate::pool::{self, SharedSlice};
use crate::quant::exact::{dot4_f32, dot_f32};
use crate::quant::legacy::{self, TileFn, TILE};
use crate::quant::{self, act::quantize_acts_row, ActFormat, DotFn, QuantKernel, SimdLevel};

/// Errors of the CPU kernels.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// The CPU engine has no kernel for this tensor type.
    #[error("the CPU engine cannot compute with tensor type {0}")]
    UnsupportedType(GgmlType),
    /// Sizes of the operands do not fit together.
    #[error("shape mismatch: {what}")]
    ShapeMismatch {
        /// What did not fit, with the numbers.
        what: String,
    },
    /// The activations were quantized to a format the weight type does not pair with.
    #[error("{ty} weights need {want} activations, got {got}")]
    ActFormatMismatch {
        /// The weight type.
        ty: GgmlType,
        /// Its partner format's name.
        want: &'static str,
        /// The given format's name.
        got: &'static str,
    },
}

fn mismatch(what: String) -> KernelError {
    KernelError::ShapeMismatch { what }
}

/// A weight matrix as it lies in the file: `rows` rows of `cols` elements of type `ty`.
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    /// Element type (block format) of the rows.
    pub ty: GgmlType,
    /// `rows` rows, each `ty.row_bytes(cols)` bytes, back to back.
    pub data: &'a [u8],
    /// Output rows.
    pub rows: usize,
    /// Elements per row (the reduction length).
    pub cols: usize,
}

impl WeightMatrix<'_> {
    /// Bytes of one row, after checking that `cols` is whole blocks and `data` holds exactly
    /// `rows` rows.
    pub fn row_bytes(&self) -> Result<usize, KernelError> {
        let rb = self
            .ty
            .row_bytes(self.cols as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| {
                mismatch(format!(
                    "{} weight rows of {} elements are not whole blocks of {}",
                    self.ty,
                    self.cols,
                    self.ty.block_size()
                ))
            })?;
        match rb.checked_mul(self.rows) {
            Some(total) if total == self.data.len() => Ok(rb),
            _ => Err(mismatch(format!(
                "{} weight matrix {}x{} needs {} x {} bytes, data has {}",
                self.ty,
                self.rows,
                self.cols,
                self.rows,
                rb,
                self.data.len()
            ))),
        }
    }
}

/// Activations converted to a partner format: `n_rows` rows (tokens) of `cols` elements.
///
/// Row `t` occupies `data[t * row_bytes ..][.. format.row_bytes(cols)]`; `row_bytes` is rounded up
/// to a multiple of 4 so that every row starts 4-byte aligned relative to the buffer. Kernels
/// read rows with unaligned loads or `from_le_bytes` and do not rely on the buffer's alignment.
#[derive(Clone, Debug)]
pub struct QuantizedActs {
    /// The partner format.
    pub format: ActFormat,
    /// `n_rows * row_bytes` bytes.
    pub data: Vec<u8>,
    /// Stride between rows in bytes (a multiple of 4).
    pub row_bytes: usize,
    /// Number of rows (tokens).
    pub n_rows: usize,
    /// Elements per row.
    pub cols: usize,
}

impl QuantizedActs {
    /// An empty buffer to be filled by [`quantize_acts_into`] (reused across calls).
    pub fn empty(format: ActFormat) -> Self {
        QuantizedActs {
            format,
            data: Vec::new(),
            row_bytes: 0,
            n_rows: 0,
            cols: 0,
        }
    }

    /// The bytes of row `t` (exactly `format.row_bytes(cols)` long).
    ///
    /// # Panics
    /// If `t >= n_rows`.
    pub fn row(&self, t: usize) -> &[u8] {
        assert!(t < self.n_rows, "activation row {t} out of {}", self.n_rows);
        let used = self
            .format
            .row_bytes(self.cols)
            .expect("validated when quantized");
        &self.data[t * self.row_bytes..][..used]
    }
}

/// Elements per row below which quantizing runs on the calling thread.
const PAR_QUANT_MIN: usize = 1 << 16;

/// Quantizes `n_rows` rows of `cols` f32 activations (`x`, row-major) into `format`, reusing
/// `dst`'s allocation.
pub fn quantize_acts_into(
    format: ActFormat,
    x: &[f32],
    n_rows: usize,
    cols: usize,
    dst: &mut QuantizedActs,
) -> Result<(), KernelError> {
    let used = format.row_bytes(cols).ok_or_else(|| {
        mismatch(format!(
            "{cols} activation columns are not whole {} blocks of {}",
            format.name(),
            format.block_size()
        ))
    })?;
    if n_rows.checked_mul(cols) != Some(x.len()) {
        return Err(mismatch(format!(
            "activations: {} values given for {n_rows} rows of {cols}",
            x.len()
        )));
    }
    let row_bytes = used.div_ceil(4) * 4;
    dst.format = format;
    dst.row_bytes = row_bytes;
    dst.n_rows = n_rows;
    dst.cols = cols;
    dst.data.clear();
    dst.data.resize(n_rows * row_bytes, 0);
    if cols == 0 || n_rows == 0 {
        return Ok(());
    }
    if x.len() >= PAR_QUANT_MIN && n_rows > 1 {
        let out = SharedSlice::new(&mut dst.data);
        pool::for_range(n_rows, 1, |r| {
            for t in r {
                // SAFETY: participants get disjoint row ranges, so their byte ranges are disjoint.
                let o = unsafe { out.range_mut(t * row_bytes..t * row_bytes + used) };
                quantize_acts_row(format, &x[t * cols..(t + 1) * cols], o);
            }
        });
    } else {
        for (src, out) in x.chunks(cols).zip(dst.data.chunks_mut(row_bytes)) {
            quantize_acts_row(format, src, &mut out[..used]);
        }
    }
    Ok(())
}

/// Quantizes `n_rows` rows of `cols` f32 activations (`x`, row-major) into `format`.
///
/// # Panics
/// If `cols` is not a whole number of `format` blocks or `x.len() != n_rows * cols` (use
/// [`quantize_acts_into`] for a `Result`).
pub fn quantize_acts(format: ActFormat, x: &[f32], n_rows: usize, cols: usize) -> QuantizedActs {
    let mut q = QuantizedActs::empty(format);
    if let Err(e) = quantize_acts_into(format, x, n_rows, cols, &mut q) {
        panic!("quantize_acts: {e}");
    }
    q
}

/// Target bytes of weight rows in one tile of the batched path (fits L1 next to the activations).
const TILE_BYTES: usize = 16 << 10;
/// Total weight bytes × tokens below which the call runs on the calling thread.
const SEQ_WORK: usize = 1 << 17;

/// `out[t * out_stride + r] = dot(weight row r, act row t)` for `r` in `rows` (a sub-range of the
/// output rows: plans may split one matrix between CPU and GPU) and every activation row `t`;
/// other entries of `out` are left untouched. Rows split statically over the CPU pool.
/// Kernels: the best this CPU runs, up to [`quant::simd_cap`].
pub fn matmul(
    w: &WeightMatrix,
    x: &QuantizedActs,
    out: &mut [f32],
    out_stride: usize,
    rows: Range<usize>,
) -> Result<(), KernelError> {
    let k = quant::kernel(w.ty).ok_or(KernelError::UnsupportedType(w.ty))?;
    let job = RowsJob::new(k, quant::simd_cap(), *w, x)?;
    job.run(out, out_stride, rows)
}

/// [`matmul`] with the kernels of SIMD level `level` at most (the best this CPU runs up to it,
/// regardless of [`quant::simd_cap`]):
/// tests and benchmarks force the AVX2 or scalar path with it on a CPU that has better. From
/// [`crate::gemm::GEMM_MIN_TOKENS`] tokens the int8 GEMM runs (VNNI or AVX2 kernel, none at
/// `Scalar`); below, the register tiles are AVX-512 VNNI kernels, so below `Avx512` a few tokens go
/// through the row-at-a-time dot product.
pub fn matmul_at(
    level: SimdLevel,
    w: &WeightMatrix,
    x: &QuantizedActs,
    out: &mut [f32],
    out_stride: usize,
    rows: Range<usize>,
) -> Result<(), KernelError> {
    let k = quant::kernel_at(w.ty, level).ok_or(KernelError::UnsupportedType(w.ty))?;
    let job = RowsJob::new(k, level, *w, x)?;
    job.run(out, out_stride, rows)
}

/// The int8 GEMM of a batched matmul: the type's converter, the kernel level, the activations in
/// the GEMM's form and the rows per tile.
struct Gemm {
    conv: gemm::Converter,
    level: SimdLevel,
    acts: gemm::GemmActs,
    rows: usize,
}

thread_local! {
    /// Each thread's GEMM tile buffers, reused from tile to tile and call to call.
    static GEMM_TILE: std::cell::RefCell<gemm::Tile> = std::cell::RefCell::new(gemm::Tile::default());
}

/// A validated matmul of one weight matrix with one activation buffer: any part of its output
/// rows can be computed, by any thread ([`RowsJob::compute`]).
pub(crate) struct RowsJob<'a> {
    engine: Engine,
    w: WeightMatrix<'a>,
    x: &'a QuantizedActs,
    wrb: usize,
    /// Rows per L1 tile of the register-tile path.
    tile: usize,
    gemm: Option<Gemm>,
}

impl<'a> RowsJob<'a> {
    /// Checks `w` against `x` for kernel `k` and picks the engine of SIMD level `level`: the int8
    /// GEMM from [`gemm::GEMM_MIN_TOKENS`] tokens where the type has a converter, else the
    /// type's register tiles (AVX-512) or its dot product.
    pub(crate) fn new(
        k: QuantKernel,
        level: SimdLevel,
        w: WeightMatrix<'a>,
        x: &'a QuantizedActs,
    ) -> Result<Self, KernelError> {
        let wrb = w.row_bytes()?;
        if x.format != k.act {
            return Err(KernelError::ActFormatMismatch {
                ty: w.ty,
                want: k.act.name(),
                got: x.format.name(),
            });
        }
        if x.cols != w.cols {
            return Err(mismatch(format!(
                "activations have {} columns, weights {}",
                x.cols, w.cols
            )));
        }
        let used = x
            .format
            .row_bytes(x.cols)
            .ok_or_else(|| mismatch(format!("bad activation width {}", x.cols)))?;
        if x.row_bytes < used || x.data.len() < x.n_rows * x.row_bytes {
            return Err(mismatch(format!(
                "activation buffer: {} bytes for {} rows of stride {} (row needs {used})",
                x.data.len(),
                x.n_rows,
                x.row_bytes
            )));
        }
        let tiles = match level {
            SimdLevel::Avx512 => legacy::tiles(w.ty)
                .or_else(|| crate::quant::kquants::tiles(w.ty))
                .or_else(|| crate::quant::lut4::tiles(w.ty)),
            _ => None,
        };
        let engine = match tiles {
            Some((full, one)) => Engine::Tiles { full, one },
            None => Engine::Dot(k.dot),
        };
        let gemm = match (gemm::converter(w.ty), gemm::rows_per_tile(level)) {
            (Some(conv), Some(rows)) if x.n_rows >= gemm::GEMM_MIN_TOKENS => {
                gemm::GemmActs::from_acts(x, rows == 16).map(|acts| Gemm {
                    conv,
                    level,
                    acts,
                    rows,
                })
            }
            _ => None,
        };
        let tile = (TILE_BYTES / wrb.max(1)).clamp(TILE, 16) / TILE * TILE;
        Ok(RowsJob {
            engine,
            w,
            x,
            wrb,
            tile,
            gemm,
        })
    }

    /// Rows a part of the output should be a multiple of.
    pub(crate) fn align(&self) -> usize {
        self.gemm.as_ref().map_or(self.tile, |g| g.rows)
    }

    /// Bytes × tokens of computing `rows` output rows (what decides whether to go parallel).
    pub(crate) fn work(&self, rows: usize) -> usize {
        self.wrb.saturating_mul(rows).saturating_mul(self.x.n_rows)
    }

    /// Checks the output and computes rows `rows` into `out` (stride `out_stride`), split over
    /// the pool.
    fn run(
        &self,
        out: &mut [f32],
        out_stride: usize,
        rows: Range<usize>,
    ) -> Result<(), KernelError> {
        if !check_output(&self.w, self.x.n_rows, out.len(), out_stride, &rows)? {
            return Ok(());
        }
        let work = self.work(rows.len());
        par_rows(
            out,
            out_stride,
            self.x.n_rows,
            rows,
            self.align(),
            work,
            |r0, outs| self.compute(r0, outs),
        );
        Ok(())
    }

    /// Outputs of weight rows `r0 .. r0 + outs[0].len()` for every token `t` into `outs[t]`.
    pub(crate) fn compute(&self, r0: usize, outs: &mut [&mut [f32]]) {
        let (w, x) = (&self.w, self.x);
        let len = outs[0].len();
        if let Some(g) = &self.gemm {
            let wrow = |r: usize| &w.data[r * self.wrb..(r + 1) * self.wrb];
            GEMM_TILE.with(|t| {
                let mut tile = t.borrow_mut();
                let mut res = [[0f32; 16]; 8];
                let mut i = 0;
                while i < len {
                    let nr = (len - i).min(g.rows);
                    let range = r0 + i..r0 + i + nr;
                    tile.load(&g.conv, g.rows, w.cols, range, wrow, g.rows == 8);
                    let mut t0 = 0;
                    while t0 < x.n_rows {
                        let nt = (x.n_rows - t0).min(8);
                        gemm::tile_dot(g.level, &tile, &g.acts, t0, nt, &mut res);
                        for (j, rj) in res.iter().enumerate().take(nt) {
                            outs[t0 + j][i..i + nr].copy_from_slice(&rj[..nr]);
                        }
                        t0 += nt;
                    }
                    i += nr;
                }
            });
            return;
        }
        let n = w.cols;
        if x.n_rows == 1 {
            rows_block(
                self.engine,
                (w.data, self.wrb),
                x,
                n,
                (r0, 0, len, len),
                outs,
            );
            return;
        }
        // Tiles of rows small enough to stay in L1 while every token passes over them.
        let mut i0 = 0;
        while i0 < len {
            let i1 = (i0 + self.tile).min(len);
            rows_block(
                self.engine,
                (w.data, self.wrb),
                x,
                n,
                (r0, i0, i1, len),
                outs,
            );
            i0 = i1;
        }
    }
}

/// Checks that `out` (stride `out_stride`) can take output rows `rows` of `w` for `n_tok` tokens;
/// `Ok(false)` when there is nothing to compute.
fn check_output(
    w: &WeightMatrix,
    n_tok: usize,
    out_len: usize,
    out_stride: usize,
    rows: &Range<usize>,
) -> Result<bool, KernelError> {
    if rows.start > rows.end || rows.end > w.rows {
        return Err(mismatch(format!(
            "output rows {rows:?} outside 0..{}",
            w.rows
        )));
    }
    if n_tok == 0 || rows.is_empty() {
        return Ok(false);
    }
    if n_tok > 1 && out_stride < rows.end {
        return Err(mismatch(format!(
            "output stride {out_stride} < row end {}",
            rows.end
        )));
    }
    let need = (n_tok - 1) * out_stride + rows.end;
    if out_len < need {
        return Err(mismatch(format!(
            "output holds {out_len} floats, {n_tok} tokens x stride {out_stride} up to row {} need {need}",
            rows.end
        )));
    }
    Ok(true)
}

/// Splits output rows `rows` into one part per pool participant (whole multiples of `align`) and
/// calls `f(first_row, outs)` for each, where `outs[t]` is token `t`'s slice of the part's outputs
/// (all the same length). `work` (bytes × tokens) below [`SEQ_WORK`] runs on the calling thread.
pub(crate) fn par_rows<F>(
    out: &mut [f32],
    out_stride: usize,
    n_tok: usize,
    rows: Range<usize>,
    align: usize,
    work: usize,
    f: F,
) where
    F: Fn(usize, &mut [&mut [f32]]) + Sync,
{
    let shared = SharedSlice::new(out);
    let body = |sub: Range<usize>| {
        let (r0, r1) = (rows.start + sub.start, rows.start + sub.end);
        let mut outs: Vec<&mut [f32]> = (0..n_tok)
            // SAFETY: parts are disjoint row ranges and `out_stride >= rows.end` (checked by the
            // callers) when there are several tokens, so no two pieces overlap.
            .map(|t| unsafe { shared.range_mut(t * out_stride + r0..t * out_stride + r1) })
            .collect();
        f(r0, &mut outs);
    };
    if work < SEQ_WORK {
        body(0..rows.len());
    } else {
        pool::for_range(rows.len(), align, body);
    }
}

/// How a weight type is computed: register tiles of rows × tokens, or one dot per output.
#[derive(Clone, Copy)]
enum Engine {
    Tiles { full: TileFn, one: TileFn },
    Dot(DotFn),
}

/// Outputs `outs[t][i]` for chunk-local rows `i0..i1` (weight row `r0 + i`, `w` = (matrix bytes,
/// row bytes)) and every token `t`; rows up to chunk-local `end` may be prefetched.
fn rows_block(
    engine: Engine,
    w: (&[u8], usize),
    x: &QuantizedActs,
    n: usize,
    (r0, i0, i1, end): (usize, usize, usize, usize),
    outs: &mut [&mut [f32]],
) {
    let (wdata, wrb) = w;
    let wrow = |r: usize| &wdata[r * wrb..(r + 1) * wrb];
    let n_tok = x.n_rows;
    // Activation rows by index, without re-deriving the row size per call.
    let used = x.format.row_bytes(x.cols).expect("validated by matmul");
    let arow = |t: usize| &x.data[t * x.row_bytes..t * x.row_bytes + used];
    match engine {
        Engine::Dot(dot) => {
            for (t, o) in outs.iter_mut().enumerate() {
                let a = arow(t);
                for i in i0..i1 {
                    o[i] = dot(wrow(r0 + i), a, n);
                }
            }
        }
        Engine::Tiles { full, one } => {
            let mut i = i0;
            while i < i1 {
                let nr = (i1 - i).min(TILE);
                let wr: [&[u8]; TILE] = std::array::from_fn(|k| wrow(r0 + i + k.min(nr - 1)));
                // The rows after this tile (up to the chunk's `end`), for prefetching.
                let ahead = (end - i - nr).min(TILE);
                let next = &wdata[(r0 + i + nr) * wrb..(r0 + i + nr + ahead) * wrb];
                let mut t = 0;
                while t < n_tok {
                    let nt = (n_tok - t).min(TILE);
                    let ar: [&[u8]; TILE] = std::array::from_fn(|k| arow(t + k.min(nt - 1)));
                    let mut res = [[0f32; TILE]; TILE];
                    if nt == 1 {
                        one(&wr, &ar, next, n, &mut res);
                    } else {
                        full(&wr, &ar, next, n, &mut res);
                    }
                    for (k, rr) in res.iter().enumerate().take(nr) {
                        for (j, v) in rr.iter().enumerate().take(nt) {
                            outs[t + j][i + k] = *v;
                        }
                    }
                    t += nt;
                }
                i += nr;
            }
        }
    }
}

/// Convenience: quantizes `x` (`n_rows` × `w.cols`, row-major) to `w`'s partner format and
/// computes all output rows: `out[t * w.rows + r]`.
pub fn matmul_f32(
    w: &WeightMatrix,
    x: &[f32],
    n_rows: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let k = quant::kernel(w.ty).ok_or(KernelError::UnsupportedType(w.ty))?;
    w.row_bytes()?;
    if out.len() != n_rows * w.rows {
        return Err(mismatch(format!(
            "output holds {} floats, need {n_rows} x {}",
            out.len(),
            w.rows
        )));
    }
    let mut q = QuantizedActs::empty(k.act);
    quantize_acts_into(k.act, x, n_rows, w.cols, &mut q)?;
    matmul(w, &q, out, w.rows, 0..w.rows)
}

/// How a matmul treats its f32 activations.
///
/// The engine's default, [`Quantized`](ActPrecision::Quantized), is the fast path. Its 8-bit
/// rounding costs a relative error of a few 1e-3 per quantized matmul (more through deep stacks
/// of random weights), which hides smaller errors of whatever it is compared with;
/// [`Exact`](ActPrecision::Exact) removes it, so CPU results can serve as an oracle for other
/// backends (the GPU's f16-activation GEMMs) and for the f64 reference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActPrecision {
    /// Activations are rounded per block to the weight type's partner format (Q8_0, Q8_1 or
    /// Q8_K for quantized weights; plain f32 for F32/F16/BF16) and dotted in integers:
    /// [`matmul`], as llama.cpp does.
    #[default]
    Quantized,
    /// Activations stay f32; each weight row is dequantized to f32 on the fly and dotted in f32:
    /// [`matmul_exact`]. Every weight type, quantized or not.
    Exact,
}

/// Bytes of dequantized weight rows kept per tile of the exact path (L1/L2-resident while every
/// token passes over them).
const EXACT_TILE_BYTES: usize = 64 << 10;
/// Most rows per tile of the exact path.
const EXACT_TILE_MAX: usize = 16;

/// The exact-activation matmul ([`ActPrecision::Exact`]): `out[t * out_stride + r] = Σ_c W[r, c] ·
/// x[t * w.cols + c]` for `r` in `rows` and every token `t < n_rows`, with `W` dequantized to f32
/// (exactly the values the type's dequantizer gives) and the f32 activations `x` used as they are;
/// products summed in f32. Other entries of `out` are left untouched.
///
/// Rows split over the CPU pool like [`matmul`]; within a part, a
/// tile of rows is dequantized once and dotted with every token (SIMD f32 dots, four rows per load
/// of the activations), so each weight byte is read and dequantized once per call. Results do not
/// depend on the tiling or the thread count (each output is one dot in a fixed order).
pub fn matmul_exact(
    w: &WeightMatrix,
    x: &[f32],
    n_rows: usize,
    out: &mut [f32],
    out_stride: usize,
    rows: Range<usize>,
) -> Result<(), KernelError> {
    let job = ExactJob::new(*w, x, n_rows)?;
    if !check_output(w, n_rows, out.len(), out_stride, &rows)? {
        return Ok(());
    }
    let work = job.wrb.saturating_mul(rows.len()).saturating_mul(n_rows);
    par_rows(out, out_stride, n_rows, rows, job.tile, work, |r0, outs| {
        job.compute(r0, outs)
    });
    Ok(())
}

/// A validated exact-activation matmul ([`matmul_exact`]) whose output rows any thread can
/// compute a part of.
pub(crate) struct ExactJob<'a> {
    w: WeightMatrix<'a>,
    x: &'a [f32],
    dequantize: fn(&[u8], &mut [f32]),
    wrb: usize,
    /// Rows dequantized at a time.
    tile: usize,
}

impl<'a> ExactJob<'a> {
    /// Checks `x` (`n_rows` rows of `w.cols`) against `w`.
    pub(crate) fn new(
        w: WeightMatrix<'a>,
        x: &'a [f32],
        n_rows: usize,
    ) -> Result<Self, KernelError> {
        let k = quant::kernel(w.ty).ok_or(KernelError::UnsupportedType(w.ty))?;
        let wrb = w.row_bytes()?;
        let cols = w.cols;
        if n_rows.checked_mul(cols) != Some(x.len()) {
            return Err(mismatch(format!(
                "activations: {} values given for {n_rows} rows of {cols}",
                x.len()
            )));
        }
        Ok(ExactJob {
            w,
            x,
            dequantize: k.dequantize_row,
            wrb,
            tile: (EXACT_TILE_BYTES / (cols * 4).max(1)).clamp(4, EXACT_TILE_MAX),
        })
    }

    /// Rows a part of the output should be a multiple of.
    pub(crate) fn align(&self) -> usize {
        self.tile
    }

    /// Outputs of weight rows `r0 .. r0 + outs[0].len()` for every token `t` into `outs[t]`.
    pub(crate) fn compute(&self, r0: usize, outs: &mut [&mut [f32]]) {
        let (w, x, cols, wrb, tile) = (&self.w, self.x, self.w.cols, self.wrb, self.tile);
        let len = outs[0].len();
        let mut buf = vec![0f32; tile.min(len) * cols];
        let mut i0 = 0;
        while i0 < len {
            let nr = (len - i0).min(tile);
            for (j, dst) in buf.chunks_exact_mut(cols.max(1)).take(nr).enumerate() {
                let r = r0 + i0 + j;
                (self.dequantize)(&w.data[r * wrb..(r + 1) * wrb], &mut dst[..cols]);
            }
            let wrow = |j: usize| &buf[j * cols..(j + 1) * cols];
            for (t, o) in outs.iter_mut().enumerate() {
                let xt = &x[t * cols..(t + 1) * cols];
                // Four rows share each load of the activations.
                let mut j = 0;
                while j + 4 <= nr {
                    let d = dot4_f32([wrow(j), wrow(j + 1), wrow(j + 2), wrow(j + 3)], xt);
                    o[i0 + j..i0 + j + 4].copy_from_slice(&d);
                    j += 4;
                }
                for j in j..nr {
                    o[i0 + j] = dot_f32(wrow(j), xt);
                }
            }
            i0 += nr;
        }
    }
}

/// Convenience: computes all output rows of `w` for `n_rows` rows of f32 activations `x`
/// (`n_rows × w.cols`, row-major) with the given activation precision: `out[t * w.rows + r]`.
/// `ActPrecision::Quantized` is [`matmul_f32`].
pub fn matmul_f32_with(
    w: &WeightMatrix,
    x: &[f32],
    n_rows: usize,
    out: &mut [f32],
    precision: ActPrecision,
) -> Result<(), KernelError> {
    match precision {
        ActPrecision::Quantized => matmul_f32(w, x, n_rows, out),
        ActPrecision::Exact => {
            if out.len() != n_rows * w.rows {
                return Err(mismatch(format!(
                    "output holds {} floats, need {n_rows} x {}",
                    out.len(),
                    w.rows
                )));
            }
            matmul_exact(w, x, n_rows, out, w.rows, 0..w.rows)
        }
    }
}
