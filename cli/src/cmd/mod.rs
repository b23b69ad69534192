//! One module per subcommand: each has `Args` (clap) and `run`.

pub mod bench;
pub mod chat;
pub mod common;
pub mod inspect;
pub mod perplexity;
pub mod plan;
pub mod profile;
pub mod run;
pub mod serve;
pub mod synth;
pub mod tokenize;
