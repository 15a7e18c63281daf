//! A repository in an S3 bucket, on AWS or any S3-compatible store.
//!
//! Publishing is create-if-absent twice over. Every commit first asks whether the key exists (HEAD), because
//! some S3-compatible stores (Garage, for one) silently ignore conditional writes, and then writes with
//! `If-None-Match: *`, which stores that honour it turn into 412 when someone else got there first. On a
//! store that ignores the header, two writers racing between the HEAD and the write can both
//! succeed. A new repository probes the store for it ([`Storage::probe_creates`], recorded in the
//! identity record), and where the store does not refuse, every commit reads its object back (its
//! ETag and checksum metadata) and reports a replaced write as taken, which narrows the race to the
//! time between a write and its read-back; the README gives the figures.
//!
//! Objects up to one part go up as a single PUT; larger ones as a multipart upload of uniform parts,
//! uploaded in parallel up to `upload_concurrency`, so memory stays within (concurrency + 1) parts. An
//! upload that fails is aborted so that no parts are left behind (a killed process cannot abort; a
//! bucket lifecycle rule for incomplete multipart uploads covers that, see README).
//!
//! Expiry deletes in DeleteObjects batches of 1,000 keys; a store that answers DeleteObjects with
//! "not implemented" gets one DeleteObject per key from then on, and [`Storage::notices`] says so.
//! Housekeeping aborts multipart uploads begun before an age, which killed writers left.
//!
//! "Not found" is reported only for a 404 on the key itself; a missing bucket, 403, 5xx and timeouts
//! are errors, the transient ones marked retryable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier, ServerSideEncryption as SdkSse, StorageClass,
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;

use super::settings::{ByteSize, seconds};
use super::{
    CreateGuard, CreateProbe, Housekeeping, ListResult, NetworkRead, ObjectMeta, ObjectReader, ObjectWriter,
    PutOptions, Storage, StorageError, bounded_each, validate_key,
};
use serde::Deserialize;

/// The default `part_size`: bytes per part of a multipart upload.
pub const DEFAULT_S3_PART_SIZE: u64 = 16 << 20;
/// S3's smallest part (all but the last) and largest part.
pub const S3_PART_SIZES: std::ops::RangeInclusive<u64> = (5 << 20)..=(5 << 30);
/// The default `upload_concurrency`: parts of one object uploaded at once.
pub const DEFAULT_S3_UPLOAD_CONCURRENCY: usize = 4;
/// The default `connect_timeout_secs`.
pub const DEFAULT_S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default `read_timeout_secs`.
pub const DEFAULT_S3_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Server-side encryption requested for new objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSideEncryption {
    /// `sse = "AES256"`: keys managed by S3.
    Aes256,
    /// `sse = "aws:kms"`, with `sse_kms_key_id` or the account's default KMS key.
    Kms {
        /// `sse_kms_key_id`; `None`: the default key.
        key_id: Option<String>,
    },
}

/// `conditional_writes`: what writers do on a store that does not refuse a create of an existing key
/// (`If-None-Match: *` ignored, or never found out). Every write there is read back either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConditionalWritesPolicy {
    /// `"warn"`: write, and say once per process what the store cannot guarantee.
    #[default]
    Warn,
    /// `"accept"`: write without the warning; the operator accepts the risk.
    Accept,
    /// `"require"`: refuse to write to such a store.
    Require,
}

/// The `[s3]` table, resolved. Everything left unset falls back to the AWS SDK's own sources: the
/// standard environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...),
/// the shared config and credentials files, web identity and instance metadata.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// `endpoint`: an S3-compatible server's URL (`http://` or `https://`).
    pub endpoint: Option<String>,
    /// `region`.
    pub region: Option<String>,
    /// `force_path_style`: `endpoint/bucket/key` instead of `bucket.endpoint/key`.
    pub force_path_style: bool,
    /// `access_key_id`, given together with the secret.
    pub access_key_id: Option<String>,
    /// `secret_access_key`; never printed.
    pub secret_access_key: Option<String>,
    /// `storage_class` of new objects (`STANDARD_IA`, ...).
    pub storage_class: Option<String>,
    /// `sse` and `sse_kms_key_id`.
    pub sse: Option<ServerSideEncryption>,
    /// `part_size`, within [`S3_PART_SIZES`].
    pub part_size: u64,
    /// `upload_concurrency`: parts of one object uploaded at once.
    pub upload_concurrency: usize,
    /// `connect_timeout_secs`: how long setting up a connection to the endpoint may take.
    pub connect_timeout: Duration,
    /// `read_timeout_secs`: a download that stops moving for this long fails (and is retried).
    pub read_timeout: Duration,
    /// `conditional_writes`.
    pub conditional_writes: ConditionalWritesPolicy,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: None,
            region: None,
            force_path_style: false,
            access_key_id: None,
            secret_access_key: None,
            storage_class: None,
            sse: None,
            part_size: DEFAULT_S3_PART_SIZE,
            upload_concurrency: DEFAULT_S3_UPLOAD_CONCURRENCY,
            connect_timeout: DEFAULT_S3_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_S3_READ_TIMEOUT,
            conditional_writes: ConditionalWritesPolicy::Warn,
        }
    }
}

/// Never prints the secret, so a configuration can be logged with `-v` safely.
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("storage_class", &self.storage_class)
            .field("sse", &self.sse)
            .field("part_size", &self.part_size)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("conditional_writes", &self.conditional_writes)
            .finish()
    }
}

/// The `[s3]` table as written in the configuration file; [`S3Settings::from_table`] checks it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct S3Table {
    endpoint: Option<String>,
    region: Option<String>,
    force_path_style: Option<bool>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    storage_class: Option<String>,
    sse: Option<String>,
    sse_kms_key_id: Option<String>,
    part_size: Option<ByteSize>,
    upload_concurrency: Option<usize>,
    connect_timeout_secs: Option<u64>,
    read_timeout_secs: Option<u64>,
    conditional_writes: Option<String>,
}

impl S3Settings {
    /// Resolves the `[s3]` table with its defaults (an absent table is an empty one); the error
    /// names the key at fault.
    pub(crate) fn from_table(file: S3Table) -> Result<Self, String> {
        let defaults = S3Settings::default();
        let sse = match (file.sse.as_deref(), file.sse_kms_key_id) {
            (None, None) => None,
            (Some("AES256"), None) => Some(ServerSideEncryption::Aes256),
            (Some("aws:kms"), key_id) => Some(ServerSideEncryption::Kms { key_id }),
            (Some("AES256") | None, Some(_)) => return Err("sse_kms_key_id needs sse = \"aws:kms\"".into()),
            (Some(other), _) => return Err(format!("sse = {other:?}: expected \"AES256\" or \"aws:kms\"")),
        };
        let part_size = file.part_size.map_or(defaults.part_size, |size| size.0);
        if !S3_PART_SIZES.contains(&part_size) {
            return Err(format!("part_size = {part_size} bytes: S3 takes parts from 5 MiB to 5 GiB"));
        }
        let upload_concurrency = file.upload_concurrency.unwrap_or(defaults.upload_concurrency);
        if !(1..=64).contains(&upload_concurrency) {
            return Err(format!("upload_concurrency = {upload_concurrency}: expected 1 to 64"));
        }
        if file.access_key_id.is_some() != file.secret_access_key.is_some() {
            return Err("access_key_id and secret_access_key go together".into());
        }
        if let Some(endpoint) = &file.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!("endpoint {endpoint:?} must start with http:// or https://"));
        }
        let conditional_writes = match file.conditional_writes.as_deref() {
            None | Some("warn") => ConditionalWritesPolicy::Warn,
            Some("accept") => ConditionalWritesPolicy::Accept,
            Some("require") => ConditionalWritesPolicy::Require,
            Some(other) => {
                return Err(format!("conditional_writes = {other:?}: expected \"warn\", \"accept\" or \"require\""));
            }
        };
        Ok(S3Settings {
            conditional_writes,
            endpoint: file.endpoint,
            region: file.region,
            force_path_style: file.force_path_style.unwrap_or(false),
            access_key_id: file.access_key_id,
            secret_access_key: file.secret_access_key,
            storage_class: file.storage_class,
            sse,
            part_size,
            upload_concurrency,
            connect_timeout: seconds(file.connect_timeout_secs, "connect_timeout_secs", defaults.connect_timeout)?,
            read_timeout: seconds(file.read_timeout_secs, "read_timeout_secs", defaults.read_timeout)?,
        })
    }
}

/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;

/// S3 takes at most this many keys in one DeleteObjects request.
const DELETE_BATCH: usize = 1000;

/// Used when neither the configuration nor the environment names a region; S3-compatible stores
/// mostly ignore the region but the SDK insists on one.
const FALLBACK_REGION: &str = "us-east-1";

/// A repository under a prefix of an S3 bucket.
pub struct S3Storage {
    inner: Arc<Bucket>,
}

/// The bucket as one client sees it, shared by the storage and its writers (and their part uploads).
struct Bucket {
    client: Client,
    bucket: String,
    /// Prepended to every key, with its trailing `/`; empty for the bucket's root.
    prefix: String,
    /// For messages: where requests go.
    endpoint: String,
    storage_class: Option<StorageClass>,
    sse: Option<ServerSideEncryption>,
    part_size: u64,
    upload_concurrency: usize,
    /// How long a failing upload waits for its parts already in flight, so that none reaches the
    /// server after the upload is aborted.
    settle_timeout: Duration,
    /// Multipart uploads started and neither completed nor aborted yet: upload id to (key, full key).
    open_uploads: Mutex<HashMap<String, (String, String)>>,
    /// The store answered DeleteObjects with "not implemented": from then on one DeleteObject per key,
    /// without asking again.
    no_batch_delete: std::sync::atomic::AtomicBool,
    /// Every commit reads its object back ([`Storage::read_back_creates`]).
    read_back: std::sync::atomic::AtomicBool,
    /// Scratch objects of probes ([`Storage::probe_creates`]) written and not removed yet (the
    /// deadline cut the probe off): key to full key, removed by [`Storage::cleanup`].
    open_probes: Mutex<HashMap<String, String>>,
}

impl S3Storage {
    /// Sets up the client for `bucket` and `prefix` from `config` and the AWS SDK's own sources; no
    /// request is sent yet.
    pub async fn connect(bucket: &str, prefix: &str, config: &S3Settings) -> Result<Self, StorageError> {
        let http_client =
            aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
        let timeouts =
            TimeoutConfig::builder().connect_timeout(config.connect_timeout).read_timeout(config.read_timeout).build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .timeout_config(timeouts)
            // Our own deadline loop retries whole operations; the SDK's few quick retries smooth over
            // single hiccups without stretching a call past that deadline.
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            // A download that stops moving fails after read_timeout and is retried. Uploads are not
            // cut off that way: a part cancelled on our side may still reach the server through a
            // buffering intermediary after its upload was aborted, and linger. A stuck upload ends at
            // deadline_secs instead, and the command then aborts it.
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .upload_enabled(false)
                    .grace_period(config.read_timeout)
                    .build(),
            )
            // Our objects carry their own SHA-256; the SDK's extra CRC trailers only break older
            // S3-compatible stores.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        // Without a configured region the loader's own chain (AWS_REGION, the profile, instance
        // metadata) runs with the HTTP client given above; the fallback is applied after it.
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let (Some(key_id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(key_id, secret, None, None, "walship-config"));
        }
        let shared = loader.load().await;
        let region = shared.region().cloned().unwrap_or_else(|| Region::new(FALLBACK_REGION));
        let endpoint = shared.endpoint_url().map(str::to_owned).unwrap_or_else(|| format!("AWS S3 ({region})"));
        let s3_config =
            aws_sdk_s3::config::Builder::from(&shared).region(region).force_path_style(config.force_path_style).build();
        Ok(S3Storage {
            inner: Arc::new(Bucket {
                client: Client::from_conf(s3_config),
                bucket: bucket.to_owned(),
                prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
                endpoint,
                storage_class: config.storage_class.as_deref().map(StorageClass::from),
                sse: config.sse.clone(),
                part_size: config.part_size,
                upload_concurrency: config.upload_concurrency,
                settle_timeout: config.read_timeout * 2,
                open_uploads: Mutex::new(HashMap::new()),
                no_batch_delete: std::sync::atomic::AtomicBool::new(false),
                read_back: std::sync::atomic::AtomicBool::new(false),
                open_probes: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl Bucket {
    fn full_key(&self, key: &str) -> Result<String, StorageError> {
        validate_key(key).map_err(|reason| StorageError::InvalidKey { location: self.location(key), reason })?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}{key} (endpoint {})", self.bucket, self.prefix, self.endpoint)
    }

    /// Turns an SDK failure into a [`StorageError`] that says what to do about it.
    fn classify<E>(&self, key: &str, operation: &'static str, error: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let location = self.location(key);
        let other = |message: String, retryable: bool| StorageError::Other {
            location: location.clone(),
            message: format!("{operation}: {message}"),
            retryable,
        };
        match &error {
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().unwrap_or("");
                let detail = service.err().message().map(|m| format!(": {m}")).unwrap_or_default();
                match (status, code) {
                    (404, "NoSuchBucket") => other(format!("bucket {:?} does not exist{detail}", self.bucket), false),
                    (404, _) => StorageError::NotFound { location },
                    (412, _) => StorageError::AlreadyExists { location },
                    (403, _) => other(
                        format!(
                            "access denied ({code}{detail}); check access_key_id/secret_access_key or the \
                             AWS credentials in use, and the bucket policy"
                        ),
                        false,
                    ),
                    (301, _) | (400, "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException") => {
                        other(format!("wrong region for this bucket ({code}{detail}); set region in [s3]"), false)
                    }
                    // A request the store does not implement stays unimplemented, however often sent.
                    (501, _) => other(format!("HTTP {status} {code}{detail}"), false),
                    // 409 is AWS's answer to two conditional writes of one key at once: try again.
                    (409 | 429 | 500..=599, _) => other(format!("HTTP {status} {code}{detail}"), true),
                    _ => other(format!("HTTP {status} {code}{detail}"), false),
                }
            }
            SdkError::TimeoutError(_) => other("timed out".into(), true),
            // Refused, reset or closed connections, cut-off responses: the request may well succeed if
            // sent again. Only a failure caused by the request itself is final.
            SdkError::DispatchFailure(failure) if !failure.is_user() => {
                other(format!("cannot reach {}: {}", self.endpoint, error_chain(&error)), true)
            }
            SdkError::ResponseError(_) => other(format!("bad response: {}", error_chain(&error)), true),
            _ => other(error_chain(&error), false),
        }
    }

    async fn exists(&self, key: &str, full_key: &str) -> Result<bool, StorageError> {
        match self.client.head_object().bucket(&self.bucket).key(full_key).send().await {
            Ok(_) => Ok(true),
            Err(e) => match self.classify(key, "HEAD", e) {
                StorageError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    fn sse_algorithm(&self) -> Option<SdkSse> {
        match &self.sse {
            Some(ServerSideEncryption::Aes256) => Some(SdkSse::Aes256),
            Some(ServerSideEncryption::Kms { .. }) => Some(SdkSse::AwsKms),
            None => None,
        }
    }

    fn sse_kms_key_id(&self) -> Option<String> {
        match &self.sse {
            Some(ServerSideEncryption::Kms { key_id }) => key_id.clone(),
            _ => None,
        }
    }

    /// One PUT, create-only when `create_only`; returns the ETag the store gave the object.
    async fn put_whole(
        &self,
        key: &str,
        full_key: &str,
        body: Bytes,
        options: &PutOptions,
        create_only: bool,
    ) -> Result<Option<String>, StorageError> {
        let len = body.len() as i64;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full_key)
            .content_length(len)
            .body(ByteStream::from(body))
            .set_if_none_match(create_only.then(|| "*".to_owned()))
            .set_metadata(Some(metadata(options)))
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_kms_key_id());
        request
            .customize()
            .config_override(upload_overrides())
            .send()
            .await
            .map(|output| output.e_tag().map(str::to_owned))
            .map_err(|e| self.classify(key, "PUT", e))
    }

    /// Where [`Storage::read_back_creates`] asked for it: the object now under `key` must be the one
    /// just written (its ETag, and our checksum attributes), or a racing writer's create replaced it
    /// on a store that ignores `If-None-Match`, and ours is reported as not made.
    async fn confirm_created(
        &self,
        key: &str,
        full_key: &str,
        etag: Option<String>,
        options: &PutOptions,
    ) -> Result<(), StorageError> {
        if !self.read_back.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let stored = match self.client.head_object().bucket(&self.bucket).key(full_key).send().await {
            Ok(output) => output,
            Err(e) => {
                return Err(match self.classify(key, "HEAD", e) {
                    StorageError::NotFound { location } => StorageError::Other {
                        location,
                        message: "the object just written is gone when read back".into(),
                        retryable: true,
                    },
                    other => other,
                });
            }
        };
        let same_etag = match (etag.as_deref(), stored.e_tag()) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => true,
        };
        let theirs = stored.metadata();
        let same_attributes =
            options.attributes.iter().all(|(name, value)| theirs.and_then(|m| m.get(name)) == Some(value));
        if same_etag && same_attributes {
            Ok(())
        } else {
            Err(StorageError::AlreadyExists { location: self.location(key) })
        }
    }

    /// See [`Storage::probe_creates`].
    async fn probe_creates(&self) -> Result<CreateProbe, StorageError> {
        let id = crate::fs::random_hex(8).map_err(|e| StorageError::io("/dev/urandom", "read", e))?;
        let key = format!("probe/conditional-write-{id}");
        let full_key = self.full_key(&key)?;
        let body = Bytes::from_static(b"walship: a probe of conditional writes; safe to delete\n");
        let options = PutOptions::default();
        self.open_probes().insert(key.clone(), full_key.clone());
        self.put_whole(&key, &full_key, body.clone(), &options, false).await?;
        let second = self.put_whole(&key, &full_key, body, &options, true).await;
        self.remove_probe(&key, &full_key).await?;
        let (guard, answer) = match second {
            Ok(_) => (CreateGuard::Ignored, "a second create of the scratch object succeeded".to_owned()),
            Err(StorageError::AlreadyExists { .. }) => (CreateGuard::Enforced, "412 Precondition Failed".to_owned()),
            Err(e) if e.is_retryable() => return Err(e),
            Err(StorageError::Other { message, .. }) => (CreateGuard::Unknown, message),
            Err(e) => (CreateGuard::Unknown, e.to_string()),
        };
        Ok(CreateProbe { guard, answer, store: self.endpoint.clone() })
    }

    async fn start_multipart(&self, key: &str, full_key: &str, options: &PutOptions) -> Result<String, StorageError> {
        let request = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full_key)
            .set_metadata(Some(metadata(options)))
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_kms_key_id());
        let output = request.send().await.map_err(|e| self.classify(key, "CreateMultipartUpload", e))?;
        let upload_id = output.upload_id().map(str::to_owned).ok_or_else(|| StorageError::Other {
            location: self.location(key),
            message: "CreateMultipartUpload returned no upload id".into(),
            retryable: true,
        })?;
        self.open_uploads().insert(upload_id.clone(), (key.to_owned(), full_key.to_owned()));
        Ok(upload_id)
    }

    fn open_probes(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.open_probes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes a probe's scratch object: a failure here is a failure of the probe, so that no scratch
    /// object is left behind unsaid.
    async fn remove_probe(&self, key: &str, full_key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(full_key)
            .send()
            .await
            .map_err(|e| self.classify(key, "DELETE", e))?;
        self.open_probes().remove(key);
        Ok(())
    }

    /// `s3://bucket/prefix`, for messages about the repository as a whole.
    fn repository_url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix).trim_end_matches('/').to_owned()
    }

    /// Deletes one batch of at most [`DELETE_BATCH`] keys with one DeleteObjects request (Quiet: the
    /// answer lists only failures). `Ok(false)`: the store does not implement the request.
    async fn delete_batch(&self, keys: &[String], full_keys: &[String]) -> Result<bool, StorageError> {
        let first = keys.first().map_or("", String::as_str);
        let malformed = |e: aws_sdk_s3::error::BuildError| StorageError::Other {
            location: self.location(first),
            message: format!("DeleteObjects: {e}"),
            retryable: false,
        };
        let objects = full_keys
            .iter()
            .map(|full_key| ObjectIdentifier::builder().key(full_key).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(malformed)?;
        let delete = Delete::builder().set_objects(Some(objects)).quiet(true).build().map_err(malformed)?;
        let sent = self.client.delete_objects().bucket(&self.bucket).delete(delete).send().await;
        let output = match sent {
            Ok(output) => output,
            Err(e) if not_implemented(e.raw_response().map(|r| r.status().as_u16()), e.code()) => return Ok(false),
            Err(e) => return Err(self.classify(first, "DeleteObjects", e)),
        };
        for error in output.errors() {
            let full_key = error.key().unwrap_or("");
            let key = full_key.strip_prefix(&self.prefix).unwrap_or(full_key);
            if let Some(failure) = key_delete_failure(error.code(), error.message()) {
                return Err(StorageError::Other {
                    location: self.location(key),
                    message: format!("DeleteObjects: {}", failure.0),
                    retryable: failure.1,
                });
            }
        }
        Ok(true)
    }

    /// Deletes each key with its own DeleteObject, a few at a time: for stores without DeleteObjects.
    /// No HEAD first: S3 answers a DELETE of a missing key with success already.
    async fn delete_each(self: &Arc<Self>, keys: &[String], full_keys: &[String]) -> Result<(), StorageError> {
        let batch = keys.iter().cloned().zip(full_keys.iter().cloned());
        bounded_each(&self.location(""), batch, |(key, full_key)| {
            let bucket = Arc::clone(self);
            async move {
                let sent = bucket.client.delete_object().bucket(&bucket.bucket).key(&full_key).send().await;
                match sent.map_err(|e| bucket.classify(&key, "DELETE", e)) {
                    Ok(_) | Err(StorageError::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    fn open_uploads(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String)>> {
        self.open_uploads.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Aborts an upload and makes sure it is gone: S3 may still store a part that was in transit when
    /// the abort arrived, so the upload is listed afterwards and aborted again while parts remain.
    async fn abort_multipart(&self, key: &str, full_key: &str, upload_id: &str) -> Result<(), StorageError> {
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full_key)
                .upload_id(upload_id)
                .send()
                .await;
            match aborted.map_err(|e| self.classify(key, "AbortMultipartUpload", e)) {
                Ok(_) | Err(StorageError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            let listed = self.client.list_parts().bucket(&self.bucket).key(full_key).upload_id(upload_id).send().await;
            match listed.map_err(|e| self.classify(key, "ListParts", e)) {
                // NoSuchUpload: the upload and all its parts are gone.
                Err(StorageError::NotFound { .. }) => break,
                Ok(parts) if parts.parts().is_empty() => break,
                Ok(_) => continue,
                // A store without ListParts: the abort is all we can do.
                Err(_) => break,
            }
        }
        self.open_uploads().remove(upload_id);
        Ok(())
    }
}

/// An error and its sources on one line, each cause once ("dispatch failure: io error: ... Connection
/// refused"): the SDK's own rendering appends a multi-line debug dump.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// Whether an error answer (its HTTP status and S3 error code, where known) says that the store does
/// not implement the request at all (s3s-fs for ListMultipartUploads), rather than that it failed.
fn not_implemented(status: Option<u16>, code: Option<&str>) -> bool {
    status == Some(501) || code == Some("NotImplemented")
}

/// Why DeleteObjects failed to delete one key (its entry in the answer's `Errors`), and whether trying
/// again may help; `None` where the entry is no failure: a key that is not there is as good as deleted.
fn key_delete_failure(code: Option<&str>, message: Option<&str>) -> Option<(String, bool)> {
    let code = code.unwrap_or("");
    if code == "NoSuchKey" {
        return None;
    }
    let retryable = matches!(code, "InternalError" | "SlowDown" | "ServiceUnavailable" | "RequestTimeout");
    Some((format!("{code}: {}", message.unwrap_or("the store gave no reason")), retryable))
}

/// Uniform parts, as some S3-compatible stores require: the configured size, grown (in whole MiB) so
/// that an object of the expected size needs at most MAX_PARTS of them.
fn part_size_for(configured: u64, size_hint: Option<u64>) -> u64 {
    let needed = size_hint.map_or(0, |size| size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20));
    configured.max(needed)
}

/// For requests that send a body: read_timeout would also bound the time spent sending it, failing
/// large parts on slow links and leaving abandoned attempts that can still complete on the server
/// after their upload was aborted. Uploads are bounded by the command's deadline instead.
fn upload_overrides() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default().timeout_config(TimeoutConfig::builder().disable_read_timeout().build())
}

fn metadata(options: &PutOptions) -> HashMap<String, String> {
    options.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[async_trait]
impl Storage for S3Storage {
    fn location(&self, key: &str) -> String {
        self.inner.location(key)
    }

    fn keeps_attributes(&self) -> bool {
        true
    }

    fn creates_exclusive_by_construction(&self) -> bool {
        false
    }

    async fn probe_creates(&self) -> Result<Option<CreateProbe>, StorageError> {
        self.inner.probe_creates().await.map(Some)
    }

    fn read_back_creates(&self) {
        self.inner.read_back.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn create(&self, key: &str, options: PutOptions) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let full_key = self.inner.full_key(key)?;
        let part_size = part_size_for(self.inner.part_size, options.size_hint) as usize;
        Ok(Box::new(S3Writer {
            inner: Arc::clone(&self.inner),
            key: key.to_owned(),
            full_key,
            options,
            part_size,
            buffer: BytesMut::new(),
            multipart: None,
        }))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let (inner, full_key) = (&self.inner, self.inner.full_key(key)?);
        let request = inner.client.get_object().bucket(&inner.bucket).key(&full_key);
        let output = request.send().await.map_err(|e| inner.classify(key, "GET", e))?;
        Ok(Box::new(NetworkRead::new(output.body.into_async_read(), None)))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError> {
        let (inner, full_key) = (&self.inner, self.inner.full_key(key)?);
        let request = inner.client.head_object().bucket(&inner.bucket).key(&full_key);
        let output = request.send().await.map_err(|e| inner.classify(key, "HEAD", e))?;
        Ok(ObjectMeta {
            key: key.to_owned(),
            size: output.content_length().unwrap_or(0).max(0) as u64,
            attributes: output
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            modified: output.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        })
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> ListResult {
        let inner = &self.inner;
        let output = inner
            .client
            .list_objects_v2()
            .bucket(&inner.bucket)
            .prefix(format!("{}{prefix}", inner.prefix))
            .set_start_after(start_after.map(|after| format!("{}{after}", inner.prefix)))
            .max_keys(limit.min(1000) as i32)
            .send()
            .await
            .map_err(|e| inner.classify(prefix, "LIST", e))?;
        Ok(output
            .contents()
            .iter()
            .filter_map(|object| {
                let key = object.key()?.strip_prefix(&inner.prefix)?;
                Some(ObjectMeta {
                    key: key.to_owned(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    attributes: Default::default(),
                    modified: object.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                })
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let full_key = self.inner.full_key(key)?;
        // S3 answers a DELETE of a missing key with success; our contract says NotFound.
        if !self.inner.exists(key, &full_key).await? {
            return Err(StorageError::NotFound { location: self.location(key) });
        }
        self.inner
            .client
            .delete_object()
            .bucket(&self.inner.bucket)
            .key(&full_key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.inner.classify(key, "DELETE", e))
    }

    async fn delete_many(&self, keys: &[String]) -> Result<u64, StorageError> {
        let inner = &self.inner;
        let full_keys = keys.iter().map(|key| inner.full_key(key)).collect::<Result<Vec<_>, _>>()?;
        for (batch, full_batch) in keys.chunks(DELETE_BATCH).zip(full_keys.chunks(DELETE_BATCH)) {
            if !inner.no_batch_delete.load(std::sync::atomic::Ordering::Relaxed) {
                if inner.delete_batch(batch, full_batch).await? {
                    continue;
                }
                inner.no_batch_delete.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            inner.delete_each(batch, full_batch).await?;
        }
        Ok(keys.len() as u64)
    }

    async fn remove_stale(&self, older_than: Duration) -> Result<Housekeeping, StorageError> {
        let inner = &self.inner;
        let cutoff = std::time::SystemTime::now().checked_sub(older_than).unwrap_or(std::time::UNIX_EPOCH);
        let mut found = Housekeeping::default();
        let (mut key_marker, mut upload_id_marker) = (None::<String>, None::<String>);
        loop {
            let listed = inner
                .client
                .list_multipart_uploads()
                .bucket(&inner.bucket)
                .prefix(&inner.prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_id_marker.take())
                .send()
                .await;
            let output = match listed {
                Ok(output) => output,
                Err(e) if not_implemented(e.raw_response().map(|r| r.status().as_u16()), e.code()) => {
                    found.uploads_unlisted = true;
                    return Ok(found);
                }
                Err(e) => return Err(inner.classify("", "ListMultipartUploads", e)),
            };
            for upload in output.uploads() {
                let (Some(full_key), Some(upload_id)) = (upload.key(), upload.upload_id()) else { continue };
                // An upload of unknown age may be one under way: left alone.
                let begun = upload.initiated().and_then(|at| std::time::SystemTime::try_from(*at).ok());
                if begun.is_none_or(|begun| begun >= cutoff) {
                    continue;
                }
                let key = full_key.strip_prefix(&inner.prefix).unwrap_or(full_key);
                inner.abort_multipart(key, full_key, upload_id).await?;
                found.uploads += 1;
            }
            key_marker = output.next_key_marker().map(str::to_owned);
            upload_id_marker = output.next_upload_id_marker().map(str::to_owned);
            // A truncated page without a marker to go on from would list the same page forever.
            if output.is_truncated() != Some(true) || (key_marker.is_none() && upload_id_marker.is_none()) {
                return Ok(found);
            }
        }
    }

    fn notices(&self) -> Vec<String> {
        let inner = &self.inner;
        let mut notices = Vec::new();
        if inner.no_batch_delete.load(std::sync::atomic::Ordering::Relaxed) {
            notices.push(format!(
                "{}: the store does not implement DeleteObjects; deleting one object per request",
                inner.repository_url()
            ));
        }
        notices
    }

    /// Nothing to do: S3 acknowledges a PUT (or a completed multipart upload) only once the object is
    /// stored durably, and an object is never visible before that.
    async fn make_durable(&self, _key: &str) -> Result<(), StorageError> {
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), StorageError> {
        let open: Vec<(String, (String, String))> = self.inner.open_uploads().drain().collect();
        let mut first_error = None;
        for (upload_id, (key, full_key)) in open {
            if let Err(e) = self.inner.abort_multipart(&key, &full_key, &upload_id).await {
                first_error.get_or_insert(e);
            }
        }
        let probes: Vec<(String, String)> = self.inner.open_probes().drain().collect();
        for (key, full_key) in probes {
            if let Err(e) = self.inner.remove_probe(&key, &full_key).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn remove_incomplete(&self, prefix: &str) -> Result<(), StorageError> {
        let inner = &self.inner;
        let full_prefix = format!("{}{prefix}", inner.prefix);
        let listed = inner.client.list_multipart_uploads().bucket(&inner.bucket).prefix(&full_prefix).send().await;
        let output = match listed {
            Ok(output) => output,
            // Some S3-compatible servers (s3s-fs among them) do not list uploads; a lifecycle rule for
            // incomplete multipart uploads covers those (README).
            Err(e) if not_implemented(e.raw_response().map(|r| r.status().as_u16()), e.code()) => return Ok(()),
            Err(e) => return Err(inner.classify(prefix, "LIST uploads", e)),
        };
        for upload in output.uploads() {
            let (Some(full_key), Some(upload_id)) = (upload.key(), upload.upload_id()) else { continue };
            let key = full_key.strip_prefix(&inner.prefix).unwrap_or(full_key).to_owned();
            inner.abort_multipart(&key, full_key, upload_id).await?;
        }
        Ok(())
    }

    async fn check_root(&self) -> Result<(), StorageError> {
        let inner = &self.inner;
        match inner.client.head_bucket().bucket(&inner.bucket).send().await {
            Ok(_) => Ok(()),
            // HEAD has no body, so a missing bucket is a bare 404.
            Err(e) => Err(match inner.classify("", "HEAD bucket", e) {
                StorageError::NotFound { location } => StorageError::Other {
                    location,
                    message: format!("bucket {:?} does not exist", inner.bucket),
                    retryable: false,
                },
                other => other,
            }),
        }
    }
}

struct Multipart {
    upload_id: String,
    next_part_number: i32,
    in_flight: JoinSet<Result<CompletedPart, StorageError>>,
    completed: Vec<CompletedPart>,
}

struct S3Writer {
    inner: Arc<Bucket>,
    key: String,
    full_key: String,
    options: PutOptions,
    part_size: usize,
    buffer: BytesMut,
    multipart: Option<Multipart>,
}

impl S3Writer {
    /// Sends one part, waiting first for a free upload slot.
    async fn send_part(&mut self, body: Bytes) -> Result<(), StorageError> {
        if self.multipart.is_none() {
            // A taken name is found before any part is sent, not after all of them.
            if self.inner.exists(&self.key, &self.full_key).await? {
                return Err(StorageError::AlreadyExists { location: self.inner.location(&self.key) });
            }
            let upload_id = self.inner.start_multipart(&self.key, &self.full_key, &self.options).await?;
            self.multipart =
                Some(Multipart { upload_id, next_part_number: 1, in_flight: JoinSet::new(), completed: Vec::new() });
        }
        let multipart = self.multipart.as_mut().expect("just started");
        if multipart.next_part_number as u64 > MAX_PARTS {
            return Err(StorageError::Other {
                location: self.inner.location(&self.key),
                message: format!(
                    "object exceeds {MAX_PARTS} parts of {} bytes; raise part_size in [s3]",
                    self.part_size
                ),
                retryable: false,
            });
        }
        while multipart.in_flight.len() >= self.inner.upload_concurrency {
            let done = multipart.in_flight.join_next().await.expect("a part is in flight");
            multipart.completed.push(part_result(done, &self.inner, &self.key)?);
        }
        let part_number = multipart.next_part_number;
        multipart.next_part_number += 1;
        let (inner, key, full_key, upload_id) =
            (Arc::clone(&self.inner), self.key.clone(), self.full_key.clone(), multipart.upload_id.clone());
        multipart.in_flight.spawn(async move {
            let output = inner
                .client
                .upload_part()
                .bucket(&inner.bucket)
                .key(&full_key)
                .upload_id(upload_id)
                .part_number(part_number)
                .content_length(body.len() as i64)
                .body(ByteStream::from(body))
                .customize()
                .config_override(upload_overrides())
                .send()
                .await
                .map_err(|e| inner.classify(&key, "UploadPart", e))?;
            Ok(CompletedPart::builder().part_number(part_number).set_e_tag(output.e_tag().map(str::to_owned)).build())
        });
        Ok(())
    }

    async fn finish_multipart(&mut self) -> Result<Option<String>, StorageError> {
        let rest = self.buffer.split().freeze();
        if !rest.is_empty() {
            self.send_part(rest).await?;
        }
        let multipart = self.multipart.as_mut().expect("multipart upload started");
        while let Some(done) = multipart.in_flight.join_next().await {
            multipart.completed.push(part_result(done, &self.inner, &self.key)?);
        }
        multipart.completed.sort_by_key(|part| part.part_number());
        if self.inner.exists(&self.key, &self.full_key).await? {
            return Err(StorageError::AlreadyExists { location: self.inner.location(&self.key) });
        }
        let output = self
            .inner
            .client
            .complete_multipart_upload()
            .bucket(&self.inner.bucket)
            .key(&self.full_key)
            .upload_id(&multipart.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder().set_parts(Some(std::mem::take(&mut multipart.completed))).build(),
            )
            .if_none_match("*")
            .send()
            .await
            .map_err(|e| self.inner.classify(&self.key, "CompleteMultipartUpload", e))?;
        self.inner.open_uploads().remove(&multipart.upload_id);
        Ok(output.e_tag().map(str::to_owned))
    }

    /// Aborts the multipart upload, if any, so that no parts are left behind. Parts already on their
    /// way are given time to arrive first: one stored after the abort would linger.
    async fn discard(&mut self) -> Result<(), StorageError> {
        let Some(mut multipart) = self.multipart.take() else { return Ok(()) };
        let settle = async { while multipart.in_flight.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(self.inner.settle_timeout, settle).await;
        multipart.in_flight.abort_all();
        while multipart.in_flight.join_next().await.is_some() {}
        self.inner.abort_multipart(&self.key, &self.full_key, &multipart.upload_id).await
    }
}

fn part_result(
    joined: Result<Result<CompletedPart, StorageError>, tokio::task::JoinError>,
    inner: &Bucket,
    key: &str,
) -> Result<CompletedPart, StorageError> {
    joined.unwrap_or_else(|e| {
        Err(StorageError::Other {
            location: inner.location(key),
            message: format!("part upload task failed: {e}"),
            retryable: false,
        })
    })
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.buffer.extend_from_slice(&chunk);
        while self.buffer.len() >= self.part_size {
            let part = self.buffer.split_to(self.part_size).freeze();
            if let Err(e) = self.send_part(part).await {
                let _ = self.discard().await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        let etag = if self.multipart.is_none() {
            if self.inner.exists(&self.key, &self.full_key).await? {
                return Err(StorageError::AlreadyExists { location: self.inner.location(&self.key) });
            }
            let body = self.buffer.split().freeze();
            self.inner.put_whole(&self.key, &self.full_key, body, &self.options, true).await?
        } else {
            match self.finish_multipart().await {
                Ok(etag) => etag,
                Err(e) => {
                    let _ = self.discard().await;
                    return Err(e);
                }
            }
        };
        self.inner.confirm_created(&self.key, &self.full_key, etag, &self.options).await
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.discard().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an answer that says the request itself is unknown to the store turns DeleteObjects into
    /// single deletes (or ListMultipartUploads into "unlisted"); a denied or failed request is an
    /// error to report.
    #[test]
    fn not_implemented_is_told_from_a_failure() {
        assert!(not_implemented(Some(501), None));
        assert!(not_implemented(Some(501), Some("NotImplemented")));
        assert!(not_implemented(Some(400), Some("NotImplemented")));
        assert!(!not_implemented(Some(403), Some("AccessDenied")));
        assert!(!not_implemented(Some(500), Some("InternalError")));
        assert!(!not_implemented(Some(400), Some("MalformedXML")));
        assert!(!not_implemented(None, None), "no answer at all (a timeout) is no verdict");
    }

    /// In a DeleteObjects answer a missing key is as good as deleted; anything else fails the call,
    /// retryable only where the store said it was busy or broken.
    #[test]
    fn a_missing_key_is_no_delete_failure() {
        assert_eq!(key_delete_failure(Some("NoSuchKey"), Some("gone")), None);
        let (message, retryable) = key_delete_failure(Some("AccessDenied"), Some("no")).unwrap();
        assert!(message.contains("AccessDenied") && !retryable, "{message}");
        assert!(key_delete_failure(Some("InternalError"), None).unwrap().1);
        assert!(key_delete_failure(Some("SlowDown"), None).unwrap().1);
        assert!(!key_delete_failure(None, None).unwrap().1, "an error without a code is still an error");
    }

    #[test]
    fn parts_grow_to_stay_within_the_part_limit() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(16 * MIB, None), 16 * MIB);
        assert_eq!(part_size_for(16 * MIB, Some(16 * MIB)), 16 * MIB);
        // 1 TiB in 16 MiB parts would be 65,536 of them.
        let huge = 1 << 40;
        let grown = part_size_for(16 * MIB, Some(huge));
        assert!(huge.div_ceil(grown) <= MAX_PARTS, "{grown}");
        assert_eq!(grown % MIB, 0);
        assert_eq!(part_size_for(16 * MIB, Some(10_000 * 16 * MIB)), 16 * MIB, "exactly at the limit");
        assert_eq!(part_size_for(16 * MIB, Some(10_000 * 16 * MIB + 1)), 17 * MIB);
    }
}
