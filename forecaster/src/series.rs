//! A battery's clean daily series: what every model is fitted on.

use serde::{Deserialize, Serialize};

/// One closed day, as the window stage produces it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DayObservation {
    pub cycles: f64,
    pub minutes: f64,
    pub trips: f64,
}

/// Consecutive days (gaps already interpolated), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DailySeries {
    /// Day number (days since 1970-01-01) of the first value.
    pub first_day: i32,
    pub cycles: Vec<f64>,
    /// Exogenous drivers, same length as `cycles`.
    pub minutes: Vec<f64>,
    pub trips: Vec<f64>,
}

impl DailySeries {
    pub fn len(&self) -> usize {
        self.cycles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cycles.is_empty()
    }

    /// Day number just after the last value.
    pub fn end_day(&self) -> i32 {
        self.first_day + self.len() as i32
    }

    pub fn push(&mut self, d: DayObservation) {
        self.cycles.push(d.cycles);
        self.minutes.push(d.minutes);
        self.trips.push(d.trips);
    }

    /// Days `[from, to)` by index.
    pub fn slice(&self, from: usize, to: usize) -> DailySeries {
        DailySeries {
            first_day: self.first_day + from as i32,
            cycles: self.cycles[from..to].to_vec(),
            minutes: self.minutes[from..to].to_vec(),
            trips: self.trips[from..to].to_vec(),
        }
    }

    /// The most recent `days` (all when shorter).
    pub fn tail(&self, days: usize) -> DailySeries {
        self.slice(self.len().saturating_sub(days), self.len())
    }
}
