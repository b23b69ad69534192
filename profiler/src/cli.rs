//! Command-line front ends shared by the `pshard-profile-*` binaries and `pshard profile`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pshard_planner::profile::ProfileKind;
use pshard_planner::Profile;

use crate::{plot, summary};

/// Options of a CPU profile run.
#[derive(clap::Args, Debug, Clone)]
pub struct CpuArgs {
    /// Short run (under 30 s on 2 cores): fewer types, shapes, batches and contexts.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the profile (default: ~/.cache/pshard/profiles/cpu.toml, where `pshard run`,
    /// `bench`, `serve` and `plan` look for it).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Largest thread count to measure (default or 0: all hardware threads).
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
    /// Do not probe for a GPU (skips the CPU-while-PCIe measurements).
    #[arg(long)]
    pub no_gpu: bool,
    /// Seed of the random weights and activations.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Also draw the roofline chart of the new profile into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Options of a GPU profile run.
#[derive(clap::Args, Debug, Clone)]
pub struct GpuArgs {
    /// Short run: fewer types, shapes, batches, sizes and contexts.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the profile (default: ~/.cache/pshard/profiles/gpu.toml, where `pshard run`,
    /// `bench`, `serve` and `plan` look for it).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Also draw the roofline chart of the new profile into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Options of `profile plot`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// The profile to draw.
    pub profile: PathBuf,
    /// The SVG file to write.
    #[arg(long, short = 'o', default_value = "roofline.svg")]
    pub output: PathBuf,
}

/// Hardware threads of this machine, as the OS reports them to this process (the kernels' pool's
/// count for `-t 0`).
pub fn hardware_threads() -> usize {
    pshard_kernels::pool::available_cores()
}

/// Parses a thread count: 0 (all hardware threads) or 1..=[`hardware_threads`]. More threads than
/// the machine runs at once only take turns on its cores (2000 threads on 2 cores made a run with
/// rayon's pools crawl without end); the count then goes to [`pshard_kernels::pool::set_threads`].
pub fn thread_count(s: &str) -> std::result::Result<usize, String> {
    let hw = hardware_threads();
    match s.parse::<usize>() {
        Ok(n) if n <= hw => Ok(n),
        _ => Err(format!(
            "expected 0 (all) or a thread count from 1 to {hw}, the hardware threads of this machine"
        )),
    }
}

/// Serialises, checks by reading back through the planner's reader, and writes a profile.
pub fn write_profile(p: &Profile, path: &Path) -> Result<()> {
    let text = p.to_toml_string();
    Profile::from_toml_str(&text, &path.display().to_string())
        .context("the measured profile does not pass the reader's checks (profiler bug)")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let header = "# pshard machine profile (see profile-format.md); written by the profiler\n";
    std::fs::write(path, format!("{header}{text}"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs a CPU profile, writes it and prints the summary.
pub fn cpu(a: &CpuArgs) -> Result<Profile> {
    let p = crate::run_cpu(&crate::CpuConfig {
        quick: a.quick,
        threads: a.threads.filter(|&t| t > 0),
        seed: a.seed,
        progress: !a.no_progress,
        use_gpu: !a.no_gpu,
    })?;
    finish(
        &p,
        &output_path(&a.output, ProfileKind::Cpu),
        a.plot.as_deref(),
    )?;
    Ok(p)
}

/// `-o` when given, else the machine's profile in the user cache, else (no `HOME`) `KIND-profile.toml`
/// in the current directory.
fn output_path(flag: &Option<PathBuf>, kind: ProfileKind) -> PathBuf {
    flag.clone()
        .or_else(|| kind.cache_path())
        .unwrap_or_else(|| PathBuf::from(format!("{}-profile.toml", kind.name())))
}

/// Runs a GPU profile, writes it and prints the summary.
pub fn gpu(a: &GpuArgs) -> Result<Profile> {
    let p = crate::run_gpu(&crate::GpuConfig {
        quick: a.quick,
        ordinal: a.device,
        seed: a.seed,
        progress: !a.no_progress,
        cache_dir: None,
    })?;
    finish(
        &p,
        &output_path(&a.output, ProfileKind::Gpu),
        a.plot.as_deref(),
    )?;
    Ok(p)
}

fn finish(p: &Profile, output: &Path, svg: Option<&Path>) -> Result<()> {
    write_profile(p, output)?;
    // Written with `?`, not `println!`: a closed pipe is an error the caller sees, not a panic.
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", summary::summary_table(p))?;
    writeln!(out, "wrote {}", output.display())?;
    if let Some(svg) = svg {
        plot::roofline_svg(p, svg)?;
        writeln!(out, "wrote {}", svg.display())?;
    }
    Ok(())
}

/// Reads a profile and draws its roofline chart.
pub fn plot(a: &PlotArgs) -> Result<()> {
    let p = Profile::load(&a.profile)?;
    if same_file(&a.profile, &a.output) {
        anyhow::bail!(
            "{}: the chart would overwrite the profile it is drawn from; give another -o",
            a.output.display()
        );
    }
    plot::roofline_svg(&p, &a.output)?;
    writeln!(std::io::stdout().lock(), "wrote {}", a.output.display())?;
    Ok(())
}

/// Whether two paths name one existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_go_where_the_planner_reads_them() {
        let given = PathBuf::from("elsewhere/p.toml");
        assert_eq!(output_path(&Some(given.clone()), ProfileKind::Cpu), given);
        for kind in [ProfileKind::Cpu, ProfileKind::Gpu] {
            let p = output_path(&None, kind);
            match kind.cache_path() {
                // The same file `pshard run`/`bench`/`plan` load without flags.
                Some(cached) => {
                    assert_eq!(p, cached);
                    let tail = format!(".cache/pshard/profiles/{}.toml", kind.name());
                    assert!(p.ends_with(&tail), "{}", p.display());
                }
                None => assert_eq!(p, PathBuf::from(format!("{}-profile.toml", kind.name()))),
            }
        }
    }
}
