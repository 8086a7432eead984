//! Per-(battery, UTC day) partial aggregates of one micro-batch, computed by DataFusion.
//!
//! Why DataFusion for a GROUP BY we could hand-write: the same engine then serves batch
//! scoring over Parquet archives and CSV history (`voltcast forecast`), so the stream and
//! the batch path share one definition of a day's aggregate.
//!
//! The query is planned and optimized once per thread that runs it at the same time, not
//! per batch: its source is a [`BatchSlot`] refilled with each micro-batch, and the
//! plans wait in the process's `Session` for whichever partition's aggregator runs
//! next. Planning per batch cost about a tenth of the window stage's time in profiles.
//!
//! Why the plan is driven by hand ([`drive_in_memory`]) rather than awaited: its input is
//! one batch already in memory, so it never waits for anything, yet DataFusion's
//! streams spend tokio's cooperative budget and answer `Pending` once the calling task
//! has used it up. The window stage runs inside the source's task, which spends that
//! budget on every message, so an awaited plan yielded at random and, driven by a plain
//! executor on a runtime thread, spun for ever: `voltcast run` stalled on its first
//! backlog. Outside the budget the plan completes in one poll.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};

use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::prelude::{SessionConfig, SessionContext, cast, col, lit};
use voltcast_ingest::schema as s;
use voltcast_ingest::time::MILLIS_PER_DAY;

/// Output column names.
pub mod out {
    /// The battery's key the window stage adds before aggregating: where its windows
    /// are and its interned index there (see [`super::battery_key`]).
    pub const BATTERY: &str = "battery_key";
    pub const DAY: &str = "day";
    pub const TRIPS: &str = "trips";
    pub const MINUTES: &str = "minutes";
    pub const CYCLES: &str = "cycles";
    pub const AGE: &str = "age";
    pub const LIFETIME: &str = "lifetime";
    pub const RATED: &str = "rated";
    pub const REPORTS: &str = "reports";
    /// Electrical readings: for each, `<name>_min`, `_max`, `_sum`, `_n`.
    pub const READINGS: [&str; 3] = [
        voltcast_ingest::schema::RESTING_VOLTAGE,
        voltcast_ingest::schema::STATE_OF_CHARGE,
        voltcast_ingest::schema::TEMPERATURE_C,
    ];
}

/// The telemetry columns the aggregation reads.
pub const INPUTS: [&str; 10] = [
    s::EVENT_TIME,
    s::NUMBER_OF_TRIPS,
    s::DAILY_TRIP_DURATION,
    s::DAILY_CYCLES_USED,
    s::BATTERY_AGE_DAYS,
    s::LIFETIME_CYCLES_USED,
    s::BATTERY_RATED_CYCLES,
    s::RESTING_VOLTAGE,
    s::STATE_OF_CHARGE,
    s::TEMPERATURE_C,
];

pub struct DailyAggregator {
    session: &'static Session,
    /// Polls spent driving plans, and plans driven: one poll each unless something
    /// made the plan wait (see [`drive_in_memory`]).
    work: AggregateWork,
}

/// How much polling the aggregation took: the regression guard for the backlog stall.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AggregateWork {
    /// Plans made and plans run (each counts once).
    pub plans_run: u64,
    pub polls: u64,
}

impl std::iter::Sum for AggregateWork {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| Self {
            plans_run: a.plans_run + b.plans_run,
            polls: a.polls + b.polls,
        })
    }
}

struct Planned {
    plan: Arc<dyn ExecutionPlan>,
    slot: Arc<BatchSlot>,
}

/// The cached plan's source: yields the batch put in it, once.
#[derive(Debug)]
struct BatchSlot {
    schema: SchemaRef,
    next: Mutex<Option<RecordBatch>>,
}

impl BatchSlot {
    fn put(&self, batch: Option<RecordBatch>) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = batch;
    }
}

impl PartitionStream for BatchSlot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = self.next.lock().unwrap_or_else(|e| e.into_inner()).take();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batch.into_iter().map(Ok)),
        ))
    }
}

/// The DataFusion session every aggregator plans and runs in, with the task context its
/// runs share and the plans not being run. Why one for the process: there is an
/// aggregator per window shard of every partition (the stream aggregates a batch's
/// partitions together, but a partition's own close and tools use theirs), and their
/// sessions' function registries took 15 MB with 1,400 partitions (heaptrack); a task
/// context made per run (`SessionContext::task_ctx`) copies those registries each
/// time; and a plan cached per aggregator took another 23 MB (about 8 KB a plan),
/// although only as many run at once as there are threads running them.
struct Session {
    ctx: SessionContext,
    task: Arc<TaskContext>,
    idle: Mutex<Vec<Planned>>,
}

/// Idle plans a session keeps: more than the threads that run shards at once, so a
/// plan is made only when a new schema comes (tests) or the pool was empty.
const IDLE_PLANS: usize = 16;

impl Session {
    fn new() -> Self {
        // One partition: a micro-batch is small, and repartitioning it across two cores
        // costs more than it saves; parallelism comes from the pipeline's stages instead.
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(1 << 16);
        let ctx = SessionContext::new_with_config(config);
        let task = ctx.task_ctx();
        Self {
            ctx,
            task,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Planned>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle plan for batches of `schema`, taken out of the pool.
    fn take_plan(&self, schema: &SchemaRef) -> Option<Planned> {
        let mut idle = self.idle();
        let at = idle.iter().position(|p| p.slot.schema == *schema)?;
        Some(idle.swap_remove(at))
    }

    /// Puts a plan back for the next run, the oldest dropped when the pool is full.
    fn give_back(&self, planned: Planned) {
        let mut idle = self.idle();
        if idle.len() >= IDLE_PLANS {
            idle.remove(0);
        }
        idle.push(planned);
    }

    /// Plans waiting in the pool.
    #[cfg(test)]
    fn idle_plans(&self) -> usize {
        self.idle().len()
    }
}

/// The process's session.
fn session() -> &'static Session {
    static SESSION: OnceLock<Session> = OnceLock::new();
    SESSION.get_or_init(Session::new)
}

impl Default for DailyAggregator {
    fn default() -> Self {
        Self::in_session(session())
    }
}

impl DailyAggregator {
    /// Groups deduplicated telemetry rows (with the window stage's `battery_key`
    /// column) by battery and UTC day.
    ///
    /// Synchronous: the plan reads memory only (see the module documentation).
    pub fn partials(&mut self, rows: RecordBatch) -> Result<Vec<RecordBatch>> {
        if rows.num_rows() == 0 {
            return Ok(Vec::new());
        }
        let schema = rows.schema();
        let planned = match self.session.take_plan(&schema) {
            Some(planned) => planned,
            None => drive_in_memory(plan(&self.session.ctx, schema), &mut self.work)??,
        };
        let partials = self.run(&planned, rows);
        // Emptied whatever happened, so an idle plan holds no batch.
        planned.slot.put(None);
        self.session.give_back(planned);
        partials
    }

    fn run(&mut self, planned: &Planned, rows: RecordBatch) -> Result<Vec<RecordBatch>> {
        planned.slot.put(Some(rows));
        // A fresh copy of the plan for each run: every execution registers its metrics
        // (a few hundred bytes) in the plan it runs, so the cached plan itself, run
        // for as long as the service lives, grew without end: 180 MB after 270,000
        // runs at 100,000 x 730 through Kafka. The copy shares the slot and costs a few
        // small allocations per node, not a new plan.
        let run = reset_plan_states(planned.plan.clone())?;
        let collect = datafusion::physical_plan::collect(run, self.session.task.clone());
        drive_in_memory(collect, &mut self.work)?
    }

    /// An aggregator planning and running in `session` (tests give it one of its own).
    fn in_session(session: &'static Session) -> Self {
        Self {
            session,
            work: AggregateWork::default(),
        }
    }

    /// Polls spent so far, and plans driven.
    pub fn work(&self) -> AggregateWork {
        self.work
    }
}

/// The key a battery's rows are aggregated under: the slot its windows are in (a shard
/// of a partition, numbered across the partitions aggregated together) and its interned
/// index there. Why one key of both: a micro-batch of many partitions is aggregated in
/// one run, and a 64-bit key groups as fast as the 32-bit index did alone.
pub fn battery_key(slot: u32, battery: u32) -> u64 {
    (u64::from(slot) << 32) | u64::from(battery)
}

/// The slot and the battery index of a [`battery_key`].
pub fn split_key(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// Plans the aggregation over a slot of batches in `schema`.
async fn plan(ctx: &SessionContext, schema: SchemaRef) -> Result<Planned> {
    let slot = Arc::new(BatchSlot {
        schema: schema.clone(),
        next: Mutex::new(None),
    });
    let table = StreamingTable::try_new(schema, vec![slot.clone() as Arc<dyn PartitionStream>])?;
    let day = (cast(col(s::EVENT_TIME), DataType::Int64) / lit(MILLIS_PER_DAY)).alias(out::DAY);
    let mut aggregates = vec![
        sum(col(s::NUMBER_OF_TRIPS)).alias(out::TRIPS),
        sum(col(s::DAILY_TRIP_DURATION)).alias(out::MINUTES),
        sum(col(s::DAILY_CYCLES_USED)).alias(out::CYCLES),
        min(col(s::BATTERY_AGE_DAYS)).alias(out::AGE),
        max(col(s::LIFETIME_CYCLES_USED)).alias(out::LIFETIME),
        max(col(s::BATTERY_RATED_CYCLES)).alias(out::RATED),
        count(lit(1)).alias(out::REPORTS),
    ];
    for r in out::READINGS {
        aggregates.push(min(col(r)).alias(format!("{r}_min")));
        aggregates.push(max(col(r)).alias(format!("{r}_max")));
        aggregates.push(sum(col(r)).alias(format!("{r}_sum")));
        aggregates.push(count(col(r)).alias(format!("{r}_n")));
    }
    let plan = ctx
        .read_table(Arc::new(table))?
        .aggregate(vec![col(out::BATTERY), day], aggregates)?
        .create_physical_plan()
        .await?;
    Ok(Planned { plan, slot })
}

/// A plan over in-memory batches that is still `Pending` after this many polls waits
/// on something it should not (a spawned task, I/O): an error, never a spin.
const MAX_POLLS: u64 = 64;

/// Runs `work`, which reads memory only, to completion on this thread, outside tokio's
/// cooperative budget (whichever task or thread calls it, and however much budget
/// that task has spent).
fn drive_in_memory<F: Future>(work: F, tally: &mut AggregateWork) -> Result<F::Output> {
    let mut work = pin!(tokio::task::coop::unconstrained(work));
    let mut cx = Context::from_waker(Waker::noop());
    tally.plans_run += 1;
    for _ in 0..MAX_POLLS {
        tally.polls += 1;
        if let Poll::Ready(out) = work.as_mut().poll(&mut cx) {
            return Ok(out);
        }
    }
    Err(DataFusionError::Internal(format!(
        "the day aggregation over an in-memory batch was still waiting after {MAX_POLLS} polls"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::UInt64Array;
    use voltcast_ingest::{TelemetryBatchBuilder, TelemetryRecord};

    /// One battery's report on `day`, with the battery index the window stage adds.
    fn input(day: i64) -> RecordBatch {
        let mut b = TelemetryBatchBuilder::with_capacity(1);
        b.append(&TelemetryRecord {
            battery_id: "b1".into(),
            vehicle_id: None,
            event_time: day * MILLIS_PER_DAY + 3_600_000,
            battery_age_days: 10 + day,
            number_of_trips: 2.0,
            daily_trip_duration: 30.0,
            daily_cycles_used: 1.0,
            lifetime_cycles_used: 10.0 + day as f64,
            battery_rated_cycles: 1000.0,
            resting_voltage: Some(3.7),
            state_of_charge: None,
            temperature_c: Some(20.0),
        });
        let key = UInt64Array::from(vec![battery_key(0, 0)]);
        crate::windows::shard::aggregate_input(&b.finish(), key).unwrap()
    }

    /// A session of the test's own, so tests running beside it share no plans.
    fn private_session() -> &'static Session {
        Box::leak(Box::new(Session::new()))
    }

    fn metrics_held(session: &Session) -> usize {
        let idle = session.idle();
        let mut held = 0;
        let mut plans: Vec<_> = idle.iter().map(|p| p.plan.clone()).collect();
        while let Some(plan) = plans.pop() {
            held += plan.metrics().map_or(0, |m| m.iter().count());
            plans.extend(plan.children().into_iter().cloned());
        }
        held
    }

    /// The cached plan runs once per micro-batch for as long as the service lives:
    /// nothing of a run may stay behind in it.
    #[test]
    fn running_the_cached_plan_again_and_again_leaves_nothing_in_it() {
        let session = private_session();
        let mut aggregator = DailyAggregator::in_session(session);
        let first = aggregator.partials(input(0)).unwrap();
        assert_eq!(first.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
        let after_one = metrics_held(session);
        for day in 1..50 {
            let partials = aggregator.partials(input(day)).unwrap();
            let days = partials[0].column_by_name(out::DAY).unwrap();
            assert_eq!(days.len(), 1, "one battery-day per run");
        }
        assert_eq!(metrics_held(session), after_one);
        assert_eq!(aggregator.work().plans_run, 51, "one plan made, fifty run");
    }

    /// An instance owning many partitions has an aggregator per shard of each: they
    /// take turns with the session's plans rather than keep one each (8 KB apiece).
    #[test]
    fn aggregators_of_many_partitions_share_the_plans() {
        let session = private_session();
        let mut aggregators: Vec<_> = (0..100)
            .map(|_| DailyAggregator::in_session(session))
            .collect();
        for (day, aggregator) in aggregators.iter_mut().enumerate() {
            let partials = aggregator.partials(input(day as i64)).unwrap();
            assert_eq!(partials.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
        }
        assert_eq!(session.idle_plans(), 1, "one plan, taken in turn");
        let made = aggregators.iter().map(|a| a.work().plans_run).sum::<u64>() - 100;
        assert_eq!(made, 1, "planned once for a hundred aggregators");
        let slot_empty = session.idle()[0].slot.next.lock().unwrap().is_none();
        assert!(slot_empty, "an idle plan holds no batch");
    }
}
