//! Errors of the CUDA backend. Every failure (no driver, no device, a failed driver call, a VRAM
//! budget overrun, a compile error) is a value, never a panic.

use std::fmt;

/// An error of the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaError {
    /// A CUDA shared library could not be loaded (no driver or toolkit on this machine).
    MissingLibrary {
        /// Library name, e.g. `"libcuda"`.
        lib: &'static str,
    },
    /// The driver loaded but reports no usable device with this ordinal.
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// A driver API call failed.
    Driver {
        /// What was being done.
        call: &'static str,
        /// The driver's error text.
        err: String,
    },
    /// cuBLAS returned an error status.
    Blas {
        /// What was being done.
        call: &'static str,
        /// The status value.
        status: String,
    },
    /// An allocation did not fit the VRAM budget or its region.
    OutOfVram {
        /// What did not fit, e.g. `"weights: blk.3.ffn_up.weight"`.
        what: String,
        /// Bytes requested.
        requested: u64,
        /// Bytes still available where it was requested.
        available: u64,
        /// The limit that was hit (region capacity or arena budget).
        limit: u64,
    },
    /// NVRTC failed to compile a kernel source.
    Compile {
        /// Source file name.
        file: &'static str,
        /// Compiler log.
        log: String,
    },
    /// A kernel is missing from a loaded module or an argument is invalid.
    Invalid(String),
    /// Disk I/O of the kernel cache failed.
    Io(String),
}

impl CudaError {
    /// Whether this says there is no GPU here at all — no driver library, or a driver that sees no
    /// device — as opposed to a GPU that is present but failed (a kernel that does not compile, a
    /// missing toolkit library, a module that does not load). Tests skip on the first kind only.
    pub fn is_no_gpu(&self) -> bool {
        match self {
            CudaError::MissingLibrary { lib } => *lib == "libcuda",
            CudaError::NoDevice { count, .. } => *count == 0,
            CudaError::Driver { err, .. } => err.contains("CUDA_ERROR_NO_DEVICE"),
            _ => false,
        }
    }

    /// A few words for a one-line device report (the full text says more).
    pub fn short_reason(&self) -> String {
        match self {
            CudaError::MissingLibrary { lib: "libcuda" } => "no CUDA driver found".into(),
            CudaError::MissingLibrary { lib } => format!("{lib} not found"),
            CudaError::NoDevice { ordinal, count } if *count > 0 => {
                format!("no CUDA device {ordinal}; {count} found")
            }
            e if e.is_no_gpu() => "no CUDA device found".into(),
            _ => "the GPU could not be used; -v says why".into(),
        }
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::MissingLibrary { lib } => write!(
                f,
                "CUDA is not available: the {lib} shared library could not be loaded (no NVIDIA driver or CUDA \
                 toolkit here, or it is not on LD_LIBRARY_PATH)"
            ),
            CudaError::NoDevice { ordinal, count } => {
                write!(f, "no CUDA device {ordinal}: the driver reports {count} device(s)")
            }
            CudaError::Driver { call, err } => write!(f, "CUDA driver call failed while {call}: {err}"),
            CudaError::Blas { call, status } => write!(f, "cuBLAS failed while {call}: {status}"),
            CudaError::OutOfVram { what, requested, available, limit } => write!(
                f,
                "VRAM budget exceeded: {what} needs {} but only {} of {} are free",
                fmt_bytes(*requested),
                fmt_bytes(*available),
                fmt_bytes(*limit)
            ),
            CudaError::Compile { file, log } => write!(f, "NVRTC could not compile {file}:\n{log}"),
            CudaError::Invalid(s) => write!(f, "{s}"),
            CudaError::Io(s) => write!(f, "kernel cache: {s}"),
        }
    }
}

impl std::error::Error for CudaError {}

/// Result alias of the CUDA backend.
pub type CudaResult<T> = Result<T, CudaError>;

/// Formats a byte count in MiB with two decimals (KiB below 1 MiB).
pub fn fmt_bytes(b: u64) -> String {
    if b < 1 << 20 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Maps a driver error of call `call` into a [`CudaError`].
pub(crate) fn drv<T>(
    call: &'static str,
    r: Result<T, cudarc::driver::DriverError>,
) -> CudaResult<T> {
    r.map_err(|e| CudaError::Driver {
        call,
        err: format!("{e:?}"),
    })
}

/// Maps a raw `CUresult` into a [`CudaError`].
pub(crate) fn check(call: &'static str, r: cudarc::driver::sys::CUresult) -> CudaResult<()> {
    drv(call, r.result())
}
