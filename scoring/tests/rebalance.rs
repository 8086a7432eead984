//! Partitions move between instances with their state: 8 partitions, 3 consumers in one
//! group on librdkafka's mock cluster. One starts, two join mid-stream, one crashes (no
//! more writes, its partitions resume elsewhere from their last checkpoints), the rest
//! finish. The union of what they did must equal one uninterrupted instance's: every
//! battery-day closed once with the same values, models continued rather than selected
//! from scratch on each move, and every alert episode raised once with the same id. The
//! instances share one archive folder: it must hold every record and closed day once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Date32Type, Float64Type};
use rdkafka::mocking::MockCluster;
use voltcast_forecaster::{RiskConfig, SelectionConfig};
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, publish_kafka};
use voltcast_ingest::{
    BatchConfig, BatchSink, DeadLetterQueue, IngestCounters, KafkaConfig, KafkaSource, MicroBatch,
    SinkError, SourcePosition, ValidationConfig,
};
use voltcast_scoring::alerts::{AlertConfig, AlertService, AlertStore};
use voltcast_scoring::archive::{ArchiveConfig, ParquetArchive};
use voltcast_scoring::checkpoint::CheckpointStore;
use voltcast_scoring::forecasting::ForecastSettings;
use voltcast_scoring::metrics::Metrics;
use voltcast_scoring::overlap::Overlapped;
use voltcast_scoring::partition::{PartitionSet, PartitionSettings};
use voltcast_scoring::pipeline::PartitionStage;
use voltcast_scoring::windows::{WindowConfig, daily};

const TOPIC: &str = "battery-telemetry";
const PARTITIONS: i32 = 8;

/// (battery, day) -> (cycles, lifetime)
type Days = BTreeMap<(String, i32), (f64, f64)>;

/// Counts the offsets every instance has consumed, so the test knows how far the
/// stream is.
struct Counted {
    stage: PartitionStage,
    /// All instances' rows, and this instance's.
    read: Arc<AtomicU64>,
    own: Arc<AtomicU64>,
}

impl BatchSink for Counted {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        let rows = batch.rows.num_rows() as u64;
        let durable = self.stage.accept(batch).await?;
        self.read.fetch_add(rows, Ordering::SeqCst);
        self.own.fetch_add(rows, Ordering::SeqCst);
        Ok(durable)
    }

    async fn checkpoint(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        self.stage.checkpoint().await
    }
}

struct Instance {
    /// Rows this instance worked on.
    own: Arc<AtomicU64>,
    partitions: Arc<PartitionSet>,
    alerts: Arc<AlertService>,
    closed: std::sync::mpsc::Receiver<RecordBatch>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Archives to `ckpt`/archive.
fn settings(ckpt: &Path) -> PartitionSettings {
    PartitionSettings {
        windows: WindowConfig::default(),
        forecast: Some(ForecastSettings {
            threads: 1,
            ..ForecastSettings::new(SelectionConfig::default(), RiskConfig::default())
        }),
        alerts: AlertConfig::default(),
        archive: ParquetArchive::new(&ArchiveConfig {
            path: ckpt.join("archive"),
        }),
    }
}

fn start(kafka: &KafkaConfig, ckpt: &Path, read: Arc<AtomicU64>) -> Instance {
    let store = CheckpointStore::open(ckpt).unwrap();
    let partitions = Arc::new(PartitionSet::assigned_by_group(
        settings(ckpt),
        Some(store),
        None,
    ));
    let alerts = Arc::new(AlertService::new(
        AlertStore::in_memory(),
        Arc::new(Metrics::new(5)),
    ));
    let (tap, closed) = std::sync::mpsc::channel();
    let stage = PartitionStage::new(partitions.clone(), DeadLetterQueue::memory().0)
        .with_alerts(alerts.clone())
        .with_closed_tap(tap)
        .with_checkpoints_every(Duration::from_millis(100));
    let source = KafkaSource::with_dead_letters(
        kafka,
        BatchConfig {
            max_rows: 2_000,
            max_wait_ms: 50,
        },
        ValidationConfig::default(),
        Arc::new(IngestCounters::default()),
        DeadLetterQueue::memory().0,
    )
    .unwrap()
    .with_partition_listener(partitions.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gate = partitions.batch_gate();
    let own = Arc::new(AtomicU64::new(0));
    let counted = own.clone();
    let task = tokio::spawn(async move {
        let counted = Counted {
            stage,
            read,
            own: counted,
        };
        // As `voltcast run` does: the stage beside the source, rebalances between batches.
        let mut sink = Overlapped::start(counted, gate).unwrap();
        source
            .run(&mut sink, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        sink.into_inner().await.unwrap();
    });
    Instance {
        own,
        partitions,
        alerts,
        closed,
        stop,
        task,
    }
}

/// What an instance did: closed days, alert ids, selections.
#[derive(Default)]
struct Outcome {
    days: Days,
    /// Battery-days closed more than once with different values.
    conflicts: Vec<String>,
    alerts: BTreeSet<String>,
    selections: u64,
    /// Each battery's latest assessment: (day, model, model version, probability).
    latest: BTreeMap<String, (i32, String, u32, u64)>,
}

impl Outcome {
    fn take(
        &mut self,
        partitions: &PartitionSet,
        alerts: &AlertService,
        closed: &std::sync::mpsc::Receiver<RecordBatch>,
    ) {
        for batch in closed.try_iter() {
            let ids = batch
                .column_by_name(daily::BATTERY_ID)
                .unwrap()
                .as_string::<i32>();
            let days = batch
                .column_by_name(daily::DAY)
                .unwrap()
                .as_primitive::<Date32Type>();
            let cycles = batch
                .column_by_name(daily::CYCLES)
                .unwrap()
                .as_primitive::<Float64Type>();
            let lifetime = batch
                .column_by_name(daily::LIFETIME)
                .unwrap()
                .as_primitive::<Float64Type>();
            for i in 0..batch.num_rows() {
                let key = (ids.value(i).to_string(), days.value(i));
                let value = (cycles.value(i), lifetime.value(i));
                if let Some(before) = self.days.insert(key.clone(), value)
                    && before != value
                {
                    self.conflicts
                        .push(format!("{key:?}: {before:?} then {value:?}"));
                }
            }
        }
        let store = alerts.store.lock().unwrap();
        self.alerts
            .extend(store.alerts().map(|a| a.unwrap().alert_id));
        for u in store.latest_all() {
            let seen = (
                u.day,
                u.model.to_string(),
                u.model_version,
                u.risk.probability.to_bits(),
            );
            let entry = self
                .latest
                .entry(u.battery_id.to_string())
                .or_insert(seen.clone());
            if seen.0 > entry.0 {
                *entry = seen;
            }
        }
        let tasks = partitions.lock();
        self.selections += partitions.departed().forecast.selections
            + tasks
                .values()
                .map(|t| t.forecast_stats.selections)
                .sum::<u64>();
    }
}

async fn wait_for(read: &AtomicU64, at_least: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while read.load(Ordering::SeqCst) < at_least && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until at least `at_least` rows were read and nothing more came for 5 s.
async fn wait_quiet(read: &AtomicU64, at_least: u64) {
    wait_for(read, at_least).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = read.load(Ordering::SeqCst);
    let mut since = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline && since.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = read.load(Ordering::SeqCst);
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        }
    }
}

async fn stop(instance: Instance, outcome: &mut Outcome) {
    let Instance {
        partitions,
        alerts,
        closed,
        stop,
        task,
        ..
    } = instance;
    let _ = stop.send(());
    task.await.unwrap();
    outcome.take(&partitions, &alerts, &closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_with_their_state_between_instances() {
    let sim = SimulatorConfig {
        batteries: 240,
        days: 150,
        seed: 21,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    let mut kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        ..Default::default()
    };
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "300"),
    ] {
        kafka.properties.insert(k.into(), v.into());
    }
    let producer: rdkafka::producer::FutureProducer = kafka
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // About one row per battery-day: where in the stream the instances join and crash.
    let expected = (sim.batteries * sim.days as usize) as u64;

    // Three instances of one group sharing one checkpoint store, while the fleet is
    // published day by day (a backlog would be drained by the first before the others
    // had joined).
    let group = KafkaConfig {
        group_id: "shared".into(),
        ..kafka.clone()
    };
    let ckpt = dir.path().join("shared");
    let read = Arc::new(AtomicU64::new(0));
    let mut got = Outcome::default();
    let a = start(&group, &ckpt, read.clone());
    let paced = sim.clone();
    let publisher = tokio::spawn(async move {
        let mut fleet = FleetSimulator::new(paced, WireFormat::Json).unwrap();
        let published = publish_kafka(&mut fleet, &producer, TOPIC, 4.0, None)
            .await
            .unwrap();
        published.messages as u64
    });
    wait_for(&read, expected / 5).await;
    // Each newcomer works on its share for a while before the next step.
    let b = start(&group, &ckpt, read.clone());
    wait_for(&b.own, expected / 20).await;
    let c = start(&group, &ckpt, read.clone());
    wait_for(&c.own, expected / 40).await;
    // B crashes: nothing more is written; its partitions resume elsewhere from their
    // last checkpoints, and what it did after them is done again.
    let (a_own, b_own, c_own) = (a.own.clone(), b.own.clone(), c.own.clone());
    b.partitions.halt();
    b.task.abort();
    let _ = b.task.await;
    got.take(&b.partitions, &b.alerts, &b.closed);
    let total = publisher.await.unwrap();
    // The survivors read the rest (plus what B's partitions replay).
    wait_quiet(&read, total).await;
    stop(a, &mut got).await;
    stop(c, &mut got).await;

    // One instance, never interrupted.
    let single_read = Arc::new(AtomicU64::new(0));
    let single_kafka = KafkaConfig {
        group_id: "single".into(),
        ..kafka.clone()
    };
    let single = start(
        &single_kafka,
        &dir.path().join("single"),
        single_read.clone(),
    );
    wait_quiet(&single_read, total).await;
    let mut want = Outcome::default();
    stop(single, &mut want).await;
    assert_eq!(single_read.load(Ordering::SeqCst), total);
    assert!(want.conflicts.is_empty(), "{:?}", &want.conflicts[..1]);
    assert!(
        want.days.len() > sim.batteries * 140,
        "closed days: {}",
        want.days.len()
    );
    assert!(!want.alerts.is_empty(), "the fleet raises alerts");

    let rows = [&a_own, &b_own, &c_own].map(|r| r.load(Ordering::SeqCst));
    eprintln!(
        "rows per instance {rows:?} of {total}; selections {} in three instances, {} in one",
        got.selections, want.selections
    );
    assert!(
        rows.iter().all(|r| *r > total / 50),
        "every instance worked on partitions: {rows:?}"
    );
    assert!(got.conflicts.is_empty(), "{:?}", &got.conflicts[..1]);
    let missing: Vec<_> = want
        .days
        .keys()
        .filter(|k| !got.days.contains_key(*k))
        .take(3)
        .collect();
    assert!(missing.is_empty(), "battery-days lost: {missing:?}");
    let differing: Vec<_> = want
        .days
        .iter()
        .filter(|(k, v)| got.days.get(*k) != Some(v))
        .take(3)
        .collect();
    assert!(differing.is_empty(), "battery-days differ: {differing:?}");
    assert_eq!(got.days.len(), want.days.len());
    assert_eq!(got.alerts, want.alerts, "the same alerts, each once");
    // Models move with their partitions: a handoff that re-selected from scratch would
    // restart the model versions and change the risks that follow.
    let differing: Vec<_> = want
        .latest
        .iter()
        .filter(|(k, v)| got.latest.get(*k) != Some(v))
        .take(3)
        .collect();
    assert_eq!(got.latest.len(), want.latest.len());
    assert!(
        differing.is_empty(),
        "latest assessments differ: {differing:?}"
    );

    // One archive for the three: each record and each closed day once.
    let (shared, single) = (ckpt.join("archive"), dir.path().join("single/archive"));
    let raw = common::archived(&single, "raw", "event_time");
    assert_eq!(raw.len() as u64, total);
    assert!(common::archived(&shared, "raw", "event_time") == raw);
    let daily = common::archived(&single, "daily", "day");
    assert_eq!(daily.len(), want.days.len());
    assert!(common::archived(&shared, "daily", "day") == daily);
    assert_eq!(common::staged_files(&shared), 0);
}

/// The handoff itself, through the listener the consumer calls: a revoked partition is
/// checkpointed, and the instance it is assigned to next continues with its histories,
/// models, episodes and offset, and writes under a later sequence number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_partition_is_continued_by_its_next_owner() {
    use voltcast_ingest::PartitionListener;
    let dir = tempfile::tempdir().unwrap();
    let owner = |_: ()| {
        Arc::new(PartitionSet::assigned_by_group(
            settings(dir.path()),
            Some(CheckpointStore::open(dir.path()).unwrap()),
            None,
        ))
    };
    let partition: voltcast_ingest::PartitionId = (Arc::from(TOPIC), 3);
    let first = owner(());
    assert_eq!(first.assigned(std::slice::from_ref(&partition)), vec![None]);
    let mut stage = PartitionStage::new(first.clone(), DeadLetterQueue::memory().0);
    let sim = SimulatorConfig {
        batteries: 20,
        days: 60,
        seed: 4,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let mut fleet = FleetSimulator::new(sim, WireFormat::Json)
        .unwrap()
        .without_payloads();
    let mut offset = 0;
    while let Some(day) = fleet.next_day() {
        let records: Vec<_> = day.messages.into_iter().filter_map(|m| m.record).collect();
        offset += records.len() as i64;
        let mut batch = MicroBatch::from_records(&records, partition.0.clone());
        batch.positions[0].partition = partition.1;
        batch.positions[0].next_offset = offset;
        batch.parts[0].partition = partition.clone();
        stage.accept(batch).await.unwrap();
    }
    let key = voltcast_scoring::checkpoint::PartitionKey {
        topic: partition.0.clone(),
        partition: partition.1,
    };
    let (models, days, id) = {
        let tasks = first.lock();
        let task = &tasks[&key];
        let id = task
            .windows
            .state()
            .batteries()
            .next()
            .unwrap()
            .id
            .to_string();
        (task.models.len(), task.windows.stats().days_closed, id)
    };
    assert_eq!(models, 20);
    assert!(first.lock()[&key].models.record(&id).is_some());
    first.revoked(std::slice::from_ref(&partition));
    assert!(first.lock().is_empty(), "a revoked partition leaves");

    let next = owner(());
    assert_eq!(
        next.assigned(std::slice::from_ref(&partition)),
        vec![Some(offset)],
        "the next owner starts where the last checkpoint ends"
    );
    let tasks = next.lock();
    let task = &tasks[&key];
    assert_eq!(task.models.len(), 20, "models move with the partition");
    assert!(task.models.record(&id).is_some(), "with their fitted state");
    assert_eq!(task.windows.stats().days_closed, days);
    drop(tasks);
    // The first owner, had it not noticed, could no longer write: the next owner's
    // claim took the sequence number it would write under.
    let store = CheckpointStore::open(dir.path()).unwrap();
    let seqs = store.sequence_numbers(&key).unwrap();
    assert!(seqs.len() >= 2, "checkpoint and claim: {seqs:?}");
}

/// A checkpoint of an earlier release (one file for the whole process) cannot be split
/// by partition: opening the store stops start-up, saying how to rebuild.
#[test]
fn a_single_file_checkpoint_of_an_earlier_release_stops_start_up_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(voltcast_scoring::checkpoint::LEGACY_FILE),
        b"VCKPT003",
    )
    .unwrap();
    let err = CheckpointStore::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("windows.ckpt") && err.contains("--reset-offsets --to-earliest"),
        "{err}"
    );
}

/// A partition whose records jump past where its state resumed (a broker that skipped
/// them, as tansu 0.6's memory engine does after a seek into a record batch) is counted
/// and named, not silently taken as read.
#[tokio::test]
async fn records_a_partition_never_received_are_counted_as_skipped_offsets() {
    let metrics = Arc::new(Metrics::new(5));
    let settings = PartitionSettings::windows_only(WindowConfig::default());
    let partitions = Arc::new(PartitionSet::on_sight(settings, Some(metrics.clone())));
    let mut stage = PartitionStage::new(partitions, DeadLetterQueue::memory().0);
    let sim = SimulatorConfig {
        batteries: 5,
        days: 3,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let mut fleet = FleetSimulator::new(sim, WireFormat::Json)
        .unwrap()
        .without_payloads();
    // Offsets each day's batch covers: 0..10, then 15..25 (5 never arrived), then 25..35.
    for (first, next) in [(0, 10), (15, 25), (25, 35)] {
        let day = fleet.next_day().unwrap();
        let records: Vec<_> = day.messages.into_iter().filter_map(|m| m.record).collect();
        let mut batch = MicroBatch::from_records(&records, Arc::from(TOPIC));
        batch.positions[0].first_offset = first;
        batch.positions[0].next_offset = next;
        stage.accept(batch).await.unwrap();
    }
    assert_eq!(metrics.source_offsets_skipped.get(), 5);
    let text = metrics.render();
    assert!(
        text.contains("voltcast_source_offsets_skipped_total 5"),
        "{text}"
    );
}
