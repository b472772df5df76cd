//! The train/validation perplexity curve as a PNG, like the book's `trainer.plot()`.
//! Text uses a font compiled into the binary, so no system fonts are needed.

use crate::metrics::EpochRecord;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
    });
}

/// Writes `path` (through a temporary file, so a reader never sees half a PNG).
pub fn perplexity_png(records: &[EpochRecord], path: &Path, title: &str) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    register_font();
    let tmp = path.with_extension("partial.png");
    draw(records, &tmp, title).map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn draw(records: &[EpochRecord], path: &Path, title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let area = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    area.fill(&WHITE)?;
    let values = records.iter().flat_map(|r| [r.train_ppl, r.valid_ppl]).filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo * 0.9, hi * 1.1) } else { (1.0, 10.0) };
    let first = records.first().map_or(1, |r| r.epoch) as i32;
    let last = (records.last().map_or(1, |r| r.epoch) as i32).max(first + 1);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(first..last, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("perplexity")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_labels(((last - first) as usize + 1).min(20))
        .y_labels(12)
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let series = [("train", RGBColor(31, 119, 180), true), ("valid", RGBColor(214, 39, 40), false)];
    for (name, color, is_train) in series {
        let pts: Vec<(i32, f64)> = records
            .iter()
            .map(|r| (r.epoch as i32, if is_train { r.train_ppl } else { r.valid_ppl }))
            .filter(|(_, v)| v.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
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
