//! Model selection per battery by rolling-origin backtest.
//!
//! Defaults, and why: 5 folds with origins 30, 60, ... 150 days before the end, each
//! forecasting the 30 days after its origin (the alert horizon) from the `fit_window_days`
//! before it. Five non-overlapping 30-day test windows cover five months: with daily noise
//! around 20%, three folds picked a worse family often enough to cost measurable accuracy
//! on the simulated fleet, and five keep selection at ~9 ms per battery (6 fits per
//! family). The fit window (365 days) lets the weekly profile be estimated from a year of
//! weeks (180 days was measurably worse) while the regression follows the
//! cycles-per-minute drift on its own recent window. The primary metric is the
//! reference's NRMSE (RMSE over the range of the actuals), averaged over folds; the
//! relative error of the 30-day sum, which is what the end-of-life rule uses, is kept
//! beside it.

use serde::{Deserialize, Serialize};

use crate::error::ForecastError;
use crate::model::{FittedModel, Model, ModelKind};
use crate::series::{DailySeries, DayObservation};

/// `[forecast]` selection settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectionConfig {
    pub folds: usize,
    pub horizon_days: usize,
    pub fit_window_days: usize,
    /// Below this many days a battery gets the flat fallback, flagged low-confidence.
    pub min_history_days: usize,
    /// Full re-selection once a battery has this many new days.
    pub reselect_every_days: u32,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        Self {
            folds: 5,
            horizon_days: 30,
            fit_window_days: 365,
            min_history_days: 14,
            reselect_every_days: 7,
        }
    }
}

/// A family's backtest result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BacktestScore {
    pub kind: ModelKind,
    /// Mean NRMSE over the folds (infinite when the family could not be fitted).
    pub nrmse: f64,
    /// Mean |forecast sum - actual sum| / actual sum over the folds' 30 days.
    pub sum_error: f64,
}

/// What selection decided for one battery: versioned, serializable, servable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Increments with every selection of this battery.
    pub version: u32,
    pub model: FittedModel,
    /// Every candidate's score, best first (empty when there was too little history).
    pub scores: Vec<BacktestScore>,
    /// First and one-past-last day number of the data the model was fitted on.
    pub data_from_day: i32,
    pub data_to_day: i32,
    /// Days observed (by `observe`) since the selection.
    pub days_since_selection: u32,
    /// Wall time the selection took, backtest included.
    pub fit_micros: u64,
    /// Too little history for a backtest: the forecast is a rough guide only.
    pub low_confidence: bool,
}

impl ModelRecord {
    pub fn kind(&self) -> ModelKind {
        self.model.kind()
    }

    pub fn backtest_nrmse(&self) -> Option<f64> {
        self.scores.first().map(|s| s.nrmse)
    }

    /// The daily update: advance the chosen model by one closed day.
    pub fn observe(&mut self, d: &DayObservation) {
        self.model.update(d);
        self.data_to_day += 1;
        self.days_since_selection += 1;
    }

    pub fn reselection_due(&self, config: &SelectionConfig) -> bool {
        self.days_since_selection >= config.reselect_every_days
    }
}

/// Training days before the first backtest origin.
const MIN_TRAIN_DAYS: usize = 28;

/// Picks and fits the best family for `series`. `previous` is the version being replaced.
pub fn select(
    series: &DailySeries,
    config: &SelectionConfig,
    previous: Option<u32>,
) -> Result<ModelRecord, ForecastError> {
    let started = std::time::Instant::now();
    if series.is_empty() {
        return Err(ForecastError::Empty);
    }
    let h = config.horizon_days.max(1);
    let n = series.len();
    let folds = config.folds.min(n.saturating_sub(MIN_TRAIN_DAYS) / h);
    let (kind, scores, low_confidence) = if n < config.min_history_days {
        (ModelKind::Mean, Vec::new(), true)
    } else if folds == 0 {
        (ModelKind::AutoEts, Vec::new(), true)
    } else {
        let scores = backtest(series, config, folds);
        (scores[0].kind, scores, false)
    };
    let window = series.tail(config.fit_window_days);
    let model = kind
        .fit(&window)
        .or_else(|_| ModelKind::Mean.fit(&window))?;
    Ok(ModelRecord {
        version: previous.map_or(1, |v| v + 1),
        low_confidence: low_confidence || model.kind() == ModelKind::Mean,
        model,
        scores,
        data_from_day: window.first_day,
        data_to_day: window.end_day(),
        days_since_selection: 0,
        fit_micros: started.elapsed().as_micros() as u64,
    })
}

/// Every candidate's mean scores over `folds` rolling origins, best first.
pub fn backtest(
    series: &DailySeries,
    config: &SelectionConfig,
    folds: usize,
) -> Vec<BacktestScore> {
    let h = config.horizon_days;
    let n = series.len();
    let mut scores: Vec<BacktestScore> = ModelKind::CANDIDATES
        .iter()
        .map(|&kind| {
            let (mut nrmse, mut sum_error) = (0.0, 0.0);
            for f in 1..=folds {
                let origin = n - f * h;
                let train = series.slice(origin.saturating_sub(config.fit_window_days), origin);
                let actual = &series.cycles[origin..origin + h];
                let Ok(model) = kind.fit(&train) else {
                    return BacktestScore {
                        kind,
                        nrmse: f64::INFINITY,
                        sum_error: f64::INFINITY,
                    };
                };
                let predicted = model.mean_path(h);
                nrmse += nrmse_of(actual, &predicted);
                sum_error += relative_sum_error(actual, &predicted);
            }
            BacktestScore {
                kind,
                nrmse: nrmse / folds as f64,
                sum_error: sum_error / folds as f64,
            }
        })
        .collect();
    scores.sort_by(|a, b| a.nrmse.total_cmp(&b.nrmse));
    scores
}

/// RMSE over the range of the actuals (the reference's normalization).
pub fn nrmse_of(actual: &[f64], predicted: &[f64]) -> f64 {
    let n = actual.len().min(predicted.len()).max(1) as f64;
    let mse = actual
        .iter()
        .zip(predicted)
        .map(|(a, p)| (a - p).powi(2))
        .sum::<f64>()
        / n;
    let (lo, hi) = actual
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = hi - lo;
    let scale = if range > 1e-12 {
        range
    } else {
        (actual.iter().sum::<f64>() / n).abs().max(1e-12)
    };
    mse.sqrt() / scale
}

pub fn relative_sum_error(actual: &[f64], predicted: &[f64]) -> f64 {
    let a: f64 = actual.iter().sum();
    let p: f64 = predicted.iter().take(actual.len()).sum();
    (p - a).abs() / a.abs().max(1e-12)
}
