//! The S3 client: interface endpoint, signing region, path style, SSE-KMS, create-only writes.
//!
//! The endpoint URL (an S3 interface VPC endpoint such as
//! `https://bucket.vpce-0abc-xyz.s3.eu-west-1.vpce.amazonaws.com`, or a local S3 server) is set
//! on the S3 client only; credentials come from the default AWS chain (IRSA web identity on
//! EKS, environment variables in tests), which resolves STS on its own endpoints.
//!
//! Every object is written *create-only* (`If-None-Match: *`, also on
//! `CompleteMultipartUpload`) and carries two user metadata entries: `edgeflow-sha256` (the hex
//! SHA-256 of its body) and `edgeflow-writer` (`[s3] deployment_id`). Keys are deterministic,
//! so create-only is what makes uploads idempotent; but a 412 only says that *something* is at
//! the key. It counts as success only when the object there is ours: a HEAD finds our writer
//! and our hash ([`Written::AlreadyThere`]: a replay or a retry wrote it), or our writer and
//! another hash ([`Written::OursReencoded`]: another version encoded the same input
//! differently). Anything else — no metadata, another writer — is [`S3Error::Conflict`], never
//! success: the uploader retries it (and alerts) and the group is never committed past.
//!
//! [`S3::check_create_only`] checks at start that the store honours `If-None-Match` at all: a
//! store that overwrites would turn every replay into a silent rewrite and every foreign
//! object into a silent loss. Request checksums are computed only when an operation requires
//! them, which keeps the client compatible with S3 implementations that do not accept
//! streaming trailers.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};

use crate::config::{MIN_PART_BYTES, S3Settings};
use url::Url;

/// An S3 operation that failed. Every variant is retried by the uploader; the distinction is
/// for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The request did not get an HTTP answer (connection refused, timeout, DNS).
    #[error("{operation} {key}: no answer from S3: {message}")]
    Unreachable { operation: &'static str, key: String, message: String },
    /// S3 answered with an error status.
    #[error("{operation} {key}: S3 answered {status} {code}: {message}")]
    Status { operation: &'static str, key: String, status: u16, code: String, message: String },
    /// The local spool file could not be read.
    #[error("{operation} {key}: reading the spool file: {message}")]
    Local { operation: &'static str, key: String, message: String },
    /// The key exists (HTTP 412) and the object there is not this deployment's: it has no
    /// `edgeflow-writer` metadata or another one. Never success: the data it would stand for
    /// is not in S3.
    #[error(
        "{key}: the object at this key was not written by this deployment (writer {}); another writer shares the bucket prefix",
        found_writer.as_deref().map_or("none".to_owned(), |w| format!("`{w}`"))
    )]
    Conflict { key: String, found_writer: Option<String> },
}

/// Why the start-up check of create-only writes failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The check could not run (S3 unreachable, an error status): retried.
    #[error(transparent)]
    S3(#[from] S3Error),
    /// A create-only `PutObject` on an existing key succeeded: the store ignores
    /// `If-None-Match: *`. Fatal: replays would overwrite and foreign objects go unnoticed.
    #[error(
        "the S3 store at {endpoint} (bucket {bucket}) does not honour If-None-Match: a create-only PUT of the existing key {key} succeeded instead of answering 412; edgeflow needs conditional writes to upload exactly once"
    )]
    CreateOnlyIgnored { endpoint: String, bucket: String, key: String },
}

/// How a create-only write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The object was created.
    Created,
    /// The key existed already (HTTP 412) with our writer and our hash: a replay or a retry
    /// wrote it.
    AlreadyThere,
    /// The key existed already with our writer but another hash: another version of the
    /// aggregator encoded the same input differently. Ours; the uploader warns.
    OursReencoded { found_sha256: String },
}

/// User metadata: hex SHA-256 of the body.
pub const META_SHA256: &str = "edgeflow-sha256";
/// User metadata: the `[s3] deployment_id` that wrote the object.
pub const META_WRITER: &str = "edgeflow-writer";

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Hex SHA-256 of a file, read in 1 MiB chunks (blocking: call it off the async runtime).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// What a raw create-only request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Put {
    Created,
    /// HTTP 412: something is at the key.
    Exists,
}

/// The S3 side of the sink and of `verify`.
#[derive(Debug, Clone)]
pub struct S3 {
    client: Client,
    bucket: String,
    sse_kms_key_id: Option<String>,
    /// `[s3] deployment_id`: the `edgeflow-writer` of every object written.
    writer: String,
    /// The endpoint, for messages.
    endpoint: String,
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: HasStatus + std::fmt::Debug>(
    operation: &'static str,
    key: &str,
    error: SdkError<E, R>,
) -> Result<Put, S3Error> {
    let status = error.raw_response().map(HasStatus::status_code);
    match status {
        Some(412) => Ok(Put::Exists),
        Some(status) => {
            let (code, message) = match error.as_service_error() {
                Some(e) => (e.code().unwrap_or("").to_owned(), e.message().unwrap_or("").to_owned()),
                None => (String::new(), format!("{error:?}")),
            };
            Err(S3Error::Status { operation, key: key.to_owned(), status, code, message })
        }
        None => Err(S3Error::Unreachable { operation, key: key.to_owned(), message: error_chain(&error) }),
    }
}

/// The error and its sources, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The HTTP status of a raw response.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl S3 {
    /// Builds the client from settings and the default credential chain.
    pub async fn new(settings: &S3Settings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(Region::new(settings.region.clone()));
        if let Some(c) = &settings.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.expose().to_owned(),
                None,
                None,
                "edgeflow-static",
            ));
        }
        let shared = loader
            // Our uploader retries forever with its own backoff; one attempt per call here.
            .retry_config(RetryConfig::standard().with_max_attempts(1))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            )
            .load()
            .await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        if let Some(url) = &settings.endpoint_url {
            builder = builder.endpoint_url(url.as_str().trim_end_matches('/'));
        }
        Self {
            client: Client::from_conf(builder.build()),
            bucket: settings.bucket.clone(),
            sse_kms_key_id: settings.sse_kms_key_id.clone(),
            writer: settings.deployment_id.clone(),
            endpoint: settings
                .endpoint_url
                .as_ref()
                .map_or_else(|| format!("the regional endpoint of {}", settings.region), Url::to_string),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The underlying client (tests and `verify`).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Checks that the bucket answers (readiness).
    pub async fn probe(&self) -> Result<(), S3Error> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => classify("HeadBucket", "", e).map(|_| ()),
        }
    }

    /// Writes `body` (whose hex SHA-256 is `sha256`) at `key` unless the key exists; an
    /// existing object must be ours ([`S3Error::Conflict`] otherwise).
    pub async fn put_bytes(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        sha256: &str,
    ) -> Result<Written, S3Error> {
        match self.put_object(key, ByteStream::from(body), None, content_type, sha256).await? {
            Put::Created => Ok(Written::Created),
            Put::Exists => self.owned(key, sha256).await,
        }
    }

    /// Writes the file at `path` (`size` bytes, hex SHA-256 `sha256`) at `key` unless the key
    /// exists; in parts of `part_size` when `size` exceeds `multipart_threshold`. An existing
    /// object must be ours ([`S3Error::Conflict`] otherwise).
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        multipart_threshold: u64,
        sha256: &str,
    ) -> Result<Written, S3Error> {
        if size > multipart_threshold {
            return self.put_multipart(key, path, size, multipart_threshold.max(MIN_PART_BYTES), sha256).await;
        }
        let body = ByteStream::read_from()
            .path(path)
            .length(Length::Exact(size))
            .build()
            .await
            .map_err(|e| S3Error::Local { operation: "PutObject", key: key.to_owned(), message: e.to_string() })?;
        match self.put_object(key, body, Some(size), PARQUET, sha256).await? {
            Put::Created => Ok(Written::Created),
            Put::Exists => self.owned(key, sha256).await,
        }
    }

    /// One create-only `PutObject` with our metadata.
    async fn put_object(
        &self,
        key: &str,
        body: ByteStream,
        size: Option<u64>,
        content_type: &str,
        sha256: &str,
    ) -> Result<Put, S3Error> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .content_type(content_type)
            .metadata(META_SHA256, sha256)
            .metadata(META_WRITER, &self.writer)
            .set_content_length(size.map(|n| n as i64))
            .body(body);
        if let Some(kms) = &self.sse_kms_key_id {
            req = req.server_side_encryption(ServerSideEncryption::AwsKms).ssekms_key_id(kms);
        }
        match req.send().await {
            Ok(_) => Ok(Put::Created),
            Err(e) => classify("PutObject", key, e),
        }
    }

    /// The user metadata of the object at `key`; `None` when there is none (404).
    pub async fn head(&self, key: &str) -> Result<Option<HashMap<String, String>>, S3Error> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.metadata.unwrap_or_default())),
            Err(e) if e.raw_response().map(HasStatus::status_code) == Some(404) => Ok(None),
            // A 412 cannot answer an unconditional HEAD; treat it as the error status it is.
            Err(e) => Err(match classify("HeadObject", key, e) {
                Err(e) => e,
                Ok(_) => S3Error::Status {
                    operation: "HeadObject",
                    key: key.to_owned(),
                    status: 412,
                    code: String::new(),
                    message: String::new(),
                },
            }),
        }
    }

    /// After a 412: whether the object at `key` is ours.
    async fn owned(&self, key: &str, sha256: &str) -> Result<Written, S3Error> {
        let Some(meta) = self.head(key).await? else {
            // Gone between the 412 and the HEAD (deleted): the retry creates it.
            return Err(S3Error::Status {
                operation: "HeadObject",
                key: key.to_owned(),
                status: 404,
                code: "NoSuchKey".into(),
                message: "the key answered 412, then disappeared".into(),
            });
        };
        ownership(&self.writer, sha256, key, &meta)
    }

    async fn put_multipart(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        sha256: &str,
    ) -> Result<Written, S3Error> {
        // A replay of a large file asks first: no parts uploaded for an object that exists.
        if let Some(meta) = self.head(key).await? {
            return ownership(&self.writer, sha256, key, &meta);
        }
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(PARQUET)
            .metadata(META_SHA256, sha256)
            .metadata(META_WRITER, &self.writer);
        if let Some(kms) = &self.sse_kms_key_id {
            create = create.server_side_encryption(ServerSideEncryption::AwsKms).ssekms_key_id(kms);
        }
        let upload_id = match create.send().await {
            Ok(out) => out.upload_id.unwrap_or_default(),
            Err(e) => {
                return match classify("CreateMultipartUpload", key, e)? {
                    Put::Exists => self.owned(key, sha256).await,
                    Put::Created => Ok(Written::Created),
                };
            }
        };
        let result = self.upload_parts(key, path, size, part_size, &upload_id).await;
        if !matches!(result, Ok(Put::Created)) {
            // 412 on completion, or a failure: the parts are garbage either way. Best effort;
            // a lifecycle rule for incomplete uploads catches what a crash leaves behind.
            let _ =
                self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&upload_id).send().await;
        }
        match result? {
            Put::Created => Ok(Written::Created),
            Put::Exists => self.owned(key, sha256).await,
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        upload_id: &str,
    ) -> Result<Put, S3Error> {
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < size {
            let len = part_size.min(size - offset);
            let body =
                ByteStream::read_from().path(path).offset(offset).length(Length::Exact(len)).build().await.map_err(
                    |e| S3Error::Local { operation: "UploadPart", key: key.to_owned(), message: e.to_string() },
                )?;
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(len as i64)
                .body(body)
                .send()
                .await;
            match out {
                Ok(out) => parts.push(CompletedPart::builder().part_number(number).set_e_tag(out.e_tag).build()),
                Err(e) => return classify("UploadPart", key, e),
            }
            offset += len;
            number += 1;
        }
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .if_none_match("*")
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await;
        match completed {
            Ok(_) => Ok(Put::Created),
            Err(e) => classify("CompleteMultipartUpload", key, e),
        }
    }

    /// Checks that the store honours `If-None-Match: *`, with the probe object at `key`: if it
    /// exists, a create-only PUT must answer 412; if not, it is created, and a second
    /// create-only PUT must answer 412.
    pub async fn check_create_only(&self, key: &str) -> Result<(), ProbeError> {
        const BODY: &[u8] = b"edgeflow: create-only probe (a second PUT of this key must answer 412)\n";
        let sha256 = sha256_hex(BODY);
        let put = || self.put_object(key, ByteStream::from_static(BODY), None, "text/plain", &sha256);
        if self.head(key).await?.is_none() {
            // Created, or 412 when another replica got there first: either way it exists now.
            put().await?;
        }
        match put().await? {
            Put::Exists => Ok(()),
            Put::Created => Err(ProbeError::CreateOnlyIgnored {
                endpoint: self.endpoint.clone(),
                bucket: self.bucket.clone(),
                key: key.to_owned(),
            }),
        }
    }

    /// Lists every key under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, S3Error> {
        let mut out = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| match classify("ListObjectsV2", prefix, e) {
                Err(e) => e,
                Ok(_) => S3Error::Status {
                    operation: "ListObjectsV2",
                    key: prefix.to_owned(),
                    status: 412,
                    code: String::new(),
                    message: String::new(),
                },
            })?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push((k.to_owned(), o.size().unwrap_or(0)));
                }
            }
        }
        Ok(out)
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<bytes::Bytes, S3Error> {
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) => {
                return Err(match classify("GetObject", key, e) {
                    Err(e) => e,
                    Ok(_) => S3Error::Status {
                        operation: "GetObject",
                        key: key.to_owned(),
                        status: 412,
                        code: String::new(),
                        message: String::new(),
                    },
                });
            }
        };
        let body = out.body.collect().await.map_err(|e| S3Error::Unreachable {
            operation: "GetObject",
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        Ok(body.into_bytes())
    }
}

const PARQUET: &str = "application/vnd.apache.parquet";

/// Whether an existing object (its user metadata `meta`) is ours, written by `writer` with
/// content `sha256`.
fn ownership(writer: &str, sha256: &str, key: &str, meta: &HashMap<String, String>) -> Result<Written, S3Error> {
    // S3 lowercases user metadata names; look them up case-insensitively all the same.
    let get = |name: &str| meta.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    match (get(META_WRITER), get(META_SHA256)) {
        (Some(w), Some(found)) if w == writer && found.eq_ignore_ascii_case(sha256) => Ok(Written::AlreadyThere),
        (Some(w), found) if w == writer => {
            Ok(Written::OursReencoded { found_sha256: found.unwrap_or_default().to_owned() })
        }
        (found_writer, _) => {
            Err(S3Error::Conflict { key: key.to_owned(), found_writer: found_writer.map(str::to_owned) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn an_existing_object_is_ours_only_with_our_writer() {
        let ours = meta(&[(META_WRITER, "site-a"), (META_SHA256, "ab12")]);
        assert_eq!(ownership("site-a", "ab12", "k", &ours).ok(), Some(Written::AlreadyThere));
        assert_eq!(ownership("site-a", "AB12", "k", &ours).ok(), Some(Written::AlreadyThere));
        assert_eq!(
            ownership("site-a", "ffff", "k", &ours).ok(),
            Some(Written::OursReencoded { found_sha256: "ab12".into() })
        );
        match ownership("site-b", "ab12", "k", &ours) {
            Err(S3Error::Conflict { key, found_writer }) => {
                assert_eq!((key.as_str(), found_writer.as_deref()), ("k", Some("site-a")));
            }
            other => panic!("{other:?}"),
        }
        // Same bytes but no metadata (another tool, an older edgeflow): not provably ours.
        let bare = meta(&[(META_SHA256, "ab12")]);
        assert!(matches!(ownership("site-a", "ab12", "k", &bare), Err(S3Error::Conflict { found_writer: None, .. })));
        assert!(matches!(ownership("site-a", "ab12", "k", &meta(&[])), Err(S3Error::Conflict { .. })));
    }

    #[test]
    fn sha256_of_bytes_and_of_a_file_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &body).expect("write");
        assert_eq!(sha256_file(&path).expect("read"), sha256_hex(&body));
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
