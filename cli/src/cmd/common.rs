//! Helpers shared by the commands that load and run a model.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use pshard_runtime::model::Model;

/// Sets the size of the global rayon pool (0 = one per core).
pub fn init_threads(threads: usize) -> anyhow::Result<()> {
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(())
}

/// Opens a model, showing a progress bar while its pages are read in (big models take a while).
pub fn load_model(path: &Path) -> anyhow::Result<Model> {
    let t0 = Instant::now();
    let model = Model::open(path).with_context(|| format!("loading {}", path.display()))?;
    let total = model.file().tensor_data_bytes();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "loading {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Touch every page once so the first token's timing measures compute, not page faults.
    let mut checksum = 0u8;
    for i in 0..model.file().tensors().len() {
        let data = model.file().tensor_data(i);
        for chunk in data.chunks(1 << 20) {
            checksum ^= chunk.iter().step_by(4096).fold(0u8, |a, b| a ^ b);
            bar.inc(chunk.len() as u64);
        }
    }
    std::hint::black_box(checksum);
    bar.finish_and_clear();
    eprintln!(
        "loaded {} ({}, {} layers, {:.2} GiB) in {:.2} s",
        model.spec.name,
        model.spec.arch.gguf_name(),
        model.spec.layers.len(),
        total as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// Prints the seconds spent per op kind (`--profile`).
pub fn print_op_profile(engine: &pshard_runtime::engine::Engine) {
    let times = engine.op_seconds();
    let total: f64 = times.iter().map(|t| t.1).sum();
    eprintln!("time per op kind ({total:.2} s in all):");
    for (kind, secs) in times {
        eprintln!("  {kind:<14} {secs:8.3} s  {:5.1}%", 100.0 * secs / total.max(1e-12));
    }
}
