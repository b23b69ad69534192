//! End-to-end: `pshard-profile-cpu --quick` writes a profile the planner's reader accepts, with every
//! figure positive and finite; the summary and the roofline chart render from it. Structure only:
//! no timing is asserted (CI machines are shared and noisy).

use std::path::{Path, PathBuf};
use std::process::Command;

use pshard_planner::profile::{Profile, ProfileKind};

fn check_figures(p: &Profile) {
    let m = &p.machine;
    assert!(m.cpu_cores >= 1 && m.cpu_threads >= 1 && m.threads_used >= 1);
    assert!(m.ram_bytes > 0, "RAM size missing");
    assert!(!m.cpu_model.is_empty());
    let r = &p.roofline;
    let present = [
        ("cpu_mem_gbs", r.cpu_mem_gbs),
        ("cpu_gflops", r.cpu_gflops),
        ("cpu_op_overhead_us", r.cpu_op_overhead_us),
        ("cpu_mem_while_h2d_gbs", r.cpu_mem_while_h2d_gbs),
        ("h2d_while_cpu_gbs", r.h2d_while_cpu_gbs),
    ];
    for (name, v) in present {
        if let Some(v) = v {
            assert!(v.is_finite() && v > 0.0, "roofline.{name} = {v}");
        }
    }
    assert!(r.cpu_mem_gbs.is_some() && r.cpu_gflops.is_some() && r.cpu_op_overhead_us.is_some());
    for pt in &p.points {
        let s = &pt.stats;
        for v in [s.median_s, s.lo_s, s.hi_s] {
            assert!(v.is_finite() && v > 0.0, "{pt:?}");
        }
        assert!(s.lo_s <= s.median_s && s.median_s <= s.hi_s, "{pt:?}");
        assert!(s.cv.is_finite() && s.cv >= 0.0 && s.n >= 1, "{pt:?}");
        assert!(pt.batch >= 1 && !pt.shape.is_empty() && pt.shape.iter().all(|&x| x > 0));
    }
    for op in ["mem_read", "matmul", "attention", "op_overhead"] {
        assert!(p.points.iter().any(|pt| pt.op == op), "no {op} point");
    }
    // Bandwidth vs threads: one mem_read point per measured thread count, ending at threads_used.
    let max_t = p
        .points
        .iter()
        .filter(|pt| pt.op == "mem_read")
        .map(|pt| pt.threads)
        .max();
    assert_eq!(max_t, Some(m.threads_used));
    // Every matmul point names a quant type and a [rows, cols] shape.
    for pt in p.points.iter().filter(|pt| pt.op == "matmul") {
        assert!(pt.quant_type().is_some() && pt.shape.len() == 2);
    }
}

#[test]
fn quick_cpu_profile_round_trips() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("sub").join("cpu.toml");
    let status = Command::new(env!("CARGO_BIN_EXE_pshard-profile-cpu"))
        .args(["--quick", "--no-progress", "--output"])
        .arg(&out)
        .status()
        .expect("running pshard-profile-cpu");
    assert!(status.success(), "pshard-profile-cpu --quick failed");
    let text = std::fs::read_to_string(&out).expect("profile written");
    let p = Profile::from_toml_str(&text, "quick").expect("reader accepts the profile");
    assert_eq!(p.kind, ProfileKind::Cpu);
    assert_eq!(p.version, "1.0");
    assert!(
        p.created.ends_with('Z') && p.created.len() == 20,
        "{}",
        p.created
    );
    check_figures(&p);
    // Writing it again gives the same profile.
    let again = Profile::from_toml_str(&p.to_toml_string(), "again").expect("re-read");
    assert_eq!(again, p);
    // The planner reads the points under the keys written: at a measured Q4_K point its cost table
    // predicts the measured median back.
    let table = pshard_planner::CostTable::new(Some(&p), None, 0);
    let mut checked = 0;
    for pt in p
        .points
        .iter()
        .filter(|pt| pt.op == "matmul" && pt.quant.as_deref() == Some("Q4_K"))
    {
        let ty = pt.quant_type().expect("Q4_K");
        let (rows, cols) = (pt.shape[0] as usize, pt.shape[1] as usize);
        let t = table.cpu_matmul(ty, rows, cols, pt.batch as usize, false);
        let rel = (t / pt.stats.median_s - 1.0).abs();
        assert!(rel < 0.02, "planner predicts {t} s for {pt:?}");
        checked += 1;
    }
    assert!(checked > 0, "no Q4_K matmul point");
    // The summary and the chart render from it.
    let table = pshard_profiler::summary::summary_table(&p);
    assert!(table.contains("matmul") && table.contains("Roofline"));
    let svg = dir.path().join("roofline.svg");
    pshard_profiler::plot::roofline_svg(&p, &svg).expect("plot");
    let s = std::fs::read_to_string(&svg).expect("svg written");
    assert!(s.starts_with("<svg") && s.contains("Q4_K") && s.contains("DRAM"));
}

fn repo_profile(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("profiles")
        .join(name)
}

#[test]
fn plots_committed_profiles_of_both_kinds() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, roof) in [("h200-cpu.toml", "DRAM"), ("h200-gpu.toml", "HBM")] {
        let path = repo_profile(name);
        let p = Profile::load(&path).expect("committed profile");
        let svg = dir.path().join(format!("{name}.svg"));
        pshard_profiler::plot::roofline_svg(&p, &svg).expect("plot");
        let s = std::fs::read_to_string(&svg).expect("svg written");
        assert!(s.contains(roof), "{name}: roof label missing");
        assert!(!pshard_profiler::summary::summary_table(&p).is_empty());
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_pshard-profile-cpu"))
        .args(["--threads", "999999", "--no-progress", "-o"])
        .arg(dir.path().join("x.toml"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"));
    let err = pshard_profiler::cli::plot(&pshard_profiler::cli::PlotArgs {
        profile: missing.clone(),
        output: dir.path().join("r.svg"),
    })
    .expect_err("missing file");
    assert!(format!("{err:#}").contains("nope.toml"));
    std::fs::write(&missing, "format = \"pshard-profile\"\nversion = \"2.0\"\n").unwrap();
    let err = pshard_profiler::cli::plot(&pshard_profiler::cli::PlotArgs {
        profile: missing,
        output: dir.path().join("r.svg"),
    })
    .expect_err("future major");
    assert!(format!("{err:#}").contains("2.0"));
}
