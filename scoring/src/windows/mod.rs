//! Streaming daily windows: the reference's cleansing, continuously and in event time.
//!
//! Per micro-batch:
//! 1. each row is checked against the open day windows: a row for a day that has closed
//!    is `late` (dead-lettered); a row whose (battery, event time) was already counted is
//!    an exact duplicate (counted once, however many batches apart the copies arrive);
//! 2. DataFusion aggregates the remaining rows per (battery, UTC day) into partials, which
//!    merge into the open windows (12-hourly reports become one day); the stream does
//!    this once for all the partitions of a micro-batch ([`DayPartials::aggregate`]);
//! 3. the watermark advances (per source partition, see [`watermark`]) and every day
//!    window whose end it has passed closes: the day is appended to its battery's
//!    [`BatteryHistory`], missing days before it are interpolated, and the closed days
//!    leave as one Arrow batch with 7- and 30-day rolling means (DataFusion window
//!    functions).
//!
//! Steps 1, 2 and the closing in 3 are per battery, so batteries are split into
//! [`shard`]s that run on their own cores; only the watermark is shared.

pub mod aggregate;
pub mod daily;
pub mod fleet;
pub mod history;
pub mod open;
pub mod shard;
pub mod watermark;

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::TimestampMillisecondType;
use datafusion::error::DataFusionError;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use voltcast_ingest::dead_letter::DeadLetter;
use voltcast_ingest::time::{EpochMillis, MILLIS_PER_DAY};
use voltcast_ingest::{MicroBatch, SourcePosition, schema};

pub use aggregate::DailyAggregator;
pub use daily::daily_schema;
pub use fleet::{BatteryView, Fleet};
pub use history::{BatteryHistory, PackedDays};
pub use open::OpenWindows;
pub use shard::ShardState;
pub use watermark::Watermarks;

use shard::{ClosedRows, RowClock, ScreenedRows, ShardOutput, ShardTask, route};

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
    /// Batteries are split into this many shards, each worked on its own thread;
    /// 0: one per core.
    pub shards: usize,
}

impl WindowConfig {
    /// The shard count `shards` stands for on this machine.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            allowed_lateness_hours: 36,
            idle_partition_seconds: 60,
            retention_days: 730,
            shards: 0,
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
///
/// A fleet keeps two or three days of these open, one per battery per day, so the
/// layout is kept tight (168 bytes): sentinels instead of `Option` tags and a boxed
/// overflow for the rare extra reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DayPartial {
    pub trips: f64,
    pub minutes: f64,
    pub cycles: f64,
    pub lifetime_max: f64,
    pub rated: f64,
    pub readings: [ReadingStats; 3],
    /// The day's youngest reported age; [`NO_AGE`] until a report merges.
    pub age_min: i32,
    pub reports: u32,
    /// Event times already counted: the dedupe key within the day.
    pub seen: SeenTimes,
}

/// `DayPartial::age_min` before any report.
pub const NO_AGE: i32 = i32::MAX;

impl Default for DayPartial {
    fn default() -> Self {
        Self {
            trips: 0.0,
            minutes: 0.0,
            cycles: 0.0,
            lifetime_max: 0.0,
            rated: 0.0,
            readings: Default::default(),
            age_min: NO_AGE,
            reports: 0,
            seen: SeenTimes::default(),
        }
    }
}

/// The event times of a window's reports. A day has one report, or two when the car
/// reports 12-hourly: those live inline, so opening a window allocates nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeenTimes {
    /// [`SeenTimes::EMPTY`] marks a free slot.
    inline: [EpochMillis; 2],
    #[expect(
        clippy::box_collection,
        reason = "a thin pointer: a third report in a day is rare, and an unboxed Vec \
                  would add 16 bytes to every open window"
    )]
    spill: Option<Box<Vec<EpochMillis>>>,
}

impl Default for SeenTimes {
    fn default() -> Self {
        Self {
            inline: [Self::EMPTY; 2],
            spill: None,
        }
    }
}

impl SeenTimes {
    /// No parsed timestamp is this far in the past; one that is still takes the spill.
    const EMPTY: EpochMillis = EpochMillis::MIN;

    /// Records `t`; false when it was already there.
    pub fn insert(&mut self, t: EpochMillis) -> bool {
        let spilled = self.spill.as_deref();
        if (t != Self::EMPTY && self.inline.contains(&t)) || spilled.is_some_and(|s| s.contains(&t))
        {
            return false;
        }
        match self.inline.iter_mut().find(|slot| **slot == Self::EMPTY) {
            Some(slot) if t != Self::EMPTY => *slot = t,
            _ => self.spill.get_or_insert_default().push(t),
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
    /// Batteries forgotten after `retention_days` without a report.
    pub evicted: u64,
}

impl WindowStats {
    pub fn add(&mut self, o: &WindowStats) {
        self.rows_in += o.rows_in;
        self.duplicates += o.duplicates;
        self.late += o.late;
        self.days_closed += o.days_closed;
        self.days_imputed += o.days_imputed;
        self.evicted += o.evicted;
    }
}

/// What one micro-batch produced.
#[derive(Debug, Default)]
pub struct WindowOutput {
    /// Days closed by this batch (schema [`daily_schema`]): a batch per shard that
    /// closed any, as joining them would copy every closed day once more.
    pub closed: Vec<RecordBatch>,
    /// Rows for days that had already closed.
    pub late: Vec<DeadLetter>,
    /// Batteries forgotten (silent past the retention): their models, alert episodes and
    /// latest assessments go too.
    pub evicted: Vec<Arc<str>>,
}

/// One partition's rows of a micro-batch after [`DailyWindows::screen_partition`],
/// waiting for their day aggregation.
pub struct ScreenedPartition {
    /// Per shard of the partition's windows.
    shards: Vec<ScreenedRows>,
    /// What closes once the rows are in.
    closing: shard::Closing,
}

/// One partition's share of a day aggregation run over several partitions' rows: the
/// partial batches (shared by the partitions of the run) and, per shard of the
/// partition, the (batch, row) pairs of them that are its.
#[derive(Debug, Clone)]
pub struct DayPartials {
    batches: Arc<[RecordBatch]>,
    rows: Vec<Vec<(u32, u32)>>,
}

impl DayPartials {
    /// Aggregates the fresh rows of several partitions of a micro-batch in one
    /// DataFusion run: `parts` are each partition's screening and where its rows start
    /// in `rows` (the micro-batch's rows, partitions one after another). Returns each
    /// partition's partials, in `parts`' order.
    ///
    /// Why one run: a backlog spread over many partitions gives each only tens of rows
    /// per micro-batch, and a run per partition (hash table, accumulators, a copy of the
    /// plan) cost more than its rows: at 10,000 batteries x 730 days over 1,400
    /// partitions, 30,919 runs took the window stage 11.9 CPU s against 5.8 with 140.
    pub fn aggregate(
        aggregator: &mut DailyAggregator,
        rows: &RecordBatch,
        parts: &[(usize, &ScreenedPartition)],
    ) -> Result<Vec<DayPartials>, WindowError> {
        // A slot per shard of each part, one part after another.
        let slots: Vec<_> = parts
            .iter()
            .flat_map(|(start, part)| part.shards.iter().map(move |s| (*start, s)))
            .collect();
        let all = shard::aggregate_slots(aggregator, rows, &slots)?;
        let mut by_slot = all.rows.into_iter();
        let partials = parts.iter().map(|(_, part)| DayPartials {
            batches: all.batches.clone(),
            rows: by_slot.by_ref().take(part.shards.len()).collect(),
        });
        Ok(partials.collect())
    }
}

#[derive(Debug, Error)]
pub enum WindowError {
    #[error("DataFusion: {0}")]
    DataFusion(#[from] DataFusionError),
    #[error("micro-batch lacks column {0}")]
    Column(&'static str),
}

/// What the window state holds in memory, in bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct StateFootprint {
    pub histories: usize,
    /// Ids, vehicles, the id index and ratings.
    pub fleet: usize,
    /// Open day windows, with the emptied days kept for reuse.
    pub open_windows: usize,
}

/// The window stage's whole state (what a checkpoint saves).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowState {
    /// Batteries by [`shard::route`] of their id.
    pub shards: Vec<ShardState>,
    /// Days before this one have closed.
    pub closed_before: Option<i32>,
    pub watermarks: Watermarks,
    /// The event time a quorum of the partition's batteries has reached (the stream's
    /// windows hold one partition): what moves its watermark.
    pub quorum: watermark::Quorum,
    pub stats: WindowStats,
}

impl WindowState {
    pub fn battery_count(&self) -> usize {
        self.shards.iter().map(|s| s.fleet.live()).sum()
    }

    /// Bytes held, by part.
    pub fn footprint(&self) -> StateFootprint {
        let mut f = StateFootprint::default();
        for shard in &self.shards {
            f.histories += shard
                .fleet
                .histories
                .iter()
                .map(BatteryHistory::footprint)
                .sum::<usize>();
            f.fleet += shard.fleet.footprint();
            f.open_windows += shard.open.footprint();
        }
        f
    }

    /// Every battery, shard by shard.
    pub fn batteries(&self) -> impl Iterator<Item = BatteryView<'_>> {
        self.shards.iter().flat_map(|s| s.fleet.iter())
    }

    pub fn battery(&self, id: &str) -> Option<BatteryView<'_>> {
        let fleet = &self.shards.get(route(id, self.shards.len()))?.fleet;
        fleet.view(fleet.get(id)? as usize)
    }

    /// The same batteries and open windows in `n` shards (a checkpoint written with
    /// another shard count).
    fn reshard(self, n: usize) -> Self {
        let n = n.max(1);
        if self.shards.len() == n {
            return self;
        }
        let mut shards = vec![ShardState::default(); n];
        for old in self.shards {
            let mut moved = Vec::with_capacity(old.fleet.len());
            let mut fleet = old.fleet;
            for i in 0..fleet.len() {
                if !fleet.is_live(i) {
                    moved.push((0, u32::MAX));
                    continue;
                }
                let id = fleet.ids[i].clone();
                let to = route(&id, n);
                let b = shards[to].fleet.adopt(&mut fleet, i);
                moved.push((to, b));
            }
            for day in old.open.days() {
                for (b, w) in day.iter() {
                    let (to, nb) = moved[b as usize];
                    let size = shards[to].fleet.len();
                    *shards[to].open.day_mut(day.day()).window(nb, size) = w.clone();
                }
            }
        }
        Self { shards, ..self }
    }
}

pub struct DailyWindows {
    config: WindowConfig,
    state: WindowState,
    /// One per shard.
    aggregators: Vec<DailyAggregator>,
}

/// Below this many rows a batch is not worth a thread: shards run one after another.
const PARALLEL_MIN_ROWS: usize = 4_096;

fn day_of(t: EpochMillis) -> i32 {
    t.div_euclid(MILLIS_PER_DAY) as i32
}

fn column<'a>(
    batch: &'a RecordBatch,
    name: &'static str,
) -> Result<&'a Arc<dyn Array>, WindowError> {
    batch.column_by_name(name).ok_or(WindowError::Column(name))
}

impl DailyWindows {
    pub fn new(config: WindowConfig) -> Self {
        let watermarks = Watermarks::new(
            config.allowed_lateness_hours * 3_600_000,
            config.idle_partition_seconds * 1000,
        );
        let state = WindowState {
            shards: vec![ShardState::default(); config.shard_count()],
            closed_before: None,
            watermarks,
            quorum: watermark::Quorum::default(),
            stats: WindowStats::default(),
        };
        Self::from_state(config, state)
    }

    /// Resumes from a checkpointed state (re-split when the shard count changed).
    pub fn from_state(config: WindowConfig, state: WindowState) -> Self {
        let state = state.reshard(config.shard_count());
        let aggregators = state
            .shards
            .iter()
            .map(|_| DailyAggregator::default())
            .collect();
        Self {
            config,
            state,
            aggregators,
        }
    }

    /// Trailing means of the days in `closed` (a closed-day batch this stage emitted),
    /// recomputed with DataFusion window functions: the definition the streaming
    /// computation must agree with.
    pub async fn rolling_means_sql(
        &self,
        closed: &RecordBatch,
    ) -> Result<Vec<(f64, f64)>, WindowError> {
        let history = |id: &str| self.state.battery(id).map(|b| b.history);
        // A session of its own: the query registers a table by name.
        let ctx = datafusion::prelude::SessionContext::new();
        Ok(daily::rolling_means_sql(&ctx, &history, closed).await?)
    }

    pub fn state(&self) -> &WindowState {
        &self.state
    }

    pub fn into_state(self) -> WindowState {
        self.state
    }

    pub fn config(&self) -> &WindowConfig {
        &self.config
    }

    pub fn stats(&self) -> &WindowStats {
        &self.state.stats
    }

    /// Polls the shards' DataFusion plans took, and plans run: equal unless a plan had
    /// to wait, which an in-memory aggregation never should.
    pub fn aggregate_work(&self) -> aggregate::AggregateWork {
        self.aggregators.iter().map(DailyAggregator::work).sum()
    }

    /// Takes in one micro-batch at wall time `now`.
    ///
    /// Synchronous: the stage is CPU work on memory and never waits (see
    /// [`aggregate`] for why its DataFusion plan is not awaited).
    pub fn apply(
        &mut self,
        batch: &MicroBatch,
        now: EpochMillis,
    ) -> Result<WindowOutput, WindowError> {
        // Rows are judged against the days closed before this batch; the days its
        // positions push the watermark past close after its rows are in.
        let late_before = self.state.closed_before;
        let st = &mut self.state;
        st.watermarks
            .observe(&batch.positions, &batch.assigned, now);
        // A day closes when the watermark passes its end.
        let close = st.watermarks.advance(now).map(|w| day_of(w + 1));
        self.run(&batch.rows, late_before, close, None, ClosedRows::Emit)
    }

    /// Takes in one partition's rows of a micro-batch, in offset order, with how far the
    /// partition got: the windows hold that one partition's batteries (see
    /// [`crate::partition`]), so its own event times alone move the watermark, and
    /// each row is judged late or not by the rows before it.
    pub fn apply_partition(
        &mut self,
        rows: &RecordBatch,
        position: &voltcast_ingest::SourcePosition,
        now: EpochMillis,
    ) -> Result<WindowOutput, WindowError> {
        let screened = self.screen_partition(rows, position, now)?;
        let partials = self.aggregate_alone(rows, &screened)?;
        self.finish_partition(screened, &partials)
    }

    /// The day aggregation of one partition's screened `rows` by themselves.
    pub fn aggregate_alone(
        &mut self,
        rows: &RecordBatch,
        screened: &ScreenedPartition,
    ) -> Result<DayPartials, WindowError> {
        let aggregator = &mut self.aggregators[0];
        let mut partials = DayPartials::aggregate(aggregator, rows, &[(0, screened)])?;
        Ok(partials.remove(0))
    }

    /// [`Self::apply_partition`]'s first step: the partition's clock and watermark move
    /// over the rows, late rows and duplicates are set aside, and the fresh ones are
    /// interned. Its rows then go through the day aggregation with other partitions'
    /// ([`DayPartials::aggregate`]) before [`Self::finish_partition`] takes in the sums.
    pub fn screen_partition(
        &mut self,
        rows: &RecordBatch,
        position: &voltcast_ingest::SourcePosition,
        now: EpochMillis,
    ) -> Result<ScreenedPartition, WindowError> {
        let late_before = self.state.closed_before;
        let st = &mut self.state;
        let clock = RowClock {
            lateness_ms: self.config.allowed_lateness_hours * 3_600_000,
            watermark: st.watermarks.current(),
            quorum: st.quorum,
        };
        // Where the rows take the quorum (the row clock retraces it row by row): the
        // partition's event time, rather than its single latest row.
        if rows.num_rows() > 0 {
            let ids = column(rows, schema::BATTERY_ID)?.as_string::<i32>();
            let times =
                column(rows, schema::EVENT_TIME)?.as_primitive::<TimestampMillisecondType>();
            for (id, t) in ids.iter().zip(times.values()) {
                if st.quorum.takes(*t) {
                    st.quorum
                        .observe(shard::id_hash(id.unwrap_or_default()), *t);
                }
            }
        }
        let position = SourcePosition {
            max_event_time: st.quorum.time(),
            ..position.clone()
        };
        st.watermarks
            .observe(std::slice::from_ref(&position), &[], now);
        let close = st.watermarks.advance(now).map(|w| day_of(w + 1));
        let close = close.filter(|d| late_before.is_none_or(|c| *d > c));
        let tasks = self.shard_tasks(rows, late_before, close, Some(clock), ClosedRows::Emit);
        let shards = self
            .state
            .shards
            .iter_mut()
            .zip(&tasks)
            .map(|(shard, task)| shard.screen(task))
            .collect::<Result<_, _>>()?;
        Ok(ScreenedPartition {
            shards,
            closing: tasks[0].closing,
        })
    }

    /// [`Self::apply_partition`]'s last step: the day partials of the partition's
    /// screened rows merge into its open windows, and the days its watermark has passed
    /// close.
    pub fn finish_partition(
        &mut self,
        screened: ScreenedPartition,
        partials: &DayPartials,
    ) -> Result<WindowOutput, WindowError> {
        let closing = screened.closing;
        let mut outputs = Vec::with_capacity(screened.shards.len());
        let shards = self.state.shards.iter_mut();
        for ((shard, screened), rows) in shards.zip(screened.shards).zip(&partials.rows) {
            shard.merge(&partials.batches, rows)?;
            outputs.push(Ok(shard.close(&closing, screened.output)));
        }
        if closing.before.is_some() {
            self.state.closed_before = closing.before;
        }
        self.combine(outputs)
    }

    /// Closes every open window (end of a finite input: a file replay or a test).
    pub fn close_all(&mut self) -> Result<Vec<RecordBatch>, WindowError> {
        Ok(self.close_all_output()?.closed)
    }

    /// [`Self::close_all`], with what else closing did (batteries evicted).
    pub fn close_all_output(&mut self) -> Result<WindowOutput, WindowError> {
        self.close_through_last(ClosedRows::Emit)
    }

    /// Closes every open day into the batteries' histories without making the closed-day
    /// rows: batch scoring reads only the histories, and the rows of a whole input's days
    /// (every battery id copied into each) were a sixth of its cleansing.
    pub fn close_all_into_histories(&mut self) -> Result<(), WindowError> {
        self.close_through_last(ClosedRows::Skip).map(|_| ())
    }

    fn close_through_last(&mut self, closed_rows: ClosedRows) -> Result<WindowOutput, WindowError> {
        let last = self
            .state
            .shards
            .iter()
            .filter_map(|s| s.open.last_day())
            .max();
        let Some(last) = last else {
            return Ok(WindowOutput::default());
        };
        let empty = RecordBatch::new_empty(voltcast_ingest::schema::telemetry_schema());
        let late_before = self.state.closed_before;
        self.run(&empty, late_before, Some(last + 1), None, closed_rows)
    }

    /// Closes the oldest open day, if any is open. The end of a finite input closes its
    /// days one at a time, so that one day's assessments are carried out before the next
    /// day's are made: closing the last days of 100,000 batteries at once held them all.
    pub fn close_oldest_output(&mut self) -> Result<Option<WindowOutput>, WindowError> {
        let oldest = self
            .state
            .shards
            .iter()
            .filter_map(|s| s.open.first_day())
            .min();
        let Some(oldest) = oldest else {
            return Ok(None);
        };
        let empty = RecordBatch::new_empty(voltcast_ingest::schema::telemetry_schema());
        let late_before = self.state.closed_before;
        self.run(
            &empty,
            late_before,
            Some(oldest + 1),
            None,
            ClosedRows::Emit,
        )
        .map(Some)
    }

    fn run(
        &mut self,
        rows: &RecordBatch,
        late_before: Option<i32>,
        close: Option<i32>,
        row_clock: Option<RowClock>,
        closed_rows: ClosedRows,
    ) -> Result<WindowOutput, WindowError> {
        let close = close.filter(|d| late_before.is_none_or(|c| *d > c));
        let tasks = self.shard_tasks(rows, late_before, close, row_clock, closed_rows);
        let shards = tasks.len();
        let work = self
            .state
            .shards
            .iter_mut()
            .zip(&mut self.aggregators)
            .zip(&tasks);
        let outputs: Vec<Result<ShardOutput, WindowError>> =
            if shards == 1 || rows.num_rows() < PARALLEL_MIN_ROWS {
                work.map(|((shard, aggregator), task)| shard.run(aggregator, task))
                    .collect()
            } else {
                in_parallel(work)
            };
        if close.is_some() {
            self.state.closed_before = close;
        }
        self.combine(outputs)
    }

    /// What each shard is to do with `rows`.
    fn shard_tasks<'a>(
        &self,
        rows: &'a RecordBatch,
        late_before: Option<i32>,
        close: Option<i32>,
        row_clock: Option<RowClock>,
        closed_rows: ClosedRows,
    ) -> Vec<ShardTask<'a>> {
        let shards = self.state.shards.len();
        (0..shards)
            .map(|shard| ShardTask {
                rows,
                shard,
                shards,
                closed_before: late_before,
                row_clock,
                closing: shard::Closing {
                    before: close,
                    retention_days: self.config.retention_days,
                    rows: closed_rows,
                },
            })
            .collect()
    }

    fn combine(
        &mut self,
        outputs: Vec<Result<ShardOutput, WindowError>>,
    ) -> Result<WindowOutput, WindowError> {
        let mut out = WindowOutput::default();
        for output in outputs {
            let output = output?;
            self.state.stats.add(&output.stats);
            out.late.extend(output.late);
            out.closed.extend(output.closed);
            out.evicted.extend(output.evicted);
        }
        Ok(out)
    }
}

/// Runs each shard's task on its own thread (the first on this one).
fn in_parallel<'a>(
    work: impl Iterator<
        Item = (
            (&'a mut ShardState, &'a mut DailyAggregator),
            &'a ShardTask<'a>,
        ),
    >,
) -> Vec<Result<ShardOutput, WindowError>> {
    std::thread::scope(|scope| {
        let mut work = work;
        let first = work.next();
        let others: Vec<_> = work
            .map(|((shard, aggregator), task)| scope.spawn(move || shard.run(aggregator, task)))
            .collect();
        let mut outputs: Vec<_> = first
            .map(|((shard, aggregator), task)| shard.run(aggregator, task))
            .into_iter()
            .collect();
        outputs.extend(
            others
                .into_iter()
                .map(|h| h.join().expect("window shard thread panicked")),
        );
        outputs
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_times_count_each_time_once_past_the_inline_two() {
        let mut seen = SeenTimes::default();
        for t in [10, 20, 30, 40] {
            assert!(seen.insert(t), "{t} is new");
        }
        for t in [10, 20, 30, 40] {
            assert!(!seen.insert(t), "{t} was seen");
        }
        // The sentinel itself is a time like any other, kept in the spill.
        assert!(seen.insert(SeenTimes::EMPTY));
        assert!(!seen.insert(SeenTimes::EMPTY));
        let mut fresh = SeenTimes::default();
        assert!(fresh.insert(SeenTimes::EMPTY));
        assert!(!fresh.insert(SeenTimes::EMPTY));
        assert!(fresh.insert(5) && !fresh.insert(5));
    }

    #[test]
    fn an_open_window_stays_small() {
        // Two or three of these per battery are open at any time.
        assert!(std::mem::size_of::<DayPartial>() <= 168);
    }
}
