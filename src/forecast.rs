//! `voltcast forecast`: batch scoring of telemetry files.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use voltcast_scoring::VoltcastConfig;
use voltcast_scoring::batch::{cleanse, forecast_fleet, forecast_table, write_table};

#[derive(Args)]
pub struct ForecastArgs {
    /// Telemetry files or folders: CSV (reference header), JSON lines, or Parquet in the
    /// telemetry schema.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Forecasts and risks, one row per battery and forecast day: `.parquet` or CSV.
    #[arg(long)]
    output: PathBuf,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Draw this battery's history, forecast, 90% band and rated-cycles line...
    #[arg(long, requires = "plot_out")]
    plot: Option<String>,
    /// ...into this PNG file.
    #[arg(long)]
    plot_out: Option<PathBuf>,
}

pub async fn run(args: ForecastArgs, config: &VoltcastConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let state = cleanse(
        &args.input,
        config.windows.clone(),
        config.batch.clone(),
        config.validation.clone(),
    )
    .await?;
    let stats = state.stats.clone();
    let cleansed = started.elapsed();
    let batteries = state.battery_count();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bar = ProgressBar::new(batteries as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} forecasting [{bar:40}] {pos}/{len} batteries ({per_sec}, eta {eta})",
        )
        .context("progress template")?
        .progress_chars("=> "),
    );
    let forecasting = Instant::now();
    let forecasts = forecast_fleet(&state, &config.forecast, &config.risk, threads, &|| {
        bar.inc(1)
    });
    bar.finish_and_clear();
    let fit_seconds = forecasting.elapsed().as_secs_f64();
    write_table(&args.output, &forecast_table(&forecasts))?;
    if let (Some(battery), Some(out)) = (&args.plot, &args.plot_out) {
        let f = forecasts
            .iter()
            .find(|f| &f.battery_id == battery)
            .with_context(|| format!("--plot {battery}: no such battery in the input"))?;
        crate::plot::draw(f, out)?;
    }
    let at_risk = forecasts.iter().filter(|f| f.risk.at_risk).count();
    eprintln!(
        "voltcast forecast: {} rows cleansed into {} battery-days ({} duplicates, {} imputed) in {:.2} s; {} batteries forecast in {:.2} s ({:.0} batteries/s on {threads} threads); {at_risk} at risk within {} days; wrote {}",
        stats.rows_in,
        stats.days_closed,
        stats.duplicates,
        stats.days_imputed,
        cleansed.as_secs_f64(),
        forecasts.len(),
        fit_seconds,
        forecasts.len() as f64 / fit_seconds.max(1e-9),
        config.risk.horizon_days,
        args.output.display()
    );
    Ok(())
}
