//! The registry: plain-text plans next to the model (`MODEL.gguf.pshard`), specified normatively in
//! `registry-format.md`. Parsing reports malformed lines with their number; writing is canonical, so
//! `parse(write(r)) == r` and `write(parse(t)) == t` for canonical text.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use pshard_model::spec::{GroupId, ModelSpec};

use crate::fingerprint::Fingerprint;
use crate::placement::{Frac, Place, Placement, Strategy};
use crate::search::{Plan, TierPlan};

/// First line of every registry: magic and `MAJOR.MINOR`.
pub const REGISTRY_MAGIC: &str = "pshard-registry";
/// Major version written and read.
pub const REGISTRY_MAJOR: u32 = 1;
/// Minor version written.
pub const REGISTRY_MINOR: u32 = 0;
/// Version of the cost model; plans made by another version are re-planned.
pub const COST_MODEL_VERSION: u32 = 1;

/// A malformed registry, with the 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry line {line}: {message}")]
pub struct RegistryError {
    /// 1-based line number (0 for whole-file problems).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Placement of one group in a record: one place for all members, or one per member in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GroupPlace {
    /// Every member tensor has this place.
    All(Place),
    /// Each member by its short name, in the group's member order.
    Each(Vec<(String, Place)>),
}

/// A run of consecutive layers with identical placements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRun {
    /// First layer.
    pub first: usize,
    /// Last layer (inclusive).
    pub last: usize,
    /// Group role name → placement, in the layers' group order.
    pub groups: Vec<(String, GroupPlace)>,
}

/// One tier's plan.
#[derive(Clone, Debug, PartialEq)]
pub struct TierRecord {
    /// Tokens of the tier.
    pub tokens: usize,
    /// Prefill (true) or decode tier.
    pub prefill: bool,
    /// Winning strategy.
    pub strategy: Strategy,
    /// Layers pinned whole.
    pub pinned_layers: usize,
    /// Layers with pinned attention.
    pub pinned_attn: usize,
    /// Partly pinned layer and its pinned byte share.
    pub boundary: Option<(usize, Frac)>,
    /// CPU row share of split tensors (aggregation).
    pub split: Option<Frac>,
    /// Micro-batch to run this tier with.
    pub ubatch: usize,
    /// Predicted tokens per second.
    pub tps: f64,
    /// VRAM of this tier alone (bytes).
    pub vram_bytes: u64,
    /// Seconds to switch into this tier (re-upload of weights it pins beyond the common set), in ms.
    pub switch_ms: f64,
    /// Placement of the global groups (embed, output_norm, output), by role name.
    pub global: Vec<(String, GroupPlace)>,
    /// Placement of the layers.
    pub layers: Vec<LayerRun>,
}

/// Plans for one budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// VRAM budget in MiB (0 = all-CPU).
    pub budget_mib: u64,
    /// The model fits whole: every tier is the all-GPU plan.
    pub whole_model: bool,
    /// Predictions rest on measured profiles (false: nominal, fit-only).
    pub measured: bool,
    /// The registry's VRAM bill in bytes (common + max per tier + context).
    pub bill_bytes: u64,
    /// Bytes common to every tier.
    pub common_bytes: u64,
    /// Largest per-tier part.
    pub max_tier_bytes: u64,
    /// CUDA context margin.
    pub context_bytes: u64,
    /// Tier records in increasing token order.
    pub tiers: Vec<TierRecord>,
}

/// Everything a set of plans depends on besides the budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Section {
    /// Model name (informative).
    pub model: String,
    /// Architecture (informative).
    pub arch: String,
    /// Content fingerprint: plans are used only when it matches the file.
    pub fingerprint: Fingerprint,
    /// Layers (informative; checked against the spec when a placement is rebuilt).
    pub n_layer: usize,
    /// Context per sequence.
    pub ctx: usize,
    /// Parallel sequences.
    pub parallel: usize,
    /// KV type (`f16` or `q8_0`).
    pub kv_type: String,
    /// CPU threads.
    pub threads: usize,
    /// KV depth assumed for decode predictions.
    pub decode_depth: usize,
    /// Profiles identity (`cpu:xxxxxxxx gpu:xxxxxxxx`, or `none`).
    pub profile: String,
    /// Cost model version.
    pub cost_model: u32,
    /// Plans per budget.
    pub variants: Vec<Variant>,
}

impl Section {
    /// Whether two sections are for the same inputs (all keys but the variants equal).
    pub fn same_key(&self, o: &Section) -> bool {
        self.fingerprint == o.fingerprint
            && self.ctx == o.ctx
            && self.parallel == o.parallel
            && self.kv_type == o.kv_type
            && self.threads == o.threads
            && self.decode_depth == o.decode_depth
            && self.profile == o.profile
            && self.cost_model == o.cost_model
    }
}

/// A whole registry file.
#[derive(Clone, Debug, PartialEq)]
pub struct Registry {
    /// Minor version of the file (the major is always [`REGISTRY_MAJOR`]).
    pub minor: u32,
    /// Sections.
    pub sections: Vec<Section>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            minor: REGISTRY_MINOR,
            sections: Vec::new(),
        }
    }
}

fn place_text(p: Place) -> String {
    match p {
        Place::Split { cpu } => format!("X{cpu}"),
        other => other.letter().to_string(),
    }
}

fn parse_frac(s: &str) -> Option<Frac> {
    let (a, b) = s.split_once('.')?;
    if b.len() != 4 || !b.bytes().all(|c| c.is_ascii_digit()) || !(a == "0" || a == "1") {
        return None;
    }
    let v = a.parse::<u16>().ok()? * Frac::ONE + b.parse::<u16>().ok()?;
    (v <= Frac::ONE).then_some(Frac(v))
}

fn parse_place(s: &str) -> Option<Place> {
    match s {
        "P" => Some(Place::Pinned),
        "S" => Some(Place::Streamed),
        "C" => Some(Place::Cpu),
        _ => s
            .strip_prefix('X')
            .and_then(parse_frac)
            .map(|cpu| Place::Split { cpu }),
    }
}

fn group_place_text(g: &GroupPlace) -> String {
    match g {
        GroupPlace::All(p) => place_text(*p),
        GroupPlace::Each(v) => v
            .iter()
            .map(|(n, p)| format!("{n}:{}", place_text(*p)))
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
}

fn parse_group_place(s: &str) -> Option<GroupPlace> {
    if let Some(p) = parse_place(s) {
        return Some(GroupPlace::All(p));
    }
    let mut v = Vec::new();
    for item in s.split(',') {
        let (n, p) = item.split_once(':')?;
        if !is_name(n) {
            return None;
        }
        v.push((n.to_string(), parse_place(p)?));
    }
    Some(GroupPlace::Each(v))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn groups_text(groups: &[(String, GroupPlace)]) -> String {
    groups
        .iter()
        .map(|(n, g)| format!("{n}={}", group_place_text(g)))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Registry {
    /// Canonical text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{REGISTRY_MAGIC} {REGISTRY_MAJOR}.{}", self.minor);
        for sec in &self.sections {
            s.push('\n');
            s.push_str("[section]\n");
            let _ = writeln!(s, "model = {}", sec.model);
            let _ = writeln!(s, "arch = {}", sec.arch);
            let _ = writeln!(s, "fingerprint = {}", sec.fingerprint.digest_string());
            let _ = writeln!(s, "file_size = {}", sec.fingerprint.file_size);
            let _ = writeln!(s, "n_layer = {}", sec.n_layer);
            let _ = writeln!(s, "ctx = {}", sec.ctx);
            let _ = writeln!(s, "parallel = {}", sec.parallel);
            let _ = writeln!(s, "kv_type = {}", sec.kv_type);
            let _ = writeln!(s, "threads = {}", sec.threads);
            let _ = writeln!(s, "decode_depth = {}", sec.decode_depth);
            let _ = writeln!(s, "profile = {}", sec.profile);
            let _ = writeln!(s, "cost_model = {}", sec.cost_model);
            for v in &sec.variants {
                s.push('\n');
                s.push_str("[variant]\n");
                let _ = writeln!(s, "budget_mib = {}", v.budget_mib);
                let _ = writeln!(s, "whole_model = {}", yes_no(v.whole_model));
                let _ = writeln!(s, "measured = {}", yes_no(v.measured));
                let _ = writeln!(s, "bill_bytes = {}", v.bill_bytes);
                let _ = writeln!(s, "common_bytes = {}", v.common_bytes);
                let _ = writeln!(s, "max_tier_bytes = {}", v.max_tier_bytes);
                let _ = writeln!(s, "context_bytes = {}", v.context_bytes);
                for t in &v.tiers {
                    s.push('\n');
                    s.push_str("[tier]\n");
                    let _ = writeln!(s, "tokens = {}", t.tokens);
                    let _ = writeln!(s, "kind = {}", if t.prefill { "prefill" } else { "decode" });
                    let _ = writeln!(s, "strategy = {}", t.strategy.name());
                    let _ = writeln!(s, "pinned_layers = {}", t.pinned_layers);
                    let _ = writeln!(s, "pinned_attn = {}", t.pinned_attn);
                    match t.boundary {
                        Some((l, f)) => {
                            let _ = writeln!(s, "boundary = {l} {f}");
                        }
                        None => s.push_str("boundary = none\n"),
                    }
                    match t.split {
                        Some(f) => {
                            let _ = writeln!(s, "split = {f}");
                        }
                        None => s.push_str("split = none\n"),
                    }
                    let _ = writeln!(s, "ubatch = {}", t.ubatch);
                    let _ = writeln!(s, "tps = {}", t.tps);
                    let _ = writeln!(s, "vram_bytes = {}", t.vram_bytes);
                    let _ = writeln!(s, "switch_ms = {}", t.switch_ms);
                    let _ = writeln!(s, "global {}", groups_text(&t.global));
                    for r in &t.layers {
                        if r.first == r.last {
                            let _ = writeln!(s, "layers {} {}", r.first, groups_text(&r.groups));
                        } else {
                            let _ = writeln!(
                                s,
                                "layers {}-{} {}",
                                r.first,
                                r.last,
                                groups_text(&r.groups)
                            );
                        }
                    }
                }
            }
        }
        s
    }

    /// Parses registry text.
    pub fn parse(text: &str) -> Result<Registry, RegistryError> {
        Parser::default().run(text)
    }

    /// Reads a registry file.
    pub fn load(path: &Path) -> Result<Registry, RegistryLoadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RegistryLoadError::Io(path.to_path_buf(), e))?;
        Registry::parse(&text).map_err(|e| RegistryLoadError::Malformed(path.to_path_buf(), e))
    }

    /// Inserts or replaces a variant under its section key; sections for other fingerprints of the
    /// same model file are dropped (they are stale: the file changed).
    pub fn upsert(&mut self, section: Section) {
        self.sections
            .retain(|s| s.fingerprint == section.fingerprint);
        match self.sections.iter_mut().find(|s| s.same_key(&section)) {
            Some(existing) => {
                existing.model = section.model;
                existing.arch = section.arch;
                existing.n_layer = section.n_layer;
                for v in section.variants {
                    existing.variants.retain(|x| x.budget_mib != v.budget_mib);
                    existing.variants.push(v);
                }
                existing.variants.sort_by_key(|v| v.budget_mib);
            }
            None => self.sections.push(section),
        }
    }

    /// Sections usable for a model file with fingerprint `fp`; an error if the registry holds plans
    /// but none for this content (the file changed: re-plan, never use).
    pub fn verified(&self, fp: &Fingerprint) -> Result<Vec<&Section>, RegistryError> {
        let ok: Vec<&Section> = self
            .sections
            .iter()
            .filter(|s| s.fingerprint == *fp)
            .collect();
        if ok.is_empty() && !self.sections.is_empty() {
            return Err(RegistryError {
                line: 0,
                message: format!(
                    "fingerprint mismatch: the registry was planned for {} but the model file is {}; re-plan",
                    self.sections[0].fingerprint, fp
                ),
            });
        }
        Ok(ok)
    }
}

impl Registry {
    /// The variant planned for a model file with fingerprint `fp` at exactly this context, sequence
    /// count, KV type and budget, with its section (whose `threads`, `profile` and `cost_model` the
    /// caller may also check). `Ok(None)`: nothing planned for these inputs — re-plan. An error: the
    /// registry belongs to other content (fingerprint mismatch) — re-plan, never use.
    pub fn find(
        &self,
        fp: &Fingerprint,
        ctx: usize,
        parallel: usize,
        kv_type: &str,
        budget_mib: u64,
    ) -> Result<Option<(&Section, &Variant)>, RegistryError> {
        for sec in self.verified(fp)? {
            if sec.ctx == ctx
                && sec.parallel == parallel
                && sec.kv_type == kv_type
                && sec.cost_model == COST_MODEL_VERSION
            {
                if let Some(v) = sec.variants.iter().find(|v| v.budget_mib == budget_mib) {
                    return Ok(Some((sec, v)));
                }
            }
        }
        Ok(None)
    }
}

impl Variant {
    /// The tier a batch of `n` tokens runs with: the smallest tier ≥ n, else the largest.
    pub fn tier_for(&self, n: usize) -> Option<&TierRecord> {
        self.tiers
            .iter()
            .filter(|t| t.tokens >= n)
            .min_by_key(|t| t.tokens)
            .or_else(|| self.tiers.iter().max_by_key(|t| t.tokens))
    }
}

/// Why a registry file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryLoadError {
    /// Reading failed.
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    /// The text is malformed.
    #[error("{0}: {1}")]
    Malformed(PathBuf, RegistryError),
}

#[derive(Default)]
struct Parser {
    reg: Option<Registry>,
    /// Keys seen in the current block (for duplicates / completeness).
    seen: Vec<&'static str>,
    block: Block,
    block_line: usize,
    // Partial values of the current block.
    sec: Option<Section>,
    fp_digest: Option<String>,
    fp_size: Option<u64>,
    var: Option<Variant>,
    tier: Option<TierRecord>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Block {
    #[default]
    Top,
    Section,
    Variant,
    Tier,
}

const SECTION_KEYS: &[&str] = &[
    "model",
    "arch",
    "fingerprint",
    "file_size",
    "n_layer",
    "ctx",
    "parallel",
    "kv_type",
    "threads",
    "decode_depth",
    "profile",
    "cost_model",
];
const VARIANT_KEYS: &[&str] = &[
    "budget_mib",
    "whole_model",
    "measured",
    "bill_bytes",
    "common_bytes",
    "max_tier_bytes",
    "context_bytes",
];
const TIER_KEYS: &[&str] = &[
    "tokens",
    "kind",
    "strategy",
    "pinned_layers",
    "pinned_attn",
    "boundary",
    "split",
    "ubatch",
    "tps",
    "vram_bytes",
    "switch_ms",
    "global",
];

fn err(line: usize, message: impl Into<String>) -> RegistryError {
    RegistryError {
        line,
        message: message.into(),
    }
}

fn num<T: std::str::FromStr>(line: usize, key: &str, v: &str) -> Result<T, RegistryError> {
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) || (v.len() > 1 && v.starts_with('0'))
    {
        return Err(err(
            line,
            format!("`{key}` must be a non-negative integer without leading zeros, got `{v}`"),
        ));
    }
    v.parse()
        .map_err(|_| err(line, format!("`{key}` out of range: `{v}`")))
}

fn float(line: usize, key: &str, v: &str) -> Result<f64, RegistryError> {
    let x: f64 = v
        .parse()
        .map_err(|_| err(line, format!("`{key}` must be a number, got `{v}`")))?;
    if !x.is_finite() || x < 0.0 || x.to_string() != v {
        return Err(err(
            line,
            format!("`{key}` must be a finite non-negative number in shortest form, got `{v}`"),
        ));
    }
    Ok(x)
}

fn boolean(line: usize, key: &str, v: &str) -> Result<bool, RegistryError> {
    match v {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(err(
            line,
            format!("`{key}` must be `yes` or `no`, got `{v}`"),
        )),
    }
}

fn parse_groups(line: usize, words: &[&str]) -> Result<Vec<(String, GroupPlace)>, RegistryError> {
    if words.is_empty() {
        return Err(err(line, "expected at least one GROUP=PLACEMENT"));
    }
    let mut v: Vec<(String, GroupPlace)> = Vec::new();
    for w in words {
        let (n, p) = w
            .split_once('=')
            .ok_or_else(|| err(line, format!("expected GROUP=PLACEMENT, got `{w}`")))?;
        if !is_name(n) {
            return Err(err(line, format!("bad group name `{n}`")));
        }
        if v.iter().any(|(x, _)| x == n) {
            return Err(err(line, format!("group `{n}` given twice")));
        }
        let gp = parse_group_place(p).ok_or_else(|| {
            err(
                line,
                format!(
                    "bad placement `{p}` of group `{n}` (P, S, C, X0.dddd, or MEMBER:PLACE,...)"
                ),
            )
        })?;
        v.push((n.to_string(), gp));
    }
    Ok(v)
}

impl Parser {
    fn close_block(&mut self) -> Result<(), RegistryError> {
        let line = self.block_line;
        let missing = |keys: &[&'static str], seen: &[&'static str]| {
            keys.iter().find(|k| !seen.contains(k)).copied()
        };
        match self.block {
            Block::Top => {}
            Block::Section => {
                if let Some(k) = missing(SECTION_KEYS, &self.seen) {
                    return Err(err(line, format!("[section] lacks key `{k}`")));
                }
                let mut sec = self.sec.take().expect("section open");
                let digest = self.fp_digest.take().unwrap_or_default();
                sec.fingerprint = Fingerprint::parse(&digest, self.fp_size.take().unwrap_or(0))
                    .ok_or_else(|| err(line, format!("bad fingerprint `{digest}` (want sha256: and 64 lowercase hex digits)")))?;
                self.reg.as_mut().expect("registry open").sections.push(sec);
            }
            Block::Variant => {
                if let Some(k) = missing(VARIANT_KEYS, &self.seen) {
                    return Err(err(line, format!("[variant] lacks key `{k}`")));
                }
                let v = self.var.take().expect("variant open");
                let reg = self.reg.as_mut().expect("registry open");
                reg.sections
                    .last_mut()
                    .expect("variant inside a section")
                    .variants
                    .push(v);
            }
            Block::Tier => {
                if let Some(k) = missing(TIER_KEYS, &self.seen) {
                    return Err(err(line, format!("[tier] lacks key `{k}`")));
                }
                let t = self.tier.take().expect("tier open");
                let reg = self.reg.as_mut().expect("registry open");
                let sec = reg.sections.last_mut().expect("tier inside a section");
                let covered = t.layers.last().map(|r| r.last + 1).unwrap_or(0);
                if covered != sec.n_layer {
                    return Err(err(
                        line,
                        format!(
                            "[tier] places {covered} layers but the section has n_layer = {}",
                            sec.n_layer
                        ),
                    ));
                }
                sec.variants
                    .last_mut()
                    .expect("tier inside a variant")
                    .tiers
                    .push(t);
            }
        }
        self.seen.clear();
        Ok(())
    }

    fn run(mut self, text: &str) -> Result<Registry, RegistryError> {
        let mut lines = text.split('\n').enumerate();
        // Magic line.
        let (_, first) = lines.next().ok_or_else(|| err(1, "empty file"))?;
        let rest = first
            .strip_prefix(REGISTRY_MAGIC)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| {
                err(
                    1,
                    format!("not a registry: first line must be `{REGISTRY_MAGIC} MAJOR.MINOR`"),
                )
            })?;
        let (maj, min) = rest
            .split_once('.')
            .ok_or_else(|| err(1, format!("bad version `{rest}`")))?;
        let maj: u32 = num(1, "major version", maj)?;
        let minor: u32 = num(1, "minor version", min)?;
        if maj != REGISTRY_MAJOR {
            return Err(err(1, format!("registry format version {maj}.{minor} is not supported (this pshard reads {REGISTRY_MAJOR}.x); re-plan")));
        }
        self.reg = Some(Registry {
            minor,
            sections: Vec::new(),
        });
        for (i, raw) in lines {
            let ln = i + 1;
            if raw.ends_with('\r') {
                return Err(err(ln, "carriage return: lines end with LF only"));
            }
            let line = raw;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line != line.trim() {
                return Err(err(ln, "leading or trailing whitespace"));
            }
            if line.starts_with('[') {
                self.close_block()?;
                self.block_line = ln;
                match line {
                    "[section]" => {
                        self.block = Block::Section;
                        self.sec = Some(Section {
                            model: String::new(),
                            arch: String::new(),
                            fingerprint: Fingerprint {
                                sha256: [0; 32],
                                file_size: 0,
                            },
                            n_layer: 0,
                            ctx: 0,
                            parallel: 0,
                            kv_type: String::new(),
                            threads: 0,
                            decode_depth: 0,
                            profile: String::new(),
                            cost_model: 0,
                            variants: Vec::new(),
                        });
                    }
                    "[variant]" => {
                        if self.reg.as_ref().is_none_or(|r| r.sections.is_empty()) {
                            return Err(err(ln, "[variant] before any [section]"));
                        }
                        self.block = Block::Variant;
                        self.var = Some(Variant {
                            budget_mib: 0,
                            whole_model: false,
                            measured: false,
                            bill_bytes: 0,
                            common_bytes: 0,
                            max_tier_bytes: 0,
                            context_bytes: 0,
                            tiers: Vec::new(),
                        });
                    }
                    "[tier]" => {
                        let has_variant = self
                            .reg
                            .as_ref()
                            .and_then(|r| r.sections.last())
                            .is_some_and(|s| !s.variants.is_empty());
                        if !has_variant {
                            return Err(err(ln, "[tier] before any [variant]"));
                        }
                        self.block = Block::Tier;
                        self.tier = Some(TierRecord {
                            tokens: 0,
                            prefill: false,
                            strategy: Strategy::AllGpu,
                            pinned_layers: 0,
                            pinned_attn: 0,
                            boundary: None,
                            split: None,
                            ubatch: 0,
                            tps: 0.0,
                            vram_bytes: 0,
                            switch_ms: 0.0,
                            global: Vec::new(),
                            layers: Vec::new(),
                        });
                    }
                    _ => {
                        return Err(err(
                            ln,
                            format!(
                            "unknown block header `{line}` (want [section], [variant] or [tier])"
                        ),
                        ))
                    }
                }
                continue;
            }
            self.line(ln, line)?;
        }
        self.close_block()?;
        Ok(self.reg.expect("registry open"))
    }

    fn mark(
        &mut self,
        ln: usize,
        keys: &[&'static str],
        key: &str,
    ) -> Result<&'static str, RegistryError> {
        let k = keys
            .iter()
            .find(|k| **k == key)
            .copied()
            .ok_or_else(|| err(ln, format!("unknown key `{key}` here")))?;
        if self.seen.contains(&k) {
            return Err(err(ln, format!("key `{k}` given twice")));
        }
        self.seen.push(k);
        Ok(k)
    }

    fn line(&mut self, ln: usize, line: &str) -> Result<(), RegistryError> {
        if self.block == Block::Tier {
            if let Some(rest) = line.strip_prefix("global ") {
                self.mark(ln, TIER_KEYS, "global")?;
                let words: Vec<&str> = rest.split(' ').collect();
                let g = parse_groups(ln, &words)?;
                self.tier.as_mut().expect("tier open").global = g;
                return Ok(());
            }
            if let Some(rest) = line.strip_prefix("layers ") {
                let mut words = rest.split(' ');
                let range = words.next().unwrap_or("");
                let (a, b) = match range.split_once('-') {
                    Some((a, b)) => (num::<usize>(ln, "layer", a)?, num::<usize>(ln, "layer", b)?),
                    None => {
                        let a = num::<usize>(ln, "layer", range)?;
                        (a, a)
                    }
                };
                if range.contains('-') && b <= a {
                    return Err(err(ln, format!("layer range `{range}` must be increasing (single layers are written alone)")));
                }
                let t = self.tier.as_mut().expect("tier open");
                let expect = t.layers.last().map(|r| r.last + 1).unwrap_or(0);
                if a != expect {
                    return Err(err(ln, format!("layer runs must be consecutive from 0: expected layer {expect}, got {a}")));
                }
                let words: Vec<&str> = words.collect();
                let groups = parse_groups(ln, &words)?;
                t.layers.push(LayerRun {
                    first: a,
                    last: b,
                    groups,
                });
                return Ok(());
            }
        }
        let (key, value) = line
            .split_once(" = ")
            .ok_or_else(|| err(ln, format!("expected `key = value`, got `{line}`")))?;
        match self.block {
            Block::Top => Err(err(ln, "key outside any block")),
            Block::Section => {
                let k = self.mark(ln, SECTION_KEYS, key)?;
                let s = self.sec.as_mut().expect("section open");
                match k {
                    "model" => s.model = value.to_string(),
                    "arch" => s.arch = value.to_string(),
                    "fingerprint" => self.fp_digest = Some(value.to_string()),
                    "file_size" => self.fp_size = Some(num(ln, k, value)?),
                    "n_layer" => s.n_layer = num(ln, k, value)?,
                    "ctx" => s.ctx = num(ln, k, value)?,
                    "parallel" => s.parallel = num(ln, k, value)?,
                    "kv_type" => {
                        if !matches!(value, "f16" | "q8_0") {
                            return Err(err(
                                ln,
                                format!("`kv_type` must be f16 or q8_0, got `{value}`"),
                            ));
                        }
                        s.kv_type = value.to_string()
                    }
                    "threads" => s.threads = num(ln, k, value)?,
                    "decode_depth" => s.decode_depth = num(ln, k, value)?,
                    "profile" => s.profile = value.to_string(),
                    _ => s.cost_model = num(ln, k, value)?,
                }
                Ok(())
            }
            Block::Variant => {
                let k = self.mark(ln, VARIANT_KEYS, key)?;
                let v = self.var.as_mut().expect("variant open");
                match k {
                    "budget_mib" => v.budget_mib = num(ln, k, value)?,
                    "whole_model" => v.whole_model = boolean(ln, k, value)?,
                    "measured" => v.measured = boolean(ln, k, value)?,
                    "bill_bytes" => v.bill_bytes = num(ln, k, value)?,
                    "common_bytes" => v.common_bytes = num(ln, k, value)?,
                    "max_tier_bytes" => v.max_tier_bytes = num(ln, k, value)?,
                    _ => v.context_bytes = num(ln, k, value)?,
                }
                Ok(())
            }
            Block::Tier => {
                let k = self.mark(ln, TIER_KEYS, key)?;
                let t = self.tier.as_mut().expect("tier open");
                match k {
                    "tokens" => t.tokens = num(ln, k, value)?,
                    "kind" => {
                        t.prefill = match value {
                            "prefill" => true,
                            "decode" => false,
                            _ => {
                                return Err(err(
                                    ln,
                                    format!("`kind` must be prefill or decode, got `{value}`"),
                                ))
                            }
                        }
                    }
                    "strategy" => {
                        t.strategy = Strategy::from_name(value)
                            .ok_or_else(|| err(ln, format!("unknown strategy `{value}`")))?
                    }
                    "pinned_layers" => t.pinned_layers = num(ln, k, value)?,
                    "pinned_attn" => t.pinned_attn = num(ln, k, value)?,
                    "boundary" => {
                        t.boundary = if value == "none" {
                            None
                        } else {
                            let (l, f) = value.split_once(' ').ok_or_else(|| {
                                err(ln, "`boundary` is `none` or `LAYER FRACTION`")
                            })?;
                            let f = parse_frac(f).ok_or_else(|| {
                                err(ln, format!("bad fraction `{f}` (want d.dddd)"))
                            })?;
                            Some((num(ln, k, l)?, f))
                        }
                    }
                    "split" => {
                        t.split = if value == "none" {
                            None
                        } else {
                            Some(parse_frac(value).ok_or_else(|| {
                                err(ln, format!("bad fraction `{value}` (want d.dddd)"))
                            })?)
                        }
                    }
                    "ubatch" => t.ubatch = num(ln, k, value)?,
                    "tps" => t.tps = float(ln, k, value)?,
                    "vram_bytes" => t.vram_bytes = num(ln, k, value)?,
                    _ => t.switch_ms = float(ln, k, value)?,
                }
                Ok(())
            }
        }
    }
}

/// Short name of a group member: the GGUF tensor name without the `blk.N.` prefix and `.weight`.
pub fn member_name(spec: &ModelSpec, g: GroupId, member: usize) -> String {
    let t = spec.tensor(spec.group(g).tensors[member]);
    let mut n = t.name.as_str();
    if let Some(l) = t.layer {
        n = n.strip_prefix(&format!("blk.{l}.")).unwrap_or(n);
    }
    n.strip_suffix(".weight").unwrap_or(n).to_string()
}

fn group_record(spec: &ModelSpec, pl: &Placement, g: GroupId) -> GroupPlace {
    let places = pl.group(g);
    if places.iter().all(|p| *p == places[0]) && !places.is_empty() {
        GroupPlace::All(places[0])
    } else {
        GroupPlace::Each(
            places
                .iter()
                .enumerate()
                .map(|(i, p)| (member_name(spec, g, i), *p))
                .collect(),
        )
    }
}

impl TierRecord {
    /// The record of a planned tier.
    pub fn from_plan(spec: &ModelSpec, tp: &TierPlan) -> TierRecord {
        let c = &tp.best;
        let pl = &c.placement;
        let global = [spec.embed, spec.output_norm, spec.output]
            .iter()
            .map(|g| {
                (
                    spec.group(*g).role.as_str().to_string(),
                    group_record(spec, pl, *g),
                )
            })
            .collect();
        let mut layers: Vec<LayerRun> = Vec::new();
        for (l, ls) in spec.layers.iter().enumerate() {
            let groups: Vec<(String, GroupPlace)> = ls
                .groups
                .iter()
                .map(|g| {
                    (
                        spec.group(*g).role.as_str().to_string(),
                        group_record(spec, pl, *g),
                    )
                })
                .collect();
            match layers.last_mut() {
                // Per-member records name tensors without the layer, so equal text means equal places.
                Some(r) if r.groups == groups => r.last = l,
                _ => layers.push(LayerRun {
                    first: l,
                    last: l,
                    groups,
                }),
            }
        }
        TierRecord {
            tokens: tp.tier.n,
            prefill: tp.tier.prefill,
            strategy: c.strategy,
            pinned_layers: c.pinned_layers,
            pinned_attn: c.pinned_attn,
            boundary: c.boundary.map(|b| (b.layer, b.pinned)),
            split: c.split,
            ubatch: tp.ubatch,
            tps: round_sig(c.eval.tps),
            vram_bytes: c.bill.total(),
            switch_ms: round_sig(tp.switch_in_s * 1e3),
            global,
            layers,
        }
    }

    /// Rebuilds the placement for `spec`, checking that names and layer counts match.
    pub fn placement(&self, spec: &ModelSpec) -> Result<Placement, String> {
        let mut pl = Placement::uniform(spec, Place::Cpu);
        let apply = |pl: &mut Placement,
                     g: GroupId,
                     gp: &GroupPlace,
                     what: &str|
         -> Result<(), String> {
            match gp {
                GroupPlace::All(p) => pl.set_group(g, *p),
                GroupPlace::Each(v) => {
                    let n = spec.group(g).tensors.len();
                    if v.len() != n {
                        return Err(format!(
                            "{what}: {} members listed, the model has {n}",
                            v.len()
                        ));
                    }
                    for (i, (name, p)) in v.iter().enumerate() {
                        let want = member_name(spec, g, i);
                        if *name != want {
                            return Err(format!("{what}: member {i} is `{want}` in the model, registry says `{name}`"));
                        }
                        pl.groups[g.0 as usize][i] = *p;
                    }
                }
            }
            Ok(())
        };
        for (name, gp) in &self.global {
            let g = [spec.embed, spec.output_norm, spec.output]
                .into_iter()
                .find(|g| spec.group(*g).role.as_str() == name)
                .ok_or_else(|| format!("unknown global group `{name}`"))?;
            apply(&mut pl, g, gp, name)?;
        }
        let covered = self.layers.last().map(|r| r.last + 1).unwrap_or(0);
        if covered != spec.layers.len() {
            return Err(format!(
                "registry places {covered} layers, the model has {}",
                spec.layers.len()
            ));
        }
        for r in &self.layers {
            for l in r.first..=r.last {
                for (name, gp) in &r.groups {
                    let g = spec.layers[l]
                        .groups
                        .iter()
                        .copied()
                        .find(|g| spec.group(*g).role.as_str() == name)
                        .ok_or_else(|| format!("layer {l} has no group `{name}`"))?;
                    apply(&mut pl, g, gp, &format!("layer {l} {name}"))?;
                }
            }
        }
        Ok(pl)
    }
}

/// Rounds to 6 significant digits so registries stay readable and diffs small.
fn round_sig(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return 0.0;
    }
    let s = format!("{:.5e}", x);
    s.parse().unwrap_or(x)
}

/// Builds a registry section from a plan.
#[allow(clippy::too_many_arguments)]
pub fn section_from_plan(
    spec: &ModelSpec,
    fp: Fingerprint,
    params: &crate::cost::PlanParams,
    profile: &str,
    plan: &Plan,
) -> Section {
    let variant = Variant {
        budget_mib: plan.budget >> 20,
        whole_model: plan.whole_model_fits,
        measured: plan.measured,
        bill_bytes: plan.bill(),
        common_bytes: plan.common_bytes,
        max_tier_bytes: plan.max_tier_bytes,
        context_bytes: plan.context_bytes,
        tiers: plan
            .tiers
            .iter()
            .map(|t| TierRecord::from_plan(spec, t))
            .collect(),
    };
    Section {
        model: {
            let n = spec.name.replace(['\n', '\r'], " ").trim().to_string();
            if n.is_empty() {
                "unnamed".to_string()
            } else {
                n
            }
        },
        arch: spec.arch.gguf_name().to_string(),
        fingerprint: fp,
        n_layer: spec.layers.len(),
        ctx: params.n_ctx,
        parallel: params.parallel,
        kv_type: params.kv_type.name().to_ascii_lowercase(),
        threads: params.threads,
        decode_depth: params.decode_depth,
        profile: profile.to_string(),
        cost_model: COST_MODEL_VERSION,
        variants: vec![variant],
    }
}

/// The registry path next to a model: `MODEL.gguf.pshard`.
pub fn path_next_to(model: &Path) -> PathBuf {
    let mut s = model.as_os_str().to_owned();
    s.push(".pshard");
    PathBuf::from(s)
}

/// The per-user cache fallback: `$XDG_CACHE_HOME/pshard/registry/` (or `~/.cache/...`), with the
/// model's absolute path hashed into the name so equal file names in different folders do not clash.
pub fn cache_path(model: &Path) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let abs = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    let digest = Sha256::digest(abs.as_os_str().as_encoded_bytes());
    let tag: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let name = model.file_name()?.to_string_lossy().into_owned();
    Some(
        base.join("pshard")
            .join("registry")
            .join(format!("{name}.{tag}.pshard")),
    )
}

/// Where a model's registry is read from: next to the model if present, else the cache path.
pub fn locate(model: &Path) -> Option<PathBuf> {
    let next = path_next_to(model);
    if next.exists() {
        return Some(next);
    }
    cache_path(model).filter(|p| p.exists())
}

/// Writes `text` to `path` atomically (temporary file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "registry path has no file name",
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Why a registry could not be written. An existing file is replaced only when it is a registry
/// this pshard reads: anything else is kept as it is and the write stops.
#[derive(Debug, thiserror::Error)]
pub enum RegistryWriteError {
    /// The file exists and is not a registry (e.g. the model itself given as the output).
    #[error("{}: not a pshard registry (its first line is not `{REGISTRY_MAGIC} MAJOR.MINOR`); refusing to overwrite it", .0.display())]
    NotARegistry(PathBuf),
    /// The file is a registry this pshard cannot read: malformed, or of another format version.
    #[error("{}: an existing registry this pshard cannot read ({}); it is kept as it is: move it away, or write elsewhere", .0.display(), .1)]
    Unreadable(PathBuf, RegistryError),
    /// Reading or writing failed.
    #[error("{}: {}", .0.display(), .1)]
    Io(PathBuf, io::Error),
}

impl RegistryWriteError {
    /// The I/O error kind, when reading or writing failed.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            RegistryWriteError::Io(_, e) => Some(e.kind()),
            _ => None,
        }
    }
}

/// The registry at `path` to merge a new section into: empty when there is no file; an error —
/// leaving the file alone — when the file is not a registry or one this pshard cannot read.
pub fn load_for_update(path: &Path) -> Result<Registry, RegistryWriteError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Registry::default()),
        Err(e) => return Err(RegistryWriteError::Io(path.to_path_buf(), e)),
    };
    if !bytes.starts_with(format!("{REGISTRY_MAGIC} ").as_bytes()) {
        return Err(RegistryWriteError::NotARegistry(path.to_path_buf()));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        RegistryWriteError::Unreadable(
            path.to_path_buf(),
            err(
                0,
                format!("not UTF-8 at byte {}", e.utf8_error().valid_up_to()),
            ),
        )
    })?;
    Registry::parse(&text).map_err(|e| RegistryWriteError::Unreadable(path.to_path_buf(), e))
}

/// Merges `section` into the registry at `path` ([`load_for_update`]) and writes it atomically.
pub fn update(path: &Path, section: Section) -> Result<(), RegistryWriteError> {
    let mut reg = load_for_update(path)?;
    reg.upsert(section);
    write_atomic(path, &reg.to_text()).map_err(|e| RegistryWriteError::Io(path.to_path_buf(), e))
}

/// Merges `section` into the model's registry and writes it ([`update`]): next to the model, or in
/// the per-user cache when the model's folder is not writable. Returns the path written.
pub fn save_for_model(model: &Path, section: Section) -> Result<PathBuf, RegistryWriteError> {
    let next = path_next_to(model);
    let e = match update(&next, section.clone()) {
        Ok(()) => return Ok(next),
        Err(e) => e,
    };
    if !matches!(
        e.io_kind(),
        Some(io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem)
    ) {
        return Err(e);
    }
    let Some(cache) = cache_path(model) else {
        return Err(RegistryWriteError::Io(
            next,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{e}; and no cache directory (HOME unset)"),
            ),
        ));
    };
    if let Some(d) = cache.parent() {
        std::fs::create_dir_all(d).map_err(|e| RegistryWriteError::Io(d.to_path_buf(), e))?;
    }
    update(&cache, section)?;
    Ok(cache)
}
