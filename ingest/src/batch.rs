//! Accumulates validated records into an Arrow [`RecordBatch`] of the telemetry schema.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Builder, Int32Builder, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::record_batch::RecordBatch;

use crate::record::TelemetryRecord;
use crate::schema::telemetry_schema;

pub struct TelemetryBatchBuilder {
    battery_id: StringBuilder,
    vehicle_id: StringBuilder,
    event_time: TimestampMillisecondBuilder,
    age: Int32Builder,
    trips: Float64Builder,
    minutes: Float64Builder,
    cycles: Float64Builder,
    lifetime: Float64Builder,
    rated: Float64Builder,
    voltage: Float64Builder,
    soc: Float64Builder,
    temperature: Float64Builder,
    len: usize,
}

impl TelemetryBatchBuilder {
    pub fn with_capacity(rows: usize) -> Self {
        let f = || Float64Builder::with_capacity(rows);
        Self {
            battery_id: StringBuilder::with_capacity(rows, rows * 8),
            vehicle_id: StringBuilder::with_capacity(rows, rows * 8),
            event_time: TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"),
            age: Int32Builder::with_capacity(rows),
            trips: Float64Builder::with_capacity(rows),
            minutes: f(),
            cycles: f(),
            lifetime: f(),
            rated: f(),
            voltage: f(),
            soc: f(),
            temperature: f(),
            len: 0,
        }
    }

    /// Appends a record that has passed validation (counts fit in i32 because the
    /// validator bounds them; clamping here only guards against a caller that skipped it).
    pub fn append(&mut self, r: &TelemetryRecord<'_>) {
        self.battery_id.append_value(&r.battery_id);
        self.vehicle_id.append_option(r.vehicle_id.as_deref());
        self.event_time.append_value(r.event_time);
        self.age
            .append_value(r.battery_age_days.clamp(0, i32::MAX as i64) as i32);
        self.trips.append_value(r.number_of_trips);
        self.minutes.append_value(r.daily_trip_duration);
        self.cycles.append_value(r.daily_cycles_used);
        self.lifetime.append_value(r.lifetime_cycles_used);
        self.rated.append_value(r.battery_rated_cycles);
        self.voltage.append_option(r.resting_voltage);
        self.soc.append_option(r.state_of_charge);
        self.temperature.append_option(r.temperature_c);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows the builder holds room for before its columns grow: its memory goes by
    /// this (about 100 bytes a row across the columns), not by the rows appended.
    pub fn reserved_rows(&self) -> usize {
        self.trips.capacity()
    }

    /// The rows appended, as one batch.
    pub fn finish(mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.battery_id.finish()),
            Arc::new(self.vehicle_id.finish()),
            Arc::new(self.event_time.finish()),
            Arc::new(self.age.finish()),
            Arc::new(self.trips.finish()),
            Arc::new(self.minutes.finish()),
            Arc::new(self.cycles.finish()),
            Arc::new(self.lifetime.finish()),
            Arc::new(self.rated.finish()),
            Arc::new(self.voltage.finish()),
            Arc::new(self.soc.finish()),
            Arc::new(self.temperature.finish()),
        ];
        RecordBatch::try_new(telemetry_schema(), columns).expect("builders match the schema")
    }
}
