//! Dequantization, the GEMV (f32 and int8, direct and in a CUDA graph), the GEMM path, MMQ and
//! the activation quantizer against the CPU engine.

use super::*;

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_dequant_every_type_matches_cpu() {
    let Some(c) = ctx("cuda_dequant_every_type_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_dequant");
    let (rows, cols) = (7, 768);
    for &ty in CUDA_TYPES {
        for random_bits in [false, true] {
            let (bytes, want) = if random_bits {
                let b = random_blocks(&mut r, ty, rows, cols);
                let d = cpu_dequant(ty, &b, rows, cols);
                (b, d)
            } else {
                make_weights(&mut r, ty, rows, cols)
            };
            let w = c.up_bytes(&bytes);
            let out = c.poisoned(rows * cols * 2);
            c.gpu
                .kernels
                .dequant_f16(ty, w.ptr, out.ptr, rows, cols, c.gpu.stream())
                .unwrap();
            c.sync();
            let got = c.down_f16(out.ptr, rows * cols);
            // Tolerance: f16 rounding of each value (relative 2^-11) plus f16 subnormal spacing.
            for (i, (&g, &x)) in got.iter().zip(&want).enumerate() {
                let tol = x.abs() * 1e-3 + 1e-6;
                assert!(
                    (g - x).abs() <= tol,
                    "{ty:?} (random bits {random_bits}) element {i}: gpu {g} cpu {x}"
                );
            }
            c.free(&[w, out]);
        }
    }
}

fn ref_matmul(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let mut out = vec![0f64; n * rows];
    for t in 0..n {
        for j in 0..rows {
            let mut s = 0f64;
            for k in 0..cols {
                s += w[j * cols + k] as f64 * x[t * cols + k] as f64;
            }
            out[t * rows + j] = s + bias.map_or(0.0, |b| b[j] as f64);
        }
    }
    out
}

/// The activations the GEMV of weight type `ty` really multiplies with: `x` (rows of `cols`)
/// rounded through the type's partner format as the CPU engine quantizes it (f32 types: `x`).
fn partner_rounded(ty: GgmlType, x: &[f32], cols: usize) -> Vec<f32> {
    let f = quant::kernel(ty).expect("CPU kernel").act;
    let mut out = vec![0f32; x.len()];
    let mut buf = vec![0u8; f.row_bytes(cols).expect("whole blocks")];
    for (xr, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        quant::act::quantize_acts_row(f, xr, &mut buf);
        quant::act::dequantize_acts_row(f, &buf, o);
    }
    out
}

/// f64 reference of the GEMV: `w` (`bytes`, dequantized `wf`, `rows × cols`) times `x` rounded
/// through the type's partner format. With a Q8_1 partner (Q4_1, Q5_1) the weight block minimum
/// multiplies the block sum the format stores (as f16) rather than the sum of the rounded values,
/// as the format defines.
#[allow(clippy::too_many_arguments)]
fn ref_gemv(
    ty: GgmlType,
    bytes: &[u8],
    wf: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let mut out = ref_matmul(wf, rows, cols, &partner_rounded(ty, x, cols), n, bias);
    let f = quant::kernel(ty).expect("CPU kernel").act;
    if f != quant::ActFormat::Q8_1 {
        return out;
    }
    let (rb, bb, nb) = (
        row_bytes(ty, cols).unwrap(),
        ty.type_size() as usize,
        cols / 32,
    );
    let f16_at = |b: &[u8], o: usize| f16::from_le_bytes([b[o], b[o + 1]]).to_f32() as f64;
    let mut buf = vec![0u8; f.row_bytes(cols).unwrap()];
    for t in 0..n {
        quant::act::quantize_acts_row(f, &x[t * cols..(t + 1) * cols], &mut buf);
        // Per block: stored sum minus the sum of the rounded values (d · Σq).
        let fix: Vec<f64> = buf
            .chunks_exact(f.block_bytes())
            .map(|a| {
                let sq: i32 = a[4..].iter().map(|&q| q as i8 as i32).sum();
                f16_at(a, 2) - f16_at(a, 0) * sq as f64
            })
            .collect();
        for j in 0..rows {
            let w = &bytes[j * rb..(j + 1) * rb];
            out[t * rows + j] += (0..nb).map(|b| f16_at(w, b * bb + 2) * fix[b]).sum::<f64>();
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_gemv_every_type_matches_cpu() {
    let Some(c) = ctx("cuda_gemv_every_type_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_gemv");
    let (rows, cols) = (37, 768);
    for &ty in CUDA_TYPES {
        let bytes = random_blocks(&mut r, ty, rows, cols);
        let wf = cpu_dequant(ty, &bytes, rows, cols);
        let w = c.up_bytes(&bytes);
        for n in [1usize, 2, 3, 5, 8, 13] {
            let x = randv(&mut r, n * cols, 1.0);
            let bias = randv(&mut r, rows, 1.0);
            // Quantized types dot int8 activations: the f64 reference takes them rounded the same way.
            let want = ref_gemv(ty, &bytes, &wf, rows, cols, &x, n, Some(&bias));
            let xd = c.up_f32(&x);
            let bd = c.up_f32(&bias);
            let out = c.poisoned(n * rows * 4);
            c.gpu
                .kernels
                .gemv(
                    ty,
                    w.ptr,
                    rows,
                    cols,
                    xd.ptr,
                    cols,
                    out.ptr,
                    rows,
                    n,
                    Some(bd.ptr),
                    c.gpu.stream(),
                )
                .unwrap();
            c.sync();
            let err = rel_l2(&c.down_f32(out.ptr, n * rows), &want);
            // f32 accumulation over 768 terms (integer sub-block sums for quantized types): far
            // below 1e-5.
            assert!(err < 1e-5, "{ty:?} n={n}: rel L2 {err}");
            c.free(&[xd, bd, out]);
        }
        c.free(&[w]);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matmul_gemm_path_and_row_range() {
    let Some(c) = ctx("cuda_matmul_gemm_path_and_row_range") else {
        return;
    };
    let mut r = rng("cuda_matmul_gemm");
    let (rows, cols) = (301, 1024);
    let (row0, nrows) = (17, 250);
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ] {
        let (bytes, wf) = make_weights(&mut r, ty, rows, cols);
        let w = c.up_bytes(&bytes);
        for n in [4usize, 8, 17, 100] {
            let x = randv(&mut r, n * cols, 1.0);
            let bias = randv(&mut r, rows, 1.0);
            // Few rows run the GEMV (and with PSHARD_CUDA_MMQ=1, MMQ runs its range): both round
            // activations to the partner format.
            let gemv = matmul_path(ty, n, true, false) != MatmulPath::Gemm;
            let want_all = if gemv {
                ref_gemv(ty, &bytes, &wf, rows, cols, &x, n, Some(&bias))
            } else {
                ref_matmul(&wf, rows, cols, &x, n, Some(&bias))
            };
            let want: Vec<f64> = (0..n)
                .flat_map(|t| want_all[t * rows + row0..t * rows + row0 + nrows].to_vec())
                .collect();
            let xd = c.up_f32(&x);
            let bd = c.up_f32(&bias);
            let out = c.poisoned(n * nrows * 4);
            let (wb, ab) = GemmScratch::bytes(nrows, cols, n);
            let ws = c.alloc(wb as usize);
            let as_ = c.alloc(ab as usize);
            let scratch = GemmScratch {
                weights: ws.ptr,
                acts: as_.ptr,
            };
            c.gpu
                .matmul(
                    ty,
                    w.ptr,
                    cols,
                    row0,
                    nrows,
                    xd.ptr,
                    n,
                    out.ptr,
                    nrows,
                    Some(bd.ptr),
                    Some(scratch),
                    false,
                )
                .unwrap();
            c.sync();
            let err = rel_l2(&c.down_f32(out.ptr, n * nrows), &want);
            // f16 (bf16) rounding of weights and activations: 1e-3 (bf16: 8e-3); the GEMV and
            // MMQ paths only round in f32 (1e-5).
            let tol = if gemv {
                1e-5
            } else if ty == GgmlType::BF16 {
                8e-3
            } else {
                1.5e-3
            };
            assert!(err < tol, "{ty:?} n={n}: rel L2 {err}");
            c.free(&[xd, bd, out, ws, as_]);
        }
        c.free(&[w]);
    }
}

/// The GPU activation quantizer writes the same quants, scales and sums as the CPU engine's, bit
/// for bit (ties to even, the first largest magnitude for Q8_K, zero blocks).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_quantize_acts_bit_exact_vs_cpu() {
    let Some(c) = ctx("cuda_quantize_acts_bit_exact_vs_cpu") else {
        return;
    };
    let mut r = rng("cuda_quantize_acts");
    let (n, cols) = (8usize, 1280usize);
    let mut x = randv(&mut r, n * cols, 1.0);
    // Row 1: equal magnitudes of opposite sign (the first one is the Q8_K reference value).
    x[cols + 3] = 1.5;
    x[cols + 7] = -1.5;
    x[cols + 256 + 5] = -1.5;
    x[cols + 256 + 9] = 1.5;
    // Row 2: a block whose scale is exactly 1 with values at k + 0.5 (ties), and a zero block.
    for j in 0..32 {
        x[2 * cols + j] = if j == 0 { 127.0 } else { j as f32 - 16.5 };
    }
    x[2 * cols + 256..2 * cols + 512].fill(0.0);
    // Row 3: large and tiny magnitudes.
    for (j, v) in x[3 * cols..4 * cols].iter_mut().enumerate() {
        *v *= if j % 3 == 0 { 1e4 } else { 1e-4 };
    }
    let xd = c.up_f32(&x);
    for format in [
        quant::ActFormat::Q8_0,
        quant::ActFormat::Q8_1,
        quant::ActFormat::Q8K,
    ] {
        let qa = c
            .gpu
            .kernels
            .quantize_acts(format, xd.ptr, cols, cols, n, c.gpu.stream())
            .unwrap();
        c.sync();
        let q = c.down_bytes(qa.q, n * cols);
        let per_scale = if format == quant::ActFormat::Q8_1 {
            2
        } else {
            1
        };
        let qk = format.block_size();
        let d = c.down_f32(qa.d, n * cols / qk * per_scale);
        let bs = c.down_bytes(qa.bs, n * cols / 16 * 2);
        let mut cpu = vec![0u8; format.row_bytes(cols).unwrap()];
        for t in 0..n {
            quant::act::quantize_acts_row(format, &x[t * cols..(t + 1) * cols], &mut cpu);
            for (b, blk) in cpu.chunks_exact(format.block_bytes()).enumerate() {
                let gq = &q[t * cols + b * qk..t * cols + (b + 1) * qk];
                let gd = &d[(t * cols / qk + b) * per_scale..][..per_scale];
                let at = format!("{} row {t} block {b}", format.name());
                let f16_at = |o: usize| f16::from_le_bytes([blk[o], blk[o + 1]]).to_f32();
                match format {
                    quant::ActFormat::Q8_0 => {
                        assert_eq!(gq, &blk[2..], "{at}: quants");
                        assert_eq!(gd[0].to_bits(), f16_at(0).to_bits(), "{at}: scale");
                    }
                    quant::ActFormat::Q8_1 => {
                        assert_eq!(gq, &blk[4..], "{at}: quants");
                        assert_eq!(gd[0].to_bits(), f16_at(0).to_bits(), "{at}: scale");
                        assert_eq!(gd[1].to_bits(), f16_at(2).to_bits(), "{at}: sum");
                    }
                    _ => {
                        assert_eq!(gq, &blk[4..260], "{at}: quants");
                        let cd = f32::from_le_bytes(blk[0..4].try_into().unwrap());
                        assert_eq!(gd[0].to_bits(), cd.to_bits(), "{at}: scale");
                        let o = (t * cols / 16 + b * 16) * 2;
                        assert_eq!(&bs[o..o + 32], &blk[260..292], "{at}: sums");
                    }
                }
            }
        }
    }
    c.free(&[xd]);
}

/// The int8 GEMV of every quantized type against the CPU engine's matmul on the same weights and
/// activations: odd row counts (not multiples of the rows per block), each batch size 1..8 and a
/// batch of 11 (8 + 3), every warps-per-row variant.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_gemv_int8_matches_cpu_engine() {
    let Some(c) = ctx("cuda_gemv_int8_matches_cpu_engine") else {
        return;
    };
    let mut r = rng("cuda_gemv_int8");
    let mut worst = 0f64;
    for &ty in quant::SUPPORTED {
        let Some(k) = quant::kernel(ty) else { continue };
        if k.act == quant::ActFormat::F32 {
            continue;
        }
        // (rows, cols): one warp per row on short rows, and 2 or 4 warps per row on few rows.
        for (si, &(rows, cols)) in [(37usize, 768usize), (131, 4096), (67, 2048)]
            .iter()
            .enumerate()
        {
            let bytes = if si == 1 {
                make_weights(&mut r, ty, rows, cols).0
            } else {
                random_blocks(&mut r, ty, rows, cols)
            };
            let w = c.up_bytes(&bytes);
            let wm = pshard_kernels::matmul::WeightMatrix {
                ty,
                data: &bytes,
                rows,
                cols,
                layout: pshard_kernels::matmul::WeightLayout::File,
            };
            for n in (1usize..=8).chain([11]) {
                let x = randv(&mut r, n * cols, 1.0);
                let xq = pshard_kernels::matmul::quantize_acts(k.act, &x, n, cols);
                let mut want = vec![0f32; n * rows];
                pshard_kernels::matmul::matmul(&wm, &xq, &mut want, rows, 0..rows).unwrap();
                let xd = c.up_f32(&x);
                let out = c.poisoned(n * rows * 4);
                c.gpu
                    .kernels
                    .gemv(
                        ty,
                        w.ptr,
                        rows,
                        cols,
                        xd.ptr,
                        cols,
                        out.ptr,
                        rows,
                        n,
                        None,
                        c.gpu.stream(),
                    )
                    .unwrap();
                c.sync();
                let got = c.down_f32(out.ptr, n * rows);
                let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
                let err = rel_l2(&got, &want64);
                worst = worst.max(err);
                // Same integer sums and block scale math; only the f32 summation order differs.
                assert!(err <= 1e-5, "{ty:?} {rows}x{cols} n={n}: rel L2 {err}");
                c.free(&[xd, out]);
            }
            c.free(&[w]);
        }
    }
    eprintln!("int8 GEMV vs CPU engine: worst rel L2 {worst:.2e}");
}

/// The int8 GEMV (quantizer + dependent GEMV launch) captured in a CUDA graph and replayed on new
/// activations gives the same bits as direct calls.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_gemv_int8_graph_replay_matches_direct() {
    let Some(c) = ctx("cuda_gemv_int8_graph_replay_matches_direct") else {
        return;
    };
    let mut r = rng("cuda_gemv_int8_graph");
    let (rows, cols) = (333usize, 2048usize);
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::MXFP4,
    ] {
        let w = c.up_bytes(&random_blocks(&mut r, ty, rows, cols));
        for n in [1usize, 5] {
            let xd = c.up_f32(&randv(&mut r, n * cols, 1.0));
            let out = c.poisoned(n * rows * 4);
            let s = c.gpu.stream().clone();
            let call = || {
                c.gpu.kernels.gemv(
                    ty, w.ptr, rows, cols, xd.ptr, cols, out.ptr, rows, n, None, &s,
                )
            };
            let g = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, call).unwrap();
            for _ in 0..2 {
                let x = randv(&mut r, n * cols, 1.0);
                let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
                c.gpu.dev.upload(&s, xd.ptr, &xb).unwrap();
                call().unwrap();
                c.sync();
                let direct = c.down_bytes(out.ptr, n * rows * 4);
                c.gpu.dev.memset(&s, out.ptr, 0xff, n * rows * 4).unwrap();
                g.launch(&s).unwrap();
                c.sync();
                let replayed = c.down_bytes(out.ptr, n * rows * 4);
                assert!(direct == replayed, "{ty:?} n={n}: graph replay differs");
            }
            c.free(&[xd, out]);
        }
        c.free(&[w]);
    }
}

/// MMQ against the CPU engine's matmul on the same weights and activations, bit for bit (the same
/// integer sums and f32 operations in the CPU's order, mmq.cu): every quantized type, every tile
/// this device runs, token counts 1, 7, 8, 33, 100, 256 (ragged against every tile), rows that are
/// not tile multiples, a partial last K tile for the 32-element types (800 = 3 × 256 + 32),
/// weights 6 bytes past an aligned address, a bias, activations quantized earlier (the
/// prequantized entry), and a batch larger than the int8 scratch holds at once (two chunks).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_mmq_matches_cpu_engine() {
    let Some(c) = ctx("cuda_mmq_matches_cpu_engine") else {
        return;
    };
    let mut r = rng("cuda_mmq");
    // Under the memory checker (PSHARD_CUDA_TINY=1): fewer token counts.
    let tiny = std::env::var_os("PSHARD_CUDA_TINY").is_some();
    let s = c.gpu.stream().clone();
    let mut launches = 0;
    // Exact bits; on a mismatch, where and how far (rel L2 tells a layout error from rounding).
    let check = |got: &[f32], want: &[f32], rows: usize, what: &str| {
        let bad: Vec<usize> = (0..want.len())
            .filter(|&i| got[i].to_bits() != want[i].to_bits())
            .collect();
        if let Some(&i) = bad.first() {
            let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let err = if got.iter().all(|v| v.is_finite()) {
                rel_l2(got, &w64)
            } else {
                f64::NAN
            };
            panic!(
                "{what}: {} of {} outputs differ from the CPU engine (rel L2 {err:.2e}); first: token {} row {}: {} vs {}",
                bad.len(),
                want.len(),
                i / rows,
                i % rows,
                got[i],
                want[i]
            );
        }
    };
    for &ty in quant::SUPPORTED {
        if !mmq_supported(ty) {
            continue;
        }
        let k = quant::kernel(ty).expect("CPU kernel");
        let cols0 = if ty.block_size() == 32 { 800 } else { 768 };
        for (si, &(rows, cols)) in [(37usize, cols0), (131, 4096)].iter().enumerate() {
            let bytes = if si == 1 {
                make_weights(&mut r, ty, rows, cols).0
            } else {
                random_blocks(&mut r, ty, rows, cols)
            };
            let pad = 6usize;
            let mut padded = vec![0u8; pad];
            padded.extend_from_slice(&bytes);
            let wbuf = c.up_bytes(&padded);
            let w = wbuf.ptr + pad as u64;
            let wm = pshard_kernels::matmul::WeightMatrix {
                ty,
                data: &bytes,
                rows,
                cols,
                layout: pshard_kernels::matmul::WeightLayout::File,
            };
            let bias = randv(&mut r, rows, 1.0);
            let bd = c.up_f32(&bias);
            let ns: &[usize] = if tiny {
                &[1, 8, 33]
            } else {
                &[1, 7, 8, 33, 100, 256]
            };
            for &n in ns {
                let x = randv(&mut r, n * cols, 1.0);
                let xq = pshard_kernels::matmul::quantize_acts(k.act, &x, n, cols);
                let mut want = vec![0f32; n * rows];
                pshard_kernels::matmul::matmul(&wm, &xq, &mut want, rows, 0..rows).unwrap();
                let xd = c.up_f32(&x);
                let out = c.poisoned(n * rows * 4);
                let tiles: Vec<Option<MmqTile>> = std::iter::once(None)
                    .chain(c.gpu.kernels.mmq_tiles(ty).into_iter().map(Some))
                    .collect();
                for tile in tiles {
                    c.gpu.dev.memset(&s, out.ptr, 0xff, n * rows * 4).unwrap();
                    c.gpu
                        .kernels
                        .mmq(
                            ty, w, rows, cols, xd.ptr, cols, out.ptr, rows, n, None, tile, &s,
                        )
                        .unwrap();
                    c.sync();
                    let what = format!("{ty:?} {rows}x{cols} n={n} tile {tile:?}");
                    check(&c.down_f32(out.ptr, n * rows), &want, rows, &what);
                    launches += 1;
                }
                // A bias adds once, after the sum.
                c.gpu
                    .kernels
                    .mmq(
                        ty,
                        w,
                        rows,
                        cols,
                        xd.ptr,
                        cols,
                        out.ptr,
                        rows,
                        n,
                        Some(bd.ptr),
                        None,
                        &s,
                    )
                    .unwrap();
                c.sync();
                let with_bias: Vec<f32> = (0..n * rows).map(|i| want[i] + bias[i % rows]).collect();
                check(
                    &c.down_f32(out.ptr, n * rows),
                    &with_bias,
                    rows,
                    &format!("{ty:?} {rows}x{cols} n={n} bias"),
                );
                // Activations quantized earlier (as shared q/k/v inputs are).
                if n <= pshard_kernels::cuda::kernels::GEMV_MAX_NB {
                    let qa = c
                        .gpu
                        .kernels
                        .quantize_acts(k.act, xd.ptr, cols, cols, n, &s)
                        .unwrap();
                    c.gpu.dev.memset(&s, out.ptr, 0xff, n * rows * 4).unwrap();
                    c.gpu
                        .kernels
                        .mmq_prequantized(ty, qa, w, rows, cols, out.ptr, rows, n, None, &s)
                        .unwrap();
                    c.sync();
                    check(
                        &c.down_f32(out.ptr, n * rows),
                        &want,
                        rows,
                        &format!("{ty:?} {rows}x{cols} n={n} prequantized"),
                    );
                }
                c.free(&[xd, out]);
            }
            c.free(&[wbuf, bd]);
        }
    }
    // More tokens of 4096 columns than the scratch holds at once: two chunks, two launches.
    if !tiny {
        let (ty, rows, cols, n) = (GgmlType::Q4_K, 64usize, 4096usize, 600usize);
        let bytes = make_weights(&mut r, ty, rows, cols).0;
        let wd = c.up_bytes(&bytes);
        let k = quant::kernel(ty).unwrap();
        let x = randv(&mut r, n * cols, 1.0);
        let xq = pshard_kernels::matmul::quantize_acts(k.act, &x, n, cols);
        let wm = pshard_kernels::matmul::WeightMatrix {
            ty,
            data: &bytes,
            rows,
            cols,
            layout: pshard_kernels::matmul::WeightLayout::File,
        };
        let mut want = vec![0f32; n * rows];
        pshard_kernels::matmul::matmul(&wm, &xq, &mut want, rows, 0..rows).unwrap();
        let xd = c.up_f32(&x);
        let out = c.poisoned(n * rows * 4);
        c.gpu
            .kernels
            .mmq(
                ty, wd.ptr, rows, cols, xd.ptr, cols, out.ptr, rows, n, None, None, &s,
            )
            .unwrap();
        c.sync();
        check(
            &c.down_f32(out.ptr, n * rows),
            &want,
            rows,
            "Q4_K 64x4096 n=600 (chunks)",
        );
        c.free(&[wd, xd, out]);
    }
    eprintln!("MMQ vs CPU engine: {launches} launches, every output bit-identical");
}
