//! The CPU matmul driver: a weight matrix in its file layout (or repacked, [`WeightLayout`]) times
//! activations converted to the weight type's partner format, output rows split statically over
//! the CPU pool ([`crate::pool`]).
//!
//! `out[t * out_stride + r] = Σ_c W[r, c] · X[t, c]` for the requested output rows `r`.
//!
//! Each pool participant takes one contiguous part of the rows (whole tiles), so a decode step
//! streams every weight byte once with no scheduling between ops. Quantized weights go through
//! the int8 GEMM ([`crate::gemm`]): a tile of rows is converted a chunk of columns at a time and
//! every token passes over it while it sits in L1, so each weight row is read from memory once per
//! call; one to four tokens take the row-wise decode path (`gemm::gemv`: AVX-512 VNNI, or AVX2
//! for its types), or on a repacked matrix its 16-row kernel (`gemm::packed`; at AVX2 for the
//! types of `gemm::packed_avx2`).
//!
//! Every output is one fixed sequence of operations on its weight row and activation row
//! ([`crate::gemm`] for quantized weights, [`crate::quant::exact`] for f32 dots): results do not
//! depend on the batch, the rows asked for, the thread count or the SIMD level.
//!
//! Two activation precisions ([`ActPrecision`]): the fast path ([`matmul`]) rounds activations
//! to the weight type's 8-bit partner format and dots in integers, as llama.cpp does; the exact
//! path ([`matmul_exact`]) keeps f32 activations and dequantizes weight rows to f32 on the fly —
//! slower, used as an oracle (tests, GPU comparisons) where the 8-bit rounding would dominate the
//! error being measured.

use std::ops::Range;

use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::ModelSpec;

use crate::gemm;
use crate::pool::{self, SharedSlice};
use crate::quant::exact::{dot4_f32, dot_f32};
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

/// How the bytes of a [`WeightMatrix`] are laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightLayout {
    /// As in the file: row after row.
    #[default]
    File,
    /// Repacked by [`gemm::packed::repack`]: groups of 16 rows interleaved, the rows after the
    /// last whole group as in the file.
    Interleaved,
}

/// A weight matrix: `rows` rows of `cols` elements of type `ty`, as in the file or repacked.
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    /// Element type (block format) of the rows.
    pub ty: GgmlType,
    /// `rows` rows, each `ty.row_bytes(cols)` bytes, in the order of `layout`.
    pub data: &'a [u8],
    /// Output rows.
    pub rows: usize,
    /// Elements per row (the reduction length).
    pub cols: usize,
    /// How `data` is laid out.
    pub layout: WeightLayout,
}

impl WeightMatrix<'_> {
    /// Calls `f` with row `r`'s bytes in the file layout (a repacked row unpacked first).
    ///
    /// # Panics
    /// If `r` is not a row of the matrix.
    pub fn with_file_row<R>(&self, r: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        assert!(r < self.rows, "row {r} of a {}-row matrix", self.rows);
        let wrb = self.data.len() / self.rows;
        let full = self.rows / gemm::packed::ROWS * gemm::packed::ROWS;
        if self.layout == WeightLayout::File || r >= full {
            return f(&self.data[r * wrb..(r + 1) * wrb]);
        }
        let gb = gemm::packed::ROWS * wrb;
        let mut row = vec![0u8; wrb];
        let g = &self.data[r / gemm::packed::ROWS * gb..][..gb];
        gemm::packed::unpack_rows(self.ty, g, wrb, r % gemm::packed::ROWS, &mut row);
        f(&row)
    }

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

/// Rows per part of the float dots' output (the rows' bytes stay in L1/L2 while every token
/// passes over them).
const DOT_ROWS: usize = 16;
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

/// One matmul of [`matmul_many`]: all rows of `w` into `out` (`out[t * stride + r]`).
pub struct MatmulPart<'a, 'o> {
    /// Weights.
    pub w: WeightMatrix<'a>,
    /// Output.
    pub out: &'o mut [f32],
    /// Output row stride.
    pub stride: usize,
}

/// The input buffer and partner activation format of graph node `ni` when it is a matmul with
/// quantized weights (an int8 partner format). Consecutive matmuls with the same pair (a layer's
/// q/k/v, its gate/up) can share one conversion of their input: the CPU lane runs them as one
/// [`matmul_many`], the GPU's GEMVs reuse the first one's activations, and the planner prices
/// them so.
pub fn quantized_matmul_input(
    spec: &ModelSpec,
    g: &Graph,
    ni: usize,
) -> Option<(BufId, ActFormat)> {
    match g.nodes.get(ni)?.op {
        Op::MatMul { weight, x, .. } => {
            let ty = spec.tensor(weight).ty;
            let act = quant::kernel(ty).map(|k| k.act)?;
            (ty.is_quantized() && act != ActFormat::F32).then_some((x, act))
        }
        _ => None,
    }
}

/// [`matmul`] of several weight matrices with the same activations (a layer's q, k and v; gate
/// and up) as one pool job: the GEMM's conversion of `x` made once for every matrix that takes
/// the same one, and tasks over all their rows, so the threads wake once and the small matrices
/// (k and v: 512 rows) share the job with the large one. Each output's bits are those of
/// [`matmul`].
pub fn matmul_many(x: &QuantizedActs, parts: &mut [MatmulPart]) -> Result<(), KernelError> {
    let level = quant::simd_cap();
    let slot = std::sync::OnceLock::new();
    let mut jobs = Vec::with_capacity(parts.len());
    for p in parts.iter() {
        let k = quant::kernel(p.w.ty).ok_or(KernelError::UnsupportedType(p.w.ty))?;
        let job = RowsJob::new_shared(k, level, p.w, x, &slot)?;
        check_output(&p.w, x.n_rows, p.out.len(), p.stride, &(0..p.w.rows))?;
        jobs.push(job);
    }
    if x.n_rows == 0 {
        return Ok(());
    }
    let work: usize = jobs.iter().map(|j| j.work(j.w.rows)).sum();
    let strides: Vec<usize> = parts.iter().map(|p| p.stride).collect();
    let outs: Vec<SharedSlice<f32>> = parts.iter_mut().map(|p| SharedSlice::new(p.out)).collect();
    // (job, rows) tasks: each matrix in as many parts as `matmul` splits it into, so the small
    // ones' parts even out the threads' ends (in parts of the total rows instead, the prefill's
    // q/k/v were 9 tasks for 2 threads: matmuls 10% slower on the dev VM).
    let mut tasks: Vec<(usize, Range<usize>)> = Vec::new();
    let want = if work < SEQ_WORK {
        1
    } else {
        pool::threads() * 4
    };
    for (ji, job) in jobs.iter().enumerate() {
        let a = job.align();
        let chunk = job.w.rows.div_ceil(want).div_ceil(a).max(1) * a;
        let mut r = 0;
        while r < job.w.rows {
            let e = (r + chunk).min(job.w.rows);
            tasks.push((ji, r..e));
            r = e;
        }
    }
    let n_tok = x.n_rows;
    let run = |ti: usize| {
        let (ji, r) = (tasks[ti].0, tasks[ti].1.clone());
        // SAFETY: tasks own disjoint row ranges of their job's output (`stride ≥ rows` for
        // several tokens, checked), and jobs write distinct outputs.
        let mut o = unsafe { token_rows(&outs[ji], n_tok, strides[ji], r.clone()) };
        jobs[ji].compute(r.start, &mut o);
    };
    if want == 1 {
        (0..tasks.len()).for_each(run);
    } else {
        pool::for_each_dynamic(tasks.len(), run);
    }
    Ok(())
}

/// [`matmul`] with the kernels of SIMD level `level` at most (the best this CPU runs up to it,
/// regardless of [`quant::simd_cap`]): tests and benchmarks force the AVX2 or portable path with
/// it on a CPU that has better. Quantized weights: the int8 GEMM's 16-row AVX-512 VNNI kernel,
/// its 8-row AVX2 kernel, or (`Scalar`) the portable definition row by row; float weights: the
/// f32 dot of that level. Every level gives the same bits.
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

/// Each thread's GEMM buffers (the converted tile and the tokens' accumulators), reused from
/// tile to tile and call to call.
#[derive(Default)]
struct GemmScratch {
    tile: gemm::Tile,
    acc: Vec<[f32; 16]>,
    u: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

thread_local! {
    static GEMM_SCRATCH: std::cell::RefCell<GemmScratch> =
        std::cell::RefCell::new(GemmScratch::default());
    /// Each thread's rows of a repacked matrix unpacked to the file layout.
    static UNPACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Activations converted for the GEMM: this job's own, or a conversion it shares with other
/// jobs over the same activations ([`RowsJob::new_shared`]).
enum Acts<'a> {
    Own(gemm::GemmActs),
    Shared(&'a gemm::GemmActs),
}

impl std::ops::Deref for Acts<'_> {
    type Target = gemm::GemmActs;
    fn deref(&self) -> &gemm::GemmActs {
        match self {
            Acts::Own(a) => a,
            Acts::Shared(a) => a,
        }
    }
}

/// How a weight type is computed.
enum Engine<'a> {
    /// Float weights: one f32 dot per output.
    Dot(DotFn),
    /// Quantized weights, the int8 GEMM with `rows`-row tiles at `level`.
    Gemm {
        conv: gemm::Converter,
        acts: Acts<'a>,
        level: SimdLevel,
        rows: usize,
    },
    /// Quantized weights, 1 to 4 tokens, the decode path ([`gemm::gemv`]).
    Gemv {
        conv: gemm::Converter,
        decode: gemm::gemv::Decode,
        acts: gemm::gemv::GemvActs,
    },
    /// Quantized weights on the portable path: each row converted, then
    /// [`gemm::dot_converted`] per token.
    Rows {
        conv: gemm::Converter,
        acts: Acts<'a>,
    },
}

/// How the whole groups of a repacked matrix are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Groups {
    /// Each group unpacked to the file layout first (the engine has no path for the layout).
    Unpacked,
    /// The repacked decode kernel of a width (1 to 4 tokens; the [`Engine::Gemm`]'s
    /// activations).
    Decode(gemm::gemv::Width),
    /// The GEMM with the repacked tile loader: 16-row tiles (AVX-512 VNNI) or 8-row tiles,
    /// a group's halves (AVX2).
    Tiles,
}

/// A validated matmul of one weight matrix with one activation buffer: any part of its output
/// rows can be computed, by any thread ([`RowsJob::compute`]).
pub(crate) struct RowsJob<'a> {
    engine: Engine<'a>,
    /// For repacked weights, how whole groups are computed. Everything else of a repacked matrix
    /// (rows after the last whole group, parts of groups) is unpacked to the file layout first.
    groups: Groups,
    w: WeightMatrix<'a>,
    x: &'a QuantizedActs,
    wrb: usize,
}

impl<'a> RowsJob<'a> {
    /// Checks `w` against `x` for kernel `k` and picks the engine of SIMD level `level`: the int8
    /// GEMM (or its portable definition) for quantized types, the dot of `k` for float types.
    pub(crate) fn new(
        k: QuantKernel,
        level: SimdLevel,
        w: WeightMatrix<'a>,
        x: &'a QuantizedActs,
    ) -> Result<Self, KernelError> {
        Self::build(k, level, w, x, None)
    }

    /// [`RowsJob::new`], sharing the GEMM's conversion of the activations through `slot` with
    /// the other jobs given it: the first job that needs one fills it, and every job whose
    /// weights take the same conversion (same type and seeds) borrows it instead of converting
    /// `x` again. `slot` must only ever be given activations equal to `x`.
    pub(crate) fn new_shared(
        k: QuantKernel,
        level: SimdLevel,
        w: WeightMatrix<'a>,
        x: &'a QuantizedActs,
        slot: &'a std::sync::OnceLock<gemm::GemmActs>,
    ) -> Result<Self, KernelError> {
        Self::build(k, level, w, x, Some(slot))
    }

    fn build(
        k: QuantKernel,
        level: SimdLevel,
        w: WeightMatrix<'a>,
        x: &'a QuantizedActs,
        slot: Option<&'a std::sync::OnceLock<gemm::GemmActs>>,
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
        // Repacked weights: the decode kernel where the type and token count fit it (with the
        // GEMM's engine: its activations are the kernel's; it takes the rows outside whole
        // groups), else the GEMM's 16-row tiles loaded from the groups where the type has a
        // loader for them.
        let groups = match w.layout {
            WeightLayout::File => Groups::Unpacked,
            WeightLayout::Interleaved => {
                if !gemm::packed::supported(w.ty) {
                    return Err(mismatch(format!(
                        "{} weights have no interleaved layout",
                        w.ty
                    )));
                }
                // The repacked decode kernel of the decode path's width: AVX-512 VNNI for
                // every repacked type, AVX2 for those it has a kernel for.
                let decode = |c: &gemm::Converter| {
                    gemm::gemv::applies(c, x, level).and_then(|d| {
                        (d.width == gemm::gemv::Width::Vnni || gemm::packed::avx2_kernel(w.ty))
                            .then_some(d.width)
                    })
                };
                match gemm::converter(w.ty) {
                    Some(c) if decode(&c).is_some() => {
                        Groups::Decode(decode(&c).expect("checked by the guard"))
                    }
                    Some(c)
                        if c.tile16_packed.is_some() && gemm::rows_per_tile(level) == Some(16) =>
                    {
                        Groups::Tiles
                    }
                    Some(_)
                        if gemm::rows_per_tile(level) == Some(8)
                            && gemm::packed::avx2_kernel(w.ty) =>
                    {
                        Groups::Tiles
                    }
                    _ => Groups::Unpacked,
                }
            }
        };
        let engine = match gemm::converter(w.ty) {
            Some(conv)
                if !matches!(groups, Groups::Decode(_))
                    && gemm::gemv::applies(&conv, x, level).is_some() =>
            {
                let decode = gemm::gemv::applies(&conv, x, level).expect("checked by the guard");
                let acts = gemm::gemv::GemvActs::new(x, &conv, decode)?;
                Engine::Gemv { conv, decode, acts }
            }
            Some(conv) => {
                let tile_rows = gemm::rows_per_tile(level);
                let seeds = tile_rows.is_some_and(|r| !conv.tile_signed(r));
                let convert = || gemm::GemmActs::new(x, &conv, seeds);
                if let Some(slot) = slot.filter(|s| s.get().is_none()) {
                    // Two jobs built at once may both convert: one conversion is kept.
                    let _ = slot.set(convert()?);
                }
                let acts = match slot.and_then(|s| s.get()) {
                    Some(a) if a.made_for(&conv, seeds, x) => Acts::Shared(a),
                    _ => Acts::Own(convert()?),
                };
                match tile_rows {
                    Some(rows) => Engine::Gemm {
                        conv,
                        acts,
                        level,
                        rows,
                    },
                    None => Engine::Rows { conv, acts },
                }
            }
            None => Engine::Dot(k.dot),
        };
        Ok(RowsJob {
            engine,
            groups,
            w,
            x,
            wrb,
        })
    }

    /// Rows a part of the output should be a multiple of.
    pub(crate) fn align(&self) -> usize {
        let rows = match &self.engine {
            Engine::Gemm { rows, .. } => *rows,
            Engine::Gemv { decode, .. } => decode.width.rows(),
            _ => DOT_ROWS,
        };
        // Repacked: whole groups of 16 (a part ending inside one unpacks it: with AVX2's 8-row
        // tiles, 11% of SmolLM2's decode was unpacking the group two threads shared).
        if self.w.layout == WeightLayout::Interleaved {
            rows.max(gemm::packed::ROWS)
        } else {
            rows
        }
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
        match self.w.layout {
            WeightLayout::File => self.compute_file(self.w.data, 0, r0, outs),
            WeightLayout::Interleaved => self.compute_packed(r0, outs),
        }
    }

    /// [`RowsJob::compute`] of a repacked matrix: whole groups through the repacked decode
    /// kernel or the GEMM's repacked tiles where they apply; the rest (rows after the last group
    /// as they lie, other rows unpacked a group at a time) through [`RowsJob::compute_file`].
    fn compute_packed(&self, r0: usize, outs: &mut [&mut [f32]]) {
        use gemm::packed::{unpack_rows, ROWS};
        let (w, wrb) = (&self.w, self.wrb);
        let len = outs[0].len();
        let full = w.rows / ROWS * ROWS;
        let gb = ROWS * wrb;
        let mut i = 0;
        while i < len {
            let r = r0 + i;
            let n = if r >= full {
                len - i
            } else if r.is_multiple_of(ROWS) && self.groups != Groups::Unpacked {
                ((len - i) / ROWS).min((full - r) / ROWS) * ROWS
            } else {
                0
            };
            let whole = n > 0 && r < full;
            let n = if n == 0 {
                (ROWS - r % ROWS).min(len - i)
            } else {
                n
            };
            let mut part: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[i..i + n]).collect();
            let groups = &w.data[r * wrb..(r + n) * wrb];
            match (&self.engine, self.groups, whole) {
                _ if r >= full => {
                    self.compute_file(&w.data[full * wrb..], full, r, &mut part);
                }
                (Engine::Gemm { acts, .. }, Groups::Decode(width), true) => {
                    gemm::packed::groups(w.ty, width, acts, groups, &mut part);
                }
                (
                    Engine::Gemm {
                        conv,
                        acts,
                        level,
                        rows,
                    },
                    Groups::Tiles,
                    true,
                ) => {
                    let src = TileSrc::<fn(usize) -> &'a [u8]>::Packed(groups);
                    self.gemm(conv, acts, (*level, *rows), src, r, &mut part);
                }
                _ => UNPACKED.with(|u| {
                    let u = &mut *u.borrow_mut();
                    u.resize(n * wrb, 0);
                    let g = &w.data[r / ROWS * gb..][..gb];
                    unpack_rows(w.ty, g, wrb, r % ROWS, u);
                    self.compute_file(u, r, r, &mut part);
                }),
            }
            i += n;
        }
    }

    /// Outputs of weight rows `r0 .. r0 + outs[0].len()` for every token `t` into `outs[t]`,
    /// where `data` holds rows `base ..` in the file layout.
    fn compute_file(&self, data: &[u8], base: usize, r0: usize, outs: &mut [&mut [f32]]) {
        let (w, x, wrb) = (&self.w, self.x, self.wrb);
        let r0 = r0 - base;
        let wrow = |r: usize| &data[r * wrb..(r + 1) * wrb];
        let len = outs[0].len();
        let n = w.cols;
        match &self.engine {
            Engine::Dot(dot) => {
                let used = x.format.row_bytes(x.cols).expect("validated by matmul");
                let arow = |t: usize| &x.data[t * x.row_bytes..t * x.row_bytes + used];
                // Tiles of rows that stay in cache while every token passes over them.
                let mut i0 = 0;
                while i0 < len {
                    let i1 = (i0 + DOT_ROWS).min(len);
                    for (t, o) in outs.iter_mut().enumerate() {
                        let a = arow(t);
                        for i in i0..i1 {
                            o[i] = dot(wrow(r0 + i), a, n);
                        }
                    }
                    i0 = i1;
                }
            }
            Engine::Gemv { conv, decode, acts } => {
                gemm::gemv::rows(conv, *decode, acts, data, wrb, r0, outs);
            }
            Engine::Rows { conv, acts } => GEMM_SCRATCH.with(|s| {
                let s = &mut *s.borrow_mut();
                let subs = n / conv.sub();
                s.u.resize(n, 0);
                s.scales.resize(subs, 0.0);
                s.mins.resize(subs, 0.0);
                for i in 0..len {
                    (conv.row)(wrow(r0 + i), &mut s.u, &mut s.scales, &mut s.mins);
                    for (t, o) in outs.iter_mut().enumerate() {
                        o[i] = gemm::dot_converted(conv, &s.u, &s.scales, &s.mins, acts, t);
                    }
                }
            }),
            Engine::Gemm {
                conv,
                acts,
                level,
                rows,
            } => self.gemm(conv, acts, (*level, *rows), TileSrc::File(&wrow), r0, outs),
        }
    }

    /// The int8 GEMM's tiles of `rr` rows at `level` over weight rows `r0 .. r0 + outs[0].len()`
    /// (of `src`) for every token `t` into `outs[t]`: each tile loaded a chunk of columns at a
    /// time (the next chunk prefetched) and every token passed over it.
    fn gemm<'d>(
        &self,
        conv: &gemm::Converter,
        acts: &gemm::GemmActs,
        (level, rr): (SimdLevel, usize),
        src: TileSrc<'d, impl Fn(usize) -> &'d [u8]>,
        r0: usize,
        outs: &mut [&mut [f32]],
    ) {
        let (w, x) = (&self.w, self.x);
        let len = outs[0].len();
        let n = w.cols;
        GEMM_SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            let GemmScratch { tile, acc, .. } = s;
            let n_tok = x.n_rows;
            acc.resize(n_tok, [0f32; 16]);
            let (bs, bb) = (w.ty.block_size() as usize, w.ty.type_size() as usize);
            let bytes = |e: usize| e / bs * bb;
            // With AMX on, its tiles take 16 tokens at a time (the same bits as the VNNI
            // kernel, which takes the rest).
            #[cfg(target_arch = "x86_64")]
            let amx = (rr == 16
                && level == SimdLevel::Avx512
                && n_tok >= gemm::amx::TOKENS
                && gemm::amx::enabled())
            .then(|| gemm::amx::Tiles::configure(conv.sub()));
            let mut i = 0;
            while i < len {
                let nr = (len - i).min(rr);
                let range = r0 + i..r0 + i + nr;
                acc.iter_mut().for_each(|a| *a = [0f32; 16]);
                let mut e0 = 0;
                while e0 < n {
                    let ne = (n - e0).min(gemm::CHUNK);
                    // Load this chunk; prefetch the next chunk of these rows, or the next tile's
                    // first chunk, while this one is multiplied.
                    let (next, end) = (e0 + ne, (r0 + len).min(range.end + rr));
                    match &src {
                        TileSrc::File(wrow) => {
                            tile.load(conv, level, rr, range.clone(), wrow, e0, ne);
                            if next < n {
                                let b = bytes(next)..bytes((next + gemm::CHUNK).min(n));
                                for r in range.clone() {
                                    gemm::prefetch(&wrow(r)[b.clone()]);
                                }
                            } else {
                                for r in range.end..end {
                                    gemm::prefetch(&wrow(r)[..bytes(gemm::CHUNK.min(n))]);
                                }
                            }
                        }
                        TileSrc::Packed(data) => {
                            // Group `range` (whole: `r0` and `len` are group-aligned), or with
                            // 8-row tiles one of its halves; a group's chunk is one run of 16 ×
                            // its rows' bytes.
                            let gb = 16 * self.wrb;
                            let at = range.start - r0;
                            let g = &data[at / 16 * gb..][..gb];
                            if rr == 16 {
                                tile.load_packed(conv, g, e0, ne);
                            } else {
                                tile.load_packed8(conv, g, at % 16 / 8, e0, ne);
                            }
                            if next < n {
                                let b = 16 * bytes(next)..16 * bytes((next + gemm::CHUNK).min(n));
                                gemm::prefetch(&g[b]);
                            } else if end > range.end {
                                let g = &data[(range.end - r0) / 16 * gb..][..gb];
                                gemm::prefetch(&g[..16 * bytes(gemm::CHUNK.min(n))]);
                            }
                        }
                    }
                    let mut t0 = 0;
                    #[cfg(target_arch = "x86_64")]
                    if let Some(tiles) = &amx {
                        while n_tok - t0 >= gemm::amx::TOKENS {
                            let a = &mut acc[t0..t0 + gemm::amx::TOKENS];
                            gemm::amx::tile_dot16(tiles, conv, tile, acts, e0 / gemm::QB, t0, a);
                            t0 += gemm::amx::TOKENS;
                        }
                    }
                    while t0 < n_tok {
                        let nt = match n_tok - t0 {
                            k if k >= 8 => 8,
                            k if k >= 4 => 4,
                            k if k >= 2 => 2,
                            _ => 1,
                        };
                        gemm::tile_dot(conv, tile, acts, e0 / gemm::QB, t0, &mut acc[t0..t0 + nt]);
                        t0 += nt;
                    }
                    e0 += ne;
                }
                // A whole tile's rows as a fixed-size copy (a `memmove` call per token and
                // tile was 8% of gemma3's prefill); a short last tile by its length.
                if nr == 16 {
                    for (o, a) in outs.iter_mut().zip(acc.iter()) {
                        let o: &mut [f32; 16] = (&mut o[i..i + 16]).try_into().expect("16");
                        *o = *a;
                    }
                } else {
                    for (o, a) in outs.iter_mut().zip(acc.iter()) {
                        o[i..i + nr].copy_from_slice(&a[..nr]);
                    }
                }
                i += nr;
            }
        })
    }
}

/// Where the GEMM's tiles come from: rows in the file's layout (row `r` given by the function),
/// or whole repacked groups (the bytes from the first row asked for).
enum TileSrc<'d, F: Fn(usize) -> &'d [u8]> {
    File(&'d F),
    Packed(&'d [u8]),
}

impl Drop for RowsJob<'_> {
    fn drop(&mut self) {
        if let Engine::Gemv { acts, .. } = &mut self.engine {
            acts.recycle();
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

/// Rows `r` of each of `n_tok` tokens' outputs in `out` (token `t`'s row `i` at
/// `t * stride + i`), one slice per token.
///
/// # Safety
/// No other live reference may overlap these rows of `out` while the slices live.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn token_rows<'s>(
    out: &'s SharedSlice<f32>,
    n_tok: usize,
    stride: usize,
    r: Range<usize>,
) -> Vec<&'s mut [f32]> {
    (0..n_tok)
        // SAFETY: the caller's promise; with `r` inside a stride the tokens' slices are disjoint.
        .map(|t| unsafe { out.range_mut(t * stride + r.start..t * stride + r.end) })
        .collect()
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
        // SAFETY: parts are disjoint row ranges and `out_stride >= rows.end` (checked by the
        // callers) when there are several tokens, so no two pieces overlap.
        let mut outs = unsafe { token_rows(&shared, n_tok, out_stride, r0..r1) };
        f(r0, &mut outs);
    };
    if work < SEQ_WORK {
        body(0..rows.len());
    } else {
        pool::for_range(rows.len(), align, body);
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

    /// Outputs of weight rows `r0 .. r0 + outs[0].len()` for every token `t` into `outs[t]`.
    pub(crate) fn compute(&self, r0: usize, outs: &mut [&mut [f32]]) {
        let (w, x, cols, tile) = (&self.w, self.x, self.w.cols, self.tile);
        let len = outs[0].len();
        let mut buf = vec![0f32; tile.min(len) * cols];
        let mut i0 = 0;
        while i0 < len {
            let nr = (len - i0).min(tile);
            for (j, dst) in buf.chunks_exact_mut(cols.max(1)).take(nr).enumerate() {
                let r = r0 + i0 + j;
                w.with_file_row(r, |row| (self.dequantize)(row, &mut dst[..cols]));
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
