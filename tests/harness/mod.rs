//! Test harness for the integration suite: builds and finds the binaries, runs them the way
//! PostgreSQL does (as the server's OS user, from the data directory), and owns throwaway directories.
//!
//! As root (CI), servers and commands run as the `postgres` user, because PostgreSQL refuses to run
//! as root; otherwise they run as the current user.

pub mod assertions;
pub mod backups;
pub mod datadir;
pub mod encryption;
pub mod expire;
pub mod fixture;
pub mod keys;
pub mod pg;
pub mod proxy;
pub mod repository;
pub mod resign;
pub mod running;
pub mod s3;
pub mod segments;
pub mod ssh;
pub mod verify_base;
pub mod verify_wal;
pub mod versions;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_owned()
}

/// The uid and gid that servers and archive commands run as: `postgres` when we are root, else `None`
/// (run as ourselves).
pub fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, "postgres"]).output().expect("run id");
            assert!(out.status.success(), "running as root needs a 'postgres' user (install postgresql-15)");
            String::from_utf8_lossy(&out.stdout).trim().parse().expect("numeric id")
        };
        Some((id("-u"), id("-g")))
    })
}

/// Hands `path` to the server user (no-op when not root).
pub fn chown_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {path:?}: {e}"));
    }
}

/// Makes `cmd` run as the server user.
pub fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd
}

/// A temporary directory owned by the server user, removed when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(label: &str) -> Scratch {
        let dir = tempfile::Builder::new().prefix(&format!("walship-{label}-")).tempdir().expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        chown_to_server_user(dir.path());
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a subdirectory owned by the server user (mode 0700, as PostgreSQL wants its own).
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        chown_to_server_user(&path);
        path
    }
}

/// Every walship binary the tests run.
pub const BINARIES: [&str; 9] = [
    "wal-push",
    "wal-fetch",
    "base-push",
    "base-fetch",
    "base-list",
    "base-expire",
    "wal-verify",
    "base-verify",
    "walship-key",
];

/// The directory holding freshly built walship binaries ([`BINARIES`]), executable by the server
/// user.
///
/// The binaries are rebuilt once per test process (a plain `cargo test -p walship-tests` would
/// otherwise test stale ones) and copied out of the target directory, which may sit somewhere the
/// server user cannot enter (a 0700 temporary clone in CI).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Without the variables cargo sets for a running test (CARGO_PKG_*, CARGO_MANIFEST_*, ...):
        // build scripts (ring's, cc's) watch some of them, and different values would rebuild half
        // the dependency tree in every test binary. The user's own CARGO_HOME, CARGO_TARGET_DIR,
        // CARGO_BUILD_* and the like stay.
        let mut build = Command::new(env!("CARGO"));
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let set_for_tests = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_"]
                .iter()
                .any(|prefix| key.starts_with(prefix))
                || matches!(key.as_ref(), "CARGO" | "CARGO_TARGET_TMPDIR" | "CARGO_RUSTC_CURRENT_DIR" | "OUT_DIR");
            if set_for_tests {
                build.env_remove(key.as_ref());
            }
        }
        let status = build
            .args(["build", "--quiet"])
            .args(BINARIES.iter().flat_map(|name| ["-p", name]))
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        let target = std::env::current_exe()
            .expect("test executable path")
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps/<test>")
            .to_owned();
        // One directory per target directory, refreshed on every run, so nothing accumulates.
        let tag = {
            use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
            BuildHasherDefault::<DefaultHasher>::default().hash_one(&target)
        };
        let dir = std::env::temp_dir().join(format!("{BIN_DIR_PREFIX}{tag:016x}"));
        remove_orphaned_bin_dirs();
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(BIN_DIR_OWNER), target.as_os_str().as_encoded_bytes()).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        for name in BINARIES {
            let staging = dir.join(format!(".{name}.{}", std::process::id()));
            fs::copy(target.join(name), &staging).unwrap_or_else(|e| panic!("copy {name}: {e}"));
            fs::set_permissions(&staging, fs::Permissions::from_mode(0o755)).unwrap();
            // Rename over the old copy: a binary still running from an earlier run stays intact.
            fs::rename(&staging, dir.join(name)).unwrap();
        }
        dir
    })
}

const BIN_DIR_PREFIX: &str = "walship-test-bin-";
/// Names, inside a binary directory, the target directory it was copied from.
const BIN_DIR_OWNER: &str = "target-dir";

/// Removes binary directories whose target directory is gone (a deleted clone), so that copies do not
/// pile up in the temporary directory.
fn remove_orphaned_bin_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(BIN_DIR_PREFIX) {
            continue;
        }
        let owner = fs::read(entry.path().join(BIN_DIR_OWNER)).ok();
        let target_exists = owner.is_some_and(|bytes| Path::new(&*String::from_utf8_lossy(&bytes)).exists());
        if !target_exists {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Path of one of our binaries.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A command for one of our binaries, run as the server user with no walship or AWS settings inherited
/// from the environment of whoever runs the tests.
pub fn walship(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    isolate_environment(&mut cmd);
    as_server_user(&mut cmd);
    cmd
}

/// Removes walship's and the AWS SDK's settings from `cmd`'s environment, and keeps the SDK from
/// asking the EC2 instance metadata service (an address outside loopback) for anything.
pub fn isolate_environment(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("WALSHIP_") || key.starts_with("AWS_") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("AWS_EC2_METADATA_DISABLED", "true")
}

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    /// The exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with no standard input.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `wal-push --repo REPO PATH NAME` from `cwd`.
pub fn wal_push(repo: &Path, cwd: &Path, path: impl AsRef<OsStr>, name: &str) -> Output {
    run(walship("wal-push").current_dir(cwd).arg("--repo").arg(repo).arg(path).arg(name))
}

/// Runs `wal-fetch --repo REPO NAME PATH` from `cwd`.
pub fn wal_fetch(repo: &Path, cwd: &Path, name: &str, path: impl AsRef<OsStr>) -> Output {
    run(walship("wal-fetch").current_dir(cwd).arg("--repo").arg(repo).arg(name).arg(path))
}

/// Polls `probe` every 50 ms until it returns `Some`, failing with `what` after
/// [`pg::WAIT_TIMEOUT`] (a hang must end in a clear failure; nothing here measures speed).
#[track_caller]
pub fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let interval = std::time::Duration::from_millis(50);
    poll_every(what, pg::WAIT_TIMEOUT, interval, || probe().ok_or_else(|| "not yet".to_owned()))
}

/// Polls `probe` until it returns `Ok`, panicking after `timeout` with `what` and the last state it
/// reported.
#[track_caller]
pub fn poll_until<T>(what: &str, timeout: std::time::Duration, probe: impl FnMut() -> Result<T, String>) -> T {
    poll_every(what, timeout, std::time::Duration::from_millis(10), probe)
}

#[track_caller]
fn poll_every<T>(
    what: &str,
    timeout: std::time::Duration,
    interval: std::time::Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(state) if started.elapsed() > timeout => {
                panic!("timed out after {timeout:?} waiting until {what} (last: {state})")
            }
            Err(_) => std::thread::sleep(interval),
        }
    }
}
