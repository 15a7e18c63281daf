//! The command-line contract of `wal-push` and `wal-fetch` on an SSH repository (`ssh://user@host:port/
//! path`, SFTP through the system's `ssh`), against a real OpenSSH server on 127.0.0.1 run as the
//! server user (`harness/ssh.rs`), and the faults SSH adds: an unknown or changed host key, a key the
//! server does not accept, a server killed mid-transfer and a server that stops answering.
//!
//! The server is this machine, so the remote repository is a local directory that the tests inspect
//! and damage directly. Every configuration names its identity and known_hosts files, and every
//! command gets a scratch HOME, so nobody's real `~/.ssh` takes part. Every command is waited for with
//! a bound, so a hang fails the test instead of stalling the suite, and no ssh client may outlive its
//! command.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walship_tests::assertions::{assert_absent, assert_error, assert_no_temp_files, assert_ok, files_below};
use walship_tests::fixture::{Fixture, HANG_MARGIN, RECOVERYXLOG, temp_file_of_at_least};
use walship_tests::repository::Repository;
use walship_tests::running::{Running, finish, spawn};
use walship_tests::segments::{self, Fill, Segment};
use walship_tests::ssh::SshServer;
use walship_tests::{Output, as_server_user, run};

const SEG1: &str = "000000010000000000000001";
const SEG2: &str = "000000010000000000000002";
const SEG3: &str = "000000010000000000000003";
const MIB: u64 = 1 << 20;
/// The size of the segments that are interrupted midway: incompressible, so that the transfer lasts.
const LARGE: u32 = 64 << 20;

/// Settings for tests where nothing is meant to fail: generous, but a hang still ends.
const CALM: (&str, &str) = ("deadline_secs = 60", "connect_timeout_secs = 5\nkeepalive_secs = 5");
/// Settings for fault tests: give up soon.
const FAULTY: (&str, &str) = ("deadline_secs = 5", "connect_timeout_secs = 2\nkeepalive_secs = 1");
const FAULTY_DEADLINE: Duration = Duration::from_secs(5);

/// A fixture on a repository of a new sshd.
fn setup(label: &str) -> Fixture {
    Fixture::new_on_ssh(label, SshServer::start())
}

/// The fixture's SSH server.
fn server(s: &Fixture) -> &SshServer {
    s.repo.ssh_server().expect("an SSH fixture")
}

fn server_mut(s: &mut Fixture) -> &mut SshServer {
    let Repository::Ssh { server, .. } = &mut s.repo else { panic!("an SSH fixture") };
    server
}

/// The repository's directory: the remote path, and the same directory seen locally.
fn repo_dir(s: &Fixture) -> PathBuf {
    server(s).repo_dir()
}

/// A configuration for the repository with the right key and known_hosts, `settings` (top-level
/// and `[ssh]` lines) and `extra` `[ssh]` lines.
fn ssh_config(s: &Fixture, settings: (&str, &str), extra: &str) -> PathBuf {
    s.config_text(&server(s).config_text(&repo_dir(s), settings.0, &format!("{}\n{extra}", settings.1)))
}

/// A configuration with a chosen identity and known_hosts file.
fn config_with(s: &Fixture, settings: (&str, &str), identity: &Path, known_hosts: &Path) -> PathBuf {
    s.config_text(&server(s).config_text_with(&repo_dir(s), settings.0, identity, known_hosts, settings.1))
}

/// Waits (bounded) until the server has no SFTP session left, so that what the repository holds
/// no longer changes.
fn wait_for_sessions_to_end(s: &Fixture) {
    let started = Instant::now();
    while !server(s).sftp_sessions().is_empty() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server(s).sftp_sessions().is_empty(), "SFTP sessions still open: {:?}", server(s).sftp_sessions());
}

// ---------------------------------------------------------------------------------------------------
// The harness itself.
// ---------------------------------------------------------------------------------------------------

/// The server takes an SFTP session from OpenSSH's own client with the right key and known_hosts, and
/// refuses the wrong key, an unknown host and a changed host key, so that what the tests below see
/// is walship's doing.
#[test]
fn the_harness_server_serves_sftp_to_the_server_user_only() {
    let s = setup("ssh-harness");
    let batch = s.scratch.path().join("batch");
    let source = s.wal.join("hello");
    segments::write_file(&source, b"hello over sftp\n");
    segments::write_file(
        &batch,
        format!("put {} {}/hello\nls -l {}\n", source.display(), repo_dir(&s).display(), repo_dir(&s).display())
            .as_bytes(),
    );
    let sftp = |identity: &Path, known_hosts: &Path| {
        let mut cmd = Command::new("sftp");
        cmd.arg("-b").arg(&batch).args(["-F", "/dev/null", "-P", &server(&s).port().to_string()]);
        cmd.arg("-i").arg(identity).arg("-o").arg(format!("UserKnownHostsFile={}", known_hosts.display()));
        cmd.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]);
        cmd.arg(format!("{}@127.0.0.1", server(&s).user()));
        as_server_user(&mut cmd).env("HOME", server(&s).client_home());
        run(&mut cmd)
    };
    let out = sftp(&server(&s).identity_file(), &server(&s).known_hosts_file());
    assert_eq!(out.code, Some(0), "sftp with the right key: {out:#?}\nsshd: {}", server(&s).log());
    assert_eq!(fs::read(repo_dir(&s).join("hello")).unwrap(), b"hello over sftp\n");
    fs::remove_file(repo_dir(&s).join("hello")).unwrap();

    for (what, identity, known_hosts, expected) in [
        ("wrong key", server(&s).wrong_identity_file(), server(&s).known_hosts_file(), "Permission denied"),
        (
            "unknown host",
            server(&s).identity_file(),
            server(&s).empty_known_hosts_file(),
            "Host key verification failed",
        ),
        ("changed host key", server(&s).identity_file(), server(&s).changed_known_hosts_file(), "HOST IDENTIFICATION"),
    ] {
        let out = sftp(&identity, &known_hosts);
        assert_ne!(out.code, Some(0), "{what}: {out:#?}");
        assert!(out.stderr.contains(expected), "{what}: {:?}", out.stderr);
        assert_absent(&repo_dir(&s).join("hello"));
    }
    assert!(server(&s).host_key().starts_with("ssh-ed25519 AAAA"));
    wait_for_sessions_to_end(&s);
}

// ---------------------------------------------------------------------------------------------------
// The contract, over SSH.
// ---------------------------------------------------------------------------------------------------

/// `port` in `[ssh]` is used when the URL names none.
#[test]
fn the_port_comes_from_the_ssh_table_when_the_url_has_none() {
    let s = setup("ssh-port");
    let without_port =
        server(&s).config_text(&repo_dir(&s), CALM.0, &format!("{}\nport = {}", CALM.1, server(&s).port()));
    let without_port = without_port.replacen(&format!(":{}/", server(&s).port()), "/", 1);
    assert!(without_port.contains(&format!("@127.0.0.1{}", repo_dir(&s).display())), "{without_port}");
    let config = s.config_text(&without_port);
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push_with(&config, SEG1), "push with [ssh] port");
    s.assert_fetches_with(&config, SEG1, &original);
}

/// A server that refuses fsync@openssh.com or hardlink@openssh.com (`sftp-server -P`, which still
/// advertises both) can store nothing durably, or nothing without risking an overwrite: the push fails
/// (8) naming the refused step, the fsync is never skipped silently and the publication never falls
/// back to a rename, nothing appears under the name, and no temporary file is left. `allow_no_fsync`
/// lets the push through without fsync.
#[test]
fn a_server_refusing_fsync_or_hardlink_gets_no_object() {
    for refused in ["fsync", "hardlink"] {
        let s = Fixture::new_on_ssh(&format!("ssh-no-{refused}"), SshServer::start_with_sftp_args(&["-P", refused]));
        let config = ssh_config(&s, FAULTY, "");
        s.write_segment(&Segment::new(SEG1));
        let out = s.push_with(&config, SEG1);
        eprintln!("push to a server refusing {refused}: {out:?}");
        assert_error(&out, 8, &[refused]);
        assert_absent(&s.object(SEG1));
        let objects: Vec<String> = s.repo_files().into_iter().filter(|f| f.starts_with("wal/")).collect();
        assert!(objects.is_empty(), "refusing {refused}: {objects:?}");
        assert!(s.repo_temp_files().is_empty(), "refusing {refused}: {:?}", s.repo_temp_files());
        if refused == "fsync" {
            // Accepting the risk explicitly lets the push through, and the bytes come back.
            let risky = ssh_config(&s, FAULTY, "allow_no_fsync = true");
            let original = s.write_segment(&Segment::new(SEG1));
            assert_ok(&s.push_with(&risky, SEG1), "push with allow_no_fsync = true");
            s.assert_fetches_with(&risky, SEG1, &original);
            assert!(s.repo_temp_files().is_empty(), "{:?}", s.repo_temp_files());
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Who is at the other end.
// ---------------------------------------------------------------------------------------------------

/// Checks that a push and fetches with `config` fail (8, 208, and 1 on a standby) with one line
/// holding every needle, write nothing anywhere, and leave known_hosts as it was.
#[track_caller]
fn assert_refused(s: &Fixture, config: &Path, known_hosts: &Path, needles: &[&str]) {
    let known_hosts_before = fs::read(known_hosts).unwrap();
    let files = s.repo_files();
    let push = s.push_with(config, SEG2);
    eprintln!("refused push: {}", push.stderr.trim_end());
    assert_error(&push, 8, needles);
    let fetch = s.fetch_with(config, SEG1);
    eprintln!("refused fetch: {}", fetch.stderr.trim_end());
    assert_error(&fetch, 208, needles);
    assert_error(&s.fetch_with(config, SEG3), 208, needles);
    assert_absent(&s.destination());
    assert_no_temp_files(&s.wal);
    let standby = s.standby_data();
    assert_error(&s.fetch_in(&standby, Some(config), SEG1), 1, needles);
    assert_absent(&standby.join(RECOVERYXLOG));
    assert_eq!(s.repo_files(), files, "the repository changed");
    assert_eq!(fs::read(known_hosts).unwrap(), known_hosts_before, "{known_hosts:?} was written to");
    assert!(
        files_below(&server(s).client_home()).is_empty(),
        "written to HOME: {:?}",
        files_below(&server(s).client_home())
    );
}

/// Archives SEG1 through a good configuration, then checks with [`assert_refused`] that one naming
/// the identity and known_hosts files `pick` chooses is refused with `needles`, and that the good one
/// still restores SEG1. Returns the fixture for the caller's own checks.
#[track_caller]
fn refused_after_a_good_push(
    label: &str,
    pick: impl Fn(&SshServer) -> (PathBuf, PathBuf),
    needles: &[&str],
) -> Fixture {
    let s = setup(label);
    let good = ssh_config(&s, CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push_with(&good, SEG1), "push with the right key and known_hosts");
    s.write_segment(&Segment::new(SEG2));
    let (identity, known_hosts) = pick(server(&s));
    let config = config_with(&s, CALM, &identity, &known_hosts);
    assert_refused(&s, &config, &known_hosts, needles);
    s.assert_fetches_with(&good, SEG1, &original);
    s
}

/// A server whose host key is not in known_hosts is never trusted: one line that says so and how to
/// add the key.
#[test]
fn an_unknown_host_key_is_refused() {
    let s = refused_after_a_good_push(
        "ssh-unknown-host",
        |server| (server.identity_file(), server.empty_known_hosts_file()),
        &["host key", "ssh-keyscan", "127.0.0.1"],
    );
    // A known_hosts file that does not exist at all is the same.
    let missing = s.scratch.path().join("no-such-known-hosts");
    let config = config_with(&s, CALM, &server(&s).identity_file(), &missing);
    let out = s.push_with(&config, SEG2);
    assert_error(&out, 8, &["host key", "127.0.0.1"]);
    assert_absent(&missing);
}

/// A host key that differs from the one in known_hosts (another server, or a man in the middle) is
/// refused with one line naming the host key.
#[test]
fn a_changed_host_key_is_refused() {
    refused_after_a_good_push(
        "ssh-changed-host",
        |server| (server.identity_file(), server.changed_known_hosts_file()),
        &["host key", "127.0.0.1"],
    );
}

/// A key the server does not accept is an authentication failure, said as such, never "not found".
#[test]
fn a_wrong_identity_is_refused() {
    let s = refused_after_a_good_push(
        "ssh-wrong-key",
        |server| (server.wrong_identity_file(), server.known_hosts_file()),
        &["authentication", "127.0.0.1"],
    );
    assert!(server(&s).log().contains("Connection closed by authenticating user"), "sshd: {}", server(&s).log());
}

// ---------------------------------------------------------------------------------------------------
// Faults.
// ---------------------------------------------------------------------------------------------------

/// The server dies (SIGKILL to sshd and every session) while a large segment is being written: the
/// push fails, nothing is visible under the name, and once the server is back the next push archives
/// the segment and a fetch returns it byte for byte.
#[test]
fn server_killed_during_a_push() {
    let mut s = setup("ssh-kill-push");
    let config = ssh_config(&s, FAULTY, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    let object = s.object(SEG1);
    let dir = object.parent().unwrap().to_owned();

    let mut running = spawn(&mut s.push_cmd(Some(&config), SEG1));
    let caught = running.wait_for(Duration::from_secs(60), || temp_file_of_at_least(&dir, MIB));
    if caught {
        server_mut(&mut s).kill();
    }
    let out = s.finish(running, FAULTY_DEADLINE + HANG_MARGIN);
    assert!(caught, "the push finished before 1 MiB of it reached the server: {out:#?}");
    eprintln!("push cut off by the kill: {out:?}");
    assert_error(&out, 8, &[]);
    assert_absent(&object);
    // Nobody was left to remove it; such leftovers are hidden and never read.
    eprintln!("left in the repository by the killed push: {:?}", s.repo_temp_files());

    server_mut(&mut s).restart();
    let config = ssh_config(&s, CALM, "");
    assert_error(&s.fetch_with(&config, SEG1), 1, &[SEG1, "not in the archive"]);
    assert_ok(&s.push_with(&config, SEG1), "push after the restart");
    s.assert_fetches_with(&config, SEG1, &original);
    eprintln!("temporary files after the successful push: {:?}", s.repo_temp_files());
}

/// The server dies while a segment streams to wal-fetch: the fetch fails (208), nothing partial
/// reaches the destination, and once the server is back the fetch restores the segment.
#[test]
fn server_killed_during_a_fetch() {
    let mut s = setup("ssh-kill-fetch");
    let calm = ssh_config(&s, CALM, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    assert_ok(&s.push_with(&calm, SEG1), "push");

    let config = ssh_config(&s, FAULTY, "");
    let mut running = spawn(&mut s.fetch_cmd(Some(&config), SEG1));
    let caught = running.wait_for(Duration::from_secs(60), || temp_file_of_at_least(&s.wal, 1));
    if caught {
        server_mut(&mut s).kill();
    }
    let out = s.finish(running, FAULTY_DEADLINE + HANG_MARGIN);
    assert!(caught, "the fetch finished before anything reached the destination's directory: {out:#?}");
    eprintln!("fetch cut off by the kill: {out:?}");
    assert_error(&out, 208, &[SEG1]);
    assert_absent(&s.destination());
    assert_no_temp_files(&s.wal);

    server_mut(&mut s).restart();
    let config = ssh_config(&s, CALM, "");
    s.assert_fetches_with(&config, SEG1, &original);
}

/// Freezes the server as soon as `ready` holds while `running` runs (if it does within a minute),
/// waits for the command with `limit`, and thaws the server; says whether it froze, and what the
/// command did.
#[track_caller]
fn freeze_when(s: &Fixture, mut running: Running, limit: Duration, ready: impl FnMut() -> bool) -> (bool, Output) {
    let caught = running.wait_for(Duration::from_secs(60), ready);
    if caught {
        server(s).freeze();
    }
    let out = finish(running, limit).output;
    server(s).thaw();
    s.assert_no_clients_left();
    (caught, out)
}

/// A server that stops answering (every sshd and sftp-server process stopped with SIGSTOP) must not
/// hang archiving or recovery, whether it stops before the commands connect or in the middle of a
/// transfer: they fail within their deadline plus a margin (8, 208; 1 on a standby), and are never
/// "not found".
#[test]
fn a_server_that_stops_answering_never_hangs_a_command() {
    let s = setup("ssh-stall");
    let calm = ssh_config(&s, CALM, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    assert_ok(&s.push_with(&calm, SEG1), "push before the trouble");
    let second = s.write_segment(&Segment::new(SEG2).segment_size(LARGE).fill(Fill::Random));
    let config = ssh_config(&s, FAULTY, "");
    let limit = FAULTY_DEADLINE + HANG_MARGIN;
    let standby = s.standby_data();

    // Stopped before anyone connects: connections wait in the kernel's backlog with no banner.
    server(&s).freeze();
    let running = [
        spawn(&mut s.push_cmd(Some(&config), SEG2)),
        spawn(&mut s.fetch_cmd(Some(&config), SEG1)),
        spawn(&mut s.fetch_cmd(Some(&config), SEG3)),
        spawn(&mut s.fetch_cmd_in(&standby, Some(&config), SEG3)),
    ];
    let outputs = running.map(|r| finish(r, limit).output);
    server(&s).thaw();
    s.assert_no_clients_left();
    let [push, fetch_archived, fetch_missing, fetch_standby] = &outputs;
    eprintln!("frozen before connecting: {outputs:#?}");
    assert_error(push, 8, &[]);
    assert_error(fetch_archived, 208, &[]);
    assert_error(fetch_missing, 208, &[]);
    assert_error(fetch_standby, 1, &[]);
    for data in [&s.data, &standby] {
        assert_absent(&data.join(RECOVERYXLOG));
        assert_no_temp_files(&data.join("pg_wal"));
    }
    wait_for_sessions_to_end(&s);
    assert_absent(&s.object(SEG2));

    // Stopped in the middle of a push.
    let dir = s.object(SEG2).parent().unwrap().to_owned();
    let running = spawn(&mut s.push_cmd(Some(&config), SEG2));
    let (caught, out) = freeze_when(&s, running, limit, || temp_file_of_at_least(&dir, MIB));
    assert!(caught, "the push finished before 1 MiB of it reached the server: {out:#?}");
    eprintln!("push with the server stopped midway: {out:?}");
    assert_error(&out, 8, &[]);
    wait_for_sessions_to_end(&s);
    assert_absent(&s.object(SEG2));

    // Stopped in the middle of a fetch.
    let running = spawn(&mut s.fetch_cmd(Some(&config), SEG1));
    let (caught, out) = freeze_when(&s, running, limit, || temp_file_of_at_least(&s.wal, 1));
    assert!(caught, "the fetch finished before anything reached the destination's directory: {out:#?}");
    eprintln!("fetch with the server stopped midway: {out:?}");
    assert_error(&out, 208, &[]);
    let fetch_midway = out;
    assert_absent(&s.destination());
    assert_no_temp_files(&s.wal);

    // Answering again, the server serves both.
    s.assert_fetches_with(&calm, SEG1, &original);
    assert_ok(&s.push_with(&calm, SEG2), "push once the server answers again");
    s.assert_fetches_with(&calm, SEG2, &second);
    eprintln!("temporary files left in the repository: {:?}", s.repo_temp_files());

    // Checked last, so that every other expectation is proven even while this one fails: as on S3, a
    // fetch that gives up names the file it was fetching, and every failure names the server.
    let server = format!("127.0.0.1:{}", server(&s).port());
    let mut unnamed = Vec::new();
    for (out, name) in [(fetch_archived, SEG1), (fetch_missing, SEG3), (&fetch_midway, SEG1)] {
        if !(out.stderr.contains(name) && out.stderr.contains(&server)) {
            unnamed.push(format!("{name}: {:?}", out.stderr));
        }
    }
    if !push.stderr.contains(&server) {
        unnamed.push(format!("push: {:?}", push.stderr));
    }
    assert!(
        unnamed.is_empty(),
        "a command that timed out must name what it was doing, as every other error does:\n{}",
        unnamed.join("\n")
    );
}

/// A connection cut in the middle of a transfer while the server stays up (the session's sshd and
/// sftp-server killed: a dropped connection, a restarted service) is passing trouble, as a download
/// broken off midway is on S3: the command starts over on a new connection and succeeds within its
/// deadline, and nothing partial is ever visible, in the repository or where PostgreSQL looks.
#[test]
fn a_connection_cut_midway_is_retried_on_a_new_one() {
    let s = setup("ssh-cut");
    let deadline = Duration::from_secs(30);
    let config = ssh_config(&s, ("deadline_secs = 30", FAULTY.1), "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    let object = s.object(SEG1);
    let dir = object.parent().unwrap().to_owned();
    // Both directions are tried; what failed is reported together at the end.
    let mut failed = Vec::new();

    let mut running = spawn(&mut s.push_cmd(Some(&config), SEG1));
    let caught = running.wait_for(Duration::from_secs(60), || temp_file_of_at_least(&dir, MIB));
    let killed = if caught { server(&s).kill_sessions() } else { 0 };
    let out = s.finish(running, deadline + HANG_MARGIN);
    assert!(caught, "the push finished before 1 MiB of it reached the server: {out:#?}");
    assert!(killed > 0, "no session was cut");
    eprintln!("push through a cut connection: {out:?}");
    if out.code == Some(0) {
        assert_ok(&out, "push through a cut connection");
    } else {
        assert_error(&out, 8, &[]);
        failed.push(format!("push: exit {:?}: {}", out.code, out.stderr.trim_end()));
        assert_absent(&object);
        assert_ok(&s.push_with(&config, SEG1), "push again after the cut");
    }
    wait_for_sessions_to_end(&s);
    // What the push's cut attempt left, after the push went on to succeed on a new connection.
    let left_by_push = s.repo_temp_files();

    let mut running = spawn(&mut s.fetch_cmd(Some(&config), SEG1));
    let caught = running.wait_for(Duration::from_secs(60), || temp_file_of_at_least(&s.wal, 1));
    let killed = if caught { server(&s).kill_sessions() } else { 0 };
    let out = s.finish(running, deadline + HANG_MARGIN);
    assert!(caught, "the fetch finished before anything reached the destination's directory: {out:#?}");
    assert!(killed > 0, "no session was cut");
    eprintln!("fetch through a cut connection: {out:?}");
    assert_no_temp_files(&s.wal);
    if out.code == Some(0) {
        assert_ok(&out, "fetch through a cut connection");
        let restored = fs::read(s.destination()).unwrap();
        assert!(restored == original, "restored bytes differ from the original");
        fs::remove_file(s.destination()).unwrap();
    } else {
        assert_error(&out, 208, &[]);
        assert_absent(&s.destination());
        failed.push(format!("fetch: exit {:?}: {}", out.code, out.stderr.trim_end()));
    }
    s.assert_fetches_with(&config, SEG1, &original);
    assert!(failed.is_empty(), "transfers cut midway were not retried on a new connection:\n{}", failed.join("\n"));
    // Checked last: the command that succeeded on a new connection knows the temporary file its cut
    // attempt left (a whole segment's worth) and can remove it, as an S3 push aborts its multipart
    // upload; otherwise every dropped connection leaks a segment's size of disk on the server.
    assert!(
        left_by_push.is_empty(),
        "a push that succeeded after a cut connection left its first attempt's temporary file: {left_by_push:?}"
    );
}
