//! Placements (where each weight tensor lives and is computed) and the strategies that produce them.

use std::fmt;

use pshard_model::spec::{GroupId, GroupRole, ModelSpec, TensorRole};

/// A fraction in parts per ten thousand (exact in text and in memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frac(pub u16);

impl Frac {
    /// The denominator.
    pub const ONE: u16 = 10_000;

    /// From a float in 0..=1 (rounded to the nearest part per ten thousand).
    pub fn from_f64(x: f64) -> Frac {
        Frac((x.clamp(0.0, 1.0) * f64::from(Frac::ONE)).round() as u16)
    }

    /// As a float.
    pub fn get(self) -> f64 {
        f64::from(self.0) / f64::from(Frac::ONE)
    }
}

impl fmt::Display for Frac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:04}", self.0 / Frac::ONE, self.0 % Frac::ONE)
    }
}

/// Where one tensor lives and where the ops reading it run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    /// Resident in VRAM; computed on the GPU.
    Pinned,
    /// Copied from pinned host memory into a VRAM scratch slot before use; computed on the GPU.
    Streamed,
    /// Computed on the CPU from host memory.
    Cpu,
    /// Bandwidth aggregation: the first `cpu` fraction of output rows are computed on the CPU, the
    /// rest are streamed and computed on the GPU.
    Split {
        /// Fraction of rows computed on the CPU.
        cpu: Frac,
    },
}

impl Place {
    /// The one-letter code used in maps and registries (`X` for split).
    pub fn letter(self) -> char {
        match self {
            Place::Pinned => 'P',
            Place::Streamed => 'S',
            Place::Cpu => 'C',
            Place::Split { .. } => 'X',
        }
    }

    /// Fraction of the tensor's bytes that is resident in VRAM.
    pub fn pinned_share(self) -> f64 {
        if self == Place::Pinned {
            1.0
        } else {
            0.0
        }
    }

    /// Fraction of the tensor's bytes streamed over PCIe per use.
    pub fn streamed_share(self) -> f64 {
        match self {
            Place::Streamed => 1.0,
            Place::Split { cpu } => 1.0 - cpu.get(),
            _ => 0.0,
        }
    }

    /// Fraction of the tensor's rows computed on the CPU.
    pub fn cpu_share(self) -> f64 {
        match self {
            Place::Cpu => 1.0,
            Place::Split { cpu } => cpu.get(),
            _ => 0.0,
        }
    }
}

/// Placement of every tensor of every group: `groups[g][i]` is member `i` of group `g`.
///
/// Kept per group member rather than per tensor because a tied output shares the embedding tensor
/// with the embedding group, and the two uses can be placed differently.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    /// Per group, per member tensor.
    pub groups: Vec<Vec<Place>>,
}

impl Placement {
    /// Everything of `spec` at one place.
    pub fn uniform(spec: &ModelSpec, p: Place) -> Placement {
        Placement {
            groups: spec
                .groups
                .iter()
                .map(|g| vec![p; g.tensors.len()])
                .collect(),
        }
    }

    /// The places of a group's members.
    pub fn group(&self, g: GroupId) -> &[Place] {
        &self.groups[g.0 as usize]
    }

    /// Sets all members of a group.
    pub fn set_group(&mut self, g: GroupId, p: Place) {
        for m in &mut self.groups[g.0 as usize] {
            *m = p;
        }
    }

    /// Whether any weight is placed on the GPU (pinned, streamed or split).
    pub fn uses_gpu(&self) -> bool {
        self.groups.iter().flatten().any(|p| *p != Place::Cpu)
    }

    /// Whether a layer is fully pinned (all its groups).
    pub fn layer_pinned(&self, spec: &ModelSpec, layer: usize) -> bool {
        spec.layers[layer]
            .groups
            .iter()
            .all(|g| self.group(*g).iter().all(|p| *p == Place::Pinned))
    }

    /// Whether a layer's attention group is pinned.
    pub fn attn_pinned(&self, spec: &ModelSpec, layer: usize) -> bool {
        spec.layer_group(layer, GroupRole::Attn)
            .map(|g| self.group(g).iter().all(|p| *p == Place::Pinned))
            .unwrap_or(false)
    }

    /// One character per layer: the place shared by all its weights, or a lowercase/mixed mark
    /// (`p` partly pinned, `s` partly streamed, `c` CPU+GPU without pinning, `X` split rows).
    pub fn layer_map(&self, spec: &ModelSpec) -> String {
        spec.layers
            .iter()
            .map(|l| {
                let places: Vec<Place> = l
                    .groups
                    .iter()
                    .flat_map(|g| self.group(*g).iter().copied())
                    .collect();
                let first = places[0];
                if places.iter().all(|p| *p == first) {
                    return first.letter();
                }
                // Layers whose matrices are split also hold small CPU-only vectors; call them split.
                if places.iter().any(|p| matches!(p, Place::Split { .. })) {
                    return 'X';
                }
                if places.contains(&Place::Pinned) {
                    'p'
                } else if places.contains(&Place::Streamed) {
                    's'
                } else {
                    'c'
                }
            })
            .collect()
    }
}

/// A placement rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// Everything pinned (the model fits whole).
    AllGpu,
    /// Static front-to-back fill; MoE: dense parts first, experts on the CPU.
    StaticFitparamsDenseprioMoeonly,
    /// Attention of as many layers as fit, then full layers; the rest on the CPU.
    StaticAttnprioAllmodels,
    /// Full layers pinned; in the rest FFN/experts on the CPU, attention streamed.
    DynamicFfncpuAttnstream,
    /// Full layers pinned; the rest streamed.
    GpuonlyLayerpinLayerstream,
    /// Attention of every layer pinned, then full layers; the remaining FFN/experts streamed.
    GpuonlyAttnpinFfnstream,
    /// Full layers pinned; every matrix of the rest split by rows between CPU and streaming.
    BandwidthAggregation,
    /// llama.cpp's `-ngl N`: the last N layers pinned whole, then the output projection; the rest
    /// on the CPU. Never searched: planned only when asked for (`plan_gpu_layers`).
    StaticNgl,
}

impl Strategy {
    /// All strategies the search tries (AllGpu is the whole-model special case).
    pub const SEARCHED: [Strategy; 6] = [
        Strategy::StaticFitparamsDenseprioMoeonly,
        Strategy::StaticAttnprioAllmodels,
        Strategy::DynamicFfncpuAttnstream,
        Strategy::GpuonlyLayerpinLayerstream,
        Strategy::GpuonlyAttnpinFfnstream,
        Strategy::BandwidthAggregation,
    ];

    /// Name as written in registries and reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::AllGpu => "ALL_GPU",
            Strategy::StaticFitparamsDenseprioMoeonly => "STATIC_FITPARAMS_DENSEPRIO_MOEONLY",
            Strategy::StaticAttnprioAllmodels => "STATIC_ATTNPRIO_ALLMODELS",
            Strategy::DynamicFfncpuAttnstream => "DYNAMIC_FFNCPU_ATTNSTREAM",
            Strategy::GpuonlyLayerpinLayerstream => "GPUONLY_LAYERPIN_LAYERSTREAM",
            Strategy::GpuonlyAttnpinFfnstream => "GPUONLY_ATTNPIN_FFNSTREAM",
            Strategy::BandwidthAggregation => "BANDWIDTH_AGGREGATION",
            Strategy::StaticNgl => "STATIC_NGL",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Strategy> {
        [Strategy::AllGpu, Strategy::StaticNgl]
            .into_iter()
            .chain(Strategy::SEARCHED)
            .find(|x| x.name() == s)
    }

    /// Where a tensor goes when the strategy did not pin it. `frac` is the CPU share for aggregation,
    /// which splits the rows of 2-D matrices (`splittable`); expert tensors and other 3-D
    /// matrices are never split (an expert FFN or a per-head matmul runs on one lane, see `lanes`).
    fn unpinned(self, role: GroupRole, splittable: bool, frac: Frac) -> Place {
        use Strategy::*;
        // An unpinned output projection produces only the logit rows (one per sequence): reading it
        // where it lies beats streaming hundreds of MB for a GEMV, so every strategy but aggregation
        // (which splits it) computes it on the CPU.
        if matches!(role, GroupRole::Output | GroupRole::OutputNorm)
            && self != BandwidthAggregation
            && self != AllGpu
        {
            return Place::Cpu;
        }
        match self {
            AllGpu => Place::Pinned,
            StaticFitparamsDenseprioMoeonly | StaticAttnprioAllmodels | StaticNgl => Place::Cpu,
            DynamicFfncpuAttnstream => match role {
                GroupRole::Attn => Place::Streamed,
                _ => Place::Cpu,
            },
            GpuonlyLayerpinLayerstream | GpuonlyAttnpinFfnstream => Place::Streamed,
            BandwidthAggregation => {
                if splittable && role != GroupRole::Experts {
                    Place::Split { cpu: frac }
                } else {
                    Place::Cpu
                }
            }
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A piece of a layer that a strategy pins in one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The attention group.
    Attn,
    /// Attention plus router plus shared experts plus dense FFNs (MoE "dense part").
    Dense,
    /// The up projection (dense FFN with its norm; MoE: up_exps with the router).
    Up,
    /// The gate projection (or gate_exps).
    Gate,
    /// Everything of the layer not yet pinned.
    Rest,
    /// The output projection with the final norm (global, pinned first by every strategy).
    Output,
}

/// One pinning step of a strategy's fill order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Step {
    /// Layer (ignored for [`Part::Output`]).
    pub layer: usize,
    /// What gets pinned.
    pub part: Part,
}

fn tensor_in_part(role: TensorRole, group: GroupRole, part: Part) -> bool {
    match part {
        Part::Attn => group == GroupRole::Attn,
        // Everything but the routed experts: the dense leading layers' FFNs of glm4moe and
        // deepseek2 too (llama.cpp's expert offload keeps them with attention).
        Part::Dense => matches!(
            group,
            GroupRole::Attn | GroupRole::Router | GroupRole::SharedExperts | GroupRole::Ffn
        ),
        Part::Up => {
            matches!(
                role,
                TensorRole::FfnUp | TensorRole::FfnNorm | TensorRole::FfnUpExps
            ) || group == GroupRole::Router
        }
        Part::Gate => matches!(role, TensorRole::FfnGate | TensorRole::FfnGateExps),
        Part::Rest => true,
        Part::Output => matches!(group, GroupRole::Output | GroupRole::OutputNorm),
    }
}

/// The fill order of a strategy: pinning `steps[..k]` gives its candidate with knob `k`.
pub fn steps(spec: &ModelSpec, s: Strategy) -> Vec<Step> {
    let n = spec.layers.len();
    let mut v = vec![Step {
        layer: 0,
        part: Part::Output,
    }];
    let full = |v: &mut Vec<Step>, l: usize| {
        for part in [Part::Attn, Part::Up, Part::Gate, Part::Rest] {
            v.push(Step { layer: l, part });
        }
    };
    match s {
        Strategy::AllGpu => {
            for l in 0..n {
                v.push(Step {
                    layer: l,
                    part: Part::Rest,
                });
            }
        }
        Strategy::StaticFitparamsDenseprioMoeonly if spec.is_moe() => {
            for l in 0..n {
                v.push(Step {
                    layer: l,
                    part: Part::Dense,
                });
            }
            for l in 0..n {
                for part in [Part::Up, Part::Gate, Part::Rest] {
                    v.push(Step { layer: l, part });
                }
            }
        }
        Strategy::StaticNgl => {
            // As llama.cpp counts: layers from the last one down, the output projection as the
            // (n_layer + 1)-th.
            v.clear();
            for l in (0..n).rev() {
                v.push(Step {
                    layer: l,
                    part: Part::Rest,
                });
            }
            v.push(Step {
                layer: 0,
                part: Part::Output,
            });
        }
        Strategy::StaticAttnprioAllmodels | Strategy::GpuonlyAttnpinFfnstream => {
            for l in 0..n {
                v.push(Step {
                    layer: l,
                    part: Part::Attn,
                });
            }
            for l in 0..n {
                for part in [Part::Up, Part::Gate, Part::Rest] {
                    v.push(Step { layer: l, part });
                }
            }
        }
        _ => {
            for l in 0..n {
                full(&mut v, l);
            }
        }
    }
    v
}

/// The placement of strategy `s` with `steps[..k]` pinned and CPU share `frac` for split tensors.
pub fn place(spec: &ModelSpec, s: Strategy, steps: &[Step], k: usize, frac: Frac) -> Placement {
    let mut p = Placement {
        groups: Vec::with_capacity(spec.groups.len()),
    };
    for g in &spec.groups {
        p.groups.push(
            g.tensors
                .iter()
                .map(|t| {
                    let td = spec.tensor(*t);
                    s.unpinned(g.role, td.is_matrix() && td.n_mats() == 1, frac)
                })
                .collect(),
        );
    }
    // The embedding lookup always reads the host table: keep its group on the CPU.
    p.set_group(spec.embed, Place::Cpu);
    for st in &steps[..k.min(steps.len())] {
        apply_step(spec, &mut p, *st);
    }
    p
}

/// Pins what `st` pins; returns the groups it touched.
pub fn apply_step(spec: &ModelSpec, p: &mut Placement, st: Step) -> Vec<GroupId> {
    let groups: Vec<GroupId> = match st.part {
        Part::Output => vec![spec.output_norm, spec.output],
        _ => spec.layers[st.layer].groups.clone(),
    };
    for g in &groups {
        let grp = spec.group(*g);
        for (mi, t) in grp.tensors.iter().enumerate() {
            if tensor_in_part(spec.tensor(*t).role, grp.role, st.part) {
                p.groups[g.0 as usize][mi] = Place::Pinned;
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_exact_in_text() {
        assert_eq!(Frac::from_f64(0.58779).to_string(), "0.5878");
        assert_eq!(Frac(10_000).to_string(), "1.0000");
        assert_eq!(Frac(7).to_string(), "0.0007");
        assert_eq!(Frac::from_f64(2.0), Frac(10_000));
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in std::iter::once(Strategy::AllGpu).chain(Strategy::SEARCHED) {
            assert_eq!(Strategy::from_name(s.name()), Some(s));
        }
        assert_eq!(Strategy::from_name("NOPE"), None);
    }

    #[test]
    fn boundary_order_is_attn_up_gate_rest() {
        use pshard_model::spec::TensorRole as R;
        assert!(tensor_in_part(R::AttnQ, GroupRole::Attn, Part::Attn));
        assert!(tensor_in_part(R::FfnUp, GroupRole::Ffn, Part::Up));
        assert!(tensor_in_part(R::FfnNorm, GroupRole::Ffn, Part::Up));
        assert!(!tensor_in_part(R::FfnGate, GroupRole::Ffn, Part::Up));
        assert!(tensor_in_part(R::FfnGate, GroupRole::Ffn, Part::Gate));
        assert!(tensor_in_part(R::FfnUpExps, GroupRole::Experts, Part::Up));
        assert!(tensor_in_part(R::FfnGateInp, GroupRole::Router, Part::Up));
        assert!(tensor_in_part(R::FfnDown, GroupRole::Ffn, Part::Rest));
        assert!(tensor_in_part(
            R::FfnGateInp,
            GroupRole::Router,
            Part::Dense
        ));
        assert!(!tensor_in_part(
            R::FfnUpExps,
            GroupRole::Experts,
            Part::Dense
        ));
        assert!(tensor_in_part(R::FfnDown, GroupRole::Ffn, Part::Dense));
        assert!(tensor_in_part(
            R::FfnDownShexp,
            GroupRole::SharedExperts,
            Part::Dense
        ));
    }
}
