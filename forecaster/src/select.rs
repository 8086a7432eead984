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
//! beside it. Ranked by the sum error instead, five folds picked worse on both counts
//! (peers' seasonal fleet: NRMSE 0.1888 and sum error 5.9% against 0.1839 and 5.5%):
//! a 30-day sum is one number per fold, its error mostly the month's noise.
//!
//! Where a yearly season shows, `trend_seasonal` is the model ([`backtest`] says why).
//! Elsewhere the best NRMSE wins, with no tie rule. A rule that gave ties within 1% to the simpler
//! family cost NRMSE on the peers' fleet (0.1848 against 0.1839): `trend_seasonal`, the
//! richest family, is now tried only where a yearly season shows
//! ([`ModelKind::applicable`]), which was what the rule guarded against.

use serde::{Deserialize, Serialize};

use crate::error::ForecastError;
use crate::forecast::Forecast;
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
    /// Within reach of its rating, a battery is re-selected (full backtest) once it has
    /// this many new days.
    pub reselect_every_days: u32,
    /// A battery is within reach when its rating is this many days away or fewer at its
    /// recent pace (see [`Standing`]). Only then does a selection decide anything: farther
    /// out the failure probability is nil whichever family forecasts it.
    ///
    /// Why 60 and 14: two horizons, so a battery is backtested at least twice before an
    /// alert (P >= 0.9 within 30 days) can fire. On `voltcast bench forecast` (1,000
    /// batteries x 730 days) recall, precision and lead were the same to the battery with
    /// 90/7, 60/14, 45/14 and 90/28 (348/362, 358/372, 27 days), while the backtests per
    /// battery fell from 5.9 (90/7) to 2.3 (60/14).
    pub reach_days: u32,
    /// Out of reach, the model is refitted (family kept, no backtest) once it has as many
    /// new days as it was fitted on, and at least this often.
    pub refit_every_days: u32,
    /// The fit window of the families that need more than a year (`trend_seasonal`: a
    /// yearly season is estimated from a year and more). Up to the retained history
    /// (`windows.retention_days`).
    pub seasonal_window_days: usize,
}

impl SelectionConfig {
    /// Days `kind` is fitted on.
    pub fn window_for(&self, kind: ModelKind) -> usize {
        if kind.long_window() {
            self.seasonal_window_days.max(self.fit_window_days)
        } else {
            self.fit_window_days
        }
    }
}

impl Default for SelectionConfig {
    fn default() -> Self {
        Self {
            folds: 5,
            horizon_days: 30,
            fit_window_days: 365,
            min_history_days: 14,
            reselect_every_days: 14,
            reach_days: 60,
            refit_every_days: 91,
            seasonal_window_days: 730,
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
    /// Root mean square over the folds of (actual - forecast) / sd of the 30-day sum:
    /// 1 when the family's sum intervals are right for this battery.
    #[serde(default = "one")]
    pub sum_z_rms: f64,
}

fn one() -> f64 {
    1.0
}

/// Folds' worth of prior weight on a scale of 1 when calibrating (five folds alone are
/// too few to trust a battery's own scale).
const CALIBRATION_PRIOR_FOLDS: f64 = 5.0;

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
    /// Days observed (by `observe`) since the selection or refit.
    pub days_since_selection: u32,
    /// Days observed since the last backtest; None when the family was never backtested.
    pub days_since_backtest: Option<u32>,
    /// Wall time the selection took, backtest included.
    pub fit_micros: u64,
    /// Folds the scores were averaged over (0: no backtest).
    #[serde(default)]
    pub backtest_folds: u32,
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

    /// What the model's interval widths are multiplied by: its family's backtest errors
    /// of the 30-day sum over their predicted sd (conformal scaling), shrunk towards 1.
    /// Without it (and `trend_seasonal`'s level-error floor), 17% of held-out 30-day sums
    /// fell above the 90% quantile on the simulated fleet, and the failure probability was
    /// too sure with them.
    pub fn sd_scale(&self) -> f64 {
        let Some(chosen) = self.scores.iter().find(|s| s.kind == self.kind()) else {
            return 1.0;
        };
        let folds = self.backtest_folds as f64;
        if folds == 0.0 || !chosen.sum_z_rms.is_finite() {
            return 1.0;
        }
        let sq = chosen.sum_z_rms.powi(2) * folds + CALIBRATION_PRIOR_FOLDS;
        (sq / (folds + CALIBRATION_PRIOR_FOLDS)).sqrt()
    }

    /// The next `h` days with calibrated intervals.
    pub fn forecast(&self, h: usize) -> crate::Forecast {
        let mut f = self.model.predict(h);
        let scale = self.sd_scale();
        if scale != 1.0 {
            f.sd.iter_mut().for_each(|v| *v *= scale);
            f.sum_sd.iter_mut().for_each(|v| *v *= scale);
        }
        f
    }

    /// The daily update: advance the chosen model by one closed day.
    pub fn observe(&mut self, d: &DayObservation) {
        self.model.update(d);
        self.data_to_day += 1;
        self.days_since_selection += 1;
        if let Some(d) = self.days_since_backtest.as_mut() {
            *d += 1;
        }
    }

    /// Days the model was fitted on.
    pub fn fitted_days(&self) -> u32 {
        (self.data_to_day - self.data_from_day - self.days_since_selection as i32).max(0) as u32
    }
}

/// Where a battery stands against its rating: what decides how much model upkeep it
/// earns. Everything in it comes from the battery's closed days, so a replay decides the
/// same upkeep on the same day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    /// Rated minus lifetime cycles (negative: past the rating).
    pub remaining: f64,
    /// Recent daily cycles: the larger of the last week's and the last four weeks' means,
    /// so that a battery driven harder comes within reach within a week.
    pub pace: f64,
    /// Closed days retained for the battery.
    pub history_days: usize,
}

impl Standing {
    /// Days the recent pace is taken over.
    pub const PACE_DAYS: usize = 28;

    /// From the remaining cycles and the battery's last (up to) [`Self::PACE_DAYS`] days
    /// of cycles, oldest first.
    pub fn new(remaining: f64, recent: impl ExactSizeIterator<Item = f64>, history: usize) -> Self {
        let n = recent.len();
        let (mut all, mut week) = (0.0, 0.0);
        for (i, c) in recent.enumerate() {
            all += c;
            if i + 7 >= n {
                week += c;
            }
        }
        let pace = (all / n.max(1) as f64).max(week / n.clamp(1, 7) as f64);
        Self {
            remaining,
            pace,
            history_days: history,
        }
    }

    /// Rating within `days` at the recent pace, or already passed: the risk can move from
    /// one day to the next.
    pub fn near(&self, days: u32) -> bool {
        self.remaining <= self.pace * f64::from(days)
    }

    /// Rating passed more than `days` ago at the recent pace (at once, for a battery
    /// past its rating that no longer drives).
    pub fn past_by(&self, days: u32) -> bool {
        self.remaining < -self.pace * f64::from(days)
    }

    /// Rating within `days` at the recent pace, and not yet passed (past it the risk is
    /// certain whatever the model says).
    pub fn within(&self, days: u32) -> bool {
        self.remaining > 0.0 && self.near(days)
    }
}

/// Far from its rating, a battery's risk is reassessed this often.
pub const QUIET_ASSESS_EVERY_DAYS: u32 = 7;

/// Days (at its recent pace) past its rating that a battery is still assessed daily: the
/// crossing itself is seen the day it happens, whatever the battery's weekly turn.
pub const PASSED_ASSESS_DAILY_DAYS: u32 = 7;

/// What a battery's model needs after a closed day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upkeep {
    Keep,
    /// Refit the family it has on the latest window (one fit, microseconds to a
    /// millisecond).
    Refit,
    /// A full selection: every family backtested (milliseconds).
    Select,
}

impl SelectionConfig {
    /// The upkeep a battery's model gets today. Why not a full selection on a fixed
    /// cadence for every battery: on a 2-core machine replaying a year of a 20,000-battery
    /// fleet, weekly backtests cost over an hour of CPU, nearly all of it for batteries
    /// whose alert no model could change. So backtests go where the alert is decided:
    /// within `reach_days` of the rating, every `reselect_every_days`. Elsewhere the family
    /// is refitted as its history doubles, then every `refit_every_days`. Both happen only
    /// on the battery's turn (`turn`: the day of the `reselect_every_days` cycle its id
    /// hashes to), so that a fleet that started together, or became backtestable together,
    /// does not fit all on one day.
    pub fn upkeep(&self, record: Option<&ModelRecord>, standing: Standing, turn: bool) -> Upkeep {
        let Some(r) = record else {
            return Upkeep::Select;
        };
        if !turn {
            return Upkeep::Keep;
        }
        let backtestable = standing.history_days >= MIN_TRAIN_DAYS + self.horizon_days.max(1);
        if standing.within(self.reach_days) && backtestable {
            let due = r
                .days_since_backtest
                .is_none_or(|age| age >= self.reselect_every_days.max(1));
            if due {
                return Upkeep::Select;
            }
        }
        let every = r.fitted_days().clamp(
            self.reselect_every_days.max(1),
            self.refit_every_days.max(1),
        );
        if r.days_since_selection >= every {
            Upkeep::Refit
        } else {
            Upkeep::Keep
        }
    }

    /// Whether a battery's risk is worked out today. Far from its rating the risk is nil
    /// and moves slowly: it is reassessed on its weekly turn (`weekly_turn`, the day of
    /// the [`QUIET_ASSESS_EVERY_DAYS`] cycle its id hashes to) and when its model changed;
    /// near it, every day. Well past it the risk is certain and the alert decided, so
    /// the weekly turn again: on a year's backlog of a 20,000-battery fleet, batteries
    /// past their rating took 45% of all assessments, each the same certainty.
    pub fn assessed(&self, standing: Standing, upkeep: Upkeep, weekly_turn: bool) -> bool {
        let daily = standing.near(self.reach_days) && !standing.past_by(PASSED_ASSESS_DAILY_DAYS);
        daily || weekly_turn || upkeep != Upkeep::Keep
    }
}

/// The family a battery gets before any backtest has chosen one: the regression on trip
/// minutes, which wins most backtests on the simulated fleet (904 of 1,000 batteries in
/// `voltcast bench forecast`) and fits in closed form (tens of microseconds).
pub const UNSCORED_FAMILY: ModelKind = ModelKind::Regression;

/// Refits `previous`'s family (the default family after the short-history fallback) on
/// the latest window of `series`, keeping the backtest that chose it.
pub fn refit(
    series: &DailySeries,
    config: &SelectionConfig,
    previous: &ModelRecord,
) -> Result<ModelRecord, ForecastError> {
    let started = std::time::Instant::now();
    if series.is_empty() {
        return Err(ForecastError::Empty);
    }
    let short = series.len() < config.min_history_days;
    let kind = match previous.kind() {
        _ if short => ModelKind::Mean,
        ModelKind::Mean => UNSCORED_FAMILY,
        kind => kind,
    };
    let window = series.tail(config.window_for(kind));
    let model = kind
        .fit(&window)
        .or_else(|_| ModelKind::Mean.fit(&window))?;
    Ok(ModelRecord {
        version: previous.version + 1,
        low_confidence: previous.scores.is_empty() || model.kind() == ModelKind::Mean,
        model,
        scores: previous.scores.clone(),
        data_from_day: window.first_day,
        data_to_day: window.end_day(),
        days_since_selection: 0,
        days_since_backtest: previous.days_since_backtest,
        fit_micros: started.elapsed().as_micros() as u64,
        backtest_folds: previous.backtest_folds,
    })
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
    let window = series.tail(config.window_for(kind));
    let model = kind
        .fit(&window)
        .or_else(|_| ModelKind::Mean.fit(&window))?;
    Ok(ModelRecord {
        version: previous.map_or(1, |v| v + 1),
        low_confidence: low_confidence || model.kind() == ModelKind::Mean,
        model,
        days_since_backtest: (!scores.is_empty()).then_some(0),
        scores,
        data_from_day: window.first_day,
        data_to_day: window.end_day(),
        days_since_selection: 0,
        fit_micros: started.elapsed().as_micros() as u64,
        backtest_folds: folds as u32,
    })
}

/// Every candidate's mean scores over `folds` rolling origins, best first.
///
/// Where `trend_seasonal` is tried (its newest fold's window shows a yearly season,
/// [`ModelKind::applicable`]) and fits every fold, it is the only family scored, and so
/// chosen. Why: five 30-day folds are too few to tell it from the families that cannot
/// see the season or the level steps, and they picked one of those for one in six such
/// batteries (305 of 1,842) at a cost in held-out accuracy. Seasonal fleet (`voltcast
/// bench forecast --batteries 2000 --seasons`), session 29: NRMSE 0.1809 and 30-day sum
/// error 4.88% with `trend_seasonal` wherever it is tried; the backtest's pick among all
/// five (ranked by NRMSE, see the module notes) had 0.1822 and 5.14% (both with session
/// 29's level-step test). It also spares four families' backtests for those batteries.
///
/// The ensemble's fold forecast is the average of its parts' fold forecasts, which are
/// fitted anyway: fitting it again would double the cost of its parts for the same path.
pub fn backtest(
    series: &DailySeries,
    config: &SelectionConfig,
    folds: usize,
) -> Vec<BacktestScore> {
    let h = config.horizon_days;
    let n = series.len();
    // Decided once per backtest, on the newest fold's history: older folds fit without
    // yearly terms, as a shorter history would. Read in place: most backtests see
    // histories too short to try the long window.
    let from = (n - h).saturating_sub(config.window_for(ModelKind::TrendSeasonal));
    let newest = &series.cycles[from..n - h];
    let tried: Vec<ModelKind> = ModelKind::CANDIDATES
        .into_iter()
        .filter(|k| k.applicable(series.first_day + from as i32, newest))
        .collect();
    if !tried.contains(&ModelKind::TrendSeasonal) {
        return score_families(series, config, folds, &tried);
    }
    let seasonal = score_families(series, config, folds, &[ModelKind::TrendSeasonal]);
    if seasonal[0].nrmse.is_finite() {
        return seasonal;
    }
    let others: Vec<ModelKind> = tried
        .into_iter()
        .filter(|&k| k != ModelKind::TrendSeasonal)
        .collect();
    let mut scores = score_families(series, config, folds, &others);
    scores.extend(seasonal); // could not fit: last
    scores
}

/// `kinds`' mean scores over `folds` rolling origins, best first (an infinite score is
/// one that could not fit some fold).
fn score_families(
    series: &DailySeries,
    config: &SelectionConfig,
    folds: usize,
    kinds: &[ModelKind],
) -> Vec<BacktestScore> {
    let h = config.horizon_days;
    let n = series.len();
    // Per candidate: summed nrmse, sum error and squared sum z, or None once a fold could
    // not be fitted.
    let mut sums: Vec<Option<(f64, f64, f64)>> = vec![Some((0.0, 0.0, 0.0)); kinds.len()];
    let long_window = config.window_for(ModelKind::TrendSeasonal);
    for f in 1..=folds {
        let origin = n - f * h;
        let train = series.slice(origin.saturating_sub(config.fit_window_days), origin);
        // The long window is copied only when a family scored is fitted on it.
        let long = kinds
            .iter()
            .any(|k| k.long_window())
            .then(|| series.slice(origin.saturating_sub(long_window), origin));
        let actual = &series.cycles[origin..origin + h];
        let forecasts: Vec<Option<Forecast>> = kinds
            .iter()
            .map(|&kind| {
                if kind == ModelKind::Ensemble {
                    return None; // the ensemble is scored from its parts below
                }
                let window = match &long {
                    Some(long) if kind.long_window() => long,
                    _ => &train,
                };
                kind.fit(window).ok().map(|m| m.predict(h))
            })
            .collect();
        let ensemble = ensemble_forecast(kinds, &forecasts);
        let actual_sum: f64 = actual.iter().sum();
        for (i, &kind) in kinds.iter().enumerate() {
            let forecast = match kind {
                ModelKind::Ensemble => ensemble.as_ref(),
                _ => forecasts[i].as_ref(),
            };
            sums[i] = match (sums[i], forecast) {
                (Some((nrmse, sum_error, z2)), Some(f)) => {
                    let z = f.sum_z(actual_sum);
                    Some((
                        nrmse + nrmse_of(actual, &f.mean),
                        sum_error + relative_sum_error(actual, &f.mean),
                        z2 + z * z,
                    ))
                }
                _ => None,
            };
        }
    }
    let mut scores: Vec<BacktestScore> = kinds
        .iter()
        .zip(sums)
        .map(|(&kind, sum)| {
            let f = folds as f64;
            let (nrmse, sum_error, sum_z_rms) = sum.map_or(
                (f64::INFINITY, f64::INFINITY, f64::INFINITY),
                |(a, b, z2)| (a / f, b / f, (z2 / f).sqrt()),
            );
            BacktestScore {
                kind,
                nrmse,
                sum_error,
                sum_z_rms,
            }
        })
        .collect();
    scores.sort_by(|a, b| a.nrmse.total_cmp(&b.nrmse));
    scores
}

/// The average of the ensemble's parts' forecasts, as [`FittedModel::Ensemble`]
/// forecasts.
fn ensemble_forecast(kinds: &[ModelKind], forecasts: &[Option<Forecast>]) -> Option<Forecast> {
    let parts: Vec<Forecast> = ModelKind::ENSEMBLE
        .iter()
        .map(|part| {
            let i = kinds.iter().position(|k| k == part)?;
            forecasts[i].clone()
        })
        .collect::<Option<_>>()?;
    Some(crate::model::average(parts.into_iter()))
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
