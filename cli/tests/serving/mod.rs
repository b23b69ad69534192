//! Helpers of the serving tests (`serve`, `chat`, `bench --parallel`): the test model, and a
//! `pshard serve` child process on a loopback port.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The model the tests run.
pub const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The test model, or `None` after a visible skip (a failure where `PSHARD_NO_SKIP` is set, as
/// in CI, which fetches the models).
pub fn model() -> Option<PathBuf> {
    pshard_testkit::real_model(MODEL)
}

/// The built `pshard` binary.
pub fn pshard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pshard"))
}

/// A running `pshard serve`; killed when dropped.
pub struct Server {
    /// The child process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its stderr so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `pshard serve` on the CPU with a free port and `extra` flags; waits for /health.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        Server::start_ctx(model, 512, extra)
    }

    /// [`Server::start`] with a context of `ctx` per sequence.
    pub fn start_ctx(model: &Path, ctx: usize, extra: &[&str]) -> Server {
        let mut child = pshard()
            .args(["serve", "--device", "cpu", "-t", "2", "--port", "0", "-c"])
            .arg(ctx.to_string())
            .arg("-m")
            .arg(model)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting pshard serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let url = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(url);
                }
                l2.lock().unwrap().push(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the server did not say where it listens: {:?}",
                    log.lock().unwrap()
                )
            });
        let s = Server { child, base, log };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = raw::get_status(&format!("{}/health", self.base)) {
                if r == 200 {
                    return;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "not ready: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The stderr lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking GET (status only) without a runtime, for readiness polls.
mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    pub fn get_status(url: &str) -> std::io::Result<u16> {
        let rest = url.trim_start_matches("http://");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = TcpStream::connect(host)?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }
}

/// One value of the server's /metrics text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}
