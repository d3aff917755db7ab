//! The run's PNG charts: a model's summary (mean scores per category as bars, answer
//! length against required length as a scatter) and, for a checkpoint series, how the
//! scores moved over training steps.

use super::report::ModelSummary;
use super::samples::SampleRecord;
use crate::plot::{padded, tick_label, COLORS, FONT};
use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Width of every chart, in pixels.
pub const WIDTH: u32 = 1400;
/// Height of every chart, in pixels.
pub const HEIGHT: u32 = 700;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws `summary` and its records into a PNG at `path`.
pub fn draw_summary(
    path: &Path,
    summary: &ModelSummary,
    records: &[&SampleRecord],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    draw_bars(&left, summary)?;
    draw_lengths(&right, records)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Mean length score and critic score × 10 per category, side by side.
fn draw_bars(area: &Area<'_>, summary: &ModelSummary) -> anyhow::Result<()> {
    let kinds = summary.types();
    let series: [(&str, &std::collections::BTreeMap<String, f64>, f64); 2] = [
        ("length score", &summary.length_score_by_type, 1.0),
        ("critic score × 10", &summary.critic_score_by_type, 10.0),
    ];
    let n = kinds.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{}: mean scores per type", summary.model),
            (FONT, 22),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..105.0)?;
    let names: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(kinds.len().max(1))
        .x_label_formatter(&|x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("score (0–100)")
        .y_label_formatter(&tick_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    for (s, (label, values, scale)) in series.iter().enumerate() {
        if values.is_empty() {
            continue;
        }
        let color = COLORS[s % COLORS.len()];
        let offset = -0.35 + 0.35 * s as f64;
        chart
            .draw_series(kinds.iter().enumerate().filter_map(|(i, kind)| {
                let value = values.get(*kind)? * scale;
                let x = i as f64 + offset;
                Some(Rectangle::new(
                    [(x, 0.0), (x + 0.33, value)],
                    color.filled(),
                ))
            }))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Each answer's length against its required length, with the line where they are equal.
fn draw_lengths(area: &Area<'_>, records: &[&SampleRecord]) -> anyhow::Result<()> {
    let points: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| Some((r.required_length?, r.output_length as f64)))
        .collect();
    let top = points
        .iter()
        .flat_map(|&(x, y)| [x, y])
        .fold(1.0f64, f64::max);
    let range = padded(0.0, top);
    let range = 0.0..range.end;
    let mut chart = ChartBuilder::on(area)
        .caption("answer length against required length", (FONT, 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(range.clone(), range.clone())?;
    chart
        .configure_mesh()
        .x_desc("required length (words)")
        .y_desc("answer length (words)")
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (range.end, range.end)],
            BLACK.mix(0.4).stroke_width(1),
        ))?
        .label("answer = required")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BLACK.mix(0.4)));
    let color = COLORS[0];
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?
        .label("one answer")
        .legend(move |(x, y)| Circle::new((x + 12, y), 4, color.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Draws how the scores of a checkpoint series moved, step by step (the model's
/// position in the series when it has no step): length score, critic score × 10 and
/// win rate against the anchor in %, and the Elo rating with its interval.
pub fn draw_series(
    path: &Path,
    models: &[ModelSummary],
    anchor: Option<&str>,
) -> anyhow::Result<()> {
    let x = |i: usize, m: &ModelSummary| m.step.map_or(i as f64, |s| s as f64);
    let x_label = if models.iter().all(|m| m.step.is_some()) {
        "training step"
    } else {
        "model (in the order given)"
    };
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = vec![
        (
            "length score".into(),
            models
                .iter()
                .enumerate()
                .filter_map(|(i, m)| Some((x(i, m), m.length_score?)))
                .collect(),
        ),
        (
            "critic score × 10".into(),
            models
                .iter()
                .enumerate()
                .filter_map(|(i, m)| Some((x(i, m), m.critic_score? * 10.0)))
                .collect(),
        ),
    ];
    if let Some(anchor) = anchor {
        lines.push((
            format!("win rate vs {anchor} (%)"),
            models
                .iter()
                .enumerate()
                .filter_map(|(i, m)| Some((x(i, m), m.win_rate.get(anchor)? * 100.0)))
                .collect(),
        ));
    }
    lines.retain(|(_, points)| !points.is_empty());
    let elo: Vec<(f64, f64, Option<[f64; 2]>)> = models
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((x(i, m), m.elo?, m.elo_ci)))
        .collect();
    let xs: Vec<f64> = models.iter().enumerate().map(|(i, m)| x(i, m)).collect();
    let x_range = padded(
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = if elo.is_empty() { 1 } else { 2 };
    let areas = root.split_evenly((panels, 1));
    let mut chart = ChartBuilder::on(&areas[0])
        .caption("scores over the series", (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.clone(), 0.0..105.0)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("0–100")
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(
                LineSeries::new(points.iter().copied(), color.stroke_width(3)).point_size(4),
            )?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    if !elo.is_empty() {
        let lo = elo
            .iter()
            .map(|e| e.2.map_or(e.1, |ci| ci[0]))
            .fold(f64::INFINITY, f64::min);
        let hi = elo
            .iter()
            .map(|e| e.2.map_or(e.1, |ci| ci[1]))
            .fold(f64::NEG_INFINITY, f64::max);
        let mut chart = ChartBuilder::on(&areas[1])
            .caption("Elo (Bradley–Terry, 95% bootstrap interval)", (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range, padded(lo, hi))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("Elo")
            .x_label_formatter(&tick_label)
            .y_label_formatter(&tick_label)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()?;
        let color = COLORS[3];
        chart.draw_series(elo.iter().filter_map(|&(x, _, ci)| {
            let [lo, hi] = ci?;
            Some(PathElement::new(
                [(x, lo), (x, hi)],
                color.mix(0.5).stroke_width(6),
            ))
        }))?;
        chart.draw_series(
            LineSeries::new(elo.iter().map(|e| (e.0, e.1)), color.stroke_width(3)).point_size(4),
        )?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
