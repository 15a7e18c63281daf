//! Questions about other processes on this host: is one alive, is it still the same one, and is the
//! writer of a temporary file gone.
//!
//! Temporary files that wal-push and wal-fetch leave in PostgreSQL's directories carry their writer's
//! process id (`.<file>.walship.<pid>.tmp`): a writer killed mid-write leaves one behind, and only
//! the id tells a leftover from a file being written right now.

use std::path::Path;

/// Whether a process with this id exists (ours or another user's).
pub fn exists(pid: libc::pid_t) -> bool {
    // Zero or negative would address process groups in kill(2).
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 delivers nothing; it only asks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat`): with the pid, it names one
/// process for good, since a pid may be reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces; fields are counted after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The temporary name under which this process writes `file_name`.
pub fn temp_name(file_name: &str) -> String {
    format!("{}{}.tmp", temp_prefix(file_name), std::process::id())
}

/// What the temporary names of `file_name` start with, whichever process writes it.
pub fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.walship.")
}

/// The process that writes (or wrote) the temporary file `name`; `None` for any other name.
fn temp_owner(name: &str) -> Option<libc::pid_t> {
    let (_, pid) = name.strip_prefix('.')?.strip_suffix(".tmp")?.rsplit_once(".walship.")?;
    pid.parse::<libc::pid_t>().ok().filter(|pid| *pid > 0)
}

/// Writes `bytes` to `path` through this process's temporary file beside it and a rename, so that a
/// reader sees the old content or the new, never a part. `durable`: the file is fsynced before the
/// rename and its directory after it. A temporary file that a failure (or a kill) leaves behind is
/// recognisably ours: [`is_orphaned_temp`] once we are gone.
pub fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temp = dir.join(temp_name(&name));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    if durable {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(&temp, path)?;
    if durable { crate::storage::local::fsync_dir(dir) } else { Ok(()) }
}

/// Whether `name` is a temporary file whose writer no longer exists.
pub fn is_orphaned_temp(name: &str) -> bool {
    temp_owner(name).is_some_and(|pid| !exists(pid))
}

/// Removes the temporary files in `dir` whose writers no longer exist. Best effort.
pub fn remove_orphaned_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(is_orphaned_temp) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Above the kernel's pid_max, so no such process can exist.
        let orphan = dir.path().join(".RECOVERYXLOG.walship.2147483000.tmp");
        let other = dir.path().join(".unrelated.tmp");
        let segment = dir.path().join("000000010000000000000001");
        for path in [&ours, &orphan, &other, &segment] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_orphaned_temp_files(dir.path());
        assert!(ours.exists() && other.exists() && segment.exists());
        assert!(!orphan.exists());
        assert_eq!(temp_owner(".x.walship.0.tmp"), None);
        assert_eq!(temp_owner(".x.walship.-1.tmp"), None);
        assert!(temp_name("x").starts_with(&temp_prefix("x")));
    }
}
