//! The durable buffer between MQTT and Kafka.
//!
//! # Design
//!
//! One redb file (`<data_dir>/buffer.redb`) holds every accepted message from the moment it is
//! acknowledged to the MQTT broker until Kafka has acknowledged it. The file is owned by one
//! OS thread, the *buffer thread* (redb is synchronous and we never hold a transaction across
//! an `.await`); everyone else talks to it through a channel of [`Command`]s.
//!
//! ## The ack protocol
//!
//! ```text
//! ingest ──Append(msg, ack token)──▶ buffer thread ──commit──▶ on_commit(tokens) ──▶ MQTT PUBACK
//! forward ◀──Read(from seq)──────── buffer thread
//! forward ──Delivered(seqs)────────▶ buffer thread ──commit (delete)
//! ```
//!
//! * **Group commit.** The thread takes everything waiting in the channel (up to `max_batch`
//!   appends), applies deletions and appends in one write transaction, commits durably
//!   (fsync), and only then hands the ack tokens of that group back, in arrival order. So the
//!   PUBACK for a message is sent only after the commit that holds it, and throughput is bounded
//!   by (messages in flight) / (commit latency) rather than one fsync per message.
//! * **seq** is assigned inside the transaction from the durable `next_seq` counter, so it is
//!   strictly increasing across restarts and crashes: a crash before the commit assigns nothing.
//! * **Redelivery.** A crash between commit and PUBACK makes the broker redeliver. The store
//!   recognises a redelivered reading by its natural key `(device_id, timestamp)` plus payload
//!   hash within the dedup horizon, acknowledges it again, and stores nothing.
//! * **Deletion after delivery.** The forwarder reports delivered `seq`s; they are deleted in
//!   the next group commit. A crash before that deletion re-sends them after restart: Kafka then
//!   holds a second copy with the same `(node_id, seq)`, which the aggregator drops.
//! * **Quota.** Appends are charged against `max_bytes`. When full, `block` defers the append
//!   (and all after it, keeping order): no PUBACK, so the broker keeps the messages and stops
//!   sending when its in-flight window is full; `drop_oldest` deletes the oldest entries,
//!   counted. The quota is checked before each insert, so it is never exceeded, not even by one
//!   commit.
//! * **I/O failure** (disk full, failing disk): the transaction fails and nothing of it is
//!   acknowledged; the group stays pending, in order, and is retried with backoff after reopening
//!   the file. Meanwhile the thread keeps serving the forwarder's reads and deletions — deletions
//!   first and alone, since they need the least space — so on a full disk the buffer drains to
//!   Kafka and frees the room the pending group needs. If a failed commit in fact reached the
//!   disk, the retry recognises every append as a redelivery (all appends of a retried group are
//!   checked against the horizon), so nothing is stored twice. Because redb writes new pages
//!   even to delete, a filesystem that is 100% full would refuse those deletions too: a failed
//!   transaction releases the [`reserve`] file kept next to the buffer, retried deletions
//!   commit in bounded chunks, and appends are held back (no PUBACK) while they would leave less
//!   than a guard of free room inside the file ([`Store::set_disk_guard`]), so deletions always
//!   find pages and the buffer drains on a full disk. The file's growth allocates its blocks
//!   ([`backend`]), so a page inside it never hits ENOSPC. The reserve is written again, and the
//!   guard lifted, once the filesystem has room.
//!
//! * **High-water markers.** Every `high_water_interval` (idle or not: a marker's age is how
//!   `verify` notices a stopped node) and on [`Command::HighWater`] (a clean stop, once ingest
//!   has stopped), the thread queues an [`Append::HighWater`] behind the waiting appends. It takes
//!   the next `seq` of its commit, so every `seq` below it was assigned before it, and goes to
//!   `raw-data-dlq` in order like any dead letter. At most one waits at a time, so a blocked or
//!   failing buffer does not pile them up; at a stop, none is written if nothing was assigned
//!   since the last one.
//!
//! See [`store`] for the table layout and [`entry`] for the bytes of one entry.

pub mod backend;
pub mod entry;
pub mod reserve;
pub mod store;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use store::{Append, DeadLetterDraft, Outcome, Stats, Store, StoreError, StoreOptions, WhenFull};

use crate::metrics::Metrics;

/// A request to the buffer thread.
#[derive(Debug)]
pub enum Command<T> {
    /// Append a message; its token comes back through `on_commit` once committed.
    Append(Append, T),
    /// Delete delivered entries.
    Delivered(Vec<u64>),
    /// Read committed entries with `seq >= from`.
    Read { from: u64, max_records: usize, max_bytes: usize, reply: tokio::sync::oneshot::Sender<ReadResult> },
    /// Reply once everything sent before it is committed.
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// Write a `high_water` marker (at a clean stop, once ingest has stopped) unless nothing was
    /// assigned since the last one; reply with the newest marker's `seq` once it is committed.
    HighWater(tokio::sync::oneshot::Sender<u64>),
}

/// Entries read from the buffer: `(seq, entry bytes)`.
pub type ReadResult = Result<Vec<(u64, Vec<u8>)>, String>;

/// State shared with the rest of the agent (status, metrics, watchdog).
#[derive(Debug, Default)]
pub struct Shared {
    stats: Mutex<Stats>,
    /// Milliseconds since the thread started, at its last loop iteration.
    heartbeat_ms: AtomicU64,
    started: Mutex<Option<Instant>>,
    /// Whether the last transaction succeeded.
    pub writable: AtomicBool,
    /// Whether appends are waiting for room.
    pub blocked: AtomicBool,
    /// Whether the filesystem under the buffer ran out of space and has not had room since.
    pub disk_full: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Wakes the forwarder after each commit that added entries.
    pub committed: tokio::sync::Notify,
    /// The first `seq` of this run: entries below it were committed (and maybe sent) by an
    /// earlier run. Set before the buffer thread starts.
    pub run_first_seq: AtomicU64,
}

/// Entries just committed, handed to the forwarder so it need not read them back.
pub type Tail = Vec<(u64, Vec<u8>)>;

/// How many committed groups may wait for the forwarder before the buffer thread stops handing
/// them over (the forwarder then reads them from the file).
pub const TAIL_CAPACITY: usize = 4;

/// Room kept free inside the buffer file for deletions once the disk has filled up.
const DISK_GUARD: u64 = 256 * 1024;

/// Most deletions per transaction while retrying after a failed commit (a full disk).
const DELETE_CHUNK: usize = 1024;

/// Larger groups are not handed over: at such rates the forwarder reads in large chunks anyway,
/// and this bounds the memory held in hand-overs.
pub const TAIL_MAX_ENTRIES: usize = 256;

impl Shared {
    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Time since the thread last went round its loop.
    pub fn since_heartbeat(&self) -> Duration {
        let started = *self.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match started {
            Some(t) => {
                let now = t.elapsed().as_millis() as u64;
                Duration::from_millis(now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
            }
            None => Duration::ZERO,
        }
    }

    fn beat(&self) {
        let mut started = self.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let t = *started.get_or_insert_with(Instant::now);
        self.heartbeat_ms.store(t.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = e;
    }
}

/// Buffer thread settings.
#[derive(Debug, Clone)]
pub struct ThreadOptions {
    /// Most appends per group commit.
    pub max_batch: usize,
    /// How often to write a `high_water` marker (`None`: only when asked, at a clean stop).
    pub high_water_interval: Option<Duration>,
}

/// What a waiting append answers to once committed.
enum Waiter<T> {
    /// An MQTT message: its ack token goes to `on_commit`.
    Ack(T),
    /// A `high_water` marker: nobody to acknowledge.
    Marker,
}

/// The `high_water` markers of this run.
#[derive(Default)]
struct HighWater {
    /// The newest marker committed by this thread.
    last: Option<u64>,
    /// A marker is waiting for its commit (so another is not queued behind it).
    waiting: bool,
    /// Asked for a marker (at a clean stop): answered with the `seq` of the next one committed.
    replies: Vec<tokio::sync::oneshot::Sender<u64>>,
}

/// Starts the buffer thread over an opened store. It runs until every sender of the returned
/// channel is dropped, then commits what it received and closes the file.
///
/// `on_commit` receives the tokens of each committed group, in arrival order, with their
/// outcomes; it runs on the buffer thread and must not block.
pub fn spawn<T, F>(
    store: Store,
    opts: ThreadOptions,
    metrics: Metrics,
    shared: Arc<Shared>,
    tail: flume::Sender<Tail>,
    on_commit: F,
) -> std::io::Result<(flume::Sender<Command<T>>, std::thread::JoinHandle<()>)>
where
    T: Send + 'static,
    F: FnMut(Vec<(T, Outcome)>) + Send + 'static,
{
    let (tx, rx) = flume::unbounded();
    let reserve = reserve::Reserve::new(store.path(), reserve::RESERVE_BYTES);
    shared.run_first_seq.store(store.run_first_seq(), Ordering::Relaxed);
    let thread = BufferThread { store, reserve, opts, metrics, shared, tail, on_commit, rx };
    // Before the thread starts, so the status server never shows the buffer's gauges at zero.
    thread.publish_stats();
    let handle = std::thread::Builder::new().name("buffer".into()).spawn(move || thread.run())?;
    Ok((tx, handle))
}

struct BufferThread<T, F> {
    store: Store,
    reserve: reserve::Reserve,
    opts: ThreadOptions,
    metrics: Metrics,
    shared: Arc<Shared>,
    tail: flume::Sender<Tail>,
    on_commit: F,
    rx: flume::Receiver<Command<T>>,
}

impl<T, F> BufferThread<T, F>
where
    F: FnMut(Vec<(T, Outcome)>),
{
    fn run(mut self) {
        let mut waiting: VecDeque<(Append, Waiter<T>)> = VecDeque::new();
        let mut deletes: Vec<u64> = Vec::new();
        let mut reads = Vec::new();
        let mut barriers = Vec::new();
        let mut disconnected = false;
        // After a failed commit: when to try again, and the current backoff.
        let mut retry: Option<(Instant, Duration)> = None;
        let mut high_water = HighWater::default();
        let mut next_marker = self.opts.high_water_interval.map(|every| Instant::now() + every);
        self.shared.writable.store(true, Ordering::Relaxed);
        loop {
            self.shared.beat();
            let now = Instant::now();
            // On schedule even when idle: a marker's age is how `verify` notices a node that
            // stopped. One waiting marker at a time (the buffer may be blocked or failing).
            if let (Some(at), Some(every)) = (next_marker, self.opts.high_water_interval)
                && now >= at
            {
                if !high_water.waiting {
                    high_water.waiting = true;
                    waiting.push_back((Append::HighWater { received_ms: now_ms() }, Waiter::Marker));
                }
                next_marker = Some(now + every);
            }
            let retry_due = retry.is_none_or(|(at, _)| now >= at);
            // Wait for work unless some is pending and can make progress.
            let can_progress = retry_due
                && (!deletes.is_empty() || (!waiting.is_empty() && !self.shared.blocked.load(Ordering::Relaxed)));
            if !can_progress && !disconnected {
                let mut wait = match retry {
                    Some((at, _)) if at > now => (at - now).min(Duration::from_millis(250)),
                    _ => Duration::from_millis(250),
                };
                if let Some(at) = next_marker {
                    wait = wait.min(at.saturating_duration_since(now));
                }
                match self.rx.recv_timeout(wait) {
                    Ok(cmd) => self.take(cmd, &mut waiting, &mut deletes, &mut reads, &mut barriers, &mut high_water),
                    Err(flume::RecvTimeoutError::Timeout) => {
                        // Retry a blocked or failed group now and then.
                        if waiting.is_empty() && deletes.is_empty() {
                            continue;
                        }
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => disconnected = true,
                }
            }
            while waiting.len() < self.opts.max_batch {
                match self.rx.try_recv() {
                    Ok(cmd) => self.take(cmd, &mut waiting, &mut deletes, &mut reads, &mut barriers, &mut high_water),
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }

            // Reads first: they want what is already committed, and should not wait for an fsync.
            // They keep being served after a failed commit, so the forwarder can still drain the
            // buffer to Kafka (which is what frees space on a full disk).
            if !reads.is_empty() && self.store.needs_reopen() {
                let _ = self.store.reopen(now_ms());
            }
            for (from, max_records, max_bytes, reply) in reads.drain(..) {
                let result = self.store.read(from, max_records, max_bytes).map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            if retry_due && (!waiting.is_empty() || !deletes.is_empty()) {
                match self.commit(&mut waiting, &mut deletes, retry.is_some(), &mut high_water) {
                    Ok(()) => {
                        if retry.take().is_some() {
                            tracing::info!("buffer writable again");
                        }
                        let had_reserve = self.reserve.is_present();
                        if self.reserve.ensure() && !had_reserve && self.store.disk_guard().is_some() {
                            self.store.set_disk_guard(None);
                            self.shared.disk_full.store(false, Ordering::Relaxed);
                            tracing::info!("the disk has room again: the buffer's reserve is back");
                        }
                    }
                    Err(error) => {
                        self.metrics.buffer_commit_errors.inc();
                        self.shared.writable.store(false, Ordering::Relaxed);
                        self.shared.set_error(Some(error.to_string()));
                        let mut backoff =
                            retry.map_or(Duration::from_millis(100), |(_, b)| (b * 2).min(Duration::from_secs(5)));
                        if retry.is_none() {
                            tracing::error!(%error, pending = waiting.len(), "buffer commit failed; nothing of it was acknowledged; retrying (check the disk under the data directory)");
                        }
                        // Keep room in the file for deletions until the disk has space again.
                        self.store.set_disk_guard(Some(DISK_GUARD));
                        self.shared.disk_full.store(true, Ordering::Relaxed);
                        if self.reserve.release() {
                            // A full disk: the room just freed lets the deletions commit.
                            tracing::warn!(
                                reserve = %self.reserve.path().display(),
                                "released the buffer's disk reserve so delivered entries can be deleted"
                            );
                            backoff = Duration::ZERO;
                        }
                        retry = Some((Instant::now() + backoff, backoff));
                    }
                }
            }
            // A barrier is answered once nothing received before it is still waiting.
            if waiting.is_empty() {
                for b in barriers.drain(..) {
                    let _ = b.send(());
                }
            }
            let stuck = self.shared.blocked.load(Ordering::Relaxed) || retry.is_some();
            if disconnected && (deletes.is_empty() || retry.is_some()) && (waiting.is_empty() || stuck) {
                // Appends still waiting at shutdown stay unacknowledged: the broker redelivers
                // them. Undeleted deliveries are sent again at start and dropped downstream.
                tracing::debug!(unacknowledged = waiting.len(), "buffer thread stopping");
                return;
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn take(
        &self,
        cmd: Command<T>,
        waiting: &mut VecDeque<(Append, Waiter<T>)>,
        deletes: &mut Vec<u64>,
        reads: &mut Vec<(u64, usize, usize, tokio::sync::oneshot::Sender<ReadResult>)>,
        barriers: &mut Vec<tokio::sync::oneshot::Sender<()>>,
        high_water: &mut HighWater,
    ) {
        match cmd {
            Command::Append(a, t) => waiting.push_back((a, Waiter::Ack(t))),
            Command::Delivered(mut seqs) => deletes.append(&mut seqs),
            Command::Read { from, max_records, max_bytes, reply } => reads.push((from, max_records, max_bytes, reply)),
            Command::Barrier(reply) => barriers.push(reply),
            Command::HighWater(reply) => match high_water.last {
                // Nothing assigned since the newest marker: it still tells the whole story.
                Some(seq) if !high_water.waiting && self.store.stats().next_seq == seq + 1 => {
                    let _ = reply.send(seq);
                }
                _ => {
                    high_water.replies.push(reply);
                    if !high_water.waiting {
                        high_water.waiting = true;
                        waiting.push_back((Append::HighWater { received_ms: now_ms() }, Waiter::Marker));
                    }
                }
            },
        }
    }

    /// Commits deletions and as many waiting appends as fit. On failure nothing is acknowledged
    /// and everything stays pending, in order, for the next attempt.
    fn commit(
        &mut self,
        waiting: &mut VecDeque<(Append, Waiter<T>)>,
        deletes: &mut Vec<u64>,
        retrying: bool,
        high_water: &mut HighWater,
    ) -> Result<(), StoreError> {
        if self.store.needs_reopen() {
            self.store.reopen(now_ms())?;
        }
        if retrying && !deletes.is_empty() {
            // Deletions alone first, in bounded chunks: they need the least space, each chunk
            // frees pages for the next, and what committed stays committed if a later one fails.
            deletes.sort_unstable();
            while !deletes.is_empty() {
                let n = deletes.len().min(DELETE_CHUNK);
                self.store.apply(&deletes[..n], &[])?;
                deletes.drain(..n);
                self.publish_stats();
            }
        }
        let take = waiting.len().min(self.opts.max_batch);
        let (mut appends, mut tokens): (Vec<Append>, VecDeque<Waiter<T>>) = waiting.drain(..take).unzip();
        for a in &mut appends {
            if let Append::HighWater { received_ms } = a {
                // A marker tells when its `seq` was assigned, however long it waited (a full
                // buffer, a failing disk).
                *received_ms = now_ms();
            }
        }
        if retrying {
            // A failed group may have reached the disk after all: check every append against the
            // horizon so nothing is stored twice.
            for a in &mut appends {
                if let Append::DeadLetter { check_duplicate, .. } = a {
                    *check_duplicate = true;
                }
            }
        }
        let start = Instant::now();
        let mut applied = match self.store.apply(deletes, &appends) {
            Ok(applied) => applied,
            Err(error) => {
                for (a, t) in appends.into_iter().zip(tokens).rev() {
                    waiting.push_front((a, t));
                }
                return Err(error);
            }
        };
        self.metrics.buffer_commit_duration.observe(start.elapsed().as_secs_f64());
        self.metrics.buffer_commit_records.observe((appends.len() + deletes.len()) as f64);
        self.shared.writable.store(true, Ordering::Relaxed);
        self.shared.set_error(None);
        deletes.clear();

        let mut acks = Vec::with_capacity(take);
        let mut records = 0u64;
        let mut duplicates = 0u64;
        let mut deferred_from = None;
        let mut marker = None;
        for (i, outcome) in applied.outcomes.iter().enumerate() {
            match outcome {
                Outcome::Deferred => {
                    deferred_from = Some(i);
                    break;
                }
                Outcome::Stored { seq } => match appends[i] {
                    Append::Record { .. } => records += 1,
                    Append::HighWater { .. } => {
                        self.metrics.high_water_markers.inc();
                        high_water.last = Some(*seq);
                        high_water.waiting = false;
                        marker = Some(*seq);
                    }
                    Append::DeadLetter { .. } => {}
                },
                Outcome::Duplicate { .. } => duplicates += 1,
            }
            match tokens.pop_front().expect("one token per append") {
                Waiter::Ack(token) => acks.push((token, *outcome)),
                Waiter::Marker => {}
            }
        }
        let blocked = deferred_from.is_some();
        if let Some(i) = deferred_from {
            // Put the deferred appends back at the front, in order.
            for (a, t) in appends.drain(i..).zip(tokens.drain(..)).rev() {
                waiting.push_front((a, t));
            }
        }
        if blocked != self.shared.blocked.swap(blocked, Ordering::Relaxed) {
            if blocked {
                tracing::warn!(
                    buffered_bytes = self.store.stats().bytes,
                    full = if self.store.disk_guard().is_some() { "disk" } else { "quota" },
                    "buffer full: holding MQTT acknowledgements until Kafka drains it"
                );
            } else {
                tracing::info!("buffer has room again");
            }
        }
        self.metrics.records_committed.inc_by(records);
        self.metrics.records_dropped.inc_by(applied.dropped);
        self.metrics.records_duplicate.inc_by(duplicates);
        self.publish_stats();
        // Answered only once the stats show the marker, so whoever asked sees it everywhere.
        if let Some(seq) = marker {
            for reply in high_water.replies.drain(..) {
                let _ = reply.send(seq);
            }
        }
        let stored_any = applied.outcomes.iter().any(|o| matches!(o, Outcome::Stored { .. }));
        if !acks.is_empty() {
            (self.on_commit)(acks);
        }
        if !applied.stored.is_empty() && applied.stored.len() <= TAIL_MAX_ENTRIES {
            // Hand the new entries to the forwarder; if it is behind, it reads them later.
            let _ = self.tail.try_send(std::mem::take(&mut applied.stored));
        }
        if stored_any || applied.dropped > 0 {
            self.shared.committed.notify_one();
        }
        Ok(())
    }

    fn publish_stats(&self) {
        let stats = self.store.stats();
        *self.shared.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = stats;
        let m = &self.metrics;
        m.buffer_records.set(stats.count as i64);
        m.buffer_bytes.set(stats.bytes as i64);
        m.buffer_next_seq.set(stats.next_seq as i64);
        m.buffer_blocked.set(i64::from(self.shared.blocked.load(Ordering::Relaxed)));
        if let Ok(meta) = std::fs::metadata(self.store.path()) {
            m.buffer_file_bytes.set(meta.len() as i64);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where the buffer file lives in a data directory.
pub fn path_in(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("buffer.redb")
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeflow_contract::{DeadLetter, MarkerKind};

    fn start(
        dir: &std::path::Path,
        interval: Option<Duration>,
    ) -> (flume::Sender<Command<u32>>, std::thread::JoinHandle<()>, Arc<Shared>, Metrics) {
        let opts =
            StoreOptions { max_bytes: 1 << 20, when_full: WhenFull::Block, dedup_horizon: 16, cache_bytes: 1 << 20 };
        let (store, _) = Store::open(&path_in(dir), "n1", opts, now_ms()).expect("opens");
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let shared = Arc::new(Shared::default());
        let (tail, _) = flume::bounded(TAIL_CAPACITY);
        let (tx, handle) = spawn(
            store,
            ThreadOptions { max_batch: 64, high_water_interval: interval },
            metrics.clone(),
            shared.clone(),
            tail,
            |_acks: Vec<(u32, Outcome)>| {},
        )
        .expect("spawns");
        (tx, handle, shared, metrics)
    }

    fn markers(dir: &std::path::Path) -> Vec<(u64, String)> {
        let store = Store::open_existing(
            &path_in(dir),
            StoreOptions { max_bytes: u64::MAX, when_full: WhenFull::Block, dedup_horizon: 16, cache_bytes: 1 << 20 },
        )
        .expect("opens");
        store
            .read(0, 1000, usize::MAX)
            .expect("read")
            .iter()
            .filter_map(|(seq, bytes)| {
                let e = entry::decode(bytes).expect("entry");
                let dl = DeadLetter::parse(e.value).ok()?;
                assert_eq!(dl.seq, *seq);
                (dl.marker() == Some(MarkerKind::HighWater)).then(|| (*seq, dl.detail.into_owned()))
            })
            .collect()
    }

    fn reading(i: u64) -> Append {
        Append::Record {
            natural_hash: i,
            payload_hash: i,
            device_id: b"d".to_vec(),
            json_head: format!(r#"{{"device_id":"d","i":{i},"#).into_bytes(),
            received_ms: now_ms(),
        }
    }

    /// Asked at shutdown, the thread writes a marker above every `seq` assigned so far and
    /// replies with its `seq` once committed; asked again with nothing new, it writes none.
    #[test]
    fn a_high_water_request_writes_a_marker_above_everything_assigned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, handle, shared, metrics) = start(dir.path(), None);
        for i in 0..3 {
            tx.send(Command::Append(reading(i), i as u32)).expect("send");
        }
        let ask = || {
            let (reply, rx) = tokio::sync::oneshot::channel();
            tx.send(Command::HighWater(reply)).expect("send");
            rx.blocking_recv().expect("answered")
        };
        let seq = ask();
        assert_eq!(shared.stats().next_seq, seq + 1, "the marker took the last seq");
        assert_eq!(ask(), seq, "nothing new since: no second marker");
        assert_eq!(metrics.high_water_markers.get(), 1);
        drop(tx);
        handle.join().expect("thread ends");
        assert_eq!(markers(dir.path()), vec![(seq, format!("complete through seq {}", seq - 1))]);
    }

    /// On a schedule, the thread writes markers even when idle (their age is how `verify`
    /// notices a node that stopped).
    #[test]
    fn markers_are_written_on_a_schedule_even_when_idle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, handle, _shared, metrics) = start(dir.path(), Some(Duration::from_millis(200)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while metrics.high_water_markers.get() < 3 {
            assert!(Instant::now() < deadline, "only {} markers in 10s", metrics.high_water_markers.get());
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(tx);
        handle.join().expect("thread ends");
        let found = markers(dir.path());
        assert!(found.len() >= 3, "{found:?}");
        assert!(found.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
