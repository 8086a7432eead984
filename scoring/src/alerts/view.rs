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

use super::{AlertError, AlertEvent, AlertService};
use voltcast_ingest::KafkaConfig;

pub struct AlertTopicReader {
    consumer: StreamConsumer,
    topic: String,
}

impl AlertTopicReader {
    /// Assigns every partition of `topic` from its beginning.
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Self, AlertError> {
        let consumer: StreamConsumer = kafka
            .consumer_config()
            .map_err(|e| AlertError::View(e.to_string()))?
            // Never joins a group or commits (assign only), so the id only has to be
            // its own.
            .set(
                "group.id",
                format!("{}-alert-view-{}", kafka.group_id, std::process::id()),
            )
            .create()
            .map_err(AlertError::Kafka)?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(AlertError::Kafka)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(AlertError::View(format!("topic {topic} has no partitions")));
        }
        let mut list = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(AlertError::Kafka)?;
        }
        consumer.assign(&list).map_err(AlertError::Kafka)?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
        })
    }

    /// Merges events into `service`'s store until `stop` turns true.
    pub async fn run(self, service: Arc<AlertService>, mut stop: watch::Receiver<bool>) {
        loop {
            let msg = tokio::select! {
                msg = self.consumer.recv() => msg,
                _ = stop.changed() => return,
            };
            let event = match msg {
                Ok(m) => serde_json::from_slice::<AlertEvent>(m.payload().unwrap_or_default()),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "reading alert events; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            match event {
                Ok(event) => service.merge_event(&event),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "an alert event that is not one: skipped")
                }
            }
        }
    }
}
