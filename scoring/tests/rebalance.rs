//! Partitions move between instances with their state: 8 partitions, 3 consumers in one
//! group on librdkafka's mock cluster. One starts, two join mid-stream, one crashes (no
//! more writes, its partitions resume elsewhere from their last checkpoints), the rest
//! finish. The union of what they did must equal one uninterrupted instance's: every
//! battery-day closed once with the same values, models continued rather than selected
//! from scratch on each move, and every alert episode raised once with the same id.

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
use voltcast_scoring::checkpoint::CheckpointStore;
use voltcast_scoring::forecasting::ForecastSettings;
use voltcast_scoring::metrics::Metrics;
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
    read: Arc<AtomicU64>,
}

impl BatchSink for Counted {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        let rows = batch.rows.num_rows() as u64;
        let durable = self.stage.accept(batch).await?;
        self.read.fetch_add(rows, Ordering::SeqCst);
        Ok(durable)
    }

    async fn checkpoint(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        self.stage.checkpoint().await
    }
}

struct Instance {
    partitions: Arc<PartitionSet>,
    alerts: Arc<AlertService>,
    closed: std::sync::mpsc::Receiver<RecordBatch>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn settings() -> PartitionSettings {
    PartitionSettings {
        windows: WindowConfig::default(),
        forecast: Some(ForecastSettings {
            threads: 1,
            ..ForecastSettings::new(SelectionConfig::default(), RiskConfig::default())
        }),
        alerts: AlertConfig::default(),
    }
}

fn start(kafka: &KafkaConfig, ckpt: &Path, read: Arc<AtomicU64>) -> Instance {
    let store = CheckpointStore::open(ckpt).unwrap();
    let partitions = Arc::new(PartitionSet::assigned_by_group(
        settings(),
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
    let task = tokio::spawn(async move {
        let mut sink = Counted { stage, read };
        source
            .run(&mut sink, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Instance {
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
            .extend(store.alerts().map(|a| a.alert_id.clone()));
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
    let producer = kafka
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let published = publish_kafka(
        &mut FleetSimulator::new(sim.clone(), WireFormat::Json).unwrap(),
        &producer,
        TOPIC,
        0.0,
        None,
    )
    .await
    .unwrap();
    let total = published.messages as u64;
    let dir = tempfile::tempdir().unwrap();

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

    // Three instances of another group sharing one checkpoint store.
    let group = KafkaConfig {
        group_id: "shared".into(),
        ..kafka.clone()
    };
    let ckpt = dir.path().join("shared");
    let read = Arc::new(AtomicU64::new(0));
    let mut got = Outcome::default();
    let a = start(&group, &ckpt, read.clone());
    wait_for(&read, total / 5).await;
    let b = start(&group, &ckpt, read.clone());
    wait_for(&read, total * 2 / 5).await;
    let c = start(&group, &ckpt, read.clone());
    wait_for(&read, total * 3 / 5).await;
    // B crashes: nothing more is written; its partitions resume elsewhere from their
    // last checkpoints, and what it did after them is done again.
    b.partitions.halt();
    b.task.abort();
    let _ = b.task.await;
    got.take(&b.partitions, &b.alerts, &b.closed);
    // The survivors read the rest (plus what B's partitions replay), once B's session
    // has timed out and its partitions are reassigned.
    wait_quiet(&read, total).await;
    stop(a, &mut got).await;
    stop(c, &mut got).await;

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
    // Models move with their partitions: a handoff re-selecting from scratch would add
    // one selection per battery moved, several times over.
    assert!(
        got.selections < want.selections + sim.batteries as u64 / 4,
        "selections: {} in three instances, {} in one",
        got.selections,
        want.selections
    );
}
