//! `pshard perplexity`: llama-perplexity-compatible perplexity over a text file.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use pshard_runtime::session::{perplexity, PERPLEXITY_MIN_CTX};
use pshard_tokenizer::Tokenizer;

use super::common::{init_threads, load_model, read_text, EngineArgs};

/// Arguments of `pshard perplexity`.
#[derive(clap::Args)]
pub struct Args {
    /// Engine placement and threading.
    #[command(flatten)]
    engine: EngineArgs,
    /// Model file.
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Text file to score (`-` for standard input).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Context (chunk) size: at least 3, at most the model's training context.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, value_parser = crate::args::ctx_size)]
    ctx_size: usize,
    /// Score at most this many chunks (0 = all).
    #[arg(long = "chunks", default_value_t = 0)]
    chunks: usize,
}

impl Args {
    /// The checks that need no file.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.ctx_size < PERPLEXITY_MIN_CTX {
            bail!(
                "-c {}: perplexity needs a context of at least {PERPLEXITY_MIN_CTX} (each chunk scores its second half)",
                self.ctx_size
            );
        }
        self.engine.llama.check()
    }
}

/// Runs `pshard perplexity`.
pub fn run(args: Args) -> anyhow::Result<()> {
    init_threads(args.engine.threads)?;
    let text = read_text(&args.file)?;
    let model = load_model(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(model.file().header())
        .with_context(|| format!("{}: reading the tokenizer", args.model.display()))?;
    let t0 = Instant::now();
    let mut tokens = tokenizer.encode(&text, true, false);
    eprintln!(
        "tokenized {} bytes into {} tokens in {:.2} s",
        text.len(),
        tokens.len(),
        t0.elapsed().as_secs_f64()
    );
    let n_ctx = args.ctx_size;
    if args.chunks > 0 {
        // Keep the two-chunk minimum when only one chunk is asked for.
        tokens.truncate(args.chunks.max(2).saturating_mul(n_ctx));
    }
    let bos = if tokenizer.add_bos() {
        tokenizer.bos()
    } else {
        None
    };
    let mut engine = super::common::make_engine(model, &args.model, n_ctx, "-c", &args.engine)?;
    let n_chunks = tokens.len() / n_ctx;
    eprintln!("calculating perplexity over {n_chunks} chunks, n_ctx={n_ctx}");
    let t1 = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let result = perplexity(&mut engine, &tokens, n_ctx, bos, &mut |i, ppl| {
        if write_err.is_none() {
            if let Err(e) = write!(out, "[{}]{:.4},", i + 1, ppl).and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing output");
    }
    writeln!(out)?;
    writeln!(
        out,
        "Final estimate: PPL = {:.4} +/- {:.5}",
        result.ppl, result.err
    )?;
    let secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "{} chunks, {} tokens in {:.2} s ({:.1} t/s)",
        n_chunks,
        n_chunks * n_ctx,
        secs,
        (n_chunks * n_ctx) as f64 / secs.max(1e-9)
    );
    if args.engine.profile {
        super::common::print_op_profile(&engine);
    }
    Ok(())
}
