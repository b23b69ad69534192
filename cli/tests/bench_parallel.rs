//! `pshard bench --parallel`: one row per sequence count, aggregate decode t/s of all sequences
//! (SmolLM2 on the CPU, tiny sizes: this checks the measurement runs and reports, not speed).

mod serving;

use serde_json::Value;

#[test]
fn bench_parallel_reports_one_row_per_sequence_count() {
    let Some(model) = serving::model() else {
        return;
    };
    let out = serving::pshard()
        .args([
            "bench",
            "--device",
            "cpu",
            "-t",
            "2",
            "--parallel",
            "1,3",
            "-p",
            "4",
            "-n",
            "2",
        ])
        .args(["-r", "1", "-o", "json", "-m"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    for (row, n) in rows.iter().zip([1, 3]) {
        assert_eq!(row["n_parallel"], n);
        assert_eq!(row["n_prompt"], 4);
        assert_eq!(row["n_gen"], 2);
        let tg = row["tg_avg_ts"].as_f64().unwrap();
        assert!(tg.is_finite() && tg > 0.0, "{row}");
        let per = row["tg_per_sequence_ts"].as_f64().unwrap();
        assert!((per * n as f64 - tg).abs() < 1e-6 * tg, "{row}");
    }
    // Without -n there is nothing to measure.
    let out = serving::pshard()
        .args([
            "bench",
            "--device",
            "cpu",
            "--parallel",
            "2",
            "-n",
            "0",
            "-m",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--parallel measures decode"));
}
