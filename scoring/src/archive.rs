//! The archive: raw telemetry and closed days as Parquet, partitioned by date
//! (`raw/date=YYYY-MM-DD/part-N.parquet`, `daily/date=.../part-N.parquet`), the layout
//! DataFusion, Spark and DuckDB read as a partitioned table for retraining and batch
//! scoring.

use std::path::PathBuf;

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Date32Type, TimestampMillisecondType};
use datafusion::parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use voltcast_ingest::time::{MILLIS_PER_DAY, format_day};

/// `[archive]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Root folder; empty turns the archive off.
    pub path: PathBuf,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/archive"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("archiving to {path}: {message}")]
pub struct ArchiveError {
    pub path: String,
    pub message: String,
}

pub struct ParquetArchive {
    root: PathBuf,
    next_part: u64,
}

impl ParquetArchive {
    pub fn new(config: &ArchiveConfig) -> Option<Self> {
        (!config.path.as_os_str().is_empty()).then(|| Self {
            root: config.path.clone(),
            next_part: 0,
        })
    }

    /// Raw telemetry rows, by the UTC date of their event time.
    pub fn raw(&mut self, rows: &RecordBatch) -> Result<(), ArchiveError> {
        let Some(t) = rows.column_by_name(voltcast_ingest::schema::EVENT_TIME) else {
            return Ok(());
        };
        let days: Vec<i64> = t
            .as_primitive::<TimestampMillisecondType>()
            .values()
            .iter()
            .map(|t| t.div_euclid(MILLIS_PER_DAY))
            .collect();
        self.write("raw", rows, &days)
    }

    /// Closed days, by their day.
    pub fn daily(&mut self, rows: &RecordBatch) -> Result<(), ArchiveError> {
        let Some(d) = rows.column_by_name(crate::windows::daily::DAY) else {
            return Ok(());
        };
        let days: Vec<i64> = d
            .as_primitive::<Date32Type>()
            .values()
            .iter()
            .map(|d| *d as i64)
            .collect();
        self.write("daily", rows, &days)
    }

    fn write(&mut self, kind: &str, rows: &RecordBatch, days: &[i64]) -> Result<(), ArchiveError> {
        let mut distinct = days.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let part = self.next_part;
        self.next_part += 1;
        for day in distinct {
            let dir = self
                .root
                .join(kind)
                .join(format!("date={}", format_day(day)));
            let path = dir.join(format!("part-{}-{part:08}.parquet", std::process::id()));
            let fail = |m: String| ArchiveError {
                path: path.display().to_string(),
                message: m,
            };
            let mask = BooleanArray::from_iter(days.iter().map(|d| Some(*d == day)));
            let slice = filter_record_batch(rows, &mask).map_err(|e| fail(e.to_string()))?;
            std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
            let file = std::fs::File::create(&path).map_err(|e| fail(e.to_string()))?;
            let mut w =
                ArrowWriter::try_new(file, rows.schema(), None).map_err(|e| fail(e.to_string()))?;
            w.write(&slice).map_err(|e| fail(e.to_string()))?;
            w.close().map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    }
}
