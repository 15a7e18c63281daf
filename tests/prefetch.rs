//! wal-fetch's prefetch (`[fetch] prefetch`): during a recovery a detached worker keeps the next
//! segments fetched into a spool under `pg_wal/walship/prefetch/<key>/`, and the next wal-fetch hands
//! its file over by rename. What must hold:
//!
//! - a spool is only ever read by the recovery it belongs to: the spool of an abandoned recovery (or
//!   any spool planted under another key) is never handed to another one, and is removed once that
//!   one's worker starts; proven against a real PostgreSQL 15 (two clusters with overlapping segment
//!   names) and with a planted segment of another cluster;
//! - what is handed over is byte-identical to the archived file of that exact name, across a timeline
//!   switch too, and the spool holds at most `prefetch` segments;
//! - the worker exits and removes its spool when recovery ends, when the postmaster dies and when
//!   recovery stalls; history, partial and backup files start no worker;
//! - a worker that starts only after recovery has ended leaves no spool behind (fails today: see
//!   `a_worker_started_as_recovery_ends_leaves_no_spool`).
//!
//! Most tests need no server: a fake data directory with `pg_wal/archive_status`, `recovery.signal`
//! and a `postmaster.pid` naming a live process (a `sleep` the test starts) is what wal-fetch looks
//! for. wal-fetch's stderr goes to a file, never a pipe: the worker inherits it and would keep a pipe
//! open until it exits. Every worker and helper process is killed when its test ends, failed or not.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use walship_tests::pg::{
    Cluster, WAIT_TIMEOUT, fake_postmaster, prefetch_workers, restore_command, restore_command_with_config,
};
use walship_tests::repository::{ConfigLines, Repository};
use walship_tests::segments::{self, MIN_SEGMENT_SIZE, Segment, history_content, history_name};
use walship_tests::{Scratch, chown_to_server_user, poll_until, wal_push, walship};

/// Where PostgreSQL asks restore_command to put most files.
const RECOVERYXLOG: &str = "pg_wal/RECOVERYXLOG";
/// The spools' parent, relative to the data directory (`walship::prefetch::SPOOL_ROOT` under pg_wal).
const SPOOL_ROOT: &str = "pg_wal/walship/prefetch";
/// The bound of every wait for a condition (a worker to start, fetch or exit).
const WAIT: Duration = Duration::from_secs(30);
/// Another cluster's system identifier.
const OTHER_SYSTEM_IDENTIFIER: u64 = 7_299_999_999_999_999_999;

/// Segment `n` of timeline `timeline` of a cluster with 1 MiB segments.
fn seg(timeline: u32, n: u64) -> String {
    segments::segment_name(timeline, n, MIN_SEGMENT_SIZE)
}

/// SIGKILLs every prefetch worker of `data_dir` and waits (bounded) until none is left.
fn kill_workers(data_dir: &Path) {
    let deadline = Instant::now() + WAIT;
    loop {
        let workers = prefetch_workers(data_dir);
        if workers.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in workers {
            // SAFETY: plain kill(2) of a worker process found by its command line and directory.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the prefetch workers of a data directory when dropped, so that a failing test leaves none.
struct WorkerGuard(PathBuf);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        kill_workers(&self.0);
    }
}

/// The spool directories (one per recovery key) under `data_dir`'s pg_wal, sorted.
fn spool_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(data_dir.join(SPOOL_ROOT)) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs
}

/// The fetched segments in one spool: not temporary files, not `want`, not `worker.lock`.
fn spooled_segments(spool: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(spool) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && n != "want" && n != "worker.lock")
        .collect();
    names.sort();
    names
}

/// The system identifier in the long page header of a WAL segment.
fn system_identifier(segment: &[u8]) -> u64 {
    u64::from_le_bytes(segment[24..32].try_into().unwrap())
}

/// What one wal-fetch call did: its exit code and the file its stderr (and that of any worker it
/// started) goes to.
struct Fetched {
    code: Option<i32>,
    log: PathBuf,
}

impl Fetched {
    /// Everything written to the call's stderr so far, the worker's lines included.
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A fake recovery: a data directory that looks like one under recovery (pg_wal/archive_status,
/// recovery.signal, a postmaster.pid naming a live `sleep`) next to a local repository filled by
/// wal-push, and a configuration file with the test's `[fetch]` settings. Dropping it kills the
/// worker and the fake postmaster.
struct Rig {
    scratch: Scratch,
    repo: PathBuf,
    /// A second data directory whose pg_wal holds the files pushed into the repository.
    source: PathBuf,
    data: PathBuf,
    config: PathBuf,
    /// What was pushed, by name.
    sources: BTreeMap<String, Vec<u8>>,
    postmaster: Option<Child>,
    calls: AtomicUsize,
}

impl Rig {
    fn new(label: &str, fetch_settings: &str) -> Rig {
        let scratch = Scratch::new(&format!("prefetch-{label}"));
        let repo = scratch.mkdir("repo");
        let source = scratch.mkdir("source");
        scratch.mkdir("source/pg_wal");
        let data = scratch.mkdir("data");
        scratch.mkdir("data/pg_wal");
        scratch.mkdir("data/pg_wal/archive_status");
        segments::write_file(&data.join("recovery.signal"), b"");
        let postmaster = fake_postmaster(&data);
        let config = scratch.path().join("walship.toml");
        let text = format!("repo = \"file://{}\"\ndeadline_secs = 60\n\n[fetch]\n{fetch_settings}\n", repo.display());
        segments::write_file(&config, text.as_bytes());
        Rig {
            scratch,
            repo,
            source,
            data,
            config,
            sources: BTreeMap::new(),
            postmaster: Some(postmaster),
            calls: AtomicUsize::new(0),
        }
    }

    /// Pushes `bytes` as `name` with wal-push and remembers them as the source of `name`.
    fn push(&mut self, name: &str, bytes: Vec<u8>) {
        segments::write_file(&self.source.join("pg_wal").join(name), &bytes);
        let out = wal_push(&self.repo, &self.source, format!("pg_wal/{name}"), name);
        assert_eq!(out.code, Some(0), "wal-push {name}: {out:#?}");
        self.sources.insert(name.to_owned(), bytes);
    }

    fn push_segment(&mut self, segment: Segment) {
        let name = segment.name().to_owned();
        self.push(&name, segment.bytes());
    }

    fn source(&self, name: &str) -> &[u8] {
        &self.sources[name]
    }

    /// `wal-fetch --config CONFIG -v NAME pg_wal/RECOVERYXLOG` from the data directory, as PostgreSQL
    /// runs it, with stderr to a file.
    fn fetch(&self, name: &str) -> Fetched {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let log = self.scratch.path().join(format!("wal-fetch-{n}-{name}.log"));
        let stderr = File::create(&log).unwrap();
        let status = walship("wal-fetch")
            .current_dir(&self.data)
            .arg("--config")
            .arg(&self.config)
            .arg("-v")
            .arg(name)
            .arg(RECOVERYXLOG)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
            .expect("run wal-fetch");
        Fetched { code: status.code(), log }
    }

    /// Fetches `name`, checks that it succeeded and that exactly the source of `name` arrived, and
    /// removes the restored file again (as PostgreSQL renames it away); returns the call.
    #[track_caller]
    fn fetch_exactly(&self, name: &str) -> Fetched {
        let fetched = self.fetch(name);
        assert_eq!(fetched.code, Some(0), "wal-fetch {name}: {}", fetched.log());
        let destination = self.data.join(RECOVERYXLOG);
        let restored = fs::read(&destination).unwrap_or_else(|e| panic!("{destination:?}: {e}"));
        assert!(
            restored == self.source(name),
            "wal-fetch {name} restored {} bytes that differ from the archived {name}\n{}",
            restored.len(),
            fetched.log()
        );
        fs::remove_file(&destination).unwrap();
        fetched
    }

    fn workers(&self) -> Vec<u32> {
        prefetch_workers(&self.data)
    }

    fn spools(&self) -> Vec<PathBuf> {
        spool_dirs(&self.data)
    }

    /// The one spool of this recovery, once it exists.
    #[track_caller]
    fn own_spool(&self) -> PathBuf {
        poll_until("the recovery's spool exists", WAIT, || match self.spools().as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("spools {other:?}")),
        })
    }

    /// Waits until a worker runs for this data directory.
    #[track_caller]
    fn wait_for_worker(&self) {
        poll_until("a prefetch worker runs", WAIT, || {
            if self.workers().is_empty() { Err("no worker".into()) } else { Ok(()) }
        });
    }

    /// Waits until `spool` holds every one of `names`.
    #[track_caller]
    fn wait_spooled(&self, spool: &Path, names: &[String]) {
        poll_until(&format!("{names:?} are prefetched into {spool:?}"), WAIT, || {
            let have = spooled_segments(spool);
            if names.iter().all(|n| have.contains(n)) { Ok(()) } else { Err(format!("spool holds {have:?}")) }
        });
    }

    /// Waits until no worker is left and every spool is gone.
    #[track_caller]
    fn wait_worker_gone_and_spool_removed(&self, why: &str) {
        poll_until(&format!("the worker exits and removes its spool ({why})"), WAIT, || {
            let (workers, spools) = (self.workers(), self.spools());
            if workers.is_empty() && spools.is_empty() {
                Ok(())
            } else {
                Err(format!("workers {workers:?}, spools {spools:?}"))
            }
        });
    }

    /// Kills the process postmaster.pid names and reaps it (a zombie would still count as alive).
    fn kill_postmaster(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        kill_workers(&self.data);
        self.kill_postmaster();
    }
}

/// Records the largest number of segments ever seen in the spools (other than `except`) of a data
/// directory, polling in a thread until stopped.
struct SpoolWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl SpoolWatch {
    fn start(data_dir: &Path, except: &Path) -> SpoolWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (data_dir, except, flag) = (data_dir.to_owned(), except.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut most = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                for dir in spool_dirs(&data_dir).into_iter().filter(|d| *d != except) {
                    let names = spooled_segments(&dir);
                    if names.len() > most.0 {
                        most = (names.len(), names);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            most
        });
        SpoolWatch { stop, thread }
    }

    /// The most segments seen at once, and which they were.
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Lines of a PostgreSQL log that name a file wal-fetch handed over from the spool.
fn prefetched_in_log(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix("wal-fetch: restored "))
        .filter(|rest| rest.contains(", prefetched, "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The files PostgreSQL logged as restored from the archive.
fn restored_in_log(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| line.split("restored log file \"").nth(1))
        .filter_map(|rest| rest.split_once("\" from archive"))
        .map(|(name, _)| name.to_owned())
        .collect()
}

fn system_identifier_of(cluster: &Cluster) -> u64 {
    cluster.psql("select system_identifier from pg_control_system()").parse().unwrap()
}

/// Two clusters X and Y with overlapping segment names. X's recovery is abandoned with its spool
/// full of X's segments (worker and server killed, as in a machine crash); that spool tree is kept in
/// the pg_wal of a new restore of Y (pg_wal on a volume that survives restoring the data directory).
/// Y's recovery must never take X's files (PostgreSQL would refuse them: another system identifier),
/// must end with Y's exact data, and must remove X's spool.
#[test]
fn prefetched_files_of_an_abandoned_recovery_are_not_handed_to_another() {
    // --- Cluster X: archives into its own repository; a base backup, a restore point, load. ---
    let store_x = Scratch::new("prefetch-x");
    let repo_x = Repository::local(&store_x);
    let backup_x = store_x.mkdir("base");
    let mut x = Cluster::init("prefetch-x", Some(1));
    x.configure(&[("wal_level", "replica"), ("archive_mode", "on"), ("archive_command", &repo_x.archive_command())]);
    x.start();
    x.pgbench(&["-i", "-s", "1", "-q"]);
    x.base_backup(&backup_x, &["-Fp", "-X", "none"]);
    // X's restore pauses here, so that its spool holds the segments after it for as long as we look.
    x.psql("select pg_create_restore_point('x-pause')");
    x.pgbench(&["-T", "4", "-c", "2", "-j", "2"]);
    let x_last = x.switch_wal();
    x.wait_archived(&x_last, WAIT_TIMEOUT);
    let x_system = system_identifier_of(&x);
    x.crash();
    drop(x);

    // --- Cluster Y: the same, its own repository; its data recorded before it is lost. ---
    let store_y = Scratch::new("prefetch-y");
    let repo_y = store_y.mkdir("repo");
    let backup_y = store_y.mkdir("base");
    let mut y = Cluster::init("prefetch-y", Some(1));
    y.configure(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &walship_tests::pg::archive_command(&repo_y)),
    ]);
    y.start();
    y.pgbench(&["-i", "-s", "1", "-q"]);
    y.psql("create table marks(n int)");
    y.base_backup(&backup_y, &["-Fp", "-X", "none"]);
    y.pgbench(&["-T", "5", "-c", "2", "-j", "2"]);
    y.psql("insert into marks select g from generate_series(1, 1234) g");
    let y_facts = "select (select count(*) from pgbench_history), (select sum(abalance) from pgbench_accounts), \
                   (select count(*) from marks)";
    let y_expected = y.psql(y_facts);
    let y_last = y.switch_wal();
    y.wait_archived(&y_last, WAIT_TIMEOUT);
    let y_system = system_identifier_of(&y);
    y.crash();
    drop(y);
    assert_ne!(x_system, y_system, "two initdb runs give two system identifiers");

    // --- Restore X, pause at the restore point with the spool filled, then abandon it. ---
    let config_x = repo_x.write_config(
        store_x.path(),
        "walship.toml",
        // Long enough that the worker is still there, spool and all, when we kill it.
        ConfigLines { tables: "[fetch]\nprefetch_idle_secs = 3600", ..ConfigLines::default() },
    );
    let mut x_restore = Cluster::restore(
        "prefetch-x-restore",
        &backup_x,
        &[
            ("restore_command", &restore_command_with_config(&config_x)),
            ("recovery_target_name", "x-pause"),
            ("recovery_target_action", "pause"),
        ],
    );
    let _x_workers = WorkerGuard(x_restore.data_dir().to_owned());
    x_restore.start();
    poll_until("X's recovery pauses at its restore point", WAIT_TIMEOUT, || {
        match x_restore.try_psql("select pg_get_wal_replay_pause_state()") {
            Ok(state) if state == "paused" => Ok(()),
            other => Err(format!("{other:?}\n{}", x_restore.log_tail())),
        }
    });
    let x_spool = poll_until("X's spool holds a prefetched segment", WAIT_TIMEOUT, || {
        match spool_dirs(x_restore.data_dir()).as_slice() {
            [one] if !spooled_segments(one).is_empty() => Ok(one.clone()),
            other => Err(format!("spools {other:?}\n{}", x_restore.log_tail())),
        }
    });
    assert!(!prefetch_workers(x_restore.data_dir()).is_empty(), "X's worker runs while recovery is paused");
    // A machine crash: the worker dies without cleaning up, then the server.
    kill_workers(x_restore.data_dir());
    assert!(prefetch_workers(x_restore.data_dir()).is_empty(), "X's worker was killed");
    x_restore.crash();
    let x_spooled = spooled_segments(&x_spool);
    assert!(!x_spooled.is_empty(), "the abandoned recovery's spool {x_spool:?} is still there");
    for name in &x_spooled {
        let bytes = fs::read(x_spool.join(name)).unwrap();
        assert_eq!(system_identifier(&bytes), x_system, "{name} in X's spool is X's segment");
    }

    // --- A fresh restore of Y, whose pg_wal still holds X's abandoned spool tree. ---
    let mut y_restore =
        Cluster::restore("prefetch-y-restore", &backup_y, &[("restore_command", &restore_command(&repo_y))]);
    let _y_workers = WorkerGuard(y_restore.data_dir().to_owned());
    let y_pg_wal = y_restore.data_dir().join("pg_wal");
    // cp -a as root keeps the server user's ownership of the tree.
    let copied = Command::new("cp")
        .arg("-a")
        .arg(x_restore.data_dir().join("pg_wal/walship"))
        .arg(&y_pg_wal)
        .status()
        .expect("run cp");
    assert!(copied.success(), "copying X's spool tree into Y's pg_wal");
    chown_to_server_user(&y_pg_wal.join("walship"));
    let planted = y_pg_wal.join("walship/prefetch").join(x_spool.file_name().unwrap());
    assert_eq!(spooled_segments(&planted), x_spooled, "X's spool is in Y's pg_wal before Y starts");
    drop(x_restore);

    y_restore.start();
    y_restore.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(y_restore.psql(y_facts), y_expected, "Y's data after recovery (history rows | balance | marks)");

    let log = y_restore.log_contents();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("different database system") || l.contains("unexpected") || l.contains("wal-fetch: error")
        })
        .collect();
    assert!(bad.is_empty(), "Y's recovery read foreign or broken WAL: {bad:#?}\n{}", y_restore.log_tail());
    let restored = restored_in_log(&log);
    let overlap: Vec<&String> = x_spooled.iter().filter(|n| restored.contains(n)).collect();
    assert!(
        !overlap.is_empty(),
        "Y's recovery never asked for a segment X's spool held ({x_spooled:?}), so the test proves nothing; \
         Y restored {restored:?}"
    );
    // X's segments carry X's system identifier: had any been handed over, PostgreSQL would have
    // stopped with "WAL file is from different database system". So every prefetched one was Y's.
    let prefetched = prefetched_in_log(&log);
    assert!(!prefetched.is_empty(), "Y's recovery took nothing from its own spool\n{}", y_restore.log_tail());

    poll_until("X's spool and Y's worker are gone after Y's recovery", WAIT, || {
        let (workers, spools) = (prefetch_workers(y_restore.data_dir()), spool_dirs(y_restore.data_dir()));
        if workers.is_empty() && spools.is_empty() && !planted.exists() {
            Ok(())
        } else {
            Err(format!("workers {workers:?}, spools {spools:?}"))
        }
    });
}

/// A spool under another key (another recovery's, planted here) holding a valid segment of another
/// cluster under the name recovery asks for: wal-fetch must restore the repository's file, and the
/// planted spool goes once a worker starts. Then, with this recovery's own spool, segments come from
/// it byte-identical, and it never holds more than `prefetch` segments.
#[test]
fn a_planted_spool_of_another_recovery_is_never_used() {
    let mut rig = Rig::new("planted", "prefetch = 2");
    for n in 1..=6 {
        rig.push_segment(Segment::new(&seg(1, n)));
    }
    let planted_dir = rig.data.join(SPOOL_ROOT).join("0123456789abcdef");
    let planted = Segment::new(&seg(1, 3)).system_identifier(OTHER_SYSTEM_IDENTIFIER).bytes();
    assert_ne!(planted, rig.source(&seg(1, 3)));
    for dir in ["pg_wal/walship", "pg_wal/walship/prefetch", "pg_wal/walship/prefetch/0123456789abcdef"] {
        fs::create_dir_all(rig.data.join(dir)).unwrap();
        chown_to_server_user(&rig.data.join(dir));
    }
    segments::write_file(&planted_dir.join(seg(1, 3)), &planted);
    segments::write_file(&planted_dir.join("want"), seg(1, 2).as_bytes());

    let watch = SpoolWatch::start(&rig.data, &planted_dir);
    let first = rig.fetch_exactly(&seg(1, 3));
    assert!(!first.log().contains("prefetched"), "segment 3 came from a spool: {}", first.log());
    poll_until("the planted spool is removed", WAIT, || {
        if planted_dir.exists() { Err(format!("spools {:?}", rig.spools())) } else { Ok(()) }
    });
    let spool = rig.own_spool();
    assert_ne!(spool, planted_dir);

    rig.wait_spooled(&spool, &[seg(1, 4), seg(1, 5)]);
    for n in [4, 5] {
        let fetched = rig.fetch_exactly(&seg(1, n));
        assert!(
            fetched.log().contains(&format!("restored {} (", seg(1, n))) && fetched.log().contains("prefetched"),
            "segment {n} did not come from the spool: {}",
            fetched.log()
        );
    }
    // After 5 the window is 6 and 7; the repository has 6 only.
    rig.wait_spooled(&spool, &[seg(1, 6)]);
    let (most, when) = watch.finish();
    assert!(most <= 2, "the spool held {most} segments at once with prefetch = 2: {when:?}");
    assert!(most >= 1, "the watch never saw a prefetched segment");
    let fetched = rig.fetch_exactly(&seg(1, 6));
    assert!(fetched.log().contains("prefetched"), "segment 6: {}", fetched.log());
}

/// The worker exits, removing its spool, when recovery ends (no recovery.signal), when the process
/// named in postmaster.pid dies, and when recovery asks for nothing new for `prefetch_idle_secs`.
#[test]
fn the_worker_exits_when_recovery_ends_the_server_dies_or_recovery_stalls() {
    let start = |label: &str, settings: &str| {
        let mut rig = Rig::new(label, settings);
        for n in 1..=6 {
            rig.push_segment(Segment::new(&seg(1, n)));
        }
        let fetched = rig.fetch_exactly(&seg(1, 2));
        (rig, fetched)
    };

    // Recovery ends: PostgreSQL removes recovery.signal.
    let (rig, fetched) = start("ended", "prefetch = 4");
    rig.wait_for_worker();
    rig.wait_spooled(&rig.own_spool(), &[seg(1, 3)]);
    fs::remove_file(rig.data.join("recovery.signal")).unwrap();
    rig.wait_worker_gone_and_spool_removed("recovery.signal removed");
    assert!(fetched.log().contains("prefetch: recovery ended"), "worker log: {}", fetched.log());
    drop(rig);

    // The server dies.
    let (mut rig, fetched) = start("died", "prefetch = 4");
    rig.wait_for_worker();
    rig.wait_spooled(&rig.own_spool(), &[seg(1, 3)]);
    rig.kill_postmaster();
    rig.wait_worker_gone_and_spool_removed("postmaster killed");
    assert!(fetched.log().contains("prefetch: recovery ended"), "worker log: {}", fetched.log());
    drop(rig);

    // Recovery stalls: no further request.
    let (rig, fetched) = start("stalled", "prefetch = 4\nprefetch_idle_secs = 1");
    rig.wait_worker_gone_and_spool_removed("no request for prefetch_idle_secs");
    assert!(fetched.log().contains("prefetch: recovery asked for nothing new"), "worker log: {}", fetched.log());
    assert!(rig.data.join("recovery.signal").exists() && rig.postmaster.is_some(), "recovery itself went on");
}

/// Timeline 1 has segments 3..8, timeline 2 (branching at 5) segments 5..8. Recovery asks for
/// 1/4, then switches to 2/5: the spool must drop every timeline 1 file and hold timeline 2's, and
/// each handed-over file must be the archived file of that exact name.
#[test]
fn a_timeline_switch_discards_the_old_timeline() {
    let mut rig = Rig::new("timeline", "prefetch = 4");
    for n in 3..=8 {
        rig.push_segment(Segment::new(&seg(1, n)));
    }
    rig.push(&history_name(2), history_content(2, "no recovery target specified").into_bytes());
    for n in 5..=8 {
        rig.push_segment(Segment::new(&seg(2, n)));
    }
    assert_ne!(rig.source(&seg(1, 5)), rig.source(&seg(2, 5)));

    rig.fetch_exactly(&seg(1, 4));
    let spool = rig.own_spool();
    let timeline1: Vec<String> = (5..=8).map(|n| seg(1, n)).collect();
    rig.wait_spooled(&spool, &timeline1);

    let switched = rig.fetch_exactly(&seg(2, 5));
    assert!(!switched.log().contains("prefetched"), "2/5 was never prefetched: {}", switched.log());
    let timeline2: Vec<String> = (6..=8).map(|n| seg(2, n)).collect();
    poll_until("the spool holds timeline 2's segments only", WAIT, || {
        let have = spooled_segments(&spool);
        if have == timeline2 { Ok(()) } else { Err(format!("spool holds {have:?}")) }
    });
    for name in &timeline2 {
        let fetched = rig.fetch_exactly(name);
        assert!(fetched.log().contains("prefetched"), "{name} did not come from the spool: {}", fetched.log());
        assert!(
            spooled_segments(&spool).iter().all(|n| n.starts_with("00000002")),
            "timeline 1 files came back: {:?}",
            spooled_segments(&spool)
        );
    }
}

/// History, partial and backup files are restored, but start no worker and create no spool; a
/// segment in the same recovery does (so the checks above are not vacuous).
#[test]
fn history_files_start_no_worker() {
    let mut rig = Rig::new("history", "prefetch = 4");
    rig.push_segment(Segment::new(&seg(1, 1)));
    rig.push(&history_name(2), history_content(2, "no recovery target specified").into_bytes());
    let partial = format!("{}.partial", seg(1, 2));
    rig.push_segment(Segment::new(&partial));
    let (label, content) = segments::backup_label(1, 0x0100_0028, MIN_SEGMENT_SIZE);
    rig.push(&label, content.into_bytes());

    for name in [history_name(2), partial, label] {
        rig.fetch_exactly(&name);
        assert!(rig.workers().is_empty(), "wal-fetch {name} started a prefetch worker: {:?}", rig.workers());
        assert!(!rig.data.join("pg_wal/walship").exists(), "wal-fetch {name} created a spool");
    }
    let absent = rig.fetch(&history_name(3));
    assert_eq!(absent.code, Some(1), "00000003.history is not in the archive: {}", absent.log());
    assert!(rig.workers().is_empty() && !rig.data.join("pg_wal/walship").exists());

    rig.fetch_exactly(&seg(1, 1));
    rig.own_spool();
    rig.wait_for_worker();
}

/// Writes `text` into the FIFO `fifo` once a reader has it open (bounded wait), then closes it, so
/// that reader sees exactly `text` and then the end of the file.
fn feed_fifo(fifo: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut writer = poll_until(&format!("a process opens {fifo:?} to read it"), WAIT, || {
        // Without a reader, a non-blocking open for writing fails (ENXIO) instead of waiting.
        fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(fifo).map_err(|e| e.to_string())
    });
    writer.write_all(text.as_bytes()).unwrap();
}

/// A worker that starts after recovery has ended (PostgreSQL removed recovery.signal between the last
/// wal-fetch and the worker's first look) finds no recovery to serve; it must still remove the spool
/// directory that wal-fetch created for it (`<key>/want`), since no other worker ever would.
///
/// The race is made deterministic by handing wal-fetch its configuration through a FIFO, so that the
/// worker, which reads the same file first thing, waits until recovery.signal is gone.
#[test]
fn a_worker_started_as_recovery_ends_leaves_no_spool() {
    let mut rig = Rig::new("late-worker", "prefetch = 4");
    for n in 1..=3 {
        rig.push_segment(Segment::new(&seg(1, n)));
    }
    let text = fs::read_to_string(&rig.config).unwrap();
    let fifo = rig.scratch.path().join("walship-fifo.toml");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0, "mkfifo {fifo:?}");
    chown_to_server_user(&fifo);
    rig.config = fifo.clone();

    let log = rig.scratch.path().join("wal-fetch-late-worker.log");
    let mut wal_fetch = walship("wal-fetch")
        .current_dir(&rig.data)
        .arg("--config")
        .arg(&fifo)
        .arg("-v")
        .arg(seg(1, 2))
        .arg(RECOVERYXLOG)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("start wal-fetch");
    feed_fifo(&fifo, &text);
    let status = poll_until("wal-fetch exits", WAIT, || wal_fetch.try_wait().unwrap().ok_or("running".to_owned()));
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "wal-fetch {}: {}", seg(1, 2), log_text());
    assert_eq!(fs::read(rig.data.join(RECOVERYXLOG)).unwrap(), rig.source(&seg(1, 2)));
    // The worker it started now waits for its configuration. Meanwhile recovery ends.
    rig.wait_for_worker();
    fs::remove_file(rig.data.join("recovery.signal")).unwrap();
    feed_fifo(&fifo, &text);
    poll_until("the worker exits", WAIT, || if rig.workers().is_empty() { Ok(()) } else { Err("running".into()) });
    let left: Vec<(PathBuf, Vec<String>)> = rig
        .spools()
        .into_iter()
        .map(|dir| {
            let names = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned());
            (dir.clone(), names.collect())
        })
        .collect();
    assert!(
        left.is_empty(),
        "recovery has ended and no worker is left, yet its spool remains for good: {left:?}\n{}",
        log_text()
    );
}
