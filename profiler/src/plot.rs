//! The roofline chart: measured matmul points (GFLOP/s against arithmetic intensity, one series per
//! quant type and lane) under the bandwidth and compute roofs of the profile, as SVG.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use pshard_planner::costtable::weight_bytes;
use pshard_planner::profile::{Point, Profile, ProfileKind};

/// (arithmetic intensity in flop/byte, GFLOP/s) of a matmul-like point; bytes as the planner counts
/// them: weights plus f32 activations in and out.
pub fn intensity_and_gflops(p: &Point) -> Option<(f64, f64)> {
    let (rows, cols) = (*p.shape.first()? as usize, *p.shape.get(1)? as usize);
    let ty = p.quant_type()?;
    let b = p.batch as usize;
    let bytes = weight_bytes(ty, rows, cols) + (b * (rows + cols) * 4) as f64;
    let flops = 2.0 * (rows * cols * b) as f64;
    Some((flops / bytes, flops / p.stats.median_s / 1e9))
}

/// A roof: name, bandwidth GB/s, compute GFLOP/s.
type Roof = (String, f64, f64);

fn roofs(p: &Profile) -> Vec<Roof> {
    let r = &p.roofline;
    let mut v = Vec::new();
    match p.kind {
        ProfileKind::Cpu => {
            if let (Some(bw), Some(c)) = (r.cpu_mem_gbs, r.cpu_gflops) {
                v.push((format!("DRAM {bw:.1} GB/s, {c:.0} GFLOP/s"), bw, c));
            }
            if let (Some(bw), Some(c)) = (r.cpu_mem_while_h2d_gbs, r.cpu_gflops) {
                v.push((format!("DRAM while H2D {bw:.1} GB/s"), bw, c));
            }
        }
        ProfileKind::Gpu => {
            if let (Some(bw), Some(c)) = (r.gpu_mem_gbs, r.gpu_gemm_gflops) {
                v.push((format!("HBM {bw:.0} GB/s, GEMM {c:.0} GFLOP/s"), bw, c));
            }
            if let (Some(bw), Some(c)) = (r.gpu_mem_gbs, r.gpu_simt_gflops) {
                v.push((format!("SIMT {c:.0} GFLOP/s"), bw, c));
            }
        }
    }
    v
}

/// Series label of a point: the quant type, prefixed by the path when it is not the plain matmul.
fn series_name(p: &Point) -> String {
    let q = p.quant.clone().unwrap_or_default();
    match p.op.as_str() {
        "matmul" => q,
        "matmul_gemv" => format!("{q} gemv"),
        "matmul_gemm" => format!("{q} gemm"),
        "matmul_while_h2d" => format!("{q} while H2D"),
        other => format!("{q} {other}"),
    }
}

/// Distinct colours (a categorical palette); series cycle through them.
const PALETTE: [RGBColor; 14] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(90, 90, 90),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 128),
    RGBColor(85, 107, 47),
    RGBColor(0, 128, 96),
    RGBColor(230, 171, 2),
];

/// Tick label: no more digits than the value needs.
fn tick(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.1}").trim_end_matches(".0").to_string(),
        a if a >= 0.01 => format!("{v:.2}"),
        _ => format!("{v:.0e}"),
    }
}

fn marker<DB: DrawingBackend>(
    kind: usize,
    at: (i32, i32),
    size: i32,
    color: RGBAColor,
) -> DynElement<'static, DB, (i32, i32)> {
    match kind % 3 {
        0 => Circle::new(at, size, color.filled()).into_dyn(),
        1 => TriangleMarker::new(at, size + 1, color.filled()).into_dyn(),
        _ => Cross::new(at, size, color.stroke_width(2)).into_dyn(),
    }
}

/// Draws the roofline chart of `profile` into an SVG file at `out`.
///
/// Every measured matmul point is drawn; the shape with the most points is drawn large, joined in
/// batch order per series, and the other shapes small and faint in the same colour.
pub fn roofline_svg(profile: &Profile, out: &Path) -> Result<()> {
    // series name -> shape -> (batch, intensity, GFLOP/s)
    type Pts = Vec<(u64, f64, f64)>;
    let mut series: BTreeMap<String, BTreeMap<Vec<u64>, Pts>> = BTreeMap::new();
    let mut per_shape: BTreeMap<Vec<u64>, usize> = BTreeMap::new();
    // Graph-replayed GEMVs repeat the decode-batch GEMV points under another timing; not drawn.
    for p in profile
        .points
        .iter()
        .filter(|p| p.op.starts_with("matmul") && p.op != "matmul_gemv_graph")
    {
        if let Some((x, y)) = intensity_and_gflops(p) {
            series
                .entry(series_name(p))
                .or_default()
                .entry(p.shape.clone())
                .or_default()
                .push((p.batch, x, y));
            *per_shape.entry(p.shape.clone()).or_default() += 1;
        }
    }
    let Some(main_shape) = per_shape
        .iter()
        .max_by_key(|(shape, n)| (**n, shape.iter().product::<u64>()))
        .map(|(s, _)| s.clone())
    else {
        return Err(anyhow!("the profile has no matmul points to plot"));
    };
    let roofs = roofs(profile);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(_, x, y) in series.values().flat_map(|m| m.values()).flatten() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    for (_, bw, c) in &roofs {
        y1 = y1.max(*c);
        // Show the ridge point (where bandwidth meets compute).
        x1 = x1.max(c / bw * 2.0);
    }
    let (x0, x1) = (x0 / 1.5, x1 * 1.5);
    let (y0, y1) = (y0 / 1.5, y1 * 1.6);

    let root = SVGBackend::new(out, (1100, 720)).into_drawing_area();
    let err = |e: &dyn std::fmt::Debug| anyhow!("drawing {}: {e:?}", out.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let m = &profile.machine;
    let shape_txt = format!(
        "{}×{}",
        main_shape.first().unwrap_or(&0),
        main_shape.get(1).unwrap_or(&0)
    );
    let title = match profile.kind {
        ProfileKind::Cpu => format!(
            "pshard CPU roofline — {}, {} threads (large: {shape_txt}; small: other shapes)",
            m.cpu_model, m.threads_used
        ),
        ProfileKind::Gpu => format!(
            "pshard GPU roofline — {} (large: {shape_txt}; small: other shapes)",
            m.gpu.as_ref().map(|g| g.name.as_str()).unwrap_or("GPU")
        ),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("arithmetic intensity (flop per byte of weights + activations); batch grows to the right")
        .y_desc("GFLOP/s")
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|y| tick(*y))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.1))
        .draw()
        .map_err(|e| err(&e))?;

    for (i, (name, bw, c)) in roofs.iter().enumerate() {
        let (bw, c) = (*bw, *c);
        let style = if i == 0 {
            BLACK.stroke_width(3)
        } else {
            RGBColor(120, 120, 120).stroke_width(2)
        };
        let steps = 400;
        let line: Vec<(f64, f64)> = (0..=steps)
            .map(|k| {
                let x = x0 * (x1 / x0).powf(k as f64 / steps as f64);
                (x, (x * bw).min(c))
            })
            .filter(|&(_, y)| y >= y0)
            .collect();
        chart
            .draw_series(LineSeries::new(line, style))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], style));
    }

    for (i, (name, shapes)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()].to_rgba();
        // Neighbouring colours of the palette get different markers too.
        let kind = i + i / 6;
        // Other shapes first (underneath), small and faint.
        for (shape, pts) in shapes.iter().filter(|(s, _)| **s != main_shape) {
            let _ = shape;
            chart
                .draw_series(pts.iter().map(|&(_, x, y)| {
                    EmptyElement::at((x, y)) + marker(kind, (0, 0), 2, color.mix(0.45))
                }))
                .map_err(|e| err(&e))?;
        }
        let Some(main) = shapes.get(&main_shape) else {
            // A series without the main shape still gets a legend entry.
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(|e| err(&e))?
                .label(name.clone())
                .legend(move |(x, y)| marker(kind, (x + 11, y), 4, color));
            continue;
        };
        let mut main = main.clone();
        main.sort_by_key(|p| p.0);
        chart
            .draw_series(LineSeries::new(
                main.iter().map(|&(_, x, y)| (x, y)),
                color.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                main.iter()
                    .map(|&(_, x, y)| EmptyElement::at((x, y)) + marker(kind, (0, 0), 4, color)),
            )
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| marker(kind, (x + 11, y), 4, color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.92))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
