//! The one arithmetic of every quantized CPU matmul, and the int8 GEMM that computes it for any
//! number of tokens.
//!
//! **Batch invariance.** An output `Σ_c W[r, c] · X[t, c]` is one fixed sequence of integer and
//! f32 operations on (weight row `r`, activation row `t`) — never a function of how many rows or
//! tokens share the call, which rows a thread takes, the thread count or the SIMD level. So a
//! sequence's logits do not depend on what else shares its batch, and a hybrid placement that
//! splits the same tokens into other ubatches gets the same bits.
//!
//! **Weights.** A type's [`Converter`] decodes a row exactly (no rounding) into unsigned bytes `u`
//! and f32 factors: element value `(u − offset) · scale_s + min_s` for its sub-block `s` (32
//! elements, or 16 for the `sub16` types; `min_s` only for the types with a minimum).
//!
//! **Activations.** The partner-format rows (Q8_0, Q8_1, Q8_K) as [`GemmActs`]: the int8 values
//! `a`, per block of 32 the scale `d` (exact), and for the types with a minimum per sub-block the
//! scaled sum `sa` (Q8_1: its stored f16 sum; Q8_K: `d · Σa` from its 16-element sums).
//!
//! **The order** ([`dot_converted`] is its definition), per output, starting from `acc = 0`:
//! for each sub-block `s` in ascending order, `I = Σ (u − offset) · a` in integers (exact), then
//! `acc = fma(f32(I), scale_s · d, acc)` and, with a minimum, `acc = fma(min_s, sa_s, acc)`.
//! Every step is one correctly rounded f32 operation, so any implementation that keeps the order
//! gets the same bits; the serial dependency is hidden by computing many outputs at once.
//!
//! **The GEMM.** Rows are converted a tile at a time ([`rows_per_tile`]: 16 with AVX-512 VNNI, 8
//! with AVX2) and a chunk of [`CHUNK`] columns at a time into one row-interleaved layout: for each
//! block of 32 and each group of 4 elements, the 4 bytes of row 0, row 1, … lie side by side, so
//! one 512-bit (256-bit) load feeds one output row per 32-bit lane. Per group, 4 activation bytes
//! are broadcast: AVX-512 VNNI `vpdpbusd` of the unsigned weights with the signed activations, the
//! offset's contribution `−offset · Σa` (per token and sub-block) seeding the sum; AVX2
//! `vpmaddubsw` of the unsigned weights with the activations, the products of as many groups as
//! stay below 2^15 added as i16 before widening ([`Converter::avx2_run`]), the seeds added per
//! sub-block — or for levels above 63 (Q8_0, the lookup-table types) of one operand's magnitude
//! with the other signed by it, the weights stored signed, `u − offset` (no saturation either
//! way: see `gemm::x86`). The per-lane f32 steps are the order above.
//! The converted chunk (16 × 512 bytes) stays in L1 while every token passes over it, so the
//! conversion is paid once per weight byte and call. With AMX turned on ([`amx`]: a CPU with
//! AMX-INT8 whose OS grants it), steps of 16 tokens multiply the same 16-row tile on AMX tiles
//! instead: the same exact integer sums per sub-block, then the same f32 steps, so the same bits.
//!
//! **Decode.** One to four tokens skip the tile (AVX-512 VNNI; AVX2 for the types of its
//! decoder): `gemm::gemv` dots each row straight from its blocks and transposes the integer sums
//! instead, then runs the same f32 order. Matrices repacked at load ([`packed`]: 16 rows
//! interleaved, as the tile but stored) need neither: one `vpdpbusd` (AVX2: `vpmaddubsw` per
//! half of 8 rows, `packed_avx2`) with broadcast activations accumulates the rows' sub-block sums
//! in its lanes. More tokens on a repacked matrix take the GEMM, its tiles loaded straight from
//! the groups ([`Converter::tile16_packed`]; AVX2: [`Tile::load_packed8`]).

use pshard_model::ggml_type::GgmlType;

use crate::matmul::{KernelError, QuantizedActs};
use crate::quant::{ActFormat, SimdLevel};

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub(crate) mod gemv;
#[cfg(target_arch = "x86_64")]
mod gemv_avx2;
#[cfg(target_arch = "x86_64")]
mod gemv_x86;
pub mod packed;
#[cfg(target_arch = "x86_64")]
pub(crate) mod packed_avx2;
#[cfg(target_arch = "x86_64")]
mod packed_x86;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// Elements per GEMM block (one activation scale).
pub const QB: usize = 32;

/// Columns converted at a time (a multiple of every type's block: 256 for the K-quants): the
/// tile of converted weights stays in L1 (16 rows × 512 bytes) while the tokens pass over it.
pub const CHUNK: usize = 512;

/// Converts whole blocks of one weight row: `src` starts at the first block; `u.len()` elements go
/// to `u`, one scale per sub-block to `scales` and, for types with a minimum, one minimum per
/// sub-block to `mins` (untouched otherwise). Value = `(u − offset) · scale + min`, exactly.
pub type ConvertFn = fn(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]);

/// Converts elements `e0 .. e0 + n` (whole blocks of the type) of 16 rows straight into a 16-row
/// tile (the VNNI kernel's layout: `q`, `scale`, `min` as in [`Tile`]), giving exactly what the
/// converter and the interleaving give, without the row-major detour.
pub type Tile16Fn =
    fn(rows: &[&[u8]; 16], e0: usize, n: usize, q: &mut [u8], scale: &mut [f32], min: &mut [f32]);

/// Converts elements `e0 .. e0 + n` (whole units of the type) of one repacked group of 16 rows
/// (`group`: its bytes, [`packed`]) straight into a 16-row tile, giving exactly what
/// [`Tile16Fn`] gives from the same rows in the file's layout.
pub type PackedTile16Fn =
    fn(group: &[u8], e0: usize, n: usize, q: &mut [u8], scale: &mut [f32], min: &mut [f32]);

/// How a quantized weight type enters the GEMM.
#[derive(Clone, Copy)]
pub struct Converter {
    /// The weight type.
    pub ty: GgmlType,
    /// Sub-blocks of 16 elements (one scale each) instead of 32.
    pub sub16: bool,
    /// The type has a minimum per sub-block (needs the activations' scaled sums).
    pub min: bool,
    /// `u − offset` is the signed integer level.
    pub offset: u8,
    /// The largest `u` the converter writes.
    pub max: u8,
    /// The portable converter (the definition).
    pub row: ConvertFn,
    /// A SIMD converter giving the same bytes and factors, where the type has one and the CPU
    /// runs it (used from the AVX2 level on).
    pub fast: Option<ConvertFn>,
    /// A direct 16-row tile loader, where the type has one and the CPU runs it (AVX-512 level).
    pub tile16: Option<Tile16Fn>,
    /// The direct 16-row tile loader of the repacked layout, where the type has one and the CPU
    /// runs it (AVX-512 level).
    pub tile16_packed: Option<PackedTile16Fn>,
}

impl std::fmt::Debug for Converter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Converter")
            .field("ty", &self.ty)
            .field("sub16", &self.sub16)
            .field("min", &self.min)
            .field("offset", &self.offset)
            .field("max", &self.max)
            .field("fast", &self.fast.is_some())
            .field("tile16", &self.tile16.is_some())
            .field("tile16_packed", &self.tile16_packed.is_some())
            .finish()
    }
}

impl Converter {
    /// Elements per sub-block (16 or 32).
    pub fn sub(&self) -> usize {
        if self.sub16 {
            16
        } else {
            QB
        }
    }

    /// The AVX2 GEMM kernel's run for this type: how many groups of 4 levels it multiplies
    /// unsigned (`vpmaddubsw` of `u` with the activations, magnitude ≤ 128) and adds as i16
    /// before widening — as many as keep `n · 2 · max · 128` below 2^15, at most a block's 8:
    /// 8 for levels ≤ 15, 4 for ≤ 31, 2 for ≤ 63. `None` (levels above 63: Q8_0, the lookup-table
    /// types): the 8-row tile holds the signed levels `u − offset` and the kernel multiplies
    /// magnitudes by signs, one group at a time.
    pub fn avx2_run(&self) -> Option<usize> {
        let n = 32767 / (256 * self.max.max(1) as usize);
        (n >= 2).then_some(n.min(8))
    }

    /// Whether a tile of `r` rows holds the signed levels `u − offset` (the AVX2 kernel's signed
    /// path, [`Converter::avx2_run`]) rather than `u`, whose offset the activations' seeds
    /// (`−offset · Σa`, [`GemmActs::seed`]) carry.
    pub fn tile_signed(&self, r: usize) -> bool {
        r == 8 && self.avx2_run().is_none()
    }

    /// The converter of a SIMD level: the fast one from AVX2 on, else the portable one.
    fn at(&self, level: SimdLevel) -> ConvertFn {
        match (level, self.fast) {
            (SimdLevel::Avx2 | SimdLevel::Avx512, Some(f)) => f,
            _ => self.row,
        }
    }
}

/// The converter of `ty`; `None` for the float types (they take the f32 dot).
pub fn converter(ty: GgmlType) -> Option<Converter> {
    crate::quant::legacy::int8_converter(ty)
        .or_else(|| crate::quant::kquants::int8_converter(ty))
        .or_else(|| crate::quant::lut4::int8_converter(ty))
}

/// Weight rows per tile at a SIMD level on this CPU (`None`: no GEMM kernel at that level; the
/// portable path computes [`dot_converted`] row by row).
pub fn rows_per_tile(level: SimdLevel) -> Option<usize> {
    match level {
        SimdLevel::Avx512 if SimdLevel::Avx512.available() => Some(16),
        SimdLevel::Avx512 | SimdLevel::Avx2 if SimdLevel::Avx2.available() => Some(8),
        _ => None,
    }
}

/// What the GEMM runs on this CPU, for reports: the tile width and SIMD level, and whether AMX
/// tiles take the steps of 16 tokens (or why not).
pub fn describe() -> String {
    let level = crate::quant::simd_cap();
    let tiles = match rows_per_tile(level) {
        Some(16) => "16-row AVX-512 VNNI tiles",
        Some(_) => "8-row AVX2 tiles",
        None => "portable rows",
    };
    #[cfg(target_arch = "x86_64")]
    let amx = amx::describe();
    #[cfg(not(target_arch = "x86_64"))]
    let amx = "AMX off: not x86-64".to_string();
    format!("int8 GEMM on {tiles}; {amx}")
}

/// Activations as the GEMM reads them (see the module notes): per token the int8 values, per
/// block of 32 the scale, per sub-block the scaled sum (types with a minimum) and the offset's
/// seed `−offset · Σa` (VNNI kernel, types with an offset).
#[derive(Default)]
pub struct GemmActs {
    /// `n_rows × cols` values.
    pub q: Vec<i8>,
    /// `n_rows × cols / 32` scales.
    pub d: Vec<f32>,
    /// `n_rows × subs` scaled sums (empty without a minimum).
    pub sa: Vec<f32>,
    /// `n_rows × subs` seeds (empty unless asked for).
    pub seed: Vec<i32>,
    /// Tokens.
    pub n_rows: usize,
    /// Elements per row.
    pub cols: usize,
    /// Sub-blocks per row.
    pub subs: usize,
    /// The values may be −128 (Q8_K); else they lie in −127..=127.
    pub full_range: bool,
    /// The weight type and the seeds flag it was converted for.
    made: Option<(GgmlType, bool)>,
}

impl GemmActs {
    /// Converts `x` (Q8_0, Q8_1 or Q8_K rows) for weights of `conv`; `seeds`: fill
    /// [`GemmActs::seed`]. Errors on F32 rows.
    pub fn new(x: &QuantizedActs, conv: &Converter, seeds: bool) -> Result<GemmActs, KernelError> {
        let mut g = GemmActs::default();
        g.fill(x, conv, seeds)?;
        Ok(g)
    }

    /// Whether this is the conversion [`GemmActs::new`] gives for weights of `conv` with `seeds`
    /// from activations shaped as `x` (whose values the caller knows to be the same).
    pub fn made_for(&self, conv: &Converter, seeds: bool, x: &QuantizedActs) -> bool {
        self.made == Some((conv.ty, seeded(conv, seeds)))
            && self.n_rows == x.n_rows
            && self.cols == x.cols
    }

    /// [`GemmActs::new`] into this value's buffers (their allocations reused).
    pub fn fill(
        &mut self,
        x: &QuantizedActs,
        conv: &Converter,
        seeds: bool,
    ) -> Result<(), KernelError> {
        let (cols, n) = (x.cols, x.n_rows);
        let nb = cols / QB;
        let per = conv.sub();
        let subs = cols / per;
        let seeds = seeded(conv, seeds);
        if x.format == ActFormat::F32 {
            return Err(KernelError::ShapeMismatch {
                what: format!("{} weights need quantized activations, got F32", conv.ty),
            });
        }
        zeroed(&mut self.q, n * cols);
        zeroed(&mut self.d, n * nb);
        zeroed(&mut self.sa, if conv.min { n * subs } else { 0 });
        zeroed(&mut self.seed, if seeds { n * subs } else { 0 });
        self.n_rows = n;
        self.cols = cols;
        self.subs = subs;
        self.full_range = x.format == ActFormat::Q8K;
        self.made = Some((conv.ty, seeds));
        let g = self;
        {
            let q = crate::pool::SharedSlice::new(&mut g.q);
            let d = crate::pool::SharedSlice::new(&mut g.d);
            let sa = crate::pool::SharedSlice::new(&mut g.sa);
            let seed = crate::pool::SharedSlice::new(&mut g.seed);
            let (with_sa, with_seed) = (conv.min, seeds);
            let convert = |t: usize| {
                // SAFETY: every token index is handled by exactly one participant; token rows are
                // disjoint ranges of each buffer.
                let (qt, dt, st, et) = unsafe {
                    (
                        q.range_mut(t * cols..(t + 1) * cols),
                        d.range_mut(t * nb..(t + 1) * nb),
                        if with_sa {
                            sa.range_mut(t * subs..(t + 1) * subs)
                        } else {
                            &mut []
                        },
                        if with_seed {
                            seed.range_mut(t * subs..(t + 1) * subs)
                        } else {
                            &mut []
                        },
                    )
                };
                convert_act_row(x.format, x.row(t), per, qt, dt, st);
                for (e, a) in et.iter_mut().zip(qt.chunks_exact(per)) {
                    *e = -(conv.offset as i32) * a.iter().map(|&v| v as i32).sum::<i32>();
                }
            };
            if n * cols >= 1 << 16 {
                crate::pool::for_range(n, 1, |r| r.for_each(convert));
            } else {
                (0..n).for_each(convert);
            }
        }
        Ok(())
    }
}

/// Whether activations converted for `conv` carry seeds when `seeds` asks for them: only the
/// types with an offset have any.
fn seeded(conv: &Converter, seeds: bool) -> bool {
    seeds && conv.offset != 0
}

/// `v` as `len` zeros, its allocation reused.
pub(crate) fn zeroed<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    v.clear();
    v.resize(len, T::default());
}

/// One activation row in `format` into int8 values, block scales and (where `sa` is not empty)
/// scaled sums per sub-block of `per` elements.
///
/// A Q8_0/Q8_1 value of −128 lies outside those formats' −127..=127 (the AVX2 kernel relies on
/// that): the quantizers write it only for a non-finite input (the SIMD one turns NaN into −128).
/// Such a block becomes zeros with a NaN scale, so every output it touches is NaN on every path.
fn convert_act_row(
    format: ActFormat,
    row: &[u8],
    per: usize,
    q: &mut [i8],
    d: &mut [f32],
    sa: &mut [f32],
) {
    use crate::quant::act::{f16_at, Q8_0_BYTES, Q8_1_BYTES};
    let copy = |src: &[u8], dst: &mut [i8]| {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = v as i8;
        }
    };
    // Copies a ±127 block; a block holding −128 becomes zeros with a NaN scale.
    let copy127 = |src: &[u8], dst: &mut [i8], d: &mut f32| {
        if src.contains(&0x80) {
            dst.fill(0);
            *d = f32::NAN;
        } else {
            copy(src, dst);
        }
    };
    match format {
        ActFormat::Q8_0 => {
            for (i, b) in row.chunks_exact(Q8_0_BYTES).enumerate() {
                d[i] = f16_at(b);
                copy127(&b[2..34], &mut q[QB * i..QB * (i + 1)], &mut d[i]);
            }
            // Q8_0 partners have no minimum: `sa` is empty.
        }
        ActFormat::Q8_1 => {
            for (i, b) in row.chunks_exact(Q8_1_BYTES).enumerate() {
                d[i] = f16_at(b);
                if let Some(s) = sa.get_mut(i) {
                    // The stored sum (per 32: the Q8_1 partners have 32-element sub-blocks).
                    *s = f16_at(&b[2..]);
                }
                copy127(&b[4..36], &mut q[QB * i..QB * (i + 1)], &mut d[i]);
            }
        }
        ActFormat::Q8K => {
            let bb = GgmlType::Q8_K.type_size() as usize;
            for (i, b) in row.chunks_exact(bb).enumerate() {
                let da = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                d[8 * i..8 * i + 8].fill(da);
                let bs = |m: usize| i16::from_le_bytes([b[260 + 2 * m], b[261 + 2 * m]]) as i32;
                if !sa.is_empty() {
                    if per == 16 {
                        for m in 0..16 {
                            sa[16 * i + m] = da * bs(m) as f32;
                        }
                    } else {
                        for j in 0..8 {
                            sa[8 * i + j] = da * (bs(2 * j) + bs(2 * j + 1)) as f32;
                        }
                    }
                }
                // Q8_K spans the full signed range: −128 is a valid value there.
                copy(&b[4..260], &mut q[256 * i..256 * (i + 1)]);
            }
        }
        ActFormat::F32 => unreachable!("F32 activations never reach the int8 GEMM"),
    }
}

/// The definition of every quantized output (see the module notes): weight row `u`/`scales`/
/// `mins` converted by `conv` (whole row), activation row `t` of `acts`.
pub fn dot_converted(
    conv: &Converter,
    u: &[u8],
    scales: &[f32],
    mins: &[f32],
    acts: &GemmActs,
    t: usize,
) -> f32 {
    let per = conv.sub();
    let o = conv.offset as i32;
    let cols = acts.cols;
    let a = &acts.q[t * cols..(t + 1) * cols];
    let d = &acts.d[t * (cols / QB)..(t + 1) * (cols / QB)];
    let mut acc = 0f32;
    for (s, (us, aa)) in u[..cols]
        .chunks_exact(per)
        .zip(a.chunks_exact(per))
        .enumerate()
    {
        let i: i32 = us
            .iter()
            .zip(aa)
            .map(|(&w, &x)| (w as i32 - o) * x as i32)
            .sum();
        acc = (i as f32).mul_add(scales[s] * d[s * per / QB], acc);
        if conv.min {
            acc = mins[s].mul_add(acts.sa[t * acts.subs + s], acc);
        }
    }
    acc
}

/// One output of the quantized matmul by its definition, on the portable path: weight row `w`
/// (`n` elements of `conv.ty`) with activation row `a` (`n` elements in `format`). Every
/// quantized type's [`crate::quant::QuantKernel::dot`].
///
/// # Panics
/// If `n` is not whole blocks of the type or a row is shorter than `n` elements need.
pub fn dot_row(conv: &Converter, format: ActFormat, w: &[u8], a: &[u8], n: usize) -> f32 {
    let (bs, bb) = (conv.ty.block_size() as usize, conv.ty.type_size() as usize);
    assert!(
        n.is_multiple_of(bs) && n.is_multiple_of(QB),
        "{} dot: {n} elements is not a whole number of {bs}-element blocks",
        conv.ty
    );
    assert!(
        w.len() >= n / bs * bb,
        "{} dot: weight row has {} bytes, {n} elements need {}",
        conv.ty,
        w.len(),
        n / bs * bb
    );
    let ab = format
        .row_bytes(n)
        .expect("whole blocks of the type are whole partner blocks");
    assert!(
        a.len() >= ab,
        "{} dot: {} activation row has {} bytes, {n} elements need {ab}",
        conv.ty,
        format.name(),
        a.len()
    );
    let x = QuantizedActs {
        format,
        data: a[..ab].to_vec(),
        row_bytes: ab,
        n_rows: 1,
        cols: n,
    };
    let acts = GemmActs::new(&x, conv, false).expect("a quantized partner format");
    let subs = n / conv.sub();
    let (mut u, mut scales, mut mins) = (vec![0u8; n], vec![0f32; subs], vec![0f32; subs]);
    (conv.row)(w, &mut u, &mut scales, &mut mins);
    dot_converted(conv, &u, &scales, &mins, &acts, 0)
}

/// A converted, interleaved tile of `r` weight rows over one chunk of columns (buffers reused
/// from chunk to chunk).
#[derive(Default)]
pub struct Tile {
    /// Row-major converted rows (`r × n`), the converters' output.
    rows_u: Vec<u8>,
    rows_scale: Vec<f32>,
    rows_min: Vec<f32>,
    /// Interleaved weights: block `b`, group `g` (4 elements), row `k`: 4 bytes at
    /// `(b · 8 + g) · 4r + 4k` — unsigned `u`, or signed `u − offset` where
    /// [`Converter::tile_signed`].
    pub q: Vec<u8>,
    /// Per sub-block and row: `scale` at `s · r + k`.
    pub scale: Vec<f32>,
    /// Per sub-block and row: the minimum (types with one).
    pub min: Vec<f32>,
    /// Rows per tile.
    pub r: usize,
    /// Blocks of 32 in the chunk.
    pub nb: usize,
    /// The converter's flags.
    pub sub16: bool,
    /// The type has minima.
    pub has_min: bool,
}

impl Tile {
    /// Converts elements `e0 .. e0 + n` (whole blocks of the type) of rows `rows` (at most `r`;
    /// missing rows repeat the last) of the matrix whose row `i` is `row(i)`, with the converter of
    /// `level`, and interleaves them for the kernel of `r` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn load<'a>(
        &mut self,
        conv: &Converter,
        level: SimdLevel,
        r: usize,
        rows: std::ops::Range<usize>,
        row: impl Fn(usize) -> &'a [u8],
        e0: usize,
        n: usize,
    ) {
        let per = conv.sub();
        let nsub = n / per;
        let (bs, bb) = (conv.ty.block_size() as usize, conv.ty.type_size() as usize);
        self.r = r;
        self.nb = n / QB;
        self.sub16 = conv.sub16;
        self.has_min = conv.min;
        let last = rows.end - 1;
        if let (16, SimdLevel::Avx512, Some(load)) = (r, level, conv.tile16) {
            self.q.resize(r * n, 0);
            self.scale.resize(r * nsub, 0.0);
            self.min.resize(r * nsub, 0.0);
            let src: [&[u8]; 16] = std::array::from_fn(|k| row((rows.start + k).min(last)));
            load(&src, e0, n, &mut self.q, &mut self.scale, &mut self.min);
            return;
        }
        self.rows_u.resize(r * n, 0);
        self.rows_scale.resize(r * nsub, 0.0);
        self.rows_min.resize(r * nsub, 0.0);
        let convert = conv.at(level);
        for k in 0..r {
            let i = (rows.start + k).min(last);
            if i < rows.start + k {
                // A repeated last row: copy the previous tile row's conversion.
                self.rows_u.copy_within((k - 1) * n..k * n, k * n);
                self.rows_scale
                    .copy_within((k - 1) * nsub..k * nsub, k * nsub);
                self.rows_min
                    .copy_within((k - 1) * nsub..k * nsub, k * nsub);
                continue;
            }
            let src = &row(i)[e0 / bs * bb..];
            convert(
                src,
                &mut self.rows_u[k * n..(k + 1) * n],
                &mut self.rows_scale[k * nsub..(k + 1) * nsub],
                &mut self.rows_min[k * nsub..(k + 1) * nsub],
            );
        }
        self.q.resize(r * n, 0);
        self.scale.resize(r * nsub, 0.0);
        self.min.resize(r * nsub, 0.0);
        let shift = if conv.tile_signed(r) { conv.offset } else { 0 };
        interleave(&self.rows_u, &mut self.q, r, n, shift, level);
        interleave_f32(&self.rows_scale, &mut self.scale, r, nsub, level);
        if conv.min {
            interleave_f32(&self.rows_min, &mut self.min, r, nsub, level);
        }
    }
}

impl Tile {
    /// Converts elements `e0 .. e0 + n` (whole units of the type) of one repacked group of 16
    /// rows (`group`, [`packed`]) into a 16-row tile for the AVX-512 VNNI kernel: the tile
    /// [`Tile::load`] makes from the same rows in the file's layout.
    ///
    /// # Panics
    /// If the type has no repacked tile loader on this CPU ([`Converter::tile16_packed`]).
    pub fn load_packed(&mut self, conv: &Converter, group: &[u8], e0: usize, n: usize) {
        let load = conv
            .tile16_packed
            .expect("a repacked tile loader (AVX-512 VNNI, a repacked type)");
        let nsub = n / conv.sub();
        self.r = 16;
        self.nb = n / QB;
        self.sub16 = conv.sub16;
        self.has_min = conv.min;
        self.q.resize(16 * n, 0);
        self.scale.resize(16 * nsub, 0.0);
        self.min.resize(16 * nsub, 0.0);
        load(group, e0, n, &mut self.q, &mut self.scale, &mut self.min);
    }
}

impl Tile {
    /// Converts elements `e0 .. e0 + n` (whole units of the type) of half `half` (rows
    /// `8 · half ..`) of one repacked group of 16 rows (`group`, [`packed`]) into an 8-row tile
    /// for the AVX2 kernel: the tile [`Tile::load`] makes from the same rows in the file's layout.
    ///
    /// # Panics
    /// If the type has no AVX2 repacked kernel (`packed::avx2_kernel`) or the CPU lacks AVX2.
    pub fn load_packed8(
        &mut self,
        conv: &Converter,
        group: &[u8],
        half: usize,
        e0: usize,
        n: usize,
    ) {
        let nsub = n / conv.sub();
        self.r = 8;
        self.nb = n / QB;
        self.sub16 = conv.sub16;
        self.has_min = conv.min;
        self.q.resize(8 * n, 0);
        self.scale.resize(8 * nsub, 0.0);
        self.min.resize(8 * nsub, 0.0);
        #[cfg(target_arch = "x86_64")]
        packed_avx2::tile8(
            conv,
            group,
            half,
            e0,
            n,
            &mut self.q,
            &mut self.scale,
            &mut self.min,
        );
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (conv, group, half, e0);
            panic!("the AVX2 repacked tile loader has no kernel on this architecture");
        }
    }
}

/// Interleaves `r` row-major rows of `n` bytes (`src`, `n` a multiple of 4) into groups of 4
/// bytes per row (`dst[(i · r + k) · 4 ..]` = bytes `4i..4i+4` of row `k`), subtracting `shift`
/// (wrapping).
fn interleave(src: &[u8], dst: &mut [u8], r: usize, n: usize, shift: u8, level: SimdLevel) {
    assert!(
        n.is_multiple_of(4) && src.len() >= r * n && dst.len() >= r * n,
        "interleave shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if x86::interleave(src.as_ptr(), dst.as_mut_ptr(), r, n, shift, level) {
        return;
    }
    let _ = level;
    for k in 0..r {
        for (i, g) in src[k * n..(k + 1) * n].chunks_exact(4).enumerate() {
            let at = (i * r + k) * 4;
            for (o, &v) in dst[at..at + 4].iter_mut().zip(g) {
                *o = v.wrapping_sub(shift);
            }
        }
    }
}

/// Transposes `r` rows of `n` f32 (`src`) into `dst[i · r + k]` = element `i` of row `k`.
fn interleave_f32(src: &[f32], dst: &mut [f32], r: usize, n: usize, level: SimdLevel) {
    assert!(
        src.len() >= r * n && dst.len() >= r * n,
        "interleave shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if x86::interleave(
        src.as_ptr().cast(),
        dst.as_mut_ptr().cast(),
        r,
        4 * n,
        0,
        level,
    ) {
        return;
    }
    let _ = level;
    for k in 0..r {
        for i in 0..n {
            dst[i * r + k] = src[k * n + i];
        }
    }
}

/// Adds the products of the tile's `r` rows with tokens `t0 .. t0 + acc.len()` over the chunk's
/// blocks (the chunk starts at activation block `blk0`) to `acc[j][k]` (token `t0 + j`, row `k`),
/// in the order of [`dot_converted`]. `acc.len()` is 1, 2, 4 or 8.
///
/// # Panics
/// If the CPU lacks the kernel's features, `acc.len()` is not 1, 2, 4 or 8, or the shapes
/// disagree.
pub fn tile_dot(
    conv: &Converter,
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    acc: &mut [[f32; 16]],
) {
    assert!(
        t0 + acc.len() <= acts.n_rows && (blk0 + tile.nb) * QB <= acts.cols,
        "bad token or block range"
    );
    assert_eq!(tile.q.len(), tile.r * tile.nb * QB, "tile shape");
    #[cfg(target_arch = "x86_64")]
    {
        x86::tile_dot(conv, tile, acts, blk0, t0, acc);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (conv, acc);
        panic!("the int8 GEMM has no kernel on this architecture");
    }
}

/// Asks the caches to load `b` ahead of use (a hint: decode streams each weight byte once, and
/// the rows of a tile are 16 interleaved streams).
#[inline]
pub fn prefetch(b: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..b.len()).step_by(64) {
        // SAFETY: a prefetch is only a hint and never faults; the address lies inside `b`; SSE is
        // part of every x86-64 CPU.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                b[off..].as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
}
