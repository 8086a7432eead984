//! The forecast stage on closed days: every battery gets a model chosen off the runtime,
//! advanced daily and re-selected on a staggered weekly cadence, with a risk per closed
//! day; days emitted twice (a restart from a checkpoint) change nothing.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use voltcast_forecaster::{RiskConfig, SelectionConfig};
use voltcast_ingest::MicroBatch;
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat};
use voltcast_scoring::forecasting::{ForecastStage, RiskUpdate};
use voltcast_scoring::windows::{DailyWindows, WindowConfig};

/// The closed-day batches of a simulated fleet, as the window stage emits them.
async fn closed_days(batteries: usize, days: u32) -> Vec<RecordBatch> {
    let sim = SimulatorConfig {
        batteries,
        days,
        seed: 5,
        ..Default::default()
    };
    let mut sim = FleetSimulator::new(sim, WireFormat::Json)
        .unwrap()
        .without_payloads();
    let mut windows = DailyWindows::new(WindowConfig::default());
    let mut out = Vec::new();
    while let Some(day) = sim.next_day() {
        let records: Vec<_> = day.messages.into_iter().filter_map(|m| m.record).collect();
        let batch = MicroBatch::from_records(&records, Arc::from("t"));
        out.extend(windows.apply(&batch, 0).unwrap().closed);
    }
    out.extend(windows.close_all().unwrap());
    out
}

async fn feed(batches: &[RecordBatch], twice: bool) -> (ForecastStage, Vec<RiskUpdate>) {
    let mut stage = ForecastStage::new(SelectionConfig::default(), RiskConfig::default(), 2);
    let mut updates = Vec::new();
    for b in batches {
        updates.extend(stage.take_batch(b));
        if twice {
            updates.extend(stage.take_batch(b));
        }
        // One closed day at a time, selections settled before the next: deterministic.
        updates.extend(stage.settle().await);
    }
    (stage, updates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_days_keep_every_battery_forecast_and_repeats_change_nothing() {
    let (batteries, days) = (60, 120);
    let batches = closed_days(batteries, days).await;
    let (stage, updates) = feed(&batches, false).await;
    assert_eq!(stage.batteries(), batteries);
    let stats = stage.stats.clone();
    // One selection each at the start, then about one per battery per week.
    let weekly = batteries as u64 * (days as u64 / 7);
    assert!(
        stats.selections >= batteries as u64 + weekly / 2
            && stats.selections <= batteries as u64 + weekly + batteries as u64,
        "{stats:?}"
    );
    // Every closed day after a battery's first model is an update with a risk.
    assert!(
        stats.updates as f64 > 0.95 * stats.days_in as f64,
        "{stats:?}"
    );
    // ...and so is every installed selection.
    assert_eq!(
        updates.len() as u64,
        stats.updates + stats.selections,
        "{stats:?}"
    );
    for u in &updates {
        assert!((0.0..=1.0).contains(&u.risk.probability));
    }
    // Re-selection is staggered: not the whole fleet on one day.
    let mut versions_by_day = std::collections::BTreeMap::<i32, usize>::new();
    let mut last_version = std::collections::HashMap::new();
    for u in &updates {
        if last_version.insert(u.battery_id.clone(), u.model_version) != Some(u.model_version) {
            *versions_by_day.entry(u.day).or_default() += 1;
        }
    }
    let busiest = versions_by_day.values().skip(1).max().copied().unwrap_or(0);
    assert!(
        busiest < batteries / 2,
        "re-selections bunched: {versions_by_day:?}"
    );

    // The same days, each delivered twice: skipped, same models and risks at the end.
    let (again, updates_again) = feed(&batches, true).await;
    assert_eq!(again.stats.repeated_days, stats.days_in);
    assert_eq!(again.stats.updates, stats.updates);
    // Selections come back in any order: compare as sets.
    let sorted = |u: &[RiskUpdate]| {
        let mut v: Vec<String> = u.iter().map(|u| format!("{u:?}")).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&updates_again), sorted(&updates));
    let id = updates.last().unwrap().battery_id.clone();
    let timeless = |r: Option<&voltcast_forecaster::ModelRecord>| {
        let mut r = r.cloned().unwrap();
        r.fit_micros = 0; // wall time, not state
        r
    };
    assert_eq!(timeless(again.record(&id)), timeless(stage.record(&id)));
}

/// A selection that fails (here: a fit window of zero days leaves nothing to fit) comes
/// back as a failure: the battery is not left waiting on it, selection is tried again on
/// a later day, and the stage still finishes once its input closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_selection_is_retried_and_never_holds_up_shutdown() {
    let batches = closed_days(20, 20).await;
    let failing = SelectionConfig {
        fit_window_days: 0,
        ..Default::default()
    };
    let stage = ForecastStage::new(failing, RiskConfig::default(), 2);
    let (closed_tx, closed_rx) = tokio::sync::mpsc::channel(2);
    let (risk_tx, mut risk_rx) = tokio::sync::mpsc::channel(2);
    let stage = tokio::spawn(stage.run(closed_rx, risk_tx));
    let risks = tokio::spawn(async move {
        let mut n = 0;
        while let Some(batch) = risk_rx.recv().await {
            n += batch.len();
        }
        n
    });
    for b in batches {
        closed_tx.send(b).await.unwrap();
        // Let the day's selections come back before the next day closes.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(closed_tx);
    // Bounded only so that a regression fails instead of hanging the test run.
    let stage = tokio::time::timeout(std::time::Duration::from_secs(120), stage)
        .await
        .expect("the stage finished once its input closed")
        .unwrap();
    assert_eq!(risks.await.unwrap(), 0, "no model, no risk");
    let s = &stage.stats;
    assert!(s.failed_selections > 0);
    assert_eq!(s.failed_selections, s.selections, "every selection failed");
    assert!(
        s.selections > 20,
        "selection was tried again on later days: {} selections for 20 batteries",
        s.selections
    );
}
