//! `voltcast bench ...`: throughput figures, printed, never asserted.

use std::sync::Arc;
use std::time::Instant;

use clap::Subcommand;
use voltcast_scoring::ingest::dead_letter::{DeadLetterQueue, Origin};
use voltcast_scoring::ingest::decode::CsvLayout;
use voltcast_scoring::ingest::simulate::{CSV_HEADER, FleetSimulator, SimulatorConfig, WireFormat};
use voltcast_scoring::ingest::{
    BatchConfig, IngestCounters, IngestError, MicroBatcher, ValidationConfig,
};

#[derive(Subcommand)]
pub enum BenchTarget {
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

pub fn run(target: BenchTarget) -> anyhow::Result<()> {
    match target {
        BenchTarget::Ingest {
            records,
            batch_rows,
        } => ingest(records, batch_rows),
    }
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
