use thiserror::Error;

/// Errors that stop a source. Bad records are never errors: they are dead letters.
#[derive(Debug, Error)]
pub enum IngestError {
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("could not record a dead letter in {destination}: {message}")]
    DeadLetter {
        destination: String,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    CsvHeader {
        path: String,
        source: crate::decode::CsvHeaderError,
    },
    #[error("the next stage refused a batch: {0}")]
    Sink(Box<dyn std::error::Error + Send + Sync>),
    #[error("Event Hubs connection string: {0}")]
    EventHubs(String),
    #[error("{0}")]
    Config(String),
    #[error("publishing to {topic}: {message}")]
    Publish { topic: String, message: String },
}

impl IngestError {
    pub fn kafka(context: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        let context = context.into();
        move |source| Self::Kafka { context, source }
    }
}
