//! File-system helpers that every part of walship shares: where a file's directory is, how a name
//! is made durable, and the one naming scheme of temporary files.
//!
//! They live apart from `repo` and `storage` because they are neither: the local backend, the
//! restore into `pg_wal`, the look-ahead records, the prefetch spool and the recovery settings all
//! write through a temporary file and a rename, and all need the same answers to "is this name a
//! leftover, and may it go?".
//!
//! A temporary file is named `.<file>.walship.<pid>.<nonce>.tmp`:
//! - the leading `.` hides it: repository keys never start with one, so listings and readers skip it;
//! - the pid names its writer, so a sweep removes it once that process is gone
//!   ([`is_orphaned_temp`]);
//! - the nonce (nanoseconds since the epoch, strictly increasing within a process) makes every name
//!   new, so a retry after a cut-off attempt never meets the attempt's leftover, and a later process
//!   that reuses a pid does not meet a dead one's.
//!
//! Older walships wrote `.<file>.walship.<pid>.tmp` (restores, records) and `.<file>.<pid>.<nanos>.tmp`
//! (the local and SSH backends). Both are still temporary files here: hidden and `.tmp`
//! ([`is_temp_name`]), and the first still names its writer.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The bytes an unprivileged user may still write on `dir`'s file system (statvfs's `f_bavail`):
/// what a restore may count on before it downloads anything.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: statvfs writes only into `stat`, and `path` is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail * stat.f_frsize)
}

/// Fills `buf` from the kernel's random source (ids, passphrases), with no dependency beyond
/// `/dev/urandom`.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut random| random.read_exact(buf))
}

/// `len` random bytes ([`random_bytes`]) as lower-case hex: ids and scratch names.
pub fn random_hex(len: usize) -> io::Result<String> {
    let mut bytes = vec![0u8; len];
    random_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The directory `path` is in: its parent, or the working directory for a bare name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// fsync makes a directory's entries (names created, renamed or removed in it) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents below `root`, fsyncing each parent that gained an entry.
pub fn create_dirs_durably(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().expect("below the root");
    if parent != root {
        create_dirs_durably(root, parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => fsync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename, so that a reader sees
/// the old content or the new, never a part. `durable`: the file is fsynced before the rename and its
/// directory after it. A temporary file that a failure (or a kill) leaves behind is recognisably ours:
/// [`is_orphaned_temp`] once we are gone.
pub fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    use std::io::Write;
    let dir = parent_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temp = dir.join(temp_name(&name));
    let written = (|| {
        let mut file = File::options().write(true).create_new(true).open(&temp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    if durable { fsync_dir(dir) } else { Ok(()) }
}

/// A new temporary name for writing `file_name` in this process: never the same twice.
pub fn temp_name(file_name: &str) -> String {
    format!("{}{}.{}.tmp", temp_prefix(file_name), std::process::id(), next_nonce())
}

/// What the temporary names of `file_name` start with, whichever process writes it.
pub fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.walship.")
}

/// Nanoseconds since the epoch, but always above the last value handed out in this process, so that
/// two names made within one clock tick still differ.
fn next_nonce() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let previous = LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now.max(last + 1)));
    now.max(previous.unwrap_or_default() + 1)
}

/// Whether a directory entry is a temporary file of a writer, of this walship or an older one.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// The process that writes (or wrote) the temporary file `name`; `None` for any other name, and for
/// the older backends' names, which a sweep by age removes instead.
fn temp_owner(name: &str) -> Option<libc::pid_t> {
    let (_, after) = name.strip_prefix('.')?.strip_suffix(".tmp")?.rsplit_once(".walship.")?;
    // `<pid>.<nonce>`, or a bare `<pid>` from an older walship.
    let (pid, nonce) = after.split_once('.').unwrap_or((after, "0"));
    if nonce.is_empty() || !nonce.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse::<libc::pid_t>().ok().filter(|pid| *pid > 0)
}

/// Whether `name` is a temporary file whose writer no longer exists.
pub fn is_orphaned_temp(name: &str) -> bool {
    temp_owner(name).is_some_and(|pid| !crate::process::exists(pid))
}

/// Removes the temporary files in `dir` whose writers no longer exist. Best effort.
pub fn remove_orphaned_temp_files(dir: &Path) {
    remove_temp_files_where(dir, is_orphaned_temp);
}

/// Removes this process's temporary files of `file_name` in `dir`: what a write of it that was cut
/// off (a task aborted mid-download) left. Best effort.
pub fn remove_own_temp_files(dir: &Path, file_name: &str) {
    let ours = format!("{}{}.", temp_prefix(file_name), std::process::id());
    remove_temp_files_where(dir, |name| name.starts_with(&ours) && is_temp_name(name));
}

fn remove_temp_files_where(dir: &Path, doomed: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(&doomed) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Above the kernel's pid_max, so no such process can exist.
    const DEAD_PID: u32 = 2147483000;

    #[test]
    fn a_replaced_file_has_the_new_content_and_no_temporary_file_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("want");
        for (content, durable) in [(&b"old"[..], false), (&b"new"[..], true)] {
            replace_file(&path, content, durable).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), content);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_temp_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join(temp_name("RECOVERYXLOG"));
        let orphan = dir.path().join(format!(".RECOVERYXLOG.walship.{DEAD_PID}.17.tmp"));
        let other = dir.path().join(".unrelated.tmp");
        let segment = dir.path().join("000000010000000000000001");
        for path in [&ours, &orphan, &other, &segment] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_orphaned_temp_files(dir.path());
        assert!(ours.exists() && other.exists() && segment.exists());
        assert!(!orphan.exists());
        assert_eq!(temp_owner(".x.walship.0.1.tmp"), None);
        assert_eq!(temp_owner(".x.walship.-1.1.tmp"), None);
        assert_eq!(temp_owner(".x.walship.12.x.tmp"), None);
        assert!(temp_name("x").starts_with(&temp_prefix("x")));
    }

    #[test]
    fn every_temp_name_is_new_hidden_and_names_its_writer() {
        let names: std::collections::HashSet<String> = (0..1000).map(|_| temp_name("seg")).collect();
        assert_eq!(names.len(), 1000, "a retry never meets an earlier attempt's file");
        for name in &names {
            assert!(is_temp_name(name), "{name}");
            assert_eq!(temp_owner(name), Some(std::process::id() as libc::pid_t), "{name}");
            assert!(!is_orphaned_temp(name));
        }
    }

    #[test]
    fn temp_files_of_older_walships_are_still_temp_files() {
        // Restores and records wrote `.<file>.walship.<pid>.tmp`; the backends `.<file>.<pid>.<nanos>.tmp`.
        let old_local = format!(".RECOVERYXLOG.walship.{DEAD_PID}.tmp");
        let old_backend = ".000000010000000000000001.123.1764590000000000000.tmp";
        assert!(is_temp_name(&old_local) && is_temp_name(old_backend));
        assert_eq!(temp_owner(&old_local), Some(DEAD_PID as libc::pid_t));
        assert!(is_orphaned_temp(&old_local), "swept once its writer is gone");
        assert_eq!(temp_owner(old_backend), None, "swept by age in the repository instead");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(&old_local), b"x").unwrap();
        remove_orphaned_temp_files(dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn own_temp_files_of_one_name_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join(temp_name("seg"));
        let other_name = dir.path().join(temp_name("seg2"));
        let other_writer = dir.path().join(format!(".seg.walship.{DEAD_PID}.1.tmp"));
        for path in [&ours, &other_name, &other_writer] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_own_temp_files(dir.path(), "seg");
        assert!(!ours.exists() && other_name.exists() && other_writer.exists());
    }

    #[test]
    fn durable_directories_are_created_below_the_root() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        create_dirs_durably(root.path(), &deep).unwrap();
        create_dirs_durably(root.path(), &deep).unwrap();
        assert!(deep.is_dir());
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
        assert_eq!(parent_dir(Path::new("pg_wal/x")), Path::new("pg_wal"));
    }
}
