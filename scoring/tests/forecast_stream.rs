//! The forecast step on closed days: every battery gets a model, advanced daily; within
//! reach of its rating it is re-selected on a staggered weekly cadence, out of reach its
//! family is refitted as its history doubles; a risk per closed day; the outcome is the
//! same on any number of threads and days emitted twice change nothing.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use voltcast_forecaster::{RiskConfig, SelectionConfig};
use voltcast_ingest::MicroBatch;
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat};
use voltcast_scoring::forecasting::{BatteryModels, ForecastSettings, ForecastStats, RiskUpdate};
use voltcast_scoring::windows::{DailyWindows, WindowConfig, WindowState};

/// The closed-day batches of a simulated fleet, as the window stage emits them, and the
/// windows' state at the end (the histories the models read).
fn closed_days(batteries: usize, days: u32) -> (Vec<RecordBatch>, WindowState) {
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
    (out, windows.into_state())
}

struct Fed {
    models: BatteryModels,
    stats: ForecastStats,
    updates: Vec<RiskUpdate>,
}

fn feed(
    batches: &[RecordBatch],
    state: &WindowState,
    selection: SelectionConfig,
    threads: usize,
    twice: bool,
) -> Fed {
    let settings = ForecastSettings {
        threads,
        ..ForecastSettings::new(selection, RiskConfig::default())
    };
    let mut fed = Fed {
        models: BatteryModels::default(),
        stats: ForecastStats::default(),
        updates: Vec::new(),
    };
    for b in batches {
        let times = if twice { 2 } else { 1 };
        for _ in 0..times {
            let updates = fed
                .models
                .take_closed(b, state, &settings, &mut fed.stats, None);
            fed.updates.extend(updates);
        }
    }
    fed
}

#[test]
fn closed_days_keep_every_battery_forecast_and_repeats_change_nothing() {
    let (batteries, days) = (60, 120);
    let (batches, state) = closed_days(batteries, days);
    // Every battery within reach: selection decides everywhere.
    let everywhere = SelectionConfig {
        reach_days: u32::MAX,
        reselect_every_days: 7,
        ..Default::default()
    };
    let fed = feed(&batches, &state, everywhere.clone(), 1, false);
    let (models, updates) = (&fed.models, &fed.updates);
    assert_eq!(models.len(), batteries);
    let stats = fed.stats.clone();
    // One selection each at the start; refits until a backtest is possible (58 days),
    // then about one selection per battery per week.
    let weekly = batteries as u64 * ((days as u64 - 58) / 7);
    assert!(
        stats.selections >= batteries as u64 + weekly / 2
            && stats.selections <= 2 * batteries as u64 + weekly + batteries as u64,
        "{stats:?}"
    );
    // A model is chosen on a battery's first day and every battery is near its rating:
    // every closed day is assessed until a week past the rating, then on the weekly turn.
    assert_eq!(stats.updates + stats.quiet_days, stats.days_in, "{stats:?}");
    assert_eq!(updates.len() as u64, stats.updates, "{stats:?}");
    let mut assessed = std::collections::HashMap::<_, Vec<(i32, f64)>>::new();
    for u in updates {
        assert!((0.0..=1.0).contains(&u.risk.probability));
        let days = assessed.entry(u.battery_id.clone()).or_default();
        days.push((u.day, u.risk.remaining));
    }
    let mut weekly = 0;
    for (id, d) in &assessed {
        for w in d.windows(2) {
            let (gap, before_rating) = (w[1].0 - w[0].0, w[0].1 > 0.0);
            assert!(gap <= if before_rating { 1 } else { 7 }, "{id}: {d:?}");
            weekly += usize::from(gap > 1);
        }
    }
    assert!(
        weekly > 0,
        "no battery well past its rating was left to its weekly turn"
    );
    // Re-selection is staggered: not the whole fleet on one day.
    let mut versions_by_day = std::collections::BTreeMap::<i32, usize>::new();
    let mut last_version = std::collections::HashMap::new();
    for u in updates {
        if last_version.insert(u.battery_id.clone(), u.model_version) != Some(u.model_version) {
            *versions_by_day.entry(u.day).or_default() += 1;
        }
    }
    let busiest = versions_by_day.values().skip(1).max().copied().unwrap_or(0);
    assert!(
        busiest < batteries / 2,
        "re-selections bunched: {versions_by_day:?}"
    );

    // The same days, each delivered twice and worked on two threads: the repeats are
    // skipped, and the risks come out the same and in the same order.
    let again = feed(&batches, &state, everywhere, 2, true);
    assert_eq!(again.stats.repeated_days, stats.days_in);
    assert_eq!(again.stats.updates, stats.updates);
    assert!(
        again.updates == fed.updates,
        "the same risks in the same order"
    );
    let id = updates.last().unwrap().battery_id.clone();
    let timeless = |r: Option<&voltcast_forecaster::ModelRecord>| {
        let mut r = r.cloned().unwrap();
        r.fit_micros = 0; // wall time, not state
        r
    };
    assert_eq!(
        timeless(again.models.record(&id)),
        timeless(models.record(&id))
    );
}

/// Out of reach of their rating, batteries get no backtest after their first model: their
/// family (the default one, since none was ever chosen) is refitted as history doubles.
#[test]
fn batteries_out_of_reach_are_refitted_not_reselected() {
    let (batteries, days) = (40, 120);
    let (batches, state) = closed_days(batteries, days);
    let nowhere = SelectionConfig {
        reach_days: 0,
        ..Default::default()
    };
    let fed = feed(&batches, &state, nowhere, 2, false);
    let s = &fed.stats;
    assert_eq!(
        s.selections, batteries as u64,
        "only the first model: {s:?}"
    );
    // The first model on day 1, then a refit once a battery has as many new days as its
    // model was fitted on (at least a week), on its turn in the weekly cycle: 8-14,
    // 16-28, 32-56, 64-112 days of history.
    let b = batteries as u64;
    assert!((3 * b..=4 * b).contains(&s.refits), "{s:?}");
    // Far from the rating, a risk on the battery's turn (weekly) and when its model
    // changed; past it (reach 0 still counts a passed rating as near), every day for a
    // week, then weekly again.
    assert_eq!(s.updates + s.quiet_days, s.days_in, "{s:?}");
    let mut assessed = std::collections::HashMap::<_, Vec<(i32, f64)>>::new();
    for u in &fed.updates {
        let days = assessed.entry(u.battery_id.clone()).or_default();
        days.push((u.day, u.risk.remaining));
    }
    let mut far = 0;
    for (id, d) in &assessed {
        if d.iter().all(|(_, remaining)| *remaining > 0.0) {
            far += 1;
            assert!(d.len() <= days as usize / 5, "{id}: {d:?}");
        }
        for w in d.windows(2) {
            assert!(w[1].0 - w[0].0 <= 7, "{id}: {d:?}");
        }
    }
    assert!(
        far > batteries / 2,
        "most batteries far from their rating: {far}"
    );
}

/// A selection that fails (here: a fit window of zero days leaves nothing to fit) leaves
/// the battery without a model, and selection is tried again on a later day.
#[test]
fn a_failed_selection_is_retried_on_a_later_day() {
    let (batches, state) = closed_days(20, 20);
    let failing = SelectionConfig {
        fit_window_days: 0,
        ..Default::default()
    };
    let fed = feed(&batches, &state, failing, 2, false);
    assert!(fed.updates.is_empty(), "no model, no risk");
    let s = &fed.stats;
    assert!(s.failed_selections > 0);
    assert_eq!(s.failed_selections, s.selections, "every selection failed");
    assert!(
        s.selections > 20,
        "selection was tried again on later days: {} selections for 20 batteries",
        s.selections
    );
}
