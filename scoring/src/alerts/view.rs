//! The fleet-wide alert view: every instance reads the whole `battery-alerts` topic (all
//! partitions, from the start, as no group's member: like a Kafka Streams global table)
//! into its alert store, so the API of any instance lists the alerts every instance
//! raised. The topic is the shared log; no database.
//!
//! What it reads is kept in memory only: a restart reads the topic again from its start.
//! Events this instance published come back as echoes and change nothing (see
//! [`AlertStore::merge`](super::AlertStore::merge)).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::publish::HEADER_ORIGIN;
use super::{AlertError, AlertEvent, AlertService};
use crate::forecasting::RiskUpdate;
use voltcast_ingest::KafkaConfig;

pub struct AlertTopicReader {
    consumer: StreamConsumer,
    topic: String,
    forecasts_topic: String,
    /// This instance's [`HEADER_ORIGIN`]: its own assessments are skipped unread.
    origin: String,
}

impl AlertTopicReader {
    /// Assigns every partition of the alerts `topic`, and of `forecasts_topic` (each
    /// battery's latest assessment) when it exists, from their beginnings.
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        forecasts_topic: &str,
        origin: String,
    ) -> Result<Self, AlertError> {
        let consumer: StreamConsumer = kafka
            .consumer_config()
            .map_err(|e| AlertError::View(e.to_string()))?
            // Never joins a group or commits (assign only), so the id only has to be
            // its own.
            .set(
                "group.id",
                format!("{}-alert-view-{}", kafka.group_id, std::process::id()),
            )
            // Alerts and assessments are a trickle next to telemetry: the source's
            // 64 MB prefetch would only hold memory here.
            .set("queued.max.messages.kbytes", "16384")
            .create()
            .map_err(AlertError::Kafka)?;
        let mut list = TopicPartitionList::new();
        for (t, required) in [(topic, true), (forecasts_topic, false)] {
            let partitions = partitions_of(&consumer, t)?;
            if partitions == 0 {
                if required {
                    return Err(AlertError::View(format!("topic {t} has no partitions")));
                }
                tracing::warn!(
                    topic = t,
                    "no such topic: the API shows only this instance's batteries' forecasts"
                );
            }
            for p in 0..partitions as i32 {
                list.add_partition_offset(t, p, Offset::Beginning)
                    .map_err(AlertError::Kafka)?;
            }
        }
        consumer.assign(&list).map_err(AlertError::Kafka)?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            forecasts_topic: forecasts_topic.to_string(),
            origin,
        })
    }

    /// Merges events and assessments into `service`'s store until `stop` turns true.
    pub async fn run(self, service: Arc<AlertService>, mut stop: watch::Receiver<bool>) {
        loop {
            let msg = tokio::select! {
                msg = self.consumer.recv() => msg,
                _ = stop.changed() => return,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "reading alert events; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let payload = msg.payload().unwrap_or_default();
            if msg.topic() == self.forecasts_topic {
                if self.is_own(&msg) {
                    continue;
                }
                match serde_json::from_slice::<RiskUpdate>(payload) {
                    Ok(update) => service.merge_latest(update),
                    Err(e) => {
                        tracing::warn!(topic = %self.forecasts_topic, error = %e, "not an assessment: skipped")
                    }
                }
                continue;
            }
            match serde_json::from_slice::<AlertEvent>(payload) {
                Ok(event) => service.merge_event(&event),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "an alert event that is not one: skipped")
                }
            }
        }
    }
}

impl AlertTopicReader {
    fn is_own(&self, msg: &rdkafka::message::BorrowedMessage<'_>) -> bool {
        use rdkafka::message::Headers;
        msg.headers()
            .and_then(|h| h.iter().find(|h| h.key == HEADER_ORIGIN))
            .is_some_and(|h| h.value == Some(self.origin.as_bytes()))
    }
}

/// Partitions of `topic` (0 when the broker does not know it).
fn partitions_of(consumer: &StreamConsumer, topic: &str) -> Result<usize, AlertError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(AlertError::Kafka)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len()))
}
