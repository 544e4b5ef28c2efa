//! Stage `forward`: the buffer to Kafka, deleting an entry only after its delivery report.
//!
//! # Ordering and the delivery guarantee
//!
//! The forwarder reads the buffer in `seq` order and hands entries to an idempotent producer
//! (`enable.idempotence`, `acks=all`, `enable.gapless.guarantee`), keyed by `device_id` with a
//! deterministic partitioner, with no local message timeout: librdkafka retries a message until
//! it is delivered, in order, so each Kafka partition receives a node's records in increasing
//! `seq` order with no gap. The aggregator's dedup relies on exactly that.
//!
//! At most `max_in_flight` entries are with the producer. While Kafka is unreachable they wait
//! there and everything else stays in the buffer; on reconnection librdkafka delivers them and
//! the forwarder resumes reading: the backlog drains in order while new records keep arriving
//! behind it.
//!
//! Every entry fits one Kafka message (`message.max.bytes`): records are small by construction
//! and dead letters are bounded when written ([`crate::ingest::dead_letter`]). A dead letter
//! written by an older agent without that bound is cut to it on the way out (the only case where
//! what reaches Kafka differs from the committed bytes), so it cannot stop the stream behind it.
//!
//! A delivery report with an error (a permanent error, or a fatal idempotence error that
//! fails every queued message) leaves the entry in the buffer. The forwarder then waits for
//! every in-flight report, recreates the producer if it is in a fatal state, backs off, and
//! rewinds to the oldest buffered entry. Entries delivered before the failure may be sent again
//! if their deletion was not yet committed; they carry the same `(node_id, epoch, seq)`, so
//! downstream drops them.
//!
//! # Re-sends are marked
//!
//! Downstream tells a re-send from a producer reusing a `seq` by a mark, not by guessing: the
//! forwarder sets the Kafka header [`RESEND_HEADER`] (`edgeflow-resend: 1`) on every entry it may
//! have handed to Kafka before — an entry committed by an earlier run (its `seq` is below the
//! run's first, [`crate::buffer::Shared::run_first_seq`]; that run may have sent it before it
//! stopped) or, after a rewind, an entry below the furthest the cursor had reached. An entry sent
//! for the first time carries no header. `process` drops a record at or below its epoch's
//! high-water only when it is marked; unmarked, it is dead-lettered as `seq_regression`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use edgeflow_runtime::CancellationToken;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use edgeflow_contract::RESEND_HEADER;
use rdkafka::message::{Header, OwnedHeaders};

use crate::buffer::entry::{self, Kind};
use crate::buffer::{Command, Shared};
use crate::config::KafkaSettings;
use crate::ingest::dead_letter;
use crate::metrics::{KindLabel, Metrics};

/// Kafka connectivity, shared with the status endpoint.
#[derive(Debug, Default)]
pub struct KafkaStatus {
    pub connected: AtomicBool,
    /// Milliseconds since the epoch of the last successful delivery (0 = none yet).
    pub last_delivery_ms: AtomicI64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl KafkaStatus {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = e;
    }
}

/// What travels with each message through librdkafka.
#[derive(Debug)]
struct InFlight {
    seq: u64,
    kind: Kind,
    produced: Instant,
    received_ms: i64,
}

#[derive(Debug)]
struct Report {
    flight: InFlight,
    error: Option<KafkaError>,
}

struct Context {
    reports: flume::Sender<Report>,
    metrics: Metrics,
    status: Arc<KafkaStatus>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Connection failures ("FAIL") are routine while a broker is away; the outage as a whole
        // is reported once by the error callback below and in /readyz. The agent also sets
        // enable.gapless.guarantee on purpose, which librdkafka calls experimental.
        if fac == "FAIL" || message.contains("enable.gapless.guarantee") {
            tracing::debug!(facility = fac, "librdkafka: {message}");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::warn!(facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
                tracing::info!(facility = fac, "librdkafka: {message}")
            }
            _ => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        self.metrics.kafka_error(&code.map(|c| format!("{c:?}")).unwrap_or_else(|| "other".into()));
        match code {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                if self.status.connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!("all Kafka brokers are unreachable; records stay in the buffer until they are back");
                }
                self.metrics.kafka_connected.set(0);
            }
            // One broker's connection failing is routine (librdkafka reconnects); the outage as
            // a whole is reported above and in /readyz.
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::Resolve) => {
                tracing::debug!(%error, "Kafka connection: {reason}")
            }
            _ => tracing::warn!(%error, "Kafka client error: {reason}"),
        }
        self.status.set_error(Some(format!("{error}: {reason}")));
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, flight: Box<InFlight>) {
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        let _ = self.reports.send(Report { flight: *flight, error });
    }
}

type KafkaProducer = ThreadedProducer<Context>;

fn producer(settings: &KafkaSettings, client_id: &str, ctx: Context) -> Result<KafkaProducer, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("enable.gapless.guarantee", "true")
        .set("max.in.flight.requests.per.connection", "5")
        // No local timeout: a message is retried until delivered (the buffer is the bound).
        .set("message.timeout.ms", "0")
        .set("partitioner", "murmur2_random")
        // Every entry fits: dead letters are bounded well below it (see `ingest::dead_letter`).
        .set("message.max.bytes", dead_letter::MESSAGE_MAX_BYTES.to_string())
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", (settings.max_in_flight * 2 + 1000).to_string())
        .set("queue.buffering.max.kbytes", "1048576");
    for (k, v) in &settings.properties.0 {
        config.set(k, v.expose());
    }
    config.create_with_context(ctx)
}

/// Everything the forwarder needs.
#[derive(Debug)]
pub struct Forward {
    pub settings: KafkaSettings,
    pub client_id: String,
    pub buffer: flume::Sender<Command<crate::ingest::AckToken>>,
    pub shared: Arc<Shared>,
    /// Entries just committed, handed over by the buffer thread.
    pub tail: flume::Receiver<crate::buffer::Tail>,
    pub metrics: Metrics,
    pub status: Arc<KafkaStatus>,
    /// Set at a clean stop to the `seq` of the `high_water` marker written once ingest stopped:
    /// after shutdown, the forwarder keeps sending until it is past it (while Kafka is
    /// connected, within the drain timeout), so the marker goes out with the final flush.
    pub flush_through: Arc<std::sync::OnceLock<u64>>,
}

/// Builds the producer up front so a bad librdkafka property fails start-up, not later.
pub fn check_settings(settings: &KafkaSettings) -> Result<(), KafkaError> {
    let (tx, _rx) = flume::unbounded();
    let ctx = Context { reports: tx, metrics: Metrics::register(&mut Default::default()), status: Default::default() };
    producer(settings, "edgeflow-agent-check", ctx).map(drop)
}

/// Forwards until `shutdown`, then waits (up to `drain_timeout`) for in-flight deliveries.
pub async fn run(fwd: Forward, shutdown: CancellationToken, drain_timeout: Duration) -> Result<(), KafkaError> {
    let (report_tx, reports) = flume::unbounded::<Report>();
    let make_ctx = || Context { reports: report_tx.clone(), metrics: fwd.metrics.clone(), status: fwd.status.clone() };
    let mut producer = producer(&fwd.settings, &fwd.client_id, make_ctx())?;
    let (producer_tx, producer_rx) = tokio::sync::watch::channel(producer.clone());
    let probe_stop = shutdown.child_token();
    tokio::spawn(probe(
        producer_rx,
        [fwd.settings.topic.clone(), fwd.settings.dlq_topic.clone()],
        fwd.status.clone(),
        fwd.metrics.clone(),
        probe_stop.clone(),
    ));
    let _stop_probe = probe_stop.drop_guard();
    let max_in_flight = fwd.settings.max_in_flight;
    let chunk = max_in_flight.clamp(1, 4096);

    let mut cursor = 0u64; // next seq to read from the buffer
    // Entries below this may have been sent before: by an earlier run, or before a rewind.
    let mut resend_below = fwd.shared.run_first_seq.load(Ordering::Relaxed);
    let mut in_flight = 0usize;
    let mut delivered: Vec<u64> = Vec::new();
    let mut failed = false;
    let mut backoff = Duration::from_millis(250);
    let mut stop_at: Option<Instant> = None;
    let mut tail: std::collections::VecDeque<crate::buffer::Tail> = std::collections::VecDeque::new();

    loop {
        // 1. Take delivery reports.
        while let Ok(report) = reports.try_recv() {
            in_flight -= 1;
            handle_report(&fwd, report, &mut delivered, &mut failed);
        }
        fwd.metrics.kafka_in_flight.set(in_flight as i64);
        if !delivered.is_empty() {
            let seqs = std::mem::take(&mut delivered);
            if fwd.buffer.send_async(Command::Delivered(seqs)).await.is_err() {
                return Ok(());
            }
        }

        // 2. Shutdown: stop reading (once past the final marker), wait for what is in flight.
        let mut flushing = false;
        if shutdown.is_cancelled() {
            let deadline = *stop_at.get_or_insert_with(|| Instant::now() + drain_timeout);
            flushing = !failed
                && Instant::now() < deadline
                && fwd.status.connected.load(Ordering::Relaxed)
                && fwd.flush_through.get().is_some_and(|&seq| cursor <= seq);
        }
        if shutdown.is_cancelled() && !flushing {
            let deadline = *stop_at.get_or_insert_with(|| Instant::now() + drain_timeout);
            if in_flight == 0 || Instant::now() >= deadline {
                if in_flight > 0 {
                    tracing::warn!(
                        in_flight,
                        "stopping with Kafka deliveries unconfirmed; they stay buffered and are sent again at start"
                    );
                }
                return Ok(());
            }
            let _ = tokio::time::timeout(deadline - Instant::now(), reports.recv_async()).await.map(|r| {
                if let Ok(report) = r {
                    in_flight -= 1;
                    handle_report(&fwd, report, &mut delivered, &mut failed);
                }
            });
            continue;
        }

        // 3. After a failed delivery: settle, maybe rebuild the producer, back off, rewind.
        if failed {
            if in_flight > 0 {
                wait_report(&reports, &shutdown, &fwd, &mut in_flight, &mut delivered, &mut failed).await;
                continue;
            }
            if let Some((code, reason)) = producer.client().fatal_error() {
                tracing::warn!(?code, reason, "Kafka producer hit a fatal error; creating a new one");
                producer = self::producer(&fwd.settings, &fwd.client_id, make_ctx())?;
                let _ = producer_tx.send(producer.clone());
            }
            // Make sure deletions of what was delivered are committed before re-reading.
            let (tx, rx) = tokio::sync::oneshot::channel();
            if fwd.buffer.send_async(Command::Barrier(tx)).await.is_err() {
                return Ok(());
            }
            let _ = rx.await;
            tracing::info!(retry_in = ?backoff, "re-sending buffered entries from the oldest after a failed delivery");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => continue,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
            resend_below = resend_below.max(cursor);
            cursor = 0;
            tail.clear();
            failed = false;
            continue;
        }

        // 4. Fill the window: first with entries the buffer thread just handed over (no read
        //    back), then, when behind (after a restart, an outage, a rewind), from the file.
        let mut sent_any = false;
        let mut room = max_in_flight.saturating_sub(in_flight);
        while let Ok(batch) = fwd.tail.try_recv() {
            tail.push_back(batch);
        }
        if room == 0 {
            // Kafka is not keeping up (or is down): hold no copies we cannot send; what is
            // still buffered is read back later, and what the buffer drops in the meantime
            // (drop_oldest) must not reach Kafka from here.
            tail.clear();
        }
        while room > 0 && !failed {
            let Some(batch) = tail.front_mut() else { break };
            // Entries below the cursor were already sent; a gap above it means we are behind.
            batch.retain(|(seq, _)| *seq >= cursor);
            match batch.first().map(|(seq, _)| *seq) {
                None => {
                    tail.pop_front();
                }
                Some(first) if first != cursor => break,
                Some(_) => {
                    let take = batch.len().min(room);
                    let rest = batch.split_off(take);
                    let chunk = std::mem::replace(batch, rest);
                    let sent = send_entries(
                        &fwd,
                        &producer,
                        &chunk,
                        resend_below,
                        &mut cursor,
                        &mut in_flight,
                        &mut delivered,
                        &mut failed,
                    );
                    sent_any |= sent > 0;
                    room -= sent;
                    if sent < chunk.len() {
                        break;
                    }
                }
            }
        }
        let behind = cursor < fwd.shared.stats().next_seq;
        if room > 0 && behind && !failed {
            let next_seq = fwd.shared.stats().next_seq;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let read = Command::Read { from: cursor, max_records: room.min(chunk), max_bytes: 4 << 20, reply: tx };
            if fwd.buffer.send_async(read).await.is_err() {
                return Ok(());
            }
            let rows = match rx.await {
                Ok(Ok(rows)) => rows,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "reading the buffer failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => return Ok(()),
            };
            if rows.is_empty() {
                // Nothing at or after the cursor existed when read (delivered or dropped).
                cursor = cursor.max(next_seq);
            }
            let full = rows.len() >= room.min(chunk);
            let sent = send_entries(
                &fwd,
                &producer,
                &rows,
                resend_below,
                &mut cursor,
                &mut in_flight,
                &mut delivered,
                &mut failed,
            );
            sent_any |= sent > 0;
            fwd.metrics.kafka_in_flight.set(in_flight as i64);
            if full && sent == rows.len() && !failed {
                // More may be waiting right now; do not sleep.
                continue;
            }
        }
        fwd.metrics.kafka_in_flight.set(in_flight as i64);
        if sent_any && !failed {
            backoff = Duration::from_millis(250);
        }

        // 5. Wait for a delivery report, new entries, or shutdown.
        if in_flight >= max_in_flight || !sent_any {
            tokio::select! {
                r = reports.recv_async() => if let Ok(report) = r {
                    in_flight -= 1;
                    handle_report(&fwd, report, &mut delivered, &mut failed);
                },
                b = fwd.tail.recv_async(), if in_flight < max_in_flight => if let Ok(batch) = b {
                    tail.push_back(batch);
                },
                _ = fwd.shared.committed.notified(), if in_flight < max_in_flight && tail.is_empty() => {}
                _ = shutdown.cancelled(), if !flushing => {}
                // Entries dropped or re-read after an error; also a periodic safety net.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Hands entries to the producer in order, advancing the cursor, and marks those below
/// `resend_below` as possible re-sends. Returns how many were taken (fewer than given if
/// librdkafka's queue is full or an entry is refused).
#[allow(clippy::too_many_arguments)]
fn send_entries(
    fwd: &Forward,
    producer: &KafkaProducer,
    rows: &[(u64, Vec<u8>)],
    resend_below: u64,
    cursor: &mut u64,
    in_flight: &mut usize,
    delivered: &mut Vec<u64>,
    failed: &mut bool,
) -> usize {
    let mut sent = 0;
    for (seq, bytes) in rows {
        let e = match entry::decode(bytes) {
            Ok(e) => e,
            Err(error) => {
                tracing::error!(seq, %error, "a buffered entry is damaged and cannot be sent; removing it");
                delivered.push(*seq);
                *cursor = seq + 1;
                sent += 1;
                continue;
            }
        };
        let topic = match e.kind {
            Kind::Record => fwd.settings.topic.as_str(),
            Kind::DeadLetter => fwd.settings.dlq_topic.as_str(),
        };
        // Entries are bounded when written; one written by an older agent may not be, and
        // Kafka refusing it would stop the stream behind it for good.
        let bounded = match e.kind {
            Kind::DeadLetter => dead_letter::shrink(e.value),
            Kind::Record => None,
        };
        if bounded.is_some() {
            tracing::warn!(
                seq,
                bytes = e.value.len(),
                "a buffered dead letter is larger than a Kafka message may be; sending it with its payload copy cut"
            );
            fwd.metrics.dead_letters_truncated.inc();
        }
        let flight =
            Box::new(InFlight { seq: *seq, kind: e.kind, produced: Instant::now(), received_ms: e.received_ms });
        let value = bounded.as_deref().unwrap_or(e.value);
        let mut record = BaseRecord::with_opaque_to(topic, flight).key(e.key).payload(value);
        if *seq < resend_below {
            record = record.headers(OwnedHeaders::new().insert(Header { key: RESEND_HEADER, value: Some("1") }));
        }
        match producer.send(record) {
            Ok(()) => {
                *in_flight += 1;
                *cursor = seq + 1;
                sent += 1;
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                // librdkafka's queue is full despite the window; let it drain.
                break;
            }
            Err((error, _)) => {
                tracing::error!(seq, %error, "Kafka refused an entry; it stays buffered and is retried");
                fwd.metrics.kafka_delivery_errors.inc();
                fwd.status.set_error(Some(error.to_string()));
                *failed = true;
                break;
            }
        }
    }
    sent
}

async fn wait_report(
    reports: &flume::Receiver<Report>,
    shutdown: &CancellationToken,
    fwd: &Forward,
    in_flight: &mut usize,
    delivered: &mut Vec<u64>,
    failed: &mut bool,
) {
    tokio::select! {
        r = reports.recv_async() => if let Ok(report) = r {
            *in_flight -= 1;
            handle_report(fwd, report, delivered, failed);
        },
        _ = shutdown.cancelled() => {}
    }
}

fn handle_report(fwd: &Forward, report: Report, delivered: &mut Vec<u64>, failed: &mut bool) {
    let Report { flight, error } = report;
    match error {
        None => {
            delivered.push(flight.seq);
            let m = &fwd.metrics;
            let kind = match flight.kind {
                Kind::Record => "record",
                Kind::DeadLetter => "dead_letter",
            };
            m.records_forwarded.get_or_create(&KindLabel { kind: kind.into() }).inc();
            m.kafka_delivery_duration.observe(flight.produced.elapsed().as_secs_f64());
            let now = crate::buffer::now_ms();
            if flight.kind == Kind::Record {
                m.record_latency.observe((now - flight.received_ms).max(0) as f64 / 1000.0);
            }
            if !fwd.status.connected.swap(true, Ordering::Relaxed) {
                tracing::info!("Kafka is accepting records");
                fwd.status.set_error(None);
            }
            m.kafka_connected.set(1);
            fwd.status.last_delivery_ms.store(now, Ordering::Relaxed);
        }
        Some(error) => {
            fwd.metrics.kafka_delivery_errors.inc();
            if !*failed {
                tracing::warn!(seq = flight.seq, %error, "Kafka delivery failed; the entry stays buffered and will be sent again");
            }
            fwd.status.set_error(Some(error.to_string()));
            *failed = true;
        }
    }
}

/// Checks every 10 s that the brokers answer and the topics exist, so readiness reflects Kafka
/// even when no record flows. Uses the forwarder's own client (the latest one, if it was
/// recreated), not a second connection.
async fn probe(
    producer: tokio::sync::watch::Receiver<KafkaProducer>,
    topics: [String; 2],
    status: Arc<KafkaStatus>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (c, topics) = (producer.borrow().clone(), topics.clone());
        let result = tokio::task::spawn_blocking(move || {
            let md = c.client().fetch_metadata(None, Duration::from_secs(5))?;
            let missing: Vec<String> = topics
                .into_iter()
                .filter(|t| !md.topics().iter().any(|m| m.name() == t && m.error().is_none()))
                .collect();
            Ok::<_, KafkaError>(missing)
        })
        .await;
        match result {
            Ok(Ok(missing)) if missing.is_empty() => {
                if !status.connected.swap(true, Ordering::Relaxed) {
                    tracing::info!("Kafka brokers reachable");
                }
                metrics.kafka_connected.set(1);
                status.set_error(None);
            }
            Ok(Ok(missing)) => {
                let e = format!("topics missing on the cluster: {}", missing.join(", "));
                if status.last_error().as_deref() != Some(e.as_str()) {
                    tracing::warn!("{e}; records stay in the buffer until they exist");
                }
                status.connected.store(false, Ordering::Relaxed);
                metrics.kafka_connected.set(0);
                status.set_error(Some(e));
            }
            Ok(Err(error)) => {
                status.connected.store(false, Ordering::Relaxed);
                metrics.kafka_connected.set(0);
                status.set_error(Some(error.to_string()));
            }
            Err(_) => return,
        }
    }
}
