//! Chat templates: the Jinja template a GGUF carries in `tokenizer.chat_template`, rendered with
//! minijinja configured like Hugging Face's renderer (`trim_blocks`, `lstrip_blocks`, loop controls,
//! Python string/dict methods such as `.strip()` and `.items()`, `raise_exception`, `strftime_now`).
//!
//! A few built-in templates ([`ChatTemplate::builtin`]) cover models whose file has no template.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};
use pshard_model::gguf::{GgufHeader, MetaValue};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` (templates may know others).
    pub role: String,
    /// The message text.
    pub content: String,
    /// The tool calls an assistant message made (templates see them as `message.tool_calls`).
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers (`message.tool_call_id`).
    pub tool_call_id: Option<String>,
    /// The name of the tool a `tool` message comes from, if given (`message.name`).
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message from role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// The message as a template reads it, in Hugging Face's convention: `role`, `content`, and
    /// only where given `tool_calls` (each `{id, type: "function", function: {name, arguments}}`
    /// with `arguments` a JSON value, not a string), `tool_call_id` and `name`.
    fn to_template(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("role".into(), self.role.clone().into());
        m.insert("content".into(), self.content.clone().into());
        if !self.tool_calls.is_empty() {
            let calls = self
                .tool_calls
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    })
                })
                .collect();
            m.insert("tool_calls".into(), serde_json::Value::Array(calls));
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), id.clone().into());
        }
        if let Some(n) = &self.name {
            m.insert("name".into(), n.clone().into());
        }
        serde_json::Value::Object(m)
    }
}

/// One tool call of an assistant message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// The call's id (tool messages answer it by `tool_call_id`).
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments (a JSON object as a rule; OpenAI sends them as a JSON string, which the caller
    /// parses first, as templates write them with `tojson`).
    pub arguments: serde_json::Value,
}

/// An error compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not compile.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// Rendering failed (including the template's own `raise_exception`).
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// `tokenizer.chat_template` is present but not a string.
    #[error("GGUF metadata key `tokenizer.chat_template` should be a string")]
    NotAString,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

/// ChatML (`<|im_start|>role\n...<|im_end|>\n`).
const CHATML: &str = "{%- for message in messages -%}\
{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// Gemma 2/3: roles `user` and `model`; a system message is folded into the first user turn.
const GEMMA: &str = "{{- bos_token -}}\
{%- if messages and messages[0]['role'] == 'system' -%}\
{%- set prefix = messages[0]['content'] | trim ~ '\\n\\n' -%}{%- set turns = messages[1:] -%}\
{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}\
{%- for message in turns -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{- '<start_of_turn>' ~ role ~ '\\n' ~ (prefix if loop.first else '') ~ message['content'] | trim ~ '<end_of_turn>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}";

/// Llama 3 (`<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`).
const LLAMA3: &str = "{{- bos_token -}}\
{%- for message in messages -%}\
{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ message['content'] | trim ~ '<|eot_id|>' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}";

impl ChatTemplate {
    /// Names accepted by [`ChatTemplate::builtin`].
    pub const BUILTIN_NAMES: &'static [&'static str] = &["chatml", "gemma", "llama3"];

    /// Compiles a Jinja chat template.
    pub fn new(source: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
        })
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), or `None` when the file has none.
    pub fn from_gguf(header: &GgufHeader) -> Result<Option<ChatTemplate>, ChatError> {
        match header.get("tokenizer.chat_template") {
            None => Ok(None),
            Some(MetaValue::String(s)) => ChatTemplate::new(s).map(Some),
            Some(_) => Err(ChatError::NotAString),
        }
    }

    /// A built-in template by name (see [`ChatTemplate::BUILTIN_NAMES`]).
    pub fn builtin(name: &str) -> Option<ChatTemplate> {
        let src = match name {
            "chatml" => CHATML,
            "gemma" | "gemma2" | "gemma3" => GEMMA,
            "llama3" => LLAMA3,
            _ => return None,
        };
        // The built-in sources are constants covered by tests.
        ChatTemplate::new(src).ok()
    }

    /// A built-in name, or else Jinja source (for a `--chat-template` argument).
    pub fn from_name_or_source(s: &str) -> Result<ChatTemplate, ChatError> {
        match ChatTemplate::builtin(s) {
            Some(t) => Ok(t),
            None => ChatTemplate::new(s),
        }
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template reads a `tools` variable (mentions `tools` at all: templates without
    /// tool support never do).
    pub fn knows_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders the conversation. `add_generation_prompt` appends the opening of the assistant's turn.
    /// `bos_token`/`eos_token` are the texts of those tokens (templates may write them).
    pub fn apply(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatError> {
        self.apply_with_tools(messages, &[], add_generation_prompt, bos_token, eos_token)
    }

    /// [`ChatTemplate::apply`] with the tools the model may call: `tools` is the OpenAI list
    /// (`{"type": "function", "function": {"name", "description", "parameters"}}` each) and reaches
    /// the template as the variable `tools`, `none` when empty, as Hugging Face's
    /// `apply_chat_template` passes it.
    pub fn apply_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatError> {
        let msgs: Vec<serde_json::Value> = messages.iter().map(ChatMessage::to_template).collect();
        let tools = if tools.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::Array(tools.to_vec())
        };
        let ctx = Value::from(BTreeMap::from([
            ("messages", to_jinja(serde_json::Value::Array(msgs))?),
            ("tools", to_jinja(tools)?),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(bos_token)),
            ("eos_token", Value::from(eos_token)),
        ]));
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        tmpl.render(ctx)
            .map_err(|e| ChatError::Render(describe(&e)))
    }
}

/// A JSON value as a template value.
fn to_jinja(v: serde_json::Value) -> Result<Value, ChatError> {
    <Value as serde::Deserialize>::deserialize(v)
        .map_err(|e| ChatError::Render(format!("converting the messages: {e}")))
}

fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `tojson` as Hugging Face's renderer writes it (Python's `json.dumps(x, ensure_ascii=False)`):
/// `", "` and `": "` between items, or with `indent=N` one item a line (`","` and `": "`); no
/// HTML escaping of `<>&'` (minijinja's own filter escapes them, which changes what the model
/// reads in tool descriptions). `sort_keys`, `ensure_ascii` and `separators` are accepted and
/// ignored (keys come in the order the request gave them).
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: minijinja::value::Kwargs,
) -> Result<Value, Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    for k in ["sort_keys", "ensure_ascii", "separators"] {
        let _: Option<Value> = kwargs.get(k)?;
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    })?;
    let mut out = String::new();
    write_json(&mut out, &json, indent, 0);
    Ok(Value::from_safe_string(out))
}

/// Writes `v` as Python's `json.dumps` does (see [`tojson`]); `depth` is the nesting so far.
fn write_json(out: &mut String, v: &serde_json::Value, indent: Option<usize>, depth: usize) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json(out, x, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                out.push_str(": ");
                write_json(out, x, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        // Scalars, `[]` and `{}`: serde_json writes them as Python does (strings escaped alike).
        other => out.push_str(&other.to_string()),
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC time; supports `%Y %y %m %d %e %H %M %S %j %b %B %a %A %p
/// %I %%`, other directives are kept as written.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday)
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let (h, m, s) = (sod / 3600, sod / 60 % 60, sod % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", " Hi! "),
            ChatMessage::new("assistant", "Hello."),
        ]
    }

    #[test]
    fn templates_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn builtins_render() {
        let g = ChatTemplate::builtin("gemma").unwrap();
        assert_eq!(
            g.apply(&conv(), true, "<bos>", "<eos>").unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>model\n"
        );
        let c = ChatTemplate::builtin("chatml").unwrap();
        assert_eq!(
            c.apply(&conv()[1..2], true, "", "").unwrap(),
            "<|im_start|>user\n Hi! <|im_end|>\n<|im_start|>assistant\n"
        );
        let l = ChatTemplate::builtin("llama3").unwrap();
        assert_eq!(
            l.apply(&conv()[1..2], false, "<|begin_of_text|>", "")
                .unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        );
        for name in ChatTemplate::BUILTIN_NAMES {
            assert!(ChatTemplate::builtin(name).is_some(), "{name}");
        }
        assert!(ChatTemplate::builtin("nope").is_none());
    }

    #[test]
    fn python_methods_loop_controls_and_exceptions() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
             {{ m.content.strip().upper() }}{% if m.content.startswith(' Hi') %}!{% endif %}\
             {% endfor %}{{ 'x' if add_generation_prompt }}",
        )
        .unwrap();
        assert_eq!(t.apply(&conv(), true, "", "").unwrap(), "HI!!HELLO.x");
        let e = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let err = e.apply(&conv(), false, "", "").unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        assert!(matches!(
            ChatTemplate::new("{% if %}"),
            Err(ChatError::Syntax(_))
        ));
        let d = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}").unwrap();
        assert_eq!(d.apply(&[], false, "", "").unwrap().len(), 11);
    }

    fn weather_tool() -> serde_json::Value {
        serde_json::json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city, today's.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
        }})
    }

    /// A user question, the assistant's call (id 9 characters, as Mistral demands), the tool's
    /// answer.
    fn tool_turns() -> Vec<ChatMessage> {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![ToolCall {
            id: "call00001".into(),
            name: "get_weather".into(),
            arguments: serde_json::json!({"city": "Paris"}),
        }];
        let mut result = ChatMessage::new("tool", "22 C, sunny");
        result.tool_call_id = Some("call00001".into());
        result.name = Some("get_weather".into());
        vec![ChatMessage::new("user", "Weather in Paris?"), call, result]
    }

    /// Qwen 2.5's way (Hermes-style): tools one per line with `tojson` in the system turn, calls
    /// in `<tool_call>` with `tool_call.function` unwrapped and `arguments | tojson`, tool results
    /// grouped into one user turn by looking at the neighbouring messages.
    /// (Also the template the server's HTTP test of tool calls runs.)
    const QWEN_LIKE: &str = include_str!("../tests/fixtures/hermes_tools.jinja");

    #[test]
    fn qwen_style_template_renders_tools_calls_and_results() {
        let t = ChatTemplate::new(QWEN_LIKE).unwrap();
        assert!(t.knows_tools());
        let out = t
            .apply_with_tools(&tool_turns(), &[weather_tool()], true, "", "")
            .unwrap();
        let want = "<|im_start|>system\nYou may call functions.\n<tools>\n\
            {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"The weather in a city, today's.\", \
            \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\
            Answer with <tool_call>{\"name\": <name>, \"arguments\": <object>}</tool_call>.<|im_end|>\n\
            <|im_start|>user\nWeather in Paris?<|im_end|>\n\
            <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
            <|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response><|im_end|>\n\
            <|im_start|>assistant\n";
        assert_eq!(out, want);
        // No tools: `tools` is none, so the template writes no tools section.
        let plain = t.apply(&tool_turns()[..1], true, "", "").unwrap();
        assert_eq!(
            plain,
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Llama 3.1's way: tools checked with `is not none`, written with `tojson(indent=4)` into the
    /// first user turn; one call per message as `{"name", "parameters"}`; results in `ipython`
    /// turns, written with `tojson` when the content is a mapping or iterable (a string is one).
    const LLAMA31_LIKE: &str = r#"{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' and loop.first and tools is not none %}
{{- '<|start_header_id|>user<|end_header_id|>\n\nFunctions:\n\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{{- message.content + '<|eot_id|>' }}
{%- elif message.tool_calls is defined and message.tool_calls %}
{%- if message.tool_calls|length != 1 %}{{- raise_exception("one call per message") }}{%- endif %}
{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}<|eot_id|>' }}
{%- elif message.role == 'tool' or message.role == 'ipython' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
{{- '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"#;

    #[test]
    fn llama31_style_template_renders_tools_calls_and_results() {
        let t = ChatTemplate::new(LLAMA31_LIKE).unwrap();
        let out = t
            .apply_with_tools(
                &tool_turns(),
                &[weather_tool()],
                true,
                "<|begin_of_text|>",
                "",
            )
            .unwrap();
        let want = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nFunctions:\n\n\
            {\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\",\n        \
            \"description\": \"The weather in a city, today's.\",\n        \"parameters\": {\n            \
            \"type\": \"object\",\n            \"properties\": {\n                \"city\": {\n                    \
            \"type\": \"string\"\n                }\n            },\n            \"required\": [\n                \
            \"city\"\n            ]\n        }\n    }\n}\n\nWeather in Paris?<|eot_id|>\
            <|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>\
            <|start_header_id|>ipython<|end_header_id|>\n\n\"22 C, sunny\"<|eot_id|>\
            <|start_header_id|>assistant<|end_header_id|>\n\n";
        assert_eq!(out, want);
        let plain = t.apply(&tool_turns()[..1], false, "", "").unwrap();
        assert_eq!(
            plain,
            "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        );
    }

    /// Mistral's way: `[AVAILABLE_TOOLS]` before the last user message, a call written as its
    /// `function | tojson` with the closing brace cut off and the id put in (ids of 9 characters
    /// or the template raises), results as `[TOOL_RESULTS]` with `tool_call_id`.
    const MISTRAL_LIKE: &str = r#"{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if tools is not none and loop.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{{- '[INST] ' + message.content + '[/INST]' }}
{%- elif message.tool_calls is defined and message.tool_calls is not none %}
{{- '[TOOL_CALLS] [' }}
{%- for tool_call in message.tool_calls %}
{%- set out = tool_call.function | tojson %}
{{- out[:-1] }}
{%- if tool_call.id is not defined or tool_call.id | length != 9 %}{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}
{{- ', "id": "' + tool_call.id + '"}' }}
{%- if not loop.last %}{{- ', ' }}{%- endif %}
{%- endfor %}
{{- ']' + eos_token }}
{%- elif message.role == 'tool' %}
{{- '[TOOL_RESULTS] {"content": ' + message.content | tojson + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
{%- elif message.role == 'assistant' %}
{{- ' ' + message.content + eos_token }}
{%- endif %}
{%- endfor %}"#;

    #[test]
    fn mistral_style_template_renders_tools_calls_and_results() {
        let t = ChatTemplate::new(MISTRAL_LIKE).unwrap();
        let mut turns = tool_turns();
        turns.push(ChatMessage::new("user", "And tomorrow?"));
        let out = t
            .apply_with_tools(&turns, &[weather_tool()], false, "<s>", "</s>")
            .unwrap();
        assert_eq!(
            out,
            "<s>[INST] Weather in Paris?[/INST]\
             [TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"call00001\"}]</s>\
             [TOOL_RESULTS] {\"content\": \"22 C, sunny\", \"call_id\": \"call00001\"}[/TOOL_RESULTS]\
             [AVAILABLE_TOOLS] [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \
             \"description\": \"The weather in a city, today's.\", \"parameters\": {\"type\": \"object\", \
             \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}][/AVAILABLE_TOOLS]\
             [INST] And tomorrow?[/INST]"
        );
        // Without tools nothing of them is written (`tools` is none, not undefined).
        let plain = t.apply(&turns[3..], false, "<s>", "</s>").unwrap();
        assert_eq!(plain, "<s>[INST] And tomorrow?[/INST]");
        // The template's own check of ids comes back as a render error.
        turns[1].tool_calls[0].id = "x".into();
        let e = t
            .apply_with_tools(&turns, &[weather_tool()], false, "<s>", "</s>")
            .unwrap_err();
        assert!(e.to_string().contains("length 9"), "{e}");
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ [] | tojson }}|{{ {} | tojson(indent=2) }}|{{ s | tojson }}",
        )
        .unwrap();
        let tmpl = t.env.get_template(NAME).unwrap();
        let out = tmpl
            .render(minijinja::context! {
                x => to_jinja(serde_json::json!({"a": [1, 2.5, null, true], "b": "it's <b>&"})).unwrap(),
                s => "line\nbreak \"quoted\" é",
            })
            .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, null, true], \"b\": \"it's <b>&\"}|\
             {\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": \"it's <b>&\"\n}|\
             []|{}|\"line\\nbreak \\\"quoted\\\" é\""
        );
        assert!(ChatTemplate::new("{{ 1 | tojson(bogus=1) }}")
            .unwrap()
            .apply(&[], false, "", "")
            .is_err());
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %%", 0),
            "1970-01-01 00:00:00 Thu Thursday Jan January 001 %"
        );
        // 2024-02-29 13:05:09 UTC (a leap day) = 1709211909
        assert_eq!(
            strftime("%d %b %Y %I%p %y %e", 1_709_211_909),
            "29 Feb 2024 01PM 24 29"
        );
        assert_eq!(strftime("%q", 0), "%q");
        for days in [-1000i64, 0, 59, 365, 11_016, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
