//! Checkpoints: the window stage's whole state and the source positions it covers, saved
//! together in one atomic step.
//!
//! Why files and not an embedded database: the state is read once (at start-up) and
//! replaced whole, never queried, so a key-value store would only add a second copy of
//! the data and its compaction. A file written to a temporary name, fsynced, renamed over
//! the old one and followed by an fsync of the directory is atomic on every POSIX file
//! system: after a crash the checkpoint is either the old one or the new one, never a mix.
//! The positions travel inside the same file as the state, so they cannot disagree.
//!
//! The encoding is postcard (compact binary serde): JSON of 100,000 battery histories
//! would be several times larger and slower to write.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use voltcast_ingest::SourcePosition;

use crate::windows::WindowState;

/// Identifies the file format; bumped whenever the state's layout changes.
const MAGIC: &[u8; 8] = b"VCKPT003";
const FILE_NAME: &str = "windows.ckpt";

/// `[checkpoint]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory of the checkpoint file; `enabled = false` runs without one.
    pub path: PathBuf,
    pub enabled: bool,
    /// At most one checkpoint per this many seconds. Kafka offsets are committed only when
    /// a checkpoint is written, so this is also how far a restart may have to re-read.
    pub interval_seconds: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/checkpoint"),
            enabled: true,
            interval_seconds: 10,
        }
    }
}

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not readable ({reason}); move it away to start from nothing")]
    Corrupt { path: PathBuf, reason: String },
}

/// What a checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub windows: WindowState,
    /// For each source partition, the first offset the state does not cover yet.
    pub positions: Vec<SourcePosition>,
}

/// The same, borrowed: saving must not clone the whole state.
#[derive(Serialize)]
struct CheckpointRef<'a> {
    windows: &'a WindowState,
    positions: &'a [SourcePosition],
}

/// A directory holding the latest checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

impl CheckpointStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The latest checkpoint, or None when there is none yet.
    pub fn load(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = self.file();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: path.clone(),
            reason,
        };
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| corrupt("not a voltcast checkpoint of this version".into()))?;
        postcard::from_bytes(body)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Replaces the checkpoint atomically.
    pub fn save(
        &self,
        windows: &WindowState,
        positions: &[SourcePosition],
    ) -> Result<u64, CheckpointError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC).map_err(io(&tmp))?;
        let value = CheckpointRef { windows, positions };
        let mut out = postcard::to_io(&value, out).map_err(|e| CheckpointError::Corrupt {
            path: tmp.clone(),
            reason: e.to_string(),
        })?;
        out.flush().map_err(io(&tmp))?;
        let file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        let bytes = file.metadata().map_err(io(&tmp))?.len();
        let target = self.file();
        fs::rename(&tmp, &target).map_err(io(&target))?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        crate::memory::release_free_pages();
        Ok(bytes)
    }
}
