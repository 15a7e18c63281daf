//! wal-push's look-ahead (`crates/walship/src/lookahead.rs`), proven with synthetic segments in a fake
//! data directory and no PostgreSQL server: while PostgreSQL waits for segment N, wal-push also uploads
//! the next segments marked `.ready` in `pg_wal/archive_status`, records each durable upload in
//! `pg_wal/walship/pushed/`, and answers PostgreSQL's later calls for them from those records after a
//! local check, without touching the repository.
//!
//! What must hold, whatever happens: only `.ready` segments after the requested one go ahead, at most
//! `[push] look_ahead` of them; `archive_status` is never written; a record exists only for an object
//! that is durably and completely stored; a record is trusted only for the same file (or the same
//! content) and the same repository; the requested segment's answer never depends on a look-ahead
//! upload; and a wal-push killed at any moment loses nothing and acknowledges nothing early, so
//! PostgreSQL's retries archive every segment.
//!
//! Each test runs the binaries the way PostgreSQL would: as the server's OS user, from the data
//! directory, with `pg_wal/<name> <name>` as `%p %f`. Every command is waited for with a bound, so a
//! hang fails the test instead of stalling the suite.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walship_tests::assertions::{assert_absent, assert_error, assert_no_temp_files, assert_ok};
use walship_tests::datadir::FakeDataDir;
use walship_tests::proxy::{Fault, Proxy, Request, Rule, Seen};
use walship_tests::repository::{ConfigLines, Repository};
use walship_tests::s3::{S3Server, assert_no_multipart_leftovers, write_config_file};
use walship_tests::segments::{
    self, Fill, MIN_SEGMENT_SIZE, Segment, backup_label, history_content, history_name, wal_key,
};
use walship_tests::{Output, walship};

const BUCKET: &str = "walship-test";
const PREFIX: &str = "db1";
/// The longest any single command may take before the test calls it hung.
const HANG_LIMIT: Duration = Duration::from_secs(120);
/// The longest a test waits for a condition (an upload, a stall) to come about.
const CONDITION_LIMIT: Duration = Duration::from_secs(60);
/// Settings for S3 configurations: nothing is meant to time out on its own during a test.
const S3_TOP: &str = "deadline_secs = 60";
const S3_SOCKETS: &str = "connect_timeout_secs = 2\nread_timeout_secs = 10";
const ARCHIVED_AHEAD: &str = "archived ahead by an earlier call";

/// Segment `n` of timeline 1 in a cluster of 1 MiB segments.
fn seg(n: u64) -> String {
    segments::segment_name(1, n, MIN_SEGMENT_SIZE)
}

fn segs(numbers: impl IntoIterator<Item = u64>) -> Vec<String> {
    numbers.into_iter().map(seg).collect()
}

fn set(names: &[String]) -> BTreeSet<String> {
    names.iter().cloned().collect()
}

/// Waits up to `limit` for `condition`; true if it came about.
fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------------
// Running the commands.
// ---------------------------------------------------------------------------------------------------

/// A command started with stdout and stderr going to files, so that they can be read while it runs
/// and after it was killed.
struct Running {
    child: Child,
    what: String,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
    started: Instant,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        let what = format!("{:?} {:?}", cmd.get_program(), cmd.get_args().collect::<Vec<_>>());
        let stdout = tempfile::NamedTempFile::new().unwrap();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout.reopen().unwrap()))
            .stderr(Stdio::from(stderr.reopen().unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Running { child, what, stdout, stderr, started: Instant::now() }
    }

    fn stderr_so_far(&self) -> String {
        fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    fn output(&self, code: Option<i32>) -> Output {
        Output {
            code,
            stdout: fs::read_to_string(self.stdout.path()).unwrap_or_default(),
            stderr: self.stderr_so_far(),
        }
    }

    /// Waits for the command to exit; kills it and fails the test if it takes longer than `limit`.
    #[track_caller]
    fn finish(mut self, limit: Duration) -> Output {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return self.output(status.code());
            }
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} hung: still running after {} s; stderr: {}",
                    self.what,
                    limit.as_secs(),
                    self.stderr_so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, as the OOM killer or a crash would; returns what it wrote until then.
    fn kill(mut self) -> Output {
        // Child::kill sends SIGKILL.
        self.child.kill().unwrap_or_else(|e| panic!("kill {}: {e}", self.what));
        let status = self.child.wait().unwrap();
        self.output(status.code())
    }
}

fn run_bounded(cmd: &mut Command) -> Output {
    Running::spawn(cmd).finish(HANG_LIMIT)
}

// ---------------------------------------------------------------------------------------------------
// A fake data directory.
// ---------------------------------------------------------------------------------------------------

/// A data directory with `pg_wal/archive_status`, as PostgreSQL keeps it, and a directory to restore
/// into that is no data directory (no postmaster.pid, so wal-fetch starts no prefetch worker).
struct DataDir {
    dir: FakeDataDir,
    status: PathBuf,
    restore: PathBuf,
}

/// The scratch directory, `data` and `wal` are the plain data directory's.
impl std::ops::Deref for DataDir {
    type Target = FakeDataDir;

    fn deref(&self) -> &FakeDataDir {
        &self.dir
    }
}

impl DataDir {
    fn new(label: &str) -> DataDir {
        let dir = FakeDataDir::new(label);
        let status = dir.scratch.mkdir("pgdata/pg_wal/archive_status");
        let restore = dir.scratch.mkdir("restore");
        DataDir { dir, status, restore }
    }

    /// Writes segments `numbers` (1 MiB, `fill`) into pg_wal; returns their names and contents.
    fn write_segments(&self, numbers: impl IntoIterator<Item = u64>, fill: Fill) -> Vec<(String, Vec<u8>)> {
        numbers
            .into_iter()
            .map(|n| {
                let segment = Segment::new(&seg(n)).fill(fill);
                (segment.name().to_owned(), self.write_segment(&segment))
            })
            .collect()
    }

    /// [`write_segments`](Self::write_segments), each marked `.ready`: a backlog PostgreSQL waits to
    /// archive.
    fn write_ready(&self, numbers: impl IntoIterator<Item = u64> + Clone, fill: Fill) -> Vec<(String, Vec<u8>)> {
        let written = self.write_segments(numbers.clone(), fill);
        for n in numbers {
            self.mark(&seg(n), "ready");
        }
        written
    }

    /// Segments 1 to `last` waiting `.ready`, and PostgreSQL's call for 1 (`what`), which uploads
    /// the others ahead and records each; 1 is then marked done. Returns every segment's content.
    #[track_caller]
    fn push_first_of(&self, repo_args: &[OsString], last: u64, what: &str) -> Vec<(String, Vec<u8>)> {
        let originals = self.write_ready(1..=last, Fill::WalLike);
        assert_ok(&self.push(repo_args, &seg(1)), what);
        assert_eq!(self.records(), set(&segs(2..=last)), "{}", self.describe());
        self.mark_done(&seg(1));
        originals
    }

    /// PostgreSQL's status file `archive_status/<name>.<suffix>` (`ready` or `done`).
    fn mark(&self, name: &str, suffix: &str) {
        segments::write_file(&self.status.join(format!("{name}.{suffix}")), b"");
    }

    /// What PostgreSQL does once archive_command returned 0 for `name`.
    fn mark_done(&self, name: &str) {
        fs::rename(self.status.join(format!("{name}.ready")), self.status.join(format!("{name}.done")))
            .unwrap_or_else(|e| panic!("rename {name}.ready to .done: {e}; {}", self.describe()));
    }

    /// The segments PostgreSQL still has to archive, in the order it archives them.
    fn ready(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.status)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".ready").map(str::to_owned))
            .collect();
        names.sort();
        names
    }

    /// Every file in `archive_status` with its content, inode and modification time: anything that
    /// writes, renames or replaces one shows up.
    fn status_snapshot(&self) -> Vec<(String, Vec<u8>, u64, i64, i64)> {
        let mut files: Vec<_> = fs::read_dir(&self.status)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, fs::read(e.path()).unwrap(), meta.ino(), meta.mtime(), meta.mtime_nsec())
            })
            .collect();
        files.sort();
        files
    }

    fn pushed_dir(&self) -> PathBuf {
        self.wal.join("walship/pushed")
    }

    fn record(&self, name: &str) -> PathBuf {
        self.pushed_dir().join(name)
    }

    /// The look-ahead records (hidden temporary files excluded).
    fn records(&self) -> BTreeSet<String> {
        let Ok(entries) = fs::read_dir(self.pushed_dir()) else { return BTreeSet::new() };
        entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect()
    }

    fn push_cmd(&self, repo_args: &[OsString], name: &str) -> Command {
        let mut cmd = walship("wal-push");
        cmd.current_dir(&self.data).args(repo_args).arg(format!("pg_wal/{name}")).arg(name);
        cmd
    }

    /// `wal-push REPO_ARGS pg_wal/<name> <name>` from the data directory, as archive_command.
    fn push(&self, repo_args: &[OsString], name: &str) -> Output {
        run_bounded(&mut self.push_cmd(repo_args, name))
    }

    /// `wal-fetch REPO_ARGS <name> <name>` in the restore directory.
    fn fetch(&self, repo_args: &[OsString], name: &str) -> Output {
        run_bounded(walship("wal-fetch").current_dir(&self.restore).args(repo_args).arg(name).arg(name))
    }

    /// Fetches `name` and checks that exactly `expected` comes back.
    #[track_caller]
    fn assert_fetches(&self, repo_args: &[OsString], name: &str, expected: &[u8]) {
        let out = self.fetch(repo_args, name);
        assert_ok(&out, &format!("fetch {name}"));
        let restored = self.restore.join(name);
        let bytes = fs::read(&restored).unwrap_or_else(|e| panic!("the restored {name}: {e}"));
        assert!(bytes == expected, "fetch {name}: {} bytes that differ from the segment", bytes.len());
        fs::remove_file(restored).unwrap();
    }

    /// PostgreSQL's archiver after a crash: archives every `.ready` segment in order, marking each
    /// `.done` once archive_command returned 0. Returns every call's output.
    #[track_caller]
    fn archive_everything_ready(&self, repo_args: &[OsString]) -> Vec<(String, Output)> {
        let mut calls = Vec::new();
        while let Some(name) = self.ready().into_iter().next() {
            let out = self.push(repo_args, &name);
            assert_eq!(
                out.code,
                Some(0),
                "PostgreSQL's retry of {name} failed: {out:#?}\nearlier calls: {calls:#?}\n{}",
                self.describe()
            );
            self.mark_done(&name);
            calls.push((name, out));
        }
        calls
    }

    /// For failure messages: what pg_wal, archive_status and the state directory hold.
    fn describe(&self) -> String {
        let list = |dir: &Path| -> Vec<String> {
            let Ok(entries) = fs::read_dir(dir) else { return vec!["(missing)".into()] };
            let mut names: Vec<String> =
                entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        };
        format!(
            "pg_wal: {:?}\narchive_status: {:?}\nwalship/pushed: {:?}",
            list(&self.wal),
            list(&self.status),
            list(&self.pushed_dir())
        )
    }
}

/// The segments whose objects `repo` holds.
fn archived(repo: &Repository) -> BTreeSet<String> {
    repo.keys_under("wal/").into_iter().map(|k| k.rsplit('/').next().unwrap().to_owned()).collect()
}

/// A data directory beside a new repository on local disk, and `--config FILE` for that repository
/// with `push` as its `[push]` table.
fn local_setup(label: &str, push: &str) -> (DataDir, Repository, Vec<OsString>) {
    let d = DataDir::new(label);
    let repo = Repository::local(&d.scratch);
    let args = local_config(&repo, d.scratch.path(), "walship.toml", push);
    (d, repo, args)
}

/// `--config FILE` for a configuration of `repo` with `push` as its `[push]` table.
fn local_config(repo: &Repository, dir: &Path, file: &str, push: &str) -> Vec<OsString> {
    let tables = format!("[push]\n{push}");
    let config = repo.write_config(dir, file, ConfigLines { tables: &tables, ..ConfigLines::default() });
    vec!["--config".into(), config.into()]
}

/// `--config FILE` for `s3://BUCKET/<prefix>` on `server` reached through `endpoint` (the server's, or
/// a proxy's in front of it), with `push` as its `[push]` table.
fn s3_config(server: &S3Server, endpoint: &str, prefix: &str, dir: &Path, file: &str, push: &str) -> Vec<OsString> {
    let text = server.config_text(&format!("s3://{BUCKET}/{prefix}"), endpoint, S3_TOP, S3_SOCKETS);
    let config = write_config_file(dir, file, &format!("{text}[push]\n{push}\n"));
    vec!["--config".into(), config.into()]
}

/// A data directory beside a new S3 repository (`s3://BUCKET/PREFIX`), and a proxy in front of its
/// server for the test to watch and disturb the requests through.
fn s3_setup(label: &str) -> (DataDir, Repository, Proxy) {
    let d = DataDir::new(label);
    let repo = Repository::s3(&d.scratch, BUCKET, PREFIX);
    let proxy = Proxy::start(s3_server(&repo).port());
    (d, repo, proxy)
}

fn s3_server(repo: &Repository) -> &S3Server {
    match repo {
        Repository::S3 { server, .. } => server,
        _ => unreachable!("an S3 repository"),
    }
}

/// Asserts that `seen` is, for each of `answered`, one GET of the repository's identity record and
/// one HEAD of the segment's object (the two checks of an answer from a record), and nothing else.
#[track_caller]
fn assert_only_confirmations(seen: &[Seen], answered: &[String], what: &str) {
    let reads = seen.iter().filter(|s| s.method == "GET" && s.request.path().ends_with("/repository.json")).count();
    let heads = answered.iter().filter(|name| requests_for(seen, "HEAD", &wal_key(name)).len() == 1).count();
    assert!(
        reads == answered.len() && heads == answered.len() && seen.len() == 2 * answered.len(),
        "{what}: expected a GET of repository.json and a HEAD of the object for each of {answered:?}: {seen:#?}"
    );
}

/// Requests a proxy saw for `name`'s object (its path contains the name).
fn requests_for<'a>(seen: &'a [Seen], method: &str, name: &str) -> Vec<&'a Seen> {
    seen.iter().filter(|s| s.method == method && s.request.path().contains(name)).collect()
}

// ---------------------------------------------------------------------------------------------------
// Which segments go ahead, and the answer from a record.
// ---------------------------------------------------------------------------------------------------

/// Only segments marked `.ready` go ahead (not `.done`, not those without a status file), each gets a
/// record once stored, `archive_status` is left exactly as it was, and PostgreSQL's next call is
/// answered from the record with the repository out of reach.
#[test]
fn look_ahead_uploads_only_ready_segments_and_never_touches_archive_status() {
    let (d, repo, args) = local_setup("lookahead-ready", "look_ahead = 8");
    let originals = d.write_segments(1..=8, Fill::WalLike);
    for n in [1, 2, 3, 5, 7] {
        d.mark(&seg(n), "ready");
    }
    d.mark(&seg(4), "done");
    let status_before = d.status_snapshot();

    let out = d.push(&args, &seg(1));
    assert_ok(&out, "push 1 with look-ahead");
    assert!(out.stderr.contains(&format!("archived {} (", seg(1))), "{out:#?}");
    assert!(out.stderr.contains(&format!("; uploaded 4 ahead ({} to {})", seg(2), seg(7))), "{out:#?}");
    assert_eq!(archived(&repo), set(&segs([1, 2, 3, 5, 7])), "what the repository holds; {}", d.describe());
    assert_eq!(d.records(), set(&segs([2, 3, 5, 7])), "the records; {}", d.describe());
    assert_no_temp_files(&d.pushed_dir());
    assert_eq!(d.status_snapshot(), status_before, "archive_status must only be read; {}", d.describe());

    // PostgreSQL marks 1 done and asks for 2. The repository cannot be written (its shard directory
    // read-only; an answer only reads the identity record and looks the object up): a call that
    // wrote would fail (shown first with a copy of 6, pushed from outside pg_wal: a failed call in
    // pg_wal would remove every record).
    d.mark_done(&seg(1));
    let shard = repo.object_file("wal/0000000100000000");
    let mode = fs::metadata(&shard).unwrap().permissions();
    fs::set_permissions(&shard, fs::Permissions::from_mode(0o555)).unwrap();
    let elsewhere = d.scratch.mkdir("elsewhere");
    segments::write_file(&elsewhere.join(seg(6)), &fs::read(d.wal.join(seg(6))).unwrap());
    let control = run_bounded(walship("wal-push").current_dir(&elsewhere).args(&args).arg(seg(6)).arg(seg(6)));
    assert_ne!(control.code, Some(0), "without its objects a normal push must fail: {control:#?}");
    let out = d.push(&args, &seg(2));
    fs::set_permissions(&shard, mode).unwrap();
    assert_ok(&out, "push 2, answered from its record");
    assert!(out.stderr.contains(&format!("{} was {ARCHIVED_AHEAD} (", seg(2))), "{out:#?}");
    assert!(out.stderr.contains("same file"), "{out:#?}");
    assert_absent(&d.record(&seg(2)));
    assert_eq!(d.records(), set(&segs([3, 5, 7])), "{}", d.describe());

    // The rest, as PostgreSQL would archive them: every call answered from its record.
    d.mark_done(&seg(2));
    let calls = d.archive_everything_ready(&args);
    for (name, out) in &calls {
        assert!(out.stderr.contains(ARCHIVED_AHEAD), "{name}: {out:#?}");
    }
    assert_eq!(calls.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), segs([3, 5, 7]));
    assert!(d.records().is_empty(), "every record is used once: {}", d.describe());
    assert_eq!(archived(&repo), set(&segs([1, 2, 3, 5, 7])));
    for (name, bytes) in originals.iter().filter(|(n, _)| archived(&repo).contains(n)) {
        d.assert_fetches(&args, name, bytes);
    }
}

/// `look_ahead` bounds the batch to the lowest `.ready` segments after the requested one: never an
/// earlier segment, never a `.partial`, history or backup label file, and nothing at all with
/// `look_ahead = 0`.
#[test]
fn look_ahead_takes_the_lowest_later_ready_segments_up_to_its_bound() {
    // Six ready segments above the requested one, look_ahead = 2.
    let (d, repo, args) = local_setup("lookahead-bound", "look_ahead = 2");
    d.write_ready(1..=7, Fill::WalLike);
    let out = d.push(&args, &seg(1));
    assert_ok(&out, "push 1");
    assert!(out.stderr.contains(&format!("; uploaded 2 ahead ({} to {})", seg(2), seg(3))), "{out:#?}");
    assert_eq!(archived(&repo), set(&segs([1, 2, 3])), "{}", d.describe());
    assert_eq!(d.records(), set(&segs([2, 3])), "{}", d.describe());

    // The window moves on with PostgreSQL: 2 and 3 from their records, then 4 takes 5 and 6 along.
    for n in 1..=3 {
        if n > 1 {
            let out = d.push(&args, &seg(n));
            assert_ok(&out, &format!("push {n}"));
            assert!(out.stderr.contains(ARCHIVED_AHEAD), "{out:#?}");
        }
        d.mark_done(&seg(n));
    }
    let out = d.push(&args, &seg(4));
    assert_ok(&out, "push 4");
    assert!(out.stderr.contains(&format!("; uploaded 2 ahead ({} to {})", seg(5), seg(6))), "{out:#?}");
    assert_eq!(archived(&repo), set(&segs(1..=6)), "{}", d.describe());
    assert_eq!(d.records(), set(&segs([5, 6])), "{}", d.describe());

    // Only later segments, and only segments: a call for 5 in a pg_wal where earlier segments and
    // other kinds of WAL file are also ready (with real files, so that a wrong upload would succeed).
    let (d, repo, args) = local_setup("lookahead-kinds", "look_ahead = 8");
    d.write_ready(1..=7, Fill::WalLike);
    let partial = format!("{}.partial", seg(6));
    Segment::new(&partial).write_to(&d.wal);
    let history = history_name(2);
    segments::write_file(&d.wal.join(&history), history_content(2, "no recovery target specified").as_bytes());
    let (label, label_content) = backup_label(1, 6 * u64::from(MIN_SEGMENT_SIZE) + 0x28, MIN_SEGMENT_SIZE);
    segments::write_file(&d.wal.join(&label), label_content.as_bytes());
    for other in [&partial, &history, &label] {
        d.mark(other, "ready");
    }
    let status_before = d.status_snapshot();
    let out = d.push(&args, &seg(5));
    assert_ok(&out, "push 5");
    assert!(out.stderr.contains(&format!("; uploaded 2 ahead ({} to {})", seg(6), seg(7))), "{out:#?}");
    assert_eq!(archived(&repo), set(&segs([5, 6, 7])), "{}", d.describe());
    assert_eq!(d.records(), set(&segs([6, 7])), "{}", d.describe());
    assert_eq!(d.status_snapshot(), status_before, "{}", d.describe());

    // look_ahead = 0: the call archives its own segment and nothing else, and keeps no state.
    let (d, repo, args) = local_setup("lookahead-off", "look_ahead = 0");
    d.write_ready(1..=3, Fill::WalLike);
    let out = d.push(&args, &seg(1));
    assert_ok(&out, "push 1 with look_ahead = 0");
    assert!(!out.stderr.contains("ahead"), "{out:#?}");
    assert_eq!(archived(&repo), set(&segs([1])));
    assert_absent(&d.pushed_dir());
}

/// On S3, the call answered from a record sends two small requests and no upload: the GET of the
/// identity record that proves the repository is still the one the record names, and a HEAD that
/// proves it still holds the object; a call for another repository does not trust the record and
/// uploads there; and the batch never has more than `parallel` uploads under way.
#[test]
fn an_answer_from_a_record_only_checks_the_repository() {
    let (d, repo, proxy) = s3_setup("lookahead-s3");
    let server = s3_server(&repo);
    let args =
        s3_config(server, &proxy.endpoint(), PREFIX, d.scratch.path(), "db1.toml", "look_ahead = 8\nparallel = 2");
    let originals = d.write_ready(1..=6, Fill::WalLike);
    // Slow uploads overlap, so that a missing bound on parallelism would show.
    proxy.add(
        Rule::new(Fault::Delay(Duration::from_millis(100)))
            .when(|r: &Request| r.method == "PUT" && r.path().contains("/wal/")),
    );

    let out = d.push(&args, &seg(1));
    assert_ok(&out, "push 1 with look-ahead");
    assert!(out.stderr.contains(&format!("; uploaded 5 ahead ({} to {})", seg(2), seg(6))), "{out:#?}");
    assert_eq!(archived(&repo), set(&segs(1..=6)), "{}\n{}", d.describe(), repo.describe());
    assert_eq!(d.records(), set(&segs(2..=6)), "{}", d.describe());
    let uploads = proxy.max_concurrent(|s| s.method == "PUT" && s.request.path().contains("/wal/"));
    assert!(uploads <= 2, "{uploads} uploads at once with parallel = 2: {:#?}", proxy.seen());
    proxy.clear();

    d.mark_done(&seg(1));
    let before = proxy.seen().len();
    let out = d.push(&args, &seg(2));
    assert_ok(&out, "push 2, answered from its record");
    assert!(out.stderr.contains(ARCHIVED_AHEAD), "{out:#?}");
    let seen = proxy.seen();
    assert_only_confirmations(&seen[before..], &[seg(2)], "the answer from a record");
    assert_absent(&d.record(&seg(2)));
    d.mark_done(&seg(2));

    // Another repository (another prefix on the same store): 3's record is not for it.
    let other =
        s3_config(server, &proxy.endpoint(), "db2", d.scratch.path(), "db2.toml", "look_ahead = 8\nparallel = 2");
    let before = proxy.seen().len();
    let out = d.push(&other, &seg(3));
    assert_ok(&out, "push 3 into another repository");
    assert!(!out.stderr.contains(ARCHIVED_AHEAD), "a record for db1 was trusted for db2: {out:#?}");
    assert!(out.stderr.contains(&format!("archived {} (", seg(3))), "{out:#?}");
    let seen = proxy.seen();
    let puts = requests_for(&seen[before..], "PUT", &format!("{BUCKET}/db2/{}", wal_key(&seg(3))));
    assert_eq!(puts.len(), 1, "one upload of 3 into db2: {:#?}", &seen[before..]);
    assert!(server.object_file(BUCKET, &format!("db2/{}", wal_key(&seg(3)))).is_file());
    let (_, three) = &originals[2];
    d.assert_fetches(&other, &seg(3), three);
    // The record was looked at and found wanting, so it is gone: db1's own call judges by content.
    assert_absent(&d.record(&seg(3)));
    let out = d.push(&args, &seg(3));
    assert_ok(&out, "push 3 into db1 again");
    assert!(out.stderr.contains(&format!("{} was already archived with identical content", seg(3))), "{out:#?}");
    d.mark_done(&seg(3));

    // The rest from their records, each with its two checks.
    let before = proxy.seen().len();
    let calls = d.archive_everything_ready(&args);
    assert_eq!(calls.len(), 3);
    for (name, out) in &calls {
        assert!(out.stderr.contains(ARCHIVED_AHEAD), "{name}: {out:#?}");
    }
    let seen = proxy.seen();
    let answered: Vec<String> = calls.iter().map(|(name, _)| name.clone()).collect();
    assert_only_confirmations(&seen[before..], &answered, "answers from records");
    for (name, bytes) in &originals {
        d.assert_fetches(&args, name, bytes);
    }
}

/// A record names a repository by its URL, `s3://bucket/prefix`. Another store (another endpoint)
/// with a bucket of the same name is another repository, and a segment uploaded ahead into the first
/// is not in the second: trusting the record there acknowledges a segment the configured repository
/// does not have.
#[test]
fn a_record_is_not_trusted_for_another_store_with_the_same_bucket_and_prefix() {
    let d = DataDir::new("lookahead-endpoint");
    let repo = Repository::s3(&d.scratch, BUCKET, PREFIX);
    let first = s3_server(&repo);
    let args = s3_config(first, &first.endpoint(), PREFIX, d.scratch.path(), "first.toml", "look_ahead = 8");
    let originals = d.push_first_of(&args, 3, "push 1 into the first store");

    // The operator moves archiving to a new store (same bucket name and prefix, another endpoint).
    let second = S3Server::start();
    second.create_bucket(BUCKET);
    let moved = s3_config(&second, &second.endpoint(), PREFIX, d.scratch.path(), "second.toml", "look_ahead = 8");
    assert_ok(&d.push(&moved, &seg(2)), "push 2 into the second store");
    let object = second.object_file(BUCKET, &format!("{PREFIX}/{}", wal_key(&seg(2))));
    assert!(
        object.is_file(),
        "wal-push acknowledged {} (exit 0), but the configured repository does not hold it ({object:?} \
         missing): the record for the first store was trusted",
        seg(2)
    );
    d.assert_fetches(&moved, &seg(2), &originals[1].1);
}

/// A record is trusted only for the file it describes: a segment rewritten with other content is
/// judged by content (a conflict: the repository keeps the original), a damaged record is ignored and
/// the segment pushed the normal way, and a copy with the same content (a new inode) is answered
/// after hashing.
#[test]
fn a_changed_or_damaged_record_is_not_trusted() {
    let (d, _repo, args) = local_setup("lookahead-trust", "look_ahead = 8");
    let originals = d.push_first_of(&args, 5, "push 1 with look-ahead");

    // (b) 2's record damaged (one byte of its JSON): ignored and removed; the normal push finds
    // identical content in the repository.
    let record = d.record(&seg(2));
    let mut text = fs::read(&record).unwrap();
    let at = text.iter().position(|&b| b == b'"').unwrap() + 1;
    text[at] ^= 0x01;
    fs::write(&record, &text).unwrap();
    let out = d.push(&args, &seg(2));
    assert_ok(&out, "push 2 with a damaged record");
    assert!(!out.stderr.contains(ARCHIVED_AHEAD), "a damaged record was trusted: {out:#?}");
    assert!(out.stderr.contains(&format!("{} was already archived with identical content", seg(2))), "{out:#?}");
    assert_absent(&record);
    assert_eq!(d.records(), set(&segs(3..=5)), "the other records stay; {}", d.describe());
    d.mark_done(&seg(2));

    // (a) 3 rewritten in place with other content (same header, same size): its record is not
    // trusted, and the repository, which holds the original, refuses the new content.
    let changed = Segment::new(&seg(3)).seed(99);
    let changed_bytes = changed.bytes();
    assert_ne!(changed_bytes, originals[2].1);
    segments::write_file(&d.wal.join(seg(3)), &changed_bytes);
    let out = d.push(&args, &seg(3));
    assert!(!out.stderr.contains(ARCHIVED_AHEAD), "a record was trusted for changed content: {out:#?}");
    assert_error(&out, 5, &[&seg(3)]);
    assert_absent(&d.record(&seg(3)));
    d.assert_fetches(&args, &seg(3), &originals[2].1);
    // PostgreSQL would retry 3 for ever; the operator restores the segment.
    segments::write_file(&d.wal.join(seg(3)), &originals[2].1);
    let out = d.push(&args, &seg(3));
    assert_ok(&out, "push 3 restored");
    assert!(out.stderr.contains("already archived with identical content"), "{out:#?}");
    d.mark_done(&seg(3));

    // (c) 4 copied to a new inode with the same content (cp, then mv over): answered after hashing.
    let copy = d.wal.join("copy-of-4");
    fs::copy(d.wal.join(seg(4)), &copy).unwrap();
    walship_tests::chown_to_server_user(&copy);
    let inode_before = fs::metadata(d.wal.join(seg(4))).unwrap().ino();
    fs::rename(&copy, d.wal.join(seg(4))).unwrap();
    assert_ne!(fs::metadata(d.wal.join(seg(4))).unwrap().ino(), inode_before);
    let out = d.push(&args, &seg(4));
    assert_ok(&out, "push 4 copied");
    assert!(out.stderr.contains(&format!("{} was {ARCHIVED_AHEAD}", seg(4))), "{out:#?}");
    assert!(out.stderr.contains("same SHA-256"), "{out:#?}");
    assert_absent(&d.record(&seg(4)));
    d.mark_done(&seg(4));

    // 5, untouched: from its record, as the file it was.
    let out = d.push(&args, &seg(5));
    assert_ok(&out, "push 5");
    assert!(out.stderr.contains("same file"), "{out:#?}");
    for (name, bytes) in &originals {
        d.assert_fetches(&args, name, bytes);
    }
}

/// A call that fails (any error exit) removes every record: a failing call is when operators wipe,
/// restore or replace repositories, so no record may vouch for what comes after it. PostgreSQL's
/// next call is then judged by content.
#[test]
fn a_failed_call_removes_every_record() {
    let (d, _repo, args) = local_setup("lookahead-fail-forgets", "look_ahead = 8");
    let originals = d.push_first_of(&args, 4, "push 1 with look-ahead");

    // A recycled file under the name of 9: its page header names another segment (exit 4).
    segments::write_file(&d.wal.join(seg(9)), &Segment::new(&seg(5)).bytes());
    assert_error(&d.push(&args, &seg(9)), 4, &[&seg(9)]);
    assert!(d.records().is_empty(), "records outlived a failed call: {}", d.describe());

    // The next is judged by content (and takes the others along again, with new records).
    let out = d.push(&args, &seg(2));
    assert!(out.stderr.contains(&format!("{} was already archived with identical content", seg(2))), "{out:#?}");
    assert_eq!(d.records(), set(&segs(3..=4)), "{}", d.describe());
    d.mark_done(&seg(2));

    // A call that panics (a bug; here the test failpoint after its archive) removes them too.
    let fifth = d.write_segments([5], Fill::WalLike);
    let mut panicking = d.push_cmd(&args, &seg(5));
    panicking.env(walship::failpoint::FAILPOINT_VAR, "wal-push:archived");
    let out = run_bounded(&mut panicking);
    assert_eq!(out.code, Some(12), "{out:#?}");
    assert!(d.records().is_empty(), "records outlived a panicked call: {}", d.describe());

    let calls = d.archive_everything_ready(&args);
    assert_eq!(calls.len(), 2, "{calls:#?}");
    for (name, bytes) in originals.iter().chain(&fifth) {
        d.assert_fetches(&args, name, bytes);
    }
}

/// A segment that cannot go ahead (the repository holds other content under its name) is reported
/// and left for PostgreSQL's own call; the requested segment is archived and the call succeeds.
#[test]
fn a_failed_look_ahead_does_not_fail_the_requested_segment() {
    let (d, _repo, args) = local_setup("lookahead-failed", "look_ahead = 8");

    // Another content for 3 is archived first, from elsewhere (no archive_status there: no look-ahead).
    let elsewhere = d.scratch.mkdir("elsewhere");
    let foreign = Segment::new(&seg(3)).seed(7).write_to(&elsewhere);
    let out = run_bounded(walship("wal-push").current_dir(&elsewhere).args(&args).arg(&foreign).arg(seg(3)));
    assert_ok(&out, "push another 3");
    assert_absent(&elsewhere.join("walship"));

    let originals = d.write_ready(1..=4, Fill::WalLike);
    let status_before = d.status_snapshot();
    let out = d.push(&args, &seg(1));
    assert_eq!(out.code, Some(0), "the requested segment's answer: {out:#?}");
    assert!(out.stderr.contains(&format!("look-ahead: {} not uploaded ahead", seg(3))), "{out:#?}");
    assert!(out.stderr.contains(&format!("archived {} (", seg(1))), "{out:#?}");
    assert!(out.stderr.contains(&format!("; uploaded 2 ahead ({} to {})", seg(2), seg(4))), "{out:#?}");
    assert_eq!(d.records(), set(&segs([2, 4])), "no record for 3; {}", d.describe());
    assert_eq!(d.status_snapshot(), status_before);
    d.mark_done(&seg(1));

    let out = d.push(&args, &seg(2));
    assert_ok(&out, "push 2");
    assert!(out.stderr.contains(ARCHIVED_AHEAD), "{out:#?}");
    d.mark_done(&seg(2));
    let out = d.push(&args, &seg(3));
    assert_error(&out, 5, &[&seg(3)]);
    for (name, bytes) in originals.iter().filter(|(n, _)| *n != seg(3)) {
        d.assert_fetches(&args, name, bytes);
    }
}

// ---------------------------------------------------------------------------------------------------
// Killed mid-batch.
// ---------------------------------------------------------------------------------------------------

/// wal-push for 1 with look_ahead 8 over segments 1..=8, all ready, on S3 through a proxy that
/// stalls the uploads of `stalled`; killed once the stalls are met and everything else has stored
/// (`wait_for_records`: and once the records of the others are written). Checks what the kill left,
/// then lets PostgreSQL's retries archive everything.
fn kill_mid_batch(label: &str, stalled: &[u64], wait_for_records: bool) {
    let (d, repo, proxy) = s3_setup(label);
    let server = s3_server(&repo);
    let args =
        s3_config(server, &proxy.endpoint(), PREFIX, d.scratch.path(), "walship.toml", "look_ahead = 8\nparallel = 4");
    let originals = d.write_ready(1..=8, Fill::Random);
    let status_before = d.status_snapshot();
    let stalled = segs(stalled.iter().copied());
    let others: Vec<String> = segs(1..=8).into_iter().filter(|n| !stalled.contains(n)).collect();
    let stall_these = stalled.clone();
    proxy.add(
        Rule::new(Fault::Stall)
            .when(move |r: &Request| r.method == "PUT" && stall_these.iter().any(|n| r.path().contains(n.as_str()))),
    );

    let mut running = Running::spawn(&mut d.push_cmd(&args, &seg(1)));
    let look_aheads_recorded: BTreeSet<String> = others.iter().filter(|n| **n != seg(1)).cloned().collect();
    let reached = wait_for(CONDITION_LIMIT, || {
        let seen = proxy.seen();
        let stalls_met =
            stalled.iter().all(|n| requests_for(&seen, "PUT", n).iter().any(|s| s.fault.as_deref() == Some("stall")));
        let others_stored = others
            .iter()
            .all(|n| requests_for(&seen, "PUT", n).iter().any(|s| s.status.is_some_and(|c| (200..300).contains(&c))));
        let recorded = !wait_for_records || d.records() == look_aheads_recorded;
        stalls_met && others_stored && recorded
    });
    let still_running = !running.has_exited();
    let killed = running.kill();
    let context = format!(
        "wal-push: {killed:#?}\n{}\nrequests: {:#?}\n{}",
        d.describe(),
        proxy
            .seen()
            .iter()
            .map(|s| format!("{} {} {:?} {:?}", s.method, s.target, s.fault, s.status))
            .collect::<Vec<_>>(),
        repo.describe()
    );
    assert!(reached, "the stalls and the other uploads did not all come about\n{context}");
    assert!(still_running, "wal-push answered while uploads it started were stalled\n{context}");

    // Nothing recorded that is not stored, nothing half stored, nothing of PostgreSQL's touched.
    let records = d.records();
    for name in &stalled {
        assert!(!records.contains(name), "a record for {name}, whose upload never finished\n{context}");
        assert_absent(&repo.object_file(&wal_key(name)));
        assert!(!archived(&repo).contains(name), "{name} in the repository\n{context}");
    }
    assert!(!records.contains(&seg(1)), "a record for the requested segment\n{context}");
    if wait_for_records {
        assert_eq!(records, look_aheads_recorded, "{context}");
    }
    let check_args = s3_config(server, &server.endpoint(), PREFIX, d.scratch.path(), "direct.toml", "look_ahead = 8");
    for name in &records {
        assert!(repo.object_file(&wal_key(name)).is_file(), "a record for {name}, which is not stored\n{context}");
        let (_, bytes) = originals.iter().find(|(n, _)| n == name).unwrap();
        d.assert_fetches(&check_args, name, bytes);
    }
    assert_eq!(d.status_snapshot(), status_before, "archive_status changed\n{context}");
    assert_no_multipart_leftovers(server, "the killed wal-push");
    eprintln!("{label}: killed with records {records:?}; stderr: {:?}", killed.stderr);

    // PostgreSQL retries from its oldest .ready segment, with the store well again.
    proxy.clear();
    let calls = d.archive_everything_ready(&args);
    assert_eq!(calls.len(), 8, "{calls:#?}");
    // The call for 1 finishes the batch (1 itself, if it never stored, and the stalled look-aheads);
    // every later call is answered from a record.
    let (_, first) = &calls[0];
    let own = if stalled.contains(&seg(1)) {
        format!("archived {} (", seg(1))
    } else {
        format!("{} was already archived with identical content", seg(1))
    };
    assert!(first.stderr.contains(&own), "the retry of 1: {first:#?}");
    for (name, out) in &calls[1..] {
        assert!(out.stderr.contains(ARCHIVED_AHEAD), "the retry of {name}: {out:#?}\n{calls:#?}");
    }
    for (name, bytes) in &originals {
        d.assert_fetches(&check_args, name, bytes);
    }
    assert!(d.records().is_empty(), "records left after every segment was archived: {}", d.describe());
    assert_no_temp_files(&d.pushed_dir());
    assert_no_multipart_leftovers(server, "the retries");
}

/// Killed while two look-ahead uploads stall: no record for them and no object under their names;
/// every record that exists is for an object stored complete; PostgreSQL's retries archive all.
#[test]
fn killing_wal_push_mid_look_ahead_loses_nothing_and_acknowledges_nothing_early() {
    kill_mid_batch("lookahead-kill-ahead", &[4, 5], true);
}

/// Killed while the requested segment's own upload stalls and the look-aheads have stored: the
/// requested segment is neither stored nor acknowledged nor recorded, while each look-ahead that
/// stored is recorded at once; PostgreSQL's retries archive all.
#[test]
fn killing_wal_push_while_its_own_upload_stalls_acknowledges_nothing() {
    kill_mid_batch("lookahead-kill-own", &[1], true);
}

// ---------------------------------------------------------------------------------------------------
// One deadline per call.
// ---------------------------------------------------------------------------------------------------

/// The deadline of the calls below: short, since it is what is measured.
const SHORT_DEADLINE: Duration = Duration::from_secs(3);
/// walship-cli's CLEANUP_GRACE: after its work, a call may spend this long undoing interrupted
/// attempts on the server.
const CLEANUP_GRACE: Duration = Duration::from_secs(10);
/// What one call may take with a failing store: its deadline, the cleanup grace, and a generous
/// margin for a loaded machine. One deadline per queued upload (the bug) takes many times longer.
const ONE_CALL_BOUND: Duration = SHORT_DEADLINE.saturating_add(CLEANUP_GRACE).saturating_add(Duration::from_secs(5));

/// `--config FILE` for `s3://BUCKET/PREFIX` at `endpoint`, with `deadline_secs` = [`SHORT_DEADLINE`].
fn short_deadline_config(server: &S3Server, endpoint: &str, dir: &Path, push: &str) -> Vec<OsString> {
    let top = format!("deadline_secs = {}", SHORT_DEADLINE.as_secs());
    let text = server.config_text(&format!("s3://{BUCKET}/{PREFIX}"), endpoint, &top, S3_SOCKETS);
    let config = write_config_file(dir, "short-deadline.toml", &format!("{text}[push]\n{push}\n"));
    vec!["--config".into(), config.into()]
}

/// A store nobody answers for (a port nobody listens on), 16 segments queued behind one upload at a
/// time: the call gives up (exit 8) after one deadline for all of them, instead of starting a fresh
/// deadline for each upload as its turn comes (17 deadlines, 51 s, with PostgreSQL's archiver and a
/// `pg_ctl stop` waiting on it).
#[test]
fn a_dead_endpoint_holds_a_call_for_one_deadline_not_one_per_queued_upload() {
    let d = DataDir::new("lookahead-dead");
    let server = S3Server::start();
    let dead = format!("http://127.0.0.1:{}", walship_tests::s3::free_port());
    let args = short_deadline_config(&server, &dead, d.scratch.path(), "look_ahead = 16\nparallel = 1");
    d.write_ready(1..=17, Fill::WalLike);
    let started = Instant::now();
    let out = d.push(&args, &seg(1));
    let took = started.elapsed();
    assert_eq!(out.code, Some(8), "{out:#?}");
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.contains(&format!("gave up after {} s", SHORT_DEADLINE.as_secs())), "{out:#?}");
    assert!(took < ONE_CALL_BOUND, "one call took {took:?} with deadline_secs = 3: {out:#?}");
    assert!(d.records().is_empty(), "{}", d.describe());
}

/// The requested segment stores at once, but every upload ahead stalls: the call still ends after
/// one deadline (exit 0, the stalled ones left for PostgreSQL's own calls), not after one deadline
/// per upload ahead; and the requested segment, which took its turn first, is never starved.
#[test]
fn stalled_uploads_ahead_hold_a_call_for_one_deadline() {
    let (d, repo, proxy) = s3_setup("lookahead-stalled");
    let server = s3_server(&repo);
    let args = short_deadline_config(server, &proxy.endpoint(), d.scratch.path(), "look_ahead = 16\nparallel = 1");
    let originals = d.write_ready(1..=17, Fill::WalLike);
    let requested = seg(1);
    proxy
        .add(Rule::new(Fault::Stall).when(move |r: &Request| {
            r.method == "PUT" && r.path().contains("/wal/") && !r.path().contains(&requested)
        }));
    let started = Instant::now();
    let out = d.push(&args, &seg(1));
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains(&format!("archived {} (", seg(1))), "{out:#?}");
    assert!(out.stderr.contains(&format!("look-ahead: {} not uploaded ahead", seg(2))), "{out:#?}");
    assert!(took < ONE_CALL_BOUND, "one call took {took:?} with deadline_secs = 3: {out:#?}");
    assert!(d.records().is_empty(), "records of stalled uploads: {}", d.describe());
    assert_eq!(archived(&repo), set(&segs([1])), "{}", repo.describe());
    d.assert_fetches(&args, &seg(1), &originals[0].1);
}
