//! Stage `sink`: `processed-data` and `raw-data-dlq` → hourly Parquet files in S3.
//!
//! Per input partition a pure state machine ([`state::PartitionSink`]) decides which bucket
//! each row goes to and when buckets seal; this module is the I/O shell around it:
//!
//! * **consume**: reads both topics in the consumer group `<group_id>-sink`, decodes each value
//!   (control records by their header first), feeds the machine, and appends each routed row to
//!   its bucket's [`parquet::SpoolFile`] in `spool_dir` — at most `row_group_rows` rows per open
//!   file in memory, the rest on disk.
//! * **seal**: a sealed group's files are finished (footer written) and handed, with the hour's
//!   manifest, to the **upload** task ([`upload::Uploader`]), which writes them create-only under
//!   deterministic keys ([`keys::KeyScheme`]).
//! * **checkpoint**: every `checkpoint_interval`, a partition whose checkpoint changed appends a
//!   checkpoint control record to itself and commits its offset. The checkpoint's resume offset
//!   is the first offset of the oldest bucket not yet in S3; see [`state`] for why the state it
//!   carries makes a replay from there rewrite exactly the same objects.
//! * **ticks**: a partition with open buckets and no record for `idle_timeout` gets a tick at
//!   the wall clock, so the hours of an idle partition still seal.
//!
//! Restarting anywhere (crash, `kill -9` mid-hour or mid-upload, rebalance) restores the last
//! committed checkpoint and replays: the same rows reach the same buckets, the same keys are
//! written, S3 answers 412 for those already there — accepted only when the object there is
//! this deployment's ([`crate::s3`]): another writer's object is a conflict, retried and
//! alerted, never committed past. Duplicates that `process` emitted after its own crash are
//! dropped by the machine's dedup.
//!
//! **S3 outage**: uploads retry forever (exponential backoff, jitter) without blocking
//! consumption, until the spool (open files plus files awaiting upload) reaches
//! `spool_max_bytes`; then every assigned partition is paused (Kafka keeps the data) until
//! uploads bring it back under 90%. Consumption is never paused while nothing waits for S3:
//! an hour larger than the spool must still be read to its end to seal.

pub mod keys;
pub mod parquet;
pub mod state;
pub mod upload;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeflow_contract::DeadLetter;
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::control::{Checkpoint, ControlKind, Tick};
use crate::kafka::{
    self, Assignment, ControlProducer, Cursor, KafkaHealth, KafkaSetupError, Positioned, StageConsumer, StageContext,
};
use crate::metrics::{Metrics, SinkCounters, Stage, StageLabels};
use crate::processed::{DecodeError, Processed};
use crate::s3::{ProbeError, S3};
use keys::{KeyScheme, Manifest};
use parquet::{DeadLetterRow, ReadingRow, SpoolError, SpoolFile};
use state::{
    BucketKey, Decision, Family, FileInfo, Identity, Input, PartitionSink, RowMeta, SealGroup, SealedBucket, SinkState,
};
use upload::{JobFile, S3Health, UploadDone, UploadJob, Uploader};

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Kafka clients could not be set up, or a topic is missing.
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    /// The spool directory could not be prepared.
    #[error("spool directory {path}: {source}")]
    SpoolDir { path: PathBuf, source: std::io::Error },
    /// Writing a spool file failed (disk full, read-only): the stage stops; a restart replays.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The S3 store does not honour `If-None-Match` (the start-up check): create-only writes,
    /// and with them exactly-once uploads, are impossible against it.
    #[error(transparent)]
    Store(#[from] ProbeError),
    /// The upload task ended (or panicked) while the stage ran.
    #[error("the upload task stopped unexpectedly: {0}")]
    UploadTask(String),
}

/// A partition of one of the sink's inputs.
type SlotKey = (InputKind, i32);

/// Which input topic a partition belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum InputKind {
    Processed,
    DeadLetters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Assigned; the first record decides whether state is restored.
    AwaitFirst,
    /// Processing (after a restore, from the checkpoint's resume offset).
    Active,
    /// The committed checkpoint does not parse: nothing is spooled, sealed or committed
    /// ([`kafka::halt`]).
    Halted,
}

#[derive(Debug)]
struct OpenFile {
    key: BucketKey,
    spool: SpoolFile,
    last_offset: i64,
    /// Broker timestamp of the bucket's first record (for the oldest-pending-record age).
    first_ts_ms: i64,
}

#[derive(Debug)]
struct Slot {
    topic: String,
    partition: i32,
    kind: InputKind,
    phase: Phase,
    machine: PartitionSink,
    position: i64,
    files: HashMap<i64, OpenFile>,
    /// Groups handed to the uploader, by [`group_id`] → (bytes, first record's timestamp).
    uploading: BTreeMap<(i64, i64, i64), (u64, i64)>,
    scheme: KeyScheme,
    last_checkpoint: Option<Vec<u8>>,
    last_checkpoint_at: Instant,
    checkpoint_in_flight: bool,
    last_input: Instant,
    tick_sent: Option<Instant>,
    token: CancellationToken,
    generation: u64,
    /// Where the next record must come from (see [`Cursor`]).
    cursor: Cursor,
}

impl Slot {
    fn open_bytes(&self) -> u64 {
        self.files.values().map(|f| f.spool.bytes_on_disk()).sum()
    }

    fn uploading_bytes(&self) -> u64 {
        self.uploading.values().map(|(b, _)| *b).sum()
    }

    fn oldest_ts(&self) -> Option<i64> {
        self.files.values().map(|f| f.first_ts_ms).chain(self.uploading.values().map(|(_, t)| *t)).min()
    }
}

#[derive(Debug)]
struct CheckpointDone {
    topic: String,
    partition: i32,
    generation: u64,
    value: Vec<u8>,
    result: Result<i64, String>,
}

/// The sink stage.
pub struct SinkStage {
    settings: Settings,
    consumer: Arc<StageConsumer>,
    control: ControlProducer,
    metrics: Metrics,
    kafka_health: Arc<KafkaHealth>,
    slots: HashMap<SlotKey, Slot>,
    generation: u64,
    jobs: Option<mpsc::Sender<UploadJob>>,
    uploaded: mpsc::UnboundedReceiver<UploadDone>,
    checkpoints_tx: mpsc::UnboundedSender<CheckpointDone>,
    checkpoints_rx: mpsc::UnboundedReceiver<CheckpointDone>,
    uploader: Option<(Uploader, mpsc::Receiver<UploadJob>, mpsc::UnboundedSender<UploadDone>)>,
    props: ::parquet::file::properties::WriterProperties,
    paused: bool,
    /// Records since the spool was last measured.
    since_spool_check: u32,
    counters: SinkCounters,
}

impl std::fmt::Debug for SinkStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkStage").field("partitions", &self.slots.len()).finish_non_exhaustive()
    }
}

/// How long a partition may wait for an expected record before stepping back (see [`Cursor`]).
const STALL: Duration = Duration::from_secs(2);

/// Spool files end with this; anything with it in `spool_dir` at start-up is a leftover.
const SPOOL_SUFFIX: &str = ".spool.parquet";

impl SinkStage {
    /// Prepares the spool directory and the clients.
    pub fn new(
        settings: &Settings,
        s3: S3,
        metrics: Metrics,
        kafka_health: Arc<KafkaHealth>,
        s3_health: Arc<S3Health>,
    ) -> Result<Self, SinkError> {
        prepare_spool(&settings.sink.spool_dir)?;
        let k = &settings.kafka;
        let context = StageContext::new(Stage::sink, metrics.clone(), kafka_health.clone());
        let consumer = kafka::subscribe(k, &k.sink_group(), &[&k.processed_topic, &k.dlq_topic], context)?;
        for topic in [&k.processed_topic, &k.dlq_topic] {
            kafka::partition_count(consumer.as_ref(), topic, Duration::from_secs(30))?;
        }
        let control = ControlProducer::new(k)?;
        let (jobs_tx, jobs_rx) = mpsc::channel(256);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (checkpoints_tx, checkpoints_rx) = mpsc::unbounded_channel();
        let uploader = Uploader {
            s3,
            multipart_threshold: settings.sink.multipart_threshold,
            concurrency: settings.sink.upload_concurrency.get(),
            metrics: metrics.clone(),
            health: s3_health,
            probe_key: keys::probe_key(&settings.s3.prefix, &settings.s3.deployment_id),
        };
        let counters = metrics.sink_counters(&k.processed_topic, &k.dlq_topic);
        Ok(Self {
            settings: settings.clone(),
            consumer,
            control,
            kafka_health,
            metrics,
            slots: HashMap::new(),
            generation: 0,
            jobs: Some(jobs_tx),
            uploaded: done_rx,
            checkpoints_tx,
            checkpoints_rx,
            uploader: Some((uploader, jobs_rx, done_tx)),
            props: parquet::writer_properties(settings.sink.row_group_rows.get()),
            paused: false,
            since_spool_check: 0,
            counters,
        })
    }

    /// Runs until `shutdown`, then drains: uploads in flight get a deadline to finish and a
    /// last checkpoint is written where it moved.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), SinkError> {
        tracing::info!(
            topics = ?[&self.settings.kafka.processed_topic, &self.settings.kafka.dlq_topic],
            group = %self.settings.kafka.sink_group(),
            "sink stage started"
        );
        let upload_shutdown = CancellationToken::new();
        let (uploader, jobs_rx, done_tx) = self.uploader.take().expect("run is called once");
        let mut upload_task = Some(tokio::spawn(uploader.run(jobs_rx, done_tx, upload_shutdown.clone())));
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let consumer = self.consumer.clone();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                // Supervised: the uploader ends only on a fatal store check, or a panic.
                ended = async { upload_task.as_mut().expect("present while running").await }, if upload_task.is_some() => {
                    upload_task = None;
                    break Err(match ended {
                        Ok(Err(error)) => SinkError::Store(error),
                        Ok(Ok(())) => SinkError::UploadTask("it returned while the stage ran".into()),
                        Err(error) => SinkError::UploadTask(error.to_string()),
                    });
                }
                Some(done) = self.uploaded.recv() => {
                    self.uploaded(done);
                    Ok(())
                }
                Some(done) = self.checkpoints_rx.recv() => {
                    self.checkpoint_done(done);
                    Ok(())
                }
                _ = housekeeping.tick() => {
                    self.handle_rebalance().await;
                    self.housekeeping();
                    Ok(())
                }
                message = consumer.recv() => {
                    self.handle_rebalance().await;
                    match message {
                        Ok(m) => self.handle(&m).await,
                        Err(error) => {
                            tracing::debug!(%error, "sink consumer error");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(error) = step {
                tracing::error!(%error, "the sink cannot write its spool; stopping (a restart replays from the last checkpoint)");
                break Err(error);
            }
        };
        if let Err(error) = &result
            && matches!(error, SinkError::Store(_) | SinkError::UploadTask(_))
        {
            tracing::error!(%error, "the sink stage stops");
        }
        self.drain(upload_shutdown, upload_task).await;
        result
    }

    async fn handle_rebalance(&mut self) {
        for event in self.consumer.context().take_events() {
            match event {
                Assignment::Revoked(parts) => {
                    tracing::info!(partitions = %kafka::describe(&parts), "sink partitions revoked");
                    for (topic, partition) in parts {
                        if let Some(slot) = self.slots.remove(&(self.kind_of(&topic), partition)) {
                            slot.token.cancel();
                            for (_, f) in slot.files {
                                f.spool.discard();
                            }
                        }
                        kafka::unhalt(&self.kafka_health, &self.metrics, Stage::sink, &topic, partition);
                    }
                }
                Assignment::Assigned(parts) => {
                    tracing::info!(partitions = %kafka::describe(&parts), "sink partitions assigned");
                    let committed = kafka::committed(&self.consumer, &parts).await;
                    for (topic, partition) in &parts {
                        self.generation += 1;
                        let mut cursor = Cursor::default();
                        if let Some(x) = committed.get(&(topic.clone(), *partition)) {
                            cursor.expect(*x);
                        }
                        let kind = if *topic == self.settings.kafka.dlq_topic {
                            InputKind::DeadLetters
                        } else {
                            InputKind::Processed
                        };
                        self.slots.insert(
                            (kind, *partition),
                            Slot {
                                topic: topic.clone(),
                                partition: *partition,
                                kind,
                                phase: Phase::AwaitFirst,
                                machine: PartitionSink::new(self.grace_ms(), 0, SinkState::default()),
                                position: 0,
                                files: HashMap::new(),
                                uploading: BTreeMap::new(),
                                scheme: KeyScheme {
                                    prefix: self.settings.s3.prefix.clone(),
                                    deployment: self.settings.s3.deployment_id.clone(),
                                    topic: topic.clone(),
                                    partition: *partition,
                                },
                                last_checkpoint: None,
                                last_checkpoint_at: Instant::now(),
                                checkpoint_in_flight: false,
                                last_input: Instant::now(),
                                tick_sent: None,
                                token: CancellationToken::new(),
                                generation: self.generation,
                                cursor,
                            },
                        );
                    }
                    if self.paused
                        && let Err(error) = kafka::set_paused(&self.consumer, &parts, true)
                    {
                        tracing::warn!(%error, "pausing newly assigned partitions failed");
                    }
                }
            }
            self.metrics.assigned.get_or_create_owned(&StageLabels { stage: Stage::sink }).set(self.slots.len() as i64);
        }
    }

    /// Which input a topic is (anything but the dead-letter topic is processed-data).
    fn kind_of(&self, topic: &str) -> InputKind {
        if topic == self.settings.kafka.dlq_topic { InputKind::DeadLetters } else { InputKind::Processed }
    }

    fn grace_ms(&self) -> i64 {
        self.settings.sink.seal_grace.as_millis() as i64
    }

    async fn handle(&mut self, m: &BorrowedMessage<'_>) -> Result<(), SinkError> {
        let max_future_skew_ms = self.settings.process.max_future_skew.as_millis().min(i64::MAX as u128) as i64;
        let topic = m.topic();
        let key = (self.kind_of(topic), m.partition());
        let offset = m.offset();
        let control = kafka::control_kind(m);
        let grace = self.grace_ms();
        let Some(slot) = self.slots.get_mut(&key) else {
            return Ok(());
        };
        match slot.cursor.check(offset) {
            Positioned::Take => {}
            Positioned::Drop => return Ok(()),
            Positioned::SeekBack(to) => {
                tracing::info!(topic, partition = key.1, offset, expected = ?slot.cursor.expected(), seek_to = to, "the broker skipped the expected offset; seeking back");
                if let Err(error) = kafka::seek(&self.consumer, topic, key.1, to) {
                    tracing::warn!(topic, partition = key.1, %error, "seeking back failed");
                }
                return Ok(());
            }
        }
        match slot.phase {
            Phase::AwaitFirst => {
                if control == Some(Some(ControlKind::Checkpoint)) {
                    match Checkpoint::<SinkState>::parse(m.payload().unwrap_or_default()) {
                        Ok(checkpoint) => {
                            let resume = checkpoint.resume_offset;
                            tracing::info!(
                                topic,
                                partition = key.1,
                                checkpoint_offset = offset,
                                resume_offset = resume,
                                phantoms = checkpoint.state.phantoms.len(),
                                "sink state restored from checkpoint"
                            );
                            slot.last_checkpoint = Some(m.payload().unwrap_or_default().to_vec());
                            slot.machine = PartitionSink::new(grace, resume, checkpoint.state);
                            slot.position = resume;
                            slot.phase = Phase::Active;
                            slot.cursor.expect(resume);
                            if let Err(error) = kafka::seek(&self.consumer, topic, key.1, resume) {
                                tracing::warn!(topic, partition = key.1, %error, "seek to the checkpoint's resume offset failed; reading the checkpoint again");
                                slot.phase = Phase::AwaitFirst;
                                slot.cursor.expect(offset);
                                let _ = kafka::seek(&self.consumer, topic, key.1, offset);
                            }
                            return Ok(());
                        }
                        Err(error) => {
                            slot.phase = Phase::Halted;
                            kafka::halt(
                                &self.consumer,
                                &self.kafka_health,
                                &self.metrics,
                                Stage::sink,
                                (topic, key.1),
                                offset,
                                &error,
                            );
                            return Ok(());
                        }
                    }
                } else if offset == 0 {
                    tracing::info!(
                        topic,
                        partition = key.1,
                        "no checkpoint yet; starting at the beginning of the partition"
                    );
                } else {
                    tracing::warn!(
                        topic,
                        partition = key.1,
                        offset,
                        "the committed offset does not point at a checkpoint (new group or offsets reset); starting with empty state here"
                    );
                }
                slot.phase = Phase::Active;
                slot.position = offset;
            }
            Phase::Active => {
                if offset < slot.position {
                    return Ok(());
                }
            }
            Phase::Halted => return Ok(()),
        }
        slot.position = offset + 1;
        slot.last_input = Instant::now();
        let ts = kafka::timestamp_ms(m).unwrap_or_else(kafka::now_ms);
        let payload = m.payload().unwrap_or_default();
        match control {
            Some(Some(ControlKind::Checkpoint)) | Some(None) => Ok(()),
            Some(Some(ControlKind::Tick)) => {
                slot.tick_sent = None;
                match Tick::parse(payload) {
                    Ok(tick) => {
                        // Never past its broker time (see `window::Processor::tick`).
                        let time_ms = tick.time_ms.min(ts);
                        let step = slot.machine.apply(offset, Input::Tick { time_ms });
                        self.seal(&key, step.sealed).await
                    }
                    Err(error) => {
                        tracing::warn!(topic, partition = key.1, offset, %error, "unreadable tick skipped");
                        Ok(())
                    }
                }
            }
            None => {
                match slot.kind {
                    InputKind::Processed => self.counters.consumed_processed.inc(),
                    InputKind::DeadLetters => self.counters.consumed_dlq.inc(),
                };
                let row = decode(slot.kind, payload, ts, || format!("{topic}/{}@{offset}", key.1));
                if let Row::Foreign { .. } = row {
                    self.counters.foreign.inc();
                }
                let mut meta = row.meta();
                // A time further ahead of the broker's than `process.max_future_skew` (a skewed
                // agent's dead letter) counts as that far ahead: the clock, the spool and the
                // open buckets stay bounded whatever the timestamps (`process` dead-letters
                // readings that far ahead, so its rows never need this).
                meta.time_ms = meta.time_ms.min(ts.saturating_add(max_future_skew_ms));
                let step = slot.machine.apply(offset, Input::Row(meta));
                let sealed = !step.sealed.is_empty();
                self.seal(&key, step.sealed).await?;
                self.route(&key, offset, ts, step.decision, &row)?;
                // The spool grows with every row group and every seal: check it often enough that
                // a full spool stops consumption within a few row groups, not a whole interval.
                self.since_spool_check += 1;
                if sealed || self.since_spool_check >= 64 {
                    self.since_spool_check = 0;
                    let (spool, waiting) = self.spool_usage();
                    self.apply_spool_limit(spool, waiting);
                }
                Ok(())
            }
        }
    }

    /// Appends a routed row to its bucket's spool file (opening it if the row opened the bucket).
    fn route(
        &mut self,
        key: &SlotKey,
        offset: i64,
        ts: i64,
        decision: Option<Decision>,
        row: &Row<'_>,
    ) -> Result<(), SinkError> {
        let Some(slot) = self.slots.get_mut(key) else { return Ok(()) };
        match decision {
            None => Ok(()),
            Some(Decision::Duplicate) => {
                self.counters.duplicates.inc();
                Ok(())
            }
            Some(Decision::InS3) => {
                self.counters.replay_skipped.inc();
                Ok(())
            }
            Some(Decision::Into { key: bucket, first_offset, .. }) => {
                let file = slot.files.entry(first_offset).or_insert_with(|| {
                    let path = self.settings.sink.spool_dir.join(format!(
                        "{}-{}.g{}.{}.{}{}",
                        slot.topic,
                        slot.partition,
                        slot.generation,
                        first_offset,
                        bucket.family.as_str(),
                        SPOOL_SUFFIX
                    ));
                    OpenFile {
                        key: bucket,
                        spool: SpoolFile::new(
                            bucket.family,
                            path,
                            self.settings.sink.row_group_rows.get(),
                            self.props.clone(),
                        ),
                        last_offset: offset,
                        first_ts_ms: ts,
                    }
                });
                file.last_offset = offset;
                row.write(&mut file.spool, &self.settings.kafka.raw_topic)?;
                self.counters.rows_written(bucket.family).inc();
                Ok(())
            }
        }
    }

    /// Finishes the files of sealed groups and hands them to the uploader.
    async fn seal(&mut self, key: &SlotKey, groups: Vec<SealGroup>) -> Result<(), SinkError> {
        for group in groups {
            let Some(slot) = self.slots.get_mut(key) else { return Ok(()) };
            let mut files = Vec::new();
            let mut listed: Vec<(Family, FileInfo)> = Vec::new();
            let mut first_ts = i64::MAX;
            for bucket in &group.buckets {
                match bucket {
                    SealedBucket::Fresh { key: bucket_key, first_offset } => {
                        let Some(open) = slot.files.remove(first_offset) else {
                            tracing::error!(
                                ?bucket_key,
                                first_offset,
                                "a sealed bucket has no spool file; this is a bug"
                            );
                            continue;
                        };
                        let finished = open.spool.finish()?;
                        let info = FileInfo {
                            object_key: slot.scheme.data(open.key.family, open.key.hour_ms, *first_offset),
                            rows: finished.rows,
                            first_offset: *first_offset,
                            last_offset: open.last_offset,
                        };
                        first_ts = first_ts.min(open.first_ts_ms);
                        listed.push((open.key.family, info.clone()));
                        files.push(JobFile {
                            family: open.key.family,
                            path: finished.path,
                            info,
                            bytes: finished.bytes,
                        });
                    }
                    SealedBucket::InS3(phantom) => listed.push((phantom.key.family, phantom.file.clone())),
                }
            }
            let manifest_key = slot.scheme.manifest(group.hour_ms, group.late_first_offset);
            let manifest = Manifest::new(
                &slot.scheme,
                group.hour_ms,
                group.late_first_offset.is_some(),
                group.seal_offset,
                &listed,
            )
            .to_json();
            let bytes: u64 = files.iter().map(|f| f.bytes).sum();
            slot.uploading
                .insert(group_id(&group), (bytes, if first_ts == i64::MAX { kafka::now_ms() } else { first_ts }));
            tracing::debug!(topic = %slot.topic, partition = key.1, manifest = %manifest_key, files = files.len(), "group sealed");
            let job = UploadJob {
                topic: slot.topic.clone(),
                partition: key.1,
                generation: slot.generation,
                group,
                files,
                manifest_key,
                manifest,
            };
            if let Some(jobs) = &self.jobs
                && jobs.send(job).await.is_err()
            {
                tracing::warn!("the upload task is gone; the group will be replayed");
            }
        }
        Ok(())
    }

    fn uploaded(&mut self, done: UploadDone) {
        let Some(slot) = self.slots.get_mut(&(self.kind_of(&done.topic), done.partition)) else { return };
        if slot.generation != done.generation {
            return;
        }
        slot.uploading.remove(&group_id(&done.group));
        slot.machine.group_done(&done.group, &done.files);
    }

    fn housekeeping(&mut self) {
        let interval = self.settings.sink.checkpoint_interval;
        let idle = self.settings.sink.idle_timeout;
        let (mut spool, mut waiting, mut open_buckets) = (0u64, 0u64, 0usize);
        let mut oldest_ts: Option<i64> = None;
        let mut oldest_checkpoint = Duration::ZERO;
        let keys: Vec<SlotKey> = self.slots.keys().copied().collect();
        for key in keys {
            let Some(slot) = self.slots.get_mut(&key) else { continue };
            if slot.phase == Phase::Halted {
                continue;
            }
            spool += slot.open_bytes() + slot.uploading_bytes();
            waiting += slot.uploading_bytes();
            open_buckets += slot.machine.open_buckets();
            oldest_ts = match (oldest_ts, slot.oldest_ts()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            oldest_checkpoint = oldest_checkpoint.max(slot.last_checkpoint_at.elapsed());
            if slot.cursor.is_stalled(STALL)
                && let Some(to) = slot.cursor.stalled()
            {
                tracing::info!(topic = %slot.topic, partition = key.1, expected = ?slot.cursor.expected(), seek_to = to, "the expected record did not arrive; seeking back");
                if let Err(error) = kafka::seek(&self.consumer, &slot.topic, key.1, to) {
                    tracing::warn!(topic = %slot.topic, partition = key.1, %error, "seeking back failed");
                }
            }
            if slot.phase != Phase::Active {
                continue;
            }
            if !slot.checkpoint_in_flight && slot.last_checkpoint_at.elapsed() >= interval {
                self.maybe_checkpoint(&key);
            }
            let Some(slot) = self.slots.get_mut(&key) else { continue };
            let tick_pending = slot.tick_sent.is_some_and(|t| t.elapsed() < idle * 2);
            if !self.paused && slot.machine.has_open_buckets() && !tick_pending && slot.last_input.elapsed() >= idle {
                slot.tick_sent = Some(Instant::now());
                let control = self.control.clone();
                let ticks = self.metrics.ticks.get_or_create_owned(&StageLabels { stage: Stage::sink });
                let (topic, partition) = (slot.topic.clone(), slot.partition);
                tokio::spawn(async move {
                    let tick = Tick { time_ms: kafka::now_ms() };
                    match control.append(&topic, partition, ControlKind::Tick, &tick.to_json()).await {
                        Ok(_) => {
                            ticks.inc();
                        }
                        Err(error) => tracing::warn!(%topic, partition, %error, "writing a tick failed"),
                    }
                });
            }
        }
        self.metrics.open_buckets.set(open_buckets as i64);
        self.metrics.oldest_pending_age.set(oldest_ts.map_or(0.0, |t| ((kafka::now_ms() - t).max(0) as f64) / 1000.0));
        self.metrics
            .checkpoint_age
            .get_or_create_owned(&StageLabels { stage: Stage::sink })
            .set(oldest_checkpoint.as_secs_f64());

        self.apply_spool_limit(spool, waiting);
    }

    /// Sums the spool (open files and files waiting for S3).
    fn spool_usage(&self) -> (u64, u64) {
        self.slots.values().fold((0, 0), |(spool, waiting), slot| {
            (spool + slot.open_bytes() + slot.uploading_bytes(), waiting + slot.uploading_bytes())
        })
    }

    /// Pauses or resumes consumption for the spool's current use.
    fn apply_spool_limit(&mut self, spool: u64, waiting: u64) {
        self.metrics.spool_bytes.set(spool as i64);
        // Pause only when something waits for S3: uploads will free space. An open hour larger
        // than the spool must still be read to its end, or it would never seal.
        let max = self.settings.sink.spool_max_bytes;
        let pause = spool >= max && waiting > 0;
        let resume = spool < max / 10 * 9 || waiting == 0;
        if pause && !self.paused {
            tracing::warn!(
                spool_bytes = spool,
                spool_max_bytes = max,
                "spool full while uploads wait for S3; pausing consumption"
            );
            self.set_paused(true);
        } else if self.paused && resume {
            tracing::info!(spool_bytes = spool, "spool has room again; resuming consumption");
            self.set_paused(false);
        } else if spool >= max && waiting == 0 {
            tracing::debug!(spool_bytes = spool, "open hours exceed spool_max_bytes; consuming on so they can seal");
        }
    }

    fn set_paused(&mut self, paused: bool) {
        let parts: Vec<(String, i32)> =
            self.slots.values().filter(|s| s.phase != Phase::Halted).map(|s| (s.topic.clone(), s.partition)).collect();
        match kafka::set_paused(&self.consumer, &parts, paused) {
            Ok(()) => {
                if !paused {
                    // librdkafka resumes fetching at the position we reached, which can lie inside
                    // a record batch: make sure the broker does not skip the rest of it.
                    for slot in self.slots.values_mut().filter(|s| s.phase == Phase::Active) {
                        slot.cursor.expect(slot.position);
                    }
                }
                self.paused = paused;
                self.metrics.paused.set(i64::from(paused));
            }
            Err(error) => tracing::warn!(%error, paused, "pausing or resuming consumption failed"),
        }
    }

    /// Writes a checkpoint for `key` if it differs from the last one.
    fn maybe_checkpoint(&mut self, key: &SlotKey) {
        let Some(slot) = self.slots.get_mut(key) else { return };
        slot.last_checkpoint_at = Instant::now();
        let (resume, state) = slot.machine.checkpoint(slot.position);
        let value = match (Checkpoint { resume_offset: resume, state }).to_json() {
            Ok(v) => v,
            Err(error) => {
                tracing::error!(%error, "cannot encode a sink checkpoint");
                return;
            }
        };
        if slot.last_checkpoint.as_ref() == Some(&value) {
            return;
        }
        slot.checkpoint_in_flight = true;
        let control = self.control.clone();
        let consumer = self.consumer.clone();
        let done = self.checkpoints_tx.clone();
        let (topic, partition, generation, token) =
            (slot.topic.clone(), slot.partition, slot.generation, slot.token.clone());
        tokio::spawn(async move {
            let work = async {
                let offset = control
                    .append(&topic, partition, ControlKind::Checkpoint, &value)
                    .await
                    .map_err(|e| format!("appending the checkpoint: {e}"))?;
                kafka::commit(&consumer, &topic, partition, offset)
                    .await
                    .map_err(|e| format!("committing offset {offset}: {e}"))?;
                Ok::<i64, String>(offset)
            };
            let result = tokio::select! {
                _ = token.cancelled() => return,
                r = work => r,
            };
            let _ = done.send(CheckpointDone { topic, partition, generation, value, result });
        });
    }

    fn checkpoint_done(&mut self, done: CheckpointDone) {
        let Some(slot) = self.slots.get_mut(&(self.kind_of(&done.topic), done.partition)) else { return };
        if slot.generation != done.generation {
            return;
        }
        slot.checkpoint_in_flight = false;
        match done.result {
            Ok(offset) => {
                slot.last_checkpoint = Some(done.value);
                self.metrics.checkpoints.get_or_create_owned(&StageLabels { stage: Stage::sink }).inc();
                tracing::debug!(topic = %done.topic, partition = done.partition, offset, "sink checkpoint committed");
            }
            Err(error) => {
                tracing::warn!(topic = %done.topic, partition = done.partition, %error, "sink checkpoint failed; retrying at the next interval")
            }
        }
    }

    /// Shutdown: stop reading, give uploads in flight a deadline, checkpoint what moved, leave.
    async fn drain(
        mut self,
        upload_shutdown: CancellationToken,
        upload_task: Option<tokio::task::JoinHandle<Result<(), ProbeError>>>,
    ) {
        tracing::info!("sink stage draining: finishing uploads in flight and checkpointing");
        self.jobs = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // None: the upload task has already ended (the stage stops because of it).
        if let Some(mut upload_task) = upload_task {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    Some(done) = self.uploaded.recv() => self.uploaded(done),
                    _ = &mut upload_task => {
                        while let Ok(done) = self.uploaded.try_recv() {
                            self.uploaded(done);
                        }
                        break;
                    }
                }
            }
        }
        upload_shutdown.cancel();
        let keys: Vec<SlotKey> = self
            .slots
            .iter()
            .filter(|(_, s)| s.phase == Phase::Active && !s.checkpoint_in_flight)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.maybe_checkpoint(&key);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.slots.values().any(|s| s.checkpoint_in_flight) {
            match tokio::time::timeout_at(deadline, self.checkpoints_rx.recv()).await {
                Ok(Some(done)) => self.checkpoint_done(done),
                _ => break,
            }
        }
        for (_, slot) in self.slots.drain() {
            slot.token.cancel();
            for (_, f) in slot.files {
                f.spool.discard();
            }
        }
        kafka::close(self.consumer).await;
        tracing::info!("sink stage stopped");
    }
}

/// Identifies a seal group within its partition.
/// The epoch of a `raw-data-dlq` entry, when well-formed (a malformed one is not trusted as an
/// identity: the entry is kept under its node alone).
fn dlq_epoch<'a>(d: &'a DeadLetter<'_>) -> Option<&'a str> {
    d.epoch.as_deref().filter(|e| edgeflow_contract::is_valid_epoch(e))
}

fn group_id(g: &SealGroup) -> (i64, i64, i64) {
    (g.seal_offset, g.hour_ms, g.late_first_offset.unwrap_or(-1))
}

/// Creates the spool directory and removes leftovers of an earlier run (disposable: a restart
/// replays from Kafka).
fn prepare_spool(dir: &Path) -> Result<(), SinkError> {
    std::fs::create_dir_all(dir).map_err(|source| SinkError::SpoolDir { path: dir.to_owned(), source })?;
    let entries = std::fs::read_dir(dir).map_err(|source| SinkError::SpoolDir { path: dir.to_owned(), source })?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(SPOOL_SUFFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// A decoded input row.
#[derive(Debug)]
enum Row<'a> {
    Processed(Processed<'a>),
    /// A `raw-data-dlq` entry.
    Dlq(DeadLetter<'a>),
    /// A value that is not ours: kept as a dead letter.
    Foreign {
        ts_ms: i64,
        error: String,
        payload: &'a [u8],
        source: String,
    },
}

/// Decodes a value; `source` names it when it turns out to be foreign.
fn decode<'a>(kind: InputKind, payload: &'a [u8], ts_ms: i64, source: impl FnOnce() -> String) -> Row<'a> {
    match kind {
        InputKind::Processed => match Processed::parse(payload) {
            Ok(p) => Row::Processed(p),
            Err(DecodeError(error)) => Row::Foreign { ts_ms, error, payload, source: source() },
        },
        InputKind::DeadLetters => match DeadLetter::parse(payload) {
            Ok(d) => Row::Dlq(d),
            Err(error) => {
                Row::Foreign { ts_ms, error: format!("not a dead-letter envelope: {error}"), payload, source: source() }
            }
        },
    }
}

/// Reason recorded for values on the sink's inputs that are not edgeflow's.
pub const FOREIGN_RECORD: &str = "foreign_record";

impl Row<'_> {
    fn meta(&self) -> RowMeta<'_> {
        match self {
            Row::Processed(Processed::Reading(r)) => RowMeta {
                family: if r.reason.is_some() { Family::Rejected } else { Family::Filtered },
                time_ms: r.event_time_ms,
                advances_clock: true,
                identity: Identity::Seq { node: &r.node_id, epoch: r.epoch.as_deref(), seq: r.seq },
            },
            Row::Processed(Processed::Aggregate(a)) => RowMeta {
                family: Family::Aggregated,
                time_ms: a.window_start_ms,
                advances_clock: true,
                identity: match (&a.device_id, a.late) {
                    (d, true) => Identity::Late {
                        source_partition: a.source.partition,
                        all_devices: d.is_none(),
                        source_offset: a.source.offset,
                    },
                    (Some(d), false) => Identity::DeviceWindow { device: d, window_ms: a.window_start_ms },
                    (None, false) => {
                        Identity::Partial { source_partition: a.source.partition, window_ms: a.window_start_ms }
                    }
                },
            },
            Row::Processed(Processed::DeadLetter(d)) => RowMeta {
                family: Family::Deadletter,
                time_ms: d.received_at_ms,
                advances_clock: false,
                identity: Identity::DeadLetter { source_partition: d.source.partition, source_offset: d.source.offset },
            },
            Row::Dlq(d) => RowMeta {
                family: Family::Deadletter,
                time_ms: d.received_at_ms,
                advances_clock: true,
                identity: if i64::try_from(d.seq).is_ok() {
                    Identity::Seq { node: &d.node_id, epoch: dlq_epoch(d), seq: d.seq }
                } else {
                    Identity::Unique
                },
            },
            Row::Foreign { ts_ms, .. } => RowMeta {
                family: Family::Deadletter,
                time_ms: *ts_ms,
                advances_clock: false,
                identity: Identity::Unique,
            },
        }
    }

    /// Appends the row; `raw_topic` names the source of `process`'s dead letters.
    fn write(&self, spool: &mut SpoolFile, raw_topic: &str) -> Result<(), SpoolError> {
        match self {
            Row::Processed(Processed::Reading(r)) => spool.push_reading(&ReadingRow {
                device_id: &r.device_id,
                event_time_ms: r.event_time_ms,
                temperature: r.temperature,
                humidity: r.humidity,
                status: &r.status,
                node_id: &r.node_id,
                epoch: r.epoch.as_deref(),
                // process emits seqs beyond i64 as dead letters, so this never saturates.
                seq: i64::try_from(r.seq).unwrap_or(i64::MAX),
                reason: r.reason.map(|f| f.as_str()),
            }),
            Row::Processed(Processed::Aggregate(a)) => {
                spool.push_aggregate(a.device_id.as_deref(), a.window_start_ms, &a.sums, a.late);
                Ok(())
            }
            Row::Processed(Processed::DeadLetter(d)) => {
                let source = format!("{raw_topic}/{}@{}", d.source.partition, d.source.offset);
                spool.push_deadletter(&DeadLetterRow {
                    node_id: d.node_id.as_deref(),
                    epoch: d.epoch.as_deref(),
                    seq: d.seq.and_then(|s| i64::try_from(s).ok()),
                    reason: &d.reason,
                    payload: &d.payload,
                    received_at_ms: d.received_at_ms,
                    detail: &d.detail,
                    source: &source,
                    payload_size: i64::try_from(d.payload_size).unwrap_or(i64::MAX),
                    truncated: d.payload_size > d.payload.len() as u64,
                })
            }
            Row::Dlq(d) => spool.push_deadletter(&DeadLetterRow {
                node_id: Some(&d.node_id),
                epoch: dlq_epoch(d),
                seq: i64::try_from(d.seq).ok(),
                reason: &d.reason,
                payload: &d.payload,
                received_at_ms: d.received_at_ms,
                detail: &d.detail,
                source: &d.source,
                payload_size: i64::try_from(d.payload_size).unwrap_or(i64::MAX),
                truncated: d.truncated,
            }),
            Row::Foreign { ts_ms, error, payload, source } => spool.push_deadletter(&DeadLetterRow {
                node_id: None,
                epoch: None,
                seq: None,
                reason: FOREIGN_RECORD,
                payload,
                received_at_ms: *ts_ms,
                detail: error,
                source,
                payload_size: payload.len() as i64,
                truncated: false,
            }),
        }
    }
}
