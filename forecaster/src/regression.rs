//! Cycles explained by driving: a linfa least-squares regression of daily cycles on trip
//! minutes and trips, driven by a forecast of the minutes.
//!
//! In the reference data cycles are proportional to minutes driven, with a ratio that
//! drifts upward as the battery ages, so the regression is fitted on recent days only
//! (`RECENT_DAYS`). The minutes themselves are forecast by a weekly seasonal ETS (the
//! reference forecast its exogenous trip duration with a separate univariate model), and
//! trips follow minutes at the recent trips-per-minute rate. The forecast's variance adds
//! the regression residual to the minutes forecast's variance scaled by the slope.

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
    pub minutes: Ets,
}

impl CycleRegression {
    pub fn fit(s: &DailySeries) -> Option<Self> {
        let recent = s.tail(RECENT_DAYS);
        let n = recent.len();
        if n < 14 {
            return None;
        }
        let mut x = Array2::zeros((n, 2));
        for i in 0..n {
            x[[i, 0]] = recent.minutes[i];
            x[[i, 1]] = recent.trips[i];
        }
        let y = Array1::from(recent.cycles.clone());
        let fitted = LinearRegression::new().fit(&Dataset::new(x, y)).ok()?;
        let (intercept, params) = (fitted.intercept(), fitted.params());
        let (per_minute, per_trip) = (params[0], params[1]);
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
        let minutes = Ets::fit(&s.minutes, Trend::None, 7)?;
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
        self.minutes.step(d.minutes);
    }

    pub fn mean_path(&self, h: usize) -> Vec<f64> {
        let g = self.gain();
        self.minutes
            .mean_path(h)
            .into_iter()
            .map(|m| (self.intercept + g * m).max(0.0))
            .collect()
    }

    pub fn predict(&self, h: usize) -> Forecast {
        let g = self.gain();
        let m = self.minutes.predict(h);
        let sd =
            m.sd.iter()
                .map(|s| (self.sigma.powi(2) + (g * s).powi(2)).sqrt())
                .collect();
        let sum_sd = m
            .sum_sd
            .iter()
            .enumerate()
            .map(|(k, s)| ((k + 1) as f64 * self.sigma.powi(2) + (g * s).powi(2)).sqrt())
            .collect();
        Forecast {
            mean: self.mean_path(h),
            sd,
            sum_sd,
        }
    }
}
