//! `pshard run`: generate text from a prompt, streaming UTF-8-safe output.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use pshard_runtime::sampler::Sampler;
use pshard_runtime::session::{generate, StopReason};
use pshard_tokenizer::chat::ChatMessage;
use pshard_tokenizer::{StreamDecoder, Tokenizer};

use super::common::{
    chat_template, init_threads, load_model, no_template, read_text, special_text,
    ContextShiftArgs, EngineArgs, SamplingArgs,
};
use crate::args::{self, TokenLimit};

/// Arguments of `pshard run` (llama.cpp-style flags).
#[derive(clap::Args)]
pub struct Args {
    /// Engine placement and threading.
    #[command(flatten)]
    engine: EngineArgs,
    /// Model file (GGUF; the first file of a split set).
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Prompt text.
    #[arg(short = 'p', long, conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file (`-` for standard input).
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Tokens to generate (-1: until end of generation or a full context).
    #[arg(short = 'n', long = "n-predict", default_value = "128", value_parser = args::token_limit, allow_negative_numbers = true)]
    n_predict: TokenLimit,
    /// Context size (0 = the model's training context, capped at 4096; at most the training context).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0, value_parser = args::ctx_size)]
    ctx_size: usize,
    /// Sampling.
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Apply the model's chat template to the prompt (as a user message).
    #[arg(long)]
    chat: bool,
    /// Chat template (Jinja) to use instead of the model's.
    #[arg(long = "chat-template")]
    chat_template: Option<String>,
    /// System message for --chat.
    #[arg(long = "system", short = 'y')]
    system: Option<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long = "ignore-eos")]
    ignore_eos: bool,
    /// Interactive chat (llama.cpp's `-cnv`): runs `pshard chat` with these flags.
    #[arg(long = "conversation")]
    conversation: bool,
    /// Context shift (llama.cpp's --context-shift, --keep).
    #[command(flatten)]
    shift: ContextShiftArgs,
    /// Do not echo the prompt before the generated text.
    #[arg(long = "no-display-prompt")]
    no_display_prompt: bool,
}

impl Args {
    /// The checks that need no file.
    pub fn check(&self) -> anyhow::Result<()> {
        self.engine.llama.check()
    }
}

/// Runs `pshard run`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.conversation {
        if args.prompt.is_some() || args.file.is_some() {
            bail!("-cnv starts an interactive chat: give the first message at its prompt, not with -p/-f");
        }
        return super::chat::run(super::chat::Args {
            engine: args.engine,
            model: args.model,
            ctx_size: args.ctx_size,
            n_predict: match args.n_predict {
                TokenLimit::Unlimited => 0,
                TokenLimit::Tokens(n) => n,
            },
            sampling: args.sampling,
            shift: args.shift,
            system: args.system,
            chat_template: args.chat_template,
        });
    }
    init_threads(args.engine.threads);
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text(f).context("reading the prompt")?,
        (None, None) => bail!("give a prompt with -p TEXT or -f FILE (-f - reads standard input)"),
    };
    let model = load_model(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(model.file().header())
        .with_context(|| format!("{}: reading the tokenizer", args.model.display()))?;
    let chat = args.chat || args.chat_template.is_some();
    let tokens = if chat {
        let template = chat_template(&model, args.chat_template.as_deref())?
            .ok_or_else(|| no_template(&args.model))?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::new("system", s.clone()));
        }
        messages.push(ChatMessage::new("user", prompt.clone()));
        let rendered = template
            .apply(
                &messages,
                true,
                &special_text(&tokenizer, tokenizer.bos()),
                &special_text(&tokenizer, tokenizer.eos()),
            )
            .context("applying the chat template")?;
        tokenizer.encode_chat_prompt(&rendered)
    } else {
        tokenizer.encode(&prompt, true, true)
    };
    if tokens.is_empty() {
        bail!("the prompt tokenized to nothing");
    }
    let n_ctx = if args.ctx_size > 0 {
        args.ctx_size
    } else {
        model.spec.hparams.n_ctx_train.min(4096)
    };
    if tokens.len() + 1 > n_ctx {
        bail!(
            "the prompt has {} tokens but the context holds {n_ctx} (raise -c)",
            tokens.len()
        );
    }
    let mut engine = super::common::make_engine(model, &args.model, n_ctx, "-c", &args.engine)?;
    let mut sampler = Sampler::new(args.sampling.params());
    if args.engine.verbose {
        eprintln!("seed: {}", sampler.seed());
    }
    let mut out = std::io::stdout().lock();
    if !args.no_display_prompt && !chat {
        write!(out, "{prompt}")?;
        out.flush()?;
    }
    let mut decoder = StreamDecoder::new(true);
    let ignore_eos = args.ignore_eos;
    let eog_ids: Vec<u32> = tokenizer
        .eog_ids()
        .into_iter()
        .filter(|&t| (t as usize) < engine.model.spec.hparams.n_vocab)
        .collect();
    let is_eog = |t: u32| !ignore_eos && tokenizer.is_eog(t);
    let mut write_err = None;
    let shift_keep = args
        .shift
        .get()
        .map(|s| s.keep_for(&tokens, tokenizer.bos()));
    let stats = generate(
        &mut engine,
        &tokens,
        args.n_predict.get(),
        shift_keep,
        &mut |logits, history| {
            if ignore_eos {
                // As llama.cpp: end-of-generation tokens can't be sampled at all.
                let mut masked = logits.to_vec();
                for &t in &eog_ids {
                    masked[t as usize] = f32::NEG_INFINITY;
                }
                sampler.sample(&masked, history)
            } else {
                sampler.sample(logits, history)
            }
        },
        &is_eog,
        &mut |tok| {
            if is_eog(tok) {
                return true;
            }
            let piece = decoder.push(&tokenizer, tok);
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e);
                return false;
            }
            true
        },
    )?;
    if let Some(e) = write_err {
        return Err(e).context("writing output");
    }
    let rest = decoder.finish();
    out.write_all(rest.as_bytes())?;
    writeln!(out)?;
    out.flush()?;
    if stats.stop == StopReason::ContextFull {
        eprintln!(
            "generation stopped: the context of {n_ctx} tokens is full ({} prompt + {} generated; -c sets it, up to the model's {}; --context-shift keeps going)",
            stats.prompt_tokens,
            stats.gen_tokens,
            engine.model.spec.hparams.n_ctx_train
        );
    }
    if stats.shifts > 0 {
        eprintln!(
            "context shifts: {} (kept the first {} tokens each time)",
            stats.shifts,
            shift_keep.unwrap_or(0)
        );
    }
    eprintln!(
        "prompt: {} tokens in {:.2} s ({:.1} t/s) | generation: {} tokens in {:.2} s ({:.1} t/s)",
        stats.prompt_tokens,
        stats.prompt_secs,
        stats.prompt_tokens as f64 / stats.prompt_secs.max(1e-9),
        stats.gen_tokens,
        stats.gen_secs,
        stats.gen_tokens as f64 / stats.gen_secs.max(1e-9),
    );
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!("{}", super::common::tier_report(&engine));
    eprintln!(
        "memory: RSS {:.0} MiB, {}{}",
        super::common::rss_bytes().map_or(f64::NAN, mib),
        super::common::kv_line(&engine),
        match engine.device_measured_bytes() {
            Some(b) => format!(", VRAM measured {:.0} MiB", mib(b)),
            None => String::new(),
        }
    );
    if args.engine.profile {
        super::common::print_op_profile(&engine);
    }
    Ok(())
}
