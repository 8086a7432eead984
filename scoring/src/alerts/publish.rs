//! Alert events to Kafka: the `battery-alerts` topic, keyed by battery so one battery's
//! events stay in order on one partition.
//!
//! At least once across crashes: an event is a file in the event outbox (written to a temp
//! file, fsynced, renamed, numbered in decision order) before the alert store records the
//! decision, and the file is removed only once the broker acknowledged the event
//! (idempotent producer, `acks=all`). A restart publishes what is left, in order. An event
//! that was published just before a crash may go out again: it carries the same id
//! (header `voltcast.event_id`, `{alert_id}:{event}`), which readers dedupe on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::{AlertError, AlertEvent};
use crate::metrics::Metrics;

/// The header naming an event: the same on every copy of it.
pub const HEADER_EVENT_ID: &str = "voltcast.event_id";

impl AlertEvent {
    /// `{alert_id}:{event}`: unique per lifecycle step, the same on a re-send.
    pub fn id(&self) -> String {
        format!("{}:{}", self.alert.alert_id, self.event.as_str())
    }
}

/// Events decided but not yet acknowledged by the broker, one file each.
pub struct EventOutbox {
    dir: PathBuf,
    next: AtomicU64,
}

impl EventOutbox {
    pub fn open(dir: &Path) -> Result<Self, AlertError> {
        std::fs::create_dir_all(dir).map_err(|e| error(dir, e))?;
        let outbox = Self {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(0),
        };
        let last = outbox.files().last().and_then(|p| number(p));
        outbox
            .next
            .store(last.map_or(0, |n| n + 1), Ordering::SeqCst);
        Ok(outbox)
    }

    /// Durably records `event` after every event recorded before it.
    pub fn enqueue(&self, event: &AlertEvent) -> Result<(), AlertError> {
        use std::io::Write;
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("{n:020}.json"));
        let tmp = self.dir.join(format!(".{n:020}.json.tmp"));
        let bytes = serde_json::to_vec(event).expect("alert events serialize");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        written.map_err(|e| error(&path, e))
    }

    /// Event files in decision order.
    fn files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| number(p).is_some())
            .collect();
        files.sort();
        files
    }

    /// Events not yet published, in decision order.
    pub fn pending(&self) -> Vec<(PathBuf, AlertEvent)> {
        self.files()
            .into_iter()
            .filter_map(|path| {
                let bytes = std::fs::read(&path).ok()?;
                match serde_json::from_slice(&bytes) {
                    Ok(event) => Some((path, event)),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "unreadable alert event: left in the outbox");
                        None
                    }
                }
            })
            .collect()
    }

    fn complete(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(path = %path.display(), error = %e, "removing a published alert event");
        }
    }
}

fn number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

fn error(path: &Path, source: std::io::Error) -> AlertError {
    AlertError::Outbox {
        path: path.display().to_string(),
        source,
    }
}

pub struct AlertPublisher {
    pub producer: FutureProducer,
    pub topic: String,
    pub outbox: Arc<EventOutbox>,
}

impl AlertPublisher {
    /// Publishes the outbox's events, those left by an earlier run first, each time
    /// `wake` says there are new ones, until `wake` closes. A failed send is retried
    /// with backoff: an event leaves the outbox only once published. At shutdown one
    /// last pass gets up to 5 s; what it cannot send waits for the next start.
    pub async fn run(self, mut wake: mpsc::UnboundedReceiver<()>, metrics: Arc<Metrics>) {
        loop {
            if !self.drain(&metrics, Some(&mut wake)).await {
                break;
            }
            match wake.recv().await {
                // Many decisions in one batch wake once.
                Some(()) => while wake.try_recv().is_ok() {},
                None => break,
            }
        }
        let last = tokio::time::timeout(Duration::from_secs(5), self.drain(&metrics, None)).await;
        if !matches!(last, Ok(true)) {
            tracing::warn!(topic = %self.topic, "alert events left in the outbox for the next start");
        }
    }

    /// Publishes the pending events in order; true when none is left. With `wake`, a
    /// failed send is retried with backoff until it goes through or `wake` closes;
    /// without, the first failure ends the pass.
    async fn drain(
        &self,
        metrics: &Metrics,
        mut wake: Option<&mut mpsc::UnboundedReceiver<()>>,
    ) -> bool {
        for (path, event) in self.outbox.pending() {
            let mut backoff = Duration::from_millis(200);
            loop {
                let Err(e) = self.send(&event).await else {
                    break;
                };
                metrics
                    .alert_events_published
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(topic = %self.topic, event_id = %event.id(), error = %e, "alert event not published yet");
                let Some(w) = wake.as_deref_mut() else {
                    return false;
                };
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    woken = w.recv() => if woken.is_none() { return false },
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            metrics
                .alert_events_published
                .with_label_values(&["published"])
                .inc();
            self.outbox.complete(&path);
        }
        true
    }

    async fn send(&self, event: &AlertEvent) -> Result<(), rdkafka::error::KafkaError> {
        let payload = serde_json::to_vec(event).expect("alert events serialize");
        let id = event.id();
        let headers = OwnedHeaders::new().insert(Header {
            key: HEADER_EVENT_ID,
            value: Some(id.as_str()),
        });
        let record = FutureRecord::to(&self.topic)
            .key(event.alert.battery_id.as_bytes())
            .payload(&payload)
            .headers(headers);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

/// Each battery's latest assessment to a compacted topic keyed by battery, so the other
/// instances' APIs can show batteries they do not own. Once a second, the assessments
/// that changed since (at most the fleet's size, however deep a backlog is), and once
/// more at shutdown. A lost one is replaced by the battery's next day: no outbox.
pub struct ForecastPublisher {
    pub producer: FutureProducer,
    pub topic: String,
}

impl ForecastPublisher {
    pub async fn run(
        self,
        service: Arc<super::AlertService>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let last = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                _ = stop.changed() => true,
            };
            let changed = service.take_changed_latest();
            let payloads: Vec<Vec<u8>> = changed
                .iter()
                .map(|u| serde_json::to_vec(u).expect("assessments serialize"))
                .collect();
            let mut sent = Vec::with_capacity(changed.len());
            for (update, payload) in changed.iter().zip(&payloads) {
                let record = FutureRecord::to(&self.topic)
                    .key(update.battery_id.as_bytes())
                    .payload(payload);
                sent.push(self.producer.send(record, Duration::from_secs(5)));
            }
            let failed = futures::future::join_all(sent)
                .await
                .into_iter()
                .filter(Result::is_err)
                .count();
            if failed > 0 {
                tracing::warn!(topic = %self.topic, failed, "latest forecasts not published (the next ones replace them)");
            }
            if last {
                return;
            }
        }
    }
}
