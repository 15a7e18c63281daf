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

use walship_tests::proxy::{Fault, Proxy, Rule};
use walship_tests::s3::{S3Server, write_config_file};
use walship_tests::segments::Segment;
use walship_tests::{Scratch, chown_to_server_user, run, walship};

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

/// base-list, like every command, retries a transient failure within its deadline: a catalog
/// listing that keeps failing past the S3 client's own three attempts succeeds on walship's next
/// one, and the header printed before the failure is not printed again.
#[test]
fn base_list_retries_a_transient_failure_within_its_deadline() {
    const BUCKET: &str = "walship-deadline";
    let scratch = Scratch::new("deadline-list");
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let proxy = Proxy::start(server.port());
    let text = server.config_text(&format!("s3://{BUCKET}/db"), &proxy.endpoint(), "deadline_secs = 60", "");
    let config = write_config_file(scratch.path(), "walship.toml", &text);
    // A repository: the first push writes its identity record.
    let source_dir = scratch.mkdir("source");
    let source = Segment::new(SEGMENT).write_to(&source_dir);
    let pushed = run(walship("wal-push").current_dir(&source_dir).arg("--config").arg(&config).arg(&source));
    assert_eq!(pushed.code, Some(0), "{pushed:#?}");

    let failing_listings = 4;
    proxy.add(
        Rule::new(Fault::slow_down()).when(|r| r.method == "GET" && r.has_query("list-type")).times(failing_listings),
    );
    let listed = run(walship("base-list").arg("--config").arg(&config));
    assert_eq!(listed.code, Some(0), "retried within the deadline: {listed:#?}");
    assert_eq!(proxy.faults_applied(), failing_listings, "every injected failure was met: {listed:#?}");
    let headers = listed.stdout.lines().filter(|line| line.starts_with("NAME")).count();
    assert_eq!(headers, 1, "the header once, and no backups: {listed:#?}");
    assert_eq!(listed.stdout.lines().count(), 1, "{listed:#?}");
}
