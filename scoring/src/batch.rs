//! Batch scoring: files in, a forecast and failure risk for every battery out.
//!
//! The input goes through the same cleansing as the stream (the day windows, closed all
//! at the end), so a battery's batch forecast and its streaming forecast start from the
//! same daily series. CSV (reference header) and JSON lines are decoded by the stream's
//! own decoders, with the same validation and dead letters; Parquet in voltcast's
//! telemetry schema (its raw archive, for instance) is read by DataFusion. Batteries are
//! forecast on every core.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, RecordBatch, StringArray, UInt32Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use voltcast_forecaster::{
    DailySeries, DayObservation, ModelRecord, RiskConfig, SelectionConfig, failure_risk, select,
};
use voltcast_ingest::dead_letter::DeadLetterQueue;
use voltcast_ingest::{
    BatchConfig, FileFormat, FileSource, FileSourceConfig, IngestCounters, MicroBatch,
    SourcePosition, ValidationConfig, schema,
};

use crate::windows::{BatteryView, DailyWindows, WindowConfig, WindowError, WindowState};

#[derive(Debug, Error)]
pub enum BatchError {
    #[error(transparent)]
    Ingest(#[from] voltcast_ingest::IngestError),
    #[error("day windows: {0}")]
    Windows(#[from] WindowError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("closing the day windows: {0}")]
    Finish(String),
}

impl BatchError {
    fn file(path: &Path, e: impl std::fmt::Display) -> Self {
        BatchError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// One battery's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatteryForecast {
    pub battery_id: String,
    pub vehicle_id: Option<String>,
    /// Day number of the first forecast day (the day after the last closed one).
    pub first_day: i32,
    pub record: ModelRecord,
    pub mean: Vec<f64>,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
    /// Standard deviation of the cumulative forecast, day 1..=h.
    pub sum_sd: Vec<f64>,
    pub lifetime: f64,
    pub rated: f64,
    pub risk: voltcast_forecaster::FailureRisk,
    /// The cleansed history the forecast was made from (for plots).
    pub history: DailySeries,
}

/// Reads and cleanses `inputs` into the day windows' final state.
///
/// Files need not be in time order (the reference data is sorted by battery), so no day
/// closes before the end: every window stays open until all input is read. Memory is
/// then about one open window per battery-day of input.
pub async fn cleanse(
    inputs: &[PathBuf],
    windows: WindowConfig,
    batch: BatchConfig,
    rules: ValidationConfig,
) -> Result<WindowState, BatchError> {
    let windows = WindowConfig {
        allowed_lateness_hours: 24 * 365 * 1_000,
        ..windows
    };
    let mut stage = Cleansing {
        windows: DailyWindows::new(windows),
    };
    for input in &expand(inputs)? {
        if input.extension().is_some_and(|e| e == "parquet") {
            read_parquet(input, &mut stage).await?;
            continue;
        }
        let file = FileSourceConfig {
            path: input.clone(),
            format: FileFormat::Auto,
            dead_letter_path: None,
        };
        let dlq = DeadLetterQueue::file(file.default_dead_letters());
        let counters = Arc::new(IngestCounters::default());
        FileSource::new(file, batch.clone(), rules.clone(), counters, dlq)
            .run(&mut stage)
            .await?;
    }
    stage
        .windows
        .close_all_into_histories()
        .map_err(|e| BatchError::Finish(e.to_string()))?;
    Ok(stage.windows.into_state())
}

/// The day windows alone as a sink: a batch cleansing needs no forecasts or alerts,
/// and with its lateness no row is ever late.
struct Cleansing {
    windows: DailyWindows,
}

impl voltcast_ingest::BatchSink for Cleansing {
    async fn accept(
        &mut self,
        batch: MicroBatch,
    ) -> Result<Vec<SourcePosition>, voltcast_ingest::SinkError> {
        self.windows.apply(&batch, voltcast_ingest::now_millis())?;
        Ok(batch.positions)
    }
}

/// Files as given, folders as every telemetry file beneath them (date-partitioned
/// archives nest), in name order.
fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, BatchError> {
    let mut files = Vec::new();
    for input in inputs {
        if !input.is_dir() {
            if !input.exists() {
                return Err(BatchError::file(input, "no such file or folder"));
            }
            files.push(input.clone());
            continue;
        }
        let mut found = Vec::new();
        let mut pending = vec![input.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| BatchError::file(&dir, e))? {
                let path = entry.map_err(|e| BatchError::file(&dir, e))?.path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|e| {
                    ["parquet", "csv", "jsonl", "json"].contains(&e.to_str().unwrap_or(""))
                }) {
                    found.push(path);
                }
            }
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

async fn read_parquet(path: &Path, stage: &mut Cleansing) -> Result<(), BatchError> {
    use voltcast_ingest::BatchSink;
    let ctx = SessionContext::new();
    let names: Vec<String> = schema::telemetry_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let columns: Vec<&str> = names.iter().map(String::as_str).collect();
    let location = path.to_string_lossy();
    let batches = ctx
        .read_parquet(location.as_ref(), ParquetReadOptions::default())
        .await
        .and_then(|df| df.select_columns(&columns))
        .map_err(|e| BatchError::file(path, e))?
        .collect()
        .await
        .map_err(|e| BatchError::file(path, e))?;
    let source: Arc<str> = Arc::from(location.as_ref());
    for rows in batches {
        // DataFusion reads strings as Utf8View; the stages expect the telemetry schema.
        let target = schema::telemetry_schema();
        let columns = rows
            .columns()
            .iter()
            .zip(target.fields())
            .map(|(c, f)| datafusion::arrow::compute::cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|columns| RecordBatch::try_new(target.clone(), columns))
            .map_err(|e| BatchError::file(path, format!("not in the telemetry schema: {e}")))?;
        let rows = columns;
        let batch = MicroBatch {
            parts: vec![voltcast_ingest::PartitionRows {
                partition: (source.clone(), 0),
                start: 0,
                len: rows.num_rows(),
            }],
            rows,
            positions: vec![SourcePosition {
                source: source.clone(),
                partition: 0,
                first_offset: 0,
                next_offset: 0,
                max_event_time: None,
            }],
            dead_letters: 0,
            assigned: Vec::new(),
        };
        stage
            .accept(batch)
            .await
            .map_err(|e| BatchError::file(path, e))?;
    }
    Ok(())
}

/// Forecasts every battery of `state` on `threads` threads, in battery id order;
/// `progress` is called once per battery done.
pub fn forecast_fleet(
    state: &WindowState,
    selection: &SelectionConfig,
    risk: &RiskConfig,
    threads: usize,
    progress: &(dyn Fn() + Sync),
) -> Vec<BatteryForecast> {
    let mut fleet: Vec<BatteryView> = state.batteries().collect();
    fleet.sort_unstable_by(|a, b| a.id.cmp(b.id));
    crate::workers::in_order(fleet, threads, |battery| {
        let forecast = forecast_one(&battery, selection, risk);
        progress();
        forecast
    })
    .into_iter()
    .flatten()
    .collect()
}

fn forecast_one(
    battery: &BatteryView,
    selection: &SelectionConfig,
    risk: &RiskConfig,
) -> Option<BatteryForecast> {
    let history = battery.history;
    let mut series = DailySeries {
        first_day: history.days().next()?.0,
        ..Default::default()
    };
    for (_, cycles, minutes, trips, _) in history.days() {
        series.push(DayObservation {
            cycles: cycles as f64,
            minutes: minutes as f64,
            trips: trips as f64,
        });
    }
    let record = select(&series, selection, None).ok()?;
    let lifetime = history.lifetime()?;
    let rated = battery.rated;
    let f = record.forecast(risk.horizon_days);
    let (lower, upper) = f.intervals(0.9);
    Some(BatteryForecast {
        battery_id: battery.id.to_string(),
        vehicle_id: battery.vehicle.map(|v| v.to_string()),
        first_day: series.end_day(),
        risk: failure_risk(&record, lifetime, rated, risk),
        sum_sd: f.sum_sd,
        mean: f.mean,
        lower,
        upper,
        lifetime,
        rated,
        record,
        history: series,
    })
}

/// One row per battery and forecast day, the battery's risk repeated on each.
pub fn forecast_table(forecasts: &[BatteryForecast]) -> RecordBatch {
    let rows: Vec<(&BatteryForecast, usize)> = forecasts
        .iter()
        .flat_map(|f| (0..f.mean.len()).map(move |k| (f, k)))
        .collect();
    let str_col = |g: &dyn Fn(&BatteryForecast) -> Option<String>| -> ArrayRef {
        Arc::new(rows.iter().map(|(f, _)| g(f)).collect::<StringArray>())
    };
    let f64_col = |g: &dyn Fn(&BatteryForecast, usize) -> Option<f64>| -> ArrayRef {
        Arc::new(rows.iter().map(|(f, k)| g(f, *k)).collect::<Float64Array>())
    };
    let fields = vec![
        Field::new("battery_id", DataType::Utf8, false),
        Field::new("vehicle_id", DataType::Utf8, true),
        Field::new("forecast_date", DataType::Date32, false),
        Field::new("horizon_day", DataType::UInt32, false),
        Field::new("cycles_mean", DataType::Float64, false),
        Field::new("cycles_lower_90", DataType::Float64, false),
        Field::new("cycles_upper_90", DataType::Float64, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("backtest_nrmse", DataType::Float64, true),
        Field::new("lifetime_cycles", DataType::Float64, false),
        Field::new("rated_cycles", DataType::Float64, false),
        Field::new("failure_probability_30d", DataType::Float64, false),
        Field::new("expected_cycles_30d", DataType::Float64, false),
        Field::new("days_to_eol", DataType::Float64, true),
        Field::new("at_risk", DataType::Boolean, false),
        Field::new("low_confidence", DataType::Boolean, false),
    ];
    let columns: Vec<ArrayRef> = vec![
        str_col(&|f| Some(f.battery_id.clone())),
        str_col(&|f| f.vehicle_id.clone()),
        Arc::new(
            rows.iter()
                .map(|(f, k)| Some(f.first_day + *k as i32))
                .collect::<Date32Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|(_, k)| Some(*k as u32 + 1))
                .collect::<UInt32Array>(),
        ),
        f64_col(&|f, k| Some(f.mean[k])),
        f64_col(&|f, k| Some(f.lower[k])),
        f64_col(&|f, k| Some(f.upper[k])),
        str_col(&|f| Some(f.record.kind().name().to_string())),
        f64_col(&|f, _| f.record.backtest_nrmse()),
        f64_col(&|f, _| Some(f.lifetime)),
        f64_col(&|f, _| Some(f.rated)),
        f64_col(&|f, _| Some(f.risk.probability)),
        f64_col(&|f, _| Some(f.risk.expected_cycles)),
        f64_col(&|f, _| f.risk.days_to_eol.map(f64::from)),
        Arc::new(
            rows.iter()
                .map(|(f, _)| Some(f.risk.at_risk))
                .collect::<BooleanArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|(f, _)| Some(f.risk.low_confidence))
                .collect::<BooleanArray>(),
        ),
    ];
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("columns match fields")
}

/// Writes the table as Parquet (`.parquet`) or CSV (anything else).
pub fn write_table(path: &Path, table: &RecordBatch) -> Result<(), BatchError> {
    let file = std::fs::File::create(path).map_err(|e| BatchError::file(path, e))?;
    if path.extension().is_some_and(|e| e == "parquet") {
        let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(file, table.schema(), None)
            .map_err(|e| BatchError::file(path, e))?;
        w.write(table).map_err(|e| BatchError::file(path, e))?;
        w.close().map_err(|e| BatchError::file(path, e))?;
    } else {
        let mut w = datafusion::arrow::csv::Writer::new(file);
        w.write(table).map_err(|e| BatchError::file(path, e))?;
    }
    Ok(())
}
