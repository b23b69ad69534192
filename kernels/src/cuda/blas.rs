//! cuBLAS GEMM for prefill matmuls: f16 (or bf16) inputs, f32 accumulation and f32 output, on
//! tensor cores. The handle's workspace is an arena buffer, like every other device allocation.

use super::arena::DevBuf;
use super::device::GpuDevice;
use super::error::{CudaError, CudaResult};
use cudarc::cublas::sys as bs;
use cudarc::driver::CudaStream;
use std::ffi::c_void;

/// Workspace bytes given to cuBLAS (its documented recommendation for Hopper is 32 MiB).
pub const BLAS_WORKSPACE: u64 = 32 << 20;

/// Element type of the GEMM inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmInput {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

/// A cuBLAS handle bound to the compute stream with an arena workspace.
pub struct Blas {
    handle: bs::cublasHandle_t,
    workspace: DevBuf,
}

// SAFETY: the handle is used from one thread at a time (&mut-free API but callers serialise on the
// GPU thread); cuBLAS handles may move between threads.
unsafe impl Send for Blas {}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas")
            .field("workspace", &self.workspace)
            .finish()
    }
}

fn st(call: &'static str, s: bs::cublasStatus_t) -> CudaResult<()> {
    if s == bs::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Blas {
            call,
            status: format!("{s:?}"),
        })
    }
}

/// Whether the cuBLAS library can be loaded.
pub fn blas_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { bs::is_culib_present() }
}

impl Blas {
    /// Creates a handle on `stream` with `workspace` (at least [`BLAS_WORKSPACE`] bytes is best).
    pub fn new(dev: &GpuDevice, stream: &CudaStream, workspace: DevBuf) -> CudaResult<Blas> {
        if !blas_present() {
            return Err(CudaError::MissingLibrary { lib: "libcublas" });
        }
        dev.bind()?;
        let mut handle: bs::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the stream and workspace outlive the handle (the caller
        // keeps the device and the arena buffer alive while the Blas exists).
        unsafe {
            st("creating the handle", bs::cublasCreate_v2(&mut handle))?;
            let b = Blas { handle, workspace };
            st(
                "setting the stream",
                bs::cublasSetStream_v2(handle, stream.cu_stream() as _),
            )?;
            st(
                "setting the workspace",
                bs::cublasSetWorkspace_v2(
                    handle,
                    workspace.ptr as *mut c_void,
                    workspace.bytes as usize,
                ),
            )?;
            Ok(b)
        }
    }

    /// The workspace buffer (free it after dropping the handle).
    pub fn workspace(&self) -> DevBuf {
        self.workspace
    }

    /// `out[t, r] = Σ_c w[r, c] · x[t, c]` for `rows × cols` row-major weights `w` and `n × cols`
    /// row-major activations `x`, both `input`-typed; `out` is f32 with row stride `ldo`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        input: GemmInput,
        w: u64,
        rows: usize,
        cols: usize,
        x: u64,
        n: usize,
        out: u64,
        ldo: usize,
    ) -> CudaResult<()> {
        let ty = match input {
            GemmInput::F16 => bs::cudaDataType_t::CUDA_R_16F,
            GemmInput::Bf16 => bs::cudaDataType_t::CUDA_R_16BF,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let too_big = |v: usize| v > i32::MAX as usize;
        if too_big(rows) || too_big(cols) || too_big(n) || too_big(ldo) {
            return Err(CudaError::Invalid(format!(
                "GEMM of {rows}x{cols} by {n} rows exceeds cuBLAS's 32-bit sizes"
            )));
        }
        // Column-major view: C(rows × n) = W^T-as-stored (rows × cols) · X (cols × n).
        // SAFETY: pointers are device addresses of arena buffers sized by the caller for these
        // shapes; alpha/beta live on the stack for the duration of the call (host pointer mode).
        unsafe {
            st(
                "running a GEMM",
                bs::cublasGemmEx(
                    self.handle,
                    bs::cublasOperation_t::CUBLAS_OP_T,
                    bs::cublasOperation_t::CUBLAS_OP_N,
                    rows as i32,
                    n as i32,
                    cols as i32,
                    &alpha as *const f32 as *const c_void,
                    w as *const c_void,
                    ty,
                    cols as i32,
                    x as *const c_void,
                    ty,
                    cols as i32,
                    &beta as *const f32 as *const c_void,
                    out as *mut c_void,
                    bs::cudaDataType_t::CUDA_R_32F,
                    ldo as i32,
                    bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
            )
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by us and is destroyed once.
        unsafe {
            let _ = bs::cublasDestroy_v2(self.handle);
        }
    }
}
