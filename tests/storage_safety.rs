//! What the storage layer must never get wrong, against real servers:
//!
//! - **Durable before "identical"**: a push that finds identical content already archived (PostgreSQL
//!   archives a segment again after a crash) exits 0 only after the archived object and its directory
//!   entries are made durable, because the push that stored it may have been killed after publishing
//!   it and before fsyncing its directory. Proven with strace while PostgreSQL 15's own archiver
//!   re-archives a segment: on local disk around `wal-push`, over SFTP attached to the real sshd
//!   (found: OpenSSH 9.2's sftp-server opens a directory read-only and fsyncs it through
//!   fsync@openssh.com, but walship's SFTP client library sends fsync only on handles opened for
//!   writing, so the old directory fsync never reached the server; walship now builds that library
//!   with the check removed, see storage/ssh.rs and vendor/).
//! - **Absent means absent**: OpenSSH's sftp-server answers ENOTDIR, ELOOP and EBADF with the same
//!   SSH2_FX_NO_SUCH_FILE as ENOENT (`errno_to_portable` in sftp-server.c:
//!   `case ENOENT: case ENOTDIR: case EBADF: case ELOOP: ret = SSH2_FX_NO_SUCH_FILE;`), and on any file
//!   system ENOENT also comes from a dangling link. During point-in-time recovery an exit 1 ends
//!   recovery early, so wal-fetch must exit 208 for a shard directory replaced by a file, a link loop
//!   or a dangling link, and 1 only for a file that is really missing.
//! - **The prefetch worker's waits are bounded**: a repository that stops answering its identity
//!   check ends the worker within the deadline, its spool removed, and recovery's own calls still get
//!   their answers (a segment, or 208 for a stall, never 1).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use walship_tests::assertions::{assert_error, assert_ok};
use walship_tests::pg::{Cluster, WAIT_TIMEOUT, fake_postmaster, prefetch_workers};
use walship_tests::proxy::{Fault, Proxy, Rule};
use walship_tests::s3::{S3Server, write_config_file};
use walship_tests::segments::{self, MIN_SEGMENT_SIZE, Segment};
use walship_tests::ssh::SshServer;
use walship_tests::{Output, Scratch, bin, chown_to_server_user, poll_until, run, walship};

const STRACE: &str = "/usr/bin/strace";
/// Where PostgreSQL asks restore_command to put most files.
const RECOVERYXLOG: &str = "pg_wal/RECOVERYXLOG";
/// The bound of every wait for a condition.
const WAIT: Duration = Duration::from_secs(60);

fn assert_strace() {
    assert!(Path::new(STRACE).is_file(), "{STRACE} is missing: apt-get install -y strace (scripts/install-deps.sh)");
}

/// Writes an executable shell script `dir/name`, owned by the server user.
fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    chown_to_server_user(&path);
    path
}

/// The syscall options of every trace: the calls that make data durable, with file names (`-y`).
const TRACE_OPTIONS: &str = "-f -y -e trace=openat,fsync,fdatasync,link,linkat";

/// The paths that a trace shows fsynced (or fdatasynced) successfully.
fn fsynced(trace: &str) -> Vec<String> {
    trace
        .lines()
        .filter(|l| (l.contains(" fsync(") || l.contains(" fdatasync(")) && l.trim_end().ends_with("= 0"))
        .filter_map(|l| Some(l.split_once('<')?.1.split_once(">)")?.0.to_owned()))
        .collect()
}

/// A cluster with 1 MiB segments that archives with `archive_command`, keeps its segments (no
/// checkpoint for an hour) and has written one complete segment, which it archived: returns the
/// cluster and the segment's name.
fn archiving_cluster(name: &str, archive_command: &str) -> (Cluster, String) {
    let cluster =
        Cluster::start_archiving(name, archive_command, &[("checkpoint_timeout", "1h"), ("max_wal_size", "1GB")]);
    cluster.psql("create table t as select g, md5(g::text) as h from generate_series(1, 2000) g");
    let segment = cluster.switch_wal();
    cluster.wait_archived(&segment, WAIT_TIMEOUT);
    (cluster, segment)
}

/// Makes PostgreSQL archive `segment` again, as it does after a crash that lost its `.done`: renames
/// `.done` back to `.ready` and wakes the archiver (SIGUSR1 sets its latch) until `.done` is back.
fn rearchive(cluster: &Cluster, segment: &str) {
    let status = cluster.data_dir().join("pg_wal/archive_status");
    let done = status.join(format!("{segment}.done"));
    fs::rename(&done, status.join(format!("{segment}.ready"))).unwrap();
    let archiver: i32 =
        cluster.psql("select pid from pg_stat_activity where backend_type = 'archiver'").parse().unwrap();
    poll_until(&format!("PostgreSQL archives {segment} again"), WAIT, || {
        // SAFETY: plain kill(2) of the cluster's archiver process.
        unsafe { libc::kill(archiver, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(200));
        if done.exists() { Ok(()) } else { Err(cluster.log_tail()) }
    });
}

/// The shard directory of a segment, relative to the repository.
fn shard(segment: &str) -> String {
    format!("wal/{}", &segment[..16])
}

/// A repeated push of a segment that the repository already holds (PostgreSQL re-archiving it after
/// a crash) must fsync the archived object, its shard directory, `wal/` and the repository root before
/// it exits 0. The first push was killed after its link, as far as anyone can tell: nothing but an
/// fsync now makes the name durable. Fails without `make_durable` (the re-push then only reads).
#[test]
fn an_identical_repush_is_made_durable_on_local_disk() {
    assert_strace();
    let store = Scratch::new("durable-local");
    let repo = store.mkdir("repo");
    let traces = store.mkdir("traces");
    // No look-ahead: another segment's upload would fsync the same directories.
    let config = write_config_file(
        store.path(),
        "walship.toml",
        &format!("repo = \"file://{}\"\ndeadline_secs = 60\n[push]\nlook_ahead = 0\n", repo.display()),
    );
    let wrapper = write_script(
        store.path(),
        "traced-wal-push",
        &format!(
            "exec {STRACE} {TRACE_OPTIONS} -o \"{}/$2.$(date +%s%N)\" {} --config {} \"$1\" \"$2\"",
            traces.display(),
            bin("wal-push").display(),
            config.display()
        ),
    );
    let (cluster, segment) = archiving_cluster("durable-local", &format!("{} %p %f", wrapper.display()));
    rearchive(&cluster, &segment);

    let mut runs: Vec<PathBuf> = fs::read_dir(&traces)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{segment}.")))
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 2, "two pushes of {segment}: {runs:?}\n{}", cluster.log_tail());
    assert!(
        cluster.log_contents().contains(&format!("{segment} was already archived with identical content")),
        "the second push found identical content\n{}",
        cluster.log_tail()
    );
    let root = fs::canonicalize(&repo).unwrap();
    let object = root.join(shard(&segment)).join(&segment);
    let repush = fs::read_to_string(&runs[1]).unwrap();
    let synced = fsynced(&repush);
    for path in [object.clone(), root.join(shard(&segment)), root.join("wal"), root.clone()] {
        assert!(
            synced.contains(&path.display().to_string()),
            "the identical re-push never fsynced {path:?}; it fsynced {synced:?}\n--- trace ---\n{repush}"
        );
    }
}

/// strace (as root: sftp-server makes itself undumpable, so an unprivileged tracer sees no file
/// names) attached to a running sshd, following every session and its sftp-server; detaches on drop.
struct ServerTrace {
    tracer: std::process::Child,
    file: PathBuf,
}

impl ServerTrace {
    fn attach(server: &SshServer, file: PathBuf) -> ServerTrace {
        let pid = server.listener_pid().expect("sshd runs");
        let tracer = Command::new(STRACE)
            .args(TRACE_OPTIONS.split(' '))
            .arg("-o")
            .arg(&file)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run strace");
        poll_until("strace has attached to sshd", WAIT, || {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let traced =
                status.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"));
            if traced { Ok(()) } else { Err(status) }
        });
        ServerTrace { tracer, file }
    }

    /// What the trace holds once every session has ended (strace writes a line per call).
    fn after_sessions(&self, server: &SshServer) -> String {
        poll_until("every sftp session has ended", WAIT, || {
            if server.sftp_sessions().is_empty() { Ok(()) } else { Err(format!("{:?}", server.sftp_sessions())) }
        });
        std::thread::sleep(Duration::from_millis(300));
        fs::read_to_string(&self.file).unwrap_or_default()
    }
}

impl Drop for ServerTrace {
    fn drop(&mut self) {
        // SIGINT makes strace detach, leaving sshd running.
        // SAFETY: plain kill(2) of the strace process we started.
        unsafe { libc::kill(self.tracer.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.tracer.wait();
    }
}

/// The same over SFTP, seen from the server: sftp-server runs under strace. A new push must fsync
/// the object's directory after its link, and the directories it created (their parents); the
/// re-push must fsync the archived object and every directory up to the repository root, all
/// through fsync@openssh.com. The client library used to refuse fsync on a handle not opened for
/// writing, so no directory was ever fsynced (walship builds it patched, see vendor/). Fails
/// without `make_durable` or without the directory fsyncs.
#[test]
fn an_identical_repush_is_made_durable_over_sftp() {
    assert_strace();
    let store = Scratch::new("durable-sftp");
    let server = SshServer::start();
    let trace = ServerTrace::attach(&server, store.path().join("sshd.trace"));
    let text = server.config_text(&server.repo_dir(), "deadline_secs = 60", "");
    let config = write_config_file(store.path(), "walship.toml", &format!("{text}[push]\nlook_ahead = 0\n"));
    let archive_command = format!("{} --config {} %p %f", bin("wal-push").display(), config.display());
    let (cluster, segment) = archiving_cluster("durable-sftp", &archive_command);
    let object = fs::canonicalize(server.repo_dir()).unwrap().join(shard(&segment)).join(&segment);
    let object_name = object.display().to_string();

    let stored = trace.after_sessions(&server);
    let link_at = stored
        .lines()
        .position(|l| l.contains("link") && l.contains(&format!("\"{object_name}\")")))
        .unwrap_or_else(|| panic!("no session linked {object:?}\n--- trace ---\n{stored}"));
    let after_link = fsynced(&stored.lines().skip(link_at + 1).collect::<Vec<_>>().join("\n"));
    let shard_dir = object.parent().unwrap().display().to_string();
    assert!(
        after_link.contains(&shard_dir),
        "the new object's directory was not fsynced after its link: {after_link:?}\n--- trace ---\n{stored}"
    );
    // The shard directory and wal/ were created by this push: their parents hold the new entries.
    let wal_dir = object.parent().unwrap().parent().unwrap().display().to_string();
    let all_synced = fsynced(&stored);
    assert!(
        all_synced.contains(&wal_dir)
            && all_synced.contains(&object.parent().unwrap().parent().unwrap().parent().unwrap().display().to_string()),
        "the directories created for the object were not made durable: {all_synced:?}\n--- trace ---\n{stored}"
    );

    rearchive(&cluster, &segment);
    assert!(
        cluster.log_contents().contains(&format!("{segment} was already archived with identical content")),
        "the second push found identical content\n{}",
        cluster.log_tail()
    );
    let all = trace.after_sessions(&server);
    let repush = &all[stored.len()..];
    let synced = fsynced(repush);
    assert!(
        synced.contains(&object_name),
        "the identical re-push never fsynced {object:?} on the server; it fsynced {synced:?}\n--- trace ---\n{repush}"
    );
    for dir in [&shard_dir, &wal_dir] {
        assert!(synced.contains(dir), "the identical re-push never fsynced {dir:?}; it fsynced {synced:?}");
    }
}

/// A data directory under point-in-time recovery, as wal-fetch sees it: `recovery.signal`, `pg_wal`.
fn pitr_data_dir(store: &Scratch, name: &str) -> PathBuf {
    let data = store.mkdir(name);
    store.mkdir(&format!("{name}/pg_wal"));
    segments::write_file(&data.join("recovery.signal"), b"");
    data
}

/// `wal-fetch ARGS NAME pg_wal/RECOVERYXLOG` from `data`, as PostgreSQL runs it.
fn fetch(args: &[&std::ffi::OsStr], data: &Path, name: &str) -> Output {
    run(walship("wal-fetch").current_dir(data).args(args).arg(name).arg(RECOVERYXLOG))
}

/// Plants, in the repository at `repo`, every way a lookup can say "no such file" without the file
/// being absent, next to the archived `segment`; returns (name asked for, what the error must say).
fn plant_lookalikes(repo: &Path, segment: &str) -> Vec<(String, &'static str)> {
    let segno = segments::segment_number(segment, MIN_SEGMENT_SIZE);
    let name = |n: u64| segments::segment_name(1, n, MIN_SEGMENT_SIZE);
    // A shard directory replaced by a file: ENOTDIR for every segment in it.
    let other_shard = segments::segment_name(1, 0x1000 * 7, MIN_SEGMENT_SIZE);
    segments::write_file(&repo.join(shard(&other_shard)), b"not a directory");
    // A link loop (ELOOP) and a link to nothing (ENOENT) where segments belong.
    let dir = repo.join(shard(segment));
    std::os::unix::fs::symlink(name(segno + 2), dir.join(name(segno + 2))).unwrap();
    std::os::unix::fs::symlink("/nonexistent/walship", dir.join(name(segno + 3))).unwrap();
    // History files: a file where their directory belongs, so that a timeline's history is hidden.
    segments::write_file(&repo.join("wal/history"), b"not a directory");
    // "directory" and "link" in every backend's words: sftp-server's answers go through
    // walship's own confirmation, local disk's ENOTDIR and ELOOP come as the system says them.
    vec![
        (other_shard.clone(), "directory"),
        (name(segno + 2), "link"),
        (name(segno + 3), "link"),
        ("00000002.history".to_owned(), "directory"),
    ]
}

/// Checks that every lookalike is an error (208, one line) and that a segment really missing is 1.
fn assert_only_missing_is_absent(repo_args: &[&std::ffi::OsStr], data: &Path, repo: &Path, segment: &str) {
    let restored = fetch(repo_args, data, segment);
    assert_ok(&restored, "the archived segment is restored");
    fs::remove_file(data.join(RECOVERYXLOG)).unwrap();
    for (name, cause) in plant_lookalikes(repo, segment) {
        let out = fetch(repo_args, data, &name);
        eprintln!("{name}: {}", out.stderr.trim_end());
        assert_error(&out, 208, &[&name, cause]);
        assert!(!data.join(RECOVERYXLOG).exists(), "{name}: something was handed over");
    }
    let missing = segments::segment_name(1, segments::segment_number(segment, MIN_SEGMENT_SIZE) + 4, MIN_SEGMENT_SIZE);
    let out = fetch(repo_args, data, &missing);
    assert_eq!(out.code, Some(1), "{missing} is really missing: {out:#?}");
    // A listing is no different: a file where the catalog directory belongs is not "no backups".
    segments::write_file(&repo.join("catalog"), b"not a directory");
    let out = run(walship("base-list").args(repo_args));
    // (base-list prints its table's header first; only the outcome matters here.)
    assert_eq!(out.code, Some(8), "base-list with a file for catalog/: {out:#?}");
    assert!(out.stderr.contains("catalog") && out.stderr.contains("directory"), "{out:#?}");
}

/// Over SFTP (real sshd, repository filled by PostgreSQL 15's archiver): a shard directory that is a
/// file, a link loop, a dangling link and a history directory that is a file are not "absent" (all
/// four come back from sftp-server as SSH2_FX_NO_SUCH_FILE); a missing segment is. Without the
/// confirmation all four exit 1.
#[test]
fn only_a_truly_missing_file_is_absent_over_sftp() {
    let store = Scratch::new("absent-sftp");
    let server = SshServer::start();
    let config = write_config_file(
        store.path(),
        "walship.toml",
        &server.config_text(&server.repo_dir(), "deadline_secs = 20", ""),
    );
    let archive_command = format!("{} --config {} %p %f", bin("wal-push").display(), config.display());
    let (cluster, segment) = archiving_cluster("absent-sftp", &archive_command);
    let data = pitr_data_dir(&store, "restore");
    let args: [&std::ffi::OsStr; 2] = ["--config".as_ref(), config.as_os_str()];
    assert_only_missing_is_absent(&args, &data, &server.repo_dir(), &segment);
    // A push into the shard that is a file names it too (rather than "not found").
    let system_identifier = cluster.psql("select system_identifier from pg_control_system()").parse().unwrap();
    let source = store.mkdir("source");
    store.mkdir("source/pg_wal");
    let name = segments::segment_name(1, 0x1000 * 7, MIN_SEGMENT_SIZE);
    Segment::new(&name).system_identifier(system_identifier).write_to(&source.join("pg_wal"));
    let out = run(walship("wal-push").current_dir(&source).args(args).arg(format!("pg_wal/{name}")).arg(&name));
    assert_error(&out, 8, &[&shard(&name), "not a directory"]);
}

/// The same on local disk, where ENOTDIR and ELOOP already fail as errors but ENOENT from a dangling
/// link did not.
#[test]
fn only_a_truly_missing_file_is_absent_on_local_disk() {
    let store = Scratch::new("absent-local");
    let repo = store.mkdir("repo");
    let archive_command = walship_tests::pg::archive_command(&repo);
    let (_cluster, segment) = archiving_cluster("absent-local", &archive_command);
    let data = pitr_data_dir(&store, "restore");
    assert_only_missing_is_absent(&["--repo".as_ref(), repo.as_os_str()], &data, &repo, &segment);
}

/// [`fetch`] with stderr to the file `log` (a prefetch worker the call starts inherits it, and would
/// hold a pipe open); returns the exit code and what the file holds.
fn fetch_logged(args: &[&std::ffi::OsStr], data: &Path, name: &str, log: &Path) -> (Option<i32>, String) {
    let status = walship("wal-fetch")
        .current_dir(data)
        .args(args)
        .arg(name)
        .arg(RECOVERYXLOG)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .status()
        .unwrap();
    (status.code(), fs::read_to_string(log).unwrap_or_default())
}

/// A fake recovery for wal-fetch's prefetch: `pg_wal/archive_status`, `recovery.signal` and a
/// `postmaster.pid` naming a live process (a `sleep` killed on drop).
struct FakeRecovery {
    data: PathBuf,
    postmaster: std::process::Child,
}

impl FakeRecovery {
    fn new(store: &Scratch) -> FakeRecovery {
        let data = pitr_data_dir(store, "recovery");
        store.mkdir("recovery/pg_wal/archive_status");
        let postmaster = fake_postmaster(&data);
        FakeRecovery { data, postmaster }
    }

    fn spools(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.data.join("pg_wal/walship/prefetch")) else { return Vec::new() };
        entries.flatten().map(|e| e.path()).collect()
    }
}

impl Drop for FakeRecovery {
    fn drop(&mut self) {
        for pid in prefetch_workers(&self.data) {
            // SAFETY: plain kill(2) of a worker process found by its command line and directory.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.postmaster.kill();
        let _ = self.postmaster.wait();
    }
}

/// An S3 repository whose identity record stops being answered (the proxy holds every GET of
/// `repository.json`) after wal-fetch restored a segment: the prefetch worker that call started
/// must give up within the deadline and remove its spool, and recovery's own calls are unharmed:
/// archived segments still come back (0) and a missing one is not called absent (208 at the
/// deadline, never 1). Without the bound the worker waits on its identity check for as long as the
/// SDK's read timeout and retries allow (set to minutes here) and leaves its spool behind.
#[test]
fn a_prefetch_worker_whose_repository_stalls_gives_up_and_removes_its_spool() {
    const DEADLINE_SECS: u64 = 4;
    let store = Scratch::new("prefetch-stall");
    let server = S3Server::start();
    server.create_bucket("stall");
    let proxy = Proxy::start(server.port());
    let text = server.config_text(
        "s3://stall/db",
        &proxy.endpoint(),
        &format!("deadline_secs = {DEADLINE_SECS}"),
        "read_timeout_secs = 300",
    );
    let config = write_config_file(store.path(), "walship.toml", &format!("{text}[fetch]\nprefetch = 4\n"));
    let source = store.mkdir("source");
    store.mkdir("source/pg_wal");
    let seg = |n: u64| segments::segment_name(1, n, MIN_SEGMENT_SIZE);
    for n in 1..=4 {
        Segment::new(&seg(n)).write_to(&source.join("pg_wal"));
        let out = run(walship("wal-push")
            .current_dir(&source)
            .arg("--config")
            .arg(&config)
            .arg(format!("pg_wal/{}", seg(n)))
            .arg(seg(n)));
        assert_ok(&out, "wal-push");
    }
    proxy.add(Rule::new(Fault::Stall).when(|r| r.method == "GET" && r.path().ends_with("/repository.json")));

    let recovery = FakeRecovery::new(&store);
    let args: [&std::ffi::OsStr; 3] = ["--config".as_ref(), config.as_os_str(), "-v".as_ref()];
    let log = store.path().join("wal-fetch.log");
    let started = Instant::now();
    let (code, _) = fetch_logged(&args, &recovery.data, &seg(1), &log);
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "wal-fetch {}: {}", seg(1), log_text());
    fs::remove_file(recovery.data.join(RECOVERYXLOG)).unwrap();
    poll_until("a prefetch worker runs", WAIT, || {
        if prefetch_workers(&recovery.data).is_empty() { Err(log_text()) } else { Ok(()) }
    });
    poll_until("the worker exits and removes its spool", Duration::from_secs(5 * DEADLINE_SECS), || {
        let (workers, spools) = (prefetch_workers(&recovery.data), recovery.spools());
        if workers.is_empty() && spools.is_empty() {
            Ok(())
        } else {
            Err(format!("{workers:?} {spools:?}\n{}", log_text()))
        }
    });
    eprintln!("worker gone after {:?}: {}", started.elapsed(), log_text());
    assert!(log_text().contains("gave up after"), "the worker says why it stopped: {}", log_text());

    // Recovery itself: an archived segment is restored, a missing one is not claimed absent.
    let (code, said) = fetch_logged(&args, &recovery.data, &seg(2), &store.path().join("wal-fetch-2.log"));
    assert_eq!(code, Some(0), "an archived segment while the identity record stalls: {said}");
    fs::remove_file(recovery.data.join(RECOVERYXLOG)).unwrap();
    let out = fetch(&args[..2], &recovery.data, &seg(9));
    assert_error(&out, 208, &["gave up after"]);
    for pid in prefetch_workers(&recovery.data) {
        // SAFETY: plain kill(2) of a worker process found by its command line and directory.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}
