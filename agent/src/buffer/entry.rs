//! The byte layout of one buffered entry.
//!
//! An entry is exactly what will be handed to Kafka, plus when it was received:
//!
//! ```text
//! byte 0       kind: 1 = record (raw-data), 2 = dead letter (raw-data-dlq)
//! bytes 1..9   received_at, milliseconds since the Unix epoch, i64 little-endian
//! bytes 9..11  key length k, u16 little-endian
//! 11..11+k     Kafka key (device_id for records, node_id for dead letters)
//! 11+k..       Kafka value (the JSON of `contract::RawRecord` or `contract::DeadLetter`)
//! ```
//!
//! The value is complete, `seq` included, so forwarding never re-encodes and what reaches
//! Kafka is byte for byte what was committed.

use std::fmt;

/// Which topic an entry goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An accepted reading, for `raw-data`.
    Record,
    /// A refused payload or a marker, for `raw-data-dlq`.
    DeadLetter,
}

const HEADER: usize = 11;

/// Why stored bytes are not an entry (a damaged or foreign file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("entry is {0} bytes, shorter than its {HEADER}-byte header")]
    Short(usize),
    #[error("entry kind {0} is unknown")]
    UnknownKind(u8),
    #[error("entry key length {key} exceeds the entry's {len} bytes")]
    KeyOverrun { key: usize, len: usize },
}

/// Encodes an entry.
pub fn encode(kind: Kind, received_ms: i64, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + key.len() + value.len());
    out.push(match kind {
        Kind::Record => 1,
        Kind::DeadLetter => 2,
    });
    out.extend_from_slice(&received_ms.to_le_bytes());
    // Keys are bounded far below 64 KiB by validation (device_id, node_id <= 128 bytes).
    let klen = u16::try_from(key.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&klen.to_le_bytes());
    out.extend_from_slice(&key[..usize::from(klen)]);
    out.extend_from_slice(value);
    out
}

/// A decoded view of an entry's bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub kind: Kind,
    pub received_ms: i64,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl fmt::Debug for EntryRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryRef")
            .field("kind", &self.kind)
            .field("received_ms", &self.received_ms)
            .field("key", &String::from_utf8_lossy(self.key))
            .field("value_len", &self.value.len())
            .finish()
    }
}

/// Decodes an entry's bytes.
pub fn decode(bytes: &[u8]) -> Result<EntryRef<'_>, DecodeError> {
    if bytes.len() < HEADER {
        return Err(DecodeError::Short(bytes.len()));
    }
    let kind = match bytes[0] {
        1 => Kind::Record,
        2 => Kind::DeadLetter,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&bytes[1..9]);
    let klen = usize::from(u16::from_le_bytes([bytes[9], bytes[10]]));
    if HEADER + klen > bytes.len() {
        return Err(DecodeError::KeyOverrun { key: klen, len: bytes.len() });
    }
    Ok(EntryRef {
        kind,
        received_ms: i64::from_le_bytes(ts),
        key: &bytes[HEADER..HEADER + klen],
        value: &bytes[HEADER + klen..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let bytes = encode(Kind::DeadLetter, -5, b"node", b"{\"x\":1}");
        let e = decode(&bytes).expect("decodes");
        assert_eq!((e.kind, e.received_ms, e.key, e.value), (Kind::DeadLetter, -5, &b"node"[..], &b"{\"x\":1}"[..]));
    }

    #[test]
    fn damaged_bytes_are_reported() {
        assert_eq!(decode(&[1, 2]), Err(DecodeError::Short(2)));
        assert_eq!(decode(&[9; 11]), Err(DecodeError::UnknownKind(9)));
        let mut bad = encode(Kind::Record, 0, b"k", b"v");
        bad[9] = 200;
        assert!(matches!(decode(&bad), Err(DecodeError::KeyOverrun { .. })));
    }
}
