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
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use walship_tests::assertions::{
    assert_absent, assert_error, assert_no_temp_files, assert_ok, files_below, sha256_hex, temp_files,
};
use walship_tests::s3::write_config_file;
use walship_tests::segments::{self, Fill, Segment};
use walship_tests::ssh::SshServer;
use walship_tests::{Output, Scratch, as_server_user, run, walship};

const SEG1: &str = "000000010000000000000001";
const SEG2: &str = "000000010000000000000002";
const SEG3: &str = "000000010000000000000003";
/// Where PostgreSQL asks restore_command to put most files.
const RECOVERYXLOG: &str = "pg_wal/RECOVERYXLOG";
const MIB: u64 = 1 << 20;
/// The size of the segments that are interrupted midway: incompressible, so that the transfer lasts.
const LARGE: u32 = 64 << 20;

/// Settings for tests where nothing is meant to fail: generous, but a hang still ends.
const CALM: (&str, &str) = ("deadline_secs = 60", "connect_timeout_secs = 5\nkeepalive_secs = 5");
/// Settings for fault tests: give up soon.
const FAULTY: (&str, &str) = ("deadline_secs = 5", "connect_timeout_secs = 2\nkeepalive_secs = 1");
const FAULTY_DEADLINE: Duration = Duration::from_secs(5);
/// How long past its deadline a command may take before the test calls it hung.
const HANG_MARGIN: Duration = Duration::from_secs(30);

/// The repository key of a WAL file (the layout of `crates/walship/src/repo/mod.rs`).
fn key_of(name: &str) -> String {
    if name.ends_with(".history") { format!("wal/history/{name}") } else { format!("wal/{}/{name}", &name[..16]) }
}

/// An sshd serving a repository directory, a data directory whose `pg_wal` holds the files to
/// archive, and configuration files written on demand. The binaries run from the data directory, as
/// under archive_command and restore_command.
struct Setup {
    scratch: Scratch,
    server: SshServer,
    /// The repository's directory: the remote path, and the same directory seen locally.
    repo: PathBuf,
    data: PathBuf,
    wal: PathBuf,
    configs: AtomicU32,
}

impl Setup {
    fn new(label: &str) -> Setup {
        Setup::with_server(label, SshServer::start())
    }

    fn with_server(label: &str, server: SshServer) -> Setup {
        let scratch = Scratch::new(label);
        let data = scratch.mkdir("pgdata");
        let wal = scratch.mkdir("pgdata/pg_wal");
        let repo = server.repo_dir();
        Setup { scratch, server, repo, data, wal, configs: AtomicU32::new(0) }
    }

    /// A configuration for the repository with the right key and known_hosts, `settings` (top-level
    /// and `[ssh]` lines) and `extra` `[ssh]` lines.
    fn config(&self, settings: (&str, &str), extra: &str) -> PathBuf {
        self.config_text(&self.server.config_text(&self.repo, settings.0, &format!("{}\n{extra}", settings.1)))
    }

    /// A configuration with a chosen identity and known_hosts file.
    fn config_with(&self, settings: (&str, &str), identity: &Path, known_hosts: &Path) -> PathBuf {
        self.config_text(&self.server.config_text_with(&self.repo, settings.0, identity, known_hosts, settings.1))
    }

    /// Writes `text` as a new configuration file.
    fn config_text(&self, text: &str) -> PathBuf {
        let n = self.configs.fetch_add(1, Ordering::SeqCst);
        write_config_file(self.scratch.path(), &format!("walship-{n}.toml"), text)
    }

    /// One of our binaries, with the scratch HOME for ssh.
    fn command(&self, name: &str, cwd: &Path) -> Command {
        let mut cmd = walship(name);
        cmd.current_dir(cwd).env("HOME", self.server.client_home());
        cmd
    }

    fn push_cmd(&self, config: &Path, name: &str) -> Command {
        let mut cmd = self.command("wal-push", &self.data);
        cmd.arg("--config").arg(config).arg(format!("pg_wal/{name}")).arg(name);
        cmd
    }

    fn fetch_cmd(&self, config: &Path, name: &str) -> Command {
        self.fetch_cmd_in(&self.data, config, name)
    }

    /// `wal-fetch` run from the data directory `data`.
    fn fetch_cmd_in(&self, data: &Path, config: &Path, name: &str) -> Command {
        let mut cmd = self.command("wal-fetch", data);
        cmd.arg("--config").arg(config).arg(name).arg(RECOVERYXLOG);
        cmd
    }

    /// A second data directory, of a standby (it holds standby.signal).
    fn standby_data(&self) -> PathBuf {
        let data = self.scratch.path().join("standby");
        if !data.exists() {
            self.scratch.mkdir("standby");
            self.scratch.mkdir("standby/pg_wal");
            segments::write_file(&data.join("standby.signal"), b"");
        }
        data
    }

    /// Waits for `running` with a bound, then checks that it left no ssh client behind.
    #[track_caller]
    fn finish(&self, running: Running, limit: Duration) -> Output {
        let output = finish(running, limit);
        self.assert_no_clients_left();
        output
    }

    /// `wal-push --config CONFIG pg_wal/<name> <name>`, waited for with a bound.
    #[track_caller]
    fn push(&self, config: &Path, name: &str) -> Output {
        self.finish(spawn(&mut self.push_cmd(config, name)), HANG_MARGIN * 2)
    }

    /// `wal-fetch --config CONFIG <name> pg_wal/RECOVERYXLOG`, waited for with a bound.
    #[track_caller]
    fn fetch(&self, config: &Path, name: &str) -> Output {
        self.finish(spawn(&mut self.fetch_cmd(config, name)), HANG_MARGIN * 2)
    }

    #[track_caller]
    fn fetch_in(&self, data: &Path, config: &Path, name: &str) -> Output {
        self.finish(spawn(&mut self.fetch_cmd_in(data, config, name)), HANG_MARGIN * 2)
    }

    /// An `ssh` process may take a moment to go after its command exited; one still there after a
    /// few seconds was left behind (it would pile up under archive_command).
    #[track_caller]
    fn assert_no_clients_left(&self) {
        let started = Instant::now();
        while !self.server.client_processes().is_empty() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = self.server.kill_clients();
        assert!(left.is_empty(), "ssh clients outlived their command: {left:#?}");
    }

    fn write_segment(&self, segment: &Segment) -> Vec<u8> {
        let bytes = segment.bytes();
        segments::write_file(&self.wal.join(segment.name()), &bytes);
        bytes
    }

    fn write_wal_file(&self, name: &str, bytes: &[u8]) {
        segments::write_file(&self.wal.join(name), bytes);
    }

    /// Where the repository keeps `name`.
    fn object(&self, name: &str) -> PathBuf {
        self.repo.join(key_of(name))
    }

    fn destination(&self) -> PathBuf {
        self.data.join(RECOVERYXLOG)
    }

    /// Fetches `name` and checks that exactly `expected` arrives; removes the restored file again.
    #[track_caller]
    fn assert_fetches(&self, config: &Path, name: &str, expected: &[u8]) {
        let out = self.fetch(config, name);
        assert_ok(&out, &format!("fetch {name}"));
        let restored = fs::read(self.destination()).expect("the restored file");
        assert!(restored == expected, "fetch {name}: restored {} bytes that differ from the original", restored.len());
        fs::remove_file(self.destination()).unwrap();
        assert_no_temp_files(&self.wal);
    }

    fn become_standby(&self) {
        segments::write_file(&self.data.join("standby.signal"), b"");
    }

    fn stop_being_standby(&self) {
        fs::remove_file(self.data.join("standby.signal")).unwrap();
    }

    /// Every file below the repository directory (temporary ones included), relative, sorted.
    fn repo_files(&self) -> Vec<String> {
        files_below(&self.repo)
    }

    /// Hidden temporary files anywhere in the repository.
    fn repo_temp_files(&self) -> Vec<String> {
        self.repo_files()
            .into_iter()
            .filter(|f| Path::new(f).file_name().unwrap().to_string_lossy().starts_with('.') && f.ends_with(".tmp"))
            .collect()
    }

    /// Waits (bounded) until the server has no SFTP session left, so that what the repository holds
    /// no longer changes.
    fn wait_for_sessions_to_end(&self) {
        let started = Instant::now();
        while !self.server.sftp_sessions().is_empty() && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(self.server.sftp_sessions().is_empty(), "SFTP sessions still open: {:?}", self.server.sftp_sessions());
    }
}

/// A command started with its output collected on the side.
struct Running {
    child: Child,
    what: String,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
    started: Instant,
}

fn spawn(cmd: &mut Command) -> Running {
    let what = format!("{:?} {:?}", cmd.get_program(), cmd.get_args().collect::<Vec<_>>());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    Running { child, what, stdout, stderr, started: Instant::now() }
}

impl Running {
    fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }
}

/// Waits for `running` to exit; kills it and fails the test if it takes longer than `limit`.
#[track_caller]
fn finish(mut running: Running, limit: Duration) -> Output {
    loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            let text = |h: JoinHandle<Vec<u8>>| String::from_utf8_lossy(&h.join().unwrap()).into_owned();
            return Output { code: status.code(), stdout: text(running.stdout), stderr: text(running.stderr) };
        }
        if running.started.elapsed() > limit {
            let _ = running.child.kill();
            let _ = running.child.wait();
            panic!("{} hung: still running after {} s", running.what, limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits, at most `limit`, until `ready` holds or `running` exits; says whether `ready` held first.
fn wait_until(running: &mut Running, limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit && !running.has_exited() {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Whether `dir` holds a temporary file of at least `bytes` bytes.
fn temp_file_of_at_least(dir: &Path, bytes: u64) -> bool {
    temp_files(dir).iter().any(|t| fs::metadata(dir.join(t)).is_ok_and(|m| m.len() >= bytes))
}

/// (length, mtime, inode): changes if an object is rewritten or replaced.
fn identity_of(path: &Path) -> (u64, SystemTime, u64) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    (meta.len(), meta.modified().unwrap(), meta.ino())
}

/// The server user's home directory from the password database (where ssh looks for `~/.ssh`,
/// whatever HOME says).
fn server_user_home(user: &str) -> PathBuf {
    let out = Command::new("getent").args(["passwd", user]).output().expect("run getent");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    PathBuf::from(line.trim().split(':').nth(5).unwrap_or_else(|| panic!("getent passwd {user}: {line:?}")))
}

// ---------------------------------------------------------------------------------------------------
// The harness itself.
// ---------------------------------------------------------------------------------------------------

/// The server takes an SFTP session from OpenSSH's own client with the right key and known_hosts, and
/// refuses the wrong key, an unknown host and a changed host key, so that what the tests below see
/// is walship's doing.
#[test]
fn the_harness_server_serves_sftp_to_the_server_user_only() {
    let s = Setup::new("ssh-harness");
    let batch = s.scratch.path().join("batch");
    let source = s.wal.join("hello");
    segments::write_file(&source, b"hello over sftp\n");
    segments::write_file(
        &batch,
        format!("put {} {}/hello\nls -l {}\n", source.display(), s.repo.display(), s.repo.display()).as_bytes(),
    );
    let sftp = |identity: &Path, known_hosts: &Path| {
        let mut cmd = Command::new("sftp");
        cmd.arg("-b").arg(&batch).args(["-F", "/dev/null", "-P", &s.server.port().to_string()]);
        cmd.arg("-i").arg(identity).arg("-o").arg(format!("UserKnownHostsFile={}", known_hosts.display()));
        cmd.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]);
        cmd.arg(format!("{}@127.0.0.1", s.server.user()));
        as_server_user(&mut cmd).env("HOME", s.server.client_home());
        run(&mut cmd)
    };
    let out = sftp(&s.server.identity_file(), &s.server.known_hosts_file());
    assert_eq!(out.code, Some(0), "sftp with the right key: {out:#?}\nsshd: {}", s.server.log());
    assert_eq!(fs::read(s.repo.join("hello")).unwrap(), b"hello over sftp\n");
    fs::remove_file(s.repo.join("hello")).unwrap();

    for (what, identity, known_hosts, expected) in [
        ("wrong key", s.server.wrong_identity_file(), s.server.known_hosts_file(), "Permission denied"),
        ("unknown host", s.server.identity_file(), s.server.empty_known_hosts_file(), "Host key verification failed"),
        ("changed host key", s.server.identity_file(), s.server.changed_known_hosts_file(), "HOST IDENTIFICATION"),
    ] {
        let out = sftp(&identity, &known_hosts);
        assert_ne!(out.code, Some(0), "{what}: {out:#?}");
        assert!(out.stderr.contains(expected), "{what}: {:?}", out.stderr);
        assert_absent(&s.repo.join("hello"));
    }
    assert!(s.server.host_key().starts_with("ssh-ed25519 AAAA"));
    s.wait_for_sessions_to_end();
}

// ---------------------------------------------------------------------------------------------------
// The contract, over SSH.
// ---------------------------------------------------------------------------------------------------

/// Every kind of file PostgreSQL archives goes where the layout says, in walship's format, with no
/// temporary file left, and comes back byte for byte; nobody's real `~/.ssh` is touched.
#[test]
fn every_kind_of_file_round_trips_in_the_documented_layout() {
    let s = Setup::new("ssh-layout");
    let user_ssh = server_user_home(&s.server.user()).join(".ssh");
    let homes_ssh = [Path::new("/tmp/.ssh").to_owned(), user_ssh];
    let absent_before: Vec<&PathBuf> = homes_ssh.iter().filter(|p| !p.exists()).collect();
    let known_hosts = fs::read(s.server.known_hosts_file()).unwrap();

    let config = s.config(CALM, "");
    let segment = s.write_segment(&Segment::new(SEG1));
    let partial_name = format!("{SEG3}.partial");
    let partial = s.write_segment(&Segment::new(&partial_name));
    let history_name = segments::history_name(2);
    let history = segments::history_content(2, "no recovery target specified");
    s.write_wal_file(&history_name, history.as_bytes());
    let (label_name, label) = segments::backup_label(1, 0x0010_0028, segments::MIN_SEGMENT_SIZE);
    s.write_wal_file(&label_name, label.as_bytes());

    for name in [SEG1, &partial_name, &history_name, &label_name] {
        let out = s.push(&config, name);
        assert_ok(&out, &format!("push {name}"));
        assert!(out.stderr.contains(&format!("archived {name}")), "{:?}", out.stderr);
    }
    let mut expected: Vec<String> =
        [SEG1, &partial_name, &history_name, &label_name].iter().map(|n| key_of(n)).collect();
    expected.push("repository.json".into());
    expected.sort();
    assert_eq!(s.repo_files(), expected, "the repository holds exactly the documented layout, no temporary files");

    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(s.repo.join("repository.json")).unwrap()).expect("repository.json is JSON");
    assert_eq!(record["system_identifier"], segments::DEFAULT_SYSTEM_IDENTIFIER.to_string(), "{record}");
    assert_eq!(record["wal_segment_size"], segments::MIN_SEGMENT_SIZE, "{record}");
    let stored = fs::read(s.object(SEG1)).unwrap();
    assert!(stored.starts_with(b"WALSHIP\0"), "not in walship's format: {:?}", &stored[..16]);
    assert!(stored.len() < segment.len() / 4, "a WAL-like segment should compress: {} bytes", stored.len());

    s.assert_fetches(&config, SEG1, &segment);
    s.assert_fetches(&config, &partial_name, &partial);
    s.assert_fetches(&config, &history_name, history.as_bytes());
    s.assert_fetches(&config, &label_name, label.as_bytes());

    // The repository URL on the command line, with [ssh] from the file, works the same.
    let ssh_only = s.config_text(&s.server.config_text(&s.repo, CALM.0, CALM.1).replacen("repo = ", "# repo = ", 1));
    let out = s.finish(spawn(s.fetch_cmd(&ssh_only, SEG1).arg("--repo").arg(s.server.url(&s.repo))), HANG_MARGIN * 2);
    assert_ok(&out, "fetch with --repo ssh://...");
    assert!(fs::read(s.destination()).unwrap() == segment);
    fs::remove_file(s.destination()).unwrap();

    assert_eq!(fs::read(s.server.known_hosts_file()).unwrap(), known_hosts, "known_hosts was written to");
    assert!(
        files_below(&s.server.client_home()).is_empty(),
        "written to the client's HOME: {:?}",
        files_below(&s.server.client_home())
    );
    for path in absent_before {
        assert_absent(path);
    }
}

/// PostgreSQL archives a segment again after a crash: identical content is success, and the archived
/// object is not rewritten.
#[test]
fn identical_repush_succeeds_without_writing() {
    let s = Setup::new("ssh-repush");
    let config = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "first push");
    let object = s.object(SEG1);
    let before = identity_of(&object);
    let files = s.repo_files();

    let out = s.push(&config, SEG1);
    assert_ok(&out, "second push");
    assert!(out.stderr.contains(SEG1) && out.stderr.contains("already archived"), "{:?}", out.stderr);
    assert_eq!(identity_of(&object), before, "the archived object was rewritten");
    assert_eq!(s.repo_files(), files, "an identical re-push changed the repository");
    s.assert_fetches(&config, SEG1, &original);
}

/// Different content under an archived name is refused with both digests, and the archived copy is
/// untouched.
#[test]
fn different_content_under_an_archived_name_is_a_conflict() {
    let s = Setup::new("ssh-conflict");
    let config = s.config(CALM, "");
    let first = s.write_segment(&Segment::new(SEG1).seed(1));
    assert_ok(&s.push(&config, SEG1), "first push");
    let object = s.object(SEG1);
    let before = identity_of(&object);
    let stored = fs::read(&object).unwrap();
    let files = s.repo_files();

    let second = s.write_segment(&Segment::new(SEG1).seed(2));
    assert_ne!(first, second);
    let out = s.push(&config, SEG1);
    assert_error(&out, 5, &[SEG1, "different content", &sha256_hex(&first), &sha256_hex(&second)]);
    assert_eq!(identity_of(&object), before, "the archived object was touched");
    assert_eq!(fs::read(&object).unwrap(), stored);
    assert_eq!(s.repo_files(), files, "a conflicting push left something in the repository");
    s.assert_fetches(&config, SEG1, &first);
}

/// Recovery asks for files that do not exist as a matter of course: exit 1 where the repository
/// proves it, and nothing appears where PostgreSQL looks nor in the repository.
#[test]
fn missing_files_are_not_found_and_nothing_is_written() {
    let s = Setup::new("ssh-missing");
    let config = s.config(CALM, "");
    // An empty directory is not a repository: absence proves nothing there.
    let out = s.fetch(&config, SEG1);
    assert_error(&out, 206, &["repository.json", "not a walship repository"]);
    assert_absent(&s.destination());
    assert!(s.repo_files().is_empty(), "a fetch wrote to the repository: {:?}", s.repo_files());

    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push");
    let files = s.repo_files();
    for name in [SEG2, "00000002.history", "000000020000000000000001.partial"] {
        let out = s.fetch(&config, name);
        assert_error(&out, 1, &[name, "not in the archive"]);
        assert_absent(&s.destination());
        assert_no_temp_files(&s.wal);
    }
    s.become_standby();
    assert_error(&s.fetch(&config, SEG2), 1, &[SEG2]);
    assert_absent(&s.destination());
    assert_eq!(s.repo_files(), files, "fetches changed the repository");
}

/// A damaged object is never restored (207, or 1 on a standby), and a damaged history file is not
/// called identical by a re-push.
#[test]
fn corrupt_objects_are_never_handed_over() {
    let s = Setup::new("ssh-corrupt");
    let config = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push");
    let object = s.object(SEG1);
    let stored = fs::read(&object).unwrap();
    let key = key_of(SEG1);

    let mut flipped = stored.clone();
    flipped[stored.len() / 2] ^= 0x40;
    for (what, damaged) in [
        ("flipped byte", flipped),
        ("cut in half", stored[..stored.len() / 2].to_vec()),
        ("last byte cut", stored[..stored.len() - 1].to_vec()),
        ("empty", Vec::new()),
    ] {
        fs::write(&object, &damaged).unwrap();
        let out = s.fetch(&config, SEG1);
        assert_error(&out, 207, &[&key, "corrupt"]);
        assert_absent(&s.destination());
        assert_no_temp_files(&s.wal);
        s.become_standby();
        assert_error(&s.fetch(&config, SEG1), 1, &[&key, "corrupt"]);
        assert_absent(&s.destination());
        s.stop_being_standby();
        assert_eq!(fs::read(&object).unwrap(), damaged, "{what}: the damaged object was replaced");
    }
    fs::write(&object, &stored).unwrap();
    s.assert_fetches(&config, SEG1, &original);

    // History files are compared byte for byte with the archived copy, which must decode first.
    let name = segments::history_name(2);
    let history = segments::history_content(2, "no recovery target specified");
    s.write_wal_file(&name, history.as_bytes());
    assert_ok(&s.push(&config, &name), "history push");
    let object = s.object(&name);
    let mut damaged = fs::read(&object).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    fs::write(&object, &damaged).unwrap();
    assert_error(&s.push(&config, &name), 7, &[&key_of(&name), "corrupt"]);
    assert_error(&s.fetch(&config, &name), 207, &[&key_of(&name), "corrupt"]);
    assert_absent(&s.destination());
    assert_eq!(fs::read(&object).unwrap(), damaged, "the damaged history object was replaced silently");
}

/// Timeline history files decide which timeline recovery follows: never overwritten, compared byte for
/// byte (even when the length matches).
#[test]
fn history_files_are_never_overwritten() {
    let s = Setup::new("ssh-history");
    let config = s.config(CALM, "");
    let name = segments::history_name(2);
    let first = segments::history_content(2, "no recovery target specified");
    s.write_wal_file(&name, first.as_bytes());
    assert_ok(&s.push(&config, &name), "first push");
    let object = s.object(&name);
    let before = identity_of(&object);
    assert_ok(&s.push(&config, &name), "identical push");
    assert_eq!(identity_of(&object), before);

    let second = segments::history_content(2, "no recovery target specifieD");
    assert_eq!(first.len(), second.len());
    s.write_wal_file(&name, second.as_bytes());
    assert_error(&s.push(&config, &name), 5, &[&name, "different content"]);
    assert_eq!(identity_of(&object), before);
    assert!(s.repo_temp_files().is_empty(), "{:?}", s.repo_temp_files());
    s.assert_fetches(&config, &name, first.as_bytes());
}

/// Two servers archiving one name at the same moment (a split brain, a promoted standby racing its old
/// primary): with identical content both succeed; with different content exactly one wins, the other
/// is refused (5), and the archive holds the winner's bytes, whole.
#[test]
fn racing_pushes_of_one_name_never_overwrite() {
    let s = Setup::new("ssh-race");
    let config = s.config(CALM, "");
    // Data directories of two servers, each with its own copy of the segment.
    let other = s.standby_data();
    fs::remove_file(other.join("standby.signal")).unwrap();
    let push_from = |data: &Path| {
        let mut cmd = s.command("wal-push", data);
        cmd.arg("--config").arg(&config).arg(format!("pg_wal/{SEG1}")).arg(SEG1);
        spawn(&mut cmd)
    };
    let first = Segment::new(SEG1).segment_size(16 << 20).fill(Fill::Random).seed(1);
    for (round, second) in [first.clone(), first.clone().seed(2)].into_iter().enumerate() {
        // The previous round's object goes: each round races to create it.
        let _ = fs::remove_file(s.object(SEG1));
        let a = s.write_segment(&first);
        let b = second.bytes();
        segments::write_file(&other.join("pg_wal").join(SEG1), &b);
        let running = [push_from(&s.data), push_from(&other)];
        let [out_a, out_b] = running.map(|r| s.finish(r, HANG_MARGIN * 2));
        eprintln!("round {round}: {out_a:?}\n{out_b:?}");
        let stored = s.fetch(&config, SEG1);
        assert_ok(&stored, "fetch after the race");
        let restored = fs::read(s.destination()).unwrap();
        fs::remove_file(s.destination()).unwrap();
        if a == b {
            assert_ok(&out_a, "identical racing push");
            assert_ok(&out_b, "identical racing push");
            assert!(restored == a);
        } else {
            let (winner, loser, lost) = match (out_a.code, out_b.code) {
                (Some(0), _) => (&a, &out_b, &b),
                (_, Some(0)) => (&b, &out_a, &a),
                _ => panic!("neither racing push succeeded: {out_a:#?} {out_b:#?}"),
            };
            assert_error(loser, 5, &[SEG1, "different content", &sha256_hex(winner), &sha256_hex(lost)]);
            assert!(restored == *winner, "the archive holds neither push's bytes whole");
        }
        assert!(s.repo_temp_files().is_empty(), "round {round}: {:?}", s.repo_temp_files());
    }
}

/// `port` in `[ssh]` is used when the URL names none.
#[test]
fn the_port_comes_from_the_ssh_table_when_the_url_has_none() {
    let s = Setup::new("ssh-port");
    let without_port = s.server.config_text(&s.repo, CALM.0, &format!("{}\nport = {}", CALM.1, s.server.port()));
    let without_port = without_port.replacen(&format!(":{}/", s.server.port()), "/", 1);
    assert!(without_port.contains(&format!("@127.0.0.1{}", s.repo.display())), "{without_port}");
    let config = s.config_text(&without_port);
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push with [ssh] port");
    s.assert_fetches(&config, SEG1, &original);
}

/// A server that refuses fsync@openssh.com or hardlink@openssh.com (`sftp-server -P`, which still
/// advertises both) can store nothing durably, or nothing without risking an overwrite: the push fails
/// (8) naming the refused step, the fsync is never skipped silently and the publication never falls
/// back to a rename, nothing appears under the name, and no temporary file is left. `allow_no_fsync`
/// lets the push through without fsync.
#[test]
fn a_server_refusing_fsync_or_hardlink_gets_no_object() {
    for refused in ["fsync", "hardlink"] {
        let s = Setup::with_server(&format!("ssh-no-{refused}"), SshServer::start_with_sftp_args(&["-P", refused]));
        let config = s.config(FAULTY, "");
        s.write_segment(&Segment::new(SEG1));
        let out = s.push(&config, SEG1);
        eprintln!("push to a server refusing {refused}: {out:?}");
        assert_error(&out, 8, &[refused]);
        assert_absent(&s.object(SEG1));
        let objects: Vec<String> = s.repo_files().into_iter().filter(|f| f.starts_with("wal/")).collect();
        assert!(objects.is_empty(), "refusing {refused}: {objects:?}");
        assert!(s.repo_temp_files().is_empty(), "refusing {refused}: {:?}", s.repo_temp_files());
        if refused == "fsync" {
            // Accepting the risk explicitly lets the push through, and the bytes come back.
            let risky = s.config(FAULTY, "allow_no_fsync = true");
            let original = s.write_segment(&Segment::new(SEG1));
            assert_ok(&s.push(&risky, SEG1), "push with allow_no_fsync = true");
            s.assert_fetches(&risky, SEG1, &original);
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
fn assert_refused(s: &Setup, config: &Path, known_hosts: &Path, needles: &[&str]) {
    let known_hosts_before = fs::read(known_hosts).unwrap();
    let files = s.repo_files();
    let push = s.push(config, SEG2);
    eprintln!("refused push: {}", push.stderr.trim_end());
    assert_error(&push, 8, needles);
    let fetch = s.fetch(config, SEG1);
    eprintln!("refused fetch: {}", fetch.stderr.trim_end());
    assert_error(&fetch, 208, needles);
    assert_error(&s.fetch(config, SEG3), 208, needles);
    assert_absent(&s.destination());
    assert_no_temp_files(&s.wal);
    let standby = s.standby_data();
    assert_error(&s.fetch_in(&standby, config, SEG1), 1, needles);
    assert_absent(&standby.join(RECOVERYXLOG));
    assert_eq!(s.repo_files(), files, "the repository changed");
    assert_eq!(fs::read(known_hosts).unwrap(), known_hosts_before, "{known_hosts:?} was written to");
    assert!(
        files_below(&s.server.client_home()).is_empty(),
        "written to HOME: {:?}",
        files_below(&s.server.client_home())
    );
}

/// A server whose host key is not in known_hosts is never trusted: one line that says so and how to
/// add the key.
#[test]
fn an_unknown_host_key_is_refused() {
    let s = Setup::new("ssh-unknown-host");
    let good = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&good, SEG1), "push with the right known_hosts");
    s.write_segment(&Segment::new(SEG2));

    let unknown = s.server.empty_known_hosts_file();
    let config = s.config_with(CALM, &s.server.identity_file(), &unknown);
    assert_refused(&s, &config, &unknown, &["host key", "ssh-keyscan", "127.0.0.1"]);
    // A known_hosts file that does not exist at all is the same.
    let missing = s.scratch.path().join("no-such-known-hosts");
    let config = s.config_with(CALM, &s.server.identity_file(), &missing);
    let out = s.push(&config, SEG2);
    assert_error(&out, 8, &["host key", "127.0.0.1"]);
    assert_absent(&missing);
    s.assert_fetches(&good, SEG1, &original);
}

/// A host key that differs from the one in known_hosts (another server, or a man in the middle) is
/// refused with one line naming the host key.
#[test]
fn a_changed_host_key_is_refused() {
    let s = Setup::new("ssh-changed-host");
    let good = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&good, SEG1), "push with the right known_hosts");
    s.write_segment(&Segment::new(SEG2));

    let changed = s.server.changed_known_hosts_file();
    let config = s.config_with(CALM, &s.server.identity_file(), &changed);
    assert_refused(&s, &config, &changed, &["host key", "127.0.0.1"]);
    s.assert_fetches(&good, SEG1, &original);
}

/// A key the server does not accept is an authentication failure, said as such, never "not found".
#[test]
fn a_wrong_identity_is_refused() {
    let s = Setup::new("ssh-wrong-key");
    let good = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&good, SEG1), "push with the right key");
    s.write_segment(&Segment::new(SEG2));

    let known_hosts = s.server.known_hosts_file();
    let config = s.config_with(CALM, &s.server.wrong_identity_file(), &known_hosts);
    assert_refused(&s, &config, &known_hosts, &["authentication", "127.0.0.1"]);
    assert!(s.server.log().contains("Connection closed by authenticating user"), "sshd: {}", s.server.log());
    s.assert_fetches(&good, SEG1, &original);
}

// ---------------------------------------------------------------------------------------------------
// Faults.
// ---------------------------------------------------------------------------------------------------

/// The server dies (SIGKILL to sshd and every session) while a large segment is being written: the
/// push fails, nothing is visible under the name, and once the server is back the next push archives
/// the segment and a fetch returns it byte for byte.
#[test]
fn server_killed_during_a_push() {
    let mut s = Setup::new("ssh-kill-push");
    let config = s.config(FAULTY, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    let object = s.object(SEG1);
    let dir = object.parent().unwrap().to_owned();

    let mut running = spawn(&mut s.push_cmd(&config, SEG1));
    let caught = wait_until(&mut running, Duration::from_secs(60), || temp_file_of_at_least(&dir, MIB));
    if caught {
        s.server.kill();
    }
    let out = s.finish(running, FAULTY_DEADLINE + HANG_MARGIN);
    assert!(caught, "the push finished before 1 MiB of it reached the server: {out:#?}");
    eprintln!("push cut off by the kill: {out:?}");
    assert_error(&out, 8, &[]);
    assert_absent(&object);
    // Nobody was left to remove it; such leftovers are hidden and never read.
    eprintln!("left in the repository by the killed push: {:?}", s.repo_temp_files());

    s.server.restart();
    let config = s.config(CALM, "");
    assert_error(&s.fetch(&config, SEG1), 1, &[SEG1, "not in the archive"]);
    assert_ok(&s.push(&config, SEG1), "push after the restart");
    s.assert_fetches(&config, SEG1, &original);
    eprintln!("temporary files after the successful push: {:?}", s.repo_temp_files());
}

/// The server dies while a segment streams to wal-fetch: the fetch fails (208), nothing partial
/// reaches the destination, and once the server is back the fetch restores the segment.
#[test]
fn server_killed_during_a_fetch() {
    let mut s = Setup::new("ssh-kill-fetch");
    let calm = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    assert_ok(&s.push(&calm, SEG1), "push");

    let config = s.config(FAULTY, "");
    let mut running = spawn(&mut s.fetch_cmd(&config, SEG1));
    let caught = wait_until(&mut running, Duration::from_secs(60), || temp_file_of_at_least(&s.wal, 1));
    if caught {
        s.server.kill();
    }
    let out = s.finish(running, FAULTY_DEADLINE + HANG_MARGIN);
    assert!(caught, "the fetch finished before anything reached the destination's directory: {out:#?}");
    eprintln!("fetch cut off by the kill: {out:?}");
    assert_error(&out, 208, &[SEG1]);
    assert_absent(&s.destination());
    assert_no_temp_files(&s.wal);

    s.server.restart();
    let config = s.config(CALM, "");
    s.assert_fetches(&config, SEG1, &original);
}

/// A server that stops answering (every sshd and sftp-server process stopped with SIGSTOP) must not
/// hang archiving or recovery, whether it stops before the commands connect or in the middle of a
/// transfer: they fail within their deadline plus a margin (8, 208; 1 on a standby), and are never
/// "not found".
#[test]
fn a_server_that_stops_answering_never_hangs_a_command() {
    let s = Setup::new("ssh-stall");
    let calm = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    assert_ok(&s.push(&calm, SEG1), "push before the trouble");
    let second = s.write_segment(&Segment::new(SEG2).segment_size(LARGE).fill(Fill::Random));
    let config = s.config(FAULTY, "");
    let limit = FAULTY_DEADLINE + HANG_MARGIN;
    let standby = s.standby_data();

    // Stopped before anyone connects: connections wait in the kernel's backlog with no banner.
    s.server.freeze();
    let running = [
        spawn(&mut s.push_cmd(&config, SEG2)),
        spawn(&mut s.fetch_cmd(&config, SEG1)),
        spawn(&mut s.fetch_cmd(&config, SEG3)),
        spawn(&mut s.fetch_cmd_in(&standby, &config, SEG3)),
    ];
    let outputs = running.map(|r| finish(r, limit));
    s.server.thaw();
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
    s.wait_for_sessions_to_end();
    assert_absent(&s.object(SEG2));

    // Stopped in the middle of a push.
    let dir = s.object(SEG2).parent().unwrap().to_owned();
    let mut running = spawn(&mut s.push_cmd(&config, SEG2));
    let caught = wait_until(&mut running, Duration::from_secs(60), || temp_file_of_at_least(&dir, MIB));
    if caught {
        s.server.freeze();
    }
    let out = finish(running, limit);
    s.server.thaw();
    s.assert_no_clients_left();
    assert!(caught, "the push finished before 1 MiB of it reached the server: {out:#?}");
    eprintln!("push with the server stopped midway: {out:?}");
    assert_error(&out, 8, &[]);
    s.wait_for_sessions_to_end();
    assert_absent(&s.object(SEG2));

    // Stopped in the middle of a fetch.
    let mut running = spawn(&mut s.fetch_cmd(&config, SEG1));
    let caught = wait_until(&mut running, Duration::from_secs(60), || temp_file_of_at_least(&s.wal, 1));
    if caught {
        s.server.freeze();
    }
    let out = finish(running, limit);
    s.server.thaw();
    s.assert_no_clients_left();
    assert!(caught, "the fetch finished before anything reached the destination's directory: {out:#?}");
    eprintln!("fetch with the server stopped midway: {out:?}");
    assert_error(&out, 208, &[]);
    let fetch_midway = out;
    assert_absent(&s.destination());
    assert_no_temp_files(&s.wal);

    // Answering again, the server serves both.
    s.assert_fetches(&calm, SEG1, &original);
    assert_ok(&s.push(&calm, SEG2), "push once the server answers again");
    s.assert_fetches(&calm, SEG2, &second);
    eprintln!("temporary files left in the repository: {:?}", s.repo_temp_files());

    // Checked last, so that every other expectation is proven even while this one fails: as on S3, a
    // fetch that gives up names the file it was fetching, and every failure names the server.
    let server = format!("127.0.0.1:{}", s.server.port());
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
    let s = Setup::new("ssh-cut");
    let deadline = Duration::from_secs(30);
    let config = s.config(("deadline_secs = 30", FAULTY.1), "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(LARGE).fill(Fill::Random));
    let object = s.object(SEG1);
    let dir = object.parent().unwrap().to_owned();
    // Both directions are tried; what failed is reported together at the end.
    let mut failed = Vec::new();

    let mut running = spawn(&mut s.push_cmd(&config, SEG1));
    let caught = wait_until(&mut running, Duration::from_secs(60), || temp_file_of_at_least(&dir, MIB));
    let killed = if caught { s.server.kill_sessions() } else { 0 };
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
        assert_ok(&s.push(&config, SEG1), "push again after the cut");
    }
    s.wait_for_sessions_to_end();
    // What the push's cut attempt left, after the push went on to succeed on a new connection.
    let left_by_push = s.repo_temp_files();

    let mut running = spawn(&mut s.fetch_cmd(&config, SEG1));
    let caught = wait_until(&mut running, Duration::from_secs(60), || temp_file_of_at_least(&s.wal, 1));
    let killed = if caught { s.server.kill_sessions() } else { 0 };
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
    s.assert_fetches(&config, SEG1, &original);
    assert!(failed.is_empty(), "transfers cut midway were not retried on a new connection:\n{}", failed.join("\n"));
    // Checked last: the command that succeeded on a new connection knows the temporary file its cut
    // attempt left (a whole segment's worth) and can remove it, as an S3 push aborts its multipart
    // upload; otherwise every dropped connection leaks a segment's size of disk on the server.
    assert!(
        left_by_push.is_empty(),
        "a push that succeeded after a cut connection left its first attempt's temporary file: {left_by_push:?}"
    );
}

/// Temporary files that killed pushes left on the server are never fetched, and the next push into
/// their directory removes those untouched for over an hour; a fresh one (maybe a live push's) stays.
#[test]
fn stale_temporary_files_on_the_server_are_swept_fresh_ones_kept() {
    let s = Setup::new("ssh-stale");
    let config = s.config(CALM, "");
    s.write_segment(&Segment::new(SEG3));
    assert_ok(&s.push(&config, SEG3), "push");
    let shard = s.object(SEG3).parent().unwrap().to_owned();
    let stale = [shard.join(format!(".{SEG2}.123.1.tmp")), shard.join(".x.123.1.tmp")];
    let fresh = shard.join(format!(".{SEG2}.456.2.tmp"));
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    for path in &stale {
        segments::write_file(path, b"left by a killed push");
        fs::File::options().write(true).open(path).unwrap().set_modified(two_hours_ago).unwrap();
    }
    segments::write_file(&fresh, b"maybe a live push");

    assert_error(&s.fetch(&config, SEG2), 1, &[SEG2, "not in the archive"]);
    assert_absent(&s.destination());

    let segment = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push into the same directory");
    for path in &stale {
        assert_absent(path);
    }
    assert!(fresh.exists(), "a fresh temporary file was removed");
    s.assert_fetches(&config, SEG1, &segment);
}
