//! Restart from partition checkpoints: the pipeline is killed abruptly (its task dropped,
//! no clean shutdown, no final checkpoint) at several points in a stream, restarted from
//! the partitions' last checkpoints each time, and must end with exactly the daily series
//! and counts of a run that was never interrupted: no battery-day lost, none counted
//! twice, whatever the micro-batches' boundaries were.
//!
//! The whole stream is published before consuming starts, so this is also the backlog
//! catch-up case where partitions are drained unevenly (each partition's windows follow
//! its own event time, so that does not matter).
//!
//! The raw and daily archive must also equal the uninterrupted run's: every record and
//! every closed day archived once, nothing left half-written.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Date32Type, Float64Type};
use rdkafka::mocking::MockCluster;
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, publish_kafka};
use voltcast_ingest::{
    BatchConfig, BatchSink, DeadLetterQueue, IngestCounters, KafkaConfig, KafkaSource, MicroBatch,
    SinkError, SourcePosition, ValidationConfig,
};
use voltcast_scoring::archive::{ArchiveConfig, ParquetArchive};
use voltcast_scoring::checkpoint::CheckpointStore;
use voltcast_scoring::partition::{PartitionSet, PartitionSettings};
use voltcast_scoring::pipeline::PartitionStage;
use voltcast_scoring::windows::{WindowConfig, WindowStats, daily};

const TOPIC: &str = "battery-telemetry";

/// (battery, day) -> (trips, minutes, cycles, lifetime, imputed)
type Series = BTreeMap<(String, i32), (f64, f64, f64, f64, bool)>;

/// Passes batches to the window stage and records how far each partition got, so the
/// test knows where in the stream it is.
struct Probe {
    stage: PartitionStage,
    progress: Arc<Mutex<BTreeMap<i32, i64>>>,
    /// Offsets (summed) the partitions' checkpoints covered when the first batch came.
    resumed: Arc<Mutex<Option<i64>>>,
}

impl BatchSink for Probe {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        {
            let mut resumed = self.resumed.lock().unwrap();
            if resumed.is_none() {
                let tasks = self.stage.partitions.lock();
                let mut progress = self.progress.lock().unwrap();
                for task in tasks.values() {
                    progress.insert(task.key.partition, task.next_offset.unwrap_or(0));
                }
                *resumed = Some(tasks.values().filter_map(|t| t.next_offset).sum());
            }
        }
        let seen: Vec<_> = batch
            .positions
            .iter()
            .map(|p| (p.partition, p.next_offset))
            .collect();
        let durable = self.stage.accept(batch).await?;
        let mut progress = self.progress.lock().unwrap();
        for (partition, next) in seen {
            let e = progress.entry(partition).or_default();
            *e = (*e).max(next);
        }
        Ok(durable)
    }

    async fn checkpoint(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        self.stage.checkpoint().await
    }
}

fn read_offsets(progress: &Mutex<BTreeMap<i32, i64>>) -> i64 {
    progress.lock().unwrap().values().sum()
}

/// Adds closed days to `series`; a day closed again after a restart must be the same day.
fn collect(series: &mut Series, batches: Vec<RecordBatch>) {
    for b in batches {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (ids, day, trips) = (col(daily::BATTERY_ID), col(daily::DAY), col(daily::TRIPS));
        let (minutes, cycles, lifetime, imputed) = (
            col(daily::MINUTES),
            col(daily::CYCLES),
            col(daily::LIFETIME),
            col(daily::IMPUTED),
        );
        for i in 0..b.num_rows() {
            let key = (
                ids.as_string::<i32>().value(i).to_string(),
                day.as_primitive::<Date32Type>().value(i),
            );
            let row = (
                trips.as_primitive::<Float64Type>().value(i),
                minutes.as_primitive::<Float64Type>().value(i),
                cycles.as_primitive::<Float64Type>().value(i),
                lifetime.as_primitive::<Float64Type>().value(i),
                imputed.as_boolean().value(i),
            );
            if let Some(before) = series.insert(key.clone(), row) {
                assert_eq!(before, row, "{key:?} closed twice with different values");
            }
        }
    }
}

struct Incarnation {
    series: Series,
    /// The window counts at the end of the stream (None for a killed life).
    stats: Option<WindowStats>,
    /// Offsets (summed over partitions) the checkpoint this life started from covered.
    resumed_from: i64,
}

/// Runs one life of the pipeline: restores each assigned partition from its checkpoint
/// in `ckpt`, consumes, and either is killed once `kill_at` offsets have been read or
/// (None) runs to the end of the stream. Archives to `ckpt`/archive.
async fn live(kafka: &KafkaConfig, ckpt: &Path, total: i64, kill_at: Option<i64>) -> Incarnation {
    let store = CheckpointStore::open(ckpt).unwrap();
    let settings = PartitionSettings {
        archive: ParquetArchive::new(&ArchiveConfig {
            path: ckpt.join("archive"),
        }),
        ..PartitionSettings::windows_only(WindowConfig::default())
    };
    let partitions = Arc::new(PartitionSet::assigned_by_group(settings, Some(store), None));
    let (tx, rx) = std::sync::mpsc::channel();
    let (late_queue, _late) = DeadLetterQueue::memory();
    let stage = PartitionStage::new(partitions.clone(), late_queue)
        .with_closed_tap(tx)
        // A few batches per checkpoint, so a restart has to re-read what came after it.
        .with_checkpoints_every(Duration::from_millis(40));
    let progress = Arc::new(Mutex::new(BTreeMap::new()));
    let resumed = Arc::new(Mutex::new(None));
    let mut probe = Probe {
        stage,
        progress: progress.clone(),
        resumed: resumed.clone(),
    };
    let (dlq, _rejected) = DeadLetterQueue::memory();
    let batch = BatchConfig {
        max_rows: 1_500,
        max_wait_ms: 50,
    };
    let source = KafkaSource::with_dead_letters(
        kafka,
        batch,
        ValidationConfig::default(),
        Arc::new(IngestCounters::default()),
        dlq,
    )
    .unwrap()
    .with_partition_listener(partitions.clone());
    let watched = progress.clone();
    let stop_at = kill_at.unwrap_or(total);
    let all_read = async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while read_offsets(&watched) < stop_at && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut series = Series::new();
    let started = std::time::Instant::now();
    let report = |progress: &Mutex<BTreeMap<i32, i64>>| {
        eprintln!(
            "life to {stop_at}: read {} of {total} offsets in {:.1?}",
            read_offsets(progress),
            started.elapsed()
        )
    };
    if kill_at.is_some() {
        let task = tokio::spawn(async move {
            source
                .run(&mut probe, std::future::pending())
                .await
                .unwrap();
        });
        all_read.await;
        report(&progress);
        // Abrupt: nothing more is written, and the task (consumer, stage, state) is
        // dropped wherever it is.
        partitions.halt();
        task.abort();
        let _ = task.await;
        collect(&mut series, rx.try_iter().collect());
        let resumed_from = resumed.lock().unwrap().unwrap_or(0);
        return Incarnation {
            series,
            stats: None,
            resumed_from,
        };
    }
    source.run(&mut probe, all_read).await.unwrap();
    report(&progress);
    assert_eq!(
        read_offsets(&progress),
        total,
        "the stream was not read to its end"
    );
    // Days close as the watermark passes them; the last open days stay open in both
    // runs (a stream has no end).
    collect(&mut series, rx.try_iter().collect());
    let resumed_from = resumed.lock().unwrap().unwrap_or(0);
    Incarnation {
        series,
        stats: Some(probe.stage.report().work.windows),
        resumed_from,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_runs_equal_an_uninterrupted_one() {
    // Small enough to publish whole within the mock broker's 5 MiB per partition.
    let sim = SimulatorConfig {
        batteries: 250,
        days: 90,
        seed: 11,
        ..Default::default()
    };
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 3, 1).unwrap();
    let mut kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        ..Default::default()
    };
    // A killed consumer never leaves its group; the restarted one waits out its session.
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ] {
        kafka.properties.insert(k.into(), v.into());
    }
    let total = publish(&kafka, sim).await;
    let dir = tempfile::tempdir().unwrap();

    // The uninterrupted run, in its own consumer group and checkpoint directory.
    let whole = KafkaConfig {
        group_id: "uninterrupted".into(),
        ..kafka.clone()
    };
    let want = live(&whole, &dir.path().join("whole"), total, None).await;
    let want_stats = want.stats.clone().unwrap();
    assert!(
        want.series.len() > 250 * 80,
        "closed days: {}",
        want.series.len()
    );
    assert_eq!(want_stats.late, 0, "a backlog must not turn rows late");
    assert_eq!(want.resumed_from, 0);

    // The same stream, killed at 20%, 45% and 70% of it and restarted each time.
    let killed = KafkaConfig {
        group_id: "killed".into(),
        ..kafka.clone()
    };
    let ckpt = dir.path().join("killed");
    let mut got = Series::new();
    let mut resumed = Vec::new();
    for fraction in [0.20, 0.45, 0.70] {
        let life = live(
            &killed,
            &ckpt,
            total,
            Some((total as f64 * fraction) as i64),
        )
        .await;
        assert!(life.stats.is_none());
        resumed.push(life.resumed_from);
        merge(&mut got, life.series);
    }
    let last = live(&killed, &ckpt, total, None).await;
    resumed.push(last.resumed_from);
    merge(&mut got, last.series);
    // What the test is about, whatever the timing: every restart resumed from a
    // checkpoint a killed life wrote, further into the stream each time (the first
    // life checkpoints with its first batch).
    assert_eq!(resumed[0], 0);
    assert!(
        resumed.windows(2).all(|w| w[1] > w[0]),
        "each life resumed further on: {resumed:?}"
    );

    assert_eq!(
        got.len(),
        want.series.len(),
        "battery-days differ in number"
    );
    let differing: Vec<_> = want
        .series
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(3)
        .collect();
    assert!(differing.is_empty(), "first differences: {differing:?}");
    // Counts restored from the checkpoint and continued: nothing counted twice.
    assert_eq!(last.stats.unwrap(), want_stats);

    // The archive: every record once, every closed day once, nothing left staged.
    let (whole_archive, killed_archive) = (
        dir.path().join("whole/archive"),
        dir.path().join("killed/archive"),
    );
    let raw = common::archived(&whole_archive, "raw", "event_time");
    assert!(raw.len() as i64 > total * 9 / 10, "raw rows: {}", raw.len());
    let got_raw = common::archived(&killed_archive, "raw", "event_time");
    assert_eq!(got_raw.len(), raw.len(), "raw rows archived");
    assert!(got_raw == raw, "the same raw rows");
    let daily = common::archived(&whole_archive, "daily", "day");
    assert_eq!(daily.len(), want.series.len());
    assert!(
        common::archived(&killed_archive, "daily", "day") == daily,
        "the same closed days, each once"
    );
    assert_eq!(common::staged_files(&killed_archive), 0);
}

/// Publishes the simulated fleet to `TOPIC`; returns the messages published.
async fn publish(kafka: &KafkaConfig, sim: SimulatorConfig) -> i64 {
    let producer = kafka
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let published = publish_kafka(
        &mut FleetSimulator::new(sim, WireFormat::Json).unwrap(),
        &producer,
        TOPIC,
        0.0,
        None,
    )
    .await
    .unwrap();
    published.messages as i64
}

/// A battery-day emitted by two lives (closed after the last checkpoint of the first)
/// must carry the same values both times.
fn merge(into: &mut Series, from: Series) {
    for (k, v) in from {
        if let Some(before) = into.insert(k.clone(), v) {
            assert_eq!(before, v, "{k:?} differs between lives");
        }
    }
}

/// The last batches before a quiet spell are checkpointed (and so committed) by the
/// idle stream itself, not left for the next record or a shutdown: a crash during the
/// quiet spell re-reads nothing, and the lag the group shows reaches 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_checkpoints_what_it_read_last() {
    use voltcast_ingest::PartitionListener;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 2, 1).unwrap();
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        group_id: "idle".into(),
        ..Default::default()
    };
    let sim = SimulatorConfig {
        batteries: 20,
        days: 10,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let total = publish(&kafka, sim).await;
    let dir = tempfile::tempdir().unwrap();
    let partitions = Arc::new(PartitionSet::assigned_by_group(
        PartitionSettings::windows_only(WindowConfig::default()),
        Some(CheckpointStore::open(dir.path()).unwrap()),
        None,
    ));
    // Longer than the backlog takes: no batch finds a checkpoint due.
    let mut stage = PartitionStage::new(partitions.clone(), DeadLetterQueue::memory().0)
        .with_checkpoints_every(Duration::from_millis(1_500));
    let source = KafkaSource::with_dead_letters(
        &kafka,
        BatchConfig {
            max_rows: 100,
            max_wait_ms: 20,
        },
        ValidationConfig::default(),
        Arc::new(IngestCounters::default()),
        DeadLetterQueue::memory().0,
    )
    .unwrap()
    .with_partition_listener(partitions.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        source
            .run(&mut stage, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    let read = || -> i64 {
        let tasks = partitions.lock();
        tasks.values().filter_map(|t| t.next_offset).sum()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while read() < total && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read(), total, "the stream was read");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Where a new owner would start now, while the stream is still running.
    let next_owner = PartitionSet::assigned_by_group(
        PartitionSettings::windows_only(WindowConfig::default()),
        Some(CheckpointStore::open(dir.path()).unwrap()),
        None,
    );
    let ids: Vec<voltcast_ingest::PartitionId> = (0..2).map(|p| (Arc::from(TOPIC), p)).collect();
    let resumes: i64 = next_owner.assigned(&ids).into_iter().flatten().sum();
    assert_eq!(resumes, total, "checkpointed to the end");
    let _ = stop.send(());
    run.await.unwrap();
}
