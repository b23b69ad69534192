//! The human-readable summary printed after a run (and by `pshard profile show`-like callers).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use pshard_planner::costtable::weight_bytes;
use pshard_planner::profile::{Point, Profile, ProfileKind};

/// GFLOP/s of a matmul-like point (2·rows·cols·batch per call).
pub fn matmul_gflops(p: &Point) -> Option<f64> {
    let (&rows, &cols) = (p.shape.first()?, p.shape.get(1)?);
    Some(2.0 * (rows * cols * p.batch) as f64 / p.stats.median_s / 1e9)
}

/// Weight GB/s of a matmul-like point (the weight bytes read per call over its time).
pub fn matmul_weight_gbs(p: &Point) -> Option<f64> {
    let (&rows, &cols) = (p.shape.first()?, p.shape.get(1)?);
    let ty = p.quant_type()?;
    Some(weight_bytes(ty, rows as usize, cols as usize) / p.stats.median_s / 1e9)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map(|v| format!("{v:.1} {unit}"))
        .unwrap_or_else(|| "-".into())
}

/// A multi-line summary: machine, roofline, bandwidth vs threads, matmul tables, attention, copies.
/// Cells of noisy points end in `*`.
pub fn summary_table(p: &Profile) -> String {
    let mut s = String::new();
    let m = &p.machine;
    let kind = match p.kind {
        ProfileKind::Cpu => "CPU",
        ProfileKind::Gpu => "GPU",
    };
    let _ = writeln!(
        s,
        "pshard {kind} profile ({}) — {}: {} cores / {} threads, {} used, {:.1} GiB RAM",
        p.created,
        m.cpu_model,
        m.cpu_cores,
        m.cpu_threads,
        m.threads_used,
        gib(m.ram_bytes)
    );
    if let Some(g) = &m.gpu {
        let _ = writeln!(
            s,
            "GPU: {} ({:.1} GiB, cc {}, driver {}, PCIe gen {} x{})",
            g.name,
            gib(g.memory_bytes),
            g.compute_capability,
            g.driver,
            g.pcie_gen,
            g.pcie_width
        );
    }
    let r = &p.roofline;
    let _ = writeln!(s, "\nRoofline");
    let rows: Vec<(&str, String)> = vec![
        ("CPU DRAM read", opt(r.cpu_mem_gbs, "GB/s")),
        ("CPU matmul compute", opt(r.cpu_gflops, "GFLOP/s")),
        ("CPU op overhead", opt(r.cpu_op_overhead_us, "µs")),
        ("CPU DRAM while H2D", opt(r.cpu_mem_while_h2d_gbs, "GB/s")),
        ("H2D while CPU computes", opt(r.h2d_while_cpu_gbs, "GB/s")),
        ("GPU memory read", opt(r.gpu_mem_gbs, "GB/s")),
        ("GPU GEMM compute", opt(r.gpu_gemm_gflops, "GFLOP/s")),
        ("GPU SIMT compute", opt(r.gpu_simt_gflops, "GFLOP/s")),
        ("GPU launch", opt(r.gpu_launch_us, "µs")),
        ("H2D pinned", opt(r.h2d_pinned_gbs, "GB/s")),
        ("H2D pageable", opt(r.h2d_pageable_gbs, "GB/s")),
        ("D2H pinned", opt(r.d2h_pinned_gbs, "GB/s")),
        ("copy latency", opt(r.copy_latency_us, "µs")),
        (
            "copy/compute overlap",
            r.overlap_efficiency
                .map(|v| format!("{:.0} %", v * 100.0))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "CUDA context VRAM",
            r.cuda_context_bytes
                .map(|b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
                .unwrap_or_else(|| "-".into()),
        ),
    ];
    for (k, v) in rows.into_iter().filter(|(_, v)| v != "-") {
        let _ = writeln!(s, "  {k:<24} {v}");
    }

    // Streaming reads vs threads.
    let reads: Vec<&Point> = p
        .points
        .iter()
        .filter(|pt| pt.op.starts_with("mem_read"))
        .collect();
    if !reads.is_empty() {
        let _ = writeln!(s, "\nMemory read (GB/s, 95% interval)");
        for pt in reads {
            let bytes = pt.shape.first().copied().unwrap_or(0) as f64;
            let _ = writeln!(
                s,
                "  {:<20} {:>3} threads  {:>7.1}  [{:.1} .. {:.1}]  cv {:.3}{}",
                pt.op,
                pt.threads,
                bytes / pt.stats.median_s / 1e9,
                bytes / pt.stats.hi_s / 1e9,
                bytes / pt.stats.lo_s / 1e9,
                pt.stats.cv,
                if pt.stats.noisy { " noisy" } else { "" }
            );
        }
    }

    // Matmul tables: one per (op, shape); rows = types, columns = batches.
    let mut tables: BTreeMap<(String, Vec<u64>), Vec<&Point>> = BTreeMap::new();
    for pt in p.points.iter().filter(|pt| pt.op.starts_with("matmul")) {
        tables
            .entry((pt.op.clone(), pt.shape.clone()))
            .or_default()
            .push(pt);
    }
    for ((op, shape), pts) in &tables {
        let mut batches: Vec<u64> = pts.iter().map(|p| p.batch).collect();
        batches.sort_unstable();
        batches.dedup();
        let _ = writeln!(
            s,
            "\n{op} {}x{}: weight GB/s at batch 1, GFLOP/s at larger batches (* = noisy)",
            shape.first().unwrap_or(&0),
            shape.get(1).unwrap_or(&0)
        );
        let mut line = format!("  {:<6}", "type");
        for b in &batches {
            let _ = write!(line, " {:>8}", format!("b={b}"));
        }
        let _ = writeln!(s, "{line}");
        let mut types: Vec<String> = pts.iter().filter_map(|p| p.quant.clone()).collect();
        types.dedup();
        let mut seen = Vec::new();
        for t in types {
            if seen.contains(&t) {
                continue;
            }
            seen.push(t.clone());
            let mut line = format!("  {t:<6}");
            for b in &batches {
                let cell = pts
                    .iter()
                    .find(|p| p.batch == *b && p.quant.as_deref() == Some(&t))
                    .and_then(|p| {
                        let v = if *b == 1 {
                            matmul_weight_gbs(p)
                        } else {
                            matmul_gflops(p)
                        }?;
                        Some(format!("{v:.1}{}", if p.stats.noisy { "*" } else { "" }))
                    })
                    .unwrap_or_else(|| "-".into());
                let _ = write!(line, " {cell:>8}");
            }
            let _ = writeln!(s, "{line}");
        }
    }

    // Attention: ms per call by layout and context.
    let attn: Vec<&Point> = p.points.iter().filter(|pt| pt.op == "attention").collect();
    if !attn.is_empty() {
        let _ = writeln!(
            s,
            "\nattention ({}, head_dim {}): ms per call",
            attn[0].quant.as_deref().unwrap_or("F16"),
            attn[0].shape.get(3).unwrap_or(&0)
        );
        for pt in attn {
            let (kv, nh, nkv) = (
                pt.shape.first().unwrap_or(&0),
                pt.shape.get(1).unwrap_or(&0),
                pt.shape.get(2).unwrap_or(&1),
            );
            let _ = writeln!(
                s,
                "  kv {kv:>6}  heads {nh:>3}/{nkv:<3}  batch {:>4}  {:>9.3} ms{}",
                pt.batch,
                pt.stats.median_s * 1e3,
                if pt.stats.noisy { " noisy" } else { "" }
            );
        }
    }

    // Copies and other ops.
    let other: Vec<&Point> = p
        .points
        .iter()
        .filter(|pt| {
            !pt.op.starts_with("matmul") && !pt.op.starts_with("mem_read") && pt.op != "attention"
        })
        .collect();
    if !other.is_empty() {
        let _ = writeln!(s, "\nother");
        for pt in other {
            let bytes = pt.shape.first().copied().unwrap_or(0);
            let gbs = if pt.op.contains("h2d") || pt.op.contains("d2h") {
                format!("  {:.2} GB/s", bytes as f64 / pt.stats.median_s / 1e9)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "  {:<16} {:?} {:>10.2} µs{gbs}{}",
                pt.op,
                pt.shape,
                pt.stats.median_s * 1e6,
                if pt.stats.noisy { " noisy" } else { "" }
            );
        }
    }
    let noisy = p.points.iter().filter(|pt| pt.stats.noisy).count();
    let _ = writeln!(
        s,
        "\n{} points, {noisy} flagged noisy (did not reach the CV target within the time cap)",
        p.points.len()
    );
    s
}
