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
use voltcast_ingest::dead_letter::DeadLetterQueue;
use voltcast_ingest::{
    BatchSink, FileSource, IngestCounters, KafkaSource, MicroBatch, PartitionId, SinkError,
    SourcePosition, schema,
};

use crate::alerts::publish::AlertPublisher;
use crate::alerts::{AlertService, AlertStage, AlertStore, DeliveryWorker, Outbox};
use crate::archive::{ArchiveError, ParquetArchive};
use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::config::{SourceKind, VoltcastConfig};
use crate::error::ScoringError;
use crate::forecasting::ForecastStage;
use crate::memory::on_cpu;
use crate::metrics::Metrics;
use crate::windows::DailyWindows;

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

/// Where the window stage's time went: CPU time of the thread it ran on (the window
/// stage's other shards run on threads of their own, not counted here), and wall time
/// for what waits on I/O.
#[derive(Debug, Default, Clone, Copy)]
pub struct WindowStageTimes {
    /// The day windows: dedupe, DataFusion partials, closing into histories.
    pub windows: Duration,
    /// Raw rows and closed days written to the Parquet archive.
    pub archive: Duration,
    /// Late rows produced to the dead-letter topic and awaited.
    pub dead_letters: Duration,
    pub checkpoint: Duration,
}

/// The window stage as a sink: late rows to the dead-letter queue, closed days to
/// whoever listens on `closed` (the forecaster, the archive, a test).
pub struct WindowStage {
    pub windows: DailyWindows,
    pub times: WindowStageTimes,
    dead_letters: DeadLetterQueue,
    closed: Option<tokio::sync::mpsc::Sender<RecordBatch>>,
    archive: Option<ParquetArchive>,
    checkpoints: Option<Checkpointing>,
    metrics: Option<Arc<Metrics>>,
    pub tally: BatchTally,
}

/// When and where the stage saves its state, and what the state covers so far.
struct Checkpointing {
    store: CheckpointStore,
    interval: Duration,
    last_saved: Option<Instant>,
    /// Per partition, one past the last offset folded into the windows.
    covered: BTreeMap<PartitionId, SourcePosition>,
}

impl WindowStage {
    pub fn new(
        windows: DailyWindows,
        dead_letters: DeadLetterQueue,
        closed: Option<tokio::sync::mpsc::Sender<RecordBatch>>,
    ) -> Self {
        Self {
            windows,
            dead_letters,
            closed,
            archive: None,
            checkpoints: None,
            metrics: None,
            tally: BatchTally::default(),
            times: WindowStageTimes::default(),
        }
    }

    /// Report batch sizes, latencies, window counts and checkpoint times to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also archive raw rows and closed days as Parquet.
    pub fn with_archive(mut self, archive: Option<ParquetArchive>) -> Self {
        self.archive = archive;
        self
    }

    /// Checkpoint the state to `store` at most every `interval`; `resumed` are the
    /// positions of the checkpoint the windows were restored from, if any.
    pub fn with_checkpoints(
        mut self,
        store: CheckpointStore,
        interval: Duration,
        resumed: &[SourcePosition],
    ) -> Self {
        let covered = resumed
            .iter()
            .map(|p| ((p.source.clone(), p.partition), p.clone()))
            .collect();
        self.checkpoints = Some(Checkpointing {
            store,
            interval,
            last_saved: None,
            covered,
        });
        self
    }

    /// Saves a checkpoint now (a clean shutdown); returns the positions it covers.
    pub fn checkpoint_now(&mut self) -> Result<Vec<SourcePosition>, CheckpointError> {
        let Some(c) = &mut self.checkpoints else {
            return Ok(Vec::new());
        };
        let positions: Vec<SourcePosition> = c.covered.values().cloned().collect();
        let started = Instant::now();
        let bytes = c.store.save(self.windows.state(), &positions)?;
        c.last_saved = Some(Instant::now());
        self.times.checkpoint += started.elapsed();
        if let Some(m) = &self.metrics {
            m.checkpoint_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        tracing::debug!(
            bytes,
            seconds = started.elapsed().as_secs_f64(),
            "checkpoint saved"
        );
        Ok(positions)
    }

    /// Folds a batch's positions into what the state covers and, when a checkpoint is
    /// due, saves one: returns the positions now safe to commit.
    fn durable(
        &mut self,
        positions: Vec<SourcePosition>,
    ) -> Result<Vec<SourcePosition>, SinkError> {
        let Some(c) = &mut self.checkpoints else {
            return Ok(positions);
        };
        for p in positions {
            let key = (p.source.clone(), p.partition);
            let entry = c.covered.entry(key).or_insert_with(|| p.clone());
            entry.next_offset = entry.next_offset.max(p.next_offset);
        }
        if c.last_saved.is_some_and(|t| t.elapsed() < c.interval) {
            return Ok(Vec::new());
        }
        Ok(self.checkpoint_now()?)
    }

    /// End of a finite input: close every open window.
    pub async fn finish(&mut self) -> Result<(), ScoringError> {
        let closed = self.windows.close_all()?;
        self.emit(closed).await?;
        Ok(())
    }

    /// Archives closed days and hands them on; waits while the listener's queue is full,
    /// which is what holds the source back when the forecasts fall behind.
    async fn emit(&mut self, closed: Vec<RecordBatch>) -> Result<(), ArchiveError> {
        for batch in closed {
            if let Some(archive) = &mut self.archive {
                let started = Instant::now();
                archive.daily(&batch)?;
                self.times.archive += started.elapsed();
            }
            if let Some(tx) = &self.closed {
                // A listener that went away is not our failure: the days are in the history.
                let _ = tx.send(batch).await;
            }
        }
        Ok(())
    }
}

impl BatchSink for WindowStage {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        let started = Instant::now();
        if let Some(archive) = &mut self.archive {
            archive.raw(&batch.rows)?;
            self.times.archive += started.elapsed();
        }
        let windows = &mut self.windows;
        let now = voltcast_ingest::now_millis();
        let out = on_cpu(&mut self.times.windows, || windows.apply(&batch, now))?;
        let lettering = Instant::now();
        for letter in out.late {
            self.dead_letters.send(letter)?;
        }
        self.dead_letters.flush().await?;
        self.times.dead_letters += lettering.elapsed();
        self.emit(out.closed).await?;
        if let Some(m) = &self.metrics {
            m.batch_rows.observe(batch.rows.num_rows() as f64);
            m.batch_seconds.observe(started.elapsed().as_secs_f64());
            m.refresh_windows(self.windows.stats(), self.windows.state().battery_count());
        }
        let positions = self.tally.accept(batch).await?;
        self.durable(positions)
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
    pub window_times: WindowStageTimes,
    /// CPU time the alert stage spent deciding and storing alerts.
    pub alert_seconds: f64,
    pub received: u64,
    pub rejected: u64,
    pub seconds: f64,
    pub forecast: crate::forecasting::ForecastStats,
    /// Latest assessment per battery.
    pub risks: std::collections::HashMap<Arc<str>, crate::forecasting::RiskUpdate>,
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
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            alerts = alerts.with_events(tx);
            let publisher = AlertPublisher {
                producer,
                topic: config.alerts.topic.clone(),
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
            workers,
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
        for w in self.workers {
            let _ = w.await;
        }
        if let Err(e) = self
            .alerts
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync()
        {
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

/// Closed-day batches (one per shard per micro-batch) waiting for the forecast stage.
const CLOSED_QUEUE: usize = 2;
/// Batches of risk updates waiting for the alert stage.
const RISK_QUEUE: usize = 2;

/// Runs the configured source with services already started.
pub async fn run_with(
    config: &VoltcastConfig,
    services: &Services,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, ScoringError> {
    let counters = services.counters.clone();
    let started = Instant::now();
    let (batch, rules) = (config.batch.clone(), config.validation.clone());
    let (closed_tx, closed_rx) = tokio::sync::mpsc::channel(CLOSED_QUEUE);
    let (risk_tx, risk_rx) = tokio::sync::mpsc::channel(RISK_QUEUE);
    let fit_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut forecasts =
        ForecastStage::new(config.forecast.clone(), config.risk.clone(), fit_threads)
            .with_metrics(services.metrics.clone());
    let alert_stage = AlertStage::new(&config.alerts, services.alerts.clone());
    let alert_task = tokio::spawn(alert_stage.run(risk_rx));
    let stage = match config.source {
        SourceKind::Kafka => {
            let producer = config.kafka.dead_letter_producer()?;
            let late = DeadLetterQueue::kafka(producer, config.kafka.dead_letter_topic.clone());
            let (windows, resumed, store) = restore(config)?;
            // After a restart the models start from the checkpointed histories.
            forecasts.seed(windows.state());
            let forecast_task = tokio::spawn(forecasts.run(closed_rx, risk_tx));
            let mut stage = WindowStage::new(windows, late, Some(closed_tx))
                .with_archive(ParquetArchive::new(&config.archive))
                .with_metrics(services.metrics.clone());
            if let Some(store) = store {
                let interval = Duration::from_secs(config.checkpoint.interval_seconds);
                stage = stage.with_checkpoints(store, interval, &resumed);
            }
            let source = KafkaSource::new(&config.kafka, batch, rules, counters.clone())?
                .resume_from(&resumed);
            services.ready.store(true, Ordering::Relaxed);
            let consuming = Instant::now();
            source.run(&mut stage, shutdown).await?;
            let source_seconds = consuming.elapsed().as_secs_f64();
            stage.checkpoint_now()?;
            (stage, forecast_task, source_seconds)
        }
        SourceKind::File => {
            // A file replay is a batch job that starts from the top: no checkpoint.
            let windows = DailyWindows::new(config.windows.clone());
            let dead_letters = config.file.default_dead_letters();
            let forecast_task = tokio::spawn(forecasts.run(closed_rx, risk_tx));
            let mut stage = WindowStage::new(
                windows,
                DeadLetterQueue::file(&dead_letters),
                Some(closed_tx),
            )
            .with_archive(ParquetArchive::new(&config.archive))
            .with_metrics(services.metrics.clone());
            let dlq = DeadLetterQueue::file(dead_letters);
            services.ready.store(true, Ordering::Relaxed);
            let source = FileSource::new(config.file.clone(), batch, rules, counters.clone(), dlq);
            let consuming = Instant::now();
            source.run(&mut stage).await?;
            stage.finish().await?;
            let source_seconds = consuming.elapsed().as_secs_f64();
            (stage, forecast_task, source_seconds)
        }
    };
    let (mut stage, forecast_task, source_seconds) = stage;
    let window_times = stage.times;
    let windows = stage.windows.stats().clone();
    let aggregate = stage.windows.aggregate_work();
    let tally = std::mem::take(&mut stage.tally);
    // Dropping the stage closes the closed-day channel: the forecast stage finishes its
    // selections in flight and stops.
    drop(stage);
    let forecast = forecast_task.await.map(|f| f.stats).unwrap_or_default();
    let alert_seconds = alert_task.await.map_or(0.0, |a| a.busy.as_secs_f64());
    let (risks, alerts) = {
        let store = services
            .alerts
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let risks = store
            .latest_all()
            .map(|u| (u.battery_id.clone(), u.clone()))
            .collect();
        (risks, store.alerts().count())
    };
    services.metrics.refresh_ingest(&counters);
    Ok(RunReport {
        windows,
        aggregate,
        source_seconds,
        window_times,
        alert_seconds,
        tally,
        received: counters.received(),
        rejected: counters.rejected_total(),
        seconds: started.elapsed().as_secs_f64(),
        forecast,
        risks,
        alerts,
    })
}

/// The window state to start from: the checkpoint's when there is one.
fn restore(
    config: &VoltcastConfig,
) -> Result<(DailyWindows, Vec<SourcePosition>, Option<CheckpointStore>), ScoringError> {
    if !config.checkpoint.enabled {
        return Ok((DailyWindows::new(config.windows.clone()), Vec::new(), None));
    }
    let store = CheckpointStore::new(&config.checkpoint.path);
    match store.load()? {
        Some(ckpt) => {
            tracing::info!(
                path = %store.file().display(),
                batteries = ckpt.windows.battery_count(),
                "resuming from checkpoint"
            );
            let windows = DailyWindows::from_state(config.windows.clone(), ckpt.windows);
            Ok((windows, ckpt.positions, Some(store)))
        }
        None => Ok((
            DailyWindows::new(config.windows.clone()),
            Vec::new(),
            Some(store),
        )),
    }
}
