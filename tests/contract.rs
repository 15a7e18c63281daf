//! The command-line contract of `wal-push` and `wal-fetch`, proven with synthetic WAL files and no
//! PostgreSQL server: exit codes, the one-line error on stderr, and what the repository and the
//! destination hold after every kind of bad input and fault (a kill mid-write, a full disk, an
//! unreadable or foreign repository, a damaged object).
//!
//! Each scenario is written once over the backend-generic [`Fixture`] and runs on local disk, S3
//! (s3s-fs) and SSH (a real sshd) through `every_backend!`: the tests are `SCENARIO::local`,
//! `SCENARIO::s3` and `SCENARIO::ssh`. What only one backend can show (S3 requests seen through a
//! proxy, SSH's untouched `~/.ssh`) is checked inside the scenario on that backend. The tests further
//! down are about local disk alone (file permissions, a full tmpfs, the configuration sources);
//! `s3.rs` and `ssh.rs` hold the faults of a network store.
//!
//! Each test runs the binaries the way PostgreSQL would: as the server's OS user, from a data
//! directory, with `%p` relative to it. The disk-full tests mount a tmpfs and so need root.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use walship_tests::assertions::{
    assert_absent, assert_error, assert_no_temp_files, assert_ok, assert_one_line, files_below, sha256_hex, temp_files,
};
use walship_tests::fixture::{Fixture, HANG_MARGIN, RECOVERYXLOG, identity_of, tree};
use walship_tests::proxy::{Fault, Proxy, Response, Rule};
use walship_tests::repository::{Backend, Repository};
use walship_tests::running::spawn;
use walship_tests::segments::{self, Fill, Segment, wal_key};
use walship_tests::{Output, run, server_user, walship};

const SEG1: &str = "000000010000000000000001";
const SEG2: &str = "000000010000000000000002";
const SEG3: &str = "000000010000000000000003";
/// Another cluster's system identifier.
const OTHER_SYSTEM_IDENTIFIER: u64 = 7_299_999_999_999_999_999;

walship_tests::every_backend!(
    also_encrypted:
    every_kind_of_file_round_trips_in_the_documented_layout,
    identical_repush_succeeds_without_rewriting,
    different_content_under_an_archived_name_is_a_conflict,
    missing_files_are_not_found_and_nothing_is_written,
    corrupt_objects_are_never_handed_over_or_called_identical,
    history_files_are_never_overwritten,
    partial_segments_and_backup_labels_round_trip,
    the_first_push_records_the_cluster_identity,
);
// Not encrypted too: an interrupted push is the storage's atomic publication, the same whatever the
// pipeline encodes, and its eleven 64 MiB pushes per backend would add two minutes to the suite.
walship_tests::every_backend!(kill_9_during_push_leaves_nothing_half_done);
// S3 keeps no temporary files beside its objects (an unfinished upload is a multipart upload, whose
// abort `s3.rs` proves).
walship_tests::some_backends!(also_encrypted: [local, ssh] stale_temporary_files_are_ignored_and_swept_fresh_ones_kept);
// On S3 two pushes of different content racing for one name both succeed against s3s-fs: its
// `If-None-Match: *` check is not atomic with the write, so the race proves nothing about walship there
// (AWS S3 makes it atomic; `s3.rs` proves the 412 is judged by content).
walship_tests::some_backends!(
    also_encrypted:
    [local, ssh]
    racing_pushes_of_one_name_agree,
    racing_pushes_of_one_name_never_overwrite,
);

/// The server user's home directory from the password database (where ssh looks for `~/.ssh`,
/// whatever HOME says).
fn server_user_home(user: &str) -> PathBuf {
    let out = Command::new("getent").args(["passwd", user]).output().expect("run getent");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    PathBuf::from(line.trim().split(':').nth(5).unwrap_or_else(|| panic!("getent passwd {user}: {line:?}")))
}

/// Every kind of file PostgreSQL archives goes where the layout says, in walship's format (on S3 with
/// the digest in the object's metadata), with no temporary file left, and comes back byte for byte;
/// over SSH nobody's real `~/.ssh` is touched.
fn every_kind_of_file_round_trips_in_the_documented_layout(backend: Backend) {
    let s = Fixture::new(backend, "layout");
    let ssh_homes: Vec<PathBuf> = match s.repo.ssh_server() {
        Some(server) => [Path::new("/tmp/.ssh").to_owned(), server_user_home(&server.user()).join(".ssh")]
            .into_iter()
            .filter(|p| !p.exists())
            .collect(),
        None => Vec::new(),
    };
    let known_hosts = s.repo.ssh_server().map(|server| fs::read(server.known_hosts_file()).unwrap());

    let segment = s.write_segment(&Segment::new(SEG1));
    let partial_name = format!("{SEG3}.partial");
    let partial = s.write_segment(&Segment::new(&partial_name));
    let history_name = segments::history_name(2);
    let history = segments::history_content(2, "no recovery target specified");
    s.write_wal_file(&history_name, history.as_bytes());
    let (label_name, label) = segments::backup_label(1, 0x0010_0028, segments::MIN_SEGMENT_SIZE);
    s.write_wal_file(&label_name, label.as_bytes());

    let names = [SEG1, &partial_name, &history_name, &label_name];
    for name in names {
        let out = s.push(name);
        assert_ok(&out, &format!("push {name}"));
        assert!(out.stderr.contains(&format!("archived {name}")), "{:?}", out.stderr);
    }
    let mut expected: Vec<String> = names.iter().map(|n| wal_key(n)).collect();
    expected.push("repository.json".into());
    if s.repo.is_encrypted() {
        // The first encrypting push marks the repository encrypted (README "Repository layout").
        expected.push("encryption.json".into());
    }
    expected.sort();
    assert_eq!(s.repo_files(), expected, "the repository holds exactly the documented layout, no temporary files");
    if let Repository::S3 { server, bucket, prefix, .. } = &s.repo {
        let prefixed: Vec<String> = expected.iter().map(|key| format!("{prefix}/{key}")).collect();
        assert_eq!(server.object_keys(bucket), prefixed, "objects outside the prefix");
    }

    let record: serde_json::Value = serde_json::from_slice(&fs::read(s.repo.object_file("repository.json")).unwrap())
        .expect("repository.json is plain JSON");
    assert_eq!(record["system_identifier"], segments::DEFAULT_SYSTEM_IDENTIFIER.to_string(), "{record}");
    assert_eq!(record["wal_segment_size"], segments::MIN_SEGMENT_SIZE, "{record}");
    let stored = fs::read(s.object(SEG1)).unwrap();
    assert!(stored.starts_with(b"WALSHIP\0"), "not in walship's format: {:?}", &stored[..16]);
    assert!(stored.len() < segment.len() / 4, "a WAL-like segment should compress: {} bytes", stored.len());
    if let Repository::S3 { server, bucket, prefix, .. } = &s.repo {
        let metadata =
            fs::read_to_string(server.metadata_file(bucket, &format!("{prefix}/{}", wal_key(SEG1)))).unwrap();
        assert!(metadata.contains(&sha256_hex(&segment)), "walship-sha256 missing from {metadata}");
        assert!(metadata.contains(&format!("\"walship-length\":\"{}\"", segment.len())), "{metadata}");
    }

    s.assert_fetches(SEG1, &segment);
    s.assert_fetches(&partial_name, &partial);
    s.assert_fetches(&history_name, history.as_bytes());
    s.assert_fetches(&label_name, label.as_bytes());

    if let Some(server) = s.repo.ssh_server() {
        // The repository URL on the command line, with [ssh] from the file, works the same.
        let text = s.repo.config_text(Default::default()).replacen("repo = ", "# repo = ", 1);
        let ssh_only = s.config_text(&text);
        let out = s.run(s.fetch_cmd(Some(&ssh_only), SEG1).arg("--repo").arg(server.url(&server.repo_dir())));
        assert_ok(&out, "fetch with --repo ssh://...");
        assert!(fs::read(s.destination()).unwrap() == segment);
        fs::remove_file(s.destination()).unwrap();

        assert_eq!(Some(fs::read(server.known_hosts_file()).unwrap()), known_hosts, "known_hosts was written to");
        let written = files_below(&server.client_home());
        assert!(written.is_empty(), "written to the client's HOME: {written:?}");
        for path in ssh_homes {
            assert_absent(&path);
        }
    }
}

/// What the repository held after a first push, to prove that a later push left it untouched.
struct Archived {
    object: PathBuf,
    before: (u64, SystemTime, u64),
    stored: Vec<u8>,
    files: Vec<String>,
}

/// Pushes `segment` (SEG1) and records what the repository then holds.
fn archive_first(s: &Fixture, segment: &Segment) -> (Vec<u8>, Archived) {
    let bytes = s.write_segment(segment);
    assert_ok(&s.push(SEG1), "first push");
    let object = s.object(SEG1);
    let archived =
        Archived { before: identity_of(&object), stored: fs::read(&object).unwrap(), files: s.repo_files(), object };
    (bytes, archived)
}

/// Checks that the object of SEG1 and the rest of the repository are as `archived` recorded, and on
/// S3 that no request since `proxy` forgot what it saw tried to write the object.
#[track_caller]
fn assert_untouched(s: &Fixture, archived: &Archived, proxy: &Option<Proxy>, push: &str) {
    let object = &archived.object;
    assert_eq!(identity_of(object), archived.before, "{push}: the archived object was rewritten");
    assert_eq!(fs::read(object).unwrap(), archived.stored);
    assert_no_temp_files(object.parent().unwrap());
    assert_eq!(s.repo_files(), archived.files, "{push}: the repository changed");
    if let Some(proxy) = proxy {
        let writes = s.writes_to(proxy, &wal_key(SEG1));
        assert!(writes.is_empty(), "{push}: tried to write the object: {writes:?}");
    }
}

/// PostgreSQL archives a segment again after a crash between the copy and its bookkeeping: identical
/// content must be success, and the archived copy must not be rewritten; on S3 the push does not even
/// try to write it (a store that ignores conditional writes would otherwise be overwritten).
fn identical_repush_succeeds_without_rewriting(backend: Backend) {
    let mut s = Fixture::new(backend, "repush");
    let proxy = s.through_proxy();
    let (original, archived) = archive_first(&s, &Segment::new(SEG1));

    proxy.iter().for_each(|p| p.forget_seen());
    let out = s.push(SEG1);
    assert_ok(&out, "second push");
    assert!(out.stderr.contains(SEG1) && out.stderr.contains("already archived"), "{:?}", out.stderr);
    assert_untouched(&s, &archived, &proxy, "an identical re-push");
    s.assert_fetches(SEG1, &original);
}

/// Different content under an archived name is refused with both digests, so the operator can see
/// which copy is which, and the archive keeps the first, untouched (on S3: not even written to).
fn different_content_under_an_archived_name_is_a_conflict(backend: Backend) {
    let mut s = Fixture::new(backend, "conflict");
    let proxy = s.through_proxy();
    let (first, archived) = archive_first(&s, &Segment::new(SEG1).seed(1));

    let second = s.write_segment(&Segment::new(SEG1).seed(2));
    assert_ne!(first, second);
    proxy.iter().for_each(|p| p.forget_seen());
    let out = s.push(SEG1);
    assert_error(&out, 5, &[SEG1, "different content", &sha256_hex(&first), &sha256_hex(&second)]);
    assert_untouched(&s, &archived, &proxy, "a conflicting push");
    s.assert_fetches(SEG1, &first);
}

/// Recovery asks for files that do not exist as a matter of course: exit 1 only where the repository
/// proves it, and nothing, not even a temporary file, may appear where PostgreSQL looks, nor in the
/// repository.
fn missing_files_are_not_found_and_nothing_is_written(backend: Backend) {
    let s = Fixture::new(backend, "missing");
    // An empty repository is not a repository: absence proves nothing there.
    let identity = s.repo.location("repository.json");
    assert_error(&s.fetch(SEG1), 206, &[&identity, "not a walship repository"]);
    assert_absent(&s.destination());
    assert!(s.repo_files().is_empty(), "a fetch wrote to the repository: {:?}", s.repo_files());

    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(SEG1), "push");
    let wal_before = tree(&s.wal);
    let files = s.repo_files();
    for name in [SEG2, "00000002.history", "000000020000000000000001.partial"] {
        let out = s.fetch(name);
        assert_error(&out, 1, &[name, "not in the archive"]);
        assert_absent(&s.destination());
        assert_eq!(tree(&s.wal), wal_before, "fetch {name} changed pg_wal");
    }
    // Absent is absent on a standby too.
    s.become_standby();
    assert_error(&s.fetch(SEG2), 1, &[SEG2]);
    assert_absent(&s.destination());
    assert_eq!(tree(&s.wal), wal_before);
    assert_eq!(s.repo_files(), files, "fetches changed the repository");
}

/// A damaged object is never restored (207, or 1 on a standby), and a re-push of the same segment must
/// not call the damaged copy "identical", which would leave no good copy anywhere; a damaged history
/// file is not called identical either.
fn corrupt_objects_are_never_handed_over_or_called_identical(backend: Backend) {
    let s = Fixture::new(backend, "corrupt");
    let original = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(SEG1), "push");
    let object = s.object(SEG1);
    let stored = fs::read(&object).unwrap();
    let location = s.location(SEG1);
    let wal_before = tree(&s.wal);

    let mut flipped = stored.clone();
    flipped[stored.len() / 2] ^= 0x40;
    for (what, damaged) in [
        ("flipped byte", flipped),
        ("cut in half", stored[..stored.len() / 2].to_vec()),
        ("last byte cut", stored[..stored.len() - 1].to_vec()),
        ("empty", Vec::new()),
    ] {
        fs::write(&object, &damaged).unwrap();
        let out = s.fetch(SEG1);
        assert_error(&out, 207, &[&location, "corrupt"]);
        assert_absent(&s.destination());
        assert_eq!(tree(&s.wal), wal_before, "{what}: pg_wal changed");

        s.become_standby();
        assert_error(&s.fetch(SEG1), 1, &[&location, "corrupt"]);
        assert_absent(&s.destination());
        s.stop_being_standby();

        // The archive copy is damaged: "identical" would leave no good copy anywhere. On S3 too, where
        // the object's metadata still names the original digest.
        assert_error(&s.push(SEG1), 7, &[&location, "corrupt"]);
        assert_eq!(fs::read(&object).unwrap(), damaged, "{what}: the damaged object was replaced silently");
        assert_no_temp_files(object.parent().unwrap());
    }
    fs::write(&object, &stored).unwrap();
    s.assert_fetches(SEG1, &original);

    // History files are compared byte for byte with the archived copy, which must decode first.
    let name = segments::history_name(2);
    let history = segments::history_content(2, "no recovery target specified");
    s.write_wal_file(&name, history.as_bytes());
    assert_ok(&s.push(&name), "history push");
    let object = s.object(&name);
    let mut damaged = fs::read(&object).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    fs::write(&object, &damaged).unwrap();
    assert_error(&s.push(&name), 7, &[&s.location(&name), "corrupt"]);
    assert_error(&s.fetch(&name), 207, &[&s.location(&name), "corrupt"]);
    assert_absent(&s.destination());
    assert_eq!(fs::read(&object).unwrap(), damaged, "the damaged history object was replaced silently");
}

/// Timeline history files decide which timeline recovery follows: never overwritten, compared byte for
/// byte (even when the length matches), never written twice, and checked to be history files at all.
fn history_files_are_never_overwritten(backend: Backend) {
    let mut s = Fixture::new(backend, "history");
    let proxy = s.through_proxy();
    let name = segments::history_name(2);
    let first = segments::history_content(2, "no recovery target specified");
    s.write_wal_file(&name, first.as_bytes());
    assert_ok(&s.push(&name), "first push");
    let object = s.object(&name);
    let before = identity_of(&object);
    proxy.iter().for_each(|p| p.forget_seen());
    assert_ok(&s.push(&name), "identical push");
    assert_eq!(identity_of(&object), before);

    // Same length, different bytes: only a byte-for-byte comparison can tell.
    let second = segments::history_content(2, "no recovery target specifieD");
    assert_eq!(first.len(), second.len());
    s.write_wal_file(&name, second.as_bytes());
    assert_error(&s.push(&name), 5, &[&name, "different content"]);
    assert_eq!(identity_of(&object), before);
    assert!(s.repo_temp_files().is_empty(), "{:?}", s.repo_temp_files());
    if let Some(proxy) = &proxy {
        let writes = s.writes_to(proxy, &wal_key(&name));
        assert!(writes.is_empty(), "re-pushes of a history file tried to write it: {writes:?}");
        // Even when the existence check is fooled, the conditional write refuses and the bytes decide.
        let path = s.repo.request_path(&wal_key(&name));
        proxy.add(
            Rule::new(Fault::Respond(Response::s3_error(404, "Not Found", "NoSuchKey", "injected")))
                .when(move |r| r.method == "HEAD" && r.path() == path)
                .times(1),
        );
        assert_error(&s.push(&name), 5, &[&name, "different content"]);
        assert_eq!(identity_of(&object), before);
    }
    s.assert_fetches(&name, first.as_bytes());

    let file = format!("pg_wal/{name}");
    for (what, content) in [
        ("text", &b"hello world\n"[..]),
        ("binary", &b"\x00\x01\x02\xff"[..]),
        ("its own timeline as parent", &b"2\t0/3000148\tno recovery target specified\n"[..]),
    ] {
        s.write_wal_file(&name, content);
        assert_error(&s.push(&name), 4, &[&file, "not a timeline history file"]);
        assert_eq!(identity_of(&object), before, "{what}");
    }
    // A huge "history" file is refused before it is read.
    let name3 = segments::history_name(3);
    s.write_wal_file(&name3, &vec![b'#'; 2 << 20]);
    assert_error(&s.push(&name3), 4, &[&format!("pg_wal/{name3}"), "too large"]);
    assert_absent(&s.object(&name3));
    s.assert_fetches(&name, first.as_bytes());
}

/// The two other kinds of file PostgreSQL archives come back byte for byte, and PATH alone names the
/// file as in `wal-push %p`.
fn partial_segments_and_backup_labels_round_trip(backend: Backend) {
    let s = Fixture::new(backend, "kinds");
    let partial_name = format!("{SEG3}.partial");
    let partial = s.write_segment(&Segment::new(&partial_name));
    assert_ok(&s.push(&partial_name), "push .partial");
    assert!(s.object(&partial_name).is_file());
    s.assert_fetches(&partial_name, &partial);

    let (label_name, label) = segments::backup_label(1, 0x0200_0028, 16 << 20);
    assert_eq!(label_name, "000000010000000000000002.00000028.backup");
    s.write_wal_file(&label_name, label.as_bytes());
    assert_ok(&s.push(&label_name), "push .backup");
    assert!(s.object(&label_name).is_file());
    s.assert_fetches(&label_name, label.as_bytes());
    assert_ok(&s.push(&label_name), "identical .backup push");

    s.write_wal_file(&label_name, b"LABEL: not a backup history file\n");
    assert_error(&s.push(&label_name), 4, &[&format!("pg_wal/{label_name}"), "START WAL LOCATION"]);
    s.assert_fetches(&label_name, label.as_bytes());

    // Without NAME the name is PATH's file name, as in `wal-push %p`.
    let segment = s.write_segment(&Segment::new(SEG1));
    let out = s.run(&mut s.push_cmd_from(&s.data, None, &format!("pg_wal/{SEG1}"), None));
    assert_ok(&out, "push without NAME");
    s.assert_fetches(SEG1, &segment);
}

/// The identity record that later pushes are checked against is written by the first push, from the
/// segment's page header, and never rewritten.
fn the_first_push_records_the_cluster_identity(backend: Backend) {
    let s = Fixture::new(backend, "identity");
    let record_path = s.repo.object_file("repository.json");
    s.write_segment(&Segment::new(SEG1).segment_size(4 << 20));
    assert_absent(&record_path);
    assert_ok(&s.push(SEG1), "push");
    let bytes = fs::read(&record_path).unwrap();
    let record: serde_json::Value = serde_json::from_slice(&bytes).expect("repository.json is plain JSON");
    assert_eq!(record["format_version"], 1, "{record}");
    assert_eq!(record["system_identifier"], segments::DEFAULT_SYSTEM_IDENTIFIER.to_string(), "{record}");
    assert_eq!(record["pg_version"], 15, "{record}");
    assert_eq!(record["wal_segment_size"], 4 << 20, "{record}");
    assert!(record["created_by"].as_str().is_some_and(|c| c.starts_with("walship ")), "{record}");

    let before = identity_of(&record_path);
    s.write_segment(&Segment::new(SEG2).segment_size(4 << 20));
    assert_ok(&s.push(SEG2), "second push");
    assert_eq!(identity_of(&record_path), before, "the identity record was rewritten");
    assert_no_temp_files(record_path.parent().unwrap());
}

/// PostgreSQL may archive a segment again while an earlier attempt still runs (after a crash); two
/// pushes racing for one name must agree with the create-if-absent rule.
fn racing_pushes_of_one_name_agree(backend: Backend) {
    let s = Fixture::new(backend, "race");
    let segment = Segment::new(SEG1).segment_size(16 << 20).fill(Fill::Random);
    let ours = s.write_segment(&segment);
    let push_from = |file: &str, name: &str| spawn(&mut s.push_cmd_from(&s.data, None, file, Some(name)));
    let both = [push_from(&format!("pg_wal/{SEG1}"), SEG1), push_from(&format!("pg_wal/{SEG1}"), SEG1)];
    for out in both.map(|r| s.finish(r, HANG_MARGIN * 2)) {
        assert_ok(&out, "racing identical push");
    }
    s.assert_fetches(SEG1, &ours);
    assert_no_temp_files(s.object(SEG1).parent().unwrap());

    let other_dir = s.scratch.mkdir("pgdata/other");
    let a = s.write_segment(&segment.clone().seed(1).name_as(SEG2));
    let b = segment.clone().seed(2).name_as(SEG2).bytes();
    segments::write_file(&other_dir.join(SEG2), &b);
    let racers = [push_from(&format!("pg_wal/{SEG2}"), SEG2), push_from(&format!("other/{SEG2}"), SEG2)];
    let [first, second] = racers.map(|r| s.finish(r, HANG_MARGIN * 2));
    let (archived, won, lost) = if first.code == Some(0) { (&a, &first, &second) } else { (&b, &second, &first) };
    assert_ok(won, "one of two racing pushes wins");
    assert_error(lost, 5, &[SEG2, "different content"]);
    s.assert_fetches(SEG2, archived);
    assert_no_temp_files(s.object(SEG2).parent().unwrap());
}

/// Two servers archiving one name at the same moment (a split brain, a promoted standby racing its old
/// primary): with identical content both succeed; with different content exactly one wins, the other
/// is refused (5), and the archive holds the winner's bytes, whole.
fn racing_pushes_of_one_name_never_overwrite(backend: Backend) {
    let s = Fixture::new(backend, "race-servers");
    // Data directories of two servers, each with its own copy of the segment.
    let other = s.standby_data();
    fs::remove_file(other.join("standby.signal")).unwrap();
    let file = format!("pg_wal/{SEG1}");
    let push_from = |data: &Path| spawn(&mut s.push_cmd_from(data, None, &file, Some(SEG1)));
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
        let stored = s.fetch(SEG1);
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

/// When a kill lands during a push.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// A fixed delay after the spawn.
    After(Duration),
    /// As soon as the upload under way holds at least this many bytes on the store: a hidden
    /// temporary file in the shard directory (local disk, SSH), the stored parts of a multipart
    /// upload (S3).
    UploadHolds(u64),
    /// As soon as the final object exists.
    Published,
}

/// How many bytes the unfinished upload into `shard` holds so far, if one is under way.
fn upload_bytes(s: &Fixture, shard: &Path) -> Option<u64> {
    let sizes: Vec<u64> = match s.repo.s3_server() {
        Some(server) => server
            .stored_parts()
            .iter()
            .filter_map(|part| fs::metadata(server.data_dir().join(part)).ok())
            .map(|m| m.len())
            .collect(),
        None => temp_files(shard).iter().filter_map(|t| fs::metadata(shard.join(t)).ok()).map(|m| m.len()).collect(),
    };
    if sizes.is_empty() {
        return None;
    }
    Some(if s.backend() == Backend::S3 { sizes.iter().sum() } else { sizes.into_iter().max().unwrap() })
}

/// PostgreSQL's archiver, the OOM killer or a power cut can end a push at any instant. Whatever was
/// interrupted, the final name is absent or complete and valid, leftovers are hidden and never
/// served, and the next push finishes the job.
fn kill_9_during_push_leaves_nothing_half_done(backend: Backend) {
    let s = Fixture::new(backend, "kill");
    // Incompressible and large, so that a push spends long enough writing to be caught at it.
    let segment = Segment::new(SEG1).segment_size(64 << 20).fill(Fill::Random);
    let source = s.write_segment(&segment);
    let object = s.object(SEG1);
    let shard = object.parent().unwrap().to_owned();

    let mut points: Vec<KillPoint> =
        [0u64, 10, 40, 80, 120, 180].map(|ms| KillPoint::After(Duration::from_millis(ms))).to_vec();
    points.extend([0u64, 1 << 20, 32 << 20, 60 << 20].map(KillPoint::UploadHolds));
    points.push(KillPoint::Published);

    let (mut caught_writing, mut caught_published) = (false, false);
    for point in points {
        // A fresh repository each time, so that every push really writes.
        s.repo.wipe();
        let mut child = spawn(&mut s.push_cmd(None, SEG1));
        let pid = child.id();
        let started = Instant::now();
        let due = || match point {
            KillPoint::After(delay) => started.elapsed() >= delay,
            KillPoint::UploadHolds(min_len) => upload_bytes(&s, &shard).is_some_and(|len| len >= min_len),
            KillPoint::Published => object.exists(),
        };
        // Bounded: a push of 64 MiB takes well under a second; a minute means it hangs.
        let fired = child.wait_for(Duration::from_secs(60), due);
        let exited = !fired && child.has_exited();
        let status = child.kill();
        assert!(fired || exited, "{point:?}: wal-push neither finished nor reached the kill point in a minute");
        match point {
            KillPoint::UploadHolds(_) if fired => caught_writing = true,
            KillPoint::Published if fired => caught_published = true,
            _ => {}
        }
        eprintln!("kill {point:?}: fired {fired}, {status}, object published {}", object.exists());
        check_after_interrupted_push(&s, &source, pid, &format!("{point:?}"));
    }
    assert!(caught_writing, "no kill landed while the upload was being written");
    assert!(caught_published, "the kill at publication never fired");
}

/// After a push was killed: the object is absent or complete, leftovers are only the killed process's
/// hidden temporary files and are never served, and pushing again completes the job.
fn check_after_interrupted_push(s: &Fixture, source: &[u8], killed_pid: u32, when: &str) {
    let object = s.object(SEG1);
    let marker = format!(".{killed_pid}.");
    for dir in [s.repo.object_file(""), object.parent().unwrap().to_owned()] {
        for temp in temp_files(&dir) {
            assert!(temp.contains(&marker), "kill {when}: {temp} in {dir:?} is not the killed push's");
        }
    }
    // On SSH the killed push's client goes with its connection.
    s.assert_no_clients_left();
    let out = s.fetch(SEG1);
    if object.exists() {
        assert_ok(&out, &format!("kill {when}: fetch of the published object"));
        let restored = fs::read(s.destination()).unwrap();
        assert!(restored == source, "kill {when}: the published object is not the source");
        fs::remove_file(s.destination()).unwrap();
    } else {
        // Without an identity record the repository cannot vouch that the file is absent.
        let expected = if s.repo.object_file("repository.json").exists() { 1 } else { 206 };
        assert_eq!(out.code, Some(expected), "kill {when}: fetch of an unpublished object: {out:#?}");
        assert_one_line(&out);
        assert_absent(&s.destination());
    }
    assert_no_temp_files(&s.wal);

    assert_ok(&s.push(SEG1), &format!("kill {when}: the next push"));
    let restored_out = s.fetch(SEG1);
    assert_ok(&restored_out, &format!("kill {when}: fetch after the next push"));
    let restored = fs::read(s.destination()).unwrap();
    assert!(restored == source, "kill {when}: the archived object is not the source");
    fs::remove_file(s.destination()).unwrap();
}

/// A killed push leaves a hidden temporary file: it is never served, and a later push into the same
/// directory sweeps it once it is old, but never one that may belong to a live push.
fn stale_temporary_files_are_ignored_and_swept_fresh_ones_kept(backend: Backend) {
    let s = Fixture::new(backend, "stale");
    s.write_segment(&Segment::new(SEG3));
    assert_ok(&s.push(SEG3), "push");
    let shard = s.object(SEG3).parent().unwrap().to_owned();

    // A dead push's temporary file of segment 2, complete and valid as an object.
    let encoded = s.repo.encode_object(&Segment::new(SEG2).bytes());
    let stale = [shard.join(format!(".{SEG2}.123.1.tmp")), shard.join(".x.123.1.tmp")];
    let fresh = shard.join(format!(".{SEG2}.456.2.tmp"));
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    for path in &stale {
        segments::write_file(path, &encoded);
        File::options().write(true).open(path).unwrap().set_modified(two_hours_ago).unwrap();
    }
    segments::write_file(&fresh, &encoded);

    assert_error(&s.fetch(SEG2), 1, &[SEG2, "not in the archive"]);
    assert_absent(&s.destination());
    // A temporary name is not a WAL name, so it cannot be asked for either.
    assert_error(&s.fetch(&format!(".{SEG2}.123.1.tmp")), 204, &["is none of: a segment"]);

    let segment = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(SEG1), "push into the shard");
    for path in &stale {
        assert_absent(path);
    }
    assert!(fresh.exists(), "a fresh temporary file (maybe a live push's) was removed");
    s.assert_fetches(SEG1, &segment);
    assert_error(&s.fetch(SEG2), 1, &[SEG2]);
}

// ---------------------------------------------------------------------------------------------------
// Local disk only: file permissions, full file systems, the repository's own directory, the
// configuration sources and the command line.
// ---------------------------------------------------------------------------------------------------

/// The directory of a local fixture's repository.
fn repo_dir(s: &Fixture) -> PathBuf {
    s.repo.local_dir().expect("a repository on local disk").to_owned()
}

#[track_caller]
fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root: {why}");
}

/// A tmpfs mounted over a directory for the life of the value; unmounted on drop, panics included.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        require_root("it mounts a small tmpfs to fill it up");
        let (uid, gid) = server_user().expect("root runs the binaries as the server user");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700,uid={uid},gid={gid}"), "walship-test"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs on {dir:?} failed");
        Tmpfs { dir: dir.to_owned() }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds it open (a killed child's file); detach it rather than leak it.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Fills the file system holding `dir` until it refuses more.
fn fill_up(dir: &Path) {
    let path = dir.join("filler");
    let mut file = File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    // A 2 MiB tmpfs takes at most 32 chunks; the bound only guards against a mount that did not happen.
    for _ in 0..1024 {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {dir:?}: {e}");
            return;
        }
    }
    panic!("{dir:?} never filled up: is the tmpfs mounted?");
}

/// A destination that cannot be written, or a source that cannot be read, is a failure of its own
/// (9, 209 for wal-fetch), never "not found".
#[test]
fn local_file_failures_exit_9_and_never_read_as_absence() {
    let s = Fixture::new(Backend::Local, "local");
    let segment = s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(SEG1), "push");
    let occupied = s.scratch.mkdir("pgdata/occupied");
    let data_before = tree(&s.data);
    let fetch_to = |path: &str| walship_tests::wal_fetch(&repo_dir(&s), &s.data, SEG1, path);
    assert_error(&fetch_to("no-such-dir/RECOVERYXLOG"), 209, &["no-such-dir/RECOVERYXLOG", "No such file"]);
    // The verified file cannot be renamed over a directory; its temporary copy must go.
    assert_error(&fetch_to("occupied"), 209, &["occupied", "rename into place"]);
    assert_eq!(tree(&s.data), data_before, "a failed fetch left files in the data directory");
    s.become_standby();
    assert_error(&fetch_to("no-such-dir/RECOVERYXLOG"), 1, &["no-such-dir/RECOVERYXLOG"]);
    s.stop_being_standby();
    assert!(occupied.is_dir());

    // The server user cannot read the file to archive (the binaries run as that user).
    let file = s.wal.join(SEG2);
    s.write_segment(&Segment::new(SEG2));
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
    let out = s.push(SEG2);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    assert_error(&out, 9, &[&format!("pg_wal/{SEG2}"), "Permission denied"]);
    assert_absent(&s.object(SEG2));
    s.assert_fetches(SEG1, &segment);
}

/// A name is turned into a path inside the repository, so anything but a bare WAL file name must be
/// refused before a single file is created, inside or outside the repository.
#[test]
fn names_with_paths_or_bad_forms_are_refused_and_touch_nothing() {
    let s = Fixture::new(Backend::Local, "names");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(SEG1), "push");
    let escape = format!("walship-escape-{}", std::process::id());
    let everything_before = tree(s.scratch.path());
    let separator = "contains a path separator";
    let form = "is none of: a segment";
    for (name, cause) in [
        ("../../x".to_owned(), separator),
        (format!("../../{escape}"), separator),
        (format!("../{SEG1}"), separator),
        ("a/b".to_owned(), separator),
        (format!("pg_wal/{SEG2}"), separator),
        (format!("..\\{SEG2}"), separator),
        ("..".to_owned(), form),
        ("RECOVERYXLOG".to_owned(), form),
        (format!("{SEG2}.ready"), form),
        ("00000001000000000000000g".to_owned(), form),
        ("000000000000000000000002".to_owned(), "timeline 0"),
        (String::new(), "the name is empty"),
    ] {
        let out = s.push_as(SEG1, &name);
        assert_error(&out, 4, &[&name, cause]);
        assert_eq!(tree(s.scratch.path()), everything_before, "wal-push with name {name:?} changed files");
    }
    for dir in [s.scratch.path().parent().unwrap(), s.scratch.path(), &repo_dir(&s)] {
        assert_absent(&dir.join(&escape));
    }

    for (name, cause) in
        [(format!("../{SEG1}"), separator), ("a/b".to_owned(), separator), ("RECOVERYXLOG".to_owned(), form)]
    {
        let out = s.fetch(&name);
        assert_error(&out, 204, &[&name, cause]);
        assert_absent(&s.destination());
        assert_eq!(tree(s.scratch.path()), everything_before, "wal-fetch {name:?} changed files");
    }
    s.become_standby();
    assert_error(&s.fetch(&format!("../{SEG1}")), 1, &[separator]);
    assert_absent(&s.destination());
}

/// A file handed over under a segment name must be a WAL segment; anything else is refused before the
/// repository is touched (not even its identity record is created).
#[test]
fn files_that_are_not_wal_are_refused() {
    let s = Fixture::new(Backend::Local, "not-wal");
    let size = segments::MIN_SEGMENT_SIZE as usize;
    let random = Segment::new(SEG1).fill(Fill::Random).bytes()[100..].to_vec();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("text", "hello, this is not WAL\n".repeat(size / 23 + 1).into_bytes()[..size].to_vec(), "page magic"),
        ("random", [&random[..], &random[..100]].concat(), "page magic"),
        ("short", Segment::new(SEG1).bytes()[..30].to_vec(), "too short"),
        ("empty", Vec::new(), "too short"),
        ("zeros", vec![0u8; size], "page magic"),
    ];
    for (what, bytes, cause) in cases {
        s.write_wal_file(SEG1, &bytes);
        let out = s.push(SEG1);
        assert_error(&out, 4, &[&format!("pg_wal/{SEG1}"), cause]);
        assert!(tree(&repo_dir(&s)).is_empty(), "{what}: the repository was written to");
    }

    fs::remove_file(s.wal.join(SEG1)).unwrap();
    s.scratch.mkdir(&format!("pgdata/pg_wal/{SEG1}"));
    assert_error(&s.push(SEG1), 4, &[&format!("pg_wal/{SEG1}"), "not a regular file"]);
    fs::remove_dir(s.wal.join(SEG1)).unwrap();
    // A missing source is a local file problem, not bad input.
    assert_error(&s.push(SEG1), 9, &[&format!("pg_wal/{SEG1}"), "No such file"]);
    assert!(tree(&repo_dir(&s)).is_empty());
}

/// A real segment under the wrong name, or one of the wrong length, would poison recovery later;
/// the page header says which segment a file is and how long it must be.
#[test]
fn segments_that_do_not_match_their_name_or_size_are_refused() {
    let s = Fixture::new(Backend::Local, "mismatch");
    let file = format!("pg_wal/{SEG1}");
    // Segment 1's bytes offered as segment 2: 1 MiB segments start 0x100000 bytes apart.
    s.write_segment(&Segment::new(SEG1));
    assert_error(&s.push_as(SEG1, SEG2), 4, &[&file, "0/100000", "0/200000"]);
    // Another timeline's name does not matter to the address, but a later page timeline does.
    let later = Segment::new("000000030000000000000001").bytes();
    s.write_wal_file(SEG1, &later);
    assert_error(&s.push(SEG1), 4, &[&file, "timeline 3"]);

    let full = Segment::new(SEG1).bytes();
    for (what, bytes) in [
        ("truncated", full[..full.len() / 2].to_vec()),
        ("one byte short", full[..full.len() - 1].to_vec()),
        ("extended", [&full[..], &[0u8; 8192][..]].concat()),
    ] {
        s.write_wal_file(SEG1, &bytes);
        let out = s.push(SEG1);
        assert_error(&out, 4, &[&file, "differs from the segment size"]);
        assert!(tree(&repo_dir(&s)).is_empty(), "{what}: the repository was written to");
    }
    // 1 MiB segments number 0 to 0xFFF within a log; 0x1000 cannot come from this cluster.
    let out_of_range = "000000010000000000001000";
    s.write_segment(&Segment::new(out_of_range));
    assert_error(&s.push(out_of_range), 4, &[out_of_range, "out of range"]);
    assert!(tree(&repo_dir(&s)).is_empty());
}

/// A full repository file system fails the push with the object named and leaves no partial object
/// and no temporary file eating the little space there is.
#[test]
fn a_full_repository_disk_fails_cleanly() {
    require_root("it mounts a small tmpfs to fill it up");
    let s = Fixture::new(Backend::Local, "full-repo");
    let _mount = Tmpfs::mount(&repo_dir(&s), "2M");
    s.write_segment(&Segment::new(SEG1).segment_size(16 << 20).fill(Fill::Random));
    let object = s.object(SEG1);
    let out = s.push(SEG1);
    assert_error(&out, 8, &["No space left", &object.display().to_string()]);
    assert_absent(&object);
    assert_no_temp_files(object.parent().unwrap());
    assert_no_temp_files(&repo_dir(&s));

    // The failed write gave its space back: a compressible segment of the same cluster now fits.
    let fits = s.write_segment(&Segment::new(SEG2).segment_size(16 << 20));
    assert_ok(&s.push(SEG2), "push after the failure");
    s.assert_fetches(SEG2, &fits);
}

/// A full pg_wal fails the restore (209, never 1) and leaves nothing partial where PostgreSQL looks.
#[test]
fn a_full_destination_disk_fails_cleanly() {
    require_root("it mounts a small tmpfs to fill it up");
    let s = Fixture::new(Backend::Local, "full-dest");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(SEG1), "push");
    let restore = s.scratch.mkdir("pgdata/restore");
    let _mount = Tmpfs::mount(&restore, "2M");
    fill_up(&restore);
    let before = tree(&restore);

    let fetch = || walship_tests::wal_fetch(&repo_dir(&s), &s.data, SEG1, "restore/RECOVERYXLOG");
    assert_error(&fetch(), 209, &["restore/RECOVERYXLOG", "No space left"]);
    assert_absent(&restore.join("RECOVERYXLOG"));
    assert_eq!(tree(&restore), before, "the full file system gained or lost files");
    s.become_standby();
    assert_error(&fetch(), 1, &["restore/RECOVERYXLOG", "No space left"]);
    assert_absent(&restore.join("RECOVERYXLOG"));
    assert_eq!(tree(&restore), before);
}

/// A repository the server user cannot read is a storage failure: above all, a file in it is never
/// reported absent, which would end a point-in-time recovery early.
#[test]
fn an_unreadable_repository_is_a_storage_error_never_absence() {
    let s = Fixture::new(Backend::Local, "denied");
    s.write_segment(&Segment::new(SEG1));
    s.write_segment(&Segment::new(SEG2));
    s.write_segment(&Segment::new("000000010000000100000001"));
    assert_ok(&s.push(SEG1), "push");
    let repo = repo_dir(&s).display().to_string();

    fs::set_permissions(repo_dir(&s), fs::Permissions::from_mode(0o000)).unwrap();
    let push = s.push(SEG2);
    let fetch_archived = s.fetch(SEG1);
    let fetch_missing = s.fetch(SEG3);
    s.become_standby();
    let fetch_standby = s.fetch(SEG3);
    s.stop_being_standby();
    fs::set_permissions(repo_dir(&s), fs::Permissions::from_mode(0o700)).unwrap();
    assert_error(&push, 8, &[&repo, "Permission denied"]);
    assert_error(&fetch_archived, 208, &[&repo, "Permission denied"]);
    assert_error(&fetch_missing, 208, &[&repo, "Permission denied"]);
    assert_error(&fetch_standby, 1, &[&repo, "Permission denied"]);
    assert_absent(&s.destination());
    assert_no_temp_files(&s.wal);

    // Only the shard directory unreadable: the root still answers, the shard must not read as empty.
    let shard = s.object(SEG1).parent().unwrap().to_owned();
    let shard_name = shard.display().to_string();
    fs::set_permissions(&shard, fs::Permissions::from_mode(0o000)).unwrap();
    let push = s.push(SEG2);
    let fetch_missing = s.fetch(SEG3);
    let other_shard = s.push("000000010000000100000001");
    fs::set_permissions(&shard, fs::Permissions::from_mode(0o755)).unwrap();
    assert_error(&push, 8, &[&shard_name, "Permission denied"]);
    assert_error(&fetch_missing, 208, &[&shard_name, "Permission denied"]);
    assert_ok(&other_shard, "push into another shard");
    assert_absent(&s.object(SEG2));
    assert_no_temp_files(&shard);
    assert_absent(&s.destination());
}

/// Two clusters archiving to one place by mistake must be caught at the first segment of the second.
#[test]
fn segments_of_another_cluster_are_refused() {
    let s = Fixture::new(Backend::Local, "cluster");
    s.write_segment(&Segment::new(SEG1));
    assert_ok(&s.push(SEG1), "push");
    let ours = segments::DEFAULT_SYSTEM_IDENTIFIER.to_string();
    let theirs = OTHER_SYSTEM_IDENTIFIER.to_string();
    let repo_before = tree(&repo_dir(&s));
    // Checked last, so that every other expectation is proven even while this one fails.
    let mut unnamed_files = Vec::new();
    let mut check_names_file = |out: &Output, file: &str| {
        if !out.stderr.contains(file) {
            unnamed_files.push(format!("{file}: {:?}", out.stderr));
        }
    };

    s.write_segment(&Segment::new(SEG2).system_identifier(OTHER_SYSTEM_IDENTIFIER));
    let out = s.push(SEG2);
    assert_error(&out, 6, &[&ours, &theirs, "another cluster"]);
    check_names_file(&out, SEG2);
    s.write_segment(&Segment::new(SEG2).segment_size(2 << 20));
    let out = s.push(SEG2);
    assert_error(&out, 6, &[&format!("{}-byte", 2 << 20), &format!("{}-byte", 1 << 20)]);
    check_names_file(&out, SEG2);
    assert_eq!(tree(&repo_dir(&s)), repo_before, "a refused push changed the repository");

    // History files carry no identifier; the data directory's pg_control (the first 8 bytes are the
    // system identifier) does.
    let name = segments::history_name(2);
    s.write_wal_file(&name, segments::history_content(2, "promoted").as_bytes());
    s.scratch.mkdir("pgdata/global");
    let mut control = vec![0u8; 8192];
    control[..8].copy_from_slice(&OTHER_SYSTEM_IDENTIFIER.to_le_bytes());
    segments::write_file(&s.data.join("global/pg_control"), &control);
    let out = s.push(&name);
    assert_error(&out, 6, &[&ours, &theirs]);
    check_names_file(&out, &name);
    assert_eq!(tree(&repo_dir(&s)), repo_before);
    control[..8].copy_from_slice(&segments::DEFAULT_SYSTEM_IDENTIFIER.to_le_bytes());
    segments::write_file(&s.data.join("global/pg_control"), &control);
    assert_ok(&s.push(&name), "history push from the right cluster");

    assert!(
        unnamed_files.is_empty(),
        "a wrong-cluster error must name the refused file, as every other error does:\n{}",
        unnamed_files.join("\n")
    );
}

/// An empty directory (an unmounted file system, a wrong path) proves nothing about absence, and a
/// repository directory that is missing or a file is a storage failure.
#[test]
fn a_directory_that_is_not_a_repository_never_reads_as_absence() {
    let s = Fixture::new(Backend::Local, "not-repo");
    let identity = repo_dir(&s).join("repository.json").display().to_string();
    for name in [SEG1, "00000002.history"] {
        assert_error(&s.fetch(name), 206, &[&identity, "not a walship repository"]);
        assert_absent(&s.destination());
    }
    s.become_standby();
    assert_error(&s.fetch(SEG1), 1, &["not a walship repository"]);
    s.stop_being_standby();

    s.write_segment(&Segment::new(SEG1));
    let missing = s.scratch.path().join("no-such-repo");
    let missing_name = missing.display().to_string();
    let push = walship_tests::wal_push(&missing, &s.data, format!("pg_wal/{SEG1}"), SEG1);
    assert_error(&push, 8, &[&missing_name, "does not exist"]);
    let fetch = walship_tests::wal_fetch(&missing, &s.data, SEG1, RECOVERYXLOG);
    assert_error(&fetch, 208, &[&missing_name, "does not exist"]);
    assert_absent(&missing);

    let file = s.scratch.path().join("a-file");
    segments::write_file(&file, b"x");
    let file_name = file.display().to_string();
    let push = walship_tests::wal_push(&file, &s.data, format!("pg_wal/{SEG1}"), SEG1);
    assert_error(&push, 8, &[&file_name, "not a directory"]);
    let fetch = walship_tests::wal_fetch(&file, &s.data, SEG1, RECOVERYXLOG);
    assert_error(&fetch, 208, &[&file_name, "not a directory"]);

    // A damaged identity record is another repository problem, not absence.
    segments::write_file(&repo_dir(&s).join("repository.json"), b"{ not json");
    assert_error(&s.fetch(SEG2), 206, &[&identity, "identity record"]);
    assert_error(&s.push(SEG1), 6, &[&identity, "identity record"]);
    assert_absent(&s.destination());
}

/// Where the repository comes from (flag over environment over file), and the configuration mistakes
/// that must stop a command rather than archive somewhere unexpected.
#[test]
fn configuration_sources_and_errors() {
    let s = Fixture::new(Backend::Local, "config");
    let segment = s.write_segment(&Segment::new(SEG1));
    let write_config = |name: &str, text: &str| -> PathBuf {
        let path = s.scratch.path().join(name);
        segments::write_file(&path, text.as_bytes());
        path
    };
    let push = |configure: &dyn Fn(&mut Command)| {
        let mut cmd = walship("wal-push");
        cmd.current_dir(&s.data);
        configure(&mut cmd);
        run(cmd.arg(format!("pg_wal/{SEG1}")).arg(SEG1))
    };
    let fetch = |configure: &dyn Fn(&mut Command)| {
        let mut cmd = walship("wal-fetch");
        cmd.current_dir(&s.data);
        configure(&mut cmd);
        run(cmd.arg(SEG1).arg(RECOVERYXLOG))
    };
    let repo = repo_dir(&s).display().to_string();

    let typo = write_config("typo.toml", &format!("repo = '{repo}'\ncompresion_level = 5\n"));
    let typo_at = format!("{}:2", typo.display());
    assert_error(&push(&|c| _ = c.arg("--config").arg(&typo)), 3, &["compresion_level", &typo_at]);
    assert_error(&fetch(&|c| _ = c.arg("--config").arg(&typo)), 203, &["compresion_level", &typo_at]);
    assert_error(&push(&|c| _ = c.env("WALSHIP_CONFIG", &typo)), 3, &["compresion_level", &typo_at]);
    let bad_level = write_config("level.toml", &format!("repo = '{repo}'\ncompression_level = 40\n"));
    assert_error(&push(&|c| _ = c.arg("--config").arg(&bad_level)), 3, &["compression_level", "out of range"]);
    let missing = s.scratch.path().join("missing.toml");
    let missing_name = missing.display().to_string();
    assert_error(&push(&|c| _ = c.env("WALSHIP_CONFIG", &missing)), 3, &[&missing_name, "WALSHIP_CONFIG"]);

    assert!(!Path::new("/etc/walship/walship.toml").exists(), "a system configuration file would change these tests");
    assert_error(&push(&|_| {}), 3, &["no repository configured"]);
    assert_error(&fetch(&|_| {}), 203, &["no repository configured"]);
    for relative in ["repo", "file://repo", "./repo"] {
        assert_error(&push(&|c| _ = c.arg("--repo").arg(relative)), 3, &["--repo", "not absolute"]);
        assert_error(&fetch(&|c| _ = c.arg("--repo").arg(relative)), 203, &["not absolute"]);
    }
    let relative = write_config("relative.toml", "repo = 'archive/wal'\n");
    assert_error(
        &push(&|c| _ = c.arg("--config").arg(&relative)),
        3,
        &[&relative.display().to_string(), "not absolute"],
    );
    assert_error(&push(&|c| _ = c.env("WALSHIP_REPO", "relative/repo")), 3, &["WALSHIP_REPO", "not absolute"]);
    assert!(tree(&repo_dir(&s)).is_empty() && tree(&s.data).len() == 2, "a refused configuration wrote files");

    let good =
        write_config("good.toml", &format!("repo = 'file://{repo}'\ncompression_level = 3\ndeadline_secs = 30\n"));
    assert_ok(&push(&|c| _ = c.env("WALSHIP_CONFIG", &good)), "push with WALSHIP_CONFIG");
    s.assert_fetches(SEG1, &segment);
    assert_ok(&fetch(&|c| _ = c.env("WALSHIP_REPO", repo_dir(&s))), "fetch with WALSHIP_REPO");
    fs::remove_file(s.destination()).unwrap();

    // --repo beats WALSHIP_REPO and the file: both point at a directory that does not exist.
    let nowhere = s.scratch.path().join("nowhere");
    let nowhere_config = write_config("nowhere.toml", &format!("repo = '{}'\n", nowhere.display()));
    let seg2 = s.write_segment(&Segment::new(SEG2));
    let out = run(walship("wal-push")
        .current_dir(&s.data)
        .env("WALSHIP_REPO", &nowhere)
        .env("WALSHIP_CONFIG", &nowhere_config)
        .arg("--repo")
        .arg(repo_dir(&s))
        .arg(format!("pg_wal/{SEG2}")));
    assert_ok(&out, "--repo over WALSHIP_REPO");
    s.assert_fetches(SEG2, &seg2);
    // WALSHIP_REPO beats the file.
    let out = run(walship("wal-fetch")
        .current_dir(&s.data)
        .env("WALSHIP_REPO", repo_dir(&s))
        .env("WALSHIP_CONFIG", &nowhere_config)
        .arg(SEG2)
        .arg(RECOVERYXLOG));
    assert_ok(&out, "WALSHIP_REPO over the file");
    fs::remove_file(s.destination()).unwrap();
    let out = fetch(&|c| _ = c.env("WALSHIP_CONFIG", &nowhere_config));
    assert_error(&out, 208, &[&nowhere.display().to_string(), "does not exist"]);
    assert_absent(&nowhere);
    assert_absent(&s.destination());
}

/// Argument errors are exit 2 (202 for wal-fetch so a recovery stops, 1 on a standby), and the help
/// text documents the exit codes and how PostgreSQL calls each command.
#[test]
fn usage_help_and_version() {
    let s = Fixture::new(Backend::Local, "usage");
    let in_data = |name: &str, args: &[&str]| run(walship(name).current_dir(&s.data).args(args));
    assert_error(&in_data("wal-push", &[]), 2, &["wal-push", "--help"]);
    assert_error(&in_data("wal-push", &["a", "b", "c"]), 2, &["wal-push"]);
    assert_error(&in_data("wal-push", &["--frobnicate", "a"]), 2, &["--frobnicate"]);
    assert_error(&in_data("wal-fetch", &[]), 202, &["wal-fetch", "--help"]);
    assert_error(&in_data("wal-fetch", &[SEG1]), 202, &["wal-fetch"]);
    s.become_standby();
    assert_error(&in_data("wal-fetch", &[]), 1, &["wal-fetch"]);
    s.stop_being_standby();

    for (name, placeholders) in [("wal-push", "%p %f"), ("wal-fetch", "%f %p")] {
        let help = in_data(name, &["--help"]);
        assert_eq!(help.code, Some(0), "{help:#?}");
        for needle in
            [placeholders, "Exit codes", "202-214", "standby.signal", "WALSHIP_REPO", "--config", "[encryption]"]
        {
            assert!(help.stdout.contains(needle), "{name} --help should mention {needle:?}:\n{}", help.stdout);
        }
        for code in 0..=9 {
            assert!(help.stdout.contains(&format!("\n  {code}  ")), "{name} --help lacks exit code {code}");
        }
        for code in 10..=14 {
            assert!(help.stdout.contains(&format!("\n {code}  ")), "{name} --help lacks exit code {code}");
        }
        let version = in_data(name, &["--version"]);
        assert_eq!(version.code, Some(0), "{version:#?}");
        assert_eq!(version.stdout.trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
}
