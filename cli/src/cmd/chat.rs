//! `pshard chat`: an interactive conversation in the terminal (llama-cli's `-cnv`).
//!
//! Line editing and history come from rustyline. Each turn renders the whole conversation with
//! the model's chat template; when the new rendering starts with the text the sequence already
//! holds (the earlier turns as evaluated and generated), only the rest is tokenized and
//! appended, so a turn evaluates its own tokens only — the scheduler reuses the cached prefix.
//! Ctrl-C during a reply stops it (the partial reply stays in the conversation); Ctrl-D or
//! `/exit` leaves; `/clear` starts over.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use pshard_server::sched::{Event, Request, Scheduler, SubmitError};
use pshard_tokenizer::chat::ChatMessage;
use pshard_tokenizer::{StreamDecoder, Tokenizer};
use rustyline::error::ReadlineError;

use super::common::{
    chat_template, init_threads, load_model, make_engine_parallel, no_template, special_text,
    ContextShiftArgs, EngineArgs, SamplingArgs,
};

/// Arguments of `pshard chat`.
#[derive(clap::Args)]
pub struct Args {
    /// Engine placement and threading.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Model file (GGUF; the first file of a split set).
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Context of the conversation (0 = the model's training context, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// Most tokens per reply (0: until the model ends its turn or the context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = 0)]
    pub n_predict: usize,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Context shift (llama.cpp's --context-shift, --keep): a full context discards the older
    /// half of the conversation after the kept tokens instead of ending the reply.
    #[command(flatten)]
    pub shift: ContextShiftArgs,
    /// System message that opens the conversation.
    #[arg(long = "system", short = 'y')]
    pub system: Option<String>,
    /// Chat template (Jinja source or a built-in name) instead of the model's.
    #[arg(long = "chat-template")]
    pub chat_template: Option<String>,
}

/// The conversation: its messages, and the tokens and text the sequence holds for them.
struct Conversation {
    messages: Vec<ChatMessage>,
    /// Tokens of the conversation so far, as evaluated and generated (the last generated one
    /// may not be evaluated yet: it goes in with the next turn).
    tokens: Vec<u32>,
    /// The text those tokens spell (special tokens as their text).
    text: String,
}

impl Conversation {
    fn new(system: Option<&str>) -> Conversation {
        Conversation {
            messages: system
                .map(|s| vec![ChatMessage::new("system", s)])
                .unwrap_or_default(),
            tokens: Vec::new(),
            text: String::new(),
        }
    }

    /// The prompt for the next reply: the held tokens plus the new part of the rendering when
    /// the rendering extends the held text, else the whole rendering tokenized.
    fn prompt(&self, rendered: &str, tok: &Tokenizer) -> Vec<u32> {
        match rendered.strip_prefix(self.text.as_str()) {
            Some(rest) if !self.tokens.is_empty() => {
                let mut t = self.tokens.clone();
                t.extend(tok.encode(rest, false, true));
                t
            }
            _ => tok.encode_chat_prompt(rendered),
        }
    }
}

/// Runs `pshard chat`.
pub fn run(a: Args) -> anyhow::Result<()> {
    init_threads(a.engine.threads);
    let model = load_model(&a.model)?;
    let tok = Tokenizer::from_gguf(model.file().header())
        .with_context(|| format!("{}: reading the tokenizer", a.model.display()))?;
    let template =
        chat_template(&model, a.chat_template.as_deref())?.ok_or_else(|| no_template(&a.model))?;
    let n_ctx = if a.ctx_size > 0 {
        a.ctx_size
    } else {
        model.spec.hparams.n_ctx_train.clamp(1, 4096)
    };
    let engine = make_engine_parallel(model, &a.model, n_ctx, "-c", &a.engine, 1)?;
    let sched = Scheduler::spawn(engine, 1);
    let (bos, eos) = (special_text(&tok, tok.bos()), special_text(&tok, tok.eos()));
    let eog = tok.eog_ids();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut rl = rustyline::DefaultEditor::new().context("setting up line editing")?;
    let mut conv = Conversation::new(a.system.as_deref());
    eprintln!("chat: Ctrl-C stops a reply, Ctrl-D or /exit leaves, /clear starts over");
    loop {
        let line = match rl.readline("> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading a line"),
        };
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                conv = Conversation::new(a.system.as_deref());
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let _ = rl.add_history_entry(text);
        conv.messages.push(ChatMessage::new("user", line.clone()));
        let rendered = template
            .apply(&conv.messages, true, &bos, &eos)
            .context("applying the chat template")?;
        let prompt = conv.prompt(&rendered, &tok);
        let shift = a.shift.get();
        // The scheduler ends a reply at a full context, or shifts it with --context-shift.
        let max_tokens = if a.n_predict > 0 {
            a.n_predict
        } else {
            usize::MAX
        };
        let rx = match sched.submit(Request {
            prompt: prompt.clone(),
            max_tokens,
            sampler: a.sampling.params(),
            stop_tokens: eog.clone(),
            context_shift: shift.map(|s| s.keep_for(&prompt, tok.bos())),
        }) {
            Ok(rx) => rx,
            Err(SubmitError::TooLong { prompt, n_ctx }) => {
                // Without --context-shift, or with a --keep that leaves nothing to cut.
                conv.messages.pop();
                eprintln!(
                    "(the conversation would need {} tokens but the context holds {n_ctx}: /clear starts over, raise -c, or --context-shift with a smaller --keep)",
                    prompt + 1
                );
                continue;
            }
            Err(e) => bail!("{e}"),
        };
        let t0 = Instant::now();
        let reply = rt.block_on(stream_reply(rx, &tok))?;
        let secs = t0.elapsed().as_secs_f64();
        // The conversation now holds the prompt and everything generated (with the token that
        // ended the turn, if one did).
        let mut generated = reply.tokens.clone();
        generated.extend(reply.stop_token);
        conv.text = format!("{rendered}{}", tok.decode(&generated));
        conv.tokens = prompt.clone();
        conv.tokens.extend(&generated);
        conv.messages
            .push(ChatMessage::new("assistant", reply.text.clone()));
        eprintln!(
            "[prompt {} tokens: {} reused, {} evaluated | reply {} tokens in {secs:.2} s, {:.1} t/s{}{}{}]",
            prompt.len(),
            reply.cached,
            prompt.len() - reply.truncated - reply.cached,
            reply.tokens.len(),
            reply.tokens.len() as f64 / secs.max(1e-9),
            if reply.stopped { ", stopped" } else { "" },
            if reply.truncated > 0 {
                format!(", {} prompt tokens cut to fit the context", reply.truncated)
            } else {
                String::new()
            },
            if reply.shifts > 0 {
                format!(", {} context shifts", reply.shifts)
            } else {
                String::new()
            },
        );
        if let Some(e) = reply.error {
            bail!("{e}");
        }
    }
    Ok(())
}

/// A reply as it ended.
struct Reply {
    tokens: Vec<u32>,
    text: String,
    stop_token: Option<u32>,
    cached: usize,
    /// Prompt tokens cut to fit the context.
    truncated: usize,
    /// Context shifts while generating.
    shifts: usize,
    stopped: bool,
    error: Option<String>,
}

/// Prints a reply as it streams; Ctrl-C stops it.
async fn stream_reply(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tok: &Tokenizer,
) -> anyhow::Result<Reply> {
    let mut out = std::io::stdout();
    let mut dec = StreamDecoder::new(true);
    let mut r = Reply {
        tokens: Vec::new(),
        text: String::new(),
        stop_token: None,
        cached: 0,
        truncated: 0,
        shifts: 0,
        stopped: false,
        error: None,
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::Started { cached, truncated, .. }) => {
                    r.cached = cached;
                    r.truncated = truncated;
                }
                Some(Event::Token(t)) => {
                    r.tokens.push(t);
                    let piece = dec.push(tok, t);
                    r.text += &piece;
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                }
                Some(Event::Done(d)) => {
                    r.stop_token = d.stop_token;
                    r.shifts = d.context_shifts;
                    break;
                }
                Some(Event::Error(e)) => {
                    r.error = Some(e);
                    break;
                }
                None => {
                    r.error = Some("the scheduler stopped".into());
                    break;
                }
            },
            _ = &mut ctrl_c => {
                // Closing the receiver cancels the generation at the scheduler's next step.
                rx.close();
                r.stopped = true;
                break;
            }
        }
    }
    let rest = dec.finish();
    r.text += &rest;
    writeln!(out, "{rest}")?;
    Ok(r)
}
