//! The command-line contract of `wal-push` and `wal-fetch` on an S3 repository, against a real
//! S3-compatible server (s3s-fs on 127.0.0.1, which checks signatures and honours `If-None-Match`),
//! and the faults a network store adds: a server killed mid-transfer, one that answers 503 Slow Down,
//! stalls or drops connections (a fault-injecting proxy in front of it, `harness/proxy.rs`), wrong
//! credentials, a missing bucket, a wrong region, an unreachable endpoint, a failed multipart upload.
//!
//! Every command gets an explicit region and credentials (configuration or environment), so the AWS
//! SDK never looks beyond loopback for them. Fault tests use a deadline of a few seconds and short
//! socket timeouts; every command is waited for with a bound, so a hang fails the test instead of
//! stalling the suite.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use walship_tests::assertions::{
    assert_absent, assert_error, assert_no_temp_files, assert_ok, assert_one_line, sha256_hex,
};
use walship_tests::proxy::{Fault, Proxy, Request, Response, Rule};
use walship_tests::s3::{
    ACCESS_KEY, REGION, S3Server, SECRET_KEY, assert_no_multipart_leftovers, free_port, write_config_file,
};
use walship_tests::segments::{self, Fill, Segment};
use walship_tests::{Output, Scratch, walship};

const SEG1: &str = "000000010000000000000001";
const SEG2: &str = "000000010000000000000002";
const SEG3: &str = "000000010000000000000003";
/// Where PostgreSQL asks restore_command to put most files.
const RECOVERYXLOG: &str = "pg_wal/RECOVERYXLOG";
const BUCKET: &str = "walship-test";
const PREFIX: &str = "db1";
const MIB: usize = 1 << 20;

/// Settings for tests where nothing is meant to fail: generous, but a hang still ends.
const CALM: (&str, &str) = ("deadline_secs = 30", "connect_timeout_secs = 2\nread_timeout_secs = 10");
/// Settings for fault tests: give up soon.
const FAULTY: (&str, &str) = ("deadline_secs = 5", "connect_timeout_secs = 1\nread_timeout_secs = 2");
/// How long past its deadline a command may take before the test calls it hung.
const HANG_MARGIN: Duration = Duration::from_secs(30);

fn repo_url() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

/// The object key of a WAL file (the layout of `crates/walship/src/repo/mod.rs`, under the prefix).
fn key_of(name: &str) -> String {
    if name.ends_with(".history") {
        format!("{PREFIX}/wal/history/{name}")
    } else {
        format!("{PREFIX}/wal/{}/{name}", &name[..16])
    }
}

/// The request path of a key, path style.
fn path_of(key: &str) -> String {
    format!("/{BUCKET}/{key}")
}

/// The s3:// location as the commands print it.
fn location_of(name: &str) -> String {
    format!("s3://{BUCKET}/{}", key_of(name))
}

/// An s3s-fs server with the bucket, a data directory whose `pg_wal` holds the files to archive, and
/// configuration files written on demand. The binaries run from the data directory, as under
/// archive_command and restore_command.
struct Setup {
    scratch: Scratch,
    server: S3Server,
    data: PathBuf,
    wal: PathBuf,
    configs: AtomicU32,
}

impl Setup {
    fn new(label: &str) -> Setup {
        let scratch = Scratch::new(label);
        let data = scratch.mkdir("pgdata");
        let wal = scratch.mkdir("pgdata/pg_wal");
        let server = S3Server::start();
        server.create_bucket(BUCKET);
        Setup { scratch, server, data, wal, configs: AtomicU32::new(0) }
    }

    /// A configuration for the repository through `endpoint`, with `settings` (top-level and `[s3]`
    /// lines) and `extra` `[s3]` lines.
    fn config_via(&self, endpoint: &str, settings: (&str, &str), extra: &str) -> PathBuf {
        self.config_text(&self.server.config_text(
            &repo_url(),
            endpoint,
            settings.0,
            &format!("{}\n{extra}", settings.1),
        ))
    }

    /// A configuration straight to the server.
    fn config(&self, settings: (&str, &str), extra: &str) -> PathBuf {
        self.config_via(&self.server.endpoint(), settings, extra)
    }

    /// Writes `text` as a new configuration file.
    fn config_text(&self, text: &str) -> PathBuf {
        let n = self.configs.fetch_add(1, Ordering::SeqCst);
        write_config_file(self.scratch.path(), &format!("walship-{n}.toml"), text)
    }

    fn push_cmd(&self, config: &Path, name: &str) -> Command {
        let mut cmd = walship("wal-push");
        cmd.current_dir(&self.data).arg("--config").arg(config).arg(format!("pg_wal/{name}")).arg(name);
        cmd
    }

    fn fetch_cmd(&self, config: &Path, name: &str) -> Command {
        self.fetch_cmd_in(&self.data, config, name)
    }

    /// `wal-fetch` run from the data directory `data`.
    fn fetch_cmd_in(&self, data: &Path, config: &Path, name: &str) -> Command {
        let mut cmd = walship("wal-fetch");
        cmd.current_dir(data).arg("--config").arg(config).arg(name).arg(RECOVERYXLOG);
        cmd
    }

    /// A second data directory, of a standby (it holds standby.signal), so that a standby's fetch can
    /// run while another fetch runs in the main one.
    fn standby_data(&self) -> PathBuf {
        let data = self.scratch.path().join("standby");
        if !data.exists() {
            self.scratch.mkdir("standby");
            self.scratch.mkdir("standby/pg_wal");
            segments::write_file(&data.join("standby.signal"), b"");
        }
        data
    }

    /// `wal-push --config CONFIG pg_wal/<name> <name>`, waited for with a bound.
    fn push(&self, config: &Path, name: &str) -> Output {
        finish(spawn(&mut self.push_cmd(config, name)), HANG_MARGIN * 2).output
    }

    /// `wal-fetch --config CONFIG <name> pg_wal/RECOVERYXLOG`, waited for with a bound.
    fn fetch(&self, config: &Path, name: &str) -> Output {
        finish(spawn(&mut self.fetch_cmd(config, name)), HANG_MARGIN * 2).output
    }

    fn write_segment(&self, segment: &Segment) -> Vec<u8> {
        let bytes = segment.bytes();
        segments::write_file(&self.wal.join(segment.name()), &bytes);
        bytes
    }

    fn write_wal_file(&self, name: &str, bytes: &[u8]) {
        segments::write_file(&self.wal.join(name), bytes);
    }

    /// The file in which s3s-fs keeps the object of WAL file `name`.
    fn object(&self, name: &str) -> PathBuf {
        self.server.object_file(BUCKET, &key_of(name))
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

    /// PostgreSQL's marker for a standby; wal-fetch reads it from its working directory.
    fn become_standby(&self) {
        segments::write_file(&self.data.join("standby.signal"), b"");
    }

    fn stop_being_standby(&self) {
        fs::remove_file(self.data.join("standby.signal")).unwrap();
    }
}

/// A command started with its output collected on the side.
struct Running {
    child: Child,
    what: String,
    /// The program's name as /proc shows it once it has been exec'd.
    program: String,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
    started: Instant,
}

/// What a finished command did, and what it cost.
struct Finished {
    output: Output,
    elapsed: Duration,
    /// Peak resident memory (VmHWM) last seen while it ran; 0 if it ran too briefly to be seen.
    peak_rss_bytes: u64,
}

fn spawn(cmd: &mut Command) -> Running {
    let what = format!("{:?} {:?}", cmd.get_program(), cmd.get_args().collect::<Vec<_>>());
    let program = Path::new(cmd.get_program()).file_name().unwrap().to_string_lossy().into_owned();
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
    Running { child, what, program, stdout, stderr, started: Instant::now() }
}

impl Running {
    /// The process's peak resident memory so far, once it runs our program (before the exec it is a
    /// copy of the test process, whose memory says nothing about the command).
    fn peak_rss_bytes(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?.trim();
        if name != self.program {
            return None;
        }
        let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().strip_suffix("kB")?.trim();
        kib.parse::<u64>().ok().map(|k| k * 1024)
    }

    fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }
}

/// Waits for `running` to exit, watching its memory; kills it and fails the test if it takes longer
/// than `limit`.
#[track_caller]
fn finish(mut running: Running, limit: Duration) -> Finished {
    let mut peak_rss_bytes = 0;
    loop {
        if let Some(peak) = running.peak_rss_bytes() {
            peak_rss_bytes = peak_rss_bytes.max(peak);
        }
        if let Some(status) = running.child.try_wait().unwrap() {
            let elapsed = running.started.elapsed();
            let text = |h: JoinHandle<Vec<u8>>| String::from_utf8_lossy(&h.join().unwrap()).into_owned();
            let output = Output { code: status.code(), stdout: text(running.stdout), stderr: text(running.stderr) };
            return Finished { output, elapsed, peak_rss_bytes };
        }
        if running.started.elapsed() > limit {
            let _ = running.child.kill();
            let _ = running.child.wait();
            panic!("{} hung: still running after {} s", running.what, limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (length, mtime, inode): changes if an object is rewritten or replaced.
fn identity_of(path: &Path) -> (u64, SystemTime, u64) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    (meta.len(), meta.modified().unwrap(), meta.ino())
}

/// Requests that would create or replace `key`: a PUT or a multipart upload of it.
fn writes_to(seen: &[walship_tests::proxy::Seen], key: &str) -> Vec<String> {
    let path = path_of(key);
    seen.iter()
        .filter(|s| s.request.path() == path && matches!(s.method.as_str(), "PUT" | "POST"))
        .map(|s| format!("{} {}", s.method, s.target))
        .collect()
}

fn is_request_for(request: &Request, method: &str, key: &str) -> bool {
    request.method == method && request.path() == path_of(key)
}

// ---------------------------------------------------------------------------------------------------
// The contract, on S3.
// ---------------------------------------------------------------------------------------------------

/// Every kind of file PostgreSQL archives goes where the layout says, in walship's format, with the
/// digest in the object's metadata, and comes back byte for byte.
#[test]
fn every_kind_of_file_round_trips_in_the_documented_layout() {
    let s = Setup::new("s3-layout");
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
    expected.push(format!("{PREFIX}/repository.json"));
    expected.sort();
    assert_eq!(s.server.object_keys(BUCKET), expected);

    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(s.server.object_file(BUCKET, &format!("{PREFIX}/repository.json"))).unwrap())
            .expect("repository.json is plain JSON");
    assert_eq!(record["system_identifier"], segments::DEFAULT_SYSTEM_IDENTIFIER.to_string(), "{record}");
    assert_eq!(record["wal_segment_size"], segments::MIN_SEGMENT_SIZE, "{record}");

    let stored = fs::read(s.object(SEG1)).unwrap();
    assert!(stored.starts_with(b"WALSHIP\0"), "not in walship's format: {:?}", &stored[..16]);
    assert!(stored.len() < segment.len() / 4, "a WAL-like segment should compress: {} bytes", stored.len());
    let metadata = fs::read_to_string(s.server.metadata_file(BUCKET, &key_of(SEG1))).unwrap();
    assert!(metadata.contains(&sha256_hex(&segment)), "walship-sha256 missing from {metadata}");
    assert!(metadata.contains(&format!("\"walship-length\":\"{}\"", segment.len())), "{metadata}");

    s.assert_fetches(&config, SEG1, &segment);
    s.assert_fetches(&config, &partial_name, &partial);
    s.assert_fetches(&config, &history_name, history.as_bytes());
    s.assert_fetches(&config, &label_name, label.as_bytes());
}

/// PostgreSQL archives a segment again after a crash: identical content is success, the object is not
/// rewritten, and the push does not even try to write it (a store that ignores conditional writes
/// would otherwise be overwritten).
#[test]
fn identical_repush_succeeds_without_writing() {
    let s = Setup::new("s3-repush");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "first push");
    let object = s.object(SEG1);
    let before = identity_of(&object);

    proxy.forget_seen();
    let out = s.push(&config, SEG1);
    assert_ok(&out, "second push");
    assert!(out.stderr.contains(SEG1) && out.stderr.contains("already archived"), "{:?}", out.stderr);
    assert_eq!(identity_of(&object), before, "the archived object was rewritten");
    let writes = writes_to(&proxy.seen(), &key_of(SEG1));
    assert!(writes.is_empty(), "an identical re-push tried to write the object: {writes:?}");
    s.assert_fetches(&config, SEG1, &original);
}

/// Different content under an archived name is refused with both digests, and nothing is written.
#[test]
fn different_content_under_an_archived_name_is_a_conflict() {
    let s = Setup::new("s3-conflict");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), CALM, "");
    let first = s.write_segment(&Segment::new(SEG1).seed(1));
    assert_ok(&s.push(&config, SEG1), "first push");
    let object = s.object(SEG1);
    let before = identity_of(&object);

    let second = s.write_segment(&Segment::new(SEG1).seed(2));
    proxy.forget_seen();
    let out = s.push(&config, SEG1);
    assert_error(&out, 5, &[SEG1, "different content", &sha256_hex(&first), &sha256_hex(&second)]);
    assert_eq!(identity_of(&object), before, "the archived object was touched");
    let writes = writes_to(&proxy.seen(), &key_of(SEG1));
    assert!(writes.is_empty(), "a conflicting push tried to write the object: {writes:?}");
    assert_ne!(first, second);
    s.assert_fetches(&config, SEG1, &first);
}

/// The object appears between the existence check and the write (a racing push, or a store whose
/// listing lags): the conditional write gets 412, and the push decides by content, for a single PUT
/// and for a multipart upload, which is then aborted.
#[test]
fn a_412_on_the_conditional_write_is_judged_by_content() {
    let s = Setup::new("s3-412");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), CALM, "part_size = \"5MiB\"");
    // The existence checks answer "absent", as if the object did not exist yet: one check before a
    // single PUT; two around a multipart upload (before the first part and before completing it).
    let lie = |name: &str, checks: usize| {
        let key = key_of(name);
        Rule::new(Fault::Respond(Response::s3_error(404, "Not Found", "NoSuchKey", "injected")))
            .when(move |r| is_request_for(r, "HEAD", &key))
            .times(checks)
    };
    // WAL-like content compresses into one PUT; random content needs a multipart upload.
    let small = Segment::new(SEG1).segment_size(16 << 20);
    let large = Segment::new(SEG2).segment_size(16 << 20).fill(Fill::Random);
    for (segment, publish, checks) in [(&small, "PUT", 1), (&large, "POST", 2)] {
        let name = segment.name();
        let original = s.write_segment(segment);
        assert_ok(&s.push(&config, name), &format!("first push of {name}"));
        let object = s.object(name);
        let before = identity_of(&object);

        proxy.add(lie(name, checks));
        proxy.forget_seen();
        let out = s.push(&config, name);
        assert_ok(&out, &format!("identical push of {name} after a 412"));
        assert!(out.stderr.contains("already archived"), "{:?}", out.stderr);
        let refused = proxy.seen().iter().filter(|r| r.method == publish && r.status == Some(412)).count();
        assert_eq!(refused, 1, "{name}: the conditional {publish} should have met a 412: {:#?}", proxy.seen());
        assert_eq!(identity_of(&object), before, "{name}: rewritten");

        let other = s.write_segment(&segment.clone().seed(9));
        proxy.add(lie(name, checks));
        let out = s.push(&config, name);
        assert_error(&out, 5, &[name, "different content", &sha256_hex(&original), &sha256_hex(&other)]);
        assert_eq!(identity_of(&object), before, "{name}: rewritten");
        assert_no_multipart_leftovers(&s.server, name);
        s.write_segment(segment);
        s.assert_fetches(&config, name, &original);
    }
}

/// Recovery asks for files that do not exist as a matter of course: exit 1 only where the repository
/// proves it, and nothing appears where PostgreSQL looks.
#[test]
fn missing_files_are_not_found_and_nothing_is_written() {
    let s = Setup::new("s3-missing");
    let config = s.config(CALM, "");
    // An empty bucket is not a repository: absence proves nothing there.
    let identity = format!("s3://{BUCKET}/{PREFIX}/repository.json");
    assert_error(&s.fetch(&config, SEG1), 206, &[&identity, "not a walship repository"]);
    assert_absent(&s.destination());

    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push");
    for name in [SEG2, "00000002.history", "000000020000000000000001.partial"] {
        let out = s.fetch(&config, name);
        assert_error(&out, 1, &[name, "not in the archive"]);
        assert_absent(&s.destination());
        assert_no_temp_files(&s.wal);
    }
    s.become_standby();
    assert_error(&s.fetch(&config, SEG2), 1, &[SEG2]);
    assert_absent(&s.destination());
}

/// A damaged object is never restored (207, or 1 on a standby), and a damaged history file is not
/// called identical by a re-push.
#[test]
fn corrupt_objects_are_never_handed_over() {
    let s = Setup::new("s3-corrupt");
    let config = s.config(CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push");
    let object = s.object(SEG1);
    let stored = fs::read(&object).unwrap();
    let location = location_of(SEG1);

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
        assert_error(&out, 207, &[&location, "corrupt"]);
        assert_absent(&s.destination());
        assert_no_temp_files(&s.wal);
        s.become_standby();
        assert_error(&s.fetch(&config, SEG1), 1, &[&location, "corrupt"]);
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
    assert_error(&s.push(&config, &name), 7, &[&location_of(&name), "corrupt"]);
    assert_error(&s.fetch(&config, &name), 207, &[&location_of(&name), "corrupt"]);
    assert_eq!(fs::read(&object).unwrap(), damaged, "the damaged history object was replaced silently");
}

/// Timeline history files decide which timeline recovery follows: never overwritten, compared byte for
/// byte (even when the length matches), never written twice.
#[test]
fn history_files_are_never_overwritten() {
    let s = Setup::new("s3-history");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), CALM, "");
    let name = segments::history_name(2);
    let first = segments::history_content(2, "no recovery target specified");
    s.write_wal_file(&name, first.as_bytes());
    assert_ok(&s.push(&config, &name), "first push");
    let object = s.object(&name);
    let before = identity_of(&object);
    proxy.forget_seen();
    assert_ok(&s.push(&config, &name), "identical push");
    assert_eq!(identity_of(&object), before);

    let second = segments::history_content(2, "no recovery target specifieD");
    assert_eq!(first.len(), second.len());
    s.write_wal_file(&name, second.as_bytes());
    assert_error(&s.push(&config, &name), 5, &[&name, "different content"]);
    assert_eq!(identity_of(&object), before);
    let writes = writes_to(&proxy.seen(), &key_of(&name));
    assert!(writes.is_empty(), "re-pushes of a history file tried to write it: {writes:?}");

    // Even when the existence check is fooled, the conditional write refuses and the bytes decide.
    let key = key_of(&name);
    proxy.add(
        Rule::new(Fault::Respond(Response::s3_error(404, "Not Found", "NoSuchKey", "injected")))
            .when(move |r| is_request_for(r, "HEAD", &key))
            .times(1),
    );
    assert_error(&s.push(&config, &name), 5, &[&name, "different content"]);
    assert_eq!(identity_of(&object), before);
    s.assert_fetches(&config, &name, first.as_bytes());
}

/// A segment larger than a part goes up as a multipart upload: uniform parts of part_size (the last
/// one shorter), upload_concurrency of them in flight at once and never more, memory well below the
/// segment's size (the upload streams), no parts left over, and the object comes back byte for byte.
#[test]
fn multipart_uploads_round_trip_with_uniform_parallel_parts() {
    let s = Setup::new("s3-multipart");
    let proxy = Proxy::start(s.server.port());
    let concurrency = 3;
    let config =
        s.config_via(&proxy.endpoint(), CALM, &format!("part_size = \"5MiB\"\nupload_concurrency = {concurrency}"));
    // Slow parts, so that parallel uploads overlap for sure.
    proxy.add(Rule::new(Fault::Delay(Duration::from_millis(150))).when(Request::is_upload_part));
    // Incompressible, so that the object is as large as the segment.
    let segment = Segment::new(SEG1).segment_size(128 << 20).fill(Fill::Random);
    let original = s.write_segment(&segment);

    let finished = finish(spawn(&mut s.push_cmd(&config, SEG1)), HANG_MARGIN * 2);
    assert_ok(&finished.output, "multipart push");
    let stored_len = fs::metadata(s.object(SEG1)).unwrap().len();
    let seen = proxy.seen();
    let parts: Vec<_> = seen.iter().filter(|r| r.request.is_upload_part()).collect();
    let part_size = 5 * MIB as u64;
    assert_eq!(parts.len() as u64, stored_len.div_ceil(part_size), "number of parts for {stored_len} bytes");
    let mut numbers: Vec<u32> = parts.iter().map(|p| p.request.part_number().unwrap()).collect();
    numbers.sort();
    assert_eq!(numbers, (1..=parts.len() as u32).collect::<Vec<_>>());
    let mut sizes: Vec<(u32, u64)> =
        parts.iter().map(|p| (p.request.part_number().unwrap(), p.content_length.unwrap())).collect();
    sizes.sort();
    let (last, rest) = sizes.split_last().unwrap();
    assert!(rest.iter().all(|(_, size)| *size == part_size), "parts are not uniform: {sizes:?}");
    assert_eq!(last.1, stored_len - part_size * rest.len() as u64, "the last part: {sizes:?}");
    assert!(parts.iter().all(|p| p.status == Some(200)), "{parts:#?}");
    let in_flight = proxy.max_concurrent(|r| r.request.is_upload_part());
    assert_eq!(in_flight, concurrency, "parts in flight at once (upload_concurrency = {concurrency})");
    assert_eq!(seen.iter().filter(|r| r.method == "POST" && r.request.has_query("uploads")).count(), 1);
    assert_no_multipart_leftovers(&s.server, "after a successful multipart upload");
    // Bounded memory: a few parts in flight and buffers, not the object. (A debug build of wal-push
    // peaks at about 60 MiB here, and about the same for a 256 MiB segment.)
    let limit = 96 * MIB as u64;
    eprintln!("multipart push: {} ms, peak RSS {} MiB", finished.elapsed.as_millis(), finished.peak_rss_bytes >> 20);
    assert!(finished.peak_rss_bytes > 0, "the push's memory was never seen");
    assert!(
        finished.peak_rss_bytes < limit,
        "wal-push peaked at {} MiB for a 128 MiB segment (limit {} MiB)",
        finished.peak_rss_bytes >> 20,
        limit >> 20
    );
    s.assert_fetches(&config, SEG1, &original);
}

// ---------------------------------------------------------------------------------------------------
// Faults.
// ---------------------------------------------------------------------------------------------------

/// Passing trouble is retried within the deadline: 503 Slow Down, 500, 429, a reset connection, a
/// connection closed without an answer, a request that stalls once, and a response cut off in its
/// head. Each push and fetch meets several faults and still succeeds, with the right bytes.
#[test]
fn passing_faults_are_retried_within_the_deadline() {
    let s = Setup::new("s3-retry");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), ("deadline_secs = 40", FAULTY.1), "");
    // Four faults in a row outlast the SDK's own three attempts, so walship's retry loop must act too.
    let faults: [(&str, Fault, usize); 7] = [
        ("503 Slow Down", Fault::slow_down(), 4),
        ("500", Fault::Respond(Response::s3_error(500, "Internal Server Error", "InternalError", "injected")), 4),
        ("429", Fault::Respond(Response::s3_error(429, "Too Many Requests", "TooManyRequests", "injected")), 4),
        ("reset (RST)", Fault::Reset, 4),
        ("stall", Fault::Stall, 2),
        ("closed without an answer", Fault::Close, 4),
        ("cut in the response head", Fault::CutResponse { after: 40 }, 4),
    ];
    // Every kind is tried, and what failed is reported together at the end.
    let mut failed = Vec::new();
    for (index, (what, fault, times)) in faults.into_iter().enumerate() {
        let name = segments::segment_name(1, index as u64 + 1, segments::MIN_SEGMENT_SIZE);
        let original = s.write_segment(&Segment::new(&name));
        for command in ["push", "fetch"] {
            proxy.clear();
            let applied = proxy.faults_applied();
            proxy.add(Rule::new(fault.clone()).times(times));
            let out = if command == "push" { s.push(&config, &name) } else { s.fetch(&config, &name) };
            assert_one_line(&out);
            assert!(proxy.faults_applied() > applied, "{what}: no fault was applied");
            if out.code != Some(0) {
                failed.push(format!("{command} through {times} × {what}: exit {:?}: {}", out.code, out.stderr.trim()));
                assert_absent_or_complete(&s, &original);
                break;
            }
            assert_eq!(proxy.faults_applied() - applied, times, "{what}: every fault should have been met");
            if command == "fetch" {
                let restored = fs::read(s.destination()).unwrap();
                assert!(restored == original, "{what}: restored bytes differ");
                fs::remove_file(s.destination()).unwrap();
                assert_no_temp_files(&s.wal);
            }
        }
    }
    assert!(failed.is_empty(), "transient faults were not retried:\n{}", failed.join("\n"));
}

/// A segment download that breaks off midway (the connection cut, or the bytes stopping for longer
/// than read_timeout_secs) is a transient failure: the fetch starts over and restores the file within
/// its deadline, and nothing partial ever appears where PostgreSQL looks.
#[test]
fn a_segment_download_broken_off_midway_is_retried() {
    let s = Setup::new("s3-midway");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), ("deadline_secs = 20", FAULTY.1), "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(4 << 20).fill(Fill::Random));
    assert_ok(&s.push(&config, SEG1), "push");
    // Both cases are tried; what failed is reported together at the end.
    let mut failed = Vec::new();
    for (what, fault) in [
        ("cut after 1 MiB", Fault::CutResponse { after: MIB }),
        ("stopped after 1 MiB", Fault::HoldResponse { after: MIB }),
    ] {
        let key = key_of(SEG1);
        proxy.add(Rule::new(fault).when(move |r| is_request_for(r, "GET", &key)).times(1));
        let applied = proxy.faults_applied();
        let out = s.fetch(&config, SEG1);
        assert_eq!(proxy.faults_applied(), applied + 1, "{what}: the fault was not applied");
        assert_one_line(&out);
        assert_absent_or_complete(&s, &original);
        match out.code {
            Some(0) => fs::remove_file(s.destination()).unwrap(),
            _ => {
                assert_error(&out, 208, &[&location_of(SEG1)]);
                failed.push(format!("{what}: {}", out.stderr.trim()));
            }
        }
        // A held response is let go only now, when nobody waits for it any more.
        proxy.release();
    }
    assert!(failed.is_empty(), "downloads broken off midway were not retried:\n{}", failed.join("\n"));
}

#[track_caller]
fn assert_absent_or_complete(s: &Setup, original: &[u8]) {
    assert_no_temp_files(&s.wal);
    if let Ok(restored) = fs::read(s.destination()) {
        assert!(restored == original, "a partial or wrong file was handed over");
    }
}

/// A store that keeps answering 503 fails the command once the deadline has passed (8, 208), with
/// the last error on one line; a file it cannot look up is never reported absent.
#[test]
fn a_store_that_keeps_failing_fails_at_the_deadline() {
    let s = Setup::new("s3-503");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), FAULTY, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push before the trouble");
    s.write_segment(&Segment::new(SEG2));

    proxy.add(Rule::new(Fault::slow_down()));
    let endpoint = proxy.endpoint();
    let needles = ["gave up after 5 s", "503", "SlowDown", &endpoint];
    // All at once, so that the deadlines run out together.
    let standby = s.standby_data();
    let running = [
        spawn(&mut s.push_cmd(&config, SEG2)),
        spawn(&mut s.fetch_cmd(&config, SEG1)),
        spawn(&mut s.fetch_cmd(&config, SEG3)),
        spawn(&mut s.fetch_cmd_in(&standby, &config, SEG3)),
    ];
    let [push, fetch_archived, fetch_missing, fetch_standby] = running.map(|r| finish(r, HANG_MARGIN).output);
    assert_error(&push, 8, &needles);
    assert!(push.stderr.contains(&format!("s3://{BUCKET}/{PREFIX}/")), "{:?}", push.stderr);
    for (fetch, name) in [(&fetch_archived, SEG1), (&fetch_missing, SEG3)] {
        assert_error(fetch, 208, &needles);
        assert!(fetch.stderr.contains(&location_of(name)), "{:?}", fetch.stderr);
    }
    assert_error(&fetch_standby, 1, &needles);
    for data in [&s.data, &standby] {
        assert_absent(&data.join(RECOVERYXLOG));
        assert_no_temp_files(&data.join("pg_wal"));
    }
    let retried = proxy.faults_applied();
    assert!(retried >= 4 * 3, "each command should have retried several times, saw {retried} faults");
    assert_absent(&s.object(SEG2));

    proxy.clear();
    s.assert_fetches(&config, SEG1, &original);
    assert_ok(&s.push(&config, SEG2), "push once the store is well");
}

/// A server that accepts requests and never answers must not hang archiving or recovery: the
/// commands fail at the deadline (8, 208; 1 on a standby) and are never "not found".
#[test]
fn a_stalled_server_never_hangs_a_command() {
    let s = Setup::new("s3-stall");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), FAULTY, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push before the trouble");
    s.write_segment(&Segment::new(SEG2));

    proxy.add(Rule::new(Fault::Stall));
    let standby = s.standby_data();
    let running = [
        spawn(&mut s.push_cmd(&config, SEG2)),
        spawn(&mut s.fetch_cmd(&config, SEG1)),
        spawn(&mut s.fetch_cmd(&config, SEG3)),
        spawn(&mut s.fetch_cmd_in(&standby, &config, SEG3)),
    ];
    let [push, fetch_archived, fetch_missing, fetch_standby] = running.map(|r| finish(r, HANG_MARGIN).output);
    assert_error(&push, 8, &["gave up after 5 s"]);
    assert_error(&fetch_archived, 208, &["gave up after 5 s"]);
    assert_error(&fetch_missing, 208, &["gave up after 5 s"]);
    assert_error(&fetch_standby, 1, &["gave up after 5 s"]);
    for data in [&s.data, &standby] {
        assert_absent(&data.join(RECOVERYXLOG));
        assert_no_temp_files(&data.join("pg_wal"));
    }
    assert!(proxy.faults_applied() >= 4, "{} stalls", proxy.faults_applied());
    // Checked last, so that every other expectation is proven even while this one fails.
    let mut unnamed = Vec::new();
    for (out, location) in [
        (&push, format!("s3://{BUCKET}/{PREFIX}/")),
        (&fetch_archived, location_of(SEG1)),
        (&fetch_missing, location_of(SEG3)),
    ] {
        if !(out.stderr.contains(&location) && out.stderr.contains(&proxy.endpoint())) {
            unnamed.push(format!("{location}: {:?}", out.stderr));
        }
    }

    proxy.clear();
    s.assert_fetches(&config, SEG1, &original);
    assert_absent(&s.object(SEG2));
    assert!(
        unnamed.is_empty(),
        "a command that timed out must name what it was doing, as every other error does:\n{}",
        unnamed.join("\n")
    );
}

/// The server dies while a multipart upload is under way: the push fails (8), nothing is visible under
/// the name, and once the server is back the next push archives the segment.
#[test]
fn server_killed_during_a_push() {
    let mut s = Setup::new("s3-kill-push");
    let config = s.config(FAULTY, "part_size = \"5MiB\"\nupload_concurrency = 2");
    let segment = Segment::new(SEG1).segment_size(64 << 20).fill(Fill::Random);
    let original = s.write_segment(&segment);
    let object = s.object(SEG1);

    let mut running = spawn(&mut s.push_cmd(&config, SEG1));
    let started = Instant::now();
    let mut caught = false;
    while started.elapsed() < Duration::from_secs(60) && !running.has_exited() {
        if !s.server.stored_parts().is_empty() {
            s.server.kill();
            caught = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let push = finish(running, HANG_MARGIN);
    assert!(caught, "the push finished before a part was stored: {:#?}", push.output);
    assert_error(&push.output, 8, &["cannot reach", &s.server.endpoint(), &format!("s3://{BUCKET}/{PREFIX}/")]);
    assert_absent(&object);
    // The server could not be told to abort; a bucket lifecycle rule removes such parts on AWS.
    eprintln!("left by the killed upload: {:?}", s.server.multipart_leftovers());

    s.server.restart();
    let config = s.config(CALM, "part_size = \"5MiB\"\nupload_concurrency = 2");
    assert_error(&s.fetch(&config, SEG1), 1, &[SEG1, "not in the archive"]);
    assert_ok(&s.push(&config, SEG1), "push after the restart");
    s.assert_fetches(&config, SEG1, &original);
}

/// The server dies while a segment streams to wal-fetch: nothing reaches the destination (208; 1 on a
/// standby), and once the server is back the fetch restores the segment.
#[test]
fn server_killed_during_a_fetch() {
    let mut s = Setup::new("s3-kill-fetch");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), FAULTY, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(16 << 20).fill(Fill::Random));
    assert_ok(&s.push(&config, SEG1), "push");

    // A recovering server and a standby fetch at once; each download stops after 1 MiB, and the
    // server dies while the clients wait for more.
    let key = key_of(SEG1);
    proxy.add(Rule::new(Fault::HoldResponse { after: MIB }).when(move |r| is_request_for(r, "GET", &key)).times(2));
    let standby = s.standby_data();
    let running = [spawn(&mut s.fetch_cmd(&config, SEG1)), spawn(&mut s.fetch_cmd_in(&standby, &config, SEG1))];
    assert!(proxy.wait_for_holds(2, Duration::from_secs(30)), "the fetches never started downloading");
    s.server.kill();
    proxy.release();
    let [recovering, on_standby] = running.map(|r| finish(r, HANG_MARGIN).output);
    assert_error(&recovering, 208, &[&location_of(SEG1)]);
    assert_error(&on_standby, 1, &[&location_of(SEG1)]);
    for data in [&s.data, &standby] {
        assert_absent(&data.join(RECOVERYXLOG));
        assert_no_temp_files(&data.join("pg_wal"));
    }

    s.server.restart();
    proxy.set_upstream(s.server.port());
    s.assert_fetches(&config, SEG1, &original);
}

/// Wrong credentials are one clear line naming the endpoint, bucket and key, never "not found", and
/// nothing is written.
#[test]
fn wrong_credentials_are_named() {
    let s = Setup::new("s3-credentials");
    let good = s.config(CALM, "");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&good, SEG1), "push with the right credentials");
    s.write_segment(&Segment::new(SEG2));
    let keys_before = s.server.object_keys(BUCKET);
    let endpoint = s.server.endpoint();

    for (what, key_id, secret, code) in [
        ("wrong secret", ACCESS_KEY, "not-the-secret", "SignatureDoesNotMatch"),
        // s3s-fs's answer to an unknown key id (AWS says InvalidAccessKeyId).
        ("unknown key id", "AKIDNOTKNOWN", SECRET_KEY, "NotSignedUp"),
    ] {
        let text = format!(
            "repo = \"{}\"\n{}\n[s3]\nendpoint = \"{endpoint}\"\nregion = \"{REGION}\"\nforce_path_style = true\n\
             access_key_id = \"{key_id}\"\nsecret_access_key = \"{secret}\"\n{}\n",
            repo_url(),
            CALM.0,
            CALM.1
        );
        let config = s.config_text(&text);
        let needles = ["access denied", code, &endpoint, &format!("s3://{BUCKET}/{PREFIX}/")];
        assert_error(&s.push(&config, SEG2), 8, &needles);
        let fetch = s.fetch(&config, SEG1);
        assert_error(&fetch, 208, &needles);
        assert!(fetch.stderr.contains(&location_of(SEG1)), "{what}: the key: {:?}", fetch.stderr);
        assert_error(&s.fetch(&config, SEG3), 208, &needles);
        assert_absent(&s.destination());
        s.become_standby();
        assert_error(&s.fetch(&config, SEG3), 1, &[code]);
        s.stop_being_standby();
        assert!(!fetch.stderr.contains(secret), "{what}: the secret was printed");
        assert_eq!(s.server.object_keys(BUCKET), keys_before, "{what}: something was written");
    }
}

/// A mistyped bucket is named as missing (8, 208), never "not found", and not created.
#[test]
fn a_missing_bucket_is_named() {
    let s = Setup::new("s3-bucket");
    let text = s.server.config_text("s3://no-such-bucket/db1", &s.server.endpoint(), CALM.0, CALM.1);
    let config = s.config_text(&text);
    s.write_segment(&Segment::new(SEG1));
    let needles = ["bucket \"no-such-bucket\" does not exist", "s3://no-such-bucket/db1/", &s.server.endpoint()];
    assert_error(&s.push(&config, SEG1), 8, &needles);
    assert_error(&s.fetch(&config, SEG1), 208, &needles);
    assert_absent(&s.destination());
    s.become_standby();
    assert_error(&s.fetch(&config, SEG1), 1, &needles[..1]);
    assert_absent(&s.server.data_dir().join("no-such-bucket"));
}

/// A bucket in another region. s3s-fs accepts any region, so the proxy answers as AWS does for a
/// request signed for the wrong region (400 AuthorizationHeaderMalformed, naming the right one).
#[test]
fn a_wrong_region_is_named() {
    let s = Setup::new("s3-region");
    let proxy = Proxy::start(s.server.port());
    proxy.add(wrong_region_rule("eu-central-1"));
    let wrong = s.config_via(&proxy.endpoint(), CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    let needles =
        ["wrong region", "AuthorizationHeaderMalformed", &proxy.endpoint(), &format!("s3://{BUCKET}/{PREFIX}/")];
    assert_error(&s.push(&wrong, SEG1), 8, &needles);
    assert_error(&s.fetch(&wrong, SEG1), 208, &needles);
    assert_absent(&s.destination());
    assert!(s.server.object_keys(BUCKET).is_empty());

    let right = s.config_text(
        &s.server
            .config_text(&repo_url(), &proxy.endpoint(), CALM.0, CALM.1)
            .replace(&format!("region = \"{REGION}\""), "region = \"eu-central-1\""),
    );
    assert_ok(&s.push(&right, SEG1), "push signed for the bucket's region");
    s.assert_fetches(&right, SEG1, &original);
}

/// What AWS answers a request signed for another region than the bucket's.
fn wrong_region_rule(bucket_region: &'static str) -> Rule {
    Rule::new(Fault::Respond(
        Response::s3_error(
            400,
            "Bad Request",
            "AuthorizationHeaderMalformed",
            &format!("The authorization header is malformed; the region is wrong; expecting '{bucket_region}'"),
        )
        .with_header("x-amz-bucket-region", bucket_region),
    ))
    .when(move |r| r.signing_region() != Some(bucket_region))
}

/// Nothing listens at the endpoint: the commands retry until the deadline, then say what they could
/// not reach.
#[test]
fn an_unreachable_endpoint_is_named() {
    let s = Setup::new("s3-unreachable");
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let config = s.config_via(&endpoint, FAULTY, "");
    s.write_segment(&Segment::new(SEG1));
    let needles = ["gave up after 5 s", "cannot reach", &endpoint, "Connection refused", &location_of(SEG1)];
    let running = [spawn(&mut s.push_cmd(&config, SEG1)), spawn(&mut s.fetch_cmd(&config, SEG1))];
    let [push, fetch] = running.map(|r| finish(r, HANG_MARGIN));
    let prefix = format!("s3://{BUCKET}/{PREFIX}/");
    assert_error(&push.output, 8, &["gave up after 5 s", "cannot reach", &endpoint, "Connection refused", &prefix]);
    assert_error(&fetch.output, 208, &needles);
    assert_absent(&s.destination());
}

/// An endpoint that answers 404 to everything (a web server, not S3) proves nothing about absence.
#[test]
fn an_endpoint_that_is_not_s3_is_never_absence() {
    let s = Setup::new("s3-not-s3");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), CALM, "");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(&config, SEG1), "push");
    proxy.add(Rule::new(Fault::Respond(Response {
        status: 404,
        reason: "Not Found".into(),
        headers: vec![("Content-Type".into(), "text/html".into())],
        body: "<html><body>Not Found</body></html>".into(),
    })));
    for name in [SEG1, SEG2] {
        let out = s.fetch(&config, name);
        assert_ne!(out.code, Some(1), "a 404 from something that is not the bucket read as absence: {out:#?}");
        assert_error(&out, 208, &[&format!("s3://{BUCKET}/{PREFIX}/")]);
        assert_absent(&s.destination());
    }
}

/// A part upload refused for good fails the push (8) naming the object, the upload is aborted so no
/// parts stay behind (including a part still in transit when the failure is noticed: S3 may store it
/// after the abort, so it has to be waited for or aborted again), nothing is visible under the name,
/// and the next push succeeds.
#[test]
fn a_failed_multipart_upload_leaves_no_parts() {
    let s = Setup::new("s3-multipart-fail");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), FAULTY, "part_size = \"5MiB\"\nupload_concurrency = 2");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(32 << 20).fill(Fill::Random));
    // Part 4 is still on its way to the server when part 5 is refused.
    proxy.add(
        Rule::new(Fault::SlowBody { after: MIB, pause: Duration::from_secs(2) })
            .when(|r| r.is_upload_part() && r.part_number() == Some(4)),
    );
    proxy.add(
        Rule::new(Fault::bad_request("InvalidArgument")).when(|r| r.is_upload_part() && r.part_number() == Some(5)),
    );
    let out = s.push(&config, SEG1);
    assert_error(&out, 8, &["UploadPart", "InvalidArgument", &location_of(SEG1), &proxy.endpoint()]);
    let seen = proxy.seen();
    let aborts = seen.iter().filter(|r| r.method == "DELETE" && r.request.has_query("uploadId")).count();
    assert!(aborts >= 1, "the failed upload was not aborted: {seen:#?}");
    assert_absent(&s.object(SEG1));
    // The part in transit reaches the server within the pause; give it that long to settle.
    std::thread::sleep(Duration::from_secs(3));
    assert_no_multipart_leftovers(&s.server, "after a failed multipart upload");

    proxy.clear();
    assert_ok(&s.push(&config, SEG1), "push once parts are accepted again");
    assert_no_multipart_leftovers(&s.server, "after the successful push");
    s.assert_fetches(&config, SEG1, &original);
}

/// A multipart upload one of whose parts never gets an answer, until the deadline ends the push:
/// the upload is aborted all the same, so no parts stay behind.
#[test]
fn a_multipart_upload_cut_off_by_the_deadline_leaves_no_parts() {
    let s = Setup::new("s3-multipart-deadline");
    let proxy = Proxy::start(s.server.port());
    let config = s.config_via(&proxy.endpoint(), FAULTY, "part_size = \"5MiB\"\nupload_concurrency = 2");
    s.write_segment(&Segment::new(SEG1).segment_size(32 << 20).fill(Fill::Random));
    // Every other part is stored; part 3 never gets an answer.
    proxy.add(Rule::new(Fault::Stall).when(|r| r.is_upload_part() && r.part_number() == Some(3)));
    let push = finish(spawn(&mut s.push_cmd(&config, SEG1)), HANG_MARGIN);
    assert_error(&push.output, 8, &["gave up after 5 s"]);
    assert_absent(&s.object(SEG1));
    proxy.clear();
    let uploads = proxy.seen().iter().filter(|r| r.method == "POST" && r.request.has_query("uploads")).count();
    let aborts = proxy.seen().iter().filter(|r| r.method == "DELETE" && r.request.has_query("uploadId")).count();
    eprintln!("multipart uploads started: {uploads}, aborted: {aborts}");
    assert!(uploads >= 1, "no multipart upload was started");
    // The abort, if any, has been answered by the time the push exited.
    assert_no_multipart_leftovers(&s.server, "after a multipart upload cut off by the deadline");
    assert_eq!(aborts, uploads, "every multipart upload started should have been aborted");
}

/// Runs `cmd` with the AWS SDK's standard variables set to `vars`, and no shared config or
/// credentials file that could fill in anything else.
fn run_with_aws_env(s: &Setup, mut cmd: Command, vars: &[(&str, &str)]) -> Output {
    let no_files = s.scratch.path().join("no-aws-files");
    cmd.env("AWS_CONFIG_FILE", no_files.join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", no_files.join("credentials"));
    for (name, value) in vars {
        cmd.env(name, value);
    }
    finish(spawn(&mut cmd), HANG_MARGIN * 2).output
}

/// The AWS SDK's standard environment variables supply the endpoint and the credentials when the
/// configuration file leaves them out (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY;
/// AWS_ENDPOINT_URL_S3, and AWS_PROFILE with AWS_SHARED_CREDENTIALS_FILE), and are really used; the
/// file's own `[s3]` settings win over them.
#[test]
fn aws_endpoint_and_credentials_from_the_environment() {
    let s = Setup::new("s3-env");
    // The file has the region only: no endpoint, no path style, no keys.
    let region_only = s.config_text(&format!("repo = \"{}\"\n{}\n[s3]\nregion = \"{REGION}\"\n", repo_url(), CALM.0));
    let segment = s.write_segment(&Segment::new(SEG1));
    let endpoint = s.server.endpoint();
    fn env<'a>(endpoint: &'a str, secret: &'a str) -> [(&'a str, &'a str); 3] {
        [("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", secret)]
    }

    let out = run_with_aws_env(&s, s.push_cmd(&region_only, SEG1), &env(&endpoint, SECRET_KEY));
    assert_ok(&out, "push configured by the environment");
    assert!(s.object(SEG1).is_file(), "the object is not where the environment points");
    let out = run_with_aws_env(&s, s.fetch_cmd(&region_only, SEG1), &env(&endpoint, SECRET_KEY));
    assert_ok(&out, "fetch configured by the environment");
    assert!(fs::read(s.destination()).unwrap() == segment);
    fs::remove_file(s.destination()).unwrap();

    // The variables are really used: a wrong secret fails as it would in the file.
    let out = run_with_aws_env(&s, s.fetch_cmd(&region_only, SEG1), &env(&endpoint, "not-the-secret"));
    assert_error(&out, 208, &["access denied", "SignatureDoesNotMatch", &endpoint, &location_of(SEG1)]);
    assert!(!out.stderr.contains("not-the-secret"), "the secret was printed: {:?}", out.stderr);

    // The S3-specific endpoint variable, and keys from a named profile in a shared credentials file.
    let credentials = write_config_file(
        s.scratch.path(),
        "aws-credentials",
        &format!(
            "[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n[walship]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    );
    let credentials = credentials.to_str().unwrap();
    let profile = [
        ("AWS_ENDPOINT_URL_S3", endpoint.as_str()),
        ("AWS_PROFILE", "walship"),
        ("AWS_SHARED_CREDENTIALS_FILE", credentials),
    ];
    let second = s.write_segment(&Segment::new(SEG2));
    assert_ok(&run_with_aws_env(&s, s.push_cmd(&region_only, SEG2), &profile), "push with a profile");
    assert_ok(&run_with_aws_env(&s, s.fetch_cmd(&region_only, SEG2), &profile), "fetch with a profile");
    assert!(fs::read(s.destination()).unwrap() == second);
    fs::remove_file(s.destination()).unwrap();

    // The file's [s3] settings beat the environment: its endpoint and keys here.
    let file = s.config(CALM, "");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let out = run_with_aws_env(&s, s.fetch_cmd(&file, SEG1), &env(&nowhere, "not-the-secret"));
    assert_ok(&out, "the file's settings over the environment's");
    fs::remove_file(s.destination()).unwrap();
}

/// AWS_REGION (or AWS_DEFAULT_REGION) supplies the region when the configuration file has none, as
/// with every other AWS tool. The proxy plays a bucket in eu-central-1 (answering as AWS does to a
/// request signed for another region), so the region must really be used.
#[test]
fn aws_region_from_the_environment() {
    let s = Setup::new("s3-env-region");
    let proxy = Proxy::start(s.server.port());
    proxy.add(wrong_region_rule("eu-central-1"));
    // Endpoint and keys in the file; the region only in the environment.
    let text = s.server.config_text(&repo_url(), &proxy.endpoint(), CALM.0, CALM.1);
    let no_region: String = text.lines().filter(|l| !l.starts_with("region")).map(|l| format!("{l}\n")).collect();
    let config = s.config_text(&no_region);
    let segment = s.write_segment(&Segment::new(SEG1));

    let out = run_with_aws_env(&s, s.push_cmd(&config, SEG1), &[("AWS_REGION", "eu-central-1")]);
    assert_ok(&out, "push with AWS_REGION");
    let out = run_with_aws_env(&s, s.fetch_cmd(&config, SEG1), &[("AWS_DEFAULT_REGION", "eu-central-1")]);
    assert_ok(&out, "fetch with AWS_DEFAULT_REGION");
    assert!(fs::read(s.destination()).unwrap() == segment);
    fs::remove_file(s.destination()).unwrap();
    let out = run_with_aws_env(&s, s.fetch_cmd(&config, SEG1), &[("AWS_REGION", "us-west-2")]);
    assert_error(&out, 208, &["wrong region", &proxy.endpoint(), &location_of(SEG1)]);
}
