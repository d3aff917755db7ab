//! `quill plot`: PNG line charts of the step records in a metrics JSONL file.

use anyhow::{bail, Context};
use plotters::prelude::*;
use plotters::style::register_font;
use quill_proto::status::field;
use quill_telemetry::read_records;
use serde_json::{Map, Value};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Width of every chart, in pixels.
const WIDTH: u32 = 1200;
/// Height of every chart, in pixels.
const HEIGHT: u32 = 800;
/// The font family every text element asks for; the embedded DejaVu Sans is registered
/// under it.
pub(crate) const FONT: &str = "sans-serif";
/// Series colours, in order (the first four of matplotlib's "tab10").
pub(crate) const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
];

/// What the horizontal axis of the charts shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum XAxis {
    /// The record's `step` field.
    Step,
    /// Wall-clock time since the first step record, from the `time` field.
    Time,
}

/// Flags of `quill plot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Metrics file to read: one JSON object per line; only records of kind "step" are
    /// drawn.
    pub metrics: PathBuf,
    /// Directory to write reward.png, length.png, throughput.png, waste.png and
    /// entropy.png into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// What the horizontal axis shows: the step number or the time since the first step.
    #[arg(long, value_enum, default_value_t = XAxis::Step)]
    pub x: XAxis,
    /// Window of the moving average drawn over the raw points, in records (1: no
    /// smoothing).
    #[arg(long, default_value = "5")]
    pub smooth: NonZeroUsize,
}

/// One chart area: a title, a y-axis label and the record fields drawn in it.
struct Panel {
    title: &'static str,
    y_label: &'static str,
    fields: &'static [&'static str],
}

/// One PNG file: its name and its panels, stacked top to bottom.
struct Chart {
    file: &'static str,
    panels: &'static [Panel],
}

const CHARTS: &[Chart] = &[
    Chart {
        file: "reward.png",
        panels: &[Panel {
            title: "Reward",
            y_label: "reward",
            fields: &[
                field::REWARD_MEAN,
                field::REWARD_LENGTH,
                field::REWARD_FORMAT,
                field::REWARD_QUALITY,
            ],
        }],
    },
    Chart {
        file: "length.png",
        panels: &[
            Panel {
                title: "Response length",
                y_label: "words",
                fields: &[field::RESPONSE_WORDS_MEAN],
            },
            Panel {
                title: "Responses within the target length range",
                y_label: "share",
                fields: &[field::IN_RANGE_SHARE],
            },
        ],
    },
    Chart {
        file: "throughput.png",
        panels: &[Panel {
            title: "Throughput",
            y_label: "tokens / s",
            fields: &[field::GENERATED_TOKENS_PER_S, field::TRAINED_TOKENS_PER_S],
        }],
    },
    Chart {
        file: "waste.png",
        panels: &[
            Panel {
                title: "Generated work thrown away (so far)",
                y_label: "share",
                fields: &[field::DISCARDED_TOKEN_SHARE, field::STALE_SHARE],
            },
            Panel {
                title: "Trainer waiting for data",
                y_label: "idle share",
                fields: &[field::IDLE_SHARE],
            },
        ],
    },
    Chart {
        file: "entropy.png",
        panels: &[Panel {
            title: "Policy entropy",
            y_label: "nats / token",
            fields: &[field::ENTROPY],
        }],
    },
];

/// The points of one record field, sorted by x.
struct Series {
    name: &'static str,
    points: Vec<(f64, f64)>,
}

/// Reads the metrics file and writes the charts.
pub fn run(args: Args) -> anyhow::Result<()> {
    register_embedded_font()?;
    let records = read_records(&args.metrics)?;
    let steps: Vec<&Map<String, Value>> = records
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("step"))
        .collect();
    if steps.is_empty() {
        bail!(
            "{}: {} record(s), none of kind \"step\"",
            args.metrics.display(),
            records.len()
        );
    }
    let in_file = || format!("in {}", args.metrics.display());
    let (xs, x_label) = x_values(&steps, args.x).with_context(in_file)?;
    // Read every series before drawing, so bad data leaves no half-written chart set.
    let mut charts = Vec::new();
    for chart in CHARTS {
        let mut panels = Vec::new();
        for panel in chart.panels {
            let mut series = Vec::new();
            for &field in panel.fields {
                if let Some(s) = field_series(&steps, &xs, field).with_context(in_file)? {
                    series.push(s);
                }
            }
            if !series.is_empty() {
                panels.push((panel, series));
            }
        }
        if panels.is_empty() {
            let fields: Vec<&str> = chart
                .panels
                .iter()
                .flat_map(|p| p.fields)
                .copied()
                .collect();
            eprintln!(
                "skipped {}: no step record has {}",
                chart.file,
                fields.join(" or ")
            );
        } else {
            charts.push((chart.file, panels));
        }
    }
    if charts.is_empty() {
        bail!(
            "{}: the step records have none of the plotted fields",
            args.metrics.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (file, panels) in charts {
        let path = args.out.join(file);
        draw_chart(&path, &panels, &x_label, args.smooth.get())
            .with_context(|| format!("drawing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The x value of every step record and the x-axis label.
fn x_values(steps: &[&Map<String, Value>], axis: XAxis) -> anyhow::Result<(Vec<f64>, String)> {
    let field = match axis {
        XAxis::Step => "step",
        XAxis::Time => "time",
    };
    let raw = steps
        .iter()
        .enumerate()
        .map(|(i, r)| match r.get(field).and_then(Value::as_f64) {
            Some(x) => Ok(x),
            None => bail!("step record #{} has no numeric `{field}` field", i + 1),
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    match axis {
        XAxis::Step => Ok((raw, "step".to_owned())),
        XAxis::Time => {
            let start = raw.iter().copied().fold(f64::INFINITY, f64::min);
            let end = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let (scale, unit) = match end - start {
                span if span <= 120.0 => (1.0, "s"),
                span if span <= 7200.0 => (60.0, "min"),
                _ => (3600.0, "h"),
            };
            let xs = raw.iter().map(|t| (t - start) / scale).collect();
            Ok((xs, format!("time since the first step ({unit})")))
        }
    }
}

/// Registers the embedded DejaVu Sans under [`FONT`] (before drawing any text).
pub(crate) fn register_embedded_font() -> anyhow::Result<()> {
    register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("the embedded DejaVu Sans font did not load"))
}

/// The numeric points of `field`, or `None` when no record has a number there. `null`
/// (how a NaN is written) is a missing point; any other non-number is an error.
fn field_series(
    steps: &[&Map<String, Value>],
    xs: &[f64],
    field: &'static str,
) -> anyhow::Result<Option<Series>> {
    let mut points = Vec::new();
    for (i, (record, &x)) in steps.iter().zip(xs).enumerate() {
        match record.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                if let Some(y) = n.as_f64() {
                    points.push((x, y));
                }
            }
            Some(other) => bail!(
                "step record #{}: field `{field}` is {other}, expected a number",
                i + 1
            ),
        }
    }
    if points.is_empty() {
        return Ok(None);
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Some(Series {
        name: field,
        points,
    }))
}

/// Trailing moving average: each point's y becomes the mean of the last `window` y values
/// up to and including it.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// `lo..hi` widened by 5% on each side, or by 1 when the data is a single value.
pub(crate) fn padded(lo: f64, hi: f64) -> Range<f64> {
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 1.0 };
    (lo - pad)..(hi + pad)
}

/// A tick label: up to six decimals without trailing zeros, scientific for tiny values;
/// rounding noise around zero (a tick at -2.2e-16) reads as 0.
pub(crate) fn tick_label(value: &f64) -> String {
    if value.abs() < 1e-12 {
        return "0".to_owned();
    }
    if value.abs() < 1e-4 {
        return format!("{value:.1e}");
    }
    let text = format!("{value:.6}");
    match text.trim_end_matches('0').trim_end_matches('.') {
        "-0" => "0".to_owned(),
        trimmed => trimmed.to_owned(),
    }
}

/// Where the legend goes: the corner (or, failing those, the middle of a side) of the plot
/// with the fewest data points under it.
fn legend_corner(series: &[Series], x: &Range<f64>, y: &Range<f64>) -> SeriesLabelPosition {
    const LEFT: Range<f64> = 0.0..0.4;
    const RIGHT: Range<f64> = 0.6..1.0;
    const LOWER: Range<f64> = 0.0..0.3;
    const MIDDLE: Range<f64> = 0.35..0.65;
    const UPPER: Range<f64> = 0.7..1.0;
    let crowd = |xs: &Range<f64>, ys: &Range<f64>| {
        series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|&&(px, py)| {
                xs.contains(&((px - x.start) / (x.end - x.start)))
                    && ys.contains(&((py - y.start) / (y.end - y.start)))
            })
            .count()
    };
    [
        (SeriesLabelPosition::LowerRight, RIGHT, LOWER),
        (SeriesLabelPosition::UpperRight, RIGHT, UPPER),
        (SeriesLabelPosition::UpperLeft, LEFT, UPPER),
        (SeriesLabelPosition::LowerLeft, LEFT, LOWER),
        (SeriesLabelPosition::MiddleRight, RIGHT, MIDDLE),
        (SeriesLabelPosition::MiddleLeft, LEFT, MIDDLE),
    ]
    .into_iter()
    .min_by_key(|(_, xs, ys)| crowd(xs, ys))
    .map_or(SeriesLabelPosition::LowerRight, |(corner, _, _)| corner)
}

/// Draws the panels one above the other into a PNG at `path`.
fn draw_chart(
    path: &Path,
    panels: &[(&Panel, Vec<Series>)],
    x_label: &str,
    smooth: usize,
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels.len(), 1));
    for ((panel, series), area) in panels.iter().zip(&areas) {
        draw_panel(area, panel, series, x_label, smooth)?;
    }
    root.present()?;
    Ok(())
}

/// Draws one panel: each series as faint raw points joined by a thin line, with its
/// moving average as a thick line of the same colour on top, and a legend.
fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    series: &[Series],
    x_label: &str,
    smooth: usize,
) -> anyhow::Result<()> {
    let all = series.iter().flat_map(|s| &s.points);
    let (x0, x1, y0, y1) = all.fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(x0, x1, y0, y1), &(x, y)| (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
    );
    let (x_range, y_range) = (padded(x0, x1), padded(y0, y1));
    let caption = if smooth > 1 {
        format!(
            "{} (thin: raw, thick: mean of the last {smooth})",
            panel.title
        )
    } else {
        panel.title.to_owned()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(x_range.clone(), y_range.clone())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(panel.y_label)
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart.draw_series(
            LineSeries::new(s.points.iter().copied(), color.mix(0.35).stroke_width(1))
                .point_size(2),
        )?;
        chart
            .draw_series(LineSeries::new(
                moving_average(&s.points, smooth),
                color.stroke_width(3),
            ))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(legend_corner(series, &x_range, &y_range))
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_is_trailing() {
        let points: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, i as f64)).collect();
        let ys: Vec<f64> = moving_average(&points, 3).iter().map(|p| p.1).collect();
        assert_eq!(ys, vec![0.0, 0.5, 1.0, 2.0, 3.0]);
        assert_eq!(moving_average(&points, 1), points);
    }

    #[test]
    fn tick_labels_are_short() {
        let labels: Vec<String> = [8500.0, 0.30000000000000004, -0.0, 2.5, 0.00001, -2.2e-16]
            .iter()
            .map(tick_label)
            .collect();
        assert_eq!(labels, ["8500", "0.3", "0", "2.5", "1.0e-5", "0"]);
    }
}
