//! The `upload` task: sealed groups (files, then their manifest) to S3, retried with
//! exponential backoff and full jitter until they succeed or the stage stops.
//!
//! A group is reported done only when every file and the manifest exist in S3 (created now, or
//! found there: HTTP 412). Only then may a checkpoint move past the group's first offset.
//! While S3 is down nothing is lost: files wait in the spool and the consume loop pauses
//! consumption once the spool is full, leaving the data in Kafka.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::kafka::now_ms;
use crate::metrics::{FamilyLabels, Metrics};
use crate::s3::{S3, S3Error, Written};
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
}

impl Uploader {
    /// Uploads jobs from `jobs` until the channel closes (then finishes what is running) or
    /// `shutdown` (then abandons what is running: a replay redoes it).
    pub async fn run(
        self,
        mut jobs: mpsc::Receiver<UploadJob>,
        done: mpsc::UnboundedSender<UploadDone>,
        shutdown: CancellationToken,
    ) {
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
    }

    /// Uploads a group's files then its manifest; `None` when cancelled.
    async fn upload_group(&self, job: UploadJob, token: &CancellationToken) -> Option<UploadDone> {
        let mut infos = Vec::with_capacity(job.files.len());
        let mut bytes = 0;
        for file in &job.files {
            let started = Instant::now();
            let written = self
                .retry(token, &file.info.object_key, || {
                    self.s3.put_file(&file.info.object_key, &file.path, file.bytes, self.multipart_threshold)
                })
                .await?;
            self.metrics.upload_seconds.observe(started.elapsed().as_secs_f64());
            let labels = FamilyLabels { family: file.family.as_str().into() };
            self.metrics.files_uploaded.get_or_create_owned(&labels).inc();
            self.metrics.bytes_uploaded.get_or_create_owned(&labels).inc_by(file.bytes);
            if written == Written::AlreadyThere {
                self.metrics.uploads_already_present.inc();
                tracing::info!(key = %file.info.object_key, "object already in S3 (written before a restart); kept as is");
            } else {
                tracing::debug!(key = %file.info.object_key, rows = file.info.rows, bytes = file.bytes, "object uploaded");
            }
            let _ = tokio::fs::remove_file(&file.path).await;
            bytes += file.bytes;
            infos.push(file.info.clone());
        }
        let manifest = job.manifest.clone();
        let written = self
            .retry(token, &job.manifest_key, || {
                self.s3.put_bytes(&job.manifest_key, manifest.clone(), "application/json")
            })
            .await?;
        self.metrics.manifests_uploaded.inc();
        if written == Written::AlreadyThere {
            self.metrics.uploads_already_present.inc();
        }
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

    async fn retry<F, Fut>(&self, token: &CancellationToken, key: &str, mut op: F) -> Option<Written>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Written, S3Error>>,
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
                    tracing::warn!(%key, %error, retry_in = ?delay, "upload failed; retrying");
                    tokio::select! {
                        _ = token.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
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
