//! Streaming daily windows: the reference's cleansing, continuously and in event time.
//!
//! Per micro-batch:
//! 1. each row is checked against the open day windows: a row for a day that has closed
//!    is `late` (dead-lettered); a row whose (battery, event time) was already counted is
//!    an exact duplicate (counted once, however many batches apart the copies arrive);
//! 2. DataFusion aggregates the remaining rows per (battery, UTC day) into partials, which
//!    merge into the open windows (12-hourly reports become one day);
//! 3. the watermark advances (per source partition, see [`watermark`]) and every day
//!    window whose end it has passed closes: the day is appended to its battery's
//!    [`BatteryHistory`], missing days before it are interpolated, and the closed days
//!    leave as one Arrow batch with 7- and 30-day rolling means (DataFusion window
//!    functions).

pub mod aggregate;
pub mod daily;
pub mod history;
pub mod open;
pub mod watermark;

use std::sync::Arc;

/// Battery ids and indexes are not attacker-chosen keys that need SipHash's DoS
/// resistance; foldhash is several times faster on the per-row path.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

use compact_str::CompactString;
use datafusion::arrow::array::UInt32Array;
use datafusion::arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, Int32Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Int32Type, Int64Type, Schema, TimestampMillisecondType,
    UInt32Type,
};
use datafusion::error::DataFusionError;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use voltcast_ingest::dead_letter::{DeadLetter, Origin};
use voltcast_ingest::schema as s;
use voltcast_ingest::time::{EpochMillis, MILLIS_PER_DAY};
use voltcast_ingest::{MicroBatch, RejectReason};

pub use aggregate::DailyAggregator;
pub use daily::daily_schema;
pub use history::BatteryHistory;
pub use open::OpenWindows;
pub use watermark::Watermarks;

use aggregate::out;
use daily::ClosedColumns;
use history::ObservedDay;

/// `[windows]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// How far behind the newest event time a report may arrive and still count.
    pub allowed_lateness_hours: i64,
    /// A source partition with no data for this long stops holding the watermark back.
    pub idle_partition_seconds: i64,
    /// Closed days kept per battery.
    pub retention_days: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            allowed_lateness_hours: 36,
            idle_partition_seconds: 60,
            retention_days: 730,
        }
    }
}

/// One electrical reading's running statistics within a day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadingStats {
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub n: u32,
}

impl ReadingStats {
    fn merge(&mut self, min: f64, max: f64, sum: f64, n: u32) {
        if n == 0 {
            return;
        }
        if self.n == 0 {
            (self.min, self.max) = (min, max);
        } else {
            self.min = self.min.min(min);
            self.max = self.max.max(max);
        }
        self.sum += sum;
        self.n += n;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// An open day window: what a battery reported on one UTC day so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DayPartial {
    pub trips: i64,
    pub minutes: f64,
    pub cycles: f64,
    pub age_min: Option<i32>,
    pub lifetime_max: f64,
    pub rated: f64,
    pub reports: u32,
    pub readings: [ReadingStats; 3],
    /// Event times already counted: the dedupe key within the day.
    pub seen: SeenTimes,
}

/// The event times of a window's reports. A day has one report, or two when the car
/// reports 12-hourly: those live inline, so opening a window allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeenTimes {
    inline: [EpochMillis; 2],
    len: u8,
    spill: Vec<EpochMillis>,
}

impl SeenTimes {
    /// Records `t`; false when it was already there.
    pub fn insert(&mut self, t: EpochMillis) -> bool {
        let n = (self.len as usize).min(2);
        if self.inline[..n].contains(&t) || self.spill.contains(&t) {
            return false;
        }
        if n < 2 {
            self.inline[n] = t;
            self.len += 1;
        } else {
            self.spill.push(t);
        }
        true
    }
}

/// Counts kept by the window stage.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub rows_in: u64,
    pub duplicates: u64,
    pub late: u64,
    pub days_closed: u64,
    pub days_imputed: u64,
}

/// What one micro-batch produced.
#[derive(Debug, Default)]
pub struct WindowOutput {
    /// Days closed by this batch (schema [`daily_schema`]), if any.
    pub closed: Option<RecordBatch>,
    /// Rows for days that had already closed.
    pub late: Vec<DeadLetter>,
}

#[derive(Debug, Error)]
pub enum WindowError {
    #[error("DataFusion: {0}")]
    DataFusion(#[from] DataFusionError),
    #[error("micro-batch lacks column {0}")]
    Column(&'static str),
}

/// Battery ids interned to dense indexes, with their histories.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(from = "FleetRecord")]
pub struct Fleet {
    /// Ids are short; keys stored inline in the table (up to 24 bytes) spare every
    /// lookup a second cache miss through a pointer, and one lookup runs per row.
    #[serde(skip)]
    index: FastMap<CompactString, u32>,
    pub ids: Vec<Arc<str>>,
    pub vehicles: Vec<Option<Arc<str>>>,
    /// A hash of each battery's vehicle id: a car reports its vehicle with every row,
    /// and comparing a dense hash spares the cache miss of reading the stored id.
    #[serde(skip)]
    vehicle_hashes: Vec<u64>,
    pub rated: Vec<f64>,
    pub histories: Vec<BatteryHistory>,
}

fn vehicle_hash(id: Option<&str>) -> u64 {
    use std::hash::BuildHasher;
    id.map_or(0, |id| {
        foldhash::fast::FixedState::default().hash_one(id) | 1
    })
}

/// A checkpointed fleet: the same fields, without the index rebuilt from the ids.
#[derive(Deserialize)]
struct FleetRecord {
    ids: Vec<Arc<str>>,
    vehicles: Vec<Option<Arc<str>>>,
    rated: Vec<f64>,
    histories: Vec<BatteryHistory>,
}

impl From<FleetRecord> for Fleet {
    fn from(r: FleetRecord) -> Self {
        let index = r
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| (CompactString::from(&**id), i as u32))
            .collect();
        Self {
            index,
            ids: r.ids,
            vehicle_hashes: r
                .vehicles
                .iter()
                .map(|v| vehicle_hash(v.as_deref()))
                .collect(),
            vehicles: r.vehicles,
            rated: r.rated,
            histories: r.histories,
        }
    }
}

impl Fleet {
    fn intern(&mut self, id: &str) -> u32 {
        if let Some(i) = self.index.get(id) {
            return *i;
        }
        let i = self.ids.len() as u32;
        self.index.insert(CompactString::from(id), i);
        self.ids.push(Arc::from(id));
        self.vehicles.push(None);
        self.vehicle_hashes.push(0);
        self.rated.push(0.0);
        self.histories.push(BatteryHistory::default());
        i
    }

    /// Records the battery's vehicle when it is new or changed.
    fn set_vehicle(&mut self, battery: u32, vehicle: &str) {
        let hash = vehicle_hash(Some(vehicle));
        let b = battery as usize;
        if self.vehicle_hashes[b] != hash {
            self.vehicle_hashes[b] = hash;
            self.vehicles[b] = Some(Arc::from(vehicle));
        }
    }

    pub fn get(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The window stage's whole state (what a checkpoint saves).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowState {
    pub fleet: Fleet,
    pub open: OpenWindows,
    /// Days before this one have closed.
    pub closed_before: Option<i32>,
    pub watermarks: Watermarks,
    pub stats: WindowStats,
}

pub struct DailyWindows {
    config: WindowConfig,
    aggregator: DailyAggregator,
    state: WindowState,
    /// The most recent close (for cross-checks and diagnostics).
    last_closed: Option<RecordBatch>,
}

fn day_of(t: EpochMillis) -> i32 {
    t.div_euclid(MILLIS_PER_DAY) as i32
}

impl DailyWindows {
    pub fn new(config: WindowConfig) -> Self {
        let watermarks = Watermarks::new(
            config.allowed_lateness_hours * 3_600_000,
            config.idle_partition_seconds * 1000,
        );
        let state = WindowState {
            fleet: Fleet::default(),
            open: OpenWindows::default(),
            closed_before: None,
            watermarks,
            stats: WindowStats::default(),
        };
        Self {
            config,
            aggregator: DailyAggregator::default(),
            state,
            last_closed: None,
        }
    }

    /// Resumes from a checkpointed state.
    pub fn from_state(config: WindowConfig, state: WindowState) -> Self {
        Self {
            config,
            aggregator: DailyAggregator::default(),
            state,
            last_closed: None,
        }
    }

    /// Trailing means of the most recent close, recomputed with DataFusion window
    /// functions: the definition the streaming computation must agree with.
    pub async fn last_close_means_sql(&self) -> Result<Vec<(f64, f64)>, WindowError> {
        match &self.last_closed {
            Some(closed) => {
                Ok(daily::rolling_means_sql(&self.aggregator, &self.state.fleet, closed).await?)
            }
            None => Ok(Vec::new()),
        }
    }

    pub fn state(&self) -> &WindowState {
        &self.state
    }

    pub fn stats(&self) -> &WindowStats {
        &self.state.stats
    }

    /// Takes in one micro-batch at wall time `now`.
    pub async fn apply(
        &mut self,
        batch: &MicroBatch,
        now: EpochMillis,
    ) -> Result<WindowOutput, WindowError> {
        let (keep, index, late) = self.screen(&batch.rows)?;
        let fresh = filter_record_batch(&with_battery_index(&batch.rows, index)?, &keep)
            .map_err(DataFusionError::from)?;
        for partial in self.aggregator.partials(fresh).await? {
            self.merge(&partial)?;
        }
        self.state
            .watermarks
            .observe(&batch.positions, &batch.assigned, now);
        let closed = match self.state.watermarks.advance(now) {
            // A day closes when the watermark passes its end.
            Some(w) => self.close_before(day_of(w + 1)).await?,
            None => None,
        };
        Ok(WindowOutput { closed, late })
    }

    /// Closes every open window (end of a finite input: a file replay or a test).
    pub async fn close_all(&mut self) -> Result<Option<RecordBatch>, WindowError> {
        match self.state.open.last_day() {
            Some(last) => self.close_before(last + 1).await,
            None => Ok(None),
        }
    }

    /// Splits a batch's rows into fresh ones (mask) and late ones (dead letters),
    /// registers fresh rows' event times in their windows so copies are recognised, and
    /// interns each row's battery (the index column DataFusion groups by).
    fn screen(
        &mut self,
        rows: &RecordBatch,
    ) -> Result<(BooleanArray, UInt32Array, Vec<DeadLetter>), WindowError> {
        let ids = column(rows, s::BATTERY_ID)?.as_string::<i32>();
        let vehicles = column(rows, s::VEHICLE_ID)?.as_string::<i32>();
        let times = column(rows, s::EVENT_TIME)?.as_primitive::<TimestampMillisecondType>();
        let st = &mut self.state;
        st.stats.rows_in += rows.num_rows() as u64;
        let mut keep = Vec::with_capacity(rows.num_rows());
        let mut index = Vec::with_capacity(rows.num_rows());
        let mut late = Vec::new();
        for i in 0..rows.num_rows() {
            let t = times.value(i);
            let day = day_of(t);
            if st.closed_before.is_some_and(|c| day < c) {
                st.stats.late += 1;
                late.push(late_letter(rows, i, st.closed_before.unwrap_or_default()));
                keep.push(false);
                index.push(0);
                continue;
            }
            let b = st.fleet.intern(ids.value(i));
            index.push(b);
            if vehicles.is_valid(i) {
                st.fleet.set_vehicle(b, vehicles.value(i));
            }
            let fleet_size = st.fleet.len();
            let fresh = st.open.day_mut(day).window(b, fleet_size).seen.insert(t);
            st.stats.duplicates += u64::from(!fresh);
            keep.push(fresh);
        }
        Ok((BooleanArray::from(keep), UInt32Array::from(index), late))
    }

    fn merge(&mut self, p: &RecordBatch) -> Result<(), WindowError> {
        let batteries = column(p, out::BATTERY)?.as_primitive::<UInt32Type>();
        let days = column(p, out::DAY)?.as_primitive::<Int64Type>();
        let trips = column(p, out::TRIPS)?.as_primitive::<Int64Type>();
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
        let st = &mut self.state;
        for i in 0..p.num_rows() {
            // screen() opened this window; the partial only fills it.
            let Some(w) = st.open.get_mut(days.value(i) as i32, batteries.value(i)) else {
                continue;
            };
            w.trips += trips.value(i);
            w.minutes += minutes.value(i);
            w.cycles += cycles.value(i);
            w.age_min = Some(w.age_min.map_or(age.value(i), |a| a.min(age.value(i))));
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

    /// Closes every open day before `day`, in day order.
    async fn close_before(&mut self, day: i32) -> Result<Option<RecordBatch>, WindowError> {
        let st = &mut self.state;
        if st.closed_before.is_some_and(|c| c >= day) {
            return Ok(None);
        }
        st.closed_before = Some(day);
        let mut closed = ClosedColumns::default();
        let mut values = Vec::new();
        while let Some(open_day) = st.open.pop_before(day) {
            for (b, w) in open_day.iter().filter(|(_, w)| w.reports > 0) {
                let bi = b as usize;
                st.fleet.rated[bi] = w.rated;
                let obs = ObservedDay {
                    day: open_day.day(),
                    cycles: w.cycles,
                    minutes: w.minutes,
                    trips: w.trips,
                    age: w.age_min.unwrap_or_default(),
                    reported_lifetime: w.lifetime_max,
                };
                values.clear();
                let history = &mut st.fleet.histories[bi];
                history.close_day(obs, self.config.retention_days, &mut values);
                for (j, v) in values.iter().enumerate() {
                    // The 7- and 30-day means, read off the history while the new days
                    // are its newest entries.
                    let end = history.len() - (values.len() - 1 - j).min(history.len());
                    let means = (history.mean_cycles(end, 7), history.mean_cycles(end, 30));
                    closed.push(b, v, w.rated, (!v.imputed).then_some(w), means);
                }
                st.stats.days_imputed += values.iter().filter(|v| v.imputed).count() as u64;
            }
            st.open.recycle(open_day);
        }
        st.stats.days_closed += closed.len() as u64;
        self.last_closed = closed.finish(&st.fleet);
        Ok(self.last_closed.clone())
    }
}

/// The batch with the interned battery index as an extra column.
fn with_battery_index(rows: &RecordBatch, index: UInt32Array) -> Result<RecordBatch, WindowError> {
    let mut fields = rows.schema().fields().to_vec();
    fields.push(Arc::new(Field::new(out::BATTERY, DataType::UInt32, false)));
    let mut columns = rows.columns().to_vec();
    columns.push(Arc::new(index));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| WindowError::DataFusion(e.into()))
}

fn column<'a>(
    batch: &'a RecordBatch,
    name: &'static str,
) -> Result<&'a Arc<dyn Array>, WindowError> {
    batch.column_by_name(name).ok_or(WindowError::Column(name))
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
        number_of_trips: i32_at(s::NUMBER_OF_TRIPS),
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
