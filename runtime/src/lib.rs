//! pshard runtime: loaded models, programs, the CPU executor, KV cache, sampler, and generation and
//! perplexity sessions.

pub mod cpu;
pub mod engine;
pub mod gpu;
pub mod kv;
pub mod model;
pub mod program;
pub mod sampler;
pub mod session;
pub mod submit;

#[cfg(test)]
mod testutil;
