//! A repository in a local (or mounted) directory.
//!
//! Publishing: the bytes go to a hidden temporary file in the object's own directory, which is
//! fsynced, then linked to the final name with link(2), which fails if the name exists, so no object is
//! ever replaced. Where the file system has no hard links, renameat2(RENAME_NOREPLACE) gives the same
//! guarantee. The directory is fsynced afterwards, so the name survives a crash once `commit` returns.
//!
//! Temporary files start with `.` and end in `.tmp`: readers and listings skip them. One left by a
//! killed process is removed by a later commit into the same directory once it is an hour old; no
//! live write leaves a file untouched for that long; housekeeping (`remove_stale`) walks the whole
//! repository for them.
//!
//! Batch deletes (expiry) remove the directories they emptied, never the layout's own, and fsync each
//! directory that lost entries once, so that a crash cannot bring back a deleted name after a later
//! delete that depended on it (a backup's parts after its catalog record) became durable.
//!
//! File operations run on tokio's blocking pool so that a command's deadline still fires when a
//! network file system hangs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    DELETE_CONCURRENCY, DirEntryInfo, Housekeeping, ListResult, ListStep, ObjectMeta, ObjectReader, ObjectWriter,
    PathKind, PathProbe, PutOptions, Storage, StorageError, confirm_absent, is_stale_temp, is_temp_older_than,
    listing_steps, may_remove_dir, parent_dir_key, parent_dirs, validate_key,
};
use crate::fs::{fsync_dir, is_temp_name, temp_name};

pub use super::STALE_TEMP_AGE;

/// A repository in a directory of this host's file system.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Opens the repository at `root`, which must be an existing directory: creating it on the fly
    /// would hide a typo or an unmounted file system behind a fresh, empty repository.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        let location = format!("file://{}", root.display());
        match fs::metadata(&root) {
            Ok(meta) if meta.is_dir() => Ok(LocalStorage { root }),
            Ok(_) => Err(StorageError::Other {
                location,
                message: "the repository path is not a directory".into(),
                retryable: false,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::Other {
                location,
                message: "the repository directory does not exist (create it, writable by the \
                          PostgreSQL server's user)"
                    .into(),
                retryable: false,
            }),
            Err(e) => Err(StorageError::io(location, "stat", e)),
        }
    }

    /// The repository's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key).map_err(|reason| StorageError::InvalidKey { location: self.location(key), reason })?;
        Ok(self.root.join(key))
    }
}

async fn blocking<T: Send + 'static>(
    location: &str,
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|join_error| {
        Err(StorageError::Other {
            location: location.to_owned(),
            message: format!("file operation panicked: {join_error}"),
            retryable: false,
        })
    })
}

#[async_trait]
impl Storage for LocalStorage {
    fn location(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }

    async fn create(&self, key: &str, _options: PutOptions) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let final_path = self.path_of(key)?;
        let location = self.location(key);
        let root = self.root.clone();
        blocking(&location.clone(), move || {
            let dir = final_path.parent().expect("a key has a parent directory").to_owned();
            let file_name = final_path.file_name().expect("a key has a file name").to_string_lossy();
            let temp_path = dir.join(temp_name(&file_name));
            let file = create_temp_file(&root, &dir, &temp_path, &location)?;
            Ok(Box::new(LocalWriter { file: Some(file), temp_path, final_path, dir, location })
                as Box<dyn ObjectWriter>)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let path = self.path_of(key)?;
        let location = self.location(key);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Box::new(file)),
            // ENOENT also comes from a dangling symbolic link on the way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(confirm_absent(self, &self.root, &path, PathKind::File, location).await)
            }
            Err(e) => Err(StorageError::io(location, "open", e)),
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError> {
        let path = self.path_of(key)?;
        let location = self.location(key);
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(ObjectMeta {
                key: key.to_owned(),
                size: meta.len(),
                attributes: Default::default(),
                modified: meta.modified().ok(),
            }),
            Ok(_) => Err(StorageError::Other { location, message: "not a regular file".into(), retryable: false }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(confirm_absent(self, &self.root, &path, PathKind::File, location).await)
            }
            Err(e) => Err(StorageError::io(location, "stat", e)),
        }
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> ListResult {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        let location = self.location(&prefix);
        blocking(&location.clone(), move || {
            list_sorted(&root, &prefix, start_after.as_deref(), limit)
                .map_err(|e| StorageError::io(location, "list", e))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        let location = self.location(key);
        blocking(&location.clone(), move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StorageError::NotFound { location }),
                Err(e) => return Err(StorageError::io(location, "delete", e)),
            }
            let dir = path.parent().expect("a key has a parent directory");
            fsync_dir(dir).map_err(|e| StorageError::io(location, "fsync directory", e))
        })
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<u64, StorageError> {
        let files =
            keys.iter().map(|key| Ok((self.path_of(key)?, self.location(key)))).collect::<Result<Vec<_>, _>>()?;
        let (root, dirs) = (self.root.clone(), parent_dirs(keys));
        // One blocking task for the whole batch, with its own few threads: a task per file made
        // tokio's blocking pool grow with the length of a run (benches/expire.sh: 24 threads at
        // 10,000 objects, 37 at 300,000), and memory with it.
        blocking(&self.location(""), move || {
            remove_files_in_parallel(&files)?;
            prune_and_sync(&root, &dirs)
        })
        .await?;
        Ok(keys.len() as u64)
    }

    async fn remove_stale(&self, older_than: std::time::Duration) -> Result<Housekeeping, StorageError> {
        let now = SystemTime::now();
        let mut found = Housekeeping::default();
        // Directories still to visit: the walk never holds more than these and one directory's
        // subdirectories, however many objects the repository has.
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let is_root = dir == self.root;
            let location = format!("file://{}", dir.display());
            let swept =
                blocking(&location.clone(), move || sweep_dir(&dir, is_root, now, older_than, &location)).await?;
            found.temp_files += swept.temp_files;
            found.temp_bytes += swept.temp_bytes;
            pending.extend(swept.subdirs);
        }
        Ok(found)
    }

    async fn make_durable(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        let location = self.location(key);
        let root = self.root.clone();
        blocking(&location.clone(), move || {
            // fsync works on a descriptor opened read-only, so an archive made read-only still works.
            File::open(&path).and_then(|file| file.sync_all()).map_err(|e| StorageError::io(&location, "fsync", e))?;
            // Every directory up to the root: a push killed between creating a directory and fsyncing
            // its parent left an entry that only the next fsync of that parent makes durable.
            for dir in path.ancestors().skip(1).filter(|dir| dir.starts_with(&root)) {
                fsync_dir(dir)
                    .map_err(|e| StorageError::io(format!("file://{}", dir.display()), "fsync directory", e))?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_incomplete(&self, prefix: &str) -> Result<(), StorageError> {
        let dir = self.path_of(prefix.trim_end_matches('/'))?;
        let location = self.location(prefix);
        blocking(&location.clone(), move || {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(StorageError::io(&location, "read directory", e)),
            };
            for entry in entries.flatten() {
                if is_temp_name(&entry.file_name().to_string_lossy()) {
                    fs::remove_file(entry.path())
                        .map_err(|e| StorageError::io(&location, "remove temporary file", e))?;
                }
            }
            // Empty now if nothing was ever published there; otherwise the caller deletes the objects.
            let _ = fs::remove_dir(&dir);
            Ok(())
        })
        .await
    }

    async fn check_root(&self) -> Result<(), StorageError> {
        LocalStorage::open(&self.root).map(|_| ())
    }
}

#[async_trait]
impl PathProbe for LocalStorage {
    async fn probe(&self, path: &Path, follow_links: bool) -> Result<PathKind, StorageError> {
        let meta = if follow_links { tokio::fs::metadata(path).await } else { tokio::fs::symlink_metadata(path).await };
        match meta {
            Ok(meta) => Ok(path_kind(meta.file_type())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PathKind::Missing),
            Err(e) => Err(StorageError::io(format!("file://{}", path.display()), "stat", e)),
        }
    }
}

/// Creates the temporary file `temp_path` in `dir`, and first `dir` and its missing parents below
/// `root` where they are missing, then fsyncs each directory that gained an entry. An expiry removes
/// the directories its deletes emptied, so an empty directory may vanish before the file is in it:
/// the directories are made again (up to a bound), and the fsyncs wait until the file is there, so that
/// the window between a directory's creation and the file's is one system call wide. Once the file is
/// in it, the directory stays. A pass that created nothing cannot help (a dangling link is in the
/// way): the failure is reported.
fn create_temp_file(root: &Path, dir: &Path, temp_path: &Path, location: &str) -> Result<File, StorageError> {
    const ATTEMPTS: usize = 50;
    let (mut gained, mut attempt, mut last_pass_created) = (Vec::new(), 1, true);
    let file = loop {
        match OpenOptions::new().write(true).create_new(true).open(temp_path) {
            Ok(file) => break file,
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < ATTEMPTS && last_pass_created => {
                attempt += 1;
                let before = gained.len();
                create_dirs_below(root, dir, &mut gained)
                    .map_err(|e| StorageError::io(location, "create directory", e))?;
                last_pass_created = gained.len() > before;
            }
            Err(e) => return Err(StorageError::io(location, "create temporary file", e)),
        }
    };
    gained.sort();
    gained.dedup();
    for parent in &gained {
        fsync_dir(parent).map_err(|e| StorageError::io(location, "fsync directory", e))?;
    }
    Ok(file)
}

/// Creates `dir` and its missing parents, but never `root` itself (a missing root is an unmounted or
/// mistyped repository, not one to make afresh), and notes in `gained` each directory that gained an
/// entry, for the caller to fsync.
fn create_dirs_below(root: &Path, dir: &Path, gained: &mut Vec<PathBuf>) -> io::Result<()> {
    if dir == root || dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().expect("below the root");
    create_dirs_below(root, parent, gained)?;
    match fs::create_dir(dir) {
        Ok(()) => {
            gained.push(parent.to_owned());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes `files` (path, location) on [`DELETE_CONCURRENCY`] threads at most; stops at the first
/// failure, which it returns.
fn remove_files_in_parallel(files: &[(PathBuf, String)]) -> Result<(), StorageError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..DELETE_CONCURRENCY.min(files.len()) {
            scope.spawn(|| {
                while let Some((path, location)) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = remove_file_if_present(path, location.clone()) {
                        failed.lock().expect("not poisoned").get_or_insert(e);
                        // Every thread stops at its next file.
                        next.store(files.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    failed.into_inner().expect("not poisoned").map_or(Ok(()), Err)
}

/// Removes the file at `path`; one already gone counts as removed (another expiry got there first).
fn remove_file_if_present(path: &Path, location: String) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io(location, "delete", e)),
    }
}

/// After a batch of deletes: removes the directories in `dirs` (relative to `root`, each before its
/// ancestors) that the deletes emptied, and their ancestors that became empty in turn, as far as
/// [`may_remove_dir`] allows; then fsyncs, once each, every directory that lost entries. Every
/// directory of the batch is fsynced, also where a key was already absent: a concurrent run may have
/// unlinked it without an fsync yet, and our caller goes on (to a backup's parts after its catalog
/// record) believing the removal durable. A directory that is not empty (a writer just put something
/// there) stays; nothing is ever removed recursively.
fn prune_and_sync(root: &Path, dirs: &[String]) -> Result<(), StorageError> {
    let location = |dir: &str| format!("file://{}", root.join(dir).display());
    let mut to_sync: std::collections::BTreeSet<String> = dirs.iter().cloned().collect();
    for dir in dirs {
        let mut current = dir.as_str();
        while may_remove_dir(current) {
            match fs::remove_dir(root.join(current)) {
                // Gone already counts as removed: a concurrent run emptied it first.
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST | libc::EBUSY)) => break,
                Err(e) => return Err(StorageError::io(location(current), "remove emptied directory", e)),
            }
            to_sync.remove(current);
            current = parent_dir_key(current);
            to_sync.insert(current.to_owned());
        }
    }
    for dir in &to_sync {
        match fsync_dir(&root.join(dir)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(location(dir), "fsync directory", e)),
        }
    }
    Ok(())
}

/// What [`sweep_dir`] found in one directory.
struct Swept {
    temp_files: u64,
    temp_bytes: u64,
    subdirs: Vec<PathBuf>,
}

/// Removes the temporary files in `dir` untouched for more than `older_than`, and names its
/// subdirectories for the walk to visit. Symbolic links are neither followed nor removed. A directory
/// that vanished meanwhile (an expiry emptied and removed it) holds nothing; the root must be there.
fn sweep_dir(
    dir: &Path,
    is_root: bool,
    now: SystemTime,
    older_than: std::time::Duration,
    location: &str,
) -> Result<Swept, StorageError> {
    let mut swept = Swept { temp_files: 0, temp_bytes: 0, subdirs: Vec::new() };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !is_root => return Ok(swept),
        Err(e) => return Err(StorageError::io(location, "read directory", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io(location, "read directory", e))?;
        // lstat: a link is looked at, never through.
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::io(location, "stat", e)),
        };
        if meta.is_dir() {
            swept.subdirs.push(entry.path());
        } else if meta.is_file()
            && is_temp_older_than(&entry.file_name().to_string_lossy(), meta.modified().ok(), now, older_than)
        {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    swept.temp_files += 1;
                    swept.temp_bytes += meta.len();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    let location = format!("file://{}", entry.path().display());
                    return Err(StorageError::io(location, "remove temporary file", e));
                }
            }
        }
    }
    Ok(swept)
}

fn path_kind(file_type: fs::FileType) -> PathKind {
    if file_type.is_dir() {
        PathKind::Directory
    } else if file_type.is_file() {
        PathKind::File
    } else if file_type.is_symlink() {
        PathKind::Symlink
    } else {
        PathKind::Special
    }
}

struct LocalWriter {
    file: Option<File>,
    temp_path: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
    location: String,
}

impl LocalWriter {
    fn take_file(&mut self) -> Result<File, StorageError> {
        self.file.take().ok_or_else(|| StorageError::Other {
            location: self.location.clone(),
            message: "writer used after an earlier failure".into(),
            retryable: false,
        })
    }
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        let mut file = self.take_file()?;
        let location = self.location.clone();
        let file = blocking(&location.clone(), move || {
            file.write_all(&chunk).map_err(|e| StorageError::io(location, "write", e))?;
            Ok(file)
        })
        .await?;
        self.file = Some(file);
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        let file = self.take_file()?;
        let location = self.location.clone();
        // The writer travels with the work: its Drop removes the temporary file if it is still there,
        // which after a successful publish it is not.
        blocking(&location, move || publish(file, &self.temp_path, &self.final_path, &self.dir, &self.location)).await
    }

    async fn abort(self: Box<Self>) -> Result<(), StorageError> {
        let location = self.location.clone();
        blocking(&location, move || {
            drop(self);
            Ok(())
        })
        .await
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        drop(self.file.take());
        let _ = fs::remove_file(&self.temp_path);
    }
}

fn publish(file: File, temp_path: &Path, final_path: &Path, dir: &Path, location: &str) -> Result<(), StorageError> {
    let result = (|| {
        file.sync_all().map_err(|e| StorageError::io(location, "fsync", e))?;
        drop(file);
        match fs::hard_link(temp_path, final_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StorageError::AlreadyExists { location: location.to_owned() });
            }
            Err(e) if link_unsupported(&e) => {
                return match rename_noreplace(temp_path, final_path) {
                    Ok(()) => fsync_dir(dir).map_err(|e| StorageError::io(location, "fsync directory", e)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        Err(StorageError::AlreadyExists { location: location.to_owned() })
                    }
                    Err(e) => Err(StorageError::io(location, "publish (renameat2 RENAME_NOREPLACE)", e)),
                };
            }
            Err(e) => return Err(StorageError::io(location, "publish (link)", e)),
        }
        let _ = fs::remove_file(temp_path);
        fsync_dir(dir).map_err(|e| StorageError::io(location, "fsync directory", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(temp_path);
    }
    remove_stale_temp_files(dir);
    result
}

fn link_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EOPNOTSUPP) | Some(libc::EXDEV))
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Best effort: a failure here never fails the commit that triggered it.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let modified = entry.metadata().and_then(|m| m.modified()).ok();
        if is_stale_temp(&entry.file_name().to_string_lossy(), modified, now) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Lists keys in lexicographic order by walking directories in sorted order. Only one directory's
/// entries are held at a time, plus at most `limit` results.
fn list_sorted(root: &Path, prefix: &str, start_after: Option<&str>, limit: usize) -> io::Result<Vec<ObjectMeta>> {
    let mut found = Vec::new();
    // The deepest directory that contains every key with this prefix.
    let base = match prefix.rfind('/') {
        Some(slash) => &prefix[..slash],
        None => "",
    };
    walk(root, base, prefix, start_after, limit, &mut found)?;
    Ok(found)
}

fn walk(
    root: &Path,
    dir_key: &str,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
    found: &mut Vec<ObjectMeta>,
) -> io::Result<()> {
    let dir = if dir_key.is_empty() { root.to_owned() } else { root.join(dir_key) };
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut infos = Vec::new();
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        infos.push(DirEntryInfo {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_dir: meta.is_dir(),
            size: meta.len(),
            modified: meta.modified().ok(),
        });
    }
    for step in listing_steps(dir_key, infos, prefix, start_after) {
        if found.len() >= limit {
            break;
        }
        match step {
            ListStep::Descend(key) => walk(root, &key, prefix, start_after, limit, found)?,
            ListStep::Emit(meta) => found.push(meta),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn put(storage: &LocalStorage, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let mut writer = storage.create(key, PutOptions::default()).await?;
        writer.write(Bytes::copy_from_slice(bytes)).await?;
        writer.commit().await
    }

    async fn read(storage: &LocalStorage, key: &str) -> Vec<u8> {
        let mut out = Vec::new();
        storage.get(key).await.unwrap().read_to_end(&mut out).await.unwrap();
        out
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn create_if_absent_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        put(&storage, "wal/a/x", b"first").await.unwrap();
        let err = put(&storage, "wal/a/x", b"second").await.unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists { .. }), "{err}");
        assert_eq!(read(&storage, "wal/a/x").await, b"first");
        assert_eq!(entries(&dir.path().join("wal/a")), ["x"], "no temporary file left behind");
    }

    #[tokio::test]
    async fn nothing_is_visible_before_commit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        let mut writer = storage.create("k/obj", PutOptions::default()).await.unwrap();
        writer.write(Bytes::from_static(b"partial")).await.unwrap();
        assert!(matches!(storage.get("k/obj").await, Err(e) if e.is_not_found()));
        assert!(storage.list("", None, 10).await.unwrap().is_empty(), "temp files are not listed");
        writer.abort().await.unwrap();
        assert!(entries(&dir.path().join("k")).is_empty());
        let writer = storage.create("k/obj", PutOptions::default()).await.unwrap();
        drop(writer);
        assert!(entries(&dir.path().join("k")).is_empty(), "a dropped writer cleans up");
    }

    #[tokio::test]
    async fn stale_temp_files_are_swept_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        fs::create_dir_all(dir.path().join("k")).unwrap();
        let stale = dir.path().join("k/.dead.123.1.tmp");
        let fresh = dir.path().join("k/.alive.456.1.tmp");
        fs::write(&stale, b"x").unwrap();
        fs::write(&fresh, b"x").unwrap();
        let old = SystemTime::now() - STALE_TEMP_AGE - std::time::Duration::from_secs(60);
        File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        put(&storage, "k/obj", b"data").await.unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists());
    }

    #[tokio::test]
    async fn missing_is_not_found_but_traversal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        assert!(matches!(storage.get("wal/none").await, Err(e) if e.is_not_found()));
        assert!(storage.head("wal/none").await.unwrap_err().is_not_found());
        for key in ["../escape", "/etc/passwd", "wal/./x"] {
            assert!(matches!(storage.get(key).await, Err(StorageError::InvalidKey { .. })), "{key}");
            assert!(matches!(storage.create(key, PutOptions::default()).await, Err(StorageError::InvalidKey { .. })));
        }
    }

    #[tokio::test]
    async fn only_a_name_missing_from_a_real_directory_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        put(&storage, "wal/a/x", b"x").await.unwrap();
        fs::write(dir.path().join("wal/b"), b"a file where a directory belongs").unwrap();
        std::os::unix::fs::symlink("/nonexistent/walship", dir.path().join("wal/a/dangling")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/walship", dir.path().join("wal/c")).unwrap();
        std::os::unix::fs::symlink("loop", dir.path().join("wal/a/loop")).unwrap();
        assert!(matches!(storage.get("wal/a/missing").await, Err(e) if e.is_not_found()));
        assert!(storage.head("wal/none/missing").await.unwrap_err().is_not_found(), "a missing shard is absence");
        for key in ["wal/b/x", "wal/a/dangling", "wal/c/x", "wal/a/loop"] {
            let Err(err) = storage.get(key).await else { panic!("{key} opened") };
            assert!(!err.is_not_found() && !err.is_retryable(), "{key}: {err}");
            let err = storage.head(key).await.unwrap_err();
            assert!(!err.is_not_found(), "head {key}: {err}");
        }
    }

    #[test]
    fn a_missing_root_is_an_error_not_an_empty_repository() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalStorage::open(dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!err.is_not_found());
    }

    #[tokio::test]
    async fn listing_is_sorted_paged_and_prefixed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        for key in ["wal/b/2", "wal/a/1", "wal/a/3", "wal/a-x", "wal/c", "other/z", "wal/a/2"] {
            put(&storage, key, key.as_bytes()).await.unwrap();
        }
        let keys = |page: Vec<ObjectMeta>| page.into_iter().map(|m| m.key).collect::<Vec<_>>();
        assert_eq!(
            keys(storage.list("wal/", None, 100).await.unwrap()),
            ["wal/a-x", "wal/a/1", "wal/a/2", "wal/a/3", "wal/b/2", "wal/c"]
        );
        assert_eq!(keys(storage.list("wal/a/", None, 2).await.unwrap()), ["wal/a/1", "wal/a/2"]);
        assert_eq!(keys(storage.list("wal/", Some("wal/a/2"), 3).await.unwrap()), ["wal/a/3", "wal/b/2", "wal/c"]);
        assert_eq!(keys(storage.list("wal/a/", Some("wal/a/3"), 3).await.unwrap()), Vec::<String>::new());
        assert_eq!(keys(storage.list("nothing/", None, 3).await.unwrap()), Vec::<String>::new());
        storage.delete("wal/c").await.unwrap();
        assert!(storage.delete("wal/c").await.unwrap_err().is_not_found());
    }

    /// A batch delete takes absent keys for deleted ones (a second run over the same keys succeeds),
    /// removes the directories it emptied from the deepest up, and leaves a directory that still holds
    /// something, the depth-1 layout directories, `wal/history` and the root.
    #[tokio::test]
    async fn delete_many_prunes_only_what_it_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        let doomed: Vec<String> =
            ["wal/0000000100000000/a", "wal/0000000100000001/b", "backups/b1/sub/p", "backups/b1/q", "catalog/c"]
                .into_iter()
                .chain(["wal/history/00000002.history", "top"])
                .map(str::to_owned)
                .collect();
        for key in doomed.iter().chain(&["wal/0000000100000001/stays".to_owned()]) {
            put(&storage, key, b"x").await.unwrap();
        }
        let mut keys = doomed.clone();
        keys.push("wal/0000000100000000/absent".into());
        keys.push("nothing/below/here".into());
        assert_eq!(storage.delete_many(&keys).await.unwrap(), keys.len() as u64);
        assert_eq!(storage.delete_many(&keys).await.unwrap(), keys.len() as u64, "a second run");
        assert_eq!(entries(dir.path()), ["backups", "catalog", "wal"]);
        assert_eq!(entries(&dir.path().join("wal")), ["0000000100000001", "history"]);
        assert_eq!(entries(&dir.path().join("wal/0000000100000001")), ["stays"]);
        assert!(entries(&dir.path().join("backups")).is_empty());
        assert!(entries(&dir.path().join("catalog")).is_empty());
        assert!(entries(&dir.path().join("wal/history")).is_empty());
        assert!(storage.delete_many(&[]).await.unwrap() == 0);
        let refused = storage.delete_many(&["wal/../escape".to_owned()]).await.unwrap_err();
        assert!(matches!(refused, StorageError::InvalidKey { .. }), "{refused}");
    }

    /// A write into a directory that an expiry keeps emptying and removing still succeeds: the
    /// directory may vanish between its creation and the temporary file's, and is then made again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_survives_an_expiry_removing_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(LocalStorage::open(dir.path()).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let expiry = {
            let (storage, stop) = (std::sync::Arc::clone(&storage), std::sync::Arc::clone(&stop));
            // Deleting an absent key in the directory removes the directory whenever it is empty.
            tokio::spawn(async move {
                let absent = ["wal/0000000100000000/absent".to_owned()];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    storage.delete_many(&absent).await.unwrap();
                }
            })
        };
        for i in 0..300 {
            let key = format!("wal/0000000100000000/{i:024}");
            put(&storage, &key, b"x").await.unwrap_or_else(|e| panic!("write {i}: {e}"));
            storage.delete_many(&[key]).await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        expiry.await.unwrap();
    }

    /// Housekeeping removes old temporary files anywhere below the root, and nothing else: not a
    /// fresh temporary file, not an old object, not what a symbolic link leads to.
    #[tokio::test]
    async fn remove_stale_takes_old_temp_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let storage = LocalStorage::open(dir.path()).unwrap();
        put(&storage, "backups/b1/sub/part", b"object").await.unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(7200);
        let age = |path: &Path| File::options().write(true).open(path).unwrap().set_modified(old).unwrap();
        let stale = [dir.path().join(".top.1.1.tmp"), dir.path().join("backups/b1/sub/.part.walship.9.9.tmp")];
        for path in &stale {
            fs::write(path, b"12345").unwrap();
            age(path);
        }
        let fresh = dir.path().join("backups/b1/.q.walship.1.2.tmp");
        fs::write(&fresh, b"x").unwrap();
        age(&dir.path().join("backups/b1/sub/part"));
        let beyond_link = outside.path().join(".other.1.1.tmp");
        fs::write(&beyond_link, b"x").unwrap();
        age(&beyond_link);
        std::os::unix::fs::symlink(outside.path(), dir.path().join("backups/link")).unwrap();
        let found = storage.remove_stale(std::time::Duration::from_secs(3600)).await.unwrap();
        assert_eq!(found, Housekeeping { temp_files: 2, temp_bytes: 10, ..Housekeeping::default() });
        assert!(stale.iter().all(|path| !path.exists()));
        assert!(fresh.exists() && beyond_link.exists());
        assert_eq!(read(&storage, "backups/b1/sub/part").await, b"object");
    }

    #[test]
    fn rename_noreplace_refuses_an_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        assert_eq!(rename_noreplace(&a, &b).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"a");
    }
}
