//! Seasonal naive (period 7): next week repeats last week. The floor every other model
//! must beat; also what the reference's "previous week" dashboards implicitly assume.

use serde::{Deserialize, Serialize};

use crate::forecast::Forecast;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeasonalNaive {
    pub period: usize,
    /// The last `period` values as a ring; `next` is the oldest, which has the same
    /// weekday as the next observation.
    last: Vec<f64>,
    next: usize,
    pub sigma: f64,
}

impl SeasonalNaive {
    pub fn fit(y: &[f64], period: usize) -> Option<Self> {
        if y.len() < period + 2 {
            return None;
        }
        let diffs: Vec<f64> = y.windows(period + 1).map(|w| w[period] - w[0]).collect();
        let sigma = (diffs.iter().map(|d| d * d).sum::<f64>() / diffs.len() as f64).sqrt();
        Some(Self {
            period,
            last: y[y.len() - period..].to_vec(),
            next: 0,
            sigma,
        })
    }

    pub fn step(&mut self, y: f64) {
        self.last[self.next] = y;
        self.next = (self.next + 1) % self.period;
    }

    pub fn mean_path(&self, h: usize) -> Vec<f64> {
        (0..h)
            .map(|k| self.last[(self.next + k) % self.period])
            .collect()
    }

    /// Error structure: y(t+h) = y(t+h-m) + e, so c_j = 1 at multiples of the period.
    pub fn predict(&self, h: usize) -> Forecast {
        let m = self.period;
        Forecast::from_impulse(self.mean_path(h), self.sigma, |j| f64::from(j % m == 0))
    }
}
