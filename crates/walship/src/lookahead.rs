//! wal-push's look-ahead: while PostgreSQL waits for segment N, upload the next segments it has
//! already marked `.ready`, in parallel, and remember each durable upload in a small state directory
//! under `pg_wal`, so that PostgreSQL's later calls for them are answered after a local check.
//!
//! ```text
//! pg_wal/archive_status/<name>.ready    PostgreSQL's: the segment is complete and waits to be archived
//! pg_wal/walship/pushed/<name>          ours: <name> is durably in repository <repo>, and this is
//!                                       how the file looked (device, inode, size, mtime, ctime, sha256)
//! ```
//!
//! Rules this module keeps (PostgreSQL's contract, see the README):
//! - Only segments with a `.ready` file are uploaded ahead: PostgreSQL creates it once the segment is
//!   complete and fsynced, so a segment still being written is never pushed.
//! - `archive_status` is only read, never written: PostgreSQL renames `.ready` to `.done` itself.
//! - A record is written only after its upload is durable (the backend's commit returned), and it is
//!   only trusted while it names this repository and the file is provably the one uploaded: same
//!   device, inode, size, modification and change times; failing that, the file's SHA-256 must equal
//!   the recorded one. A record that does not parse or fails its own checksum is removed, and the
//!   segment is pushed the normal way (which judges a re-push by content, so it costs time, never
//!   data).
//! - The answer for N itself comes only from N's own durable upload (or its record).
//! - Memory is bounded: the scan of `archive_status` keeps only the `look_ahead` lowest candidates.

use std::collections::{BinaryHeap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::ContentDigest;
use crate::config::Config;
use crate::error::Error;
use crate::log::Log;
use crate::process;
use crate::repo::parent_dir;
use crate::repo::{self, PushReport, Repository};
use crate::wal::{WalFileKind, WalFileName};

/// The state directory, relative to `pg_wal`.
pub const STATE_DIR: &str = "walship/pushed";
const RECORD_MAX_LEN: u64 = 4096;

/// The look-ahead state of one `pg_wal` directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pg_wal: PathBuf,
    dir: PathBuf,
}

/// How a file looked when it was uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    name: String,
    repo: String,
    stamp: FileStamp,
    sha256: String,
}

/// What [`StateDir::answer`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Uploaded ahead and unchanged since (by its stamp, or by its SHA-256 when the stamp moved).
    Archived { bytes: u64, rehashed: bool },
    /// No usable record: push it the normal way. The reason is for `-v`.
    NotAhead(&'static str),
}

impl StateDir {
    /// The state directory for `source`, PostgreSQL's `%p`, when it lies in a `pg_wal` directory
    /// (one with `archive_status` beside it); `None` for a file archived by hand from elsewhere.
    pub fn for_source(source: &Path) -> Option<StateDir> {
        let pg_wal = parent_dir(source).to_owned();
        pg_wal.join("archive_status").is_dir().then(|| StateDir { dir: pg_wal.join(STATE_DIR), pg_wal })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn is_ready(&self, name: &str) -> bool {
        self.pg_wal.join("archive_status").join(format!("{name}.ready")).exists()
    }

    /// The cheap check before any network: was `name` (at `source`) uploaded ahead into `repo_url`?
    /// A record that is used or found wanting is removed: PostgreSQL marks the segment `.done` after
    /// our answer, and a bad record must not be looked at twice.
    pub fn answer(&self, name: &str, source: &Path, repo_url: &str) -> Answer {
        if WalFileName::parse(name).is_err() {
            return Answer::NotAhead("not a WAL file name");
        }
        let path = self.record_path(name);
        let text = match read_capped(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return Answer::NotAhead("no look-ahead record"),
            Err(_) => return Answer::NotAhead("look-ahead record unreadable"),
        };
        let verdict = self.judge(&text, name, source, repo_url);
        let _ = fs::remove_file(&path);
        verdict
    }

    fn judge(&self, text: &str, name: &str, source: &Path, repo_url: &str) -> Answer {
        let Some(record) = parse_record(text) else {
            return Answer::NotAhead("look-ahead record damaged (checksum or format); ignored");
        };
        if record.name != name {
            return Answer::NotAhead("look-ahead record names another file; ignored");
        }
        if record.repo != repo_url {
            return Answer::NotAhead("look-ahead record is for another repository; ignored");
        }
        let Ok(meta) = fs::metadata(source) else {
            return Answer::NotAhead("cannot stat the file; not trusting its look-ahead record");
        };
        if FileStamp::of(&meta) == record.stamp {
            return Answer::Archived { bytes: record.stamp.len, rehashed: false };
        }
        // The stamp moved (a copy, a restore of pg_wal, touch): the content decides.
        match ContentDigest::of_file(source) {
            Ok(digest) if digest.len == record.stamp.len && digest.sha256_hex() == record.sha256 => {
                Answer::Archived { bytes: digest.len, rehashed: true }
            }
            _ => Answer::NotAhead("the file changed since its look-ahead upload; ignored"),
        }
    }

    /// Records that `name`, which looked like `stamp` before its upload began, is durably stored.
    fn record(&self, name: &str, repo_url: &str, stamp: FileStamp, digest: &ContentDigest) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let record = Record { name: name.to_owned(), repo: repo_url.to_owned(), stamp, sha256: digest.sha256_hex() };
        let json = serde_json::to_string(&record).expect("plain struct serializes");
        let check = ContentDigest::of(json.as_bytes()).sha256_hex();
        let temp = self.dir.join(process::temp_name(name));
        let mut file = fs::File::create(&temp)?;
        // No fsync: losing a record costs a re-push judged by content, never a wrong answer; the
        // record is only written once the upload it vouches for is durable.
        file.write_all(format!("{json}\n{check}\n").as_bytes())?;
        drop(file);
        fs::rename(&temp, self.record_path(name))
    }

    /// Removes records (and temporary files of dead writers) for segments that no longer wait to be
    /// archived: PostgreSQL has marked them `.done`, or they are gone.
    fn prune(&self) -> HashSet<String> {
        let mut kept = HashSet::new();
        let Ok(entries) = fs::read_dir(&self.dir) else { return kept };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else { continue };
            if name.starts_with('.') {
                if process::is_orphaned_temp(name) {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            if self.is_ready(name) {
                kept.insert(name.to_owned());
            } else {
                let _ = fs::remove_file(entry.path());
            }
        }
        kept
    }

    /// The lowest `limit` complete segments after `after`, marked `.ready` and not yet uploaded ahead.
    fn ready_after(&self, after: &WalFileName, limit: usize, skip: &HashSet<String>) -> Vec<String> {
        let mut lowest: BinaryHeap<String> = BinaryHeap::with_capacity(limit + 1);
        let Ok(entries) = fs::read_dir(self.pg_wal.join("archive_status")) else { return Vec::new() };
        let after = after.to_string();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".ready")) else { continue };
            let is_segment = WalFileName::parse(name).is_ok_and(|w| w.kind() == WalFileKind::Segment);
            // Names of one timeline sort in WAL order; a higher timeline sorts after a lower one,
            // which is also the order PostgreSQL archives them in.
            if !is_segment || name <= after.as_str() || skip.contains(name) {
                continue;
            }
            if lowest.len() < limit {
                lowest.push(name.to_owned());
            } else if lowest.peek().is_some_and(|highest| name < highest.as_str()) {
                lowest.pop();
                lowest.push(name.to_owned());
            }
        }
        lowest.into_sorted_vec()
    }
}

fn read_capped(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    file.take(RECORD_MAX_LEN).read_to_string(&mut text)?;
    Ok(Some(text))
}

fn parse_record(text: &str) -> Option<Record> {
    let (json, rest) = text.split_once('\n')?;
    if rest.trim_end() != ContentDigest::of(json.as_bytes()).sha256_hex() {
        return None;
    }
    serde_json::from_str(json).ok()
}

/// What one wal-push call did.
#[derive(Debug)]
pub struct BatchReport {
    /// The requested file's own outcome: the call's answer.
    pub requested: Result<PushReport, Error>,
    /// Segments uploaded ahead and recorded.
    pub ahead: Vec<String>,
    /// Segments tried ahead that failed (they are pushed again when PostgreSQL asks for them).
    pub ahead_failed: Vec<(String, Error)>,
}

/// Pushes `name` from `source` and, when `state` is given, up to `config.push.look_ahead` later
/// `.ready` segments, `config.push.parallel` at a time. Returns once every upload it started has
/// finished, so that no upload outlives the call.
pub async fn push_batch(
    repo: &Repository,
    config: &Config,
    log: &Log,
    source: &Path,
    name: &str,
    state: Option<&StateDir>,
) -> BatchReport {
    let look_ahead = match (state, WalFileName::parse(name)) {
        (Some(state), Ok(wal)) if config.push.look_ahead > 0 && wal.kind() == WalFileKind::Segment => {
            let recorded = state.prune();
            state.ready_after(&wal, config.push.look_ahead, &recorded)
        }
        _ => Vec::new(),
    };
    let level = config.compression_level;
    let deadline = config.deadline;
    let permits = Arc::new(tokio::sync::Semaphore::new(config.push.parallel));
    let push_one = |file: PathBuf, file_name: String| {
        let repo = repo.clone();
        let log = log.clone();
        let permits = permits.clone();
        async move {
            let _permit = permits.acquire_owned().await.expect("semaphore never closed");
            let stamp = fs::metadata(&file).map(|m| FileStamp::of(&m));
            let what = repo.describe_wal(&file_name);
            let result =
                crate::retry::with_deadline(deadline, &log, &what, || repo::push(&repo, &file, &file_name, level))
                    .await;
            (file_name, stamp, result)
        }
    };
    // The requested file first, so it takes the first permit. Each look-ahead is recorded as soon as
    // it is durable, whatever the requested file's upload is doing.
    let mut tasks = tokio::task::JoinSet::new();
    let requested_task = tasks.spawn(push_one(source.to_owned(), name.to_owned())).id();
    for segment in &look_ahead {
        let file = state.map(|s| s.pg_wal.join(segment)).expect("look-ahead implies a state directory");
        tasks.spawn(push_one(file, segment.clone()));
    }
    let repo_identity = config.repository_identity();
    let mut requested = None;
    let mut ahead = Vec::new();
    let mut ahead_failed = Vec::new();
    while let Some(joined) = tasks.join_next_with_id().await {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, Ok(outcome)),
            Err(e) => (e.id(), Err(e)),
        };
        if id == requested_task {
            requested = Some(match outcome {
                Ok((_, _, result)) => result,
                Err(e) => Err(Error::LocalIo {
                    path: source.display().to_string(),
                    operation: "archive",
                    source: std::io::Error::other(e.to_string()),
                }),
            });
            continue;
        }
        let Ok((segment, stamp, result)) = outcome else { continue };
        let state = state.expect("look-ahead implies a state directory");
        match (result, stamp) {
            (Ok(report), Ok(stamp)) => match state.record(&segment, &repo_identity, stamp, &report.digest) {
                Ok(()) => ahead.push(segment),
                Err(e) => log.debug(format_args!("{segment}: uploaded ahead, but no record written: {e}")),
            },
            (Err(e), _) => ahead_failed.push((segment, e)),
            (Ok(_), Err(e)) => {
                let file = state.pg_wal.join(&segment);
                ahead_failed.push((segment, Error::local_io(&file, "stat", e)));
            }
        }
    }
    let requested = requested.expect("the requested file's task was joined");
    ahead.sort();
    BatchReport { requested, ahead, ahead_failed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg_wal() -> (tempfile::TempDir, StateDir) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("archive_status")).unwrap();
        let state = StateDir::for_source(&dir.path().join("000000010000000000000001")).unwrap();
        (dir, state)
    }

    fn ready(dir: &Path, name: &str) {
        fs::write(dir.join("archive_status").join(format!("{name}.ready")), b"").unwrap();
    }

    #[test]
    fn only_a_pg_wal_directory_has_state() {
        let dir = tempfile::tempdir().unwrap();
        assert!(StateDir::for_source(&dir.path().join("000000010000000000000001")).is_none());
        let (_dir, state) = pg_wal();
        assert!(state.dir().ends_with(STATE_DIR));
    }

    #[test]
    fn the_scan_keeps_the_lowest_ready_segments_after_the_requested_one() {
        let (dir, state) = pg_wal();
        for n in [9u32, 3, 1, 7, 2, 5, 8] {
            ready(dir.path(), &format!("0000000100000000000000{n:02X}"));
        }
        ready(dir.path(), "00000002.history");
        ready(dir.path(), "000000010000000000000004.partial");
        fs::write(dir.path().join("archive_status/000000010000000000000006.done"), b"").unwrap();
        let after = WalFileName::parse("000000010000000000000002").unwrap();
        let skip: HashSet<String> = ["000000010000000000000005".to_owned()].into();
        assert_eq!(
            state.ready_after(&after, 3, &skip),
            ["000000010000000000000003", "000000010000000000000007", "000000010000000000000008"]
        );
        assert!(state.ready_after(&after, 0, &skip).is_empty());
    }

    #[test]
    fn records_are_trusted_only_for_the_same_file_and_repository() {
        let (dir, state) = pg_wal();
        let name = "000000010000000000000003";
        let file = dir.path().join(name);
        fs::write(&file, b"segment content").unwrap();
        let digest = ContentDigest::of(b"segment content");
        let stamp = || FileStamp::of(&fs::metadata(&file).unwrap());

        state.record(name, "file:///repo", stamp(), &digest).unwrap();
        assert_eq!(state.answer(name, &file, "file:///repo"), Answer::Archived { bytes: 15, rehashed: false });
        assert_eq!(state.answer(name, &file, "file:///repo"), Answer::NotAhead("no look-ahead record"), "used once");

        state.record(name, "file:///repo", stamp(), &digest).unwrap();
        assert!(matches!(state.answer(name, &file, "s3://other"), Answer::NotAhead(_)));

        // Same content, another inode: trusted after hashing.
        state.record(name, "file:///repo", stamp(), &digest).unwrap();
        fs::copy(&file, dir.path().join("copy")).unwrap();
        fs::rename(dir.path().join("copy"), &file).unwrap();
        assert_eq!(state.answer(name, &file, "file:///repo"), Answer::Archived { bytes: 15, rehashed: true });

        // Changed content: not trusted.
        state.record(name, "file:///repo", stamp(), &digest).unwrap();
        fs::write(&file, b"segment CONTENT").unwrap();
        assert!(matches!(state.answer(name, &file, "file:///repo"), Answer::NotAhead(_)));

        // A damaged record: ignored and removed.
        fs::write(&file, b"segment content").unwrap();
        state.record(name, "file:///repo", stamp(), &digest).unwrap();
        let path = state.record_path(name);
        let text = fs::read_to_string(&path).unwrap().replace("\"len\":15", "\"len\":16");
        fs::write(&path, text).unwrap();
        assert_eq!(
            state.answer(name, &file, "file:///repo"),
            Answer::NotAhead("look-ahead record damaged (checksum or format); ignored")
        );
        assert!(!path.exists());
    }

    #[test]
    fn a_name_that_is_not_a_wal_file_never_reaches_the_file_system() {
        let (dir, state) = pg_wal();
        // walship/pushed/../../victim is pg_wal/victim: a record path must never be built from it.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"not ours").unwrap();
        assert_eq!(state.answer("../../victim", &victim, "r"), Answer::NotAhead("not a WAL file name"));
        assert_eq!(fs::read(&victim).unwrap(), b"not ours");
    }

    #[test]
    fn records_of_segments_no_longer_ready_are_pruned() {
        let (dir, state) = pg_wal();
        let digest = ContentDigest::of(b"x");
        let file = dir.path().join("x");
        fs::write(&file, b"x").unwrap();
        let stamp = FileStamp::of(&fs::metadata(&file).unwrap());
        for name in ["000000010000000000000003", "000000010000000000000004"] {
            state.record(name, "r", stamp.clone(), &digest).unwrap();
        }
        ready(dir.path(), "000000010000000000000004");
        fs::write(state.dir().join(".000000010000000000000005.walship.2147483000.tmp"), b"").unwrap();
        let kept = state.prune();
        assert_eq!(kept, ["000000010000000000000004".to_owned()].into());
        assert_eq!(fs::read_dir(state.dir()).unwrap().count(), 1);
    }
}
