//! The pure heart of `sink`: which bucket each row goes to, when buckets seal, what a
//! checkpoint holds — for one input partition, with no clock and no I/O.
//!
//! # Buckets and sealing
//! A bucket is one (family, event hour) of one input partition: `aggregated`, `filtered`,
//! `rejected` or `deadletter`. The partition's clock is the largest event time it carried
//! (rows and ticks; dead letters written by `process` do not move it, they have no event time).
//! Hour `H` is *sealed* once the clock reaches `H + 1h + seal_grace`. Rows for a sealed hour go
//! to a *late bucket* of that hour, which seals at the next *seal event*. A seal event is a tick,
//! or the clock crossing an hour boundary shifted by the grace. At a seal event the main buckets
//! of every sealed hour seal together (one group, one manifest), and each late bucket seals in a
//! group of its own.
//!
//! # Dedup
//! `process` may emit a value twice after a crash (at a new offset). The sink drops the second
//! copy with high-waters kept per input partition, valid because each source emits in order:
//! readings (and `raw-data-dlq` entries) on `(node_id, epoch, seq)`; per-device aggregates on
//! `(device, window)`; all-devices partials on `(source_partition, window)`; late corrections and
//! dead letters on `(source_partition, source_offset)`.
//!
//! # Checkpoints
//! A checkpoint holds the state as of its resume offset `R` = the first offset of the oldest
//! bucket not yet in S3 (its files and its manifest), or the position when none is pending.
//! Every bucket keeps a snapshot of the small state (clock, high-waters) taken just before its
//! first row; the oldest pending bucket's snapshot is the state as of `R`. Buckets that opened
//! before `R` and sealed at or after `R` are in S3 already: the checkpoint lists them as
//! *phantoms* so a replay routes their rows nowhere and seals them (re-sending only their
//! manifest, create-only) at the same offset as the first run did. Restored from a checkpoint,
//! the machine re-issues that same checkpoint until its phantoms are sealed and done.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One hour in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// The start of the hour holding `t`.
pub fn hour_start(t: i64) -> i64 {
    t.div_euclid(HOUR_MS) * HOUR_MS
}

/// Parquet file families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Aggregated,
    Filtered,
    Rejected,
    Deadletter,
}

impl Family {
    pub const ALL: [Family; 4] = [Self::Aggregated, Self::Filtered, Self::Rejected, Self::Deadletter];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Aggregated => "aggregated",
            Self::Filtered => "filtered",
            Self::Rejected => "rejected",
            Self::Deadletter => "deadletter",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

/// A bucket: (family, hour, main or late) of one input partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BucketKey {
    pub family: Family,
    /// Start of the event hour, milliseconds since the epoch.
    pub hour_ms: i64,
    /// A late bucket (rows for an hour already sealed).
    pub late: bool,
}

/// What identifies a row for dedup (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// A reading or a `raw-data-dlq` entry (`epoch` `None` from agents older than epochs).
    Seq { node: &'a str, epoch: Option<&'a str>, seq: u64 },
    /// A per-device aggregate.
    DeviceWindow { device: &'a str, window_ms: i64 },
    /// An all-devices partial.
    Partial { source_partition: i32, window_ms: i64 },
    /// A late correction (per device or all-devices).
    Late { source_partition: i32, all_devices: bool, source_offset: i64 },
    /// A dead letter written by `process`.
    DeadLetter { source_partition: i32, source_offset: i64 },
    /// Not deduplicated (a value nobody will replay, such as a foreign record).
    Unique,
}

/// A row's routing facts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowMeta<'a> {
    pub family: Family,
    /// The time that picks its hour.
    pub time_ms: i64,
    /// Whether this time moves the partition's clock.
    pub advances_clock: bool,
    pub identity: Identity<'a>,
}

/// One input of the partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input<'a> {
    Row(RowMeta<'a>),
    Tick { time_ms: i64 },
}

/// The small state: the clock and the dedup high-waters. Cloned into a snapshot whenever a
/// bucket opens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmallState {
    pub clock_ms: Option<i64>,
    /// Per node, for rows without an epoch.
    pub seq_high: BTreeMap<String, u64>,
    /// Per node and epoch (absent from checkpoints of older versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epoch_high: BTreeMap<String, BTreeMap<String, u64>>,
    pub window_high: BTreeMap<String, i64>,
    pub partial_high: BTreeMap<i32, i64>,
    pub late_device_high: BTreeMap<i32, i64>,
    pub late_partial_high: BTreeMap<i32, i64>,
    pub deadletter_high: BTreeMap<i32, i64>,
}

impl SmallState {
    fn is_duplicate(&self, id: &Identity<'_>) -> bool {
        match *id {
            Identity::Seq { node, epoch: None, seq } => self.seq_high.get(node).is_some_and(|h| seq <= *h),
            Identity::Seq { node, epoch: Some(epoch), seq } => {
                self.epoch_high.get(node).and_then(|e| e.get(epoch)).is_some_and(|h| seq <= *h)
            }
            Identity::DeviceWindow { device, window_ms } => {
                self.window_high.get(device).is_some_and(|h| window_ms <= *h)
            }
            Identity::Partial { source_partition, window_ms } => {
                self.partial_high.get(&source_partition).is_some_and(|h| window_ms <= *h)
            }
            Identity::Late { source_partition, all_devices, source_offset } => {
                let map = if all_devices { &self.late_partial_high } else { &self.late_device_high };
                map.get(&source_partition).is_some_and(|h| source_offset <= *h)
            }
            Identity::DeadLetter { source_partition, source_offset } => {
                self.deadletter_high.get(&source_partition).is_some_and(|h| source_offset <= *h)
            }
            Identity::Unique => false,
        }
    }

    fn record(&mut self, id: &Identity<'_>) {
        match *id {
            Identity::Seq { node, epoch: None, seq } => raise(&mut self.seq_high, node, seq),
            Identity::Seq { node, epoch: Some(epoch), seq } => {
                let epochs = match self.epoch_high.get_mut(node) {
                    Some(e) => e,
                    None => self.epoch_high.entry(node.to_owned()).or_default(),
                };
                raise(epochs, epoch, seq);
                if epochs.len() > MAX_EPOCHS_PER_NODE {
                    // A replay repeats only recent rows: forget the epoch with the lowest `seq`
                    // (in one buffer, the oldest run), never the one just raised.
                    let lowest = epochs.iter().filter(|(e, _)| e.as_str() != epoch).min_by_key(|(_, h)| **h);
                    if let Some(lowest) = lowest.map(|(e, _)| e.clone()) {
                        epochs.remove(&lowest);
                    }
                }
            }
            Identity::DeviceWindow { device, window_ms } => raise(&mut self.window_high, device, window_ms),
            Identity::Partial { source_partition, window_ms } => {
                self.partial_high.insert(source_partition, window_ms);
            }
            Identity::Late { source_partition, all_devices, source_offset } => {
                let map = if all_devices { &mut self.late_partial_high } else { &mut self.late_device_high };
                map.insert(source_partition, source_offset);
            }
            Identity::DeadLetter { source_partition, source_offset } => {
                self.deadletter_high.insert(source_partition, source_offset);
            }
            Identity::Unique => {}
        }
    }
}

/// Most epochs remembered per node (as in `process`).
pub const MAX_EPOCHS_PER_NODE: usize = crate::process::window::MAX_EPOCHS_PER_NODE;

/// Sets `map[key] = value`, allocating the key only when it is new. Called only after the
/// duplicate check, so `value` is above the current high-water.
fn raise<V>(map: &mut BTreeMap<String, V>, key: &str, value: V) {
    match map.get_mut(key) {
        Some(v) => *v = value,
        None => {
            map.insert(key.to_owned(), value);
        }
    }
}

/// What the sink knows about a file once it is in S3 (enough to list it in a manifest again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub object_key: String,
    pub rows: u64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// A bucket that opened before a checkpoint's resume offset and sealed at or after it: its file
/// is in S3 already.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phantom {
    pub key: BucketKey,
    pub file: FileInfo,
}

/// The sink's checkpoint state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkState {
    pub small: SmallState,
    pub phantoms: Vec<Phantom>,
}

/// Where a row went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A copy of a row already seen: dropped.
    Duplicate,
    /// Its bucket is in S3 already (a phantom during replay): dropped.
    InS3,
    /// Append to this bucket; `opened` when the row opened it.
    Into { key: BucketKey, first_offset: i64, opened: bool },
}

/// A bucket in a seal group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedBucket {
    /// A bucket this run filled: its spool becomes a file.
    Fresh { key: BucketKey, first_offset: i64 },
    /// A phantom: its file is in S3 already.
    InS3(Phantom),
}

/// Buckets that sealed together and share a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealGroup {
    pub hour_ms: i64,
    /// `None` for an hour's main group; the late bucket's first offset for a late group.
    pub late_first_offset: Option<i64>,
    /// The offset of the input that sealed them.
    pub seal_offset: i64,
    pub buckets: Vec<SealedBucket>,
}

/// What one input did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    pub sealed: Vec<SealGroup>,
    /// `None` for a tick.
    pub decision: Option<Decision>,
}

#[derive(Debug, Clone)]
struct OpenBucket {
    first_offset: i64,
    snapshot: SmallState,
}

#[derive(Debug, Clone)]
struct Done {
    seal_offset: i64,
    phantom: Phantom,
}

/// The sink's state machine and upload ledger for one input partition.
#[derive(Debug, Clone)]
pub struct PartitionSink {
    seal_grace_ms: i64,
    small: SmallState,
    open: BTreeMap<BucketKey, OpenBucket>,
    phantoms: BTreeMap<BucketKey, FileInfo>,
    /// Sealed fresh buckets whose group is not in S3 yet, by first offset.
    pending: BTreeMap<i64, SmallState>,
    /// Buckets in S3 whose seal offset may still be at or after a future resume offset.
    done: Vec<Done>,
    /// The restored checkpoint, re-issued while any of its phantoms is not sealed and done.
    anchor: Option<(i64, SinkState)>,
    phantoms_outstanding: usize,
}

impl PartitionSink {
    /// A machine starting at `resume_offset` from `state` (the default state for a fresh start).
    pub fn new(seal_grace_ms: i64, resume_offset: i64, state: SinkState) -> Self {
        let phantoms: BTreeMap<BucketKey, FileInfo> = state.phantoms.iter().map(|p| (p.key, p.file.clone())).collect();
        let outstanding = phantoms.len();
        Self {
            seal_grace_ms,
            small: state.small.clone(),
            open: BTreeMap::new(),
            phantoms,
            pending: BTreeMap::new(),
            done: Vec::new(),
            anchor: (outstanding > 0).then_some((resume_offset, state)),
            phantoms_outstanding: outstanding,
        }
    }

    /// The partition's clock.
    pub fn clock_ms(&self) -> Option<i64> {
        self.small.clock_ms
    }

    /// Whether any bucket is open (an idle partition then needs ticks to seal it).
    pub fn has_open_buckets(&self) -> bool {
        !self.open.is_empty() || !self.phantoms.is_empty()
    }

    /// Open buckets.
    pub fn open_buckets(&self) -> usize {
        self.open.len()
    }

    /// Applies the input at `offset`.
    pub fn apply(&mut self, offset: i64, input: Input<'_>) -> Step {
        match input {
            Input::Tick { time_ms } => {
                let mut step = Step::default();
                let old = self.small.clock_ms;
                self.small.clock_ms = Some(old.map_or(time_ms, |c| c.max(time_ms)));
                self.seal(offset, &mut step.sealed);
                step
            }
            Input::Row(meta) => self.row(offset, meta),
        }
    }

    fn row(&mut self, offset: i64, meta: RowMeta<'_>) -> Step {
        if self.small.is_duplicate(&meta.identity) {
            return Step { sealed: Vec::new(), decision: Some(Decision::Duplicate) };
        }
        let old = self.small.clock_ms;
        let new = if meta.advances_clock { Some(old.map_or(meta.time_ms, |c| c.max(meta.time_ms))) } else { old };
        let event = self.is_seal_event(old, new);
        let hour = hour_start(meta.time_ms);
        let late = new.is_some_and(|c| self.hour_sealed(hour, c));
        let key = BucketKey { family: meta.family, hour_ms: hour, late };
        // After this input's seal event, is the row's bucket still open? (All late buckets
        // seal at an event; a main bucket for an unsealed hour does not.)
        let survives_event = |k: &BucketKey| !(event && k.late);
        let exists = (self.open.contains_key(&key) || self.phantoms.contains_key(&key)) && survives_event(&key);
        let snapshot = (!exists).then(|| self.small.clone());

        self.small.record(&meta.identity);
        self.small.clock_ms = new;
        let mut step = Step::default();
        if event {
            self.seal(offset, &mut step.sealed);
        }
        if self.phantoms.contains_key(&key) {
            step.decision = Some(Decision::InS3);
            return step;
        }
        let decision = match (self.open.get(&key), snapshot) {
            (Some(b), _) => Decision::Into { key, first_offset: b.first_offset, opened: false },
            (None, Some(snapshot)) => {
                self.open.insert(key, OpenBucket { first_offset: offset, snapshot });
                Decision::Into { key, first_offset: offset, opened: true }
            }
            // `exists` said the bucket survives the event, and nothing else removes buckets.
            (None, None) => unreachable!("an existing bucket survived its seal event"),
        };
        step.decision = Some(decision);
        step
    }

    fn hour_sealed(&self, hour_ms: i64, clock_ms: i64) -> bool {
        hour_ms.saturating_add(HOUR_MS).saturating_add(self.seal_grace_ms) <= clock_ms
    }

    fn is_seal_event(&self, old: Option<i64>, new: Option<i64>) -> bool {
        let boundary = |c: i64| c.saturating_sub(self.seal_grace_ms).div_euclid(HOUR_MS);
        match (old, new) {
            (None, Some(_)) => true,
            (Some(o), Some(n)) => boundary(n) != boundary(o),
            _ => false,
        }
    }

    /// Seals what the current clock seals: main buckets of sealed hours (one group per hour)
    /// and every late bucket (one group each).
    fn seal(&mut self, offset: i64, groups: &mut Vec<SealGroup>) {
        let Some(clock) = self.small.clock_ms else { return };
        let keys: Vec<BucketKey> = self
            .open
            .keys()
            .chain(self.phantoms.keys())
            .filter(|k| k.late || self.hour_sealed(k.hour_ms, clock))
            .copied()
            .collect();
        let mut main: BTreeMap<i64, Vec<SealedBucket>> = BTreeMap::new();
        let mut late: Vec<SealGroup> = Vec::new();
        let mut sorted = keys;
        sorted.sort();
        for key in sorted {
            let (sealed, first) = if let Some(b) = self.open.remove(&key) {
                self.pending.insert(b.first_offset, b.snapshot);
                (SealedBucket::Fresh { key, first_offset: b.first_offset }, b.first_offset)
            } else if let Some(file) = self.phantoms.remove(&key) {
                let first = file.first_offset;
                (SealedBucket::InS3(Phantom { key, file }), first)
            } else {
                continue;
            };
            if key.late {
                late.push(SealGroup {
                    hour_ms: key.hour_ms,
                    late_first_offset: Some(first),
                    seal_offset: offset,
                    buckets: vec![sealed],
                });
            } else {
                main.entry(key.hour_ms).or_default().push(sealed);
            }
        }
        groups.extend(main.into_iter().map(|(hour_ms, buckets)| SealGroup {
            hour_ms,
            late_first_offset: None,
            seal_offset: offset,
            buckets,
        }));
        late.sort_by_key(|g| (g.hour_ms, g.late_first_offset));
        groups.extend(late);
    }

    /// Records that a group is in S3 (files and manifest). `files` gives, for each fresh bucket
    /// of the group in order, what was uploaded.
    pub fn group_done(&mut self, group: &SealGroup, files: &[FileInfo]) {
        let mut files = files.iter();
        for bucket in &group.buckets {
            match bucket {
                SealedBucket::Fresh { key, first_offset } => {
                    self.pending.remove(first_offset);
                    if let Some(file) = files.next() {
                        self.done.push(Done {
                            seal_offset: group.seal_offset,
                            phantom: Phantom { key: *key, file: file.clone() },
                        });
                    }
                }
                SealedBucket::InS3(phantom) => {
                    self.phantoms_outstanding = self.phantoms_outstanding.saturating_sub(1);
                    self.done.push(Done { seal_offset: group.seal_offset, phantom: phantom.clone() });
                }
            }
        }
        if self.phantoms_outstanding == 0 {
            self.anchor = None;
        }
    }

    /// The checkpoint to write when the partition's position (next offset to read) is
    /// `position`: `(resume_offset, state)`.
    pub fn checkpoint(&mut self, position: i64) -> (i64, SinkState) {
        if let Some((r, state)) = &self.anchor {
            return (*r, state.clone());
        }
        let oldest_open = self.open.values().map(|b| (b.first_offset, &b.snapshot)).min_by_key(|(o, _)| *o);
        let oldest_pending = self.pending.iter().next().map(|(o, s)| (*o, s));
        let oldest = match (oldest_open, oldest_pending) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let (resume, small) = match oldest {
            Some((offset, snapshot)) => (offset, snapshot.clone()),
            None => (position, self.small.clone()),
        };
        self.done.retain(|d| d.seal_offset >= resume);
        let mut phantoms: Vec<Phantom> =
            self.done.iter().filter(|d| d.phantom.file.first_offset < resume).map(|d| d.phantom.clone()).collect();
        phantoms.sort_by_key(|p| p.key);
        (resume, SinkState { small, phantoms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H0: i64 = 1_735_203_600_000; // 2024-12-26T09:00:00Z
    const GRACE: i64 = 60_000;

    fn reading(node: &str, seq: u64, t: i64) -> Input<'_> {
        Input::Row(RowMeta {
            family: Family::Filtered,
            time_ms: t,
            advances_clock: true,
            identity: Identity::Seq { node, epoch: None, seq },
        })
    }

    fn into(step: &Step) -> (BucketKey, i64, bool) {
        match step.decision {
            Some(Decision::Into { key, first_offset, opened }) => (key, first_offset, opened),
            ref other => panic!("expected a bucket, got {other:?}"),
        }
    }

    #[test]
    fn rows_fill_hour_buckets_that_seal_after_the_grace() {
        let mut m = PartitionSink::new(GRACE, 0, SinkState::default());
        let s = m.apply(10, reading("n", 1, H0 + 1_000));
        assert_eq!(into(&s), (BucketKey { family: Family::Filtered, hour_ms: H0, late: false }, 10, true));
        let s = m.apply(11, reading("n", 2, H0 + HOUR_MS + 5_000));
        assert!(s.sealed.is_empty());
        assert_eq!(into(&s).1, 11, "the next hour has its own bucket");
        let s = m.apply(12, reading("n", 3, H0 + 2_000));
        assert_eq!(into(&s), (BucketKey { family: Family::Filtered, hour_ms: H0, late: false }, 10, false));
        // The clock reaches 10:01 = 10:00 + grace: hour 09 seals.
        let s = m.apply(13, reading("n", 4, H0 + HOUR_MS + GRACE));
        assert_eq!(
            s.sealed,
            vec![SealGroup {
                hour_ms: H0,
                late_first_offset: None,
                seal_offset: 13,
                buckets: vec![SealedBucket::Fresh {
                    key: BucketKey { family: Family::Filtered, hour_ms: H0, late: false },
                    first_offset: 10
                }],
            }]
        );
        // A row for the sealed hour goes to a late bucket, which the next event seals.
        let s = m.apply(14, reading("n", 5, H0 + 3_000));
        assert_eq!(into(&s), (BucketKey { family: Family::Filtered, hour_ms: H0, late: true }, 14, true));
        let s = m.apply(15, Input::Tick { time_ms: H0 + HOUR_MS + GRACE });
        assert_eq!(s.sealed.len(), 1);
        assert_eq!(s.sealed[0].late_first_offset, Some(14));
        // Duplicates are dropped.
        assert_eq!(m.apply(16, reading("n", 4, H0 + HOUR_MS)).decision, Some(Decision::Duplicate));
    }

    #[test]
    fn dedup_identities_follow_their_sources() {
        let mut m = PartitionSink::new(GRACE, 0, SinkState::default());
        let agg = |device, window_ms| {
            Input::Row(RowMeta {
                family: Family::Aggregated,
                time_ms: window_ms,
                advances_clock: true,
                identity: Identity::DeviceWindow { device, window_ms },
            })
        };
        let partial = |source_partition, window_ms| {
            Input::Row(RowMeta {
                family: Family::Aggregated,
                time_ms: window_ms,
                advances_clock: true,
                identity: Identity::Partial { source_partition, window_ms },
            })
        };
        assert!(matches!(m.apply(0, agg("a", H0)).decision, Some(Decision::Into { .. })));
        assert!(matches!(m.apply(1, agg("b", H0)).decision, Some(Decision::Into { .. })));
        assert!(matches!(m.apply(2, agg("a", H0 + 60_000)).decision, Some(Decision::Into { .. })));
        assert_eq!(m.apply(3, agg("a", H0)).decision, Some(Decision::Duplicate));
        assert!(matches!(m.apply(4, partial(0, H0)).decision, Some(Decision::Into { .. })));
        assert!(matches!(m.apply(5, partial(1, H0)).decision, Some(Decision::Into { .. })));
        assert_eq!(m.apply(6, partial(1, H0)).decision, Some(Decision::Duplicate));
        let dl = |source_offset| {
            Input::Row(RowMeta {
                family: Family::Deadletter,
                time_ms: H0 + 5 * HOUR_MS,
                advances_clock: false,
                identity: Identity::DeadLetter { source_partition: 0, source_offset },
            })
        };
        assert!(matches!(m.apply(7, dl(100)).decision, Some(Decision::Into { .. })));
        assert_eq!(m.apply(8, dl(100)).decision, Some(Decision::Duplicate));
        assert_eq!(m.clock_ms(), Some(H0 + 60_000), "process dead letters do not move the clock");
    }

    /// Class 7 of issue 10, in the sink: readings of a second epoch of a node below the first
    /// epoch's `seq`s are new rows; only a copy within its own epoch is a duplicate.
    #[test]
    fn readings_deduplicate_per_node_and_epoch() {
        let many: Vec<String> = (0..MAX_EPOCHS_PER_NODE + 5).map(|e| format!("e{e}")).collect();
        let mut m = PartitionSink::new(GRACE, 0, SinkState::default());
        let of = |epoch, seq| {
            Input::Row(RowMeta {
                family: Family::Filtered,
                time_ms: H0 + 1_000,
                advances_clock: true,
                identity: Identity::Seq { node: "n", epoch, seq },
            })
        };
        assert!(matches!(m.apply(0, of(Some("a"), 100)).decision, Some(Decision::Into { .. })));
        assert!(matches!(m.apply(1, of(Some("b"), 50)).decision, Some(Decision::Into { .. })));
        assert!(matches!(m.apply(2, of(None, 10)).decision, Some(Decision::Into { .. })));
        assert_eq!(m.apply(3, of(Some("a"), 100)).decision, Some(Decision::Duplicate));
        assert_eq!(m.apply(4, of(Some("b"), 49)).decision, Some(Decision::Duplicate));
        assert_eq!(m.apply(5, of(None, 10)).decision, Some(Decision::Duplicate));
        for (e, epoch) in many.iter().enumerate() {
            m.apply(6 + e as i64, of(Some(epoch), 1_000 + e as u64));
        }
        // Bounded per node: the epochs with the lowest `seq` ("b", "a", then e0…) are forgotten.
        let offset = 10 + many.len() as i64;
        assert_eq!(m.apply(offset, of(Some(&many[20]), 1_020)).decision, Some(Decision::Duplicate));
        assert!(matches!(m.apply(offset + 1, of(Some("b"), 50)).decision, Some(Decision::Into { .. })));
    }

    #[test]
    fn checkpoint_points_at_the_oldest_bucket_not_in_s3() {
        let mut m = PartitionSink::new(GRACE, 0, SinkState::default());
        assert_eq!(m.checkpoint(0).0, 0);
        m.apply(5, reading("n", 1, H0));
        let before_10 = m.small.clone();
        m.apply(10, reading("n", 2, H0 + HOUR_MS));
        let s = m.apply(20, reading("n", 3, H0 + HOUR_MS + GRACE));
        let group = s.sealed[0].clone();
        // Hour 09 (first offset 5) is sealed but not uploaded: resume there.
        let (r, state) = m.checkpoint(21);
        assert_eq!(r, 5);
        assert_eq!(state.small, SmallState::default());
        assert!(state.phantoms.is_empty());
        // Uploaded: the oldest open bucket is hour 10 (first offset 10); hour 09 sealed at 20,
        // after 10, so a replay from 10 must skip its rows.
        let file = FileInfo { object_key: "k".into(), rows: 1, first_offset: 5, last_offset: 5 };
        m.group_done(&group, std::slice::from_ref(&file));
        let (r, state) = m.checkpoint(21);
        assert_eq!(r, 10);
        assert_eq!(state.small, before_10);
        assert_eq!(
            state.phantoms,
            vec![Phantom { key: BucketKey { family: Family::Filtered, hour_ms: H0, late: false }, file }]
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        enum In {
            Reading {
                node: u8,
                seq: u64,
                dt: i64,
                family: u8,
            },
            Agg {
                device: u8,
                minute: i64,
            },
            DeadLetter {
                source_offset: i64,
                dt: i64,
            },
            Tick {
                dt: i64,
            },
            /// The shell finishes uploading one of the sealed groups (any, not only the oldest).
            Upload(u8),
        }

        fn input() -> impl Strategy<Value = In> {
            prop_oneof![
                10 => (0u8..3, 0u64..60, -5_400_000i64..1_800_000, 0u8..2)
                    .prop_map(|(node, seq, dt, family)| In::Reading { node, seq, dt, family }),
                3 => (0u8..3, -200i64..60).prop_map(|(device, minute)| In::Agg { device, minute }),
                1 => (0i64..50, -7_200_000i64..7_200_000).prop_map(|(source_offset, dt)| In::DeadLetter { source_offset, dt }),
                1 => (0i64..3_600_000).prop_map(|dt| In::Tick { dt }),
                4 => any::<u8>().prop_map(In::Upload),
            ]
        }

        const NODES: [&str; 3] = ["n0", "n1", "n2"];
        const DEVICES: [&str; 3] = ["d0", "d1", "d2"];

        /// The object store: key → rows (offsets); create-only, and a second write of a key
        /// must carry the same rows.
        type S3 = BTreeMap<String, Vec<i64>>;

        fn object_key(key: &BucketKey, first: i64) -> String {
            format!("{}_{}_{}_{first}", key.family.as_str(), key.hour_ms, key.late)
        }

        /// A sealed file: its key and its rows (input offsets).
        type SealedFile = (String, Vec<i64>);

        struct Shell {
            m: PartitionSink,
            rows: BTreeMap<i64, Vec<i64>>,
            sealed: Vec<(SealGroup, Vec<SealedFile>)>,
            manifests: BTreeMap<String, Vec<String>>,
        }

        impl Shell {
            fn new(m: PartitionSink) -> Self {
                Self { m, rows: BTreeMap::new(), sealed: Vec::new(), manifests: BTreeMap::new() }
            }

            /// Applies input `i` (its offset is `i`), uploading into `s3` when asked.
            fn feed(&mut self, i: usize, input: &In, s3: &mut S3) -> Result<(), TestCaseError> {
                let offset = i as i64;
                let base = H0 + 600_000 * i as i64;
                let step = match input {
                    In::Reading { node, seq, dt, family } => self.m.apply(
                        offset,
                        Input::Row(RowMeta {
                            family: if *family == 0 { Family::Filtered } else { Family::Rejected },
                            time_ms: base + dt,
                            advances_clock: true,
                            identity: Identity::Seq { node: NODES[*node as usize], epoch: None, seq: *seq },
                        }),
                    ),
                    In::Agg { device, minute } => {
                        let window_ms = (base / 60_000 + minute) * 60_000;
                        self.m.apply(
                            offset,
                            Input::Row(RowMeta {
                                family: Family::Aggregated,
                                time_ms: window_ms,
                                advances_clock: true,
                                identity: Identity::DeviceWindow { device: DEVICES[*device as usize], window_ms },
                            }),
                        )
                    }
                    In::DeadLetter { source_offset, dt } => self.m.apply(
                        offset,
                        Input::Row(RowMeta {
                            family: Family::Deadletter,
                            time_ms: base + dt,
                            advances_clock: false,
                            identity: Identity::DeadLetter { source_partition: 0, source_offset: *source_offset },
                        }),
                    ),
                    In::Tick { dt } => self.m.apply(offset, Input::Tick { time_ms: base + dt }),
                    In::Upload(pick) => {
                        self.upload_one(*pick as usize, s3)?;
                        return Ok(());
                    }
                };
                // Seal before routing, as the machine does.
                for group in step.sealed {
                    let files = group
                        .buckets
                        .iter()
                        .filter_map(|b| match b {
                            SealedBucket::Fresh { key, first_offset } => Some((
                                object_key(key, *first_offset),
                                self.rows.remove(first_offset).unwrap_or_default(),
                            )),
                            SealedBucket::InS3(_) => None,
                        })
                        .collect();
                    self.sealed.push((group, files));
                }
                if let Some(Decision::Into { first_offset, .. }) = step.decision {
                    self.rows.entry(first_offset).or_default().push(offset);
                }
                Ok(())
            }

            fn upload_one(&mut self, pick: usize, s3: &mut S3) -> Result<(), TestCaseError> {
                if self.sealed.is_empty() {
                    return Ok(());
                }
                let (group, files) = self.sealed.remove(pick % self.sealed.len());
                let mut infos = Vec::new();
                let mut listed = Vec::new();
                for (key, rows) in &files {
                    match s3.get(key) {
                        Some(existing) => prop_assert_eq!(existing, rows, "a replay rewrote {} differently", key),
                        None => {
                            s3.insert(key.clone(), rows.clone());
                        }
                    }
                    infos.push(FileInfo {
                        object_key: key.clone(),
                        rows: rows.len() as u64,
                        first_offset: rows[0],
                        last_offset: *rows.last().unwrap_or(&rows[0]),
                    });
                }
                for b in &group.buckets {
                    match b {
                        SealedBucket::Fresh { key, first_offset } => listed.push(object_key(key, *first_offset)),
                        SealedBucket::InS3(p) => listed.push(p.file.object_key.clone()),
                    }
                }
                listed.sort();
                let manifest = format!("{}_{:?}", group.hour_ms, group.late_first_offset);
                match self.manifests.get(&manifest) {
                    Some(existing) => prop_assert_eq!(existing, &listed, "manifest {} differs on replay", manifest),
                    None => {
                        self.manifests.insert(manifest, listed);
                    }
                }
                self.m.group_done(&group, &infos);
                Ok(())
            }

            fn drain(&mut self, s3: &mut S3) -> Result<(), TestCaseError> {
                while !self.sealed.is_empty() {
                    self.upload_one(0, s3)?;
                }
                Ok(())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Crash at any point, restore from the last checkpoint taken at any earlier point,
            /// replay to the end: S3 ends with exactly the objects (same keys, same rows) and
            /// manifests of a run that never crashed, and no key is ever written with other rows.
            #[test]
            fn replay_from_any_checkpoint_yields_identical_outputs(
                inputs in proptest::collection::vec(input(), 1..80),
                at in any::<proptest::sample::Index>(),
                crash in any::<proptest::sample::Index>(),
            ) {
                let n = inputs.len();
                let ckpt_at = at.index(n + 1);
                let crash_at = ckpt_at + crash.index(n + 1 - ckpt_at);
                let end = H0 + 600_000 * (n as i64 + 100);

                // The reference run: no crash.
                let mut s3_ref = S3::new();
                let mut reference = Shell::new(PartitionSink::new(GRACE, 0, SinkState::default()));
                for (i, input) in inputs.iter().enumerate() {
                    reference.feed(i, input, &mut s3_ref)?;
                }
                reference.feed(n, &In::Tick { dt: end - H0 - 600_000 * n as i64 }, &mut s3_ref)?;
                reference.drain(&mut s3_ref)?;

                // The crashing run: checkpoint after `ckpt_at` inputs, crash after `crash_at`.
                let mut s3 = S3::new();
                let mut first = Shell::new(PartitionSink::new(GRACE, 0, SinkState::default()));
                let mut checkpoint = (0, SinkState::default());
                for (i, input) in inputs.iter().enumerate().take(crash_at) {
                    if i == ckpt_at {
                        checkpoint = first.m.checkpoint(i as i64);
                    }
                    first.feed(i, input, &mut s3)?;
                }
                if ckpt_at == crash_at {
                    checkpoint = first.m.checkpoint(crash_at as i64);
                }
                let (resume, state) = serde_json::from_slice::<(i64, SinkState)>(&serde_json::to_vec(&checkpoint).expect("encodes")).expect("decodes");
                let mut manifests = std::mem::take(&mut first.manifests);
                let mut second = Shell::new(PartitionSink::new(GRACE, resume, state));
                second.manifests = std::mem::take(&mut manifests);
                for (i, input) in inputs.iter().enumerate().skip(resume as usize) {
                    second.feed(i, input, &mut s3)?;
                }
                second.feed(n, &In::Tick { dt: end - H0 - 600_000 * n as i64 }, &mut s3)?;
                second.drain(&mut s3)?;

                prop_assert_eq!(&s3, &s3_ref);
                prop_assert_eq!(&second.manifests, &reference.manifests);
                let mut every_row: Vec<i64> = s3.values().flatten().copied().collect();
                every_row.sort_unstable();
                let before = every_row.len();
                every_row.dedup();
                prop_assert_eq!(before, every_row.len(), "a row is in two objects");
            }
        }
    }
}
