//! Per-(battery, UTC day) partial aggregates of one micro-batch, computed by DataFusion.
//!
//! Why DataFusion for a GROUP BY we could hand-write: the same engine then serves batch
//! scoring over Parquet archives and CSV history (`voltcast forecast`), so the stream and
//! the batch path share one definition of a day's aggregate.

use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::Result;
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::prelude::{SessionConfig, SessionContext, cast, col, lit};
use voltcast_ingest::schema as s;
use voltcast_ingest::time::MILLIS_PER_DAY;

/// Output column names.
pub mod out {
    /// The interned battery index the window stage adds before aggregating.
    pub const BATTERY: &str = "battery_index";
    pub const DAY: &str = "day";
    pub const TRIPS: &str = "trips";
    pub const MINUTES: &str = "minutes";
    pub const CYCLES: &str = "cycles";
    pub const AGE: &str = "age";
    pub const LIFETIME: &str = "lifetime";
    pub const RATED: &str = "rated";
    pub const REPORTS: &str = "reports";
    /// Electrical readings: for each, `<name>_min`, `_max`, `_sum`, `_n`.
    pub const READINGS: [&str; 3] = [
        voltcast_ingest::schema::RESTING_VOLTAGE,
        voltcast_ingest::schema::STATE_OF_CHARGE,
        voltcast_ingest::schema::TEMPERATURE_C,
    ];
}

pub struct DailyAggregator {
    ctx: SessionContext,
}

impl Default for DailyAggregator {
    fn default() -> Self {
        // One partition: a micro-batch is small, and repartitioning it across two cores
        // costs more than it saves; parallelism comes from the pipeline's stages instead.
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(1 << 16);
        Self {
            ctx: SessionContext::new_with_config(config),
        }
    }
}

impl DailyAggregator {
    /// Groups deduplicated telemetry rows (with the window stage's `battery_index`
    /// column) by battery and UTC day.
    pub async fn partials(&self, rows: RecordBatch) -> Result<Vec<RecordBatch>> {
        if rows.num_rows() == 0 {
            return Ok(Vec::new());
        }
        let day = (cast(col(s::EVENT_TIME), DataType::Int64) / lit(MILLIS_PER_DAY)).alias(out::DAY);
        let mut aggregates = vec![
            sum(col(s::NUMBER_OF_TRIPS)).alias(out::TRIPS),
            sum(col(s::DAILY_TRIP_DURATION)).alias(out::MINUTES),
            sum(col(s::DAILY_CYCLES_USED)).alias(out::CYCLES),
            min(col(s::BATTERY_AGE_DAYS)).alias(out::AGE),
            max(col(s::LIFETIME_CYCLES_USED)).alias(out::LIFETIME),
            max(col(s::BATTERY_RATED_CYCLES)).alias(out::RATED),
            count(lit(1)).alias(out::REPORTS),
        ];
        for r in out::READINGS {
            aggregates.push(min(col(r)).alias(format!("{r}_min")));
            aggregates.push(max(col(r)).alias(format!("{r}_max")));
            aggregates.push(sum(col(r)).alias(format!("{r}_sum")));
            aggregates.push(count(col(r)).alias(format!("{r}_n")));
        }
        self.ctx
            .read_batch(rows)?
            .aggregate(vec![col(out::BATTERY), day], aggregates)?
            .collect()
            .await
    }

    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }
}
