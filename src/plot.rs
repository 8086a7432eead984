//! `voltcast forecast --plot`: one battery's lifetime cycles, history and forecast, with
//! the 90% band of the cumulative forecast and the rated-cycles line.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use voltcast_scoring::batch::BatteryForecast;

/// History days shown before the forecast.
const HISTORY_DAYS: usize = 180;
const Z90: f64 = 1.644_853_6;

/// Lifetime cycles at the end of each history day, oldest first, ending at `lifetime`.
fn lifetime_path(f: &BatteryForecast) -> Vec<(f64, f64)> {
    let cycles = &f.history.cycles;
    let shown = cycles.len().min(HISTORY_DAYS);
    let mut total = f.lifetime;
    let mut points = Vec::with_capacity(shown);
    for (k, c) in cycles.iter().rev().take(shown).enumerate() {
        points.push((-(k as f64), total));
        total -= c;
    }
    points.reverse();
    points
}

pub fn draw(f: &BatteryForecast, out: &Path) -> anyhow::Result<()> {
    let history = lifetime_path(f);
    let mut cumulative = f.lifetime;
    // Day 0 is the last closed day: the forecast line starts where history ends.
    let start = (0.0, f.lifetime, f.lifetime, f.lifetime);
    let forecast: Vec<(f64, f64, f64, f64)> = std::iter::once(start)
        .chain(
            f.mean
                .iter()
                .zip(&f.sum_sd)
                .enumerate()
                .map(|(k, (m, sd))| {
                    cumulative += m.max(0.0);
                    let x = (k + 1) as f64;
                    (x, cumulative, cumulative - Z90 * sd, cumulative + Z90 * sd)
                }),
        )
        .collect();
    let lows = history
        .iter()
        .map(|p| p.1)
        .chain(forecast.iter().map(|p| p.2));
    let highs = history
        .iter()
        .map(|p| p.1)
        .chain(forecast.iter().map(|p| p.3))
        .chain([f.rated]);
    let (lo, hi) = (
        lows.fold(f64::INFINITY, f64::min),
        highs.fold(f64::NEG_INFINITY, f64::max),
    );
    let pad = (hi - lo).max(1.0) * 0.05;
    let x0 = history.first().map_or(0.0, |p| p.0);
    let x1 = forecast.last().map_or(1.0, |p| p.0);

    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    let failed = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", out.display());
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let title = format!(
        "{}: P(rated cycles within {} days) = {:.2}, model {}",
        f.battery_id,
        f.mean.len(),
        f.risk.probability,
        f.record.kind()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc("days from the last closed day")
        .y_desc("lifetime cycles used")
        .draw()
        .map_err(|e| failed(&e))?;
    let band: Vec<(f64, f64)> = forecast
        .iter()
        .map(|p| (p.0, p.3))
        .chain(forecast.iter().rev().map(|p| (p.0, p.2)))
        .collect();
    chart
        .draw_series(std::iter::once(Polygon::new(band, BLUE.mix(0.2))))
        .map_err(|e| failed(&e))?
        .label("90% band")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], BLUE.mix(0.2).filled()));
    chart
        .draw_series(LineSeries::new(history, BLACK.stroke_width(2)))
        .map_err(|e| failed(&e))?
        .label("history")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(LineSeries::new(
            forecast.iter().map(|p| (p.0, p.1)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| failed(&e))?
        .label("forecast")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            [(x0, f.rated), (x1, f.rated)],
            RED.stroke_width(2),
        ))
        .map_err(|e| failed(&e))?
        .label(format!("rated {:.0} cycles", f.rated))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(&e))?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))
}
