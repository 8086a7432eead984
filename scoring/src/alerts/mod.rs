//! Alerts: from a battery's risk to a driver who hears about it exactly once per episode.
//!
//! The stage is a small chain, each part with its own config and tests:
//!
//! - [`policy`]: turns the stream of [`RiskUpdate`]s into decisions (raise, escalate,
//!   resolve) with hysteresis, so a battery hovering at the threshold does not alert daily.
//! - [`store`]: an append-only JSON-lines log on local disk, replayed at start-up; the API
//!   reads alerts and each battery's latest forecast from it.
//! - [`outbox`]: signed webhooks to the car's head unit. A delivery is written to disk
//!   before it is attempted and removed only when the receiver said yes, so it survives
//!   both a receiver outage and a voltcast restart; past a maximum age it goes to a
//!   dead-letter folder the API lists.
//! - [`publish`]: the `battery-alerts` Kafka topic, idempotent producer, keyed by battery.
//! - [`view`]: every instance reads that topic whole, so any instance's API lists the
//!   fleet's alerts; [`acks`] carries an acknowledgement taken by any instance to the
//!   partition that owns the battery's episode.
//!
//! Why "exactly once" holds without distributed transactions: alert ids are
//! deterministic (battery, episode, severity); the episodes are part of their partition's
//! checkpoint (see [`crate::partition`]), so a replay after a crash repeats the same
//! decisions with the same ids; a decision already carried out (its alert is in the
//! store) is not carried out again; and every receiver (head unit, topic consumers)
//! dedupes by id. Deliveries are at least once; with the id as idempotency key the
//! effect is once.

pub mod acks;
pub mod outbox;
pub mod policy;
pub mod publish;
pub mod store;
pub mod view;

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::forecasting::RiskUpdate;
use crate::metrics::Metrics;
pub use acks::{AckInbox, PendingAck};
pub use outbox::{Delivery, DeliveryWorker, Outbox, WebhookConfig};
pub use policy::{Decision, EpisodePolicy};
pub use store::{AlertFilter, AlertStore};

/// `[alerts]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    pub enabled: bool,
    /// Raise when P(rated cycles reached within 30 days) reaches this.
    pub raise_probability: f64,
    /// Resolve an open episode when the probability falls below this. Well under
    /// `raise_probability`, so an episode does not flap open and shut.
    pub clear_probability: f64,
    /// Escalate to `critical` when the expected end of life is this many days away or less.
    pub critical_days: u32,
    /// Kafka topic for alert events (when the source is Kafka).
    pub topic: String,
    /// Compacted topic of each battery's latest assessment (with `fleet_view`).
    pub forecasts_topic: String,
    pub publish_to_kafka: bool,
    /// Read the whole alerts topic into this instance's store, so its API lists every
    /// instance's alerts (Kafka source with publishing on).
    pub fleet_view: bool,
    /// Folder of the alert log.
    pub store_path: std::path::PathBuf,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            raise_probability: 0.9,
            clear_probability: 0.5,
            critical_days: 7,
            topic: "battery-alerts".into(),
            forecasts_topic: "battery-forecasts".into(),
            publish_to_kafka: true,
            fleet_view: true,
            store_path: "data/alerts".into(),
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    #[default]
    Open,
    Acknowledged,
    /// Replaced by a more severe alert of the same episode.
    Escalated,
    Resolved,
}

impl AlertStatus {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => Self::Open,
            "acknowledged" => Self::Acknowledged,
            "escalated" => Self::Escalated,
            "resolved" => Self::Resolved,
            _ => return None,
        })
    }
    /// Still part of a live episode.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Open | Self::Acknowledged)
    }
}

/// Where the webhook of an alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    #[default]
    NotSent,
    Pending,
    Delivered,
    DeadLettered,
}

/// One failure alert, as stored, published and sent to the head unit.
///
/// Its `message` is written from the other fields when serialized ([`Alert::message`]),
/// not held: the sentence was a sixth of an alert, in the log and in memory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Alert {
    pub alert_id: String,
    /// The fleet's own ids, shared rather than copied into every alert.
    pub battery_id: Arc<str>,
    pub vehicle_id: Option<Arc<str>>,
    pub episode: u32,
    pub severity: Severity,
    pub status: AlertStatus,
    /// P(rated cycles reached within the horizon).
    pub probability: f64,
    pub expected_eol_date: Option<String>,
    pub days_remaining: Option<u32>,
    pub lifetime_cycles: f64,
    pub rated_cycles: f64,
    pub forecast_30d_cycles: f64,
    pub model: String,
    pub model_version: u32,
    /// The last telemetry day the assessment includes.
    pub as_of_day: String,
    pub created_at: DateTime<Utc>,
    pub reasons: crate::lines::TextLines,
    /// An escalation after the driver booked service in this episode: when it was booked
    /// (the appointment may need bringing forward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_booked_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
    pub delivery: DeliveryStatus,
}

impl Alert {
    /// What the driver reads: the severity, when the rating is reached, and a booking
    /// to bring forward.
    pub fn message(&self) -> String {
        let when = match self.days_remaining {
            Some(0) => "now".to_string(),
            Some(1) => "in about 1 day".to_string(),
            Some(d) => format!("in about {d} days"),
            None => "within 30 days".to_string(),
        };
        let (battery, rated) = (&self.battery_id, self.rated_cycles);
        let mut message = match self.severity {
            _ if rated - self.lifetime_cycles <= 0.0 => {
                format!("Battery {battery} has used its rated {rated:.0} cycles. Book service now.")
            }
            Severity::Warning => format!(
                "Battery {battery} is expected to reach its rated {rated:.0} cycles {when}. Please book a service appointment."
            ),
            Severity::Critical => format!(
                "Battery {battery} will reach the end of its rated life {when}. Book service now."
            ),
        };
        if let Some(at) = self.service_booked_at {
            let on = at.date_naive();
            message.push_str(&format!(
                " Service was booked on {on}: bring the appointment forward if it is later."
            ));
        }
        message
    }
}

/// The fields in the order they always had, `message` written out after `created_at`.
impl Serialize for Alert {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let booked = self.service_booked_at.is_some();
        let mut st = s.serialize_struct("Alert", 23 + usize::from(booked))?;
        st.serialize_field("alert_id", &self.alert_id)?;
        st.serialize_field("battery_id", &self.battery_id)?;
        st.serialize_field("vehicle_id", &self.vehicle_id)?;
        st.serialize_field("episode", &self.episode)?;
        st.serialize_field("severity", &self.severity)?;
        st.serialize_field("status", &self.status)?;
        st.serialize_field("probability", &self.probability)?;
        st.serialize_field("expected_eol_date", &self.expected_eol_date)?;
        st.serialize_field("days_remaining", &self.days_remaining)?;
        st.serialize_field("lifetime_cycles", &self.lifetime_cycles)?;
        st.serialize_field("rated_cycles", &self.rated_cycles)?;
        st.serialize_field("forecast_30d_cycles", &self.forecast_30d_cycles)?;
        st.serialize_field("model", &self.model)?;
        st.serialize_field("model_version", &self.model_version)?;
        st.serialize_field("as_of_day", &self.as_of_day)?;
        st.serialize_field("created_at", &self.created_at)?;
        st.serialize_field("message", &self.message())?;
        st.serialize_field("reasons", &self.reasons)?;
        if booked {
            st.serialize_field("service_booked_at", &self.service_booked_at)?;
        }
        st.serialize_field("acknowledged_at", &self.acknowledged_at)?;
        st.serialize_field("acknowledged_by", &self.acknowledged_by)?;
        st.serialize_field("resolved_at", &self.resolved_at)?;
        st.serialize_field("resolution", &self.resolution)?;
        st.serialize_field("delivery", &self.delivery)?;
        st.end()
    }
}

/// Deterministic: the same battery, episode and severity always give the same id, so a
/// decision repeated after a crash is recognised downstream as the same alert.
pub fn alert_id(battery: &str, episode: u32, severity: Severity) -> String {
    let mut h = Sha256::new();
    h.update(battery.as_bytes());
    h.update([0]);
    h.update(episode.to_le_bytes());
    h.update(severity.as_str().as_bytes());
    format!("al-{}", &hex::encode(h.finalize())[..20])
}

/// Days since 1970-01-01 as an ISO date.
pub fn iso_day(day: i32) -> String {
    chrono::DateTime::from_timestamp(i64::from(day) * 86_400, 0)
        .map(|t| t.date_naive().to_string())
        .unwrap_or_default()
}

/// An alert lifecycle event: what the Kafka topic carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub event: EventKind,
    pub alert: Alert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Raised,
    Escalated,
    Resolved,
    Acknowledged,
}

impl EventKind {
    /// The name on the wire (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raised => "raised",
            Self::Escalated => "escalated",
            Self::Resolved => "resolved",
            Self::Acknowledged => "acknowledged",
        }
    }
}

#[derive(Debug, Error)]
pub enum AlertError {
    #[error("alert store {path}: {source}")]
    Store {
        path: String,
        source: std::io::Error,
    },
    #[error("outbox {path}: {source}")]
    Outbox {
        path: String,
        source: std::io::Error,
    },
    #[error("alerts topic producer: {0}")]
    Kafka(rdkafka::error::KafkaError),
    #[error("no alert {0}")]
    NotFound(String),
    #[error("the fleet-wide alert view: {0}")]
    View(String),
    #[error("alert {0} is {1:?} and can no longer be acknowledged")]
    NotActive(String, AlertStatus),
}

/// What the stage and the API share: the store, and the ways out (webhooks, Kafka).
pub struct AlertService {
    pub store: Mutex<AlertStore>,
    webhook: Option<(WebhookConfig, mpsc::UnboundedSender<Delivery>, Arc<Outbox>)>,
    /// The event outbox and the publisher's wake-up; the sender is taken (closed) at
    /// shutdown so the publisher drains and stops.
    events: Option<Arc<publish::EventOutbox>>,
    wake_publisher: Mutex<Option<mpsc::UnboundedSender<()>>>,
    /// Acknowledgements (this instance's and, through the view, every instance's) for
    /// the partitions that own the batteries to apply.
    acks: AckInbox,
    metrics: Arc<Metrics>,
}

impl AlertService {
    pub fn new(store: AlertStore, metrics: Arc<Metrics>) -> Self {
        Self {
            store: Mutex::new(store),
            webhook: None,
            events: None,
            wake_publisher: Mutex::new(None),
            acks: AckInbox::default(),
            metrics,
        }
    }

    /// Send raised and escalated alerts as webhooks through `outbox`.
    pub fn with_webhooks(
        mut self,
        config: WebhookConfig,
        deliveries: mpsc::UnboundedSender<Delivery>,
        outbox: Arc<Outbox>,
    ) -> Self {
        self.webhook = Some((config, deliveries, outbox));
        self
    }

    /// Record every lifecycle event in `outbox` before the store records the decision,
    /// and wake the Kafka publisher through `wake`.
    pub fn with_events(
        mut self,
        outbox: Arc<publish::EventOutbox>,
        wake: mpsc::UnboundedSender<()>,
    ) -> Self {
        self.events = Some(outbox);
        self.wake_publisher = Mutex::new(Some(wake));
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Remember which batteries' assessments change, for [`Self::take_changed_latest`].
    pub fn track_latest_changes(&self) {
        self.lock().track_changes();
    }

    /// Up to `max` of the assessments changed since they were last taken (to publish).
    pub fn take_changed_latest(&self, max: usize) -> Vec<crate::forecasting::RiskUpdate> {
        self.lock().take_changed(max)
    }

    /// How many batteries' assessments changed since they were last taken.
    pub fn changed_latest_count(&self) -> usize {
        self.lock().changed_count()
    }

    /// Takes in another instance's latest assessment (the fleet-wide view).
    pub fn merge_latest(&self, update: crate::forecasting::RiskUpdate) {
        self.lock().merge_latest(update);
    }

    /// Takes in another instance's alert event (the fleet-wide view). Every
    /// acknowledgement read goes to the inbox, echoes of this instance's own included:
    /// after a restart they are how a booking not yet checkpointed reaches the episode.
    pub fn merge_event(&self, event: &AlertEvent) {
        self.lock().merge(&event.alert);
        match event.event {
            EventKind::Acknowledged => self.acks.push(&event.alert),
            EventKind::Resolved => self.acks.retire(&event.alert.alert_id),
            EventKind::Raised | EventKind::Escalated => {}
        }
    }

    /// Acknowledgements no partition has settled yet.
    pub fn pending_acks(&self) -> Vec<PendingAck> {
        self.acks.pending()
    }

    /// Acknowledgements a partition applied, or found their episode over.
    pub fn settle_acks(&self, alert_ids: &[String]) {
        self.acks.settle(alert_ids);
    }

    /// Alerts matching `filter`, newest first (what `GET /api/alerts` lists).
    pub fn query(&self, filter: &store::AlertFilter) -> Result<Vec<Alert>, AlertError> {
        self.lock().query(filter)
    }

    /// A battery's latest assessment (what `GET /api/batteries/{id}` shows).
    pub fn latest(&self, battery: &str) -> Option<crate::forecasting::RiskUpdate> {
        self.lock().latest(battery).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AlertStore> {
        // A panic while holding the lock leaves the store usable: every write is a
        // whole line, and the in-memory index is updated after it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out one policy decision: its events into the outbox's open segment and
    /// its lines into the store, both made durable by [`Self::write_out`] (outbox
    /// first) when the batch is recorded. A crash before repeats the decision with the
    /// same alert id.
    fn apply(&self, decision: Decision) -> Result<(), AlertError> {
        match decision {
            Decision::Raise(mut alert) => {
                // The store stays locked from the outbox write to the alert's own line:
                // the delivery worker records outcomes under this lock, so a delivery
                // that succeeds at once cannot be recorded before the alert exists (and
                // be lost, leaving the alert `pending` for ever).
                let mut store = self.lock();
                if store.recorded(&alert.alert_id).is_some() {
                    return Ok(()); // carried out before a crash; replayed since
                }
                self.send_webhook(&mut alert)?;
                self.metrics
                    .alerts_raised
                    .with_label_values(&[alert.severity.as_str()])
                    .inc();
                self.publish(EventKind::Raised, &alert);
                store.put(&alert)?;
            }
            Decision::Escalate {
                previous,
                mut alert,
            } => {
                let mut store = self.lock(); // as for Raise
                if store.recorded(&alert.alert_id).is_some() {
                    return Ok(());
                }
                self.send_webhook(&mut alert)?;
                self.metrics
                    .alerts_raised
                    .with_label_values(&[alert.severity.as_str()])
                    .inc();
                let superseded = store.preview(&previous, |a| {
                    a.status = AlertStatus::Escalated;
                    a.resolution = Some(format!("escalated to {}", alert.alert_id));
                })?;
                if let Some(old) = &superseded {
                    self.publish(EventKind::Resolved, old);
                }
                self.publish(EventKind::Escalated, &alert);
                if let Some(old) = &superseded {
                    store.put(old)?;
                }
                store.put(&alert)?;
                self.acks.retire(&previous);
            }
            Decision::Resolve { alert_id, reason } => {
                let done = self
                    .lock()
                    .recorded(&alert_id)
                    .is_some_and(|status| !status.is_active());
                if done {
                    return Ok(());
                }
                let now = Utc::now();
                self.metrics
                    .alerts_resolved
                    .with_label_values(&[reason.kind()])
                    .inc();
                let mut store = self.lock();
                let resolved = store.preview(&alert_id, |a| {
                    a.status = AlertStatus::Resolved;
                    a.resolved_at = Some(now);
                    a.resolution = Some(reason.to_string());
                })?;
                if let Some(a) = resolved {
                    self.publish(EventKind::Resolved, &a);
                    store.put(&a)?;
                }
                self.acks.retire(&alert_id);
            }
        }
        Ok(())
    }

    /// The driver booked service (or a service desk took the alert).
    pub fn acknowledge(&self, alert_id: &str, by: &str) -> Result<Alert, AlertError> {
        let mut store = self.lock();
        let alert = store
            .get(alert_id)?
            .ok_or_else(|| AlertError::NotFound(alert_id.to_string()))?;
        match alert.status {
            AlertStatus::Acknowledged => return Ok(alert),
            AlertStatus::Open => {}
            other => return Err(AlertError::NotActive(alert_id.to_string(), other)),
        }
        let now = Utc::now();
        let acked = store
            .preview(alert_id, |a| {
                a.status = AlertStatus::Acknowledged;
                a.acknowledged_at = Some(now);
                a.acknowledged_by = Some(by.to_string());
            })?
            .ok_or_else(|| AlertError::NotFound(alert_id.to_string()))?;
        self.publish(EventKind::Acknowledged, &acked);
        store.put(&acked)?;
        self.write_out(&mut store, true)?;
        drop(store);
        // The battery's partition may be this instance's: it applies the booking at its
        // next batch (another owner hears of it through the topic).
        self.acks.push(&acked);
        self.metrics.alerts_acknowledged.inc();
        Ok(acked)
    }

    /// Records a delivery outcome on the alert (the outbox worker calls this).
    pub fn delivery_status(&self, alert_id: &str, status: DeliveryStatus) {
        let mut store = self.lock();
        let recorded = store
            .update(alert_id, |a| a.delivery = status)
            .and_then(|_| self.write_out(&mut store, false));
        if let Err(e) = recorded {
            tracing::error!(alert_id, error = %e, "recording a delivery outcome");
        }
    }

    /// Webhook deliveries given up on.
    pub fn dead_letters(&self) -> Vec<Delivery> {
        self.webhook
            .as_ref()
            .map(|(_, _, outbox)| outbox.dead_letters())
            .unwrap_or_default()
    }

    fn send_webhook(&self, alert: &mut Alert) -> Result<(), AlertError> {
        let Some((config, deliveries, outbox)) = &self.webhook else {
            return Ok(());
        };
        let Some(url) = config.url_for(alert) else {
            self.metrics
                .webhook_deliveries
                .with_label_values(&["no_vehicle"])
                .inc();
            tracing::warn!(alert_id = %alert.alert_id, battery = %alert.battery_id, "no vehicle id: webhook not sent");
            return Ok(());
        };
        alert.delivery = DeliveryStatus::Pending;
        let delivery = Delivery::new(alert, url);
        outbox.enqueue(&delivery)?;
        self.metrics.outbox_depth.inc();
        let _ = deliveries.send(delivery);
        Ok(())
    }

    /// Adds the event to the outbox's open segment (the publisher sends it once
    /// sealed), before the caller records the decision in the store.
    fn publish(&self, event: EventKind, alert: &Alert) {
        let Some(outbox) = &self.events else {
            return;
        };
        outbox.enqueue(&AlertEvent {
            event,
            alert: alert.clone(),
        });
    }

    /// Seals the outbox's open segment, then writes the store's new lines to its log
    /// (and syncs it when `durable`). This order is the outbox's promise: a decision the
    /// log shows has its events durable, so a crash between the two repeats the
    /// decision, and with it the events, under the same ids. Called under the store's
    /// lock, so that no line is written out ahead of its events.
    fn write_out(&self, store: &mut AlertStore, durable: bool) -> Result<(), AlertError> {
        if let Some(outbox) = &self.events
            && outbox.seal()?
            && let Some(wake) = &*self
                .wake_publisher
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        {
            let _ = wake.send(());
        }
        if durable {
            store.sync()
        } else {
            store.write_out()
        }
    }

    /// Makes every decision carried out so far durable (at shutdown).
    pub fn sync(&self) -> Result<(), AlertError> {
        self.write_out(&mut self.lock(), true)
    }

    /// No more events to Kafka: the publisher sends what it has and stops.
    pub fn close_events(&self) {
        self.wake_publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl AlertService {
    /// Keeps fresh assessments as their batteries' latest, under one lock of the store:
    /// the partitions hand each slice's over as soon as it is assessed (see
    /// [`crate::partition::LatestSink`]), before the batch's decisions are carried out.
    pub fn set_latest(&self, updates: Vec<RiskUpdate>) {
        self.lock().set_latest_all(updates);
    }

    /// Carries out a batch's decisions, then stores the fresh assessments as the
    /// batteries' latest under one lock of the store (a lock per update cost more than
    /// the policy on a backlog), and syncs the log if the batch stored an alert.
    /// `evicted`: batteries forgotten after a silence; the API no longer lists them.
    pub fn record(&self, decisions: Vec<Decision>, updates: Vec<RiskUpdate>, evicted: &[Arc<str>]) {
        for d in decisions {
            if let Err(e) = self.apply(d) {
                tracing::error!(error = %e, "alert not recorded");
            }
        }
        let mut store = self.lock();
        store.set_latest_all(updates);
        for battery in evicted {
            store.forget_latest(battery);
        }
        if let Err(e) = self.write_out(&mut store, true) {
            tracing::error!(error = %e, "syncing the alert log");
        }
    }
}

/// The policy and the service together, outside a partition: the episodes rebuilt from
/// the store. For tools and tests that feed risk updates by hand.
pub struct AlertStage {
    pub policy: EpisodePolicy,
    pub service: Arc<AlertService>,
    /// With alerts off, the stage only keeps the latest assessment for the API.
    enabled: bool,
}

impl AlertStage {
    /// Starts from what the store remembers (open episodes, episode counts).
    pub fn new(config: &AlertConfig, service: Arc<AlertService>) -> Result<Self, AlertError> {
        let mut policy = EpisodePolicy::new(config.clone());
        let alerts = service.lock().alerts().collect::<Result<Vec<_>, _>>()?;
        policy.restore(&alerts);
        Ok(Self {
            policy,
            service,
            enabled: config.enabled,
        })
    }

    pub fn take(&mut self, update: RiskUpdate) {
        self.take_batch(vec![update]);
    }

    /// Decides on a batch of updates and carries the decisions out.
    pub fn take_batch(&mut self, batch: Vec<RiskUpdate>) {
        let now = Utc::now();
        let mut decisions = Vec::new();
        if self.enabled {
            let (settled, _) = self.policy.settle(&self.service.pending_acks());
            self.service.settle_acks(&settled);
            for update in &batch {
                decisions.extend(self.policy.observe(update, now));
            }
        }
        self.service.metrics.risk_updates.inc_by(batch.len() as u64);
        self.service.record(decisions, batch, &[]);
    }
}
