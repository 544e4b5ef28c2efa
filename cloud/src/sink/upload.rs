//! The `upload` task: sealed groups (files, then their manifest) to S3, retried with
//! exponential backoff and full jitter until they succeed or the stage stops.
//!
//! A group is reported done only when every file and the manifest exist in S3 (created now, or
//! found there — HTTP 412 — *and ours*: written by this deployment, see [`crate::s3`]). Only
//! then may a checkpoint move past the group's first offset. An object of another writer at
//! one of the group's keys is an error like any other, retried forever: the group waits,
//! logged at ERROR and counted (`upload_conflicts_total`, alert
//! `EdgeflowAggregatorUploadConflict`) until an operator clears the key. While S3 is down
//! nothing is lost: files wait in the spool and the consume loop pauses consumption once the
//! spool is full, leaving the data in Kafka.
//!
//! Before its first upload the task checks that the store honours `If-None-Match`
//! ([`S3::check_create_only`]); an unreachable store is retried, jobs waiting meanwhile, and a
//! store that overwrites ends the task with [`ProbeError::CreateOnlyIgnored`], which stops the
//! stage. Each file is hashed once per upload (on a blocking thread), not per attempt.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::kafka::now_ms;
use crate::metrics::{FamilyLabels, Metrics};
use crate::s3::{ProbeError, S3, S3Error, Written, sha256_file, sha256_hex};
use crate::sink::state::{Family, FileInfo, SealGroup};

/// One file of a group.
#[derive(Debug, Clone)]
pub struct JobFile {
    pub family: Family,
    pub path: PathBuf,
    pub info: FileInfo,
    pub bytes: u64,
}

/// A sealed group to upload.
#[derive(Debug)]
pub struct UploadJob {
    /// The input partition and the incarnation of its state that sealed the group.
    pub topic: String,
    pub partition: i32,
    pub generation: u64,
    pub group: SealGroup,
    pub files: Vec<JobFile>,
    pub manifest_key: String,
    pub manifest: Vec<u8>,
}

/// A group now in S3.
#[derive(Debug)]
pub struct UploadDone {
    pub topic: String,
    pub partition: i32,
    pub generation: u64,
    pub group: SealGroup,
    pub files: Vec<FileInfo>,
    pub bytes: u64,
}

/// Shared view of S3, for readiness.
#[derive(Debug, Default)]
pub struct S3Health {
    /// Unix milliseconds since uploads have been failing; 0 while they succeed.
    pub failing_since_ms: AtomicI64,
    /// Unix milliseconds of the last successful request (upload or probe).
    pub last_ok_ms: AtomicI64,
}

impl S3Health {
    fn ok(&self) {
        self.failing_since_ms.store(0, Ordering::Relaxed);
        self.last_ok_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn failed(&self) {
        let _ = self.failing_since_ms.compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records the outcome of a probe.
    pub fn probed(&self, ok: bool) {
        if ok { self.ok() } else { self.failed() }
    }
}

/// Retry delays: exponential from 200ms, capped at 30s, full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self { attempt: 0 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap_ms = 200u64.saturating_mul(1 << self.attempt.min(16)).min(30_000);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(fastrand::u64(cap_ms / 2..=cap_ms))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Settings of the uploader.
#[derive(Debug, Clone)]
pub struct Uploader {
    pub s3: S3,
    pub multipart_threshold: u64,
    pub concurrency: usize,
    pub metrics: Metrics,
    pub health: Arc<S3Health>,
    /// The object the start-up check of create-only writes uses ([`crate::sink::keys::probe_key`]).
    pub probe_key: String,
}

impl Uploader {
    /// Uploads jobs from `jobs` until the channel closes (then finishes what is running) or
    /// `shutdown` (then abandons what is running: a replay redoes it). Checks the store first;
    /// returns an error only when the store ignores `If-None-Match`.
    pub async fn run(
        self,
        mut jobs: mpsc::Receiver<UploadJob>,
        done: mpsc::UnboundedSender<UploadDone>,
        shutdown: CancellationToken,
    ) -> Result<(), ProbeError> {
        if !self.check_store(&shutdown).await? {
            return Ok(());
        }
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(_) = running.join_next(), if !running.is_empty() => {}
                job = jobs.recv() => match job {
                    Some(job) => {
                        let permit = tokio::select! {
                            _ = shutdown.cancelled() => break,
                            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                        };
                        let this = self.clone();
                        let done = done.clone();
                        let token = shutdown.clone();
                        running.spawn(async move {
                            if let Some(result) = this.upload_group(job, &token).await {
                                let _ = done.send(result);
                            }
                            drop(permit);
                        });
                    }
                    None => {
                        // The consume loop stopped: let the running uploads finish (or be
                        // cancelled by `shutdown`).
                        loop {
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                next = running.join_next() => if next.is_none() { break },
                            }
                        }
                        break;
                    }
                },
            }
        }
        running.abort_all();
        Ok(())
    }

    /// Runs [`S3::check_create_only`] until it answers; `Ok(false)` when cancelled first.
    async fn check_store(&self, token: &CancellationToken) -> Result<bool, ProbeError> {
        let mut backoff = Backoff::new();
        loop {
            let result = tokio::select! {
                _ = token.cancelled() => return Ok(false),
                r = self.s3.check_create_only(&self.probe_key) => r,
            };
            match result {
                Ok(()) => {
                    self.health.ok();
                    tracing::info!(key = %self.probe_key, "S3 honours create-only writes (If-None-Match)");
                    return Ok(true);
                }
                Err(ProbeError::S3(error)) => {
                    self.health.failed();
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "checking that S3 honours create-only writes failed; retrying (uploads wait)");
                    tokio::select! {
                        _ = token.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(fatal) => {
                    self.health.failed();
                    tracing::error!(error = %fatal, "S3 overwrote an existing object; the sink cannot upload exactly once and stops");
                    return Err(fatal);
                }
            }
        }
    }

    /// Uploads a group's files then its manifest; `None` when cancelled.
    async fn upload_group(&self, job: UploadJob, token: &CancellationToken) -> Option<UploadDone> {
        let mut infos = Vec::with_capacity(job.files.len());
        let mut bytes = 0;
        for file in &job.files {
            let started = Instant::now();
            let key = &file.info.object_key;
            let sha256 = self.retry(token, key, || hash_file(key, file.path.clone())).await?;
            let written = self
                .retry(token, key, || self.s3.put_file(key, &file.path, file.bytes, self.multipart_threshold, &sha256))
                .await?;
            self.metrics.upload_seconds.observe(started.elapsed().as_secs_f64());
            let labels = FamilyLabels { family: file.family.as_str().into() };
            self.metrics.files_uploaded.get_or_create_owned(&labels).inc();
            self.metrics.bytes_uploaded.get_or_create_owned(&labels).inc_by(file.bytes);
            self.written(key, &sha256, &written);
            if written == Written::Created {
                tracing::debug!(%key, rows = file.info.rows, bytes = file.bytes, "object uploaded");
            }
            let _ = tokio::fs::remove_file(&file.path).await;
            bytes += file.bytes;
            infos.push(file.info.clone());
        }
        let manifest = job.manifest.clone();
        let sha256 = sha256_hex(&manifest);
        let written = self
            .retry(token, &job.manifest_key, || {
                self.s3.put_bytes(&job.manifest_key, manifest.clone(), "application/json", &sha256)
            })
            .await?;
        self.metrics.manifests_uploaded.inc();
        self.written(&job.manifest_key, &sha256, &written);
        tracing::info!(
            manifest = %job.manifest_key,
            files = infos.len(),
            rows = infos.iter().map(|f| f.rows).sum::<u64>(),
            "hour group in S3"
        );
        Some(UploadDone {
            topic: job.topic,
            partition: job.partition,
            generation: job.generation,
            group: job.group,
            files: infos,
            bytes,
        })
    }

    /// Counts and logs an object found in S3 instead of created.
    fn written(&self, key: &str, sha256: &str, written: &Written) {
        match written {
            Written::Created => {}
            Written::AlreadyThere => {
                self.metrics.uploads_already_present.inc();
                tracing::info!(%key, "object already in S3 (written before a restart); kept as is");
            }
            Written::OursReencoded { found_sha256 } => {
                self.metrics.uploads_already_present.inc();
                self.metrics.uploads_reencoded.inc();
                tracing::warn!(
                    %key,
                    sha256,
                    %found_sha256,
                    "object already in S3, written by this deployment with other bytes (another version encoded the same input differently); kept as is"
                );
            }
        }
    }

    async fn retry<T, F, Fut>(&self, token: &CancellationToken, key: &str, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let mut backoff = Backoff::new();
        loop {
            let result = tokio::select! {
                _ = token.cancelled() => return None,
                r = op() => r,
            };
            match result {
                Ok(w) => {
                    self.health.ok();
                    return Some(w);
                }
                Err(error) => {
                    self.health.failed();
                    self.metrics.upload_errors.inc();
                    let delay = backoff.next_delay();
                    if matches!(error, S3Error::Conflict { .. }) {
                        // Data of this deployment is not in S3 and will not be until an operator
                        // acts (docs/runbooks.md#edgeflowaggregatoruploadconflict).
                        self.metrics.upload_conflicts.inc();
                        tracing::error!(%key, %error, retry_in = ?delay, "upload conflict: the group is not committed past; retrying");
                    } else {
                        tracing::warn!(%key, %error, retry_in = ?delay, "upload failed; retrying");
                    }
                    tokio::select! {
                        _ = token.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Hashes a spool file on a blocking thread.
async fn hash_file(key: &str, path: PathBuf) -> Result<String, S3Error> {
    let local = |message: String| S3Error::Local { operation: "hash", key: key.to_owned(), message };
    tokio::task::spawn_blocking(move || sha256_file(&path))
        .await
        .map_err(|e| local(e.to_string()))?
        .map_err(|e| local(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!((100..=200).contains(&(first.as_millis() as u64)), "{first:?}");
        let later: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(later.last().is_some_and(|d| *d >= Duration::from_secs(15)));
    }
}
