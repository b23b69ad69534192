//! Fuzz target: arbitrary text through the profile parser and validator. It must never panic; an
//! accepted profile must survive a TOML round trip, and the cost table built from it (every point
//! turned into a roofline prediction) must not panic or overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pshard_planner::profile::{Profile, ProfileKind};
use pshard_planner::CostTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Profile::from_toml_str(text, "fuzz.toml") else {
        return;
    };
    let back = Profile::from_toml_str(&p.to_toml_string(), "rewritten.toml")
        .expect("a written profile reads back");
    // Debug text compares NaN-free floats exactly and keeps the comparison total.
    assert_eq!(format!("{back:?}"), format!("{p:?}"));
    let _ = p.identity();
    let threads = p.machine.threads_used as usize;
    let _table = match p.kind {
        ProfileKind::Cpu => CostTable::new(Some(&p), None, threads),
        ProfileKind::Gpu => CostTable::new(None, Some(&p), threads),
    };
});
