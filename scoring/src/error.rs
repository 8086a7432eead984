use thiserror::Error;

#[derive(Debug, Error)]
pub enum ScoringError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Ingest(#[from] voltcast_ingest::IngestError),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    #[error("day windows: {0}")]
    Windows(#[from] crate::windows::WindowError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Alerts(#[from] crate::alerts::AlertError),
    #[error("starting the stage thread: {0}")]
    StageThread(std::io::Error),
    #[error("api.listen {addr}: {source}")]
    Api {
        addr: String,
        source: std::io::Error,
    },
}
