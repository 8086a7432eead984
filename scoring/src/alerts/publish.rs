//! Alert events to Kafka: the `battery-alerts` topic, keyed by battery so one battery's
//! events stay in order on one partition.
//!
//! At least once across crashes: the events a batch of decisions makes are one file in
//! the event outbox (a segment: JSON lines, written to a temp file, fsynced, renamed,
//! numbered in decision order), sealed before the alert store writes the decisions, and
//! the file is removed only once the broker acknowledged all its events (idempotent
//! producer, `acks=all`). A restart publishes what is left, in order. An event that was
//! published just before a crash may go out again: it carries the same id (header
//! `voltcast.event_id`, `{alert_id}:{event}`), which readers dedupe on.
//!
//! Why a segment per batch and not a file per event: on a backlog a micro-batch decides
//! hundreds of alerts, and creating, fsyncing and renaming a file for each took a fifth
//! of the partition stage's time (ext4 inode allocation, mostly), on the stage's
//! critical path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::{AlertError, AlertEvent};
use crate::metrics::Metrics;

/// The header naming an event: the same on every copy of it.
pub const HEADER_EVENT_ID: &str = "voltcast.event_id";

/// The header naming the instance that published an assessment, so that its own fleet
/// view skips it unread (see [`ForecastPublisher::origin`]).
pub const HEADER_ORIGIN: &str = "voltcast.origin";

/// A name for one running instance's view and publisher, unique among the instances
/// sharing the topic (several may share a process in tests).
pub fn new_origin(group_id: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{group_id}/{}/{nanos}/{n}", std::process::id())
}

impl AlertEvent {
    /// `{alert_id}:{event}`: unique per lifecycle step, the same on a re-send.
    pub fn id(&self) -> String {
        format!("{}:{}", self.alert.alert_id, self.event.as_str())
    }
}

/// Events decided but not yet acknowledged by the broker: sealed segments on disk, and
/// the open one in memory.
pub struct EventOutbox {
    dir: PathBuf,
    next: AtomicU64,
    /// Events enqueued since the last seal, as JSON lines.
    open: Mutex<Vec<u8>>,
}

impl EventOutbox {
    pub fn open(dir: &Path) -> Result<Self, AlertError> {
        std::fs::create_dir_all(dir).map_err(|e| error(dir, e))?;
        let outbox = Self {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
        };
        let last = outbox.files().last().and_then(|p| number(p));
        outbox
            .next
            .store(last.map_or(0, |n| n + 1), Ordering::SeqCst);
        Ok(outbox)
    }

    /// Adds `event` to the open segment, after every event enqueued before it. It is
    /// durable once [`Self::seal`] returns.
    pub fn enqueue(&self, event: &AlertEvent) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::to_writer(&mut *open, event).expect("alert events serialize");
        open.push(b'\n');
    }

    /// Makes the open segment durable, as the next file in decision order. Returns
    /// whether there was anything to seal.
    pub fn seal(&self) -> Result<bool, AlertError> {
        use std::io::Write;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.is_empty() {
            return Ok(false);
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("{n:020}.jsonl"));
        let tmp = self.dir.join(format!(".{n:020}.jsonl.tmp"));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&open).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        written.map_err(|e| error(&path, e))?;
        open.clear();
        Ok(true)
    }

    /// Segment files in decision order (one-event `.json` files from earlier versions
    /// included).
    fn files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<(u64, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter_map(|p| Some((number(&p)?, p)))
            .collect();
        files.sort();
        files.into_iter().map(|(_, p)| p).collect()
    }

    /// Sealed events not yet published, in decision order, each with its segment.
    pub fn pending(&self) -> Vec<(PathBuf, AlertEvent)> {
        let mut events = Vec::new();
        for path in self.files() {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice(line) {
                    Ok(event) => events.push((path.clone(), event)),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "unreadable alert event: left in the outbox");
                    }
                }
            }
        }
        events
    }

    /// Removes a segment whose events were all published.
    fn complete(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(path = %path.display(), error = %e, "removing a published alert event segment");
        }
    }
}

fn number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let stem = name
        .strip_suffix(".jsonl")
        .or_else(|| name.strip_suffix(".json"))?;
    stem.parse().ok()
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
    ///
    /// Up to [`EVENTS_IN_FLIGHT`] events are handed to librdkafka before the first
    /// acknowledgement is awaited. Why: one event per round trip (a `linger.ms` and a
    /// produce request each) published about 200 events a second, so a backlog's
    /// 25,000 alerts reached the topic two minutes after their days closed, and a
    /// shutdown waited for them. The idempotent producer keeps one battery's events in
    /// order on its partition; after a failure the pass resends from the first event
    /// not acknowledged, so a later one may go out twice (same id, deduped by readers)
    /// and after its successor (a reader's merge is monotone in status: a raise read
    /// after its resolve changes nothing).
    async fn drain(
        &self,
        metrics: &Metrics,
        mut wake: Option<&mut mpsc::UnboundedReceiver<()>>,
    ) -> bool {
        let pending = self.outbox.pending();
        let mut next = 0;
        let mut backoff = Duration::from_millis(200);
        while next < pending.len() {
            let window = &pending[next..(next + EVENTS_IN_FLIGHT).min(pending.len())];
            let sent: Vec<_> = window.iter().map(|(_, event)| self.send(event)).collect();
            let mut failure = None;
            for delivery in sent {
                if let Err(e) = acknowledged(delivery).await {
                    failure = Some(e);
                    break;
                }
                metrics
                    .alert_events_published
                    .with_label_values(&["published"])
                    .inc();
                let path = &pending[next].0;
                let segment_done = pending.get(next + 1).is_none_or(|(p, _)| p != path);
                if segment_done {
                    self.outbox.complete(path);
                }
                next += 1;
            }
            let Some(e) = failure else {
                backoff = Duration::from_millis(200);
                continue;
            };
            metrics
                .alert_events_published
                .with_label_values(&["failed"])
                .inc();
            tracing::warn!(topic = %self.topic, event_id = %pending[next].1.id(), error = %e, "alert event not published yet");
            let Some(w) = wake.as_deref_mut() else {
                return false;
            };
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                woken = w.recv() => if woken.is_none() { return false },
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        true
    }

    /// Hands one event to librdkafka (which copies it); the future resolves when the
    /// broker acknowledged it or librdkafka gave up.
    fn send(&self, event: &AlertEvent) -> Result<DeliveryFuture, KafkaError> {
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
        self.producer.send_result(record).map_err(|(e, _)| e)
    }
}

/// Waits for one handed-over event: Ok once the broker acknowledged it.
async fn acknowledged(delivery: Result<DeliveryFuture, KafkaError>) -> Result<(), KafkaError> {
    match delivery?.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Alert events a publishing pass hands to librdkafka before awaiting the first
/// acknowledgement (well under its queue of 100,000 messages).
const EVENTS_IN_FLIGHT: usize = 1024;

/// Each battery's latest assessment to a compacted topic keyed by battery, so the other
/// instances' APIs can show batteries they do not own. Once a second, the assessments
/// that changed since (at most the fleet's size, however deep a backlog is), and once
/// more at shutdown. A lost one is replaced by the battery's next day: no outbox.
pub struct ForecastPublisher {
    pub producer: FutureProducer,
    pub topic: String,
    /// Sent in [`HEADER_ORIGIN`]. Why: on a backlog every battery's assessment changes
    /// every second, and this instance's view read all of them back (a JSON parse each)
    /// only to find its own, already held: 6-8 of the process's 70-79 CPU seconds on
    /// the 20,000 x 365 backlog of `bench pipeline`.
    pub origin: String,
}

/// Assessments a publishing round copies out of the store at a time.
const PUBLISH_CHUNK: usize = 1024;
/// Deliveries a round keeps in flight; librdkafka holds a copy of each until acked.
const PUBLISH_IN_FLIGHT: usize = 8192;

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
            self.publish_changed(&service).await;
            if last {
                return;
            }
        }
    }

    /// Publishes the assessments changed since the last round, a chunk at a time with a
    /// bounded number in flight. Why not all at once: on a backlog of 100,000 batteries
    /// every assessment changes every second, and a round held each one cloned, its
    /// JSON, and librdkafka's copy of it, all together (hundreds of MB, the Kafka path's
    /// peak memory above a file replay's, measured through a tansu broker).
    async fn publish_changed(&self, service: &super::AlertService) {
        let mut deliveries = Deliveries::default();
        let mut payload = Vec::new();
        let mut remaining = service.changed_latest_count();
        while remaining > 0 {
            let chunk = service.take_changed_latest(PUBLISH_CHUNK.min(remaining));
            if chunk.is_empty() {
                break;
            }
            remaining = remaining.saturating_sub(chunk.len());
            for update in &chunk {
                deliveries.settle_down_to(PUBLISH_IN_FLIGHT - 1).await;
                payload.clear();
                serde_json::to_writer(&mut payload, update).expect("assessments serialize");
                self.enqueue(update.battery_id.as_bytes(), &payload, &mut deliveries)
                    .await;
            }
        }
        deliveries.settle_down_to(0).await;
        if deliveries.failed > 0 {
            let failed = deliveries.failed;
            tracing::warn!(topic = %self.topic, failed, "latest forecasts not published (the next ones replace them)");
        }
    }

    /// Hands one assessment to librdkafka now (it copies the payload, so the caller's
    /// buffer is free at once); while its queue is full, waits for a delivery first.
    async fn enqueue(&self, key: &[u8], payload: &[u8], deliveries: &mut Deliveries) {
        loop {
            let headers = OwnedHeaders::new().insert(Header {
                key: HEADER_ORIGIN,
                value: Some(self.origin.as_str()),
            });
            let record = FutureRecord::to(&self.topic)
                .key(key)
                .payload(payload)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => return deliveries.pending.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    deliveries.make_room().await
                }
                Err(_) => return deliveries.failed += 1,
            }
        }
    }
}

/// A publishing round's deliveries in flight, and how many failed.
#[derive(Default)]
struct Deliveries {
    pending: futures::stream::FuturesUnordered<rdkafka::producer::DeliveryFuture>,
    failed: usize,
}

impl Deliveries {
    /// Waits for one delivery; false when none is in flight.
    async fn settle_one(&mut self) -> bool {
        use futures::StreamExt;
        match self.pending.next().await {
            Some(delivered) => {
                // Written, or else cancelled or refused.
                self.failed += usize::from(!matches!(delivered, Ok(Ok(_))));
                true
            }
            None => false,
        }
    }

    async fn settle_down_to(&mut self, in_flight: usize) {
        while self.pending.len() > in_flight && self.settle_one().await {}
    }

    /// Lets a delivery end, or with none in flight the broker catch up.
    async fn make_room(&mut self) {
        if !self.settle_one().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
