//! # voltcast-forecaster
//!
//! Per-battery models of daily cycles used, model selection by backtest, and failure
//! risk. It knows nothing of Kafka or streaming: it takes a battery's clean daily series
//! and answers "how many cycles over the next 30 days, and how likely is the rating
//! crossed". Issue #4 fills it in; until then the crate is empty on purpose, so that the
//! workspace layout (and the dependency build) is in place from the start.
