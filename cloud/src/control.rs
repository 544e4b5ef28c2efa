//! Control records: what a stage appends to its own input partitions.
//!
//! A control record carries the Kafka header `edgeflow-control` with value `tick` or
//! `checkpoint`, and a JSON value. Consumers recognise it by the header before any parsing, so
//! a control record is never mistaken for data (and other consumers of these topics can skip
//! it the same way).
//!
//! * **tick** `{"time_ms": …}`: the partition was idle for `idle_timeout` (wall clock). Reading a
//!   tick advances the partition's event-time clock exactly like a record with that event time.
//!   Because the tick is in the log, a replay makes the same decisions: the stages never read a
//!   clock to close a window or seal an hour.
//! * **checkpoint** `{"resume_offset": R, "state": …}`: the stage's state as of input offset `R`
//!   (every input below `R` applied, nothing at or above). The committed consumer-group offset
//!   always points at a checkpoint; see the stage modules for when one may be taken.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The header that marks a control record.
pub const HEADER: &str = "edgeflow-control";

/// The kinds of control record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    Tick,
    Checkpoint,
}

impl ControlKind {
    /// The header value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tick => "tick",
            Self::Checkpoint => "checkpoint",
        }
    }

    /// Recognises the header value; `None` for an unknown kind.
    pub fn from_header(value: &[u8]) -> Option<Self> {
        match value {
            b"tick" => Some(Self::Tick),
            b"checkpoint" => Some(Self::Checkpoint),
            _ => None,
        }
    }
}

/// A tick's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    /// The event time the partition's clock advances to, milliseconds since the epoch.
    pub time_ms: i64,
}

/// A checkpoint's value, generic over the stage's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint<S> {
    /// The first input offset the state does not include: resume reading there.
    pub resume_offset: i64,
    /// The stage's state as of `resume_offset`.
    pub state: S,
}

/// Why a control record could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("control record is not valid: {0}")]
pub struct ControlError(#[from] serde_json::Error);

impl Tick {
    pub fn to_json(self) -> Vec<u8> {
        // A struct of one integer serialises infallibly.
        serde_json::to_vec(&self).expect("serialising a tick is infallible")
    }

    pub fn parse(value: &[u8]) -> Result<Self, ControlError> {
        Ok(serde_json::from_slice(value)?)
    }
}

impl<S: Serialize> Checkpoint<S> {
    pub fn to_json(&self) -> Result<Vec<u8>, ControlError> {
        Ok(serde_json::to_vec(self)?)
    }
}

impl<S: DeserializeOwned> Checkpoint<S> {
    pub fn parse(value: &[u8]) -> Result<Self, ControlError> {
        Ok(serde_json::from_slice(value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_round_trip() {
        for k in [ControlKind::Tick, ControlKind::Checkpoint] {
            assert_eq!(ControlKind::from_header(k.as_str().as_bytes()), Some(k));
        }
        assert_eq!(ControlKind::from_header(b"other"), None);
    }

    #[test]
    fn values_round_trip() {
        let t = Tick { time_ms: 1_735_207_200_000 };
        assert_eq!(String::from_utf8(t.to_json()).expect("utf8"), r#"{"time_ms":1735207200000}"#);
        assert_eq!(Tick::parse(&t.to_json()).expect("parses"), t);
        let c = Checkpoint { resume_offset: 42, state: vec![1u8, 2] };
        assert_eq!(Checkpoint::<Vec<u8>>::parse(&c.to_json().expect("encodes")).expect("parses"), c);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// A control record anybody could have written never panics a stage: it parses or
            /// is an error (a checkpoint that does not parse halts its partition).
            #[test]
            fn arbitrary_bytes_never_panic_the_control_parsers(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = Tick::parse(&bytes);
                let _ = Checkpoint::<crate::process::window::WindowState>::parse(&bytes);
                let _ = Checkpoint::<crate::sink::state::SinkState>::parse(&bytes);
                let _ = crate::processed::Processed::parse(&bytes);
            }

            /// Near-misses of the real thing: a checkpoint's JSON with its numbers replaced by
            /// extreme or wrong-typed values.
            #[test]
            fn mangled_checkpoints_parse_or_fail_cleanly(n in prop_oneof![
                Just("null".to_owned()), Just("1e999".to_owned()), Just("-1".to_owned()),
                Just("18446744073709551616".to_owned()), Just("\"x\"".to_owned()), any::<i64>().prop_map(|v| v.to_string())
            ]) {
                let text = format!(r#"{{"resume_offset":{n},"state":{{"high":{{"n":{n}}},"max_event_ms":{n},"windows":{{"{n}":{{"devices":{{}},"all":{{"count":{n},"temperature_sum":{n},"temperature_min":{n},"temperature_max":{n},"humidity_sum":{n}}}}}}}}}}}"#);
                let _ = Checkpoint::<crate::process::window::WindowState>::parse(text.as_bytes());
            }
        }
    }
}
