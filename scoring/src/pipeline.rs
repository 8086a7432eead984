//! The run loop: source -> stages. Until the day windows exist, batches end in a
//! [`BatchTally`] that accounts for every row, battery and dead letter.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use tokio::sync::watch;
use voltcast_ingest::arrow::array::{Array, AsArray};
use voltcast_ingest::blocking::off_runtime;
use voltcast_ingest::dead_letter::DeadLetterQueue;
use voltcast_ingest::{
    BatchSink, FileSource, IngestCounters, KafkaSource, MicroBatch, SinkError, SourcePosition,
    schema,
};

use crate::alerts::publish::{AlertPublisher, EventOutbox};
use crate::alerts::{AlertService, AlertStore, DeliveryWorker, Outbox};
use crate::archive::ParquetArchive;
use crate::checkpoint::{CheckpointError, CheckpointStore, PartitionKey};
use crate::config::{SourceKind, VoltcastConfig};
use crate::error::ScoringError;
use crate::forecasting::ForecastSettings;
use crate::memory::on_cpu;
use crate::metrics::Metrics;
use crate::overlap::Overlapped;
use crate::partition::{
    LatestSink, PartitionOutput, PartitionSet, PartitionSettings, PartitionTask, TaskWork,
};
use crate::windows::{DailyAggregator, DayPartials};

/// Counts what reached the end of the pipeline.
#[derive(Debug, Default)]
pub struct BatchTally {
    pub batches: u64,
    pub rows: u64,
    pub dead_letters: u64,
    pub batteries: HashSet<String>,
}

impl BatchSink for BatchTally {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        self.batches += 1;
        self.rows += batch.rows.num_rows() as u64;
        self.dead_letters += batch.dead_letters as u64;
        let ids = batch
            .rows
            .column_by_name(schema::BATTERY_ID)
            .ok_or("batch has no battery_id column")?
            .as_string::<i32>();
        for i in 0..ids.len() {
            if !self.batteries.contains(ids.value(i)) {
                self.batteries.insert(ids.value(i).to_string());
            }
        }
        tracing::debug!(
            rows = batch.rows.num_rows(),
            dead_letters = batch.dead_letters,
            "batch"
        );
        Ok(batch.positions)
    }
}

/// Where the stage's time went: CPU time of the partition steps (summed over the threads
/// they ran on), and wall time for what waits on I/O.
#[derive(Debug, Default, Clone, Copy)]
pub struct WindowStageTimes {
    /// The day windows: dedupe, DataFusion partials, closing into histories.
    pub windows: Duration,
    /// Daily model updates, selections, risk (the partitions' threads; the battery
    /// threads' own time is in `ForecastStats`).
    pub forecasts: Duration,
    /// The alert policy deciding on fresh risks.
    pub policy: Duration,
    /// Raw rows and closed days written to the Parquet archive.
    pub archive: Duration,
    /// Late rows produced to the dead-letter topic and awaited.
    pub dead_letters: Duration,
    /// Alert decisions carried out and latest assessments stored.
    pub alerts: Duration,
    pub checkpoint: Duration,
    /// Wall time the stage spent on batches (accepted, checkpoints): busy, whether or
    /// not the source was waiting for it.
    pub accepting: Duration,
}

/// Below this many rows a batch's partitions are worked on one after another.
const PARALLEL_MIN_ROWS: usize = 4_096;

/// How often a stage without checkpoints releases free memory: the checkpoint interval's
/// default, the time a checkpoint would have done it.
const RELEASE_MEMORY_EVERY: Duration = Duration::from_secs(10);

/// The streaming job as a sink: each partition's rows go to the partition's task
/// (windows, forecasts, alert policy, archive), in parallel across partitions; then, in
/// order, late rows to the dead-letter queue, alert decisions to the alert service;
/// then, when due, every changed partition is checkpointed (which commits its archive
/// files).
///
/// Decisions are carried out before the state that made them is checkpointed, so a
/// crash can only repeat a decision (same id, recognised downstream), never lose one.
pub struct PartitionStage {
    pub partitions: Arc<PartitionSet>,
    pub times: WindowStageTimes,
    dead_letters: DeadLetterQueue,
    alerts: Option<Arc<AlertService>>,
    /// Closed days, also handed here (tests and tools).
    closed_tap: Option<std::sync::mpsc::Sender<RecordBatch>>,
    checkpoint_every: Option<Duration>,
    /// The last checkpoint, or without checkpoints the last release of free pages.
    last_checkpoint: Instant,
    metrics: Option<Arc<Metrics>>,
    pub tally: BatchTally,
    /// The day aggregation of each batch's partitions together.
    aggregator: DailyAggregator,
    /// The CPU it took (the partitions' own window steps count theirs).
    aggregation_cpu: Duration,
}

impl PartitionStage {
    pub fn new(partitions: Arc<PartitionSet>, dead_letters: DeadLetterQueue) -> Self {
        Self {
            partitions,
            dead_letters,
            alerts: None,
            closed_tap: None,
            checkpoint_every: None,
            last_checkpoint: Instant::now(),
            metrics: None,
            tally: BatchTally::default(),
            aggregator: DailyAggregator::default(),
            aggregation_cpu: Duration::ZERO,
            times: WindowStageTimes::default(),
        }
    }

    /// Report batch sizes, latencies and window counts to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Carry out alert decisions and keep the latest assessments in `alerts`.
    pub fn with_alerts(mut self, alerts: Arc<AlertService>) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// Also send every closed-day batch to `tap`.
    pub fn with_closed_tap(mut self, tap: std::sync::mpsc::Sender<RecordBatch>) -> Self {
        self.closed_tap = Some(tap);
        self
    }

    /// Checkpoint the partitions at most every `interval` (they need a checkpoint store).
    pub fn with_checkpoints_every(mut self, interval: Duration) -> Self {
        self.checkpoint_every = Some(interval);
        self
    }

    /// Checkpoints every partition that changed; returns the positions now durable.
    pub fn checkpoint_now(&mut self) -> Result<Vec<SourcePosition>, CheckpointError> {
        let started = Instant::now();
        // Serializing and fsyncing every changed partition.
        let durable = off_runtime(|| self.partitions.checkpoint_all())?;
        self.last_checkpoint = Instant::now();
        self.times.checkpoint += started.elapsed();
        Ok(durable)
    }

    /// Without checkpoints (a file replay), returns the allocator's free pages as often
    /// as a checkpoint would: each checkpoint does, and a replay without them kept about
    /// 650 bytes per battery resident for nothing.
    fn release_memory_now_and_then(&mut self) {
        if self.last_checkpoint.elapsed() >= RELEASE_MEMORY_EVERY {
            crate::memory::release_free_pages();
            self.last_checkpoint = Instant::now();
        }
    }

    /// End of a finite input: close every open window, a day at a time, each day's
    /// output carried out before the next day closes.
    pub async fn finish(&mut self) -> Result<(), ScoringError> {
        let alerts = self.alerts.clone();
        let sink = alerts.as_ref().map(|a| move |risks| a.set_latest(risks));
        let latest = sink.as_ref().map(|s| s as LatestSink);
        loop {
            let outputs = {
                let partitions = self.partitions.clone();
                let mut tasks = partitions.lock();
                off_runtime(|| {
                    tasks
                        .values_mut()
                        .filter_map(|task| {
                            let (settings, metrics) = (&partitions.settings, partitions.metrics());
                            task.finish_oldest_day(settings, metrics, latest)
                                .transpose()
                        })
                        .collect::<Result<Vec<_>, _>>()
                })?
            };
            if outputs.is_empty() {
                return Ok(());
            }
            self.carry_out(outputs)
                .await
                .map_err(voltcast_ingest::IngestError::Sink)?;
        }
    }

    /// Runs each partition's rows through its task.
    fn run_tasks(&mut self, batch: &MicroBatch) -> Result<Vec<PartitionOutput>, ScoringError> {
        let partitions = self.partitions.clone();
        let mut tasks = partitions.lock();
        let mut work: BTreeMap<PartitionKey, (RecordBatch, &SourcePosition, usize)> =
            BTreeMap::new();
        for position in &batch.positions {
            let key = PartitionKey {
                topic: position.source.clone(),
                partition: position.partition,
            };
            if !tasks.contains_key(&key) {
                if !partitions.creates_on_sight() {
                    // Not ours (revoked, or fenced off by a newer owner): its new owner
                    // reads these records again from its checkpoint.
                    continue;
                }
                tasks.insert(key.clone(), partitions.fresh_task(key.clone()));
            }
            let id = (position.source.clone(), position.partition);
            let (rows, at) = batch
                .parts
                .iter()
                .find(|p| p.partition == id)
                // A partition whose messages were all refused still advances its offset.
                .map_or_else(
                    || (RecordBatch::new_empty(schema::telemetry_schema()), 0),
                    |p| (batch.rows_of(p), p.start),
                );
            work.insert(key, (rows, position, at));
        }
        let now = voltcast_ingest::now_millis();
        let metrics = partitions.metrics();
        let sink = self
            .alerts
            .as_ref()
            .map(|a| move |risks| a.set_latest(risks));
        let latest = sink.as_ref().map(|s| s as LatestSink);
        if let Some(alerts) = &self.alerts {
            // Bookings first, so the batch's escalations reflect them.
            let acks = alerts.pending_acks();
            if !acks.is_empty() {
                let settled: Vec<String> = tasks
                    .values_mut()
                    .flat_map(|task| task.acknowledge(&acks, metrics))
                    .collect();
                alerts.settle_acks(&settled);
            }
        }
        let busy: Vec<(&mut PartitionTask, (RecordBatch, &SourcePosition, usize))> = tasks
            .iter_mut()
            .filter_map(|(key, task)| Some((task, work.remove(key)?)))
            .collect();
        let parallel = busy.len() >= 2 && batch.rows.num_rows() >= PARALLEL_MIN_ROWS;
        // A thread per partition cost a spawn and a stack per partition and batch: the
        // mock cluster's 337 partitions made 51,000 threads on a 20,000-battery backlog.
        let threads = match parallel {
            true => std::thread::available_parallelism().map_or(1, |n| n.get()),
            false => 1,
        };
        let mut settings = partitions.settings.clone();
        if let Some(f) = &mut settings.forecast
            && parallel
        {
            // The partitions share the cores; each spreads its forecasts over its share.
            f.threads = (f.threads / busy.len()).max(1);
        }
        let settings = &settings;
        // Three steps, so that the day aggregation runs once for the batch, not once per
        // partition (see `DayPartials::aggregate`): each partition screens its rows...
        let screened = crate::workers::in_order(busy, threads, |(task, (rows, position, at))| {
            let screened = task.screen(&rows, position, now);
            (task, rows, position, at, screened)
        });
        let mut steps = Vec::with_capacity(screened.len());
        for (task, rows, position, at, screened) in screened {
            steps.push((task, rows, position, at, screened?));
        }
        // ...the batch's fresh rows are aggregated...
        let parts: Vec<_> = steps.iter().map(|(_, _, _, at, s)| (*at, s)).collect();
        let aggregator = &mut self.aggregator;
        let partials = on_cpu(&mut self.aggregation_cpu, || {
            DayPartials::aggregate(aggregator, &batch.rows, &parts)
        })?;
        // ...and each partition takes in its sums, closes days, forecasts.
        let finishing = steps.into_iter().zip(partials).collect();
        crate::workers::in_order(finishing, threads, |(step, partials)| {
            let (task, rows, position, _, screened) = step;
            task.finish(
                screened, &partials, &rows, position, settings, metrics, latest,
            )
        })
        .into_iter()
        .collect()
    }

    /// What the tasks produced, in partition order: late rows, closed days, alerts.
    async fn carry_out(&mut self, outputs: Vec<PartitionOutput>) -> Result<(), SinkError> {
        let (mut decisions, mut evicted) = (Vec::new(), Vec::new());
        for out in outputs {
            let started = Instant::now();
            for letter in out.late {
                self.dead_letters.send(letter)?;
            }
            self.times.dead_letters += started.elapsed();
            for closed in out.closed {
                if let Some(tap) = &self.closed_tap {
                    // A listener that went away is not our failure.
                    let _ = tap.send(closed);
                }
            }
            decisions.extend(out.decisions);
            evicted.extend(out.evicted);
        }
        // One pass over the alert store (one lock, at most one fsync) for the batch.
        if let Some(alerts) = &self.alerts {
            let mut busy = self.times.alerts;
            // The outbox fsyncs each alert before it is stored.
            // The fresh assessments reached the store as they were made (`LatestSink`).
            let record = || alerts.record(decisions, Vec::new(), &evicted);
            off_runtime(|| on_cpu(&mut busy, record));
            self.times.alerts = busy;
        }
        let started = Instant::now();
        self.dead_letters.flush().await?;
        self.times.dead_letters += started.elapsed();
        Ok(())
    }

    /// Sums what the partitions (those here and those that left) did.
    pub fn report(&self) -> StageSummary {
        let mut work = self.partitions.departed();
        work.times.windows += self.aggregation_cpu;
        work.aggregate = [work.aggregate, self.aggregator.work()].into_iter().sum();
        let mut batteries = 0;
        for task in self.partitions.lock().values() {
            work.add(task);
            batteries += task.windows.state().battery_count();
        }
        StageSummary { work, batteries }
    }

    fn refresh_metrics(&self, batch_rows: usize, started: Instant) {
        let Some(m) = &self.metrics else { return };
        m.batch_rows.observe(batch_rows as f64);
        m.batch_seconds.observe(started.elapsed().as_secs_f64());
        let tasks = self.partitions.lock();
        let mut stats = crate::windows::WindowStats::default();
        let mut batteries = 0;
        for task in tasks.values() {
            stats.add(task.windows.stats());
            batteries += task.windows.state().battery_count();
        }
        m.refresh_windows(&stats, batteries);
    }
}

/// The partitions' work, summed.
#[derive(Debug, Default, Clone)]
pub struct StageSummary {
    pub work: TaskWork,
    /// Batteries in the partitions owned now.
    pub batteries: usize,
}

impl PartitionStage {
    async fn accept_now(
        &mut self,
        batch: MicroBatch,
        started: Instant,
    ) -> Result<Vec<SourcePosition>, SinkError> {
        // Windows, forecasts and archive files: the CPU (and disk) for the whole batch.
        let outputs = off_runtime(|| self.run_tasks(&batch))?;
        self.carry_out(outputs).await?;
        self.refresh_metrics(batch.rows.num_rows(), started);
        let positions = self.tally.accept(batch).await?;
        let Some(every) = self.checkpoint_every else {
            self.release_memory_now_and_then();
            return Ok(positions);
        };
        if self.last_checkpoint.elapsed() < every {
            return Ok(Vec::new());
        }
        Ok(self.checkpoint_now()?)
    }
}

impl BatchSink for PartitionStage {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        if let Some(e) = self.partitions.take_failure() {
            return Err(e.into());
        }
        let started = Instant::now();
        let accepted = self.accept_now(batch, started).await;
        self.times.accepting += started.elapsed();
        accepted
    }

    async fn checkpoint(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        if self.checkpoint_every.is_none() {
            return Ok(Vec::new());
        }
        Ok(self.checkpoint_now()?)
    }

    async fn idle(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        match self.checkpoint_every {
            Some(every) if self.last_checkpoint.elapsed() >= every => Ok(self.checkpoint_now()?),
            _ => Ok(Vec::new()),
        }
    }
}

/// What a run did, for the closing log line.
#[derive(Debug)]
pub struct RunReport {
    pub tally: BatchTally,
    pub windows: crate::windows::WindowStats,
    /// Polls the day aggregation took, and plans it ran (equal when nothing stalled).
    pub aggregate: crate::windows::aggregate::AggregateWork,
    /// Wall time of the source loop (read, decode, validate, and the window stage
    /// called from it), from the start of consuming to the end of input or shutdown.
    pub source_seconds: f64,
    /// Of `source_seconds`, the time the source waited for the stage (which works on a
    /// batch while the source reads the next).
    pub source_waited: f64,
    pub window_times: WindowStageTimes,
    /// CPU time spent carrying out alert decisions and storing assessments.
    pub alert_seconds: f64,
    pub received: u64,
    pub rejected: u64,
    pub seconds: f64,
    pub forecast: crate::forecasting::ForecastStats,
    /// Batteries with a latest assessment.
    pub batteries_forecast: usize,
    /// Batteries whose latest assessment is at risk. Ids, not the assessments: a copy
    /// of every assessment at the end of a run raised the peak by a tenth (1.5 KB per
    /// battery while the partitions' state was still held).
    pub at_risk: Vec<Arc<str>>,
    /// Alerts in the store (this run's and earlier ones).
    pub alerts: usize,
}

/// What runs beside the stream: metrics, the alert service with its webhook worker and
/// Kafka publisher, and the HTTP API. Started before the pipeline so the API answers
/// (`/readyz` says not yet) while the consumer joins its group.
pub struct Services {
    pub metrics: Arc<Metrics>,
    pub alerts: Arc<AlertService>,
    pub counters: Arc<IngestCounters>,
    pub ready: Arc<AtomicBool>,
    /// Where the API listens, when it does.
    pub api_addr: Option<SocketAddr>,
    stop_deliveries: Option<watch::Sender<Option<tokio::time::Instant>>>,
    stop_view: Option<watch::Sender<bool>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Services {
    pub async fn start(config: &VoltcastConfig) -> Result<Self, ScoringError> {
        let metrics = Arc::new(Metrics::new(config.metrics.top_k));
        let enabled = config.alerts.enabled;
        let store = if enabled {
            AlertStore::open(&config.alerts.store_path)?
        } else {
            AlertStore::in_memory()
        };
        let mut alerts = AlertService::new(store, metrics.clone());
        let mut workers = Vec::new();
        if enabled && config.source == SourceKind::Kafka && config.alerts.publish_to_kafka {
            let producer = config
                .kafka
                .producer_config()?
                .create()
                .map_err(crate::alerts::AlertError::Kafka)?;
            let outbox = Arc::new(EventOutbox::open(&config.alerts.store_path.join("events"))?);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            alerts = alerts.with_events(outbox.clone(), tx);
            let publisher = AlertPublisher {
                producer,
                topic: config.alerts.topic.clone(),
                outbox,
            };
            workers.push(tokio::spawn(publisher.run(rx, metrics.clone())));
        }
        let mut delivery = None;
        if enabled && config.webhook.enabled() {
            let outbox = Arc::new(Outbox::open(&config.webhook.outbox_path)?);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            alerts = alerts.with_webhooks(config.webhook.clone(), tx, outbox.clone());
            delivery = Some((outbox, rx));
        }
        let alerts = Arc::new(alerts);
        let mut stop_deliveries = None;
        if let Some((outbox, rx)) = delivery {
            let (stop_tx, stop_rx) = watch::channel(None);
            stop_deliveries = Some(stop_tx);
            let worker = DeliveryWorker {
                config: config.webhook.clone(),
                outbox,
                service: alerts.clone(),
                client: reqwest::Client::new(),
            };
            workers.push(tokio::spawn(worker.run(rx, stop_rx)));
        }
        let stop_view = Self::start_view(config, &alerts, &mut workers);
        let counters = Arc::new(IngestCounters::default());
        let ready = Arc::new(AtomicBool::new(false));
        let listen = config.api.listen.trim();
        let api_addr = if listen.is_empty() {
            None
        } else {
            let token =
                (!config.api.token.is_empty()).then(|| Arc::from(config.api.token.as_str()));
            let (m, c) = (metrics.clone(), counters.clone());
            let state = crate::api::ApiState {
                alerts: alerts.clone(),
                token,
                ready: ready.clone(),
                refresh: Arc::new(move || m.refresh_ingest(&c)),
            };
            let addr =
                crate::api::spawn(listen, state)
                    .await
                    .map_err(|source| ScoringError::Api {
                        addr: listen.to_string(),
                        source,
                    })?;
            tracing::info!(%addr, "API listening");
            Some(addr)
        };
        Ok(Self {
            metrics,
            alerts,
            counters,
            ready,
            api_addr,
            stop_deliveries,
            stop_view,
            workers,
        })
    }

    /// The fleet-wide alert view, when the alerts topic is in use: without it (a topic
    /// that cannot be read) the API serves this instance's alerts only, and says so.
    fn start_view(
        config: &VoltcastConfig,
        alerts: &Arc<AlertService>,
        workers: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Option<watch::Sender<bool>> {
        let a = &config.alerts;
        if !(a.enabled && a.publish_to_kafka && a.fleet_view && config.source == SourceKind::Kafka)
        {
            return None;
        }
        let origin = crate::alerts::publish::new_origin(&config.kafka.group_id);
        let reader = crate::alerts::view::AlertTopicReader::new(
            &config.kafka,
            &a.topic,
            &a.forecasts_topic,
            origin.clone(),
        );
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                tracing::warn!(error = %e, "no fleet-wide alert view: the API lists this instance's alerts only");
                return None;
            }
        };
        let (stop, stopped) = watch::channel(false);
        workers.push(tokio::spawn(reader.run(alerts.clone(), stopped.clone())));
        match Self::forecast_publisher(config, origin) {
            Ok(publisher) => {
                alerts.track_latest_changes();
                workers.push(tokio::spawn(publisher.run(alerts.clone(), stopped)));
            }
            Err(e) => tracing::warn!(error = %e, "latest forecasts not published"),
        }
        Some(stop)
    }

    fn forecast_publisher(
        config: &VoltcastConfig,
        origin: String,
    ) -> Result<crate::alerts::publish::ForecastPublisher, voltcast_ingest::IngestError> {
        let producer = config
            .kafka
            .producer_config()?
            // A round waits on its deliveries: a missing topic or a broker away must not
            // hold the next round (or shutdown) for librdkafka's 5 minutes.
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(voltcast_ingest::IngestError::kafka(
                "creating the forecasts producer",
            ))?;
        Ok(crate::alerts::publish::ForecastPublisher {
            producer,
            topic: config.alerts.forecasts_topic.clone(),
            origin,
        })
    }

    /// Stops the workers; webhook deliveries get up to `drain` to finish, and what is
    /// left stays in the outbox for the next start.
    pub async fn finish(self, drain: Duration) {
        if let Some(stop) = &self.stop_deliveries {
            let _ = stop.send(Some(tokio::time::Instant::now() + drain));
        }
        // The publisher ends once its channel is drained and closed.
        self.alerts.close_events();
        if let Some(stop) = &self.stop_view {
            let _ = stop.send(true);
        }
        for w in self.workers {
            let _ = w.await;
        }
        if let Err(e) = self.alerts.sync() {
            tracing::error!(error = %e, "syncing the alert log");
        }
    }
}

/// Runs the configured source until it ends (files) or `shutdown` fires (Kafka), with
/// its services; stops them after.
pub async fn run(
    config: &VoltcastConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, ScoringError> {
    let services = Services::start(config).await?;
    let report = run_with(config, &services, shutdown).await;
    services.finish(Duration::from_secs(10)).await;
    report
}

/// Runs the configured source with services already started.
pub async fn run_with(
    config: &VoltcastConfig,
    services: &Services,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, ScoringError> {
    crate::memory::tune_allocator();
    let counters = services.counters.clone();
    let started = Instant::now();
    let (batch, rules) = (config.batch.clone(), config.validation.clone());
    let settings = PartitionSettings {
        windows: config.windows.clone(),
        forecast: Some(ForecastSettings::new(
            config.forecast.clone(),
            config.risk.clone(),
        )),
        alerts: config.alerts.clone(),
        archive: ParquetArchive::new(&config.archive),
    };
    let metrics = Some(services.metrics.clone());
    let (stage, source_seconds, source_waited) = match config.source {
        SourceKind::Kafka => {
            let producer = config.kafka.dead_letter_producer()?;
            let late = DeadLetterQueue::kafka(producer, config.kafka.dead_letter_topic.clone());
            let store = match config.checkpoint.enabled {
                true => Some(CheckpointStore::open(&config.checkpoint.path)?),
                false => None,
            };
            let checkpointed = store.is_some();
            let partitions = Arc::new(PartitionSet::assigned_by_group(settings, store, metrics));
            let mut stage = PartitionStage::new(partitions.clone(), late)
                .with_alerts(services.alerts.clone())
                .with_metrics(services.metrics.clone());
            if checkpointed {
                let interval = Duration::from_secs(config.checkpoint.interval_seconds);
                stage = stage.with_checkpoints_every(interval);
            }
            let source = KafkaSource::new(&config.kafka, batch, rules, counters.clone())?
                .with_partition_listener(partitions.clone());
            services.ready.store(true, Ordering::Relaxed);
            let consuming = Instant::now();
            let mut overlapped = beside_the_source(stage, &partitions)?;
            let ran = source.run(&mut overlapped, shutdown).await;
            let (stage, waited) = rejoin(overlapped, ran).await?;
            (stage, consuming.elapsed().as_secs_f64(), waited)
        }
        SourceKind::File => {
            // A file replay is a batch job that starts from the top: no checkpoint.
            let dead_letters = config.file.default_dead_letters();
            let partitions = Arc::new(PartitionSet::on_sight(settings, metrics));
            let stage =
                PartitionStage::new(partitions.clone(), DeadLetterQueue::file(&dead_letters))
                    .with_alerts(services.alerts.clone())
                    .with_metrics(services.metrics.clone());
            let dlq = DeadLetterQueue::file(dead_letters);
            services.ready.store(true, Ordering::Relaxed);
            let source = FileSource::new(config.file.clone(), batch, rules, counters.clone(), dlq);
            let consuming = Instant::now();
            let mut overlapped = beside_the_source(stage, &partitions)?;
            let ran = source.run(&mut overlapped).await;
            let (mut stage, waited) = rejoin(overlapped, ran).await?;
            stage.finish().await?;
            (stage, consuming.elapsed().as_secs_f64(), waited)
        }
    };
    let mut stage = stage;
    let work = stage.report().work;
    // The partitions' CPU time is kept by their tasks, summed over the threads they ran on.
    let window_times = WindowStageTimes {
        windows: work.times.windows,
        forecasts: work.times.forecasts,
        policy: work.times.policy,
        archive: work.times.archive,
        ..stage.times
    };
    let tally = std::mem::take(&mut stage.tally);
    let (batteries_forecast, at_risk, alerts) = {
        let store = services
            .alerts
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let at_risk = store
            .latest_all()
            .filter(|u| u.risk.at_risk)
            .map(|u| u.battery_id.clone())
            .collect();
        (store.latest_all().count(), at_risk, store.len())
    };
    services.metrics.refresh_ingest(&counters);
    Ok(RunReport {
        windows: work.windows,
        aggregate: work.aggregate,
        source_seconds,
        source_waited: source_waited.as_secs_f64(),
        window_times,
        alert_seconds: window_times.alerts.as_secs_f64(),
        tally,
        received: counters.received(),
        rejected: counters.rejected_total(),
        seconds: started.elapsed().as_secs_f64(),
        forecast: work.forecast,
        batteries_forecast,
        at_risk,
        alerts,
    })
}

/// The stage on its own thread, a batch behind the source (see [`crate::overlap`]).
fn beside_the_source(
    stage: PartitionStage,
    partitions: &PartitionSet,
) -> Result<Overlapped<PartitionStage>, ScoringError> {
    Overlapped::start(stage, partitions.batch_gate()).map_err(ScoringError::StageThread)
}

/// The stage back once the source is done, with the time the source waited for it; the
/// source's failure first, then the stage's.
async fn rejoin(
    overlapped: Overlapped<PartitionStage>,
    ran: Result<(), voltcast_ingest::IngestError>,
) -> Result<(PartitionStage, Duration), ScoringError> {
    let waited = overlapped.waited();
    let stage = overlapped.into_inner().await;
    ran?;
    let stage = stage.map_err(voltcast_ingest::IngestError::Sink)?;
    Ok((stage, waited))
}

/// Completes on Ctrl-C or SIGTERM: `docker stop` and Kubernetes send SIGTERM, and both
/// stop the same way (finish the batch, checkpoint every partition, commit, exit 0).
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
