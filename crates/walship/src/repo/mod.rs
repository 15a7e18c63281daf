//! What is stored where in a repository, and the record that says whose repository it is.
//!
//! ```text
//! repository.json                          identity record (plain JSON), written by the first push
//! encryption.json                          encryption record (plain JSON): present once the
//!                                          repository holds encrypted objects; written before the
//!                                          identity record, or by `walship-key enable`
//! wal/<timeline+log>/<segment name>        segments, .partial segments and .backup labels, sharded
//!                                          by the first 16 hex digits of their name
//! wal/history/<TLI>.history                timeline history files
//! ```
//!
//! Every object under `wal/` is in the [`crate::codec`] format. The identity record pins the
//! repository to one cluster: a push from another cluster (another system identifier, major version
//! or segment size) is refused, so two clusters never mix their WAL by mistake. Its random
//! `repository_id` tells this repository from any other one created later at the same location
//! (wiped and made anew, or made on an empty mount point): what a cluster remembers about a
//! repository holds only while the id is the same.

mod fetch;
mod push;

pub use fetch::{FetchReport, fetch, fetch_object};
pub use push::{PushReport, push};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::codec::Pipeline;
use crate::config::Config;
use crate::encryption::{AgeStage, EncryptionConfig};
use crate::error::Error;
use crate::log::Log;
use crate::storage::s3::ConditionalWritesPolicy;
use crate::storage::{CreateGuard, CreateProbe, PutOptions, Storage, StorageError};
use crate::wal::{WalFileKind, WalFileName};

/// The key of the identity record.
pub const IDENTITY_KEY: &str = "repository.json";
/// The key of the encryption record.
pub const ENCRYPTION_KEY: &str = "encryption.json";
/// The encryption record's format this build writes and reads.
pub const ENCRYPTION_RECORD_FORMAT: u32 = 1;
/// The repository layout version this build writes and reads.
pub const REPOSITORY_FORMAT_VERSION: u32 = 1;
/// The identity record is tiny; a larger object under its key is not one.
const MAX_IDENTITY_LEN: u64 = 64 * 1024;

/// The repository identity record (`repository.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The repository layout version ([`REPOSITORY_FORMAT_VERSION`] when written by this walship).
    pub format_version: u32,
    /// Random, made with the repository (128 bits as hex). `None` in repositories created before
    /// walship wrote one: they still open, and count as "no id" (two of them are never told apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
    /// As `pg_controldata` prints it ("Database system identifier"); a string, because JSON readers
    /// in other languages lose precision on 64-bit integers.
    pub system_identifier: String,
    /// The cluster's PostgreSQL major version (`15`).
    pub pg_version: u32,
    /// The cluster's WAL segment size in bytes.
    pub wal_segment_size: u32,
    /// The walship that made the repository (`walship 0.1.0`), for people.
    pub created_by: String,
    /// What the store did when the repository was made and a create of an existing key was tried
    /// ([`Storage::probe_creates`]); `None` where creates are exclusive by construction (local disk,
    /// SFTP), and in an S3 repository made before walship probed, which counts as unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditional_writes: Option<ConditionalWrites>,
    /// `age` when the repository was encrypted from the start (its `encryption.json` was written
    /// first): writers then need not read the encryption record, one request less per push. `None`
    /// for a plain repository, which `walship-key enable` may encrypt later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

/// The identity record's account of the store's conditional writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditionalWrites {
    /// `enforced`, `ignored` or `unknown`.
    pub guard: CreateGuard,
    /// What the store answered, for people.
    pub answer: String,
    /// The store probed (its endpoint), for people.
    pub store: String,
    /// When (RFC 3339).
    pub probed: String,
}

impl ConditionalWrites {
    /// The record of `probe`, made now.
    pub fn of(probe: CreateProbe) -> Self {
        ConditionalWrites {
            guard: probe.guard,
            answer: probe.answer,
            store: probe.store,
            probed: crate::base::recovery::now_rfc3339(),
        }
    }

    /// What it means, for a warning or a finding: `None` when the store refuses a second create.
    pub fn shortcoming(record: Option<&ConditionalWrites>) -> Option<String> {
        match record {
            Some(r) if r.guard == CreateGuard::Enforced => None,
            Some(r) if r.guard == CreateGuard::Ignored => Some(format!(
                "the store {} ignores conditional writes (If-None-Match: *; probed {}: {})",
                r.store, r.probed, r.answer
            )),
            Some(r) => Some(format!(
                "the store {} answered a probe of its conditional writes neither way (probed {}: {})",
                r.store, r.probed, r.answer
            )),
            None => Some("the repository records no probe of the store's conditional writes".into()),
        }
    }
}

/// The encryption record (`encryption.json`): this repository holds encrypted objects, and every
/// new object must be encrypted. Never rewritten; it names no key (which keys read the repository is
/// the configuration's business, never the repository's, which an attacker may hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionRecord {
    /// [`ENCRYPTION_RECORD_FORMAT`] when written by this walship.
    pub format_version: u32,
    /// How objects are encrypted: `age`.
    pub scheme: String,
    /// When encryption began (RFC 3339): objects older than this may be plain.
    pub since: String,
    /// The walship that wrote it, for people.
    pub created_by: String,
}

/// What a segment's page header says about the cluster that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterFacts {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// The PostgreSQL major version, from the page header's magic number.
    pub pg_version: u32,
    /// The segment size the long header records.
    pub wal_segment_size: u32,
}

/// Cheap to clone: clones share one backend (one S3 client, one SSH session).
#[derive(Clone)]
pub struct Repository {
    storage: std::sync::Arc<dyn Storage>,
    url: String,
    /// The identity record once read: it is never rewritten, so one process (a wal-push pushing a
    /// batch, a prefetch worker) reads it once.
    known_identity: std::sync::Arc<std::sync::OnceLock<Identity>>,
    /// Held while this process creates the identity record, so that the parallel uploads of one
    /// wal-push call into a new repository create it once. Each creation draws a new
    /// `repository_id`; on a store that ignores `If-None-Match` (Garage) two racing creations would
    /// both succeed, the later replacing the earlier, and records and the data directory's memory
    /// would name an id the repository no longer has.
    creating: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The `[encryption]` table: how new objects are written and which keys read objects.
    encryption: std::sync::Arc<EncryptionConfig>,
    /// The age stage for `encryption`, made once: the keys it makes from the settings serve every
    /// object this process reads or writes.
    age: std::sync::Arc<AgeStage>,
    /// Whether new objects are encrypted, once checked against the encryption record.
    writes_encrypted: std::sync::Arc<tokio::sync::OnceCell<bool>>,
    /// `[s3] conditional_writes`.
    conditional_writes: ConditionalWritesPolicy,
    /// Set once the store's conditional writes were judged for writing (one warning per process).
    store_judged: std::sync::Arc<std::sync::OnceLock<()>>,
    /// Where that warning goes.
    log: Log,
}

impl Repository {
    /// The repository that `config` names, over the backend its URL calls for.
    pub async fn open(config: &Config) -> Result<Self, Error> {
        let storage = crate::storage::open(&config.repo, &config.storage).await?;
        Ok(Self::over(storage, config.repo.to_string())
            .with_encryption(config.encryption.clone())
            .with_conditional_writes(config.storage.s3.conditional_writes))
    }

    /// The repository kept in `storage`; `url` names it in messages.
    pub fn with_storage(storage: Box<dyn Storage>, url: impl Into<String>) -> Self {
        Self::over(storage.into(), url.into())
    }

    fn over(storage: std::sync::Arc<dyn Storage>, url: String) -> Self {
        Repository {
            storage,
            url,
            known_identity: Default::default(),
            creating: Default::default(),
            encryption: Default::default(),
            age: std::sync::Arc::new(AgeStage::new(Default::default())),
            writes_encrypted: Default::default(),
            conditional_writes: Default::default(),
            store_judged: Default::default(),
            log: Log::quiet(),
        }
    }

    /// This repository's warnings (a store that ignores conditional writes) go to `log`.
    pub fn with_log(mut self, log: Log) -> Self {
        self.log = log;
        self
    }

    /// This repository written under `policy` where its store does not enforce conditional writes.
    pub fn with_conditional_writes(mut self, policy: ConditionalWritesPolicy) -> Self {
        self.conditional_writes = policy;
        self
    }

    /// This repository read and written with `encryption`'s keys.
    pub fn with_encryption(mut self, encryption: std::sync::Arc<EncryptionConfig>) -> Self {
        self.age = std::sync::Arc::new(AgeStage::new(encryption.clone()));
        self.encryption = encryption;
        self.writes_encrypted = Default::default();
        self
    }

    /// The `[encryption]` settings this repository is used with.
    pub fn encryption(&self) -> &EncryptionConfig {
        &self.encryption
    }

    /// How objects are read: with every configured key, and plain objects refused where encryption
    /// is configured, unless `accept_plain`.
    pub fn reader_pipeline(&self) -> Pipeline {
        if !self.encryption.is_configured() {
            return Pipeline::default();
        }
        let pipeline = Pipeline::default().then(self.age.clone());
        if self.encryption.accept_plain { pipeline } else { pipeline.refusing_plain() }
    }

    /// How new objects are written, at zstd `level`: encrypted exactly when the repository is. Checks
    /// the configuration against the encryption record first (once per process), so that no
    /// repository comes to hold plain and encrypted objects by mistake; creates the record when an
    /// encrypting writer makes a new repository.
    pub async fn writer_pipeline(&self, level: i32) -> Result<Pipeline, Error> {
        let encrypted = *self.writes_encrypted.get_or_try_init(|| self.check_writing()).await?;
        let pipeline = Pipeline::zstd(level);
        Ok(if encrypted { pipeline.then(self.age.clone()) } else { pipeline })
    }

    async fn check_writing(&self) -> Result<bool, Error> {
        let encrypting = self.encryption.writing.is_some();
        let location = self.storage.location(ENCRYPTION_KEY);
        // The identity record is read by every push anyway (and kept); where it says the repository
        // was encrypted from the start, the encryption record need not be read as well.
        let encrypted_from_start = self.identity().await?.is_some_and(|identity| identity.encryption.is_some());
        let encrypted = encrypted_from_start || self.encryption_record().await?.is_some();
        match (encrypted, encrypting) {
            (true, true) | (false, false) => Ok(encrypting),
            (true, false) => {
                let since = match self.encryption_record().await? {
                    Some(record) => record.since,
                    None => "its creation".into(),
                };
                Err(Error::Encryption {
                    location,
                    reason: format!(
                        "the repository is encrypted (since {since}), and no [encryption] recipients or \
                         passphrase_file are configured to write to it; nothing was written"
                    ),
                })
            }
            (false, true) if self.identity().await?.is_none() => {
                self.create_encryption_record().await?;
                Ok(true)
            }
            (false, true) => Err(Error::Encryption {
                location: self.storage.location(IDENTITY_KEY),
                reason: "the repository is not encrypted, but [encryption] is configured to write encrypted \
                         objects; nothing was written. To encrypt from now on, run `walship-key enable` (older \
                         objects then need accept_plain = true to be read); or remove the recipients"
                    .into(),
            }),
        }
    }

    /// Reads the encryption record; `None` in a plain repository.
    pub async fn encryption_record(&self) -> Result<Option<EncryptionRecord>, Error> {
        let read = self.read_record(ENCRYPTION_KEY, "encryption record").await?;
        let Some(record): Option<EncryptionRecord> = read else { return Ok(None) };
        let location = self.storage.location(ENCRYPTION_KEY);
        check_format(&location, "encryption record format", record.format_version, ENCRYPTION_RECORD_FORMAT)?;
        Ok(Some(record))
    }

    /// Marks the repository encrypted from now on (`walship-key enable`, or the first push of an
    /// encrypting writer). Another writer that made it first is as good: its record stays.
    pub async fn create_encryption_record(&self) -> Result<EncryptionRecord, Error> {
        let record = EncryptionRecord {
            format_version: ENCRYPTION_RECORD_FORMAT,
            scheme: "age".into(),
            since: crate::base::recovery::now_rfc3339(),
            created_by: format!("walship {}", env!("CARGO_PKG_VERSION")),
        };
        if self.create_record(ENCRYPTION_KEY, &record).await? {
            return Ok(record);
        }
        self.encryption_record().await?.ok_or_else(|| Error::Internal("the encryption record vanished".into()))
    }

    /// The backend, for the layers that place objects of their own (base backups).
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The repository's URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where WAL file `name` lives, for messages: the full location (bucket, key and endpoint on S3).
    pub fn describe_wal(&self, name: &str) -> String {
        match WalFileName::parse(name) {
            Ok(wal) => self.storage.location(&Self::wal_key(&wal)),
            Err(_) => self.url.clone(),
        }
    }

    /// After a command: undoes what interrupted writers left on the server, within `grace`. Best
    /// effort; a failure here changes nothing about the command's own outcome.
    pub async fn cleanup(&self, grace: std::time::Duration) -> Result<(), String> {
        match tokio::time::timeout(grace, self.storage.cleanup()).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("cleaning up did not finish within {} s", grace.as_secs())),
        }
    }

    /// The key of a WAL file.
    pub fn wal_key(name: &WalFileName) -> String {
        match (name.kind(), name.timeline_and_log()) {
            (WalFileKind::History, _) | (_, None) => format!("wal/history/{name}"),
            (_, Some(shard)) => format!("wal/{shard}/{name}"),
        }
    }

    /// Reads a small plain object (a record, not a codec object) whole: at most `limit` bytes and one
    /// more, so that an oversized object fails to parse rather than filling memory.
    pub async fn read_small(&self, key: &str, limit: u64) -> Result<Vec<u8>, StorageError> {
        let mut reader = self.storage.get(key).await?;
        let mut bytes = Vec::new();
        (&mut reader)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| StorageError::io(self.storage.location(key), "read", e))?;
        Ok(bytes)
    }

    /// Reads the identity record; `None` when the repository has none yet.
    pub async fn identity(&self) -> Result<Option<Identity>, Error> {
        if let Some(identity) = self.known_identity.get() {
            return Ok(Some(identity.clone()));
        }
        let read = self.read_record(IDENTITY_KEY, "repository identity record").await?;
        let Some(identity): Option<Identity> = read else { return Ok(None) };
        let location = self.storage.location(IDENTITY_KEY);
        check_format(&location, "repository format", identity.format_version, REPOSITORY_FORMAT_VERSION)?;
        let _ = self.known_identity.set(identity.clone());
        Ok(Some(identity))
    }

    /// A small plain JSON record; `None` when there is none. Unreadable, it is not this walship's
    /// repository (or not one at all).
    async fn read_record<T: serde::de::DeserializeOwned>(&self, key: &str, what: &str) -> Result<Option<T>, Error> {
        let bytes = match self.read_small(key, MAX_IDENTITY_LEN).await {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::WrongRepository {
            location: self.storage.location(key),
            reason: format!("unreadable {what}: {e}"),
        })
    }

    /// Creates a small plain JSON record; `false` when another writer created it first.
    async fn create_record(&self, key: &str, record: &impl Serialize) -> Result<bool, Error> {
        let mut json = serde_json::to_vec_pretty(record).expect("plain struct serializes");
        json.push(b'\n');
        let mut writer = self.storage.create(key, PutOptions::default()).await?;
        writer.write(json.into()).await?;
        match writer.commit().await {
            Ok(()) => Ok(true),
            Err(StorageError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails unless the repository has an identity record: used before declaring a file absent, so
    /// that an empty directory (an unmounted file system, a wrong path or prefix) is never taken for
    /// an archive that simply lacks the file.
    pub async fn require_identity(&self) -> Result<Identity, Error> {
        if let Some(identity) = self.identity().await? {
            return Ok(identity);
        }
        // A missing bucket or directory is the likelier story; say so if it is the case.
        self.storage.check_root().await?;
        Err(Error::WrongRepository {
            location: self.storage.location(IDENTITY_KEY),
            reason: "no repository identity record: this is not a walship repository (wrong path, or a \
                     file system that is not mounted), so absence of a file proves nothing"
                .into(),
        })
    }

    /// Checks `facts`, read from `file`, against the identity record, creating the record if the
    /// repository has none.
    pub async fn ensure_identity(&self, facts: &ClusterFacts, file: &str) -> Result<Identity, Error> {
        let identity = self.find_or_create_identity(facts, file).await?;
        self.judge_store_for_writing(Some(&identity))?;
        Ok(identity)
    }

    async fn find_or_create_identity(&self, facts: &ClusterFacts, file: &str) -> Result<Identity, Error> {
        if let Some(identity) = self.identity().await? {
            self.check_facts(&identity, facts, file)?;
            return Ok(identity);
        }
        let _creating = self.creating.lock().await;
        // Another upload of this process may have created it while we waited.
        if let Some(identity) = self.identity().await? {
            self.check_facts(&identity, facts, file)?;
            return Ok(identity);
        }
        // A new repository: make sure its bucket or directory really exists, since some S3-compatible
        // servers quietly create a bucket on first write, hiding a mistyped name.
        self.storage.check_root().await?;
        let conditional_writes = self.storage.probe_creates().await?.map(ConditionalWrites::of);
        // An encrypting writer made the encryption record first (writer_pipeline, before this).
        let encrypted = self.writes_encrypted.get() == Some(&true);
        let identity = Identity {
            encryption: encrypted.then(|| "age".to_owned()),
            conditional_writes,
            format_version: REPOSITORY_FORMAT_VERSION,
            repository_id: Some(new_repository_id(&self.storage.location(IDENTITY_KEY))?),
            system_identifier: facts.system_identifier.to_string(),
            pg_version: facts.pg_version,
            wal_segment_size: facts.wal_segment_size,
            created_by: format!("walship {}", env!("CARGO_PKG_VERSION")),
        };
        // Judged on what the probe found, before the record is written: a store that `require`
        // refuses gets no repository, and where the identity record itself is read back, two
        // processes making the repository at once do not both take theirs for the record.
        self.judge_store_for_writing(Some(&identity))?;
        if self.create_record(IDENTITY_KEY, &identity).await? {
            let _ = self.known_identity.set(identity.clone());
            return Ok(identity);
        }
        // Another push created it first; it must agree with us.
        let identity = self.require_identity().await?;
        self.check_facts(&identity, facts, file)?;
        Ok(identity)
    }

    /// Checks a system identifier (from `global/pg_control`, on behalf of `file`) against the identity
    /// record, if any.
    pub async fn check_system_identifier(&self, system_identifier: u64, file: &str) -> Result<(), Error> {
        match self.identity().await? {
            Some(identity) if identity.system_identifier != system_identifier.to_string() => {
                Err(self.wrong_cluster(&identity, file, format!("system identifier {system_identifier}")))
            }
            _ => Ok(()),
        }
    }

    fn check_facts(&self, identity: &Identity, facts: &ClusterFacts, file: &str) -> Result<(), Error> {
        if identity.system_identifier != facts.system_identifier.to_string() {
            return Err(self.wrong_cluster(identity, file, format!("system identifier {}", facts.system_identifier)));
        }
        if identity.pg_version != facts.pg_version {
            return Err(self.wrong_cluster(identity, file, format!("PostgreSQL {}", facts.pg_version)));
        }
        if identity.wal_segment_size != facts.wal_segment_size {
            return Err(self.wrong_cluster(identity, file, format!("{}-byte WAL segments", facts.wal_segment_size)));
        }
        Ok(())
    }

    /// Before this process's first write, with the identity record (`None` in a repository not made
    /// yet): on a store that may let a racing create replace an object (as the record says, or does
    /// not say), every create is read back from now on, and `[s3] conditional_writes` decides between
    /// one warning, silence and refusal. Before the repository is made nothing is known of the store
    /// yet: writes are read back, and the push that makes it probes and judges.
    pub fn judge_store_for_writing(&self, identity: Option<&Identity>) -> Result<(), Error> {
        if self.storage.creates_exclusive_by_construction() || self.store_judged.get().is_some() {
            return Ok(());
        }
        let Some(identity) = identity else {
            self.storage.read_back_creates();
            return Ok(());
        };
        let Some(shortcoming) = ConditionalWrites::shortcoming(identity.conditional_writes.as_ref()) else {
            let _ = self.store_judged.set(());
            return Ok(());
        };
        self.storage.read_back_creates();
        match self.conditional_writes {
            ConditionalWritesPolicy::Require => {
                return Err(Error::Storage(StorageError::Other {
                    location: self.url.clone(),
                    message: format!(
                        "{shortcoming}; [s3] conditional_writes = \"require\" refuses to write to such a store; \
                         nothing was written"
                    ),
                    retryable: false,
                }));
            }
            ConditionalWritesPolicy::Warn => self.log.info(format_args!(
                "warning: {shortcoming}: two writers of one name at the same moment can both be told that \
                 their write succeeded while the later replaces the earlier; each write is read back to narrow \
                 that window. Set [s3] conditional_writes = \"accept\" to silence this, or \"require\" to refuse \
                 such a store"
            )),
            ConditionalWritesPolicy::Accept => {}
        }
        let _ = self.store_judged.set(());
        Ok(())
    }

    /// Probes the store's conditional writes now (wal-verify `--probe-writes`): writes and removes a
    /// scratch object. `None` where creates are exclusive by construction.
    pub async fn probe_store(&self) -> Result<Option<ConditionalWrites>, Error> {
        Ok(self.storage.probe_creates().await?.map(ConditionalWrites::of))
    }

    fn wrong_cluster(&self, identity: &Identity, file: &str, theirs: String) -> Error {
        Error::WrongRepository {
            location: file.to_owned(),
            reason: format!(
                "comes from a cluster with {theirs}, but repository {} belongs to another cluster (system \
                 identifier {}, PostgreSQL {}, {}-byte WAL segments); give each cluster its own repository",
                self.url, identity.system_identifier, identity.pg_version, identity.wal_segment_size
            ),
        }
    }
}

/// Refuses a record of a format newer than `newest` (this walship's).
fn check_format(location: &str, what: &str, format: u32, newest: u32) -> Result<(), Error> {
    if format <= newest {
        return Ok(());
    }
    Err(Error::WrongRepository {
        location: location.to_owned(),
        reason: format!("{what} {format} is newer than this walship supports ({newest}); upgrade walship"),
    })
}

/// 16 random bytes from the kernel, as hex: unique across every repository ever made, with no
/// dependency beyond `/dev/urandom`.
fn new_repository_id(for_location: &str) -> Result<String, Error> {
    crate::fs::random_hex(16).map_err(|e| Error::LocalIo {
        path: format!("/dev/urandom (an id for {for_location})"),
        operation: "read",
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ExitCode;
    use crate::storage::local::LocalStorage;
    use crate::wal::segment_bytes;

    #[test]
    fn keys_follow_the_documented_layout() {
        let key = |n: &str| Repository::wal_key(&WalFileName::parse(n).unwrap());
        assert_eq!(key("000000010000000A000000FF"), "wal/000000010000000A/000000010000000A000000FF");
        assert_eq!(key("000000020000000000000003.partial"), "wal/0000000200000000/000000020000000000000003.partial");
        assert_eq!(
            key("000000010000000000000002.00000028.backup"),
            "wal/0000000100000000/000000010000000000000002.00000028.backup"
        );
        assert_eq!(key("00000002.history"), "wal/history/00000002.history");
    }

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::with_storage(Box::new(LocalStorage::open(dir).unwrap()), format!("file://{}", dir.display()))
    }

    /// Local storage that counts (and slows down) the creations of the identity record, so that
    /// concurrent uploads all find it absent before any of them has written it.
    struct CountingCreates {
        inner: LocalStorage,
        identity_creates: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Storage for CountingCreates {
        fn location(&self, key: &str) -> String {
            self.inner.location(key)
        }
        async fn create(
            &self,
            key: &str,
            options: PutOptions,
        ) -> Result<Box<dyn crate::storage::ObjectWriter>, StorageError> {
            if key == IDENTITY_KEY {
                self.identity_creates.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            self.inner.create(key, options).await
        }
        async fn get(&self, key: &str) -> Result<crate::storage::ObjectReader, StorageError> {
            self.inner.get(key).await
        }
        async fn head(&self, key: &str) -> Result<crate::storage::ObjectMeta, StorageError> {
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> crate::storage::ListResult {
            self.inner.list(prefix, after, limit).await
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }
        async fn make_durable(&self, key: &str) -> Result<(), StorageError> {
            self.inner.make_durable(key).await
        }
        async fn check_root(&self) -> Result<(), StorageError> {
            self.inner.check_root().await
        }
        async fn remove_incomplete(&self, prefix: &str) -> Result<(), StorageError> {
            self.inner.remove_incomplete(prefix).await
        }
    }

    /// The uploads of one wal-push call run at once; into a new repository they must create the
    /// identity record once, or on a store that ignores If-None-Match the later creation would
    /// replace the earlier one's `repository_id` under the feet of those that read it.
    #[tokio::test]
    async fn concurrent_uploads_into_a_new_repository_create_its_identity_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(CountingCreates {
            inner: LocalStorage::open(dir.path()).unwrap(),
            identity_creates: Default::default(),
        });
        let repo = Repository::over(storage.clone(), "test".into());
        let facts = ClusterFacts { system_identifier: 7, pg_version: 15, wal_segment_size: 16 << 20 };
        let uploads: Vec<_> = (0..8)
            .map(|_| {
                let repo = repo.clone();
                tokio::spawn(async move { repo.ensure_identity(&facts, "seg").await.unwrap().repository_id })
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        for upload in uploads {
            ids.insert(upload.await.unwrap());
        }
        assert_eq!(storage.identity_creates.load(std::sync::atomic::Ordering::SeqCst), 1);
        let stored = Repository::with_storage(Box::new(LocalStorage::open(dir.path()).unwrap()), "test");
        assert_eq!(ids, [stored.identity().await.unwrap().unwrap().repository_id].into());
    }

    #[tokio::test]
    async fn identity_is_created_once_and_then_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        assert!(repo.identity().await.unwrap().is_none());
        let err = repo.require_identity().await.unwrap_err();
        assert!(err.to_string().contains("not a walship repository"), "{err}");
        let facts = ClusterFacts { system_identifier: 7, pg_version: 15, wal_segment_size: 16 << 20 };
        let created = repo.ensure_identity(&facts, "seg").await.unwrap();
        assert_eq!(repo.ensure_identity(&facts, "seg").await.unwrap(), created);
        for other in [
            ClusterFacts { system_identifier: 8, ..facts },
            ClusterFacts { pg_version: 16, ..facts },
            ClusterFacts { wal_segment_size: 1 << 20, ..facts },
        ] {
            let err = repo.ensure_identity(&other, "seg").await.unwrap_err();
            assert!(err.to_string().starts_with("seg: ") && err.to_string().contains("another cluster"), "{err}");
        }
        repo.check_system_identifier(7, "h").await.unwrap();
        assert!(repo.check_system_identifier(9, "h").await.is_err());
    }

    #[tokio::test]
    async fn every_new_repository_gets_its_own_id_and_old_ones_still_open() {
        let facts = ClusterFacts { system_identifier: 7, pg_version: 15, wal_segment_size: 16 << 20 };
        let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = repo(first.path()).ensure_identity(&facts, "seg").await.unwrap().repository_id.unwrap();
        let b = repo(second.path()).ensure_identity(&facts, "seg").await.unwrap().repository_id.unwrap();
        assert!(a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
        let stored = std::fs::read_to_string(first.path().join(IDENTITY_KEY)).unwrap();
        assert!(stored.contains(&format!("\"repository_id\": \"{a}\"")), "{stored}");
        assert_eq!(repo(first.path()).identity().await.unwrap().unwrap().repository_id, Some(a));

        let old = tempfile::tempdir().unwrap();
        std::fs::write(
            old.path().join(IDENTITY_KEY),
            concat!(
                r#"{"format_version":1,"system_identifier":"7","pg_version":15,"#,
                r#""wal_segment_size":16777216,"created_by":"walship 0.1.0"}"#
            ),
        )
        .unwrap();
        let identity = repo(old.path()).ensure_identity(&facts, "seg").await.unwrap();
        assert_eq!(identity.repository_id, None, "a repository without an id opens as one without");
    }

    #[tokio::test]
    async fn a_future_repository_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(IDENTITY_KEY),
            r#"{"format_version":2,"system_identifier":"1","pg_version":15,"wal_segment_size":1,"created_by":"x"}"#,
        )
        .unwrap();
        let err = repo(dir.path()).identity().await.unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    const MIB: u32 = 1 << 20;

    /// A repository in a fresh directory, and a work directory beside it.
    fn scratch() -> (tempfile::TempDir, tempfile::TempDir, Repository) {
        let (repo_dir, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let repo = repo(repo_dir.path());
        (repo_dir, work, repo)
    }

    /// A 1 MiB segment `name` of cluster 7 in `dir`, its pages filled with `fill`.
    fn segment_file(dir: &std::path::Path, name: &str, fill: u8) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, segment_bytes(name, MIB, 7, fill)).unwrap();
        path
    }

    #[tokio::test]
    async fn push_then_fetch_round_trips_and_repush_is_judged_by_content() {
        let (_repo_dir, work, repo) = scratch();
        let name = "000000010000000000000003";
        let source = segment_file(work.path(), name, 0);

        let first = push(&repo, &source, name, 1).await.unwrap();
        assert_eq!(first.original_bytes, u64::from(MIB));
        assert!(first.stored_bytes.unwrap() < u64::from(MIB) / 10, "zeros compress");
        let again = push(&repo, &source, name, 1).await.unwrap();
        assert_eq!(again.stored_bytes, None, "identical content is not stored twice");

        let restored = work.path().join("RECOVERYXLOG");
        let report = fetch(&repo, name, &restored).await.unwrap();
        assert_eq!(report.original_bytes, u64::from(MIB));
        assert!(std::fs::read(&restored).unwrap() == std::fs::read(&source).unwrap());

        std::fs::write(&source, segment_bytes(name, MIB, 7, 0xAB)).unwrap();
        let err = push(&repo, &source, name, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Conflict, "{err}");
        assert!(err.to_string().contains("sha256"), "{err}");
    }

    #[tokio::test]
    async fn history_files_are_never_replaced() {
        let (_repo_dir, work, repo) = scratch();
        let source = work.path().join("00000002.history");
        std::fs::write(&source, "1\t0/3000148\tno recovery target specified\n").unwrap();
        push(&repo, &source, "00000002.history", 1).await.unwrap();
        assert_eq!(push(&repo, &source, "00000002.history", 1).await.unwrap().stored_bytes, None);
        std::fs::write(&source, "1\t0/4000000\tbefore 2026-11-22\n").unwrap();
        let err = push(&repo, &source, "00000002.history", 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Conflict);
        let restored = work.path().join("fetched");
        fetch(&repo, "00000002.history", &restored).await.unwrap();
        assert!(std::fs::read_to_string(&restored).unwrap().contains("0/3000148"));
    }

    #[tokio::test]
    async fn absent_is_claimed_only_in_a_real_repository() {
        let (_repo_dir, work, repo) = scratch();
        let dest = work.path().join("x");
        let err = fetch(&repo, "000000010000000000000001", &dest).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::WrongRepository, "empty directory: {err}");
        let source = work.path().join("seg");
        std::fs::write(&source, segment_bytes("000000010000000000000001", MIB, 7, 0)).unwrap();
        push(&repo, &source, "000000010000000000000001", 1).await.unwrap();
        let err = fetch(&repo, "000000010000000000000002", &dest).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::NotFound, "{err}");
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn a_segment_moved_to_another_name_is_never_handed_over() {
        let (repo_dir, work, repo) = scratch();
        let (first, second) = ("000000010000000000000001", "000000010000000000000002");
        push(&repo, &segment_file(work.path(), first, 1), first, 1).await.unwrap();
        push(&repo, &segment_file(work.path(), second, 2), second, 1).await.unwrap();
        let shard = repo_dir.path().join("wal/0000000100000000");
        std::fs::copy(shard.join(first), shard.join(second)).unwrap();
        let dest = work.path().join("RECOVERYXLOG");
        let err = fetch(&repo, second, &dest).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Corrupt, "{err}");
        assert!(err.to_string().contains(&format!("not the segment {second}")), "{err}");
        assert!(
            !dest.exists()
                && std::fs::read_dir(work.path())
                    .unwrap()
                    .all(|e| { !e.unwrap().file_name().to_string_lossy().starts_with('.') })
        );
    }

    fn encrypting(repo: Repository, with_identity: bool) -> (Repository, crate::encryption::NamedIdentity) {
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        let id = crate::encryption::KeyId::of(&recipient);
        let named = crate::encryption::NamedIdentity { id, identity, file: "/keys/k".into() };
        let config = EncryptionConfig {
            writing: Some(crate::encryption::Writing::Recipients(vec![(id, recipient)])),
            identities: if with_identity { vec![named.clone()] } else { Vec::new() },
            ..Default::default()
        };
        (repo.with_encryption(std::sync::Arc::new(config)), named)
    }

    #[tokio::test]
    async fn an_encrypted_repository_refuses_plain_writers_and_a_plain_one_encrypting_ones() {
        let (repo_dir, work, plain) = scratch();
        let name = "000000010000000000000001";
        let source = segment_file(work.path(), name, 1);
        push(&plain, &source, name, 1).await.unwrap();
        let (encrypting_writer, _) = encrypting(repo(repo_dir.path()), false);
        let second = "000000010000000000000002";
        let err = push(&encrypting_writer, &segment_file(work.path(), second, 2), second, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Encryption, "{err}");
        assert!(err.to_string().contains("walship-key enable"), "{err}");
        assert!(!repo_dir.path().join("wal/0000000100000000").join(second).exists(), "nothing written");

        let (new_dir, new_work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (writer, identity) = encrypting(repo(new_dir.path()), false);
        push(&writer, &segment_file(new_work.path(), name, 1), name, 1).await.unwrap();
        assert!(new_dir.path().join(ENCRYPTION_KEY).exists(), "a new repository is marked encrypted");
        let err = push(&repo(new_dir.path()), &segment_file(new_work.path(), second, 2), second, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Encryption, "{err}");
        let reader = repo(new_dir.path()).with_encryption(std::sync::Arc::new(EncryptionConfig {
            identities: vec![identity],
            ..Default::default()
        }));
        let dest = new_work.path().join("RECOVERYXLOG");
        fetch(&reader, name, &dest).await.unwrap();
        assert!(std::fs::read(&dest).unwrap() == std::fs::read(new_work.path().join(name)).unwrap());
        let err = fetch(&repo(new_dir.path()), name, &new_work.path().join("x")).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Encryption, "no key configured: {err}");
    }

    /// A repository encrypted from the start says so in its identity record, so that writers need
    /// not read the encryption record too (one request less per push); a plain writer is still
    /// refused, and a plain repository's record says nothing (walship-key enable may encrypt it).
    #[tokio::test]
    async fn a_repository_encrypted_from_the_start_says_so_in_its_identity_record() {
        let (repo_dir, work, plain) = scratch();
        let names = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003"];
        let (writer, _) = encrypting(repo(repo_dir.path()), false);
        push(&writer, &segment_file(work.path(), names[0], 1), names[0], 1).await.unwrap();
        let identity = plain.identity().await.unwrap().unwrap();
        assert_eq!(identity.encryption.as_deref(), Some("age"));

        std::fs::remove_file(repo_dir.path().join(ENCRYPTION_KEY)).unwrap();
        let again = repo(repo_dir.path()).with_encryption(std::sync::Arc::new(writer.encryption().clone()));
        push(&again, &segment_file(work.path(), names[1], 2), names[1], 1).await.unwrap();
        let err = push(&repo(repo_dir.path()), &segment_file(work.path(), names[2], 3), names[2], 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Encryption, "{err}");
        assert!(err.to_string().contains("since its creation"), "{err}");

        let (plain_dir, plain_work, plain) = scratch();
        push(&plain, &segment_file(plain_work.path(), names[0], 1), names[0], 1).await.unwrap();
        assert_eq!(repo(plain_dir.path()).identity().await.unwrap().unwrap().encryption, None);
    }

    /// An encryption record of a newer format than this walship's is refused as a wrong repository
    /// (exit 6) before anything is written, as a newer identity record is.
    #[tokio::test]
    async fn a_future_encryption_record_format_is_refused() {
        let (repo_dir, work, plain) = scratch();
        let name = "000000010000000000000001";
        let record =
            r#"{"format_version": 99, "scheme": "age", "since": "2030-01-01T00:00:00Z", "created_by": "walship 9"}"#;
        std::fs::write(repo_dir.path().join(ENCRYPTION_KEY), record).unwrap();
        let err = push(&plain, &segment_file(work.path(), name, 1), name, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::WrongRepository, "{err}");
        assert!(err.to_string().contains("encryption record format 99 is newer"), "{err}");
        assert!(!repo_dir.path().join(IDENTITY_KEY).exists(), "written despite the refusal");
    }

    /// A first encrypting push killed between the encryption record and the identity record leaves a
    /// repository with the first only: a plain writer is refused there (exit 14, nothing written), and
    /// the next encrypting push goes on and makes the identity record, which says it is encrypted.
    #[tokio::test]
    async fn a_repository_left_with_only_its_encryption_record_goes_on_encrypted() {
        let (repo_dir, work, plain) = scratch();
        let name = "000000010000000000000001";
        let (writer, _) = encrypting(repo(repo_dir.path()), false);
        writer.create_encryption_record().await.unwrap();
        let err = push(&plain, &segment_file(work.path(), name, 1), name, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Encryption, "{err}");
        assert!(!repo_dir.path().join(IDENTITY_KEY).exists(), "a plain writer made the repository");
        let next = repo(repo_dir.path()).with_encryption(std::sync::Arc::new(writer.encryption().clone()));
        push(&next, &segment_file(work.path(), name, 1), name, 1).await.unwrap();
        assert_eq!(plain.identity().await.unwrap().unwrap().encryption.as_deref(), Some("age"));
    }

    /// The archive host holds public keys only; a re-push must still never call a damaged copy
    /// identical, since PostgreSQL then recycles its own.
    #[tokio::test]
    async fn without_a_key_a_repush_is_judged_by_the_seal_and_the_digest() {
        let (repo_dir, work, _) = scratch();
        let (writer, _) = encrypting(repo(repo_dir.path()), false);
        let name = "000000010000000000000001";
        let source = segment_file(work.path(), name, 1);
        push(&writer, &source, name, 1).await.unwrap();
        assert_eq!(push(&writer, &source, name, 1).await.unwrap().stored_bytes, None, "identical");
        let other = segment_file(&work.path().join("..").canonicalize().unwrap(), name, 9);
        let err = push(&writer, &other, name, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Conflict, "{err}");
        let stored = repo_dir.path().join("wal/0000000100000000").join(name);
        let mut bytes = std::fs::read(&stored).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&stored, &bytes).unwrap();
        let err = push(&writer, &source, name, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Corrupt, "a damaged copy is never identical: {err}");
    }

    #[tokio::test]
    async fn a_damaged_object_is_never_handed_over() {
        let (repo_dir, work, repo) = scratch();
        let name = "000000010000000000000001";
        let source = segment_file(work.path(), name, 3);
        push(&repo, &source, name, 1).await.unwrap();
        let stored = repo_dir.path().join("wal/0000000100000000").join(name);
        let mut bytes = std::fs::read(&stored).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&stored, &bytes).unwrap();
        let dest = work.path().join("RECOVERYXLOG");
        let err = fetch(&repo, name, &dest).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Corrupt, "{err}");
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 1, "no temporary file left beside it");
        let err = push(&repo, &source, name, 1).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Corrupt, "re-push over a damaged copy: {err}");
    }
}
