//! Closed days as Arrow: the stream's output to the forecaster and the archive.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, UInt32Array,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Int32Type, Int64Type, Schema, SchemaRef,
};
use datafusion::error::Result;

use super::aggregate::DailyAggregator;
use super::{Fleet, ReadingStats};

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

/// One closed battery-day.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedDay {
    pub battery: u32,
    pub day: i32,
    pub age: i32,
    pub trips: i64,
    pub minutes: f64,
    pub cycles: f64,
    pub lifetime: f64,
    pub reported_lifetime: Option<f64>,
    pub rated: f64,
    pub reports: u32,
    pub imputed: bool,
    pub readings: [ReadingStats; 3],
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new(BATTERY_ID, DataType::Utf8, false),
        Field::new(VEHICLE_ID, DataType::Utf8, true),
        Field::new(DAY, DataType::Date32, false),
        Field::new(AGE, DataType::Int32, false),
        Field::new(TRIPS, DataType::Int64, false),
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
/// series.
pub async fn rolling_means_sql(
    agg: &DailyAggregator,
    fleet: &Fleet,
    rows: &[ClosedDay],
) -> Result<Vec<(f64, f64)>> {
    // Rows of one battery are the newest entries of its history, in day order.
    let mut new_per_battery: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        new_per_battery.entry(r.battery).or_default().push(i);
    }
    let (mut battery, mut day, mut cycles, mut row) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (b, idx) in &new_per_battery {
        let history = &fleet.histories[*b as usize];
        let take = (idx.len() + 29).min(history.len());
        let first_new = history.len() - idx.len().min(history.len());
        for (k, (d, c)) in history.cycles().enumerate().skip(history.len() - take) {
            battery.push(*b);
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
    let ctx = agg.context();
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
    let mut means = vec![(f64::NAN, f64::NAN); rows.len()];
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

pub(super) fn to_batch(fleet: &Fleet, rows: &[ClosedDay], means: &[(f64, f64)]) -> RecordBatch {
    let col_f64 = |f: &dyn Fn(&ClosedDay) -> f64| {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(f))) as ArrayRef
    };
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| &*fleet.ids[r.battery as usize]),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter()
                .map(|r| fleet.vehicles[r.battery as usize].as_deref()),
        )),
        Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| r.day))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.age))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.trips))),
        col_f64(&|r| r.minutes),
        col_f64(&|r| r.cycles),
        col_f64(&|r| r.lifetime),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.reported_lifetime),
        )),
        col_f64(&|r| r.rated),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.reports),
        )),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.imputed)),
        )),
    ];
    for k in 0..3 {
        // Every statistic is null on days without that reading; mean() says which.
        let stat = |f: &dyn Fn(&ReadingStats) -> f64| {
            Arc::new(Float64Array::from_iter(
                rows.iter()
                    .map(|r| r.readings[k].mean().map(|_| f(&r.readings[k]))),
            )) as ArrayRef
        };
        columns.push(stat(&|s| s.min));
        columns.push(Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.readings[k].mean()),
        )));
        columns.push(stat(&|s| s.max));
    }
    columns.push(Arc::new(Float64Array::from_iter_values(
        means.iter().map(|m| m.0),
    )));
    columns.push(Arc::new(Float64Array::from_iter_values(
        means.iter().map(|m| m.1),
    )));
    RecordBatch::try_new(daily_schema(), columns).expect("columns match the daily schema")
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
    let trips = col(TRIPS)?.as_primitive_opt::<Int64Type>()?;
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
                    trips: trips.value(i) as f64,
                },
                lifetime: lifetime.value(i),
                rated: rated.value(i),
            })
            .collect(),
    )
}
