//! The `pshard` command line.

mod cmd;

use clap::{Parser, Subcommand};

/// pshard: run GGUF language models on GPUs whose memory is smaller than the model.
#[derive(Parser)]
#[command(name = "pshard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's architecture, hparams, quant mix, bytes per role and per layer.
    Inspect(cmd::inspect::Args),
    /// Write a GGUF with random weights and the exact layout of a real model.
    Synth(cmd::synth::Args),
    /// Plan placements per token tier under a VRAM budget and write the registry.
    Plan(cmd::plan::Args),
    /// Generate text from a prompt.
    Run(cmd::run::Args),
    /// Measure perplexity over a text file (llama-perplexity compatible).
    Perplexity(cmd::perplexity::Args),
    /// Show how a text tokenizes.
    Tokenize(cmd::tokenize::Args),
    /// Measure this machine with pshard's own kernels (cpu|gpu) or draw a profile's roofline (plot).
    Profile(cmd::profile::Args),
    /// Benchmark prompt processing and generation (llama-bench style).
    Bench(cmd::bench::Args),
    /// Serve the model over an OpenAI-compatible HTTP API (continuous batching).
    Serve(cmd::serve::Args),
    /// Chat with the model in the terminal.
    Chat(cmd::chat::Args),
}

fn main() {
    // llama.cpp spells some flags with one dash and several letters (`-ub`, `-cnv`, `-np`);
    // clap's short flags are one letter.
    let argv = std::env::args().map(|a| match a.as_str() {
        "-ub" => "--ub".to_string(),
        "-cnv" => "--conversation".to_string(),
        "-np" => "--parallel".to_string(),
        _ => a,
    });
    let cli = Cli::parse_from(argv);
    let result = match cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Plan(a) => cmd::plan::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Perplexity(a) => cmd::perplexity::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Profile(a) => cmd::profile::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Chat(a) => cmd::chat::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
