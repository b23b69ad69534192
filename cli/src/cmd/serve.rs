//! `pshard serve`: the OpenAI-compatible server (see the `pshard-server` crate).
//!
//! The port is bound first (`/health` answers 503 while the model loads), then the model is
//! loaded, the plans for `--parallel` sequences chosen and printed, and the scheduler started.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use pshard_server::http::{serve, Config, Ready};
use pshard_server::sched::Scheduler;
use pshard_tokenizer::Tokenizer;

use super::common::{
    chat_template, init_threads, load_model, make_engine_parallel, plan_report, ContextShiftArgs,
    EngineArgs,
};

/// Arguments of `pshard serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Engine placement, threading, plans.
    #[command(flatten)]
    engine: EngineArgs,
    /// Model file (GGUF; the first file of a split set).
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Sequences served at once (slots; llama-server's -np). The GPU plans are made for them.
    #[arg(long, visible_alias = "np", default_value_t = 4)]
    parallel: usize,
    /// Context per sequence (0 = the model's training context, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    ctx_size: usize,
    /// Address to listen on (default: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the one taken is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long = "api-key", env = "PSHARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests that may wait for a free sequence; more are answered 429.
    #[arg(long = "queue", default_value_t = 64)]
    queue: usize,
    /// Largest max_tokens a request may ask for (also the default).
    #[arg(long = "max-tokens", default_value_t = 4096)]
    max_tokens: usize,
    /// Largest request body in bytes.
    #[arg(long = "max-body-bytes", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Name of the model in /v1/models and responses (default: the file name without .gguf).
    #[arg(long)]
    alias: Option<String>,
    /// Chat template (Jinja source or a built-in name) instead of the model's.
    #[arg(long = "chat-template")]
    chat_template: Option<String>,
    /// Context shift (llama.cpp's --context-shift, --keep).
    #[command(flatten)]
    shift: ContextShiftArgs,
    /// Seconds a SIGINT/SIGTERM waits for requests in flight before stopping.
    #[arg(long = "drain-timeout", default_value_t = 30)]
    drain_timeout: u64,
}

/// Runs `pshard serve`.
pub fn run(a: Args) -> anyhow::Result<()> {
    init_threads(a.engine.threads);
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let stem = a
        .model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = a
        .alias
        .clone()
        .unwrap_or_else(|| stem.trim_end_matches(".gguf").to_string());
    let cfg = Config {
        model_id: id,
        model_aliases: vec![stem],
        api_key: a.api_key.clone(),
        max_queue: a.queue,
        max_tokens: a.max_tokens,
        max_body_bytes: a.max_body_bytes,
        drain: Duration::from_secs(a.drain_timeout),
        context_shift: a.shift.get(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serve: listening on http://{addr} (loading {})",
            a.model.display()
        );
        serve(cfg, listener, move || load(&a)).await
    })
}

/// Loads the model, makes the engine for `--parallel` sequences, prints its plan and starts the
/// scheduler.
fn load(a: &Args) -> anyhow::Result<Ready> {
    let model = load_model(&a.model)?;
    let tokenizer = Tokenizer::from_gguf(model.file().header())
        .with_context(|| format!("{}: reading the tokenizer", a.model.display()))?;
    let template = chat_template(&model, a.chat_template.as_deref())?;
    if template.is_none() {
        eprintln!("serve: the model has no chat template: /v1/chat/completions answers 400 (give --chat-template)");
    }
    let n_ctx = if a.ctx_size > 0 {
        a.ctx_size
    } else {
        model.spec.hparams.n_ctx_train.clamp(1, 4096)
    };
    let engine = make_engine_parallel(model, &a.model, n_ctx, "-c", &a.engine, a.parallel)?;
    eprintln!("{}", plan_report(&engine));
    let sched = Scheduler::spawn(engine, a.queue);
    eprintln!(
        "serve: {} sequences, {} tokens per evaluation at most",
        sched.info.n_seq, sched.info.step_tokens
    );
    Ok(Ready {
        sched,
        tokenizer,
        template,
    })
}
