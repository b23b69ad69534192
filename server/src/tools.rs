//! Tool calls in model replies: which format a chat template teaches its model
//! ([`ToolFormat::of`], the one place that decides), and reading the calls out of the reply's text
//! as it streams ([`ToolReader`]).
//!
//! A reply is text until a call's opening marker (`<tool_call>`, `[TOOL_CALLS]`,
//! `<|python_tag|>`, or for the JSON format a `{` that begins the reply). From there on the text is
//! held back to the end of the generation and then read as calls; when it is not a valid call (bad
//! JSON, no `name`, a function the request did not offer, text after the calls) the held text is
//! released as ordinary content, so nothing the model wrote is lost. Streaming holds back the
//! same way, so a streamed reply and a whole one agree; the price is that a call's arguments
//! arrive in one piece at the end of the generation rather than as they are written.

use serde_json::Value;

/// How a model writes its tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Hermes 2
    /// Pro, Qwen 2.5 and 3, and the other templates that write `<tool_call>`).
    Hermes,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral's templates).
    Mistral,
    /// The reply is JSON: `{"name": ..., "parameters": {...}}` (`arguments` is read too), several
    /// separated by `;`, or an array of them, optionally after `<|python_tag|>` (Llama 3.1/3.2).
    /// Also the format of a template that knows tools but writes none of the other markers.
    Json,
}

/// The markers the formats write around their calls.
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The format a chat template teaches, or `None` when the template has no tools.
    pub fn of(template: &pshard_tokenizer::ChatTemplate) -> Option<ToolFormat> {
        if !template.knows_tools() {
            return None;
        }
        let src = template.source();
        Some(if src.contains(HERMES_OPEN) {
            ToolFormat::Hermes
        } else if src.contains(MISTRAL_OPEN) {
            ToolFormat::Mistral
        } else {
            ToolFormat::Json
        })
    }

    /// The marker that opens a call. Where the vocabulary has it as a control token, generation
    /// must show that token's text (control tokens are otherwise left out of replies).
    pub fn marker(self) -> &'static str {
        match self {
            ToolFormat::Hermes => HERMES_OPEN,
            ToolFormat::Mistral => MISTRAL_OPEN,
            ToolFormat::Json => PYTHON_TAG,
        }
    }

    /// The text the reply is made to begin with when a call is required (`tool_choice:
    /// "required"`, or a named function): the opening of a call, with the function's name when
    /// one is named. It goes at the end of the prompt, and is the beginning of the text read.
    pub fn forced_opening(self, function: Option<&str>) -> String {
        let name = |n: &str| Value::from(n).to_string();
        match (self, function) {
            (ToolFormat::Hermes, None) => format!("{HERMES_OPEN}\n"),
            (ToolFormat::Hermes, Some(f)) => {
                format!("{HERMES_OPEN}\n{{\"name\": {}, \"arguments\": ", name(f))
            }
            (ToolFormat::Mistral, None) => MISTRAL_OPEN.to_string(),
            (ToolFormat::Mistral, Some(f)) => {
                format!("{MISTRAL_OPEN}[{{\"name\": {}, \"arguments\": ", name(f))
            }
            (ToolFormat::Json, None) => "{\"name\": \"".to_string(),
            (ToolFormat::Json, Some(f)) => format!("{{\"name\": {}, \"parameters\": ", name(f)),
        }
    }

    /// Reads a whole reply: `Some` when it holds calls of functions in `names` (the text before
    /// them is the content), `None` when it is ordinary content.
    pub fn parse(self, text: &str, names: &[String]) -> Option<Reply> {
        let mut r = ToolReader::new(self, names.to_vec(), String::new());
        let content = r.push(text);
        let end = r.finish();
        (!end.calls.is_empty()).then(|| Reply {
            content: content + &end.content,
            calls: end.calls,
        })
    }

    /// The calls in `s`, which begins where a call may begin (at its marker, or for the JSON
    /// format at the reply's first `{`); `None` unless all of `s` is calls.
    fn calls(self, s: &str, names: &[String]) -> Option<Vec<Call>> {
        let mut out = Vec::new();
        let mut s = s.trim_start();
        match self {
            ToolFormat::Hermes => {
                while !s.is_empty() {
                    s = s.strip_prefix(HERMES_OPEN)?;
                    let (v, rest) = take_json(s)?;
                    out.push(call(v, names)?);
                    let rest = rest.trim_start();
                    // A missing closing tag is accepted at the very end (models stop there).
                    s = match rest.strip_prefix(HERMES_CLOSE) {
                        Some(r) => r.trim_start(),
                        None if rest.is_empty() => rest,
                        None => return None,
                    };
                }
            }
            ToolFormat::Mistral => {
                while !s.is_empty() {
                    s = s.strip_prefix(MISTRAL_OPEN)?;
                    let (v, rest) = take_json(s)?;
                    out.extend(calls_of(v, names)?);
                    s = rest.trim_start();
                }
            }
            ToolFormat::Json => {
                s = s.strip_prefix(PYTHON_TAG).unwrap_or(s);
                loop {
                    let (v, rest) = take_json(s)?;
                    out.extend(calls_of(v, names)?);
                    let rest = rest.trim_start();
                    match rest.strip_prefix(';') {
                        Some(r) => s = r,
                        None if rest.is_empty() => break,
                        None => return None,
                    }
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// One JSON value at the start of `s` (after whitespace) and the text after it.
fn take_json(s: &str) -> Option<(Value, &str)> {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    let v = it.next()?.ok()?;
    Some((v, &s[it.byte_offset()..]))
}

/// An object is one call, an array a list of them.
fn calls_of(v: Value, names: &[String]) -> Option<Vec<Call>> {
    match v {
        Value::Array(a) => a.into_iter().map(|c| call(c, names)).collect(),
        other => Some(vec![call(other, names)?]),
    }
}

/// `{"name": ..., "arguments" | "parameters": {...}}` (the arguments may be a JSON string holding
/// an object; absent arguments are `{}`), naming one of `names`.
fn call(v: Value, names: &[String]) -> Option<Call> {
    let Value::Object(mut o) = v else {
        return None;
    };
    let name = match o.remove("name")? {
        Value::String(n) if names.contains(&n) => n,
        _ => return None,
    };
    let args = match o.remove("arguments").or_else(|| o.remove("parameters")) {
        None => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str::<Value>(&s).ok()?,
        Some(a) => a,
    };
    if !args.is_object() {
        return None;
    }
    Some(Call {
        name,
        arguments: args.to_string(),
    })
}

/// One call read from a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The function.
    pub name: String,
    /// Its arguments: a JSON object, as a string (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A reply read whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The text before the calls (or, from [`ToolReader::finish`], what is left to release).
    pub content: String,
    /// The calls, in order.
    pub calls: Vec<Call>,
}

/// Reads a reply as it is generated: releases text that cannot be part of a call, holds back
/// from a call's opening marker (or from a prefix of one at the end of the text) to the end.
#[derive(Debug)]
pub struct ToolReader {
    format: ToolFormat,
    names: Vec<String>,
    text: String,
    released: usize,
    holding: bool,
}

impl ToolReader {
    /// A reader of calls of `names` in `format`; `opening` is text the reply was made to begin
    /// with ([`ToolFormat::forced_opening`]), read as its beginning.
    pub fn new(format: ToolFormat, names: Vec<String>, opening: String) -> ToolReader {
        let mut r = ToolReader {
            format,
            names,
            text: String::new(),
            released: 0,
            holding: false,
        };
        let early = r.push(&opening);
        debug_assert!(early.is_empty() || opening.is_empty(), "{early:?}");
        r
    }

    /// Adds generated text; returns the content that can be released now.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.holding {
            return String::new();
        }
        let rest = &self.text[self.released..];
        let marker = self.format.marker();
        let hold_at = if let Some(at) = rest.find(marker) {
            self.holding = true;
            at
        } else if self.format == ToolFormat::Json
            && self.text[..self.released].trim().is_empty()
            && rest.trim_start().starts_with('{')
        {
            self.holding = true;
            0
        } else if self.format == ToolFormat::Json && self.text.trim().is_empty() {
            // Whitespace before what may be a JSON call.
            0
        } else {
            rest.len() - crate::api::partial_suffix(rest, &[marker])
        };
        let out = rest[..hold_at].to_string();
        self.released += hold_at;
        out
    }

    /// The end of the reply: the calls (empty when the held text is not a valid call) and the
    /// content still to release (held text that was not a call).
    pub fn finish(self) -> Reply {
        let rest = &self.text[self.released..];
        if self.holding {
            if let Some(calls) = self.format.calls(rest, &self.names) {
                return Reply {
                    content: String::new(),
                    calls,
                };
            }
        }
        Reply {
            content: rest.to_string(),
            calls: Vec::new(),
        }
    }
}

/// A fresh tool-call id: 9 letters and digits, the form Mistral's templates demand of the ids
/// they are given back (and that every other template accepts).
pub fn call_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    // RandomState is seeded randomly per process; the counter makes every id of it differ.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut x = h.finish();
    (0..9)
        .map(|_| {
            let c = ALNUM[(x % ALNUM.len() as u64) as usize] as char;
            x /= ALNUM.len() as u64;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pshard_tokenizer::ChatTemplate;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "get_time".into()]
    }

    fn call(name: &str, args: &str) -> Call {
        Call {
            name: name.into(),
            arguments: args.into(),
        }
    }

    /// Parses `text` whole and streamed in pieces of every size from 1 to 7 bytes (on character
    /// boundaries); both must agree, and the released content must never include held text.
    fn read(f: ToolFormat, text: &str) -> Option<Reply> {
        let whole = f.parse(text, &names());
        for step in 1..=7 {
            let mut r = ToolReader::new(f, names(), String::new());
            let mut content = String::new();
            let mut at = 0;
            while at < text.len() {
                let mut end = (at + step).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                content += &r.push(&text[at..end]);
                at = end;
            }
            let end = r.finish();
            content += &end.content;
            match &whole {
                Some(w) => {
                    assert_eq!(end.calls, w.calls, "{text:?} in pieces of {step}");
                    assert_eq!(content, w.content, "{text:?} in pieces of {step}");
                }
                None => {
                    assert!(end.calls.is_empty());
                    assert_eq!(content, text, "{text:?} in pieces of {step}");
                }
            }
        }
        whole
    }

    #[test]
    fn hermes_calls_one_or_several_with_text_before() {
        let f = ToolFormat::Hermes;
        let r = read(
            f,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        )
        .unwrap();
        assert_eq!(r.content, "");
        assert_eq!(r.calls, [call("get_weather", r#"{"city":"Paris"}"#)]);
        let r = read(
            f,
            "Let me check.\n<tool_call>{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}</tool_call>\n\
             <tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{\\\"zone\\\": \\\"CET\\\"}\"}\n</tool_call>\n",
        )
        .unwrap();
        assert_eq!(r.content, "Let me check.\n");
        assert_eq!(
            r.calls,
            [
                call("get_weather", r#"{"city":"Oslo"}"#),
                call("get_time", r#"{"zone":"CET"}"#)
            ]
        );
        // The closing tag may be missing at the very end; arguments may be absent.
        let r = read(f, "<tool_call>{\"name\": \"get_time\"}").unwrap();
        assert_eq!(r.calls, [call("get_time", "{}")]);
    }

    #[test]
    fn hermes_text_that_is_not_a_call_stays_content() {
        let f = ToolFormat::Hermes;
        for text in [
            "No tools needed: the answer is 4.",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",
            "<tool_call>{\"name\": \"launch_rockets\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"get_time\", \"arguments\": [1]}</tool_call>",
            "<tool_call>{\"name\": \"get_time\"}</tool_call> and then some words",
            "I would write <tool_call> here but I won't.",
            "Ends with a partial marker <tool_c",
        ] {
            assert_eq!(read(f, text), None, "{text:?}");
        }
    }

    #[test]
    fn json_calls_llama3_style() {
        let f = ToolFormat::Json;
        let r = read(
            f,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\", \"days\": 2}}",
        )
        .unwrap();
        assert_eq!(r.content, "");
        assert_eq!(
            r.calls,
            [call("get_weather", r#"{"city":"Rome","days":2}"#)]
        );
        let r = read(
            f,
            "  <|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}; {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Bern\"}}",
        )
        .unwrap();
        assert_eq!(r.content, "  ");
        assert_eq!(r.calls.len(), 2);
        let r = read(
            f,
            "Calling now.<|python_tag|>[{\"name\": \"get_time\", \"parameters\": {\"zone\": \"UTC\"}}]",
        )
        .unwrap();
        assert_eq!(r.content, "Calling now.");
        assert_eq!(r.calls, [call("get_time", r#"{"zone":"UTC"}"#)]);
        for text in [
            "The weather is fine.",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": ",
            "{\"answer\": 42}",
            "{\"name\": \"get_time\", \"parameters\": {}} trailing words",
            "Here is JSON: {\"name\": \"get_time\", \"parameters\": {}}",
        ] {
            assert_eq!(read(f, text), None, "{text:?}");
        }
    }

    #[test]
    fn mistral_calls() {
        let f = ToolFormat::Mistral;
        let r = read(
            f,
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}, {\"name\": \"get_time\", \"arguments\": {}}]",
        )
        .unwrap();
        assert_eq!(
            r.calls,
            [
                call("get_weather", r#"{"city":"Lyon"}"#),
                call("get_time", "{}")
            ]
        );
        let r = read(
            f,
            "Sure.[TOOL_CALLS][{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}]",
        )
        .unwrap();
        assert_eq!(r.content, "Sure.");
        for text in [
            "[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}",
            "[TOOL_CALLS] not json",
            "[TOOL_CALLS] [{\"name\": \"nope\", \"arguments\": {}}]",
        ] {
            assert_eq!(read(f, text), None, "{text:?}");
        }
    }

    #[test]
    fn a_forced_opening_is_read_as_the_start_of_the_reply() {
        for f in [ToolFormat::Hermes, ToolFormat::Mistral, ToolFormat::Json] {
            let mut r = ToolReader::new(f, names(), f.forced_opening(Some("get_weather")));
            let close = match f {
                ToolFormat::Hermes => "}\n</tool_call>",
                ToolFormat::Mistral => "}]",
                ToolFormat::Json => "}",
            };
            assert_eq!(r.push("{\"city\": \"Nice\"}"), "");
            assert_eq!(r.push(close), "");
            assert_eq!(
                r.finish().calls,
                [call("get_weather", r#"{"city":"Nice"}"#)],
                "{f:?}"
            );
            // The opening of a required call, then the model's name and arguments.
            let mut r = ToolReader::new(f, names(), f.forced_opening(None));
            let tail = match f {
                ToolFormat::Json => "get_time\", \"parameters\": {}}",
                ToolFormat::Hermes => "{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
                ToolFormat::Mistral => "[{\"name\": \"get_time\", \"arguments\": {}}]",
            };
            assert_eq!(r.push(tail), "");
            assert_eq!(r.finish().calls, [call("get_time", "{}")], "{f:?}");
            // A forced opening the model does not complete comes back as content.
            let mut r = ToolReader::new(f, names(), f.forced_opening(Some("get_time")));
            r.push("oops");
            let end = r.finish();
            assert!(end.calls.is_empty());
            assert!(end.content.ends_with("oops"), "{f:?}: {end:?}");
        }
    }

    #[test]
    fn the_format_comes_from_the_template() {
        let t = |s: &str| ToolFormat::of(&ChatTemplate::new(s).unwrap());
        assert_eq!(
            t("{% for m in messages %}{{ m.content }}{% endfor %}"),
            None
        );
        assert_eq!(
            t("{% if tools %}<tool_call>{{ tools | tojson }}{% endif %}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            t("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}[TOOL_CALLS]"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(
            t("{% if tools %}{{ tools | tojson }}<|python_tag|>{% endif %}"),
            Some(ToolFormat::Json)
        );
    }

    #[test]
    fn call_ids_are_nine_letters_or_digits_and_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| call_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids
            .iter()
            .all(|i| i.len() == 9 && i.bytes().all(|b| b.is_ascii_alphanumeric())));
    }
}
