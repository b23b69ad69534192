//! pshard's model layer: GGUF files, the architecture catalogue ([`spec::ModelSpec`]), the op graph of
//! each architecture, byte accounting and synthetic models.

pub mod arch;
pub mod bytes;
pub mod catalogue;
pub mod ggml_type;
pub mod gguf;
pub mod graph;
pub mod spec;
pub mod synth;
