//! Replays JSONL or CSV files through the same decoders and micro-batches as Kafka: for
//! backfilling history and for benchmarks that compare like with like.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::batcher::{BatchConfig, BatchSink, MicroBatcher, hand_on};
use crate::counters::IngestCounters;
use crate::dead_letter::{DeadLetterQueue, Origin};
use crate::decode::CsvLayout;
use crate::error::IngestError;
use crate::reject::{RejectReason, Rejection};
use crate::validate::ValidationConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// By extension: `.csv` is CSV, anything else JSON lines.
    #[default]
    Auto,
    Json,
    Csv,
}

/// `[file]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FileSourceConfig {
    /// A file, or a folder whose files are read in name order.
    pub path: PathBuf,
    pub format: FileFormat,
    /// Where refused lines go (JSON lines). Default: `<path>.dlq.jsonl` beside the input.
    pub dead_letter_path: Option<PathBuf>,
}

impl FileSourceConfig {
    pub fn files(&self) -> Result<Vec<PathBuf>, IngestError> {
        let io = |e| IngestError::Io {
            path: self.path.display().to_string(),
            source: e,
        };
        if self.path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && !p.to_string_lossy().ends_with(".dlq.jsonl"))
                .collect();
            files.sort();
            Ok(files)
        } else {
            std::fs::metadata(&self.path).map_err(io)?;
            Ok(vec![self.path.clone()])
        }
    }

    pub fn default_dead_letters(&self) -> PathBuf {
        self.dead_letter_path.clone().unwrap_or_else(|| {
            let mut p = self.path.clone().into_os_string();
            p.push(".dlq.jsonl");
            p.into()
        })
    }

    fn format_of(&self, path: &Path) -> FileFormat {
        match self.format {
            FileFormat::Auto
                if path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("csv")) =>
            {
                FileFormat::Csv
            }
            FileFormat::Auto => FileFormat::Json,
            f => f,
        }
    }
}

pub struct FileSource {
    config: FileSourceConfig,
    batcher: MicroBatcher,
    dlq: DeadLetterQueue,
}

impl FileSource {
    pub fn new(
        config: FileSourceConfig,
        batch: BatchConfig,
        rules: ValidationConfig,
        counters: Arc<IngestCounters>,
        dlq: DeadLetterQueue,
    ) -> Self {
        Self {
            config,
            batcher: MicroBatcher::new(batch, rules, counters),
            dlq,
        }
    }

    /// Reads every file to the end. Positions are (file, 0, line number).
    pub async fn run<S: BatchSink>(mut self, sink: &mut S) -> Result<(), IngestError> {
        for path in self.config.files()? {
            let source: Arc<str> = Arc::from(path.display().to_string());
            let file = std::fs::File::open(&path).map_err(|e| IngestError::Io {
                path: source.to_string(),
                source: e,
            })?;
            let reader = BufReader::with_capacity(1 << 20, file);
            match self.config.format_of(&path) {
                FileFormat::Csv => self.read_csv(reader, &source, sink).await?,
                _ => self.read_jsonl(reader, &source, sink).await?,
            }
        }
        self.flush(sink).await
    }

    async fn read_jsonl<S: BatchSink>(
        &mut self,
        mut reader: impl BufRead,
        source: &Arc<str>,
        sink: &mut S,
    ) -> Result<(), IngestError> {
        let mut line = Vec::with_capacity(512);
        let mut origin = Origin {
            source: source.clone(),
            partition: 0,
            offset: 0,
        };
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| IngestError::Io {
                    path: source.to_string(),
                    source: e,
                })?;
            if n == 0 {
                return Ok(());
            }
            origin.offset += 1;
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            self.batcher
                .push_json(trimmed, &origin, crate::now_millis(), &mut self.dlq)?;
            if self.batcher.is_full() {
                self.flush(sink).await?;
            }
        }
    }

    async fn read_csv<S: BatchSink>(
        &mut self,
        reader: impl BufRead,
        source: &Arc<str>,
        sink: &mut S,
    ) -> Result<(), IngestError> {
        let mut csv = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
        let header = csv.headers().map_err(|e| IngestError::Io {
            path: source.to_string(),
            source: e.into(),
        })?;
        let layout = CsvLayout::from_header(header.iter()).map_err(|e| IngestError::CsvHeader {
            path: source.to_string(),
            source: e,
        })?;
        let mut record = csv::ByteRecord::new();
        loop {
            let origin = Origin {
                source: source.clone(),
                partition: 0,
                offset: csv.position().line() as i64,
            };
            let more = csv
                .read_byte_record(&mut record)
                .map_err(|e| IngestError::Io {
                    path: source.to_string(),
                    source: e.into(),
                })?;
            if !more {
                return Ok(());
            }
            match csv::StringRecord::from_byte_record(std::mem::take(&mut record)) {
                Ok(row) => {
                    self.batcher.push_csv(
                        &layout,
                        &row,
                        &origin,
                        crate::now_millis(),
                        &mut self.dlq,
                    )?;
                    record = row.into_byte_record();
                }
                Err(e) => {
                    record = e.into_byte_record();
                    let payload = record.iter().collect::<Vec<_>>().join(&b","[..]);
                    let rejection =
                        Rejection::new(RejectReason::Malformed, "row is not valid UTF-8");
                    self.batcher
                        .push_unreadable(payload, rejection, &origin, &mut self.dlq)?;
                }
            }
            if self.batcher.is_full() {
                self.flush(sink).await?;
            }
        }
    }

    async fn flush<S: BatchSink>(&mut self, sink: &mut S) -> Result<(), IngestError> {
        match self.batcher.take() {
            // A file has nothing to commit to: a replay starts from the top.
            Some(batch) => hand_on(batch, &mut self.dlq, sink).await.map(drop),
            None => self.dlq.flush().await,
        }
    }
}
