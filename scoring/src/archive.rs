//! The archive: raw telemetry and closed days as Parquet, partitioned by date
//! (`raw/date=YYYY-MM-DD/*.parquet`, `daily/date=.../*.parquet`), the layout DataFusion,
//! Spark and DuckDB read as a partitioned table for retraining and batch scoring.
//!
//! Each record is archived once per (topic, partition, offset), across crashes and
//! rebalances, and no reader ever sees a torn or a doubled file. The archive is part of
//! its partition's state, committed with the partition's checkpoint:
//!
//! - a partition's files are named by the offsets they cover:
//!   `{topic}-p{partition}-o{from}-{to}.parquet` (closed days: the offsets of the batch
//!   that closed them);
//! - with checkpoints on, a batch's files are written to the partition's staging folder
//!   (`_staged/{topic}-p{partition}/...`, which no table reader looks into), and the next
//!   checkpoint lists them; once that checkpoint is durable they are renamed into place;
//! - whoever loads the partition next (a restart, a new owner) renames what its
//!   checkpoint lists and is still staged (a crash between the checkpoint and the
//!   renames), and deletes every other staged file: those came after the checkpoint, and
//!   the replay from its offset writes them again;
//! - without checkpoints (a file replay, `checkpoint.enabled = false`) files are written
//!   under a hidden temporary name and renamed into place at once.
//!
//! A rename is atomic, so a file is either absent or whole.

use std::path::{Path, PathBuf};

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Date32Type, TimestampMillisecondType};
use datafusion::parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use voltcast_ingest::time::{MILLIS_PER_DAY, format_day};

use crate::checkpoint::PartitionKey;

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

/// Where staged files wait for their checkpoint, under the root.
const STAGING: &str = "_staged";

/// The archive's root folder.
#[derive(Debug, Clone)]
pub struct ParquetArchive {
    root: PathBuf,
}

impl ParquetArchive {
    pub fn new(config: &ArchiveConfig) -> Option<Self> {
        (!config.path.as_os_str().is_empty()).then(|| Self {
            root: config.path.clone(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// One partition's part of the archive: what it writes, and what waits for its next
/// checkpoint.
#[derive(Debug)]
pub struct PartitionArchive {
    root: PathBuf,
    /// `{topic}-p{partition}`: the start of every file name, and the staging folder.
    prefix: String,
    /// Files wait for a checkpoint (None: written straight into place).
    staged: Option<Vec<String>>,
    /// Days the end of the input has closed so far: it closes them one at a time, and a
    /// day's gap-filled rows may fall on a date an earlier one wrote, so each needs
    /// names of its own.
    closed_at_end: u32,
}

impl PartitionArchive {
    /// `staged`: whether files wait for the partition's checkpoint.
    pub fn new(archive: &ParquetArchive, key: &PartitionKey, staged: bool) -> Self {
        Self {
            root: archive.root.clone(),
            prefix: format!("{}-p{}", file_safe(&key.topic), key.partition),
            staged: staged.then(Vec::new),
            closed_at_end: 0,
        }
    }

    /// Raw telemetry rows of offsets `from..to`, by the UTC date of their event time.
    pub fn raw(&mut self, rows: &RecordBatch, from: i64, to: i64) -> Result<(), ArchiveError> {
        let Some(t) = rows.column_by_name(voltcast_ingest::schema::EVENT_TIME) else {
            return Ok(());
        };
        let days: Vec<i64> = t
            .as_primitive::<TimestampMillisecondType>()
            .values()
            .iter()
            .map(|t| t.div_euclid(MILLIS_PER_DAY))
            .collect();
        let name = format!("{}-o{from}-{to}.parquet", self.prefix);
        self.write("raw", rows, &days, &name)
    }

    /// Closed days that the batch of offsets `from..to` closed (`to` None: the end of a
    /// finite input closed them), by their day.
    pub fn daily(
        &mut self,
        rows: &RecordBatch,
        from: i64,
        to: Option<i64>,
    ) -> Result<(), ArchiveError> {
        let Some(d) = rows.column_by_name(crate::windows::daily::DAY) else {
            return Ok(());
        };
        let days: Vec<i64> = d
            .as_primitive::<Date32Type>()
            .values()
            .iter()
            .map(|d| *d as i64)
            .collect();
        let name = match to {
            Some(to) => format!("{}-o{from}-{to}.parquet", self.prefix),
            None => {
                self.closed_at_end += 1;
                format!("{}-o{from}-end{}.parquet", self.prefix, self.closed_at_end)
            }
        };
        self.write("daily", rows, &days, &name)
    }

    /// The staged files the next checkpoint commits (relative to the root).
    pub fn staged(&self) -> &[String] {
        self.staged.as_deref().unwrap_or_default()
    }

    /// The checkpoint listing [`Self::staged`] is durable: the files go into place.
    pub fn commit(&mut self) -> Result<(), ArchiveError> {
        let staging = self.staging();
        let Some(staged) = self.staged.as_mut() else {
            return Ok(());
        };
        for rel in staged.drain(..) {
            publish(&self.root, &staging.join(&rel), &rel)?;
        }
        Ok(())
    }

    /// The partition left without a checkpoint (lost, or fenced off by a new owner): its
    /// staged files are dropped, and the owner's replay writes them again.
    pub fn discard(&mut self) {
        let staging = self.staging();
        let Some(staged) = self.staged.as_mut() else {
            return;
        };
        for rel in staged.drain(..) {
            let _ = std::fs::remove_file(staging.join(rel));
        }
    }

    /// On loading the partition: puts into place the staged files its checkpoint listed
    /// (`committed`: the checkpoint was written, the renames may not have been), and
    /// deletes every other staged file of the partition (written after the checkpoint:
    /// the replay from its offset writes them again). Returns (committed, deleted).
    pub fn recover(&mut self, committed: &[String]) -> Result<(usize, usize), ArchiveError> {
        let staging = self.staging();
        let (mut put, mut deleted) = (0, 0);
        for rel in files_under(&staging)? {
            let path = staging.join(&rel);
            if committed.contains(&rel) {
                publish(&self.root, &path, &rel)?;
                put += 1;
            } else {
                std::fs::remove_file(&path).map_err(|e| ArchiveError {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                deleted += 1;
            }
        }
        Ok((put, deleted))
    }

    fn staging(&self) -> PathBuf {
        self.root.join(STAGING).join(&self.prefix)
    }

    /// Writes `rows` split by `days` as `{kind}/date=.../{name}`, staged or in place.
    fn write(
        &mut self,
        kind: &str,
        rows: &RecordBatch,
        days: &[i64],
        name: &str,
    ) -> Result<(), ArchiveError> {
        let mut distinct = days.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        for day in distinct {
            let rel = format!("{kind}/date={}/{name}", format_day(day));
            let mask = BooleanArray::from_iter(days.iter().map(|d| Some(*d == day)));
            let slice = filter_record_batch(rows, &mask).map_err(|e| ArchiveError {
                path: rel.clone(),
                message: e.to_string(),
            })?;
            match self.staged.is_some() {
                true => {
                    write_parquet(&self.staging().join(&rel), &slice)?;
                    self.staged.as_mut().expect("staged").push(rel);
                }
                false => {
                    // A hidden name (table readers skip `.` files) until it is whole.
                    let temp = self
                        .root
                        .join(format!("{kind}/date={}/.{name}.tmp", format_day(day)));
                    write_parquet(&temp, &slice)?;
                    publish(&self.root, &temp, &rel)?;
                }
            }
        }
        Ok(())
    }
}

/// Renames `from` to `root/rel`. A file already in place from an earlier rename (the
/// same offsets, so the same rows) is replaced.
fn publish(root: &Path, from: &Path, rel: &str) -> Result<(), ArchiveError> {
    let to = root.join(rel);
    let fail = |e: std::io::Error| ArchiveError {
        path: to.display().to_string(),
        message: e.to_string(),
    };
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    match std::fs::rename(from, &to) {
        Ok(()) => Ok(()),
        // Renamed before a crash, listed again by the checkpoint: already in place.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => Ok(()),
        Err(e) => Err(fail(e)),
    }
}

fn write_parquet(path: &Path, rows: &RecordBatch) -> Result<(), ArchiveError> {
    let fail = |m: String| ArchiveError {
        path: path.display().to_string(),
        message: m,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    let file = std::fs::File::create(path).map_err(|e| fail(e.to_string()))?;
    let mut w = ArrowWriter::try_new(file, rows.schema(), None).map_err(|e| fail(e.to_string()))?;
    w.write(rows).map_err(|e| fail(e.to_string()))?;
    w.close().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Every file under `dir` (none when it does not exist), relative to it with `/`
/// separators.
fn files_under(dir: &Path) -> Result<Vec<String>, ArchiveError> {
    let mut found = Vec::new();
    list_files(dir, dir, &mut found).map_err(|e| ArchiveError {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(found)
}

/// Every file under `dir`, as paths relative to `base` with `/` separators.
fn list_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            list_files(base, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(base) {
            let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
}

/// What an archive table holds, for checking one archive against another: a row count,
/// the distinct keys among them, and a digest of the rows that does not depend on how
/// they are split into files or ordered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TableSummary {
    pub files: usize,
    pub rows: u64,
    /// Distinct (battery, event time) for `raw`, (battery, day) for `daily`.
    pub keys: u64,
    /// Sum of the rows' hashes (wrapping), as hex.
    pub digest: String,
}

/// Both tables of an archive, and what is still staged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArchiveSummary {
    pub raw: TableSummary,
    pub daily: TableSummary,
    pub staged_files: usize,
}

impl ParquetArchive {
    /// Reads every visible file of both tables (`voltcast archive summary`).
    pub fn summary(&self) -> Result<ArchiveSummary, ArchiveError> {
        Ok(ArchiveSummary {
            raw: self.table("raw", voltcast_ingest::schema::EVENT_TIME)?,
            daily: self.table("daily", crate::windows::daily::DAY)?,
            staged_files: files_under(&self.root.join(STAGING))?.len(),
        })
    }

    fn table(&self, kind: &str, key_column: &str) -> Result<TableSummary, ArchiveError> {
        use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
        use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use std::hash::{Hash, Hasher};
        let dir = self.root.join(kind);
        let mut files = files_under(&dir)?;
        // Hidden files are temporaries, as every table reader treats them.
        files.retain(|f| !f.rsplit('/').next().unwrap_or("").starts_with(['.', '_']));
        let mut summary = TableSummary {
            files: files.len(),
            ..Default::default()
        };
        let (mut keys, mut digest) = (std::collections::HashSet::new(), 0u64);
        let options = FormatOptions::default();
        for rel in &files {
            let path = dir.join(rel);
            let fail = |m: String| ArchiveError {
                path: path.display().to_string(),
                message: m,
            };
            let file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.build())
                .map_err(|e| fail(e.to_string()))?;
            for batch in reader {
                let batch = batch.map_err(|e| fail(e.to_string()))?;
                let columns = batch
                    .columns()
                    .iter()
                    .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| fail(e.to_string()))?;
                let names = batch.schema();
                let id = names
                    .index_of("battery_id")
                    .map_err(|e| fail(e.to_string()))?;
                let key = names
                    .index_of(key_column)
                    .map_err(|e| fail(e.to_string()))?;
                for row in 0..batch.num_rows() {
                    let mut h = std::hash::DefaultHasher::new();
                    for c in &columns {
                        c.value(row).to_string().hash(&mut h);
                    }
                    digest = digest.wrapping_add(h.finish());
                    keys.insert((
                        columns[id].value(row).to_string(),
                        columns[key].value(row).to_string(),
                    ));
                }
                summary.rows += batch.num_rows() as u64;
            }
        }
        summary.keys = keys.len() as u64;
        summary.digest = format!("{digest:016x}");
        Ok(summary)
    }
}

/// A topic (or a replayed file's path) as part of a file name: letters, digits, `.`,
/// `_` and `-` kept, anything else `_`.
fn file_safe(topic: &str) -> String {
    topic
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                true => c,
                false => '_',
            },
        )
        .collect::<String>()
        .trim_start_matches(['.', '_'])
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use voltcast_ingest::schema;

    fn rows(times: &[i64]) -> RecordBatch {
        let records: Vec<_> = times
            .iter()
            .map(|t| voltcast_ingest::TelemetryRecord {
                battery_id: "b1".into(),
                vehicle_id: None,
                event_time: *t,
                battery_age_days: 10,
                number_of_trips: 2.0,
                daily_trip_duration: 30.0,
                daily_cycles_used: 1.0,
                lifetime_cycles_used: 10.0,
                battery_rated_cycles: 1000.0,
                resting_voltage: None,
                state_of_charge: None,
                temperature_c: None,
            })
            .collect();
        let mut b = voltcast_ingest::TelemetryBatchBuilder::with_capacity(records.len());
        records.iter().for_each(|r| b.append(r));
        let batch = b.finish();
        assert!(batch.column_by_name(schema::EVENT_TIME).is_some());
        batch
    }

    fn files(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        list_files(root, root, &mut out).unwrap();
        out.sort();
        out
    }

    #[test]
    fn staged_files_appear_with_their_checkpoint_and_the_rest_are_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let archive = ParquetArchive::new(&ArchiveConfig {
            path: dir.path().to_path_buf(),
        })
        .unwrap();
        let key = PartitionKey {
            topic: Arc::from("battery-telemetry"),
            partition: 3,
        };
        let mut a = PartitionArchive::new(&archive, &key, true);
        // Two days in one batch: one file per day.
        a.raw(&rows(&[0, MILLIS_PER_DAY + 5]), 0, 2).unwrap();
        assert_eq!(
            a.staged(),
            [
                "raw/date=1970-01-01/battery-telemetry-p3-o0-2.parquet",
                "raw/date=1970-01-02/battery-telemetry-p3-o0-2.parquet"
            ]
        );
        assert!(!dir.path().join("raw").exists(), "nothing visible yet");
        // The checkpoint lists them; the process dies before the renames.
        let listed = a.staged().to_vec();
        a.raw(&rows(&[10]), 2, 3).unwrap(); // after the checkpoint
        drop(a);

        let mut next_owner = PartitionArchive::new(&archive, &key, true);
        assert_eq!(next_owner.recover(&listed).unwrap(), (2, 1));
        let visible: Vec<_> = files(dir.path())
            .into_iter()
            .filter(|f| !f.starts_with(STAGING))
            .collect();
        assert_eq!(visible, listed);
        assert!(files(&dir.path().join(STAGING)).is_empty());
        // Recovering again (another crash) finds nothing left to do.
        assert_eq!(next_owner.recover(&listed).unwrap(), (0, 0));

        // A fenced owner's files go; a committed owner's appear.
        next_owner.raw(&rows(&[20]), 2, 4).unwrap();
        next_owner.discard();
        next_owner.raw(&rows(&[30]), 2, 5).unwrap();
        next_owner.commit().unwrap();
        let all = files(dir.path());
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all.contains(&"raw/date=1970-01-01/battery-telemetry-p3-o2-5.parquet".into()));
    }

    #[test]
    fn without_checkpoints_files_go_straight_into_place_under_a_safe_name() {
        let dir = tempfile::tempdir().unwrap();
        let archive = ParquetArchive::new(&ArchiveConfig {
            path: dir.path().to_path_buf(),
        })
        .unwrap();
        let key = PartitionKey {
            topic: Arc::from("/data/in/fleet 2024.jsonl"),
            partition: 0,
        };
        let mut a = PartitionArchive::new(&archive, &key, false);
        a.raw(&rows(&[0]), 0, 1).unwrap();
        assert!(a.staged().is_empty());
        assert_eq!(
            files(dir.path()),
            ["raw/date=1970-01-01/data_in_fleet_2024.jsonl-p0-o0-1.parquet"]
        );
    }
}
