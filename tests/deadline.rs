//! One deadline policy for every command: the deadline fires even when a local file operation
//! hangs, and within it transient failures are retried, by every command.
//!
//! A command's deadline fires even when a local file operation hangs (a hung NFS mount under
//! pg_wal): the file work runs where the timer can still cut it off, and the process exits with the
//! deadline's code although a thread stays stuck in the kernel. The stand-in for a hung file system
//! is a FIFO that nobody writes to: opening it for reading blocks until a writer appears, which never
//! happens, exactly as an open on a hung mount does. No FUSE or NFS is needed.

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use walship_tests::pg::{fake_postmaster, prefetch_workers};
use walship_tests::proxy::{Fault, Proxy, Rule};
use walship_tests::s3::{S3Server, write_config_file};
use walship_tests::segments::Segment;
use walship_tests::{Scratch, chown_to_server_user, poll_until, run, walship};

/// How long a command whose deadline is a few seconds may take before the test calls it hung. Far
/// above the deadline plus the cleanup grace: this is not a measure of speed.
const HUNG_AFTER: Duration = Duration::from_secs(60);

const SEGMENT: &str = "000000010000000000000007";

/// The spawned command, killed when the test ends however it ends, so that a hang leaves no process.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the command to exit, up to [`HUNG_AFTER`]; `None` when it did not.
fn wait_bounded(running: &mut Running) -> Option<(Option<i32>, String)> {
    let started = Instant::now();
    while started.elapsed() < HUNG_AFTER {
        if let Some(status) = running.0.try_wait().expect("wait for the command") {
            let mut stderr = String::new();
            use std::io::Read;
            running.0.stderr.take().expect("piped stderr").read_to_string(&mut stderr).expect("read stderr");
            return Some((status.code(), stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn make_fifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo has no other preconditions.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {path:?}: {}", std::io::Error::last_os_error());
    chown_to_server_user(path);
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in fs::read_dir(&next).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                found.push(entry.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found
}

#[test]
fn wal_push_gives_up_at_its_deadline_when_reading_the_file_hangs() {
    let scratch = Scratch::new("deadline-push");
    let repo = scratch.mkdir("repo");
    let source_dir = scratch.mkdir("source");
    let source = source_dir.join(SEGMENT);
    make_fifo(&source);
    let config = scratch.path().join("walship.toml");
    fs::write(&config, format!("repo = 'file://{}'\ndeadline_secs = 2\n", repo.display())).unwrap();
    chown_to_server_user(&config);

    let child = walship("wal-push")
        .current_dir(&source_dir)
        .arg("--config")
        .arg(&config)
        .arg(&source)
        .arg(SEGMENT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wal-push");
    let mut running = Running(child);
    let Some((code, stderr)) = wait_bounded(&mut running) else {
        panic!("wal-push did not exit within {HUNG_AFTER:?} although deadline_secs = 2: its deadline never fired")
    };

    assert_eq!(code, Some(8), "the deadline's exit code (storage: gave up at the deadline):\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{stderr}");
    assert!(lines[0].contains(SEGMENT), "names the file: {stderr}");
    assert!(lines[0].contains("gave up after 2 s"), "says that the deadline ended it: {stderr}");
    assert_eq!(files_under(&repo), Vec::<String>::new(), "nothing half-written in the repository");
    assert_eq!(files_under(&source_dir), [SEGMENT], "nothing left beside the file");
}

/// An S3 repository through the fault-injecting proxy, holding segments 1 to 3 of a cluster; the
/// server and the proxy live as long as the value.
struct S3Repository {
    scratch: Scratch,
    _server: S3Server,
    proxy: Proxy,
    config: std::path::PathBuf,
}

impl S3Repository {
    fn new(label: &str, extra: &str) -> S3Repository {
        const BUCKET: &str = "walship-deadline";
        let scratch = Scratch::new(label);
        let server = S3Server::start();
        server.create_bucket(BUCKET);
        let proxy = Proxy::start(server.port());
        let text = server.config_text(&format!("s3://{BUCKET}/db"), &proxy.endpoint(), "deadline_secs = 60", "");
        let config = write_config_file(scratch.path(), "walship.toml", &format!("{text}{extra}"));
        let source_dir = scratch.mkdir("source");
        for n in 1..=3 {
            let name = format!("00000001000000000000000{n}");
            let source = Segment::new(&name).write_to(&source_dir);
            let pushed = run(walship("wal-push").current_dir(&source_dir).arg("--config").arg(&config).arg(&source));
            assert_eq!(pushed.code, Some(0), "{pushed:#?}");
        }
        S3Repository { scratch, _server: server, proxy, config }
    }
}

/// base-list, like every command, retries a transient failure within its deadline: a catalog
/// listing that keeps failing past the S3 client's own three attempts succeeds on walship's next
/// one, and the header printed before the failure is not printed again.
#[test]
fn base_list_retries_a_transient_failure_within_its_deadline() {
    let s = S3Repository::new("deadline-list", "");
    let (proxy, config) = (&s.proxy, &s.config);
    let failing_listings = 4;
    proxy.add(
        Rule::new(Fault::slow_down()).when(|r| r.method == "GET" && r.has_query("list-type")).times(failing_listings),
    );
    let listed = run(walship("base-list").arg("--config").arg(config));
    assert_eq!(listed.code, Some(0), "retried within the deadline: {listed:#?}");
    assert_eq!(proxy.faults_applied(), failing_listings, "every injected failure was met: {listed:#?}");
    let headers = listed.stdout.lines().filter(|line| line.starts_with("NAME")).count();
    assert_eq!(headers, 1, "the header once, and no backups: {listed:#?}");
    assert_eq!(listed.stdout.lines().count(), 1, "{listed:#?}");
}

/// The prefetch worker, like every command, retries a transient failure within its deadline: a
/// download that keeps failing past the S3 client's own three attempts lands in the spool on the
/// worker's next attempt, instead of being given up ("left to recovery's own request").
#[test]
fn the_prefetch_worker_retries_a_transient_failure_within_its_deadline() {
    const WANTED: &str = "000000010000000000000002";
    let s = S3Repository::new("deadline-prefetch", "[fetch]\nprefetch = 2\n");
    let data = s.scratch.mkdir("recovery");
    s.scratch.mkdir("recovery/pg_wal");
    s.scratch.mkdir("recovery/pg_wal/archive_status");
    fs::write(data.join("recovery.signal"), b"").unwrap();
    chown_to_server_user(&data.join("recovery.signal"));
    let postmaster = Running(fake_postmaster(&data));
    let _workers = Workers(&data);
    let failing_downloads = 4;
    s.proxy.add(
        Rule::new(Fault::slow_down())
            .when(|r| r.method == "GET" && r.path().ends_with(WANTED))
            .times(failing_downloads),
    );

    let log = s.scratch.path().join("wal-fetch.log");
    let status = walship("wal-fetch")
        .current_dir(&data)
        .arg("--config")
        .arg(&s.config)
        .arg("000000010000000000000001")
        .arg("pg_wal/RECOVERYXLOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // The worker inherits it: a file, so that nobody waits for the worker to close a pipe.
        .stderr(fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let said = || fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{}", said());
    let spool_root = data.join("pg_wal/walship/prefetch");
    poll_until("the worker prefetched the segment whose downloads failed", HUNG_AFTER, || {
        let spools: Vec<std::path::PathBuf> =
            fs::read_dir(&spool_root).map(|e| e.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        if spools.iter().any(|spool| spool.join(WANTED).is_file()) {
            Ok(())
        } else {
            Err(format!("{spools:?}; faults applied {}; {}", s.proxy.faults_applied(), said()))
        }
    });
    assert_eq!(s.proxy.faults_applied(), failing_downloads, "{}", said());
    assert!(!said().contains("left to recovery's own request"), "retried, not given up: {}", said());
    drop(postmaster);
}

/// Kills the prefetch workers serving the data directory when the test ends, however it ends.
struct Workers<'a>(&'a Path);

impl Drop for Workers<'_> {
    fn drop(&mut self) {
        for pid in prefetch_workers(self.0) {
            // SAFETY: plain kill(2) of a worker process found by its command line and directory.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}
