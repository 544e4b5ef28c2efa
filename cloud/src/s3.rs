//! The S3 client: interface endpoint, signing region, path style, SSE-KMS, create-only writes.
//!
//! The endpoint URL (an S3 interface VPC endpoint such as
//! `https://bucket.vpce-0abc-xyz.s3.eu-west-1.vpce.amazonaws.com`, or a local S3 server) is set
//! on the S3 client only; credentials come from the default AWS chain (IRSA web identity on
//! EKS, environment variables in tests), which resolves STS on its own endpoints.
//!
//! Every object is written *create-only* (`If-None-Match: *`, also on
//! `CompleteMultipartUpload`): HTTP 412 means the key exists — a replay or a retry wrote it
//! already — and counts as success. Keys are deterministic, so this is what makes uploads
//! idempotent. Request checksums are computed only when an operation requires them, which keeps
//! the client compatible with S3 implementations that do not accept streaming trailers.

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
}

/// How a create-only write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The object was created.
    Created,
    /// The key existed already (HTTP 412): a replay or a retry wrote it.
    AlreadyThere,
}

/// The S3 side of the sink and of `verify`.
#[derive(Debug, Clone)]
pub struct S3 {
    client: Client,
    bucket: String,
    sse_kms_key_id: Option<String>,
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: HasStatus + std::fmt::Debug>(
    operation: &'static str,
    key: &str,
    error: SdkError<E, R>,
) -> Result<Written, S3Error> {
    let status = error.raw_response().map(HasStatus::status_code);
    match status {
        Some(412) => Ok(Written::AlreadyThere),
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

    /// Writes `body` at `key` unless the key exists.
    pub async fn put_bytes(&self, key: &str, body: Vec<u8>, content_type: &str) -> Result<Written, S3Error> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .content_type(content_type)
            .body(ByteStream::from(body));
        if let Some(kms) = &self.sse_kms_key_id {
            req = req.server_side_encryption(ServerSideEncryption::AwsKms).ssekms_key_id(kms);
        }
        match req.send().await {
            Ok(_) => Ok(Written::Created),
            Err(e) => classify("PutObject", key, e),
        }
    }

    /// Writes the file at `path` (`size` bytes) at `key` unless the key exists; in parts of
    /// `part_size` when `size` exceeds `multipart_threshold`.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        multipart_threshold: u64,
    ) -> Result<Written, S3Error> {
        if size > multipart_threshold {
            return self.put_multipart(key, path, size, multipart_threshold.max(MIN_PART_BYTES)).await;
        }
        let body = ByteStream::read_from()
            .path(path)
            .length(Length::Exact(size))
            .build()
            .await
            .map_err(|e| S3Error::Local { operation: "PutObject", key: key.to_owned(), message: e.to_string() })?;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .content_type(PARQUET)
            .content_length(size as i64)
            .body(body);
        if let Some(kms) = &self.sse_kms_key_id {
            req = req.server_side_encryption(ServerSideEncryption::AwsKms).ssekms_key_id(kms);
        }
        match req.send().await {
            Ok(_) => Ok(Written::Created),
            Err(e) => classify("PutObject", key, e),
        }
    }

    async fn put_multipart(&self, key: &str, path: &Path, size: u64, part_size: u64) -> Result<Written, S3Error> {
        let mut create = self.client.create_multipart_upload().bucket(&self.bucket).key(key).content_type(PARQUET);
        if let Some(kms) = &self.sse_kms_key_id {
            create = create.server_side_encryption(ServerSideEncryption::AwsKms).ssekms_key_id(kms);
        }
        let upload_id = match create.send().await {
            Ok(out) => out.upload_id.unwrap_or_default(),
            Err(e) => return classify("CreateMultipartUpload", key, e),
        };
        let result = self.upload_parts(key, path, size, part_size, &upload_id).await;
        if !matches!(result, Ok(Written::Created)) {
            // 412 on completion, or a failure: the parts are garbage either way. Best effort;
            // a lifecycle rule for incomplete uploads catches what a crash leaves behind.
            let _ =
                self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&upload_id).send().await;
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        upload_id: &str,
    ) -> Result<Written, S3Error> {
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
            Ok(_) => Ok(Written::Created),
            Err(e) => classify("CompleteMultipartUpload", key, e),
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
