//! wal-fetch's prefetch: after recovery asks for segment N, a detached worker process fetches the
//! next segments in parallel into a spool on pg_wal's file system, so that the next calls hand their
//! file over with a rename instead of a download.
//!
//! ```text
//! pg_wal/walship/prefetch/<key>/              one spool per recovery (see below)
//!     worker.lock                              held (flock) by the one live worker
//!     want                                     the segment recovery asked for last
//!     <segment>                                fetched and verified against its checksum
//!     .<segment>.walship.<pid>.<nonce>.tmp     being fetched
//! ```
//!
//! The key is a hash of the postmaster's pid and start time (from `postmaster.pid`), the data
//! directory and the repository: one per run of one recovery. A recovery that is abandoned (the server
//! killed, the data directory restored again, another repository configured) leaves its spool under
//! its own key, which no other recovery ever reads; the next worker removes it.
//!
//! Rules:
//! - The worker fetches only segments (never `.history`, `.partial` or `.backup` files: PostgreSQL
//!   asks for history files of timelines that may appear later, and their absence is an answer).
//! - It fetches the `prefetch` segments after `want` on want's timeline, `parallel` at a time, and
//!   removes every other file: a timeline switch or a jump makes the rest stale. So the spool never
//!   holds more than `prefetch` segments plus those in flight.
//! - A file appears under its name only after it was decoded and verified against its checksum;
//!   wal-fetch hands it over by rename. A segment absent from the spool is fetched from the
//!   repository as usual, and only the repository can say "absent".
//! - Spool files are not fsynced (they are written by `repo::fetch`, like any restored file): a
//!   crash of the machine restarts the server, whose new run has another key, so a spool that lost
//!   its data to the crash is never read, only removed; and PostgreSQL fsyncs a segment it keeps.
//! - The worker exits by itself when recovery ends (no `recovery.signal` or `standby.signal` left),
//!   when the postmaster is gone, when its spool is removed, when recovery has asked for nothing new
//!   for `prefetch_idle_secs`, or when the repository does not give its identity record within the
//!   deadline. It removes its spool on the way out. Every wait on the repository is bounded by the
//!   deadline.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::codec::ContentDigest;
use crate::config::FetchConfig;
use crate::error::Error;
use crate::fs::{parent_dir, replace_file, temp_prefix};
use crate::log::Log;
use crate::repo::{self, Repository};
use crate::wal::{WalFileKind, WalFileName, segment_file_name};

/// The spools' parent, relative to `pg_wal`.
pub const SPOOL_ROOT: &str = "walship/prefetch";
const LOCK_FILE: &str = "worker.lock";
const WANT_FILE: &str = "want";
/// How often the worker looks at `want` and at recovery's state.
const POLL: Duration = Duration::from_millis(20);
/// How long a segment the repository did not have (or failed to give) is left alone.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The postmaster running the recovery, from `postmaster.pid` in the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Postmaster {
    pid: i32,
    /// The start time line, which with the pid names one run of the server.
    started: String,
}

impl Postmaster {
    fn read(data_dir: &Path) -> Option<Postmaster> {
        let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok().filter(|pid: &i32| *pid > 0)?;
        let started = lines.nth(1)?.trim().to_owned();
        Some(Postmaster { pid, started })
    }
}

/// The spool of the recovery running in `data_dir`.
#[derive(Debug, Clone)]
pub struct Spool {
    data_dir: PathBuf,
    root: PathBuf,
    dir: PathBuf,
    postmaster: Postmaster,
}

impl Spool {
    /// The spool for a restore to `destination` (PostgreSQL's `%p`, in `pg_wal`) by the server whose
    /// data directory is `data_dir`; `None` unless a recovery is running there (a `postmaster.pid`,
    /// and `recovery.signal` or `standby.signal`).
    pub fn for_recovery(data_dir: &Path, destination: &Path, store_location: &str) -> Option<Spool> {
        let pg_wal = data_dir.join(parent_dir(destination));
        if !pg_wal.join("archive_status").is_dir() || !recovery_signalled(data_dir) {
            return None;
        }
        let postmaster = Postmaster::read(data_dir)?;
        let canonical = fs::canonicalize(data_dir).ok()?;
        let key_source =
            format!("{}\n{}\n{}\n{store_location}", postmaster.pid, postmaster.started, canonical.display());
        let key = &ContentDigest::of(key_source.as_bytes()).sha256_hex()[..16];
        let root = pg_wal.join(SPOOL_ROOT);
        Some(Spool { data_dir: data_dir.to_owned(), dir: root.join(key), root, postmaster })
    }

    /// The spool's directory, `pg_wal/walship/prefetch/<key>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hands `name` over to `destination` by rename, if the worker has it. When the worker is fetching
    /// it right now, waits for that (up to `wait`) rather than downloading it a second time.
    pub fn take(&self, name: &str, destination: &Path, wait: Duration) -> std::io::Result<Option<u64>> {
        let file = self.dir.join(name);
        let hand_over = || match fs::rename(&file, destination) {
            Ok(()) => Ok(Some(fs::metadata(destination)?.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let started = Instant::now();
        loop {
            if let Some(len) = hand_over()? {
                return Ok(Some(len));
            }
            if started.elapsed() >= wait || !self.in_flight(name) || !self.worker_alive() {
                // It may have landed between the rename and the check.
                return hand_over();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn in_flight(&self, name: &str) -> bool {
        let prefix = temp_prefix(name);
        fs::read_dir(&self.dir).is_ok_and(|entries| {
            entries.flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
        })
    }

    /// Removes what a cut-off download of `name` by this process left.
    fn remove_partial(&self, name: &str) {
        crate::fs::remove_own_temp_files(&self.dir, name);
    }

    /// Tells the worker which segment recovery asked for last.
    pub fn set_want(&self, name: &str) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        replace_file(&self.dir.join(WANT_FILE), name.as_bytes(), false)
    }

    fn want(&self) -> Option<WalFileName> {
        let text = fs::read_to_string(self.dir.join(WANT_FILE)).ok()?;
        WalFileName::parse(text.trim()).ok().filter(|w| w.kind() == WalFileKind::Segment)
    }

    /// Whether a worker holds this spool's lock.
    pub fn worker_alive(&self) -> bool {
        let Ok(file) = fs::OpenOptions::new().read(true).open(self.dir.join(LOCK_FILE)) else { return false };
        matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock))
    }

    /// Removes the spools of other (abandoned) recoveries under the same `pg_wal`.
    pub fn remove_others(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else { return };
        for entry in entries.flatten() {
            if entry.path() != self.dir {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Whether the recovery this spool belongs to is still running.
    fn recovery_goes_on(&self) -> bool {
        recovery_signalled(&self.data_dir)
            && crate::process::exists(self.postmaster.pid)
            && Postmaster::read(&self.data_dir).as_ref() == Some(&self.postmaster)
            && self.dir.is_dir()
    }

    /// Takes the worker lock; `None` when another worker has it.
    fn lock(&self) -> std::io::Result<Option<fs::File>> {
        fs::create_dir_all(&self.dir)?;
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(self.dir.join(LOCK_FILE))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Names of fetched segments (not temporary files, not our own files).
    fn fetched(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.') && n != LOCK_FILE && n != WANT_FILE)
            .collect()
    }
}

/// Removes `dir`, the spool a worker was started for, when that worker finds no recovery to serve
/// (it ended, or the server went, between the request and the worker's start): no other worker
/// would ever remove it. Only a directory directly under `pg_wal/walship/prefetch/` of `data_dir`,
/// and not while a worker holds it.
pub fn remove_unserved_spool(data_dir: &Path, destination: &Path, dir: &Path) {
    let root = data_dir.join(parent_dir(destination)).join(SPOOL_ROOT);
    let inside =
        dir.parent() == Some(root.as_path()) && dir.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'));
    if !inside {
        return;
    }
    let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE));
    if let Ok(lock) = lock
        && lock.try_lock().is_ok()
    {
        let _ = fs::remove_dir_all(dir);
    }
}

fn recovery_signalled(data_dir: &Path) -> bool {
    data_dir.join("recovery.signal").exists() || data_dir.join("standby.signal").exists()
}

/// The `count` segments after `after`, on its timeline.
pub fn following_segments(after: &WalFileName, segment_size: u32, count: usize) -> Vec<String> {
    let Some(first) = after.segment_number(segment_size).map(|n| n + 1) else { return Vec::new() };
    (first..first + count as u64).filter_map(|n| segment_file_name(after.timeline(), n, segment_size)).collect()
}

/// The repository's segment size, from its identity record, within `deadline`: a repository that stops
/// answering must not keep a worker (and its spool) around for good, like every other wait of ours.
/// Without it there is nothing to prefetch, and the spool goes.
async fn segment_size(repo: &Repository, spool: &Spool, deadline: Duration, log: &Log) -> Result<u32, Error> {
    let what = repo.storage().location(repo::IDENTITY_KEY);
    match crate::retry::with_deadline(deadline, log, &what, || repo.require_identity()).await {
        Ok(identity) => Ok(identity.wal_segment_size),
        Err(e) => {
            let _ = fs::remove_dir_all(spool.dir());
            Err(e)
        }
    }
}

/// The worker: keeps the segments after `want` fetched until recovery ends, stalls or goes away.
/// Each download is retried on transient failures within a `deadline` of its own (the policy of
/// every command: [`crate::retry::with_deadline`]); one that fails for good is left to recovery's
/// own request.
pub async fn run_worker(
    repo: Repository,
    spool: Spool,
    config: FetchConfig,
    deadline: Duration,
    log: Log,
) -> Result<(), Error> {
    let Some(_lock) = spool.lock().map_err(|e| Error::local_io(spool.dir(), "lock", e))? else {
        log.debug("prefetch: another worker serves this recovery");
        return Ok(());
    };
    spool.remove_others();
    // Only we write here now; what a killed worker left half-written goes.
    for entry in fs::read_dir(spool.dir()).map_err(|e| Error::local_io(spool.dir(), "list", e))?.flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(".tmp")) {
            let _ = fs::remove_file(entry.path());
        }
    }
    let segment_size = segment_size(&repo, &spool, deadline, &log).await?;
    let mut worker = Worker { repo, spool, config, deadline, log, segment_size, downloads: Downloads::default() };
    let outcome = worker.serve().await;
    let Downloads { mut tasks, fetched, bytes, .. } = worker.downloads;
    tasks.shutdown().await;
    let _ = fs::remove_dir_all(worker.spool.dir());
    worker.log.debug(format_args!("prefetch: {outcome}; fetched {fetched} segments ({bytes} bytes); worker exits"));
    Ok(())
}

/// What one download ended with: its segment's name and result.
type Fetched = (String, Result<repo::FetchReport, Error>);

/// The worker while it serves one recovery.
struct Worker {
    repo: Repository,
    spool: Spool,
    config: FetchConfig,
    deadline: Duration,
    log: Log,
    segment_size: u32,
    downloads: Downloads,
}

/// The downloads a worker started, and what came of them.
#[derive(Default)]
struct Downloads {
    tasks: tokio::task::JoinSet<Fetched>,
    in_flight: HashMap<String, tokio::task::AbortHandle>,
    /// Segments the repository did not have, or failed to give, and when to try them again.
    not_before: HashMap<String, Instant>,
    fetched: u64,
    bytes: u64,
}

impl Worker {
    /// Serves until recovery ends or stops asking; returns why it stopped.
    async fn serve(&mut self) -> &'static str {
        let mut last_want: Option<WalFileName> = None;
        let mut last_change = Instant::now();
        loop {
            if !self.spool.recovery_goes_on() {
                return "recovery ended";
            }
            let want = self.spool.want();
            if want != last_want {
                last_change = Instant::now();
                last_want = want.clone();
            }
            if last_change.elapsed() >= self.config.prefetch_idle {
                return "recovery asked for nothing new";
            }
            if let Some(want) = &want {
                self.refill(want);
            }
            match tokio::time::timeout(POLL, self.downloads.tasks.join_next()).await {
                Ok(Some(Ok((name, result)))) => self.settle(name, result),
                // An aborted task, or none running: nothing to note.
                Ok(Some(Err(_))) | Ok(None) => {
                    if self.downloads.tasks.is_empty() {
                        tokio::time::sleep(POLL).await;
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// Drops what fell out of the window after `want` (fetched files and downloads), and starts
    /// downloads for the window's missing segments, up to `parallel` at once.
    fn refill(&mut self, want: &WalFileName) {
        let window = following_segments(want, self.segment_size, self.config.prefetch);
        let mut fetched = self.spool.fetched();
        fetched.retain(|name| {
            let keep = window.contains(name);
            if !keep {
                let _ = fs::remove_file(self.spool.dir().join(name));
            }
            keep
        });
        let spool = &self.spool;
        self.downloads.in_flight.retain(|name, handle| {
            let keep = window.contains(name);
            if !keep {
                handle.abort();
                spool.remove_partial(name);
            }
            keep
        });
        let now = Instant::now();
        for name in &window {
            if self.downloads.in_flight.len() >= self.config.parallel {
                break;
            }
            if self.downloads.in_flight.contains_key(name)
                || self.downloads.not_before.get(name).is_some_and(|t| *t > now)
                || fetched.contains(name)
            {
                continue;
            }
            let (repo, destination, name_owned) = (self.repo.clone(), self.spool.dir().join(name), name.clone());
            let (deadline, log) = (self.deadline, self.log.clone());
            let handle = self.downloads.tasks.spawn(async move {
                let what = repo.describe_wal(&name_owned);
                let fetch = || repo::fetch(&repo, &name_owned, &destination);
                let result = crate::retry::with_deadline(deadline, &log, &what, fetch).await;
                (name_owned, result)
            });
            self.downloads.in_flight.insert(name.clone(), handle);
        }
    }

    /// Notes how the download of `name` ended.
    fn settle(&mut self, name: String, result: Result<repo::FetchReport, Error>) {
        self.downloads.in_flight.remove(&name);
        match result {
            Ok(report) => {
                self.downloads.fetched += 1;
                self.downloads.bytes += report.original_bytes;
            }
            Err(Error::NotFound { .. }) => {
                self.downloads.not_before.insert(name, Instant::now() + RETRY_AFTER);
            }
            Err(e) => {
                if matches!(e, Error::DeadlineExceeded { .. }) {
                    // A download cut off by the deadline may leave its temporary file, which would
                    // make wal-fetch wait for a download that is no longer happening.
                    self.spool.remove_partial(&name);
                }
                self.log.info(format_args!("prefetch: {name}: {e} (left to recovery's own request)"));
                self.downloads.not_before.insert(name, Instant::now() + RETRY_AFTER);
            }
        }
        self.downloads.not_before.retain(|_, t| *t > Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_segments_stay_on_the_timeline_and_cross_log_boundaries() {
        let after = WalFileName::parse("0000000200000001000000FE").unwrap();
        assert_eq!(
            following_segments(&after, 16 << 20, 3),
            ["0000000200000001000000FF", "000000020000000200000000", "000000020000000200000001"]
        );
        let after = WalFileName::parse("000000010000000000000FFF").unwrap();
        assert_eq!(following_segments(&after, 1 << 20, 1), ["000000010000000100000000"]);
    }

    fn recovery_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("pg_wal/archive_status")).unwrap();
        fs::write(dir.path().join("recovery.signal"), b"").unwrap();
        let pid = std::process::id();
        fs::write(dir.path().join("postmaster.pid"), format!("{pid}\n{}\n1700000000\n5432\n", dir.path().display()))
            .unwrap();
        dir
    }

    #[test]
    fn a_spool_exists_only_during_a_recovery_and_is_keyed_by_its_server_run() {
        let dir = recovery_dir();
        let spool = Spool::for_recovery(dir.path(), Path::new("pg_wal/RECOVERYXLOG"), "file:///r").unwrap();
        assert!(spool.dir().starts_with(dir.path().join("pg_wal").join(SPOOL_ROOT)));
        let other_repo = Spool::for_recovery(dir.path(), Path::new("pg_wal/RECOVERYXLOG"), "s3://b").unwrap();
        assert_ne!(spool.dir(), other_repo.dir());
        let pid = std::process::id();
        fs::write(dir.path().join("postmaster.pid"), format!("{pid}\n{}\n1700000001\n", dir.path().display())).unwrap();
        let restarted = Spool::for_recovery(dir.path(), Path::new("pg_wal/RECOVERYXLOG"), "file:///r").unwrap();
        assert_ne!(spool.dir(), restarted.dir(), "another run of the server is another recovery");
        assert!(!spool.recovery_goes_on());
        fs::remove_file(dir.path().join("recovery.signal")).unwrap();
        assert!(Spool::for_recovery(dir.path(), Path::new("pg_wal/RECOVERYXLOG"), "file:///r").is_none());
    }

    #[test]
    fn an_unserved_spool_is_removed_only_inside_the_spool_root_and_only_without_a_worker() {
        let dir = recovery_dir();
        let destination = Path::new("pg_wal/RECOVERYXLOG");
        let spool = Spool::for_recovery(dir.path(), destination, "file:///r").unwrap();
        spool.set_want("000000010000000000000002").unwrap();

        let outside = dir.path().join("pg_wal/elsewhere");
        fs::create_dir_all(&outside).unwrap();
        remove_unserved_spool(dir.path(), destination, &outside);
        assert!(outside.is_dir(), "a directory outside pg_wal/walship/prefetch is never removed");
        let nested = spool.dir().join("deeper");
        fs::create_dir_all(&nested).unwrap();
        remove_unserved_spool(dir.path(), destination, &nested);
        assert!(nested.is_dir(), "only a spool directly below the root");

        let lock = spool.lock().unwrap().unwrap();
        remove_unserved_spool(dir.path(), destination, spool.dir());
        assert!(spool.dir().is_dir(), "not while a worker holds it");
        drop(lock);
        remove_unserved_spool(dir.path(), destination, spool.dir());
        assert!(!spool.dir().exists());
    }

    #[test]
    fn take_hands_over_by_rename_and_want_round_trips() {
        let dir = recovery_dir();
        let spool = Spool::for_recovery(dir.path(), Path::new("pg_wal/RECOVERYXLOG"), "file:///r").unwrap();
        let destination = dir.path().join("pg_wal/RECOVERYXLOG");
        assert_eq!(spool.take("000000010000000000000003", &destination, Duration::from_secs(1)).unwrap(), None);
        spool.set_want("000000010000000000000002").unwrap();
        assert_eq!(spool.want().unwrap().to_string(), "000000010000000000000002");
        fs::write(spool.dir().join("000000010000000000000003"), b"abc").unwrap();
        assert_eq!(spool.take("000000010000000000000003", &destination, Duration::ZERO).unwrap(), Some(3));
        assert_eq!(fs::read(&destination).unwrap(), b"abc");
        assert!(!spool.worker_alive());
        let lock = spool.lock().unwrap().unwrap();
        assert!(spool.worker_alive());
        assert!(spool.lock().unwrap().is_none(), "one worker per spool");
        drop(lock);
        assert!(!spool.worker_alive());
    }
}
