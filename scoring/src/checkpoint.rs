//! Checkpoints: one object per Kafka partition per checkpoint, in object storage.
//!
//! A partition's whole state (open day windows and watermark, histories, models, alert
//! episodes) and the offset it covers are one object, so they can never disagree. The
//! objects of a partition are numbered: `{prefix}/{topic}/{partition}/{seq}`, and every
//! write is create-only (`PutMode::Create`, supported by every backend, the local
//! folder included). That number is the fencing token:
//!
//! - a new owner reads the latest checkpoint and *claims* the next number with a small
//!   claim object before it processes anything;
//! - an instance that lost the partition without noticing (a zombie) then fails to
//!   create its next object, and drops the partition instead of overwriting its
//!   successor's state.
//!
//! Older objects are pruned after each write; the latest two checkpoints are kept, so a
//! torn upload of the newest (an object store never shows one, but a disk may fill) still
//! leaves one to resume from.
//!
//! Why postcard: compact binary serde; JSON of 100,000 histories would be several times
//! larger and slower.
//!
//! The object store API is async; the rebalance callbacks that load and save are not
//! (they run inside the consumer's poll, on the runtime's thread). So every call runs on
//! a small runtime of the store's own, from a scoped thread: never waiting on a task of
//! the runtime the caller may be on.

use std::path::PathBuf;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Identifies the format; bumped whenever the state's layout changes (02: model records
/// count days since their last backtest; 03: the archive files a checkpoint commits; 04:
/// the watermark's battery quorum; 05: fractional trips, evicted fleet slots; 06: the
/// service booking of an open alert episode; 07: history days in 5 bytes, half floats;
/// 08: `trend_seasonal` models log cycles with level steps; 09: `trend_seasonal` models
/// log minutes times cycles per minute).
const MAGIC: &[u8; 8] = b"VCPART09";
const STATE: u8 = b'S';
const CLAIM: u8 = b'C';
/// A claim object: the magic and its kind, nothing else.
const CLAIM_LEN: u64 = MAGIC.len() as u64 + 1;
/// The single-file checkpoint of earlier releases.
pub const LEGACY_FILE: &str = "windows.ckpt";

/// `[checkpoint]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Where checkpoints go: a local folder, or an object store URL (`s3://bucket/prefix`,
    /// `az://container/prefix`, `gs://bucket/prefix`) with credentials from the
    /// environment as each backend documents. `enabled = false` runs without any.
    pub path: PathBuf,
    pub enabled: bool,
    /// At most one checkpoint per partition per this many seconds. Kafka offsets are
    /// committed after a checkpoint, so this is also how far a restart may re-read.
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
    #[error("checkpoint store {location}: {reason}")]
    Open { location: String, reason: String },
    #[error("checkpoint {path}: {source}")]
    Store {
        path: String,
        source: object_store::Error,
    },
    #[error(
        "checkpoint {path} is not readable ({reason}); move it away to rebuild the partition from the topic"
    )]
    Corrupt { path: String, reason: String },
    /// Another instance wrote this partition's next checkpoint: it owns the partition now.
    #[error("checkpoint {path} already exists: another instance owns the partition now")]
    Fenced { path: String },
    #[error(
        "{path} is a checkpoint of an earlier release (one file for the whole process); \
         state is now kept per Kafka partition and cannot be split from it. Move it away \
         and reset the consumer group to the earliest offsets to rebuild the state from \
         the topic (kafka-consumer-groups --reset-offsets --to-earliest --execute)"
    )]
    Legacy { path: String },
    /// Committing or recovering the archive files a checkpoint lists.
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
}

/// A partition as the store names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What loading a partition found.
#[derive(Debug)]
pub struct Loaded<T> {
    /// The latest checkpoint's state, if there is one.
    pub state: Option<T>,
    /// The number this owner writes its next checkpoint under (claimed).
    pub next_seq: u64,
}

/// The objects of one partition, by number: (seq, size).
type Listing = Vec<(u64, u64)>;

/// An object's bytes so far: the magic and its kind.
fn header(kind: u8) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.push(kind);
    bytes
}

fn store_error(path: &Path) -> impl FnOnce(object_store::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Store {
        path: path.to_string(),
        source,
    }
}

pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    location: String,
    /// Taken only on drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for CheckpointStore {
    /// Every call has completed by now; a runtime may not block on its own shutdown
    /// where the store is dropped (often inside the async pipeline).
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("location", &self.location)
            .finish()
    }
}

impl CheckpointStore {
    /// A local folder (created if missing), or an `s3://`, `az://`, `abfs://`, `gs://`
    /// or `memory://` URL.
    pub fn open(location: &std::path::Path) -> Result<Self, CheckpointError> {
        let text = location.to_string_lossy().to_string();
        let fail = |reason: String| CheckpointError::Open {
            location: text.clone(),
            reason,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = if text.contains("://") {
            let url = url::Url::parse(&text).map_err(|e| fail(e.to_string()))?;
            let (store, prefix) = from_url(&url).map_err(|e| fail(e.to_string()))?;
            (store, prefix)
        } else {
            let legacy = location.join(LEGACY_FILE);
            if legacy.exists() {
                return Err(CheckpointError::Legacy {
                    path: legacy.display().to_string(),
                });
            }
            std::fs::create_dir_all(location).map_err(|e| fail(e.to_string()))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(location)
                .map_err(|e| fail(e.to_string()))?;
            (Arc::new(local), Path::default())
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("voltcast-checkpoints")
            .enable_all()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            store,
            prefix,
            location: text,
            runtime: Some(runtime),
        })
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Runs `f` to completion on the store's runtime, from a thread of its own: callable
    /// from anywhere, a runtime's thread included.
    fn block<T: Send, F: std::future::Future<Output = T>>(
        &self,
        f: impl FnOnce() -> F + Send,
    ) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = self.runtime.as_ref().expect("only taken on drop");
                    runtime.block_on(f())
                })
                .join()
                .expect("checkpoint I/O thread panicked")
        })
    }

    fn dir(&self, key: &PartitionKey) -> Path {
        self.prefix
            .clone()
            .join(key.topic.as_ref())
            .join(key.partition.to_string())
    }

    fn object(&self, key: &PartitionKey, seq: u64) -> Path {
        self.dir(key).join(format!("{seq:020}"))
    }

    async fn list(&self, key: &PartitionKey) -> Result<Listing, CheckpointError> {
        let dir = self.dir(key);
        let metas: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(store_error(&dir))?;
        let mut objects: Listing = metas
            .iter()
            .filter_map(|m| Some((m.location.filename()?.parse().ok()?, m.size)))
            .collect();
        objects.sort_unstable();
        Ok(objects)
    }

    /// Reads `key`'s latest checkpoint and claims the next number for this owner.
    /// Retries when another writer gets in between (a zombie owner finishing a write).
    pub fn load<T: serde::de::DeserializeOwned + Send>(
        &self,
        key: &PartitionKey,
    ) -> Result<Loaded<T>, CheckpointError> {
        self.block(|| async {
            let mut attempts = 0;
            loop {
                let objects = self.list(key).await?;
                let latest = objects.last().map_or(0, |(seq, _)| *seq);
                let state = match objects.iter().rev().find(|(_, size)| *size > CLAIM_LEN) {
                    Some((seq, _)) => Some(self.read(key, *seq).await?),
                    None => None,
                };
                let claim = latest + 1;
                match self.create(key, claim, header(CLAIM)).await {
                    Ok(()) => {
                        return Ok(Loaded {
                            state,
                            next_seq: claim + 1,
                        });
                    }
                    Err(CheckpointError::Fenced { .. }) if attempts < 5 => attempts += 1,
                    Err(e) => return Err(e),
                }
            }
        })
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        key: &PartitionKey,
        seq: u64,
    ) -> Result<T, CheckpointError> {
        let path = self.object(key, seq);
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(store_error(&path))?
            .bytes()
            .await
            .map_err(store_error(&path))?;
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: format!("{}/{path}", self.location),
            reason,
        };
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .and_then(|b| b.strip_prefix(&[STATE]))
            .ok_or_else(|| corrupt("not a voltcast partition checkpoint of this version".into()))?;
        postcard::from_bytes(body).map_err(|e| corrupt(e.to_string()))
    }

    /// Creates object `seq` of `key` from `bytes` (a [`header`] and what follows it).
    async fn create(
        &self,
        key: &PartitionKey,
        seq: u64,
        bytes: Vec<u8>,
    ) -> Result<(), CheckpointError> {
        let path = self.object(key, seq);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(CheckpointError::Fenced {
                path: format!("{}/{path}", self.location),
            }),
            Err(source) => Err(store_error(&path)(source)),
        }
    }

    /// Writes `state` as checkpoint `seq` of `key` (create-only), then prunes what is
    /// older than the checkpoint before it. Returns the bytes written.
    pub fn save<T: Serialize + Sync>(
        &self,
        key: &PartitionKey,
        seq: u64,
        state: &T,
    ) -> Result<u64, CheckpointError> {
        // Serialized straight after the header: a copy of a partition's state to prefix
        // it would briefly double what a large checkpoint holds in memory.
        let bytes =
            postcard::to_extend(state, header(STATE)).map_err(|e| CheckpointError::Corrupt {
                path: self.object(key, seq).to_string(),
                reason: e.to_string(),
            })?;
        let written = bytes.len() as u64;
        self.block(|| async {
            self.create(key, seq, bytes).await?;
            if let Err(e) = self.prune(key, seq).await {
                tracing::warn!(partition = %key, error = %e, "pruning old checkpoints");
            }
            Ok::<_, CheckpointError>(())
        })?;
        Ok(written)
    }

    /// Deletes every object of `key` older than the last checkpoint before `seq`.
    async fn prune(&self, key: &PartitionKey, seq: u64) -> Result<(), CheckpointError> {
        let objects = self.list(key).await?;
        let keep_from = objects
            .iter()
            .rev()
            .filter(|(s, size)| *s < seq && *size > CLAIM_LEN)
            .map(|(s, _)| *s)
            .next();
        let Some(keep_from) = keep_from else {
            return Ok(());
        };
        for (s, _) in objects.iter().filter(|(s, _)| *s < keep_from) {
            let path = self.object(key, *s);
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(store_error(&path)(source)),
            }
        }
        Ok(())
    }

    /// The numbers of `key`'s objects, oldest first (for tests and tools).
    pub fn sequence_numbers(&self, key: &PartitionKey) -> Result<Vec<u64>, CheckpointError> {
        Ok(self
            .block(|| self.list(key))?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }
}

/// An object store from a URL, with credentials from the environment.
fn from_url(url: &url::Url) -> Result<(Arc<dyn ObjectStore>, Path), object_store::Error> {
    use object_store::ObjectStoreScheme;
    let (scheme, path) = ObjectStoreScheme::parse(url)?;
    let prefix = Path::parse(path)?;
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .build()?,
        ),
        ObjectStoreScheme::MicrosoftAzure => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()?,
        ),
        ObjectStoreScheme::GoogleCloudStorage => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()?,
        ),
        ObjectStoreScheme::Memory => Arc::new(object_store::memory::InMemory::new()),
        ObjectStoreScheme::Local => Arc::new(object_store::local::LocalFileSystem::new()),
        other => {
            return Err(object_store::Error::NotSupported {
                source: format!("{other:?} is not a checkpoint store").into(),
            });
        }
    };
    Ok((store, prefix))
}
