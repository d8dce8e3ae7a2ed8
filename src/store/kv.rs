//! The JetStream KV store: claims and outcomes in a bucket shared by every worker.
//!
//! Every write is one JetStream publish to `$KV.<bucket>.<key>` carrying
//! `Nats-Expected-Last-Subject-Sequence` (the compare-and-swap) and
//! `Nats-TTL` (the lease or the outcome lifetime). The client's
//! `create_with_ttl` drops the TTL when the key's last message is a delete or
//! expiry marker and `update` takes no TTL at all, so neither is used: a
//! write without its TTL would make a lease or an outcome immortal.

use std::time::Duration;

use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::stream::StorageType;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{ttl_secs, IdempotencyStore, Slot, StoreError, Versioned, Wakeup, Wakeups};
use crate::key::IdempotencyKey;
use crate::outcome::Record;

pub use super::MARKER_TTL;

/// Room for a record's JSON without regrowing: a claim is about 330
/// bytes, an outcome that plus its result.
const RECORD_CAPACITY: usize = 512;

/// The oldest nats-server that can hold per-message TTLs.
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 11);

/// The bucket's name unless `--bucket` says otherwise.
pub const DEFAULT_BUCKET: &str = "IDEMPOTENCY";

/// How to open (or create) the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketConfig {
    /// Bucket name (`--bucket`).
    pub bucket: String,
    /// Replicas of the bucket's stream (`--replicas`).
    pub replicas: usize,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            bucket: DEFAULT_BUCKET.to_owned(),
            replicas: 1,
        }
    }
}

/// An idempotency store on a JetStream key-value bucket.
#[derive(Debug, Clone)]
pub struct KvStore {
    js: Context,
    kv: kv::Store,
    /// `$KV.<bucket>.`: where writes are published.
    put_prefix: String,
    /// How long the markers of releases and purges are kept (at least
    /// [`MARKER_TTL`]; see [`KvStore::keep_markers_for`]).
    marker_ttl: Duration,
}

/// Fails unless the connected server is at least [`MIN_SERVER_VERSION`].
pub fn check_server_version(client: &async_nats::Client) -> Result<(), StoreError> {
    require_server_version(&client.server_info().version)
}

/// Fails unless `version` (as a server reports it, e.g. `2.15.1` or
/// `2.12.0-beta.1`) is at least [`MIN_SERVER_VERSION`].
pub fn require_server_version(version: &str) -> Result<(), StoreError> {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found >= MIN_SERVER_VERSION {
        Ok(())
    } else {
        Err(StoreError::Setup(format!(
            "nats-server {version} is too old: idemq needs {}.{} or newer for per-message TTLs",
            MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
        )))
    }
}

impl KvStore {
    /// Opens the bucket, creating it when missing.
    ///
    /// A new bucket gets history 1 (older revisions must never come back,
    /// and a TTL below the marker TTL would otherwise be raised), per-message
    /// TTLs with limit markers (so watchers see expiries), file storage and
    /// the configured replicas. An existing bucket is used as it is, unless
    /// it cannot hold per-message TTLs: that is a [`StoreError::Setup`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use idemq::store::kv::{BucketConfig, KvStore};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let js = async_nats::jetstream::new(client);
    /// let config = BucketConfig {
    ///     bucket: "PAYMENTS_IDEMPOTENCY".into(),
    ///     replicas: 3,
    /// };
    /// let store = KvStore::open(js, &config).await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open(js: Context, config: &BucketConfig) -> Result<KvStore, StoreError> {
        let bucket = &config.bucket;
        let find = || crate::nats::patiently("find the bucket", || js.get_key_value(bucket));
        let kv = match find().await {
            Ok(kv) => kv,
            Err(_) => {
                let create = crate::nats::patiently("create the bucket", || {
                    js.create_key_value(bucket_config(config))
                });
                match create.await {
                    Ok(kv) => kv,
                    // Another worker may have created it meanwhile.
                    Err(create) => find().await.map_err(|_| {
                        StoreError::Setup(format!("cannot create bucket {bucket}: {create}"))
                    })?,
                }
            }
        };
        let mut store = Self::from_bucket(js, kv)?;
        store.keep_markers_for(MARKER_TTL).await;
        Ok(store)
    }

    /// Makes the bucket keep the markers that expiries, releases and purges
    /// leave for at least `at_least` (and [`MARKER_TTL`]): as long as a
    /// marker is there, a claim knows the key ran before, and its attempt
    /// number says so (docs/contract.md v1.2 §4). JetStream mode asks for its
    /// redelivery horizon. A bucket made with shorter markers (by an
    /// earlier idemq) is updated; where the server refuses, the worker warns
    /// and goes on: attempt numbers then restart at 1 sooner.
    pub async fn keep_markers_for(&mut self, at_least: Duration) {
        let wanted = Duration::from_secs(super::ttl_secs(at_least.max(MARKER_TTL)));
        self.marker_ttl = wanted;
        let mut config = self.kv.stream.cached_info().config.clone();
        if config
            .subject_delete_marker_ttl
            .is_some_and(|ttl| ttl >= wanted)
        {
            return;
        }
        let had = config.subject_delete_marker_ttl;
        config.subject_delete_marker_ttl = Some(wanted);
        let js = &self.js;
        let update = crate::nats::patiently("keep the bucket's markers longer", || {
            js.update_stream(&config)
        });
        match update.await {
            Ok(_) => tracing::info!(
                bucket = %self.kv.name,
                markers = %humantime::format_duration(wanted),
                "the bucket now keeps expiry markers longer"
            ),
            Err(error) => tracing::warn!(
                bucket = %self.kv.name,
                %error,
                had = ?had,
                "the bucket's expiry markers could not be made to last longer; \
                 attempt numbers after a lost lease may restart at 1 sooner"
            ),
        }
    }

    /// Opens an existing bucket without creating it (for `idemq get`).
    pub async fn existing(js: Context, bucket: &str) -> Result<KvStore, StoreError> {
        let kv = js
            .get_key_value(bucket)
            .await
            .map_err(|e| StoreError::Setup(format!("cannot open bucket {bucket}: {e}")))?;
        Self::from_bucket(js, kv)
    }

    fn from_bucket(js: Context, kv: kv::Store) -> Result<KvStore, StoreError> {
        let stream = &kv.stream.cached_info().config;
        if !stream.allow_message_ttl {
            return Err(StoreError::Setup(format!(
                "bucket {} cannot hold per-message TTLs (allow_msg_ttl is off); \
                 delete it or choose another --bucket so idemq can create it",
                kv.name
            )));
        }
        if stream.max_messages_per_subject != 1 {
            tracing::warn!(
                bucket = %kv.name,
                history = stream.max_messages_per_subject,
                "bucket keeps more than one revision per key; idemq expects history 1"
            );
        }
        let put_prefix = kv.put_prefix.clone().unwrap_or_else(|| kv.prefix.clone());
        Ok(KvStore {
            js,
            kv,
            put_prefix,
            marker_ttl: MARKER_TTL,
        })
    }

    /// `$KV.<bucket>.<key>`: the key's subject in the bucket's stream.
    fn subject_of(&self, key: &IdempotencyKey) -> String {
        let mut subject = String::with_capacity(self.kv.prefix.len() + key.as_str().len());
        subject.push_str(&self.kv.prefix);
        subject.push_str(key.as_str());
        subject
    }

    /// The underlying bucket handle.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    async fn publish(
        &self,
        key: &IdempotencyKey,
        message: Publish,
        expected: Option<u64>,
    ) -> Result<u64, StoreError> {
        let message = match expected {
            Some(expected) => message.expected_last_subject_sequence(expected),
            None => message,
        };
        let mut subject = String::with_capacity(self.put_prefix.len() + key.as_str().len());
        subject.push_str(&self.put_prefix);
        subject.push_str(key.as_str());
        // Boxed on its own: inline, the publish would make every write's
        // future over 1 KiB, a size glibc serves only after consolidating
        // its free fast-bin blocks (twice per intent).
        let ack = Box::pin(self.js.send_publish(subject, message))
            .await
            .map_err(publish_error)?
            .await
            .map_err(publish_error)?;
        Ok(ack.sequence)
    }
}

fn bucket_config(config: &BucketConfig) -> kv::Config {
    kv::Config {
        bucket: config.bucket.clone(),
        description: "idemq claims and outcomes".to_owned(),
        history: 1,
        storage: StorageType::File,
        num_replicas: config.replicas,
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    }
}

/// JetStream's answer to an expected-sequence publish while another write
/// to the subject is still being proposed (clustered streams). async-nats
/// maps only 10071 to `WrongLastSequence`; both mean someone wrote first.
const WRONG_LAST_SEQUENCE_IN_FLIGHT: ErrorCode = ErrorCode(10164);

fn publish_error(error: jetstream::context::PublishError) -> StoreError {
    let code = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code);
    match error.kind() {
        PublishErrorKind::WrongLastSequence => StoreError::Conflict,
        PublishErrorKind::Other if code == Some(WRONG_LAST_SEQUENCE_IN_FLIGHT) => {
            StoreError::Conflict
        }
        PublishErrorKind::TimedOut => StoreError::Unacknowledged(error.to_string()),
        // The client refuses it before sending; `write` fills in the sizes.
        PublishErrorKind::MaxPayloadExceeded => StoreError::TooLarge { size: 0, max: 0 },
        _ => StoreError::Unavailable(error.to_string()),
    }
}

/// The KV operation a stream message stands for, as async-nats reads it
/// for its own entries: the `KV-Operation` header, else a server marker's
/// reason (an expiry or a purge frees the key as if purged).
fn operation_of(headers: &async_nats::HeaderMap) -> Operation {
    let header = |name: &str| headers.get(name).map(async_nats::HeaderValue::as_str);
    match (header("KV-Operation"), header("Nats-Marker-Reason")) {
        (Some("DEL"), _) | (None, Some("Remove")) => Operation::Delete,
        (Some("PURGE"), _) | (None, Some(_)) => Operation::Purge,
        _ => Operation::Put,
    }
}

/// Decodes one message of the bucket; `written` is its timestamp, by the
/// server's clock (Unix seconds and nanoseconds).
fn decode(
    key: &str,
    revision: u64,
    operation: Operation,
    value: &[u8],
    written: (i64, u32),
) -> Result<Versioned, StoreError> {
    let slot = match operation {
        Operation::Put => {
            let mut record: Record =
                serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
                    key: key.to_owned(),
                    reason: e.to_string(),
                })?;
            record.written = chrono::DateTime::from_timestamp(written.0, written.1);
            Slot::Record(record)
        }
        Operation::Delete => Slot::Free { expired: false },
        Operation::Purge => Slot::Free { expired: true },
    };
    Ok(Versioned { revision, slot })
}

#[async_trait]
impl IdempotencyStore for KvStore {
    fn bucket(&self) -> Option<&str> {
        Some(&self.kv.name)
    }

    async fn read(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        // Boxed: inline, the client's read makes this future 2 KiB.
        let entry = Box::pin(self.kv.entry(key.as_str()))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        entry
            .map(|entry| {
                let written = (entry.created.unix_timestamp(), entry.created.nanosecond());
                decode(
                    &entry.key,
                    entry.revision,
                    entry.operation,
                    &entry.value,
                    written,
                )
            })
            .transpose()
    }

    async fn write(
        &self,
        key: &IdempotencyKey,
        expected: u64,
        record: &Record,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        // A `Record` holds only strings, numbers, timestamps and `Value`s:
        // serialising it cannot fail.
        let mut payload = Vec::with_capacity(RECORD_CAPACITY);
        serde_json::to_writer(&mut payload, record).unwrap_or_default();
        let size = payload.len();
        let message = Publish::build()
            .payload(Bytes::from(payload))
            .ttl(Duration::from_secs(ttl_secs(ttl)));
        match self.publish(key, message, Some(expected)).await {
            Err(StoreError::TooLarge { .. }) => Err(StoreError::TooLarge {
                size,
                max: self.js.client().server_info().max_payload,
            }),
            written => written,
        }
    }

    async fn remove(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        let message = Publish::build()
            .header("KV-Operation", "DEL")
            .ttl(self.marker_ttl);
        self.publish(key, message, Some(expected)).await.map(drop)
    }

    async fn purge(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        // What the client's purge sends, with our compare-and-swap and a
        // marker TTL (the client's `purge_expect_revision` maps neither
        // conflict code to a kind).
        let message = Publish::build()
            .header("KV-Operation", "PURGE")
            .header("Nats-Rollup", "sub")
            .ttl(self.marker_ttl);
        self.publish(key, message, Some(expected)).await.map(drop)
    }

    async fn read_leader(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        let subject = self.subject_of(key);
        // A non-direct get: answered by the stream leader, never a replica.
        match Box::pin(self.kv.stream.get_last_raw_message_by_subject(&subject)).await {
            Ok(message) => decode(
                key.as_str(),
                message.sequence,
                operation_of(&message.headers),
                &message.payload,
                (message.time.unix_timestamp(), message.time.nanosecond()),
            )
            .map(Some),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(StoreError::Unavailable(error.to_string())),
        }
    }

    /// A core subscription to the key's subject: it wakes a follower on
    /// every write attempt (a renewal, an outcome, a release, a losing
    /// claim), with no server consumer. A KV watch would be one consumer
    /// per waiting key, and a server refuses consumers past its limit
    /// (error 10026) when thousands of keys are waited for at once.
    /// Expiries are not published: the follower also reads when the record
    /// it saw must have run out.
    async fn wakeups(&self, key: &IdempotencyKey) -> Result<Wakeups, StoreError> {
        let wakeups = self
            .js
            .client()
            .subscribe(self.subject_of(key))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Box::pin(wakeups.map(|message| {
            Wakeup {
                against: message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE))
                    .and_then(|against| against.as_str().parse().ok()),
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_11_are_refused_with_both_versions() {
        for ok in ["2.11.0", "2.15.1", "2.12.0-beta.1", "3.0.0"] {
            assert!(require_server_version(ok).is_ok(), "{ok}");
        }
        let Err(StoreError::Setup(reason)) = require_server_version("2.9.25") else {
            panic!("2.9 must be refused");
        };
        assert!(
            reason.contains("2.9.25") && reason.contains("2.11"),
            "{reason}"
        );
        assert!(require_server_version("").is_err());
    }
}
