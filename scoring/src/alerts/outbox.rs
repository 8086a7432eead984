//! Signed webhooks to the head unit, through a durable outbox.
//!
//! A delivery is a file in `pending/` (written to a temp file, fsynced, renamed) before
//! the first attempt, rewritten after each failure with its attempt count, and removed
//! only when the receiver answered 2xx. A restart reloads `pending/` and carries on with
//! the same backoff. A delivery older than `give_up_after_seconds` moves to `dead/`,
//! which the API lists and a metric counts: nothing is dropped silently.
//!
//! Each attempt is signed afresh (timestamp and `delivery_attempt` in the body), so a
//! receiver that refuses replayed signatures still takes an honest retry; the alert id is
//! the idempotency key, so a retry after a lost response is recognised as a duplicate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use voltcast_headunit::signature::{self, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};

use super::{Alert, AlertError, AlertService, DeliveryStatus};

/// `[webhook]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where alerts go; `{vehicle_id}` and `{battery_id}` are filled in. Empty: no webhooks.
    pub url_template: String,
    /// HMAC-SHA256 key shared with the head units.
    pub secret: String,
    pub timeout_ms: u64,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// A delivery still failing after this long goes to the dead-letter list.
    pub give_up_after_seconds: u64,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    pub outbox_path: PathBuf,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url_template: String::new(),
            secret: String::new(),
            timeout_ms: 5_000,
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            give_up_after_seconds: 86_400,
            concurrency: 16,
            outbox_path: "data/outbox".into(),
        }
    }
}

/// `id` percent-encoded as a URL path segment: every byte but RFC 3986's unreserved
/// characters (letters, digits, `-`, `.`, `_`, `~`).
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl WebhookConfig {
    pub fn enabled(&self) -> bool {
        !self.url_template.trim().is_empty()
    }

    /// The alert's URL; None when the template needs a vehicle id the alert lacks.
    ///
    /// Ids are percent-encoded as one path segment: a vehicle id such as `X/alerts/..`
    /// or one with `?` or `#` must not change the path or add a query. Dot segments are
    /// refused (None), since URL parsers resolve even their encoded forms.
    pub fn url_for(&self, alert: &Alert) -> Option<String> {
        let segment = |id: &str| (id != "." && id != "..").then(|| path_segment(id));
        let mut url = self
            .url_template
            .replace("{battery_id}", &segment(&alert.battery_id)?);
        if url.contains("{vehicle_id}") {
            url = url.replace("{vehicle_id}", &segment(alert.vehicle_id.as_deref()?)?);
        }
        Some(url)
    }

    /// Exponential from `initial_backoff_ms`, capped, with full jitter in its upper half
    /// so receivers coming back up are not hit by every sender at once.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let base = self
            .initial_backoff_ms
            .saturating_mul(1u64 << attempts.saturating_sub(1).min(30))
            .min(self.max_backoff_ms)
            .max(1);
        let jittered = rand::rng().random_range(base / 2..=base);
        Duration::from_millis(jittered)
    }
}

/// One webhook waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub alert_id: String,
    pub url: String,
    pub alert: Alert,
    /// Unix milliseconds when it entered the outbox.
    pub queued_at_ms: i64,
    pub attempts: u32,
    pub last_error: Option<String>,
}

impl Delivery {
    pub fn new(alert: &Alert, url: String) -> Self {
        Self {
            alert_id: alert.alert_id.clone(),
            url,
            alert: alert.clone(),
            queued_at_ms: chrono::Utc::now().timestamp_millis(),
            attempts: 0,
            last_error: None,
        }
    }

    /// The body of attempt `attempts + 1`.
    fn body(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(&self.alert).expect("alerts serialize");
        if let Some(o) = v.as_object_mut() {
            o.insert("delivery_attempt".into(), (self.attempts + 1).into());
        }
        serde_json::to_vec(&v).expect("json serializes")
    }
}

/// The outbox folders.
pub struct Outbox {
    pending: PathBuf,
    dead: PathBuf,
}

impl Outbox {
    pub fn open(dir: &Path) -> Result<Self, AlertError> {
        let o = Self {
            pending: dir.join("pending"),
            dead: dir.join("dead"),
        };
        for d in [&o.pending, &o.dead] {
            std::fs::create_dir_all(d).map_err(|e| o.error(d, e))?;
        }
        Ok(o)
    }

    fn error(&self, path: &Path, source: std::io::Error) -> AlertError {
        AlertError::Outbox {
            path: path.display().to_string(),
            source,
        }
    }

    fn file(dir: &Path, alert_id: &str) -> PathBuf {
        // Alert ids are hex with a prefix: safe as file names.
        dir.join(format!("{alert_id}.json"))
    }

    fn write(&self, dir: &Path, d: &Delivery) -> Result<(), AlertError> {
        use std::io::Write;
        let path = Self::file(dir, &d.alert_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(d).expect("deliveries serialize");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        written.map_err(|e| self.error(&path, e))
    }

    /// Durably records a delivery (new, or after a failed attempt).
    pub fn enqueue(&self, d: &Delivery) -> Result<(), AlertError> {
        self.write(&self.pending, d)
    }

    pub fn complete(&self, alert_id: &str) -> Result<(), AlertError> {
        let path = Self::file(&self.pending, alert_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.error(&path, e)),
            _ => Ok(()),
        }
    }

    pub fn give_up(&self, d: &Delivery) -> Result<(), AlertError> {
        self.write(&self.dead, d)?;
        self.complete(&d.alert_id)
    }

    fn read_dir(&self, dir: &Path) -> Vec<Delivery> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<Delivery> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let bytes = std::fs::read(e.path()).ok()?;
                serde_json::from_slice(&bytes)
                    .inspect_err(|err| tracing::error!(path = %e.path().display(), error = %err, "unreadable outbox entry"))
                    .ok()
            })
            .collect();
        out.sort_by_key(|d| d.queued_at_ms);
        out
    }

    /// Deliveries not yet done, oldest first (at start-up).
    pub fn pending(&self) -> Vec<Delivery> {
        self.read_dir(&self.pending)
    }

    /// Deliveries given up on.
    pub fn dead_letters(&self) -> Vec<Delivery> {
        self.read_dir(&self.dead)
    }
}

/// Sends one attempt; Err carries what went wrong, for the outbox and the logs.
pub async fn send(
    client: &reqwest::Client,
    config: &WebhookConfig,
    d: &Delivery,
) -> Result<(), String> {
    let body = d.body();
    let ts = chrono::Utc::now().timestamp();
    let sig = signature::sign(config.secret.as_bytes(), ts, &body);
    let response = client
        .post(&d.url)
        .timeout(Duration::from_millis(config.timeout_ms))
        .header("content-type", "application/json")
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, sig)
        .header(IDEMPOTENCY_HEADER, &d.alert_id)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let kind = if e.is_timeout() { "timeout" } else { "connect" };
            format!("{kind}: {e}")
        })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    Err(format!(
        "HTTP {status}: {}",
        text.chars().take(200).collect::<String>()
    ))
}

/// The delivery worker: takes new deliveries from the service, retries failures with
/// backoff, and once `stop` carries a deadline, stops when it has passed or when nothing
/// is left to send (whichever first); what is left stays in the outbox for the next start.
pub struct DeliveryWorker {
    pub config: WebhookConfig,
    pub outbox: Arc<Outbox>,
    pub service: Arc<AlertService>,
    pub client: reqwest::Client,
}

impl DeliveryWorker {
    pub async fn run(
        self,
        mut incoming: mpsc::UnboundedReceiver<Delivery>,
        mut stop: watch::Receiver<Option<Instant>>,
    ) {
        let metrics = self.service.metrics().clone();
        let mut queue: BTreeMap<(Instant, u64), Delivery> = BTreeMap::new();
        let mut seq = 0u64;
        // Alerts queued or in flight. A delivery enqueued before the worker started is
        // both in the outbox read here and in the channel: it is sent once.
        let mut known: std::collections::HashSet<String> = std::collections::HashSet::new();
        for d in self.outbox.pending() {
            seq += 1;
            known.insert(d.alert_id.clone());
            queue.insert((Instant::now(), seq), d);
        }
        metrics.outbox_depth.set(queue.len() as i64);
        let mut inflight: JoinSet<(Delivery, Result<(), String>)> = JoinSet::new();
        let mut open = true;
        let concurrency = self.config.concurrency.max(1);
        loop {
            let now = Instant::now();
            while inflight.len() < concurrency {
                let Some(entry) = queue.first_entry() else {
                    break;
                };
                if entry.key().0 > now {
                    break;
                }
                let d = entry.remove();
                let (client, config) = (self.client.clone(), self.config.clone());
                inflight.spawn(async move {
                    let r = send(&client, &config, &d).await;
                    (d, r)
                });
            }
            let deadline = *stop.borrow();
            // Once stopped, nothing queued, in flight or waiting in the channel means the
            // drain is done. Why not wait for the channel to close: the service holds its
            // sender as long as it lives, so every shutdown waited out the whole deadline.
            // A delivery recorded later is in the outbox for the next start.
            let drained = queue.is_empty() && inflight.is_empty() && (!open || incoming.is_empty());
            if let Some(deadline) = deadline
                && (now >= deadline || drained)
            {
                break;
            }
            if !open && deadline.is_none() && queue.is_empty() && inflight.is_empty() {
                // The service went away without a stop: nothing more can arrive.
                break;
            }
            let next_due = queue.first_key_value().map(|(k, _)| k.0);
            let wake = match (next_due, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    if let Ok((d, result)) = done {
                        let id = d.alert_id.clone();
                        match self.settle(d, result) {
                            Some((at, d)) => {
                                seq += 1;
                                queue.insert((at, seq), d);
                            }
                            None => {
                                known.remove(&id);
                            }
                        }
                    }
                }
                d = incoming.recv(), if open => match d {
                    Some(d) if known.insert(d.alert_id.clone()) => {
                        seq += 1;
                        queue.insert((Instant::now(), seq), d);
                    }
                    Some(_) => {}
                    None => open = false,
                },
                _ = stop.changed() => {}
                _ = tokio::time::sleep_until(wake.unwrap_or(now + Duration::from_secs(3600))), if wake.is_some() => {}
            }
        }
        inflight.abort_all();
        metrics.outbox_depth.set(self.outbox.pending().len() as i64);
    }

    /// Records an attempt's outcome; returns when to retry, if at all.
    fn settle(&self, mut d: Delivery, result: Result<(), String>) -> Option<(Instant, Delivery)> {
        let metrics = self.service.metrics();
        match result {
            Ok(()) => {
                metrics
                    .webhook_deliveries
                    .with_label_values(&["delivered"])
                    .inc();
                if let Err(e) = self.outbox.complete(&d.alert_id) {
                    tracing::error!(error = %e, "removing a delivered webhook from the outbox");
                }
                metrics.outbox_depth.dec();
                self.service
                    .delivery_status(&d.alert_id, DeliveryStatus::Delivered);
                None
            }
            Err(error) => {
                d.attempts += 1;
                let age_ms = chrono::Utc::now().timestamp_millis() - d.queued_at_ms;
                tracing::debug!(alert_id = %d.alert_id, attempts = d.attempts, %error, "webhook attempt failed");
                d.last_error = Some(error);
                if age_ms >= (self.config.give_up_after_seconds * 1000) as i64 {
                    metrics
                        .webhook_deliveries
                        .with_label_values(&["dead_lettered"])
                        .inc();
                    metrics.outbox_depth.dec();
                    tracing::warn!(alert_id = %d.alert_id, attempts = d.attempts, error = d.last_error.as_deref().unwrap_or(""), "webhook given up: in the dead-letter list");
                    if let Err(e) = self.outbox.give_up(&d) {
                        tracing::error!(error = %e, "moving a webhook to the dead-letter list");
                    }
                    self.service
                        .delivery_status(&d.alert_id, DeliveryStatus::DeadLettered);
                    return None;
                }
                metrics
                    .webhook_deliveries
                    .with_label_values(&["retried"])
                    .inc();
                if let Err(e) = self.outbox.enqueue(&d) {
                    tracing::error!(error = %e, "recording a failed webhook attempt");
                }
                Some((Instant::now() + self.config.backoff(d.attempts), d))
            }
        }
    }
}
