//! Helpers shared by the integration tests.

use std::path::Path;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Every row of the archive's `kind` table (`raw` or `daily`) under `root`, as
/// (battery id, `column` as an integer), sorted: what a table reader sees (hidden and
/// staged files excluded).
pub fn archived(root: &Path, kind: &str, column: &str) -> Vec<(String, i64)> {
    let mut rows = Vec::new();
    let Ok(dates) = std::fs::read_dir(root.join(kind)) else {
        return rows;
    };
    for date in dates {
        for file in std::fs::read_dir(date.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                    .unwrap()
                    .build()
                    .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let ids = batch
                    .column_by_name("battery_id")
                    .unwrap()
                    .as_string::<i32>();
                let values = cast(batch.column_by_name(column).unwrap(), &DataType::Int64).unwrap();
                let values = values.as_primitive::<Int64Type>();
                for i in 0..batch.num_rows() {
                    rows.push((ids.value(i).to_string(), values.value(i)));
                }
            }
        }
    }
    rows.sort();
    rows
}

/// Files still waiting in the archive's staging folder.
pub fn staged_files(root: &Path) -> usize {
    fn count(dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .map(|e| {
                let p = e.unwrap().path();
                if p.is_dir() { count(&p) } else { 1 }
            })
            .sum()
    }
    count(&root.join("_staged"))
}
