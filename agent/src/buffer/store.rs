//! The redb file: tables, the group commit, the dedup horizon and the quota.
//!
//! Tables:
//!
//! | table     | key       | value                              | purpose |
//! |-----------|-----------|------------------------------------|---------|
//! | `records` | `seq`     | entry bytes (see [`super::entry`]) | what is waiting for Kafka, in `seq` order |
//! | `recent`  | `seq`     | `(natural_hash, payload_hash)`     | the dedup horizon, oldest first (no `high_water` markers) |
//! | `meta`    | name      | bytes                              | `format`, `next_seq`, `count`, `bytes`, `node_id`, `created_ms` |
//!
//! One [`Store::apply`] is one write transaction with durable commit: deletions of delivered
//! entries, then appends in arrival order, then the counters. Nothing in it is visible or
//! acknowledged until the commit returns.
//!
//! The dedup index lives in memory (a hash map keyed by the pair `(natural_hash,
//! payload_hash)`, the 64-bit hashes of the natural key `(device_id, timestamp)` and of the
//! payload bytes) and is rebuilt from `recent` on open. A message counts as a redelivery when
//! that pair is in the horizon (a false match would need two independent 64-bit hashes to
//! collide at once). Keying on the whole reading, not on the natural key alone, means that a
//! repeat is recognised whatever came in between: A, then B with the same natural key and
//! another payload, then A again stores A once and B once. The horizon holds the last
//! `dedup_horizon` stored entries, so the index stays bounded even when one natural key comes
//! with many payloads. After any failed transaction the in-memory state may be ahead of the
//! file, so the store refuses work until [`Store::reopen`] reloads it from disk.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use edgeflow_contract::{DeadLetter, MarkerKind, RawRecord};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::entry::{self, Kind};

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const RECENT: TableDefinition<u64, (u64, u64)> = TableDefinition::new("recent");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// On-disk format version; bumped on any incompatible layout change.
const FORMAT: u64 = 1;

/// Bytes charged against the quota for an entry: its bytes plus its 8-byte key.
fn cost(entry_len: usize) -> u64 {
    entry_len as u64 + 8
}

/// What to do when an append does not fit in the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Defer the append (and everything after it): the MQTT message stays unacknowledged, so the
    /// broker holds it and, once its in-flight window is full, stops sending.
    Block,
    /// Delete the oldest entries to make room, counting them as dropped.
    DropOldest,
}

/// Tuning of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Quota on the bytes of buffered entries.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// How many recent records are remembered for redelivery detection.
    pub dedup_horizon: u64,
    /// redb's page cache.
    pub cache_bytes: usize,
}

/// A message to append.
#[derive(Debug, Clone)]
pub enum Append {
    /// A valid reading, already encoded up to `"seq":`.
    Record { natural_hash: u64, payload_hash: u64, device_id: Vec<u8>, json_head: Vec<u8>, received_ms: i64 },
    /// A refused payload.
    DeadLetter {
        natural_hash: u64,
        payload_hash: u64,
        /// Only an MQTT redelivery (DUP flag) is checked against the horizon: two identical
        /// refused payloads sent on purpose are two dead letters.
        check_duplicate: bool,
        draft: DeadLetterDraft,
        received_ms: i64,
    },
    /// A `high_water` marker ([`MarkerKind::HighWater`]): a dead letter for `raw-data-dlq` that
    /// takes the next `seq` of its commit, so every `seq` below it was assigned before it. Its
    /// detail ("complete through seq N") is written once the `seq` is known. It counts against
    /// the quota and may be dropped under `drop_oldest` like any entry, but it never enters the
    /// dedup horizon: nothing redelivers a marker, so it is never taken for a repeat and never
    /// pushes a reading out of the horizon. (A retried commit that had in fact reached the disk
    /// stores it twice: two true markers.)
    HighWater {
        /// When it was written (its `received_at_ms`).
        received_ms: i64,
    },
}

/// The `source` of the agent's own markers.
pub const MARKER_SOURCE: &str = "edgeflow-agent";

/// A dead letter before its `seq` is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterDraft {
    pub reason: String,
    pub detail: String,
    pub source: String,
    pub payload: Vec<u8>,
    pub payload_size: u64,
    pub truncated: bool,
}

/// What happened to one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed under this `seq`.
    Stored { seq: u64 },
    /// A redelivery of a record committed earlier under `seq`; nothing stored.
    Duplicate { seq: u64 },
    /// Not applied: the quota is full under [`WhenFull::Block`]. Retry later, in order.
    Deferred,
}

/// The result of one [`Store::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// One per append, in order.
    pub outcomes: Vec<Outcome>,
    /// Delivered entries deleted.
    pub deleted: u64,
    /// Oldest entries deleted to make room under [`WhenFull::DropOldest`].
    pub dropped: u64,
    /// The entries stored, `(seq, entry bytes)`, so the forwarder can take them without
    /// reading them back.
    pub stored: Vec<(u64, Vec<u8>)>,
}

/// Counters describing the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub count: u64,
    pub bytes: u64,
    pub next_seq: u64,
    pub first_seq: Option<u64>,
    pub oldest_received_ms: Option<i64>,
    pub dedup_entries: u64,
}

/// What opening found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// A new buffer was created; its first `seq` is the `buffer_created` marker.
    pub created: Option<u64>,
    /// The buffer was written by a different `node_id` (a renamed node).
    pub previous_node_id: Option<String>,
}

/// Buffer failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file cannot be opened: permissions, locked by another process, or not a redb file.
    #[error("cannot open buffer {}: {source}", path.display())]
    Open { path: PathBuf, source: redb::DatabaseError },
    /// The file is a redb database but not an edgeflow buffer, or of an unknown format version.
    #[error("{} is not an edgeflow buffer: {reason}", path.display())]
    Foreign { path: PathBuf, reason: String },
    /// A transaction failed (disk full, I/O error). The store must be reopened; nothing of the
    /// failed transaction is acknowledged.
    #[error("buffer transaction failed: {0}")]
    Transaction(#[source] redb::Error),
    /// A stored entry or counter is damaged.
    #[error("buffer is damaged: {0}")]
    Damaged(String),
    /// An earlier failure left the store needing [`Store::reopen`].
    #[error("buffer must be reopened after an earlier failure")]
    NeedsReopen,
}

impl StoreError {
    /// Whether waiting and reopening may help (I/O trouble) rather than operator action.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transaction(_) | Self::NeedsReopen | Self::Open { .. })
    }
}

fn txn_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Transaction(e.into())
}

/// `HashMap` hasher for keys that are already hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Keys are pairs of independent hashes: mixing keeps every bit of both.
        self.0 = self.0.rotate_left(29) ^ n;
    }
}

/// `(natural_hash, payload_hash)` -> `seq`, mirrors `recent`.
type DedupMap = HashMap<(u64, u64), u64, BuildHasherDefault<PassThrough>>;

/// The buffer file. Single-threaded: owned by the buffer thread.
pub struct Store {
    path: PathBuf,
    node_id: String,
    opts: StoreOptions,
    db: Option<Database>,
    stats: Stats,
    /// The dedup horizon in memory (see the module doc).
    dedup: DedupMap,
    /// After the filesystem ran out of space: room (bytes) to keep free inside the file for
    /// deletions, which appends may not use (see [`Store::set_disk_guard`]).
    disk_guard: Option<u64>,
    /// This run's epoch (see [`new_epoch`]), written into every entry it commits.
    epoch: String,
    /// The first `seq` this run assigned (`next_seq` when it opened the buffer): entries below
    /// it were committed by an earlier run, which may have sent them.
    run_first_seq: Option<u64>,
}

/// A fresh epoch: 16 lowercase hex digits from the OS's random source. Each run of the agent
/// (each time it opens its buffer) draws one, so a restored or copied buffer file, or a second
/// agent with the same `node_id`, never produces an identity `(node_id, epoch, seq)` another
/// run used, whatever `seq` it continues from.
pub fn new_epoch() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness (never seen on Linux): time and pid still make a collision unlikely.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        bytes = (xxhash_rust::xxh3::xxh3_64(&nanos.to_le_bytes()) ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the buffer at `path`. A new buffer starts its `seq` at the current time
    /// in microseconds, so that a node whose buffer was lost never reuses a `seq` downstream has
    /// seen, and writes a `buffer_created` marker under that first `seq`.
    pub fn open(path: &Path, node_id: &str, opts: StoreOptions, now_ms: i64) -> Result<(Self, Opened), StoreError> {
        let mut store = Store {
            path: path.to_owned(),
            node_id: node_id.to_owned(),
            opts,
            db: None,
            stats: Stats::default(),
            dedup: DedupMap::default(),
            disk_guard: None,
            epoch: new_epoch(),
            run_first_seq: None,
        };
        let opened = contained(|| store.open_db(now_ms))?;
        Ok((store, opened))
    }

    fn open_db(&mut self, now_ms: i64) -> Result<Opened, StoreError> {
        self.db = None;
        let existed = self.path.exists();
        let open = || -> Result<Database, redb::DatabaseError> {
            let file =
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.path)?;
            let backend = super::backend::AllocatingBackend::new(file)?;
            Database::builder().set_cache_size(self.opts.cache_bytes).create_with_backend(backend)
        };
        let mut db = open().map_err(|source| StoreError::Open { path: self.path.clone(), source })?;
        if existed {
            // Refuse a damaged file at start rather than fail on it mid-stream.
            check_integrity(&mut db)?;
        }
        let mut opened = Opened { created: None, previous_node_id: None };
        let txn = db.begin_write().map_err(txn_err)?;
        {
            let mut meta = txn.open_table(META).map_err(txn_err)?;
            let records = txn.open_table(RECORDS).map_err(txn_err)?;
            txn.open_table(RECENT).map_err(txn_err)?;
            let format = meta.get("format").map_err(txn_err)?.map(|g| read_u64(g.value()));
            match format {
                Some(Ok(FORMAT)) => {}
                Some(Ok(other)) => {
                    return Err(StoreError::Foreign {
                        path: self.path.clone(),
                        reason: format!("format version {other}, this agent reads {FORMAT}"),
                    });
                }
                Some(Err(e)) => return Err(StoreError::Foreign { path: self.path.clone(), reason: e }),
                None if !records.is_empty().map_err(txn_err)? => {
                    return Err(StoreError::Foreign { path: self.path.clone(), reason: "no format marker".into() });
                }
                None => {
                    let first = u64::try_from(now_ms).unwrap_or(1).saturating_mul(1000).max(1);
                    opened.created = Some(first);
                    meta.insert("format", FORMAT.to_le_bytes().as_slice()).map_err(txn_err)?;
                    meta.insert("next_seq", first.to_le_bytes().as_slice()).map_err(txn_err)?;
                    meta.insert("count", 0u64.to_le_bytes().as_slice()).map_err(txn_err)?;
                    meta.insert("bytes", 0u64.to_le_bytes().as_slice()).map_err(txn_err)?;
                    meta.insert("created_ms", now_ms.to_le_bytes().as_slice()).map_err(txn_err)?;
                }
            }
            let previous =
                meta.get("node_id").map_err(txn_err)?.map(|g| String::from_utf8_lossy(g.value()).into_owned());
            if previous.as_deref() != Some(self.node_id.as_str()) {
                if previous.is_some() {
                    opened.previous_node_id = previous;
                }
                meta.insert("node_id", self.node_id.as_bytes()).map_err(txn_err)?;
            }
        }
        txn.commit().map_err(txn_err)?;
        self.db = Some(db);
        self.load()?;
        // Reopening after a failed commit continues the same run.
        self.run_first_seq.get_or_insert(self.stats.next_seq);
        if let Some(first) = opened.created {
            let marker = DeadLetterDraft {
                reason: MarkerKind::BufferCreated.as_str().into(),
                detail: format!("new buffer for node {}; seq starts at {first}", self.node_id),
                source: MARKER_SOURCE.into(),
                payload: Vec::new(),
                payload_size: 0,
                truncated: false,
            };
            let append = Append::DeadLetter {
                // Its own domain, so no reading can ever be mistaken for a redelivery of it.
                natural_hash: xxhash_rust::xxh3::xxh3_64(b"\xffmarker\0buffer_created"),
                payload_hash: 0,
                check_duplicate: false,
                draft: marker,
                received_ms: now_ms,
            };
            self.apply(&[], std::slice::from_ref(&append))?;
        }
        Ok(opened)
    }

    /// Opens an existing buffer without changing it (for `edgeflow-agent buffer …`). Fails if
    /// the file is missing, foreign, or in use by a running agent.
    pub fn open_existing(path: &Path, opts: StoreOptions) -> Result<Self, StoreError> {
        contained(|| Self::open_existing_inner(path, opts))
    }

    fn open_existing_inner(path: &Path, opts: StoreOptions) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Foreign { path: path.to_owned(), reason: "no such file".into() });
        }
        let mut db = Database::builder()
            .set_cache_size(opts.cache_bytes)
            .open(path)
            .map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        // redb trusts its pages when reading; a damaged page can make a read panic. Check every
        // page's checksum before reading anything.
        check_integrity(&mut db)?;
        let node_id = {
            let txn = db.begin_read().map_err(txn_err)?;
            let meta = txn.open_table(META).map_err(|e| StoreError::Foreign {
                path: path.to_owned(),
                reason: format!("no edgeflow metadata ({e})"),
            })?;
            match meta.get("format").map_err(txn_err)?.map(|g| read_u64(g.value())) {
                Some(Ok(FORMAT)) => {}
                other => {
                    return Err(StoreError::Foreign {
                        path: path.to_owned(),
                        reason: format!("format marker {other:?}, this agent reads {FORMAT}"),
                    });
                }
            }
            meta.get("node_id")
                .map_err(txn_err)?
                .map(|g| String::from_utf8_lossy(g.value()).into_owned())
                .unwrap_or_default()
        };
        let mut store = Store {
            path: path.to_owned(),
            node_id,
            opts,
            db: Some(db),
            stats: Stats::default(),
            dedup: DedupMap::default(),
            disk_guard: None,
            epoch: new_epoch(),
            run_first_seq: None,
        };
        store.load()?;
        Ok(store)
    }

    /// The node id recorded in the buffer.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Reloads counters and the dedup index from the file.
    fn load(&mut self) -> Result<(), StoreError> {
        let db = self.db.as_ref().ok_or(StoreError::NeedsReopen)?;
        let txn = db.begin_read().map_err(txn_err)?;
        let meta = txn.open_table(META).map_err(txn_err)?;
        let get = |name: &str| -> Result<u64, StoreError> {
            let g = meta
                .get(name)
                .map_err(txn_err)?
                .ok_or_else(|| StoreError::Damaged(format!("meta `{name}` is missing")))?;
            read_u64(g.value()).map_err(StoreError::Damaged)
        };
        let mut stats =
            Stats { count: get("count")?, bytes: get("bytes")?, next_seq: get("next_seq")?, ..Stats::default() };
        let records = txn.open_table(RECORDS).map_err(txn_err)?;
        if let Some((k, v)) = records.first().map_err(txn_err)? {
            stats.first_seq = Some(k.value());
            stats.oldest_received_ms = entry::decode(v.value()).ok().map(|e| e.received_ms);
        }
        let recent = txn.open_table(RECENT).map_err(txn_err)?;
        let rows = recent.len().map_err(txn_err)?;
        let mut dedup = DedupMap::default();
        dedup.reserve(rows as usize);
        for row in recent.iter().map_err(txn_err)? {
            let (k, v) = row.map_err(txn_err)?;
            dedup.insert(v.value(), k.value());
        }
        // The rows, not the distinct keys: the horizon's bound counts rows.
        stats.dedup_entries = rows;
        self.stats = stats;
        self.dedup = dedup;
        Ok(())
    }

    /// Closes and reopens the file, reloading everything from disk. Used after a failed
    /// transaction (redb refuses further work after an I/O error).
    pub fn reopen(&mut self, now_ms: i64) -> Result<(), StoreError> {
        self.db = None;
        contained(|| self.open_db(now_ms).map(drop))
    }

    /// Whether a failure left the file closed (see [`Store::reopen`]).
    pub fn needs_reopen(&self) -> bool {
        self.db.is_none()
    }

    /// The counters as of the last commit.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This run's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The first `seq` this run assigned; entries below it were committed by an earlier run.
    pub fn run_first_seq(&self) -> u64 {
        self.run_first_seq.unwrap_or(self.stats.next_seq)
    }

    /// Applies one group commit: delete delivered entries, then append in order. Durable when it
    /// returns `Ok`. On `Err` nothing is acknowledged and the store must be reopened.
    /// Once the filesystem has run out of space the file cannot grow, and every transaction —
    /// even one that only deletes — needs free pages inside it (redb copies on write). With a
    /// guard set, appends that would leave less than `margin` bytes free in the file are
    /// deferred like appends over the quota, so the deletions that follow Kafka's
    /// acknowledgements always find room. Costs a walk of the file's trees per transaction with
    /// appends, so it is set only while the disk is short of space.
    pub fn set_disk_guard(&mut self, margin: Option<u64>) {
        self.disk_guard = margin;
    }

    pub fn disk_guard(&self) -> Option<u64> {
        self.disk_guard
    }

    pub fn apply(&mut self, deletes: &[u64], appends: &[Append]) -> Result<Applied, StoreError> {
        let result = self.try_apply(deletes, appends);
        if result.is_err() {
            // The in-memory index and counters may now be ahead of the file.
            self.db = None;
        }
        result
    }

    fn try_apply(&mut self, deletes: &[u64], appends: &[Append]) -> Result<Applied, StoreError> {
        let db = self.db.as_ref().ok_or(StoreError::NeedsReopen)?;
        let mut applied = Applied { outcomes: Vec::with_capacity(appends.len()), ..Applied::default() };
        let mut stats = self.stats;
        let txn = db.begin_write().map_err(txn_err)?;
        {
            let mut records = txn.open_table(RECORDS).map_err(txn_err)?;
            let mut recent = txn.open_table(RECENT).map_err(txn_err)?;
            let mut meta = txn.open_table(META).map_err(txn_err)?;
            for &seq in deletes {
                if let Some(old) = records.remove(seq).map_err(txn_err)? {
                    stats.bytes = stats.bytes.saturating_sub(cost(old.value().len()));
                    stats.count = stats.count.saturating_sub(1);
                    applied.deleted += 1;
                }
            }
            let mut blocked = false;
            // Room inside the file that appends may use, with a guard set.
            let mut room = match self.disk_guard {
                Some(margin) if !appends.is_empty() => {
                    let db_stats = txn.stats().map_err(txn_err)?;
                    let used = db_stats.allocated_pages() * db_stats.page_size() as u64;
                    let len = std::fs::metadata(&self.path).map_err(|e| txn_err(redb::StorageError::from(e)))?.len();
                    Some(len.saturating_sub(used).saturating_sub(margin))
                }
                _ => None,
            };
            let mut value = Vec::with_capacity(256);
            for append in appends {
                if blocked {
                    applied.outcomes.push(Outcome::Deferred);
                    continue;
                }
                // `None`: kept out of the dedup horizon.
                let (dedup_key, check) = match append {
                    Append::Record { natural_hash, payload_hash, .. } => (Some((*natural_hash, *payload_hash)), true),
                    Append::DeadLetter { natural_hash, payload_hash, check_duplicate, .. } => {
                        (Some((*natural_hash, *payload_hash)), *check_duplicate)
                    }
                    Append::HighWater { .. } => (None, false),
                };
                if check && let Some(&seq) = dedup_key.and_then(|k| self.dedup.get(&k)) {
                    applied.outcomes.push(Outcome::Duplicate { seq });
                    continue;
                }
                let seq = stats.next_seq;
                value.clear();
                let bytes = match append {
                    Append::Record { device_id, json_head, received_ms, .. } => {
                        value.extend_from_slice(json_head);
                        RawRecord::finish_json(Some(&self.epoch), seq, &mut value);
                        entry::encode(Kind::Record, *received_ms, device_id, &value)
                    }
                    Append::DeadLetter { draft, received_ms, .. } => {
                        let dl = DeadLetter {
                            node_id: self.node_id.as_str().into(),
                            epoch: Some(self.epoch.as_str().into()),
                            seq,
                            reason: draft.reason.as_str().into(),
                            detail: draft.detail.as_str().into(),
                            source: draft.source.as_str().into(),
                            received_at_ms: *received_ms,
                            payload_size: draft.payload_size,
                            truncated: draft.truncated,
                            payload: draft.payload.clone(),
                        };
                        entry::encode(Kind::DeadLetter, *received_ms, self.node_id.as_bytes(), &dl.to_json())
                    }
                    Append::HighWater { received_ms } => {
                        let dl = DeadLetter {
                            node_id: self.node_id.as_str().into(),
                            epoch: Some(self.epoch.as_str().into()),
                            seq,
                            reason: MarkerKind::HighWater.as_str().into(),
                            detail: format!("complete through seq {}", seq.saturating_sub(1)).into(),
                            source: MARKER_SOURCE.into(),
                            received_at_ms: *received_ms,
                            payload_size: 0,
                            truncated: false,
                            payload: Vec::new(),
                        };
                        entry::encode(Kind::DeadLetter, *received_ms, self.node_id.as_bytes(), &dl.to_json())
                    }
                };
                let need = cost(bytes.len());
                if let Some(room) = room.as_mut() {
                    // Twice the entry: its leaf space, the dedup index, and page slack.
                    if *room < 2 * need {
                        blocked = true;
                        applied.outcomes.push(Outcome::Deferred);
                        continue;
                    }
                    *room -= 2 * need;
                }
                if stats.bytes + need > self.opts.max_bytes {
                    match self.opts.when_full {
                        WhenFull::Block => {
                            blocked = true;
                            applied.outcomes.push(Outcome::Deferred);
                            continue;
                        }
                        WhenFull::DropOldest => {
                            while stats.bytes + need > self.opts.max_bytes {
                                let Some((_, old)) = records.pop_first().map_err(txn_err)? else { break };
                                stats.bytes = stats.bytes.saturating_sub(cost(old.value().len()));
                                stats.count = stats.count.saturating_sub(1);
                                applied.dropped += 1;
                            }
                        }
                    }
                }
                records.insert(seq, bytes.as_slice()).map_err(txn_err)?;
                applied.stored.push((seq, bytes));
                stats.next_seq += 1;
                stats.bytes += need;
                stats.count += 1;
                let Some(key) = dedup_key else {
                    applied.outcomes.push(Outcome::Stored { seq });
                    continue;
                };
                recent.insert(seq, key).map_err(txn_err)?;
                self.dedup.insert(key, seq);
                stats.dedup_entries += 1;
                while stats.dedup_entries > self.opts.dedup_horizon {
                    let Some((k, v)) = recent.pop_first().map_err(txn_err)? else { break };
                    // Only if no later copy (a dead letter stored twice on purpose) took it over.
                    let old = v.value();
                    if self.dedup.get(&old) == Some(&k.value()) {
                        self.dedup.remove(&old);
                    }
                    stats.dedup_entries -= 1;
                }
                applied.outcomes.push(Outcome::Stored { seq });
            }
            meta.insert("next_seq", stats.next_seq.to_le_bytes().as_slice()).map_err(txn_err)?;
            meta.insert("count", stats.count.to_le_bytes().as_slice()).map_err(txn_err)?;
            meta.insert("bytes", stats.bytes.to_le_bytes().as_slice()).map_err(txn_err)?;
            match records.first().map_err(txn_err)? {
                Some((k, v)) => {
                    stats.first_seq = Some(k.value());
                    stats.oldest_received_ms = entry::decode(v.value()).ok().map(|e| e.received_ms);
                }
                None => {
                    stats.first_seq = None;
                    stats.oldest_received_ms = None;
                }
            }
        }
        txn.commit().map_err(txn_err)?;
        self.stats = stats;
        Ok(applied)
    }

    /// Up to `max_records` entries (and about `max_bytes`) with `seq >= from`, in order.
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let db = self.db.as_ref().ok_or(StoreError::NeedsReopen)?;
        let txn = db.begin_read().map_err(txn_err)?;
        let records = txn.open_table(RECORDS).map_err(txn_err)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in records.range(from..).map_err(txn_err)? {
            let (k, v) = row.map_err(txn_err)?;
            bytes += v.value().len();
            out.push((k.value(), v.value().to_vec()));
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Checks the file end to end: redb's own integrity check, every entry decodes, and the
    /// counters match the entries. Returns the number of entries checked.
    pub fn verify(&mut self) -> Result<u64, StoreError> {
        contained(|| self.verify_inner())
    }

    fn verify_inner(&mut self) -> Result<u64, StoreError> {
        let db = self.db.as_mut().ok_or(StoreError::NeedsReopen)?;
        check_integrity(db)?;
        let txn = db.begin_read().map_err(txn_err)?;
        let records = txn.open_table(RECORDS).map_err(txn_err)?;
        let (mut count, mut bytes, mut last) = (0u64, 0u64, None::<u64>);
        for row in records.iter().map_err(txn_err)? {
            let (k, v) = row.map_err(txn_err)?;
            let seq = k.value();
            entry::decode(v.value()).map_err(|e| StoreError::Damaged(format!("entry {seq}: {e}")))?;
            if seq >= self.stats.next_seq {
                return Err(StoreError::Damaged(format!("entry {seq} is beyond next_seq {}", self.stats.next_seq)));
            }
            count += 1;
            bytes += cost(v.value().len());
            last = Some(seq);
        }
        if count != self.stats.count || bytes != self.stats.bytes {
            return Err(StoreError::Damaged(format!(
                "counters say {} entries / {} bytes, file holds {count} / {bytes}",
                self.stats.count, self.stats.bytes
            )));
        }
        let _ = last;
        Ok(count)
    }
}

/// Runs `f`, turning a panic inside redb into [`StoreError::Damaged`].
///
/// redb trusts the pages it reads: a damaged file can make it panic (even inside `open`). The
/// agent is built with `panic = "unwind"` so that this boundary can report a damaged buffer
/// instead of crashing; the default panic message is suppressed while `f` runs.
fn contained<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    use std::panic::{AssertUnwindSafe, catch_unwind, set_hook, take_hook};
    use std::sync::Mutex;
    static HOOK: Mutex<()> = Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let previous = take_hook();
    set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(f));
    set_hook(previous);
    result.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        Err(StoreError::Damaged(format!("redb could not read the file ({why}); move it aside and report it")))
    })
}

fn check_integrity(db: &mut Database) -> Result<(), StoreError> {
    match db.check_integrity() {
        Ok(true) => Ok(()),
        Ok(false) => Err(StoreError::Damaged(
            "the file failed redb's integrity check and was rolled back to its last consistent commit; check again"
                .into(),
        )),
        Err(e) => Err(StoreError::Damaged(format!("the file failed redb's integrity check: {e}"))),
    }
}

fn read_u64(bytes: &[u8]) -> Result<u64, String> {
    <[u8; 8]>::try_from(bytes).map(u64::from_le_bytes).map_err(|_| format!("expected 8 bytes, found {}", bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_735_207_200_000;

    fn opts(max_bytes: u64, when_full: WhenFull) -> StoreOptions {
        StoreOptions { max_bytes, when_full, dedup_horizon: 4, cache_bytes: 1 << 20 }
    }

    fn record(device: &str, ts: u32, payload_hash: u64) -> Append {
        let natural = xxhash_rust::xxh3::xxh3_64(format!("{device}\0{ts}").as_bytes());
        Append::Record {
            natural_hash: natural,
            payload_hash,
            device_id: device.as_bytes().to_vec(),
            json_head: format!(r#"{{"device_id":"{device}","ts":{ts},"#).into_bytes(),
            received_ms: NOW + i64::from(ts),
        }
    }

    fn open(dir: &Path, o: StoreOptions) -> (Store, Opened) {
        Store::open(&dir.join("buffer.redb"), "pve-1", o, NOW).expect("opens")
    }

    fn seqs(applied: &Applied) -> Vec<Outcome> {
        applied.outcomes.clone()
    }

    #[test]
    fn a_disk_guard_defers_appends_that_would_eat_the_room_kept_for_deletions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(1 << 30, WhenFull::Block));
        // A margin larger than the file: no room for any append.
        store.set_disk_guard(Some(1 << 40));
        let applied = store.apply(&[], &[record("d", 1, 1), record("d", 2, 2)]).expect("commit");
        assert_eq!(seqs(&applied), vec![Outcome::Deferred, Outcome::Deferred]);
        // A small margin in a file with free pages: appends fit.
        store.set_disk_guard(Some(0));
        let len = std::fs::metadata(store.path()).expect("stat").len();
        let applied = store.apply(&[], &[record("d", 1, 1)]).expect("commit");
        assert!(matches!(seqs(&applied)[..], [Outcome::Stored { .. }]), "file of {len} bytes: {:?}", seqs(&applied));
        store.set_disk_guard(None);
        let applied = store.apply(&[], &[record("d", 2, 2)]).expect("commit");
        assert!(matches!(seqs(&applied)[..], [Outcome::Stored { .. }]));
    }

    /// Issue 10, class 7: each run of the agent (each open) writes its own epoch into what it
    /// commits, so a restored or copied file continuing from an old `seq` never reuses an
    /// identity; what an earlier run committed keeps that run's epoch.
    #[test]
    fn each_open_is_a_new_epoch_carried_by_every_entry_it_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("buffer.redb");
        let (mut first, _) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let e1 = first.epoch().to_owned();
        assert!(edgeflow_contract::is_valid_epoch(&e1) && e1.len() == 16, "{e1}");
        first.apply(&[], &[record("d", 1, 1)]).expect("commit");
        let copy = dir.path().join("copy.redb");
        drop(first);
        std::fs::copy(&path, &copy).expect("copy");
        let (mut second, _) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let e2 = second.epoch().to_owned();
        assert_ne!(e1, e2);
        let resume = second.stats().next_seq;
        assert_eq!(second.run_first_seq(), resume, "entries below it were committed by an earlier run");
        second.apply(&[], &[record("d", 2, 2)]).expect("commit");
        let epochs = |store: &Store| -> Vec<(u64, Option<String>)> {
            store
                .read(0, 100, usize::MAX)
                .expect("read")
                .iter()
                .map(|(seq, bytes)| {
                    let e = entry::decode(bytes).expect("entry");
                    let v: serde_json::Value = serde_json::from_slice(e.value).expect("json");
                    (*seq, v["epoch"].as_str().map(str::to_owned))
                })
                .collect()
        };
        let got = epochs(&second);
        assert_eq!(got.len(), 3, "marker, a record of each run: {got:?}");
        assert!(got[..2].iter().all(|(_, e)| e.as_deref() == Some(e1.as_str())), "{got:?}");
        assert_eq!(got[2], (resume, Some(e2.clone())));
        drop(second);
        // The copy, opened again (a restored backup, a cloned host): the same seq, a new epoch.
        let (mut restored, _) = Store::open(&copy, "pve-1", opts(1 << 20, WhenFull::Block), NOW).expect("opens");
        assert_eq!(restored.stats().next_seq, resume);
        restored.apply(&[], &[record("d", 3, 3)]).expect("commit");
        let last = epochs(&restored).pop().expect("an entry");
        assert_eq!(last.0, resume);
        assert!(last.1.as_deref().is_some_and(|e| e != e1 && e != e2), "{last:?}");
    }

    #[test]
    fn new_buffer_starts_with_a_marker_at_a_time_based_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, opened) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let first = NOW as u64 * 1000;
        assert_eq!(opened.created, Some(first));
        let rows = store.read(0, 10, usize::MAX).expect("read");
        assert_eq!(rows.len(), 1);
        let e = entry::decode(&rows[0].1).expect("entry");
        assert_eq!((rows[0].0, e.kind, e.key), (first, Kind::DeadLetter, &b"pve-1"[..]));
        let dl = DeadLetter::parse(e.value).expect("dead letter");
        assert_eq!((dl.seq, dl.marker()), (first, Some(MarkerKind::BufferCreated)));
        assert_eq!(store.stats().next_seq, first + 1);
    }

    #[test]
    fn seq_continues_across_reopen_and_redeliveries_are_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let base = store.stats().next_seq;
        let a = store.apply(&[], &[record("d1", 1, 11), record("d1", 2, 12)]).expect("commit");
        assert_eq!(seqs(&a), vec![Outcome::Stored { seq: base }, Outcome::Stored { seq: base + 1 }]);
        drop(store);

        let (mut store, opened) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        assert_eq!(opened.created, None);
        // Same natural key and payload: a redelivery. Same natural key, other payload: new.
        let b = store.apply(&[], &[record("d1", 2, 12), record("d1", 2, 99), record("d2", 2, 12)]).expect("commit");
        assert_eq!(
            seqs(&b),
            vec![
                Outcome::Duplicate { seq: base + 1 },
                Outcome::Stored { seq: base + 2 },
                Outcome::Stored { seq: base + 3 }
            ]
        );
        // The value carries the run's epoch and the seq.
        let rows = store.read(base + 3, 1, usize::MAX).expect("read");
        let e = entry::decode(&rows[0].1).expect("entry");
        assert_eq!(
            std::str::from_utf8(e.value).expect("utf8"),
            format!(r#"{{"device_id":"d2","ts":2,"epoch":"{}","seq":{}}}"#, store.epoch(), base + 3)
        );
    }

    /// A, then B (same device and timestamp, other payload), then A again: the repeat of A is
    /// recognised whatever came in between, and B's repeat too.
    #[test]
    fn a_repeat_is_recognised_by_the_whole_reading_whatever_came_in_between() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let base = store.stats().next_seq;
        let first = store.apply(&[], &[record("d", 1, 0xA), record("d", 1, 0xB)]).expect("commit");
        assert_eq!(seqs(&first), vec![Outcome::Stored { seq: base }, Outcome::Stored { seq: base + 1 }]);
        let again = store.apply(&[], &[record("d", 1, 0xA), record("d", 1, 0xB)]).expect("commit");
        assert_eq!(seqs(&again), vec![Outcome::Duplicate { seq: base }, Outcome::Duplicate { seq: base + 1 }]);
        // The same holds after a restart (the index is rebuilt from the file).
        drop(store);
        let (mut store, _) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let reopened = store.apply(&[], &[record("d", 1, 0xA), record("d", 1, 0xB)]).expect("commit");
        assert_eq!(seqs(&reopened), vec![Outcome::Duplicate { seq: base }, Outcome::Duplicate { seq: base + 1 }]);
        assert_eq!(store.stats().next_seq, base + 2, "nothing stored twice");
    }

    /// A `high_water` marker takes the next `seq` in its commit, says what it proves, reads back
    /// in order between the records, and is never taken for a repeat (of a record or of an
    /// earlier marker), nor kept in the dedup horizon.
    #[test]
    fn a_high_water_marker_takes_the_next_seq_and_is_never_a_repeat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let base = store.stats().next_seq;
        let horizon = store.stats().dedup_entries;
        let a = store
            .apply(&[], &[record("d", 1, 1), Append::HighWater { received_ms: NOW + 5 }, record("d", 2, 2)])
            .expect("commit");
        assert_eq!(
            seqs(&a),
            vec![Outcome::Stored { seq: base }, Outcome::Stored { seq: base + 1 }, Outcome::Stored { seq: base + 2 }]
        );
        let again =
            store.apply(&[], &[Append::HighWater { received_ms: NOW + 6 }, Append::HighWater { received_ms: NOW + 6 }]);
        assert_eq!(
            seqs(&again.expect("commit")),
            vec![Outcome::Stored { seq: base + 3 }, Outcome::Stored { seq: base + 4 }]
        );
        assert_eq!(store.stats().dedup_entries, horizon + 2, "only the two records entered the horizon");

        let rows = store.read(base, 10, usize::MAX).expect("read");
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), (base..base + 5).collect::<Vec<_>>());
        let e = entry::decode(&rows[1].1).expect("entry");
        assert_eq!((e.kind, e.key, e.received_ms), (Kind::DeadLetter, &b"pve-1"[..], NOW + 5));
        let dl = DeadLetter::parse(e.value).expect("dead letter");
        assert_eq!((dl.seq, dl.marker(), dl.received_at_ms), (base + 1, Some(MarkerKind::HighWater), NOW + 5));
        assert_eq!((dl.node_id.as_ref(), dl.source.as_ref()), ("pve-1", "edgeflow-agent"));
        assert_eq!(dl.detail, format!("complete through seq {base}"));
        assert!(dl.payload.is_empty() && dl.payload_size == 0 && !dl.truncated);
        // Markers count against the quota like any entry.
        assert_eq!(store.stats().count, 6);
        assert_eq!(store.verify().expect("consistent"), 6);
    }

    /// Under `drop_oldest` a marker is dropped like any entry, and counted.
    #[test]
    fn drop_oldest_may_drop_markers_and_counts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(400, WhenFull::DropOldest));
        let mut dropped = 0;
        for i in 0..20 {
            let a = store.apply(&[], &[Append::HighWater { received_ms: NOW + i }]).expect("commit");
            assert!(matches!(a.outcomes[0], Outcome::Stored { .. }));
            dropped += a.dropped;
            assert!(store.stats().bytes <= 400);
        }
        assert!(dropped > 0);
        assert_eq!(store.verify().expect("consistent"), store.stats().count);
    }

    #[test]
    fn dedup_horizon_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(1 << 20, WhenFull::Block));
        let appends: Vec<_> = (0..10).map(|i| record("d", i, u64::from(i))).collect();
        store.apply(&[], &appends).expect("commit");
        assert_eq!(store.stats().dedup_entries, 4);
        // The oldest fell out of the horizon (4): it is stored again; a recent one is not.
        let again = store.apply(&[], &[record("d", 0, 0), record("d", 9, 9)]).expect("commit");
        assert!(matches!(again.outcomes[0], Outcome::Stored { .. }));
        assert!(matches!(again.outcomes[1], Outcome::Duplicate { .. }));
    }

    #[test]
    fn deletes_free_quota_and_block_defers_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(520, WhenFull::Block));
        let marker_bytes = store.stats().bytes;
        let mut stored = Vec::new();
        let mut i = 0;
        loop {
            let a = store.apply(&[], &[record("d", i, u64::from(i))]).expect("commit");
            match a.outcomes[0] {
                Outcome::Stored { seq } => stored.push(seq),
                Outcome::Deferred => break,
                Outcome::Duplicate { .. } => unreachable!("distinct keys"),
            }
            i += 1;
        }
        assert!(store.stats().bytes <= 520 && store.stats().bytes > marker_bytes);
        // Once one append is deferred, everything after it is deferred too.
        let a = store.apply(&[], &[record("d", 100, 1), record("x", 0, 1)]).expect("commit");
        assert_eq!(a.outcomes, vec![Outcome::Deferred, Outcome::Deferred]);
        // Delivering the first two makes room again, in the same commit.
        let a = store.apply(&stored[..2], &[record("d", 100, 1)]).expect("commit");
        assert_eq!(a.deleted, 2);
        assert!(matches!(a.outcomes[0], Outcome::Stored { .. }));
        assert!(store.stats().bytes <= 520);
    }

    #[test]
    fn drop_oldest_makes_room_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = open(dir.path(), opts(400, WhenFull::DropOldest));
        let mut dropped = 0;
        for i in 0..50 {
            let a = store.apply(&[], &[record("d", i, u64::from(i))]).expect("commit");
            assert!(matches!(a.outcomes[0], Outcome::Stored { .. }));
            dropped += a.dropped;
            assert!(store.stats().bytes <= 400);
        }
        assert!(dropped > 0);
        let rows = store.read(0, 1000, usize::MAX).expect("read");
        assert_eq!(rows.len() as u64, store.stats().count);
        // What is left is the newest, in order.
        assert!(rows.windows(2).all(|w| w[0].0 + 1 == w[1].0));
        assert_eq!(rows.last().map(|r| r.0), Some(store.stats().next_seq - 1));
        assert_eq!(store.verify().expect("consistent"), store.stats().count);
    }

    #[test]
    fn foreign_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("buffer.redb");
        std::fs::write(&path, b"definitely not a database, just some text").expect("write");
        let err = Store::open(&path, "n", opts(1 << 20, WhenFull::Block), NOW).expect_err("refused");
        assert!(matches!(err, StoreError::Open { .. }), "{err}");

        let other = dir.path().join("other.redb");
        {
            let db = Database::create(&other).expect("create");
            let txn = db.begin_write().expect("txn");
            txn.open_table(RECORDS).expect("table").insert(1, b"x".as_slice()).expect("insert");
            txn.commit().expect("commit");
        }
        let err = Store::open(&other, "n", opts(1 << 20, WhenFull::Block), NOW).expect_err("refused");
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    }
}
