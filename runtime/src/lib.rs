//! pshard runtime: loaded models, the engine that runs any placement (all on the CPU, all on the
//! GPU, or mixed), its programs, the CPU lane, the device interface with its CUDA and host
//! implementations, the KV cache, tiers, sampler, and generation and perplexity sessions.

pub mod batch;
pub mod cpu;
pub mod device;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod host_device;
pub mod kv;
pub mod model;
pub mod program;
pub mod sampler;
pub mod session;
pub mod tiers;
