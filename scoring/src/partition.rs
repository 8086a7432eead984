//! The Kafka partition is the unit of state, parallelism and checkpoint.
//!
//! Telemetry is keyed by battery, so a battery lives in one partition. A
//! [`PartitionTask`] owns everything the stream remembers about its partition's
//! batteries: open day windows and the partition's watermark, histories, forecast models,
//! alert episodes, and the next offset. It is checkpointed as one object
//! ([`crate::checkpoint`]) and moves with the partition on a rebalance: the consumer
//! group is the distributed engine, as Kafka Streams' tasks are.
//!
//! Every decision a task makes comes from its own state and its partition's records in
//! offset order, never from wall time or from another partition: after a crash, a replay
//! from the checkpoint repeats the same closed days, the same model updates and the same
//! alert decisions with the same ids.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use datafusion::arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use voltcast_ingest::dead_letter::DeadLetter;
use voltcast_ingest::time::EpochMillis;
use voltcast_ingest::{PartitionId, PartitionListener, SourcePosition};

use crate::alerts::policy::{Episodes, EpisodesRef};
use crate::alerts::{AlertConfig, Decision, EpisodePolicy, PendingAck};
use crate::archive::{ParquetArchive, PartitionArchive};
use crate::checkpoint::{CheckpointError, CheckpointStore, PartitionKey};
use crate::error::ScoringError;
use crate::forecasting::{BatteryModels, ForecastSettings, ForecastStats, RiskUpdate};
use crate::memory::on_cpu;
use crate::metrics::Metrics;
use crate::windows::{DailyWindows, DayPartials, ScreenedPartition, WindowConfig, WindowState};

/// What every task of a run shares: how windows, forecasts and alerts behave.
#[derive(Debug, Clone)]
pub struct PartitionSettings {
    pub windows: WindowConfig,
    /// None: the day windows only (tools and tests of the windows alone).
    pub forecast: Option<ForecastSettings>,
    pub alerts: AlertConfig,
    /// Raw rows and closed days to Parquet, committed with each checkpoint.
    pub archive: Option<ParquetArchive>,
}

impl PartitionSettings {
    /// The day windows alone: no forecasts, no alerts.
    pub fn windows_only(windows: WindowConfig) -> Self {
        Self {
            windows,
            forecast: None,
            alerts: AlertConfig {
                enabled: false,
                ..AlertConfig::default()
            },
            archive: None,
        }
    }
}

/// A partition's state as a checkpoint holds it.
#[derive(Debug, Deserialize)]
struct PartitionState {
    next_offset: Option<i64>,
    windows: WindowState,
    models: BatteryModels,
    episodes: Episodes,
    /// Archive files this checkpoint commits (staged until it is durable).
    archive: Vec<String>,
}

/// The same, borrowed: saving must not clone the state.
#[derive(Serialize)]
struct PartitionStateRef<'a> {
    next_offset: Option<i64>,
    windows: &'a WindowState,
    models: &'a BatteryModels,
    episodes: EpisodesRef<'a>,
    archive: &'a [String],
}

/// CPU time a task's steps took (on whichever thread ran it).
#[derive(Debug, Default, Clone, Copy)]
pub struct TaskTimes {
    pub windows: Duration,
    /// The forecast step on the task's thread (its battery threads report their own time
    /// in `ForecastStats`).
    pub forecasts: Duration,
    /// The alert policy deciding on the fresh risks.
    pub policy: Duration,
    /// Raw rows and closed days written to the archive (wall time: mostly I/O).
    pub archive: Duration,
}

/// What one batch of a partition produced.
#[derive(Debug, Default)]
pub struct PartitionOutput {
    /// Closed days (the daily schema).
    pub closed: Vec<RecordBatch>,
    /// Rows for days that had already closed.
    pub late: Vec<DeadLetter>,
    /// The newest fresh assessment of each battery that has one, when the task was given
    /// no [`LatestSink`] to hand them to as they are made.
    pub risks: Vec<RiskUpdate>,
    /// Alert decisions, to carry out before the state that made them is checkpointed.
    pub decisions: Vec<Decision>,
    /// Batteries forgotten after a silence past the retention.
    pub evicted: Vec<Arc<str>>,
}

/// Where a task hands a slice's newest assessments as soon as the slice is assessed (the
/// alert store, which keeps one per battery for the API). Collected for the whole batch
/// instead, a day closing on a fleet of 100,000 held 100,000 fresh assessments beside the
/// 100,000 stored: 0.7 KB a battery at the peak.
pub type LatestSink<'a> = &'a (dyn Fn(Vec<RiskUpdate>) + Sync);

/// `risks` without an assessment the next one supersedes. `take_closed` gives a
/// battery's assessments of a slice one after another, in day order, so the newest of
/// each run stays; the policy has seen every day's, and the store keeps only the latest.
fn newest_of_runs(risks: Vec<RiskUpdate>) -> Vec<RiskUpdate> {
    let mut kept = Vec::with_capacity(risks.len());
    let mut risks = risks.into_iter().peekable();
    while let Some(risk) = risks.next() {
        if risks
            .peek()
            .is_none_or(|next| next.battery_id != risk.battery_id)
        {
            kept.push(risk);
        }
    }
    kept
}

/// `risks` with only each battery's last: a battery's days of a batch can fall in
/// several slices.
fn newest_per_battery(mut risks: Vec<RiskUpdate>) -> Vec<RiskUpdate> {
    let mut seen = std::collections::HashSet::with_capacity(risks.len());
    risks.reverse();
    risks.retain(|r| seen.insert(r.battery_id.clone()));
    risks.reverse();
    risks
}

/// One partition's state and the work on it.
pub struct PartitionTask {
    pub key: PartitionKey,
    /// The first offset the state does not cover; None until anything was read.
    pub next_offset: Option<i64>,
    pub windows: DailyWindows,
    pub models: BatteryModels,
    policy: EpisodePolicy,
    archive: Option<PartitionArchive>,
    /// The number this owner writes its next checkpoint under.
    next_seq: u64,
    /// Changed since the last checkpoint.
    dirty: bool,
    pub forecast_stats: ForecastStats,
    pub times: TaskTimes,
}

impl PartitionTask {
    /// `staged`: archive files wait for the partition's checkpoint.
    fn fresh(key: PartitionKey, settings: &PartitionSettings, staged: bool) -> Self {
        Self {
            archive: archive_of(&key, settings, staged),
            key,
            next_offset: None,
            windows: DailyWindows::new(one_shard(&settings.windows)),
            models: BatteryModels::default(),
            policy: EpisodePolicy::new(settings.alerts.clone()),
            next_seq: 1,
            dirty: false,
            forecast_stats: ForecastStats::default(),
            times: TaskTimes::default(),
        }
    }

    fn restored(
        key: PartitionKey,
        state: PartitionState,
        next_seq: u64,
        settings: &PartitionSettings,
    ) -> Self {
        Self {
            archive: archive_of(&key, settings, true),
            key,
            next_offset: state.next_offset,
            windows: DailyWindows::from_state(one_shard(&settings.windows), state.windows),
            models: state.models,
            policy: EpisodePolicy::with_episodes(settings.alerts.clone(), state.episodes),
            next_seq,
            dirty: false,
            forecast_stats: ForecastStats::default(),
            times: TaskTimes::default(),
        }
    }

    /// Takes in this partition's rows of a micro-batch (offset order) and how far it got.
    /// `latest`: where the fresh assessments go as they are made (else into the output).
    ///
    /// The stage does the same in three steps, so that the day aggregation runs once for
    /// all the partitions of a batch: [`Self::screen`], [`DayPartials::aggregate`],
    /// [`Self::finish`].
    pub fn apply(
        &mut self,
        rows: &RecordBatch,
        position: &SourcePosition,
        now: EpochMillis,
        settings: &PartitionSettings,
        metrics: Option<&Metrics>,
        latest: Option<LatestSink>,
    ) -> Result<PartitionOutput, ScoringError> {
        let screened = self.screen(rows, position, now)?;
        let windows = &mut self.windows;
        let partials = on_cpu(&mut self.times.windows, || {
            windows.aggregate_alone(rows, &screened)
        })?;
        self.finish(
            screened, &partials, rows, position, settings, metrics, latest,
        )
    }

    /// The batch's first step: the partition's watermark moves over `rows`, late rows
    /// and duplicates are set aside (see [`DailyWindows::screen_partition`]).
    pub fn screen(
        &mut self,
        rows: &RecordBatch,
        position: &SourcePosition,
        now: EpochMillis,
    ) -> Result<ScreenedPartition, ScoringError> {
        let windows = &mut self.windows;
        Ok(on_cpu(&mut self.times.windows, || {
            windows.screen_partition(rows, position, now)
        })?)
    }

    /// The batch's last step, after the day aggregation: the windows take in the sums
    /// and close the days passed, then the archive, forecasts and alert policy run.
    #[expect(
        clippy::too_many_arguments,
        reason = "the batch's rows and position, and apply's own arguments"
    )]
    pub fn finish(
        &mut self,
        screened: ScreenedPartition,
        partials: &DayPartials,
        rows: &RecordBatch,
        position: &SourcePosition,
        settings: &PartitionSettings,
        metrics: Option<&Metrics>,
        latest: Option<LatestSink>,
    ) -> Result<PartitionOutput, ScoringError> {
        let windows = &mut self.windows;
        let out = on_cpu(&mut self.times.windows, || {
            windows.finish_partition(screened, partials)
        })?;
        self.check_contiguous(position, metrics);
        // Offsets from..to: where the state was, where this batch takes it.
        let from = self.next_offset.unwrap_or(0);
        let to = position.next_offset.max(from);
        self.next_offset = Some(to);
        self.dirty = true;
        if let Some(archive) = &mut self.archive {
            let started = std::time::Instant::now();
            if rows.num_rows() > 0 {
                archive.raw(rows, from, to)?;
            }
            for closed in &out.closed {
                archive.daily(closed, from, Some(to))?;
            }
            self.times.archive += started.elapsed();
        }
        let mut output = PartitionOutput {
            closed: out.closed,
            late: out.late,
            ..Default::default()
        };
        self.forecast(&mut output, settings, metrics, latest);
        self.forget(out.evicted, settings, &mut output);
        Ok(output)
    }

    /// Says so when the batch starts past where the state resumed: the records between
    /// never reached this partition's state. Kafka leaves such gaps for transaction
    /// markers and compacted records; anywhere else it is the broker or the consumer
    /// losing records (tansu 0.6's memory engine does, after a seek into a batch), and
    /// the counter is how an operator sees it.
    fn check_contiguous(&self, position: &SourcePosition, metrics: Option<&Metrics>) {
        let Some(expected) = self.next_offset else {
            return;
        };
        let skipped = position.first_offset - expected;
        if skipped <= 0 {
            return;
        }
        tracing::warn!(
            partition = %self.key,
            expected,
            got = position.first_offset,
            skipped,
            "offsets skipped: records between never arrived"
        );
        if let Some(m) = metrics {
            m.source_offsets_skipped.inc_by(skipped as u64);
        }
    }

    /// Applies the acknowledgements that concern this partition's batteries to their
    /// episodes; returns the ids it settled (applied, or their episode is over).
    pub fn acknowledge(&mut self, acks: &[PendingAck], metrics: Option<&Metrics>) -> Vec<String> {
        let (settled, applied) = self.policy.settle(acks);
        if applied > 0 {
            self.dirty = true;
            if let Some(m) = metrics {
                m.alert_acks_applied.inc_by(applied);
            }
        }
        settled
    }

    /// Drops what the partition kept of batteries the windows evicted.
    fn forget(
        &mut self,
        evicted: Vec<Arc<str>>,
        settings: &PartitionSettings,
        output: &mut PartitionOutput,
    ) {
        let days = settings.windows.retention_days;
        for battery in &evicted {
            self.models.forget(battery);
            output.decisions.extend(self.policy.evict(battery, days));
        }
        output.evicted = evicted;
    }

    /// Closes the oldest open day (end of a finite input); None when no day is open.
    /// The caller carries each day's output out before asking for the next.
    pub fn finish_oldest_day(
        &mut self,
        settings: &PartitionSettings,
        metrics: Option<&Metrics>,
        latest: Option<LatestSink>,
    ) -> Result<Option<PartitionOutput>, ScoringError> {
        let windows = &mut self.windows;
        let Some(out) = on_cpu(&mut self.times.windows, || windows.close_oldest_output())? else {
            return Ok(None);
        };
        self.dirty = true;
        if let Some(archive) = &mut self.archive {
            for batch in &out.closed {
                archive.daily(batch, self.next_offset.unwrap_or(0), None)?;
            }
        }
        let mut output = PartitionOutput {
            closed: out.closed,
            ..Default::default()
        };
        self.forecast(&mut output, settings, metrics, latest);
        self.forget(out.evicted, settings, &mut output);
        Ok(Some(output))
    }

    /// Forecasts on the closed days, and the alert policy on the fresh risks, a slice of
    /// closed days at a time; each slice's newest assessments go to `latest`.
    fn forecast(
        &mut self,
        output: &mut PartitionOutput,
        settings: &PartitionSettings,
        metrics: Option<&Metrics>,
        latest: Option<LatestSink>,
    ) {
        let Some(forecast) = &settings.forecast else {
            return;
        };
        let now = Utc::now();
        let mut cpu = Duration::ZERO;
        let per = forecast.slice_rows.max(1);
        let slices = output.closed.iter().flat_map(|batch| {
            (0..batch.num_rows())
                .step_by(per)
                .map(|at| batch.slice(at, per.min(batch.num_rows() - at)))
        });
        for slice in slices {
            let risks = on_cpu(&mut cpu, || {
                self.models.take_closed(
                    &slice,
                    self.windows.state(),
                    forecast,
                    &mut self.forecast_stats,
                    metrics,
                )
            });
            if settings.alerts.enabled {
                on_cpu(&mut self.times.policy, || {
                    for risk in &risks {
                        output.decisions.extend(self.policy.observe(risk, now));
                    }
                });
            }
            if let Some(m) = metrics {
                m.risk_updates.inc_by(risks.len() as u64);
            }
            let newest = newest_of_runs(risks);
            match latest {
                Some(sink) => sink(newest),
                None => output.risks.extend(newest),
            }
        }
        if latest.is_none() {
            output.risks = newest_per_battery(std::mem::take(&mut output.risks));
        }
        self.times.forecasts += cpu;
    }

    fn state(&self) -> PartitionStateRef<'_> {
        PartitionStateRef {
            next_offset: self.next_offset,
            windows: self.windows.state(),
            models: &self.models,
            episodes: self.policy.episodes(),
            archive: self.archive.as_ref().map_or(&[], |a| a.staged()),
        }
    }

    /// Writes a checkpoint if anything changed; returns the bytes written.
    fn checkpoint(&mut self, store: &CheckpointStore) -> Result<Option<u64>, CheckpointError> {
        if !self.dirty {
            return Ok(None);
        }
        let bytes = match store.save(&self.key, self.next_seq, &self.state()) {
            Ok(bytes) => bytes,
            Err(e) => {
                if matches!(e, CheckpointError::Fenced { .. }) {
                    self.drop_unsaved();
                }
                return Err(e);
            }
        };
        self.next_seq += 1;
        self.dirty = false;
        if let Some(archive) = &mut self.archive {
            archive.commit()?;
        }
        Ok(Some(bytes))
    }

    /// The partition leaves without a checkpoint: what waited for one is dropped.
    fn drop_unsaved(&mut self) {
        if let Some(archive) = &mut self.archive {
            archive.discard();
        }
    }

    /// Where a new owner (or a restart) resumes this partition.
    pub fn position(&self) -> Option<SourcePosition> {
        let next_offset = self.next_offset?;
        Some(SourcePosition {
            source: self.key.topic.clone(),
            partition: self.key.partition,
            first_offset: next_offset,
            next_offset,
            max_event_time: None,
        })
    }
}

/// The partition's part of the archive, if there is one (`staged`: its files wait for
/// the partition's checkpoint).
fn archive_of(
    key: &PartitionKey,
    settings: &PartitionSettings,
    staged: bool,
) -> Option<PartitionArchive> {
    let archive = settings.archive.as_ref()?;
    Some(PartitionArchive::new(archive, key, staged))
}

/// The windows of one partition run on one thread: the partitions are the parallelism.
fn one_shard(config: &WindowConfig) -> WindowConfig {
    WindowConfig {
        shards: 1,
        ..config.clone()
    }
}

fn key_of(p: &PartitionId) -> PartitionKey {
    PartitionKey {
        topic: p.0.clone(),
        partition: p.1,
    }
}

/// The partitions this process owns, shared by the stage that works on them and the
/// consumer's rebalance callbacks that hand them in and out.
pub struct PartitionSet {
    tasks: Mutex<BTreeMap<PartitionKey, PartitionTask>>,
    checkpoints: Option<CheckpointStore>,
    pub settings: PartitionSettings,
    /// Partitions appear on first sight (a file, a test) rather than by assignment.
    create_on_sight: bool,
    /// A failure inside a rebalance callback, reported by the next batch.
    failure: Mutex<Option<CheckpointError>>,
    metrics: Option<Arc<Metrics>>,
    /// Work done by tasks that have since left, so a run's report covers them too.
    departed: Mutex<TaskWork>,
    /// Set by [`PartitionSet::halt`]: nothing more is written.
    halted: std::sync::atomic::AtomicBool,
    /// Held by the stage for the whole of a batch (see [`crate::overlap`]).
    batch_gate: Arc<Mutex<()>>,
}

/// What tasks did, summed.
#[derive(Debug, Default, Clone)]
pub struct TaskWork {
    pub windows: crate::windows::WindowStats,
    pub aggregate: crate::windows::aggregate::AggregateWork,
    pub forecast: ForecastStats,
    pub times: TaskTimes,
}

impl TaskWork {
    pub fn add(&mut self, task: &PartitionTask) {
        self.windows.add(task.windows.stats());
        self.aggregate = [self.aggregate, task.windows.aggregate_work()]
            .into_iter()
            .sum();
        self.forecast.add(&task.forecast_stats);
        self.times.windows += task.times.windows;
        self.times.forecasts += task.times.forecasts;
        self.times.policy += task.times.policy;
        self.times.archive += task.times.archive;
    }
}

impl PartitionSet {
    /// Partitions come and go by assignment (Kafka), checkpointed to `checkpoints`.
    pub fn assigned_by_group(
        settings: PartitionSettings,
        checkpoints: Option<CheckpointStore>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self::new(settings, checkpoints, false, metrics)
    }

    /// Partitions appear as their records do (a file replay, a test).
    pub fn on_sight(settings: PartitionSettings, metrics: Option<Arc<Metrics>>) -> Self {
        Self::new(settings, None, true, metrics)
    }

    fn new(
        settings: PartitionSettings,
        checkpoints: Option<CheckpointStore>,
        create_on_sight: bool,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            tasks: Mutex::new(BTreeMap::new()),
            checkpoints,
            settings,
            create_on_sight,
            failure: Mutex::new(None),
            metrics,
            departed: Mutex::new(TaskWork::default()),
            halted: std::sync::atomic::AtomicBool::new(false),
            batch_gate: Arc::new(Mutex::new(())),
        }
    }

    /// The lock a stage running beside the source holds while it works on a batch; the
    /// rebalance callbacks take it too, so they run between batches.
    pub fn batch_gate(&self) -> Arc<Mutex<()>> {
        self.batch_gate.clone()
    }

    /// Waits for the batch in flight, if any.
    fn between_batches(&self) -> MutexGuard<'_, ()> {
        self.batch_gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on nothing is written: partitions that leave are dropped as if lost.
    /// What a crash does, for tests that crash an instance in-process (dropping a
    /// consumer otherwise leaves its group cleanly, saving its partitions on the way).
    pub fn halt(&self) {
        self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_halted(&self) -> bool {
        self.halted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The tasks, locked. The stage holds this while it works on a batch; the rebalance
    /// callbacks run between batches, so they never wait on it for long.
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<PartitionKey, PartitionTask>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_deref()
    }

    /// What the tasks that left (revoked, lost, fenced) had done.
    pub fn departed(&self) -> TaskWork {
        self.departed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A failure a rebalance callback could not report itself.
    pub fn take_failure(&self) -> Option<CheckpointError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Whether rows of a partition without a task start one.
    pub fn creates_on_sight(&self) -> bool {
        self.create_on_sight
    }

    /// A task for `key` from nothing (a partition seen for the first time).
    pub fn fresh_task(&self, key: PartitionKey) -> PartitionTask {
        PartitionTask::fresh(key, &self.settings, self.checkpoints.is_some())
    }

    /// Loads `key`'s latest checkpoint and claims its next number.
    fn load(&self, key: PartitionKey) -> Result<PartitionTask, CheckpointError> {
        let Some(store) = &self.checkpoints else {
            return Ok(self.fresh_task(key));
        };
        let started = std::time::Instant::now();
        let loaded = store.load::<PartitionState>(&key)?;
        let (mut task, committed) = match loaded.state {
            Some(mut state) => {
                let committed = std::mem::take(&mut state.archive);
                let task =
                    PartitionTask::restored(key.clone(), state, loaded.next_seq, &self.settings);
                (task, committed)
            }
            None => {
                let task = PartitionTask {
                    next_seq: loaded.next_seq,
                    ..self.fresh_task(key.clone())
                };
                (task, Vec::new())
            }
        };
        let (archived, rolled_back) = match &mut task.archive {
            Some(archive) => archive.recover(&committed)?,
            None => (0, 0),
        };
        tracing::info!(
            partition = %key,
            batteries = task.windows.state().battery_count(),
            next_offset = ?task.next_offset,
            archived,
            rolled_back,
            seconds = started.elapsed().as_secs_f64(),
            "partition state loaded"
        );
        Ok(task)
    }

    /// Checkpoints every task that changed; returns the positions now durable. A task
    /// fenced off by a newer owner is dropped.
    pub fn checkpoint_all(&self) -> Result<Vec<SourcePosition>, CheckpointError> {
        let Some(store) = &self.checkpoints else {
            return Ok(Vec::new());
        };
        if self.is_halted() {
            return Ok(Vec::new());
        }
        let mut tasks = self.lock();
        let mut durable = Vec::new();
        let mut fenced = Vec::new();
        for (key, task) in tasks.iter_mut() {
            let started = std::time::Instant::now();
            match task.checkpoint(store) {
                Ok(Some(bytes)) => {
                    if let Some(m) = &self.metrics {
                        m.checkpoint_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    tracing::debug!(partition = %key, bytes, "checkpoint saved");
                    durable.extend(task.position());
                }
                Ok(None) => {}
                Err(CheckpointError::Fenced { path }) => {
                    tracing::warn!(partition = %key, %path, "another instance owns the partition now: dropping it");
                    fenced.push(key.clone());
                }
                Err(e) => return Err(e),
            }
        }
        for key in fenced {
            if let Some(task) = tasks.remove(&key) {
                self.depart(&task);
            }
        }
        crate::memory::release_free_pages();
        Ok(durable)
    }

    fn depart(&self, task: &PartitionTask) {
        self.departed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(task);
    }

    fn fail(&self, e: CheckpointError) {
        tracing::error!(error = %e, "partition checkpoint");
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }
}

impl PartitionListener for PartitionSet {
    fn assigned(&self, partitions: &[PartitionId]) -> Vec<Option<i64>> {
        let _between = self.between_batches();
        partitions
            .iter()
            .map(|p| {
                let key = key_of(p);
                if let Some(task) = self.lock().get(&key) {
                    // Still ours (a cooperative rebalance re-confirming it).
                    return task.next_offset;
                }
                match self.load(key.clone()) {
                    Ok(task) => {
                        let offset = task.next_offset;
                        self.lock().insert(key, task);
                        offset
                    }
                    Err(e) => {
                        self.fail(e);
                        None
                    }
                }
            })
            .collect()
    }

    fn revoked(&self, partitions: &[PartitionId]) {
        let _between = self.between_batches();
        if self.is_halted() {
            return self.drop_lost(partitions);
        }
        for p in partitions {
            let Some(mut task) = self.lock().remove(&key_of(p)) else {
                continue;
            };
            if let Some(store) = &self.checkpoints {
                match task.checkpoint(store) {
                    Ok(bytes) => {
                        tracing::info!(partition = %task.key, ?bytes, "partition handed over")
                    }
                    Err(CheckpointError::Fenced { .. }) => {
                        tracing::warn!(partition = %task.key, "partition already taken over")
                    }
                    Err(e) => self.fail(e),
                }
            }
            self.depart(&task);
        }
    }

    fn lost(&self, partitions: &[PartitionId]) {
        let _between = self.between_batches();
        self.drop_lost(partitions);
    }
}

impl PartitionSet {
    fn drop_lost(&self, partitions: &[PartitionId]) {
        for p in partitions {
            if let Some(mut task) = self.lock().remove(&key_of(p)) {
                tracing::warn!(partition = %task.key, "partition lost: its state is dropped unsaved");
                // A halted set plays a crash: it leaves its files as they lie.
                if !self.is_halted() {
                    task.drop_unsaved();
                }
                self.depart(&task);
            }
        }
    }
}
