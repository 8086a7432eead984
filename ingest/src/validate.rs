//! Sanity rules a report must pass before it may enter a day window.
//!
//! The bounds are deliberately loose: they exist to stop corrupt data (a sensor reporting
//! a million cycles, a clock stuck at 1970) from poisoning a battery's model, not to second-
//! guess unusual but real driving.

use serde::{Deserialize, Serialize};

use crate::record::TelemetryRecord;
use crate::reject::{RejectReason, Rejection};
use crate::time::{EpochMillis, MILLIS_PER_DAY};

/// `[validation]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Messages above this size are refused before parsing.
    pub max_message_bytes: usize,
    /// Longest battery or vehicle id accepted.
    pub max_id_len: usize,
    /// Most cycles one report may claim (a period is at most a day).
    pub max_cycles_per_report: f64,
    /// Most trip minutes one report may claim.
    pub max_minutes_per_report: f64,
    /// Most trips one report may claim.
    pub max_trips_per_report: f64,
    /// Largest rated-cycles figure accepted.
    pub max_rated_cycles: f64,
    /// How far ahead of the wall clock an event time may be.
    pub max_future_hours: i64,
    /// Oldest battery accepted, in days (100 years): a larger age is a corrupt field, and
    /// an absurd one would overflow the gap filling's day arithmetic.
    pub max_age_days: i64,
    /// Most lifetime cycles accepted, as a multiple of the rating: far past it a battery's
    /// alert is long decided, and a glitch of 1e300 would raise a critical alert that the
    /// next honest report then "resolves" as a replacement.
    pub max_lifetime_over_rated: f64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024,
            max_id_len: 64,
            max_cycles_per_report: 50.0,
            max_minutes_per_report: 1440.0,
            max_trips_per_report: 1000.0,
            max_rated_cycles: 100_000.0,
            max_future_hours: 24,
            max_age_days: 36_500,
            max_lifetime_over_rated: 10.0,
        }
    }
}

/// 2000-01-01T00:00:00Z: nothing older is real telemetry.
pub const EARLIEST_EVENT_TIME: EpochMillis = 10_957 * MILLIS_PER_DAY;

impl ValidationConfig {
    /// Checks one decoded record against the rules; `now` is the wall clock in ms.
    pub fn check(&self, r: &TelemetryRecord<'_>, now: EpochMillis) -> Result<(), Rejection> {
        self.check_id("battery_id", &r.battery_id)?;
        if let Some(v) = &r.vehicle_id {
            self.check_id("vehicle_id", v)?;
        }
        if r.event_time < EARLIEST_EVENT_TIME {
            return Err(Rejection::new(
                RejectReason::BadTime,
                "event time is before 2000-01-01",
            ));
        }
        if r.event_time > now + self.max_future_hours * 3_600_000 {
            return Err(Rejection::new(
                RejectReason::BadTime,
                format!(
                    "event time is more than {} h in the future",
                    self.max_future_hours
                ),
            ));
        }
        if r.battery_age_days < 0 {
            return Err(Rejection::new(
                RejectReason::Negative,
                format!("battery_age_days is {}", r.battery_age_days),
            ));
        }
        let floats = [
            (
                "number_of_trips",
                r.number_of_trips,
                self.max_trips_per_report,
            ),
            (
                "daily_trip_duration",
                r.daily_trip_duration,
                self.max_minutes_per_report,
            ),
            (
                "daily_cycles_used",
                r.daily_cycles_used,
                self.max_cycles_per_report,
            ),
            ("lifetime_cycles_used", r.lifetime_cycles_used, f64::MAX),
            (
                "battery_rated_cycles",
                r.battery_rated_cycles,
                self.max_rated_cycles,
            ),
        ];
        for (name, v, max) in floats {
            if !v.is_finite() {
                return Err(Rejection::new(
                    RejectReason::NonFinite,
                    format!("{name} is {v}"),
                ));
            }
            if v < 0.0 {
                return Err(Rejection::new(
                    RejectReason::Negative,
                    format!("{name} is {v}"),
                ));
            }
            if v > max {
                return Err(Rejection::new(
                    RejectReason::OutOfRange,
                    format!("{name} is {v}, above the limit {max}"),
                ));
            }
        }
        if r.battery_rated_cycles == 0.0 {
            return Err(Rejection::new(
                RejectReason::OutOfRange,
                "battery_rated_cycles is 0",
            ));
        }
        if r.battery_age_days > self.max_age_days {
            return Err(Rejection::new(
                RejectReason::OutOfRange,
                format!(
                    "battery_age_days is {}, above the limit {}",
                    r.battery_age_days, self.max_age_days
                ),
            ));
        }
        let most = self.max_lifetime_over_rated * r.battery_rated_cycles;
        if r.lifetime_cycles_used > most {
            return Err(Rejection::new(
                RejectReason::OutOfRange,
                format!(
                    "lifetime_cycles_used is {}, above {} times the rating ({most})",
                    r.lifetime_cycles_used, self.max_lifetime_over_rated
                ),
            ));
        }
        for (name, v) in [
            ("resting_voltage", r.resting_voltage),
            ("state_of_charge", r.state_of_charge),
            ("temperature_c", r.temperature_c),
        ] {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return Err(Rejection::new(
                    RejectReason::NonFinite,
                    format!("{name} is {v}"),
                ));
            }
        }
        Ok(())
    }

    fn check_id(&self, name: &str, id: &str) -> Result<(), Rejection> {
        if id.trim().is_empty() {
            return Err(Rejection::new(
                RejectReason::BadId,
                format!("{name} is empty"),
            ));
        }
        // Ids end up in webhook URLs, file names and log lines: a control character
        // (a newline, an escape) or a dot segment has no business in any of them.
        if id.chars().any(char::is_control) {
            return Err(Rejection::new(
                RejectReason::BadId,
                format!("{name} contains a control character"),
            ));
        }
        if id == "." || id == ".." {
            return Err(Rejection::new(
                RejectReason::BadId,
                format!("{name} is {id:?}, a path segment"),
            ));
        }
        if id.len() > self.max_id_len {
            return Err(Rejection::new(
                RejectReason::BadId,
                format!(
                    "{name} is {} bytes, above the limit {}",
                    id.len(),
                    self.max_id_len
                ),
            ));
        }
        Ok(())
    }
}
