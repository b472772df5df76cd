//! Line charts as PNG files: the train/validation perplexity curve of a run, like the book's
//! `trainer.plot()`, the gradient's norm through time (`train.log_grad_norm`, on a log
//! scale, like the book's §6.1 figure), and any other curves (the sine example's). Text uses
//! a font compiled into the binary, so no system fonts are needed.

use crate::metrics::EpochRecord;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";

/// Colours of successive series (matplotlib's first three).
pub const COLORS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44)];

pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at each point (for few points, e.g. one per epoch).
    pub markers: bool,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// Label the x axis with whole numbers only (epochs).
    pub integer_x: bool,
    /// y on a log scale (points that are not positive are left out).
    pub log_y: bool,
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
    });
}

/// Writes `path` (through a temporary file, so a reader never sees half a PNG). Non-finite
/// points are left out.
pub fn line_chart_png(path: &Path, chart: &Chart, series: &[Series]) -> Result<()> {
    register_font();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("partial.png");
    let drawn = if chart.log_y { draw_log_y(&tmp, chart, series) } else { draw(&tmp, chart, series) };
    drawn.map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// The train and validation perplexity of each epoch.
pub fn perplexity_png(records: &[EpochRecord], path: &Path, title: &str) -> Result<()> {
    let points = |f: fn(&EpochRecord) -> f64| records.iter().map(|r| (r.epoch as f64, f(r))).collect();
    line_chart_png(
        path,
        &Chart { title, x_desc: "epoch", y_desc: "perplexity", integer_x: true, log_y: false },
        &[
            Series { name: "train", points: points(|r| r.train_ppl), markers: true },
            Series { name: "valid", points: points(|r| r.valid_ppl), markers: true },
        ],
    )
}

/// The gradient's norm through time (`train.log_grad_norm`): ‖dL/dh_t‖ against the steps it
/// travelled back, y on a log scale, for the first, the middle and the last epoch that
/// measured it; an error when no epoch measured it.
pub fn grad_norm_png(records: &[EpochRecord], path: &Path, title: &str) -> Result<()> {
    let measured: Vec<(usize, &Vec<f64>)> =
        records.iter().filter_map(|r| r.grad_norm_through_time.as_ref().map(|n| (r.epoch, n))).collect();
    if measured.is_empty() {
        return Err(anyhow!("{}: no epoch measured the gradient's norm through time", path.display()));
    }
    let mut picks = vec![0, measured.len() / 2, measured.len() - 1];
    picks.dedup();
    let names: Vec<String> = picks.iter().map(|&i| format!("epoch {}", measured[i].0)).collect();
    let series: Vec<Series> = picks
        .iter()
        .zip(&names)
        .map(|(&i, name)| Series {
            name,
            points: measured[i].1.iter().enumerate().map(|(k, &v)| (k as f64, v)).collect(),
            markers: false,
        })
        .collect();
    let chart =
        Chart { title, x_desc: "steps back in time (T - t)", y_desc: "norm of dL/dh_t", integer_x: true, log_y: true };
    line_chart_png(path, &chart, &series)
}

/// As [`draw`], with y on a log scale; points that are not finite and positive are left out.
fn draw_log_y(path: &Path, c: &Chart, series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    let shown = |s: &Series| -> Vec<(f64, f64)> {
        s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0).collect()
    };
    let all: Vec<(f64, f64)> = series.iter().flat_map(shown).collect();
    if all.is_empty() {
        return Err("nothing to plot".into());
    }
    let fold = |f: fn(&(f64, f64)) -> f64| {
        all.iter().map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let (x0, mut x1) = fold(|p| p.0);
    let (y0, y1) = fold(|p| p.1);
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let area = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&area)
        .caption(c.title, (FONT, 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, (y0 / 1.2..y1 * 1.2).log_scale())?;
    let x_labels = if c.integer_x { ((x1 - x0) as usize + 1).min(20) } else { 10 };
    chart
        .configure_mesh()
        .x_desc(c.x_desc)
        .y_desc(c.y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_labels(x_labels)
        .y_labels(12)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()?;
    for (s, color) in series.iter().zip(COLORS.iter().cycle()) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(shown(s), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    area.present()?;
    Ok(())
}

fn draw(path: &Path, c: &Chart, series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    let finite: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if finite.is_empty() {
        return Err("nothing to plot".into());
    }
    let fold = |f: fn(&(f64, f64)) -> f64| {
        finite.iter().map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let (x0, mut x1) = fold(|p| p.0);
    let (y0, y1) = fold(|p| p.1);
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(y1.abs() * 0.01).max(1e-9);
    let area = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&area)
        .caption(c.title, (FONT, 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    let x_labels = if c.integer_x { ((x1 - x0) as usize + 1).min(20) } else { 10 };
    let integer_x = c.integer_x;
    chart
        .configure_mesh()
        .x_desc(c.x_desc)
        .y_desc(c.y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_labels(x_labels)
        .y_labels(12)
        .x_label_formatter(&|x| if integer_x { format!("{x:.0}") } else { format!("{x}") })
        .draw()?;
    for (s, color) in series.iter().zip(COLORS.iter().cycle()) {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if s.markers {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    area.present()?;
    Ok(())
}
