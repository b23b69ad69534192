//! The bad-input sweep: the `pshard` binary against truncated and mutated GGUF files, swapped tensor
//! types, absurd hparams, hostile numeric arguments, corrupted registries and profiles, and closed
//! output pipes. Every case runs under a timeout and must end by itself: no panic, no signal, no
//! hang, no exit 0 with a NaN or a silently shortened result, and no input file changed by a command
//! that failed. Cases are generated from a fixed seed, so a failure replays.

mod common;

use std::time::Duration;

use common::{
    file, path, read, run, run_full, set_f32, set_uint, synth_bytes, tensor_type_at, Out,
};
use pshard_model::gguf::GgufHeader;
use pshard_planner::registry::Registry;

/// Timeout of one case: every case is a tiny model or a parse, well under a second when healthy.
const CASE: Duration = Duration::from_secs(30);

/// SplitMix64: a fixed, dependency-free source of case parameters.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `good` cut at `cuts − 1` evenly spaced lengths (from 0), then `mutations` copies with one byte
/// changed: to a character of `alphabet` (plausible syntax), to its successor, or to anything.
fn corrupted(
    good: &[u8],
    cuts: usize,
    mutations: usize,
    alphabet: &[u8],
    seed: u64,
) -> Vec<Vec<u8>> {
    let mut cases: Vec<Vec<u8>> = (0..cuts)
        .map(|i| good[..good.len() * i / cuts].to_vec())
        .collect();
    let mut rng = Rng(seed);
    for _ in 0..mutations {
        let mut c = good.to_vec();
        let at = rng.below(c.len());
        c[at] = match rng.below(3) {
            0 => alphabet[rng.below(alphabet.len())],
            1 => c[at].wrapping_add(1),
            _ => rng.next() as u8,
        };
        cases.push(c);
    }
    cases
}

/// Runs `args` on the case; the outcome must be clean, and an accepted model must run one token.
fn gguf_case(name: &str, bytes: &[u8]) -> bool {
    let m = file(name, bytes);
    let o = run_full(&["inspect", &m], None, Out::Capture, CASE);
    o.assert_clean();
    let accepted = o.code == Some(0);
    if accepted {
        run_full(
            &["run", "-m", &m, "-p", "hi", "-n", "2", "--device", "cpu"],
            None,
            Out::Capture,
            CASE,
        )
        .assert_clean();
    } else {
        assert!(o.stderr.contains("error:"), "a refusal says why: {o:#?}");
    }
    std::fs::remove_file(&m).ok();
    accepted
}

#[test]
fn sweep_gguf_truncations() {
    let g = synth_bytes("tiny-llama", "q8_0");
    let h = GgufHeader::parse(&g, "tiny").unwrap();
    let data = h.data_offset as usize;
    let last_end = data
        + h.tensors
            .iter()
            .map(|t| (t.offset + t.bytes) as usize)
            .max()
            .unwrap();
    let mut cuts = vec![0, 1, 3, 4, 7, 8, 15, 16, 23, 24, 40];
    cuts.extend([data / 4, data / 2, 3 * data / 4, data - 1, data, data + 1]);
    cuts.extend([(data + last_end) / 2, last_end - 1]);
    for cut in cuts {
        assert!(
            !gguf_case("cut.gguf", &g[..cut]),
            "cut at {cut} of {} accepted",
            g.len()
        );
    }
    // Only the final padding may go.
    assert!(gguf_case("cut.gguf", &g[..last_end]));
}

#[test]
fn sweep_gguf_header_mutations() {
    let g = synth_bytes("tiny-llama", "q8_0");
    let data = GgufHeader::parse(&g, "tiny").unwrap().data_offset as usize;
    let mut rng = Rng(0x5eed_0001);
    let special = [0u8, 1, 0x7f, 0x80, 0xff];
    for _ in 0..60 {
        let mut m = g.clone();
        let at = rng.below(data);
        m[at] = if rng.below(2) == 0 {
            special[rng.below(special.len())]
        } else {
            rng.next() as u8
        };
        gguf_case("mutated.gguf", &m);
    }
}

#[test]
fn sweep_tensor_info_mutations_and_type_swaps() {
    let g = synth_bytes("tiny-llama", "q8_0");
    let h = GgufHeader::parse(&g, "tiny").unwrap();
    let names = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.1.ffn_down.weight",
        "output_norm.weight",
    ];
    for name in names {
        let ty_at = tensor_type_at(&g, name);
        let t = &h.tensors[h.tensor_index(name).unwrap()];
        let nd_at = ty_at - 8 * t.dims.len() - 4;
        let fields: [(usize, usize); 4] = [(nd_at, 4), (nd_at + 4, 8), (ty_at, 4), (ty_at + 4, 8)];
        for (at, width) in fields {
            for v in [
                0u64,
                1,
                5,
                31,
                32,
                1 << 31,
                u32::MAX as u64,
                1 << 40,
                u64::MAX,
            ] {
                let mut m = g.clone();
                m[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                gguf_case("info.gguf", &m);
            }
        }
        // Every type id, and some that are not.
        let original = t.ty;
        for id in (0..=42u32).chain([255, u32::MAX]) {
            let mut m = g.clone();
            m[ty_at..ty_at + 4].copy_from_slice(&id.to_le_bytes());
            let accepted = gguf_case("swap.gguf", &m);
            if accepted && id != original as u32 {
                // Only a type of exactly the same size can pass the data-section accounting.
                let swapped = GgufHeader::parse(&m, "swap").unwrap();
                let s = &swapped.tensors[swapped.tensor_index(name).unwrap()];
                assert_eq!(
                    s.bytes, t.bytes,
                    "{name} as type {id} accepted with another size"
                );
            }
        }
    }
}

#[test]
fn sweep_absurd_hparams() {
    let g = synth_bytes("tiny-llama", "q8_0");
    let ints = [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.feed_forward_length",
        "llama.context_length",
        "llama.rope.dimension_count",
        "llama.vocab_size",
    ];
    for key in ints {
        for v in [0u64, 1, 3, 7, 1 << 31, u32::MAX as u64] {
            let mut m = g.clone();
            set_uint(&mut m, key, v);
            gguf_case("hparam.gguf", &m);
        }
    }
    let floats = [
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base",
    ];
    for key in floats {
        for v in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -1.0,
            1e-45,
            1.0,
            3e38,
        ] {
            let mut m = g.clone();
            set_f32(&mut m, key, v);
            let accepted = gguf_case("hparam.gguf", &m);
            assert!(
                !accepted || (v.is_finite() && v > 0.0),
                "{key} = {v} accepted"
            );
        }
    }
}

/// Weights holding NaN pass every header check; the result must still never be a NaN with exit 0.
#[test]
fn sweep_nan_weights_never_exit_0() {
    let mut g = synth_bytes("tiny-llama", "q8_0");
    let h = GgufHeader::parse(&g, "tiny").unwrap();
    let t = &h.tensors[h.tensor_index("output_norm.weight").unwrap()];
    let start = (h.data_offset + t.offset) as usize;
    for w in g[start..start + t.bytes as usize].chunks_mut(4) {
        w.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let m = file("nan.gguf", &g);
    let text = file(
        "nan.txt",
        "some text to score, repeated. ".repeat(20).as_bytes(),
    );
    run(&["run", "-m", &m, "-p", "hi", "-n", "4", "--device", "cpu"])
        .assert_error(&["no finite logits"]);
    run(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        &text,
        "-c",
        "16",
        "--device",
        "cpu",
    ])
    .assert_error(&["non-finite logits"]);
}

const HOSTILE: [&str; 12] = [
    "0",
    "-1",
    "-2",
    "2147483648",
    "18446744073709551615",
    "18446744073709551616",
    "1e309",
    "nan",
    "-inf",
    "",
    "x",
    "0x10",
];

/// A run that exits 0 generated what was asked, or says why not.
fn check_not_silently_short(o: &common::Outcome, asked: Option<usize>) {
    let Some(n) = asked else { return };
    let got = common::number_after(&o.stderr, "generation: ")
        .unwrap_or_else(|| panic!("no generation count: {o:#?}")) as usize;
    assert!(
        got == n || o.stderr.contains("is full"),
        "{got} of {n} tokens, silently: {o:#?}"
    );
}

#[test]
fn sweep_hostile_numeric_arguments() {
    let m = common::tiny();
    let text = file(
        "hostile.txt",
        "words to score, again and again. ".repeat(30).as_bytes(),
    );
    let reg = path("hostile.pshard");
    let reg = reg.to_str().unwrap().to_string();
    let run_base: Vec<&str> = vec![
        "run",
        "-m",
        &m,
        "-p",
        "hi",
        "-n",
        "4",
        "--ignore-eos",
        "--device",
        "cpu",
    ];
    let ppl_base: Vec<&str> = vec![
        "perplexity",
        "-m",
        &m,
        "-f",
        &text,
        "-c",
        "16",
        "--chunks",
        "2",
        "--device",
        "cpu",
    ];
    let bench_base: Vec<&str> = vec![
        "bench", "-m", &m, "-p", "8", "-n", "2", "-r", "1", "--device", "cpu",
    ];
    let plan_base: Vec<&str> = vec![
        "plan",
        "-m",
        &m,
        "--vram-budget",
        "0",
        "-c",
        "256",
        "-o",
        &reg,
    ];
    let cases: [(&Vec<&str>, &[&str]); 4] = [
        (
            &run_base,
            &[
                "-n",
                "-c",
                "-t",
                "-u",
                "--temp",
                "--top-k",
                "--top-p",
                "--min-p",
                "--repeat-penalty",
                "--repeat-last-n",
                "-s",
                "--vram-budget",
                "-ngl",
                "-fa",
                "-ctk",
            ],
        ),
        (&ppl_base, &["-c", "--chunks", "-t", "-u"]),
        (&bench_base, &["-p", "-n", "-r", "-u", "-t", "--seed"]),
        (
            &plan_base,
            &[
                "-c",
                "--parallel",
                "-t",
                "-b",
                "--tier-max",
                "--decode-depth",
                "--vram-budget",
            ],
        ),
    ];
    for (base, flags) in cases {
        for flag in flags.iter() {
            for v in HOSTILE {
                // The flag's value replaces the base's, if the base sets it (clap refuses a flag twice).
                let mut args = base.clone();
                match args.iter().position(|a| a == flag) {
                    Some(i) => args[i + 1] = v,
                    None => args.extend_from_slice(&[flag, v]),
                }
                assert_eq!(args.iter().filter(|a| *a == flag).count(), 1);
                let o = run_full(&args, None, Out::Capture, CASE);
                o.assert_clean();
                if o.code != Some(0) {
                    continue;
                }
                match args[0] {
                    "run" => {
                        let asked = if *flag == "-n" {
                            v.parse().ok()
                        } else {
                            Some(4)
                        };
                        check_not_silently_short(&o, asked);
                    }
                    "perplexity" => {
                        let ppl = common::number_after(&o.stdout, "PPL = ").unwrap_or(f64::NAN);
                        assert!(
                            ppl.is_finite(),
                            "exit 0 without a finite perplexity: {o:#?}"
                        );
                    }
                    _ => assert!(!o.stdout.contains("NaN"), "{o:#?}"),
                }
            }
        }
    }
}

#[test]
fn sweep_corrupted_registries() {
    let m = common::tiny();
    let good_path = path("sweep-good.pshard");
    run(&[
        "plan",
        "-m",
        &m,
        "--vram-budget",
        "0",
        "-c",
        "256",
        "-o",
        good_path.to_str().unwrap(),
    ])
    .assert_ok();
    let good = read(good_path.to_str().unwrap());
    let cases = corrupted(&good, 10, 40, b"0123456789 -.[]#\n", 0x5eed_0002);
    for c in cases {
        let reg = file("sweep-reg.pshard", &c);
        let o = run_full(
            &[
                "plan",
                "-m",
                &m,
                "--vram-budget",
                "0",
                "-c",
                "256",
                "-o",
                &reg,
            ],
            None,
            Out::Capture,
            CASE,
        );
        o.assert_clean();
        let readable = std::str::from_utf8(&c)
            .ok()
            .is_some_and(|t| Registry::parse(t).is_ok());
        if o.code == Some(0) {
            assert!(readable, "an unreadable registry was replaced: {o:#?}");
        } else {
            assert_eq!(
                read(&reg),
                c,
                "a registry was changed by a failed plan: {o:#?}"
            );
        }
    }
}

#[test]
fn sweep_corrupted_profiles() {
    let m = common::tiny();
    let committed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/h200-cpu.toml");
    let good = std::fs::read(committed).unwrap();
    let cases = corrupted(&good, 8, 30, b"0123456789e-.+[]=\"\n", 0x5eed_0003);
    let svg = path("sweep.svg");
    let svg = svg.to_str().unwrap();
    let reg = path("sweep-prof.pshard");
    let reg = reg.to_str().unwrap();
    for c in cases {
        let p = file("sweep-profile.toml", &c);
        for args in [
            vec![
                "plan",
                "-m",
                &m,
                "--vram-budget",
                "0",
                "-c",
                "256",
                "--cpu-profile",
                &p,
                "-o",
                reg,
            ],
            vec!["profile", "plot", &p, "-o", svg],
        ] {
            let o = run_full(&args, None, Out::Capture, CASE);
            o.assert_clean();
            assert_eq!(read(&p), c, "the profile was changed: {o:#?}");
            assert!(o.code != Some(0) || !o.stdout.contains("NaN"), "{o:#?}");
        }
        let _ = std::fs::remove_file(reg);
    }
}

#[test]
fn sweep_broken_pipes() {
    let m = common::tiny();
    let text = file("pipe.txt", "text for the pipe test. ".repeat(20).as_bytes());
    let reg = path("pipe-sweep.pshard");
    let reg = reg.to_str().unwrap();
    let svg = path("pipe.svg");
    let svg = svg.to_str().unwrap();
    let prof = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/h200-gpu.toml");
    let prof = prof.to_str().unwrap();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["synth", "--list"],
        vec!["inspect", &m],
        vec!["inspect", "-m", &m, "--json"],
        vec![
            "plan",
            "-m",
            &m,
            "--vram-budget",
            "0",
            "-c",
            "256",
            "--explain",
            "-o",
            reg,
        ],
        vec![
            "plan",
            "-m",
            &m,
            "--vram-budget",
            "0",
            "-c",
            "256",
            "--json",
            "-o",
            reg,
        ],
        vec!["tokenize", "-m", &m, "-p", "hello", "--show-count"],
        vec!["run", "-m", &m, "-p", "hello", "-n", "8", "--device", "cpu"],
        vec![
            "perplexity",
            "-m",
            &m,
            "-f",
            &text,
            "-c",
            "16",
            "--device",
            "cpu",
        ],
        vec![
            "bench", "-m", &m, "-p", "8", "-n", "2", "-r", "1", "--device", "cpu",
        ],
        vec![
            "bench", "-m", &m, "-p", "8", "-n", "0", "-r", "1", "-o", "json", "--device", "cpu",
        ],
        vec!["profile", "plot", prof, "-o", svg],
    ] {
        run_full(&args, None, Out::Closed, CASE).assert_ok();
    }
    assert!(
        read(svg).starts_with(b"<svg"),
        "the chart is written even when stdout is gone"
    );
}
