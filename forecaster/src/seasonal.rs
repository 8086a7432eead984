//! A Prophet-style curve: piecewise-linear trend, weekly and yearly Fourier terms,
//! fitted in closed form by ridge least squares (linfa, on rows augmented with the
//! penalty), with its residuals followed by simple exponential smoothing so that a shift
//! in usage since the fit (a new driver) moves the forecast between refits.
//!
//! Why Prophet's shape: the reference's winning model was Prophet (trend, weekly and
//! yearly seasonality, regressors), and driving has a season: winter days up to a quarter
//! heavier. A level-only model (ETS) forecasts the holdout month at the level of the last
//! weeks and misses the season turning inside it. Why closed form rather than Prophet's
//! MAP fit: a selection must cost milliseconds per battery, and with the changepoint and
//! seasonal priors taken as Gaussian (ridge) the fit is one small least-squares problem.
//! Why smoothed residuals (a regression with ETS errors): Prophet's level comes from the
//! whole window, so a driver change months ago bends the curve and one weeks ago is
//! missed; the smoother's alpha is fitted to the residuals, so it stays near zero where
//! the curve explains the series.
//!
//! Yearly terms only when the window covers a year ([`YEARLY_MIN_DAYS`]): fitted on less,
//! a yearly wave extrapolates whatever trend the months seen had.

use linfa_linalg::cholesky::SolveCInplace;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::ets::{Ets, Trend};
use crate::forecast::Forecast;

/// Weekly harmonics: 3 pairs span every weekly profile (6 free day effects).
const WEEKLY_HARMONICS: usize = 3;
/// Yearly harmonics: a season and its asymmetry; more would fit noise from one or two
/// years.
const YEARLY_HARMONICS: usize = 2;
/// Days of history before yearly terms are fitted.
pub const YEARLY_MIN_DAYS: usize = 365;
/// Trend changepoints, evenly over the first `CHANGEPOINT_RANGE` of the window (Prophet:
/// 25 over 80%; fewer here, a window holds at most two years).
const CHANGEPOINTS: usize = 8;
const CHANGEPOINT_RANGE: f64 = 0.8;
/// Ridge penalties (in units of a column's mean square per day of the window): slope
/// changes are shrunk hard, seasonal terms hardly (Prophet's changepoint prior is tight).
const CHANGEPOINT_PENALTY: f64 = 20.0;
const SEASONAL_PENALTY: f64 = 1.0;
const YEAR: f64 = 365.25;
/// The least impulse weight of the level error. The curve's level comes from one fit,
/// and its error persists over the horizon whatever alpha the residuals chose (often
/// near 0: the curve explains them in sample). With the fitted alpha alone, 17% of
/// held-out 30-day sums fell above the 90% quantile; with this floor (and the backtest's
/// scaling, [`crate::ModelRecord::sd_scale`]), 7% on the default fleet and 10% on the
/// seasonal one (`voltcast bench forecast [--seasons]`).
const LEVEL_ERROR_FLOOR: f64 = 0.1;
/// Columns at most: level, slope, changepoints, weekly and yearly pairs.
const MAX_COLUMNS: usize = 2 + CHANGEPOINTS + 2 * WEEKLY_HARMONICS + 2 * YEARLY_HARMONICS;

/// Per weekday (day number mod 7), the weekly harmonics' sine and cosine pairs.
static WEEKLY_WAVES: std::sync::LazyLock<[[f64; 2 * WEEKLY_HARMONICS]; 7]> =
    std::sync::LazyLock::new(|| {
        std::array::from_fn(|weekday| {
            let mut pairs = [0.0; 2 * WEEKLY_HARMONICS];
            for (k, pair) in pairs.chunks_exact_mut(2).enumerate() {
                let a = std::f64::consts::TAU * (k + 1) as f64 * weekday as f64 / 7.0;
                (pair[0], pair[1]) = a.sin_cos();
            }
            pairs
        })
    });

/// Days in which the yearly wave repeats exactly: four years of 365.25 days.
const YEARLY_CYCLE_DAYS: i32 = 1461;

/// Per day of the four-year cycle, the yearly wave's sine and cosine (the first
/// harmonic; the second follows from it). A sine and cosine per design row were a
/// twentieth of a selection.
static YEARLY_WAVE: std::sync::LazyLock<Vec<(f64, f64)>> = std::sync::LazyLock::new(|| {
    (0..YEARLY_CYCLE_DAYS)
        .map(|d| (std::f64::consts::TAU * f64::from(d) / YEAR).sin_cos())
        .collect()
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeasonalTrend {
    curve: Curve,
    /// Day number of the next day.
    next_day: i32,
    /// The residuals' level: simple exponential smoothing, alpha fitted.
    residual: Ets,
}

/// Trend and seasons: the fitted least-squares part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Curve {
    /// Coefficients in [`Self::row`]'s column order.
    coef: Vec<f64>,
    yearly: bool,
    /// Day number (days since 1970-01-01) of the window's first day.
    first_day: i32,
    /// Days the trend is scaled by (the window's length).
    span: f64,
}

impl SeasonalTrend {
    /// Fits `y`, whose first value is day `first_day`.
    pub fn fit(first_day: i32, y: &[f64]) -> Option<Self> {
        let n = y.len();
        if n < 28 || y.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let curve = Curve::fit(first_day, y)?;
        let residuals: Vec<f64> = y
            .iter()
            .zip(curve.values(first_day, n))
            .map(|(v, c)| v - c)
            .collect();
        Some(Self {
            residual: Ets::fit(&residuals, Trend::None, 0)?,
            next_day: first_day + n as i32,
            curve,
        })
    }

    /// Advances by one observed day: the residuals' level takes it in.
    pub fn step(&mut self, y: f64) {
        let r = y - self.curve.at(self.next_day);
        if r.is_finite() {
            self.residual.step(r);
        }
        self.next_day += 1;
    }

    pub fn mean_path(&self, h: usize) -> Vec<f64> {
        let level = self.residual.mean_path(h);
        let curve = self.curve.values(self.next_day, h);
        curve.zip(level).map(|(c, l)| c + l).collect()
    }

    /// The residual smoother's errors: day noise, and a level error that persists over
    /// the horizon (impulse weight alpha, at least [`LEVEL_ERROR_FLOOR`]).
    pub fn predict(&self, h: usize) -> Forecast {
        let alpha = self.residual.alpha.max(LEVEL_ERROR_FLOOR);
        Forecast::from_impulse(self.mean_path(h), self.residual.sigma, |_| alpha)
    }
}

impl Curve {
    /// Ridge least squares of `y` (day `first_day` onwards) on the design rows, by the
    /// normal equations: the penalties add to the diagonal of X'X, which is accumulated a
    /// row at a time, so the n x columns design is never built. A QR of the design with
    /// the penalties as extra rows (linfa's least squares) gave the same coefficients and
    /// was a quarter of a selection's time; with at most 20 columns of unit scale (a
    /// level, ramps over the window, waves) and the ridge on the diagonal, the system is
    /// well conditioned for Cholesky.
    fn fit(first_day: i32, y: &[f64]) -> Option<Self> {
        let n = y.len();
        let mut curve = Self {
            coef: Vec::new(),
            yearly: n >= YEARLY_MIN_DAYS,
            first_day,
            span: n as f64,
        };
        let cols = curve.columns();
        let mut gram = [[0.0; MAX_COLUMNS]; MAX_COLUMNS];
        let mut xty = [0.0; MAX_COLUMNS];
        let mut row = [0.0; MAX_COLUMNS];
        let changepoints = curve.changepoints();
        for (i, v) in y.iter().enumerate() {
            curve.row(first_day + i as i32, &changepoints, &mut row);
            for a in 0..cols {
                // A changepoint's ramp is zero before it: about a fifth of a row adds
                // nothing.
                if row[a] == 0.0 {
                    continue;
                }
                xty[a] += row[a] * v;
                for b in a..cols {
                    gram[a][b] += row[a] * row[b];
                }
            }
        }
        // The penalty is in units of the column's mean square over the window.
        for (j, lambda) in curve.penalties() {
            let scale = gram[j][j] / n as f64;
            gram[j][j] += lambda * scale.max(1e-9);
        }
        let mut a = Array2::from_shape_fn((cols, cols), |(i, j)| gram[i.min(j)][i.max(j)]);
        let mut b = Array2::from_shape_fn((cols, 1), |(i, _)| xty[i]);
        a.solvec_inplace(&mut b).ok()?;
        curve.coef = b.iter().copied().collect();
        curve.coef.iter().all(|c| c.is_finite()).then_some(curve)
    }

    fn columns(&self) -> usize {
        2 + CHANGEPOINTS + 2 * WEEKLY_HARMONICS + if self.yearly { 2 * YEARLY_HARMONICS } else { 0 }
    }

    /// (column, penalty) for the shrunk columns: changepoints and seasonal terms.
    fn penalties(&self) -> Vec<(usize, f64)> {
        let seasonal_from = 2 + CHANGEPOINTS;
        (2..seasonal_from)
            .map(|j| (j, CHANGEPOINT_PENALTY))
            .chain((seasonal_from..self.columns()).map(|j| (j, SEASONAL_PENALTY)))
            .collect()
    }

    /// The trend's changepoints, evenly over the first `CHANGEPOINT_RANGE` of the window,
    /// in whole days (not stored: a model per battery is checkpointed).
    fn changepoints(&self) -> [f64; CHANGEPOINTS] {
        std::array::from_fn(|k| {
            ((k + 1) as f64 * CHANGEPOINT_RANGE * self.span / (CHANGEPOINTS + 1) as f64).round()
        })
    }

    /// The design row of day number `day` into `row`, given [`Self::changepoints`].
    fn row(&self, day: i32, changepoints: &[f64; CHANGEPOINTS], row: &mut [f64; MAX_COLUMNS]) {
        // Past the window the trend stays where it ended: extrapolated 30 days and more, a
        // slope fitted to a shift in usage became a drift (on the seasonal fleet the
        // 30-day sum error of the family went from 6.7% to 6.4%); the residuals' level
        // follows shifts instead.
        let t = f64::from(day - self.first_day).min(self.span - 1.0);
        row[0] = 1.0;
        row[1] = t / self.span;
        let mut j = 2;
        for c in changepoints {
            row[j] = (t - c).max(0.0) / self.span;
            j += 1;
        }
        // Seasonal phases from the day number itself: every battery's Monday and
        // January are alike. The week's and the year's from tables (by weekday, by day
        // of the four-year cycle), the year's second harmonic from its first: sines and
        // cosines were a tenth of a selection.
        let week = &WEEKLY_WAVES[day.rem_euclid(7) as usize];
        row[j..j + 2 * WEEKLY_HARMONICS].copy_from_slice(week);
        j += 2 * WEEKLY_HARMONICS;
        if self.yearly {
            let (s, c) = YEARLY_WAVE[day.rem_euclid(YEARLY_CYCLE_DAYS) as usize];
            let (mut sk, mut ck) = (s, c);
            for _ in 1..=YEARLY_HARMONICS {
                (row[j], row[j + 1]) = (sk, ck);
                (sk, ck) = (sk * c + ck * s, ck * c - sk * s);
                j += 2;
            }
        }
    }

    /// The curve's value on day number `day`.
    fn at(&self, day: i32) -> f64 {
        self.values(day, 1).next().unwrap_or(0.0)
    }

    /// The curve's values on `n` days from day number `from`.
    fn values(&self, from: i32, n: usize) -> impl Iterator<Item = f64> + '_ {
        let changepoints = self.changepoints();
        let mut row = [0.0; MAX_COLUMNS];
        (0..n as i32).map(move |i| {
            self.row(from + i, &changepoints, &mut row);
            row.iter().zip(&self.coef).map(|(r, c)| r * c).sum()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known curve: level 4, slope 0.2 over the window, weekly and yearly waves.
    fn truth(day: i32) -> f64 {
        let d = f64::from(day);
        4.0 + 0.2 * f64::from(day - 19_000) / 730.0
            + 0.3 * (std::f64::consts::TAU * d / 7.0).sin()
            + 0.15 * (std::f64::consts::TAU * d / YEAR + 1.0).sin()
    }

    #[test]
    fn recovers_a_trend_with_weekly_and_yearly_waves() {
        let y: Vec<f64> = (0..730).map(|i| truth(19_000 + i)).collect();
        let m = SeasonalTrend::fit(19_000, &y).unwrap();
        assert!(m.curve.yearly);
        let path = m.mean_path(60);
        for (k, p) in path.iter().enumerate() {
            let want = truth(19_730 + k as i32);
            assert!((p - want).abs() < 0.02, "day {k}: {p} vs {want}");
        }
    }

    #[test]
    fn no_yearly_terms_on_less_than_a_year() {
        let y: Vec<f64> = (0..200).map(|i| truth(19_000 + i)).collect();
        let m = SeasonalTrend::fit(19_000, &y).unwrap();
        assert!(!m.curve.yearly);
        assert_eq!(m.curve.coef.len(), 2 + CHANGEPOINTS + 2 * WEEKLY_HARMONICS);
    }

    #[test]
    fn the_level_follows_a_shift_after_the_fit() {
        let y: Vec<f64> = (0..400).map(|i| truth(19_000 + i)).collect();
        let mut m = SeasonalTrend::fit(19_000, &y).unwrap();
        for i in 400..520 {
            m.step(truth(19_000 + i) + 0.5); // a new driver, half again more on the log scale
        }
        let ahead = m.mean_path(1)[0] - truth(19_520);
        assert!((ahead - 0.5).abs() < 0.05, "level followed to {ahead}");
    }
}
