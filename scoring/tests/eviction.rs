//! A battery silent for longer than `retention_days` is forgotten as its partition's days
//! close: window state, model, alert episode (its open alert resolved) and the API's
//! latest assessment, counted by a metric. The batteries that keep reporting keep all of
//! theirs, and a forgotten id that reports again starts afresh.

use std::sync::Arc;

use voltcast_forecaster::{RiskConfig, SelectionConfig};
use voltcast_ingest::time::MILLIS_PER_DAY;
use voltcast_ingest::{BatchSink, DeadLetterQueue, MicroBatch, TelemetryRecord};
use voltcast_scoring::alerts::{AlertConfig, AlertFilter, AlertService, AlertStatus, AlertStore};
use voltcast_scoring::checkpoint::PartitionKey;
use voltcast_scoring::forecasting::ForecastSettings;
use voltcast_scoring::metrics::Metrics;
use voltcast_scoring::partition::{PartitionSet, PartitionSettings};
use voltcast_scoring::pipeline::PartitionStage;
use voltcast_scoring::windows::WindowConfig;

const TOPIC: &str = "t";
/// 2024-01-01
const FIRST_DAY: i64 = 19_723;

/// Battery `id`'s report for day `d`: 0.5 cycles a day, `lifetime` so far.
fn report(id: &str, d: i64, lifetime: f64, rated: f64) -> TelemetryRecord<'static> {
    TelemetryRecord {
        battery_id: id.to_string().into(),
        vehicle_id: Some(format!("V-{id}").into()),
        event_time: (FIRST_DAY + d) * MILLIS_PER_DAY + MILLIS_PER_DAY / 2,
        battery_age_days: 100 + d,
        number_of_trips: 3.0,
        daily_trip_duration: 60.0,
        daily_cycles_used: 0.5,
        lifetime_cycles_used: lifetime,
        battery_rated_cycles: rated,
        resting_voltage: None,
        state_of_charge: None,
        temperature_c: None,
    }
}

#[tokio::test]
async fn a_battery_silent_past_the_retention_is_forgotten_everywhere() {
    let metrics = Arc::new(Metrics::new(5));
    let alerts = Arc::new(AlertService::new(AlertStore::in_memory(), metrics.clone()));
    let settings = PartitionSettings {
        windows: WindowConfig {
            retention_days: 30,
            ..Default::default()
        },
        forecast: Some(ForecastSettings {
            threads: 1,
            ..ForecastSettings::new(SelectionConfig::default(), RiskConfig::default())
        }),
        alerts: AlertConfig::default(),
        archive: None,
    };
    let partitions = Arc::new(PartitionSet::on_sight(settings, Some(metrics.clone())));
    let mut stage = PartitionStage::new(partitions.clone(), DeadLetterQueue::memory().0)
        .with_alerts(alerts.clone())
        .with_metrics(metrics.clone());
    let key = PartitionKey {
        topic: Arc::from(TOPIC),
        partition: 0,
    };
    // Three batteries report every day (the watermark follows a quorum of three); "old"
    // reports for 25 days, 2 cycles short of its rating, then falls silent.
    let day = |d: i64| {
        let mut records: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| report(id, d, 100.0 + 0.5 * d as f64, 1000.0))
            .collect();
        if d < 25 {
            records.push(report("old", d, 185.0 + 0.5 * d as f64, 200.0));
        }
        MicroBatch::from_records(&records, Arc::from(TOPIC))
    };
    for d in 0..40 {
        stage.accept(day(d)).await.unwrap();
    }
    // Still within the retention: everything of "old" is there, and it alerted.
    {
        let tasks = partitions.lock();
        let task = &tasks[&key];
        assert!(task.windows.state().battery("old").is_some());
        assert!(task.models.record("old").is_some(), "old has a model");
    }
    let old_alerts = || {
        alerts
            .query(&AlertFilter {
                battery: Some("old".into()),
                ..Default::default()
            })
            .unwrap()
    };
    let raised = old_alerts();
    assert!(!raised.is_empty(), "old raised an alert");
    assert!(raised.iter().any(|a| a.status.is_active()));
    assert!(alerts.latest("old").is_some());
    assert_eq!(metrics.batteries_evicted.get(), 0);

    // 30 days after its last closed day (24), as day 55 closes... and beyond.
    for d in 40..70 {
        stage.accept(day(d)).await.unwrap();
    }
    {
        let tasks = partitions.lock();
        let task = &tasks[&key];
        assert!(task.windows.state().battery("old").is_none());
        assert_eq!(task.windows.state().battery_count(), 3);
        assert!(task.models.record("old").is_none());
        for id in ["a", "b", "c"] {
            assert!(task.windows.state().battery(id).is_some(), "{id} kept");
            assert!(task.models.record(id).is_some(), "{id}'s model kept");
        }
    }
    assert!(alerts.latest("old").is_none(), "the API forgets it");
    assert!(alerts.latest("a").is_some());
    let after = old_alerts();
    assert!(after.iter().all(|a| !a.status.is_active()), "{after:?}");
    assert!(
        after.iter().any(|a| a.status == AlertStatus::Resolved
            && a.resolution
                .as_deref()
                .is_some_and(|r| r.contains("no report"))),
        "{after:?}"
    );
    assert_eq!(metrics.batteries_evicted.get(), 1);
    let text = metrics.render();
    assert!(
        text.contains("voltcast_batteries_evicted_total 1"),
        "{text}"
    );

    // The id reports again: a new battery, with no gap filled back to day 24.
    let mut records: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| report(id, 70, 135.0, 1000.0))
        .collect();
    records.push(report("old", 70, 3.0, 1000.0));
    stage
        .accept(MicroBatch::from_records(&records, Arc::from(TOPIC)))
        .await
        .unwrap();
    for d in 71..75 {
        stage.accept(day(d)).await.unwrap();
    }
    let tasks = partitions.lock();
    let old = tasks[&key].windows.state().battery("old").unwrap();
    assert_eq!(old.history.len(), 1, "one day since it came back");
}
