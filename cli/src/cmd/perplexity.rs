//! `pshard perplexity`: llama-perplexity-compatible perplexity over a text file.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use pshard_runtime::session::perplexity;
use pshard_tokenizer::Tokenizer;

use super::common::{init_threads, load_model, EngineArgs};

/// Arguments of `pshard perplexity`.
#[derive(clap::Args)]
pub struct Args {
    /// Engine placement and threading.
    #[command(flatten)]
    engine: EngineArgs,
    /// Model file.
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Text file to score.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Context (chunk) size.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx_size: usize,
    /// Score at most this many chunks (0 = all).
    #[arg(long = "chunks", default_value_t = 0)]
    chunks: usize,
}

/// Runs `pshard perplexity`.
pub fn run(args: Args) -> anyhow::Result<()> {
    init_threads(args.engine.threads)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
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
    if args.chunks > 0 {
        tokens.truncate(args.chunks * args.ctx_size);
        // Keep the two-chunk minimum when only one chunk is asked for.
        if args.chunks == 1 && tokens.len() < 2 * args.ctx_size {
            tokens = tokenizer.encode(&text, true, false);
            tokens.truncate(2 * args.ctx_size);
        }
    }
    let bos = if tokenizer.add_bos() {
        tokenizer.bos()
    } else {
        None
    };
    let mut engine = super::common::make_engine(model, &args.model, args.ctx_size, &args.engine)?;
    let n_chunks = tokens.len() / args.ctx_size;
    eprintln!(
        "calculating perplexity over {n_chunks} chunks, n_ctx={}",
        args.ctx_size
    );
    let t1 = Instant::now();
    let mut out = std::io::stdout().lock();
    let result = perplexity(&mut engine, &tokens, args.ctx_size, bos, &mut |i, ppl| {
        let _ = write!(out, "[{}]{:.4},", i + 1, ppl);
        let _ = out.flush();
    })?;
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
        n_chunks * args.ctx_size,
        secs,
        (n_chunks * args.ctx_size) as f64 / secs.max(1e-9)
    );
    if args.engine.profile {
        super::common::print_op_profile(&engine);
    }
    Ok(())
}
