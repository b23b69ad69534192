//! Test support shared by the workspace's tests: where the real test models are, and skips that
//! are seen and that fail where nothing may be skipped.
//!
//! A test that cannot run here (no test model, no GPU) calls [`skip`] and returns. The message is
//! written to the process's stderr directly, past the test harness's capture of `print!` and
//! `eprint!`, so it shows in every `cargo test` run. Where the missing thing is provided — CI fetches
//! the models; the GPU machine has a GPU — the runner sets [`NO_SKIP_ENV`] and a skip fails the test
//! instead of passing it silently.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Set (to anything) by `.ci/run` and `scripts/gpu-check.sh`: every [`skip`] is then a failure.
pub const NO_SKIP_ENV: &str = "PSHARD_NO_SKIP";

/// Whether skips are failures in this run ([`NO_SKIP_ENV`] is set).
pub fn skips_fail() -> bool {
    std::env::var_os(NO_SKIP_ENV).is_some()
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string()
}

/// Skips the calling test (which then returns) with a visible `SKIP test: why` line; panics instead
/// when [`NO_SKIP_ENV`] is set, because there the missing thing must be present.
pub fn skip(why: &str) {
    let test = test_name();
    if skips_fail() {
        panic!("{test}: would skip, but {NO_SKIP_ENV} is set (nothing may be skipped here): {why}");
    }
    note(&format!("SKIP {test}: {why}"));
}

/// Writes one line to stderr past the harness's output capture (for facts a reader of the test
/// log must see, such as a part of a test that this machine cannot run).
pub fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Where the real test models are: `$PSHARD_MODELS`, else `~/.cache/pshard/models`, if it is a folder.
pub fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PSHARD_MODELS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/pshard/models")))?;
    dir.is_dir().then_some(dir)
}

/// A real test model by file name, or `None` after a [`skip`] (a failure in CI, which fetches them
/// with scripts/fetch-models.sh).
pub fn real_model(name: &str) -> Option<PathBuf> {
    match models_dir().map(|d| d.join(name)) {
        Some(p) if p.is_file() => Some(p),
        _ => {
            skip(&format!(
                "test model {name} not found (run scripts/fetch-models.sh or set PSHARD_MODELS)"
            ));
            None
        }
    }
}

/// A text file the tests read (e.g. a licence text as perplexity input), or `None` after a [`skip`].
pub fn text_file(path: &str) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) => {
            skip(&format!("cannot read {path}: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The skip line gets past the harness's capture, and a skip fails when skips must not happen.
    #[test]
    fn skip_fails_only_when_told() {
        // This test's own environment decides which branch runs; both are checked through a child
        // process so the variable can be set and unset.
        let exe = std::env::current_exe().unwrap();
        for (set, want_ok) in [(false, true), (true, false)] {
            let mut c = std::process::Command::new(&exe);
            c.args(["--exact", "tests::child_skips", "--include-ignored"]);
            if set {
                c.env(NO_SKIP_ENV, "1");
            } else {
                c.env_remove(NO_SKIP_ENV);
            }
            let out = c.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            let all = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
            assert_eq!(out.status.success(), want_ok, "{all}");
            if want_ok {
                assert!(
                    err.contains("SKIP tests::child_skips: nothing here"),
                    "{all}"
                );
            } else {
                assert!(
                    all.contains("would skip, but PSHARD_NO_SKIP is set"),
                    "{all}"
                );
            }
        }
    }

    #[test]
    #[ignore = "run by skip_fails_only_when_told"]
    fn child_skips() {
        skip("nothing here");
    }
}
