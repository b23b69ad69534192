//! Registry: exact round trip (proptest), malformed lines reported with their number, the examples
//! of registry-format.md parse, fingerprint mismatches are detected, atomic writes with a cache
//! fallback, and plan → record → placement reproduces the plan.

mod common;

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::TensorInfo;
use pshard_planner::cost::PlanParams;
use pshard_planner::fingerprint::Fingerprint;
use pshard_planner::placement::{Frac, Place, Strategy as Rule};
use pshard_planner::registry::{
    self, GroupPlace, LayerRun, Registry, Section, TierRecord, Variant,
};
use pshard_planner::search::plan;
use pshard_planner::CostTable;

fn example_registry(
    spec_name: &str,
    budget_mib: u64,
) -> (
    pshard_model::spec::ModelSpec,
    Registry,
    pshard_planner::Plan,
) {
    let spec = common::spec(spec_name);
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let mut params = PlanParams::new(16384);
    params.tier_max = Some(2048);
    let p = plan(&spec, &common::graph, &table, &params, budget_mib << 20).expect("plan");
    let fp = Fingerprint {
        sha256: [0xab; 32],
        file_size: 4_920_739_232,
    };
    let profile = format!("{} {}", cpu.identity(), gpu.identity());
    let mut reg = Registry::default();
    reg.upsert(registry::section_from_plan(
        &spec, fp, &params, &profile, &p,
    ));
    (spec, reg, p)
}

/// Prints a registry for the format document: `cargo test -p pshard-planner --test registry print_example -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_example() {
    let (_, reg, _) = example_registry("llama3-8b", 3072);
    print!("{}", reg.to_text());
}

#[test]
fn plan_record_placement_round_trip() {
    for (name, budget) in [
        ("llama3-8b", 3072),
        ("qwen3-30b-a3b", 4096),
        ("llama3-8b", 20000),
    ] {
        let (spec, reg, p) = example_registry(name, budget);
        let text = reg.to_text();
        let back = Registry::parse(&text).expect("parse");
        assert_eq!(back, reg);
        assert_eq!(back.to_text(), text);
        let v = &back.sections[0].variants[0];
        assert_eq!(v.tiers.len(), p.tiers.len());
        for (rec, tp) in v.tiers.iter().zip(&p.tiers) {
            assert_eq!(
                rec.placement(&spec).expect("placement"),
                tp.best.placement,
                "{name} tier {}",
                rec.tokens
            );
        }
        assert_eq!(v.whole_model, budget == 20000);
    }
}

/// Extracts fenced blocks whose info string is `pshard-registry`.
fn doc_examples(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, line) in md.lines().enumerate() {
        if cur.is_none() {
            if line.trim() == "```pshard-registry" {
                cur = Some((i + 2, String::new()));
            }
        } else if line.trim() == "```" {
            out.extend(cur.take());
        } else if let Some((_, s)) = cur.as_mut() {
            s.push_str(line);
            s.push('\n');
        }
    }
    out
}

#[test]
fn registry_format_examples_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry-format.md");
    let md = std::fs::read_to_string(&path).expect("registry-format.md");
    let examples = doc_examples(&md);
    assert!(
        !examples.is_empty(),
        "no ```pshard-registry blocks in registry-format.md"
    );
    for (line, text) in examples {
        let r = Registry::parse(&text)
            .unwrap_or_else(|e| panic!("example at registry-format.md:{line}: {e}"));
        assert_eq!(
            r.to_text(),
            text,
            "example at registry-format.md:{line} is not in canonical form"
        );
    }
}

#[test]
fn corrupted_lines_are_reported_with_their_number() {
    let (_, reg, _) = example_registry("llama3-8b", 3072);
    let text = reg.to_text();
    let lines: Vec<&str> = text.lines().collect();
    type Corrupt = Box<dyn Fn(&str) -> Option<String>>;
    let cases: Vec<(Corrupt, &str)> = vec![
        (
            Box::new(|l: &str| l.starts_with("tps = ").then(|| "tps = fast".to_string())),
            "tps",
        ),
        (
            Box::new(|l: &str| l.starts_with("layers ").then(|| l.replace('=', ":"))),
            "GROUP=PLACEMENT",
        ),
        (
            Box::new(|l: &str| {
                l.starts_with("strategy = ")
                    .then(|| "strategy = MAGIC".to_string())
            }),
            "unknown strategy",
        ),
        (
            Box::new(|l: &str| l.starts_with("ctx = ").then(|| "ctx = -5".to_string())),
            "ctx",
        ),
        (
            Box::new(|l: &str| {
                l.starts_with("fingerprint = ")
                    .then(|| "fingerprint = md5:00".to_string())
            }),
            "fingerprint",
        ),
        (
            Box::new(|l: &str| {
                l.starts_with("kind = ")
                    .then(|| "kind = prefil".to_string())
            }),
            "kind",
        ),
        (
            Box::new(|l: &str| l.starts_with("global ").then(|| l.replace("=C", "=Q"))),
            "placement",
        ),
    ];
    for (corrupt, needle) in cases {
        let (idx, bad) = lines
            .iter()
            .enumerate()
            .find_map(|(i, l)| corrupt(l).map(|b| (i, b)))
            .expect("line to corrupt");
        let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        v[idx] = bad;
        let broken = v.join("\n") + "\n";
        let e = Registry::parse(&broken).expect_err("corruption must be detected");
        // The fingerprint is validated when its section closes: the error names the section header.
        if needle == "fingerprint" {
            assert!(e.message.contains(needle), "{e}");
            assert!(lines[e.line - 1] == "[section]", "{e}");
        } else {
            assert_eq!(e.line, idx + 1, "{e}");
            assert!(e.message.contains(needle), "{e}");
        }
    }
    // Truncation: a tier cut short.
    let cut: String = lines[..lines.len() - 1]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    let e = Registry::parse(&cut).expect_err("truncated");
    assert!(e.message.contains("layers"), "{e}");
    // Unknown major version.
    let e = Registry::parse(&text.replacen("pshard-registry 1.0", "pshard-registry 2.0", 1))
        .expect_err("v2");
    assert_eq!(e.line, 1);
    assert!(e.message.contains("not supported"), "{e}");
}

fn write_fake_model(path: &Path, header: &[u8], data: &[u8]) {
    let mut b = header.to_vec();
    b.extend_from_slice(data);
    std::fs::write(path, b).expect("write");
}

#[test]
fn fingerprint_detects_another_file_of_the_same_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let header = b"GGUF fake header with a tensor table".to_vec();
    let tensors = vec![
        TensorInfo {
            name: "a".into(),
            dims: vec![64, 4],
            ty: GgmlType::F32,
            offset: 0,
            bytes: 1024,
        },
        TensorInfo {
            name: "b".into(),
            dims: vec![1 << 16],
            ty: GgmlType::F32,
            offset: 1024,
            bytes: 1 << 18,
        },
    ];
    let n = 1024 + (1 << 18);
    let data1: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let mut data2 = data1.clone();
    // One byte in the middle of tensor b (a sampled window), same size and header.
    data2[1024 + (1 << 17) + 3] ^= 0x5a;
    let (p1, p2) = (dir.path().join("m1.gguf"), dir.path().join("m2.gguf"));
    write_fake_model(&p1, &header, &data1);
    write_fake_model(&p2, &header, &data2);
    let f1 = Fingerprint::of_file(&p1, header.len() as u64, &tensors).expect("fp1");
    let f2 = Fingerprint::of_file(&p2, header.len() as u64, &tensors).expect("fp2");
    assert_eq!(f1.file_size, f2.file_size);
    assert_ne!(
        f1, f2,
        "same-size file with different weights must not match"
    );
    assert_eq!(
        f1,
        Fingerprint::of_file(&p1, header.len() as u64, &tensors).expect("again")
    );
    // A registry planned for m1 refuses m2.
    let (_, mut reg, _) = example_registry("llama3-8b", 3072);
    reg.sections[0].fingerprint = f1;
    assert!(reg.verified(&f1).expect("match").len() == 1);
    let e = reg.verified(&f2).expect_err("mismatch");
    assert!(e.message.contains("fingerprint mismatch"), "{e}");
    // Lookup by the runtime's inputs.
    let (sec, v) = reg
        .find(&f1, 16384, 1, "f16", 3072)
        .expect("verified")
        .expect("planned");
    assert_eq!(sec.ctx, 16384);
    assert_eq!(v.tier_for(1).map(|t| t.tokens), Some(1));
    assert_eq!(v.tier_for(300).map(|t| t.tokens), Some(512));
    assert_eq!(v.tier_for(1_000_000).map(|t| t.tokens), Some(2048));
    assert!(reg
        .find(&f1, 8192, 1, "f16", 3072)
        .expect("verified")
        .is_none());
    assert!(reg.find(&f2, 16384, 1, "f16", 3072).is_err());
    // Parsing a digest back.
    assert_eq!(
        Fingerprint::parse(&f1.digest_string(), f1.file_size),
        Some(f1)
    );
}

#[test]
fn save_next_to_model_then_cache_fallback_when_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m.gguf");
    std::fs::write(&model, b"x").expect("write");
    let (_, reg, _) = example_registry("llama3-8b", 3072);
    let sec = reg.sections[0].clone();
    let written = registry::save_for_model(&model, sec.clone()).expect("save");
    assert_eq!(written, registry::path_next_to(&model));
    let back = Registry::load(&written).expect("load");
    assert_eq!(back, reg);
    // Saving again with another budget adds a variant; same budget replaces.
    let mut sec2 = sec.clone();
    sec2.variants[0].budget_mib = 4096;
    registry::save_for_model(&model, sec2).expect("save 2");
    registry::save_for_model(&model, sec.clone()).expect("save 3");
    let back = Registry::load(&written).expect("load");
    assert_eq!(back.sections.len(), 1);
    assert_eq!(
        back.sections[0]
            .variants
            .iter()
            .map(|v| v.budget_mib)
            .collect::<Vec<_>>(),
        vec![3072, 4096]
    );

    // A folder this process cannot write into: fall back to the per-user cache. A 0555 folder
    // stops other users; root writes anywhere there, but not into sysfs.
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).expect("mkdir");
    std::fs::write(ro.join("m.gguf"), b"x").expect("write");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let writable = |d: &Path| {
        let probe = d.join("pshard-write-probe");
        let ok = std::fs::File::create(&probe).is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    };
    let ro_dir = [ro.clone(), Path::new("/sys").to_path_buf()]
        .into_iter()
        .find(|d| d.is_dir() && !writable(d));
    match ro_dir {
        None => {
            pshard_testkit::skip("no folder here refuses writes to this user (not 0555, not /sys)")
        }
        Some(d) => {
            let model_ro = d.join("m.gguf");
            let cache = dir.path().join("cache");
            // This test binary sets XDG_CACHE_HOME only here and reads it in the same thread right after.
            std::env::set_var("XDG_CACHE_HOME", &cache);
            let written = registry::save_for_model(&model_ro, sec).expect("save to cache");
            assert!(written.starts_with(&cache), "{}", written.display());
            assert_eq!(registry::locate(&model_ro), Some(written));
        }
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod back");
}

/// Writing a registry never replaces a file it cannot read: not a registry (the model itself given
/// as the output), a malformed one, or one of another format version. The file is kept byte for
/// byte and the error names it.
#[test]
fn existing_files_that_are_not_readable_registries_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, reg, _) = example_registry("llama3-8b", 3072);
    let sec = reg.sections[0].clone();
    let good = reg.to_text();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "model.gguf",
            b"GGUF\x03\x00\x00\x00rest of a model".to_vec(),
            "not a pshard registry",
        ),
        ("empty.pshard", Vec::new(), "not a pshard registry"),
        (
            "bad.pshard",
            good.replace("[tier]", "[tear]").into_bytes(),
            "cannot read",
        ),
        (
            "newer.pshard",
            good.replace("pshard-registry 1.0", "pshard-registry 2.0")
                .into_bytes(),
            "version 2.0",
        ),
        (
            "newer-minor.pshard",
            good.replacen("pshard-registry 1.0", "pshard-registry 1.3", 1)
                .replacen("[section]", "[section]\nnew_key 1", 1)
                .into_bytes(),
            "cannot read",
        ),
        (
            "latin1.pshard",
            [b"pshard-registry 1.0\n# caf\xe9\n".as_slice()].concat(),
            "not UTF-8",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let e = registry::update(&path, sec.clone())
            .expect_err(name)
            .to_string();
        assert!(e.contains(expect) && e.contains(name), "{name}: {e}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} was changed");
        // Next to a model: the same rule.
        let model = dir.path().join(name.replace(".pshard", ".gguf"));
        if !model.exists() {
            std::fs::write(&model, b"x").unwrap();
            let beside = registry::path_next_to(&model);
            std::fs::write(&beside, &bytes).unwrap();
            assert!(
                registry::save_for_model(&model, sec.clone()).is_err(),
                "{name}"
            );
            assert_eq!(
                std::fs::read(&beside).unwrap(),
                bytes,
                "{name} beside the model"
            );
        }
    }
    // A readable registry is updated in place.
    let path = dir.path().join("ok.pshard");
    std::fs::write(&path, &good).unwrap();
    registry::update(&path, sec).expect("update a good registry");
    assert_eq!(Registry::load(&path).unwrap(), reg);
}

fn arb_place() -> impl Strategy<Value = Place> {
    prop_oneof![
        Just(Place::Pinned),
        Just(Place::Streamed),
        Just(Place::Cpu),
        (0u16..=10_000).prop_map(|f| Place::Split { cpu: Frac(f) }),
    ]
}

fn arb_group_place() -> impl Strategy<Value = GroupPlace> {
    prop_oneof![
        arb_place().prop_map(GroupPlace::All),
        prop::collection::vec(("[a-z_]{1,8}(\\.bias)?", arb_place()), 1..5)
            .prop_map(GroupPlace::Each),
    ]
}

fn arb_groups() -> impl Strategy<Value = Vec<(String, GroupPlace)>> {
    prop::collection::vec(("[a-z_]{1,8}", arb_group_place()), 1..4).prop_map(|v| {
        let mut seen = std::collections::HashSet::new();
        v.into_iter()
            .filter(|(n, _)| seen.insert(n.clone()))
            .collect()
    })
}

fn arb_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        0.0f64..1e7,
        (0u32..100_000).prop_map(|x| x as f64 / 8.0)
    ]
}

fn arb_tier(n_layer: usize) -> impl Strategy<Value = TierRecord> {
    let strategies: Vec<Rule> = std::iter::once(Rule::AllGpu)
        .chain(Rule::SEARCHED)
        .collect();
    (
        (
            1usize..100_000,
            any::<bool>(),
            prop::sample::select(strategies),
            0usize..200,
            0usize..200,
        ),
        (
            prop::option::of((0usize..200, 0u16..=10_000)),
            prop::option::of(0u16..=10_000),
            1usize..20_000,
            arb_f64(),
            any::<u64>(),
            arb_f64(),
        ),
        arb_groups(),
        prop::collection::vec((1usize..4, arb_groups()), 1..4),
    )
        .prop_map(
            move |(
                (tokens, prefill, strategy, pl, pa),
                (b, split, ubatch, tps, vram, sw),
                global,
                runs,
            )| {
                // Runs must cover 0..n_layer consecutively: stretch the last one.
                let mut layers = Vec::new();
                let mut first = 0;
                for (i, (len, g)) in runs.iter().enumerate() {
                    if first >= n_layer {
                        break;
                    }
                    let last = if i + 1 == runs.len() {
                        n_layer - 1
                    } else {
                        (first + len - 1).min(n_layer - 1)
                    };
                    layers.push(LayerRun {
                        first,
                        last,
                        groups: g.clone(),
                    });
                    first = last + 1;
                }
                if first < n_layer {
                    layers.push(LayerRun {
                        first,
                        last: n_layer - 1,
                        groups: runs[0].1.clone(),
                    });
                }
                TierRecord {
                    tokens,
                    prefill,
                    strategy,
                    pinned_layers: pl,
                    pinned_attn: pa,
                    boundary: b.map(|(l, f)| (l, Frac(f))),
                    split: split.map(Frac),
                    ubatch,
                    tps,
                    vram_bytes: vram,
                    switch_ms: sw,
                    global,
                    layers,
                }
            },
        )
}

fn arb_registry() -> impl Strategy<Value = Registry> {
    let section = (
        1usize..12,
        "[A-Za-z0-9][A-Za-z0-9 ._()-]{0,20}[A-Za-z0-9)]",
        any::<[u8; 32]>(),
        any::<u64>(),
        (
            1usize..1_000_000,
            1usize..64,
            any::<bool>(),
            1usize..256,
            0usize..100_000,
        ),
        "(none|cpu:[0-9a-f]{8}( gpu:[0-9a-f]{8})?)",
        0u32..5,
    )
        .prop_flat_map(
            |(n_layer, model, sha, size, (ctx, par, q8, thr, depth), profile, cm)| {
                let variant = (
                    any::<u64>(),
                    any::<bool>(),
                    any::<bool>(),
                    any::<[u64; 4]>(),
                    prop::collection::vec(arb_tier(n_layer), 0..4),
                )
                    .prop_map(|(b, w, m, bytes, tiers)| Variant {
                        budget_mib: b,
                        whole_model: w,
                        measured: m,
                        bill_bytes: bytes[0],
                        common_bytes: bytes[1],
                        max_tier_bytes: bytes[2],
                        context_bytes: bytes[3],
                        tiers,
                    });
                prop::collection::vec(variant, 0..3).prop_map(move |variants| Section {
                    model: model.clone(),
                    arch: "llama".into(),
                    fingerprint: Fingerprint {
                        sha256: sha,
                        file_size: size,
                    },
                    n_layer,
                    ctx,
                    parallel: par,
                    kv_type: if q8 { "q8_0".into() } else { "f16".into() },
                    threads: thr,
                    decode_depth: depth,
                    profile: profile.clone(),
                    cost_model: cm,
                    variants,
                })
            },
        );
    (0u32..3, prop::collection::vec(section, 0..3))
        .prop_map(|(minor, sections)| Registry { minor, sections })
}

#[test]
fn round_trip_is_exact() {
    let seed: u64 = std::env::var("PSHARD_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    println!("seed {seed} (replay with PSHARD_SEED={seed})");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 200,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    runner
        .run(&arb_registry(), |r| {
            let text = r.to_text();
            let back =
                Registry::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(&back, &r);
            prop_assert_eq!(back.to_text(), text);
            Ok(())
        })
        .expect("round trip");
}
