//! `edgeflow-agent buffer inspect|verify|export`: look into a buffer file without the daemon.
//!
//! The file is opened exclusively (redb locks it), so these commands refuse to run against the
//! buffer of a running agent instead of reading it half-written; use `/metrics` for a live
//! agent. A damaged or foreign file is reported, never a crash.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::buffer::entry::{self, Kind};
use crate::buffer::{Store, StoreError, StoreOptions, WhenFull};

fn open(path: &Path) -> Result<Store, StoreError> {
    let opts =
        StoreOptions { max_bytes: u64::MAX, when_full: WhenFull::Block, dedup_horizon: u64::MAX, cache_bytes: 8 << 20 };
    Store::open_existing(path, opts).map_err(|e| match e {
        StoreError::Open { path, source: redb::DatabaseError::DatabaseAlreadyOpen } => StoreError::Foreign {
            path,
            reason: "it is in use by a running agent (stop it first, or read its /metrics)".into(),
        },
        other => other,
    })
}

/// Summary of a buffer.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub path: String,
    pub node_id: String,
    pub file_bytes: u64,
    pub entries: u64,
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub next_seq: u64,
    pub oldest_age_seconds: Option<f64>,
    pub dedup_entries: u64,
}

/// `buffer inspect`
pub fn inspect(path: &Path) -> Result<Summary, StoreError> {
    let store = open(path)?;
    let s = store.stats();
    Ok(Summary {
        path: path.display().to_string(),
        node_id: store.node_id().to_owned(),
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        entries: s.count,
        bytes: s.bytes,
        first_seq: s.first_seq,
        next_seq: s.next_seq,
        oldest_age_seconds: s.oldest_received_ms.map(|t| (crate::buffer::now_ms() - t).max(0) as f64 / 1000.0),
        dedup_entries: s.dedup_entries,
    })
}

/// `buffer verify`: integrity check; returns the number of entries checked.
pub fn verify(path: &Path) -> Result<u64, StoreError> {
    open(path)?.verify()
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    kind: &'a str,
    received_at_ms: i64,
    key: String,
    value: &'a RawValue,
}

/// `buffer export`: every entry as a JSON line, in `seq` order. Returns the count.
pub fn export(path: &Path, out: &mut dyn Write) -> Result<u64, StoreError> {
    let store = open(path)?;
    let mut from = 0;
    let mut n = 0;
    loop {
        let rows = store.read(from, 1024, 8 << 20)?;
        let Some(last) = rows.last().map(|r| r.0) else { break };
        for (seq, bytes) in &rows {
            let e = entry::decode(bytes).map_err(|e| StoreError::Damaged(format!("entry {seq}: {e}")))?;
            let text =
                std::str::from_utf8(e.value).map_err(|_| StoreError::Damaged(format!("entry {seq} is not UTF-8")))?;
            let value: &RawValue =
                serde_json::from_str(text).map_err(|_| StoreError::Damaged(format!("entry {seq} is not JSON")))?;
            let line = Line {
                seq: *seq,
                kind: match e.kind {
                    Kind::Record => "record",
                    Kind::DeadLetter => "dead_letter",
                },
                received_at_ms: e.received_ms,
                key: String::from_utf8_lossy(e.key).into_owned(),
                value,
            };
            let json = serde_json::to_string(&line).map_err(|e| StoreError::Damaged(e.to_string()))?;
            writeln!(out, "{json}").map_err(|e| StoreError::Damaged(format!("writing the export: {e}")))?;
            n += 1;
        }
        from = last + 1;
    }
    Ok(n)
}
