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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walship_tests::Output;
use walship_tests::assertions::{
    assert_absent, assert_error, assert_no_temp_files, assert_ok, assert_one_line, sha256_hex,
};
use walship_tests::fixture::{Fixture, HANG_MARGIN, RECOVERYXLOG, identity_of};
use walship_tests::proxy::{Fault, Proxy, Request, Response, Rule};
use walship_tests::repository::Repository;
use walship_tests::running::{finish, spawn};
use walship_tests::s3::{
    ACCESS_KEY, REGION, S3Server, SECRET_KEY, assert_no_multipart_leftovers, free_port, write_config_file,
};
use walship_tests::segments::{self, Fill, Segment, wal_key};

const SEG1: &str = "000000010000000000000001";
const SEG2: &str = "000000010000000000000002";
const SEG3: &str = "000000010000000000000003";
const BUCKET: &str = "walship-test";
const PREFIX: &str = "db1";
const MIB: usize = 1 << 20;

/// Settings for tests where nothing is meant to fail: generous, but a hang still ends.
const CALM: (&str, &str) = ("deadline_secs = 30", "connect_timeout_secs = 2\nread_timeout_secs = 10");
/// Settings for fault tests: give up soon.
const FAULTY: (&str, &str) = ("deadline_secs = 5", "connect_timeout_secs = 1\nread_timeout_secs = 2");

fn repo_url() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

/// The object key of a WAL file in the bucket: the repository's layout, under the prefix.
fn key_of(name: &str) -> String {
    format!("{PREFIX}/{}", wal_key(name))
}

/// The request path of a key, path style.
fn path_of(key: &str) -> String {
    format!("/{BUCKET}/{key}")
}

/// The s3:// location as the commands print it.
fn location_of(name: &str) -> String {
    format!("s3://{BUCKET}/{}", key_of(name))
}

/// A fixture on `s3://BUCKET/PREFIX` of an s3s-fs server of its own.
fn setup(label: &str) -> Fixture {
    Fixture::with_repository(label, |scratch| Repository::s3(scratch, BUCKET, PREFIX))
}

/// [`setup`], a proxy in front of the server, and a configuration through the proxy with
/// `settings` and `extra` `[s3]` lines.
fn setup_with_proxy(label: &str, settings: (&str, &str), extra: &str) -> (Fixture, Proxy, PathBuf) {
    let s = setup(label);
    let proxy = Proxy::start(server(&s).port());
    let config = config_via(&s, &proxy.endpoint(), settings, extra);
    (s, proxy, config)
}

/// The fixture's S3 server.
fn server(s: &Fixture) -> &S3Server {
    s.repo.s3_server().expect("an S3 fixture")
}

fn server_mut(s: &mut Fixture) -> &mut S3Server {
    let Repository::S3 { server, .. } = &mut s.repo else { panic!("an S3 fixture") };
    server
}

/// A configuration for the repository through `endpoint` (the server's, or a proxy in front of it),
/// with `settings` (top-level and `[s3]` lines) and `extra` `[s3]` lines.
fn config_via(s: &Fixture, endpoint: &str, settings: (&str, &str), extra: &str) -> PathBuf {
    let text = server(s).config_text(&repo_url(), endpoint, settings.0, &format!("{}\n{extra}", settings.1));
    s.config_text(&text)
}

/// A configuration straight to the server.
fn direct_config(s: &Fixture, settings: (&str, &str), extra: &str) -> PathBuf {
    config_via(s, &server(s).endpoint(), settings, extra)
}

fn is_request_for(request: &Request, method: &str, key: &str) -> bool {
    request.method == method && request.path() == path_of(key)
}

// ---------------------------------------------------------------------------------------------------
// The contract, on S3.
// ---------------------------------------------------------------------------------------------------

/// The object appears between the existence check and the write (a racing push, or a store whose
/// listing lags): the conditional write gets 412, and the push decides by content, for a single PUT
/// and for a multipart upload, which is then aborted.
#[test]
fn a_412_on_the_conditional_write_is_judged_by_content() {
    let (s, proxy, config) = setup_with_proxy("s3-412", CALM, "part_size = \"5MiB\"");
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
        assert_ok(&s.push_with(&config, name), &format!("first push of {name}"));
        let object = s.object(name);
        let before = identity_of(&object);

        proxy.add(lie(name, checks));
        proxy.forget_seen();
        let out = s.push_with(&config, name);
        assert_ok(&out, &format!("identical push of {name} after a 412"));
        assert!(out.stderr.contains("already archived"), "{:?}", out.stderr);
        let refused = proxy.seen().iter().filter(|r| r.method == publish && r.status == Some(412)).count();
        assert_eq!(refused, 1, "{name}: the conditional {publish} should have met a 412: {:#?}", proxy.seen());
        assert_eq!(identity_of(&object), before, "{name}: rewritten");

        let other = s.write_segment(&segment.clone().seed(9));
        proxy.add(lie(name, checks));
        let out = s.push_with(&config, name);
        assert_error(&out, 5, &[name, "different content", &sha256_hex(&original), &sha256_hex(&other)]);
        assert_eq!(identity_of(&object), before, "{name}: rewritten");
        assert_no_multipart_leftovers(server(&s), name);
        s.write_segment(segment);
        s.assert_fetches_with(&config, name, &original);
    }
}

/// A segment larger than a part goes up as a multipart upload: uniform parts of part_size (the last
/// one shorter), upload_concurrency of them in flight at once and never more, memory well below the
/// segment's size (the upload streams), no parts left over, and the object comes back byte for byte.
#[test]
fn multipart_uploads_round_trip_with_uniform_parallel_parts() {
    let s = setup("s3-multipart");
    let proxy = Proxy::start(server(&s).port());
    let concurrency = 3;
    let config =
        config_via(&s, &proxy.endpoint(), CALM, &format!("part_size = \"5MiB\"\nupload_concurrency = {concurrency}"));
    // Slow parts, so that parallel uploads overlap for sure.
    proxy.add(Rule::new(Fault::Delay(Duration::from_millis(150))).when(Request::is_upload_part));
    // Incompressible, so that the object is as large as the segment.
    let segment = Segment::new(SEG1).segment_size(128 << 20).fill(Fill::Random);
    let original = s.write_segment(&segment);

    let finished = finish(spawn(&mut s.push_cmd(Some(&config), SEG1)), HANG_MARGIN * 2);
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
    assert_no_multipart_leftovers(server(&s), "after a successful multipart upload");
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
    s.assert_fetches_with(&config, SEG1, &original);
}

// ---------------------------------------------------------------------------------------------------
// Faults.
// ---------------------------------------------------------------------------------------------------

/// Passing trouble is retried within the deadline: 503 Slow Down, 500, 429, a reset connection, a
/// connection closed without an answer, a request that stalls once, and a response cut off in its
/// head. Each push and fetch meets several faults and still succeeds, with the right bytes.
#[test]
fn passing_faults_are_retried_within_the_deadline() {
    let (s, proxy, config) = setup_with_proxy("s3-retry", ("deadline_secs = 40", FAULTY.1), "");
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
            let out = if command == "push" { s.push_with(&config, &name) } else { s.fetch_with(&config, &name) };
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
    let (s, proxy, config) = setup_with_proxy("s3-midway", ("deadline_secs = 20", FAULTY.1), "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(4 << 20).fill(Fill::Random));
    assert_ok(&s.push_with(&config, SEG1), "push");
    // Both cases are tried; what failed is reported together at the end.
    let mut failed = Vec::new();
    for (what, fault) in [
        ("cut after 1 MiB", Fault::CutResponse { after: MIB }),
        ("stopped after 1 MiB", Fault::HoldResponse { after: MIB }),
    ] {
        let key = key_of(SEG1);
        proxy.add(Rule::new(fault).when(move |r| is_request_for(r, "GET", &key)).times(1));
        let applied = proxy.faults_applied();
        let out = s.fetch_with(&config, SEG1);
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
fn assert_absent_or_complete(s: &Fixture, original: &[u8]) {
    assert_no_temp_files(&s.wal);
    if let Ok(restored) = fs::read(s.destination()) {
        assert!(restored == original, "a partial or wrong file was handed over");
    }
}

/// A store that keeps answering 503 fails the command once the deadline has passed (8, 208), with
/// the last error on one line; a file it cannot look up is never reported absent.
#[test]
fn a_store_that_keeps_failing_fails_at_the_deadline() {
    let (s, proxy, config, original) = archived_before_the_trouble("s3-503");

    proxy.add(Rule::new(Fault::slow_down()));
    let endpoint = proxy.endpoint();
    let needles = ["gave up after 5 s", "503", "SlowDown", &endpoint];
    let (standby, [push, fetch_archived, fetch_missing, fetch_standby]) = all_at_once(&s, &config);
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
    s.assert_fetches_with(&config, SEG1, &original);
    assert_ok(&s.push_with(&config, SEG2), "push once the store is well");
}

/// [`setup_with_proxy`] with the fault settings, SEG1 archived (its bytes returned) and SEG2 in
/// pg_wal, for [`all_at_once`] once the trouble starts.
fn archived_before_the_trouble(label: &str) -> (Fixture, Proxy, PathBuf, Vec<u8>) {
    let (s, proxy, config) = setup_with_proxy(label, FAULTY, "");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push_with(&config, SEG1), "push before the trouble");
    s.write_segment(&Segment::new(SEG2));
    (s, proxy, config, original)
}

/// Runs at once, so that their deadlines run out together: a push of SEG2, fetches of SEG1 (archived)
/// and SEG3 (never archived), and a standby's fetch of SEG3 (from the standby's data directory,
/// returned too).
fn all_at_once(s: &Fixture, config: &Path) -> (PathBuf, [Output; 4]) {
    let standby = s.standby_data();
    let running = [
        spawn(&mut s.push_cmd(Some(config), SEG2)),
        spawn(&mut s.fetch_cmd(Some(config), SEG1)),
        spawn(&mut s.fetch_cmd(Some(config), SEG3)),
        spawn(&mut s.fetch_cmd_in(&standby, Some(config), SEG3)),
    ];
    (standby, running.map(|r| finish(r, HANG_MARGIN).output))
}

/// A server that accepts requests and never answers must not hang archiving or recovery: the
/// commands fail at the deadline (8, 208; 1 on a standby) and are never "not found".
#[test]
fn a_stalled_server_never_hangs_a_command() {
    let (s, proxy, config, original) = archived_before_the_trouble("s3-stall");

    proxy.add(Rule::new(Fault::Stall));
    let (standby, [push, fetch_archived, fetch_missing, fetch_standby]) = all_at_once(&s, &config);
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
    s.assert_fetches_with(&config, SEG1, &original);
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
    let mut s = setup("s3-kill-push");
    let config = direct_config(&s, FAULTY, "part_size = \"5MiB\"\nupload_concurrency = 2");
    let segment = Segment::new(SEG1).segment_size(64 << 20).fill(Fill::Random);
    let original = s.write_segment(&segment);
    let object = s.object(SEG1);

    let mut running = spawn(&mut s.push_cmd(Some(&config), SEG1));
    let started = Instant::now();
    let mut caught = false;
    while started.elapsed() < Duration::from_secs(60) && !running.has_exited() {
        if !server(&s).stored_parts().is_empty() {
            server_mut(&mut s).kill();
            caught = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let push = finish(running, HANG_MARGIN);
    assert!(caught, "the push finished before a part was stored: {:#?}", push.output);
    assert_error(&push.output, 8, &["cannot reach", &server(&s).endpoint(), &format!("s3://{BUCKET}/{PREFIX}/")]);
    assert_absent(&object);
    // The server could not be told to abort; a bucket lifecycle rule removes such parts on AWS.
    eprintln!("left by the killed upload: {:?}", server(&s).multipart_leftovers());

    server_mut(&mut s).restart();
    let config = direct_config(&s, CALM, "part_size = \"5MiB\"\nupload_concurrency = 2");
    assert_error(&s.fetch_with(&config, SEG1), 1, &[SEG1, "not in the archive"]);
    assert_ok(&s.push_with(&config, SEG1), "push after the restart");
    s.assert_fetches_with(&config, SEG1, &original);
}

/// The server dies while a segment streams to wal-fetch: nothing reaches the destination (208; 1 on a
/// standby), and once the server is back the fetch restores the segment.
#[test]
fn server_killed_during_a_fetch() {
    let mut s = setup("s3-kill-fetch");
    let proxy = Proxy::start(server(&s).port());
    let config = config_via(&s, &proxy.endpoint(), FAULTY, "");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(16 << 20).fill(Fill::Random));
    assert_ok(&s.push_with(&config, SEG1), "push");

    // A recovering server and a standby fetch at once; each download stops after 1 MiB, and the
    // server dies while the clients wait for more.
    let key = key_of(SEG1);
    proxy.add(Rule::new(Fault::HoldResponse { after: MIB }).when(move |r| is_request_for(r, "GET", &key)).times(2));
    let standby = s.standby_data();
    let running =
        [spawn(&mut s.fetch_cmd(Some(&config), SEG1)), spawn(&mut s.fetch_cmd_in(&standby, Some(&config), SEG1))];
    assert!(proxy.wait_for_holds(2, Duration::from_secs(30)), "the fetches never started downloading");
    server_mut(&mut s).kill();
    proxy.release();
    let [recovering, on_standby] = running.map(|r| finish(r, HANG_MARGIN).output);
    assert_error(&recovering, 208, &[&location_of(SEG1)]);
    assert_error(&on_standby, 1, &[&location_of(SEG1)]);
    for data in [&s.data, &standby] {
        assert_absent(&data.join(RECOVERYXLOG));
        assert_no_temp_files(&data.join("pg_wal"));
    }

    server_mut(&mut s).restart();
    proxy.set_upstream(server(&s).port());
    s.assert_fetches_with(&config, SEG1, &original);
}

/// Wrong credentials are one clear line naming the endpoint, bucket and key, never "not found", and
/// nothing is written.
#[test]
fn wrong_credentials_are_named() {
    let s = setup("s3-credentials");
    let good = direct_config(&s, CALM, "");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push_with(&good, SEG1), "push with the right credentials");
    s.write_segment(&Segment::new(SEG2));
    let keys_before = server(&s).object_keys(BUCKET);
    let endpoint = server(&s).endpoint();

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
        assert_error(&s.push_with(&config, SEG2), 8, &needles);
        let fetch = s.fetch_with(&config, SEG1);
        assert_error(&fetch, 208, &needles);
        assert!(fetch.stderr.contains(&location_of(SEG1)), "{what}: the key: {:?}", fetch.stderr);
        assert_error(&s.fetch_with(&config, SEG3), 208, &needles);
        assert_absent(&s.destination());
        s.become_standby();
        assert_error(&s.fetch_with(&config, SEG3), 1, &[code]);
        s.stop_being_standby();
        assert!(!fetch.stderr.contains(secret), "{what}: the secret was printed");
        assert_eq!(server(&s).object_keys(BUCKET), keys_before, "{what}: something was written");
    }
}

/// A mistyped bucket is named as missing (8, 208), never "not found", and not created.
#[test]
fn a_missing_bucket_is_named() {
    let s = setup("s3-bucket");
    let text = server(&s).config_text("s3://no-such-bucket/db1", &server(&s).endpoint(), CALM.0, CALM.1);
    let config = s.config_text(&text);
    s.write_segment(&Segment::new(SEG1));
    let needles = ["bucket \"no-such-bucket\" does not exist", "s3://no-such-bucket/db1/", &server(&s).endpoint()];
    assert_error(&s.push_with(&config, SEG1), 8, &needles);
    assert_error(&s.fetch_with(&config, SEG1), 208, &needles);
    assert_absent(&s.destination());
    s.become_standby();
    assert_error(&s.fetch_with(&config, SEG1), 1, &needles[..1]);
    assert_absent(&server(&s).data_dir().join("no-such-bucket"));
}

/// A bucket in another region. s3s-fs accepts any region, so the proxy answers as AWS does for a
/// request signed for the wrong region (400 AuthorizationHeaderMalformed, naming the right one).
#[test]
fn a_wrong_region_is_named() {
    let s = setup("s3-region");
    let proxy = Proxy::start(server(&s).port());
    proxy.add(wrong_region_rule("eu-central-1"));
    let wrong = config_via(&s, &proxy.endpoint(), CALM, "");
    let original = s.write_segment(&Segment::new(SEG1));
    let needles =
        ["wrong region", "AuthorizationHeaderMalformed", &proxy.endpoint(), &format!("s3://{BUCKET}/{PREFIX}/")];
    assert_error(&s.push_with(&wrong, SEG1), 8, &needles);
    assert_error(&s.fetch_with(&wrong, SEG1), 208, &needles);
    assert_absent(&s.destination());
    assert!(server(&s).object_keys(BUCKET).is_empty());

    let right = s.config_text(
        &server(&s)
            .config_text(&repo_url(), &proxy.endpoint(), CALM.0, CALM.1)
            .replace(&format!("region = \"{REGION}\""), "region = \"eu-central-1\""),
    );
    assert_ok(&s.push_with(&right, SEG1), "push signed for the bucket's region");
    s.assert_fetches_with(&right, SEG1, &original);
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
    let s = setup("s3-unreachable");
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let config = config_via(&s, &endpoint, FAULTY, "");
    s.write_segment(&Segment::new(SEG1));
    let needles = ["gave up after 5 s", "cannot reach", &endpoint, "Connection refused", &location_of(SEG1)];
    let running = [spawn(&mut s.push_cmd(Some(&config), SEG1)), spawn(&mut s.fetch_cmd(Some(&config), SEG1))];
    let [push, fetch] = running.map(|r| finish(r, HANG_MARGIN));
    let prefix = format!("s3://{BUCKET}/{PREFIX}/");
    assert_error(&push.output, 8, &["gave up after 5 s", "cannot reach", &endpoint, "Connection refused", &prefix]);
    assert_error(&fetch.output, 208, &needles);
    assert_absent(&s.destination());
}

/// An endpoint that answers 404 to everything (a web server, not S3) proves nothing about absence.
#[test]
fn an_endpoint_that_is_not_s3_is_never_absence() {
    let (s, proxy, config) = setup_with_proxy("s3-not-s3", CALM, "");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push_with(&config, SEG1), "push");
    proxy.add(Rule::new(Fault::Respond(Response {
        status: 404,
        reason: "Not Found".into(),
        headers: vec![("Content-Type".into(), "text/html".into())],
        body: "<html><body>Not Found</body></html>".into(),
    })));
    for name in [SEG1, SEG2] {
        let out = s.fetch_with(&config, name);
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
    let (s, proxy, config) =
        setup_with_proxy("s3-multipart-fail", FAULTY, "part_size = \"5MiB\"\nupload_concurrency = 2");
    let original = s.write_segment(&Segment::new(SEG1).segment_size(32 << 20).fill(Fill::Random));
    // Part 4 is still on its way to the server when part 5 is refused.
    proxy.add(
        Rule::new(Fault::SlowBody { after: MIB, pause: Duration::from_secs(2) })
            .when(|r| r.is_upload_part() && r.part_number() == Some(4)),
    );
    proxy.add(
        Rule::new(Fault::bad_request("InvalidArgument")).when(|r| r.is_upload_part() && r.part_number() == Some(5)),
    );
    let out = s.push_with(&config, SEG1);
    assert_error(&out, 8, &["UploadPart", "InvalidArgument", &location_of(SEG1), &proxy.endpoint()]);
    let seen = proxy.seen();
    let aborts = seen.iter().filter(|r| r.method == "DELETE" && r.request.has_query("uploadId")).count();
    assert!(aborts >= 1, "the failed upload was not aborted: {seen:#?}");
    assert_absent(&s.object(SEG1));
    // The part in transit reaches the server within the pause; give it that long to settle.
    std::thread::sleep(Duration::from_secs(3));
    assert_no_multipart_leftovers(server(&s), "after a failed multipart upload");

    proxy.clear();
    assert_ok(&s.push_with(&config, SEG1), "push once parts are accepted again");
    assert_no_multipart_leftovers(server(&s), "after the successful push");
    s.assert_fetches_with(&config, SEG1, &original);
}

/// A multipart upload one of whose parts never gets an answer, until the deadline ends the push:
/// the upload is aborted all the same, so no parts stay behind.
#[test]
fn a_multipart_upload_cut_off_by_the_deadline_leaves_no_parts() {
    let (s, proxy, config) =
        setup_with_proxy("s3-multipart-deadline", FAULTY, "part_size = \"5MiB\"\nupload_concurrency = 2");
    s.write_segment(&Segment::new(SEG1).segment_size(32 << 20).fill(Fill::Random));
    // Every other part is stored; part 3 never gets an answer.
    proxy.add(Rule::new(Fault::Stall).when(|r| r.is_upload_part() && r.part_number() == Some(3)));
    let push = finish(spawn(&mut s.push_cmd(Some(&config), SEG1)), HANG_MARGIN);
    assert_error(&push.output, 8, &["gave up after 5 s"]);
    assert_absent(&s.object(SEG1));
    proxy.clear();
    let uploads = proxy.seen().iter().filter(|r| r.method == "POST" && r.request.has_query("uploads")).count();
    let aborts = proxy.seen().iter().filter(|r| r.method == "DELETE" && r.request.has_query("uploadId")).count();
    eprintln!("multipart uploads started: {uploads}, aborted: {aborts}");
    assert!(uploads >= 1, "no multipart upload was started");
    // The abort, if any, has been answered by the time the push exited.
    assert_no_multipart_leftovers(server(&s), "after a multipart upload cut off by the deadline");
    assert_eq!(aborts, uploads, "every multipart upload started should have been aborted");
}

/// Runs `cmd` with the AWS SDK's standard variables set to `vars`, and no shared config or
/// credentials file that could fill in anything else.
fn run_with_aws_env(s: &Fixture, mut cmd: Command, vars: &[(&str, &str)]) -> Output {
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
    let s = setup("s3-env");
    // The file has the region only: no endpoint, no path style, no keys.
    let region_only = s.config_text(&format!("repo = \"{}\"\n{}\n[s3]\nregion = \"{REGION}\"\n", repo_url(), CALM.0));
    let segment = s.write_segment(&Segment::new(SEG1));
    let endpoint = server(&s).endpoint();
    fn env<'a>(endpoint: &'a str, secret: &'a str) -> [(&'a str, &'a str); 3] {
        [("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", secret)]
    }

    let out = run_with_aws_env(&s, s.push_cmd(Some(&region_only), SEG1), &env(&endpoint, SECRET_KEY));
    assert_ok(&out, "push configured by the environment");
    assert!(s.object(SEG1).is_file(), "the object is not where the environment points");
    let out = run_with_aws_env(&s, s.fetch_cmd(Some(&region_only), SEG1), &env(&endpoint, SECRET_KEY));
    assert_ok(&out, "fetch configured by the environment");
    assert!(fs::read(s.destination()).unwrap() == segment);
    fs::remove_file(s.destination()).unwrap();

    // The variables are really used: a wrong secret fails as it would in the file.
    let out = run_with_aws_env(&s, s.fetch_cmd(Some(&region_only), SEG1), &env(&endpoint, "not-the-secret"));
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
    assert_ok(&run_with_aws_env(&s, s.push_cmd(Some(&region_only), SEG2), &profile), "push with a profile");
    assert_ok(&run_with_aws_env(&s, s.fetch_cmd(Some(&region_only), SEG2), &profile), "fetch with a profile");
    assert!(fs::read(s.destination()).unwrap() == second);
    fs::remove_file(s.destination()).unwrap();

    // The file's [s3] settings beat the environment: its endpoint and keys here.
    let file = direct_config(&s, CALM, "");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let out = run_with_aws_env(&s, s.fetch_cmd(Some(&file), SEG1), &env(&nowhere, "not-the-secret"));
    assert_ok(&out, "the file's settings over the environment's");
    fs::remove_file(s.destination()).unwrap();
}

/// AWS_REGION (or AWS_DEFAULT_REGION) supplies the region when the configuration file has none, as
/// with every other AWS tool. The proxy plays a bucket in eu-central-1 (answering as AWS does to a
/// request signed for another region), so the region must really be used.
#[test]
fn aws_region_from_the_environment() {
    let s = setup("s3-env-region");
    let proxy = Proxy::start(server(&s).port());
    proxy.add(wrong_region_rule("eu-central-1"));
    // Endpoint and keys in the file; the region only in the environment.
    let text = server(&s).config_text(&repo_url(), &proxy.endpoint(), CALM.0, CALM.1);
    let no_region: String = text.lines().filter(|l| !l.starts_with("region")).map(|l| format!("{l}\n")).collect();
    let config = s.config_text(&no_region);
    let segment = s.write_segment(&Segment::new(SEG1));

    let out = run_with_aws_env(&s, s.push_cmd(Some(&config), SEG1), &[("AWS_REGION", "eu-central-1")]);
    assert_ok(&out, "push with AWS_REGION");
    let out = run_with_aws_env(&s, s.fetch_cmd(Some(&config), SEG1), &[("AWS_DEFAULT_REGION", "eu-central-1")]);
    assert_ok(&out, "fetch with AWS_DEFAULT_REGION");
    assert!(fs::read(s.destination()).unwrap() == segment);
    fs::remove_file(s.destination()).unwrap();
    let out = run_with_aws_env(&s, s.fetch_cmd(Some(&config), SEG1), &[("AWS_REGION", "us-west-2")]);
    assert_error(&out, 208, &["wrong region", &proxy.endpoint(), &location_of(SEG1)]);
}
