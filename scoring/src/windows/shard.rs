//! One shard of the window stage: the batteries whose id routes to it, with their open
//! windows and histories.
//!
//! Why shards: every step of the stage is per battery (dedupe, the day aggregate,
//! closing into the history), so batteries split by a hash of their id share nothing
//! and each shard runs a micro-batch on its own core. Every shard reads the whole
//! batch and takes its own rows, so splitting costs no serial pass.

use std::hash::BuildHasher;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, AsArray, Float64Array, Int32Array, RecordBatch, StringArray, UInt64Array,
};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Int32Type, Int64Type, Schema, TimestampMillisecondType,
    UInt64Type,
};
use datafusion::error::DataFusionError;
use serde::{Deserialize, Serialize};
use voltcast_ingest::RejectReason;
use voltcast_ingest::dead_letter::{DeadLetter, Origin};
use voltcast_ingest::schema as s;

use super::aggregate::{self, DailyAggregator, out};
use super::daily::ClosedColumns;
use super::fleet::Fleet;
use super::history::{BatteryHistory, ObservedDay};
use super::open::OpenWindows;
use super::{WindowError, WindowStats, column, day_of};

/// The hash of a battery id: it routes the battery to its shard and finds it in the
/// shard's index, so each row's id is hashed once. The seed is fixed because routes
/// must survive restarts; ids come from the fleet's own cars, not from strangers, so
/// foldhash's speed is worth more here than SipHash's resistance to chosen keys.
pub fn id_hash(id: &str) -> u64 {
    foldhash::fast::FixedState::with_seed(0x5eed_ba77).hash_one(id)
}

/// Which shard a battery belongs to.
pub fn route(id: &str, shards: usize) -> usize {
    route_hash(id_hash(id), shards)
}

/// The shard from the id's hash: its high half, because the index's buckets come from
/// the low bits, which would otherwise be alike for every battery of a shard.
fn route_hash(hash: u64, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    ((hash >> 32) % shards as u64) as usize
}

/// A shard's part of the state (checkpointed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardState {
    pub fleet: Fleet,
    pub open: OpenWindows,
}

/// What a shard does with one micro-batch.
pub(super) struct ShardTask<'a> {
    pub rows: &'a RecordBatch,
    pub shard: usize,
    pub shards: usize,
    /// Days before this one had closed when the batch arrived: their rows are late.
    pub closed_before: Option<i32>,
    /// When the rows are one partition's, in offset order: each row is judged against
    /// the watermark of the rows before it, so whether a row is late does not depend on
    /// where micro-batches happen to split (a replay after a crash splits elsewhere).
    pub row_clock: Option<RowClock>,
    /// What closes once the rows are in.
    pub closing: Closing,
}

/// What closing a shard's days after a batch takes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closing {
    /// Close every open day before this one.
    pub before: Option<i32>,
    pub retention_days: usize,
    pub rows: ClosedRows,
}

/// Whether closing days makes their closed-day rows, or only fills the histories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClosedRows {
    Emit,
    Skip,
}

/// A partition's event-time clock as rows go by.
#[derive(Debug, Clone, Copy)]
pub(super) struct RowClock {
    pub lateness_ms: i64,
    /// The watermark before the batch's first row.
    pub watermark: Option<voltcast_ingest::time::EpochMillis>,
    /// The time a quorum of the partition's batteries had reached before it.
    pub quorum: super::watermark::Quorum,
}

#[derive(Default)]
pub(super) struct ShardOutput {
    pub closed: Option<RecordBatch>,
    pub late: Vec<DeadLetter>,
    /// Batteries silent for longer than the retention, forgotten as their days closed.
    pub evicted: Vec<Arc<str>>,
    pub stats: WindowStats,
}

/// A shard's rows of a micro-batch after screening, before the day aggregation: per
/// row, whether it is aggregated and under which interned battery.
pub(super) struct ScreenedRows {
    pub keep: Vec<bool>,
    pub index: Vec<u32>,
    pub output: ShardOutput,
}

/// The day partials of several slots' screened rows (a slot: one shard's windows),
/// aggregated in one run: the batches, and per slot the (batch, row) pairs that are its,
/// in batch order.
pub(super) struct SlotPartials {
    pub batches: Arc<[RecordBatch]>,
    pub rows: Vec<Vec<(u32, u32)>>,
}

/// Aggregates `slots`' fresh rows in one DataFusion run: each slot is a screening and
/// where its rows start in `rows`; a row is grouped under its slot's number (its place
/// in `slots`) and its battery.
pub(super) fn aggregate_slots(
    aggregator: &mut DailyAggregator,
    rows: &RecordBatch,
    slots: &[(usize, &ScreenedRows)],
) -> Result<SlotPartials, WindowError> {
    let mut keep = vec![false; rows.num_rows()];
    let mut keys = vec![0u64; rows.num_rows()];
    for (slot, (start, screened)) in slots.iter().enumerate() {
        let kept = screened.keep.iter().zip(&screened.index).enumerate();
        for (i, (_, b)) in kept.filter(|(_, (k, _))| **k) {
            keep[start + i] = true;
            keys[start + i] = aggregate::battery_key(slot as u32, *b);
        }
    }
    let mut partials = SlotPartials {
        batches: Arc::from([]),
        rows: vec![Vec::new(); slots.len()],
    };
    if !keep.contains(&true) {
        return Ok(partials);
    }
    let input = aggregate_input(rows, keys.into())?;
    let fresh = filter_record_batch(&input, &keep.into()).map_err(DataFusionError::from)?;
    partials.batches = aggregator.partials(fresh)?.into();
    for (b, batch) in partials.batches.iter().enumerate() {
        let keys = column(batch, out::BATTERY)?.as_primitive::<UInt64Type>();
        for (r, key) in keys.values().iter().enumerate() {
            let (slot, _) = aggregate::split_key(*key);
            partials.rows[slot as usize].push((b as u32, r as u32));
        }
    }
    Ok(partials)
}

impl ShardState {
    /// The whole of a micro-batch for this shard: screening, its own day aggregation,
    /// merging and closing. (A partition's stage aggregates several partitions' screened
    /// rows at once instead: [`super::DailyWindows::screen_partition`].)
    pub(super) fn run(
        &mut self,
        aggregator: &mut DailyAggregator,
        task: &ShardTask<'_>,
    ) -> Result<ShardOutput, WindowError> {
        let screened = self.screen(task)?;
        let partials = aggregate_slots(aggregator, task.rows, &[(0, &screened)])?;
        self.merge(&partials.batches, &partials.rows[0])?;
        Ok(self.close(&task.closing, screened.output))
    }

    /// Closes the days `closing` says are over, after the batch's rows are merged.
    pub(super) fn close(&mut self, closing: &Closing, mut output: ShardOutput) -> ShardOutput {
        if let Some(day) = closing.before {
            let any = self.open.days().next().is_some_and(|d| d.day() < day);
            output.closed =
                self.close_before(day, closing.retention_days, closing.rows, &mut output.stats);
            if any {
                output.evicted = self.evict_silent(day, closing.retention_days);
                output.stats.evicted += output.evicted.len() as u64;
            }
        }
        output
    }

    /// Takes this shard's rows of the batch: late ones become dead letters, fresh ones
    /// have their event times registered in their windows so copies are recognised
    /// (the mask keeps first copies only), and each row's battery is interned (the
    /// index column DataFusion groups by).
    pub(super) fn screen(&mut self, task: &ShardTask<'_>) -> Result<ScreenedRows, WindowError> {
        let mut output = ShardOutput::default();
        let rows = task.rows;
        let ids = column(rows, s::BATTERY_ID)?.as_string::<i32>();
        let vehicles = column(rows, s::VEHICLE_ID)?.as_string::<i32>();
        let times = column(rows, s::EVENT_TIME)?.as_primitive::<TimestampMillisecondType>();
        let mut keep = Vec::with_capacity(rows.num_rows());
        let mut index = Vec::with_capacity(rows.num_rows());
        let stats = &mut output.stats;
        let mut clock = task.row_clock;
        for i in 0..rows.num_rows() {
            let id = ids.value(i);
            let hash = id_hash(id);
            if route_hash(hash, task.shards) != task.shard {
                keep.push(false);
                index.push(0);
                continue;
            }
            stats.rows_in += 1;
            let t = times.value(i);
            let day = day_of(t);
            let mut closed_before = task.closed_before;
            if let Some(c) = &mut clock {
                let passed = c.watermark.map(|w| day_of(w + 1));
                closed_before = closed_before.max(passed);
                c.quorum.observe(hash, t);
                if let Some(q) = c.quorum.time() {
                    let w = q - c.lateness_ms;
                    c.watermark = Some(c.watermark.map_or(w, |m| m.max(w)));
                }
            }
            if let Some(closed) = closed_before.filter(|c| day < *c) {
                stats.late += 1;
                output.late.push(late_letter(rows, i, closed));
                keep.push(false);
                index.push(0);
                continue;
            }
            let b = self.fleet.intern(id, hash);
            index.push(b);
            if vehicles.is_valid(i) {
                self.fleet.set_vehicle(b, vehicles.value(i));
            }
            let fleet_size = self.fleet.len();
            let fresh = self.open.day_mut(day).window(b, fleet_size).seen.insert(t);
            stats.duplicates += u64::from(!fresh);
            keep.push(fresh);
        }
        Ok(ScreenedRows {
            keep,
            index,
            output,
        })
    }

    /// Adds this shard's rows of the partial aggregates, (batch, row) in batch order, to
    /// the open windows.
    pub(super) fn merge(
        &mut self,
        batches: &[RecordBatch],
        rows: &[(u32, u32)],
    ) -> Result<(), WindowError> {
        for run in rows.chunk_by(|a, b| a.0 == b.0) {
            let batch = &batches[run[0].0 as usize];
            self.merge_batch(batch, run.iter().map(|(_, r)| *r as usize))?;
        }
        Ok(())
    }

    /// Adds rows `at` of the partial aggregates `p` to the open windows.
    fn merge_batch(
        &mut self,
        p: &RecordBatch,
        at: impl Iterator<Item = usize>,
    ) -> Result<(), WindowError> {
        let keys = column(p, out::BATTERY)?.as_primitive::<UInt64Type>();
        let days = column(p, out::DAY)?.as_primitive::<Int64Type>();
        let trips = column(p, out::TRIPS)?.as_primitive::<Float64Type>();
        let minutes = column(p, out::MINUTES)?.as_primitive::<Float64Type>();
        let cycles = column(p, out::CYCLES)?.as_primitive::<Float64Type>();
        let age = column(p, out::AGE)?.as_primitive::<Int32Type>();
        let lifetime = column(p, out::LIFETIME)?.as_primitive::<Float64Type>();
        let rated = column(p, out::RATED)?.as_primitive::<Float64Type>();
        let reports = column(p, out::REPORTS)?.as_primitive::<Int64Type>();
        let readings = out::READINGS.map(|r| {
            let f64s = |suffix: &str| {
                p.column_by_name(&format!("{r}_{suffix}"))
                    .and_then(|c| c.as_primitive_opt::<Float64Type>())
            };
            let n = p
                .column_by_name(&format!("{r}_n"))
                .and_then(|c| c.as_primitive_opt::<Int64Type>());
            (f64s("min"), f64s("max"), f64s("sum"), n)
        });
        for i in at {
            let (_, battery) = aggregate::split_key(keys.value(i));
            // screen() opened this window; the partial only fills it.
            let Some(w) = self.open.get_mut(days.value(i) as i32, battery) else {
                continue;
            };
            w.trips += trips.value(i);
            w.minutes += minutes.value(i);
            w.cycles += cycles.value(i);
            w.age_min = w.age_min.min(age.value(i));
            w.lifetime_max = w.lifetime_max.max(lifetime.value(i));
            w.rated = w.rated.max(rated.value(i));
            w.reports += reports.value(i) as u32;
            for (k, (min, max, sum, n)) in readings.iter().enumerate() {
                let (Some(min), Some(max), Some(sum), Some(n)) = (min, max, sum, n) else {
                    continue;
                };
                let n = n.value(i) as u32;
                if n > 0 {
                    w.readings[k].merge(min.value(i), max.value(i), sum.value(i), n);
                }
            }
        }
        Ok(())
    }

    /// Closes every open day before `day`, in day order: each battery's day goes into
    /// its history (gaps before it interpolated) and out as a closed-day row.
    fn close_before(
        &mut self,
        day: i32,
        retention_days: usize,
        closed_rows: ClosedRows,
        stats: &mut WindowStats,
    ) -> Option<RecordBatch> {
        let emit = closed_rows == ClosedRows::Emit;
        let rows = if emit {
            let closing = self.open.days().take_while(|d| d.day() < day);
            closing.map(|d| d.len()).sum()
        } else {
            0
        };
        let mut closed = ClosedColumns::with_capacity(rows);
        let mut days_closed = 0;
        let mut values = Vec::new();
        while let Some(open_day) = self.open.pop_before(day) {
            let batteries = open_day.batteries();
            for (k, (b, w)) in open_day.iter().enumerate() {
                self.prefetch_history(batteries, k);
                if w.reports == 0 {
                    continue;
                }
                let bi = b as usize;
                self.fleet.rated[bi] = w.rated;
                let obs = ObservedDay {
                    day: open_day.day(),
                    cycles: w.cycles,
                    minutes: w.minutes,
                    trips: w.trips,
                    age: w.age_min,
                    reported_lifetime: w.lifetime_max,
                };
                values.clear();
                let history = &mut self.fleet.histories[bi];
                history.close_day(obs, retention_days, &mut values);
                if emit {
                    for v in &values {
                        closed.push(b, v, w.rated, (!v.imputed).then_some(w));
                    }
                }
                days_closed += values.len() as u64;
                stats.days_imputed += values.iter().filter(|v| v.imputed).count() as u64;
            }
        }
        stats.days_closed += days_closed;
        closed.finish(&self.fleet)
    }
}

impl ShardState {
    /// Forgets the batteries whose last closed day is more than `retention_days` before
    /// `closed_before` and that have no open window: a car scrapped or sold out of the
    /// fleet would otherwise keep its history, model and alert state forever. Decided
    /// by the closing of days, so a replay after a crash evicts the same batteries.
    fn evict_silent(&mut self, closed_before: i32, retention_days: usize) -> Vec<Arc<str>> {
        let oldest_kept = closed_before.saturating_sub(retention_days as i32);
        let mut open = vec![false; self.fleet.len()];
        for day in self.open.days() {
            for b in day.batteries() {
                open[*b as usize] = true;
            }
        }
        let mut evicted = Vec::new();
        for (b, is_open) in open.into_iter().enumerate() {
            let silent = self.fleet.is_live(b)
                && self.fleet.histories[b]
                    .last_day()
                    .is_none_or(|d| d < oldest_kept);
            if silent && !is_open {
                evicted.push(self.fleet.evict(b as u32));
            }
        }
        if !evicted.is_empty() {
            self.fleet.compact_strings();
        }
        evicted
    }
}

/// How far ahead of the battery being closed its successors' histories are fetched.
const HISTORY_AHEAD: usize = 8;

impl ShardState {
    /// Starts loading what closing the `k + HISTORY_AHEAD`th window will touch: a
    /// fleet's histories are far larger than the caches, and waiting for each battery's
    /// in turn left closing bound by memory latency.
    fn prefetch_history(&self, batteries: &[u32], k: usize) {
        if let Some(b) = batteries.get(k + 2 * HISTORY_AHEAD) {
            // The whole struct: its ring header, last day and newest cycles span lines.
            let history: *const BatteryHistory = &self.fleet.histories[*b as usize];
            for line in (0..std::mem::size_of::<BatteryHistory>()).step_by(64) {
                prefetch(history.cast::<u8>().wrapping_add(line));
            }
        }
        if let Some(b) = batteries.get(k + HISTORY_AHEAD) {
            self.fleet.histories[*b as usize].prefetch_newest();
        }
    }
}

/// Asks the CPU to start loading `p`'s cache line.
#[inline]
pub(super) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address, and reads
    // nothing into the program.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The columns the aggregation reads, with the interned battery index in place of the
/// id strings (which filtering would otherwise copy for nothing).
pub(super) fn aggregate_input(
    rows: &RecordBatch,
    keys: UInt64Array,
) -> Result<RecordBatch, WindowError> {
    let schema = rows.schema();
    let mut fields = Vec::with_capacity(aggregate::INPUTS.len() + 1);
    let mut columns = Vec::with_capacity(aggregate::INPUTS.len() + 1);
    for name in aggregate::INPUTS {
        let (i, field) = schema
            .column_with_name(name)
            .ok_or(WindowError::Column(name))?;
        fields.push(field.clone());
        columns.push(rows.column(i).clone());
    }
    fields.push(Field::new(out::BATTERY, DataType::UInt64, false));
    columns.push(Arc::new(keys));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| WindowError::DataFusion(e.into()))
}

/// A late row as a dead letter: its values re-rendered as the JSON wire format (the
/// original bytes are not kept past decoding).
fn late_letter(rows: &RecordBatch, i: usize, closed_before: i32) -> DeadLetter {
    let str_at = |name: &str| {
        rows.column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .and_then(|a| a.is_valid(i).then(|| a.value(i).to_string()))
    };
    let f64_at = |name: &str| {
        rows.column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
            .and_then(|a| a.is_valid(i).then(|| a.value(i)))
    };
    let i32_at = |name: &str| {
        rows.column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
            .map_or(0, |a| a.value(i) as i64)
    };
    let t = rows
        .column_by_name(s::EVENT_TIME)
        .map_or(0, |c| c.as_primitive::<TimestampMillisecondType>().value(i));
    let record = voltcast_ingest::TelemetryRecord {
        battery_id: str_at(s::BATTERY_ID).unwrap_or_default().into(),
        vehicle_id: str_at(s::VEHICLE_ID).map(Into::into),
        event_time: t,
        battery_age_days: i32_at(s::BATTERY_AGE_DAYS),
        number_of_trips: f64_at(s::NUMBER_OF_TRIPS).unwrap_or_default(),
        daily_trip_duration: f64_at(s::DAILY_TRIP_DURATION).unwrap_or_default(),
        daily_cycles_used: f64_at(s::DAILY_CYCLES_USED).unwrap_or_default(),
        lifetime_cycles_used: f64_at(s::LIFETIME_CYCLES_USED).unwrap_or_default(),
        battery_rated_cycles: f64_at(s::BATTERY_RATED_CYCLES).unwrap_or_default(),
        resting_voltage: f64_at(s::RESTING_VOLTAGE),
        state_of_charge: f64_at(s::STATE_OF_CHARGE),
        temperature_c: f64_at(s::TEMPERATURE_C),
    };
    DeadLetter {
        payload: record.to_json().into_bytes(),
        reason: RejectReason::Late,
        detail: format!(
            "day {} closed: the watermark has passed {}",
            voltcast_ingest::time::format_day(day_of(t) as i64),
            voltcast_ingest::time::format_day(closed_before as i64)
        ),
        origin: Origin {
            source: Arc::from("voltcast.windows"),
            partition: -1,
            offset: -1,
        },
    }
}
