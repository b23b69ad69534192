//! pshard profiler: measures one machine with pshard's own kernels and writes it as a planner
//! [`Profile`](pshard_planner::Profile) (TOML, see `profile-format.md`).
//!
//! - [`cpu::run_cpu`]: DRAM bandwidth, quantized matmuls, attention, CPU while PCIe copies run.
//! - [`gpu::run_gpu`]: HBM bandwidth, both GPU matmul paths, attention, copies, overheads.
//! - [`stats`]: repetitions until stable, median with a 95% interval, CV, noisy flag.
//! - [`plot::roofline_svg`]: measured matmul points against the bandwidth and compute roofs.
//! - [`summary::summary_table`]: the table printed after a run.

#![warn(missing_docs)]

pub mod cli;
pub mod cpu;
pub mod gpu;
pub mod machine;
pub mod plot;
pub mod progress;
pub mod stats;
pub mod summary;

pub use cpu::{run_cpu, CpuConfig};
pub use gpu::{run_gpu, GpuConfig};
