//! `pshard serve`: an OpenAI-compatible HTTP server over one engine holding several sequences.
//!
//! [`sched`] runs the engine on a thread of its own with continuous batching (every evaluation
//! carries the next token of each decoding sequence plus chunks of waiting prompts; cached
//! prompt prefixes are reused); [`http`] answers `/v1/chat/completions`, `/v1/completions`
//! (streamed as server-sent events or not), `/v1/models`, `/health`, `/metrics`, `/tokenize` and
//! `/detokenize`; [`api`] reads request bodies field by field into clear 400s; [`tools`] reads
//! tool calls out of replies in the format the model's chat template teaches.
//!
//! The scheduler is also what `pshard chat` runs on (one sequence, the conversation's KV kept
//! between turns).

pub mod api;
pub mod http;
pub mod sched;
pub mod tools;
