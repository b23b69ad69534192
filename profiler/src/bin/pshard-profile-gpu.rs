//! `pshard-profile-gpu`: measures this machine's GPU with pshard's CUDA kernels and writes a profile.

use clap::Parser;

/// Measure the GPU half of this machine (HBM, matmul paths, attention, copies) into a TOML profile.
#[derive(Parser)]
#[command(name = "pshard-profile-gpu", version)]
struct Cli {
    #[command(flatten)]
    args: pshard_profiler::cli::GpuArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    pshard_profiler::cli::gpu(&cli.args).map(|_| ())
}
