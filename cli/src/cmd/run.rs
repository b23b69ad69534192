//! `pshard run`: generate text from a prompt, streaming UTF-8-safe output.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use pshard_runtime::sampler::{Sampler, SamplerParams};
use pshard_runtime::session::generate;
use pshard_tokenizer::chat::{ChatMessage, ChatTemplate};
use pshard_tokenizer::{StreamDecoder, Tokenizer};

use super::common::{init_threads, load_model, EngineArgs};

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
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Context size (0 = the model's training context, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    ctx_size: usize,
    /// Sampling temperature (≤ 0: greedy).
    #[arg(long, default_value_t = SamplerParams::default().temperature)]
    temp: f32,
    /// Top-k (0 = off).
    #[arg(long = "top-k", default_value_t = SamplerParams::default().top_k)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long = "top-p", default_value_t = SamplerParams::default().top_p)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long = "min-p", default_value_t = SamplerParams::default().min_p)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long = "repeat-penalty", default_value_t = SamplerParams::default().repeat_penalty)]
    repeat_penalty: f32,
    /// Tokens the repetition penalty looks back over.
    #[arg(long = "repeat-last-n", default_value_t = SamplerParams::default().repeat_last_n)]
    repeat_last_n: usize,
    /// Random seed (default: random).
    #[arg(short = 's', long)]
    seed: Option<u64>,
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
    /// Do not echo the prompt before the generated text.
    #[arg(long = "no-display-prompt")]
    no_display_prompt: bool,
}

/// Runs `pshard run`.
pub fn run(args: Args) -> anyhow::Result<()> {
    init_threads(args.engine.threads)?;
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading prompt file {}", f.display()))?,
        (None, None) => bail!("give a prompt with -p TEXT or -f FILE"),
    };
    let model = load_model(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(model.file().header())
        .with_context(|| format!("{}: reading the tokenizer", args.model.display()))?;
    let chat = args.chat || args.chat_template.is_some();
    let tokens = if chat {
        let template = match &args.chat_template {
            Some(src) => {
                ChatTemplate::from_name_or_source(src).context("parsing --chat-template")?
            }
            None => match ChatTemplate::from_gguf(model.file().header())
                .context("reading the model's chat template")?
            {
                Some(t) => t,
                // Some GGUFs (gemma-3-270m) ship no template; their family's is well known.
                None => builtin_for(&model.spec).with_context(|| {
                    format!(
                        "{} has no chat template (tokenizer.chat_template); pass one with \
                         --chat-template (a Jinja template or one of: {})",
                        args.model.display(),
                        ChatTemplate::BUILTIN_NAMES.join(", ")
                    )
                })?,
            },
        };
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
        model.spec.hparams.n_ctx_train.clamp(1, 4096)
    };
    if tokens.len() + 1 > n_ctx {
        bail!(
            "the prompt has {} tokens but the context holds {n_ctx} (raise -c)",
            tokens.len()
        );
    }
    let n_predict = args.n_predict.min(n_ctx - tokens.len());
    let mut engine = super::common::make_engine(model, &args.model, n_ctx, &args.engine)?;
    let mut sampler = Sampler::new(SamplerParams {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: Some(args.seed.unwrap_or_else(rand_seed)),
        ..SamplerParams::default()
    });
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
    let stats = generate(
        &mut engine,
        &tokens,
        n_predict,
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
                return false;
            }
            let piece = decoder.push(&tokenizer, tok);
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e);
                return false;
            }
            true
        },
    )?;
    let rest = decoder.finish();
    out.write_all(rest.as_bytes())?;
    writeln!(out)?;
    if let Some(e) = write_err {
        return Err(e).context("writing output");
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
        "memory: RSS {:.0} MiB, KV cache {:.0} MiB{}",
        super::common::rss_bytes().map_or(f64::NAN, mib),
        mib(engine.kv_bytes() as u64),
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

/// The built-in chat template of a model family whose GGUF may lack one.
fn builtin_for(spec: &pshard_model::spec::ModelSpec) -> Option<ChatTemplate> {
    match spec.arch {
        pshard_model::spec::Arch::Gemma3 => ChatTemplate::builtin("gemma"),
        pshard_model::spec::Arch::Qwen2
        | pshard_model::spec::Arch::Qwen3
        | pshard_model::spec::Arch::Qwen3Moe => ChatTemplate::builtin("chatml"),
        // Their GGUFs carry their own templates (gpt-oss's harmony format among them).
        pshard_model::spec::Arch::Llama
        | pshard_model::spec::Arch::GptOss
        | pshard_model::spec::Arch::Glm4Moe
        | pshard_model::spec::Arch::Deepseek2 => None,
    }
}

/// The text of a special token, or "" when the model has none.
fn special_text(tokenizer: &Tokenizer, id: Option<u32>) -> String {
    id.map(|i| tokenizer.token_text(i).to_string())
        .unwrap_or_default()
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed)
}
