//! Logging: `tracing` events to the systemd journal or to stderr.
//!
//! Under systemd (stderr connected to the journal) events go to journald through
//! systemd-journal-logger, with each structured field as a journal field
//! (`journalctl -u edgeflow-agent -o verbose` shows `NODE_ID=…`, `SEQ=…`). Otherwise they go to
//! stderr, human-readable. `RUST_LOG` (or the `default_filter`) sets the levels.

use std::fmt::Write as _;

use systemd_journal_logger::JournalLog;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, registry};

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The journal if stderr is connected to it, stderr otherwise.
    Auto,
    /// Always stderr.
    Stderr,
}

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored), so
/// tests may call `run` repeatedly in one process.
pub fn init(default_filter: &str, target: Target) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let journal = (target == Target::Auto && systemd_journal_logger::connected_to_journal())
        .then(|| JournalLog::new().ok())
        .flatten();
    let result = match journal {
        Some(journal) => registry().with(filter).with(JournalLayer { journal }).try_init(),
        None => registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
            .try_init(),
    };
    // An already-installed subscriber (tests) is fine.
    drop(result);
}

/// Sends each event to journald with its fields as journal fields.
struct JournalLayer {
    journal: JournalLog,
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.pairs.push((field.name().to_owned(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.pairs.push((field.name().to_owned(), format!("{value:?}")));
        }
    }
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        // Also show the fields in the MESSAGE, so plain `journalctl -u` is readable.
        let mut message = fields.message;
        for (k, v) in &fields.pairs {
            let _ = write!(message, " {k}={v}");
        }
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => log::Level::Error,
            Level::WARN => log::Level::Warn,
            Level::INFO => log::Level::Info,
            Level::DEBUG => log::Level::Debug,
            Level::TRACE => log::Level::Trace,
        };
        let kvs: Vec<(&str, &str)> = fields.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let _ = self.journal.journal_send(
            &log::Record::builder()
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .args(format_args!("{message}"))
                .build(),
        );
    }
}
