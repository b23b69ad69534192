//! Fuzz target: arbitrary command lines (NUL-separated arguments after the program name) through
//! pshard's argument handling: the llama.cpp spelling rewrite, clap's parse with every value
//! parser, and the checks that need no file. It must never panic (clap's own consistency checks
//! of the command definitions run too, in this debug-assertion build).
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let argv = std::iter::once(OsString::from("pshard"))
        .chain(data.split(|&b| b == 0).map(|a| OsString::from_vec(a.to_vec())));
    if let Ok(cli) = pshard::parse(argv) {
        let _ = pshard::check(&cli);
    }
});
