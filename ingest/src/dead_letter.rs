//! The dead-letter queue: every refused record, with its original bytes and why.
//!
//! Kafka is the production destination (topic `battery-telemetry-dlq` by default, headers
//! naming reason, source topic, partition and offset). A JSONL file serves file replays
//! without a broker, and an in-memory list serves tests. Sources wait for
//! [`DeadLetterQueue::flush`] before committing offsets, so a dead letter is never lost
//! between "refused" and "recorded".

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;

use crate::error::IngestError;
use crate::reject::RejectReason;

pub const HEADER_REASON: &str = "voltcast.reason";
pub const HEADER_DETAIL: &str = "voltcast.detail";
pub const HEADER_SOURCE: &str = "voltcast.source.topic";
pub const HEADER_PARTITION: &str = "voltcast.source.partition";
pub const HEADER_OFFSET: &str = "voltcast.source.offset";

/// How long a dead letter waits for room in a full producer queue before the source stops
/// with an error (the broker is then unreachable, not merely behind).
const QUEUE_FULL_PATIENCE: Duration = Duration::from_secs(60);

/// Where a message came from: a topic partition and offset, or a file and line number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub source: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    #[serde(serialize_with = "lossy_utf8")]
    pub payload: Vec<u8>,
    #[serde(serialize_with = "reason_str")]
    pub reason: RejectReason,
    pub detail: String,
    pub origin: Origin,
}

fn lossy_utf8<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

fn reason_str<S: serde::Serializer>(r: &RejectReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

/// Where dead letters go.
pub enum DeadLetterQueue {
    Kafka {
        producer: FutureProducer,
        topic: String,
        pending: Vec<DeliveryFuture>,
    },
    File {
        path: PathBuf,
        pending: Vec<u8>,
    },
    Memory(Arc<Mutex<Vec<DeadLetter>>>),
}

impl DeadLetterQueue {
    pub fn kafka(producer: FutureProducer, topic: impl Into<String>) -> Self {
        Self::Kafka {
            producer,
            topic: topic.into(),
            pending: Vec::new(),
        }
    }

    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::File {
            path: path.into(),
            pending: Vec::new(),
        }
    }

    /// An in-memory queue and a handle to read it.
    pub fn memory() -> (Self, Arc<Mutex<Vec<DeadLetter>>>) {
        let list = Arc::new(Mutex::new(Vec::new()));
        (Self::Memory(list.clone()), list)
    }

    /// Queues one dead letter; delivery is confirmed by [`flush`](Self::flush).
    pub fn send(&mut self, dl: DeadLetter) -> Result<(), IngestError> {
        match self {
            Self::Kafka {
                producer,
                topic,
                pending,
            } => {
                let partition = dl.origin.partition.to_string();
                let offset = dl.origin.offset.to_string();
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: HEADER_REASON,
                        value: Some(dl.reason.as_str()),
                    })
                    .insert(Header {
                        key: HEADER_DETAIL,
                        value: Some(dl.detail.as_str()),
                    })
                    .insert(Header {
                        key: HEADER_SOURCE,
                        value: Some(&*dl.origin.source),
                    })
                    .insert(Header {
                        key: HEADER_PARTITION,
                        value: Some(partition.as_str()),
                    })
                    .insert(Header {
                        key: HEADER_OFFSET,
                        value: Some(offset.as_str()),
                    });
                let mut record = FutureRecord::<(), _>::to(topic)
                    .payload(&dl.payload)
                    .headers(headers);
                // A full local queue is back-pressure, not a failure: the producer's own
                // thread is delivering, so wait for room (bounded) and try again.
                let deadline = std::time::Instant::now() + QUEUE_FULL_PATIENCE;
                let fut = loop {
                    match producer.send_result(record) {
                        Ok(fut) => break fut,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                            if std::time::Instant::now() < deadline =>
                        {
                            record = back;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err((e, _)) => {
                            return Err(IngestError::DeadLetter {
                                destination: topic.clone(),
                                message: e.to_string(),
                            });
                        }
                    }
                };
                pending.push(fut);
            }
            Self::File { pending, .. } => {
                serde_json::to_writer(&mut *pending, &dl).expect("dead letters serialize");
                pending.push(b'\n');
            }
            Self::Memory(list) => list.lock().expect("dead-letter list poisoned").push(dl),
        }
        Ok(())
    }

    /// Waits until every queued dead letter is durably recorded.
    pub async fn flush(&mut self) -> Result<(), IngestError> {
        match self {
            Self::Kafka { topic, pending, .. } => {
                for fut in pending.drain(..) {
                    let outcome = tokio::time::timeout(Duration::from_secs(60), fut).await;
                    let failure = match outcome {
                        Ok(Ok(Ok(_))) => continue,
                        Ok(Ok(Err((e, _)))) => e.to_string(),
                        Ok(Err(_)) => "producer dropped the message".to_string(),
                        Err(_) => "no delivery report within 60 s".to_string(),
                    };
                    return Err(IngestError::DeadLetter {
                        destination: topic.clone(),
                        message: failure,
                    });
                }
            }
            Self::File { path, pending } => {
                if !pending.is_empty() {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&*path)
                        .and_then(|mut f| f.write_all(pending))
                        .map_err(|e| IngestError::DeadLetter {
                            destination: path.display().to_string(),
                            message: e.to_string(),
                        })?;
                    pending.clear();
                }
            }
            Self::Memory(_) => {}
        }
        Ok(())
    }
}
