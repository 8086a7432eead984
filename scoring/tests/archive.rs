//! Raw telemetry and closed days land in date-partitioned Parquet, and read back whole.

use std::path::Path;
use std::sync::Arc;

use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use voltcast_ingest::file::{FileFormat, FileSourceConfig};
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, write_file};
use voltcast_ingest::{BatchConfig, DeadLetterQueue, FileSource, IngestCounters, ValidationConfig};
use voltcast_scoring::archive::{ArchiveConfig, ParquetArchive};
use voltcast_scoring::partition::{PartitionSet, PartitionSettings};
use voltcast_scoring::pipeline::PartitionStage;
use voltcast_scoring::windows::WindowConfig;

/// (files, rows, partition folder names) under `dir`.
fn read_all(dir: &Path) -> (usize, usize, Vec<String>) {
    let (mut files, mut rows, mut parts) = (0, 0, Vec::new());
    for part in std::fs::read_dir(dir).unwrap() {
        let part = part.unwrap().path();
        parts.push(part.file_name().unwrap().to_string_lossy().into_owned());
        for f in std::fs::read_dir(&part).unwrap() {
            let reader = ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(f.unwrap().path()).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            files += 1;
            rows += reader.map(|b| b.unwrap().num_rows()).sum::<usize>();
        }
    }
    parts.sort();
    (files, rows, parts)
}

#[tokio::test]
async fn raw_rows_and_closed_days_are_archived_by_date() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("fleet.jsonl");
    let sim = SimulatorConfig {
        batteries: 100,
        days: 15,
        malformed_rate: 0.0,
        ..Default::default()
    };
    write_file(
        &mut FleetSimulator::new(sim, WireFormat::Json).unwrap(),
        &input,
        None,
    )
    .unwrap();

    let archive = ParquetArchive::new(&ArchiveConfig {
        path: dir.path().join("archive"),
    });
    let (late, _) = DeadLetterQueue::memory();
    let settings = PartitionSettings {
        archive,
        ..PartitionSettings::windows_only(WindowConfig::default())
    };
    let partitions = Arc::new(PartitionSet::on_sight(settings, None));
    let (tap, closed) = std::sync::mpsc::channel();
    let mut stage = PartitionStage::new(partitions, late).with_closed_tap(tap);
    let (dlq, _) = DeadLetterQueue::memory();
    let counters = Arc::new(IngestCounters::default());
    let source = FileSource::new(
        FileSourceConfig {
            path: input,
            format: FileFormat::Auto,
            dead_letter_path: None,
        },
        BatchConfig {
            max_rows: 300,
            max_wait_ms: 1000,
        },
        ValidationConfig::default(),
        counters.clone(),
        dlq,
    );
    source.run(&mut stage).await.unwrap();
    let streamed = closed.try_iter().count();
    stage.finish().await.unwrap();
    // The end of the input closes the days still open one at a time (each carried out
    // before the next closes), newest day last.
    let newest_days: Vec<i32> = closed
        .try_iter()
        .map(|b| {
            let days = b
                .column_by_name("day")
                .unwrap()
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Date32Array>()
                .unwrap();
            days.values().iter().copied().max().unwrap()
        })
        .collect();
    assert!(streamed > 0 && newest_days.len() >= 2, "{newest_days:?}");
    assert!(
        newest_days.windows(2).all(|w| w[0] < w[1]),
        "{newest_days:?}"
    );

    let (raw_files, raw_rows, raw_parts) = read_all(&dir.path().join("archive/raw"));
    assert_eq!(
        raw_rows as u64,
        counters.decoded(),
        "every raw row archived once"
    );
    assert_eq!(raw_parts.len(), 15);
    assert_eq!(raw_parts[0], "date=2024-01-01");
    assert!(raw_files >= 15);
    let (_, daily_rows, daily_parts) = read_all(&dir.path().join("archive/daily"));
    assert_eq!(daily_rows as u64, stage.report().work.windows.days_closed);
    assert_eq!(daily_parts.len(), 15);
}
