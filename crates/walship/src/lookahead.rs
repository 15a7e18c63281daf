//! wal-push's look-ahead: while PostgreSQL waits for segment N, upload the next segments it has
//! already marked `.ready`, in parallel, and remember each durable upload in a small state directory
//! under `pg_wal`, so that PostgreSQL's later calls for them are answered after a local check.
//!
//! ```text
//! pg_wal/archive_status/<name>.ready    PostgreSQL's: the segment is complete and waits to be archived
//! pg_wal/walship/pushed/<name>          ours: <name> is durably in repository <repo> (location and
//!                                       random id), since <time>, and this is how the file looked
//!                                       (device, inode, size, mtime, ctime, sha256)
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
//! - A record answers only for the repository the call would write to now: before it is used, the
//!   identity record at the configured location is read and must carry the record's repository id,
//!   and the segment's object must still be there (two small requests). A repository wiped and made
//!   anew at the same location has another id, so its segments are uploaded for real. Records
//!   older than [`MAX_RECORD_AGE`] are not used, and every record is removed when a call fails or
//!   finds another repository id or a recorded object gone: a failing call is when operators wipe
//!   or recreate repositories.
//! - The answer for N itself comes only from N's own durable upload (or its record).
//! - Memory is bounded: the scan of `archive_status` keeps only the `look_ahead` lowest candidates.

use std::collections::{BinaryHeap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::ContentDigest;
use crate::config::Config;
use crate::error::Error;
use crate::fs::{self as files, parent_dir};
use crate::log::Log;
use crate::repo::{self, IDENTITY_KEY, Identity, PushReport, Repository};
use crate::retry::{self, Deadline};
use crate::wal::{WalFileKind, WalFileName};

/// The state directory, relative to `pg_wal`.
pub const STATE_DIR: &str = "walship/pushed";
const RECORD_MAX_LEN: u64 = 4096;
/// A record older than this is not used (and is pruned). PostgreSQL asks for the segments uploaded
/// ahead within seconds while it catches up; a record that waited longer means archiving stalled
/// (failures, a stopped server), which is when repositories get wiped, restored or replaced. The
/// repository-id check already catches a replaced repository; the age bounds what any record can
/// vouch for whatever else happened meanwhile, at the cost of a re-push judged by content.
pub const MAX_RECORD_AGE: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// Clocks may step back a little (NTP); a record from further in the future is not trusted.
const CLOCK_SLACK_SECS: u64 = 5;

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
    /// The `repository_id` of the identity record the upload went under (`None`: a repository made
    /// before ids).
    repository_id: Option<String>,
    /// When the upload was durable, in seconds since the Unix epoch. Required: records written
    /// before the field existed do not parse, so they are never trusted.
    created_at: u64,
    stamp: FileStamp,
    sha256: String,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn is_fresh(created_at: u64, now: u64) -> bool {
    created_at <= now + CLOCK_SLACK_SECS && now.saturating_sub(created_at) <= MAX_RECORD_AGE.as_secs()
}

/// What [`StateDir::lookup`] found locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A fresh record for this very file; [`StateDir::confirm`] decides whether it answers.
    Candidate(Candidate),
    /// No usable record: push it the normal way. The reason is for `-v`.
    NotAhead(&'static str),
}

/// A record that holds locally: the file is unchanged since its upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The segment's size, as recorded.
    pub bytes: u64,
    /// The stamp had moved and the SHA-256 decided.
    pub rehashed: bool,
    repository_id: Option<String>,
    /// The segment's key in the repository.
    key: String,
}

/// What [`StateDir::confirm`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Uploaded ahead into the repository the call would write to now, and unchanged since.
    Archived {
        /// The segment's size.
        bytes: u64,
        /// The stamp had moved and the SHA-256 decided.
        rehashed: bool,
    },
    /// Push it the normal way. The reason is for `-v`.
    NotAhead(String),
}

impl StateDir {
    /// The state directory for `source`, PostgreSQL's `%p`, when it lies in a `pg_wal` directory
    /// (one with `archive_status` beside it); `None` for a file archived by hand from elsewhere.
    pub fn for_source(source: &Path) -> Option<StateDir> {
        let pg_wal = parent_dir(source).to_owned();
        pg_wal.join("archive_status").is_dir().then(|| StateDir { dir: pg_wal.join(STATE_DIR), pg_wal })
    }

    /// The state directory itself (`pg_wal/walship/pushed`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `pg_wal` directory the state belongs to.
    pub fn pg_wal(&self) -> &Path {
        &self.pg_wal
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn is_ready(&self, name: &str) -> bool {
        self.pg_wal.join("archive_status").join(format!("{name}.ready")).exists()
    }

    /// The cheap local check before any network: was `name` (at `source`) uploaded ahead into
    /// `store_location`, recently, and is the file unchanged since? A record that is used or found wanting
    /// is removed: PostgreSQL marks the segment `.done` after our answer, and a bad record must not be
    /// looked at twice.
    pub fn lookup(&self, name: &str, source: &Path, store_location: &str) -> Lookup {
        let Ok(wal) = WalFileName::parse(name) else {
            return Lookup::NotAhead("not a WAL file name");
        };
        let path = self.record_path(name);
        let text = match read_capped(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return Lookup::NotAhead("no look-ahead record"),
            Err(_) => return Lookup::NotAhead("look-ahead record unreadable"),
        };
        let verdict = self.judge(&text, &wal, source, store_location, now_unix());
        let _ = fs::remove_file(&path);
        verdict
    }

    fn judge(&self, text: &str, wal: &WalFileName, source: &Path, store_location: &str, now: u64) -> Lookup {
        let Some(record) = parse_record(text) else {
            return Lookup::NotAhead("look-ahead record damaged (checksum or format); ignored");
        };
        if record.name != wal.as_str() {
            return Lookup::NotAhead("look-ahead record names another file; ignored");
        }
        if record.repo != store_location {
            return Lookup::NotAhead("look-ahead record is for another repository; ignored");
        }
        if !is_fresh(record.created_at, now) {
            return Lookup::NotAhead("look-ahead record too old (or from the future); ignored");
        }
        let key = Repository::wal_key(wal);
        let candidate = |bytes, rehashed| {
            Lookup::Candidate(Candidate {
                bytes,
                rehashed,
                repository_id: record.repository_id.clone(),
                key: key.clone(),
            })
        };
        let Ok(meta) = fs::metadata(source) else {
            return Lookup::NotAhead("cannot stat the file; not trusting its look-ahead record");
        };
        if FileStamp::of(&meta) == record.stamp {
            return candidate(record.stamp.len, false);
        }
        // The stamp moved (a copy, a restore of pg_wal, touch): the content decides.
        match ContentDigest::of_file(source) {
            Ok(digest) if digest.len == record.stamp.len && digest.sha256_hex() == record.sha256 => {
                candidate(digest.len, true)
            }
            _ => Lookup::NotAhead("the file changed since its look-ahead upload; ignored"),
        }
    }

    /// Decides a [`Candidate`] against the repository the call would write to now: its identity
    /// record must exist and carry the record's repository id, and it must still hold the object.
    /// Another id (the repository was made anew at this location) or a missing object (a snapshot
    /// of the repository put back, objects removed by hand) removes every record, since none of
    /// them can be trusted for that repository.
    pub async fn confirm(&self, candidate: Candidate, repo: &Repository, deadline: Deadline, log: &Log) -> Answer {
        let location = repo.storage().location(IDENTITY_KEY);
        let now = match retry::until(deadline, log, &location, || repo.identity()).await {
            Ok(Some(identity)) if identity.repository_id == candidate.repository_id => {
                return self.confirm_object(candidate, repo, deadline, log).await;
            }
            Ok(Some(Identity { repository_id: Some(id), .. })) => format!("repository {id}"),
            Ok(Some(_)) => "a repository without an id".into(),
            Ok(None) => "no repository".into(),
            Err(e) => return Answer::NotAhead(format!("the record cannot be checked against the repository: {e}")),
        };
        self.forget_all();
        Answer::NotAhead(format!(
            "{location} now holds {now}, not the one the look-ahead record names; every record removed"
        ))
    }

    async fn confirm_object(&self, candidate: Candidate, repo: &Repository, deadline: Deadline, log: &Log) -> Answer {
        let object = repo.storage().location(&candidate.key);
        let head = || async { repo.storage().head(&candidate.key).await.map_err(Error::from) };
        match retry::until(deadline, log, &object, head).await {
            Ok(_) => Answer::Archived { bytes: candidate.bytes, rehashed: candidate.rehashed },
            Err(Error::Storage(e)) if e.is_not_found() => {
                self.forget_all();
                Answer::NotAhead(format!("{object} is not in the repository any more; every record removed"))
            }
            Err(e) => Answer::NotAhead(format!("the record cannot be checked against the repository: {e}")),
        }
    }

    /// Removes every record: after a failed call, or when the repository is not the one they name.
    /// Best effort; a record left behind is still checked against the repository before it is used.
    pub fn forget_all(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with('.') {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Records that `name`, which looked like `stamp` before its upload began, is durably stored in
    /// the repository with id `repository_id`.
    fn record(
        &self,
        name: &str,
        store_location: &str,
        repository_id: Option<String>,
        stamp: FileStamp,
        digest: &ContentDigest,
    ) -> std::io::Result<()> {
        self.write_record(&Record {
            name: name.to_owned(),
            repo: store_location.to_owned(),
            repository_id,
            created_at: now_unix(),
            stamp,
            sha256: digest.sha256_hex(),
        })
    }

    fn write_record(&self, record: &Record) -> std::io::Result<()> {
        let name = &record.name;
        fs::create_dir_all(&self.dir)?;
        let json = serde_json::to_string(record).expect("plain struct serializes");
        let check = ContentDigest::of(json.as_bytes()).sha256_hex();
        // No fsync: losing a record costs a re-push judged by content, never a wrong answer; the
        // record is only written once the upload it vouches for is durable.
        files::replace_file(&self.record_path(name), format!("{json}\n{check}\n").as_bytes(), false)
    }

    /// Removes records (and temporary files of dead writers) for segments that no longer wait to be
    /// archived (PostgreSQL has marked them `.done`, or they are gone), and records that could not be
    /// used (damaged, too old), so that those segments may go ahead again.
    fn prune(&self) -> HashSet<String> {
        let now = now_unix();
        let mut kept = HashSet::new();
        let Ok(entries) = fs::read_dir(&self.dir) else { return kept };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else { continue };
            if name.starts_with('.') {
                if files::is_orphaned_temp(name) {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            let usable = || {
                let record = read_capped(&entry.path()).ok().flatten().and_then(|text| parse_record(&text));
                record.is_some_and(|r| is_fresh(r.created_at, now))
            };
            if self.is_ready(name) && usable() {
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
/// `.ready` segments, `config.push.parallel` at a time. Every upload, requested or ahead, retries only
/// until the call's one `deadline` (an upload that waited for its turn does not get a deadline of
/// its own), and the call returns once every upload it started has finished, so that no upload
/// outlives the call and a failing repository holds PostgreSQL's archiver for one deadline.
pub async fn push_batch(
    repo: &Repository,
    config: &Config,
    log: &Log,
    deadline: Deadline,
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
    let permits = Arc::new(tokio::sync::Semaphore::new(config.push.parallel.max(1)));
    let push_one = |file: PathBuf, file_name: String, permit: Option<tokio::sync::OwnedSemaphorePermit>| {
        let repo = repo.clone();
        let log = log.clone();
        let permits = permits.clone();
        async move {
            let _permit = match permit {
                Some(permit) => permit,
                None => permits.acquire_owned().await.expect("semaphore never closed"),
            };
            let stamp = fs::metadata(&file).map(|m| FileStamp::of(&m));
            let what = repo.describe_wal(&file_name);
            let result = retry::until(deadline, &log, &what, || repo::push(&repo, &file, &file_name, level)).await;
            (file_name, stamp, result)
        }
    };
    // The requested file takes the first permit before any look-ahead exists: with one deadline for
    // all, an upload ahead that took its turn could otherwise spend the requested file's time. Each
    // look-ahead is recorded as soon as it is durable, whatever the requested file's upload is doing.
    let first = permits.clone().try_acquire_owned().expect("parallel is at least 1 and nothing holds a permit yet");
    let mut tasks = tokio::task::JoinSet::new();
    let requested_task = tasks.spawn(push_one(source.to_owned(), name.to_owned(), Some(first))).id();
    for segment in &look_ahead {
        let file = state.map(|s| s.pg_wal.join(segment)).expect("look-ahead implies a state directory");
        tasks.spawn(push_one(file, segment.clone(), None));
    }
    let store_location = config.store_location();
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
        match settle_ahead(state, repo, &store_location, log, segment, stamp, result).await {
            Ahead::Recorded(segment) => ahead.push(segment),
            Ahead::Failed(segment, e) => ahead_failed.push((segment, e)),
            Ahead::Unrecorded => {}
        }
    }
    let requested = requested.expect("the requested file's task was joined");
    ahead.sort();
    BatchReport { requested, ahead, ahead_failed }
}

/// What became of one upload ahead.
enum Ahead {
    Recorded(String),
    /// Stored, but without a record: PostgreSQL's own call judges it by content.
    Unrecorded,
    Failed(String, Error),
}

/// Records an upload ahead that is durable, with the id of the repository it went into.
async fn settle_ahead(
    state: &StateDir,
    repo: &Repository,
    store_location: &str,
    log: &Log,
    segment: String,
    stamp: std::io::Result<FileStamp>,
    result: Result<PushReport, Error>,
) -> Ahead {
    let (report, stamp) = match (result, stamp) {
        (Ok(report), Ok(stamp)) => (report, stamp),
        (Err(e), _) => return Ahead::Failed(segment, e),
        (Ok(_), Err(e)) => {
            let file = state.pg_wal.join(&segment);
            return Ahead::Failed(segment, Error::local_io(&file, "stat", e));
        }
    };
    // Known since the upload: each push reads (or creates) the identity record first, and the
    // repository keeps it.
    let Ok(Some(identity)) = repo.identity().await else {
        log.debug(format_args!("{segment}: uploaded ahead, but no record: repository id unknown"));
        return Ahead::Unrecorded;
    };
    match state.record(&segment, store_location, identity.repository_id, stamp, &report.digest) {
        Ok(()) => Ahead::Recorded(segment),
        Err(e) => {
            log.debug(format_args!("{segment}: uploaded ahead, but no record written: {e}"));
            Ahead::Unrecorded
        }
    }
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

        let id = || Some("0123".to_owned());
        let key = format!("wal/0000000100000000/{name}");
        let candidate =
            |rehashed| Lookup::Candidate(Candidate { bytes: 15, rehashed, repository_id: id(), key: key.clone() });
        state.record(name, "file:///repo", id(), stamp(), &digest).unwrap();
        assert_eq!(state.lookup(name, &file, "file:///repo"), candidate(false));
        assert_eq!(state.lookup(name, &file, "file:///repo"), Lookup::NotAhead("no look-ahead record"), "used once");

        state.record(name, "file:///repo", id(), stamp(), &digest).unwrap();
        assert!(matches!(state.lookup(name, &file, "s3://other"), Lookup::NotAhead(_)));

        // Same content, another inode: trusted after hashing.
        state.record(name, "file:///repo", id(), stamp(), &digest).unwrap();
        fs::copy(&file, dir.path().join("copy")).unwrap();
        fs::rename(dir.path().join("copy"), &file).unwrap();
        assert_eq!(state.lookup(name, &file, "file:///repo"), candidate(true));

        // Changed content: not trusted.
        state.record(name, "file:///repo", id(), stamp(), &digest).unwrap();
        fs::write(&file, b"segment CONTENT").unwrap();
        assert!(matches!(state.lookup(name, &file, "file:///repo"), Lookup::NotAhead(_)));

        // A damaged record: ignored and removed.
        fs::write(&file, b"segment content").unwrap();
        state.record(name, "file:///repo", id(), stamp(), &digest).unwrap();
        let path = state.record_path(name);
        let text = fs::read_to_string(&path).unwrap().replace("\"len\":15", "\"len\":16");
        fs::write(&path, text).unwrap();
        assert_eq!(
            state.lookup(name, &file, "file:///repo"),
            Lookup::NotAhead("look-ahead record damaged (checksum or format); ignored")
        );
        assert!(!path.exists());
    }

    #[test]
    fn a_name_that_is_not_a_wal_file_never_reaches_the_file_system() {
        let (dir, state) = pg_wal();
        // walship/pushed/../../victim is pg_wal/victim: a record path must never be built from it.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"not ours").unwrap();
        assert_eq!(state.lookup("../../victim", &victim, "r"), Lookup::NotAhead("not a WAL file name"));
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
            state.record(name, "r", None, stamp.clone(), &digest).unwrap();
        }
        ready(dir.path(), "000000010000000000000004");
        fs::write(state.dir().join(".000000010000000000000005.walship.2147483000.tmp"), b"").unwrap();
        let kept = state.prune();
        assert_eq!(kept, ["000000010000000000000004".to_owned()].into());
        assert_eq!(fs::read_dir(state.dir()).unwrap().count(), 1);
    }

    fn a_record(state: &StateDir, dir: &Path, name: &str, repository_id: Option<&str>, created_at: u64) -> PathBuf {
        let file = dir.join(name);
        fs::write(&file, b"segment content").unwrap();
        let record = Record {
            name: name.to_owned(),
            repo: "r".into(),
            repository_id: repository_id.map(str::to_owned),
            created_at,
            stamp: FileStamp::of(&fs::metadata(&file).unwrap()),
            sha256: ContentDigest::of(b"segment content").sha256_hex(),
        };
        state.write_record(&record).unwrap();
        file
    }

    #[test]
    fn only_young_records_answer() {
        let (dir, state) = pg_wal();
        let name = "000000010000000000000003";
        let now = now_unix();
        let old = now - MAX_RECORD_AGE.as_secs() - 1;
        for created_at in [old, now + 60] {
            let file = a_record(&state, dir.path(), name, Some("id"), created_at);
            assert!(matches!(state.lookup(name, &file, "r"), Lookup::NotAhead(reason) if reason.contains("too old")));
        }
        let file = a_record(&state, dir.path(), name, Some("id"), now - 1);
        assert!(matches!(state.lookup(name, &file, "r"), Lookup::Candidate(_)));

        // An old record of a segment still .ready is pruned, so that the segment goes ahead again.
        ready(dir.path(), name);
        ready(dir.path(), "000000010000000000000004");
        a_record(&state, dir.path(), name, Some("id"), old);
        a_record(&state, dir.path(), "000000010000000000000004", Some("id"), now);
        assert_eq!(state.prune(), ["000000010000000000000004".to_owned()].into());
        assert!(!state.record_path(name).exists());
        let records_without_time = concat!(
            r#"{"name":"000000010000000000000004","repo":"r","#,
            r#""stamp":{"dev":1,"ino":1,"len":1,"mtime_ns":1,"ctime_ns":1},"sha256":"00"}"#
        );
        assert!(
            parse_record(&format!(
                "{records_without_time}\n{}\n",
                ContentDigest::of(records_without_time.as_bytes()).sha256_hex()
            ))
            .is_none(),
            "records of older versions are never trusted"
        );
    }

    #[tokio::test]
    async fn a_record_answers_only_for_the_repository_with_its_id() {
        use crate::repo::ClusterFacts;
        use crate::storage::local::LocalStorage;
        let (dir, state) = pg_wal();
        let store = tempfile::tempdir().unwrap();
        let repo = || {
            let storage = LocalStorage::open(store.path()).unwrap();
            Repository::with_storage(Box::new(storage), format!("file://{}", store.path().display()))
        };
        let deadline = Deadline::starting_now(std::time::Duration::from_secs(5));
        let log = Log::quiet();
        let (three, four) = ("000000010000000000000003", "000000010000000000000004");
        let lookup = |name: &str, file: &Path| match state.lookup(name, file, "r") {
            Lookup::Candidate(candidate) => candidate,
            other => panic!("{other:?}"),
        };

        // No repository there now: not trusted.
        let file = a_record(&state, dir.path(), three, Some("id"), now_unix());
        let answer = state.confirm(lookup(three, &file), &repo(), deadline, &log).await;
        assert!(matches!(&answer, Answer::NotAhead(reason) if reason.contains("no repository")), "{answer:?}");

        let facts = ClusterFacts { system_identifier: 7, pg_version: 15, wal_segment_size: 16 << 20 };
        let id = repo().ensure_identity(&facts, "seg").await.unwrap().repository_id;
        let object = store.path().join("wal/0000000100000000").join(three);
        fs::create_dir_all(object.parent().unwrap()).unwrap();
        fs::write(&object, b"stored").unwrap();
        let file = a_record(&state, dir.path(), three, id.as_deref(), now_unix());
        let answer = state.confirm(lookup(three, &file), &repo(), deadline, &log).await;
        assert_eq!(answer, Answer::Archived { bytes: 15, rehashed: false });

        // The same repository, but the object is gone (a snapshot of the repository put back).
        fs::remove_file(&object).unwrap();
        let file = a_record(&state, dir.path(), three, id.as_deref(), now_unix());
        a_record(&state, dir.path(), four, id.as_deref(), now_unix());
        let answer = state.confirm(lookup(three, &file), &repo(), deadline, &log).await;
        assert!(matches!(&answer, Answer::NotAhead(reason) if reason.contains("not in the repository")), "{answer:?}");
        assert!(!state.record_path(four).exists());

        // Made anew at the same place: another id, and every record goes.
        fs::remove_file(store.path().join(IDENTITY_KEY)).unwrap();
        repo().ensure_identity(&facts, "seg").await.unwrap();
        let file = a_record(&state, dir.path(), three, id.as_deref(), now_unix());
        a_record(&state, dir.path(), four, id.as_deref(), now_unix());
        let answer = state.confirm(lookup(three, &file), &repo(), deadline, &log).await;
        assert!(matches!(&answer, Answer::NotAhead(reason) if reason.contains("every record removed")), "{answer:?}");
        assert!(!state.record_path(four).exists());
    }
}
