//! The forecast step of a partition: closed days in, a fresh failure risk per battery out.
//!
//! On each closed day a battery's chosen model is advanced by the day (microseconds) and
//! its risk recomputed. Model upkeep goes where the alert is decided (see
//! [`SelectionConfig::upkeep`]): within `reach_days` of its rating a battery is re-selected
//! (a backtest over every family, milliseconds) every `reselect_every_days`, on the day of
//! the cycle its id hashes to, so a fleet that started together does not re-select on one
//! day; farther out its family is refitted as its history doubles (one fit), and its
//! risk, nil that far out, is reassessed on its turn rather than daily.
//!
//! Why selection is not run in the background: the models are part of the partition's
//! checkpointed state, and after a crash the replay must make the same decisions. A
//! selection that lands "whenever the pool is done" makes the risk of the days in between
//! depend on timing. So a battery's days are taken in order and a due selection finishes
//! before its next day; batteries are independent, so a batch's batteries are spread over
//! the cores instead. The fit reads the battery's history kept by the day windows: there
//! is one copy of it.
//!
//! Closed days are keyed by (battery, day): a day seen again is skipped.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use voltcast_forecaster::{
    DailySeries, DayObservation, FailureRisk, Forecast, ModelKind, ModelRecord,
    QUIET_ASSESS_EVERY_DAYS, RiskConfig, SelectionConfig, Standing, Upkeep, refit, select,
};

use crate::lines::TextLines;
use crate::windows::history::{half_bytes, half_value};
use crate::windows::{PackedDays, WindowState, daily};

/// A battery's latest assessment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RiskUpdate {
    pub battery_id: Arc<str>,
    pub vehicle_id: Option<Arc<str>>,
    /// The last closed day the assessment includes (days since 1970-01-01).
    pub day: i32,
    /// Battery age on that day: a drop means the battery was replaced.
    pub age: i32,
    pub lifetime: f64,
    pub rated: f64,
    pub model: ModelKind,
    pub model_version: u32,
    pub risk: FailureRisk,
    /// Daily cycles forecast over the risk horizon, with intervals.
    pub forecast: ForecastBands,
    /// The last days (up to [`RECENT_DAYS`]) as cycles, minutes, trips; oldest first.
    pub recent: PackedDays,
    /// What drives the forecast, strongest first (only when the risk is notable).
    pub drivers: TextLines,
}

impl RiskUpdate {
    /// Drops what only the API reads (the forecast and the recent days) from an
    /// assessment that a newer one of the same battery and batch supersedes: the alert
    /// policy, which sees every day's, reads neither, and the store keeps the newest
    /// alone. On a backlog a batch assesses each battery several times, and these held
    /// most of the batch's memory until it was carried out.
    pub fn keep_decision_only(&mut self) {
        self.forecast = ForecastBands::default();
        self.recent = PackedDays::default();
    }
}

/// A forecast as an assessment carries it, in one allocation: per day the mean as `f32`,
/// then per day its sd and the sd of the sum so far as IEEE half floats. The store keeps
/// one assessment per battery for the API (and a batch's newest are alive beside them):
/// three `Vec<f64>` made that 770 bytes a battery, `f32` throughout 376, this 256. The
/// spreads only draw the API's intervals (the risk is computed before, in `f64`), where
/// 11 significant bits are far finer than the spreads are known. Serialized with the
/// fields of [`Forecast`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "Forecast", into = "Forecast")]
pub struct ForecastBands {
    /// `horizon` little-endian `f32` means, then `horizon` half-float sds, then
    /// `horizon` half-float sum sds.
    bytes: Box<[u8]>,
}

/// Bytes a day of the horizon takes in [`ForecastBands`].
const BAND_DAY_BYTES: usize = 4 + 2 + 2;

impl ForecastBands {
    pub fn horizon(&self) -> usize {
        self.bytes.len() / BAND_DAY_BYTES
    }

    /// Expected daily cycles, day 1..=horizon.
    pub fn mean(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        let (means, _) = self.bytes[..4 * self.horizon()].as_chunks::<4>();
        means.iter().map(|b| f32::from_le_bytes(*b))
    }

    /// Standard deviation of each day's value.
    pub fn sd(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        let h = self.horizon();
        halves(&self.bytes[4 * h..6 * h])
    }

    /// Standard deviation of the sum of days 1..=k, for k = 1..=horizon.
    pub fn sum_sd(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        let h = self.horizon();
        halves(&self.bytes[6 * h..8 * h])
    }
}

fn halves(bytes: &[u8]) -> impl ExactSizeIterator<Item = f32> + '_ {
    let (values, _) = bytes.as_chunks::<2>();
    values.iter().map(|b| half_value(*b))
}

impl From<Forecast> for ForecastBands {
    fn from(f: Forecast) -> Self {
        // A forecast's three paths are one horizon long; a shorter one is cut to it.
        // One allocation: this runs for every assessment, 40 M on a 100,000 x 730 replay.
        let h = f.mean.len().min(f.sd.len()).min(f.sum_sd.len());
        let mut bytes = Vec::with_capacity(BAND_DAY_BYTES * h);
        for m in &f.mean[..h] {
            bytes.extend((*m as f32).to_le_bytes());
        }
        // Saturating, as the history's days: a spread past 65,504 cycles is no forecast.
        for v in f.sd[..h].iter().chain(&f.sum_sd[..h]) {
            bytes.extend(half_bytes(*v));
        }
        Self {
            bytes: bytes.into_boxed_slice(),
        }
    }
}

impl From<ForecastBands> for Forecast {
    fn from(b: ForecastBands) -> Self {
        let path = |v: &mut dyn Iterator<Item = f32>| v.map(f64::from).collect();
        Forecast {
            mean: path(&mut b.mean()),
            sd: path(&mut b.sd()),
            sum_sd: path(&mut b.sum_sd()),
        }
    }
}

/// Battery maps are looked up once per closed day: foldhash rather than SipHash, since
/// ids come from the fleet's own cars (see `windows::shard::id_hash`).
type FastHash = foldhash::fast::RandomState;

/// Days of history a [`RiskUpdate`] carries for the API.
pub const RECENT_DAYS: usize = 30;
/// Drivers are worked out from this probability up: below it nobody reads them.
const DRIVERS_FROM_PROBABILITY: f64 = 0.5;
/// Below this many batteries with closed days, a batch's forecasts run on one thread.
const PARALLEL_MIN_BATTERIES: usize = 32;

/// What a partition keeps per battery for its forecasts (checkpointed with it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BatteryModel {
    /// The last closed day taken in.
    last_day: Option<i32>,
    /// Boxed: a batch moves its batteries' models out of the map and back, and a record
    /// inline (272 bytes) made both the map's table and the batch's list that wide.
    record: Option<Box<ModelRecord>>,
}

/// How the forecast step runs: the selection and risk settings, and the cores it may use.
#[derive(Debug, Clone)]
pub struct ForecastSettings {
    pub selection: SelectionConfig,
    pub risk: RiskConfig,
    pub threads: usize,
    /// Closed days a partition assesses at a time: bounds the fresh assessments in
    /// flight (see [`crate::partition::LatestSink`]) while leaving a slice enough
    /// batteries to spread over the threads.
    pub slice_rows: usize,
}

impl ForecastSettings {
    pub fn new(selection: SelectionConfig, risk: RiskConfig) -> Self {
        Self {
            selection,
            risk,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            slice_rows: 8192,
        }
    }

    /// Days a fit reads: enough for every backtest fold plus the fit window.
    fn keep_days(&self) -> usize {
        self.selection.fit_window_days + self.selection.folds * self.selection.horizon_days.max(1)
    }
}

/// The models of one partition's batteries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatteryModels {
    batteries: HashMap<Arc<str>, BatteryModel, FastHash>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastStats {
    pub days_in: u64,
    pub repeated_days: u64,
    pub updates: u64,
    pub selections: u64,
    /// Refits of a battery's family without a backtest (out of reach of its rating).
    pub refits: u64,
    /// Closed days of batteries far from their rating that were not their turn to be
    /// reassessed: the model took the day in, no risk was computed.
    pub quiet_days: u64,
    /// Thread CPU time spent on closed days (daily updates, risk, drivers), selections
    /// and refits excluded.
    pub update_seconds: f64,
    /// Thread CPU time the selections took.
    pub selection_seconds: f64,
    /// Thread CPU time the refits took.
    pub refit_seconds: f64,
    /// Selections that failed or panicked (the battery kept its model).
    pub failed_selections: u64,
}

impl ForecastStats {
    pub fn add(&mut self, o: &ForecastStats) {
        self.days_in += o.days_in;
        self.repeated_days += o.repeated_days;
        self.updates += o.updates;
        self.selections += o.selections;
        self.refits += o.refits;
        self.quiet_days += o.quiet_days;
        self.update_seconds += o.update_seconds;
        self.selection_seconds += o.selection_seconds;
        self.refit_seconds += o.refit_seconds;
        self.failed_selections += o.failed_selections;
    }
}

/// What one battery's closed days of a batch did.
#[derive(Default)]
struct BatteryOutcome {
    updates: Vec<RiskUpdate>,
    stats: ForecastStats,
    /// Daily updates by model kind, and selections with their CPU seconds.
    fits: Vec<ModelKind>,
    selections: Vec<(ModelKind, f64)>,
}

impl BatteryModels {
    pub fn len(&self) -> usize {
        self.batteries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batteries.is_empty()
    }

    /// Drops a battery's model (evicted after a silence past the retention).
    pub fn forget(&mut self, battery: &str) {
        self.batteries.remove(battery);
    }

    /// The model record of a battery, if it has one yet.
    pub fn record(&self, battery: &str) -> Option<&ModelRecord> {
        self.batteries.get(battery)?.record.as_deref()
    }

    /// Takes in a batch of closed days (the window stage's daily schema) whose histories
    /// are in `windows`; returns the fresh risk of every battery that has a model, each
    /// battery's days in day order, and adds what it did to `stats` and `metrics`.
    pub fn take_closed(
        &mut self,
        closed: &RecordBatch,
        windows: &WindowState,
        settings: &ForecastSettings,
        stats: &mut ForecastStats,
        metrics: Option<&crate::metrics::Metrics>,
    ) -> Vec<RiskUpdate> {
        let Some(rows) = daily::closed_rows(closed) else {
            tracing::error!("closed-day batch without the daily schema; skipped");
            return Vec::new();
        };
        // Each battery's rows, in the order its first day appears.
        let mut order: HashMap<&str, usize, FastHash> = HashMap::default();
        let mut work: Vec<(Arc<str>, BatteryModel, Vec<usize>)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let slot = *order.entry(row.battery_id).or_insert_with(|| {
                let (id, model) = match self.batteries.remove_entry(row.battery_id) {
                    Some(entry) => entry,
                    None => (Arc::from(row.battery_id), BatteryModel::default()),
                };
                work.push((id, model, Vec::new()));
                work.len() - 1
            });
            work[slot].2.push(i);
        }
        let run = |chunk: &mut [(Arc<str>, BatteryModel, Vec<usize>)]| {
            let mut out = BatteryOutcome::default();
            let mut cpu = std::time::Duration::ZERO;
            crate::memory::on_cpu(&mut cpu, || {
                for (id, model, days) in chunk.iter_mut() {
                    let first = out.updates.len();
                    for &i in days.iter() {
                        model.take_day(id, &rows[i], windows, settings, &mut out);
                    }
                    if let Some((_, older)) = out.updates[first..].split_last_mut() {
                        older.iter_mut().for_each(RiskUpdate::keep_decision_only);
                    }
                }
            });
            out.stats.update_seconds =
                cpu.as_secs_f64() - out.stats.selection_seconds - out.stats.refit_seconds;
            out
        };
        let threads = settings.threads.max(1);
        let outcomes: Vec<BatteryOutcome> = if threads == 1 || work.len() < PARALLEL_MIN_BATTERIES {
            vec![run(&mut work)]
        } else {
            let per = work.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = work
                    .chunks_mut(per)
                    .map(|chunk| scope.spawn(|| run(chunk)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("forecast thread panicked"))
                    .collect()
            })
        };
        for (id, model, _) in work {
            self.batteries.insert(id, model);
        }
        let mut updates = Vec::new();
        for o in outcomes {
            stats.add(&o.stats);
            if let Some(m) = metrics {
                report_fits(m, &o);
            }
            updates.extend(o.updates);
        }
        updates
    }
}

/// Adds the daily updates and selections of a batch to the metrics: one labelled lookup
/// per model kind rather than per battery-day.
fn report_fits(m: &crate::metrics::Metrics, o: &BatteryOutcome) {
    let mut fits: HashMap<ModelKind, u64, FastHash> = HashMap::default();
    for kind in &o.fits {
        *fits.entry(*kind).or_default() += 1;
    }
    for (kind, seconds) in &o.selections {
        *fits.entry(*kind).or_default() += 1;
        m.model_selections.with_label_values(&[kind.name()]).inc();
        m.fit_seconds
            .with_label_values(&[kind.name()])
            .observe(*seconds);
    }
    for (kind, n) in fits {
        m.forecast_fits.with_label_values(&[kind.name()]).inc_by(n);
    }
}

impl BatteryModel {
    fn take_day(
        &mut self,
        id: &Arc<str>,
        row: &daily::ClosedRow<'_>,
        windows: &WindowState,
        settings: &ForecastSettings,
        out: &mut BatteryOutcome,
    ) {
        let day = row.day;
        out.stats.days_in += 1;
        if self.last_day.is_some_and(|last| day <= last) {
            out.stats.repeated_days += 1;
            return;
        }
        self.last_day = Some(day);
        let Some(battery) = windows.battery(id) else {
            return;
        };
        let history = battery.history;
        // Advance and assess first: the risk reflects today whatever selection decides.
        if let Some(record) = self.record.as_mut() {
            record.observe(&row.observation);
            out.fits.push(record.kind());
        }
        let standing = Standing::new(
            row.rated - row.lifetime,
            history
                .window_through(day, Standing::PACE_DAYS)
                .map(|d| f64::from(d[0])),
            history.len_through(day),
        );
        let hash = id_hash(id);
        let turn = on_turn(day, hash, settings.selection.reselect_every_days);
        let upkeep = settings
            .selection
            .upkeep(self.record.as_deref(), standing, turn);
        match upkeep {
            Upkeep::Keep => {}
            Upkeep::Select => self.reselect(id, history, day, settings, out),
            Upkeep::Refit => self.refit(id, history, day, settings, out),
        }
        let weekly_turn = on_turn(day, hash, QUIET_ASSESS_EVERY_DAYS);
        if !settings.selection.assessed(standing, upkeep, weekly_turn) {
            out.stats.quiet_days += 1;
        } else if let Some(record) = &self.record {
            out.updates.push(assess(
                id,
                battery.vehicle,
                row,
                history,
                record,
                &settings.risk,
            ));
            out.stats.updates += 1;
        }
    }

    /// Refits the battery's family on the days through `day`; on failure it keeps the
    /// model it had.
    fn refit(
        &mut self,
        id: &Arc<str>,
        history: &crate::windows::BatteryHistory,
        day: i32,
        settings: &ForecastSettings,
        out: &mut BatteryOutcome,
    ) {
        let Some(previous) = self.record.as_ref() else {
            return;
        };
        let n = settings.selection.fit_window_days;
        let (refitted, seconds) = timed_fit(history, day, n, |series| {
            refit(series, &settings.selection, previous)
        });
        out.stats.refits += 1;
        out.stats.refit_seconds += seconds;
        match refitted {
            Ok(record) => self.record = Some(Box::new(record)),
            Err(why) => tracing::warn!(battery = %id, %why, "model refit failed"),
        }
    }

    /// Selects a model on the days through `day`; on failure the battery keeps the
    /// model it had and is tried again when next due.
    fn reselect(
        &mut self,
        id: &Arc<str>,
        history: &crate::windows::BatteryHistory,
        day: i32,
        settings: &ForecastSettings,
        out: &mut BatteryOutcome,
    ) {
        let version = self.record.as_ref().map(|r| r.version);
        let (selected, seconds) = timed_fit(history, day, settings.keep_days(), |series| {
            select(series, &settings.selection, version)
        });
        out.stats.selections += 1;
        out.stats.selection_seconds += seconds;
        match selected {
            Ok(record) => {
                out.selections.push((record.kind(), seconds));
                self.record = Some(Box::new(record));
            }
            Err(why) => {
                out.stats.failed_selections += 1;
                tracing::warn!(battery = %id, %why, "model selection failed");
            }
        }
    }
}

/// Runs `fit` on the battery's `n` days through `day`, timed on this thread's CPU clock,
/// with a panic caught and turned into an error: a failed fit leaves the battery its model.
fn timed_fit(
    history: &crate::windows::BatteryHistory,
    day: i32,
    n: usize,
    fit: impl FnOnce(&DailySeries) -> Result<ModelRecord, voltcast_forecaster::ForecastError>,
) -> (Result<ModelRecord, String>, f64) {
    let days: Vec<[f32; 3]> = history.window_through(day, n).collect();
    let series = series_of(&days, day + 1);
    let mut cpu = std::time::Duration::ZERO;
    let fitted = crate::memory::on_cpu(&mut cpu, || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fit(&series)))
    });
    let fitted = match fitted {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the fit panicked".to_string()),
    };
    (fitted, cpu.as_secs_f64())
}

fn assess(
    battery: &Arc<str>,
    // The fleet's shared id: the closed row's copy would allocate per battery-day.
    vehicle: Option<&Arc<str>>,
    row: &daily::ClosedRow<'_>,
    history: &crate::windows::BatteryHistory,
    record: &ModelRecord,
    config: &RiskConfig,
) -> RiskUpdate {
    let forecast = record.forecast(config.horizon_days.max(1));
    let risk = voltcast_forecaster::risk::assess(
        &forecast,
        |n| record.model.mean_path(n),
        row.lifetime,
        row.rated,
        record.low_confidence,
        config,
    );
    let recent = history.packed_through(row.day, RECENT_DAYS);
    let drivers = if risk.probability >= DRIVERS_FROM_PROBABILITY {
        let days: Vec<[f32; 3]> = history.window_through(row.day, 2 * RECENT_DAYS).collect();
        voltcast_forecaster::drivers::drivers(
            &days,
            risk.remaining,
            row.rated,
            risk.expected_cycles,
            3,
        )
        .into_iter()
        .collect()
    } else {
        TextLines::default()
    };
    RiskUpdate {
        battery_id: battery.clone(),
        vehicle_id: vehicle.cloned(),
        day: row.day,
        age: row.age,
        lifetime: row.lifetime,
        rated: row.rated,
        model: record.kind(),
        model_version: record.version,
        risk,
        forecast: forecast.into(),
        recent,
        drivers,
    }
}

fn series_of(days: &[[f32; 3]], end_day: i32) -> DailySeries {
    let mut s = DailySeries {
        first_day: end_day - days.len() as i32,
        ..Default::default()
    };
    for d in days {
        s.push(DayObservation {
            cycles: d[0] as f64,
            minutes: d[1] as f64,
            trips: d[2] as f64,
        });
    }
    s
}

/// Whether `day` is the battery's turn in a cycle of `cycle` days: the day of the cycle
/// its id hashes to, so that a fleet that started together spreads its work.
fn on_turn(day: i32, hash: u64, cycle: u32) -> bool {
    let cycle = cycle.max(1);
    (day as u32)
        .wrapping_add((hash % u64::from(cycle)) as u32)
        .is_multiple_of(cycle)
}

fn id_hash(id: &str) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(7).build_hasher();
    h.write(id.as_bytes());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forecast_bands_keep_means_in_f32_and_spreads_to_half_float_precision() {
        let forecast = Forecast {
            mean: (0..30).map(|d| 0.15 + f64::from(d) * 0.001).collect(),
            sd: (0..30).map(|d| 0.03 + f64::from(d) * 0.0001).collect(),
            sum_sd: (0..30).map(|d| 0.03 * f64::from(d + 1).sqrt()).collect(),
        };
        let bands = ForecastBands::from(forecast.clone());
        assert_eq!(bands.horizon(), 30);
        for (got, want) in bands.mean().zip(&forecast.mean) {
            assert_eq!(got, *want as f32);
        }
        let close = |got: f32, want: f64| ((f64::from(got) - want) / want).abs() < 1e-3;
        assert!(bands.sd().zip(&forecast.sd).all(|(g, w)| close(g, *w)));
        assert!(
            bands
                .sum_sd()
                .zip(&forecast.sum_sd)
                .all(|(g, w)| close(g, *w))
        );
        // Through JSON (the forecasts topic) and back: the same bands.
        let json = serde_json::to_string(&bands).unwrap();
        let back: ForecastBands = serde_json::from_str(&json).unwrap();
        assert_eq!(back, bands);
        let read: Forecast = serde_json::from_str(&json).unwrap();
        assert_eq!(read.mean.len(), 30);
        assert_eq!(read.sum_sd.len(), 30);
    }

    #[test]
    fn forecast_bands_cut_paths_to_the_shortest_and_saturate_huge_spreads() {
        let bands = ForecastBands::from(Forecast {
            mean: vec![1.0, 2.0, 3.0],
            sd: vec![1e9, 0.5],
            sum_sd: vec![0.1, 0.2, 0.3],
        });
        assert_eq!(bands.horizon(), 2);
        assert_eq!(bands.mean().collect::<Vec<_>>(), vec![1.0, 2.0]);
        assert_eq!(bands.sd().collect::<Vec<_>>(), vec![65504.0, 0.5]);
    }
}
