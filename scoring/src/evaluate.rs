//! Forecast accuracy and alert quality against the simulator's ground truth.
//!
//! The fleet is simulated, cleansed by the same day windows the stream uses, and then:
//! - **accuracy**: every battery's last `horizon` days are held out; the selected model,
//!   seasonal naive and the oracle (the simulator's noise-free expected cycles, the best
//!   any forecast can do) are scored by NRMSE and by the relative error of the 30-day
//!   sum, which is what the end-of-life rule uses;
//! - **alerts**: after `warmup_days`, each battery is walked forward day by day as the
//!   stream would: the chosen model is advanced by each closed day, re-selected on the
//!   selection cadence, and its failure risk computed; the first day the risk reaches the
//!   alert threshold is the alert. Against the day the battery truly crosses its rating:
//!   an alert is *true* when the crossing comes within the horizon after it (or already
//!   came); a crossing is *detected* when an alert preceded it by at most the horizon.
//!   Lead time is crossing day minus alert day.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use voltcast_forecaster::forecast::normal_quantile;
use voltcast_forecaster::select::{nrmse_of, relative_sum_error};
use voltcast_forecaster::{
    DailySeries, DayObservation, Model, ModelKind, QUIET_ASSESS_EVERY_DAYS, RiskConfig,
    SelectionConfig, Standing, Upkeep, failure_risk, refit, select,
};
use voltcast_ingest::MicroBatch;
use voltcast_ingest::simulate::{
    FleetSimulator, SimulatorConfig, SimulatorConfigError, WireFormat,
};

use crate::windows::{DailyWindows, WindowConfig, WindowError, daily};

#[derive(Debug, Clone)]
pub struct EvaluationConfig {
    pub simulator: SimulatorConfig,
    pub warmup_days: usize,
    pub selection: SelectionConfig,
    pub risk: RiskConfig,
    pub threads: usize,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            simulator: SimulatorConfig::default(),
            warmup_days: 180,
            selection: SelectionConfig::default(),
            risk: RiskConfig::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Mean scores over the held-out horizon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub nrmse: f64,
    pub sum_error: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub batteries: usize,
    pub selected: Accuracy,
    pub seasonal_naive: Accuracy,
    pub oracle: Accuracy,
    /// How often each family won selection on the held-out split.
    pub winners: BTreeMap<ModelKind, usize>,
    /// Held-out scores of each family had it been used for every battery.
    pub by_family: BTreeMap<ModelKind, Accuracy>,
    /// Batteries that cross their rating with a full horizon of run-up in the walk.
    pub positives: usize,
    pub detected: usize,
    /// Alerts whose outcome is known (a full horizon of truth after them).
    pub alerts: usize,
    pub true_alerts: usize,
    pub recall: f64,
    pub precision: f64,
    pub median_lead_days: f64,
    /// The selected model's 30-day sum on the held-out split against its interval: the
    /// share of actual sums above the forecast's 90% quantile (calibrated: 0.10) and
    /// inside the central 90% interval (calibrated: 0.90).
    pub sum_above_q90: f64,
    pub sum_within_90: f64,
    /// Over every assessed day of the walk before the rating (the outcome known: a
    /// horizon of truth after it): the Brier score of P(rating reached within the
    /// horizon), and the reliability table by tenths of P: (mean P, share that failed,
    /// days).
    pub brier: f64,
    pub reliability: Vec<(f64, f64, usize)>,
    /// Mean wall time of one selection (backtest included), and of one daily update plus
    /// 30-day forecast and risk.
    pub selection_ms: f64,
    pub update_us: f64,
    /// Through the walk: full selections and refits per battery, and a refit's mean time.
    pub selections_per_battery: f64,
    pub refits_per_battery: f64,
    pub refit_ms: f64,
}

/// One battery's cleansed series and truth.
struct Battery {
    series: DailySeries,
    lifetime: Vec<f64>,
    rated: f64,
    expected: HashMap<i32, f64>,
    /// Days the battery crossed its rating (more than one when it was replaced).
    crossings: Vec<i32>,
}

/// One battery's held-out scores.
struct Scored {
    winner: ModelKind,
    families: Vec<(ModelKind, Accuracy)>,
    selected: Accuracy,
    naive: Accuracy,
    oracle: Accuracy,
    /// (actual - forecast) / sd of the selected model's 30-day sum.
    sum_z: f64,
}

#[derive(Default)]
struct Outcome {
    accuracy: Option<Scored>,
    /// (alert day, crossing day) for batteries not past their rating at warm-up.
    alert: Option<i32>,
    crossing: Option<i32>,
    walk_start: i32,
    walk_end: i32,
    /// (day, P(rating within the horizon)) for every assessed day before the rating.
    probabilities: Vec<(i32, f64)>,
    selections: (u64, f64),
    refits: (u64, f64),
    updates: (u64, f64),
}

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Simulator(#[from] SimulatorConfigError),
    #[error("day windows: {0}")]
    Windows(#[from] WindowError),
}

pub async fn evaluate(config: &EvaluationConfig) -> Result<Evaluation, EvaluateError> {
    let fleet = cleansed_fleet(&config.simulator).await?;
    let batteries: Vec<Battery> = fleet.into_values().collect();
    let threads = config.threads.max(1);
    let chunk = batteries.len().div_ceil(threads).max(1);
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = batteries
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || part.iter().map(|b| assess(b, config)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("evaluation thread panicked"))
            .collect()
    });
    Ok(summarize(&outcomes, config.risk.horizon_days as i32))
}

/// Simulates the fleet and cleanses it through the stream's day windows.
async fn cleansed_fleet(sim: &SimulatorConfig) -> Result<BTreeMap<String, Battery>, EvaluateError> {
    let mut simulator = FleetSimulator::new(sim.clone(), WireFormat::Json)?.without_payloads();
    let mut windows = DailyWindows::new(WindowConfig {
        retention_days: sim.days as usize + 1,
        ..WindowConfig::default()
    });
    let mut fleet: BTreeMap<String, Battery> = BTreeMap::new();
    let source: Arc<str> = Arc::from("evaluate");
    while let Some(day) = simulator.next_day() {
        for t in &day.truth {
            let b = fleet
                .entry(t.battery_id.clone())
                .or_insert_with(|| Battery {
                    series: DailySeries::default(),
                    lifetime: Vec::new(),
                    rated: t.rated_cycles,
                    expected: HashMap::new(),
                    crossings: Vec::new(),
                });
            let d = day.day as i32;
            b.expected.insert(d, t.expected_cycles);
            if t.crosses_rating {
                b.crossings.push(d);
            }
        }
        let records: Vec<_> = day.messages.into_iter().filter_map(|m| m.record).collect();
        let batch = MicroBatch::from_records(&records, source.clone());
        for closed in windows.apply(&batch, 0)?.closed {
            append(&mut fleet, &closed);
        }
    }
    for closed in windows.close_all()? {
        append(&mut fleet, &closed);
    }
    Ok(fleet)
}

fn append(fleet: &mut BTreeMap<String, Battery>, closed: &RecordBatch) {
    for row in daily::closed_rows(closed).expect("the window stage emits the daily schema") {
        let Some(b) = fleet.get_mut(row.battery_id) else {
            continue;
        };
        if b.series.is_empty() {
            b.series.first_day = row.day;
        }
        b.series.push(row.observation);
        b.lifetime.push(row.lifetime);
    }
}

fn assess(b: &Battery, config: &EvaluationConfig) -> Outcome {
    let mut out = Outcome {
        crossing: b.crossings.first().copied(),
        ..Default::default()
    };
    let s = &b.series;
    let (n, h) = (s.len(), config.selection.horizon_days);
    if n >= 60 + h {
        let train = s.slice(0, n - h);
        let actual = &s.cycles[n - h..];
        let days: Vec<i32> = (train.end_day()..s.end_day()).collect();
        let oracle: Vec<f64> = days
            .iter()
            .map(|d| b.expected.get(d).copied().unwrap_or(0.0))
            .collect();
        let score = |p: &[f64]| Accuracy {
            nrmse: nrmse_of(actual, p),
            sum_error: relative_sum_error(actual, p),
        };
        if let (Ok(record), Ok(naive)) = (
            select(&train, &config.selection, None),
            ModelKind::SeasonalNaive.fit(&train.tail(config.selection.fit_window_days)),
        ) {
            let families = ModelKind::CANDIDATES
                .iter()
                .filter_map(|k| {
                    let window = train.tail(config.selection.window_for(*k));
                    Some((*k, score(&k.fit(&window).ok()?.mean_path(h))))
                })
                .collect();
            out.accuracy = Some(Scored {
                winner: record.kind(),
                families,
                sum_z: record.forecast(h).sum_z(actual.iter().sum()),
                selected: score(&record.model.mean_path(h)),
                naive: score(&naive.mean_path(h)),
                oracle: score(&oracle),
            });
        }
    }
    walk(b, config, &mut out);
    out
}

/// The stream, replayed for one battery: update daily, upkeep as the stream does it
/// ([`SelectionConfig::upkeep`]), risk daily.
fn walk(b: &Battery, config: &EvaluationConfig, out: &mut Outcome) {
    let s = &b.series;
    let warmup = config.warmup_days;
    if s.len() <= warmup || b.lifetime[warmup - 1] >= b.rated {
        return;
    }
    out.walk_start = s.first_day + warmup as i32;
    out.walk_end = s.end_day();
    // The crossing the walk is about: the first after it starts (a battery replaced
    // before the walk may have crossed before it).
    out.crossing = b.crossings.iter().copied().find(|c| *c >= out.walk_start);
    let timed = std::time::Instant::now();
    let Ok(mut record) = select(&s.slice(0, warmup), &config.selection, None) else {
        return;
    };
    out.selections = (1, timed.elapsed().as_secs_f64());
    let cycle = config.selection.reselect_every_days.max(1);
    for t in warmup..s.len() {
        let started = std::time::Instant::now();
        record.observe(&DayObservation {
            cycles: s.cycles[t],
            minutes: s.minutes[t],
            trips: s.trips[t],
        });
        out.updates.1 += started.elapsed().as_secs_f64();
        let recent = &s.cycles[(t + 1).saturating_sub(Standing::PACE_DAYS)..=t];
        let standing = Standing::new(b.rated - b.lifetime[t], recent.iter().copied(), t + 1);
        let turn = (t as u32).is_multiple_of(cycle);
        let started = std::time::Instant::now();
        let upkeep = config.selection.upkeep(Some(&record), standing, turn);
        match upkeep {
            Upkeep::Keep => {}
            Upkeep::Select => {
                if let Ok(r) = select(&s.slice(0, t + 1), &config.selection, Some(record.version)) {
                    record = r;
                }
                out.selections.0 += 1;
                out.selections.1 += started.elapsed().as_secs_f64();
            }
            Upkeep::Refit => {
                if let Ok(r) = refit(&s.slice(0, t + 1), &config.selection, &record) {
                    record = r;
                }
                out.refits.0 += 1;
                out.refits.1 += started.elapsed().as_secs_f64();
            }
        }
        let weekly_turn = (t as u32).is_multiple_of(QUIET_ASSESS_EVERY_DAYS);
        if !config.selection.assessed(standing, upkeep, weekly_turn) {
            continue; // as the stream: far from the rating, assessed on its turn
        }
        let started = std::time::Instant::now();
        let risk = failure_risk(&record, b.lifetime[t], b.rated, &config.risk);
        out.updates.0 += 1;
        out.updates.1 += started.elapsed().as_secs_f64();
        if risk.at_risk && out.alert.is_none() {
            out.alert = Some(s.first_day + t as i32);
        }
        if b.lifetime[t] >= b.rated {
            return; // past the rating: the risk is certain from here
        }
        out.probabilities
            .push((s.first_day + t as i32, risk.probability));
    }
}

/// Interval coverage on the held-out split, and the failure probability's Brier score
/// and reliability over the walk.
fn calibration(e: &mut Evaluation, scored: &[&Scored], outcomes: &[Outcome], horizon: i32) {
    let n = scored.len().max(1) as f64;
    let (q90, central90) = (normal_quantile(0.9), normal_quantile(0.95));
    e.sum_above_q90 = scored.iter().filter(|a| a.sum_z > q90).count() as f64 / n;
    e.sum_within_90 = scored.iter().filter(|a| a.sum_z.abs() <= central90).count() as f64 / n;
    let mut bins = vec![(0.0, 0usize, 0usize); 10];
    let (mut brier, mut days) = (0.0, 0usize);
    for o in outcomes {
        for &(day, p) in &o.probabilities {
            if day + horizon >= o.walk_end {
                continue; // the outcome is not known
            }
            let failed = o.crossing.is_some_and(|c| c > day && c <= day + horizon);
            brier += (p - f64::from(u8::from(failed))).powi(2);
            days += 1;
            let bin = &mut bins[((p * 10.0) as usize).min(9)];
            bin.0 += p;
            bin.1 += usize::from(failed);
            bin.2 += 1;
        }
    }
    e.brier = brier / days.max(1) as f64;
    e.reliability = bins
        .into_iter()
        .map(|(p, failed, n)| {
            let m = n.max(1) as f64;
            (p / m, failed as f64 / m, n)
        })
        .collect();
}

fn summarize(outcomes: &[Outcome], horizon: i32) -> Evaluation {
    let mut e = Evaluation::default();
    let scored: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.accuracy.as_ref())
        .collect();
    e.batteries = scored.len();
    let mean = |f: &dyn Fn(&Scored) -> &Accuracy| Accuracy {
        nrmse: scored.iter().map(|a| f(a).nrmse).sum::<f64>() / scored.len().max(1) as f64,
        sum_error: scored.iter().map(|a| f(a).sum_error).sum::<f64>() / scored.len().max(1) as f64,
    };
    e.selected = mean(&|a| &a.selected);
    e.seasonal_naive = mean(&|a| &a.naive);
    e.oracle = mean(&|a| &a.oracle);
    let mut family_sums: BTreeMap<ModelKind, (Accuracy, usize)> = BTreeMap::new();
    for a in &scored {
        *e.winners.entry(a.winner).or_default() += 1;
        for (k, v) in &a.families {
            let entry = family_sums.entry(*k).or_default();
            entry.0.nrmse += v.nrmse;
            entry.0.sum_error += v.sum_error;
            entry.1 += 1;
        }
    }
    e.by_family = family_sums
        .into_iter()
        .map(|(k, (sum, n))| {
            let n = n.max(1) as f64;
            let mean = Accuracy {
                nrmse: sum.nrmse / n,
                sum_error: sum.sum_error / n,
            };
            (k, mean)
        })
        .collect();
    let mut leads = Vec::new();
    for o in outcomes.iter().filter(|o| o.walk_end > 0) {
        if let Some(c) = o
            .crossing
            .filter(|c| *c >= o.walk_start + horizon && *c < o.walk_end)
        {
            e.positives += 1;
            if let Some(a) = o.alert.filter(|a| *a <= c && c - a <= horizon) {
                e.detected += 1;
                leads.push((c - a) as f64);
            }
        }
        if let Some(a) = o.alert.filter(|a| a + horizon < o.walk_end) {
            e.alerts += 1;
            e.true_alerts += usize::from(o.crossing.is_some_and(|c| c <= a + horizon));
        }
    }
    calibration(&mut e, &scored, outcomes, horizon);
    e.recall = e.detected as f64 / e.positives.max(1) as f64;
    e.precision = e.true_alerts as f64 / e.alerts.max(1) as f64;
    leads.sort_by(f64::total_cmp);
    e.median_lead_days = leads.get(leads.len() / 2).copied().unwrap_or(0.0);
    let (sel_n, sel_s) = outcomes.iter().fold((0, 0.0), |(n, s), o| {
        (n + o.selections.0, s + o.selections.1)
    });
    let (up_n, up_s) = outcomes
        .iter()
        .fold((0, 0.0), |(n, s), o| (n + o.updates.0, s + o.updates.1));
    e.selection_ms = sel_s * 1e3 / sel_n.max(1) as f64;
    let walked = outcomes.iter().filter(|o| o.walk_end > 0).count().max(1) as f64;
    let (refit_n, refit_s) = outcomes
        .iter()
        .fold((0, 0.0), |(n, s), o| (n + o.refits.0, s + o.refits.1));
    e.selections_per_battery = sel_n as f64 / walked;
    e.refits_per_battery = refit_n as f64 / walked;
    e.refit_ms = refit_s * 1e3 / refit_n.max(1) as f64;
    e.update_us = up_s * 1e6 / up_n.max(1) as f64;
    e
}
