//! Draws the roofline chart of a profile: `cargo run -p pshard-profiler --example plot -- PROFILE
//! OUT.svg` (the same as `pshard profile plot PROFILE -o OUT.svg`).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(profile), Some(output)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: plot PROFILE OUT.svg");
    };
    pshard_profiler::cli::plot(&pshard_profiler::cli::PlotArgs {
        profile: PathBuf::from(profile),
        output: PathBuf::from(output),
    })
}
