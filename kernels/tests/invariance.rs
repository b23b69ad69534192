//! Batch invariance of the CPU matmuls: every output equals, bit for bit, the portable reference
//! dot of its weight row and activation row (`QuantKernel::dot` of the scalar kernel) — whatever
//! the batch size (1..=40 tokens, the token at any position of the batch), the output rows asked
//! for, the thread count and the SIMD level (int8 GEMM with 16-row VNNI or 8-row AVX2 tiles, the
//! row-wise decode path at batches 1–4 with AVX-512 VNNI and with AVX2, the portable path, the f32
//! dots of each level: every level this CPU runs, each forced through `matmul_at` whatever
//! `PSHARD_CPU_SIMD` says), in the file's layout and, for the types with one, repacked
//! (`gemm::packed`: its 16-row kernels — VNNI, and AVX2 for the types of
//! `packed::avx2_kernel` — and tiles loaded from the groups, groups cut by the row ranges, the
//! rows after the last group). Widths span several
//! column chunks and end in a partial one (legacy types: a partial step of 128); 37 rows end in a
//! partial group of 16. The exact-activation path likewise equals the portable f32 dot of the
//! dequantized row.
//!
//! Weights: random values quantized by each type's reference quantizer, with varied magnitudes,
//! plus rows at the types' extreme levels (Q8_0 rows of −128 and 127). Random data with a fresh
//! seed per run, printed; `PSHARD_SEED=<n>` replays a run.

mod common;

use common::rng;
use pshard_kernels::gemm::packed;
use pshard_kernels::matmul::{
    matmul_at, matmul_exact, quantize_acts, QuantizedActs, WeightLayout, WeightMatrix,
};
use pshard_kernels::pool;
use pshard_kernels::quant::{self, exact, QuantKernel, SimdLevel};
use pshard_model::ggml_type::GgmlType;
use rand::rngs::StdRng;
use rand::Rng;

const MAX_TOKENS: usize = 40;

fn random_vec(r: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let scale = 10f32.powf(r.gen_range(-3.0..1.5));
        let offset = if r.gen_bool(0.3) {
            r.gen_range(-1.0..1.0) * scale
        } else {
            0.0
        };
        for _ in 0..32.min(n - v.len()) {
            v.push(offset + scale * r.gen_range(-1.0f32..1.0));
        }
    }
    v
}

/// `rows` rows of `cols` elements of `k.ty`: quantized random values; for Q8_0 two rows hold
/// the extreme levels −128 and 127 (a file from another quantizer may); for MXFP4 two rows hold
/// scale bytes at the low end of E8M0 (0 and 1 are subnormal scales, 2 the smallest normal one).
fn weights(r: &mut StdRng, k: &QuantKernel, rows: usize, cols: usize) -> Vec<u8> {
    let rb = k.ty.row_bytes(cols as u64).unwrap() as usize;
    let mut data = vec![0u8; rows * rb];
    for row in data.chunks_exact_mut(rb) {
        (k.quantize_row)(&random_vec(r, cols), row);
    }
    if k.ty == GgmlType::Q8_0 {
        for (i, row) in data.chunks_exact_mut(rb).take(2).enumerate() {
            for blk in row.chunks_exact_mut(34) {
                for q in &mut blk[2..] {
                    *q = if (i + r.gen_range(0..3)) % 2 == 0 {
                        0x80
                    } else {
                        0x7F
                    };
                }
            }
        }
    }
    if k.ty == GgmlType::MXFP4 {
        // Row 0 only tiny scales (its outputs are made of them), row 1 mixed.
        for (i, row) in data.chunks_exact_mut(rb).take(2).enumerate() {
            for blk in row.chunks_exact_mut(17) {
                blk[0] = [0u8, 1, 2, 3, 120, 135][r.gen_range(0..if i == 0 { 4 } else { 6 })];
            }
        }
    }
    data
}

/// Rows `t0 .. t0 + n` of `x` as their own buffer.
fn slice_acts(x: &QuantizedActs, t0: usize, n: usize) -> QuantizedActs {
    QuantizedActs {
        format: x.format,
        data: x.data[t0 * x.row_bytes..(t0 + n) * x.row_bytes].to_vec(),
        row_bytes: x.row_bytes,
        n_rows: n,
        cols: x.cols,
    }
}

/// A width with whole 512-column chunks, a partial chunk and (for 32-element blocks) an odd
/// number of blocks.
fn cols_for(ty: GgmlType) -> usize {
    match ty.block_size() {
        256 => 768,
        32 => 736,
        _ => 100,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The matrix `data` (`rows × cols` of `ty`) in the file's layout and, where the type has one,
/// repacked; each with one thread and with all cores.
fn each_matrix(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Vec<(Owned, usize)> {
    let rb = data.len() / rows;
    let mut m = vec![Owned {
        ty,
        data: data.to_vec(),
        rows,
        cols,
        layout: WeightLayout::File,
    }];
    if let Ok(p) = packed::repack(ty, data, rows, rb) {
        m.push(Owned {
            data: p,
            layout: WeightLayout::Interleaved,
            ..m[0].clone()
        });
    }
    m.into_iter()
        .flat_map(|m| [(m.clone(), 1), (m, 0)])
        .collect()
}

/// A weight matrix that owns its bytes.
#[derive(Clone)]
struct Owned {
    ty: GgmlType,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
    layout: WeightLayout,
}

impl Owned {
    fn matrix(&self) -> WeightMatrix<'_> {
        WeightMatrix {
            ty: self.ty,
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
            layout: self.layout,
        }
    }
}

/// Every type, every level, batch sizes 1..=40 at shifting positions, random row ranges, one
/// thread and all cores: each output equals the reference dot bit for bit.
#[test]
fn matmul_outputs_do_not_depend_on_batch_rows_threads_or_level() {
    let mut r = rng("matmul_invariance");
    let rows = 37;
    for &ty in quant::SUPPORTED {
        let k = quant::scalar_kernel(ty).expect("supported type");
        let cols = cols_for(ty);
        let data = weights(&mut r, &k, rows, cols);
        let rb = data.len() / rows;
        let xs = random_vec(&mut r, 2 * MAX_TOKENS * cols);
        let xq = quantize_acts(k.act, &xs, 2 * MAX_TOKENS, cols);
        let want: Vec<Vec<u32>> = (0..2 * MAX_TOKENS)
            .map(|t| {
                (0..rows)
                    .map(|i| (k.dot)(&data[i * rb..(i + 1) * rb], xq.row(t), cols).to_bits())
                    .collect()
            })
            .collect();
        for (w, threads) in each_matrix(ty, &data, rows, cols) {
            let w = w.matrix();
            let layout = w.layout;
            pool::set_threads(threads);
            for level in SimdLevel::ALL {
                if !level.available() {
                    continue;
                }
                // Batch 1 (the decode path) twice: all rows, then a random range.
                for n in std::iter::once(1).chain(1..=MAX_TOKENS) {
                    let t0 = r.gen_range(0..=MAX_TOKENS);
                    let x = slice_acts(&xq, t0, n);
                    let (lo, hi) = if n % 3 == 0 || (n == 1 && r.gen_bool(0.5)) {
                        let lo = r.gen_range(0..rows);
                        (lo, r.gen_range(lo + 1..=rows))
                    } else {
                        (0, rows)
                    };
                    let stride = rows + 1;
                    let mut out = vec![f32::NAN; n * stride];
                    matmul_at(level, &w, &x, &mut out, stride, lo..hi).unwrap();
                    for t in 0..n {
                        for i in 0..stride {
                            let got = out[t * stride + i];
                            if (lo..hi).contains(&i) {
                                assert_eq!(
                                    got.to_bits(),
                                    want[t0 + t][i],
                                    "{ty} {layout:?} {} threads {threads}: batch {n} (from \
                                     token {t0}), rows {lo}..{hi}: out[{t},{i}] = {got} vs {}",
                                    level.name(),
                                    f32::from_bits(want[t0 + t][i])
                                );
                            } else {
                                assert!(got.is_nan(), "{ty}: out[{t},{i}] outside the rows");
                            }
                        }
                    }
                }
            }
        }
        pool::set_threads(0);
    }
}

/// AMX: turned on where this process is granted the tiles, the GEMM's steps of 16 tokens run on
/// them (other tests of this binary running meanwhile may take them too: same bits); here at a real model's width (4096
/// columns: 8 chunks) and batches of 16, 47 and 100 tokens (AMX steps plus the VNNI kernel's
/// rest) for every type, both layouts, one thread and all: each output equals the reference dot
/// bit for bit, and the tiles were configured. Skips (a failure with `PSHARD_NO_SKIP`) where the
/// probe says no.
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "needs a CPU with AMX-INT8 (the GPU machine's host: run with --include-ignored)"]
fn amx_tiles_match_the_definition() {
    use pshard_kernels::gemm::amx;
    if let Err(why) = amx::set_enabled(true) {
        pshard_testkit::skip(&format!("AMX: {why}"));
        return;
    }
    let mut r = rng("amx_invariance");
    let (rows, cols) = (48, 4096);
    let before = amx::configured();
    for &ty in quant::SUPPORTED {
        let k = quant::scalar_kernel(ty).expect("supported type");
        if pshard_kernels::gemm::converter(ty).is_none() {
            continue; // float weights take the f32 dot
        }
        let data = weights(&mut r, &k, rows, cols);
        let rb = data.len() / rows;
        for n in [16, 47, 100] {
            let xs = random_vec(&mut r, n * cols);
            let x = quantize_acts(k.act, &xs, n, cols);
            for (w, threads) in each_matrix(ty, &data, rows, cols) {
                pool::set_threads(threads);
                let w = w.matrix();
                let mut out = vec![f32::NAN; n * rows];
                matmul_at(SimdLevel::Avx512, &w, &x, &mut out, rows, 0..rows).unwrap();
                for t in 0..n {
                    for i in 0..rows {
                        let want = (k.dot)(&data[i * rb..(i + 1) * rb], x.row(t), cols);
                        assert_eq!(
                            out[t * rows + i].to_bits(),
                            want.to_bits(),
                            "{ty} {:?} threads {threads}, {n} tokens: out[{t},{i}] = {} vs {want}",
                            w.layout,
                            out[t * rows + i]
                        );
                    }
                }
            }
        }
    }
    pool::set_threads(0);
    assert!(amx::configured() > before, "the AMX tiles never ran");
}

/// The exact-activation path: every output equals the portable f32 dot of the dequantized row
/// with the unrounded activations, at every batch size, row range and thread count.
#[test]
fn exact_outputs_do_not_depend_on_batch_rows_or_threads() {
    let mut r = rng("exact_invariance");
    let rows = 23;
    for &ty in quant::SUPPORTED {
        let k = quant::scalar_kernel(ty).expect("supported type");
        let cols = cols_for(ty);
        let data = weights(&mut r, &k, rows, cols);
        let rb = data.len() / rows;
        let deq: Vec<Vec<f32>> = (0..rows)
            .map(|i| {
                let mut y = vec![0f32; cols];
                (k.dequantize_row)(&data[i * rb..(i + 1) * rb], &mut y);
                y
            })
            .collect();
        let xs = random_vec(&mut r, 2 * MAX_TOKENS * cols);
        for (w, threads) in each_matrix(ty, &data, rows, cols) {
            let w = w.matrix();
            let layout = w.layout;
            pool::set_threads(threads);
            for n in [1usize, 2, 3, 5, 8, 13, 17, 40] {
                let t0 = r.gen_range(0..=MAX_TOKENS);
                let x = &xs[t0 * cols..(t0 + n) * cols];
                let lo = r.gen_range(0..rows);
                let mut out = vec![f32::NAN; n * rows];
                matmul_exact(&w, x, n, &mut out, rows, lo..rows).unwrap();
                for t in 0..n {
                    for i in lo..rows {
                        let want = exact::dot_f32_scalar(&deq[i], &x[t * cols..(t + 1) * cols]);
                        assert_eq!(
                            out[t * rows + i].to_bits(),
                            want.to_bits(),
                            "{ty} {layout:?} exact, threads {threads}, batch {n}: out[{t},{i}]"
                        );
                    }
                }
            }
        }
        pool::set_threads(0);
    }
}

/// The int8 GEMM's converters: the SIMD converter of every type writes the portable one's bytes
/// and factors, on quantized rows and on rows of random bytes (with valid scales where the
/// random ones could be NaN or infinite).
#[test]
fn simd_converters_match_the_portable_ones() {
    use pshard_kernels::gemm;
    let mut r = rng("converters");
    for &ty in quant::SUPPORTED {
        let Some(conv) = gemm::converter(ty) else {
            continue;
        };
        let Some(fast) = conv.fast else {
            println!("{ty}: no SIMD converter on this CPU");
            continue;
        };
        let k = quant::scalar_kernel(ty).unwrap();
        let cols = 1024;
        let mut rows = weights(&mut r, &k, 2, cols);
        // Random bytes, then the dequantized values must be finite: keep only rows whose
        // portable dequantization is.
        let rb = rows.len() / 2;
        let mut noise = vec![0u8; rb];
        loop {
            r.fill(&mut noise[..]);
            let mut y = vec![0f32; cols];
            (k.dequantize_row)(&noise, &mut y);
            if y.iter().all(|v| v.is_finite()) {
                break;
            }
        }
        rows.extend_from_slice(&noise);
        for row in rows.chunks_exact(rb) {
            let subs = cols / conv.sub();
            let run = |f: gemm::ConvertFn| {
                let (mut u, mut s, mut m) = (vec![0u8; cols], vec![0f32; subs], vec![0f32; subs]);
                f(row, &mut u, &mut s, &mut m);
                (u, bits(&s), bits(&m))
            };
            assert_eq!(run(conv.row), run(fast), "{ty}");
        }
    }
}

/// The direct 16-row tile loaders write the tile the converter and the interleaving write, for
/// whole and partial tiles (repeated last rows) and chunks that start past the first block; the
/// repacked layout's loaders write, from a repacked group, the tile of its rows in the file's
/// layout.
#[test]
fn tile_loaders_match_the_converters() {
    use pshard_kernels::gemm::{self, Tile};
    let mut r = rng("tile_loaders");
    if gemm::rows_per_tile(SimdLevel::Avx512) != Some(16) {
        println!("SKIP: no AVX-512 VNNI");
        return;
    }
    for &ty in quant::SUPPORTED {
        let Some(conv) = gemm::converter(ty) else {
            continue;
        };
        if conv.tile16.is_none() {
            println!("{ty}: no direct tile loader");
            continue;
        }
        let k = quant::scalar_kernel(ty).unwrap();
        let (rows, cols) = (21, 1024);
        let data = weights(&mut r, &k, rows, cols);
        let rb = data.len() / rows;
        let row = |i: usize| &data[i * rb..(i + 1) * rb];
        let plain = gemm::Converter {
            tile16: None,
            ..conv
        };
        for (range, e0, n) in [(0..16, 0, 512), (5..21, 512, 512), (16..21, 256, 768)] {
            let (mut a, mut b) = (Tile::default(), Tile::default());
            a.load(&conv, SimdLevel::Avx512, 16, range.clone(), row, e0, n);
            b.load(&plain, SimdLevel::Avx512, 16, range.clone(), row, e0, n);
            assert_eq!(a.q[..16 * n], b.q[..16 * n], "{ty} {range:?} {e0}: levels");
            let subs = 16 * n / conv.sub();
            assert_eq!(
                bits(&a.scale[..subs]),
                bits(&b.scale[..subs]),
                "{ty}: scales"
            );
            if conv.min {
                assert_eq!(bits(&a.min[..subs]), bits(&b.min[..subs]), "{ty}: minima");
            }
        }
        // The repacked layout's loader: a group's tile equals the file layout's of its rows.
        let Ok(p) = packed::repack(ty, &data, rows, rb) else {
            continue;
        };
        let load = conv.tile16_packed.expect("a repacked type's tile loader");
        let gb = packed::ROWS * rb;
        for e0 in (0..cols).step_by(256) {
            let n = (cols - e0).min(if e0 == 256 { 768 } else { 256 });
            let mut a = Tile::default();
            a.load(&conv, SimdLevel::Avx512, 16, 0..16, row, e0, n);
            let subs = 16 * n / conv.sub();
            let (mut q, mut sc, mut mn) = (vec![0u8; 16 * n], vec![0f32; subs], vec![0f32; subs]);
            load(&p[..gb], e0, n, &mut q, &mut sc, &mut mn);
            assert_eq!(a.q[..16 * n], q[..], "{ty} repacked, from {e0}: levels");
            assert_eq!(bits(&a.scale[..subs]), bits(&sc), "{ty} repacked: scales");
            if conv.min {
                assert_eq!(bits(&a.min[..subs]), bits(&mn), "{ty} repacked: minima");
            }
        }
    }
}

/// The AVX2 tile loader of the repacked layout: each half of a repacked group gives the 8-row
/// tile that converting its rows from the file's layout and interleaving them gives, for chunks
/// at the first, middle and last units (Q8_0 rows of −128 and 127 included).
#[test]
fn avx2_repacked_tiles_match_the_converters() {
    use pshard_kernels::gemm::{self, Tile};
    let mut r = rng("avx2_tiles");
    if gemm::rows_per_tile(SimdLevel::Avx2) != Some(8) {
        println!("SKIP: no AVX2");
        return;
    }
    for &ty in quant::SUPPORTED {
        if !packed::avx2_kernel(ty) {
            continue;
        }
        let conv = gemm::converter(ty).expect("a quantized type");
        let k = quant::scalar_kernel(ty).unwrap();
        let (rows, cols) = (21, 1024);
        let data = weights(&mut r, &k, rows, cols);
        let rb = data.len() / rows;
        let row = |i: usize| &data[i * rb..(i + 1) * rb];
        let p = packed::repack(ty, &data, rows, rb).expect("a repacked type");
        let gb = packed::ROWS * rb;
        for (e0, n) in [(0, 512), (256, 768), (768, 256)] {
            for half in 0..2 {
                let (mut a, mut b) = (Tile::default(), Tile::default());
                a.load(
                    &conv,
                    SimdLevel::Avx2,
                    8,
                    8 * half..8 * half + 8,
                    row,
                    e0,
                    n,
                );
                b.load_packed8(&conv, &p[..gb], half, e0, n);
                assert_eq!(a.q, b.q, "{ty} half {half}, from {e0}: levels");
                assert_eq!(bits(&a.scale), bits(&b.scale), "{ty} half {half}: scales");
                if conv.min {
                    assert_eq!(bits(&a.min), bits(&b.min), "{ty} half {half}: minima");
                }
            }
        }
    }
}

/// A Q8_0/Q8_1 activation block holding −128 (outside those formats: their SIMD quantizer writes
/// it for NaN input) makes that token's outputs NaN on every path, the reference dot included,
/// alone (batch 1) or in a batch, and leaves the other tokens' outputs as they were.
#[test]
fn out_of_range_activations_give_nan_on_every_path() {
    let mut r = rng("low_acts");
    let rows = 19;
    for &ty in quant::SUPPORTED {
        let k = quant::scalar_kernel(ty).expect("supported type");
        if !matches!(k.act, quant::ActFormat::Q8_0 | quant::ActFormat::Q8_1) {
            continue;
        }
        let cols = cols_for(ty);
        let data = weights(&mut r, &k, rows, cols);
        let w = WeightMatrix {
            ty,
            data: &data,
            rows,
            cols,
            layout: pshard_kernels::matmul::WeightLayout::File,
        };
        let rb = data.len() / rows;
        let n = 5;
        let xs = random_vec(&mut r, n * cols);
        let mut x = quantize_acts(k.act, &xs, n, cols);
        let clean = x.clone();
        // Token 2, a value in its second block.
        let block = x.format.row_bytes(32).unwrap();
        let at = 2 * x.row_bytes + block + block - 1;
        x.data[at] = 0x80;
        for level in SimdLevel::ALL {
            if !level.available() {
                continue;
            }
            // The NaN token alone (the decode path) and next to a clean one.
            for t in [1, 2] {
                let one = slice_acts(&x, t, 1);
                let mut out = vec![0f32; rows];
                matmul_at(level, &w, &one, &mut out, rows, 0..rows).unwrap();
                for (i, &got) in out.iter().enumerate() {
                    let want = (k.dot)(&data[i * rb..(i + 1) * rb], x.row(t), cols);
                    assert_eq!(
                        got.is_nan(),
                        t == 2,
                        "{ty} {} batch 1, token {t}: {got}",
                        level.name()
                    );
                    if t != 2 {
                        assert_eq!(got.to_bits(), want.to_bits(), "{ty} {}", level.name());
                    }
                }
            }
            let mut out = vec![0f32; n * rows];
            matmul_at(level, &w, &x, &mut out, rows, 0..rows).unwrap();
            for t in 0..n {
                for i in 0..rows {
                    let got = out[t * rows + i];
                    let refd = (k.dot)(&data[i * rb..(i + 1) * rb], x.row(t), cols);
                    if t == 2 {
                        assert!(
                            got.is_nan() && refd.is_nan(),
                            "{ty} {}: {got}",
                            level.name()
                        );
                    } else {
                        let want = (k.dot)(&data[i * rb..(i + 1) * rb], clean.row(t), cols);
                        assert_eq!(got.to_bits(), want.to_bits(), "{ty} {}", level.name());
                    }
                }
            }
        }
    }
}
