//! pshard planner: machine profiles, token tiers, placement strategies, the cost model, the search
//! for the fastest placement per tier under a VRAM budget, and the registry that records the result.
//!
//! Entry points: [`profile::Profile`] (read/write profiles), [`costtable::CostTable`] (op timings from
//! profiles), [`search::plan`] (plan every tier), [`registry::Registry`] (the text registry next to the
//! model) and [`fingerprint::Fingerprint`] (content identity of a model file).

#![warn(missing_docs)]

pub mod cost;
pub mod costtable;
pub mod fingerprint;
pub mod lanes;
pub mod placement;
pub mod profile;
pub mod registry;
pub mod routing;
pub mod search;

pub use cost::PlanParams;
pub use costtable::CostTable;
pub use fingerprint::Fingerprint;
pub use placement::{Frac, Place, Placement, Strategy};
pub use profile::Profile;
pub use registry::Registry;
pub use search::{
    plan, plan_gpu_layers, plan_with, tiers, GraphFn, Plan, PlanError, Tier, TierPlan,
};
