//! `pshard profile cpu|gpu [--quick] [--output P]`: measure this machine with pshard's own kernels
//! into a TOML profile; `pshard profile plot PROFILE -o roofline.svg`: draw one.

use pshard_profiler::cli::{CpuArgs, GpuArgs, PlotArgs};

/// Arguments of `pshard profile`.
#[derive(clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub what: What,
}

/// `pshard profile` subcommands.
#[derive(clap::Subcommand)]
pub enum What {
    /// Measure the CPU half (DRAM, quantized matmuls, attention; CPU while PCIe copies run when a
    /// GPU is present).
    Cpu(CpuArgs),
    /// Measure the GPU half (HBM, GEMV and GEMM paths, attention, copies, overheads).
    Gpu(GpuArgs),
    /// Draw a profile's measured matmul points against its bandwidth and compute roofs (SVG).
    Plot(PlotArgs),
}

/// Runs `pshard profile`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Cpu(a) => pshard_profiler::cli::cpu(&a).map(|_| ()),
        What::Gpu(a) => pshard_profiler::cli::gpu(&a).map(|_| ()),
        What::Plot(a) => pshard_profiler::cli::plot(&a),
    }
}
