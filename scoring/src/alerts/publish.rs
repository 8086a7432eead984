//! Alert events to Kafka: the `battery-alerts` topic, keyed by battery so one battery's
//! events stay in order on one partition. The producer is idempotent with `acks=all`
//! (the same settings as the dead-letter producer), so a broker retry does not duplicate
//! an event; consumers dedupe by `alert_id` across voltcast restarts.

use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::AlertEvent;
use crate::metrics::Metrics;

pub struct AlertPublisher {
    pub producer: FutureProducer,
    pub topic: String,
}

impl AlertPublisher {
    /// Publishes events until the channel closes; a failure is logged and counted (the
    /// event is in the alert store either way).
    pub async fn run(
        self,
        mut events: mpsc::UnboundedReceiver<AlertEvent>,
        metrics: std::sync::Arc<Metrics>,
    ) {
        while let Some(e) = events.recv().await {
            let payload = serde_json::to_vec(&e).expect("alert events serialize");
            let record = FutureRecord::to(&self.topic)
                .key(e.alert.battery_id.as_bytes())
                .payload(&payload);
            let outcome = match self
                .producer
                .send(record, std::time::Duration::from_secs(30))
                .await
            {
                Ok(_) => "published",
                Err((err, _)) => {
                    tracing::error!(topic = %self.topic, alert_id = %e.alert.alert_id, error = %err, "alert event not published");
                    "failed"
                }
            };
            metrics
                .alert_events_published
                .with_label_values(&[outcome])
                .inc();
        }
    }
}
