//! # voltcast-forecaster
//!
//! Per-battery models of daily cycles used, model selection by backtest, and failure
//! risk. It knows nothing of Kafka or streaming: it takes a battery's clean daily series
//! and answers "how many cycles over the next 30 days, and how likely is the rating
//! crossed".
//!
//! Shape, after augurs: small model types around one trait ([`Model`]: a family that fits
//! a [`DailySeries`] into a [`FittedModel`], which predicts with intervals and advances by
//! one day). The families are seasonal naive (the floor), a non-seasonal AutoETS, MSTL
//! (augurs) with an ETS trend, a linfa regression of cycles on driving (its driving ahead
//! by weekly ETS), an ensemble, and a Prophet-style curve of log cycles with level steps,
//! weekly and yearly seasonality ([`seasonal`]). [`select`]
//! picks one per battery by rolling-origin backtest; [`failure_risk`] turns its forecast
//! into the probability that the battery reaches its rating within 30 days.
//!
//! Why the ETS recursions are our own ([`ets`]): between selections, each closed day must
//! advance the chosen model in microseconds and the model must be checkpointed; augurs'
//! fitted ETS exposes neither its parameters nor its states.

pub mod drivers;
pub mod error;
pub mod ets;
pub mod forecast;
pub mod model;
pub mod mstl;
pub mod naive;
pub mod regression;
pub mod risk;
pub mod seasonal;
pub mod select;
pub mod series;

pub use error::ForecastError;
pub use forecast::Forecast;
pub use model::{FittedModel, Model, ModelKind};
pub use risk::{FailureRisk, RiskConfig, failure_risk};
pub use select::{
    BacktestScore, ModelRecord, QUIET_ASSESS_EVERY_DAYS, SelectionConfig, Standing,
    UNSCORED_FAMILY, Upkeep, refit, select,
};
pub use series::{DailySeries, DayObservation};
