//! The model families and the one trait they share.

use serde::{Deserialize, Serialize};

use crate::error::ForecastError;
use crate::ets::Ets;
use crate::forecast::Forecast;
use crate::mstl::MstlEts;
use crate::naive::SeasonalNaive;
use crate::regression::CycleRegression;
use crate::seasonal::SeasonalCycles;
use crate::series::{DailySeries, DayObservation};

/// Weekly seasonality: people drive by the day of the week.
pub const WEEK: usize = 7;

/// A model family: fits a battery's daily series (cycles, plus minutes and trips as
/// exogenous columns) into a [`FittedModel`].
pub trait Model {
    fn kind(&self) -> ModelKind;
    fn fit(&self, series: &DailySeries) -> Result<FittedModel, ForecastError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    SeasonalNaive,
    AutoEts,
    MstlEts,
    Regression,
    /// The average of the regression's and MSTL-ETS's forecasts: two views of the same
    /// battery (driving-led and history-led) whose errors partly cancel.
    Ensemble,
    /// The short-history fallback: the mean of the days seen so far.
    Mean,
    /// Prophet-style: log daily cycles as a trend with level steps, weekly and yearly
    /// seasonality, fitted on up to `seasonal_window_days`.
    TrendSeasonal,
}

impl ModelKind {
    /// The candidates model selection compares.
    ///
    /// Not the non-seasonal AutoETS: it won none of 3,000 batteries on the two bench
    /// fleets (MSTL's trend *is* an AutoETS, on the series with its week taken out, which
    /// a non-seasonal model can only treat as noise), and its fits were a tenth of a
    /// selection. It stays a model kind: the fallback when a history is too short to
    /// backtest, and the kind of records made before.
    pub const CANDIDATES: [ModelKind; 5] = [
        ModelKind::SeasonalNaive,
        ModelKind::MstlEts,
        ModelKind::Regression,
        ModelKind::Ensemble,
        ModelKind::TrendSeasonal,
    ];

    /// The families an ensemble averages.
    pub const ENSEMBLE: [ModelKind; 2] = [ModelKind::Regression, ModelKind::MstlEts];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::SeasonalNaive => "seasonal_naive",
            ModelKind::AutoEts => "auto_ets",
            ModelKind::MstlEts => "mstl_ets",
            ModelKind::Regression => "regression",
            ModelKind::Ensemble => "ensemble",
            ModelKind::Mean => "mean",
            ModelKind::TrendSeasonal => "trend_seasonal",
        }
    }

    /// Whether the family looks back further than the usual fit window: a yearly season
    /// needs a year and more of history.
    pub fn long_window(self) -> bool {
        self == ModelKind::TrendSeasonal
    }

    /// Whether a backtest should try the family, given the cycles of its newest fold's
    /// training window (the long one: [`Self::long_window`]) from day `first_day`. `trend_seasonal` only where that window
    /// covers a year and shows a yearly season
    /// ([`crate::seasonal::SeasonalCycles::shows_a_season`]): without one it is a weekly
    /// model with level steps, which won 16 of 20 flat series by a hair's breadth of
    /// NRMSE (`selection_picks_trend_seasonal_...`); and trying it on a 365-day backlog
    /// anyway cost a third of its throughput (selections 24 -> 38 CPU s in `bench
    /// pipeline`) for nothing.
    pub fn applicable(self, first_day: i32, cycles: &[f64]) -> bool {
        self != ModelKind::TrendSeasonal || SeasonalCycles::shows_a_season(first_day, cycles)
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Model for ModelKind {
    fn kind(&self) -> ModelKind {
        *self
    }

    fn fit(&self, s: &DailySeries) -> Result<FittedModel, ForecastError> {
        let y = &s.cycles;
        let fitted = match self {
            ModelKind::SeasonalNaive => SeasonalNaive::fit(y, WEEK).map(FittedModel::SeasonalNaive),
            ModelKind::AutoEts => Ets::auto(y).map(FittedModel::AutoEts),
            ModelKind::MstlEts => MstlEts::fit(y, WEEK).map(FittedModel::MstlEts),
            ModelKind::Regression => CycleRegression::fit(s).map(FittedModel::Regression),
            ModelKind::Ensemble => ModelKind::ENSEMBLE
                .iter()
                .map(|k| k.fit(s).ok())
                .collect::<Option<Vec<_>>>()
                .map(|parts| FittedModel::Ensemble { parts }),
            ModelKind::Mean => Flat::fit(y).map(FittedModel::Mean),
            ModelKind::TrendSeasonal => SeasonalCycles::fit(s).map(FittedModel::TrendSeasonal),
        };
        fitted.ok_or(ForecastError::CannotFit {
            kind: *self,
            days: s.len(),
        })
    }
}

/// A fitted model with its current state: predicts, and advances by one closed day.
///
/// Externally tagged (serde's default): it travels in partition checkpoints, whose
/// binary encoding cannot read the self-describing internal tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FittedModel {
    SeasonalNaive(SeasonalNaive),
    AutoEts(Ets),
    MstlEts(MstlEts),
    Regression(CycleRegression),
    Ensemble { parts: Vec<FittedModel> },
    Mean(Flat),
    TrendSeasonal(SeasonalCycles),
}

impl FittedModel {
    pub fn kind(&self) -> ModelKind {
        match self {
            FittedModel::SeasonalNaive(_) => ModelKind::SeasonalNaive,
            FittedModel::AutoEts(_) => ModelKind::AutoEts,
            FittedModel::MstlEts(_) => ModelKind::MstlEts,
            FittedModel::Regression(_) => ModelKind::Regression,
            FittedModel::Ensemble { .. } => ModelKind::Ensemble,
            FittedModel::Mean(_) => ModelKind::Mean,
            FittedModel::TrendSeasonal(_) => ModelKind::TrendSeasonal,
        }
    }

    /// Days 1..=h with their uncertainty.
    pub fn predict(&self, h: usize) -> Forecast {
        match self {
            FittedModel::SeasonalNaive(m) => m.predict(h),
            FittedModel::AutoEts(m) => m.predict(h),
            FittedModel::MstlEts(m) => m.predict(h),
            FittedModel::Regression(m) => m.predict(h),
            FittedModel::Ensemble { parts } => average(parts.iter().map(|p| p.predict(h))),
            FittedModel::Mean(m) => m.predict(h),
            FittedModel::TrendSeasonal(m) => m.predict(h),
        }
    }

    /// Expected values only (cheap for long horizons: end-of-life dates).
    pub fn mean_path(&self, h: usize) -> Vec<f64> {
        match self {
            FittedModel::SeasonalNaive(m) => m.mean_path(h),
            FittedModel::AutoEts(m) => m.mean_path(h),
            FittedModel::MstlEts(m) => m.mean_path(h),
            FittedModel::Regression(m) => m.mean_path(h),
            FittedModel::Ensemble { parts } => {
                let paths: Vec<Vec<f64>> = parts.iter().map(|p| p.mean_path(h)).collect();
                (0..h)
                    .map(|k| paths.iter().map(|p| p[k]).sum::<f64>() / paths.len() as f64)
                    .collect()
            }
            FittedModel::Mean(m) => vec![m.mean; h],
            FittedModel::TrendSeasonal(m) => m.mean_path(h),
        }
    }

    /// Advances the state by one observed day through the model's recursions (no
    /// re-optimization: that happens on the selection cadence).
    pub fn update(&mut self, d: &DayObservation) {
        match self {
            FittedModel::SeasonalNaive(m) => m.step(d.cycles),
            FittedModel::AutoEts(m) => {
                m.step(d.cycles);
            }
            FittedModel::MstlEts(m) => m.step(d.cycles),
            FittedModel::Regression(m) => m.step(d),
            FittedModel::Ensemble { parts } => parts.iter_mut().for_each(|p| p.update(d)),
            FittedModel::Mean(m) => m.step(d.cycles),
            FittedModel::TrendSeasonal(m) => m.step(d),
        }
    }
}

/// The average forecast. Its sd is the average sd: exact when the parts' errors are
/// perfectly correlated, and on the safe (wider) side otherwise.
pub(crate) fn average(parts: impl Iterator<Item = Forecast>) -> Forecast {
    let parts: Vec<Forecast> = parts.collect();
    let n = parts.len().max(1) as f64;
    let h = parts.first().map_or(0, Forecast::horizon);
    let avg = |f: &dyn Fn(&Forecast) -> &Vec<f64>| -> Vec<f64> {
        (0..h)
            .map(|k| parts.iter().map(|p| f(p)[k]).sum::<f64>() / n)
            .collect()
    };
    Forecast {
        mean: avg(&|p| &p.mean),
        sd: avg(&|p| &p.sd),
        sum_sd: avg(&|p| &p.sum_sd),
    }
}

/// The mean of the days seen: for histories too short for anything else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flat {
    pub mean: f64,
    pub sigma: f64,
    pub n: usize,
}

impl Flat {
    fn fit(y: &[f64]) -> Option<Self> {
        if y.is_empty() {
            return None;
        }
        let n = y.len();
        let mean = y.iter().sum::<f64>() / n as f64;
        let var = y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
        // With a handful of days the spread itself is uncertain: never below half the mean.
        let sigma = var.sqrt().max(0.5 * mean.abs());
        Some(Self { mean, sigma, n })
    }

    fn step(&mut self, y: f64) {
        self.n += 1;
        self.mean += (y - self.mean) / self.n as f64;
    }

    /// Day errors are independent, but the estimated mean's error is shared by all days:
    /// Var(S_H) = H sigma^2 + H^2 sigma^2 / n.
    fn predict(&self, h: usize) -> Forecast {
        let s2 = self.sigma * self.sigma;
        let n = self.n as f64;
        Forecast {
            mean: vec![self.mean; h],
            sd: vec![(s2 * (1.0 + 1.0 / n)).sqrt(); h],
            sum_sd: (1..=h)
                .map(|k| (k as f64 * s2 + (k * k) as f64 * s2 / n).sqrt())
                .collect(),
        }
    }
}
