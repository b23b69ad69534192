//! The int8 GEMM of batched matmuls (prefill): every quant type is converted, a tile of weight
//! rows at a time, into one row-interleaved int8 layout, and one register-tiled kernel per SIMD
//! level multiplies it with all tokens.
//!
//! **Weights.** A type's [`Converter`] turns a row into int8 values `w` with `value = w · scale +
//! min`, one `scale` per sub-block of 32 elements (16 for the types with 16-element sub-blocks:
//! `sub16`) and, for the types with a minimum, one `min` per 32. A tile of [`rows_per_tile`] rows
//! is then interleaved: for each block of 32 elements and each group of 4 elements, the 4 bytes
//! of row 0, row 1, … lie side by side, so one 512-bit (AVX-512: 16 rows) or 256-bit (AVX2: 8
//! rows) load feeds one output row per 32-bit lane. A new type plugs in with one converter.
//!
//! **Activations.** The partner-format rows (Q8_0, Q8_1, Q8_K) are re-expressed, without new
//! rounding, as int8 values with one f32 scale `d` and one block sum `sa = d · Σ q` per 32.
//!
//! **Kernels.** AVX-512 VNNI: activations offset to unsigned (`q + 128`), `vpdpbusd` of 4
//! activation bytes broadcast against 16 rows' weight bytes; the offset's contribution
//! `128 · Σ w` is a per-(row, sub-block) constant computed when the tile is interleaved and
//! seeds the accumulator. AVX2: `vpmaddubsw` of `|a|` with the weights signed by `a` (no
//! saturation: `|a| ≤ 128`, `|w| ≤ 127`). Either way each sub-block's integer sum is scaled
//! by `scale · d` and the minimum term `min · sa` added, in f32.
//!
//! The conversion is paid once per tile and shared by every token of the batch, so it is used
//! from [`GEMM_MIN_TOKENS`] tokens on.

use pshard_model::ggml_type::GgmlType;

use crate::matmul::QuantizedActs;
use crate::quant::{ActFormat, SimdLevel};

#[cfg(target_arch = "x86_64")]
mod x86;

/// Tokens from which a batched matmul takes the int8 GEMM (below, the register tiles or row dots
/// of the weight type: the tile conversion is not paid back by fewer tokens).
pub const GEMM_MIN_TOKENS: usize = 16;

/// Elements per GEMM block (one activation scale, one minimum).
pub const QB: usize = 32;

/// Converts one weight row to int8: `src` holds the row in its GGUF layout; `q.len()` elements
/// (whole blocks of the type) go to `q`, one scale per sub-block to `scales` and, for types with
/// a minimum, one minimum per 32 elements to `mins` (untouched otherwise). Value = `q · scale +
/// min`.
pub type ConvertFn = fn(src: &[u8], q: &mut [i8], scales: &mut [f32], mins: &mut [f32]);

/// How a weight type feeds the int8 GEMM.
#[derive(Clone, Copy)]
pub struct Converter {
    /// Sub-blocks of 16 elements (one scale each) instead of 32.
    pub sub16: bool,
    /// The type has a minimum per 32 elements (needs the activations' block sums).
    pub min: bool,
    /// The row converter.
    pub row: ConvertFn,
}

impl std::fmt::Debug for Converter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Converter")
            .field("sub16", &self.sub16)
            .field("min", &self.min)
            .finish()
    }
}

/// The converter of `ty`, if the type feeds the int8 GEMM.
pub fn converter(ty: GgmlType) -> Option<Converter> {
    crate::quant::legacy::int8_converter(ty).or_else(|| crate::quant::kquants::int8_converter(ty))
}

/// Weight rows per tile at a SIMD level (`None`: no GEMM kernel at that level on this CPU).
pub fn rows_per_tile(level: SimdLevel) -> Option<usize> {
    match level {
        SimdLevel::Avx512 if SimdLevel::Avx512.available() => Some(16),
        SimdLevel::Avx512 | SimdLevel::Avx2 if SimdLevel::Avx2.available() => Some(8),
        _ => None,
    }
}

/// Activations re-expressed for the GEMM: int8 rows (offset by 128 to unsigned for the VNNI
/// kernel), and per token and block of 32 the scale `d` and the sum `sa = d · Σ q`.
pub struct GemmActs {
    /// `n_rows × cols` bytes.
    pub q: Vec<u8>,
    /// `n_rows × cols / 32` scales.
    pub d: Vec<f32>,
    /// `n_rows × cols / 32` block sums.
    pub sa: Vec<f32>,
    /// Tokens.
    pub n_rows: usize,
    /// Elements per row.
    pub cols: usize,
}

impl GemmActs {
    /// Converts `x` (Q8_0, Q8_1 or Q8_K rows); `unsigned` adds 128 to every value (the VNNI
    /// kernel's form). `None` for F32 activations.
    pub fn from_acts(x: &QuantizedActs, unsigned: bool) -> Option<GemmActs> {
        let (cols, n) = (x.cols, x.n_rows);
        let nb = cols / QB;
        let mut g = GemmActs {
            q: vec![0u8; n * cols],
            d: vec![0f32; n * nb],
            sa: vec![0f32; n * nb],
            n_rows: n,
            cols,
        };
        let flip = if unsigned { 0x80u8 } else { 0 };
        let q = crate::pool::SharedSlice::new(&mut g.q);
        let d = crate::pool::SharedSlice::new(&mut g.d);
        let sa = crate::pool::SharedSlice::new(&mut g.sa);
        let format = x.format;
        if format == ActFormat::F32 {
            return None;
        }
        let convert = |t: usize| {
            let row = x.row(t);
            // SAFETY: every token index is handled by exactly one participant; token rows are
            // disjoint ranges of each buffer.
            let (qt, dt, st) = unsafe {
                (
                    q.range_mut(t * cols..(t + 1) * cols),
                    d.range_mut(t * nb..(t + 1) * nb),
                    sa.range_mut(t * nb..(t + 1) * nb),
                )
            };
            convert_act_row(format, row, flip, qt, dt, st);
        };
        if n * cols >= 1 << 16 {
            crate::pool::for_range(n, 1, |r| r.for_each(convert));
        } else {
            (0..n).for_each(convert);
        }
        Some(g)
    }
}

/// One activation row in `format` into int8 bytes (xor `flip`), block scales and block sums.
fn convert_act_row(
    format: ActFormat,
    row: &[u8],
    flip: u8,
    q: &mut [u8],
    d: &mut [f32],
    sa: &mut [f32],
) {
    use crate::quant::act::{f16_at, Q8_0_BYTES, Q8_1_BYTES};
    let sum = |b: &[u8]| b.iter().map(|&v| v as i8 as i32).sum::<i32>();
    let copy = |src: &[u8], dst: &mut [u8]| {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = v ^ flip;
        }
    };
    match format {
        ActFormat::Q8_0 => {
            for (i, b) in row.chunks_exact(Q8_0_BYTES).enumerate() {
                let qs = &b[2..34];
                d[i] = f16_at(b);
                sa[i] = d[i] * sum(qs) as f32;
                copy(qs, &mut q[QB * i..QB * (i + 1)]);
            }
        }
        ActFormat::Q8_1 => {
            for (i, b) in row.chunks_exact(Q8_1_BYTES).enumerate() {
                d[i] = f16_at(b);
                // The stored sum, as the row dots use it.
                sa[i] = f16_at(&b[2..]);
                copy(&b[4..36], &mut q[QB * i..QB * (i + 1)]);
            }
        }
        ActFormat::Q8K => {
            let bb = GgmlType::Q8_K.type_size() as usize;
            for (i, b) in row.chunks_exact(bb).enumerate() {
                let da = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let qs = &b[4..260];
                for j in 0..8 {
                    let k = 8 * i + j;
                    d[k] = da;
                    let bs = |m: usize| i16::from_le_bytes([b[260 + 2 * m], b[261 + 2 * m]]) as i32;
                    sa[k] = da * (bs(2 * j) + bs(2 * j + 1)) as f32;
                }
                copy(qs, &mut q[256 * i..256 * (i + 1)]);
            }
        }
        ActFormat::F32 => unreachable!("F32 activations never reach the int8 GEMM"),
    }
}

/// A converted, interleaved tile of `r` weight rows over `cols` elements (buffers reused from
/// tile to tile).
#[derive(Default)]
pub struct Tile {
    /// Row-major int8 rows (`r × cols`), the converters' output.
    rows_q: Vec<i8>,
    rows_scale: Vec<f32>,
    rows_min: Vec<f32>,
    /// Interleaved weights: block `b`, group `g` (4 elements), row `k`: 4 bytes at
    /// `(b · 8 + g) · 4r + 4k`.
    pub q: Vec<i8>,
    /// Per sub-block and row: `scale` at `s · r + k` (`s` counts sub-blocks of 16 or 32).
    pub scale: Vec<f32>,
    /// Per sub-block and row: `−128 · Σ w` (VNNI kernel's offset correction).
    pub corr: Vec<i32>,
    /// Per block of 32 and row: the minimum (types with one).
    pub min: Vec<f32>,
    /// Rows per tile.
    pub r: usize,
    /// Sub-blocks per block of 32 (1 or 2).
    pub subs: usize,
    /// The type has minima.
    pub has_min: bool,
}

impl Tile {
    /// Converts rows `rows` (at most `r`; missing rows repeat the last) of the matrix whose row
    /// `i` is `row(i)` and interleaves them.
    pub fn load<'a>(
        &mut self,
        conv: &Converter,
        r: usize,
        cols: usize,
        rows: std::ops::Range<usize>,
        row: impl Fn(usize) -> &'a [u8],
        avx2: bool,
    ) {
        let subs = if conv.sub16 { 2 } else { 1 };
        let nb = cols / QB;
        let nsub = nb * subs;
        self.r = r;
        self.subs = subs;
        self.has_min = conv.min;
        self.rows_q.resize(r * cols, 0);
        self.rows_scale.resize(r * nsub, 0.0);
        self.rows_min.resize(r * nb, 0.0);
        let last = rows.end - 1;
        for k in 0..r {
            let src = row((rows.start + k).min(last));
            (conv.row)(
                src,
                &mut self.rows_q[k * cols..(k + 1) * cols],
                &mut self.rows_scale[k * nsub..(k + 1) * nsub],
                &mut self.rows_min[k * nb..(k + 1) * nb],
            );
        }
        self.q.resize(r * cols, 0);
        self.scale.resize(r * nsub, 0.0);
        self.corr.resize(r * nsub, 0);
        self.min.resize(r * nb, 0.0);
        for k in 0..r {
            let src = &self.rows_q[k * cols..(k + 1) * cols];
            for (gi, g4) in src.chunks_exact(4).enumerate() {
                let at = gi * 4 * r + 4 * k;
                self.q[at..at + 4].copy_from_slice(g4);
                if avx2 {
                    // The AVX2 kernel negates weights (by the activations' signs): −128 (no
                    // converter makes it; only a Q8_0 file from another quantizer could hold
                    // it) is taken as −127 there.
                    for v in &mut self.q[at..at + 4] {
                        *v = (*v).max(-127);
                    }
                }
            }
            let per = QB / subs;
            for (s, sub) in src.chunks_exact(per).enumerate() {
                let sum: i32 = sub.iter().map(|&v| v as i32).sum();
                self.corr[s * r + k] = -128 * sum;
                self.scale[s * r + k] = self.rows_scale[k * nsub + s];
            }
            if conv.min {
                for b in 0..nb {
                    self.min[b * r + k] = self.rows_min[k * nb + b];
                }
            }
        }
    }
}

/// `out[j][k] = Σ_c W[row k, c] · A[token t0 + j, c]` for the tile's `r` rows and tokens
/// `t0..t0 + nt` (`nt ≤ 8`; `out` rows beyond `nt` are scratch), with the kernel of `level`.
///
/// # Panics
/// If the CPU lacks the level's features, `nt` is 0 or above 8, or the shapes disagree.
pub fn tile_dot(
    level: SimdLevel,
    tile: &Tile,
    acts: &GemmActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; 16]; 8],
) {
    assert!(
        (1..=8).contains(&nt) && t0 + nt <= acts.n_rows,
        "bad token range"
    );
    assert_eq!(
        tile.q.len(),
        tile.r * acts.cols,
        "tile and activations disagree"
    );
    #[cfg(target_arch = "x86_64")]
    {
        x86::tile_dot(level, tile, acts, t0, nt, out);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, out);
        panic!("the int8 GEMM has no kernel on this architecture");
    }
}
