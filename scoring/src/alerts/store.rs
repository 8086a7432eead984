//! The alert store: an append-only JSON-lines log on local disk plus an in-memory index.
//!
//! Why a log and not a database: alerts are few (a fleet of 100,000 raises tens a day),
//! every change is a whole line that is either there or not after a crash, and a person
//! can `grep` it. At start-up the log is replayed; the last line of an alert wins, and a
//! torn last line (a crash mid-write) is skipped and cut off before the log is appended
//! to, so the next alert starts a line of its own. The latest forecast per battery is kept
//! in memory only: after a restart the forecast stage re-emits it for every battery.
//!
//! Why the index holds where an alert's line is rather than the alert: alerts accumulate
//! with the fleet's age (120,000 on a 100,000-battery fleet after two years), and whole
//! in memory they were 0.7 KB a battery, more than the open day windows. The index keeps
//! what the API filters on and what the alert stage decides by (id, battery, vehicle,
//! time, status); the rest is read back from the log when asked for, a positioned read
//! of one line. Alerts known only from the topic, and a store without a log, are held
//! whole.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hashbrown::HashTable;

use super::{Alert, AlertError, AlertStatus};
use crate::forecasting::RiskUpdate;

const LOG_FILE: &str = "alerts.jsonl";

/// What the store keeps of an alert in memory.
struct IndexedAlert {
    alert_id: Box<str>,
    battery_id: Arc<str>,
    vehicle_id: Option<Arc<str>>,
    created_at: DateTime<Utc>,
    status: AlertStatus,
    body: AlertBody,
}

/// Where the rest of an alert is.
enum AlertBody {
    /// Its newest line in the log: byte offset and length (without the newline).
    Logged { at: u64, len: u32 },
    /// Known only from the topic, or the store has no log.
    Whole(Box<Alert>),
}

impl IndexedAlert {
    fn new(a: &Alert, body: AlertBody) -> Self {
        Self {
            alert_id: a.alert_id.as_str().into(),
            battery_id: a.battery_id.clone(),
            vehicle_id: a.vehicle_id.clone(),
            created_at: a.created_at,
            status: a.status,
            body,
        }
    }
}

pub struct AlertStore {
    path: Option<PathBuf>,
    log: Option<File>,
    /// The log opened for reading alerts back, and its length (where the next line goes,
    /// the unwritten lines counted).
    reader: Option<File>,
    log_len: u64,
    /// Lines put since the last write-out, which follow the file's `written_len` bytes.
    /// Why they wait in memory: a line must not reach the file before the events of its
    /// decision are durable in the event outbox, and the outbox is sealed once per batch
    /// of decisions (see `AlertService::write_out`), not once per line.
    unwritten: Vec<u8>,
    written_len: u64,
    /// Lines written since the last sync: a sync with none costs an fdatasync for
    /// nothing, and the alert stage asks for one after every batch of updates.
    unsynced: bool,
    /// Oldest first.
    alerts: Vec<IndexedAlert>,
    /// Positions in `alerts` by a hash of the alert id; the id itself is compared in
    /// `alerts` (a map keyed by a copy of every id held each id twice).
    by_id: HashTable<u32>,
    id_hasher: foldhash::fast::RandomState,
    latest: HashMap<Arc<str>, RiskUpdate, foldhash::fast::RandomState>,
    /// Batteries whose latest assessment changed since [`Self::take_changed`], when the
    /// forecasts are published for the other instances.
    changed: Option<std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>>,
    /// Alerts known only from the topic (another instance's, or this one's before a
    /// restart), not from this store's own log.
    merged: std::collections::HashSet<String, foldhash::fast::RandomState>,
}

/// `GET /api/alerts` filters.
#[derive(Debug, Default, Clone)]
pub struct AlertFilter {
    pub battery: Option<String>,
    pub vehicle: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub status: Option<AlertStatus>,
    pub limit: Option<usize>,
}

/// Cuts a log back to its last complete line: appending after a fragment would glue the
/// next alert to it, and the next replay would lose both. Returns the length kept.
fn cut_torn_line(path: &Path) -> std::io::Result<u64> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(0); // no log yet
    };
    if bytes.last().is_none_or(|b| *b == b'\n') {
        return Ok(bytes.len() as u64);
    }
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(
        path = %path.display(),
        bytes = bytes.len() - keep,
        "cutting a torn last line off the alert log"
    );
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(keep as u64)?;
    file.sync_all()?;
    Ok(keep as u64)
}

impl AlertStore {
    /// A store that keeps nothing on disk (tests, benchmarks).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            log: None,
            reader: None,
            log_len: 0,
            unwritten: Vec::new(),
            written_len: 0,
            unsynced: false,
            alerts: Vec::new(),
            by_id: HashTable::new(),
            id_hasher: Default::default(),
            latest: HashMap::default(),
            changed: None,
            merged: Default::default(),
        }
    }

    /// Opens (creating) the log in `dir` and replays it.
    pub fn open(dir: &Path) -> Result<Self, AlertError> {
        let path = dir.join(LOG_FILE);
        let err = |source| AlertError::Store {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut store = Self::in_memory();
        if path.exists() {
            let mut reader = BufReader::new(File::open(&path).map_err(err)?);
            let (mut line, mut at, mut n) = (Vec::new(), 0u64, 0usize);
            loop {
                line.clear();
                let read = reader.read_until(b'\n', &mut line).map_err(err)?;
                if read == 0 {
                    break;
                }
                n += 1;
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                match serde_json::from_slice::<Alert>(text) {
                    // A torn last line has no newline and is cut off below.
                    Ok(a) if line.ends_with(b"\n") => {
                        let len = text.len() as u32;
                        store.index(IndexedAlert::new(&a, AlertBody::Logged { at, len }));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(line = n, error = %e, path = %path.display(), "skipping an unreadable alert line")
                    }
                }
                at += read as u64;
            }
        }
        store.log_len = cut_torn_line(&path).map_err(err)?;
        store.written_len = store.log_len;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        store.log = Some(file);
        store.reader = Some(File::open(&path).map_err(err)?);
        store.path = Some(path);
        Ok(store)
    }

    fn index(&mut self, entry: IndexedAlert) {
        match self.position(&entry.alert_id) {
            Some(i) => self.alerts[i] = entry,
            None => {
                let (alerts, hasher) = (&self.alerts, &self.id_hasher);
                let hash = hasher.hash_one(&*entry.alert_id);
                self.by_id.insert_unique(hash, alerts.len() as u32, |&i| {
                    hasher.hash_one(&*alerts[i as usize].alert_id)
                });
                self.alerts.push(entry);
            }
        }
    }

    fn position(&self, alert_id: &str) -> Option<usize> {
        let hash = self.id_hasher.hash_one(alert_id);
        self.by_id
            .find(hash, |&i| &*self.alerts[i as usize].alert_id == alert_id)
            .map(|&i| i as usize)
    }

    fn io_error(&self, source: std::io::Error) -> AlertError {
        AlertError::Store {
            path: self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            source,
        }
    }

    /// The whole alert an index entry stands for: read back from the log if not held.
    fn whole<'a>(&self, entry: &'a IndexedAlert) -> Result<Cow<'a, Alert>, AlertError> {
        let (at, len) = match &entry.body {
            AlertBody::Whole(a) => return Ok(Cow::Borrowed(&**a)),
            AlertBody::Logged { at, len } => (*at, *len),
        };
        let mut read = Vec::new();
        let line = match at.checked_sub(self.written_len) {
            Some(at) => &self.unwritten[at as usize..at as usize + len as usize],
            None => {
                let reader = self.reader.as_ref().expect("a logged alert has a log");
                read.resize(len as usize, 0);
                reader
                    .read_exact_at(&mut read, at)
                    .map_err(|e| self.io_error(e))?;
                &read[..]
            }
        };
        serde_json::from_slice(line)
            .map(Cow::Owned)
            .map_err(|e| self.io_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }

    /// Takes in an alert as another instance's event describes it (the fleet-wide view):
    /// kept in memory only (the topic, read again from its start, rebuilds it), and only
    /// when it is news: a status this store already has, or has gone past, is an echo of
    /// its own decision or an event read before. Returns whether it changed anything.
    pub fn merge(&mut self, alert: &Alert) -> bool {
        let rank = |s: AlertStatus| match s {
            AlertStatus::Open => 0,
            AlertStatus::Acknowledged => 1,
            AlertStatus::Escalated | AlertStatus::Resolved => 2,
        };
        let known = self
            .position(&alert.alert_id)
            .map(|i| rank(self.alerts[i].status));
        if known.is_some_and(|r| r >= rank(alert.status)) {
            return false;
        }
        if known.is_none() {
            self.merged.insert(alert.alert_id.clone());
        }
        let whole = AlertBody::Whole(Box::new(alert.clone()));
        self.index(IndexedAlert::new(alert, whole));
        true
    }

    /// The status of an alert as this store's own log has it: the decisions this
    /// instance carried out. One known only from the topic does not count: the owner of
    /// a battery carries out its own decisions (webhook included) even if another
    /// instance, or a deployment sharing the topic, announced the same alert id.
    pub fn recorded(&self, alert_id: &str) -> Option<AlertStatus> {
        if self.merged.contains(alert_id) {
            return None;
        }
        self.position(alert_id).map(|i| self.alerts[i].status)
    }

    /// Inserts or replaces an alert. Its line reaches the log at the next
    /// [`Self::write_out`] or [`Self::sync`].
    pub fn put(&mut self, alert: &Alert) -> Result<(), AlertError> {
        self.merged.remove(&alert.alert_id);
        if self.log.is_none() {
            let whole = AlertBody::Whole(Box::new(alert.clone()));
            self.index(IndexedAlert::new(alert, whole));
            return Ok(());
        }
        let before = self.unwritten.len();
        serde_json::to_writer(&mut self.unwritten, alert).expect("alerts serialize");
        let len = (self.unwritten.len() - before) as u32;
        self.unwritten.push(b'\n');
        let at = self.log_len;
        self.log_len += u64::from(len) + 1;
        self.index(IndexedAlert::new(alert, AlertBody::Logged { at, len }));
        Ok(())
    }

    /// Writes the lines put since the last write-out to the log (a process crash keeps
    /// them; a power cut may not, until [`Self::sync`]).
    pub fn write_out(&mut self) -> Result<(), AlertError> {
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        if self.unwritten.is_empty() {
            return Ok(());
        }
        log.write_all(&self.unwritten)
            .map_err(|e| self.io_error(e))?;
        self.written_len += self.unwritten.len() as u64;
        self.unwritten.clear();
        self.unsynced = true;
        Ok(())
    }

    /// What `change` would make of an alert, without recording it (so the alert's
    /// event can be made durable first); None if there is no such alert.
    pub fn preview(
        &self,
        alert_id: &str,
        change: impl FnOnce(&mut Alert),
    ) -> Result<Option<Alert>, AlertError> {
        let Some(mut a) = self.get(alert_id)? else {
            return Ok(None);
        };
        change(&mut a);
        Ok(Some(a))
    }

    /// Changes a stored alert; returns it changed, or None if there is no such alert.
    pub fn update(
        &mut self,
        alert_id: &str,
        change: impl FnOnce(&mut Alert),
    ) -> Result<Option<Alert>, AlertError> {
        let Some(a) = self.preview(alert_id, change)? else {
            return Ok(None);
        };
        self.put(&a)?;
        Ok(Some(a))
    }

    /// Writes out what was put and forces the log to disk.
    pub fn sync(&mut self) -> Result<(), AlertError> {
        self.write_out()?;
        if !self.unsynced {
            return Ok(());
        }
        if let Some(log) = &self.log {
            log.sync_data().map_err(|e| self.io_error(e))?;
        }
        self.unsynced = false;
        Ok(())
    }

    pub fn get(&self, alert_id: &str) -> Result<Option<Alert>, AlertError> {
        let Some(i) = self.position(alert_id) else {
            return Ok(None);
        };
        Ok(Some(self.whole(&self.alerts[i])?.into_owned()))
    }

    /// How many alerts the store knows.
    pub fn len(&self) -> usize {
        self.alerts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty()
    }

    /// Every alert, oldest first.
    pub fn alerts(&self) -> impl Iterator<Item = Result<Alert, AlertError>> + '_ {
        self.alerts
            .iter()
            .map(|entry| self.whole(entry).map(Cow::into_owned))
    }

    /// Matching alerts, newest first.
    pub fn query(&self, f: &AlertFilter) -> Result<Vec<Alert>, AlertError> {
        self.alerts
            .iter()
            .rev()
            .filter(|a| f.battery.as_deref().is_none_or(|b| *a.battery_id == *b))
            .filter(|a| {
                f.vehicle
                    .as_deref()
                    .is_none_or(|v| a.vehicle_id.as_deref() == Some(v))
            })
            .filter(|a| f.since.is_none_or(|t| a.created_at >= t))
            .filter(|a| f.status.is_none_or(|s| a.status == s))
            .take(f.limit.unwrap_or(usize::MAX))
            .map(|entry| self.whole(entry).map(Cow::into_owned))
            .collect()
    }

    pub fn set_latest(&mut self, update: RiskUpdate) {
        if let Some(changed) = &mut self.changed {
            changed.insert(update.battery_id.clone());
        }
        self.latest.insert(update.battery_id.clone(), update);
    }

    pub fn set_latest_all(&mut self, updates: Vec<RiskUpdate>) {
        for update in updates {
            self.set_latest(update);
        }
    }

    /// Another instance's assessment of its battery (the fleet-wide view): taken when it
    /// is for a later day than the one held.
    pub fn merge_latest(&mut self, update: RiskUpdate) {
        let newer = self
            .latest
            .get(&update.battery_id)
            .is_none_or(|held| update.day > held.day);
        if newer {
            self.latest.insert(update.battery_id.clone(), update);
        }
    }

    /// From now on, remember which batteries' assessments change.
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(Default::default);
    }

    /// Up to `max` of the assessments changed since they were last taken.
    pub fn take_changed(&mut self, max: usize) -> Vec<RiskUpdate> {
        let Some(changed) = &mut self.changed else {
            return Vec::new();
        };
        let taken: Vec<Arc<str>> = changed.iter().take(max).cloned().collect();
        taken
            .into_iter()
            .filter_map(|b| {
                changed.remove(&b);
                self.latest.get(&b).cloned()
            })
            .collect()
    }

    /// How many batteries' assessments changed since they were last taken.
    pub fn changed_count(&self) -> usize {
        self.changed.as_ref().map_or(0, |c| c.len())
    }

    pub fn forget_latest(&mut self, battery: &str) {
        if let Some(changed) = &mut self.changed {
            changed.remove(battery);
        }
        self.latest.remove(battery);
    }

    pub fn latest(&self, battery: &str) -> Option<&RiskUpdate> {
        self.latest.get(battery)
    }

    pub fn latest_all(&self) -> impl Iterator<Item = &RiskUpdate> {
        self.latest.values()
    }
}
