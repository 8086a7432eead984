//! `voltcast bench handoff`: what moving a partition between instances costs, through the
//! calls a rebalance makes (`PartitionSet::revoked` on the old owner, `assigned` on the
//! new one) and the stage's first batch after it.
//!
//! The partition's state is built the way the stream builds it, in two legs so the bench
//! finishes in minutes: the window stage alone through all but the last `--forecast-days`
//! (histories, open windows, watermark), handed over once, then the whole task (windows,
//! model selection and daily updates, alert episodes) through the rest, so every battery
//! carries a model selected on its full history. Then the measured handoff: the owner
//! checkpoints and lets go, a fresh owner loads and processes the next day's first batch.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use voltcast_scoring::VoltcastConfig;
use voltcast_scoring::alerts::AlertConfig;
use voltcast_scoring::checkpoint::CheckpointStore;
use voltcast_scoring::forecasting::ForecastSettings;
use voltcast_scoring::ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat};
use voltcast_scoring::ingest::{
    BatchSink, DeadLetterQueue, MicroBatch, PartitionId, PartitionListener,
};
use voltcast_scoring::partition::{PartitionSet, PartitionSettings};
use voltcast_scoring::pipeline::PartitionStage;
use voltcast_scoring::windows::WindowConfig;

#[derive(Args, Debug, Clone)]
pub struct HandoffArgs {
    /// Batteries in the one partition handed over.
    #[arg(long, default_value_t = 100_000)]
    batteries: usize,
    /// Days of history behind them.
    #[arg(long, default_value_t = 730)]
    days: u32,
    /// The last days run with forecasts on (each battery's model selected then).
    #[arg(long, default_value_t = 20)]
    forecast_days: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 50_000)]
    batch_rows: usize,
}

const TOPIC: &str = "bench-handoff";

pub fn run(args: HandoffArgs, config: &VoltcastConfig) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(handoff(args, config))
}

/// Feeds `days` simulated days to `stage` as one partition's micro-batches.
struct Feed {
    fleet: FleetSimulator,
    partition: PartitionId,
    next_offset: i64,
    batch_rows: usize,
}

impl Feed {
    /// The next simulated day as micro-batches.
    fn day(&mut self) -> Option<Vec<MicroBatch>> {
        let day = self.fleet.next_day()?;
        let records: Vec<_> = day.messages.into_iter().filter_map(|m| m.record).collect();
        let batches = records
            .chunks(self.batch_rows)
            .map(|chunk| {
                let mut batch = MicroBatch::from_records(chunk, self.partition.0.clone());
                batch.positions[0].first_offset = self.next_offset;
                self.next_offset += chunk.len() as i64;
                batch.positions[0].next_offset = self.next_offset;
                batch
            })
            .collect();
        Some(batches)
    }

    async fn run(&mut self, stage: &mut PartitionStage, days: u32) -> anyhow::Result<u64> {
        let mut rows = 0;
        for _ in 0..days {
            let Some(batches) = self.day() else { break };
            for batch in batches {
                rows += batch.rows.num_rows() as u64;
                stage
                    .accept(batch)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        Ok(rows)
    }
}

async fn handoff(args: HandoffArgs, config: &VoltcastConfig) -> anyhow::Result<()> {
    println!("bench build: {}", crate::bench::build_profile());
    let dir = tempfile::tempdir()?;
    let store = || CheckpointStore::open(dir.path());
    let windows_only = PartitionSettings::windows_only(WindowConfig::default());
    let full = PartitionSettings {
        windows: WindowConfig::default(),
        forecast: Some(ForecastSettings::new(
            config.forecast.clone(),
            config.risk.clone(),
        )),
        alerts: AlertConfig::default(),
        archive: None,
    };
    let partition: PartitionId = (Arc::from(TOPIC), 0);
    let one = std::slice::from_ref(&partition);
    let owner = |settings: PartitionSettings| -> anyhow::Result<Arc<PartitionSet>> {
        Ok(Arc::new(PartitionSet::assigned_by_group(
            settings,
            Some(store()?),
            None,
        )))
    };
    let sim = SimulatorConfig {
        batteries: args.batteries,
        days: args.days + 1,
        seed: args.seed,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let mut feed = Feed {
        fleet: FleetSimulator::new(sim, WireFormat::Json)?.without_payloads(),
        partition: partition.clone(),
        next_offset: 0,
        batch_rows: args.batch_rows,
    };
    let quiet_days = args.days.saturating_sub(args.forecast_days);

    // Leg 1: the window stage alone.
    let started = Instant::now();
    let first = owner(windows_only)?;
    first.assigned(one);
    let mut stage = PartitionStage::new(first.clone(), DeadLetterQueue::memory().0);
    let rows = feed.run(&mut stage, quiet_days).await?;
    first.revoked(one);
    println!(
        "bench handoff: built {} batteries x {quiet_days} days of windows ({rows} rows) in {:.1} s",
        args.batteries,
        started.elapsed().as_secs_f64()
    );

    // Leg 2: the whole task, so every battery has a model.
    let started = Instant::now();
    let second = owner(full.clone())?;
    second.assigned(one);
    let mut stage = PartitionStage::new(second.clone(), DeadLetterQueue::memory().0);
    let rows = feed.run(&mut stage, args.forecast_days).await?;
    let (batteries, models) = {
        let tasks = second.lock();
        let task = tasks.values().next().expect("the partition is owned");
        (task.windows.state().battery_count(), task.models.len())
    };
    println!(
        "bench handoff: {} more days with forecasts ({rows} rows) in {:.1} s: {batteries} batteries, {models} with a model",
        args.forecast_days,
        started.elapsed().as_secs_f64()
    );

    // The handoff measured: the owner saves and lets go...
    let started = Instant::now();
    second.revoked(one);
    let revoke = started.elapsed();
    drop(stage);
    drop(second);
    let bytes = latest_checkpoint_bytes(dir.path())?;
    // ...and a new owner loads it and processes the next day's first batch.
    let rss_before = crate::bench::resident_bytes();
    let next_day = feed.day().ok_or_else(|| anyhow::anyhow!("no day left"))?;
    let first_batch = next_day
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("an empty day"))?;
    let started = Instant::now();
    let third = owner(full)?;
    let offsets = third.assigned(one);
    let loaded = started.elapsed();
    let mut stage = PartitionStage::new(third.clone(), DeadLetterQueue::memory().0);
    stage
        .accept(first_batch)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let to_first_batch = started.elapsed();
    let models_after = third.lock().values().next().map_or(0, |t| t.models.len());
    anyhow::ensure!(
        models_after == models,
        "the new owner holds {models_after} models of {models}"
    );
    println!(
        "bench handoff checkpoint: {bytes} bytes, {:.0} per battery (state, models, episodes, offset {:?})",
        bytes as f64 / batteries.max(1) as f64,
        offsets[0]
    );
    println!(
        "bench handoff: old owner checkpointed and let go in {:.2} s; new owner loaded in {:.2} s and processed its first batch {:.2} s after the assignment (target 5 s); {:.0} MB resident for the new owner's copy",
        revoke.as_secs_f64(),
        loaded.as_secs_f64(),
        to_first_batch.as_secs_f64(),
        crate::bench::resident_bytes().saturating_sub(rss_before) as f64 / 1e6
    );
    Ok(())
}

/// The size of the largest checkpoint object under `dir` (the last one written holds the
/// most: models and all).
fn latest_checkpoint_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut largest = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                largest = largest.max(meta.len());
            }
        }
    }
    Ok(largest)
}
