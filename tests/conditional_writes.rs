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

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use walship::storage::{PutOptions, StorageError};
use walship_tests::Scratch;
use walship_tests::proxy::{Fault, Proxy, Request, Response, Rule, Seen};
use walship_tests::repository::{Backend, ConfigLines, Repository, Store};
use walship_tests::segments::{Fill, Segment};

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
