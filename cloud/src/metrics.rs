//! Every metric the aggregator exports, defined in one place (prefix `edgeflow_aggregator_`).
//!
//! Label values are pre-registered, so a fresh process (and `edgeflow-aggregator metrics`)
//! shows every series at zero: dashboards and alerts can be checked against real names.

use std::sync::atomic::AtomicU64;

use edgeflow_contract::RejectReason;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::process::window::{SEQ_OUT_OF_RANGE, SEQ_REGRESSION};
use crate::processed::FilterReason;
use crate::sink::state::Family as FileFamily;

/// A pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Stage {
    #[allow(non_camel_case_types)]
    process,
    #[allow(non_camel_case_types)]
    sink,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: Stage,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StageTopicLabels {
    pub stage: Stage,
    pub topic: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ScopeLabels {
    /// `device` or `all`.
    pub scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;

/// The aggregator's metrics. Cheap to clone (every metric is an `Arc` inside).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Input records read, control records excluded.
    pub consumed: Family<StageTopicLabels, Counter>,
    /// Readings that passed the filter.
    pub filtered: Counter,
    /// Readings the filter removed, by reason.
    pub rejected: Family<ReasonLabels, Counter>,
    /// Copies dropped by dedup.
    pub duplicates: Family<StageLabels, Counter>,
    /// Readings for a window already emitted (each became a late correction).
    /// Records showing two agents writing as one node_id (their epochs interleave).
    pub writer_conflicts: Counter,
    pub late: Counter,
    /// Windows emitted on time: `device` aggregates and `all`-devices partials.
    pub windows: Family<ScopeLabels, Counter>,
    /// raw-data values that are not valid records, by reason.
    pub deadletters: Family<ReasonLabels, Counter>,
    /// processed-data values produced, by kind.
    pub produced: Family<KindLabels, Counter>,
    /// Rows written to Parquet files, by family.
    pub rows_written: Family<FamilyLabels, Counter>,
    /// Rows a replay skipped because their file is in S3 already.
    pub replay_skipped: Counter,
    /// Values on the sink's input that are not ours (archived as dead letters).
    pub foreign: Counter,
    /// Parquet files uploaded (created or found already there), by family.
    pub files_uploaded: Family<FamilyLabels, Counter>,
    /// Bytes of Parquet uploaded, by family.
    pub bytes_uploaded: Family<FamilyLabels, Counter>,
    /// Manifests uploaded.
    pub manifests_uploaded: Counter,
    /// Uploads that found their key already in S3 (a replay; HTTP 412).
    pub uploads_already_present: Counter,
    /// Time to upload one object, retries included.
    pub upload_seconds: Histogram,
    /// Failed upload attempts (each is retried).
    pub upload_errors: Counter,
    /// Upload attempts that found another writer's object (or one without edgeflow metadata)
    /// at their key: the group waits, never counted done.
    pub upload_conflicts: Counter,
    /// Uploads answered 412 whose object is this deployment's but holds other bytes (another
    /// version encoded the same input differently); kept as ours.
    pub uploads_reencoded: Counter,
    /// Age of the oldest record read by the sink and not yet in S3.
    pub oldest_pending_age: F64Gauge,
    /// Bytes in the spool (open files and sealed files awaiting upload).
    pub spool_bytes: Gauge,
    /// 1 while consumption is paused because the spool is full.
    pub paused: Gauge,
    /// Buckets being filled.
    pub open_buckets: Gauge,
    /// Windows being accumulated.
    pub open_windows: Gauge,
    /// Checkpoints committed.
    pub checkpoints: Family<StageLabels, Counter>,
    /// Ticks written to idle partitions.
    pub ticks: Family<StageLabels, Counter>,
    /// Seconds since the oldest assigned partition's last committed checkpoint.
    pub checkpoint_age: Family<StageLabels, F64Gauge>,
    /// Records between the consumer position and the end of its partitions.
    pub lag: Family<StageLabels, Gauge>,
    /// Partitions assigned to this instance.
    pub assigned: Family<StageLabels, Gauge>,
    /// Assigned partitions halted because their checkpoint cannot be read (operator action).
    pub halted: Family<StageLabels, Gauge>,
}

impl Metrics {
    /// Creates the metrics and registers them under `edgeflow_aggregator_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            consumed: Family::default(),
            filtered: Counter::default(),
            rejected: Family::default(),
            duplicates: Family::default(),
            writer_conflicts: Counter::default(),
            late: Counter::default(),
            windows: Family::default(),
            deadletters: Family::default(),
            produced: Family::default(),
            rows_written: Family::default(),
            replay_skipped: Counter::default(),
            foreign: Counter::default(),
            files_uploaded: Family::default(),
            bytes_uploaded: Family::default(),
            manifests_uploaded: Counter::default(),
            uploads_already_present: Counter::default(),
            upload_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            upload_errors: Counter::default(),
            upload_conflicts: Counter::default(),
            uploads_reencoded: Counter::default(),
            oldest_pending_age: F64Gauge::default(),
            spool_bytes: Gauge::default(),
            paused: Gauge::default(),
            open_buckets: Gauge::default(),
            open_windows: Gauge::default(),
            checkpoints: Family::default(),
            ticks: Family::default(),
            checkpoint_age: Family::default(),
            lag: Family::default(),
            assigned: Family::default(),
            halted: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("edgeflow_aggregator");
        r.register("records_consumed", "Input records read (control records excluded)", m.consumed.clone());
        r.register("records_filtered", "Readings that passed the filter", m.filtered.clone());
        r.register("records_rejected", "Readings the filter removed, by reason", m.rejected.clone());
        r.register("duplicates_dropped", "Copies of a record or aggregate dropped by dedup", m.duplicates.clone());
        r.register(
            "node_writer_conflicts",
            "Records showing two agents writing as one node_id (records of two epochs of a node interleave on a partition)",
            m.writer_conflicts.clone(),
        );
        r.register(
            "late_records",
            "Readings for a window already emitted (emitted as late corrections)",
            m.late.clone(),
        );
        r.register(
            "windows_emitted",
            "Windows emitted on time: per device and all-devices partials",
            m.windows.clone(),
        );
        r.register("deadletters", "raw-data values that are not valid records, by reason", m.deadletters.clone());
        r.register("processed_produced", "processed-data values produced, by kind", m.produced.clone());
        r.register("rows_written", "Rows written to Parquet files, by family", m.rows_written.clone());
        r.register(
            "replay_skipped_rows",
            "Rows a replay skipped because their file is in S3 already",
            m.replay_skipped.clone(),
        );
        r.register(
            "foreign_records",
            "Values on the sink's input that are not edgeflow's, archived as dead letters",
            m.foreign.clone(),
        );
        r.register("files_uploaded", "Parquet files uploaded, by family", m.files_uploaded.clone());
        r.register_with_unit("uploaded", "Parquet bytes uploaded, by family", Unit::Bytes, m.bytes_uploaded.clone());
        r.register("manifests_uploaded", "Hour manifests uploaded", m.manifests_uploaded.clone());
        r.register(
            "uploads_already_present",
            "Uploads whose key was already in S3 (HTTP 412 after a replay)",
            m.uploads_already_present.clone(),
        );
        r.register_with_unit(
            "upload_duration",
            "Time to upload one object, retries included",
            Unit::Seconds,
            m.upload_seconds.clone(),
        );
        r.register("upload_errors", "Failed upload attempts (each is retried)", m.upload_errors.clone());
        r.register(
            "upload_conflicts",
            "Upload attempts whose key holds an object another writer wrote (retried; the group is not committed past)",
            m.upload_conflicts.clone(),
        );
        r.register(
            "uploads_reencoded",
            "Uploads whose key holds this deployment's object with other bytes (another version's encoding; kept)",
            m.uploads_reencoded.clone(),
        );
        r.register_with_unit(
            "oldest_pending_record_age",
            "Age of the oldest record read by the sink and not yet in S3",
            Unit::Seconds,
            m.oldest_pending_age.clone(),
        );
        r.register_with_unit(
            "spool",
            "Bytes in the spool (open files and files awaiting upload)",
            Unit::Bytes,
            m.spool_bytes.clone(),
        );
        r.register(
            "consumption_paused",
            "1 while the sink pauses consumption because the spool is full",
            m.paused.clone(),
        );
        r.register("open_buckets", "Parquet buckets being filled", m.open_buckets.clone());
        r.register("open_windows", "Minute windows being accumulated", m.open_windows.clone());
        r.register("checkpoints", "Checkpoints committed", m.checkpoints.clone());
        r.register("ticks_written", "Ticks written to idle partitions", m.ticks.clone());
        r.register_with_unit(
            "checkpoint_age",
            "Time since the oldest assigned partition's last committed checkpoint",
            Unit::Seconds,
            m.checkpoint_age.clone(),
        );
        r.register(
            "consumer_lag_records",
            "Records between the consumer position and the end of its partitions",
            m.lag.clone(),
        );
        r.register("assigned_partitions", "Partitions assigned to this instance", m.assigned.clone());
        r.register(
            "halted_partitions",
            "Assigned partitions halted because their checkpoint cannot be read (nothing past it is processed or committed)",
            m.halted.clone(),
        );

        for stage in [Stage::process, Stage::sink] {
            let s = StageLabels { stage };
            m.duplicates.get_or_create_owned(&s);
            m.checkpoints.get_or_create_owned(&s);
            m.ticks.get_or_create_owned(&s);
            m.checkpoint_age.get_or_create_owned(&s);
            m.lag.get_or_create_owned(&s);
            m.assigned.get_or_create_owned(&s);
            m.halted.get_or_create_owned(&s);
        }
        for reason in FilterReason::ALL {
            m.rejected.get_or_create_owned(&ReasonLabels { reason: reason.as_str().into() });
        }
        for reason in RejectReason::ALL.iter().map(|r| r.as_str()).chain([SEQ_OUT_OF_RANGE, SEQ_REGRESSION]) {
            m.deadletters.get_or_create_owned(&ReasonLabels { reason: reason.into() });
        }
        for scope in ["device", "all"] {
            m.windows.get_or_create_owned(&ScopeLabels { scope: scope.into() });
        }
        for kind in ["filtered", "rejected", "aggregate", "deadletter"] {
            m.produced.get_or_create_owned(&KindLabels { kind: kind.into() });
        }
        for family in FileFamily::ALL {
            let f = FamilyLabels { family: family.as_str().into() };
            m.rows_written.get_or_create_owned(&f);
            m.files_uploaded.get_or_create_owned(&f);
            m.bytes_uploaded.get_or_create_owned(&f);
        }
        m
    }

    /// Pre-registers the consumed counter of a topic.
    pub fn topic(&self, stage: Stage, topic: &str) -> Counter {
        self.consumed.get_or_create_owned(&StageTopicLabels { stage, topic: topic.into() })
    }

    /// The OpenMetrics exposition of a fresh registry (every metric at zero).
    pub fn fresh_exposition(topics: &[(Stage, &str)]) -> String {
        let mut registry = Registry::default();
        let m = Self::register(&mut registry);
        for (stage, topic) in topics {
            m.topic(*stage, topic);
        }
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_exposition_lists_every_metric_at_zero() {
        let text = Metrics::fresh_exposition(&[(Stage::process, "raw-data")]);
        for name in [
            "edgeflow_aggregator_records_consumed_total{stage=\"process\",topic=\"raw-data\"} 0",
            "edgeflow_aggregator_records_rejected_total{reason=\"temperature_above_max\"} 0",
            "edgeflow_aggregator_upload_duration_seconds_count 0",
            "edgeflow_aggregator_uploaded_bytes_total{family=\"filtered\"} 0",
            "edgeflow_aggregator_oldest_pending_record_age_seconds 0.0",
            "edgeflow_aggregator_spool_bytes 0",
            "edgeflow_aggregator_checkpoint_age_seconds{stage=\"sink\"} 0.0",
            "edgeflow_aggregator_consumer_lag_records{stage=\"process\"} 0",
        ] {
            assert!(text.contains(name), "missing `{name}` in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}

/// The counters `process` touches per record, looked up once (a family lookup hashes and
/// allocates its labels).
#[derive(Debug, Clone)]
pub struct ProcessCounters {
    pub consumed: Counter,
    pub filtered: Counter,
    pub rejected: [Counter; 2],
    pub duplicates: Counter,
    pub writer_conflicts: Counter,
    pub late: Counter,
    pub windows_device: Counter,
    pub windows_all: Counter,
    /// By [`crate::processed::Kind`] in declaration order.
    pub produced: [Counter; 4],
    deadletters: Family<ReasonLabels, Counter>,
}

impl ProcessCounters {
    /// Counts a dead letter by reason (rare: looked up when it happens).
    pub fn deadletter(&self, reason: &str) {
        self.deadletters.get_or_create_owned(&ReasonLabels { reason: reason.into() }).inc();
    }

    /// The rejected counter of a filter reason.
    pub fn rejected(&self, reason: FilterReason) -> &Counter {
        match reason {
            FilterReason::StatusNotOk => &self.rejected[0],
            FilterReason::TemperatureAboveMax => &self.rejected[1],
        }
    }
}

/// The counters `sink` touches per record.
#[derive(Debug, Clone)]
pub struct SinkCounters {
    pub consumed_processed: Counter,
    pub consumed_dlq: Counter,
    pub duplicates: Counter,
    pub replay_skipped: Counter,
    pub foreign: Counter,
    /// By [`FileFamily`] in declaration order.
    pub rows_written: [Counter; 4],
}

impl SinkCounters {
    pub fn rows_written(&self, family: FileFamily) -> &Counter {
        &self.rows_written[family as usize]
    }
}

impl Metrics {
    /// The per-record counters of `process` reading `raw_topic`.
    pub fn process_counters(&self, raw_topic: &str) -> ProcessCounters {
        let reason = |r: FilterReason| self.rejected.get_or_create_owned(&ReasonLabels { reason: r.as_str().into() });
        let kind = |k: &str| self.produced.get_or_create_owned(&KindLabels { kind: k.into() });
        let scope = |s: &str| self.windows.get_or_create_owned(&ScopeLabels { scope: s.into() });
        ProcessCounters {
            consumed: self.topic(Stage::process, raw_topic),
            filtered: self.filtered.clone(),
            rejected: [reason(FilterReason::StatusNotOk), reason(FilterReason::TemperatureAboveMax)],
            duplicates: self.duplicates.get_or_create_owned(&StageLabels { stage: Stage::process }),
            writer_conflicts: self.writer_conflicts.clone(),
            late: self.late.clone(),
            windows_device: scope("device"),
            windows_all: scope("all"),
            produced: [kind("filtered"), kind("rejected"), kind("aggregate"), kind("deadletter")],
            deadletters: self.deadletters.clone(),
        }
    }

    /// The per-record counters of `sink`.
    pub fn sink_counters(&self, processed_topic: &str, dlq_topic: &str) -> SinkCounters {
        let family = |f: FileFamily| self.rows_written.get_or_create_owned(&FamilyLabels { family: f.as_str().into() });
        SinkCounters {
            consumed_processed: self.topic(Stage::sink, processed_topic),
            consumed_dlq: self.topic(Stage::sink, dlq_topic),
            duplicates: self.duplicates.get_or_create_owned(&StageLabels { stage: Stage::sink }),
            replay_skipped: self.replay_skipped.clone(),
            foreign: self.foreign.clone(),
            rows_written: FileFamily::ALL.map(family),
        }
    }
}
