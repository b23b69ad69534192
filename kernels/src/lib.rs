//! pshard kernels: quant block formats, CPU kernels (SIMD with run-time detection, scalar fallback)
//! and the CUDA backend (NVRTC-compiled `.cu` sources, loaded dynamically).

pub mod cuda;
pub mod gemm;
pub mod kv;
pub mod matmul;
pub mod moe;
pub mod ops;
pub mod pool;
pub mod quant;

pub use matmul::KernelError;
