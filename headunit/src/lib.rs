//! # voltcast-headunit
//!
//! The car's side of voltcast's failure alerts. Two things live here:
//!
//! - [`signature`]: the webhook signature scheme. The sender (`voltcast-scoring`'s
//!   webhook sink) and every receiver use this one definition, so they cannot drift.
//! - [`server`]: a head-unit simulator. It receives signed alert webhooks the way an
//!   in-car endpoint would (signature, timestamp window, replay and duplicate checks),
//!   keeps an inbox per vehicle, and serves an in-dash page with a "Book service" button
//!   that acknowledges the alert back to voltcast.
//!
//! It is its own crate because it is what a car maker would deploy or imitate: it knows
//! nothing of Kafka, windows or models, only the alert JSON it displays.

pub mod page;
pub mod server;
pub mod signature;

pub use server::{HeadUnit, HeadUnitConfig, Received};
