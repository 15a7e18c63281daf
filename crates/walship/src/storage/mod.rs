//! Where bytes are placed durably: one trait, one implementation per kind of repository.
//!
//! A backend knows keys and bytes, nothing of WAL. Every backend makes the same promises:
//! - publishing is create-if-absent ([`ObjectWriter::commit`]); there is no way to overwrite;
//! - a committed object is durable and complete; a reader never sees a partial one;
//! - [`StorageError::NotFound`] only when the backend is certain the key is absent; anything it
//!   could not determine is another error, and [`StorageError::is_retryable`] says whether trying
//!   again may help.
//!
//! Keys are `/`-separated relative paths of plain components (see [`validate_key`]); the repository
//! layer builds them, and backends refuse anything else, so a hostile name cannot escape the
//! repository.

pub mod local;
pub mod s3;
pub mod settings;
pub mod ssh;
pub mod url;

pub use url::RepoUrl;

use std::collections::BTreeMap;
use std::io;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;

/// The settings of every backend; [`open`] uses the one the repository URL names. Here, beside the
/// factory, so that the backends' files and `settings.rs` import each other in one direction only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// The `[s3]` table, resolved.
    pub s3: s3::S3Settings,
    /// The `[ssh]` table, resolved.
    pub ssh: ssh::SshSettings,
}

/// Opens the store that `url` names, with its backend's `settings`: the one place that knows which
/// backend serves which kind of URL. Nothing is sent to a remote store yet (SSH connects on first
/// use); a local root must exist.
pub async fn open(url: &RepoUrl, settings: &Settings) -> Result<std::sync::Arc<dyn Storage>, StorageError> {
    Ok(match url {
        RepoUrl::Local(path) => std::sync::Arc::new(local::LocalStorage::open(path)?),
        RepoUrl::S3 { bucket, prefix } => {
            std::sync::Arc::new(s3::S3Storage::connect(bucket, prefix, &settings.s3).await?)
        }
        RepoUrl::Ssh { user, host, port, path } => {
            std::sync::Arc::new(ssh::SshStorage::new(user.as_deref(), host, *port, path, &settings.ssh))
        }
    })
}

/// A streaming read of one object.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// What a listing or a `head` says about one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
    /// Key/value attributes stored with the object by backends that keep them (S3 user metadata);
    /// empty where the backend has none.
    pub attributes: BTreeMap<String, String>,
    /// When the object was stored (a file's mtime, S3's LastModified), where the backend says:
    /// wal-verify judges from it how long ago archiving last succeeded.
    pub modified: Option<std::time::SystemTime>,
}

/// A page of [`Storage::list`]: objects in key order.
pub type ListResult = Result<Vec<ObjectMeta>, StorageError>;

/// What a writer should store besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Attributes kept with the object where the backend supports them.
    pub attributes: BTreeMap<String, String>,
    /// Roughly how many bytes will be written, where known: lets a backend that uploads in parts
    /// choose a part size that keeps within its part-count limit.
    pub size_hint: Option<u64>,
}

/// What a store does with a create-only write (`If-None-Match: *`) of a key that already exists,
/// as a probe found it ([`Storage::probe_creates`]). Recorded in the repository's identity record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CreateGuard {
    /// The store refused the second write (412): a create never replaces an object.
    Enforced,
    /// The store took the second write, which replaced the first: two writers of one name at the
    /// same moment can both succeed.
    Ignored,
    /// The store answered neither way (an error that says neither "taken" nor "done").
    Unknown,
}

/// What a probe of a store's creates found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateProbe {
    /// The verdict.
    pub guard: CreateGuard,
    /// What the store answered to the second write, for people (`412 Precondition Failed`).
    pub answer: String,
    /// The store probed, for people (an S3 endpoint).
    pub store: String,
}

/// A repository's backend: keys and bytes, with the promises of this module's documentation.
#[async_trait]
pub trait Storage: Send + Sync {
    /// A human-readable name for `key` (`file:///repo/wal/...`), for messages.
    fn location(&self, key: &str) -> String;

    /// Starts writing `key`. Nothing is visible under `key` until [`ObjectWriter::commit`].
    async fn create(&self, key: &str, options: PutOptions) -> Result<Box<dyn ObjectWriter>, StorageError>;

    /// Opens `key` for a streaming read.
    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError>;

    /// The size and attributes of `key`, without its bytes.
    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError>;

    /// Up to `limit` objects whose keys start with `prefix` and sort after `start_after`, in key order.
    /// A page may hold fewer than `limit` (S3 caps pages at 1000): call again with the last key until a
    /// page comes back empty. Memory stays bounded however large the listing.
    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> ListResult;

    /// Removes `key`; [`StorageError::NotFound`] where nothing was there.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Removes `keys` (any number; the caller passes at most a few thousand at once). A key that is
    /// already absent counts as removed: two expiry runs at once both succeed. Returns how many keys
    /// were removed by this call or already absent (= `keys.len()` on success).
    /// Stops at the first real failure and returns it (the keys before it may be gone).
    ///
    /// Backends that keep directories also remove the ones these deletes emptied, up to but never
    /// including a directory at depth 1 (see [`may_remove_dir`]). The default deletes one key after
    /// the other, for stores (test doubles) that have nothing better.
    async fn delete_many(&self, keys: &[String]) -> Result<u64, StorageError> {
        for key in keys {
            match self.delete(key).await {
                Ok(()) | Err(StorageError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(keys.len() as u64)
    }

    /// Removes what killed writers left anywhere in the repository and nobody will finish: temporary
    /// files ([`crate::fs::is_temp_name`]) older than `older_than` on local disk and SFTP, and S3
    /// multipart uploads initiated more than `older_than` ago. Younger ones may belong to a writer
    /// still at work and are left alone. The default finds nothing: a store whose writes leave
    /// nothing behind.
    async fn remove_stale(&self, older_than: std::time::Duration) -> Result<Housekeeping, StorageError> {
        let _ = older_than;
        Ok(Housekeeping::default())
    }

    /// What this store had to do differently from what was asked, one human line each, for the
    /// command to say once (a fallback to one request per object where the store lacks a batch
    /// request). Empty by default.
    fn notices(&self) -> Vec<String> {
        Vec::new()
    }

    /// Makes the existing object `key` durable: its bytes and every directory entry on the way to it.
    /// A push that finds identical content already archived calls it before reporting success, because
    /// the push that stored the object may have been killed after publishing it and before making its
    /// name durable; PostgreSQL recycles the segment on our success, so "identical" must also mean
    /// "survives a crash". A failure is an error, never ignored.
    async fn make_durable(&self, key: &str) -> Result<(), StorageError>;

    /// Whether a create can never replace an object here, whatever the store does: local disk and
    /// SFTP publish with a link or rename that refuses an existing name. S3 relies on the store
    /// honouring `If-None-Match`, which some S3-compatible stores ignore.
    fn creates_exclusive_by_construction(&self) -> bool {
        true
    }

    /// Finds out whether the store refuses a create of a key that exists: writes a scratch object
    /// under `probe/`, tries to create it again, and removes it. `None` where creates are exclusive by
    /// construction. A transient failure is an error (try again later), never a verdict.
    async fn probe_creates(&self) -> Result<Option<CreateProbe>, StorageError> {
        Ok(None)
    }

    /// From now on, every commit reads its object back and fails with
    /// [`StorageError::AlreadyExists`] when the store holds another object under the key: for a
    /// store that may let a racing create replace ours. Nothing to do where creates are exclusive
    /// by construction.
    fn read_back_creates(&self) {}

    /// Whether [`PutOptions::attributes`] are kept (and so must be known before the write begins).
    /// Writers to a backend that keeps none can learn an object's checksum as they write it.
    fn keeps_attributes(&self) -> bool {
        false
    }

    /// Confirms that the repository's container (directory, bucket) exists and is accessible, with an
    /// error that says what is wrong otherwise. Used to explain why a repository looks empty.
    async fn check_root(&self) -> Result<(), StorageError>;

    /// Undoes what writers cut short left half done on the server (open multipart uploads). A
    /// command calls it after a failure, in particular after its deadline dropped an operation midway,
    /// when no writer got the chance to abort.
    async fn cleanup(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Removes what unfinished writes left under the directory `prefix` (temporary files, open
    /// multipart uploads), whatever their age. Only for a prefix whose writer is known to be dead: a
    /// killed base-push, found by the next one.
    async fn remove_incomplete(&self, prefix: &str) -> Result<(), StorageError>;
}

/// What a housekeeping pass ([`Storage::remove_stale`]) removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Housekeeping {
    /// Temporary files (local disk, SFTP) older than the age, removed.
    pub temp_files: u64,
    /// Their bytes.
    pub temp_bytes: u64,
    /// Open multipart uploads (S3) begun before the age, aborted.
    pub uploads: u64,
    /// The store cannot list multipart uploads (s3s-fs): nothing was checked there.
    pub uploads_unlisted: bool,
}

/// How many deletes a backend without a batch request keeps in flight at once: enough to hide the
/// latency of a network file system or an SFTP round trip, few enough not to flood the server.
pub(crate) const DELETE_CONCURRENCY: usize = 8;

/// Runs `work` on every item with at most [`DELETE_CONCURRENCY`] of them in flight, and stops at the
/// first failure (those in flight then are cancelled; what they already did stays done). Tasks on
/// the runtime rather than a stream combinator: the same bound, without another feature of
/// `futures-util`. `location` names the whole batch should a task panic.
pub(crate) async fn bounded_each<I, F, Fut>(location: &str, items: I, mut work: F) -> Result<(), StorageError>
where
    I: IntoIterator,
    F: FnMut(I::Item) -> Fut,
    Fut: std::future::Future<Output = Result<(), StorageError>> + Send + 'static,
{
    let joined = |done: Result<Result<(), StorageError>, tokio::task::JoinError>| {
        done.unwrap_or_else(|e| {
            let message = format!("a delete task failed: {e}");
            Err(StorageError::Other { location: location.to_owned(), message, retryable: false })
        })
    };
    let mut running = tokio::task::JoinSet::new();
    for item in items {
        if running.len() >= DELETE_CONCURRENCY
            && let Some(done) = running.join_next().await
        {
            joined(done)?;
        }
        running.spawn(work(item));
    }
    while let Some(done) = running.join_next().await {
        joined(done)?;
    }
    Ok(())
}

/// Directories at depth 2 or more that stay even when empty: the history files' home is never
/// expired, and a directory that comes and goes there buys nothing.
const KEPT_DIRECTORIES: [&str; 1] = ["wal/history"];

/// Whether [`Storage::delete_many`] may remove the directory `dir_key` (relative to the root) once
/// it is empty. Never the root nor a directory at depth 1 (`wal/`, `backups/`, `catalog/`): they
/// are the repository's layout, and a writer that finds one missing would have to create it again
/// under the feet of another. Nor those in [`KEPT_DIRECTORIES`].
pub(crate) fn may_remove_dir(dir_key: &str) -> bool {
    dir_key.contains('/') && !KEPT_DIRECTORIES.contains(&dir_key)
}

/// The distinct directories (relative to the root, `""` for the root) that hold `keys`, deepest
/// first in the sense that every directory comes before its ancestors: the order in which emptied
/// directories can be removed.
pub(crate) fn parent_dirs(keys: &[String]) -> Vec<String> {
    let parents: std::collections::BTreeSet<&str> = keys.iter().map(|key| parent_dir_key(key)).collect();
    parents.into_iter().rev().map(str::to_owned).collect()
}

/// The directory that holds `dir_key` (relative to the root; `""` is the root).
pub(crate) fn parent_dir_key(dir_key: &str) -> &str {
    dir_key.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// An object being written. Dropping it without [`commit`](Self::commit) discards it.
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends `chunk`; nothing becomes visible before [`commit`](Self::commit).
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError>;

    /// Publishes the object durably if nothing exists under its key, else fails with
    /// [`StorageError::AlreadyExists`] and leaves the existing object untouched.
    async fn commit(self: Box<Self>) -> Result<(), StorageError>;

    /// Discards what was written.
    async fn abort(self: Box<Self>) -> Result<(), StorageError>;
}

/// Why a storage operation failed. Every variant names the object, so that a message says where.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend is certain that nothing is stored under the key.
    #[error("{location}: not found")]
    NotFound {
        /// Where: the object as [`Storage::location`] names it.
        location: String,
    },
    /// A create-if-absent commit found the key taken.
    #[error("{location}: already exists")]
    AlreadyExists {
        /// Where: the object as [`Storage::location`] names it.
        location: String,
    },
    /// The key is not a relative path of plain components ([`validate_key`]).
    #[error("{location}: invalid key: {reason}")]
    InvalidKey {
        /// Where: the object as [`Storage::location`] names it.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file-system or network call failed.
    #[error("{location}: {operation}: {source}")]
    Io {
        /// Where: the object as [`Storage::location`] names it.
        location: String,
        /// The call, in words (`"fsync directory"`).
        operation: &'static str,
        /// What the system said.
        source: io::Error,
    },
    /// Anything else, with the backend's judgement of whether trying again may help.
    #[error("{location}: {message}")]
    Other {
        /// Where: the object as [`Storage::location`] names it.
        location: String,
        /// What went wrong and, where known, what to do about it.
        message: String,
        /// Whether the same call may succeed if tried again shortly.
        retryable: bool,
    },
}

impl StorageError {
    /// A [`StorageError::Io`] for the call `operation` on `location`.
    pub fn io(location: impl Into<String>, operation: &'static str, source: io::Error) -> Self {
        StorageError::Io { location: location.into(), operation, source }
    }

    /// Whether the backend is certain the object is absent.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }

    /// Whether the same call may succeed if tried again shortly.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => io_error_is_transient(source),
            StorageError::Other { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// What one look at a path found: `lstat` (the path itself) or `stat` (following symbolic links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    Missing,
    Directory,
    File,
    Symlink,
    /// A device, FIFO or socket.
    Special,
}

impl PathKind {
    fn label(self) -> &'static str {
        match self {
            PathKind::Missing => "missing",
            PathKind::Directory => "a directory",
            PathKind::File => "a regular file",
            PathKind::Symlink => "a symbolic link",
            PathKind::Special => "a device, FIFO or socket",
        }
    }
}

/// Looks at paths of a backend that keeps objects as files (local disk, SFTP).
#[async_trait]
pub(crate) trait PathProbe: Send + Sync {
    /// `lstat` (`follow_links` false) or `stat` of `path`; [`PathKind::Missing`] only when the backend
    /// says "no such file", any other failure is an error.
    async fn probe(&self, path: &std::path::Path, follow_links: bool) -> Result<PathKind, StorageError>;
}

/// Decides whether `path` (`root` joined with a key) is really absent after a lookup of it (`wanted`
/// is [`PathKind::File`] or [`PathKind::Directory`]) said "no such file". That answer alone is not
/// proof: OpenSSH's sftp-server (`errno_to_portable`) reports ENOTDIR, ELOOP and EBADF with the same
/// SSH2_FX_NO_SUCH_FILE status as ENOENT, and on any file system ENOENT also comes from a dangling
/// symbolic link or an ancestor that is one. So the path itself must be missing (`lstat`), and the
/// nearest ancestor that exists must be a directory: then the name is missing from a directory that
/// could hold it. Returns [`StorageError::NotFound`] only then; otherwise an error that says what is
/// in the way, for a person to look at.
pub(crate) async fn confirm_absent(
    probe: &dyn PathProbe,
    root: &std::path::Path,
    path: &std::path::Path,
    wanted: PathKind,
    location: String,
) -> StorageError {
    let in_the_way =
        |message: String, retryable: bool| StorageError::Other { location: location.clone(), message, retryable };
    match probe.probe(path, false).await {
        Ok(PathKind::Missing) => {}
        Ok(kind) => {
            let kind = match kind {
                PathKind::Symlink => match probe.probe(path, true).await {
                    Ok(PathKind::Missing) => {
                        return in_the_way("is a symbolic link that leads nowhere (dangling, or a loop)".into(), false);
                    }
                    Ok(target) => target,
                    Err(e) => return e,
                },
                kind => kind,
            };
            return if kind == wanted {
                // Created between the lookup and this look (a push racing the fetch): another try finds it.
                in_the_way("appeared while it was being opened".into(), true)
            } else {
                in_the_way(format!("is {}, not {}", kind.label(), wanted.label()), false)
            };
        }
        Err(e) => return e,
    }
    for ancestor in path.ancestors().skip(1).filter(|a| a.starts_with(root)) {
        let kind = match probe.probe(ancestor, false).await {
            Ok(PathKind::Missing) => continue,
            // A link to a directory is a directory for every lookup below it.
            Ok(PathKind::Symlink) => match probe.probe(ancestor, true).await {
                Ok(kind) => kind,
                Err(e) => return e,
            },
            Ok(kind) => kind,
            Err(e) => return e,
        };
        return match kind {
            PathKind::Directory => StorageError::NotFound { location },
            PathKind::Missing => {
                in_the_way(format!("{} is a symbolic link that leads nowhere", ancestor.display()), false)
            }
            other => in_the_way(format!("{} is {}, not a directory", ancestor.display(), other.label()), false),
        };
    }
    // Not even the repository's root is there: the file is absent, and the identity check that must
    // precede any "absent" answer reports the missing root.
    StorageError::NotFound { location }
}

/// A streaming read over a network connection. A connection that breaks mid-body surfaces as an I/O
/// error of a kind the retry logic treats as transient, whatever kind the transport gave it, and
/// marks the connection `broken` (where the backend keeps one) so that a retry connects anew.
pub(crate) struct NetworkRead {
    inner: std::pin::Pin<Box<dyn AsyncRead + Send>>,
    broken: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl NetworkRead {
    pub(crate) fn new(
        inner: impl AsyncRead + Send + 'static,
        broken: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Self {
        NetworkRead { inner: Box::pin(inner), broken }
    }
}

impl AsyncRead for NetworkRead {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.inner.as_mut().poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) => {
                if let Some(broken) = &self.broken {
                    broken.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let e = if io_error_is_transient(&e) { e } else { io::Error::new(io::ErrorKind::ConnectionAborted, e) };
                std::task::Poll::Ready(Err(e))
            }
            other => other,
        }
    }
}

/// Network file systems and connections report passing trouble with these; everything else
/// (permissions, a full disk, a missing directory) needs a person.
pub fn io_error_is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    ) || error.raw_os_error() == Some(libc::ESTALE)
}

/// A temporary file untouched for this long belongs to a process that died: no live write leaves its
/// file alone that long.
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether the directory entry `name`, last modified at `modified`, is a temporary file left by a
/// writer that died (hidden, `.tmp`, older than [`STALE_TEMP_AGE`]). For backends that keep
/// temporary files beside their objects (local, SSH).
pub(crate) fn is_stale_temp(name: &str, modified: Option<std::time::SystemTime>, now: std::time::SystemTime) -> bool {
    is_temp_older_than(name, modified, now, STALE_TEMP_AGE)
}

/// Whether `name`, last modified at `modified`, is a temporary file untouched for more than `age`.
/// An unknown time or one in the future is a file being written.
pub(crate) fn is_temp_older_than(
    name: &str,
    modified: Option<std::time::SystemTime>,
    now: std::time::SystemTime,
    age: std::time::Duration,
) -> bool {
    crate::fs::is_temp_name(name)
        && modified.is_some_and(|modified| now.duration_since(modified).is_ok_and(|untouched| untouched > age))
}

/// A directory entry as a listing sees it.
pub(crate) struct DirEntryInfo {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// What a listing walk does next, in key order.
pub(crate) enum ListStep {
    /// Walk the subdirectory with this key.
    Descend(String),
    /// List this object.
    Emit(ObjectMeta),
}

/// Orders the entries of directory `dir_key` by the keys they stand for (a directory's keys all
/// continue with '/') and decides, for `prefix` and `start_after`, which subdirectories may hold
/// keys to list and which files are listed. Hidden (temporary) names are skipped. Shared by the
/// backends that walk directories, so that they list in the same order as S3.
pub(crate) fn listing_steps(
    dir_key: &str,
    entries: Vec<DirEntryInfo>,
    prefix: &str,
    start_after: Option<&str>,
) -> Vec<ListStep> {
    let mut children: Vec<(String, String, DirEntryInfo)> = entries
        .into_iter()
        .filter(|entry| !entry.name.starts_with('.'))
        .map(|entry| {
            let key = if dir_key.is_empty() { entry.name.clone() } else { format!("{dir_key}/{}", entry.name) };
            let sort_key = if entry.is_dir { format!("{key}/") } else { key.clone() };
            (sort_key, key, entry)
        })
        .collect();
    children.sort_by(|a, b| a.0.cmp(&b.0));
    children
        .into_iter()
        // Skip subtrees that cannot hold a key with the prefix or after `start_after`.
        .filter(|(sort_key, _, _)| sort_key.starts_with(prefix) || prefix.starts_with(sort_key.as_str()))
        .filter_map(|(sort_key, key, entry)| {
            if entry.is_dir {
                let all_listed =
                    start_after.is_some_and(|after| !after.starts_with(&sort_key) && after > sort_key.as_str());
                (!all_listed).then_some(ListStep::Descend(key))
            } else if key.starts_with(prefix) && start_after.is_none_or(|after| key.as_str() > after) {
                Some(ListStep::Emit(ObjectMeta {
                    key,
                    size: entry.size,
                    attributes: BTreeMap::new(),
                    modified: entry.modified,
                }))
            } else {
                None
            }
        })
        .collect()
}

/// Checks that a key is a relative path of plain components: no empty, `.` or `..` components, no
/// component starting with `.` (reserved for temporary files), no backslash or NUL.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    if key.contains('\\') || key.contains('\0') {
        return Err("backslash or NUL in key".into());
    }
    for component in key.split('/') {
        if component.is_empty() {
            return Err("empty path component (leading, trailing or doubled '/')".into());
        }
        if component.starts_with('.') {
            return Err(format!("component {component:?} starts with '.'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        validate_key("wal/0000000100000000/000000010000000000000001").unwrap();
        validate_key("repository.json").unwrap();
        for bad in ["", "/etc/passwd", "wal/../x", "..", "wal//x", "wal/", "wal/.tmp", "a\\b", "a\0b"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A temporary file an older walship left in a repository (`.<file>.<pid>.<nanos>.tmp` in the
    /// backends, `.<file>.walship.<pid>.tmp` elsewhere) is skipped by listings and swept when stale,
    /// like one of today's names.
    #[test]
    fn temp_files_under_old_and_new_names_are_skipped_and_swept_when_stale() {
        let now = std::time::SystemTime::now();
        let old = now - STALE_TEMP_AGE - std::time::Duration::from_secs(1);
        let names = [
            ".000000010000000000000001.123.1764590000000000000.tmp".to_owned(),
            ".000000010000000000000001.walship.123.tmp".to_owned(),
            crate::fs::temp_name("000000010000000000000001"),
        ];
        for name in &names {
            assert!(is_stale_temp(name, Some(old), now), "{name}");
            assert!(!is_stale_temp(name, Some(now), now), "{name}: a fresh one is being written");
        }
        let mut entries: Vec<DirEntryInfo> = names
            .iter()
            .map(|name| DirEntryInfo { name: name.clone(), is_dir: false, size: 1, modified: None })
            .collect();
        entries.push(DirEntryInfo { name: "000000010000000000000001".into(), is_dir: false, size: 1, modified: None });
        let listed: Vec<String> = listing_steps("wal/x", entries, "wal/", None)
            .into_iter()
            .filter_map(|step| match step {
                ListStep::Emit(meta) => Some(meta.key),
                ListStep::Descend(_) => None,
            })
            .collect();
        assert_eq!(listed, ["wal/x/000000010000000000000001"]);
    }

    /// Expiry removes emptied directories from the deepest up, but never the repository's layout
    /// (the root, `wal/`, `backups/`, `catalog/`) nor the history files' directory.
    #[test]
    fn emptied_directories_go_deepest_first_but_never_the_layout() {
        for kept in ["", "wal", "backups", "catalog", "wal/history"] {
            assert!(!may_remove_dir(kept), "{kept:?} may be removed");
        }
        for removable in ["wal/0000000100000000", "backups/b1", "backups/b1/sub", "wal/history/x"] {
            assert!(may_remove_dir(removable), "{removable:?} is kept");
        }
        let keys: Vec<String> =
            ["backups/b1/x", "top", "backups/b1/sub/y", "wal/0000000100000000/a", "backups/b1/z", "backups/b1-2/w"]
                .map(str::to_owned)
                .into();
        let dirs = parent_dirs(&keys);
        assert_eq!(dirs, ["wal/0000000100000000", "backups/b1/sub", "backups/b1-2", "backups/b1", ""]);
        assert_eq!(parent_dir_key("backups/b1/sub"), "backups/b1");
        assert_eq!(parent_dir_key("wal"), "");
    }

    /// A temporary file is stale only when its time is known and older than the age: a time in the
    /// future (a clock step) is a file being written.
    #[test]
    fn only_temp_files_older_than_the_age_are_stale() {
        let now = std::time::SystemTime::now();
        let age = std::time::Duration::from_secs(60);
        let name = crate::fs::temp_name("part");
        assert!(is_temp_older_than(&name, Some(now - age * 2), now, age));
        assert!(!is_temp_older_than(&name, Some(now - age / 2), now, age));
        assert!(!is_temp_older_than(&name, Some(now + age), now, age), "a time in the future");
        assert!(!is_temp_older_than(&name, None, now, age), "an unknown time");
        assert!(!is_temp_older_than("part", Some(now - age * 2), now, age), "not a temporary name");
    }

    #[test]
    fn only_passing_trouble_is_retryable() {
        let e = |kind| StorageError::io("x", "read", io::Error::from(kind));
        assert!(e(io::ErrorKind::TimedOut).is_retryable());
        assert!(!e(io::ErrorKind::PermissionDenied).is_retryable());
        assert!(!StorageError::NotFound { location: "x".into() }.is_retryable());
        assert!(StorageError::io("x", "read", io::Error::from_raw_os_error(libc::ESTALE)).is_retryable());
        assert!(e(io::ErrorKind::ConnectionAborted).is_retryable(), "a download broken off midway");
        assert!(e(io::ErrorKind::UnexpectedEof).is_retryable());
    }
}
