//! Shared by the command-line tests: running the built `pshard` binary under a timeout (with stdin
//! text, or with a standard output whose reader is gone), tiny synthetic models, and GGUF byte
//! surgery.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pshard_model::synth::{preset, write_synth, QuantRecipe};

/// What one run of the binary did.
#[derive(Debug)]
pub struct Outcome {
    /// The command line, for messages.
    pub args: String,
    /// Exit code (`None` when killed by a signal or by the timeout).
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// Whether it ran past its timeout (and was killed).
    pub timed_out: bool,
    /// Standard output (empty when stdout was a closed pipe).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Seconds it ran.
    pub secs: f64,
}

impl Outcome {
    /// Panics with the whole outcome unless it ended by itself with no signal and no panic message:
    /// what every input, however hostile, must get.
    pub fn assert_clean(&self) -> &Self {
        assert!(
            !self.timed_out,
            "hang (killed after {:.0} s): {self:#?}",
            self.secs
        );
        assert!(self.signal.is_none(), "killed by a signal: {self:#?}");
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "panic: {self:#?}"
        );
        assert!(
            matches!(self.code, Some(0..=2)),
            "exit code outside 0..=2 (abort?): {self:#?}"
        );
        self
    }

    /// Asserts a clean failure (exit 1 or 2) whose message contains every one of `needles`.
    pub fn assert_error(&self, needles: &[&str]) -> &Self {
        self.assert_clean();
        assert!(
            matches!(self.code, Some(1 | 2)),
            "expected an error: {self:#?}"
        );
        let first_error = self
            .stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or_else(|| panic!("no error line: {self:#?}"));
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr does not say {n:?}: {self:#?}"
            );
        }
        assert!(!first_error.is_empty());
        self
    }

    /// Asserts a clean success.
    pub fn assert_ok(&self) -> &Self {
        self.assert_clean();
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        self
    }
}

/// Where standard output goes.
pub enum Out {
    /// Captured.
    Capture,
    /// A pipe whose reading end is already closed: every write meets EPIPE (`… | head -c0`).
    Closed,
}

/// The binary under test: this build's, or `$PSHARD_TEST_BIN` (to run the same tests against
/// another build, e.g. to see which fail on an older one).
pub fn binary() -> PathBuf {
    std::env::var_os("PSHARD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pshard")))
}

/// Runs `pshard ARGS` with `stdin` as its input, killed after `timeout`.
pub fn run_full(args: &[&str], stdin: Option<&[u8]>, out: Out, timeout: Duration) -> Outcome {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env("HOME", home())
        .env_remove("RUST_BACKTRACE")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    match out {
        Out::Capture => {
            cmd.stdout(Stdio::piped());
        }
        Out::Closed => {
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            cmd.stdout(writer);
        }
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn pshard");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    // Read both streams on threads so a full pipe cannot block the child.
    let read = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let so = read(child.stdout.take().map(|s| Box::new(s) as Box<_>));
    let se = read(child.stderr.take().map(|s| Box::new(s) as Box<_>));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        args: args.join(" "),
        code: if timed_out { None } else { status.code() },
        signal: if timed_out { None } else { status.signal() },
        timed_out,
        stdout: so.join().unwrap_or_default(),
        stderr: se.join().unwrap_or_default(),
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// Default timeout of one run: generous for a loaded 2-core machine, short for a hang.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `pshard ARGS`, output captured.
pub fn run(args: &[&str]) -> Outcome {
    run_full(args, None, Out::Capture, TIMEOUT)
}

/// A private folder for this test binary's files (and its `HOME`, so no user profile is read).
pub fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let d = std::env::temp_dir().join(format!("pshard-{name}-{}", std::process::id()));
        std::fs::create_dir_all(d.join("home")).unwrap();
        d
    })
}

fn home() -> PathBuf {
    dir().join("home")
}

/// A path in [`dir`].
pub fn path(name: &str) -> PathBuf {
    dir().join(name)
}

/// Bytes of a synthetic model (preset, recipe), seed 7.
pub fn synth_bytes(preset_name: &str, recipe: &str) -> Vec<u8> {
    let p = preset(preset_name).expect("preset");
    let r = QuantRecipe::from_name(recipe).expect("recipe");
    write_synth(&p, r, 7, Vec::new(), &mut |_, _| {}).expect("synth")
}

/// Writes bytes to a file in [`dir`] and returns its path as a string.
pub fn file(name: &str, bytes: &[u8]) -> String {
    let p = path(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

/// The tiny llama model (2 layers, vocab 512, training context 512), written once.
pub fn tiny() -> String {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| file("tiny-llama.gguf", &synth_bytes("tiny-llama", "q8_0")))
        .clone()
}

/// Offset of the value of metadata key `key` (after its length, name and type id) and its type id.
pub fn meta_value_at(gguf: &[u8], key: &str) -> (usize, u32) {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    let at = gguf
        .windows(pat.len())
        .position(|w| w == pat)
        .unwrap_or_else(|| panic!("no key {key}"))
        + pat.len();
    let ty = u32::from_le_bytes(gguf[at..at + 4].try_into().unwrap());
    (at + 4, ty)
}

/// Sets an integer metadata value in place (u32 or u64 keys).
pub fn set_uint(gguf: &mut [u8], key: &str, v: u64) {
    let (at, ty) = meta_value_at(gguf, key);
    match ty {
        4 => gguf[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes()),
        10 => gguf[at..at + 8].copy_from_slice(&v.to_le_bytes()),
        other => panic!("{key}: type {other} is not u32/u64"),
    }
}

/// Sets an f32 metadata value in place.
pub fn set_f32(gguf: &mut [u8], key: &str, v: f32) {
    let (at, ty) = meta_value_at(gguf, key);
    assert_eq!(ty, 6, "{key} is not f32");
    gguf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Offset of a tensor info's type field.
pub fn tensor_type_at(gguf: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let nd_at = gguf
        .windows(pat.len())
        .position(|w| w == pat)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        + pat.len();
    let n_dims = u32::from_le_bytes(gguf[nd_at..nd_at + 4].try_into().unwrap()) as usize;
    nd_at + 4 + 8 * n_dims
}

/// SHA-free content check: the bytes of a file.
pub fn read(p: &str) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// The number that follows the first `marker` in `text` (e.g. `PPL = 3.2`, `generation: 12 tokens`).
pub fn number_after(text: &str, marker: &str) -> Option<f64> {
    text.split(marker)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
