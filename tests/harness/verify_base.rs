//! Running base-verify the way cron does, and judging what it leaves: its JSON report and metrics
//! file, the repository (byte for byte, before and after), and the scratch directory of a restore
//! test (no directory, no server, no wal-fetch worker left behind).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backups::base_command;
use crate::{Output, run};

/// The base-verify command on the repository `repo_args` selects, with `args`, not yet run.
pub fn base_verify_command(repo_args: &[OsString], cwd: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = base_command("base-verify", repo_args, cwd);
    cmd.args(args);
    cmd
}

/// Runs base-verify with `args` to its end.
pub fn base_verify(repo_args: &[OsString], cwd: &Path, args: &[&str]) -> Output {
    run(&mut base_verify_command(repo_args, cwd, args))
}

/// The JSON report a `--json` run printed.
#[track_caller]
pub fn verify_report(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("base-verify --json: {e}: {out:#?}"))
}

// One "byte for byte unchanged" and one metrics parser for both verify commands.
pub use crate::verify_wal::{metric as sample, snapshot};

/// The samples of the metrics file at `path` (see [`crate::verify_wal::parse_metrics`]).
#[track_caller]
pub fn metrics_of(path: &Path) -> BTreeMap<String, f64> {
    crate::verify_wal::parse_metrics(&fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
}

/// The restore tests' directories in `scratch`.
pub fn scratch_dirs(scratch: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(scratch) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("walship-restore-test-"))
        .map(|e| e.path())
        .collect()
}

/// Processes whose working directory is under `scratch` (a postmaster runs in its data directory, a
/// wal-fetch prefetch worker too), as `pid: command line`.
pub fn processes_under(scratch: &Path) -> Vec<String> {
    let Ok(scratch) = fs::canonicalize(scratch) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cwd) = fs::read_link(entry.path().join("cwd")) else { continue };
        if cwd.starts_with(&scratch) {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            found.push(format!("{pid}: {}", cmdline.join(" ")));
        }
    }
    found
}

/// Waits (bounded) until no process runs under `scratch`, then asserts that neither a process nor a
/// restore test's directory is left there.
#[track_caller]
pub fn assert_nothing_left(scratch: &Path, what: &str) {
    let started = Instant::now();
    while !processes_under(scratch).is_empty() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_under(scratch), Vec::<String>::new(), "{what}: processes left running");
    assert_eq!(scratch_dirs(scratch), Vec::<PathBuf>::new(), "{what}: directories left behind");
}

/// The postmaster of a restore test under `scratch`, once there is one: its pid, the status line of
/// its postmaster.pid, and whether recovery is still running (recovery.signal still there).
pub fn scratch_postmaster(scratch: &Path) -> Option<(i32, String, bool)> {
    scratch_dirs(scratch).into_iter().find_map(|dir| {
        let text = fs::read_to_string(dir.join("data/postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse().ok()?;
        let in_recovery = dir.join("data/recovery.signal").exists();
        Some((pid, text.lines().nth(7)?.trim().to_owned(), in_recovery))
    })
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) != Some("Z"))
}

/// A scratch parent for restore tests, with a short path of its own (the server's socket may live
/// inside). Dropped, it kills (SIGKILL) whatever still runs under it before it is removed: a test
/// that fails must not leave a restore test's server running.
pub struct RestoreScratch {
    dir: crate::Scratch,
}

impl RestoreScratch {
    pub fn create() -> RestoreScratch {
        RestoreScratch { dir: crate::Scratch::new("bvs") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RestoreScratch {
    fn drop(&mut self) {
        for process in processes_under(self.dir.path()) {
            if let Some(pid) = process.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process of the test's own scratch directory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
