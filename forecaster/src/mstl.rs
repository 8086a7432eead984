//! MSTL with weekly seasonality and an ETS trend.
//!
//! augurs' MSTL (through `stlrs`) splits the fit window into a weekly seasonal component
//! and the rest; a non-seasonal AutoETS models the seasonally adjusted series, and the
//! last week of the seasonal component is carried forward. Unlike a seasonal ETS, STL's
//! loess seasonal is robust to the odd extreme day, and it adapts slowly by design.
//! The daily update subtracts the carried-forward seasonal term and advances the ETS.

use augurs::mstl::stlrs::MstlParams;
use serde::{Deserialize, Serialize};

use crate::ets::Ets;
use crate::forecast::Forecast;

/// Days the decomposition and its trend model are fitted on: the newest of the window
/// the family is given.
///
/// Why not the whole year: the trend model's level follows the newest weeks anyway (its
/// alpha is fitted), and twenty-one weeks give STL's loess as good a weekly profile as
/// fifty-two. Fitted on 150 days instead of 365, accuracy was the same on both bench
/// fleets and the peers' fleet (NRMSE within 0.0001, 30-day sum error within 0.03
/// points), alerts as before on the default fleet and three fewer of 730 true ones on
/// the seasonal fleet (recall 0.962), and the family, a third of a selection, costs
/// about half as much. At 120 days, one alert fewer on the default fleet as well.
pub const WINDOW_DAYS: usize = 150;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MstlEts {
    pub trend: Ets,
    pub period: usize,
    /// The last period of the seasonal component, as a ring from `next`.
    season: Vec<f64>,
    next: usize,
}

impl MstlEts {
    pub fn fit(y: &[f64], period: usize) -> Option<Self> {
        if y.len() < 3 * period {
            return None;
        }
        let y = &y[y.len().saturating_sub(WINDOW_DAYS)..];
        let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
        let fit = MstlParams::new().fit(&y32, &[period]).ok()?;
        let seasonal: Vec<f64> = fit.seasonal().first()?.iter().map(|&v| v as f64).collect();
        let adjusted: Vec<f64> = y.iter().zip(&seasonal).map(|(v, s)| v - s).collect();
        let trend = Ets::auto(&adjusted)?;
        Some(Self {
            trend,
            period,
            season: seasonal[seasonal.len() - period..].to_vec(),
            next: 0,
        })
    }

    pub fn step(&mut self, y: f64) {
        self.trend.step(y - self.season[self.next]);
        self.next = (self.next + 1) % self.period;
    }

    pub fn mean_path(&self, h: usize) -> Vec<f64> {
        let trend = self.trend.mean_path(h);
        trend
            .into_iter()
            .enumerate()
            .map(|(k, t)| t + self.season[(self.next + k) % self.period])
            .collect()
    }

    pub fn predict(&self, h: usize) -> Forecast {
        Forecast::from_impulse(self.mean_path(h), self.trend.sigma, |j| {
            self.trend.impulse(j)
        })
    }
}
