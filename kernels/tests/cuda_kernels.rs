//! CUDA kernels against CPU references on random inputs. The tests that need a GPU are ignored by
//! default (`needs a CUDA GPU`: CI has none and counts them as skipped); scripts/gpu-check.sh runs
//! them with `--include-ignored`. Run on a machine without a GPU they SKIP visibly; a GPU that is
//! present but fails to open fails them.
//!
//! Seeds: `PSHARD_SEED` (default 1234) replays a run; each test prints the seed it used.
//! Tolerances are stated per test: relative L2 error ‖gpu − ref‖ / ‖ref‖ against f64 references.

use half::f16;
use pshard_kernels::cuda::{
    kernels::{
        mmq_supported, row_bytes, type_geom, MmqTile, RopeYarnArg, CUDA_TYPES, MOE_GEMM_BN,
        MOE_ROUTE_FREE,
    },
    matmul_path, AttnParams, CudaError, DevBuf, GemmScratch, Gpu, HostRegistration, KvCells,
    MatmulPath, PinnedBuf, RegionId, RegionKind, RopeArgs, RopeKind,
};
use pshard_kernels::kv::KvType;
use pshard_kernels::quant;
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::{Activation, Routing};
use pshard_model::spec::Gating;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::io::Write;
use std::sync::{Mutex, MutexGuard, OnceLock};

struct Ctx {
    gpu: Gpu,
    scratch: RegionId,
}

static CTX: OnceLock<Result<Mutex<Ctx>, String>> = OnceLock::new();

/// The shared GPU, or `None` after a visible SKIP when this machine has no GPU at all. Any other
/// failure to open it — an NVRTC compile error in a `.cu` file, a module that does not load, cuBLAS
/// set-up — fails the calling test.
fn ctx(_test: &str) -> Option<MutexGuard<'static, Ctx>> {
    let c = CTX.get_or_init(|| {
        let cache = pshard_kernels::cuda::nvrtc::default_cache_dir();
        match Gpu::open(0, None, &cache) {
            Ok(gpu) => {
                let i = gpu.dev.info();
                eprintln!(
                    "cuda: {} ({}), {} SMs, {:.1} GiB total, context overhead {:.0} MiB, driver {}",
                    i.name,
                    i.arch(),
                    i.sm_count,
                    i.total_mem as f64 / (1u64 << 30) as f64,
                    i.context_overhead as f64 / (1u64 << 20) as f64,
                    i.driver_version
                );
                eprintln!("cuda: {}", gpu.kernels.build_summary());
                let scratch = gpu
                    .dev
                    .create_region(RegionKind::Scratch, "tests", 3 << 30)
                    .expect("scratch region");
                Ok(Mutex::new(Ctx { gpu, scratch }))
            }
            Err(e) if e.is_no_gpu() => Err(e.short_reason()),
            Err(e) => panic!("cuda: a GPU is present but could not be opened: {e}"),
        }
    });
    match c {
        Ok(m) => Some(m.lock().unwrap_or_else(|p| p.into_inner())),
        Err(why) => {
            pshard_testkit::skip(&format!("no CUDA GPU ({why})"));
            None
        }
    }
}

fn seed() -> u64 {
    std::env::var("PSHARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1234)
}

fn rng(test: &str) -> StdRng {
    let s = seed();
    eprintln!("{test}: seed {s} (PSHARD_SEED to replay)");
    StdRng::seed_from_u64(s)
}

fn randv(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-1.0f32..1.0) * scale).collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut num = 0.0;
    let mut den = 0.0;
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite output {g}");
        num += (g as f64 - w) * (g as f64 - w);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}

impl Ctx {
    fn alloc(&self, bytes: usize) -> DevBuf {
        self.gpu
            .dev
            .alloc(self.scratch, bytes as u64, "test buffer")
            .expect("alloc")
    }
    fn up_bytes(&self, b: &[u8]) -> DevBuf {
        let d = self.alloc(b.len());
        self.gpu
            .dev
            .upload(self.gpu.stream(), d.ptr, b)
            .expect("upload");
        d
    }
    fn up_f32(&self, v: &[f32]) -> DevBuf {
        self.up_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }
    fn up_i32(&self, v: &[i32]) -> DevBuf {
        self.up_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }
    /// A buffer poisoned with NaN (0xff bytes) so unwritten outputs are caught.
    fn poisoned(&self, bytes: usize) -> DevBuf {
        let d = self.alloc(bytes);
        self.gpu
            .dev
            .memset(self.gpu.stream(), d.ptr, 0xff, bytes)
            .expect("memset");
        d
    }
    fn down_bytes(&self, d: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.gpu
            .dev
            .download(self.gpu.stream(), &mut v, d)
            .expect("download");
        v
    }
    fn down_f32(&self, d: u64, n: usize) -> Vec<f32> {
        self.down_bytes(d, n * 4)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn down_f16(&self, d: u64, n: usize) -> Vec<f32> {
        self.down_bytes(d, n * 2)
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    }
    fn free(&self, bufs: &[DevBuf]) {
        for b in bufs {
            self.gpu.dev.free(*b).expect("free");
        }
    }
    fn sync(&self) {
        self.gpu.dev.synchronize().expect("kernel failed");
    }
}

/// Quantized random weights: the bytes and the CPU dequantization (the reference values).
fn make_weights(r: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let k = quant::kernel(ty).expect("CPU kernel");
    let rb = row_bytes(ty, cols).unwrap();
    let mut bytes = vec![0u8; rows * rb];
    let mut deq = vec![0f32; rows * cols];
    for i in 0..rows {
        let src = randv(r, cols, 1.0);
        (k.quantize_row)(&src, &mut bytes[i * rb..(i + 1) * rb]);
        (k.dequantize_row)(
            &bytes[i * rb..(i + 1) * rb],
            &mut deq[i * cols..(i + 1) * cols],
        );
    }
    (bytes, deq)
}

/// Random block bytes with valid f16 scale fields: reaches bit patterns a quantizer may not emit.
fn random_blocks(r: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = row_bytes(ty, cols).unwrap();
    let mut b: Vec<u8> = (0..rows * rb).map(|_| r.gen()).collect();
    let (bs, scale_offs): (usize, &[usize]) = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
            (ty.type_size() as usize, &[0])
        }
        GgmlType::MXFP4 => {
            // The E8M0 exponent byte: block scales 2^-18..2^1.
            for blk in b.chunks_exact_mut(17) {
                blk[0] = r.gen_range(110..130);
            }
            return b;
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
            (ty.type_size() as usize, &[0, 2])
        }
        GgmlType::Q2_K => (84, &[80, 82]),
        GgmlType::Q3_K => (110, &[108]),
        GgmlType::Q6_K => (210, &[208]),
        _ => {
            // Float types: random values, not random bits (NaN/inf patterns).
            let k = quant::kernel(ty).unwrap();
            for i in 0..rows {
                let src = randv(r, cols, 2.0);
                (k.quantize_row)(&src, &mut b[i * rb..(i + 1) * rb]);
            }
            return b;
        }
    };
    for blk in b.chunks_exact_mut(bs) {
        for &o in scale_offs {
            let v = f16::from_f32(r.gen_range(-0.05f32..0.05));
            blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}

fn cpu_dequant(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let k = quant::kernel(ty).unwrap();
    let rb = row_bytes(ty, cols).unwrap();
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        (k.dequantize_row)(
            &bytes[i * rb..(i + 1) * rb],
            &mut out[i * cols..(i + 1) * cols],
        );
    }
    out
}

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

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_get_rows_matches_cpu() {
    let Some(c) = ctx("cuda_get_rows_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_get_rows");
    let (vocab, cols) = (50, 512);
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::F16,
        GgmlType::F32,
        GgmlType::Q5_0,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
    ] {
        let (bytes, wf) = make_weights(&mut r, ty, vocab, cols);
        let ids: Vec<i32> = (0..9).map(|_| r.gen_range(0..vocab as i32)).collect();
        let w = c.up_bytes(&bytes);
        let idd = c.up_i32(&ids);
        let out = c.poisoned(ids.len() * cols * 4);
        c.gpu
            .kernels
            .get_rows(
                ty,
                w.ptr,
                cols,
                idd.ptr,
                ids.len(),
                out.ptr,
                cols,
                1.5,
                c.gpu.stream(),
            )
            .unwrap();
        c.sync();
        let got = c.down_f32(out.ptr, ids.len() * cols);
        for (t, &id) in ids.iter().enumerate() {
            for k in 0..cols {
                let want = wf[id as usize * cols + k] * 1.5;
                assert!(
                    (got[t * cols + k] - want).abs() <= 1e-6 + want.abs() * 1e-6,
                    "{ty:?} token {t} col {k}"
                );
            }
        }
        c.free(&[w, idd, out]);
    }
}

/// The fused q/k norm + rope launch against `head_rms_norm` then `rope` on q and on k (the same
/// arithmetic, so f32 rounding level): with and without the norm, both pairing modes, partial
/// rotation and frequency factors, 41 tokens of 8 q heads and 2 k heads (GQA), head dim 128.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_qk_norm_rope_matches_separate_kernels() {
    let Some(c) = ctx("cuda_qk_norm_rope_matches_separate_kernels") else {
        return;
    };
    let mut r = rng("cuda_qk_norm_rope");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    let (n, nq, nk, hd, eps, base) = (41usize, 8usize, 2usize, 128usize, 1e-6f32, 1e6f32);
    let pos: Vec<i32> = (0..n as i32).map(|i| i * 131 + 7).collect();
    let pd = c.up_i32(&pos);
    for (mode, n_dims, ff, norm, pscale) in [
        (RopeKind::Neox, 128, false, true, 1.0f32),
        (RopeKind::Adjacent, 128, true, false, 1.0),
        (RopeKind::Neox, 64, true, true, 0.5),
    ] {
        let q = randv(&mut r, n * nq * hd, 2.0);
        let kk = randv(&mut r, n * nk * hd, 2.0);
        let (qw, kw) = (randv(&mut r, hd, 1.0), randv(&mut r, hd, 1.0));
        let f: Vec<f32> = (0..n_dims / 2).map(|_| r.gen_range(1.0f32..8.0)).collect();
        let (qwd, kwd, fd) = (c.up_f32(&qw), c.up_f32(&kw), c.up_f32(&f));
        let ffp = ff.then_some(fd.ptr);
        let (q1, k1) = (c.up_f32(&q), c.up_f32(&kk));
        if norm {
            k.head_rms_norm(q1.ptr, qwd.ptr, n, nq, hd, eps, &s)
                .unwrap();
            k.head_rms_norm(k1.ptr, kwd.ptr, n, nk, hd, eps, &s)
                .unwrap();
        }
        let yarn = if pscale < 1.0 {
            RopeYarnArg {
                low: 3.0,
                high: 20.0,
                ext: 1.0,
                mscale: 1.2,
            }
        } else {
            RopeYarnArg::NONE
        };
        let args = RopeArgs {
            head_dim: hd,
            n_dims,
            mode,
            base,
            pos_scale: pscale,
            freq_factors: ffp,
            yarn,
        };
        for (x, heads) in [(q1.ptr, nq), (k1.ptr, nk)] {
            k.rope(x, pd.ptr, n, heads, &args, &s).unwrap();
        }
        let (q2, k2) = (c.up_f32(&q), c.up_f32(&kk));
        k.qk_norm_rope(
            q2.ptr,
            k2.ptr,
            norm.then_some((qwd.ptr, kwd.ptr, eps)),
            pd.ptr,
            n,
            nq,
            nk,
            &args,
            &s,
        )
        .unwrap();
        c.sync();
        for (what, sep, fused, len, orig) in
            [("q", q1, q2, q.len(), &q), ("k", k1, k2, kk.len(), &kk)]
        {
            let want: Vec<f64> = c.down_f32(sep.ptr, len).iter().map(|&v| v as f64).collect();
            let got = c.down_f32(fused.ptr, len);
            let err = rel_l2(&got, &want);
            // The fused launch really transformed the heads (a no-op would fail here).
            let moved = rel_l2(orig, &want);
            eprintln!("qk_norm_rope {what} {mode:?} dims {n_dims} norm {norm}: rel L2 {err:.2e} (moved {moved:.2e})");
            assert!(
                err <= 1e-6 && moved > 1e-2,
                "{what} {mode:?} {n_dims} {norm}: {err} {moved}"
            );
        }
        c.free(&[qwd, kwd, fd, q1, k1, q2, k2]);
    }
    let odd = RopeArgs {
        head_dim: hd,
        n_dims: 63,
        mode: RopeKind::Neox,
        base,
        pos_scale: 1.0,
        freq_factors: None,
        yarn: RopeYarnArg::NONE,
    };
    assert!(k
        .qk_norm_rope(0, 0, None, pd.ptr, n, nq, nk, &odd, &s)
        .is_err());
    c.free(&[pd]);
}

/// Latent attention's row ops and the per-head and expert-bias helpers against the CPU lane's
/// ops: `mla_kv` (RMS-normed latent, roped key part, strided rows), `rope_heads` (query rope
/// parts moved into the wider rows, other columns untouched), `head_route`, `moe_add_bias` in
/// pair and sorted order.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_latent_attention_ops_match_cpu() {
    let Some(c) = ctx("cuda_latent_attention_ops_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_mla_ops");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    let (n, kv_lora, d, nope, heads, eps) = (9usize, 512usize, 64usize, 128usize, 5usize, 1e-6f32);
    let yarn = pshard_model::graph::RopeYarn {
        low: 3.0,
        high: 20.0,
        ext_factor: 1.0,
        mscale: 1.3,
    };
    let cpu_rope = pshard_kernels::ops::Rope {
        pairing: pshard_kernels::ops::RopePairing::Adjacent,
        n_dims: d,
        base: 10000.0,
        pos_scale: 1.0 / 40.0,
        freq_factors: None,
        yarn: Some(yarn),
    };
    let args = RopeArgs {
        head_dim: d,
        n_dims: d,
        mode: RopeKind::Adjacent,
        base: cpu_rope.base,
        pos_scale: cpu_rope.pos_scale,
        freq_factors: None,
        yarn: RopeYarnArg::of(Some(yarn)),
    };
    let pos: Vec<i32> = (0..n as i32).map(|i| i * 373 + 5).collect();
    let upos: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
    let pd = c.up_i32(&pos);

    // mla_kv: rows of kv_lora + d + 16 (a wider source, as the fused kv_a projection is), output
    // rows of kv_lora + d + 8.
    let (ldx, ldo) = (kv_lora + d + 16, kv_lora + d + 8);
    let x = randv(&mut r, n * ldx, 2.0);
    let w = randv(&mut r, kv_lora, 1.0);
    let (xd, wd, od) = (c.up_f32(&x), c.up_f32(&w), c.poisoned(n * ldo * 4));
    k.mla_kv(
        (xd.ptr, ldx),
        wd.ptr,
        (od.ptr, ldo),
        kv_lora,
        eps,
        pd.ptr,
        n,
        &args,
        &s,
    )
    .unwrap();
    c.sync();
    let got = c.down_f32(od.ptr, n * ldo);
    let mut want = vec![0f32; n * ldo];
    for t in 0..n {
        pshard_kernels::ops::rms_norm(
            &x[t * ldx..][..kv_lora],
            &w,
            &mut want[t * ldo..][..kv_lora],
            eps,
        );
    }
    pshard_kernels::ops::rope_heads(
        &x,
        (ldx, kv_lora),
        &mut want,
        (ldo, kv_lora),
        1,
        &upos,
        &cpu_rope,
    );
    let pick = |v: &[f32]| -> Vec<f32> {
        (0..n)
            .flat_map(|t| v[t * ldo..][..kv_lora + d].to_vec())
            .collect()
    };
    let want64: Vec<f64> = pick(&want).iter().map(|&v| v as f64).collect();
    let err = rel_l2(&pick(&got), &want64);
    assert!(err < 1e-4, "mla_kv: {err}");
    c.free(&[xd, wd, od]);

    // rope_heads: each head's rope part of q (nope + d wide) into out (kv_lora + d wide).
    let (qc, oc) = (heads * (nope + d), heads * (kv_lora + d));
    let q = randv(&mut r, n * qc, 2.0);
    let (qd, od) = (c.up_f32(&q), c.poisoned(n * oc * 4));
    k.rope_heads(
        (qd.ptr, qc, nope + d, nope),
        (od.ptr, oc, kv_lora + d, kv_lora),
        heads,
        pd.ptr,
        n,
        &args,
        &s,
    )
    .unwrap();
    c.sync();
    let got = c.down_f32(od.ptr, n * oc);
    let mut want = vec![f32::NAN; n * oc];
    pshard_kernels::ops::rope_heads(
        &q,
        (nope + d, nope),
        &mut want,
        (kv_lora + d, kv_lora),
        heads,
        &upos,
        &cpu_rope,
    );
    let roped = |i: usize| (i % (kv_lora + d)) >= kv_lora;
    for (i, g) in got.iter().enumerate() {
        if !roped(i % oc) {
            assert!(
                g.is_nan(),
                "rope_heads wrote column {} of row {}",
                i % oc,
                i / oc
            );
        }
    }
    let sel = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| roped(i % oc))
            .map(|(_, &x)| x)
            .collect()
    };
    let want64: Vec<f64> = sel(&want).iter().map(|&v| v as f64).collect();
    let err = rel_l2(&sel(&got), &want64);
    assert!(err < 1e-4, "rope_heads: {err}");
    c.free(&[qd, od, pd]);

    // head_route: token t's route row is the heads in order, then weights of 1.
    let route = c.poisoned(n * 2 * heads * 4);
    k.head_route(route.ptr, n, heads, &s).unwrap();
    c.sync();
    let rb = c.down_bytes(route.ptr, n * 2 * heads * 4);
    let word = |i: usize| u32::from_le_bytes(rb[4 * i..4 * i + 4].try_into().unwrap());
    for t in 0..n {
        for h in 0..heads {
            assert_eq!(word(t * 2 * heads + h), h as u32, "head route {t} {h}");
            assert_eq!(f32::from_bits(word(t * 2 * heads + heads + h)), 1.0);
        }
    }
    c.free(&[route]);

    // moe_add_bias: pair rows (row i is pair i) and sorted rows (row i is pair order[i]).
    let (n_expert, n_used, cols, ldh) = (6usize, 2usize, 300usize, 304usize);
    let pairs = n * n_used;
    let ids: Vec<u32> = (0..pairs)
        .map(|_| r.gen_range(0..n_expert as u32))
        .collect();
    let mut rw = Vec::new();
    for t in 0..n {
        rw.extend_from_slice(&ids[t * n_used..][..n_used]);
        rw.extend((0..n_used).map(|_| 0.5f32.to_bits()));
    }
    let route = c.up_bytes(&rw.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    let bias = randv(&mut r, n_expert * cols, 1.0);
    let bd = c.up_f32(&bias);
    let order: Vec<i32> = (0..pairs as i32).rev().collect();
    let ordd = c.up_i32(&order);
    for sorted in [false, true] {
        let h = randv(&mut r, pairs * ldh, 1.0);
        let hd = c.up_f32(&h);
        k.moe_add_bias(
            hd.ptr,
            ldh,
            route.ptr,
            n_used,
            sorted.then_some(ordd.ptr),
            bd.ptr,
            pairs,
            cols,
            &s,
        )
        .unwrap();
        c.sync();
        let got = c.down_f32(hd.ptr, pairs * ldh);
        for i in 0..pairs {
            let p = if sorted { order[i] as usize } else { i };
            let e = ids[p] as usize;
            for j in 0..ldh {
                let want = if j < cols {
                    h[i * ldh + j] + bias[e * cols + j]
                } else {
                    h[i * ldh + j]
                };
                assert_eq!(
                    got[i * ldh + j],
                    want,
                    "bias sorted={sorted} row {i} col {j}"
                );
            }
        }
        c.free(&[hd]);
    }
    c.free(&[route, bd, ordd]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_norms_rope_glu_add_match_cpu() {
    let Some(c) = ctx("cuda_norms_rope_glu_add_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_ops");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    // RMS norm, odd width.
    let (n, cols, eps) = (5usize, 1000usize, 1e-5f32);
    let x = randv(&mut r, n * cols, 3.0);
    let w = randv(&mut r, cols, 1.0);
    let (xd, wd, yd) = (c.up_f32(&x), c.up_f32(&w), c.poisoned(n * cols * 4));
    k.rms_norm(xd.ptr, wd.ptr, yd.ptr, n, cols, eps, &s)
        .unwrap();
    c.sync();
    let mut want = vec![0f64; n * cols];
    for t in 0..n {
        let ss: f64 = x[t * cols..(t + 1) * cols]
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum();
        let inv = 1.0 / (ss / cols as f64 + eps as f64).sqrt();
        for j in 0..cols {
            want[t * cols + j] = x[t * cols + j] as f64 * inv * w[j] as f64;
        }
    }
    assert!(
        rel_l2(&c.down_f32(yd.ptr, n * cols), &want) < 1e-6,
        "rms_norm"
    );
    c.free(&[xd, wd, yd]);

    // Head RMS norm in place.
    let (heads, hd) = (6usize, 128usize);
    let x = randv(&mut r, n * heads * hd, 2.0);
    let w = randv(&mut r, hd, 1.0);
    let (xd, wd) = (c.up_f32(&x), c.up_f32(&w));
    k.head_rms_norm(xd.ptr, wd.ptr, n, heads, hd, eps, &s)
        .unwrap();
    c.sync();
    let mut want = vec![0f64; x.len()];
    for h in 0..n * heads {
        let sl = &x[h * hd..(h + 1) * hd];
        let inv = 1.0
            / (sl.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hd as f64 + eps as f64)
                .sqrt();
        for j in 0..hd {
            want[h * hd + j] = sl[j] as f64 * inv * w[j] as f64;
        }
    }
    assert!(
        rel_l2(&c.down_f32(xd.ptr, x.len()), &want) < 1e-6,
        "head_rms_norm"
    );
    c.free(&[xd, wd]);

    // RoPE: both modes, partial rotation, freq factors, position scale, large positions, YaRN
    // (gpt-oss's factor 32: pairs 4 to 9 ramp from extrapolation to interpolation).
    let gpt_oss_yarn = RopeYarnArg {
        low: 4.0,
        high: 9.0,
        ext: 1.0,
        mscale: 1.0 + 0.1 * 32f32.ln(),
    };
    for (mode, n_dims, ff, pscale, yarn) in [
        (RopeKind::Adjacent, 64, false, 1.0f32, RopeYarnArg::NONE),
        (RopeKind::Neox, 64, true, 0.25, RopeYarnArg::NONE),
        (RopeKind::Neox, 32, false, 1.0, RopeYarnArg::NONE),
        (RopeKind::Neox, 64, false, 1.0 / 32.0, gpt_oss_yarn),
    ] {
        let (heads, hd, base) = (4usize, 64usize, 500000f32);
        let pos: Vec<i32> = (0..n as i32).map(|i| i * 977 + 3).collect();
        let x = randv(&mut r, n * heads * hd, 1.0);
        let f: Vec<f32> = (0..n_dims / 2).map(|_| r.gen_range(1.0f32..8.0)).collect();
        let (xd, pd, fd) = (c.up_f32(&x), c.up_i32(&pos), c.up_f32(&f));
        let args = RopeArgs {
            head_dim: hd,
            n_dims,
            mode,
            base,
            pos_scale: pscale,
            freq_factors: ff.then_some(fd.ptr),
            yarn,
        };
        k.rope(xd.ptr, pd.ptr, n, heads, &args, &s).unwrap();
        c.sync();
        let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (t, &pt) in pos.iter().enumerate() {
            for h in 0..heads {
                let o = (t * heads + h) * hd;
                for (i, &fi) in f.iter().enumerate() {
                    let mut inv = (base as f64).powf(-2.0 * i as f64 / n_dims as f64);
                    if ff {
                        inv /= fi as f64;
                    }
                    let ramp = ((i as f64 - yarn.low as f64)
                        / (yarn.high as f64 - yarn.low as f64).max(0.001))
                    .clamp(0.0, 1.0);
                    let mix = (1.0 - ramp) * yarn.ext as f64;
                    let factor = pscale as f64 * (1.0 - mix) + mix;
                    let th = pt as f64 * factor * inv;
                    let m = yarn.mscale as f64;
                    let (a, b) = match mode {
                        RopeKind::Adjacent => (2 * i, 2 * i + 1),
                        RopeKind::Neox => (i, i + n_dims / 2),
                    };
                    let (x0, x1) = (x[o + a] as f64, x[o + b] as f64);
                    want[o + a] = m * (x0 * th.cos() - x1 * th.sin());
                    want[o + b] = m * (x0 * th.sin() + x1 * th.cos());
                }
            }
        }
        // f32 angle arithmetic at positions up to ~4000: 1e-4.
        let err = rel_l2(&c.down_f32(xd.ptr, x.len()), &want);
        assert!(err < 1e-4, "rope {mode:?} dims {n_dims}: {err}");
        c.free(&[xd, pd, fd]);
    }

    // GLU both activations, add, softcap, scale.
    let m = 3001usize;
    let g = randv(&mut r, m, 6.0);
    let u = randv(&mut r, m, 2.0);
    let (gd, ud, od) = (c.up_f32(&g), c.up_f32(&u), c.poisoned(m * 4));
    for act in [
        Activation::Silu,
        Activation::GeluTanh,
        Activation::SwigluOai,
    ] {
        k.glu(gd.ptr, ud.ptr, od.ptr, m, act, &s).unwrap();
        c.sync();
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| {
                let (a, b) = (a as f64, b as f64);
                match act {
                    Activation::GeluTanh => {
                        0.5 * a
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (a + 0.044715 * a * a * a))
                                    .tanh())
                            * b
                    }
                    Activation::Silu => a / (1.0 + (-a).exp()) * b,
                    Activation::SwigluOai => {
                        let x = a.min(7.0);
                        x / (1.0 + (-1.702 * x).exp()) * (b.clamp(-7.0, 7.0) + 1.0)
                    }
                }
            })
            .collect();
        assert!(rel_l2(&c.down_f32(od.ptr, m), &want) < 1e-6, "glu {act:?}");
    }
    k.add(gd.ptr, ud.ptr, od.ptr, m, &s).unwrap();
    c.sync();
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect();
    assert!(rel_l2(&c.down_f32(od.ptr, m), &want) < 1e-7, "add");
    k.softcap(gd.ptr, m, 5.0, &s).unwrap();
    k.scale(gd.ptr, m, 0.5, &s).unwrap();
    c.sync();
    let want: Vec<f64> = g
        .iter()
        .map(|&a| 0.5 * 5.0 * (a as f64 / 5.0).tanh())
        .collect();
    assert!(
        rel_l2(&c.down_f32(gd.ptr, m), &want) < 1e-6,
        "softcap+scale"
    );
    c.free(&[gd, ud, od]);
}

/// The context-shift kernel against the CPU's `ops::kv_shift` on the same runs: a cycle of
/// three, a chain, a self-move (rotation in place) and a cell left alone; K rotated (NEOX with
/// frequency factors; adjacent pairs over half the head with a position scale; YaRN with a
/// magnitude, which the shift must not apply again; latent attention's one head roped after its
/// latent), V copied.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kv_shift_matches_cpu() {
    use pshard_kernels::ops::{self, ShiftRun};
    let Some(c) = ctx("cuda_kv_shift_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_kv_shift");
    let s = c.gpu.stream().clone();
    let k = &c.gpu.kernels;
    let (cells, hd, heads, delta) = (12usize, 64usize, 2usize, -18i64);
    let cols = hd * heads;
    let runs = vec![
        ShiftRun {
            moves: vec![(1, 2), (0, 1), (2, 0)],
            cyclic: true,
        },
        ShiftRun {
            moves: vec![(4, 3), (5, 4)],
            cyclic: false,
        },
        ShiftRun {
            moves: vec![(7, 7)],
            cyclic: true,
        },
    ];
    let mut moves: Vec<i32> = Vec::new();
    let mut starts = vec![0i32];
    let mut cyclic = Vec::new();
    for run in &runs {
        moves.extend(run.moves.iter().flat_map(|&(a, b)| [a as i32, b as i32]));
        starts.push(moves.len() as i32 / 2);
        cyclic.push(run.cyclic as i32);
    }
    let (md, sd, cd) = (c.up_i32(&moves), c.up_i32(&starts), c.up_i32(&cyclic));
    let f: Vec<f32> = (0..hd / 2).map(|_| r.gen_range(1.0f32..8.0)).collect();
    let fd = c.up_f32(&f);
    let yarn = pshard_model::graph::RopeYarn {
        low: 3.0,
        high: 11.0,
        ext_factor: 1.0,
        mscale: 1.35,
    };
    // (pairing, head width, rotated dims, offset in the head, frequency factors, position
    // scale, YaRN).
    for (mode, head, n_dims, off, ff, pscale, y) in [
        (Some(RopeKind::Neox), hd, hd, 0, true, 1.0f32, None),
        (Some(RopeKind::Adjacent), hd, hd / 2, 0, false, 0.5, None),
        (Some(RopeKind::Neox), hd, hd, 0, false, 0.25, Some(yarn)),
        (
            Some(RopeKind::Neox),
            cols,
            32,
            cols - 32,
            false,
            0.25,
            Some(yarn),
        ),
        (None, cols, 0, 0, false, 1.0, None),
    ] {
        // Both cache types from the same values: f16 rows, and Q8_0 rows (dequantized, turned
        // and quantized afresh on both sides).
        for ty in [KvType::F16, KvType::Q8_0] {
            let x = randv(&mut r, cells * cols, 2.0);
            let rb = ty.row_bytes(cols);
            let mut bytes = vec![0u8; cells * rb];
            for (xr, br) in x.chunks(cols).zip(bytes.chunks_mut(rb)) {
                ty.store(xr, br);
            }
            let xd = c.up_bytes(&bytes);
            let args = mode.map(|m| RopeArgs {
                head_dim: head,
                n_dims,
                mode: m,
                base: 1e4,
                pos_scale: pscale,
                freq_factors: ff.then_some(fd.ptr),
                yarn: RopeYarnArg::of(y),
            });
            k.kv_shift(
                ty,
                xd.ptr,
                cols,
                (md.ptr, sd.ptr, cd.ptr, runs.len()),
                args.as_ref().map(|a| (a, off)),
                delta as f32,
                &s,
            )
            .unwrap();
            c.sync();
            let got_bytes = c.down_bytes(xd.ptr, bytes.len());
            let rows = |b: &[u8]| -> Vec<f32> {
                let mut v = vec![0f32; cells * cols];
                for (br, vr) in b.chunks(rb).zip(v.chunks_mut(cols)) {
                    ty.load(br, vr);
                }
                v
            };
            let got = rows(&got_bytes);
            let mut want = bytes.clone();
            let cpu_rope = mode.map(|m| ops::Rope {
                pairing: match m {
                    RopeKind::Adjacent => ops::RopePairing::Adjacent,
                    RopeKind::Neox => ops::RopePairing::Neox,
                },
                n_dims,
                base: 1e4,
                pos_scale: pscale,
                freq_factors: ff.then_some(&f[..]),
                yarn: y,
            });
            ops::kv_shift(
                &mut want,
                ty,
                cols,
                (head, off),
                cpu_rope.as_ref(),
                delta,
                &runs,
            );
            let want64: Vec<f64> = rows(&want).iter().map(|&v| v as f64).collect();
            let err = rel_l2(&got, &want64);
            let orig = rows(&bytes);
            let moved = rel_l2(&orig, &want64);
            eprintln!(
                "kv_shift {ty:?} {mode:?} dims {n_dims} from {off}: rel L2 {err:.2e} (moved {moved:.2e})"
            );
            // Q8_0: the two sides' rotations differ in the last bits, which may move a value to
            // the neighbouring level now and then (a step is max|x| / 127 of its block).
            let tol = match ty {
                KvType::F16 => 1e-3,
                KvType::Q8_0 => 5e-3,
            };
            assert!(
                err <= tol && moved > 1e-1,
                "{ty:?} {mode:?} {n_dims} {off}: {err} {moved}"
            );
            if mode.is_none() {
                // Moves without rope copy the rows' bytes.
                assert_eq!(got_bytes, want, "{ty:?}: V moves");
            }
            // Cell 6 is in no run: untouched.
            assert_eq!(&got_bytes[6 * rb..7 * rb], &bytes[6 * rb..7 * rb]);
            c.free(&[xd]);
        }
    }
    c.free(&[md, sd, cd, fd]);
}

/// f64 attention reference of `rows` over f16-rounded K/V: query t at position pos[t] sees cache
/// slots j <= pos[t] (and pos[t] - j < window); `sinks` join each head's softmax denominator; with
/// `p.v_in_k` the values are the first `dv` of each K row (`vc` unused).
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    p: &AttnParams,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos: &[i32],
    rows: &[usize],
    sinks: Option<&[f32]>,
) -> Vec<f64> {
    let grp = p.n_head / p.n_kv;
    let mut out = Vec::new();
    for &t in rows {
        for h in 0..p.n_head {
            let kvh = h / grp;
            let qv = &q[(t * p.n_head + h) * p.dk..][..p.dk];
            let pt = pos[t] as usize;
            let lo = if p.window > 0 {
                (pt + 1).saturating_sub(p.window)
            } else {
                0
            };
            let mut scores = Vec::new();
            for j in lo..=pt {
                let kv = &kc[(j * p.n_kv + kvh) * p.dk..][..p.dk];
                let mut s: f64 = qv
                    .iter()
                    .zip(kv)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * p.scale as f64;
                if p.softcap > 0.0 {
                    s = p.softcap as f64 * (s / p.softcap as f64).tanh();
                }
                scores.push(s);
            }
            let sink = sinks.map(|s| s[h] as f64);
            let mx = scores
                .iter()
                .cloned()
                .chain(sink)
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - mx).exp());
            for d in 0..p.dv {
                let mut acc = 0.0;
                for (i, j) in (lo..=pt).enumerate() {
                    let v = if p.v_in_k {
                        kc[j * p.dk + d]
                    } else {
                        vc[(j * p.n_kv + kvh) * p.dv + d]
                    };
                    acc += e[i] * v as f64;
                }
                out.push(acc / sum);
            }
        }
    }
    out
}

/// Writes the cells any query can see (positions from the first query's window start to
/// start+n) with kv_write over a cache of NaNs, then runs `n` queries at positions
/// start..start+n and checks every `stride`th row and the last: a kernel that lets an invisible
/// cell's value into a sum (0 · NaN) fails. (A cache staged from the host holds only the visible
/// cells.)
fn run_attention_case(
    c: &Ctx,
    r: &mut StdRng,
    p: AttnParams,
    start: usize,
    n: usize,
    stride: usize,
    tol: f64,
) {
    run_attention_sinks(c, r, p, None, start, n, stride, tol)
}

/// [`run_attention_case`] with per-head sinks.
#[allow(clippy::too_many_arguments)]
fn run_attention_sinks(
    c: &Ctx,
    r: &mut StdRng,
    p: AttnParams,
    sinks: Option<&[f32]>,
    start: usize,
    n: usize,
    stride: usize,
    tol: f64,
) {
    run_attention_typed(c, r, p, KvType::F16, sinks, start, n, stride, tol)
}

/// Rows of `cells · row` values as the cache of type `ty` holds them: stored and read back.
fn as_cached(ty: KvType, x: &[f32], row: usize) -> (Vec<u8>, Vec<f32>) {
    let rb = ty.row_bytes(row);
    let mut bytes = vec![0u8; x.len() / row * rb];
    let mut back = vec![0f32; x.len()];
    for ((xr, br), yr) in x
        .chunks(row)
        .zip(bytes.chunks_mut(rb))
        .zip(back.chunks_mut(row))
    {
        ty.store(xr, br);
        ty.load(br, yr);
    }
    (bytes, back)
}

/// [`run_attention_sinks`] over a cache of type `ty`. For Q8_0 the cells `kv_write` quantized on
/// the device must be the CPU's Q8_0 rows byte for byte, and the reference reads the values those
/// rows hold.
#[allow(clippy::too_many_arguments)]
fn run_attention_typed(
    c: &Ctx,
    r: &mut StdRng,
    p: AttnParams,
    ty: KvType,
    sinks: Option<&[f32]>,
    start: usize,
    n: usize,
    stride: usize,
    tol: f64,
) {
    let n_fill = start + n;
    let kf = randv(r, n_fill * p.n_kv * p.dk, 1.0);
    let vf = randv(r, n_fill * p.n_kv * p.dv, 1.0);
    let q = randv(r, n * p.n_head * p.dk, 1.0);
    // The reference uses the values as the cache holds them.
    let (kbytes, k16) = as_cached(ty, &kf, p.n_kv * p.dk);
    let (vbytes, v16) = as_cached(ty, &vf, p.n_kv * p.dv);
    let s = c.gpu.stream().clone();
    let (krb, vrb) = (ty.row_bytes(p.n_kv * p.dk), ty.row_bytes(p.n_kv * p.dv));
    let kcache = c.poisoned(p.n_ctx * krb);
    let vcache = c.poisoned((p.n_ctx * vrb).max(4));
    let lo = if p.window > 0 {
        (start + 1).saturating_sub(p.window)
    } else {
        0
    };
    let (kd, vd) = (
        c.up_f32(&kf[lo * p.n_kv * p.dk..]),
        c.up_f32(&vf[lo * p.n_kv * p.dv..]),
    );
    let fill_pos: Vec<i32> = (lo as i32..n_fill as i32).collect();
    let n_fill = n_fill - lo;
    let fpd = c.up_i32(&fill_pos);
    c.gpu
        .kernels
        .kv_write(
            ty,
            kd.ptr,
            p.n_kv * p.dk,
            kcache.ptr,
            p.n_kv * p.dk,
            fpd.ptr,
            c.gpu.kernels.zero_seqs(n_fill).unwrap(),
            p.n_ctx,
            n_fill,
            &s,
        )
        .unwrap();
    c.gpu
        .kernels
        .kv_write(
            ty,
            vd.ptr,
            p.n_kv * p.dv,
            vcache.ptr,
            p.n_kv * p.dv,
            fpd.ptr,
            c.gpu.kernels.zero_seqs(n_fill).unwrap(),
            p.n_ctx,
            n_fill,
            &s,
        )
        .unwrap();
    if ty == KvType::Q8_0 && lo + n_fill <= p.n_ctx {
        // The written cells (positions lo.. of a cache that does not wrap) against the CPU's rows.
        c.sync();
        let got = c.down_bytes(kcache.ptr + (lo * krb) as u64, n_fill * krb);
        assert!(
            got == kbytes[lo * krb..],
            "kv_write Q8_0 K rows differ from the CPU's"
        );
        let got = c.down_bytes(vcache.ptr + (lo * vrb) as u64, n_fill * vrb);
        assert!(
            got == vbytes[lo * vrb..],
            "kv_write Q8_0 V rows differ from the CPU's"
        );
    }
    let pos: Vec<i32> = (start as i32..(start + n) as i32).collect();
    let (qd, pd) = (c.up_f32(&q), c.up_i32(&pos));
    let out = c.poisoned(n * p.n_head * p.dv * 4);
    let part = c.alloc(pshard_kernels::cuda::kernels::attention_scratch(&p, n).max(4));
    let sd = sinks.map(|v| c.up_f32(v));
    c.gpu
        .kernels
        .attention(
            &p,
            qd.ptr,
            p.n_head * p.dk,
            KvCells {
                ty,
                k: kcache.ptr,
                v: vcache.ptr,
                seq: c.gpu.kernels.zero_seqs(n).unwrap(),
                base: 0,
            },
            pd.ptr,
            n,
            out.ptr,
            p.n_head * p.dv,
            part.ptr,
            sd.as_ref().map(|b| b.ptr),
            &s,
        )
        .unwrap();
    c.sync();
    let got = c.down_f32(out.ptr, n * p.n_head * p.dv);
    let rows: Vec<usize> = (0..n).filter(|t| t % stride == 0 || *t == n - 1).collect();
    let want = ref_attention(&p, &q, &k16, &v16, &pos, &rows, sinks);
    let got_rows: Vec<f32> = rows
        .iter()
        .flat_map(|&t| got[t * p.n_head * p.dv..(t + 1) * p.n_head * p.dv].to_vec())
        .collect();
    let err = rel_l2(&got_rows, &want);
    eprintln!("attention {ty:?} {p:?} start {start} n {n}: rel L2 {err:.2e}");
    assert!(
        err < tol,
        "attention {ty:?} {p:?} start {start} n {n}: rel L2 {err}"
    );
    assert!(
        got.iter().all(|v| v.is_finite()),
        "unwritten or non-finite attention output"
    );
    c.free(&[kcache, vcache, kd, vd, fpd, qd, pd, out, part]);
    if let Some(b) = sd {
        c.free(&[b]);
    }
}

/// Attention over a Q8_0 KV cache: `kv_write` quantizes rows as the CPU does (checked byte for
/// byte), and the flash (64/128/256), split-KV (windows, soft-cap, sinks, GQA, many splits) and
/// latent kernels read them as the values the CPU reads back (staged as f16, so the f16 cache's
/// tolerances).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_attention_q8_0_kv_matches_cpu() {
    let Some(c) = ctx("cuda_attention_q8_0_kv_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_attention_q8_0");
    let base = |n_head, n_kv, d, n_ctx| AttnParams {
        n_head,
        n_kv,
        dk: d,
        dv: d,
        n_ctx,
        scale: 1.0 / (d as f32).sqrt(),
        softcap: 0.0,
        window: 0,
        v_in_k: false,
    };
    let q8 = KvType::Q8_0;
    let sinks: Vec<f32> = (0..8).map(|h| h as f32 * 0.7 - 2.0).collect();
    let gpt_oss = AttnParams {
        window: 128,
        ..base(8, 2, 64, 1024)
    };
    run_attention_typed(&c, &mut r, gpt_oss, q8, Some(&sinks), 100, 200, 1, 5e-3);
    run_attention_typed(&c, &mut r, gpt_oss, q8, Some(&sinks), 900, 1, 1, 1e-3);
    let mla = |n_head| AttnParams {
        dk: 576,
        dv: 512,
        v_in_k: true,
        scale: 0.07,
        ..base(n_head, 1, 576, 2048)
    };
    run_attention_typed(&c, &mut r, mla(16), q8, None, 1500, 1, 1, 1e-3);
    run_attention_typed(&c, &mut r, mla(20), q8, None, 63, 3, 1, 1e-3);
    run_attention_typed(&c, &mut r, mla(16), q8, None, 0, 300, 7, 1e-3);
    for d in [64, 128, 256] {
        run_attention_typed(&c, &mut r, base(8, 2, d, 512), q8, None, 0, 100, 1, 5e-3);
        run_attention_typed(&c, &mut r, base(8, 2, d, 4096), q8, None, 3000, 1, 1, 1e-3);
    }
    let windowed = AttnParams {
        window: 700,
        softcap: 30.0,
        ..base(8, 4, 64, 4096)
    };
    run_attention_typed(&c, &mut r, windowed, q8, None, 2000, 2, 1, 1e-3);
    run_attention_typed(&c, &mut r, windowed, q8, None, 2000, 100, 1, 5e-3);
    run_attention_typed(
        &c,
        &mut r,
        base(32, 8, 128, 16384),
        q8,
        None,
        12000,
        1,
        1,
        1e-3,
    );
    // dk != dv (split-KV only).
    run_attention_typed(
        &c,
        &mut r,
        AttnParams {
            dk: 96,
            dv: 64,
            ..base(6, 2, 96, 1024)
        },
        q8,
        None,
        300,
        3,
        1,
        1e-3,
    );
    // A head dim that is not whole blocks is refused by name.
    let e = c
        .gpu
        .kernels
        .kv_write(q8, 0, 40, 0, 40, 0, 0, 16, 1, c.gpu.stream())
        .unwrap_err()
        .to_string();
    assert!(e.contains("KV row is 40"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_attention_prefill_and_decode_match_cpu() {
    let Some(c) = ctx("cuda_attention_prefill_and_decode_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_attention");
    let base = |n_head, n_kv, d, n_ctx| AttnParams {
        n_head,
        n_kv,
        dk: d,
        dv: d,
        n_ctx,
        scale: 1.0 / (d as f32).sqrt(),
        softcap: 0.0,
        window: 0,
        v_in_k: false,
    };
    // Sinks (gpt-oss: head dim 64, windows of 128): flash prefill and split-KV decode.
    let sinks: Vec<f32> = (0..8).map(|h| h as f32 * 0.7 - 2.0).collect();
    let gpt_oss = AttnParams {
        window: 128,
        ..base(8, 2, 64, 1024)
    };
    run_attention_sinks(&c, &mut r, gpt_oss, Some(&sinks), 100, 200, 1, 5e-3);
    run_attention_sinks(&c, &mut r, gpt_oss, Some(&sinks), 900, 1, 1, 1e-4);
    run_attention_sinks(
        &c,
        &mut r,
        base(8, 2, 64, 1024),
        Some(&sinks),
        500,
        3,
        1,
        1e-4,
    );
    // Latent attention (deepseek2: 576-wide keys, values their first 512, one KV head): decode,
    // a few rows, a prefill chunk, 16 and 20 heads (a partial head group).
    let mla = |n_head| AttnParams {
        dk: 576,
        dv: 512,
        v_in_k: true,
        scale: 0.07,
        ..base(n_head, 1, 576, 2048)
    };
    run_attention_case(&c, &mut r, mla(16), 1500, 1, 1, 1e-4);
    run_attention_case(&c, &mut r, mla(20), 63, 3, 1, 1e-4);
    run_attention_case(&c, &mut r, mla(16), 0, 300, 7, 1e-4);
    // Flash (tensor-core) prefill: P and Q rounded to f16 inside, so 5e-3. Split-KV: f32, 1e-4.
    run_attention_case(&c, &mut r, base(8, 2, 128, 512), 0, 100, 1, 5e-3);
    run_attention_case(&c, &mut r, base(4, 4, 64, 512), 37, 130, 1, 5e-3);
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            window: 37,
            softcap: 30.0,
            ..base(6, 3, 64, 512)
        },
        20,
        150,
        1,
        5e-3,
    );
    run_attention_case(&c, &mut r, base(4, 1, 256, 300), 0, 77, 1, 5e-3);
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            window: 64,
            ..base(4, 1, 256, 300)
        },
        5,
        200,
        1,
        5e-3,
    );
    // Decode (split-KV): single rows and a few rows deep in the cache, GQA, odd head dim.
    run_attention_case(&c, &mut r, base(8, 2, 128, 4608), 4000, 1, 1, 1e-4);
    run_attention_case(&c, &mut r, base(8, 8, 64, 1024), 700, 3, 1, 1e-4);
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            dk: 96,
            dv: 96,
            ..base(4, 2, 96, 1024)
        },
        100,
        7,
        1,
        1e-4,
    );
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            window: 512,
            softcap: 50.0,
            ..base(4, 1, 256, 2048)
        },
        1500,
        1,
        1,
        1e-4,
    );
    // Split-KV edges: the device cuts the visible keys into 64-key tiles per split, so contexts
    // of 1, 63, 64, 65 keys (one partial/full tile, one key into the next) and 1000 keys in a
    // large cache (most splits empty, skipped by attn_combine) must all be exact.
    for ctx_len in [1usize, 63, 64, 65, 1000] {
        run_attention_case(&c, &mut r, base(8, 2, 128, 4096), ctx_len - 1, 1, 1, 1e-4);
    }
    // Four decode rows at once (a graph-captured batch): 127 to 130 keys.
    run_attention_case(&c, &mut r, base(32, 8, 128, 2048), 126, 4, 1, 1e-4);
    // Several tiles per split (32 heads: 32 splits, 12001 keys → 384-key splits), GQA 4:1.
    run_attention_case(&c, &mut r, base(32, 8, 128, 16384), 12000, 1, 1, 1e-4);
    // Sliding windows: window inside one tile, window across tiles and splits, window larger
    // than the context, with soft-capping; decode rows (split-KV) and a prefill batch (flash,
    // whose first key tile starts below the window).
    for (window, start) in [(40usize, 300usize), (700, 2000), (5000, 900)] {
        for n in [2, 100] {
            run_attention_case(
                &c,
                &mut r,
                AttnParams {
                    window,
                    softcap: 30.0,
                    ..base(8, 4, 64, 4096)
                },
                start,
                n,
                1,
                if n > 4 { 5e-3 } else { 1e-4 },
            );
        }
    }
    // Head dims that are not multiples of 8 (4-byte copy path), dk != dv, GQA 3:1.
    run_attention_case(
        &c,
        &mut r,
        AttnParams {
            dk: 20,
            dv: 12,
            ..base(6, 2, 20, 512)
        },
        130,
        3,
        1,
        1e-4,
    );
    // Long context prefill: 4100 tokens, GQA 4:1, checking every 97th row (skipped under the
    // memory checker, PSHARD_CUDA_TINY=1, where it would take minutes).
    if std::env::var_os("PSHARD_CUDA_TINY").is_some() {
        return;
    }
    run_attention_case(&c, &mut r, base(8, 2, 128, 4160), 0, 4100, 97, 5e-3);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_route_and_experts_match_cpu() {
    let Some(c) = ctx("cuda_moe_route_and_experts_match_cpu") else {
        return;
    };
    let mut r = rng("cuda_moe");
    let s = c.gpu.stream().clone();
    let (n, n_expert, n_used, d, ff) = (7usize, 16usize, 4usize, 256usize, 512usize);
    // Every gating, with a selection bias, a group limit and a scale, against the CPU's routing.
    let bias = randv(&mut r, n_expert, 0.3);
    let bd = c.up_f32(&bias);
    for (gating, groups, scale) in [
        (Gating::Sigmoid, (0, 0), 2.5),
        (Gating::SoftmaxAfterTopK, (0, 0), 1.0),
        (Gating::Softmax, (4, 2), 1.0),
        (Gating::Sigmoid, (8, 3), 1.0),
    ] {
        let rt = Routing {
            n_expert,
            n_used,
            gating,
            normalize: gating == Gating::Sigmoid,
            scale,
            groups,
        };
        let logits = randv(&mut r, n * n_expert, 3.0);
        let ld = c.up_f32(&logits);
        let route = c.poisoned(n * 2 * n_used * 4);
        let sel = (gating == Gating::Sigmoid).then_some(bd.ptr);
        c.gpu
            .kernels
            .moe_route(ld.ptr, n, &rt, sel, None, route.ptr, &s)
            .unwrap();
        c.sync();
        let rb = c.down_bytes(route.ptr, n * 2 * n_used * 4);
        for t in 0..n {
            let (mut ids, mut w) = (vec![0u32; n_used], vec![0f32; n_used]);
            let b = sel.map(|_| &bias[..]);
            pshard_kernels::ops::route(
                &logits[t * n_expert..(t + 1) * n_expert],
                &rt,
                b,
                None,
                &mut ids,
                &mut w,
            );
            let word = |i: usize| u32::from_le_bytes(rb[4 * i..4 * i + 4].try_into().unwrap());
            for k in 0..n_used {
                assert_eq!(
                    word(t * 2 * n_used + k),
                    ids[k],
                    "{rt:?} token {t} expert {k}"
                );
                let got = f32::from_bits(word(t * 2 * n_used + n_used + k));
                assert!((got - w[k]).abs() < 1e-5, "{rt:?} token {t} weight {k}");
            }
        }
        c.free(&[ld, route]);
    }
    c.free(&[bd]);
    for normalize in [true, false] {
        let logits = randv(&mut r, n * n_expert, 3.0);
        let ld = c.up_f32(&logits);
        let route = c.poisoned(n * 2 * n_used * 4);
        let rt = Routing {
            n_expert,
            n_used,
            gating: Gating::Softmax,
            normalize,
            scale: 1.0,
            groups: (0, 0),
        };
        c.gpu
            .kernels
            .moe_route(ld.ptr, n, &rt, None, None, route.ptr, &s)
            .unwrap();
        c.sync();
        let rb = c.down_bytes(route.ptr, n * 2 * n_used * 4);
        let words: Vec<u32> = rb
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // CPU routing reference.
        let mut ref_ids = Vec::new();
        let mut ref_w = Vec::new();
        for t in 0..n {
            let l = &logits[t * n_expert..(t + 1) * n_expert];
            let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = l.iter().map(|&v| (v as f64 - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            let mut idx: Vec<usize> = (0..n_expert).collect();
            idx.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap().then(a.cmp(&b)));
            let top = &idx[..n_used];
            let ws: Vec<f64> = top.iter().map(|&i| e[i] / sum).collect();
            let wsum: f64 = ws.iter().sum();
            for (k, &i) in top.iter().enumerate() {
                ref_ids.push(i as u32);
                ref_w.push(if normalize { ws[k] / wsum } else { ws[k] });
            }
        }
        for t in 0..n {
            let ids = &words[t * 2 * n_used..t * 2 * n_used + n_used];
            assert_eq!(
                ids,
                &ref_ids[t * n_used..(t + 1) * n_used],
                "token {t} experts"
            );
            for k in 0..n_used {
                let w = f32::from_bits(words[t * 2 * n_used + n_used + k]) as f64;
                assert!(
                    (w - ref_w[t * n_used + k]).abs() < 1e-5,
                    "token {t} weight {k}"
                );
            }
        }
        if !normalize {
            c.free(&[ld, route]);
            continue;
        }
        // Expert FFN: gate/up [E, ff, d], down [E, d, ff], Q4_K / Q6_K, each stage against the
        // CPU engine's expert matmuls on the same inputs (the down projection on the GPU's GLU
        // output, so the check does not depend on f32 `exp` rounding of the two GLUs).
        let gb = make_weights(&mut r, GgmlType::Q4_K, n_expert * ff, d).0;
        let ub = make_weights(&mut r, GgmlType::Q4_K, n_expert * ff, d).0;
        let db = make_weights(&mut r, GgmlType::Q6_K, n_expert * d, ff).0;
        let x = randv(&mut r, n * d, 1.0);
        let (gd, ud, dd, xd) = (
            c.up_bytes(&gb),
            c.up_bytes(&ub),
            c.up_bytes(&db),
            c.up_f32(&x),
        );
        let np = n * n_used;
        let (hg, hu, hh, ho, out) = (
            c.poisoned(np * ff * 4),
            c.poisoned(np * ff * 4),
            c.alloc(np * ff * 4),
            c.poisoned(np * d * 4),
            c.poisoned(n * d * 4),
        );
        let k = &c.gpu.kernels;
        for (wd, hd) in [(gd.ptr, hg.ptr), (ud.ptr, hu.ptr)] {
            k.moe_gemv(
                GgmlType::Q4_K,
                wd,
                ff,
                d,
                xd.ptr,
                d,
                n_used,
                route.ptr,
                n_used,
                np,
                hd,
                ff,
                &s,
            )
            .unwrap();
        }
        k.glu(hg.ptr, hu.ptr, hh.ptr, np * ff, Activation::Silu, &s)
            .unwrap();
        k.moe_gemv(
            GgmlType::Q6_K,
            dd.ptr,
            d,
            ff,
            hh.ptr,
            ff,
            1,
            route.ptr,
            n_used,
            np,
            ho.ptr,
            d,
            &s,
        )
        .unwrap();
        k.moe_combine(ho.ptr, route.ptr, n_used, out.ptr, n, d, &s)
            .unwrap();
        c.sync();
        let h_gpu = c.down_f32(hh.ptr, np * ff);
        let stages = [
            (
                "gate",
                c.down_f32(hg.ptr, np * ff),
                cpu_moe_gemv(GgmlType::Q4_K, &gb, ff, d, &x, n_used, &ref_ids),
            ),
            (
                "up",
                c.down_f32(hu.ptr, np * ff),
                cpu_moe_gemv(GgmlType::Q4_K, &ub, ff, d, &x, n_used, &ref_ids),
            ),
            (
                "down",
                c.down_f32(ho.ptr, np * d),
                cpu_moe_gemv(GgmlType::Q6_K, &db, d, ff, &h_gpu, 1, &ref_ids),
            ),
        ];
        for (name, got, want) in &stages {
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let err = rel_l2(got, &want64);
            assert!(err <= 1e-5, "MoE {name} rel L2 {err}");
        }
        // Combined with the GPU's own route weights (checked against ref_w above).
        let mut want = vec![0f64; n * d];
        for (p, row) in stages[2].2.chunks_exact(d).enumerate() {
            let (t, k) = (p / n_used, p % n_used);
            let wt = f32::from_bits(words[t * 2 * n_used + n_used + k]) as f64;
            for (o, &v) in want[t * d..][..d].iter_mut().zip(row) {
                *o += wt * v as f64;
            }
        }
        let err = rel_l2(&c.down_f32(out.ptr, n * d), &want);
        assert!(err < 1e-5, "MoE FFN rel L2 {err}");
        c.free(&[ld, route, gd, ud, dd, xd, hg, hu, hh, ho, out]);
    }
}

/// The CPU engine's result of a routed expert GEMV: for pair `p` (expert `ids[p]`, input row
/// `p / x_div` of `x`, rows of `cols`), `y[p] = W_e · x_q` with the input quantized to the type's
/// partner format and dotted by `pshard_kernels::matmul::matmul` on expert `e`'s slice of `w`
/// (`rows` rows per expert).
fn cpu_moe_gemv(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    x_div: usize,
    ids: &[u32],
) -> Vec<f32> {
    let k = quant::kernel(ty).expect("CPU kernel");
    let rb = row_bytes(ty, cols).unwrap();
    let n_in = x.len() / cols;
    let xq: Vec<_> = (0..n_in)
        .map(|i| pshard_kernels::matmul::quantize_acts(k.act, &x[i * cols..][..cols], 1, cols))
        .collect();
    let mut y = vec![0f32; ids.len() * rows];
    for (p, &e) in ids.iter().enumerate() {
        let wm = pshard_kernels::matmul::WeightMatrix {
            ty,
            data: &w[e as usize * rows * rb..][..rows * rb],
            rows,
            cols,
            layout: pshard_kernels::matmul::WeightLayout::File,
        };
        pshard_kernels::matmul::matmul(
            &wm,
            &xq[p / x_div],
            &mut y[p * rows..][..rows],
            rows,
            0..rows,
        )
        .unwrap();
    }
    y
}

/// `moe_route` with a forced-expert table against the CPU's routing with the same forced ids:
/// forced tokens (distinct random experts, some in groups the group limit masks) take exactly
/// those experts, weighted by each gating, renormalisation and scale as the CPU does, the
/// selection bias ignored; tokens whose row starts with `MOE_ROUTE_FREE` route as without a
/// table.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_route_forced_matches_cpu() {
    let Some(c) = ctx("cuda_moe_route_forced_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_moe_forced");
    let s = c.gpu.stream().clone();
    let (n, n_expert, n_used) = (9usize, 16usize, 4usize);
    let bias = randv(&mut r, n_expert, 0.3);
    let bd = c.up_f32(&bias);
    for (gating, groups, normalize, scale) in [
        (Gating::Softmax, (0, 0), false, 1.0),
        (Gating::Softmax, (4, 2), true, 1.0),
        (Gating::Sigmoid, (0, 0), true, 2.5),
        (Gating::SoftmaxAfterTopK, (0, 0), false, 1.0),
        (Gating::Sigmoid, (8, 3), true, 1.0),
    ] {
        let rt = Routing {
            n_expert,
            n_used,
            gating,
            normalize,
            scale,
            groups,
        };
        let logits = randv(&mut r, n * n_expert, 3.0);
        // Every third token routes itself; the others take n_used distinct random experts.
        let mut table = vec![MOE_ROUTE_FREE; n * n_used];
        for (t, row) in table.chunks_exact_mut(n_used).enumerate() {
            if t % 3 == 2 {
                continue;
            }
            let mut k = 0;
            while k < n_used {
                let e = r.gen_range(0..n_expert as u32);
                if !row[..k].contains(&e) {
                    row[k] = e;
                    k += 1;
                }
            }
        }
        let ld = c.up_f32(&logits);
        let fd = c.up_bytes(bytemuck::cast_slice(&table));
        let route = c.poisoned(n * 2 * n_used * 4);
        let sel = (gating == Gating::Sigmoid).then_some(bd.ptr);
        c.gpu
            .kernels
            .moe_route(ld.ptr, n, &rt, sel, Some(fd.ptr), route.ptr, &s)
            .unwrap();
        c.sync();
        let rb = c.down_bytes(route.ptr, n * 2 * n_used * 4);
        let word = |i: usize| u32::from_le_bytes(rb[4 * i..4 * i + 4].try_into().unwrap());
        let mut differs = false;
        for t in 0..n {
            let row = &table[t * n_used..][..n_used];
            let forced = (row[0] != MOE_ROUTE_FREE).then_some(row);
            let (mut ids, mut w) = (vec![0u32; n_used], vec![0f32; n_used]);
            let l = &logits[t * n_expert..][..n_expert];
            let b = sel.map(|_| &bias[..]);
            pshard_kernels::ops::route(l, &rt, b, forced, &mut ids, &mut w);
            let (mut own, mut own_w) = (vec![0u32; n_used], vec![0f32; n_used]);
            pshard_kernels::ops::route(l, &rt, b, None, &mut own, &mut own_w);
            differs |= forced.is_some() && own != ids;
            for k in 0..n_used {
                assert_eq!(
                    word(t * 2 * n_used + k),
                    ids[k],
                    "{rt:?} token {t} expert {k} (forced {forced:?})"
                );
                let got = f32::from_bits(word(t * 2 * n_used + n_used + k));
                assert!(
                    (got - w[k]).abs() < 1e-5,
                    "{rt:?} token {t} weight {k}: {got} vs {} (forced {forced:?})",
                    w[k]
                );
            }
        }
        assert!(
            differs,
            "{rt:?}: no forced token differs from its own routing"
        );
        c.free(&[ld, fd, route]);
    }
    c.free(&[bd]);
}

/// A route buffer as `moe_route` writes it for pairs with experts `ids` (`n_used` per token, the
/// last token possibly partial): per token `n_used` i32 ids, then `n_used` f32 weights.
fn route_bytes(ids: &[u32], n_used: usize, r: &mut StdRng) -> Vec<u8> {
    let tokens = ids.len().div_ceil(n_used);
    let mut b = Vec::with_capacity(tokens * 2 * n_used * 4);
    for t in 0..tokens {
        for k in 0..n_used {
            let e = ids.get(t * n_used + k).copied().unwrap_or(0);
            b.extend_from_slice(&e.to_le_bytes());
        }
        for _ in 0..n_used {
            b.extend_from_slice(&r.gen_range(0.0f32..1.0).to_le_bytes());
        }
    }
    b
}

/// The int8 MoE expert GEMV of every quantized type against the CPU engine's matmul on each
/// pair's expert slice with the same activations: random routes drawn from few experts (repeats
/// within and across tokens), 1..64 pairs (partial last tokens), 1..8 experts per token, one input
/// row per token (gate/up) and per pair (down), padded strides, every kernel shape; a launch
/// beyond the activation scratch (chunked); and a CUDA graph replayed on new routes and inputs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_gemv_int8_matches_cpu_engine() {
    let Some(c) = ctx("cuda_moe_gemv_int8_matches_cpu_engine") else {
        return;
    };
    let mut r = rng("cuda_moe_gemv_int8");
    let s = c.gpu.stream().clone();
    let n_expert = 5usize;
    let mut worst = 0f64;
    // Runs one call and checks it; returns the relative L2 error of the worst pair.
    let check = |r: &mut StdRng,
                 ty: GgmlType,
                 w: &(Vec<u8>, DevBuf),
                 rows: usize,
                 cols: usize,
                 n_pairs: usize,
                 n_used: usize,
                 x_div: usize|
     -> f64 {
        let ids: Vec<u32> = (0..n_pairs)
            .map(|_| r.gen_range(0..n_expert as u32))
            .collect();
        let n_in = (n_pairs - 1) / x_div + 1;
        let (ldx, ldy) = (cols + 32, rows + 3);
        let x = randv(r, n_in * ldx, 1.0);
        let route = c.up_bytes(&route_bytes(&ids, n_used, r));
        let xd = c.up_f32(&x);
        let yd = c.poisoned(n_pairs * ldy * 4);
        c.gpu
            .kernels
            .moe_gemv(
                ty, w.1.ptr, rows, cols, xd.ptr, ldx, x_div, route.ptr, n_used, n_pairs, yd.ptr,
                ldy, &s,
            )
            .unwrap();
        c.sync();
        let got = c.down_f32(yd.ptr, n_pairs * ldy);
        // The reference reads unpadded rows.
        let xc: Vec<f32> = x
            .chunks_exact(ldx)
            .flat_map(|row| &row[..cols])
            .copied()
            .collect();
        let want = cpu_moe_gemv(ty, &w.0, rows, cols, &xc, x_div, &ids);
        let mut worst = 0f64;
        for p in 0..n_pairs {
            let want64: Vec<f64> = want[p * rows..][..rows].iter().map(|&v| v as f64).collect();
            let err = rel_l2(&got[p * ldy..][..rows], &want64);
            assert!(
                err <= 1e-5,
                "{ty:?} {rows}x{cols} pairs={n_pairs} n_used={n_used} x_div={x_div}: pair {p} (expert {}) rel L2 {err}",
                ids[p]
            );
            worst = worst.max(err);
        }
        // Padding between output rows is left alone.
        assert!(got
            .chunks_exact(ldy)
            .all(|row| row[rows..].iter().all(|v| v.is_nan())));
        c.free(&[route, xd, yd]);
        worst
    };
    for &ty in quant::SUPPORTED {
        let Some(k) = quant::kernel(ty) else { continue };
        if k.act == quant::ActFormat::F32 {
            continue;
        }
        // (rows, cols): 768 and 4096 columns (Q8_0 rows of 4096 use teams of four warps).
        for (si, &(rows, cols)) in [(37usize, 768usize), (21, 4096)].iter().enumerate() {
            let bytes = if si == 0 {
                random_blocks(&mut r, ty, n_expert * rows, cols)
            } else {
                make_weights(&mut r, ty, n_expert * rows, cols).0
            };
            let w = (bytes.clone(), c.up_bytes(&bytes));
            for &(n_pairs, n_used) in &[(1usize, 1usize), (3, 2), (8, 8), (13, 4), (40, 8), (64, 6)]
            {
                for x_div in [n_used, 1] {
                    worst = worst.max(check(&mut r, ty, &w, rows, cols, n_pairs, n_used, x_div));
                }
            }
            c.free(&[w.1]);
        }
    }
    // Every kernel shape, and inputs beyond the scratch (2^20 values): 300 pairs of 4096 columns
    // take two launches per call with one row per pair; 2000 pairs sharing rows per token, two.
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::MXFP4,
        GgmlType::IQ4_XS,
    ] {
        let bytes = random_blocks(&mut r, ty, n_expert * 19, 4096);
        let w = (bytes.clone(), c.up_bytes(&bytes));
        for rw in ["1,1", "2,1", "2,4"] {
            std::env::set_var("PSHARD_MOE_RW", rw);
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 24, 8, 8));
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 24, 8, 1));
        }
        std::env::remove_var("PSHARD_MOE_RW");
        if ty == GgmlType::Q4_K {
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 300, 6, 1));
            worst = worst.max(check(&mut r, ty, &w, 19, 4096, 2000, 7, 7));
        }
        c.free(&[w.1]);
    }
    eprintln!("int8 MoE GEMV vs CPU engine: worst per-pair rel L2 {worst:.2e}");

    // Captured once, replayed with new routes and activations written into the same buffers.
    let (ty, rows, cols, n_used, n_pairs) = (GgmlType::Q4_K, 64usize, 1024usize, 4usize, 12usize);
    let bytes = random_blocks(&mut r, ty, n_expert * rows, cols);
    let wd = c.up_bytes(&bytes);
    let ids0: Vec<u32> = (0..n_pairs as u32).map(|p| p % n_expert as u32).collect();
    let route = c.up_bytes(&route_bytes(&ids0, n_used, &mut r));
    let xd = c.up_f32(&randv(&mut r, n_pairs * cols, 1.0));
    let yd = c.poisoned(n_pairs * rows * 4);
    let call = || {
        c.gpu.kernels.moe_gemv(
            ty, wd.ptr, rows, cols, xd.ptr, cols, 1, route.ptr, n_used, n_pairs, yd.ptr, rows, &s,
        )
    };
    let g = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, call).unwrap();
    for _ in 0..2 {
        let ids: Vec<u32> = (0..n_pairs)
            .map(|_| r.gen_range(0..n_expert as u32))
            .collect();
        let x = randv(&mut r, n_pairs * cols, 1.0);
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        c.gpu.dev.upload(&s, xd.ptr, &xb).unwrap();
        c.gpu
            .dev
            .upload(&s, route.ptr, &route_bytes(&ids, n_used, &mut r))
            .unwrap();
        c.gpu
            .dev
            .memset(&s, yd.ptr, 0xff, n_pairs * rows * 4)
            .unwrap();
        g.launch(&s).unwrap();
        c.sync();
        let got = c.down_f32(yd.ptr, n_pairs * rows);
        let want = cpu_moe_gemv(ty, &bytes, rows, cols, &x, 1, &ids);
        let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let err = rel_l2(&got, &want64);
        assert!(err <= 1e-5, "graph replay: rel L2 {err}");
    }
    c.free(&[wd, route, xd, yd]);
}

/// MoE expert GEMV timings (run with `--ignored`) on qwen3-30b-a3b shapes (128 experts, d 2048,
/// ff 768, 8 per token): gate/up (768 × 2048, one input row per token) and down (2048 × 768, one
/// per pair) for 1 and 4 tokens, each kernel shape, in a CUDA graph of 16 calls with different
/// random routes. GB/s counts the bytes of the distinct experts each call reads; the plain int8
/// GEMV over one contiguous matrix of the same bytes (8 experts' rows) is the reference.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_moe_gemv() {
    let Some(c) = ctx("cuda_bench_moe_gemv") else {
        return;
    };
    let mut r = rng("cuda_bench_moe_gemv");
    let s = c.gpu.stream().clone();
    let (n_expert, d, ff, n_used, calls) = (128usize, 2048usize, 768usize, 8usize, 16usize);
    let x = c.up_f32(&randv(&mut r, 32 * d.max(ff), 1.0));
    let y = c.alloc(32 * d.max(ff) * 4);
    let mut lines = Vec::new();
    for (ty, rows, cols, what) in [
        (GgmlType::Q4_K, ff, d, "gate/up"),
        (GgmlType::Q4_K, d, ff, "down"),
        (GgmlType::Q6_K, d, ff, "down"),
        (GgmlType::Q8_0, ff, d, "gate/up"),
    ] {
        let rb = row_bytes(ty, cols).unwrap();
        let eb = rows * rb;
        let w = c.up_bytes(&random_blocks(&mut r, ty, n_expert * rows, cols));
        for tokens in [1usize, 4] {
            let n_pairs = tokens * n_used;
            let x_div = if what == "down" { 1 } else { n_used };
            let mut routes = Vec::new();
            let mut bytes = 0usize;
            for _ in 0..calls {
                let mut ids = Vec::new();
                for _ in 0..tokens {
                    let mut pick: Vec<u32> = (0..n_expert as u32).collect();
                    for k in 0..n_used {
                        let j = r.gen_range(k..n_expert);
                        pick.swap(k, j);
                    }
                    ids.extend_from_slice(&pick[..n_used]);
                }
                let mut distinct = ids.clone();
                distinct.sort_unstable();
                distinct.dedup();
                bytes += distinct.len() * eb;
                routes.push(c.up_bytes(&route_bytes(&ids, n_used, &mut r)));
            }
            let mut row = format!("{ty:?} {what} {rows}x{cols} tokens={tokens}:");
            for rw in ["1,1", "2,1", "2,4", ""] {
                if rw.is_empty() {
                    std::env::remove_var("PSHARD_MOE_RW");
                } else {
                    std::env::set_var("PSHARD_MOE_RW", rw);
                }
                let g = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, || {
                    for rt in &routes {
                        c.gpu.kernels.moe_gemv(
                            ty, w.ptr, rows, cols, x.ptr, cols, x_div, rt.ptr, n_used, n_pairs,
                            y.ptr, rows, &s,
                        )?;
                    }
                    Ok(())
                })
                .unwrap();
                g.launch(&s).unwrap();
                c.sync();
                let (a, b) = (
                    c.gpu.dev.event(true).unwrap(),
                    c.gpu.dev.event(true).unwrap(),
                );
                let reps = 20;
                a.record(&s).unwrap();
                for _ in 0..reps {
                    g.launch(&s).unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                let ms = a.elapsed_ms(&b).unwrap() as f64 / reps as f64;
                let label = if rw.is_empty() { "auto" } else { rw };
                row += &format!(
                    "  [{label}] {:.1} us {:.0} GB/s",
                    ms * 1e3 / calls as f64,
                    bytes as f64 / ms / 1e6
                );
            }
            std::env::remove_var("PSHARD_MOE_RW");
            // Reference: the dense int8 GEMV over n_used experts' rows (contiguous) per token.
            let gref = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, || {
                for i in 0..calls {
                    let wp = w.ptr + ((i * n_used) % (n_expert - n_used) * eb) as u64;
                    c.gpu.kernels.gemv(
                        ty,
                        wp,
                        n_used * rows,
                        cols,
                        x.ptr,
                        cols,
                        y.ptr,
                        n_used * rows,
                        tokens,
                        None,
                        &s,
                    )?;
                }
                Ok(())
            })
            .unwrap();
            gref.launch(&s).unwrap();
            c.sync();
            let (a, b) = (
                c.gpu.dev.event(true).unwrap(),
                c.gpu.dev.event(true).unwrap(),
            );
            a.record(&s).unwrap();
            for _ in 0..20 {
                gref.launch(&s).unwrap();
            }
            b.record(&s).unwrap();
            b.synchronize().unwrap();
            let ms = a.elapsed_ms(&b).unwrap() as f64 / 20.0;
            row += &format!(
                "  | dense gemv {:.1} us {:.0} GB/s",
                ms * 1e3 / calls as f64,
                (calls * n_used * eb) as f64 / ms / 1e6
            );
            lines.push(row);
            c.free(&routes);
        }
        c.free(&[w]);
    }
    c.free(&[x, y]);
    for l in &lines {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
    }
}

/// Float experts (F16, BF16, F32) keep the f32 MoE GEMV: against an f64 reference on the same
/// (f16/bf16-exact) weights with unquantized activations.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_gemv_float_matches_reference() {
    let Some(c) = ctx("cuda_moe_gemv_float_matches_reference") else {
        return;
    };
    let mut r = rng("cuda_moe_gemv_float");
    let s = c.gpu.stream().clone();
    let (n_expert, rows, cols) = (4usize, 29usize, 256usize);
    for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
        let (bytes, wf) = make_weights(&mut r, ty, n_expert * rows, cols);
        let wd = c.up_bytes(&bytes);
        for &(n_pairs, n_used, x_div) in &[(1usize, 1usize, 1usize), (12, 4, 4), (10, 3, 1)] {
            let ids: Vec<u32> = (0..n_pairs)
                .map(|_| r.gen_range(0..n_expert as u32))
                .collect();
            let x = randv(&mut r, ((n_pairs - 1) / x_div + 1) * cols, 1.0);
            let route = c.up_bytes(&route_bytes(&ids, n_used, &mut r));
            let xd = c.up_f32(&x);
            let yd = c.poisoned(n_pairs * rows * 4);
            c.gpu
                .kernels
                .moe_gemv(
                    ty, wd.ptr, rows, cols, xd.ptr, cols, x_div, route.ptr, n_used, n_pairs,
                    yd.ptr, rows, &s,
                )
                .unwrap();
            c.sync();
            let mut want = vec![0f64; n_pairs * rows];
            for (p, &e) in ids.iter().enumerate() {
                let xr = &x[p / x_div * cols..][..cols];
                for (j, o) in want[p * rows..][..rows].iter_mut().enumerate() {
                    let wr = &wf[(e as usize * rows + j) * cols..][..cols];
                    *o = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                }
            }
            let err = rel_l2(&c.down_f32(yd.ptr, n_pairs * rows), &want);
            assert!(err < 1e-5, "{ty:?} pairs={n_pairs}: rel L2 {err}");
            c.free(&[route, xd, yd]);
        }
        c.free(&[wd]);
    }
}

/// Exclusive prefix sums of the 64-row token tiles of buckets with `offsets` (as `moe_sort`
/// writes them into `tiles`).
fn ref_moe_tiles(offsets: &[i32]) -> Vec<i32> {
    let mut t = vec![0i32];
    for w in offsets.windows(2) {
        let c = w[1] - w[0];
        t.push(t.last().unwrap() + (c + MOE_GEMM_BN as i32 - 1) / MOE_GEMM_BN as i32);
    }
    t
}

/// CPU reference of `moe_sort`: the bucket of each pair (ids >= n_expert: bucket n_expert) and
/// the exclusive prefix sums of the bucket counts (`n_expert + 2` values).
fn ref_moe_offsets(ids: &[u32], n_expert: usize) -> (Vec<usize>, Vec<i32>) {
    let buckets: Vec<usize> = ids.iter().map(|&e| (e as usize).min(n_expert)).collect();
    let mut offs = vec![0i32; n_expert + 2];
    for &b in &buckets {
        offs[b + 1] += 1;
    }
    for i in 1..offs.len() {
        offs[i] += offs[i - 1];
    }
    (buckets, offs)
}

/// `moe_sort` against a CPU counting sort: offsets and tile offsets exact, `order` a permutation
/// of the pairs with
/// every pair inside its expert's range; few and many experts (1024: more buckets than threads),
/// unused experts, 1..32768 pairs, and ids >= n_expert collected in the extra last bucket.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_sort_groups_pairs_by_expert() {
    let Some(c) = ctx("cuda_moe_sort_groups_pairs_by_expert") else {
        return;
    };
    let mut r = rng("cuda_moe_sort");
    let s = c.gpu.stream().clone();
    for &(n_tokens, n_used, n_expert, invalid) in &[
        (1usize, 1usize, 1usize, false),
        (7, 4, 16, false),
        (300, 8, 128, false),
        (300, 8, 128, true),
        (4096, 8, 128, false),
        (1000, 6, 1024, true),
        (33, 2, 5, true),
    ] {
        let n_pairs = n_tokens * n_used;
        // Skewed routes: a few experts take most pairs, some get none.
        let ids: Vec<u32> = (0..n_pairs)
            .map(|_| {
                if invalid && r.gen_range(0..50) == 0 {
                    [n_expert as u32, n_expert as u32 + 7, u32::MAX][r.gen_range(0..3)]
                } else if r.gen_bool(0.5) {
                    r.gen_range(0..n_expert.div_ceil(4) as u32)
                } else {
                    r.gen_range(0..n_expert as u32)
                }
            })
            .collect();
        let route = c.up_bytes(&route_bytes(&ids, n_used, &mut r));
        let offs = c.poisoned((n_expert + 2) * 4);
        let tiles = c.poisoned((n_expert + 2) * 4);
        let order = c.poisoned(n_pairs * 4);
        c.gpu
            .kernels
            .moe_sort(
                route.ptr, n_tokens, n_used, n_expert, offs.ptr, tiles.ptr, order.ptr, &s,
            )
            .unwrap();
        c.sync();
        let (buckets, want) = ref_moe_offsets(&ids, n_expert);
        let got: Vec<i32> = c
            .down_bytes(offs.ptr, (n_expert + 2) * 4)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let case = format!("{n_tokens} tokens × {n_used} of {n_expert} experts");
        assert_eq!(got, want, "{case}: offsets");
        let got_tiles: Vec<i32> = c
            .down_bytes(tiles.ptr, (n_expert + 2) * 4)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got_tiles, ref_moe_tiles(&want), "{case}: tiles");
        let ord: Vec<i32> = c
            .down_bytes(order.ptr, n_pairs * 4)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut seen = vec![false; n_pairs];
        for b in 0..=n_expert {
            for &p in &ord[want[b] as usize..want[b + 1] as usize] {
                assert!(
                    p >= 0 && (p as usize) < n_pairs,
                    "{case}: pair {p} out of range"
                );
                let p = p as usize;
                assert!(!seen[p], "{case}: pair {p} twice");
                seen[p] = true;
                assert_eq!(buckets[p], b, "{case}: pair {p} in bucket {b}");
            }
        }
        assert!(
            seen.iter().all(|&v| v),
            "{case}: order is not a permutation"
        );
        c.free(&[route, offs, tiles, order]);
    }
}

/// The grouped expert GEMM of every weight type against f64 dot products of the CPU engine's
/// dequantized weights with the (f16) activations. Odd shapes: 77 and 200 output rows (not
/// multiples of the 64/128-row tiles), K of one block, K with a partial last 256-column tile
/// (QK 32 types: 288; float types: 280, whose last tile is not a multiple of 16 columns), and
/// 768 (three tiles). Experts with 0, 1, 3, 70 and 300 rows (more than a 64-token tile), both
/// tile variants, a grid with fewer tile slots than tiles (`n_pairs` of 1: the blocks loop over
/// the tile list), the scattered output (`y_rows`), and invalid-id rows set to NaN. Tolerance: rel L2 <= 1e-3 (the weights are rounded
/// to f16 in the kernel, accumulation is f32).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_moe_gemm_matches_cpu() {
    let Some(c) = ctx("cuda_moe_gemm_matches_cpu") else {
        return;
    };
    let mut r = rng("cuda_moe_gemm");
    let s = c.gpu.stream().clone();
    let n_expert = 6usize;
    // Rows per expert (bucket n_expert: invalid ids).
    let counts = [0usize, 1, 70, 3, 0, 300, 2];
    let mut offs = vec![0i32];
    for &n in &counts {
        offs.push(offs.last().unwrap() + n as i32);
    }
    let n_rows = *offs.last().unwrap() as usize;
    let expert_of = |i: usize| (0..=n_expert).find(|&e| (i as i32) < offs[e + 1]).unwrap();
    let od = c.up_i32(&offs);
    let td = c.up_i32(&ref_moe_tiles(&offs));
    let types = [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_K,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ];
    let mut variant = 0usize;
    for ty in types {
        let qk = type_geom(ty).unwrap().qk;
        let cols_list: Vec<usize> = match qk {
            256 => vec![256, 768],
            32 => vec![32, 288],
            _ => vec![8, 280],
        };
        for cols in cols_list {
            let rows = if cols >= 512 { 200 } else { 77 };
            let (wb, wf) = make_weights(&mut r, ty, n_expert * rows, cols);
            let wd = c.up_bytes(&wb);
            let x: Vec<f16> = (0..n_rows * cols)
                .map(|_| f16::from_f32(r.gen_range(-1.0f32..1.0)))
                .collect();
            let xd = c.up_bytes(&x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
            // Scatter target: a random permutation of the rows.
            let mut perm: Vec<i32> = (0..n_rows as i32).collect();
            for i in (1..n_rows).rev() {
                perm.swap(i, r.gen_range(0..=i));
            }
            let pd = c.up_i32(&perm);
            let mut want = vec![0f64; n_rows * rows];
            for i in 0..n_rows {
                let e = expert_of(i);
                if e == n_expert {
                    continue;
                }
                let xr = &x[i * cols..][..cols];
                for (j, o) in want[i * rows..][..rows].iter_mut().enumerate() {
                    let wr = &wf[(e * rows + j) * cols..][..cols];
                    *o = wr.iter().zip(xr).map(|(&a, b)| a as f64 * b.to_f64()).sum();
                }
            }
            for scatter in [false, true] {
                // Both tile variants in turn, with a grid for all rows and one of the fewest slots.
                let tile = ["64x64", "128x64"][variant % 2];
                let n_pairs_hint = if (variant / 2).is_multiple_of(2) {
                    n_rows
                } else {
                    1
                };
                variant += 1;
                std::env::set_var("PSHARD_MOE_GEMM_TILE", tile);
                let ldy = rows + 3;
                let yd = c.poisoned(n_rows * ldy * 4);
                c.gpu
                    .kernels
                    .moe_gemm(
                        ty,
                        wd.ptr,
                        rows,
                        cols,
                        n_expert,
                        xd.ptr,
                        od.ptr,
                        td.ptr,
                        n_pairs_hint,
                        yd.ptr,
                        ldy,
                        scatter.then_some(pd.ptr),
                        &s,
                    )
                    .unwrap();
                c.sync();
                std::env::remove_var("PSHARD_MOE_GEMM_TILE");
                let y = c.down_f32(yd.ptr, n_rows * ldy);
                let case = format!(
                    "{ty:?} {rows}x{cols} tile {tile} pairs {n_pairs_hint} scatter {scatter}"
                );
                let (mut got, mut want_v) = (Vec::new(), Vec::new());
                for i in 0..n_rows {
                    let dst = if scatter { perm[i] as usize } else { i };
                    let yr = &y[dst * ldy..][..rows];
                    if expert_of(i) == n_expert {
                        assert!(
                            yr.iter().all(|v| v.is_nan()),
                            "{case}: invalid-id row {i} not NaN"
                        );
                        continue;
                    }
                    got.extend_from_slice(yr);
                    want_v.extend_from_slice(&want[i * rows..][..rows]);
                }
                let err = rel_l2(&got, &want_v);
                eprintln!("{case}: rel L2 {err:.2e}");
                assert!(err <= 1e-3, "{case}: rel L2 {err}");
                // Per expert too, so a wrong small expert is not hidden by the large ones.
                for e in 0..n_expert {
                    let (a, b) = (offs[e] as usize * rows, offs[e + 1] as usize * rows);
                    if a < b {
                        let err = rel_l2(&got[a..b], &want_v[a..b]);
                        assert!(err <= 1e-3, "{case}: expert {e} rel L2 {err}");
                    }
                }
                c.free(&[yd]);
            }
            c.free(&[wd, xd, pd]);
        }
    }
    // Bad shapes are errors, not faults.
    let k = &c.gpu.kernels;
    assert!(matches!(
        k.moe_gemm(GgmlType::Q4_K, 0, 8, 100, 4, 0, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_gemm(GgmlType::Q8_0, 0, 8, 32, 4, 8, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_gemm(GgmlType::Q8_0, 0, 8, 32, 0, 0, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_gemm(GgmlType::Q4_K, 8, 8, 256, 4, 0, 0, 1, 1, 0, 8, None, &s),
        Err(CudaError::Invalid(_))
    ));
    assert!(matches!(
        k.moe_sort(0, 4, 2, 2000, 0, 0, 0, &s),
        Err(CudaError::Invalid(_))
    ));
    c.free(&[od, td]);
}

/// Benchmark (ignored; `--ignored cuda_bench_moe_gemm`): the grouped expert GEMM on
/// qwen3-30b-a3b's experts (128 of 768 × 2048 gate/up, 2048 × 768 down, 8 per token) for 512 and
/// 4096 tokens of uniform random routes, each tile variant: time per launch (CUDA events, median
/// of 3 runs of 10), TFLOP/s (2 · pairs · rows · cols) and the weight bytes read per second.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_moe_gemm() {
    let Some(c) = ctx("cuda_bench_moe_gemm") else {
        return;
    };
    let mut r = rng("cuda_bench_moe_gemm");
    let s = c.gpu.stream().clone();
    let (n_expert, d, ff, n_used) = (128usize, 2048usize, 768usize, 8usize);
    let mut lines = Vec::new();
    for tokens in [512usize, 4096] {
        let n_pairs = tokens * n_used;
        let mut ids = Vec::new();
        for _ in 0..tokens {
            let mut pick: Vec<u32> = (0..n_expert as u32).collect();
            for k in 0..n_used {
                let j = r.gen_range(k..n_expert);
                pick.swap(k, j);
            }
            ids.extend_from_slice(&pick[..n_used]);
        }
        let route = c.up_bytes(&route_bytes(&ids, n_used, &mut r));
        let offs = c.alloc((n_expert + 2) * 4);
        let tiles = c.alloc((n_expert + 2) * 4);
        let order = c.alloc(n_pairs * 4);
        let x16 = c.alloc(n_pairs * d * 2);
        c.gpu
            .dev
            .memset(&s, x16.ptr, 0x3c, n_pairs * d * 2)
            .unwrap();
        let y = c.alloc(n_pairs * d * 4);
        let time = |f: &dyn Fn() -> Result<(), CudaError>| -> f64 {
            f().unwrap();
            c.sync();
            let mut runs = Vec::new();
            for _ in 0..3 {
                let (a, b) = (
                    c.gpu.dev.event(true).unwrap(),
                    c.gpu.dev.event(true).unwrap(),
                );
                a.record(&s).unwrap();
                for _ in 0..10 {
                    f().unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                runs.push(a.elapsed_ms(&b).unwrap() as f64 / 10.0);
            }
            runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
            runs[1]
        };
        let k = &c.gpu.kernels;
        let ms = time(&|| {
            k.moe_sort(
                route.ptr, tokens, n_used, n_expert, offs.ptr, tiles.ptr, order.ptr, &s,
            )
        });
        lines.push(format!("tokens={tokens}: moe_sort {:.1} us", ms * 1e3));
        for (ty, rows, cols, what) in [
            (GgmlType::Q4_K, ff, d, "gate/up"),
            (GgmlType::Q4_K, d, ff, "down"),
            (GgmlType::Q6_K, d, ff, "down"),
            (GgmlType::Q8_0, ff, d, "gate/up"),
        ] {
            let w = c.up_bytes(&random_blocks(&mut r, ty, n_expert * rows, cols));
            let wbytes = n_expert * rows * row_bytes(ty, cols).unwrap();
            let mut row = format!("tokens={tokens} {ty:?} {what} {rows}x{cols}:");
            for tile in ["64x64", "128x64", ""] {
                if tile.is_empty() {
                    std::env::remove_var("PSHARD_MOE_GEMM_TILE");
                } else {
                    std::env::set_var("PSHARD_MOE_GEMM_TILE", tile);
                }
                let ms = time(&|| {
                    k.moe_gemm(
                        ty, w.ptr, rows, cols, n_expert, x16.ptr, offs.ptr, tiles.ptr, n_pairs,
                        y.ptr, rows, None, &s,
                    )
                });
                let flop = 2.0 * (n_pairs * rows * cols) as f64;
                row += &format!(
                    "  [{}] {:.1} us {:.0} TFLOP/s {:.0} GB/s",
                    if tile.is_empty() { "auto" } else { tile },
                    ms * 1e3,
                    flop / ms / 1e9,
                    wbytes as f64 / ms / 1e6
                );
            }
            std::env::remove_var("PSHARD_MOE_GEMM_TILE");
            lines.push(row);
            c.free(&[w]);
        }
        c.free(&[route, offs, tiles, order, x16, y]);
    }
    for l in &lines {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_arena_budget_is_enforced_and_named() {
    let Some(c) = ctx("cuda_arena_budget_is_enforced_and_named") else {
        return;
    };
    let dev = &c.gpu.dev;
    let left = dev.arena().unwrap().unreserved();
    match dev.create_region(RegionKind::Weights, "too-big", left + (1 << 20)) {
        Err(CudaError::OutOfVram { what, .. }) => assert!(what.contains("too-big"), "{what}"),
        other => panic!("expected OutOfVram, got {other:?}"),
    }
    let reg = dev.create_region(RegionKind::Kv, "small", 1 << 20).unwrap();
    let a = dev.alloc(reg, 600 << 10, "first").unwrap();
    match dev.alloc(reg, 600 << 10, "blk.0.attn_k cache") {
        Err(e @ CudaError::OutOfVram { .. }) => {
            assert!(e.to_string().contains("blk.0.attn_k cache"), "{e}")
        }
        other => panic!("expected OutOfVram, got {other:?}"),
    }
    dev.free(a).unwrap();
    // After freeing, the whole region is one extent again.
    let b = dev.alloc(reg, 1 << 20, "whole").unwrap();
    dev.free(b).unwrap();
    dev.arena().unwrap().destroy_region(reg).unwrap();
    eprintln!("vram report: {:?}", dev.vram_report().unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_pinned_and_registered_async_copies() {
    let Some(c) = ctx("cuda_pinned_and_registered_async_copies") else {
        return;
    };
    let dev = &c.gpu.dev;
    let n = 8 << 20;
    let mut pin = PinnedBuf::new(dev, n).unwrap();
    for (i, b) in pin.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let d = c.alloc(n);
    let copy = dev.copy_stream().clone();
    let ev = dev.event(true).unwrap();
    // SAFETY (test): the pinned buffer outlives the copy; we synchronise on the event below.
    unsafe { dev.upload_async(&copy, d.ptr, pin.as_ptr(), n).unwrap() };
    ev.record(&copy).unwrap();
    dev.compute_stream().wait(&ev).unwrap();
    let mut back = PinnedBuf::new(dev, n).unwrap();
    // SAFETY (test): `back` is untouched until the stream is synchronised.
    unsafe {
        dev.download_async(dev.compute_stream(), back.as_mut_ptr(), d.ptr, n)
            .unwrap()
    };
    dev.compute_stream().synchronize().unwrap();
    assert!(
        back.as_slice() == pin.as_slice(),
        "pinned round trip differs"
    );

    // Register an existing page-aligned host range read-only and copy from it.
    let layout = std::alloc::Layout::from_size_align(n, 4096).unwrap();
    // SAFETY (test): a fresh allocation of n bytes, freed below after the registration is dropped.
    let raw = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!raw.is_null());
    // SAFETY (test): raw holds n initialised (zeroed) bytes.
    let host = unsafe { std::slice::from_raw_parts_mut(raw, n) };
    for (i, b) in host.iter_mut().enumerate() {
        *b = (i * 13 + 1) as u8;
    }
    {
        let reg = HostRegistration::register_read_only(dev, host).unwrap();
        // SAFETY (test): the registered range outlives the copy (synchronised before drop).
        unsafe { dev.upload_async(&copy, d.ptr, reg.as_ptr(), n).unwrap() };
        copy.synchronize().unwrap();
    }
    let got = c.down_bytes(d.ptr, n);
    assert!(got == host, "registered copy differs");
    // SAFETY (test): allocated above with the same layout.
    unsafe { std::alloc::dealloc(raw, layout) };
    c.free(&[d]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_nvrtc_second_load_is_a_cache_hit() {
    let Some(c) = ctx("cuda_nvrtc_second_load_is_a_cache_hit") else {
        return;
    };
    let dir = pshard_kernels::cuda::nvrtc::default_cache_dir();
    let again = pshard_kernels::cuda::CudaKernels::load(&c.gpu.dev, &dir).unwrap();
    eprintln!("second load: {}", again.build_summary());
    assert!(
        again.all_cached(),
        "second load compiled: {:?}",
        again.builds()
    );
    assert!(again.len() > 100, "only {} kernels", again.len());
}

#[test]
fn cuda_probe_never_panics() {
    // Runs everywhere: without CUDA it must be a clean error naming the missing library.
    match pshard_kernels::cuda::probe(0) {
        Ok(s) => eprintln!("probe: {} device(s)", s.count),
        Err(e) => eprintln!("probe: {e}"),
    }
    assert!(pshard_kernels::cuda::probe(999).is_err());
}

#[test]
fn cuda_type_geometry_covers_cpu_types() {
    for &ty in quant::SUPPORTED {
        assert!(type_geom(ty).is_some(), "{ty:?} has no CUDA decoder");
    }
}

/// Decode GEMV throughput (run with `--ignored`): weight GB/s per quantized type and shape at
/// batch 1..8, with the dequantize + GEMM path at the same batch for comparison, timed in CUDA
/// graphs (or back to back: `PSHARD_BENCH_NO_GRAPH=1`). Weight copies rotate through more than
/// the L2 cache so every call reads HBM. `PSHARD_GEMV_RW` = "R,TW"
/// forces the kernel shape (rows and warps per team).
/// `bytes` uploaded as enough copies (at most 64) that together they outgrow L2 (256 MiB): a
/// benchmark that calls each copy in turn reads its weights from DRAM every call.
fn weight_copies(c: &Ctx, bytes: &[u8]) -> Vec<DevBuf> {
    let copies = (256usize << 20).div_ceil(bytes.len()).clamp(1, 64);
    let first = c.up_bytes(bytes);
    let mut ws = vec![first];
    for _ in 1..copies {
        let b = c.alloc(bytes.len());
        c.gpu
            .dev
            .copy_d2d(c.gpu.stream(), b.ptr, first.ptr, bytes.len())
            .unwrap();
        ws.push(b);
    }
    ws
}

/// Milliseconds per call of `f` launched back to back on the compute stream, call i on weight
/// copy i (cycling), after one untimed pass over the copies; at least `min_reps` calls.
fn time_back_to_back(c: &Ctx, ws: &[DevBuf], min_reps: usize, f: &dyn Fn(u64)) -> f64 {
    let s = c.gpu.stream();
    for b in ws {
        f(b.ptr);
    }
    c.sync();
    let (a, b) = (
        c.gpu.dev.event(true).unwrap(),
        c.gpu.dev.event(true).unwrap(),
    );
    let reps = (4 * ws.len()).max(min_reps);
    a.record(s).unwrap();
    for i in 0..reps {
        f(ws[i % ws.len()].ptr);
    }
    b.record(s).unwrap();
    b.synchronize().unwrap();
    a.elapsed_ms(&b).unwrap() as f64 / reps as f64
}

#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_gemv() {
    let Some(c) = ctx("cuda_bench_gemv") else {
        return;
    };
    let mut r = rng("cuda_bench_gemv");
    let s = c.gpu.stream().clone();
    let no_graph = std::env::var("PSHARD_BENCH_NO_GRAPH").is_ok_and(|v| v == "1");
    let mut lines = Vec::new();
    let shapes = [
        (4096usize, 4096usize),
        (4096, 14336),
        (14336, 4096),
        (1024, 4096),
    ];
    let max_cols = 14336;
    let x = c.up_f32(&randv(&mut r, 8 * max_cols, 1.0));
    let out = c.alloc(8 * 14336 * 4);
    let wsb = c.alloc(14336 * 4096 * 2);
    let asb = c.alloc(8 * max_cols * 2);
    let types: Vec<GgmlType> = quant::SUPPORTED
        .iter()
        .copied()
        .filter(|&t| t != GgmlType::F32 && t != GgmlType::BF16)
        .collect();
    for &(rows, cols) in &shapes {
        lines.push(format!(
            "{rows}x{cols}: weight GB/s   n=1    n=2    n=3    n=4    n=8  (gemm n=8)"
        ));
        for &ty in &types {
            let bytes = random_blocks(&mut r, ty, rows, cols);
            let ws = weight_copies(&c, &bytes);
            let copies = ws.len();
            // Timed as the runtime runs decode: one call per weight copy captured in a CUDA graph,
            // the graph replayed (`PSHARD_BENCH_NO_GRAPH=1`: launched back to back instead, as
            // the profiler times them).
            let time = |f: &dyn Fn(u64)| -> f64 {
                if no_graph {
                    return time_back_to_back(&c, &ws, 64, f);
                }
                let g = pshard_kernels::cuda::CapturedGraph::capture(&c.gpu.dev, &s, || {
                    for b in &ws {
                        f(b.ptr);
                    }
                    Ok(())
                })
                .unwrap();
                g.launch(&s).unwrap();
                c.sync();
                let (a, b) = (
                    c.gpu.dev.event(true).unwrap(),
                    c.gpu.dev.event(true).unwrap(),
                );
                let reps = 64usize.div_ceil(copies).max(2);
                a.record(&s).unwrap();
                for _ in 0..reps {
                    g.launch(&s).unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                a.elapsed_ms(&b).unwrap() as f64 / (reps * copies) as f64
            };
            let mut row = format!("  {:<6}", format!("{ty:?}"));
            for n in [1usize, 2, 3, 4, 8] {
                let ms = time(&|w| {
                    c.gpu
                        .kernels
                        .gemv(ty, w, rows, cols, x.ptr, cols, out.ptr, rows, n, None, &s)
                        .unwrap()
                });
                row += &format!(" {:6.0}", bytes.len() as f64 / ms / 1e6);
            }
            let sc = GemmScratch {
                weights: wsb.ptr,
                acts: asb.ptr,
            };
            let ms = time(&|w| {
                c.gpu
                    .matmul(
                        ty,
                        w,
                        cols,
                        0,
                        rows,
                        x.ptr,
                        8,
                        out.ptr,
                        rows,
                        None,
                        Some(sc),
                        false,
                    )
                    .unwrap()
            });
            row += &format!("  {:6.0}", bytes.len() as f64 / ms / 1e6);
            lines.push(row);
            c.free(&ws);
        }
    }
    // The activation quantizer alone (it runs before every GEMV launch).
    for format in [quant::ActFormat::Q8K, quant::ActFormat::Q8_0] {
        for cols in [4096usize, 14336] {
            for n in [1usize, 8] {
                let reps = 200;
                c.sync();
                let (a, b) = (
                    c.gpu.dev.event(true).unwrap(),
                    c.gpu.dev.event(true).unwrap(),
                );
                a.record(&s).unwrap();
                for _ in 0..reps {
                    c.gpu
                        .kernels
                        .quantize_acts(format, x.ptr, cols, cols, n, &s)
                        .unwrap();
                }
                b.record(&s).unwrap();
                b.synchronize().unwrap();
                let us = a.elapsed_ms(&b).unwrap() as f64 / reps as f64 * 1e3;
                lines.push(format!(
                    "quantize {} cols={cols} n={n}: {us:.2} us per call (back to back)",
                    format.name()
                ));
            }
        }
    }
    c.free(&[x, out, wsb, asb]);
    for l in &lines {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
    }
}

/// MMQ beside the int8 GEMV and dequantize + cuBLAS (run with `--ignored`): µs per call and
/// weight GB/s for llama3-8b's matrices (14336x4096 gate/up, 4096x14336 down, 4096x4096 q/o,
/// 1024x4096 k/v) at 8..128 tokens, each path as `Gpu::matmul` runs it (GEMV: one quantize + launch
/// per 8 rows; GEMM: dequantize, convert, cuBLAS; MMQ: quantize + one launch, the chosen tile, then
/// every tile). Launched back to back over enough weight copies that L2 holds none (batches of
/// more than 4 tokens run outside CUDA graphs). One line per (shape, type, tokens) decides
/// MMQ_TOKENS and the tile choice.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_mmq() {
    let Some(c) = ctx("cuda_bench_mmq") else {
        return;
    };
    let mut r = rng("cuda_bench_mmq");
    let s = c.gpu.stream().clone();
    let shapes = [
        (14336usize, 4096usize),
        (4096, 14336),
        (4096, 4096),
        (1024, 4096),
    ];
    let ns = [8usize, 16, 32, 64, 128];
    let max_n = 128;
    let max_cols = 14336;
    let x = c.up_f32(&randv(&mut r, max_n * max_cols, 1.0));
    let out = c.alloc(max_n * 14336 * 4);
    let wsb = c.alloc(14336 * 4096 * 2);
    let asb = c.alloc(max_n * max_cols * 2);
    let sc = GemmScratch {
        weights: wsb.ptr,
        acts: asb.ptr,
    };
    let mut lines = Vec::new();
    for &(rows, cols) in &shapes {
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0] {
            let bytes = random_blocks(&mut r, ty, rows, cols);
            let ws = weight_copies(&c, &bytes);
            // Microseconds per call, each call on the next weight copy.
            let time = |f: &dyn Fn(u64)| time_back_to_back(&c, &ws, 32, f) * 1e3;
            let gbs = |us: f64| bytes.len() as f64 / us / 1e3;
            for &n in &ns {
                let gemv = time(&|w| {
                    c.gpu
                        .kernels
                        .gemv(ty, w, rows, cols, x.ptr, cols, out.ptr, rows, n, None, &s)
                        .unwrap()
                });
                let gemm = time(&|w| {
                    c.gpu
                        .matmul(
                            ty,
                            w,
                            cols,
                            0,
                            rows,
                            x.ptr,
                            n,
                            out.ptr,
                            rows,
                            None,
                            Some(sc),
                            true,
                        )
                        .unwrap()
                });
                let auto = c.gpu.kernels.mmq_tile(ty, rows, n).unwrap();
                let mmq = |t: MmqTile| {
                    time(&|w| {
                        c.gpu
                            .kernels
                            .mmq(
                                ty,
                                w,
                                rows,
                                cols,
                                x.ptr,
                                cols,
                                out.ptr,
                                rows,
                                n,
                                None,
                                Some(t),
                                &s,
                            )
                            .unwrap()
                    })
                };
                let chosen = mmq(auto);
                let mut row = format!(
                    "mmq {rows}x{cols} {ty:?} n={n}: gemv {gemv:.1} us ({:.0} GB/s) | gemm {gemm:.1} us ({:.0}) | mmq {chosen:.1} us ({:.0}) [{auto}] | tiles",
                    gbs(gemv),
                    gbs(gemm),
                    gbs(chosen)
                );
                for t in c.gpu.kernels.mmq_tiles(ty) {
                    row += &format!(" {t} {:.1}", mmq(t));
                }
                lines.push(row);
            }
            c.free(&ws);
        }
    }
    c.free(&[x, out, wsb, asb]);
    for l in &lines {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
    }
}

/// Kernel timings (run with `--ignored`): the numbers the executor's design rests on.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_kernels() {
    let Some(c) = ctx("cuda_bench_kernels") else {
        return;
    };
    let mut r = rng("cuda_bench");
    let s = c.gpu.stream().clone();
    let time = |f: &dyn Fn(), reps: usize| -> f64 {
        f();
        c.sync();
        let (a, b) = (
            c.gpu.dev.event(true).unwrap(),
            c.gpu.dev.event(true).unwrap(),
        );
        a.record(&s).unwrap();
        for _ in 0..reps {
            f();
        }
        b.record(&s).unwrap();
        b.synchronize().unwrap();
        a.elapsed_ms(&b).unwrap() as f64 / reps as f64
    };
    let mut table = Vec::new();
    for (ty, rows, cols) in [
        (GgmlType::Q4_K, 14336, 4096),
        (GgmlType::Q6_K, 4096, 14336),
        (GgmlType::Q4_K, 4096, 4096),
        (GgmlType::Q4_K, 1024, 4096),
        (GgmlType::Q6_K, 128256, 4096),
        (GgmlType::Q8_0, 14336, 4096),
        (GgmlType::Q4_1, 14336, 4096),
    ] {
        let bytes = random_blocks(&mut r, ty, rows, cols);
        let w = c.up_bytes(&bytes);
        let x = c.up_f32(&randv(&mut r, 2048 * cols, 1.0));
        let out = c.alloc(2048 * rows * 4);
        for n in [1usize, 2, 4, 8] {
            let ms = time(
                &|| {
                    c.gpu
                        .kernels
                        .gemv(
                            ty, w.ptr, rows, cols, x.ptr, cols, out.ptr, rows, n, None, &s,
                        )
                        .unwrap()
                },
                50,
            );
            table.push(format!(
                "gemv {ty:?} {rows}x{cols} n={n}: {ms:.4} ms, {:.0} GB/s weights",
                bytes.len() as f64 / ms / 1e6
            ));
        }
        let wsb = c.alloc(rows * cols * 2);
        let asb = c.alloc(2048 * cols * 2);
        let ms = time(
            &|| {
                c.gpu
                    .kernels
                    .dequant_f16(ty, w.ptr, wsb.ptr, rows, cols, &s)
                    .unwrap()
            },
            20,
        );
        table.push(format!(
            "dequant {ty:?} {rows}x{cols}: {ms:.4} ms, {:.0} GB/s (read+write)",
            (bytes.len() + rows * cols * 2) as f64 / ms / 1e6
        ));
        for n in [32usize, 2048] {
            let sc = GemmScratch {
                weights: wsb.ptr,
                acts: asb.ptr,
            };
            let ms = time(
                &|| {
                    c.gpu
                        .matmul(
                            ty,
                            w.ptr,
                            cols,
                            0,
                            rows,
                            x.ptr,
                            n,
                            out.ptr,
                            rows,
                            None,
                            Some(sc),
                            false,
                        )
                        .unwrap()
                },
                10,
            );
            let msg = time(
                &|| {
                    c.gpu
                        .blas
                        .matmul(
                            pshard_kernels::cuda::GemmInput::F16,
                            wsb.ptr,
                            rows,
                            cols,
                            asb.ptr,
                            n,
                            out.ptr,
                            rows,
                        )
                        .unwrap()
                },
                10,
            );
            table.push(format!("matmul {ty:?} {rows}x{cols} n={n}: {ms:.3} ms total ({:.0} TFLOP/s), gemm alone {msg:.3} ms ({:.0} TFLOP/s)", 2.0 * (rows * cols * n) as f64 / ms / 1e9, 2.0 * (rows * cols * n) as f64 / msg / 1e9));
        }
        c.free(&[w, x, out, wsb, asb]);
    }
    for ((n, heads, kv, d), ty) in [
        (4096usize, 32usize, 8usize, 128usize),
        (512, 32, 8, 128),
        (4096, 8, 1, 256),
    ]
    .into_iter()
    .flat_map(|shape| KvType::ALL.map(|ty| (shape, ty)))
    {
        let p = AttnParams {
            n_head: heads,
            n_kv: kv,
            dk: d,
            dv: d,
            n_ctx: n,
            scale: 0.088,
            softcap: 0.0,
            window: 0,
            v_in_k: false,
        };
        let kc = c.alloc(n * ty.row_bytes(kv * d));
        let vc = c.alloc(n * ty.row_bytes(kv * d));
        let kf = c.up_f32(&randv(&mut r, n * kv * d, 1.0));
        let pos: Vec<i32> = (0..n as i32).collect();
        let pd = c.up_i32(&pos);
        c.gpu
            .kernels
            .kv_write(
                ty,
                kf.ptr,
                kv * d,
                kc.ptr,
                kv * d,
                pd.ptr,
                c.gpu.kernels.zero_seqs(n).unwrap(),
                n,
                n,
                &s,
            )
            .unwrap();
        c.gpu
            .kernels
            .kv_write(
                ty,
                kf.ptr,
                kv * d,
                vc.ptr,
                kv * d,
                pd.ptr,
                c.gpu.kernels.zero_seqs(n).unwrap(),
                n,
                n,
                &s,
            )
            .unwrap();
        let q = c.up_f32(&randv(&mut r, n * heads * d, 1.0));
        let out = c.alloc(n * heads * d * 4);
        let part = c.alloc(pshard_kernels::cuda::kernels::attention_scratch(&p, 1).max(4));
        let ms = time(
            &|| {
                c.gpu
                    .kernels
                    .attention(
                        &p,
                        q.ptr,
                        heads * d,
                        KvCells {
                            ty,
                            k: kc.ptr,
                            v: vc.ptr,
                            seq: c.gpu.kernels.zero_seqs(n.max(1)).unwrap(),
                            base: 0,
                        },
                        pd.ptr,
                        n,
                        out.ptr,
                        heads * d,
                        part.ptr,
                        None,
                        &s,
                    )
                    .unwrap()
            },
            5,
        );
        let flops = 4.0 * (n as f64 * n as f64 / 2.0) * d as f64 * heads as f64;
        table.push(format!(
            "flash attention {} n={n} heads={heads}/{kv} d={d}: {ms:.3} ms, {:.0} TFLOP/s (causal)",
            ty.name(),
            flops / ms / 1e9
        ));
        let last = c.up_i32(&[n as i32 - 1]);
        let ms = time(
            &|| {
                c.gpu
                    .kernels
                    .attention(
                        &p,
                        q.ptr,
                        heads * d,
                        KvCells {
                            ty,
                            k: kc.ptr,
                            v: vc.ptr,
                            seq: c.gpu.kernels.zero_seqs(n.max(1)).unwrap(),
                            base: 0,
                        },
                        last.ptr,
                        1,
                        out.ptr,
                        heads * d,
                        part.ptr,
                        None,
                        &s,
                    )
                    .unwrap()
            },
            50,
        );
        table.push(format!(
            "decode attention {} ctx={n} heads={heads}/{kv} d={d}: {ms:.4} ms, {:.0} GB/s KV",
            ty.name(),
            (2 * n * ty.row_bytes(kv * d)) as f64 / ms / 1e6
        ));
        c.free(&[kc, vc, kf, pd, q, out, part, last]);
    }
    for l in &table {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
    }
}

/// Decode attention cost against the number of visible keys in a large cache (run with
/// `--ignored`): the split-KV kernel sizes its splits from the position on the device, so a call
/// over L keys should cost a few µs plus L keys' bytes at HBM speed, independent of n_ctx.
#[test]
#[ignore = "benchmark; needs a CUDA GPU (run with --ignored)"]
fn cuda_bench_decode_attention() {
    let Some(c) = ctx("cuda_bench_decode_attention") else {
        return;
    };
    let mut r = rng("cuda_bench_decode_attention");
    let s = c.gpu.stream().clone();
    let n_ctx = 32768usize;
    let mut lines = Vec::new();
    for ((heads, kv, d), ty) in [(32usize, 8usize, 128usize), (4, 1, 256)]
        .into_iter()
        .flat_map(|shape| KvType::ALL.map(|ty| (shape, ty)))
    {
        let p = AttnParams {
            n_head: heads,
            n_kv: kv,
            dk: d,
            dv: d,
            n_ctx,
            scale: 1.0 / (d as f32).sqrt(),
            softcap: 0.0,
            window: 0,
            v_in_k: false,
        };
        let kc = c.alloc(n_ctx * ty.row_bytes(kv * d));
        let vc = c.alloc(n_ctx * ty.row_bytes(kv * d));
        let kf = c.up_f32(&randv(&mut r, n_ctx * kv * d, 1.0));
        let fill: Vec<i32> = (0..n_ctx as i32).collect();
        let fd = c.up_i32(&fill);
        for cache in [kc, vc] {
            c.gpu
                .kernels
                .kv_write(
                    ty,
                    kf.ptr,
                    kv * d,
                    cache.ptr,
                    kv * d,
                    fd.ptr,
                    c.gpu.kernels.zero_seqs(n_ctx).unwrap(),
                    n_ctx,
                    n_ctx,
                    &s,
                )
                .unwrap();
        }
        let q = c.up_f32(&randv(&mut r, heads * d, 1.0));
        let out = c.alloc(heads * d * 4);
        let part = c.alloc(pshard_kernels::cuda::kernels::attention_scratch(&p, 1).max(4));
        for len in [1usize, 128, 1024, 2048, 8192, 32768] {
            let pd = c.up_i32(&[len as i32 - 1]);
            let run = || {
                c.gpu
                    .kernels
                    .attention(
                        &p,
                        q.ptr,
                        heads * d,
                        KvCells {
                            ty,
                            k: kc.ptr,
                            v: vc.ptr,
                            seq: c.gpu.kernels.zero_seqs(1).unwrap(),
                            base: 0,
                        },
                        pd.ptr,
                        1,
                        out.ptr,
                        heads * d,
                        part.ptr,
                        None,
                        &s,
                    )
                    .unwrap()
            };
            run();
            c.sync();
            let (a, b) = (
                c.gpu.dev.event(true).unwrap(),
                c.gpu.dev.event(true).unwrap(),
            );
            let reps = 200;
            a.record(&s).unwrap();
            for _ in 0..reps {
                run();
            }
            b.record(&s).unwrap();
            b.synchronize().unwrap();
            let us = a.elapsed_ms(&b).unwrap() as f64 * 1e3 / reps as f64;
            let bytes = (2 * len * ty.row_bytes(kv * d)) as f64;
            lines.push(format!(
                "decode attention {} keys={len} n_ctx={n_ctx} heads={heads}/{kv} d={d}: {us:.1} µs, {:.0} GB/s KV",
                ty.name(),
                bytes / us / 1e3
            ));
            c.free(&[pd]);
        }
        c.free(&[kc, vc, kf, fd, q, out, part]);
    }
    for l in &lines {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
    }
}
