//! CUDA kernels against CPU references on random inputs, a module per concern (matmul, ops,
//! attention, moe, device; bench for the benchmarks). The tests that need a GPU are ignored by
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

mod attention;
mod bench;
mod device;
mod matmul;
mod moe;
mod ops;

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

/// A benchmark's result lines on stderr, each marked `BENCH` for scripts/gpu-check.sh to collect.
fn print_bench(lines: &[String]) {
    for l in lines {
        let _ = writeln!(std::io::stderr(), "BENCH {l}");
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
