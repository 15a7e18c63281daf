//! walship's S3 storage on a store that accepts `If-None-Match: *` and ignores it, as Garage does:
//! the test proxy in front of s3s-fs removes the header (and signs each request anew, s3s-fs checks
//! signatures) when switched to [`Proxy::ignore_conditional_writes`].
//!
//! Switched off, the proxy passes the header on and s3s-fs refuses a create over an existing key with
//! 412, which the store reports as AlreadyExists. Switched on, the same create replaces the object,
//! for a single PUT and for a multipart upload (whose CompleteMultipartUpload carries the header):
//! only walship's own existence check (a HEAD before the write) stands between a racing writer and
//! an overwrite. Everything else a store does (GET, HEAD, list, delete, multipart parts) still works
//! through the re-signing proxy, and its faults still apply to requests it changed.
//!
//! A racing writer is played by a rule that answers walship's existence check with 404, so that the
//! write itself meets the existing object.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use walship::storage::{PutOptions, StorageError};
use walship_tests::assertions::{assert_error, assert_ok, sha256_hex};
use walship_tests::backups::base_push;
use walship_tests::fixture::{Fixture, HANG_MARGIN};
use walship_tests::pg::Cluster;
use walship_tests::proxy::{Fault, Proxy, Request, Response, Rule, Seen};
use walship_tests::repository::{Backend, ConfigLines, Repository, Store};
use walship_tests::running::spawn;
use walship_tests::segments;
use walship_tests::segments::{Fill, Segment, wal_key};
use walship_tests::verify_wal::{findings, wal_verify};
use walship_tests::{Output, Scratch};

/// Part size of every store opened here: S3's smallest, so a multipart upload stays small.
const PART_SIZE: usize = 5 << 20;

/// An S3 repository on an s3s-fs server of its own, a proxy in front of it, and the store opened
/// through the proxy with parts of [`PART_SIZE`].
fn open_through_proxy(scratch: &Scratch) -> (Repository, Proxy, Store) {
    let mut repo = Repository::new(Backend::S3, scratch);
    let proxy = Proxy::start(repo.s3_server().expect("an S3 repository").port());
    let endpoint = proxy.endpoint();
    let backend = format!("part_size = \"{}MiB\"", PART_SIZE >> 20);
    let lines = ConfigLines { endpoint: Some(&endpoint), backend: &backend, ..ConfigLines::default() };
    let via = repo.write_config(scratch.path(), "via-proxy.toml", lines);
    let Repository::S3 { config, .. } = &mut repo else { unreachable!("made as S3") };
    *config = via;
    let store = repo.open_storage();
    (repo, proxy, store)
}

/// Writes `bytes` under `key` in 1 MiB chunks and commits.
fn put(store: &Store, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let storage = store.storage();
    store.run(async {
        let mut writer = storage.create(key, PutOptions::default()).await?;
        for piece in bytes.chunks(1 << 20) {
            writer.write(Bytes::copy_from_slice(piece)).await?;
        }
        writer.commit().await
    })
}

/// The whole of `key`.
fn get(store: &Store, key: &str) -> Vec<u8> {
    let storage = store.storage();
    store.run(async {
        let mut reader = storage.get(key).await.unwrap_or_else(|e| panic!("get {key}: {e}"));
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).await.unwrap_or_else(|e| panic!("read {key}: {e}"));
        bytes
    })
}

/// walship's existence check for `key` answers "absent" (another writer is about to publish, or a
/// store's HEAD lags), so that the conditional write itself meets the object.
fn existence_check_says_absent(repo: &Repository, key: &str) -> Rule {
    let path = repo.request_path(key);
    Rule::new(Fault::Respond(Response::s3_error(404, "Not Found", "NoSuchKey", "injected")))
        .when(move |r: &Request| r.method == "HEAD" && r.path() == path)
}

/// The request that publishes an object: a PUT that is no UploadPart, or CompleteMultipartUpload.
fn is_publish(seen: &Seen) -> bool {
    let r = &seen.request;
    (r.method == "PUT" && !r.is_upload_part()) || (r.method == "POST" && r.has_query("uploadId"))
}

/// The publishing requests seen since the proxy last forgot: each must have carried
/// `If-None-Match: *` from walship, whatever the proxy then did with it.
#[track_caller]
fn publishes(proxy: &Proxy) -> Vec<Seen> {
    let seen: Vec<Seen> = settled(proxy).into_iter().filter(is_publish).collect();
    for s in &seen {
        assert_eq!(s.request.header("if-none-match"), Some("*"), "walship's {} {}", s.method, s.target);
    }
    seen
}

/// One small object (a single PUT) and one of three parts and a bit (a multipart upload).
fn small_and_multipart() -> [(&'static str, Vec<u8>); 2] {
    let large = Segment::new("000000010000000000000001").segment_size(16 << 20).fill(Fill::Random).bytes();
    [("objects/small", b"the first bytes".to_vec()), ("objects/large", large)]
}

/// The bytes of `original` changed, same length: a second writer's object.
fn other_than(original: &[u8]) -> Vec<u8> {
    original.iter().map(|b| b ^ 0x5a).collect()
}

/// Switched off, the proxy passes `If-None-Match: *` on: s3s-fs answers a create over an existing
/// key with 412 and the store reports AlreadyExists, for a single PUT and for a multipart upload,
/// and the first object stays.
#[test]
fn with_the_switch_off_a_create_over_an_existing_key_meets_a_412_and_is_already_exists() {
    let scratch = Scratch::new("conditional-off");
    let (repo, proxy, store) = open_through_proxy(&scratch);
    for (key, original) in small_and_multipart() {
        put(&store, key, &original).unwrap_or_else(|e| panic!("first create of {key}: {e}"));
        proxy.add(existence_check_says_absent(&repo, key));
        proxy.forget_seen();
        match put(&store, key, &other_than(&original)) {
            Err(StorageError::AlreadyExists { .. }) => {}
            other => panic!("a second create of {key} must be AlreadyExists, got {other:?}"),
        }
        let seen = publishes(&proxy);
        assert_eq!(seen.len(), 1, "{key}: one publishing request: {:#?}", summary(&seen));
        assert_eq!((seen[0].status, seen[0].if_none_match_removed), (Some(412), false), "{key}: {:#?}", summary(&seen));
        assert!(get(&store, key) == original, "{key}: the first object was replaced");
        proxy.clear();
    }
    assert_no_open_uploads(&repo);
}

/// Switched on, the proxy plays a store that ignores the header: the same creates succeed, each
/// publishing request reaching s3s-fs without the header, and a GET returns the second writer's
/// bytes. Without the injected 404, walship's own existence check still refuses the create before
/// any write: on such a store it is the only guard.
#[test]
fn with_the_switch_on_a_create_over_an_existing_key_replaces_the_object() {
    let scratch = Scratch::new("conditional-on");
    let (repo, proxy, store) = open_through_proxy(&scratch);
    proxy.ignore_conditional_writes(true);
    for (key, original) in small_and_multipart() {
        put(&store, key, &original).unwrap_or_else(|e| panic!("first create of {key}: {e}"));
        let second = other_than(&original);

        proxy.forget_seen();
        match put(&store, key, &second) {
            Err(StorageError::AlreadyExists { .. }) => {}
            other => panic!("{key}: walship's existence check must refuse, got {other:?}"),
        }
        assert!(publishes(&proxy).is_empty(), "{key}: written despite the existence check");

        proxy.add(existence_check_says_absent(&repo, key));
        proxy.forget_seen();
        put(&store, key, &second).unwrap_or_else(|e| panic!("{key}: a store ignoring If-None-Match took it: {e}"));
        let seen = publishes(&proxy);
        assert_eq!(seen.len(), 1, "{key}: one publishing request: {:#?}", summary(&seen));
        assert_eq!((seen[0].status, seen[0].if_none_match_removed), (Some(200), true), "{key}: {:#?}", summary(&seen));
        proxy.clear();
        assert!(get(&store, key) == second, "{key}: the GET did not return the second writer's bytes");
    }
    assert_no_open_uploads(&repo);
}

/// Switched on, everything else still works through the re-signing proxy: a new object by single PUT
/// and by multipart upload, GET, HEAD, list and delete; requests without the header pass unchanged,
/// and a fault on a request whose header was removed (a held response) still applies.
#[test]
fn with_the_switch_on_ordinary_requests_still_work() {
    let scratch = Scratch::new("conditional-ordinary");
    let (repo, proxy, store) = open_through_proxy(&scratch);
    proxy.ignore_conditional_writes(true);
    let storage = store.storage();
    let objects = small_and_multipart();
    for (key, bytes) in &objects {
        put(&store, key, bytes).unwrap_or_else(|e| panic!("create {key}: {e}"));
        assert!(get(&store, key) == *bytes, "{key}: came back different");
        assert_eq!(store.run(storage.head(key)).unwrap_or_else(|e| panic!("head {key}: {e}")).size, bytes.len() as u64);
    }
    let seen = settled(&proxy);
    let parts = seen.iter().filter(|s| s.request.is_upload_part()).count();
    assert_eq!(parts, objects[1].1.len().div_ceil(PART_SIZE), "UploadPart requests: {:#?}", summary(&seen));
    // Only the existence checks before each create may say "absent".
    let failed = |s: &&Seen| !s.status.is_some_and(|code| code < 300 || (s.method == "HEAD" && code == 404));
    assert!(!seen.iter().any(|s| failed(&s)), "a request failed: {:#?}", summary(&seen));
    let stripped: Vec<&Seen> = seen.iter().filter(|s| s.if_none_match_removed).collect();
    assert_eq!(stripped.len(), 2, "the PUT and CompleteMultipartUpload lost the header: {:#?}", summary(&seen));
    assert!(stripped.iter().all(|s| is_publish(s)), "{:#?}", summary(stripped.iter().copied()));

    let listed = store.run(storage.list("objects/", None, 100)).expect("list");
    let keys: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys, ["objects/large", "objects/small"]);
    store.run(storage.delete("objects/small")).expect("delete");
    match store.run(storage.head("objects/small")) {
        Err(StorageError::NotFound { .. }) => {}
        other => panic!("head after the delete: {other:?}"),
    }

    holds_a_response_to_a_put_that_lost_its_header(&proxy, &store);
    assert_no_open_uploads(&repo);
}

/// A PUT whose header the proxy removed still meets a rule: its response is held until released,
/// and the create then completes.
fn holds_a_response_to_a_put_that_lost_its_header(proxy: &Proxy, store: &Store) {
    proxy.add(Rule::new(Fault::HoldResponse { after: 12 }).when(|r| r.method == "PUT").times(1));
    proxy.forget_seen();
    std::thread::scope(|scope| {
        let create = scope.spawn(|| put(store, "objects/held", b"held bytes"));
        assert!(proxy.wait_for_holds(1, Duration::from_secs(20)), "no response held: {:#?}", summary(&proxy.seen()));
        assert!(!create.is_finished(), "the create finished while its response was held");
        proxy.release();
        create.join().expect("the create thread").expect("create with a held response");
    });
    let seen = publishes(proxy);
    assert_eq!(seen.len(), 1, "{:#?}", summary(&seen));
    assert_eq!(seen[0].fault.as_deref(), Some("hold after 12 bytes"));
    assert!(seen[0].if_none_match_removed, "{:#?}", summary(&seen));
    assert_eq!(get(store, "objects/held"), b"held bytes");
}

/// Nothing of a multipart upload, finished or not, is left on the server.
#[track_caller]
fn assert_no_open_uploads(repo: &Repository) {
    let server = repo.s3_server().expect("an S3 repository");
    walship_tests::s3::assert_no_multipart_leftovers(server, "after the creates");
}

/// Every request seen so far, once the proxy has done with each. The proxy notes a response's status
/// just after passing its head on, so a client in this process can have its answer (and a test read
/// `seen`) a moment before the status is there.
fn settled(proxy: &Proxy) -> Vec<Seen> {
    walship_tests::poll_until("the proxy has done with every request", Duration::from_secs(10), || {
        let seen = proxy.seen();
        let open = seen.iter().filter(|s| s.finished.is_none()).count();
        if open == 0 { Ok(seen) } else { Err(format!("{open} still open: {:#?}", summary(&seen))) }
    })
}

/// One line per request, for failure messages: `PUT /walship/cluster/key -> Some(200) (fault, header removed)`.
fn summary<'a>(seen: impl IntoIterator<Item = &'a Seen>) -> Vec<String> {
    seen.into_iter()
        .map(|s| {
            let removed = if s.if_none_match_removed { ", If-None-Match removed" } else { "" };
            format!("{} {} -> {:?} (fault {:?}{removed})", s.method, s.target, s.status, s.fault)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// walship's commands on such a store: the probe when a repository is made, the warning, the
// settings, wal-verify's finding, and the read-back that turns a replaced write into a conflict.
// ---------------------------------------------------------------------------------------------------

const BUCKET: &str = "walship-test";
const SEG1: &str = "000000010000000000000001";
const SEG2: &str = "000000010000000000000002";
const SEG3: &str = "000000010000000000000003";
const SEG4: &str = "000000010000000000000004";
const PREFIX: &str = "db1";

/// A fixture on `s3://BUCKET/PREFIX` of an s3s-fs server of its own, with a proxy in front of it.
fn fixture_with_proxy(label: &str) -> (Fixture, Proxy) {
    let s = Fixture::with_repository(label, |scratch| Repository::s3(scratch, BUCKET, PREFIX));
    let proxy = Proxy::start(s.repo.s3_server().expect("an S3 fixture").port());
    (s, proxy)
}

/// A configuration through the proxy, with `extra` `[s3]` lines.
fn via_proxy(s: &Fixture, proxy: &Proxy, extra: &str) -> PathBuf {
    let server = s.repo.s3_server().expect("an S3 fixture");
    let s3 = format!("connect_timeout_secs = 2\nread_timeout_secs = 10\n{extra}");
    s.config_text(&server.config_text(&format!("s3://{BUCKET}/{PREFIX}"), &proxy.endpoint(), "deadline_secs = 30", &s3))
}

/// The identity record as stored.
fn identity_record(s: &Fixture) -> serde_json::Value {
    let server = s.repo.s3_server().expect("an S3 fixture");
    let path = server.object_file(BUCKET, &format!("{PREFIX}/repository.json"));
    serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))).unwrap()
}

/// Every key in the bucket.
fn bucket_keys(s: &Fixture) -> Vec<String> {
    s.repo.s3_server().expect("an S3 fixture").object_keys(BUCKET)
}

/// wal-verify `--json` with `config` and `args`: its report (it exits 13, the repository has no backup).
#[track_caller]
fn verify_report(s: &Fixture, config: &Path, args: &[&str]) -> serde_json::Value {
    let repo_args = [OsString::from("--config"), config.into()];
    let out = wal_verify(&s.repo, &repo_args, &s.data, &[&["--json"], args].concat());
    assert_eq!(out.code, Some(13), "wal-verify {args:?}: {out:#?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:#?}"))
}

/// What wal-fetch restores of `name`.
#[track_caller]
fn fetched(s: &Fixture, config: &Path, name: &str) -> Vec<u8> {
    assert_ok(&s.fetch_with(config, name), &format!("fetch {name}"));
    let bytes = fs::read(s.destination()).expect("the restored file");
    fs::remove_file(s.destination()).unwrap();
    bytes
}

/// Warning lines about the store's conditional writes in a command's output.
fn warnings(out: &Output) -> Vec<&str> {
    out.stderr.lines().filter(|l| l.contains("warning:") && l.contains("conditional writes")).collect()
}

/// s3s-fs honours `If-None-Match`: the push that makes the repository probes the store, the identity
/// record says `enforced` and names the store, the scratch object is gone, nothing is said about it,
/// and wal-verify finds nothing to report about the store, from the record or probing it again.
#[test]
fn a_store_that_refuses_a_second_create_is_recorded_as_enforcing_it() {
    let (s, proxy) = fixture_with_proxy("conditional-enforced");
    let config = via_proxy(&s, &proxy, "");
    s.write_segment(&Segment::new(SEG1));
    let out = s.push_with(&config, SEG1);
    assert_ok(&out, "the first push");
    let record = &identity_record(&s)["conditional_writes"];
    assert_eq!(record["guard"], "enforced", "{record:#}");
    assert_eq!(record["store"].as_str(), Some(proxy.endpoint().as_str()), "{record:#}");
    assert!(record["probed"].is_string(), "{record:#}");
    let keys = bucket_keys(&s);
    assert!(!keys.iter().any(|k| k.contains("probe/")), "the scratch object was left: {keys:?}");
    let probes: Vec<Seen> = settled(&proxy).into_iter().filter(|r| r.request.path().contains("/probe/")).collect();
    let methods: Vec<(&str, Option<&str>, Option<u16>)> =
        probes.iter().map(|r| (r.method.as_str(), r.request.header("if-none-match"), r.status)).collect();
    assert_eq!(methods, [("PUT", None, Some(200)), ("PUT", Some("*"), Some(412)), ("DELETE", None, Some(204))]);

    for args in [&[][..], &["--probe-writes"][..]] {
        let report = verify_report(&s, &config, args);
        assert_eq!(report["conditional_writes"], "enforced", "{args:?}: {report:#}");
        assert!(findings(&report, "conditional_writes_ignored").is_empty(), "{args:?}: {report:#}");
    }
}

/// Through the stand-in for a store that ignores the header: the record says `ignored`; every wal-push
/// process says so once, naming the store and the consequence, and still archives; wal-verify reports
/// it (from the record, and probing again); `accept` silences the warning and `require` refuses to
/// write (exit 8, nothing written), on a new repository (no repository is made) as on an existing one.
#[test]
fn a_store_that_ignores_conditional_writes_is_recorded_said_and_refused_on_request() {
    let (s, proxy) = fixture_with_proxy("conditional-ignored");
    proxy.ignore_conditional_writes(true);
    let require = via_proxy(&s, &proxy, "conditional_writes = \"require\"");
    s.write_segment(&Segment::new(SEG1));
    let out = s.push_with(&require, SEG1);
    assert_error(&out, 8, &["ignores conditional writes", "conditional_writes = \"require\"", "nothing was written"]);
    assert_eq!(bucket_keys(&s), Vec::<String>::new(), "require made a repository on such a store");

    let warn = via_proxy(&s, &proxy, "");
    for name in [SEG1, SEG2] {
        s.write_segment(&Segment::new(name));
        let out = s.push_with(&warn, name);
        assert_eq!(out.code, Some(0), "{out:#?}");
        let said = warnings(&out);
        assert_eq!(said.len(), 1, "one warning per process: {out:#?}");
        for needle in [proxy.endpoint().as_str(), "ignores conditional writes", "both be told", "conditional_writes"] {
            assert!(said[0].contains(needle), "{needle:?} in {said:?}");
        }
        assert_eq!(out.stderr.lines().count(), 2, "the warning and the result: {out:#?}");
    }
    assert_eq!(identity_record(&s)["conditional_writes"]["guard"], "ignored");
    assert!(!bucket_keys(&s).iter().any(|k| k.contains("probe/")), "scratch object left");

    for args in [&[][..], &["--probe-writes"][..]] {
        let report = verify_report(&s, &warn, args);
        assert_eq!(report["conditional_writes"], "ignored", "{args:?}: {report:#}");
        let found = findings(&report, "conditional_writes_ignored");
        assert_eq!(found.len(), 1, "{args:?}: {report:#}");
        assert!(found[0]["message"].as_str().unwrap().contains(&proxy.endpoint()), "{found:#?}");
    }

    let accept = via_proxy(&s, &proxy, "conditional_writes = \"accept\"");
    s.write_segment(&Segment::new(SEG3));
    assert_ok(&s.push_with(&accept, SEG3), "with conditional_writes = \"accept\"");

    let before = bucket_keys(&s);
    s.write_segment(&Segment::new(SEG4));
    let out = s.push_with(&require, SEG4);
    assert_error(&out, 8, &["ignores conditional writes", "conditional_writes = \"require\"", "nothing was written"]);
    assert_eq!(bucket_keys(&s), before, "a refused push wrote");
}

/// A repository made where the store enforced conditional writes, then reached through a store that
/// ignores them (the bucket moved): writers trust the record, and only `wal-verify --probe-writes`
/// finds out, saying that the record is wrong.
#[test]
fn probing_again_finds_a_store_that_no_longer_enforces_what_the_record_says() {
    let (s, proxy) = fixture_with_proxy("conditional-moved");
    let config = via_proxy(&s, &proxy, "");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push_with(&config, SEG1), "push where the store enforces");
    proxy.ignore_conditional_writes(true);
    let report = verify_report(&s, &config, &[]);
    assert!(findings(&report, "conditional_writes_ignored").is_empty(), "{report:#}");
    let report = verify_report(&s, &config, &["--probe-writes"]);
    assert_eq!(report["conditional_writes"], "ignored", "{report:#}");
    let found = findings(&report, "conditional_writes_ignored");
    assert_eq!(found.len(), 1, "{report:#}");
    let message = found[0]["message"].as_str().unwrap();
    assert!(message.contains("probed now") && message.contains("the identity record says"), "{message}");
}

/// On a store that ignores the header, a write that another writer's replaces before it is read back
/// is a conflict (exit 5), not a success: A's PUT is taken and its answer held; B (other content,
/// its existence check answered "absent" as in a race) writes over it and succeeds; released, A reads
/// back, finds B's object, and is told so. B's segment is what the repository holds.
#[test]
fn a_write_replaced_before_it_is_read_back_is_a_conflict() {
    let (s, proxy) = fixture_with_proxy("conditional-read-back");
    proxy.ignore_conditional_writes(true);
    let config = via_proxy(&s, &proxy, "conditional_writes = \"accept\"");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push_with(&config, SEG1), "the push that makes the repository");

    let key = format!("{PREFIX}/{}", wal_key(SEG2));
    let path = format!("/{BUCKET}/{key}");
    let ours = s.write_segment(&Segment::new(SEG2));
    let put_path = path.clone();
    proxy.add(
        Rule::new(Fault::HoldResponse { after: 0 }).when(move |r| r.method == "PUT" && r.path() == put_path).times(1),
    );
    let a = spawn(&mut s.push_cmd(Some(&config), SEG2));
    assert!(proxy.wait_for_holds(1, Duration::from_secs(30)), "A's PUT was never held: {:#?}", summary(&proxy.seen()));

    let theirs = s.write_segment(&Segment::new(SEG2).seed(7));
    proxy.add(
        Rule::new(Fault::Respond(Response::s3_error(404, "Not Found", "NoSuchKey", "injected")))
            .when(move |r| r.method == "HEAD" && r.path() == path)
            .times(1),
    );
    assert_ok(&s.push_with(&config, SEG2), "B, writing over A's object");
    proxy.release();
    let out = s.finish(a, HANG_MARGIN);
    assert_error(&out, 5, &[SEG2, "different content", &sha256_hex(&ours), &sha256_hex(&theirs)]);
    assert!(!bucket_keys(&s).is_empty() && bucket_keys(&s).contains(&key), "{key} missing");
    s.assert_fetches_with(&config, SEG2, &theirs);
}

/// The race of the issue, measured: two wal-push calls of different content for one name at the same
/// moment, on a store that ignores the header, `TRIALS` times. Before: a repository whose record says
/// the store enforces conditional writes (made through s3s-fs directly), so writers do not read back.
/// After: a repository made on the store that ignores them, so every write is read back. The issue's
/// figure is the trials in which both calls exit 0 (one was told its segment was durable while the
/// other replaced it). Also counted: trials in which a call told 0 does not have its segment stored,
/// which adds one case on s3s-fs: it writes an object's data, metadata and ETag as three files, so
/// two PUTs racing there can leave one's data under the other's ETag, and a read-back then vouches
/// for the wrong writer (a real store commits them together). Both counts are printed for README.
/// Every trial must end with each call at 0 or 5, not both at 5, and one of the two segments stored.
#[test]
fn racing_pushes_of_different_content_are_counted_before_and_after_the_read_back() {
    const TRIALS: u64 = 20;
    let mut lost = Vec::new();
    for (mode, record_enforced) in [("before", true), ("after", false)] {
        let (s, proxy) = fixture_with_proxy(&format!("conditional-race-{mode}"));
        proxy.ignore_conditional_writes(!record_enforced);
        let config = via_proxy(&s, &proxy, "conditional_writes = \"accept\"");
        s.write_segment(&Segment::new(SEG1));
        assert_ok(&s.push_with(&config, SEG1), "the push that makes the repository");
        proxy.ignore_conditional_writes(true);
        let rival_dir = s.scratch.mkdir("rival");
        let (mut both_zero, mut replaced) = (0, 0);
        for trial in 0..TRIALS {
            let name = format!("0000000100000000000000{:02X}", trial + 0x10);
            let first = s.write_segment(&Segment::new(&name));
            let second = Segment::new(&name).seed(trial + 100);
            let second_bytes = second.bytes();
            segments::write_file(&rival_dir.join(&name), &second_bytes);
            let rival_file = format!("../rival/{name}");
            let a = spawn(&mut s.push_cmd(Some(&config), &name));
            let b = spawn(&mut s.push_cmd_from(&s.data, Some(&config), &rival_file, Some(&name)));
            let (a, b) = (s.finish(a, HANG_MARGIN), s.finish(b, HANG_MARGIN));
            let codes = (a.code, b.code);
            assert!(
                [Some(0), Some(5)].contains(&codes.0) && [Some(0), Some(5)].contains(&codes.1),
                "{mode} trial {trial}: {a:#?} {b:#?}"
            );
            let stored = fetched(&s, &config, &name);
            assert!(stored == first || stored == second_bytes, "{mode} trial {trial}: neither segment is stored");
            assert!(codes != (Some(5), Some(5)), "{mode} trial {trial}: both refused: {a:#?} {b:#?}");
            both_zero += u64::from(codes == (Some(0), Some(0)));
            let lost = (codes.0 == Some(0) && stored != first) || (codes.1 == Some(0) && stored != second_bytes);
            replaced += u64::from(lost);
        }
        eprintln!(
            "conditional-write race, {mode} the read-back: {both_zero} of {TRIALS} trials ended with both pushes at \
             0; in {replaced}, a push told 0 does not have its segment stored"
        );
        lost.push(both_zero);
    }
    eprintln!("conditional-write race: both pushes at 0 in {} of {TRIALS} trials before, {} after", lost[0], lost[1]);
}

/// base-push says it too, once, when it makes the repository on such a store (a base backup of a
/// real cluster through the stand-in), and the backup's many writes are each read back.
#[test]
fn base_push_on_a_store_that_ignores_conditional_writes_says_so_once() {
    let (s, proxy) = fixture_with_proxy("conditional-base");
    proxy.ignore_conditional_writes(true);
    let config = via_proxy(&s, &proxy, "");
    let mut cluster = Cluster::init("conditional-base", None);
    cluster.start();
    let args = [OsString::from("--config"), config.into()];
    let (name, out) = base_push(&cluster, &args, s.scratch.path(), &[]);
    assert_eq!(warnings(&out).len(), 1, "one warning: {out:#?}");
    assert!(warnings(&out)[0].contains("ignores conditional writes"), "{out:#?}");
    assert_eq!(identity_record(&s)["conditional_writes"]["guard"], "ignored");
    let catalog_key = format!("{PREFIX}/catalog/{name}.json");
    let read_back = settled(&proxy)
        .iter()
        .filter(|r| r.method == "HEAD" && r.request.path() == format!("/{BUCKET}/{catalog_key}"))
        .count();
    assert_eq!(read_back, 2, "the catalog record checked before its write and read back after it");
}

/// A store that answers the probe's second create neither with 412 nor with success is recorded as
/// `unknown`, its answer quoted, and treated as one that may ignore the header (warned about, read
/// back). A transient answer (503 until the deadline) is no verdict: the push fails (exit 8) and
/// the repository is not made, so the next push probes again.
#[test]
fn a_probe_answered_neither_way_is_unknown_and_a_transient_one_no_verdict() {
    let (s, proxy) = fixture_with_proxy("conditional-unknown");
    let is_probe_create =
        |r: &Request| r.method == "PUT" && r.path().contains("/probe/") && r.header("if-none-match").is_some();
    proxy.add(Rule::new(Fault::slow_down()).when(is_probe_create));
    let faulty = via_proxy(&s, &proxy, "");
    let faulty = {
        let text = fs::read_to_string(&faulty).unwrap().replace("deadline_secs = 30", "deadline_secs = 3");
        s.config_text(&text)
    };
    s.write_segment(&Segment::new(SEG1));
    let out = s.push_with(&faulty, SEG1);
    assert_error(&out, 8, &["503"]);
    assert!(!bucket_keys(&s).iter().any(|k| k.ends_with("repository.json")), "made on a transient answer");

    proxy.clear();
    proxy.add(
        Rule::new(Fault::Respond(Response::s3_error(501, "Not Implemented", "NotImplemented", "no conditions here")))
            .when(is_probe_create),
    );
    let config = via_proxy(&s, &proxy, "");
    let out = s.push_with(&config, SEG1);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let said = warnings(&out);
    assert_eq!(said.len(), 1, "{out:#?}");
    assert!(said[0].contains("neither way") && said[0].contains("NotImplemented"), "{said:?}");
    let record = &identity_record(&s)["conditional_writes"];
    assert_eq!(record["guard"], "unknown", "{record:#}");
    assert!(record["answer"].as_str().unwrap().contains("501"), "{record:#}");
    assert!(!bucket_keys(&s).iter().any(|k| k.contains("probe/")), "scratch object left");
}
