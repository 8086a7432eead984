//! Helpers shared by the ingest integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use voltcast_ingest::arrow::array::{Array, AsArray};
use voltcast_ingest::arrow::datatypes::Float64Type;
use voltcast_ingest::arrow::record_batch::RecordBatch;
use voltcast_ingest::{BatchSink, MicroBatch, SinkError, SourcePosition, schema};

/// Keeps every batch it is handed.
#[derive(Default)]
pub struct CollectingSink {
    pub batches: Vec<MicroBatch>,
}

impl BatchSink for CollectingSink {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        let positions = batch.positions.clone();
        self.batches.push(batch);
        Ok(positions)
    }
}

impl CollectingSink {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.rows.num_rows()).sum()
    }

    pub fn concat(&self) -> RecordBatch {
        let batches: Vec<_> = self.batches.iter().map(|b| b.rows.clone()).collect();
        voltcast_ingest::arrow::compute::concat_batches(&schema::telemetry_schema(), &batches)
            .unwrap()
    }

    /// Per battery: (row count, order-independent checksum of daily cycles).
    pub fn per_battery(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out = BTreeMap::new();
        for b in &self.batches {
            let ids = b
                .rows
                .column_by_name(schema::BATTERY_ID)
                .unwrap()
                .as_string::<i32>();
            let cycles = b
                .rows
                .column_by_name(schema::DAILY_CYCLES_USED)
                .unwrap()
                .as_primitive::<Float64Type>();
            for i in 0..ids.len() {
                let e: &mut (u64, u64) = out.entry(ids.value(i).to_string()).or_default();
                e.0 += 1;
                e.1 = e.1.wrapping_add(cycles.value(i).to_bits());
            }
        }
        out
    }
}

/// Asserts two per-battery tallies are equal, showing only the batteries that differ.
pub fn assert_same_tally(got: &BTreeMap<String, (u64, u64)>, want: &BTreeMap<String, (u64, u64)>) {
    let mut diffs = Vec::new();
    for id in got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if got.get(id) != want.get(id) {
            diffs.push(format!(
                "{id}: got {:?}, want {:?}",
                got.get(id),
                want.get(id)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} batteries differ (count, checksum): {}",
        diffs.len(),
        diffs.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
    );
}
