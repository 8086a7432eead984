use thiserror::Error;

use crate::model::ModelKind;

#[derive(Debug, Error)]
pub enum ForecastError {
    #[error("{kind} cannot be fitted on {days} days")]
    CannotFit { kind: ModelKind, days: usize },
    #[error("the series is empty")]
    Empty,
}
