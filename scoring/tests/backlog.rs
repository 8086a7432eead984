//! The backlog stall (`voltcast run` stuck on its first backlog): the day aggregation
//! must complete in one poll however much of tokio's cooperative budget the calling task
//! has spent, and a pipeline fed a whole backlog at once must get through it.
//!
//! Both assert on work done (polls per aggregation, rows and days), not on time; the
//! thread and the deadline around the first only turn a regression's endless spin into
//! a failure instead of a hung test run.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use tokio::task::coop;
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, publish_kafka};
use voltcast_ingest::{MicroBatch, TelemetryRecord};
use voltcast_scoring::windows::{DailyWindows, WindowConfig};

/// Spends the calling task's whole cooperative budget, as a source loop on a backlog
/// does before it hands a batch on.
async fn spend_budget() {
    while coop::has_budget_remaining() {
        std::future::poll_fn(|cx| coop::poll_proceed(cx).map(|r| r.made_progress())).await;
    }
    assert!(!coop::has_budget_remaining());
}

fn fleet_batch(batteries: usize, days: u32) -> MicroBatch {
    let mut sim = FleetSimulator::new(
        SimulatorConfig {
            batteries,
            days,
            malformed_rate: 0.0,
            ..Default::default()
        },
        WireFormat::Json,
    )
    .unwrap();
    let mut payloads = Vec::new();
    while let Some(day) = sim.next_day() {
        payloads.extend(day.messages.into_iter().map(|m| m.payload));
    }
    let rules = voltcast_ingest::ValidationConfig::default();
    let records: Vec<TelemetryRecord<'_>> = payloads
        .iter()
        .map(|p| {
            voltcast_ingest::decode::decode_json(p, &rules, voltcast_ingest::now_millis()).unwrap()
        })
        .collect();
    MicroBatch::from_records(&records, Arc::from("t"))
}

#[test]
fn a_task_that_spent_its_budget_still_aggregates_in_one_poll() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let outcome = runtime.block_on(async {
            let mut checks = Vec::new();
            // One shard: the plan runs on this task. Two shards and a batch over 4,096
            // rows: the first shard on this thread, the other on a thread of its own.
            for (shards, batteries) in [(1, 50), (2, 1_000)] {
                let batch = fleet_batch(batteries, 10);
                let mut windows = DailyWindows::new(WindowConfig {
                    shards,
                    ..Default::default()
                });
                spend_budget().await;
                let out = windows.apply(&batch, 0).unwrap();
                let closed: usize = out.closed.iter().map(|b| b.num_rows()).sum();
                checks.push((
                    shards,
                    batch.rows.num_rows(),
                    closed,
                    windows.aggregate_work(),
                ));
            }
            checks
        });
        let _ = done_tx.send(outcome);
    });
    let checks = done_rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the window stage never finished a batch: the aggregation spins");
    for (shards, rows, closed, work) in checks {
        assert!(
            rows > 0 && closed > 0,
            "{shards} shard(s): {rows} rows, {closed} closed"
        );
        // Per shard: running the query on the batch, after planning it unless the
        // process's session already had an idle plan (an earlier batch's).
        let shards = shards as u64;
        assert!(
            (shards..=2 * shards).contains(&work.plans_run),
            "{shards} shard(s): run once per shard, planned at most once: {work:?}"
        );
        assert_eq!(
            work.polls, work.plans_run,
            "{shards} shard(s): every plan completes in its first poll"
        );
    }
}

/// A backlog produced before the pipeline starts, read in small micro-batches that
/// still take the two-shard path: every record is read, every day up to the watermark
/// closes, and no aggregation had to be polled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_started_on_a_backlog_gets_through_it() {
    let sim = SimulatorConfig {
        batteries: 300,
        days: 60,
        seed: 3,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("battery-telemetry", 4, 1).unwrap();
    cluster.create_topic("battery-telemetry-dlq", 1, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = voltcast_scoring::VoltcastConfig::default();
    config.kafka.brokers = cluster.bootstrap_servers();
    config.api.listen = String::new();
    config.alerts.store_path = dir.path().join("alerts");
    config.alerts.publish_to_kafka = false;
    config.checkpoint.path = dir.path().join("checkpoint");
    config.archive.path = std::path::PathBuf::new();
    config.batch.max_rows = 5_000;
    config.windows.shards = 2;

    let producer = config
        .kafka
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut fleet = FleetSimulator::new(sim.clone(), WireFormat::Json).unwrap();
    let summary = publish_kafka(&mut fleet, &producer, "battery-telemetry", 0.0, None)
        .await
        .unwrap();
    let total = summary.messages as u64;
    assert!(total > 18_000, "a backlog of {total} messages");

    let services = voltcast_scoring::pipeline::Services::start(&config)
        .await
        .unwrap();
    let counters = services.counters.clone();
    let all_read = async move {
        // Bounded only so that a regression fails instead of hanging the test run.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while counters.received() < total && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let report = voltcast_scoring::pipeline::run_with(&config, &services, all_read)
        .await
        .unwrap();
    services.finish(Duration::from_secs(1)).await;

    assert_eq!(
        report.received, total,
        "every message of the backlog was read"
    );
    assert_eq!(report.tally.rows + report.rejected, total);
    assert!(
        report.tally.batches >= total / 5_000,
        "small micro-batches: {}",
        report.tally.batches
    );
    // The watermark trails the newest report by 36 h: all but the last two days close,
    // less the first days of batteries whose first reports are among the 2% missing.
    let closable = sim.batteries as u64 * (sim.days as u64 - 2) * 99 / 100;
    assert!(
        report.windows.days_closed >= closable,
        "{} of {closable} battery-days closed",
        report.windows.days_closed
    );
    assert!(report.aggregate.plans_run > 0);
    assert_eq!(
        report.aggregate.polls, report.aggregate.plans_run,
        "every aggregation completed in its first poll"
    );
    assert!(
        report.forecast.updates > 0,
        "forecasts ran on the closed days"
    );
}

/// A backlog's batch closes many days per battery: the policy sees each day's
/// assessment, but the batch hands on only each battery's newest (the store keeps no
/// other), so a batch's assessments in flight are bounded by its batteries.
#[test]
fn a_batch_hands_on_one_assessment_per_battery_its_newest() {
    use voltcast_scoring::forecasting::ForecastSettings;
    use voltcast_scoring::partition::{PartitionSet, PartitionSettings};

    let batch = fleet_batch(40, 60);
    let mut settings = PartitionSettings::windows_only(WindowConfig::default());
    settings.forecast = Some(ForecastSettings::new(
        Default::default(),
        Default::default(),
    ));
    settings.alerts.enabled = true;
    let metrics = Arc::new(voltcast_scoring::metrics::Metrics::new(10));
    let partitions = PartitionSet::on_sight(settings.clone(), Some(metrics.clone()));
    let mut task = partitions.fresh_task(voltcast_scoring::checkpoint::PartitionKey {
        topic: Arc::from("t"),
        partition: 0,
    });
    let out = task
        .apply(
            &batch.rows,
            &batch.positions[0],
            voltcast_ingest::now_millis(),
            &settings,
            Some(&metrics),
            None,
        )
        .unwrap();
    let assessed = metrics.risk_updates.get();
    let mut newest = std::collections::HashMap::new();
    for r in &out.risks {
        assert!(
            newest.insert(r.battery_id.clone(), r.day).is_none(),
            "{} handed on twice",
            r.battery_id
        );
    }
    let last_closed = out
        .closed
        .iter()
        .flat_map(|b| voltcast_scoring::windows::daily::closed_rows(b).unwrap())
        .map(|row| row.day)
        .max()
        .unwrap();
    assert_eq!(newest.len(), 40, "every battery has an assessment");
    // Older assessments lose their forecast and recent days; the newest keeps them.
    assert!(
        out.risks
            .iter()
            .all(|r| r.forecast.horizon() == 30 && r.recent.len() == 30),
        "an assessment handed on without its forecast or recent days"
    );
    assert!(
        assessed > 10 * newest.len() as u64,
        "{assessed} assessments made"
    );
    // Batteries far from their rating are assessed on one day a week, their own.
    let week = voltcast_scoring::forecaster::QUIET_ASSESS_EVERY_DAYS as i32;
    assert!(
        newest.values().all(|day| *day > last_closed - week),
        "each battery's newest assessment (last closed day {last_closed}) is the one handed on: {newest:?}"
    );
}

/// With a sink, a task hands each slice of closed days' newest assessments on as soon as
/// the slice is assessed (the store keeps them; nothing waits for the batch's end), and
/// the store ends on the same newest assessment per battery as a batch collected whole.
#[test]
fn a_sink_gets_each_slice_of_assessments_as_it_is_made() {
    use std::sync::Mutex;
    use voltcast_scoring::forecasting::{ForecastSettings, RiskUpdate};
    use voltcast_scoring::partition::{PartitionSet, PartitionSettings, PartitionTask};

    let batch = fleet_batch(40, 60);
    let mut settings = PartitionSettings::windows_only(WindowConfig::default());
    let slice_rows = 100;
    settings.forecast = Some(ForecastSettings {
        slice_rows,
        ..ForecastSettings::new(Default::default(), Default::default())
    });
    settings.alerts.enabled = true;
    let task = || -> PartitionTask {
        PartitionSet::on_sight(settings.clone(), None).fresh_task(
            voltcast_scoring::checkpoint::PartitionKey {
                topic: Arc::from("t"),
                partition: 0,
            },
        )
    };
    let (rows, position) = (&batch.rows, &batch.positions[0]);
    let now = voltcast_ingest::now_millis();
    let whole = task()
        .apply(rows, position, now, &settings, None, None)
        .unwrap();

    let handed: Mutex<Vec<Vec<RiskUpdate>>> = Mutex::default();
    let sink = |risks: Vec<RiskUpdate>| handed.lock().unwrap().push(risks);
    let sliced = task()
        .apply(rows, position, now, &settings, None, Some(&sink))
        .unwrap();
    let handed = handed.into_inner().unwrap();

    assert!(
        sliced.risks.is_empty(),
        "assessments kept back for the batch's end"
    );
    let closed: usize = sliced.closed.iter().map(|b| b.num_rows()).sum();
    assert_eq!(
        handed.len(),
        closed.div_ceil(slice_rows),
        "one hand-over per slice"
    );
    for slice in &handed {
        assert!(slice.len() <= slice_rows);
        let mut ids: Vec<_> = slice.iter().map(|r| r.battery_id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), slice.len(), "a slice hands a battery on twice");
    }
    let mut store = std::collections::HashMap::new();
    for r in handed.into_iter().flatten() {
        store.insert(r.battery_id.clone(), r);
    }
    assert_eq!(store.len(), whole.risks.len());
    for r in &whole.risks {
        assert_eq!(store.get(&r.battery_id), Some(r), "{}", r.battery_id);
    }
}
