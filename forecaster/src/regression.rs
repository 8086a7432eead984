//! Cycles explained by driving: a linfa least-squares regression of daily cycles on trip
//! minutes and trips, driven by a forecast of the minutes.
//!
//! In the reference data cycles are proportional to minutes driven, with a ratio that
//! drifts upward as the battery ages, so the regression is fitted on recent days only
//! (`RECENT_DAYS`). The minutes themselves are forecast by a weekly seasonal ETS (the
//! reference forecast its exogenous trip duration with a separate univariate model), and
//! trips follow minutes at the recent trips-per-minute rate. The forecast's variance adds
//! the regression residual to the minutes forecast's variance scaled by the slope. Minutes
//! are modelled on the log scale, where a weekly pattern that scales with the season's
//! level is additive.

use linfa::Dataset;
use linfa::traits::Fit;
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::ets::{Ets, Trend};
use crate::forecast::Forecast;
use crate::series::{DailySeries, DayObservation};

/// Days the cycles-per-minute relation is fitted on.
pub const RECENT_DAYS: usize = 56;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleRegression {
    pub intercept: f64,
    pub per_minute: f64,
    pub per_trip: f64,
    pub trips_per_minute: f64,
    /// Residual sd of the regression.
    pub sigma: f64,
    /// Log minutes of driving ahead: a weekly seasonal ETS, the level of the last
    /// weeks with the week's profile.
    pub minutes: Ets,
}

impl CycleRegression {
    pub fn fit(s: &DailySeries) -> Option<Self> {
        let recent = s.tail(RECENT_DAYS);
        let n = recent.len();
        if n < 14 {
            return None;
        }
        // Trips that never change carry no information beside the intercept and would make
        // the least-squares problem singular: fit on minutes alone then.
        let mean_trips = recent.trips.iter().sum::<f64>() / n as f64;
        let trips_vary = recent.trips.iter().any(|t| (t - mean_trips).abs() > 1e-9);
        let features = if trips_vary { 2 } else { 1 };
        let mut x = Array2::zeros((n, features));
        for i in 0..n {
            x[[i, 0]] = recent.minutes[i];
            if trips_vary {
                x[[i, 1]] = recent.trips[i];
            }
        }
        let y = Array1::from(recent.cycles.clone());
        let fitted = LinearRegression::new().fit(&Dataset::new(x, y)).ok()?;
        let (intercept, params) = (fitted.intercept(), fitted.params());
        let (per_minute, per_trip) = (params[0], if trips_vary { params[1] } else { 0.0 });
        if !(intercept.is_finite() && per_minute.is_finite() && per_trip.is_finite()) {
            return None;
        }
        let residuals: Vec<f64> = (0..n)
            .map(|i| {
                recent.cycles[i]
                    - (intercept + per_minute * recent.minutes[i] + per_trip * recent.trips[i])
            })
            .collect();
        let k = 3.0;
        let sigma = (residuals.iter().map(|r| r * r).sum::<f64>() / (n as f64 - k)).sqrt();
        let total_minutes: f64 = recent.minutes.iter().sum();
        let trips_per_minute = if total_minutes > 0.0 {
            recent.trips.iter().sum::<f64>() / total_minutes
        } else {
            0.0
        };
        // Driving varies by a factor, not an amount: on the log scale the weekly pattern
        // is additive (whatever the season's level) and the day-to-day noise symmetric.
        let log_minutes: Vec<f64> = s.minutes.iter().map(|m| m.max(0.0).ln_1p()).collect();
        let minutes = Ets::fit(&log_minutes, Trend::None, 7)?;
        Some(Self {
            intercept,
            per_minute,
            per_trip,
            trips_per_minute,
            sigma,
            minutes,
        })
    }

    /// Cycles per minute of forecast driving (trips follow minutes).
    fn gain(&self) -> f64 {
        self.per_minute + self.per_trip * self.trips_per_minute
    }

    pub fn step(&mut self, d: &DayObservation) {
        self.minutes.step(d.minutes.max(0.0).ln_1p());
    }

    pub fn mean_path(&self, h: usize) -> Vec<f64> {
        self.predict(h).mean
    }

    /// Minutes ahead from their log forecast ([`Forecast::from_log1p`]), times cycles per minute,
    /// with the regression's residual variance added.
    pub fn predict(&self, h: usize) -> Forecast {
        let g = self.gain();
        let minutes = Forecast::from_log1p(&self.minutes.predict(h));
        let variance = self.sigma.powi(2);
        let with_residual = |sd: &[f64]| -> Vec<f64> {
            sd.iter()
                .enumerate()
                .map(|(k, s)| ((k + 1) as f64 * variance + (g * s).powi(2)).sqrt())
                .collect()
        };
        Forecast {
            mean: minutes
                .mean
                .iter()
                .map(|m| (self.intercept + g * m).max(0.0))
                .collect(),
            sd: minutes
                .sd
                .iter()
                .map(|s| (variance + (g * s).powi(2)).sqrt())
                .collect(),
            sum_sd: with_residual(&minutes.sum_sd),
        }
    }
}
