//! The `pshard` binary, run as a user runs it: exit codes, error messages, `--json` / `-o json`
//! shapes, the registry it writes, and every finding of the hostile-user review (broken pipes,
//! absurd arguments and hparams, files that must not be lost, llama.cpp's habits). Models are tiny
//! synthetic ones (`pshard synth` presets), so every run takes a fraction of a second.

mod common;

use common::{
    file, number_after, path, read, run, run_full, set_f32, set_uint, synth_bytes, tiny, Out,
    TIMEOUT,
};
use pshard_planner::registry::Registry;

// ---- broken pipes ------------------------------------------------------------------------------

/// `pshard … | head` closes the pipe early: a normal end (exit 0), never a panic.
#[test]
fn closed_stdout_is_a_normal_end() {
    let m = tiny();
    let reg = path("pipe.pshard");
    let reg = reg.to_str().unwrap();
    for args in [
        vec!["inspect", &m],
        vec!["inspect", &m, "--json"],
        vec!["synth", "--list"],
        vec![
            "plan",
            "-m",
            &m,
            "--vram-budget",
            "0",
            "--explain",
            "-o",
            reg,
        ],
        vec!["plan", "-m", &m, "--vram-budget", "0", "--json", "-o", reg],
        vec!["tokenize", "-m", &m, "-p", "hello"],
        vec!["run", "-m", &m, "-p", "hello", "-n", "4", "--device", "cpu"],
    ] {
        let o = run_full(&args, None, Out::Closed, TIMEOUT);
        o.assert_ok();
    }
}

// ---- panics and aborts on numbers ----------------------------------------------------------------

/// `perplexity -c 0` divided by zero; `-c 2` scored nothing and printed PPL = NaN with exit 0.
#[test]
fn perplexity_context_below_three_is_refused() {
    let text = file(
        "ppl.txt",
        "the quick brown fox jumps over the lazy dog. "
            .repeat(20)
            .as_bytes(),
    );
    for c in ["0", "1", "2"] {
        run(&[
            "perplexity",
            "-m",
            &tiny(),
            "-f",
            &text,
            "-c",
            c,
            "--device",
            "cpu",
        ])
        .assert_error(&[&format!("-c {c}"), "at least 3"]);
    }
    // A context that scores something gives a finite perplexity.
    let o = run(&[
        "perplexity",
        "-m",
        &tiny(),
        "-f",
        &text,
        "-c",
        "16",
        "--device",
        "cpu",
    ]);
    o.assert_ok();
    let ppl = common::number_after(&o.stdout, "PPL = ").unwrap_or_else(|| panic!("no PPL: {o:#?}"));
    assert!(ppl.is_finite() && ppl > 1.0, "{o:#?}");
}

/// `run -c 99999999` aborted allocating 38 GB; `-c 200000` zero-filled 4.5 GB of KV for a model
/// trained at 8192. A context past the training context is refused before anything is allocated.
#[test]
fn context_past_the_training_context_is_refused() {
    for c in ["513", "200000", "99999999"] {
        run(&["run", "-m", &tiny(), "-p", "hi", "-c", c, "--device", "cpu"])
            .assert_error(&[&format!("-c {c}"), "training context of 512"]);
    }
    run(&["run", "-m", &tiny(), "-p", "hi", "-c", "99999999999"]).assert_error(&["--ctx-size"]);
}

/// A GGUF whose `block_count` is 0xFFFFFFFF aborted allocating 240 GB before any tensor was
/// checked; one smaller than the tensors present ignored the extra layers.
#[test]
fn block_count_must_match_the_file() {
    for n in [u64::from(u32::MAX), 1, 3] {
        let mut g = synth_bytes("tiny-llama", "q8_0");
        set_uint(&mut g, "llama.block_count", n);
        let m = file(&format!("blocks-{n}.gguf"), &g);
        run(&["inspect", &m]).assert_error(&["llama.block_count", "hold 2 blocks"]);
        run(&["run", "-m", &m, "-p", "hi", "--device", "cpu"]).assert_error(&["llama.block_count"]);
    }
}

// ---- hangs ---------------------------------------------------------------------------------------

/// `run -t 2000` never finished; `profile plot` of a profile whose medians are 1e-300 span.
#[test]
fn hostile_thread_counts_and_profiles_end_quickly() {
    let hw = std::thread::available_parallelism().map_or(1, |n| n.get());
    let too_many = (hw + 1).max(2000).to_string();
    let o = run(&["run", "-m", &tiny(), "-p", "hi", "-t", &too_many]);
    o.assert_error(&["--threads", "hardware threads"]);
    assert!(o.secs < 20.0, "{o:#?}");

    let committed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/h200-cpu.toml");
    let text = std::fs::read_to_string(committed).unwrap();
    let tiny_medians: String = text
        .lines()
        .map(|l| {
            if l.starts_with("median_s") || l.starts_with("lo_s") || l.starts_with("hi_s") {
                format!("{} = 1e-300", l.split('=').next().unwrap().trim())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let prof = file("tiny-medians.toml", tiny_medians.as_bytes());
    let svg = path("tiny-medians.svg");
    let o = run(&["profile", "plot", &prof, "-o", svg.to_str().unwrap()]);
    o.assert_error(&["median_s must be a time"]);
    assert!(o.secs < 20.0, "{o:#?}");
    assert_eq!(read(&prof), tiny_medians.as_bytes(), "the profile is kept");
}

// ---- lost files ----------------------------------------------------------------------------------

/// `plan -m M.gguf -o M.gguf` replaced the model with a registry; `plan -o REG` silently
/// discarded an existing registry it could not parse, or one of a newer format.
#[test]
fn plan_never_replaces_a_file_it_cannot_read() {
    let model = file("keep.gguf", &read(&tiny()));
    let before = read(&model);
    run(&["plan", "-m", &model, "--vram-budget", "0", "-o", &model])
        .assert_error(&["not a pshard registry", "refusing to overwrite"]);
    assert_eq!(read(&model), before, "the model was changed");

    let good = run(&[
        "plan",
        "-m",
        &model,
        "--vram-budget",
        "0",
        "-o",
        &path("good.pshard").to_string_lossy(),
    ]);
    good.assert_ok();
    let good_text = std::fs::read_to_string(path("good.pshard")).unwrap();
    for (name, text) in [
        ("malformed.pshard", good_text.replacen("[tier]", "[tier", 1)),
        (
            "newer.pshard",
            good_text.replacen("pshard-registry 1.0", "pshard-registry 9.0", 1),
        ),
    ] {
        let reg = file(name, text.as_bytes());
        run(&["plan", "-m", &model, "--vram-budget", "0", "-o", &reg])
            .assert_error(&[name, "it is kept as it is"]);
        assert_eq!(read(&reg), text.as_bytes(), "{name} was changed");
    }
    // A readable registry is updated, and the model's default registry is written beside it.
    let o = run(&["plan", "-m", &model, "--vram-budget", "0"]);
    o.assert_ok();
    let beside = format!("{model}.pshard");
    Registry::load(std::path::Path::new(&beside)).expect("the registry written beside the model");
}

// ---- silent garbage --------------------------------------------------------------------------------

/// A tensor whose type was changed to a smaller one loaded and generated nonsense: the gap it
/// leaves in the data section is now an error naming the tensors.
#[test]
fn a_type_swapped_tensor_is_refused() {
    let mut g = synth_bytes("tiny-llama", "q8_0");
    let at = common::tensor_type_at(&g, "blk.0.ffn_up.weight");
    assert_eq!(
        u32::from_le_bytes(g[at..at + 4].try_into().unwrap()),
        8,
        "Q8_0"
    );
    g[at..at + 4].copy_from_slice(&2u32.to_le_bytes()); // Q4_0
    let m = file("swapped.gguf", &g);
    run(&["inspect", &m]).assert_error(&["belong to no tensor", "blk.0.ffn_up.weight"]);
    run(&["run", "-m", &m, "-p", "hi", "--device", "cpu"]).assert_error(&["belong to no tensor"]);
}

/// NaN or negative rope base and RMS epsilon loaded.
#[test]
fn bad_float_hparams_are_refused() {
    for (key, v) in [
        ("llama.rope.freq_base", f32::NAN),
        ("llama.rope.freq_base", -10000.0),
        ("llama.attention.layer_norm_rms_epsilon", f32::NAN),
        ("llama.attention.layer_norm_rms_epsilon", -1e-5),
    ] {
        let mut g = synth_bytes("tiny-llama", "q8_0");
        set_f32(&mut g, key, v);
        let m = file("float-hparam.gguf", &g);
        run(&["inspect", &m]).assert_error(&[key, "out of range"]);
    }
}

/// `--temp nan`, `--top-p 2`, `--min-p -1`, `--repeat-penalty nan`, `-u 0` were accepted.
#[test]
fn sampling_and_batch_arguments_are_range_checked() {
    for (flag, v, name) in [
        ("--temp", "nan", "--temp"),
        ("--temp", "inf", "--temp"),
        ("--top-p", "2", "--top-p"),
        ("--top-p", "-0.5", "--top-p"),
        ("--min-p", "-1", "--min-p"),
        ("--repeat-penalty", "nan", "--repeat-penalty"),
        ("--repeat-penalty", "0", "--repeat-penalty"),
        ("-u", "0", "--ubatch-size"),
        ("-ub", "0", "--ubatch-size"),
        ("-n", "-2", "--n-predict"),
        ("-s", "-2", "--seed"),
        ("--vram-budget", "18446744073709551615", "--vram-budget"),
    ] {
        let o = run(&["run", "-m", &tiny(), "-p", "hi", flag, v]);
        o.assert_error(&[name]);
        assert_eq!(o.code, Some(2), "argument errors exit 2: {o:#?}");
    }
    // In range, they run.
    run(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "hi",
        "-n",
        "2",
        "--device",
        "cpu",
        "--temp",
        "-1",
        "--top-p",
        "1",
        "--min-p",
        "0",
        "--repeat-penalty",
        "1.1",
        "-u",
        "1",
    ])
    .assert_ok();
}

// ---- llama.cpp habits ----------------------------------------------------------------------------

/// `-c 64 -n 200` stopped after 60 tokens with no message.
#[test]
fn reaching_the_context_is_said() {
    let o = run(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "hello",
        "-c",
        "64",
        "-n",
        "200",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    o.assert_ok();
    assert!(
        o.stderr.contains("the context of 64 tokens is full"),
        "{o:#?}"
    );
    // Stopping at -n says nothing.
    let o = run(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "hello",
        "-c",
        "64",
        "-n",
        "3",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    o.assert_ok();
    assert!(!o.stderr.contains("is full"), "{o:#?}");
}

/// `--context-shift` keeps generating past a full context (llama.cpp's context shift): all 200
/// tokens come, after shifts, where the same run without it stops at the context.
#[test]
fn context_shift_generates_past_the_context() {
    let model = tiny();
    let args = |shift: bool| {
        let mut a = vec![
            "run",
            "-m",
            &model,
            "-p",
            "hello",
            "-c",
            "64",
            "-n",
            "200",
            "--ignore-eos",
            "--device",
            "cpu",
        ];
        if shift {
            a.extend(["--context-shift", "--keep", "2"]);
        }
        run(&a)
    };
    let o = args(true);
    o.assert_ok();
    assert_eq!(
        number_after(&o.stderr, "generation: "),
        Some(200.0),
        "{o:#?}"
    );
    assert!(o.stderr.contains("context shifts: "), "{o:#?}");
    assert!(!o.stderr.contains("is full"), "{o:#?}");
    let o = args(false);
    o.assert_ok();
    assert!(
        o.stderr.contains("the context of 64 tokens is full"),
        "{o:#?}"
    );
    let n = number_after(&o.stderr, "generation: ").expect("a generation line");
    assert!(n < 64.0, "{o:#?}");
}

/// `-n -1` (until end of generation or a full context), `-s -1` (random seed) and `-f -` (stdin)
/// were rejected.
#[test]
fn llama_cpp_values_minus_one_and_stdin() {
    let o = run(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "hi",
        "-c",
        "32",
        "-n",
        "-1",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    o.assert_ok();
    assert!(
        o.stderr.contains("the context of 32 tokens is full"),
        "{o:#?}"
    );
    run(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "hi",
        "-n",
        "2",
        "-s",
        "-1",
        "--device",
        "cpu",
    ])
    .assert_ok();
    let o = run_full(
        &[
            "run",
            "-m",
            &tiny(),
            "-f",
            "-",
            "-n",
            "2",
            "--temp",
            "0",
            "--device",
            "cpu",
        ],
        Some(b"from stdin"),
        Out::Capture,
        TIMEOUT,
    );
    o.assert_ok();
    assert!(o.stdout.starts_with("from stdin"), "{o:#?}");
    let o = run_full(
        &["tokenize", "-m", &tiny(), "-f", "-", "--ids"],
        Some(b"ab"),
        Out::Capture,
        TIMEOUT,
    );
    o.assert_ok();
    assert!(
        o.stdout.trim().starts_with('[') && o.stdout.trim().ends_with(']'),
        "{o:#?}"
    );
}

/// llama.cpp's multi-letter flags were split by the parser (`-fa` said "--prompt cannot be used
/// with --file"); now each is understood or refused by name.
#[test]
fn llama_cpp_multi_letter_flags() {
    let base = [
        "run",
        "-m",
        &tiny(),
        "-p",
        "hi",
        "-n",
        "1",
        "--device",
        "cpu",
    ];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        run(&v)
    };
    with(&["-fa"]).assert_ok();
    with(&["-fa", "on"]).assert_ok();
    with(&["-ctk", "f16", "-ctv", "f16"]).assert_ok();
    with(&["-ub", "16"]).assert_ok();
    with(&["-fa", "off"]).assert_error(&["-fa off", "always fused"]);
    let o = with(&["-ngl", "99"]);
    o.assert_ok();
    assert!(o.stderr.contains("apply to GPU plans only"), "{o:#?}");
    with(&["-ngl", "0"]).assert_ok();
    with(&["-ngl", "-1"]).assert_ok();
    with(&["-ngl", "some"]).assert_error(&["some", "not a layer count"]);
    with(&["-ngl", "3", "--strategy", "STATIC_ATTNPRIO_ALLMODELS"])
        .assert_error(&["--strategy and -ngl"]);
    with(&["-cnv"]).assert_error(&["-cnv starts an interactive chat", "not with -p"]);
    with(&["-ctv", "q4_0"]).assert_error(&["-ctv q4_0", "accepted: f16, q8_0"]);
    with(&["-ctk", "q8_0", "-ctv", "f16"]).assert_error(&["give the same type to both"]);
    with(&["-ot", "exps=CPU"]).assert_error(&["`-ot`", "--override-tensor"]);
    with(&["-ncmoe", "4"]).assert_error(&["`-ncmoe`", "--n-cpu-moe"]);
}

/// `-ctk q8_0 -ctv q8_0` runs with a q8_0 cache of 34/64 the f16 cache's bytes (the run's
/// memory line says its type and size: 68.0 and 128.0 KiB here); `-ctk q8_0` alone keeps V in
/// q8_0 too and says so.
#[test]
fn a_q8_0_kv_cache_runs_at_34_64ths_of_f16() {
    let base = [
        "run",
        "-m",
        &tiny(),
        "-p",
        "hello there",
        "-n",
        "4",
        "-c",
        "256",
        "--temp",
        "0",
        "--device",
        "cpu",
    ];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        let o = run(&v);
        o.assert_ok();
        o
    };
    let f16 = with(&[]);
    let q8 = with(&["-ctk", "q8_0", "-ctv", "q8_0"]);
    let size = |o: &common::Outcome, ty: &str| {
        number_after(&o.stderr, &format!("KV cache {ty} "))
            .unwrap_or_else(|| panic!("no `KV cache {ty}` size: {o:#?}"))
    };
    let ratio = size(&q8, "q8_0") / size(&f16, "f16");
    assert!(
        (ratio - 34.0 / 64.0).abs() < 1e-3,
        "q8_0 / f16 KV size {ratio}: {q8:#?}"
    );
    assert!(q8.stderr.contains("KV cache q8_0 68.0 KiB"), "{q8:#?}");
    let alone = with(&["--cache-type-k", "q8_0"]);
    assert!(alone.stderr.contains("V is kept in q8_0 too"), "{alone:#?}");
    size(&alone, "q8_0");
}

/// `run … -ub 16` failed with "unexpected argument '--ub'".
#[test]
fn run_accepts_ub() {
    run(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "hi",
        "-n",
        "2",
        "-ub",
        "16",
        "--device",
        "cpu",
    ])
    .assert_ok();
    run(&[
        "perplexity",
        "-m",
        &tiny(),
        "-f",
        "/nonexistent",
        "-ub",
        "16",
    ])
    .assert_error(&["/nonexistent"]);
}

/// `inspect` alone took a positional path and rejected `-m`.
#[test]
fn inspect_takes_m_like_the_other_commands() {
    let a = run(&["inspect", "-m", &tiny()]);
    a.assert_ok();
    let b = run(&["inspect", &tiny()]);
    b.assert_ok();
    assert_eq!(a.stdout, b.stdout);
    run(&["inspect"]).assert_error(&["MODEL"]);
}

/// `--chat` on a GGUF without a template silently used a built-in one: now it says which.
#[test]
fn chat_without_a_template_says_which_it_uses() {
    let m = file("tiny-qwen3.gguf", &synth_bytes("tiny-qwen3", "q8_0"));
    let o = run(&[
        "run", "-m", &m, "-p", "hi", "-n", "1", "--chat", "--device", "cpu",
    ]);
    o.assert_ok();
    assert!(
        o.stderr
            .contains("has no chat template; using the built-in 'chatml' template"),
        "{o:#?}"
    );
    // A family without a well-known template is an error that says how to give one.
    run(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "hi",
        "--chat",
        "--device",
        "cpu",
    ])
    .assert_error(&["--chat-template"]);
}

/// Every CPU run printed a multi-line "no usable GPU (libcuda…)" message: now one calm line, the
/// details with -v.
#[test]
fn one_calm_device_line() {
    let o = run(&["run", "-m", &tiny(), "-p", "hi", "-n", "1"]);
    o.assert_ok();
    let lines: Vec<&str> = o.stderr.lines().filter(|l| l.contains("device")).collect();
    assert_eq!(lines.len(), 1, "{o:#?}");
    assert!(
        lines[0] == "device: cuda:0" || lines[0].starts_with("device: cpu ("),
        "{o:#?}"
    );
    assert!(
        !o.stderr.contains("libcuda") && !o.stderr.contains("LD_LIBRARY_PATH"),
        "{o:#?}"
    );
    let v = run(&["run", "-m", &tiny(), "-p", "hi", "-n", "1", "-v"]);
    v.assert_ok();
    let detail: Vec<&str> = v
        .stderr
        .lines()
        .filter(|l| l.starts_with("device:"))
        .collect();
    assert_eq!(detail.len(), 2, "-v adds the details: {v:#?}");
}

// ---- shapes of what the commands write -------------------------------------------------------------

fn json(o: &common::Outcome) -> serde_json::Value {
    o.assert_ok();
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {o:#?}"))
}

#[test]
fn inspect_json_shape() {
    let v = json(&run(&["inspect", "-m", &tiny(), "--json"]));
    assert_eq!(v["arch"], "llama");
    assert_eq!(v["hparams"]["n_layer"], 2);
    assert_eq!(v["hparams"]["n_ctx_train"], 512);
    assert_eq!(v["layers"].as_array().map(Vec::len), Some(2));
    assert!(v["quant_mix"].as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!(v["total_tensor_bytes"], v["file_tensor_bytes"], "{v}");
}

#[test]
fn plan_json_shape_and_registry() {
    let model = file("plan.gguf", &read(&tiny()));
    let reg = path("plan.pshard");
    let v = json(&run(&[
        "plan",
        "-m",
        &model,
        "--vram-budget",
        "1024",
        "-c",
        "256",
        "--json",
        "-o",
        reg.to_str().unwrap(),
    ]));
    assert_eq!(v["registry"], reg.to_str().unwrap());
    assert_eq!(v["budget_mib"], 1024);
    assert_eq!(v["measured"], false);
    assert!(
        v["warning"]
            .as_str()
            .is_some_and(|w| w.contains("NO PROFILES")),
        "{v}"
    );
    let tiers = v["tiers"].as_array().expect("tiers");
    assert!(!tiers.is_empty());
    for t in tiers {
        assert!(t["tokens"].as_u64().is_some_and(|n| n >= 1), "{t}");
        assert!(
            t["tps"].as_f64().is_some_and(|x| x.is_finite() && x > 0.0),
            "{t}"
        );
        assert!(t["strategy"].is_string() && t["map"].is_string(), "{t}");
    }
    let r = Registry::load(&reg).expect("registry written");
    assert_eq!(r.sections.len(), 1);
    assert_eq!(r.sections[0].ctx, 256);
    // Arguments past the model's limits are refused with their range.
    run(&["plan", "-m", &model, "--vram-budget", "0", "-c", "100000"])
        .assert_error(&["training context of 512"]);
    run(&["plan", "-m", &model, "--vram-budget", "0", "-t", "100000"])
        .assert_error(&["--threads 100000"]);
    run(&[
        "plan",
        "-m",
        &model,
        "--vram-budget",
        "0",
        "--decode-depth",
        "5000",
    ])
    .assert_error(&["--decode-depth 5000"]);
}

#[test]
fn bench_json_shape() {
    let v = json(&run(&[
        "bench",
        "-m",
        &tiny(),
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "2",
        "-o",
        "json",
        "--device",
        "cpu",
    ]));
    let rows = v.as_array().expect("an array of tests");
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r["backends"], "CPU");
        assert_eq!(r["samples_ns"].as_array().map(Vec::len), Some(2), "{r}");
        assert!(
            r["avg_ts"]
                .as_f64()
                .is_some_and(|x| x.is_finite() && x > 0.0),
            "{r}"
        );
    }
    assert_eq!(
        (rows[0]["n_prompt"].as_u64(), rows[0]["n_gen"].as_u64()),
        (Some(8), Some(0))
    );
    assert_eq!(
        (rows[1]["n_prompt"].as_u64(), rows[1]["n_gen"].as_u64()),
        (Some(0), Some(4))
    );
    run(&["bench", "-m", &tiny(), "-p", "100000", "-n", "0"])
        .assert_error(&["training context of 512"]);
    run(&["bench", "-m", &tiny(), "-r", "0"]).assert_error(&["--repetitions"]);
}

/// Exit codes: 0 success, 2 for a command line clap refuses, 1 for everything found later.
#[test]
fn exit_codes() {
    assert_eq!(run(&["--version"]).code, Some(0));
    assert_eq!(run(&["no-such-command"]).code, Some(2));
    assert_eq!(
        run(&["inspect", "/nonexistent.gguf"])
            .assert_error(&["not found"])
            .code,
        Some(1)
    );
    let o = run(&[
        "synth",
        "tiny-llama",
        "-q",
        "q8_0",
        "-o",
        &path("synth-out.gguf").to_string_lossy(),
    ]);
    o.assert_ok();
    assert!(o.stdout.starts_with("wrote "), "{o:#?}");
    run(&["synth", "no-such-preset"]).assert_error(&["unknown preset"]);
}

/// `profile plot P -o P` would have replaced the profile with its chart.
#[test]
fn plot_never_writes_over_its_profile() {
    let committed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/h200-cpu.toml");
    let p = file("plot-self.toml", &std::fs::read(committed).unwrap());
    let before = read(&p);
    run(&["profile", "plot", &p, "-o", &p]).assert_error(&["would overwrite the profile"]);
    assert_eq!(read(&p), before);
}
