//! PNG plots of serving runs: latency distributions (one curve per request rate) and latency
//! over the course of each run.

use std::error::Error;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::pixel_font::{self, Anchor};
use super::stats::RequestRecord;

/// One run to plot: its legend label ("20 REQ/S") and its requests.
pub struct Run<'a> {
    pub label: String,
    pub records: &'a [RequestRecord],
}

type PlotResult = Result<(), Box<dyn Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];
const GRID: RGBColor = RGBColor(225, 225, 225);
const INK: RGBColor = RGBColor(40, 40, 40);
/// Font pixels are drawn as squares of this many image pixels.
const TEXT_SCALE: i32 = 2;
/// Space around a chart for its title and tick labels, in pixels.
const MARGIN_TOP: i32 = 44;
const MARGIN_LEFT: i32 = 84;
const MARGIN_BOTTOM: i32 = 50;
const MARGIN_RIGHT: i32 = 40;

/// Writes `latency.png` (the distribution of TTFT, TPOT and end-to-end latency, one curve per
/// run) and `timeline.png` (each request's end-to-end latency against when it was sent) into
/// `dir`. Returns the files written.
pub fn write(dir: &Path, runs: &[Run<'_>]) -> Result<Vec<std::path::PathBuf>, Box<dyn Error>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating the plot directory {}: {e}", dir.display()))?;
    let latency = dir.join("latency.png");
    let timeline = dir.join("timeline.png");
    latency_plot(&latency, runs)?;
    timeline_plot(&timeline, runs)?;
    Ok(vec![latency, timeline])
}

fn latency_plot(path: &Path, runs: &[Run<'_>]) -> PlotResult {
    let root = BitMapBackend::new(path, (1500, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    type Metric = fn(&RequestRecord) -> Option<f64>;
    let metrics: [(&str, Metric); 3] = [
        ("TIME TO FIRST TOKEN (MS)", |r| r.ttft.map(|s| s * 1e3)),
        ("TIME PER OUTPUT TOKEN (MS)", |r| r.tpot().map(|s| s * 1e3)),
        ("END TO END LATENCY (S)", |r| r.e2e),
    ];
    for (panel, (title, metric)) in panels.iter().zip(metrics) {
        let curves: Vec<Vec<f64>> = runs
            .iter()
            .map(|run| {
                let mut values: Vec<f64> = run
                    .records
                    .iter()
                    .filter(|r| r.error.is_none())
                    .filter_map(metric)
                    .collect();
                values.sort_by(f64::total_cmp);
                values
            })
            .collect();
        let x_max = curves.iter().flatten().copied().fold(0.0, f64::max);
        let mut frame = Frame::draw(&root, panel, title, "FRACTION OF REQUESTS", (x_max, 1.0))?;
        for (i, values) in curves.iter().enumerate() {
            let n = values.len() as f64;
            let points = values
                .iter()
                .enumerate()
                .map(|(rank, &v)| (v, (rank + 1) as f64 / n));
            frame.chart.draw_series(LineSeries::new(
                points,
                PALETTE[i % PALETTE.len()].stroke_width(2),
            ))?;
        }
        frame.legend(&root, &labels(runs), true)?;
    }
    root.present()?;
    Ok(())
}

fn timeline_plot(path: &Path, runs: &[Run<'_>]) -> PlotResult {
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let done = |run: &Run<'_>| {
        run.records
            .iter()
            .filter(|r| r.error.is_none())
            .filter_map(|r| Some((r.sent_at, r.e2e?)))
            .collect::<Vec<_>>()
    };
    let x_max = runs.iter().flat_map(&done).map(|p| p.0).fold(0.0, f64::max);
    let y_max = runs.iter().flat_map(&done).map(|p| p.1).fold(0.0, f64::max);
    let mut frame = Frame::draw(
        &root,
        &root,
        "END TO END LATENCY (S) BY SEND TIME (S)",
        "",
        (x_max, y_max),
    )?;
    for (i, run) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        frame.chart.draw_series(
            done(run)
                .into_iter()
                .map(|p| Circle::new(p, 2, color.filled())),
        )?;
    }
    // Failed requests sit on the time axis as crosses.
    for (i, run) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let failed = run.records.iter().filter(|r| r.error.is_some());
        frame
            .chart
            .draw_series(failed.map(|r| Cross::new((r.sent_at, 0.0), 4, color.stroke_width(2))))?;
    }
    frame.legend(&root, &labels(runs), false)?;
    root.present()?;
    Ok(())
}

fn labels<'r>(runs: &'r [Run<'_>]) -> Vec<&'r str> {
    runs.iter().map(|run| run.label.as_str()).collect()
}

/// One curve of a scaling plot: its legend label and its `(x, y)` points, x ascending.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Writes a PNG of one panel per `(title, series)` side by side, each curve with its points
/// marked, both axes from 0 (throughput and TPOT against the number of requests, say).
pub fn write_scaling(path: &Path, panels: &[(&str, Vec<Series>)]) -> PlotResult {
    let root =
        BitMapBackend::new(path, (750 * panels.len().max(1) as u32, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, (title, series)) in areas.iter().zip(panels) {
        let points = || series.iter().flat_map(|s| s.points.iter().copied());
        let x_max = points().map(|p| p.0).fold(0.0, f64::max);
        let y_max = points().map(|p| p.1).fold(0.0, f64::max);
        let mut frame = Frame::draw(&root, area, title, "", (x_max, y_max))?;
        for (i, curve) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            frame.chart.draw_series(LineSeries::new(
                curve.points.iter().copied(),
                color.stroke_width(2),
            ))?;
            frame.chart.draw_series(
                curve
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, 4, color.filled())),
            )?;
        }
        let labels: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
        frame.legend(&root, &labels, true)?;
    }
    root.present()?;
    Ok(())
}

/// A chart with its grid, tick labels and title already drawn.
struct Frame<'a> {
    chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
}

impl<'a> Frame<'a> {
    /// Sets up a chart in `area` over `[0, x_max] x [0, y_max]`; text goes on `root`, whose
    /// coordinates are the image's.
    fn draw(
        root: &Area<'a>,
        area: &Area<'a>,
        title: &str,
        y_title: &str,
        (x_max, y_max): (f64, f64),
    ) -> Result<Self, Box<dyn Error>> {
        let x_ticks = ticks(x_max);
        let y_ticks = ticks(y_max);
        let x_end = *x_ticks.last().unwrap_or(&1.0);
        let y_end = *y_ticks.last().unwrap_or(&1.0);
        let chart = ChartBuilder::on(area)
            .margin_top(MARGIN_TOP as u32)
            .margin_left(MARGIN_LEFT as u32)
            .margin_bottom(MARGIN_BOTTOM as u32)
            .margin_right(MARGIN_RIGHT as u32)
            .build_cartesian_2d(0.0..x_end, 0.0..y_end)?;
        let mut chart = chart;
        for &x in &x_ticks {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_end)],
                GRID,
            )))?;
        }
        for &y in &y_ticks {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(0.0, y), (x_end, y)],
                GRID,
            )))?;
        }
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, y_end), (0.0, 0.0), (x_end, 0.0)],
            INK.stroke_width(2),
        )))?;
        let x_step = x_ticks.get(1).copied().unwrap_or(1.0);
        let y_step = y_ticks.get(1).copied().unwrap_or(1.0);
        for &x in &x_ticks {
            let (px, py) = chart.backend_coord(&(x, 0.0));
            let label = tick_label(x, x_step);
            pixel_font::draw(
                root,
                &label,
                (px, py + 8),
                Anchor::TopCenter,
                TEXT_SCALE,
                &INK,
            )?;
        }
        for &y in &y_ticks {
            let (px, py) = chart.backend_coord(&(0.0, y));
            let label = tick_label(y, y_step);
            pixel_font::draw(
                root,
                &label,
                (px - 8, py),
                Anchor::MiddleRight,
                TEXT_SCALE,
                &INK,
            )?;
        }
        let (left, top) = area.get_base_pixel();
        let (width, _) = area.dim_in_pixel();
        let title_at = (
            left + MARGIN_LEFT + (width as i32 - MARGIN_LEFT - MARGIN_RIGHT) / 2,
            top + 12,
        );
        pixel_font::draw(root, title, title_at, Anchor::TopCenter, TEXT_SCALE, &INK)?;
        if !y_title.is_empty() {
            let (px, py) = chart.backend_coord(&(0.0, y_end));
            pixel_font::draw(root, y_title, (px + 6, py + 4), Anchor::TopLeft, 1, &INK)?;
        }
        Ok(Self { chart })
    }

    /// One colored swatch and label per run, on a white box in the lower right of the chart
    /// (`low`) or the upper right.
    fn legend(&self, root: &Area<'a>, labels: &[&str], low: bool) -> PlotResult {
        let x = self.chart.x_range();
        let y = self.chart.y_range();
        let (right, bottom) = self.chart.backend_coord(&(x.end, y.start));
        let (_, top) = self.chart.backend_coord(&(x.end, y.end));
        let text_width = labels
            .iter()
            .map(|label| pixel_font::size(label, TEXT_SCALE).0)
            .max()
            .unwrap_or(0);
        let line = 22;
        let (width, height) = (text_width + 44, line * labels.len() as i32 + 12);
        let left = right - 16 - width;
        let upper = if low { bottom - 16 - height } else { top + 16 };
        root.draw(&Rectangle::new(
            [(left, upper), (left + width, upper + height)],
            WHITE.filled(),
        ))?;
        root.draw(&Rectangle::new(
            [(left, upper), (left + width, upper + height)],
            GRID.stroke_width(1),
        ))?;
        for (i, label) in labels.iter().enumerate() {
            let y = upper + 8 + line * i as i32;
            let color = PALETTE[i % PALETTE.len()];
            root.draw(&Rectangle::new(
                [(left + 8, y + 2), (left + 28, y + 12)],
                color.filled(),
            ))?;
            pixel_font::draw(
                root,
                label,
                (left + 36, y),
                Anchor::TopLeft,
                TEXT_SCALE,
                &INK,
            )?;
        }
        Ok(())
    }
}

/// Round tick values from 0 to at least `max`: about five, a step of 1, 2 or 5 times a power
/// of ten.
fn ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let count = (max / step).ceil() as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

/// A tick value with as many decimals as its step needs.
fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(1.0),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(ticks(93.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(ticks(0.0), ticks(1.0));
        assert_eq!(ticks(f64::NAN), ticks(1.0));
        let big = ticks(12_345.0);
        assert!(
            big.len() <= 7 && *big.last().unwrap() >= 12_345.0,
            "{big:?}"
        );
    }

    #[test]
    fn labels_show_the_digits_the_step_needs() {
        assert_eq!(tick_label(0.6000000000000001, 0.2), "0.6");
        assert_eq!(tick_label(40.0, 20.0), "40");
        assert_eq!(tick_label(0.05, 0.05), "0.05");
    }

    #[test]
    fn plots_are_written_as_png() {
        let records: Vec<RequestRecord> = (0..50)
            .map(|i| RequestRecord {
                sent_at: i as f64 * 0.1,
                prompt_tokens: 64,
                max_tokens: 32,
                output_tokens: 32,
                ttft: Some(0.01 + i as f64 * 1e-3),
                e2e: Some(0.5 + i as f64 * 0.01),
                error: (i == 7).then(|| "HTTP 429".into()),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let files = write(
            dir.path(),
            &[
                Run {
                    label: "5 REQ/S".into(),
                    records: &records,
                },
                Run {
                    label: "20 REQ/S".into(),
                    records: &records[10..],
                },
            ],
        )
        .unwrap();
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", file.display());
        }
    }
}
