//! `voltcast bench ...`: throughput figures, printed, never asserted.

use std::sync::Arc;
use std::time::Instant;

use clap::Subcommand;
use voltcast_scoring::VoltcastConfig;
use voltcast_scoring::ingest::dead_letter::{DeadLetterQueue, Origin};
use voltcast_scoring::ingest::decode::CsvLayout;
use voltcast_scoring::ingest::simulate::{CSV_HEADER, FleetSimulator, SimulatorConfig, WireFormat};
use voltcast_scoring::ingest::{
    BatchConfig, IngestCounters, IngestError, MicroBatcher, ValidationConfig,
};

#[derive(Subcommand)]
pub enum BenchTarget {
    /// The whole pipeline as `voltcast run` runs it, on a backlog: a fleet produced into
    /// Kafka (or a file with --input), consumed, decoded, windowed, forecast and alerted.
    /// Prints events/s, time per stage and resident memory.
    Pipeline(crate::bench_pipeline::PipelineArgs),
    /// Signed webhook deliveries/s to a local head unit, and window close -> webhook
    /// received latency through forecasts and the alert policy.
    Alerts {
        /// Alerts for the deliveries/s figure.
        #[arg(long, default_value_t = 5_000)]
        alerts: usize,
        /// Webhook deliveries in flight.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Fleet for the latency figure.
        #[arg(long, default_value_t = 2_000)]
        batteries: usize,
        #[arg(long, default_value_t = 60)]
        days: u32,
        /// Wall time between two days closing.
        #[arg(long, default_value_t = 250)]
        day_ms: u64,
    },
    /// Micro-batch day-window aggregation (dedupe, DataFusion partials, closing,
    /// interpolation, history) and memory per battery.
    Windows {
        #[arg(long, default_value_t = 100_000)]
        batteries: usize,
        #[arg(long, default_value_t = 730)]
        days: u32,
        #[arg(long, default_value_t = 50_000)]
        batch_rows: usize,
    },
    /// Forecast accuracy and alerts against the simulator's truth, selection and update cost.
    Forecast {
        #[arg(long, default_value_t = 1_000)]
        batteries: usize,
        #[arg(long, default_value_t = 730)]
        days: u32,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// The fleet with seasons: winter driving up to 25% heavier, usage regimes that
        /// change, batteries replaced (`SimulatorConfig::with_seasons`).
        #[arg(long)]
        seasons: bool,
    },
    /// Damaged messages (bit flips, truncation, huge and non-finite numbers, wrong types,
    /// deep nesting, invalid UTF-8, duplicate keys, oversize) through the whole pipeline
    /// on Kafka; fails unless rows + dead letters = messages, each letter with a reason.
    Fuzz(crate::bench_fuzz::FuzzArgs),
    /// A partition handed to a new owner: checkpoint size per battery (models included)
    /// and the time from assignment to the first processed batch.
    Handoff(crate::bench_handoff::HandoffArgs),
    /// librdkafka's mock cluster alone in this process, for `bench pipeline
    /// --broker-process`: prints `bootstrap HOST:PORT`, runs until its stdin closes.
    #[command(hide = true)]
    MockBroker(crate::bench_pipeline::MockBrokerArgs),
    /// JSON (and CSV) -> validated Arrow batches on one core.
    Ingest {
        /// Messages to decode.
        #[arg(long, default_value_t = 1_000_000)]
        records: usize,
        /// Rows per micro-batch.
        #[arg(long, default_value_t = 50_000)]
        batch_rows: usize,
    },
}

/// `config`: the loaded configuration; the forecast and pipeline benches take its
/// `[forecast]` and `[risk]` sections, so a setting can be tried before it is deployed.
pub fn run(target: BenchTarget, config: &VoltcastConfig) -> anyhow::Result<()> {
    if !matches!(
        target,
        BenchTarget::Pipeline(_)
            | BenchTarget::Fuzz(_)
            | BenchTarget::Handoff(_)
            | BenchTarget::MockBroker(_)
    ) {
        println!("bench build: {}", build_profile());
    }
    match target {
        BenchTarget::Pipeline(args) => crate::bench_pipeline::run(args, config),
        BenchTarget::Fuzz(args) => crate::bench_fuzz::run(args),
        BenchTarget::Handoff(args) => crate::bench_handoff::run(args, config),
        BenchTarget::MockBroker(args) => crate::bench_pipeline::mock_broker(args),
        BenchTarget::Ingest {
            records,
            batch_rows,
        } => ingest(records, batch_rows),
        BenchTarget::Windows {
            batteries,
            days,
            batch_rows,
        } => windows(batteries, days, batch_rows),
        BenchTarget::Forecast {
            batteries,
            days,
            seed,
            seasons,
        } => forecast(batteries, days, seed, seasons, config),
        BenchTarget::Alerts {
            alerts,
            concurrency,
            batteries,
            days,
            day_ms,
        } => crate::bench_alerts::run(alerts, concurrency, batteries, days, day_ms),
    }
}

/// Figures depend on the build: `cargo run` builds with debug assertions and overflow
/// checks in every crate, the shipped binary (`--release`, the Dockerfile's) without.
pub(crate) fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev profile (debug assertions and overflow checks on; `cargo run --release` for the shipped build)"
    } else {
        "release (as shipped)"
    }
}

fn forecast(
    batteries: usize,
    days: u32,
    seed: u64,
    seasons: bool,
    loaded: &VoltcastConfig,
) -> anyhow::Result<()> {
    use voltcast_scoring::evaluate::{EvaluationConfig, evaluate};

    let config = EvaluationConfig {
        simulator: {
            let fleet = SimulatorConfig {
                batteries,
                days,
                seed,
                ..Default::default()
            };
            if seasons { fleet.with_seasons() } else { fleet }
        },
        selection: loaded.forecast.clone(),
        risk: loaded.risk.clone(),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let started = Instant::now();
    let e = runtime.block_on(evaluate(&config))?;
    let (s, n, o) = (&e.selected, &e.seasonal_naive, &e.oracle);
    println!(
        "bench forecast: {batteries} batteries x {days} days, last {} days held out, {} scored in {:.1} s",
        config.selection.horizon_days,
        e.batteries,
        started.elapsed().as_secs_f64()
    );
    println!(
        "bench forecast accuracy: NRMSE selected {:.4}, seasonal naive {:.4} ({:.1}% lower), oracle {:.4}",
        s.nrmse,
        n.nrmse,
        100.0 * (1.0 - s.nrmse / n.nrmse),
        o.nrmse
    );
    println!(
        "bench forecast 30-day sum relative error: selected {:.4}, seasonal naive {:.4}, oracle {:.4}",
        s.sum_error, n.sum_error, o.sum_error
    );
    println!("bench forecast winners: {:?}", e.winners);
    println!(
        "bench forecast 30-day sum intervals (selected model, held out): {:.3} of actuals above the 90% quantile (calibrated: 0.100), {:.3} inside the central 90% interval (0.900)",
        e.sum_above_q90, e.sum_within_90
    );
    println!(
        "bench forecast P(rating within {} days), every assessed day of the walk: Brier score {:.4}; reliability (mean P / share failed / days):",
        config.risk.horizon_days, e.brier
    );
    for (i, (p, failed, n)) in e.reliability.iter().enumerate() {
        println!(
            "  P in [{:.1}, {:.1}): {p:.3} / {failed:.3} / {n}",
            i as f64 / 10.0,
            (i + 1) as f64 / 10.0
        );
    }
    for (family, a) in &e.by_family {
        println!(
            "bench forecast had {family} been used for every battery: NRMSE {:.4}, 30-day sum error {:.4}",
            a.nrmse, a.sum_error
        );
    }
    println!(
        "bench forecast alerts (p >= {}): recall {:.3} ({}/{}), precision {:.3} ({}/{}), median lead {} days",
        config.risk.alert_probability,
        e.recall,
        e.detected,
        e.positives,
        e.precision,
        e.true_alerts,
        e.alerts,
        e.median_lead_days
    );
    println!(
        "bench forecast cost per core: selection {:.2} ms per battery (up to {} families x {} folds + final fit; `trend_seasonal` alone where a season shows), daily update + {}-day predict + risk {:.1} us per battery",
        e.selection_ms,
        voltcast_scoring::forecaster::ModelKind::CANDIDATES.len(),
        config.selection.folds,
        config.selection.horizon_days,
        e.update_us
    );
    println!(
        "bench forecast upkeep through the walk: {:.2} selections and {:.2} refits per battery, {:.3} ms per refit",
        e.selections_per_battery, e.refits_per_battery, e.refit_ms
    );
    Ok(())
}

/// Messages as cars send them: the reference columns plus vehicle id, no electrical
/// readings (~200-250 bytes each), clean so that every one takes the full path to Arrow.
fn messages(records: usize, format: WireFormat) -> anyhow::Result<Vec<Vec<u8>>> {
    let batteries = 10_000.min(records).max(1);
    let config = SimulatorConfig {
        batteries,
        days: records.div_ceil(batteries) as u32,
        twelve_hourly_rate: 0.0,
        duplicate_rate: 0.0,
        missing_day_rate: 0.0,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let mut sim = FleetSimulator::new(config, format)?;
    let mut out = Vec::with_capacity(records);
    while let Some(day) = sim.next_day() {
        for m in day.messages {
            let mut r = m.record.expect("clean simulation");
            (r.resting_voltage, r.state_of_charge, r.temperature_c) = (None, None, None);
            out.push(voltcast_scoring::ingest::simulate::render(format, &r));
            if out.len() == records {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

fn ingest(records: usize, batch_rows: usize) -> anyhow::Result<()> {
    let json = messages(records, WireFormat::Json)?;
    let bytes: usize = json.iter().map(Vec::len).sum();
    let rate = time_decode(&json, batch_rows, &mut |b, m, o, now, dlq| {
        b.push_json(m, o, now, dlq)
    })?;
    let mean_bytes = bytes as f64 / json.len().max(1) as f64;
    println!(
        "bench ingest json: {} messages, mean {mean_bytes:.0} bytes, {PASSES} passes: {:.0} records/s median ({:.0} MB/s), {:.0} records/s best, on one core",
        json.len(),
        rate.median,
        rate.median * mean_bytes / 1e6,
        rate.best,
    );

    let csv_lines = messages(records, WireFormat::Csv)?;
    let layout = CsvLayout::from_header(CSV_HEADER.split(','))?;
    let rows: Vec<csv::StringRecord> = csv_lines
        .iter()
        .map(|l| {
            csv::StringRecord::from(
                std::str::from_utf8(l)
                    .expect("utf-8")
                    .split(',')
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut i = 0;
    let rate = time_decode(&csv_lines, batch_rows, &mut |b, _, o, now, dlq| {
        i += 1;
        b.push_csv(&layout, &rows[(i - 1) % rows.len()], o, now, dlq)
    })?;
    println!(
        "bench ingest csv (split rows -> Arrow), {PASSES} passes: {:.0} records/s median, {:.0} records/s best, on one core",
        rate.median, rate.best
    );
    Ok(())
}

/// Pushes one message into the batcher the way a source would.
type PushFn<'a> = dyn FnMut(&mut MicroBatcher, &[u8], &Origin, i64, &mut DeadLetterQueue) -> Result<(), IngestError>
    + 'a;

/// Timed passes over the same data; the machine is shared, so report median and best.
const PASSES: usize = 5;

fn time_decode(
    messages: &[Vec<u8>],
    batch_rows: usize,
    push: &mut PushFn<'_>,
) -> anyhow::Result<Rates> {
    let mut rates = (0..PASSES)
        .map(|_| decode_pass(messages, batch_rows, push))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    rates.sort_by(f64::total_cmp);
    Ok(Rates {
        median: rates[PASSES / 2],
        best: rates[PASSES - 1],
    })
}

struct Rates {
    median: f64,
    best: f64,
}

fn decode_pass(
    messages: &[Vec<u8>],
    batch_rows: usize,
    push: &mut PushFn<'_>,
) -> anyhow::Result<f64> {
    let counters = Arc::new(IngestCounters::default());
    let config = BatchConfig {
        max_rows: batch_rows,
        max_wait_ms: u64::MAX / 2,
    };
    let mut batcher = MicroBatcher::new(config, ValidationConfig::default(), counters.clone());
    let (mut dlq, dead) = DeadLetterQueue::memory();
    let mut origin = Origin {
        source: Arc::from("bench"),
        partition: 0,
        offset: 0,
    };
    let now = voltcast_scoring::ingest::now_millis();
    let mut rows = 0;
    let started = Instant::now();
    for m in messages {
        origin.offset += 1;
        push(&mut batcher, m, &origin, now, &mut dlq)?;
        if batcher.is_full() {
            rows += batcher.take().map_or(0, |b| b.rows.num_rows());
        }
    }
    rows += batcher.take().map_or(0, |b| b.rows.num_rows());
    let seconds = started.elapsed().as_secs_f64();
    let refused = dead.lock().expect("not poisoned").len();
    anyhow::ensure!(
        rows == messages.len(),
        "bench data lost rows: {rows} of {} ({refused} refused)",
        messages.len()
    );
    Ok(messages.len() as f64 / seconds)
}

/// (steal, total) CPU ticks so far, over all cores: on a shared VM the hypervisor's
/// share of the run says how much of a slow figure was the host's.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    (
        ticks.get(7).copied().unwrap_or(0),
        ticks.iter().take(8).sum(),
    )
}

fn steal_share(since: (u64, u64)) -> f64 {
    let now = cpu_ticks();
    (now.0 - since.0) as f64 / (now.1 - since.1).max(1) as f64
}

pub(crate) fn resident_bytes() -> usize {
    statm_resident("/proc/self/statm")
}

/// Resident bytes of another process (0 if it is gone).
pub(crate) fn resident_bytes_of(pid: u32) -> usize {
    statm_resident(&format!("/proc/{pid}/statm"))
}

fn statm_resident(path: &str) -> usize {
    let statm = std::fs::read_to_string(path).unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Feeds a simulated fleet (with the reference's defects) through the window stage one
/// simulated day at a time; only `DailyWindows::apply` is timed.
fn windows(batteries: usize, days: u32, batch_rows: usize) -> anyhow::Result<()> {
    use voltcast_scoring::ingest::MicroBatch;
    use voltcast_scoring::windows::{DailyWindows, WindowConfig};

    let config = SimulatorConfig {
        batteries,
        days,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let mut sim = FleetSimulator::new(config, WireFormat::Json)?.without_payloads();
    let mut windows = DailyWindows::new(WindowConfig::default());
    let rss_before = resident_bytes();
    let ticks_before = cpu_ticks();
    let (mut rows, mut busy, mut closed_rows) = (0u64, std::time::Duration::ZERO, 0usize);
    // Per full batch, rows/s: the machine is shared, and the median shows the stage's
    // own speed through other tenants' bursts.
    let mut batch_rates = Vec::new();
    let source: Arc<str> = Arc::from("bench");
    while let Some(day) = sim.next_day() {
        let records: Vec<_> = day.messages.into_iter().filter_map(|m| m.record).collect();
        for chunk in records.chunks(batch_rows) {
            let batch = MicroBatch::from_records(chunk, source.clone());
            rows += chunk.len() as u64;
            let started = Instant::now();
            let out = windows.apply(&batch, 0)?;
            let took = started.elapsed();
            busy += took;
            if chunk.len() == batch_rows {
                batch_rates.push(chunk.len() as f64 / took.as_secs_f64());
            }
            closed_rows += out.closed.iter().map(|c| c.num_rows()).sum::<usize>();
        }
    }
    let state = windows.state();
    let held = state.footprint();
    let grown_before_checkpoint = resident_bytes().saturating_sub(rss_before);
    batch_rates.sort_by(f64::total_cmp);
    let median = batch_rates
        .get(batch_rates.len() / 2)
        .copied()
        .unwrap_or(0.0);
    println!(
        "bench windows: {batteries} batteries x {days} days, {rows} rows in micro-batches of {batch_rows}: {:.0} rows/s ({:.1} s in the window stage; median micro-batch {median:.0} rows/s), {closed_rows} battery-days closed; CPU stolen by the host: {:.1}%",
        rows as f64 / busy.as_secs_f64(),
        busy.as_secs_f64(),
        100.0 * steal_share(ticks_before)
    );
    // The service checkpoints every few seconds and hands freed pages back after each
    // checkpoint: what stays resident is measured after one.
    let grown = checkpoint(state)?.saturating_sub(rss_before);
    let per_battery = |bytes: usize| bytes as f64 / batteries as f64;
    println!(
        "bench windows memory: {:.0} bytes per battery resident after a checkpoint ({:.0} before it); held: {:.0} history ({} days retained), {:.0} open windows, {:.0} ids and index",
        per_battery(grown),
        per_battery(grown_before_checkpoint),
        per_battery(held.histories),
        WindowConfig::default().retention_days,
        per_battery(held.open_windows),
        per_battery(held.fleet),
    );
    Ok(())
}

/// One checkpoint of the state the windows bench built: what a save costs at this size.
/// Returns the resident size right after the save (before the load makes a second copy).
fn checkpoint(state: &voltcast_scoring::windows::WindowState) -> anyhow::Result<usize> {
    let dir = std::env::temp_dir().join(format!("voltcast-bench-{}", std::process::id()));
    let store = voltcast_scoring::checkpoint::CheckpointStore::open(&dir)?;
    let key = voltcast_scoring::checkpoint::PartitionKey {
        topic: Arc::from("bench"),
        partition: 0,
    };
    let started = Instant::now();
    let bytes = store.save(&key, 1, state)?;
    let saved = started.elapsed();
    let resident = resident_bytes();
    let started = Instant::now();
    let loaded = store
        .load::<voltcast_scoring::windows::WindowState>(&key)?
        .state
        .map_or(0, |w| w.battery_count());
    let load = started.elapsed();
    std::fs::remove_dir_all(&dir)?;
    println!(
        "bench windows checkpoint: {bytes} bytes ({:.0} per battery), saved in {:.2} s, loaded {loaded} batteries in {:.2} s",
        bytes as f64 / state.battery_count().max(1) as f64,
        saved.as_secs_f64(),
        load.as_secs_f64()
    );
    Ok(resident)
}
