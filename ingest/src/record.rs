//! One telemetry report, borrowed from its message where possible.

use std::borrow::Cow;

use crate::time::EpochMillis;

/// A decoded (not yet validated) telemetry report.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRecord<'a> {
    pub battery_id: Cow<'a, str>,
    pub vehicle_id: Option<Cow<'a, str>>,
    pub event_time: EpochMillis,
    pub battery_age_days: i64,
    /// Trips in the period: usually whole, but a resampled file splits them (a 12-hourly
    /// half of 3 trips is 1.5), and the day's sum is what counts.
    pub number_of_trips: f64,
    pub daily_trip_duration: f64,
    pub daily_cycles_used: f64,
    pub lifetime_cycles_used: f64,
    pub battery_rated_cycles: f64,
    pub resting_voltage: Option<f64>,
    pub state_of_charge: Option<f64>,
    pub temperature_c: Option<f64>,
}

impl TelemetryRecord<'_> {
    /// The record as one JSON object with snake_case keys: the wire format voltcast's
    /// simulator produces and documents.
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(256);
        self.write_json(&mut s);
        s
    }

    pub fn write_json(&self, s: &mut String) {
        use std::fmt::Write;
        s.push_str("{\"date\":\"");
        s.push_str(&crate::time::format_timestamp(self.event_time));
        s.push_str("\",\"battery_id\":");
        push_json_str(s, &self.battery_id);
        if let Some(v) = &self.vehicle_id {
            s.push_str(",\"vehicle_id\":");
            push_json_str(s, v);
        }
        let _ = write!(
            s,
            ",\"battery_age_days\":{},\"number_of_trips\":{},\"daily_trip_duration\":{},\"daily_cycles_used\":{},\"lifetime_cycles_used\":{},\"battery_rated_cycles\":{}",
            self.battery_age_days,
            self.number_of_trips,
            self.daily_trip_duration,
            self.daily_cycles_used,
            self.lifetime_cycles_used,
            self.battery_rated_cycles
        );
        for (key, v) in [
            ("resting_voltage", self.resting_voltage),
            ("state_of_charge", self.state_of_charge),
            ("temperature_c", self.temperature_c),
        ] {
            if let Some(v) = v {
                let _ = write!(s, ",\"{key}\":{v}");
            }
        }
        s.push('}');
    }
}

fn push_json_str(s: &mut String, v: &str) {
    s.push_str(&serde_json::to_string(v).expect("strings always serialize"));
}
