//! Closed days as Arrow: the stream's output to the forecaster and the archive.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, UInt32Array,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Int32Type, Int64Type, Schema, SchemaRef,
};
use datafusion::error::Result;

use datafusion::prelude::SessionContext;

use super::history::{BatteryHistory, ClosedValues};
use super::{DayPartial, Fleet, ReadingStats};

pub const BATTERY_ID: &str = "battery_id";
pub const VEHICLE_ID: &str = "vehicle_id";
pub const DAY: &str = "day";
pub const AGE: &str = "battery_age_days";
pub const TRIPS: &str = "number_of_trips";
pub const MINUTES: &str = "daily_trip_duration";
pub const CYCLES: &str = "daily_cycles_used";
pub const LIFETIME: &str = "lifetime_cycles_used";
pub const REPORTED_LIFETIME: &str = "reported_lifetime_cycles";
pub const RATED: &str = "battery_rated_cycles";
pub const REPORTS: &str = "report_count";
pub const IMPUTED: &str = "imputed";
pub const MEAN_7D: &str = "cycles_mean_7d";
pub const MEAN_30D: &str = "cycles_mean_30d";

const READING_NAMES: [&str; 3] = ["resting_voltage", "state_of_charge", "temperature_c"];

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new(BATTERY_ID, DataType::Utf8, false),
        Field::new(VEHICLE_ID, DataType::Utf8, true),
        Field::new(DAY, DataType::Date32, false),
        Field::new(AGE, DataType::Int32, false),
        Field::new(TRIPS, DataType::Float64, false),
        Field::new(MINUTES, DataType::Float64, false),
        Field::new(CYCLES, DataType::Float64, false),
        Field::new(LIFETIME, DataType::Float64, false),
        Field::new(REPORTED_LIFETIME, DataType::Float64, true),
        Field::new(RATED, DataType::Float64, false),
        Field::new(REPORTS, DataType::UInt32, false),
        Field::new(IMPUTED, DataType::Boolean, false),
    ];
    for r in READING_NAMES {
        for stat in ["min", "mean", "max"] {
            fields.push(Field::new(format!("{r}_{stat}"), DataType::Float64, true));
        }
    }
    fields.push(Field::new(MEAN_7D, DataType::Float64, false));
    fields.push(Field::new(MEAN_30D, DataType::Float64, false));
    Arc::new(Schema::new(fields))
});

/// Schema of the closed-day batches.
pub fn daily_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// The 7- and 30-day trailing means of daily cycles as DataFusion window functions over
/// the tails of the histories.
///
/// The stream does not use this: there every battery closes about one day per day, and a
/// window function re-evaluates its whole frame per output row (~60 frame rows per closed
/// day, ~400 ns each), which alone capped the stage near 35k rows/s. The window stage
/// reads the same means off the end of each history as it closes days; this is the
/// definition that computation is tested against, and serves batch scoring over whole
/// series. It reads the histories' cycles, kept as half floats, so it agrees with the
/// stream's means (from the newest days' `f32` copy) to about 1 part in 2,000.
pub async fn rolling_means_sql<'a>(
    ctx: &SessionContext,
    history_of: &dyn Fn(&str) -> Option<&'a BatteryHistory>,
    closed: &RecordBatch,
) -> Result<Vec<(f64, f64)>> {
    let ids = closed
        .column_by_name(BATTERY_ID)
        .map(|c| c.as_string::<i32>());
    let Some(ids) = ids else {
        return Ok(Vec::new());
    };
    // Rows of one battery are the newest entries of its history, in day order.
    let mut new_per_battery: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        if let Some(id) = id {
            new_per_battery.entry(id).or_default().push(i);
        }
    }
    let (mut battery, mut day, mut cycles, mut row) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (b, (id, idx)) in new_per_battery.iter().enumerate() {
        let Some(history) = history_of(id) else {
            continue;
        };
        let take = (idx.len() + 29).min(history.len());
        let first_new = history.len() - idx.len().min(history.len());
        for (k, (d, c)) in history.cycles().enumerate().skip(history.len() - take) {
            battery.push(b as u32);
            day.push(d);
            cycles.push(c as f64);
            row.push((k >= first_new).then(|| idx[k - first_new] as i64));
        }
    }
    let tail = RecordBatch::try_from_iter(vec![
        ("battery", Arc::new(UInt32Array::from(battery)) as ArrayRef),
        ("day", Arc::new(Int32Array::from(day)) as ArrayRef),
        ("cycles", Arc::new(Float64Array::from(cycles)) as ArrayRef),
        ("new_row", Arc::new(Int64Array::from(row)) as ArrayRef),
    ])?;
    ctx.register_batch("closing_tail", tail)?;
    let result = ctx
        .sql(
            "SELECT new_row, \
               AVG(cycles) OVER (PARTITION BY battery ORDER BY day ROWS BETWEEN 6 PRECEDING AND CURRENT ROW) AS m7, \
               AVG(cycles) OVER (PARTITION BY battery ORDER BY day ROWS BETWEEN 29 PRECEDING AND CURRENT ROW) AS m30 \
             FROM closing_tail",
        )
        .await;
    let batches = match result {
        Ok(df) => df.collect().await,
        Err(e) => Err(e),
    };
    ctx.deregister_table("closing_tail")?;
    let mut means = vec![(f64::NAN, f64::NAN); closed.num_rows()];
    for b in batches? {
        let (r, m7, m30) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_primitive::<Float64Type>(),
            b.column(2).as_primitive::<Float64Type>(),
        );
        for i in 0..b.num_rows() {
            if r.is_valid(i) {
                means[r.value(i) as usize] = (m7.value(i), m30.value(i));
            }
        }
    }
    Ok(means)
}

/// Closed days as the window stage produces them, column by column.
pub(super) struct ClosedColumns {
    battery: Vec<u32>,
    day: Vec<i32>,
    age: Vec<i32>,
    trips: Vec<f64>,
    minutes: Vec<f64>,
    cycles: Vec<f64>,
    lifetime: Vec<f64>,
    reported_lifetime: Vec<f64>,
    reported: Vec<bool>,
    rated: Vec<f64>,
    reports: Vec<u32>,
    imputed: Vec<bool>,
    readings: [ReadingColumns; 3],
    mean_7d: Vec<f64>,
    mean_30d: Vec<f64>,
}

impl ClosedColumns {
    /// Room for `n` days: growing twenty columns by doubling copied each of them
    /// several times per close.
    pub fn with_capacity(n: usize) -> Self {
        let reading = || ReadingColumns {
            min: Vec::with_capacity(n),
            mean: Vec::with_capacity(n),
            max: Vec::with_capacity(n),
            valid: Vec::with_capacity(n),
        };
        Self {
            battery: Vec::with_capacity(n),
            day: Vec::with_capacity(n),
            age: Vec::with_capacity(n),
            trips: Vec::with_capacity(n),
            minutes: Vec::with_capacity(n),
            cycles: Vec::with_capacity(n),
            lifetime: Vec::with_capacity(n),
            reported_lifetime: Vec::with_capacity(n),
            reported: Vec::with_capacity(n),
            rated: Vec::with_capacity(n),
            reports: Vec::with_capacity(n),
            imputed: Vec::with_capacity(n),
            readings: [reading(), reading(), reading()],
            mean_7d: Vec::with_capacity(n),
            mean_30d: Vec::with_capacity(n),
        }
    }

    /// One closed day: observed (with the window it closed) or imputed.
    pub fn push(
        &mut self,
        battery: u32,
        v: &ClosedValues,
        rated: f64,
        observed: Option<&DayPartial>,
    ) {
        self.battery.push(battery);
        self.day.push(v.day);
        self.age.push(v.age);
        self.trips.push(v.trips);
        self.minutes.push(v.minutes);
        self.cycles.push(v.cycles);
        self.lifetime.push(v.lifetime);
        self.reported_lifetime
            .push(observed.map_or(0.0, |w| w.lifetime_max));
        self.reported.push(observed.is_some());
        self.rated.push(rated);
        self.reports.push(observed.map_or(0, |w| w.reports));
        self.imputed.push(v.imputed);
        for (k, columns) in self.readings.iter_mut().enumerate() {
            let stats = observed.map_or(ReadingStats::default(), |w| w.readings[k]);
            columns.push(&stats);
        }
        self.mean_7d.push(v.mean_7d);
        self.mean_30d.push(v.mean_30d);
    }

    /// The batch in [`daily_schema`]; None when nothing closed.
    pub fn finish(self, fleet: &Fleet) -> Option<RecordBatch> {
        if self.battery.is_empty() {
            return None;
        }
        let ids = StringArray::from_iter_values(self.battery.iter().map(|b| fleet.id_of(*b)));
        let vehicles = StringArray::from_iter(self.battery.iter().map(|b| fleet.vehicle_of(*b)));
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(ids),
            Arc::new(vehicles),
            Arc::new(Date32Array::from(self.day)),
            Arc::new(Int32Array::from(self.age)),
            Arc::new(Float64Array::from(self.trips)),
            Arc::new(Float64Array::from(self.minutes)),
            Arc::new(Float64Array::from(self.cycles)),
            Arc::new(Float64Array::from(self.lifetime)),
            Arc::new(Float64Array::new(
                self.reported_lifetime.into(),
                Some(NullBuffer::from(self.reported)),
            )),
            Arc::new(Float64Array::from(self.rated)),
            Arc::new(UInt32Array::from(self.reports)),
            Arc::new(BooleanArray::from(self.imputed)),
        ];
        for r in self.readings {
            columns.extend(r.finish());
        }
        columns.push(Arc::new(Float64Array::from(self.mean_7d)));
        columns.push(Arc::new(Float64Array::from(self.mean_30d)));
        Some(RecordBatch::try_new(daily_schema(), columns).expect("columns match the daily schema"))
    }
}

/// One reading's min, mean and max columns. Every statistic is null on days without
/// that reading, so the three share one validity mask.
struct ReadingColumns {
    min: Vec<f64>,
    mean: Vec<f64>,
    max: Vec<f64>,
    valid: Vec<bool>,
}

impl ReadingColumns {
    fn push(&mut self, s: &ReadingStats) {
        let mean = s.mean();
        self.min.push(s.min);
        self.mean.push(mean.unwrap_or_default());
        self.max.push(s.max);
        self.valid.push(mean.is_some());
    }

    fn finish(self) -> [ArrayRef; 3] {
        let nulls = NullBuffer::from(self.valid);
        [self.min, self.mean, self.max]
            .map(|v| Arc::new(Float64Array::new(v.into(), Some(nulls.clone()))) as ArrayRef)
    }
}

/// One closed day as the forecast stages read it.
#[derive(Debug, Clone, Copy)]
pub struct ClosedRow<'a> {
    pub battery_id: &'a str,
    pub vehicle_id: Option<&'a str>,
    pub day: i32,
    pub age: i32,
    pub observation: voltcast_forecaster::DayObservation,
    pub lifetime: f64,
    pub rated: f64,
}

/// The rows of a closed-day batch; None when the batch is not in [`daily_schema`].
pub fn closed_rows(batch: &datafusion::arrow::array::RecordBatch) -> Option<Vec<ClosedRow<'_>>> {
    use datafusion::arrow::datatypes::Date32Type;
    let col = |n: &str| batch.column_by_name(n);
    let ids = col(BATTERY_ID)?.as_string_opt::<i32>()?;
    let vehicles = col(VEHICLE_ID)?.as_string_opt::<i32>()?;
    let ages = col(AGE)?.as_primitive_opt::<Int32Type>()?;
    let days = col(DAY)?.as_primitive_opt::<Date32Type>()?;
    let cycles = col(CYCLES)?.as_primitive_opt::<Float64Type>()?;
    let minutes = col(MINUTES)?.as_primitive_opt::<Float64Type>()?;
    // Whole trips (Int64) in archives written before fractional trips were kept.
    let trips = datafusion::arrow::compute::cast(col(TRIPS)?, &DataType::Float64).ok()?;
    let trips = trips.as_primitive_opt::<Float64Type>()?;
    let lifetime = col(LIFETIME)?.as_primitive_opt::<Float64Type>()?;
    let rated = col(RATED)?.as_primitive_opt::<Float64Type>()?;
    Some(
        (0..batch.num_rows())
            .map(|i| ClosedRow {
                battery_id: ids.value(i),
                vehicle_id: vehicles.is_valid(i).then(|| vehicles.value(i)),
                day: days.value(i),
                age: ages.value(i),
                observation: voltcast_forecaster::DayObservation {
                    cycles: cycles.value(i),
                    minutes: minutes.value(i),
                    trips: trips.value(i),
                },
                lifetime: lifetime.value(i),
                rated: rated.value(i),
            })
            .collect(),
    )
}
