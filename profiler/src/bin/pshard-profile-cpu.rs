//! `pshard-profile-cpu`: measures this machine's CPU with pshard's own kernels and writes a profile.

use clap::Parser;

/// Measure the CPU half of this machine (DRAM, quantized matmuls, attention) into a TOML profile.
#[derive(Parser)]
#[command(name = "pshard-profile-cpu", version)]
struct Cli {
    #[command(flatten)]
    args: pshard_profiler::cli::CpuArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    pshard_profiler::cli::cpu(&cli.args).map(|_| ())
}
