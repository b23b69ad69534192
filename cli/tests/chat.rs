//! `pshard chat` driven through a pseudo-terminal (SmolLM2 on the CPU): two turns, the second
//! evaluating only its own tokens (the first turn's KV reused); SIGINT stops a reply and the
//! chat goes on; Ctrl-D and `/exit` leave.

mod serving;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::pty::openpty;

/// `pshard chat` on a pseudo-terminal: what it wrote so far, and a way to type.
struct Term {
    child: Child,
    master: std::fs::File,
    screen: Arc<Mutex<String>>,
}

impl Term {
    fn start(args: &[&str]) -> Option<Term> {
        Term::spawn("chat", args)
    }

    /// `pshard COMMAND --device cpu ... ARGS` on a new pseudo-terminal.
    fn spawn(command: &str, args: &[&str]) -> Option<Term> {
        let model = serving::model()?;
        let pty = openpty(None, None).unwrap();
        let slave = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        let child = serving::pshard()
            .args([
                command, "--device", "cpu", "-t", "2", "-c", "512", "--temp", "0", "-m",
            ])
            .arg(model)
            .args(args)
            .env("TERM", "xterm")
            .stdin(slave(&pty.slave))
            .stdout(slave(&pty.slave))
            .stderr(slave(&pty.slave))
            .spawn()
            .unwrap();
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        let screen = Arc::new(Mutex::new(String::new()));
        let (mut r, mut w) = (master.try_clone().unwrap(), master.try_clone().unwrap());
        let sc = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let s = String::from_utf8_lossy(&buf[..n]).into_owned();
                // Line editors may ask where the cursor is; answer as a terminal would.
                if s.contains("\x1b[6n") {
                    let _ = w.write_all(b"\x1b[1;1R");
                }
                sc.lock().unwrap().push_str(&s);
            }
        });
        Some(Term {
            child,
            master,
            screen,
        })
    }

    fn screen(&self) -> String {
        self.screen.lock().unwrap().clone()
    }

    fn type_line(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    /// Waits until the screen holds `n` lines containing `what`; returns them.
    fn wait_for(&self, what: &str, n: usize) -> Vec<String> {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            let lines: Vec<String> = s
                .split(['\n', '\r'])
                .filter(|l| l.contains(what))
                .map(str::to_string)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "waiting for {n}× {what:?}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "still running:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(prompt tokens, reused, evaluated, reply tokens)` of a turn's statistics line.
fn stats(line: &str) -> (usize, usize, usize, usize) {
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|w| !w.is_empty() && !w.contains('.'))
        .map(|w| w.parse().unwrap())
        .collect();
    (nums[0], nums[1], nums[2], nums[3])
}

#[test]
fn two_turns_the_second_evaluating_only_its_own_tokens() {
    let Some(mut t) = Term::start(&["-n", "8", "--system", "You are terse."]) else {
        return;
    };
    t.wait_for("Ctrl-D or /exit leaves", 1);
    t.type_line("What is the capital of France?");
    let l1 = t.wait_for("[prompt ", 1);
    let (p1, r1, e1, g1) = stats(&l1[0]);
    assert_eq!((r1, e1), (0, p1), "{}", l1[0]);
    assert!((1..=8).contains(&g1), "{}", l1[0]);
    t.type_line("And of Italy?");
    let l2 = t.wait_for("[prompt ", 2);
    let (p2, r2, e2, _) = stats(&l2[1]);
    // Everything the first turn put in the KV is reused: its prompt and its reply (all but the
    // reply's last token when it ended on length, which is evaluated with this turn).
    assert!(
        r2 == p1 + g1 - 1 || r2 == p1 + g1,
        "turn 1 {:?}, turn 2 {}",
        l1[0],
        l2[1]
    );
    assert_eq!(e2, p2 - r2);
    // This turn's own tokens: "And of Italy?" in the template's turn markers.
    assert!(e2 < 24, "{}", l2[1]);
    t.master.write_all(b"\x04").unwrap();
    let st = t.wait_exit();
    assert!(st.success(), "{st:?}\n{}", t.screen());
}

/// A message longer than the context: refused without `--context-shift`, cut to fit with it.
#[test]
fn a_message_longer_than_the_context_needs_a_context_shift() {
    let long = "word ".repeat(600);
    let Some(mut t) = Term::start(&["-n", "4"]) else {
        return;
    };
    t.wait_for("Ctrl-D or /exit leaves", 1);
    t.type_line(&long);
    t.wait_for("the conversation would need", 1);
    t.type_line("/exit");
    assert!(t.wait_exit().success());
    let Some(mut t) = Term::start(&["-n", "4", "--context-shift"]) else {
        return;
    };
    t.wait_for("Ctrl-D or /exit leaves", 1);
    t.type_line(&long);
    let l = t.wait_for("[prompt ", 1);
    // (The reply may be empty: the cut prompt lost the template's opening.)
    let (p, r, e, _) = stats(&l[0]);
    assert!(p > 512, "{}", l[0]);
    // Kept: nothing but the BOS, if any, and the last half of the context.
    assert!(r == 0 && e <= 257, "{}", l[0]);
    assert!(l[0].contains("cut to fit the context"), "{}", l[0]);
    t.type_line("/exit");
    assert!(t.wait_exit().success());
}

#[test]
fn sigint_stops_a_reply_and_exit_leaves() {
    let Some(mut t) = Term::start(&["-n", "400"]) else {
        return;
    };
    t.wait_for("Ctrl-D or /exit leaves", 1);
    t.type_line("Write a very long story about a dragon and a knight.");
    // Wait for the reply to start (the echo of the line, then text after it).
    let t0 = Instant::now();
    loop {
        let s = t.screen();
        let after = s.split("knight.").nth(1).unwrap_or("");
        if after.trim().len() > 10 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{s}");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let l = t.wait_for("[prompt ", 1);
    assert!(l[0].contains("stopped"), "{}", l[0]);
    assert!(stats(&l[0]).3 < 400, "{}", l[0]);
    // Still chatting: another turn, then /exit.
    t.type_line("Thanks.");
    t.wait_for("[prompt ", 2);
    t.type_line("/exit");
    let st = t.wait_exit();
    assert!(st.success(), "{st:?}\n{}", t.screen());
}

#[test]
fn run_cnv_starts_the_chat() {
    let Some(mut t) = Term::spawn("run", &["-cnv", "-n", "4"]) else {
        return;
    };
    t.wait_for("Ctrl-D or /exit leaves", 1);
    t.type_line("Hello!");
    let l = t.wait_for("[prompt ", 1);
    assert!(stats(&l[0]).3 <= 4, "{}", l[0]);
    t.type_line("/exit");
    let st = t.wait_exit();
    assert!(st.success(), "{st:?}\n{}", t.screen());
    // A prompt flag has no place in an interactive chat.
    let model = serving::model().unwrap();
    let out = serving::pshard()
        .args(["run", "-cnv", "-p", "hi", "--device", "cpu", "-m"])
        .arg(model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-cnv starts an interactive chat"));
}
