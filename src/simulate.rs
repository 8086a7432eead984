//! `voltcast simulate`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use voltcast_scoring::ingest::KafkaConfig;
use voltcast_scoring::ingest::simulate::{
    FleetSimulator, SimulatorConfig, TruthWriter, WireFormat, format_for_path, publish_kafka,
    write_file,
};

#[derive(Args)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 1000)]
    batteries: usize,
    #[arg(long, default_value_t = 60)]
    days: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// First simulated day.
    #[arg(long, default_value = "2024-01-01")]
    start_date: String,
    /// Write to this file: JSON lines, or CSV (reference header) when it ends in .csv.
    #[arg(long, conflicts_with = "kafka", required_unless_present = "kafka")]
    output: Option<PathBuf>,
    /// Publish to these Kafka brokers instead.
    #[arg(long)]
    kafka: Option<String>,
    #[arg(long, default_value = "battery-telemetry")]
    topic: String,
    /// Accelerated clock: simulated days per wall-clock second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    days_per_second: f64,
    /// Also write ground truth (expected cycles per battery-day, rating crossings) here.
    #[arg(long)]
    truth: Option<PathBuf>,
    #[arg(long, default_value_t = SimulatorConfig::default().twelve_hourly_rate)]
    twelve_hourly_rate: f64,
    #[arg(long, default_value_t = SimulatorConfig::default().duplicate_rate)]
    duplicate_rate: f64,
    #[arg(long, default_value_t = SimulatorConfig::default().missing_day_rate)]
    missing_day_rate: f64,
    #[arg(long, default_value_t = SimulatorConfig::default().malformed_rate)]
    malformed_rate: f64,
    /// The fleet with seasons: winter driving up to 25% heavier, usage regimes that
    /// change (0.3 per battery-year), batteries replaced (0.05 per battery-year, and past
    /// their rating).
    #[arg(long)]
    seasons: bool,
}

pub async fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let config = SimulatorConfig {
        batteries: a.batteries,
        days: a.days,
        seed: a.seed,
        start_date: a.start_date,
        twelve_hourly_rate: a.twelve_hourly_rate,
        duplicate_rate: a.duplicate_rate,
        missing_day_rate: a.missing_day_rate,
        malformed_rate: a.malformed_rate,
        ..Default::default()
    };
    let config = if a.seasons {
        config.with_seasons()
    } else {
        config
    };
    let truth = a
        .truth
        .as_deref()
        .map(|p| TruthWriter::create(p).with_context(|| format!("creating {}", p.display())))
        .transpose()?;
    let summary = match (&a.output, &a.kafka) {
        (Some(out), _) => {
            let mut sim = FleetSimulator::new(config, format_for_path(out))?;
            write_file(&mut sim, out, truth)
                .with_context(|| format!("writing {}", out.display()))?
        }
        (None, Some(brokers)) => {
            let mut sim = FleetSimulator::new(config, WireFormat::Json)?;
            let kafka = KafkaConfig {
                brokers: brokers.clone(),
                ..Default::default()
            };
            let producer = kafka
                .producer_config()?
                .set("linger.ms", "20")
                .create()
                .context("creating the Kafka producer")?;
            publish_kafka(&mut sim, &producer, &a.topic, a.days_per_second, truth).await?
        }
        (None, None) => unreachable!("clap requires --output or --kafka"),
    };
    eprintln!(
        "voltcast: simulated {} days: {} messages ({} valid reports, {} malformed)",
        summary.days, summary.messages, summary.valid_reports, summary.malformed
    );
    Ok(())
}
