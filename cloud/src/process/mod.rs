//! Stage `process`: `raw-data` → dedup, filter, per-minute windows → `processed-data`.
//!
//! # Exactly once without Kafka transactions
//! Our test broker (tansu 0.6) has no transactions (no `EndTxn`) and returns no offset-commit
//! metadata, so exactly-once rests on **deterministic replay from checkpoints plus idempotent
//! outputs**:
//!
//! * The state of a raw partition ([`window::WindowState`]: the `seq` high-water per node, the
//!   largest event time, the open windows) is small. Every `checkpoint_interval`, when the
//!   partition made progress, the stage snapshots it at resume offset `R` (the next offset to
//!   read), waits until Kafka acknowledged every output derived from inputs below `R`, appends
//!   a *checkpoint* control record `{resume_offset: R, state}` to that raw partition (explicit
//!   partition, header `edgeflow-control: checkpoint`), waits for its offset `X`, and commits
//!   `X` as the group's offset. The committed offset therefore always points at a checkpoint,
//!   and every output of the inputs below its `R` is in `processed-data`.
//! * On assignment the consumer starts at `X`. If the first record is a checkpoint, the stage
//!   restores its state and seeks to `R`; otherwise (a fresh group, or offsets reset by an
//!   operator) it starts with empty state where it is and says so. Checkpoints met later are
//!   skipped: they describe the past.
//! * Between `R` and the crash the stage emitted outputs that are already in `processed-data`.
//!   The replay emits them again, *identical*: [`window::Processor`] is a pure function of the
//!   state and the log, and time enters only through the log (records' event times and *tick*
//!   control records, never the wall clock). Every output carries its identity
//!   (`source_partition`, `source_offset`, and `(node_id, seq)` or `(device, window)`), and the
//!   sink drops the second copy.
//! * An idle partition (no record for `idle_timeout`) with open windows gets a *tick*
//!   `{time_ms: now}`; reading it back advances the clock like a record, so windows of idle
//!   partitions close — and a replay closes them at the same place in the log.
//!
//! Outputs for raw partition `p` go to processed-data partition `p` (explicit partition: the
//! sink's per-partition dedup relies on one raw partition feeding one processed partition),
//! except all-devices partials, which go to partition 0 where one sink merges them.
//!
//! Outputs are produced with an idempotent producer without a delivery deadline: Kafka being
//! away only delays them. Delivery reports are counted per output partition with sequence
//! numbers ([`acks::AckTracker`]), which is how a checkpoint knows its outputs are safe.

pub mod acks;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::control::{Checkpoint, ControlKind, Tick};
use crate::kafka::{
    self, Assignment, ControlProducer, Cursor, KafkaHealth, KafkaSetupError, Positioned, StageConsumer, StageContext,
};
use crate::metrics::{Metrics, ProcessCounters, Stage, StageLabels};
use crate::processed::Processed;
use acks::{AckTracker, OutputContext};
use window::{Dest, Emitted, OutcomeKind, Processor, RESEND_HEADER, Rules, WindowState};

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Kafka clients could not be set up, or the topics are not usable.
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    /// Kafka refused an output for good (too large, not authorised, producer fenced): the stage
    /// stops rather than commit past it. A restart replays from the last checkpoint.
    #[error("Kafka refused an output: {0}")]
    Delivery(String),
}

/// How long a partition may wait for an expected record before stepping back (see [`Cursor`]).
const STALL: Duration = Duration::from_secs(2);
/// At most one "two agents write as one node_id" warning per partition this often (the counter
/// counts every one).
const CONFLICT_LOG_EVERY: Duration = Duration::from_secs(60);

/// What a partition is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Assigned; the first record decides whether state is restored.
    AwaitFirst,
    /// Processing (after a restore, from the checkpoint's resume offset).
    Active,
    /// The committed checkpoint does not parse: nothing is processed or committed
    /// ([`kafka::halt`]).
    Halted,
}

#[derive(Debug)]
struct Slot {
    phase: Phase,
    processor: Processor,
    /// Next offset to read.
    position: i64,
    /// Progress since the last checkpoint.
    dirty: bool,
    checkpoint_in_flight: bool,
    last_checkpoint: Instant,
    last_conflict_log: Option<Instant>,
    last_input: Instant,
    tick_sent: Option<Instant>,
    /// Where the next record must come from (see [`Cursor`]).
    cursor: Cursor,
    /// Cancels this slot's checkpoint task on revocation.
    token: CancellationToken,
    generation: u64,
}

/// A finished checkpoint task.
#[derive(Debug)]
struct CheckpointDone {
    partition: i32,
    generation: u64,
    result: Result<i64, String>,
}

/// The process stage.
pub struct ProcessStage {
    settings: Settings,
    rules: Rules,
    consumer: Arc<StageConsumer>,
    producer: ThreadedProducer<OutputContext>,
    acks: Arc<AckTracker>,
    control: ControlProducer,
    metrics: Metrics,
    health: Arc<KafkaHealth>,
    slots: HashMap<i32, Slot>,
    generation: u64,
    done_tx: mpsc::UnboundedSender<CheckpointDone>,
    done_rx: mpsc::UnboundedReceiver<CheckpointDone>,
    counters: ProcessCounters,
    out: Vec<u8>,
}

impl std::fmt::Debug for ProcessStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessStage").field("partitions", &self.slots.len()).finish_non_exhaustive()
    }
}

impl ProcessStage {
    /// Creates the clients and checks the topics (processed-data needs at least as many
    /// partitions as raw-data).
    pub fn new(settings: &Settings, metrics: Metrics, health: Arc<KafkaHealth>) -> Result<Self, ProcessError> {
        let k = &settings.kafka;
        let context = StageContext::new(Stage::process, metrics.clone(), health.clone());
        let consumer = kafka::subscribe(k, &k.process_group(), &[&k.raw_topic], context)?;
        let timeout = Duration::from_secs(30);
        let raw = kafka::partition_count(consumer.as_ref(), &k.raw_topic, timeout)?;
        let processed = kafka::partition_count(consumer.as_ref(), &k.processed_topic, timeout)?;
        if processed < raw {
            return Err(KafkaSetupError::TooFewPartitions {
                raw: k.raw_topic.clone(),
                raw_partitions: raw,
                processed: k.processed_topic.clone(),
                processed_partitions: processed,
            }
            .into());
        }
        let acks = Arc::new(AckTracker::default());
        let producer: ThreadedProducer<OutputContext> = kafka::producer_config(k)
            .create_with_context(OutputContext::new(acks.clone()))
            .map_err(|source| KafkaSetupError::Client { what: "output producer", source })?;
        let control = ControlProducer::new(k)?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let rules = Rules {
            temperature_max: settings.process.temperature_max,
            allowed_lateness_ms: settings.process.allowed_lateness.as_millis() as i64,
            max_future_skew_ms: settings.process.max_future_skew.as_millis().min(i64::MAX as u128) as i64,
        };
        let counters = metrics.process_counters(&k.raw_topic);
        Ok(Self {
            settings: settings.clone(),
            rules,
            consumer,
            producer,
            acks,
            control,
            metrics,
            health,
            slots: HashMap::new(),
            generation: 0,
            done_tx,
            done_rx,
            counters,
            out: Vec::with_capacity(512),
        })
    }

    /// Runs until `shutdown`, then drains: outputs flushed, a last checkpoint per partition.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ProcessError> {
        tracing::info!(topic = %self.settings.kafka.raw_topic, group = %self.settings.kafka.process_group(), "process stage started");
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            if let Some(error) = self.acks.failure() {
                break Err(ProcessError::Delivery(error));
            }
            let consumer = self.consumer.clone();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                Some(done) = self.done_rx.recv() => self.checkpoint_done(done),
                _ = housekeeping.tick() => {
                    self.handle_rebalance().await;
                    self.housekeeping();
                }
                message = consumer.recv() => {
                    self.handle_rebalance().await;
                    match message {
                        Ok(m) => self.handle(&m).await,
                        Err(error) => tracing::debug!(%error, "raw-data consumer error"),
                    }
                }
            }
        };
        self.drain().await;
        result
    }

    async fn handle_rebalance(&mut self) {
        for event in self.consumer.context().take_events() {
            match event {
                Assignment::Revoked(parts) => {
                    tracing::info!(partitions = %kafka::describe(&parts), "raw-data partitions revoked");
                    for (topic, p) in parts {
                        if let Some(slot) = self.slots.remove(&p) {
                            slot.token.cancel();
                        }
                        kafka::unhalt(&self.health, &self.metrics, Stage::process, &topic, p);
                    }
                }
                Assignment::Assigned(parts) => {
                    tracing::info!(partitions = %kafka::describe(&parts), "raw-data partitions assigned");
                    let committed = kafka::committed(&self.consumer, &parts).await;
                    for (topic, p) in parts {
                        let mut cursor = Cursor::default();
                        if let Some(x) = committed.get(&(topic, p)) {
                            cursor.expect(*x);
                        }
                        self.generation += 1;
                        self.slots.insert(
                            p,
                            Slot {
                                phase: Phase::AwaitFirst,
                                processor: Processor::new(p, self.rules, WindowState::default()),
                                position: 0,
                                dirty: false,
                                checkpoint_in_flight: false,
                                last_checkpoint: Instant::now(),
                                last_conflict_log: None,
                                last_input: Instant::now(),
                                tick_sent: None,
                                token: CancellationToken::new(),
                                generation: self.generation,
                                cursor,
                            },
                        );
                    }
                }
            }
            self.metrics
                .assigned
                .get_or_create_owned(&StageLabels { stage: Stage::process })
                .set(self.slots.len() as i64);
        }
    }

    async fn handle(&mut self, m: &BorrowedMessage<'_>) {
        let p = m.partition();
        let offset = m.offset();
        let control = kafka::control_kind(m);
        let Some(slot) = self.slots.get_mut(&p) else {
            tracing::debug!(partition = p, offset, "record of an unassigned partition ignored");
            return;
        };
        match slot.cursor.check(offset) {
            Positioned::Take => {}
            Positioned::Drop => return,
            Positioned::SeekBack(to) => {
                tracing::info!(partition = p, offset, expected = ?slot.cursor.expected(), seek_to = to, "the broker skipped the expected offset; seeking back");
                if let Err(error) = kafka::seek(&self.consumer, &self.settings.kafka.raw_topic, p, to) {
                    tracing::warn!(partition = p, %error, "seeking back failed");
                }
                return;
            }
        }
        match slot.phase {
            Phase::AwaitFirst => {
                if control == Some(Some(ControlKind::Checkpoint)) {
                    match Checkpoint::<WindowState>::parse(m.payload().unwrap_or_default()) {
                        Ok(checkpoint) => {
                            let resume = checkpoint.resume_offset;
                            tracing::info!(
                                partition = p,
                                checkpoint_offset = offset,
                                resume_offset = resume,
                                "state restored from checkpoint"
                            );
                            slot.processor = Processor::new(p, self.rules, checkpoint.state);
                            slot.position = resume;
                            slot.phase = Phase::Active;
                            slot.last_checkpoint = Instant::now();
                            slot.cursor.expect(resume);
                            if let Err(error) = kafka::seek(&self.consumer, &self.settings.kafka.raw_topic, p, resume) {
                                tracing::warn!(partition = p, %error, "seek to the checkpoint's resume offset failed; reading the checkpoint again");
                                // Without the seek the log and the state would disagree: go back
                                // to the checkpoint and restore again.
                                slot.phase = Phase::AwaitFirst;
                                slot.cursor.expect(offset);
                                let _ = kafka::seek(&self.consumer, &self.settings.kafka.raw_topic, p, offset);
                            }
                            return;
                        }
                        Err(error) => {
                            slot.phase = Phase::Halted;
                            let topic = &self.settings.kafka.raw_topic;
                            kafka::halt(
                                &self.consumer,
                                &self.health,
                                &self.metrics,
                                Stage::process,
                                (topic, p),
                                offset,
                                &error,
                            );
                            return;
                        }
                    }
                } else if offset == 0 {
                    tracing::info!(
                        partition = p,
                        "no checkpoint yet; starting with empty state at the beginning of the partition"
                    );
                } else {
                    tracing::warn!(
                        partition = p,
                        offset,
                        "the committed offset does not point at a checkpoint (new group or offsets reset); starting with empty state here"
                    );
                }
                slot.phase = Phase::Active;
                slot.position = offset;
                if control == Some(Some(ControlKind::Checkpoint)) {
                    slot.position = offset + 1;
                    return;
                }
            }
            Phase::Active => {
                if offset < slot.position {
                    return;
                }
            }
            Phase::Halted => return,
        }
        slot.position = offset + 1;
        slot.last_input = Instant::now();
        let mut emitted: Vec<Emitted<'_>> = Vec::new();
        match control {
            Some(Some(ControlKind::Checkpoint)) => return,
            Some(Some(ControlKind::Tick)) => {
                slot.tick_sent = None;
                slot.dirty = true;
                match Tick::parse(m.payload().unwrap_or_default()) {
                    Ok(tick) => {
                        let outcome = slot.processor.tick(offset, tick.time_ms, kafka::timestamp_ms(m), &mut emitted);
                        self.counters.windows_device.inc_by(outcome.device_windows.into());
                        self.counters.windows_all.inc_by(outcome.partial_windows.into());
                    }
                    Err(error) => tracing::warn!(partition = p, offset, %error, "unreadable tick skipped"),
                }
            }
            Some(None) => {
                tracing::warn!(partition = p, offset, "control record of an unknown kind skipped");
                return;
            }
            None => {
                slot.dirty = true;
                let c = &self.counters;
                c.consumed.inc();
                let value = m.payload().unwrap_or_default();
                let resend = kafka::has_header(m, RESEND_HEADER);
                let outcome = slot.processor.record(offset, value, kafka::timestamp_ms(m), resend, &mut emitted);
                if outcome.writer_conflict {
                    c.writer_conflicts.inc();
                    if let Some(conflict) = slot.processor.take_conflict()
                        && slot.last_conflict_log.is_none_or(|at| at.elapsed() >= CONFLICT_LOG_EVERY)
                    {
                        slot.last_conflict_log = Some(Instant::now());
                        tracing::warn!(
                            partition = p,
                            offset,
                            node_id = %conflict.node_id,
                            epoch = %conflict.epoch,
                            other_epoch = %conflict.other,
                            "two agents write as one node_id (their epochs' records interleave); both are kept, but give each node its own node_id"
                        );
                    }
                }
                match outcome.kind {
                    OutcomeKind::Filtered => {
                        c.filtered.inc();
                    }
                    OutcomeKind::Rejected(reason) => {
                        c.rejected(reason).inc();
                    }
                    OutcomeKind::Duplicate => {
                        c.duplicates.inc();
                    }
                    OutcomeKind::DeadLetter(reason) => c.deadletter(reason),
                    OutcomeKind::Tick => {}
                }
                if outcome.late {
                    c.late.inc();
                }
                if outcome.device_windows > 0 {
                    c.windows_device.inc_by(outcome.device_windows.into());
                }
                if outcome.partial_windows > 0 {
                    c.windows_all.inc_by(outcome.partial_windows.into());
                }
            }
        }
        for e in &emitted {
            let q = match e.dest {
                Dest::Own => p,
                Dest::AllDevices => 0,
            };
            self.send(q, &e.value).await;
        }
    }

    /// Produces one output to processed-data partition `q`, waiting while librdkafka's queue is
    /// full.
    async fn send(&mut self, q: i32, value: &Processed<'_>) {
        self.out.clear();
        value.write_json(&mut self.out);
        let key: Option<&str> = match value {
            Processed::Reading(r) => Some(&r.device_id),
            Processed::Aggregate(a) => Some(a.device_id.as_deref().unwrap_or("*")),
            Processed::DeadLetter(d) => d.node_id.as_deref(),
        };
        let seq = self.acks.reserve(q);
        let topic = &self.settings.kafka.processed_topic;
        loop {
            let mut record =
                BaseRecord::with_opaque_to(topic.as_str(), seq as usize).partition(q).payload(&self.out[..]);
            if let Some(k) = key {
                record = record.key(k);
            }
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((error, _)) => {
                    self.acks.fail(format!("producing to {topic}/{q}: {error}"));
                    return;
                }
            }
        }
        self.counters.produced[value.kind() as usize].inc();
    }

    fn housekeeping(&mut self) {
        let interval = self.settings.process.checkpoint_interval;
        let idle = self.settings.process.idle_timeout;
        let mut open_windows = 0;
        let mut oldest_checkpoint = Duration::ZERO;
        let partitions: Vec<i32> = self.slots.keys().copied().collect();
        for p in partitions {
            let Some(slot) = self.slots.get_mut(&p) else { continue };
            if slot.phase == Phase::Halted {
                continue;
            }
            open_windows += slot.processor.open_windows();
            oldest_checkpoint = oldest_checkpoint.max(slot.last_checkpoint.elapsed());
            if slot.cursor.is_stalled(STALL)
                && let Some(to) = slot.cursor.stalled()
            {
                tracing::info!(partition = p, expected = ?slot.cursor.expected(), seek_to = to, "the expected record did not arrive; seeking back");
                if let Err(error) = kafka::seek(&self.consumer, &self.settings.kafka.raw_topic, p, to) {
                    tracing::warn!(partition = p, %error, "seeking back failed");
                }
            }
            if slot.phase != Phase::Active {
                continue;
            }
            if slot.dirty && !slot.checkpoint_in_flight && slot.last_checkpoint.elapsed() >= interval {
                self.start_checkpoint(p);
                continue;
            }
            let tick_pending = slot.tick_sent.is_some_and(|t| t.elapsed() < idle * 2);
            if slot.processor.open_windows() > 0 && !tick_pending && slot.last_input.elapsed() >= idle {
                slot.tick_sent = Some(Instant::now());
                let control = self.control.clone();
                let topic = self.settings.kafka.raw_topic.clone();
                let ticks = self.metrics.ticks.get_or_create_owned(&StageLabels { stage: Stage::process });
                tokio::spawn(async move {
                    let tick = Tick { time_ms: kafka::now_ms() };
                    match control.append(&topic, p, ControlKind::Tick, &tick.to_json()).await {
                        Ok(_) => {
                            ticks.inc();
                        }
                        Err(error) => tracing::warn!(partition = p, %error, "writing a tick failed"),
                    }
                });
            }
        }
        self.metrics.open_windows.set(open_windows as i64);
        self.metrics
            .checkpoint_age
            .get_or_create_owned(&StageLabels { stage: Stage::process })
            .set(oldest_checkpoint.as_secs_f64());
    }

    /// Snapshots partition `p` at its position and starts the checkpoint task.
    fn start_checkpoint(&mut self, p: i32) {
        let Some(slot) = self.slots.get_mut(&p) else { return };
        let checkpoint = Checkpoint { resume_offset: slot.position, state: slot.processor.state() };
        let value = match checkpoint.to_json() {
            Ok(v) => v,
            Err(error) => {
                tracing::error!(partition = p, %error, "cannot encode a checkpoint");
                return;
            }
        };
        slot.dirty = false;
        slot.checkpoint_in_flight = true;
        let needs = [(p, self.acks.reserved(p)), (0, self.acks.reserved(0))];
        let task = CheckpointTask {
            partition: p,
            generation: slot.generation,
            value,
            needs,
            acks: self.acks.clone(),
            control: self.control.clone(),
            consumer: self.consumer.clone(),
            topic: self.settings.kafka.raw_topic.clone(),
            token: slot.token.clone(),
            done: self.done_tx.clone(),
        };
        tokio::spawn(task.run());
    }

    fn checkpoint_done(&mut self, done: CheckpointDone) {
        let Some(slot) = self.slots.get_mut(&done.partition) else { return };
        if slot.generation != done.generation {
            return;
        }
        slot.checkpoint_in_flight = false;
        match done.result {
            Ok(offset) => {
                slot.last_checkpoint = Instant::now();
                self.metrics.checkpoints.get_or_create_owned(&StageLabels { stage: Stage::process }).inc();
                tracing::debug!(partition = done.partition, offset, "checkpoint committed");
            }
            Err(error) => {
                slot.dirty = true;
                tracing::warn!(partition = done.partition, %error, "checkpoint failed; retrying at the next interval");
            }
        }
    }

    /// Shutdown: outputs flushed, then a last checkpoint for every partition that moved, then
    /// the consumer leaves the group.
    async fn drain(mut self) {
        tracing::info!("process stage draining: flushing outputs and checkpointing");
        let producer = self.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("outputs not all acknowledged within 30s; the next owner replays them");
        }
        let dirty: Vec<i32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.phase == Phase::Active && s.dirty && !s.checkpoint_in_flight)
            .map(|(p, _)| *p)
            .collect();
        for p in dirty {
            self.start_checkpoint(p);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.slots.values().any(|s| s.checkpoint_in_flight) {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(done)) => self.checkpoint_done(done),
                _ => break,
            }
        }
        for slot in self.slots.values() {
            slot.token.cancel();
        }
        kafka::close(self.consumer).await;
        tracing::info!("process stage stopped");
    }
}

/// Waits for a checkpoint's outputs, appends it, commits its offset.
struct CheckpointTask {
    partition: i32,
    generation: u64,
    value: Vec<u8>,
    needs: [(i32, u64); 2],
    acks: Arc<AckTracker>,
    control: ControlProducer,
    consumer: Arc<StageConsumer>,
    topic: String,
    token: CancellationToken,
    done: mpsc::UnboundedSender<CheckpointDone>,
}

impl CheckpointTask {
    async fn run(self) {
        let result = tokio::select! {
            _ = self.token.cancelled() => return,
            r = self.steps() => r,
        };
        let _ = self.done.send(CheckpointDone { partition: self.partition, generation: self.generation, result });
    }

    async fn steps(&self) -> Result<i64, String> {
        self.acks.wait_for(&self.needs).await.map_err(|e| format!("outputs not delivered: {e}"))?;
        let offset = self
            .control
            .append(&self.topic, self.partition, ControlKind::Checkpoint, &self.value)
            .await
            .map_err(|e| format!("appending the checkpoint: {e}"))?;
        kafka::commit(&self.consumer, &self.topic, self.partition, offset)
            .await
            .map_err(|e| format!("committing offset {offset}: {e}"))?;
        Ok(offset)
    }
}
