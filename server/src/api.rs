//! The OpenAI request bodies, read field by field so every bad input gets a 400 naming its field,
//! and the OpenAI-style error object.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pshard_runtime::sampler::SamplerParams;
use pshard_tokenizer::chat::{ChatMessage, ToolCall};
use serde_json::{json, Map, Value};

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, if there is one (`context_length_exceeded`, ...).
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
            retry_after: None,
        }
    }

    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// The OpenAI error `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "unavailable_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error object.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(s as u32));
        }
        r
    }
}

/// A JSON object body: malformed JSON or another JSON type is a 400.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        message: format!("the body is not valid JSON: {e}"),
        ..ApiError::new(StatusCode::BAD_REQUEST, "")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be a JSON object, not {}", type_name(&other)),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to a body's fields; `null` counts as absent.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    /// A number in `[lo, hi]`.
    pub fn f32_in(&self, k: &str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let x = v.as_f64().ok_or_else(|| {
            ApiError::param(k, format!("{k} must be a number, not {}", type_name(v)))
        })?;
        if !(lo as f64..=hi as f64).contains(&x) {
            return Err(ApiError::param(
                k,
                format!("{k} must be between {lo} and {hi} (got {x})"),
            ));
        }
        Ok(Some(x as f32))
    }

    /// A whole number in `[lo, hi]`.
    pub fn int_in(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let x = v.as_i64().ok_or_else(|| {
            ApiError::param(
                k,
                format!("{k} must be a whole number, not {}", describe(v)),
            )
        })?;
        if !(lo..=hi).contains(&x) {
            return Err(ApiError::param(
                k,
                format!("{k} must be between {lo} and {hi} (got {x})"),
            ));
        }
        Ok(Some(x))
    }

    /// A boolean.
    pub fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::param(
                k,
                format!("{k} must be true or false, not {}", type_name(v)),
            )),
        }
    }

    /// A string.
    pub fn str(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::param(
                k,
                format!("{k} must be a string, not {}", type_name(v)),
            )),
        }
    }

    /// The raw value, if present.
    pub fn value(&self, k: &str) -> Option<&'a Value> {
        self.get(k)
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("{n}"),
        other => type_name(other).to_string(),
    }
}

/// The generation parameters both completion endpoints share.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    /// `max_tokens` / `max_completion_tokens`, if given.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampler: SamplerParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `ignore_eos` (llama-server's extension): keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
}

/// Most stop strings a request may give.
pub const MAX_STOP: usize = 16;

/// Reads the shared parameters; refuses the ones this server cannot honour, naming them.
/// `max_tokens_limit` bounds `max_tokens`.
pub fn gen_params(f: &Fields<'_>, max_tokens_limit: usize) -> Result<GenParams, ApiError> {
    // Refused: more than one choice, logprobs, logit bias, structured output, the deprecated
    // function-call API (`functions`, `function_call`; tools are read by `tools`).
    if let Some(n) = f.int_in("n", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::param(
                "n",
                format!("n = {n}: this server returns one choice per request (n must be 1)"),
            ));
        }
    }
    if let Some(n) = f.int_in("best_of", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::param("best_of", "best_of must be 1"));
        }
    }
    for k in ["logprobs", "echo"] {
        if let Some(v) = f.value(k) {
            if v != &Value::Bool(false) {
                return Err(ApiError::param(
                    k,
                    format!("{k} is not supported by this server"),
                ));
            }
        }
    }
    for k in ["top_logprobs", "suffix", "functions", "function_call"] {
        if f.value(k).is_some() {
            return Err(ApiError::param(
                k,
                format!("{k} is not supported by this server"),
            ));
        }
    }
    if let Some(v) = f.value("logit_bias") {
        if v.as_object().is_none_or(|m| !m.is_empty()) {
            return Err(ApiError::param(
                "logit_bias",
                "logit_bias is not supported by this server",
            ));
        }
    }
    if let Some(v) = f.value("response_format") {
        let ty = v.get("type").and_then(Value::as_str);
        if ty != Some("text") {
            return Err(ApiError::param(
                "response_format",
                "response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
            ));
        }
    }
    let limit = max_tokens_limit as i64;
    let mt = f.int_in("max_tokens", 1, limit)?;
    let mct = f.int_in("max_completion_tokens", 1, limit)?;
    let d = SamplerParams::default();
    let sampler = SamplerParams {
        temperature: f.f32_in("temperature", 0.0, 2.0)?.unwrap_or(d.temperature),
        top_p: f.f32_in("top_p", 0.0, 1.0)?.unwrap_or(d.top_p),
        top_k: f
            .int_in("top_k", 0, 1 << 20)?
            .map_or(d.top_k, |v| v as usize),
        min_p: f.f32_in("min_p", 0.0, 1.0)?.unwrap_or(d.min_p),
        presence_penalty: f
            .f32_in("presence_penalty", -2.0, 2.0)?
            .unwrap_or(d.presence_penalty),
        frequency_penalty: f
            .f32_in("frequency_penalty", -2.0, 2.0)?
            .unwrap_or(d.frequency_penalty),
        repeat_penalty: f
            .f32_in("repeat_penalty", 0.0, 10.0)?
            .unwrap_or(d.repeat_penalty),
        repeat_last_n: f
            .int_in("repeat_last_n", 0, 1 << 20)?
            .map_or(d.repeat_last_n, |v| v as usize),
        seed: f.int_in("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
    };
    let stop = match f.value("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOP {
                return Err(ApiError::param(
                    "stop",
                    format!("stop: at most {MAX_STOP} strings"),
                ));
            }
            a.iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::param("stop", "stop must be a string or an array of strings")
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "stop must be a string or an array of strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop strings must not be empty"));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.value("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(_) => {
            return Err(ApiError::param(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };
    Ok(GenParams {
        max_tokens: mct.or(mt).map(|v| v as usize),
        sampler,
        stop,
        stream,
        include_usage,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
    })
}

/// What a request says about calling tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model may call a tool or answer (`auto`, the default).
    Auto,
    /// The model answers; its reply is not read for calls (`none`).
    None,
    /// The model must call a tool (`required`).
    Required,
    /// The model must call this function (`{"type": "function", "function": {"name": ...}}`).
    Function(String),
}

/// `tools`: the OpenAI list of `{"type": "function", "function": {"name", "description",
/// "parameters"}}`, returned as given (an empty list is no tools). `template_has_tools`: whether
/// the model's chat template reads them; if not, tools are refused.
pub fn tools(f: &Fields<'_>, template_has_tools: bool) -> Result<Vec<Value>, ApiError> {
    let Some(v) = f.value("tools") else {
        return Ok(Vec::new());
    };
    let Some(list) = v.as_array() else {
        return Err(ApiError::param(
            "tools",
            format!("tools must be an array, not {}", type_name(v)),
        ));
    };
    if list.is_empty() {
        return Ok(Vec::new());
    }
    if !template_has_tools {
        return Err(ApiError::param(
            "tools",
            "tools: this model's chat template has no tools (give one that has with --chat-template)",
        ));
    }
    let mut names: Vec<&str> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let p = format!("tools[{i}]");
        let Some(o) = t.as_object() else {
            return Err(ApiError::param(&p, format!("{p} must be an object")));
        };
        match o.get("type") {
            Some(Value::String(ty)) if ty == "function" => {}
            _ => {
                return Err(ApiError::param(
                    &format!("{p}.type"),
                    format!("{p}.type must be \"function\""),
                ))
            }
        }
        let fp = format!("{p}.function");
        let Some(fun) = o.get("function").and_then(Value::as_object) else {
            return Err(ApiError::param(&fp, format!("{fp} must be an object")));
        };
        let np = format!("{fp}.name");
        let name = match fun.get("name") {
            Some(Value::String(n)) => n.as_str(),
            None | Some(Value::Null) => {
                return Err(ApiError::param(&np, format!("{np} is required")))
            }
            Some(other) => {
                return Err(ApiError::param(
                    &np,
                    format!("{np} must be a string, not {}", type_name(other)),
                ))
            }
        };
        // OpenAI's rule for function names.
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ApiError::param(
                &np,
                format!("{np} '{name}' must be 1 to 64 letters, digits, '_' or '-'"),
            ));
        }
        if names.contains(&name) {
            return Err(ApiError::param(
                &np,
                format!("{np}: two tools are named '{name}'"),
            ));
        }
        names.push(name);
        if let Some(d) = fun.get("description").filter(|d| !d.is_null()) {
            if !d.is_string() {
                let dp = format!("{fp}.description");
                return Err(ApiError::param(&dp, format!("{dp} must be a string")));
            }
        }
        if let Some(params) = fun.get("parameters").filter(|d| !d.is_null()) {
            if !params.is_object() {
                let pp = format!("{fp}.parameters");
                return Err(ApiError::param(
                    &pp,
                    format!(
                        "{pp} must be a JSON schema object, not {}",
                        type_name(params)
                    ),
                ));
            }
        }
    }
    Ok(list.clone())
}

/// The names of the functions in a [`tools`] list.
pub fn tool_names(tools: &[Value]) -> Vec<String> {
    tools
        .iter()
        .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
        .collect()
}

/// `tool_choice`: `auto` (the default), `none`, `required` or `{"type": "function", "function":
/// {"name": ...}}` naming one of `tools`. Without tools only `auto` and `none` are accepted.
pub fn tool_choice(f: &Fields<'_>, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let names = tool_names(tools);
    let bad = |m: String| Err(ApiError::param("tool_choice", m));
    let choice = match f.value("tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return bad(format!(
                    "tool_choice '{other}' is not one of auto, none, required or a function"
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) => ToolChoice::Function(n.to_string()),
                _ => {
                    return bad(
                        "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}} when it is an object".into(),
                    )
                }
            }
        }
        Some(other) => {
            return bad(format!(
                "tool_choice must be a string or an object, not {}",
                type_name(other)
            ))
        }
    };
    match &choice {
        ToolChoice::Required if names.is_empty() => {
            bad("tool_choice 'required': the request has no tools".into())
        }
        ToolChoice::Function(n) if !names.contains(n) => bad(format!(
            "tool_choice names the function '{n}', which is not among the tools ({})",
            if names.is_empty() {
                "there are none".to_string()
            } else {
                names.join(", ")
            }
        )),
        _ => Ok(choice),
    }
}

/// `messages`: a non-empty array of `{role, content}`; content a string, `null` (assistant) or an
/// array of text parts. Where the chat template knows tools (`template_has_tools`), assistant
/// messages may carry `tool_calls` (`{id, type, function: {name, arguments}}`, `arguments` a JSON
/// string as OpenAI sends it, read into the object templates expect) and `tool` messages answer
/// them (`tool_call_id`, optional `name`). Images are refused.
pub fn messages(f: &Fields<'_>, template_has_tools: bool) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(v) = f.value("messages") else {
        return Err(ApiError::param("messages", "messages is required"));
    };
    let Some(arr) = v.as_array() else {
        return Err(ApiError::param(
            "messages",
            format!("messages must be an array, not {}", type_name(v)),
        ));
    };
    if arr.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let no_tools = |p: &str, what: &str| {
        ApiError::param(
            p,
            format!("{p}: {what}, but this model's chat template has no tools"),
        )
    };
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let p = format!("messages[{i}]");
        let Some(o) = m.as_object() else {
            return Err(ApiError::param(&p, format!("{p} must be an object")));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(ApiError::param(
                    &format!("{p}.role"),
                    format!("{p}.role must be a string"),
                ))
            }
        };
        let role = match role {
            "system" | "user" | "assistant" => role,
            "developer" => "system",
            "tool" if template_has_tools => role,
            "tool" => return Err(no_tools(&format!("{p}.role"), "a tool result")),
            "function" => {
                return Err(ApiError::param(
                    &format!("{p}.role"),
                    format!("{p}.role 'function' (the deprecated function-call API) is not supported: send tool results as role 'tool'"),
                ))
            }
            other => {
                return Err(ApiError::param(
                    &format!("{p}.role"),
                    format!("{p}.role '{other}' is not one of system, developer, user, assistant, tool"),
                ))
            }
        };
        let mut msg = ChatMessage::new(role, String::new());
        let mf = Fields(o);
        if let Some(calls) = mf.value("tool_calls") {
            let cp = format!("{p}.tool_calls");
            if role != "assistant" {
                return Err(ApiError::param(
                    &cp,
                    format!("{cp}: only assistant messages make tool calls"),
                ));
            }
            if !template_has_tools {
                return Err(no_tools(&cp, "tool calls"));
            }
            msg.tool_calls = tool_calls(calls, &cp)?;
        }
        if role == "tool" {
            msg.tool_call_id = mf
                .str("tool_call_id")
                .map_err(|e| renamed(e, &p))?
                .map(str::to_string);
            msg.name = mf
                .str("name")
                .map_err(|e| renamed(e, &p))?
                .map(str::to_string);
        }
        msg.content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (k, part) in parts.iter().enumerate() {
                    let pp = format!("{p}.content[{k}]");
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => s.push_str(t),
                        (Some("text"), _) => {
                            return Err(ApiError::param(&pp, format!("{pp}.text must be a string")))
                        }
                        (Some(other), _) => {
                            return Err(ApiError::param(&pp, format!("{pp}: content parts of type '{other}' are not supported (text only)")))
                        }
                        (None, _) => return Err(ApiError::param(&pp, format!("{pp} needs a type"))),
                    }
                }
                s
            }
            _ => {
                return Err(ApiError::param(
                    &format!("{p}.content"),
                    format!("{p}.content must be a string or an array of text parts"),
                ))
            }
        };
        out.push(msg);
    }
    Ok(out)
}

/// An error about a field of an inner object, renamed to its path under `prefix`.
fn renamed(mut e: ApiError, prefix: &str) -> ApiError {
    if let Some(k) = e.param.take() {
        e.message = format!("{prefix}.{}", e.message);
        e.param = Some(format!("{prefix}.{k}"));
    }
    e
}

/// An assistant message's `tool_calls` (at `p`).
fn tool_calls(v: &Value, p: &str) -> Result<Vec<ToolCall>, ApiError> {
    let Some(list) = v.as_array() else {
        return Err(ApiError::param(p, format!("{p} must be an array")));
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let cp = format!("{p}[{j}]");
        let Some(o) = c.as_object() else {
            return Err(ApiError::param(&cp, format!("{cp} must be an object")));
        };
        let cf = Fields(o);
        if cf
            .str("type")
            .map_err(|e| renamed(e, &cp))?
            .is_some_and(|t| t != "function")
        {
            return Err(ApiError::param(
                &format!("{cp}.type"),
                format!("{cp}.type must be \"function\""),
            ));
        }
        let id = cf.str("id").map_err(|e| renamed(e, &cp))?.unwrap_or("");
        let fp = format!("{cp}.function");
        let Some(fun) = cf.value("function").and_then(Value::as_object) else {
            return Err(ApiError::param(&fp, format!("{fp} must be an object")));
        };
        let ff = Fields(fun);
        let name = ff
            .str("name")
            .map_err(|e| renamed(e, &fp))?
            .ok_or_else(|| {
                ApiError::param(&format!("{fp}.name"), format!("{fp}.name is required"))
            })?;
        let ap = format!("{fp}.arguments");
        let arguments = match ff.value("arguments") {
            None => Value::Object(Map::new()),
            Some(Value::String(s)) => serde_json::from_str(s)
                .map_err(|e| ApiError::param(&ap, format!("{ap} is not valid JSON: {e}")))?,
            Some(Value::Object(o)) => Value::Object(o.clone()),
            Some(other) => {
                return Err(ApiError::param(
                    &ap,
                    format!("{ap} must be a JSON string, not {}", type_name(other)),
                ))
            }
        };
        out.push(ToolCall {
            id: id.to_string(),
            name: name.to_string(),
            arguments,
        });
    }
    Ok(out)
}

/// `prompt` of `/v1/completions`: a string, an array of one string, or an array of token ids.
pub enum Prompt {
    /// Text (tokenized with BOS and special tokens parsed, as `pshard run`).
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// Reads `prompt`.
pub fn prompt(f: &Fields<'_>) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "prompt must be a string, an array of one string, or an array of token ids",
        )
    };
    match f.value("prompt") {
        None => Err(ApiError::param("prompt", "prompt is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && a.len() > 1 => {
            Err(ApiError::param(
                "prompt",
                "prompt: one prompt per request (send the others as their own requests)",
            ))
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()
            .map(Prompt::Tokens),
        Some(_) => Err(bad()),
    }
}

/// Text that ends at the first stop string, released as soon as no stop string can still begin
/// in it.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    /// Watches for `stops`.
    pub fn new(stops: Vec<String>) -> StopText {
        StopText {
            stops,
            held: String::new(),
        }
    }

    /// Adds text; returns what can be released and whether a stop string was found (the text
    /// before it is released, the stop string and anything after it are not).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let cut = self.held.len() - partial_suffix(&self.held, &self.stops);
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The text still held back (the generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest tail of `text` that is the beginning (not the whole) of one of
/// `words`: text to hold back while one of them may still be arriving.
pub fn partial_suffix(text: &str, words: &[impl AsRef<str>]) -> usize {
    let mut keep = 0;
    for w in words {
        let w = w.as_ref();
        for (i, _) in w.char_indices().skip(1) {
            if i > keep && text.ends_with(&w[..i]) {
                keep = i;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_text_holds_back_partial_matches_and_cuts_at_the_first_stop() {
        let mut s = StopText::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(s.push("Hello E"), ("Hello ".into(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("x"), ("ENx".into(), false));
        assert_eq!(s.push(" a\n"), (" a".into(), false));
        assert_eq!(s.push("\nmore END"), (String::new(), true));
        let mut s = StopText::new(vec!["b".into()]);
        assert_eq!(s.push("aaa"), ("aaa".into(), false));
        assert_eq!(s.finish(), "");
        let mut s = StopText::new(vec!["ab".into()]);
        assert_eq!(s.push("xa"), ("x".into(), false));
        assert_eq!(s.finish(), "a");
    }

    #[test]
    fn parameters_are_checked_by_name() {
        let body = |s: &str| parse_object(s.as_bytes());
        let p = |s: &str| gen_params(&Fields(&body(s).unwrap()), 100);
        assert_eq!(p("{}").unwrap().sampler, SamplerParams::default());
        let g = p(
            r#"{"temperature":0,"max_tokens":5,"stop":"x","seed":7,"stream":true,
            "stream_options":{"include_usage":true},"top_k":3,"n":1}"#,
        )
        .unwrap();
        assert_eq!(g.max_tokens, Some(5));
        assert_eq!(g.sampler.temperature, 0.0);
        assert_eq!(g.sampler.top_k, 3);
        assert_eq!(g.sampler.seed, Some(7));
        assert_eq!(g.stop, vec!["x".to_string()]);
        assert!(g.stream && g.include_usage);
        for (bad, param) in [
            (r#"{"temperature":"hot"}"#, "temperature"),
            (r#"{"temperature":3}"#, "temperature"),
            (r#"{"max_tokens":101}"#, "max_tokens"),
            (r#"{"max_tokens":0}"#, "max_tokens"),
            (r#"{"max_tokens":1.5}"#, "max_tokens"),
            (r#"{"n":2}"#, "n"),
            (r#"{"stop":[1]}"#, "stop"),
            (r#"{"stop":""}"#, "stop"),
            (r#"{"logprobs":true}"#, "logprobs"),
            (r#"{"stream":"yes"}"#, "stream"),
            (
                r#"{"response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
        ] {
            let e = p(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param.as_deref(), Some(param), "{bad}: {e:?}");
        }
        assert!(body("{").unwrap_err().message.contains("not valid JSON"));
        assert!(body("[1]").unwrap_err().message.contains("not an array"));
    }

    #[test]
    fn messages_are_checked_by_name() {
        let m = |s: &str, tools| messages(&Fields(&parse_object(s.as_bytes()).unwrap()), tools);
        let ok = m(
            r#"{"messages":[{"role":"developer","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
            {"role":"assistant","content":null}]}"#,
            false,
        )
        .unwrap();
        assert_eq!(ok[0].role, "system");
        assert_eq!(ok[1].content, "ab");
        assert_eq!(ok[2].content, "");
        for (bad, param) in [
            (r#"{}"#, "messages"),
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"messages":"hi"}"#, "messages"),
            (
                r#"{"messages":[{"role":"robot","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content[0]",
            ),
            (
                r#"{"messages":[{"role":"tool","content":"22 C","tool_call_id":"a"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[]}]}"#,
                "messages[0].tool_calls",
            ),
        ] {
            let e = m(bad, false).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}: {e:?}");
        }
    }

    #[test]
    fn tool_messages_reach_the_template_in_hf_form() {
        let m = |s: &str| messages(&Fields(&parse_object(s.as_bytes()).unwrap()), true);
        let ok = m(r#"{"messages":[
            {"role":"user","content":"Weather in Paris?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"abc123XYZ","type":"function",
              "function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"abc123XYZ","name":"get_weather","content":"22 C"}]}"#)
        .unwrap();
        assert_eq!(
            ok[1].tool_calls,
            [ToolCall {
                id: "abc123XYZ".into(),
                name: "get_weather".into(),
                arguments: json!({"city": "Paris"}),
            }]
        );
        assert_eq!(ok[1].content, "");
        assert_eq!(ok[2].role, "tool");
        assert_eq!(ok[2].tool_call_id.as_deref(), Some("abc123XYZ"));
        assert_eq!(ok[2].name.as_deref(), Some("get_weather"));
        let call = |c: &str| {
            format!(r#"{{"messages":[{{"role":"assistant","content":null,"tool_calls":[{c}]}}]}}"#)
        };
        for (bad, param) in [
            (
                call(r#"{"type":"function","function":{"name":"f","arguments":"{bad"}}"#),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                call(r#"{"type":"function","function":{"arguments":"{}"}}"#),
                "messages[0].tool_calls[0].function.name",
            ),
            (
                call(r#"{"type":"function","function":{"name":"f","arguments":5}}"#),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                call(r#"{"type":"retrieval"}"#),
                "messages[0].tool_calls[0].type",
            ),
            (
                call(r#"{"type":"function"}"#),
                "messages[0].tool_calls[0].function",
            ),
            (
                r#"{"messages":[{"role":"tool","content":"x","tool_call_id":7}]}"#.into(),
                "messages[0].tool_call_id",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x","tool_calls":[]}]}"#.into(),
                "messages[0].tool_calls",
            ),
            (
                r#"{"messages":[{"role":"function","content":"x"}]}"#.into(),
                "messages[0].role",
            ),
        ] {
            let e = m(&bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}: {e:?}");
            assert!(e.message.contains(param), "{e:?}");
        }
    }

    #[test]
    fn tools_and_tool_choice_are_checked_by_name() {
        let body = |s: &str| parse_object(s.as_bytes()).unwrap();
        let weather = r#"{"type":"function","function":{"name":"get_weather","description":"d",
            "parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}"#;
        let o = body(&format!(
            r#"{{"tools":[{weather}],"tool_choice":"required"}}"#
        ));
        let t = tools(&Fields(&o), true).unwrap();
        assert_eq!(tool_names(&t), ["get_weather"]);
        assert_eq!(tool_choice(&Fields(&o), &t).unwrap(), ToolChoice::Required);
        let named = body(&format!(
            r#"{{"tools":[{weather}],"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}}}"#
        ));
        assert_eq!(
            tool_choice(&Fields(&named), &t).unwrap(),
            ToolChoice::Function("get_weather".into())
        );
        assert_eq!(
            tool_choice(&Fields(&body("{}")), &[]).unwrap(),
            ToolChoice::Auto
        );
        assert_eq!(
            tool_choice(&Fields(&body(r#"{"tool_choice":"none"}"#)), &[]).unwrap(),
            ToolChoice::None
        );
        // No tools in the template: a clear refusal; an empty list is no tools.
        let e = tools(&Fields(&o), false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
        assert!(e.message.contains("template has no tools"), "{e:?}");
        assert!(tools(&Fields(&body(r#"{"tools":[]}"#)), false)
            .unwrap()
            .is_empty());
        for (bad, param) in [
            (r#"{"tools":{"a":1}}"#, "tools"),
            (r#"{"tools":[5]}"#, "tools[0]"),
            (
                r#"{"tools":[{"type":"code_interpreter"}]}"#,
                "tools[0].type",
            ),
            (r#"{"tools":[{"type":"function"}]}"#, "tools[0].function"),
            (
                r#"{"tools":[{"type":"function","function":{"description":"no name"}}]}"#,
                "tools[0].function.name",
            ),
            (
                r#"{"tools":[{"type":"function","function":{"name":"has space"}}]}"#,
                "tools[0].function.name",
            ),
            (
                r#"{"tools":[{"type":"function","function":{"name":"f","parameters":"x"}}]}"#,
                "tools[0].function.parameters",
            ),
            (
                r#"{"tools":[{"type":"function","function":{"name":"f","description":1}}]}"#,
                "tools[0].function.description",
            ),
            (
                r#"{"tools":[{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"f"}}]}"#,
                "tools[1].function.name",
            ),
        ] {
            let e = tools(&Fields(&body(bad)), true).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(param), "{bad}: {e:?}");
        }
        for bad in [
            r#"{"tool_choice":{"type":"function","function":{"name":"launch"}}}"#,
            r#"{"tool_choice":"sometimes"}"#,
            r#"{"tool_choice":{"type":"function"}}"#,
            r#"{"tool_choice":3}"#,
        ] {
            let e = tool_choice(&Fields(&body(bad)), &t).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("tool_choice"), "{bad}: {e:?}");
        }
        let e = tool_choice(&Fields(&body(r#"{"tool_choice":"required"}"#)), &[]).unwrap_err();
        assert!(e.message.contains("no tools"), "{e:?}");
        let e = tool_choice(
            &Fields(&body(
                r#"{"tool_choice":{"type":"function","function":{"name":"launch"}}}"#,
            )),
            &t,
        )
        .unwrap_err();
        assert!(
            e.message.contains("'launch'") && e.message.contains("get_weather"),
            "{e:?}"
        );
    }
}
