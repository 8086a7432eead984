//! The forecast stage on the stream: closed days in, a fresh failure risk per battery out.
//!
//! On each closed day a battery's chosen model is advanced by the day (microseconds, on
//! the stage's task) and its risk recomputed. Full model selection (milliseconds, a
//! backtest over every family) runs on a bounded pool of blocking threads, never on the
//! async runtime, so ingestion is never held up by fitting. A battery is re-selected once
//! it has `reselect_every_days` new days, on the day of the week its id hashes to, so a
//! fleet that started together does not re-select all on the same day. When a selection
//! comes back, the days that closed while it ran are replayed into the new model.
//!
//! Closed days are keyed by (battery, day): a day emitted again after a restart from a
//! checkpoint is recognised and skipped, so nothing is counted twice.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use voltcast_forecaster::{
    DailySeries, DayObservation, FailureRisk, Forecast, ModelKind, ModelRecord, RiskConfig,
    SelectionConfig, select,
};

use crate::windows::daily;

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
    pub forecast: Forecast,
    /// The last days (up to [`RECENT_DAYS`]) as cycles, minutes, trips; oldest first.
    pub recent: Vec<[f32; 3]>,
    /// What drives the forecast, strongest first (only when the risk is notable).
    pub drivers: Vec<String>,
}

/// Battery maps are looked up once per closed day: foldhash rather than SipHash, since
/// ids come from the fleet's own cars (see `windows::shard::id_hash`).
type FastHash = foldhash::fast::RandomState;

/// Days of history a [`RiskUpdate`] carries for the API.
pub const RECENT_DAYS: usize = 30;
/// Drivers are worked out from this probability up: below it nobody reads them.
const DRIVERS_FROM_PROBABILITY: f64 = 0.5;

/// What the stage keeps per battery.
struct BatteryModel {
    /// Recent days, oldest first, as much as selection needs.
    days: VecDeque<[f32; 3]>,
    last_day: i32,
    vehicle: Option<Arc<str>>,
    age: i32,
    /// Lifetime and rating as of `last_day`.
    lifetime: f64,
    rated: f64,
    record: Option<ModelRecord>,
    /// A selection is running on the pool.
    selecting: bool,
    stagger: u32,
}

/// A finished selection, on its way back from the pool.
struct Selected {
    battery: Arc<str>,
    /// CPU time the selection took on its thread.
    seconds: f64,
    /// Day after the last one the selection saw.
    through_day: i32,
    /// The new model, or why there is none: a failed or panicked selection still comes
    /// back, or the battery would wait on it for ever (and shutdown with it).
    record: Result<ModelRecord, String>,
}

pub struct ForecastStage {
    selection: SelectionConfig,
    risk: RiskConfig,
    batteries: HashMap<Arc<str>, BatteryModel, FastHash>,
    pool: Arc<Semaphore>,
    done_tx: mpsc::UnboundedSender<Selected>,
    done_rx: mpsc::UnboundedReceiver<Selected>,
    /// Days a battery keeps: enough for every backtest fold plus the fit window.
    keep_days: usize,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Daily updates per model kind not yet added to the metrics.
    fits_pending: HashMap<ModelKind, u64, FastHash>,
    pub stats: ForecastStats,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastStats {
    pub days_in: u64,
    pub repeated_days: u64,
    pub updates: u64,
    pub selections: u64,
    /// CPU time the stage spent on closed days (daily updates, risk, drivers).
    pub update_seconds: f64,
    /// Thread time the finished selections took on the pool.
    pub selection_seconds: f64,
    /// Selections that failed or panicked (the battery kept its model).
    pub failed_selections: u64,
}

impl ForecastStage {
    /// `fit_threads` bounds how many selections run at once.
    pub fn new(selection: SelectionConfig, risk: RiskConfig, fit_threads: usize) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let keep_days = selection.fit_window_days + selection.folds * selection.horizon_days.max(1);
        Self {
            selection,
            risk,
            batteries: HashMap::default(),
            pool: Arc::new(Semaphore::new(fit_threads.max(1))),
            done_tx,
            done_rx,
            keep_days,
            metrics: None,
            fits_pending: HashMap::default(),
            stats: ForecastStats::default(),
        }
    }

    /// Report fits, their durations and the models chosen to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Consumes closed-day batches until the channel closes and every selection in
    /// flight has come back; sends each batch's fresh risks to `out`, together.
    ///
    /// Both channels are bounded: on a backlog the window stage outruns this one, and
    /// closed days waiting in an unbounded queue held gigabytes. A full `out` holds this
    /// stage back, and so the window stage and the source behind it.
    pub async fn run(
        mut self,
        mut closed: mpsc::Receiver<RecordBatch>,
        out: mpsc::Sender<Vec<RiskUpdate>>,
    ) -> Self {
        let mut open = true;
        loop {
            let in_flight = self.batteries.values().any(|b| b.selecting);
            if !open && !in_flight {
                return self;
            }
            tokio::select! {
                batch = closed.recv(), if open => match batch {
                    Some(batch) => {
                        let mut spent = std::time::Duration::ZERO;
                        let updates = crate::memory::on_cpu(&mut spent, || self.take_batch(&batch));
                        self.stats.update_seconds += spent.as_secs_f64();
                        if !updates.is_empty() {
                            // A listener that went away is not our failure.
                            let _ = out.send(updates).await;
                        }
                    }
                    None => open = false,
                },
                Some(done) = self.done_rx.recv() => {
                    if let Some(u) = self.install(done) {
                        let _ = out.send(vec![u]).await;
                    }
                }
            }
        }
    }

    /// Starts from the window stage's histories (after a restart from a checkpoint):
    /// every battery with history gets a selection right away.
    pub fn seed(&mut self, state: &crate::windows::WindowState) {
        let reselect = self.selection.reselect_every_days.max(1);
        for battery in state.batteries() {
            let (id, history) = (battery.id, battery.history);
            let Some(last_day) = history.last_day() else {
                continue;
            };
            let days: VecDeque<[f32; 3]> = history
                .days()
                .skip(history.len().saturating_sub(self.keep_days))
                .map(|(_, c, m, t, _)| [c, m, t as f32])
                .collect();
            let series = series_of(&days, last_day + 1);
            self.batteries.insert(
                id.clone(),
                BatteryModel {
                    days,
                    last_day,
                    vehicle: battery.vehicle.cloned(),
                    age: history.last_age().unwrap_or_default(),
                    lifetime: history.lifetime().unwrap_or_default(),
                    rated: battery.rated,
                    record: None,
                    selecting: true,
                    stagger: stagger(id, reselect),
                },
            );
            self.stats.selections += 1;
            spawn_selection(
                &self.pool,
                &self.done_tx,
                &self.selection,
                id.clone(),
                series,
                None,
            );
        }
    }

    /// Waits for every selection in flight and installs it; returns the risks the
    /// installed models give.
    pub async fn settle(&mut self) -> Vec<RiskUpdate> {
        let mut updates = Vec::new();
        while self.batteries.values().any(|b| b.selecting) {
            let Some(done) = self.done_rx.recv().await else {
                break;
            };
            updates.extend(self.install(done));
        }
        updates
    }

    /// The model record of a battery, if it has one yet.
    pub fn record(&self, battery: &str) -> Option<&ModelRecord> {
        self.batteries.get(battery)?.record.as_ref()
    }

    pub fn batteries(&self) -> usize {
        self.batteries.len()
    }

    /// Takes in one batch of closed days (the window stage's daily schema); returns the
    /// fresh risk of every battery that has a model.
    pub fn take_batch(&mut self, batch: &RecordBatch) -> Vec<RiskUpdate> {
        let Some(rows) = daily::closed_rows(batch) else {
            tracing::error!("closed-day batch without the daily schema; skipped");
            return Vec::new();
        };
        let updates = rows.iter().filter_map(|row| self.take_day(row)).collect();
        self.flush_fit_counts();
        updates
    }

    /// Adds the daily updates counted since the last call to the fits metric: one
    /// labelled lookup per model kind and batch rather than per battery-day.
    fn flush_fit_counts(&mut self) {
        let Some(m) = &self.metrics else {
            return;
        };
        for (kind, n) in self.fits_pending.drain() {
            m.forecast_fits.with_label_values(&[kind.name()]).inc_by(n);
        }
    }

    fn take_day(&mut self, row: &daily::ClosedRow<'_>) -> Option<RiskUpdate> {
        let (id, day, obs) = (row.battery_id, row.day, row.observation);
        let (lifetime, rated) = (row.lifetime, row.rated);
        self.stats.days_in += 1;
        let reselect = self.selection.reselect_every_days.max(1);
        let battery: Arc<str> = match self.batteries.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => {
                let key: Arc<str> = Arc::from(id);
                self.batteries.insert(
                    key.clone(),
                    BatteryModel {
                        days: VecDeque::new(),
                        last_day: i32::MIN,
                        vehicle: None,
                        age: 0,
                        lifetime: 0.0,
                        rated: 0.0,
                        record: None,
                        selecting: false,
                        stagger: stagger(id, reselect),
                    },
                );
                key
            }
        };
        let keep = self.keep_days;
        let b = self.batteries.get_mut(&battery)?;
        if day <= b.last_day {
            self.stats.repeated_days += 1;
            return None;
        }
        (b.last_day, b.lifetime, b.rated, b.age) = (day, lifetime, rated, row.age);
        if let Some(v) = row.vehicle_id
            && b.vehicle.as_deref() != Some(v)
        {
            b.vehicle = Some(Arc::from(v));
        }
        b.days
            .push_back([obs.cycles as f32, obs.minutes as f32, obs.trips as f32]);
        while b.days.len() > keep {
            b.days.pop_front();
        }
        // Advance and assess first: the risk reflects today whatever selection decides.
        if let Some(record) = b.record.as_mut() {
            record.observe(&obs);
            *self.fits_pending.entry(record.kind()).or_default() += 1;
        }
        let update = b
            .record
            .as_ref()
            .map(|record| assess(&battery, b, record, &self.risk));
        self.stats.updates += u64::from(update.is_some());
        let due = match &b.record {
            None => true,
            Some(r) => {
                r.reselection_due(&self.selection)
                    && (day as u32).wrapping_add(b.stagger) % reselect == 0
            }
        };
        if due && !b.selecting {
            b.selecting = true;
            self.stats.selections += 1;
            let series = series_of(&b.days, day + 1);
            let version = b.record.as_ref().map(|r| r.version);
            spawn_selection(
                &self.pool,
                &self.done_tx,
                &self.selection,
                battery.clone(),
                series,
                version,
            );
        }
        update
    }

    /// Installs a finished selection, replaying the days that closed while it ran, and
    /// assesses the battery with it.
    fn install(&mut self, done: Selected) -> Option<RiskUpdate> {
        self.stats.selection_seconds += done.seconds;
        let b = self.batteries.get_mut(&done.battery)?;
        b.selecting = false;
        // The battery keeps the model it had; selection is tried again when next due.
        let mut record = match done.record {
            Ok(record) => record,
            Err(why) => {
                self.stats.failed_selections += 1;
                tracing::warn!(battery = %done.battery, %why, "model selection failed");
                return None;
            }
        };
        if let Some(m) = &self.metrics {
            let kind = record.kind().name();
            m.forecast_fits.with_label_values(&[kind]).inc();
            m.model_selections.with_label_values(&[kind]).inc();
            m.fit_seconds
                .with_label_values(&[kind])
                .observe(done.seconds);
        }
        let missed = (b.last_day + 1 - done.through_day).max(0) as usize;
        for d in b.days.iter().skip(b.days.len().saturating_sub(missed)) {
            record.observe(&DayObservation {
                cycles: d[0] as f64,
                minutes: d[1] as f64,
                trips: d[2] as f64,
            });
        }
        let update = assess(&done.battery, b, &record, &self.risk);
        b.record = Some(record);
        Some(update)
    }
}

fn spawn_selection(
    pool: &Arc<Semaphore>,
    done: &mpsc::UnboundedSender<Selected>,
    config: &SelectionConfig,
    battery: Arc<str>,
    series: DailySeries,
    version: Option<u32>,
) {
    let (pool, done, config) = (pool.clone(), done.clone(), config.clone());
    tokio::spawn(async move {
        let Ok(_permit) = pool.acquire_owned().await else {
            return;
        };
        let through_day = series.end_day();
        let fitted = tokio::task::spawn_blocking(move || {
            let mut cpu = std::time::Duration::ZERO;
            let selected = crate::memory::on_cpu(&mut cpu, || select(&series, &config, version));
            selected.map(|r| (r, cpu.as_secs_f64()))
        })
        .await;
        let (record, seconds) = match fitted {
            Ok(Ok((record, seconds))) => (Ok(record), seconds),
            Ok(Err(e)) => (Err(e.to_string()), 0.0),
            Err(e) => (Err(format!("the selection thread failed: {e}")), 0.0),
        };
        let _ = done.send(Selected {
            battery,
            seconds,
            through_day,
            record,
        });
    });
}

fn assess(
    battery: &Arc<str>,
    b: &BatteryModel,
    record: &ModelRecord,
    config: &RiskConfig,
) -> RiskUpdate {
    let forecast = record.model.predict(config.horizon_days.max(1));
    let risk = voltcast_forecaster::risk::assess(
        &forecast,
        |n| record.model.mean_path(n),
        b.lifetime,
        b.rated,
        record.low_confidence,
        config,
    );
    let recent: Vec<[f32; 3]> = b
        .days
        .iter()
        .skip(b.days.len().saturating_sub(RECENT_DAYS))
        .copied()
        .collect();
    let drivers = if risk.probability >= DRIVERS_FROM_PROBABILITY {
        let days: Vec<[f32; 3]> = b
            .days
            .iter()
            .skip(b.days.len().saturating_sub(2 * RECENT_DAYS))
            .copied()
            .collect();
        voltcast_forecaster::drivers::drivers(
            &days,
            risk.remaining,
            b.rated,
            risk.expected_cycles,
            3,
        )
    } else {
        Vec::new()
    };
    RiskUpdate {
        battery_id: battery.clone(),
        vehicle_id: b.vehicle.clone(),
        day: b.last_day,
        age: b.age,
        lifetime: b.lifetime,
        rated: b.rated,
        model: record.kind(),
        model_version: record.version,
        risk,
        forecast,
        recent,
        drivers,
    }
}

fn series_of(days: &VecDeque<[f32; 3]>, end_day: i32) -> DailySeries {
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

/// The day of the re-selection cycle a battery takes its turn on.
fn stagger(id: &str, cycle: u32) -> u32 {
    let mut h = foldhash::fast::FixedState::with_seed(7).build_hasher();
    h.write(id.as_bytes());
    (h.finish() % cycle as u64) as u32
}
