//! Shared helpers of the planner's integration tests: in-memory model specs (no weights) and profiles.
#![allow(dead_code)]

use std::path::PathBuf;

use pshard_model::graph::Graph;
use pshard_model::spec::ModelSpec;
use pshard_model::synth::{self, QuantRecipe, SynthPreset};
use pshard_planner::Profile;

/// The spec of a synth preset under a recipe, from its in-memory header (no tensor data).
pub fn spec_of_preset(p: &SynthPreset, recipe: QuantRecipe) -> ModelSpec {
    let header = synth::plan(p, recipe).header().expect("synth header");
    ModelSpec::from_gguf(&header, &header.tensors, p.name).expect("synth spec")
}

/// The spec of a named preset with Q4_K weights (the recipe of the published numbers).
pub fn spec(name: &str) -> ModelSpec {
    let p = synth::preset(name).unwrap_or_else(|| panic!("no preset {name}"));
    spec_of_preset(&p, QuantRecipe::Q4_K)
}

/// The op graph builder the planner uses.
pub fn graph(spec: &ModelSpec, n: usize, logits: usize) -> Result<Graph, String> {
    pshard_model::arch::build_graph(spec, n, logits).map_err(|e| e.to_string())
}

/// The repository's profiles folder.
pub fn profiles_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../profiles")
}

/// The committed profiles (CPU, GPU) of a lent machine (`h200`, `h100`), measured there by the
/// profiler.
pub fn profiles(machine: &str) -> (Profile, Profile) {
    let d = profiles_dir();
    let load = |half: &str| {
        let f = d.join(format!("{machine}-{half}.toml"));
        Profile::load(&f).unwrap_or_else(|e| panic!("committed profile {}: {e}", f.display()))
    };
    (load("cpu"), load("gpu"))
}

/// The committed H200 profiles (CPU, GPU), measured by the profiler on the lent machine.
pub fn h200_profiles() -> (Profile, Profile) {
    profiles("h200")
}
