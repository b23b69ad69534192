//! Fuzz target: arbitrary bytes through the registry parser. It must never panic; an accepted
//! registry must write out canonically and read back equal (`parse(write(r)) == r`), and writing
//! is a fixed point (`write(parse(write(r))) == write(r)`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pshard_planner::registry::Registry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(reg) = Registry::parse(text) else {
        return;
    };
    let written = reg.to_text();
    let back = Registry::parse(&written).expect("a written registry parses");
    assert_eq!(back, reg, "parse(write(r)) != r");
    assert_eq!(back.to_text(), written, "writing is not canonical");
});
