//! The one Arrow schema every stage agrees on.
//!
//! Column names are the snake_case forms of the reference data set's columns (see
//! `shared/DOMAIN.md`), except the report time, which is `event_time` because it is a
//! UTC timestamp rather than a date. Electrical readings are optional: many cars do not
//! send them, and nothing downstream may depend on them being present.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

pub const BATTERY_ID: &str = "battery_id";
pub const VEHICLE_ID: &str = "vehicle_id";
pub const EVENT_TIME: &str = "event_time";
pub const BATTERY_AGE_DAYS: &str = "battery_age_days";
pub const NUMBER_OF_TRIPS: &str = "number_of_trips";
pub const DAILY_TRIP_DURATION: &str = "daily_trip_duration";
pub const DAILY_CYCLES_USED: &str = "daily_cycles_used";
pub const LIFETIME_CYCLES_USED: &str = "lifetime_cycles_used";
pub const BATTERY_RATED_CYCLES: &str = "battery_rated_cycles";
pub const RESTING_VOLTAGE: &str = "resting_voltage";
pub const STATE_OF_CHARGE: &str = "state_of_charge";
pub const TEMPERATURE_C: &str = "temperature_c";

/// Event time as milliseconds since the epoch, UTC.
pub fn event_time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(BATTERY_ID, DataType::Utf8, false),
        Field::new(VEHICLE_ID, DataType::Utf8, true),
        Field::new(EVENT_TIME, event_time_type(), false),
        Field::new(BATTERY_AGE_DAYS, DataType::Int32, false),
        Field::new(NUMBER_OF_TRIPS, DataType::Float64, false),
        Field::new(DAILY_TRIP_DURATION, DataType::Float64, false),
        Field::new(DAILY_CYCLES_USED, DataType::Float64, false),
        Field::new(LIFETIME_CYCLES_USED, DataType::Float64, false),
        Field::new(BATTERY_RATED_CYCLES, DataType::Float64, false),
        Field::new(RESTING_VOLTAGE, DataType::Float64, true),
        Field::new(STATE_OF_CHARGE, DataType::Float64, true),
        Field::new(TEMPERATURE_C, DataType::Float64, true),
    ]))
});

/// The telemetry schema (shared, cheap to clone).
pub fn telemetry_schema() -> SchemaRef {
    SCHEMA.clone()
}
