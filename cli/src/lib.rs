//! The `pshard` command line as a library: argument handling (llama.cpp's habits included, see
//! [`compat`]) and the subcommands. `main.rs` runs [`parse`] and [`run`]; the command-line fuzz
//! target drives [`parse`] and the checks that need no file.

pub mod args;
pub mod cmd;
pub mod compat;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

/// pshard: run GGUF language models on GPUs whose memory is smaller than the model.
#[derive(Parser)]
#[command(name = "pshard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
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

/// Why a command line was not accepted.
#[derive(Debug)]
pub enum ParseError {
    /// A llama.cpp flag pshard does not have ([`compat::rewrite`]).
    Compat(anyhow::Error),
    /// clap's error (also `--help` and `--version`, which clap reports as errors).
    Clap(clap::Error),
}

/// Parses a command line (program name first) after rewriting llama.cpp's spellings.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Cli, ParseError> {
    let argv = compat::rewrite(argv).map_err(ParseError::Compat)?;
    Cli::try_parse_from(argv).map_err(ParseError::Clap)
}

/// Checks a parsed command line as far as that needs no file (the fuzz target's second step).
pub fn check(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run(a) => a.check(),
        Command::Perplexity(a) => a.check(),
        Command::Bench(a) => a.check(),
        _ => Ok(()),
    }
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    check(&cli)?;
    match cli.command {
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
    }
}

/// Whether an error is the reader of our output going away (EPIPE: `pshard … | head`). That is a
/// normal end: the output was wanted only so far.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
