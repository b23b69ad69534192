//! The HTTP side: routes, authentication, limits, streaming, metrics and the graceful drain.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use pshard_runtime::session::ContextShift;
use pshard_tokenizer::chat::ChatTemplate;
use pshard_tokenizer::{StreamDecoder, Tokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, ApiError, Fields, GenParams, StopText, ToolChoice};
use crate::sched::{Event, Finish, Request as GenRequest, Scheduler, SubmitError};
use crate::tools::{self, Call, ToolFormat, ToolReader};

/// Settings of a server.
#[derive(Clone, Debug)]
pub struct Config {
    /// The model's name in `/v1/models` and responses (requests may name it or leave it out).
    pub model_id: String,
    /// Other names requests may use for the model (its file name).
    pub model_aliases: Vec<String>,
    /// Required bearer token, if set.
    pub api_key: Option<String>,
    /// Requests that may wait for a slot before new ones get 429.
    pub max_queue: usize,
    /// Largest `max_tokens` accepted (also the default, capped by the context left).
    pub max_tokens: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// How long a shutdown waits for requests in flight.
    pub drain: Duration,
    /// Context shift of full sequences and cutting of prompts too long for the context
    /// (llama.cpp's `--context-shift`); `None`: such requests end or are refused.
    pub context_shift: Option<ContextShift>,
}

/// What the server needs once the model is loaded.
pub struct Ready {
    /// The scheduler over the engine.
    pub sched: Scheduler,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, if the model has one (or one was given).
    pub template: Option<ChatTemplate>,
}

struct AppState {
    cfg: Config,
    ready: OnceLock<Ready>,
    created: u64,
    next_id: AtomicU64,
    /// Requests answered, by route and status.
    answered: Mutex<BTreeMap<(String, u16), u64>>,
}

type Shared = Arc<AppState>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The loaded state, or 503 while loading.
fn ready(st: &AppState) -> Result<&Ready, ApiError> {
    st.ready.get().ok_or_else(|| {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
        );
        e.retry_after = Some(1);
        e
    })
}

/// The router with every route and layer (panics caught as 500, body limit, auth, counting).
fn router(st: Shared) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    with_layers(
        Router::new()
            .route("/health", get(health))
            .merge(api)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(st.clone()),
        st,
    )
}

/// The layers every route runs under (one place, so tests of extra routes get the same).
fn with_layers(r: Router, st: Shared) -> Router {
    let max_body = st.cfg.max_body_bytes;
    r.layer(middleware::from_fn_with_state(st, count))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(DefaultBodyLimit::max(max_body))
}

fn panic_response(p: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!(
            "internal error while handling the request: {}",
            crate::sched::panic_message(&*p)
        ),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

/// Counts answers by route and status.
async fn count(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |m| m.as_str())
        .to_string();
    let r = next.run(req).await;
    let key = (route, r.status().as_u16());
    if let Ok(mut m) = st.answered.lock() {
        *m.entry(key).or_default() += 1;
    }
    r
}

/// `Authorization: Bearer KEY` when an API key is set.
async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send Authorization: Bearer KEY)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(st): State<Shared>) -> Response {
    match st.ready.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading model"})),
        )
            .into_response(),
    }
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_id,
            "object": "model",
            "created": st.created,
            "owned_by": "pshard",
        }],
    }))
}

/// The body as a JSON object: too large → 413, anything but a JSON object → 400.
fn body(b: Result<Bytes, BytesRejection>) -> Result<serde_json::Map<String, Value>, ApiError> {
    let b =
        b.map_err(|e| ApiError::new(e.status(), format!("reading the body: {}", e.body_text())))?;
    api::parse_object(&b)
}

/// Checks the request's `model` against the served one (absent is fine).
fn check_model(st: &AppState, f: &Fields<'_>) -> Result<(), ApiError> {
    if let Some(m) = f.str("model")? {
        if m != st.cfg.model_id && !st.cfg.model_aliases.iter().any(|a| a == m) {
            let mut e = ApiError::param(
                "model",
                format!(
                    "unknown model '{m}': this server runs '{}'",
                    st.cfg.model_id
                ),
            );
            e.code = Some("model_not_found");
            return Err(e);
        }
    }
    Ok(())
}

async fn tokenize(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let o = body(b)?;
    let r = ready(&st)?;
    let f = Fields(&o);
    let content = f
        .str("content")?
        .ok_or_else(|| ApiError::param("content", "content is required"))?;
    let add_special = f.bool("add_special")?.unwrap_or(false);
    let parse_special = f.bool("parse_special")?.unwrap_or(true);
    let toks = r.tokenizer.encode(content, add_special, parse_special);
    if f.bool("with_pieces")?.unwrap_or(false) {
        let pieces: Vec<Value> = toks
            .iter()
            .map(|&t| {
                let b = r.tokenizer.token_bytes(t);
                let piece = match std::str::from_utf8(b) {
                    Ok(s) => json!(s),
                    Err(_) => json!(b),
                };
                json!({"id": t, "piece": piece})
            })
            .collect();
        return Ok(Json(json!({"tokens": pieces})));
    }
    Ok(Json(json!({"tokens": toks})))
}

async fn detokenize(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r = ready(&st)?;
    let o = body(b)?;
    let toks = tokens_field(&Fields(&o), "tokens", r.tokenizer.n_vocab())?;
    Ok(Json(json!({"content": r.tokenizer.decode(&toks)})))
}

/// An array of token ids below `n_vocab`.
fn tokens_field(f: &Fields<'_>, k: &str, n_vocab: usize) -> Result<Vec<u32>, ApiError> {
    let v = f
        .value(k)
        .ok_or_else(|| ApiError::param(k, format!("{k} is required")))?;
    let a = v
        .as_array()
        .ok_or_else(|| ApiError::param(k, format!("{k} must be an array of token ids")))?;
    a.iter()
        .enumerate()
        .map(|(i, t)| {
            t.as_u64()
                .filter(|&t| (t as usize) < n_vocab)
                .map(|t| t as u32)
                .ok_or_else(|| {
                    ApiError::param(
                        &format!("{k}[{i}]"),
                        format!("{k}[{i}] = {t} is not a token id (0 to {})", n_vocab - 1),
                    )
                })
        })
        .collect()
}

/// Prometheus text.
async fn metrics(State(st): State<Shared>) -> Response {
    // (name, type, help, value)
    let mut rows: Vec<(&str, &str, &str, String)> = Vec::new();
    if let Some(r) = st.ready.get() {
        let x = &r.sched.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let u = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed).to_string();
        rows.extend([
            (
                "requests_total",
                "counter",
                "Generation requests accepted.",
                l(&x.requests),
            ),
            (
                "requests_finished_total",
                "counter",
                "Generation requests ended (done, cancelled or failed).",
                l(&x.finished),
            ),
            (
                "requests_cancelled_total",
                "counter",
                "Generation requests cancelled (client gone or stop string).",
                l(&x.cancelled),
            ),
            (
                "prompt_tokens_total",
                "counter",
                "Prompt tokens evaluated.",
                l(&x.prompt_tokens),
            ),
            (
                "prompt_tokens_cached_total",
                "counter",
                "Prompt tokens reused from a sequence's cache.",
                l(&x.cached_tokens),
            ),
            (
                "generated_tokens_total",
                "counter",
                "Tokens generated.",
                l(&x.generated_tokens),
            ),
            (
                "context_shifts_total",
                "counter",
                "Context shifts of full sequences.",
                l(&x.context_shifts),
            ),
            (
                "evaluations_total",
                "counter",
                "Engine evaluations (ubatches).",
                l(&x.steps),
            ),
            (
                "evaluation_seconds_total",
                "counter",
                "Seconds spent in engine evaluations.",
                format!("{:.6}", x.busy_ns.load(Ordering::Relaxed) as f64 / 1e9),
            ),
            (
                "generation_tokens_per_second",
                "gauge",
                "Generated tokens per second over the last 10 s of evaluations.",
                format!("{:.3}", x.gen_tps()),
            ),
            (
                "prompt_tokens_per_second",
                "gauge",
                "Prompt tokens per second over the last 10 s of evaluations.",
                format!("{:.3}", x.prompt_tps()),
            ),
            (
                "queue_depth",
                "gauge",
                "Requests waiting for a sequence.",
                u(&x.waiting),
            ),
            (
                "busy_sequences",
                "gauge",
                "Sequences running a request.",
                u(&x.busy),
            ),
            (
                "sequences",
                "gauge",
                "Sequences (slots) of the engine.",
                r.sched.info.n_seq.to_string(),
            ),
            (
                "kv_cache_bytes",
                "gauge",
                "Bytes of the KV cache of all sequences.",
                r.sched.info.kv_bytes.to_string(),
            ),
            (
                "vram_bytes",
                "gauge",
                "Device memory in use, as measured (0 without a GPU).",
                l(&x.vram_bytes),
            ),
        ]);
    }
    rows.push((
        "ready",
        "gauge",
        "1 once the model is loaded.",
        u8::from(st.ready.get().is_some()).to_string(),
    ));
    let mut s = String::new();
    for (name, kind, help, v) in rows {
        s += &format!(
            "# HELP pshard_{name} {help}\n# TYPE pshard_{name} {kind}\npshard_{name} {v}\n"
        );
    }
    s += "# HELP pshard_http_responses_total HTTP responses by route and status.\n# TYPE pshard_http_responses_total counter\n";
    if let Ok(m) = st.answered.lock() {
        for ((route, code), n) in m.iter() {
            s += &format!(
                "pshard_http_responses_total{{route=\"{route}\",status=\"{code}\"}} {n}\n"
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// A generation in flight: turns the scheduler's events into text pieces (UTF-8 whole, stop
/// strings cut). Dropping it drops the receiver, which cancels the request.
struct Gen {
    rx: Option<UnboundedReceiver<Event>>,
    ready: Arc<AppState>,
    decoder: StreamDecoder,
    stops: StopText,
    /// Control tokens whose text is part of the reply (a tool call's marker), though the decoder
    /// leaves control tokens out.
    keep: Vec<u32>,
    prompt_tokens: usize,
    cached: usize,
    completion: usize,
    /// The end to report after a last piece of text.
    pending_end: Option<Finish>,
}

/// One step of a generation's output.
enum Piece {
    Text(String),
    End(Finish),
    Fail(ApiError),
}

impl Gen {
    async fn next(&mut self) -> Piece {
        let st = self.ready.clone();
        let tok = &st
            .ready
            .get()
            .expect("generations start after loading")
            .tokenizer;
        loop {
            if let Some(f) = self.pending_end.take() {
                return Piece::End(f);
            }
            let Some(rx) = self.rx.as_mut() else {
                return Piece::End(Finish::Stop);
            };
            match rx.recv().await {
                Some(Event::Started { cached, .. }) => self.cached = cached,
                Some(Event::Token(t)) => {
                    self.completion += 1;
                    let piece = if self.keep.contains(&t) {
                        // Bytes held for an unfinished character go first (finishing also makes
                        // an SPM decoder drop the next token's leading space: JSON whitespace).
                        let mut s = self.decoder.finish();
                        s += tok.token_text(t);
                        s
                    } else {
                        self.decoder.push(tok, t)
                    };
                    let (out, hit) = self.stops.push(&piece);
                    if hit {
                        // Cancels the rest of the generation.
                        self.rx = None;
                        return if out.is_empty() {
                            Piece::End(Finish::Stop)
                        } else {
                            self.pending_end = Some(Finish::Stop);
                            Piece::Text(out)
                        };
                    }
                    if !out.is_empty() {
                        return Piece::Text(out);
                    }
                }
                Some(Event::Done(d)) => {
                    self.rx = None;
                    let rest = self.decoder.finish();
                    let (mut out, hit) = self.stops.push(&rest);
                    if !hit {
                        out += &self.stops.finish();
                    }
                    let finish = if hit { Finish::Stop } else { d.finish };
                    if out.is_empty() {
                        return Piece::End(finish);
                    }
                    self.pending_end = Some(finish);
                    return Piece::Text(out);
                }
                Some(Event::Error(e)) => {
                    self.rx = None;
                    return Piece::Fail(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e));
                }
                None => {
                    self.rx = None;
                    return Piece::Fail(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the scheduler stopped",
                    ));
                }
            }
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt_tokens + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

impl Drop for Gen {
    fn drop(&mut self) {
        // Closing (not only dropping) makes the cancellation visible to the scheduler at once.
        if let Some(rx) = self.rx.as_mut() {
            rx.close();
        }
    }
}

/// Starts a generation of `prompt` with `p`; the control tokens in `keep` are shown in its text.
fn start(st: &Shared, prompt: Vec<u32>, p: &GenParams, keep: Vec<u32>) -> Result<Gen, ApiError> {
    let r = ready(st)?;
    let n_ctx = r.sched.info.n_ctx;
    let shift = st.cfg.context_shift;
    let mut max_tokens = p.max_tokens.unwrap_or(st.cfg.max_tokens);
    if shift.is_none() {
        max_tokens = max_tokens.min(n_ctx.saturating_sub(prompt.len()).max(1));
    }
    let context_shift = shift.map(|c| c.keep_for(&prompt, r.tokenizer.bos()));
    let stop_tokens = if p.ignore_eos {
        Vec::new()
    } else {
        r.tokenizer.eog_ids()
    };
    let n = prompt.len();
    let rx = r
        .sched
        .submit(GenRequest {
            prompt,
            max_tokens,
            sampler: p.sampler.clone(),
            stop_tokens,
            context_shift,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => {
                let mut a = ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string());
                a.retry_after = Some(1);
                a
            }
            SubmitError::TooLong { .. } => {
                // A prompt cut by a context shift fits unless --keep leaves no room.
                let mut a = ApiError::param("messages", e.to_string());
                a.code = Some("context_length_exceeded");
                a
            }
            SubmitError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            SubmitError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        })?;
    Ok(Gen {
        rx: Some(rx),
        ready: st.clone(),
        decoder: StreamDecoder::new(true),
        stops: StopText::new(p.stop.clone()),
        keep,
        prompt_tokens: n,
        cached: 0,
        completion: 0,
        pending_end: None,
    })
}

async fn chat_completions(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = ready(&st)?;
    let o = body(b)?;
    let f = Fields(&o);
    check_model(&st, &f)?;
    let template = r.template.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "this model has no chat template: use /v1/completions, or start the server with --chat-template",
        )
    })?;
    let format = ToolFormat::of(template);
    let tools = api::tools(&f, format.is_some())?;
    let choice = api::tool_choice(&f, &tools)?;
    let chat = api::messages(&f, format.is_some())?;
    let p = api::gen_params(&f, st.cfg.max_tokens)?;
    let special =
        |id: Option<u32>| id.map_or(String::new(), |i| r.tokenizer.token_text(i).to_string());
    let mut rendered = template
        .apply_with_tools(
            &chat,
            &tools,
            true,
            &special(r.tokenizer.bos()),
            &special(r.tokenizer.eos()),
        )
        .map_err(|e| {
            ApiError::param(
                "messages",
                format!("the chat template refused the messages: {e}"),
            )
        })?;
    // Replies are read for calls unless there are no tools or the request says `none`; a call
    // that is required is begun in the prompt (no grammar constrains sampling here).
    let reader = match format {
        Some(fmt) if !tools.is_empty() && choice != ToolChoice::None => {
            let opening = match &choice {
                ToolChoice::Required => fmt.forced_opening(None),
                ToolChoice::Function(name) => fmt.forced_opening(Some(name)),
                ToolChoice::Auto | ToolChoice::None => String::new(),
            };
            rendered += &opening;
            Some(ToolReader::new(fmt, api::tool_names(&tools), opening))
        }
        _ => None,
    };
    // The call marker must reach the reader even where it is a control token.
    let keep = match &reader {
        Some(_) => format
            .and_then(|fmt| r.tokenizer.token_id(fmt.marker()))
            .filter(|&id| r.tokenizer.is_special(id))
            .into_iter()
            .collect(),
        None => Vec::new(),
    };
    let prompt = r.tokenizer.encode_chat_prompt(&rendered);
    let g = start(&st, prompt, &p, keep)?;
    respond(st, g, p, Kind::Chat, reader).await
}

async fn completions(
    State(st): State<Shared>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = ready(&st)?;
    let o = body(b)?;
    let f = Fields(&o);
    check_model(&st, &f)?;
    let p = api::gen_params(&f, st.cfg.max_tokens)?;
    let prompt = match api::prompt(&f)? {
        api::Prompt::Text(t) => r.tokenizer.encode(&t, true, true),
        api::Prompt::Tokens(t) => {
            let n = r.tokenizer.n_vocab();
            if let Some((i, t)) = t.iter().enumerate().find(|(_, &t)| t as usize >= n) {
                return Err(ApiError::param(
                    &format!("prompt[{i}]"),
                    format!("prompt[{i}] = {t} is not a token id (0 to {})", n - 1),
                ));
            }
            t
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    let g = start(&st, prompt, &p, Vec::new())?;
    respond(st, g, p, Kind::Text, None).await
}

/// The `finish_reason` of a reply that made `calls`.
fn finish_reason(finish: Finish, calls: &[Call]) -> &'static str {
    if calls.is_empty() {
        finish.as_str()
    } else {
        "tool_calls"
    }
}

/// The OpenAI `tool_calls` of a reply, each with a fresh id.
fn tool_calls_json(calls: &[Call]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| {
            json!({
                "id": tools::call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect()
}

/// The response: one JSON body, or an SSE stream of chunks ending in `data: [DONE]`. `tools`
/// reads the reply for tool calls (chat only).
async fn respond(
    st: Shared,
    mut g: Gen,
    p: GenParams,
    kind: Kind,
    mut tools: Option<ToolReader>,
) -> Result<Response, ApiError> {
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (id, object, chunk_object) = match kind {
        Kind::Chat => (
            format!("chatcmpl-{n}"),
            "chat.completion",
            "chat.completion.chunk",
        ),
        Kind::Text => (format!("cmpl-{n}"), "text_completion", "text_completion"),
    };
    let created = unix_now();
    let model = st.cfg.model_id.clone();
    if !p.stream {
        let mut text = String::new();
        let finish = loop {
            match g.next().await {
                Piece::Text(t) => match &mut tools {
                    Some(r) => text += &r.push(&t),
                    None => text += &t,
                },
                Piece::End(f) => break f,
                Piece::Fail(e) => return Err(e),
            }
        };
        let mut calls = Vec::new();
        if let Some(r) = tools {
            let end = r.finish();
            text += &end.content;
            calls = end.calls;
        }
        let choice = match kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    if text.trim().is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = json!(tool_calls_json(&calls));
                }
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": finish_reason(finish, &calls),
                })
            }
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
        };
        return Ok(Json(json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": g.usage(),
        }))
        .into_response());
    }
    // The first event waits for the slot, so a failure before any output is still an HTTP error.
    let chunk = move |choice: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": id,
            "object": chunk_object,
            "created": created,
            "model": model,
            "choices": [choice],
        });
        if let Some(u) = usage {
            c["choices"] = json!([]);
            c["usage"] = u;
        }
        SseEvent::default().data(c.to_string())
    };
    let first = g.next().await;
    if let Piece::Fail(e) = first {
        return Err(e);
    }
    let stream = sse_stream(g, first, chunk, p.include_usage, kind, tools);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// One streamed choice of `kind`: a chat `delta` (for text completions only its `content`
/// counts) and the finish reason on the last.
fn stream_choice(kind: Kind, delta: Value, finish: Option<&str>) -> Value {
    match kind {
        Kind::Chat => {
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
        Kind::Text => json!({
            "index": 0,
            "text": delta["content"].as_str().unwrap_or(""),
            "logprobs": null,
            "finish_reason": finish,
        }),
    }
}

/// The SSE events of a streamed generation, given its first piece: for chat the role first,
/// then content as it is released (by the tool reader when there is one), at the end any tool
/// calls (each as one delta with its id and name, then one with its arguments, as OpenAI streams
/// them), the finish, the usage if asked, and `[DONE]`.
fn sse_stream(
    g: Gen,
    first: Piece,
    chunk: impl Fn(Value, Option<Value>) -> SseEvent + Send + 'static,
    include_usage: bool,
    kind: Kind,
    tools: Option<ToolReader>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct St<C> {
        g: Gen,
        first: Option<Piece>,
        chunk: C,
        tools: Option<ToolReader>,
        queue: VecDeque<SseEvent>,
        ended: bool,
    }
    let mut queue = VecDeque::new();
    if kind == Kind::Chat {
        let role = json!({"role": "assistant", "content": ""});
        queue.push_back(chunk(stream_choice(kind, role, None), None));
    }
    let init = St {
        g,
        first: Some(first),
        chunk,
        tools,
        queue,
        ended: false,
    };
    futures_util::stream::unfold(init, move |mut s| async move {
        loop {
            if let Some(ev) = s.queue.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.ended {
                return None;
            }
            let piece = match s.first.take() {
                Some(p) => p,
                None => s.g.next().await,
            };
            let text = |t: &str| stream_choice(kind, json!({"content": t}), None);
            match piece {
                Piece::Text(t) => {
                    let t = match &mut s.tools {
                        Some(r) => r.push(&t),
                        None => t,
                    };
                    if !t.is_empty() {
                        let ev = (s.chunk)(text(&t), None);
                        s.queue.push_back(ev);
                    }
                }
                Piece::End(f) => {
                    let mut calls = Vec::new();
                    if let Some(r) = s.tools.take() {
                        let end = r.finish();
                        if !end.content.is_empty() {
                            let ev = (s.chunk)(text(&end.content), None);
                            s.queue.push_back(ev);
                        }
                        calls = end.calls;
                    }
                    for (i, c) in tool_calls_json(&calls).into_iter().enumerate() {
                        let opening = json!({"tool_calls": [{
                            "index": i,
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["function"]["name"], "arguments": ""},
                        }]});
                        let args = json!({"tool_calls": [{
                            "index": i,
                            "function": {"arguments": c["function"]["arguments"]},
                        }]});
                        for delta in [opening, args] {
                            let ev = (s.chunk)(stream_choice(kind, delta, None), None);
                            s.queue.push_back(ev);
                        }
                    }
                    let reason = finish_reason(f, &calls);
                    let ev = (s.chunk)(stream_choice(kind, json!({}), Some(reason)), None);
                    s.queue.push_back(ev);
                    if include_usage {
                        let ev = (s.chunk)(Value::Null, Some(s.g.usage()));
                        s.queue.push_back(ev);
                    }
                    s.queue.push_back(SseEvent::default().data("[DONE]"));
                    s.ended = true;
                }
                Piece::Fail(e) => {
                    s.queue
                        .push_back(SseEvent::default().data(e.body().to_string()));
                    s.queue.push_back(SseEvent::default().data("[DONE]"));
                    s.ended = true;
                }
            }
        }
    })
}

/// Runs the server on `listener` until SIGINT or SIGTERM, then lets requests in flight finish
/// for up to `cfg.drain`. `load` runs on a blocking thread meanwhile (`/health` answers 503 until
/// it returns); a failed load stops the server with its error.
pub async fn serve(
    cfg: Config,
    listener: tokio::net::TcpListener,
    load: impl FnOnce() -> anyhow::Result<Ready> + Send + 'static,
) -> anyhow::Result<()> {
    let st = Arc::new(AppState {
        cfg,
        ready: OnceLock::new(),
        created: unix_now(),
        next_id: AtomicU64::new(1),
        answered: Mutex::new(BTreeMap::new()),
    });
    let app = router(st.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loader = {
        let st = st.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let r = load()?;
            let _ = st.ready.set(r);
            eprintln!("serve: ready");
            Ok(())
        })
    };
    let drain = st.cfg.drain;
    let mut stop_rx2 = stop_rx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_rx2.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });
    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::pin!(loader);
    let mut loaded = false;
    loop {
        tokio::select! {
            r = &mut loader, if !loaded => {
                loaded = true;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.context("loading the model")),
                    Err(e) => anyhow::bail!("loading the model panicked: {e}"),
                }
            }
            name = &mut signal => {
                eprintln!("serve: {name}: no new connections; draining requests in flight (up to {:.0} s)", drain.as_secs_f64());
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    let t0 = Instant::now();
    match tokio::time::timeout(drain, server).await {
        Ok(_) => eprintln!("serve: drained in {:.2} s", t0.elapsed().as_secs_f64()),
        Err(_) => eprintln!(
            "serve: requests still running after {:.0} s; stopping",
            drain.as_secs_f64()
        ),
    }
    drop(stop_rx);
    Ok(())
}

/// Resolves at SIGINT or SIGTERM with the signal's name.
async fn shutdown_signal() -> &'static str {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = int.await;
                    return "SIGINT";
                }
            };
        tokio::select! {
            _ = int => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = int.await;
        "SIGINT"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(api_key: Option<&str>) -> Shared {
        Arc::new(AppState {
            cfg: Config {
                model_id: "m".into(),
                model_aliases: vec![],
                api_key: api_key.map(str::to_string),
                max_queue: 4,
                max_tokens: 16,
                max_body_bytes: 1024,
                drain: Duration::from_secs(1),
                context_shift: None,
            },
            ready: OnceLock::new(),
            created: 0,
            next_id: AtomicU64::new(1),
            answered: Mutex::new(BTreeMap::new()),
        })
    }

    /// A real server on a loopback port with `extra` routes under the production layers.
    async fn start_with(st: Shared, extra: Router<Shared>) -> String {
        let app = with_layers(
            Router::new()
                .route("/health", get(health))
                .merge(extra)
                .merge(
                    Router::new()
                        .route("/v1/models", get(models))
                        .route("/tokenize", post(tokenize))
                        .route_layer(middleware::from_fn_with_state(st.clone(), auth)),
                )
                .fallback(not_found)
                .with_state(st.clone()),
            st,
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_server_keeps_serving() {
        let extra = Router::new().route(
            "/boom",
            get(|| async {
                if unix_now() > 0 {
                    panic!("deliberate");
                }
                "unreachable"
            }),
        );
        let base = start_with(state(None), extra).await;
        let c = reqwest::Client::new();
        for _ in 0..2 {
            let r = c.get(format!("{base}/boom")).send().await.unwrap();
            assert_eq!(r.status(), 500);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["type"], "server_error");
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("deliberate"));
            let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }

    #[tokio::test]
    async fn loading_auth_and_limits() {
        let base = start_with(state(Some("k")), Router::new()).await;
        let c = reqwest::Client::new();
        // Loading: /health says 503; authenticated endpoints that need the model say 503.
        let r = c.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        let r = c
            .post(format!("{base}/tokenize"))
            .bearer_auth("k")
            .body("{\"content\":\"x\"}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        let r = c
            .post(format!("{base}/tokenize"))
            .bearer_auth("k")
            .body(vec![b' '; 4096])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
        let r = c.get(format!("{base}/nowhere")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
}
