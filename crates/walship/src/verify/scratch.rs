//! The restore test's scratch directory: where a backup is restored and a server started, owned by
//! one run of base-verify, and cleaned by the next run when its owner was killed outright.
//!
//! `<parent>/walship-restore-test-<NAME>-<pid>-<random>/` holds an owner record (host, boot, pid and
//! its start time: the notion base-push's owner records use, against pid reuse), `data/` (the
//! restored cluster), `tablespaces/<OID>/`, `s/` (the server's private Unix socket directory, or a
//! link to one under /tmp where the path would not fit in a socket address), the hba file and the
//! server's log. A run killed with SIGKILL cannot clean up; its server goes down with it
//! (parent-death signal), and the next run, finding the owner dead, stops what may still run there
//! and removes the directory. A live owner's directory is never touched.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::base::Owner;
use crate::error::Error;
use crate::log::Log;

/// Every scratch directory's name starts with this.
pub const SCRATCH_PREFIX: &str = "walship-restore-test-";
/// The owner record inside a scratch directory.
const OWNER_FILE: &str = "owner.json";
/// How long a predecessor's server gets between SIGQUIT and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Where the socket directory goes when the scratch directory's path is too long for it.
const SHORT_SOCKET_PREFIX: &str = "/tmp/walship-restore-test-socket-";
/// A Unix socket's path must fit in `sun_path` (108 bytes with its NUL), `.s.PGSQL.<port>` included.
const MAX_SOCKET_PATH: usize = 107;

/// A scratch directory this run owns.
#[derive(Debug)]
pub struct Scratch {
    root: PathBuf,
}

impl Scratch {
    /// Creates `<parent>/walship-restore-test-<name>-<pid>-<random>` (0700) with its owner record,
    /// after checking that `parent` has room for `needed` bytes.
    pub fn create(parent: &Path, name: &str, needed: u64) -> Result<Scratch, Error> {
        check_free_space(parent, needed)?;
        let random: u32 = rand_u32();
        let root = parent.join(format!("{SCRATCH_PREFIX}{name}-{}-{random:08x}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&root).map_err(|e| Error::local_io(&root, "create", e))?;
        let scratch = Scratch { root };
        let owner = serde_json::to_vec(&Owner::current()).expect("an owner record serializes");
        let path = scratch.root.join(OWNER_FILE);
        if let Err(e) = fs::write(&path, owner) {
            scratch.remove();
            return Err(Error::local_io(&path, "write", e));
        }
        if let Err(e) = scratch.make_socket_dir(random) {
            scratch.remove();
            return Err(e);
        }
        Ok(scratch)
    }

    /// `s/` in the scratch directory, private (0700). Where the socket's path would not fit in a
    /// Unix socket address (a long `--scratch`), `s` is instead a link to a private directory under
    /// /tmp, which [`Scratch::remove`] removes with it.
    fn make_socket_dir(&self, random: u32) -> Result<(), Error> {
        let inside = self.root.join("s");
        let longest = inside.join(".s.PGSQL.65535");
        let socket = if longest.as_os_str().len() <= MAX_SOCKET_PATH {
            inside.clone()
        } else {
            PathBuf::from(format!("{SHORT_SOCKET_PREFIX}{}-{random:08x}", std::process::id()))
        };
        fs::DirBuilder::new().mode(0o700).create(&socket).map_err(|e| Error::local_io(&socket, "create", e))?;
        if socket != inside {
            std::os::unix::fs::symlink(&socket, &inside).map_err(|e| {
                let _ = fs::remove_dir(&socket);
                Error::local_io(&inside, "link", e)
            })?;
        }
        Ok(())
    }

    /// The socket directory under /tmp that `s` links to, if it does (only ever one of ours).
    fn short_socket_dir(&self) -> Option<PathBuf> {
        let target = fs::read_link(self.root.join("s")).ok()?;
        let ours = target.to_str().is_some_and(|t| t.starts_with(SHORT_SOCKET_PREFIX) && !t.contains("/.."));
        ours.then_some(target)
    }

    /// The scratch directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the backup is restored.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Where tablespace `oid` is restored.
    pub fn tablespace_dir(&self, oid: u32) -> PathBuf {
        self.root.join("tablespaces").join(oid.to_string())
    }

    /// The server's private socket directory (0700: only this user can connect); short, for the
    /// socket's path limit.
    pub fn socket_dir(&self) -> PathBuf {
        self.short_socket_dir().unwrap_or_else(|| self.root.join("s"))
    }

    /// Checks that the socket of `port` fits in a Unix socket address.
    pub fn check_socket_path(&self, port: u16) -> Result<(), Error> {
        let socket = self.socket_dir().join(format!(".s.PGSQL.{port}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Usage(format!(
                "--scratch {}: the path is too long for the server's Unix socket ({} bytes, at most {MAX_SOCKET_PATH}); \
                 choose a shorter scratch directory",
                self.root.parent().unwrap_or(&self.root).display(),
                socket.as_os_str().len()
            )));
        }
        Ok(())
    }

    /// Removes the directory and everything in it. Retried a few times: a restore cut off by a
    /// signal may still be writing into it for a moment.
    pub fn remove(&self) {
        if let Some(dir) = self.short_socket_dir() {
            let _ = fs::remove_dir_all(dir);
        }
        for _ in 0..20 {
            match fs::remove_dir_all(&self.root) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => std::thread::sleep(Duration::from_millis(100)),
                _ => return,
            }
        }
    }
}

/// A random number for the directory's name: two runs of one backup in one pid namespace differ.
fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most the given length into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != 4 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return nanos.subsec_nanos();
    }
    u32::from_ne_bytes(bytes)
}

/// Refuses a scratch file system without room for the restore: `needed` bytes plus a margin for the
/// WAL that recovery restores and the server writes.
fn check_free_space(parent: &Path, needed: u64) -> Result<(), Error> {
    let margin = (needed / 10).max(128 << 20);
    let free = crate::fs::free_bytes(parent).map_err(|e| Error::local_io(parent, "statvfs", e))?;
    if free < needed + margin {
        return Err(Error::Usage(format!(
            "--scratch {}: {} MiB free, but restoring the backup needs {} MiB (its size plus a margin for WAL); \
             choose another scratch directory",
            parent.display(),
            free >> 20,
            (needed + margin) >> 20
        )));
    }
    Ok(())
}

/// Cleans every scratch directory in `parent` whose owner is certainly dead: stops a server still
/// running in it, then removes it. Returns the directories removed.
pub fn clean_predecessors(parent: &Path, log: &Log) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else { return Vec::new() };
    let me = Owner::current();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(SCRATCH_PREFIX) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        if !owner_is_dead(&dir, name, &me) {
            continue;
        }
        stop_server_in(&dir.join("data"), log);
        Scratch { root: dir.clone() }.remove();
        log.info(format_args!("removed {}, left by a restore test that was killed", dir.display()));
        removed.push(dir);
    }
    removed
}

/// Whether the run that made `dir` is gone. Without a readable owner record (killed between creating
/// the directory and writing it), the pid in the name decides: dead only when no such process exists.
fn owner_is_dead(dir: &Path, name: &str, me: &Owner) -> bool {
    match fs::read(dir.join(OWNER_FILE)).ok().and_then(|b| serde_json::from_slice::<Owner>(&b).ok()) {
        Some(owner) => owner.is_dead(me),
        None => {
            let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<i32>().ok());
            // SAFETY: kill with signal 0 only checks for the process.
            pid.is_some_and(|pid| pid > 0 && unsafe { libc::kill(pid, 0) } != 0 && errno() == libc::ESRCH)
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Stops the postmaster `data_dir/postmaster.pid` names, if it is alive and runs in that directory
/// (its working directory is the data directory): SIGQUIT, then SIGKILL after a grace.
pub fn stop_server_in(data_dir: &Path, log: &Log) {
    let Some(pid) = running_postmaster(data_dir) else { return };
    log.info(format_args!("stopping the server (pid {pid}) left running in {}", data_dir.display()));
    signal_until_gone(pid, libc::SIGQUIT, STOP_GRACE);
    if alive(pid) {
        signal_until_gone(pid, libc::SIGKILL, STOP_GRACE);
    }
}

/// The pid of a live postmaster running in `data_dir`, from its postmaster.pid.
fn running_postmaster(data_dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok().filter(|p| *p > 0)?;
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let here = fs::canonicalize(data_dir).ok()?;
    (cwd == here).then_some(pid)
}

/// Sends `signal` to `pid` and waits up to `grace` for it to be gone.
fn signal_until_gone(pid: i32, signal: i32, grace: Duration) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, signal) };
    let started = Instant::now();
    while alive(pid) && started.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_owners_directory_is_kept_and_a_dead_ones_removed() {
        let parent = tempfile::tempdir().unwrap();
        let log = Log::new("test", false);
        let live = Scratch::create(parent.path(), "20261122T080000Z", 0).unwrap();
        // A dead owner: this host and boot, a pid that is not running.
        let dead = parent.path().join(format!("{SCRATCH_PREFIX}20261122T080000Z-999999999-0"));
        fs::create_dir_all(dead.join("data")).unwrap();
        let mut owner = serde_json::to_value(Owner::current()).unwrap();
        owner["pid"] = 999_999_999u32.into();
        fs::write(dead.join(OWNER_FILE), owner.to_string()).unwrap();
        // Without an owner record, the name's pid decides: this process is alive.
        let unnamed = parent.path().join(format!("{SCRATCH_PREFIX}X-{}-0", std::process::id()));
        fs::create_dir_all(&unnamed).unwrap();
        let removed = clean_predecessors(parent.path(), &log);
        assert_eq!(removed, std::slice::from_ref(&dead));
        assert!(live.root().is_dir() && unnamed.is_dir() && !dead.exists());
        live.remove();
        assert!(!live.root().exists());
    }

    #[test]
    fn free_space_and_socket_length_are_checked() {
        let parent = tempfile::tempdir().unwrap();
        let error = Scratch::create(parent.path(), "N", u64::MAX / 4).unwrap_err();
        assert!(error.to_string().contains("MiB free"), "{error}");
        // A scratch path too long for a socket: the socket directory moves to /tmp, and goes with it.
        let long = parent.path().join("x".repeat(90));
        fs::create_dir(&long).unwrap();
        let scratch = Scratch::create(&long, "20261122T080000Z", 0).unwrap();
        scratch.check_socket_path(5432).unwrap();
        let socket = scratch.socket_dir();
        assert!(socket.starts_with("/tmp") && socket.is_dir(), "{socket:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o700);
        scratch.remove();
        assert!(!socket.exists() && !scratch.root().exists());
        // A short one keeps it inside.
        let scratch = Scratch::create(parent.path(), "20261122T080000Z", 0).unwrap();
        assert_eq!(scratch.socket_dir(), scratch.root().join("s"));
        scratch.remove();
    }
}
