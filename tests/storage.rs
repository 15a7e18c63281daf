//! The `walship::storage::Storage` trait itself, called in this process on every backend (local
//! disk, S3 on s3s-fs, SSH on a real sshd) without PostgreSQL and without the binaries: the promises
//! that the module documentation of `crates/walship/src/storage/mod.rs` makes and every layer above
//! relies on. Create is create-if-absent and nothing is visible before the commit; a large object
//! streams; listing pages through more keys than a page holds, in key order; delete removes; and
//! "absent" is only ever said of a key that is absent, never of a store that cannot be read.
//!
//! For expiry: a batch delete takes absent keys for deleted ones, crosses S3's 1,000-key batch, and
//! removes the directories it emptied but never the layout; housekeeping removes old temporary files
//! and old multipart uploads, and never a young one. On S3 a proxy shows the requests: DeleteObjects
//! batches, the fallback to single deletes on a store without DeleteObjects, a paginated upload
//! listing.
//!
//! Each body runs on every backend through `every_backend!`; the store is opened through
//! `Repository::open_storage`, the one place that knows how the library builds a store.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use walship::storage::{Housekeeping, PutOptions, StorageError};
use walship_tests::Scratch;
use walship_tests::proxy::{Fault, Proxy, Response, Rule};
use walship_tests::repository::{Backend, ConfigLines, Repository, Store};
use walship_tests::segments;

walship_tests::every_backend!(
    create_is_if_absent_and_invisible_until_committed,
    get_streams_a_multi_mib_object,
    list_pages_through_more_keys_than_a_page,
    delete_removes_the_object,
    absent_is_only_said_of_absent_keys,
    delete_many_takes_absent_keys_and_prunes_what_it_emptied,
    remove_stale_takes_old_leftovers_only,
    listed_and_headed_objects_carry_their_time,
);

walship_tests::some_backends!([s3] delete_many_batches_and_falls_back_to_single_deletes, remove_stale_pages_through_uploads);
walship_tests::some_backends!([local, ssh] a_write_survives_an_expiry_removing_its_directory);

/// A repository of kind `backend` in `store`, and the store opened on it.
fn open(backend: Backend, store: &Scratch) -> (Repository, Store) {
    let repo = Repository::new(backend, store);
    let opened = repo.open_storage();
    opened.run(opened.storage().check_root()).unwrap_or_else(|e| panic!("check_root: {e}"));
    (repo, opened)
}

/// Writes `bytes` under `key` in chunks of `chunk` bytes and commits.
fn put(store: &Store, key: &str, bytes: &[u8], chunk: usize) -> Result<(), StorageError> {
    let storage = store.storage();
    store.run(async {
        let mut writer = storage.create(key, PutOptions::default()).await?;
        for piece in bytes.chunks(chunk) {
            writer.write(Bytes::copy_from_slice(piece)).await?;
        }
        writer.commit().await
    })
}

/// Reads `key` to its end; returns the bytes and how many reads it took.
fn get(store: &Store, key: &str) -> Result<(Vec<u8>, usize), StorageError> {
    let storage = store.storage();
    store.run(async {
        let mut reader = storage.get(key).await?;
        let (mut bytes, mut reads) = (Vec::new(), 0);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buffer).await.map_err(|e| StorageError::io(key, "read", e))?;
            if n == 0 {
                return Ok((bytes, reads));
            }
            reads += 1;
            bytes.extend_from_slice(&buffer[..n]);
        }
    })
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(result: Result<T, StorageError>, what: &str) {
    match result {
        Err(StorageError::NotFound { .. }) => {}
        other => panic!("{what}: should be NotFound, got {other:?}"),
    }
}

/// An error, and not "absent": the store could not say.
#[track_caller]
fn assert_error_not_absence<T: std::fmt::Debug>(result: Result<T, StorageError>, what: &str) {
    match result {
        Err(e) if !e.is_not_found() => eprintln!("{what}: {e}"),
        other => panic!("{what}: should be an error other than NotFound, got {other:?}"),
    }
}

/// Publishing never replaces: a second commit under a key is AlreadyExists and the first bytes stay;
/// a writer's bytes are invisible until its commit, and gone after an abort or a drop.
fn create_is_if_absent_and_invisible_until_committed(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-create-{}", backend.label()));
    let (_repo, store) = open(backend, &scratch);
    let storage = store.storage();
    let key = "objects/first";
    put(&store, key, b"the first bytes", 4).expect("first create");
    let meta = store.run(storage.head(key)).expect("head after the commit");
    assert_eq!(meta.size, 15);

    match put(&store, key, b"other bytes", 4) {
        Err(StorageError::AlreadyExists { .. }) => {}
        other => panic!("a second create of {key} must be AlreadyExists, got {other:?}"),
    }
    assert_eq!(get(&store, key).unwrap().0, b"the first bytes", "the first object was replaced");

    let pending = "objects/pending";
    store.run(async {
        let mut writer = storage.create(pending, PutOptions::default()).await.unwrap();
        writer.write(Bytes::from_static(b"not yet")).await.unwrap();
        assert_not_found(storage.head(pending).await, "head before the commit");
        writer.abort().await.unwrap();
    });
    assert_not_found(store.run(storage.head(pending)), "head after an abort");
    store.run(async {
        let mut writer = storage.create(pending, PutOptions::default()).await.unwrap();
        writer.write(Bytes::from_static(b"dropped")).await.unwrap();
    });
    assert_not_found(store.run(storage.head(pending)), "head after a dropped writer");
    put(&store, pending, b"now", 1).expect("create after an abort and a drop");
    assert_eq!(get(&store, pending).unwrap().0, b"now");
}

/// A multi-MiB object comes back whole, in many reads (the reader streams; it does not hand over one
/// buffer of the whole object).
fn get_streams_a_multi_mib_object(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-get-{}", backend.label()));
    let (_repo, store) = open(backend, &scratch);
    let bytes =
        segments::Segment::new("000000010000000000000001").segment_size(16 << 20).fill(segments::Fill::Random).bytes();
    put(&store, "large/object", &bytes, 1 << 20).expect("create a 16 MiB object");
    assert_eq!(store.run(store.storage().head("large/object")).unwrap().size, bytes.len() as u64);
    let (read, reads) = get(&store, "large/object").expect("get");
    assert!(read == bytes, "the object came back with {} bytes that differ", read.len());
    assert!(reads > 16, "{reads} reads for 16 MiB: not a stream");
}

/// How many keys the listing test stores: more than an S3 page (1,000 keys) and than OpenSSH's
/// sftp-server hands over per directory read (100 entries).
const MANY: usize = 1_100;

/// Listing returns every key under a prefix once, in key order, however the pages fall: with a
/// small limit (many pages) and with one above what a backend returns at once (S3 stops at 1,000),
/// called again with the last key until a page comes back empty. Hidden (temporary) files and keys
/// outside the prefix are not listed.
fn list_pages_through_more_keys_than_a_page(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-list-{}", backend.label()));
    let (repo, store) = open(backend, &scratch);
    // Stored as files straight into the backend's directory (every store here keeps its objects as
    // plain files), so that a thousand keys cost no thousand uploads; one goes through the trait.
    let mut expected: Vec<String> = (0..MANY).map(|i| format!("many/d{}/k{i:05}", i % 3)).collect();
    for key in &expected[1..] {
        let path = repo.object_file(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, key.as_bytes()).unwrap();
    }
    // The SSH server writes as the server user, into the directories made here too.
    for dir in ["many", "many/d0", "many/d1", "many/d2"] {
        walship_tests::chown_to_server_user(&repo.object_file(dir));
    }
    put(&store, &expected[0], expected[0].as_bytes(), 64).unwrap();
    if backend != Backend::S3 {
        fs::write(repo.object_file("many/d0/.k00003.123.1.tmp"), b"a writer's temporary file").unwrap();
    }
    put(&store, "manx/outside", b"x", 1).unwrap();
    put(&store, "other/outside", b"x", 1).unwrap();
    expected.sort();

    for limit in [97, 5_000] {
        let (keys, pages) = list_all(&store, "many/", limit);
        assert_eq!(keys.len(), MANY, "limit {limit}: {} keys listed", keys.len());
        assert!(keys == expected, "limit {limit}: not every key once, in key order");
        assert!(pages.iter().all(|&n| n <= limit), "limit {limit}: a page above the limit: {pages:?}");
        eprintln!("limit {limit}: pages of {pages:?}");
    }
    if backend == Backend::S3 {
        // The listing really crossed S3's own page boundary (1,000 keys per answer).
        let (_, pages) = list_all(&store, "many/", 5_000);
        assert_eq!(pages.first(), Some(&1_000), "S3 pages: {pages:?}");
    }
    let (keys, _) = list_all(&store, "many/d1/", 1_000);
    let in_d1: Vec<String> = expected.iter().filter(|k| k.starts_with("many/d1/")).cloned().collect();
    assert!(keys == in_d1, "prefix many/d1/: {} keys listed of {}", keys.len(), in_d1.len());
    let sizes = store.run(store.storage().list("many/d0/k0000", None, 10)).unwrap();
    assert_eq!(
        sizes.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
        ["many/d0/k00000", "many/d0/k00003", "many/d0/k00006", "many/d0/k00009"]
    );
    assert!(sizes.iter().all(|m| m.size == 14), "sizes: {sizes:?}");
}

/// Every key under `prefix`, page by page with `limit`, and the size of each page (the last, empty,
/// one left out).
fn list_all(store: &Store, prefix: &str, limit: usize) -> (Vec<String>, Vec<usize>) {
    let (mut keys, mut pages) = (Vec::new(), Vec::new());
    // Bounded: each page but the last holds at least one key.
    for _ in 0..=MANY + 1 {
        let after = keys.last().cloned();
        let page = store.run(store.storage().list(prefix, after.as_deref(), limit)).expect("list");
        if page.is_empty() {
            return (keys, pages);
        }
        pages.push(page.len());
        keys.extend(page.into_iter().map(|m| m.key));
    }
    panic!("listing {prefix} never ended");
}

/// A deleted object is absent to every call, and its key can be created again.
fn delete_removes_the_object(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-delete-{}", backend.label()));
    let (_repo, store) = open(backend, &scratch);
    let storage = store.storage();
    put(&store, "gone/object", b"soon gone", 3).unwrap();
    put(&store, "gone/neighbour", b"stays", 3).unwrap();
    store.run(storage.delete("gone/object")).expect("delete");
    assert_not_found(store.run(storage.head("gone/object")), "head after delete");
    assert_not_found(get(&store, "gone/object"), "get after delete");
    let listed: Vec<String> = store.run(storage.list("gone/", None, 10)).unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(listed, ["gone/neighbour"]);
    // Deleting what is not there is no failure of the store (S3 says nothing; a file system says
    // "no such file").
    match store.run(storage.delete("gone/object")) {
        Ok(()) | Err(StorageError::NotFound { .. }) => {}
        Err(e) => panic!("delete of an absent key: {e}"),
    }
    put(&store, "gone/object", b"back", 2).expect("create after delete");
    assert_eq!(get(&store, "gone/object").unwrap().0, b"back");
}

/// A missing key is NotFound; a store that cannot say (something in the way of the path, a missing
/// bucket, a server gone) is an error, never NotFound, which would end a recovery early.
fn absent_is_only_said_of_absent_keys(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-absent-{}", backend.label()));
    let (mut repo, store) = open(backend, &scratch);
    let storage = store.storage();
    put(&store, "present/object", b"here", 4).unwrap();
    assert_not_found(store.run(storage.head("present/missing")), "head of a missing key");
    assert_not_found(get(&store, "present/missing"), "get of a missing key");
    assert_not_found(get(&store, "absent/dir/missing"), "get below a missing directory");

    match backend {
        Backend::Local | Backend::Ssh => {
            // A file where a directory should be: "no such file" from the lookup proves nothing.
            assert_error_not_absence(get(&store, "present/object/below"), "get below a file");
            assert_error_not_absence(store.run(storage.head("present/object/below")), "head below a file");
            let dangling = repo.object_file("present/link");
            std::os::unix::fs::symlink("/nonexistent/walship-target", &dangling).unwrap();
            assert_error_not_absence(get(&store, "present/link"), "get of a dangling link");
        }
        Backend::S3 => {
            let Repository::S3 { server, bucket, .. } = &repo else { unreachable!() };
            fs::remove_dir_all(server.data_dir().join(bucket)).unwrap();
            // s3s-fs answers a GET or HEAD in a missing bucket as if only the key were missing, so
            // the repository layer asks check_root before it believes an absence: that must fail.
            eprintln!("head in a missing bucket: {:?}", store.run(storage.head("present/missing")));
            eprintln!("get in a missing bucket: {:?}", get(&store, "present/missing").map(|(bytes, _)| bytes.len()));
            assert_error_not_absence(store.run(storage.check_root()), "check_root of a missing bucket");
        }
    }
    if backend == Backend::Local {
        fs::remove_dir_all(repo.local_dir().unwrap()).unwrap();
        assert_error_not_absence(store.run(storage.check_root()), "check_root of a removed directory");
    }
    // A server that is gone: the store cannot say anything.
    match &mut repo {
        Repository::S3 { server, .. } => server.kill(),
        Repository::Ssh { server, .. } => server.kill(),
        Repository::Local { .. } => {}
    }
    if backend != Backend::Local {
        assert_error_not_absence(store.run(storage.head("present/object")), "head with the server gone");
        assert_error_not_absence(get(&store, "present/missing"), "get with the server gone");
    }
}

/// Stores `keys` as files straight into the backend's directory (every store here keeps its objects
/// as plain files), so that a thousand keys cost no thousand uploads, with every directory on the way
/// handed to the server user (the SSH server deletes as that user).
fn plant(repo: &Repository, keys: &[String]) {
    for key in keys {
        let path = repo.object_file(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, key.as_bytes()).unwrap();
        let root = repo.object_file("");
        for dir in path.ancestors().skip(1).take_while(|dir| dir.starts_with(&root) && *dir != root) {
            walship_tests::chown_to_server_user(dir);
        }
    }
}

/// Keys of the WAL directory `dir` that fill more than one DeleteObjects batch (1,000 keys).
fn many_keys(dir: &str) -> Vec<String> {
    (0..1_100).map(|i| format!("wal/{dir}/{i:024X}")).collect()
}

/// One expiry pass as the expiry will make it: some keys present, some already gone, more than one
/// S3 batch. It succeeds, and again on the same keys; two passes at once both succeed. Only the
/// object left out remains. On local disk and SSH the directories the deletes emptied are gone, from
/// the deepest up; one that still holds an object stays, and so do the depth-1 directories
/// (`wal/`, `backups/`, `catalog/`), `wal/history` and the root, even when empty.
fn delete_many_takes_absent_keys_and_prunes_what_it_emptied(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-delete-many-{}", backend.label()));
    let (repo, store) = open(backend, &scratch);
    let storage = store.storage();
    let mut present = many_keys("0000000100000000");
    present.extend(
        ["wal/0000000100000001/000000010000000100000000", "backups/b1/part-1", "backups/b1/sub/part-2"]
            .into_iter()
            .chain(["catalog/b1.json", "wal/history/00000002.history", "top-level-object"])
            .map(str::to_owned),
    );
    let stays = "wal/0000000100000001/000000010000000100000001".to_owned();
    plant(&repo, &present);
    plant(&repo, std::slice::from_ref(&stays));
    let mut keys = present.clone();
    keys.insert(500, "wal/0000000100000000/000000010000000000000FFF".into());
    keys.push("backups/never/there".into());
    assert_eq!(store.run(storage.delete_many(&keys)).expect("delete_many"), keys.len() as u64);
    assert_eq!(store.run(storage.delete_many(&keys)).expect("delete_many again"), keys.len() as u64);
    let listed: Vec<String> =
        store.run(storage.list("", None, 5_000)).unwrap().into_iter().map(|meta| meta.key).collect();
    assert_eq!(listed, std::slice::from_ref(&stays), "what the deletes left");
    assert_eq!(get(&store, &stays).unwrap().0, stays.as_bytes());

    // Two passes over the same keys at once: each takes the other's deletions for its own.
    let twice = many_keys("0000000200000000");
    plant(&repo, &twice);
    let (first, second) = store.run(async { tokio::join!(storage.delete_many(&twice), storage.delete_many(&twice)) });
    assert_eq!((first.expect("first of two at once"), second.expect("second of two at once")), (1_100, 1_100));
    assert!(store.run(storage.list("wal/0000000200000000/", None, 10)).unwrap().is_empty());
    assert!(storage.notices().is_empty(), "no fallback was needed: {:?}", storage.notices());

    if backend != Backend::S3 {
        let exists = |dir: &str| repo.object_file(dir).is_dir();
        for gone in ["wal/0000000100000000", "wal/0000000200000000", "backups/b1/sub", "backups/b1"] {
            assert!(!exists(gone), "{gone}/ was emptied and should be gone");
        }
        for kept in ["wal/0000000100000001", "wal", "backups", "catalog", "wal/history", ""] {
            assert!(exists(kept), "{kept}/ should stay");
        }
    }
}

/// Housekeeping removes the temporary files that killed writers left, at any depth, once older than
/// the age, and nothing else: not a fresh temporary file (a writer at work), not an old object, not
/// what a symbolic link leads to. On S3 an upload begun now stays: the store says it cannot list
/// uploads (s3s-fs), or the upload is still there to complete.
fn remove_stale_takes_old_leftovers_only(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-stale-{}", backend.label()));
    let (repo, store) = open(backend, &scratch);
    let storage = store.storage();
    let hour = Duration::from_secs(3600);
    if backend == Backend::S3 {
        return young_upload_stays(&repo, &store, hour);
    }
    let object = "wal/0000000100000000/000000010000000000000001".to_owned();
    plant(&repo, std::slice::from_ref(&object));
    put(&store, "backups/b1/sub/part", b"part", 2).unwrap();
    let old = SystemTime::now() - 2 * hour;
    let stale = [
        repo.object_file("wal/0000000100000000/.000000010000000000000002.walship.1.2.tmp"),
        repo.object_file("backups/b1/sub/.part-2.walship.3.4.tmp"),
    ];
    for path in &stale {
        fs::write(path, b"12345").unwrap();
        set_mtime(path, old);
    }
    set_mtime(&repo.object_file(&object), old);
    let fresh = repo.object_file("backups/b1/.part-3.walship.5.6.tmp");
    fs::write(&fresh, b"being written").unwrap();
    let outside = scratch.mkdir("outside");
    let beyond_link = outside.join(".elsewhere.walship.7.8.tmp");
    fs::write(&beyond_link, b"not ours").unwrap();
    set_mtime(&beyond_link, old);
    std::os::unix::fs::symlink(&outside, repo.object_file("backups/link")).unwrap();

    let found = store.run(storage.remove_stale(hour)).expect("remove_stale");
    assert_eq!(found, Housekeeping { temp_files: 2, temp_bytes: 10, ..Housekeeping::default() });
    for path in &stale {
        assert!(!path.exists(), "{path:?} is an old temporary file");
    }
    assert!(fresh.exists(), "a fresh temporary file was removed");
    assert!(beyond_link.exists(), "the walk followed a symbolic link");
    assert_eq!(get(&store, &object).unwrap().0, object.as_bytes(), "an old object");
    assert_eq!(get(&store, "backups/b1/sub/part").unwrap().0, b"part");
    let again = store.run(storage.remove_stale(hour)).expect("remove_stale again");
    assert_eq!(again, Housekeeping::default());
}

/// S3: an upload begun now survives a housekeeping pass and completes afterwards.
fn young_upload_stays(repo: &Repository, store: &Store, hour: Duration) {
    let storage = store.storage();
    let bytes = vec![7u8; (16 << 20) + 1];
    let key = "backups/b1/part-1";
    let mut writer = store.run(async {
        let mut writer = storage.create(key, PutOptions::default()).await.unwrap();
        // One part and a byte over: the upload is a multipart one, open on the server.
        writer.write(Bytes::from(bytes.clone())).await.unwrap();
        writer
    });
    let server = repo.s3_server().unwrap();
    assert!(!server.multipart_leftovers().is_empty(), "no multipart upload under way");
    let found = store.run(storage.remove_stale(hour)).expect("remove_stale");
    eprintln!("housekeeping on s3s-fs: {found:?}");
    assert_eq!(found.uploads, 0, "an upload begun now was aborted");
    assert!(found.uploads_unlisted, "s3s-fs lists no uploads: the pass should say it checked nothing");
    store
        .run(async {
            writer.write(Bytes::from_static(b"tail")).await.unwrap();
            writer.commit().await
        })
        .expect("the young upload completes");
    assert_eq!(get(store, key).unwrap().0.len(), bytes.len() + 4);
}

/// Sets the modification time of `path` (into the past: a file a killed writer left long ago).
fn set_mtime(path: &Path, when: SystemTime) {
    fs::File::options().write(true).open(path).unwrap().set_modified(when).unwrap();
}

/// The repository `repo` on S3, opened through a proxy in front of its server.
fn open_via(repo: &mut Repository, scratch: &Scratch, proxy: &Proxy, name: &str) -> Store {
    let endpoint = proxy.endpoint();
    let via =
        repo.write_config(scratch.path(), name, ConfigLines { endpoint: Some(&endpoint), ..ConfigLines::default() });
    let Repository::S3 { config, .. } = repo else { panic!("not S3") };
    *config = via;
    repo.open_storage()
}

/// Whether `seen` is a DeleteObjects request.
fn is_delete_objects(seen: &walship_tests::proxy::Seen) -> bool {
    seen.method == "POST" && seen.request.has_query("delete")
}

/// S3: 1,102 keys go in two DeleteObjects requests. A store that answers DeleteObjects with 501 Not
/// Implemented gets one DeleteObject per key instead, for that call and every later one of the same
/// store (DeleteObjects is not asked again), absent keys included, and the store says so once.
fn delete_many_batches_and_falls_back_to_single_deletes(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-delete-batches-{}", backend.label()));
    let mut repo = Repository::new(backend, &scratch);
    let proxy = Proxy::start(repo.s3_server().unwrap().port());
    let store = open_via(&mut repo, &scratch, &proxy, "batches.toml");
    let mut keys = many_keys("0000000100000000");
    plant(&repo, &keys);
    keys.push("wal/0000000100000000/absent-1".into());
    keys.push("backups/absent/2".into());
    assert_eq!(store.run(store.storage().delete_many(&keys)).expect("delete_many"), 1_102);
    let seen = proxy.seen();
    assert_eq!(seen.iter().filter(|s| is_delete_objects(s)).count(), 2, "DeleteObjects requests for 1,102 keys");
    assert!(!seen.iter().any(|s| s.method == "DELETE" || s.method == "HEAD"), "single requests beside the batches");
    assert!(store.storage().notices().is_empty());
    assert!(repo.keys_under("wal/").is_empty(), "left: {:?}", repo.keys_under("wal/").len());
    drop(store);

    proxy.add(
        Rule::new(Fault::Respond(Response::s3_error(501, "Not Implemented", "NotImplemented", "no DeleteObjects")))
            .when(|request| request.method == "POST" && request.has_query("delete")),
    );
    // Some stores answer a DELETE of a missing key with 404 NoSuchKey rather than S3's 204.
    let absent_path = repo.request_path("backups/absent/2");
    proxy.add(
        Rule::new(Fault::Respond(Response::s3_error(404, "Not Found", "NoSuchKey", "no such key")))
            .when(move |request| request.method == "DELETE" && request.path() == absent_path),
    );
    let store = open_via(&mut repo, &scratch, &proxy, "no-batches.toml");
    plant(&repo, &keys[..1_100]);
    proxy.forget_seen();
    assert_eq!(store.run(store.storage().delete_many(&keys)).expect("delete_many without DeleteObjects"), 1_102);
    let singles = |seen: &[walship_tests::proxy::Seen]| seen.iter().filter(|s| s.method == "DELETE").count();
    let seen = proxy.seen();
    assert_eq!(seen.iter().filter(|s| is_delete_objects(s)).count(), 1, "DeleteObjects asked more than once");
    assert_eq!(singles(&seen), 1_102, "one DeleteObject per key");
    assert!(repo.keys_under("wal/").is_empty());
    let notices = store.storage().notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("s3://walship/cluster") && notices[0].contains("DeleteObjects"), "{notices:?}");

    proxy.forget_seen();
    plant(&repo, &keys[..3]);
    assert_eq!(store.run(store.storage().delete_many(&keys[..5])).expect("a later call"), 5);
    let seen = proxy.seen();
    assert_eq!((seen.iter().filter(|s| is_delete_objects(s)).count(), singles(&seen)), (0, 5));
    assert!(repo.keys_under("wal/").is_empty());
}

/// The repository's prefix in the bucket (`Repository::new` puts S3 repositories there).
const PREFIX: &str = "cluster";

/// A ListMultipartUploads answer with one upload, `truncated` or the last page.
fn uploads_page(key: &str, upload_id: &str, initiated: &str, truncated: bool) -> Response {
    let next = if truncated {
        format!("<NextKeyMarker>{PREFIX}/{key}</NextKeyMarker><NextUploadIdMarker>{upload_id}</NextUploadIdMarker>")
    } else {
        String::new()
    };
    Response {
        status: 200,
        reason: "OK".into(),
        headers: vec![("Content-Type".into(), "application/xml".into())],
        body: format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListMultipartUploadsResult \
             xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>walship</Bucket>{next}\
             <MaxUploads>1</MaxUploads><IsTruncated>{truncated}</IsTruncated><Upload><Key>{PREFIX}/{key}</Key>\
             <UploadId>{upload_id}</UploadId><Initiated>{initiated}</Initiated></Upload></ListMultipartUploadsResult>"
        ),
    }
}

/// S3, on a store that lists uploads (s3s-fs does not: a proxy answers the listing, in two pages,
/// for two real uploads): the one begun before the age is aborted on the server, the younger one is
/// left alone and completes.
fn remove_stale_pages_through_uploads(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-stale-uploads-{}", backend.label()));
    let mut repo = Repository::new(backend, &scratch);
    let proxy = Proxy::start(repo.s3_server().unwrap().port());
    let store = open_via(&mut repo, &scratch, &proxy, "uploads.toml");
    let storage = store.storage();
    let part = Bytes::from(vec![1u8; (16 << 20) + 1]);
    let (old_key, young_key) = ("backups/dead/part-1", "backups/alive/part-1");
    let (old_writer, young_writer) = store.run(async {
        let mut old = storage.create(old_key, PutOptions::default()).await.unwrap();
        old.write(part.clone()).await.unwrap();
        let mut young = storage.create(young_key, PutOptions::default()).await.unwrap();
        young.write(part.clone()).await.unwrap();
        (old, young)
    });
    // A part goes up in the background: wait until the server has stored it, so that no part arrives
    // after the abort (which the abort's own check would then have to chase).
    let upload_of = |key: &str| {
        let path = repo.request_path(key);
        walship_tests::wait_until(&format!("a part of {key} stored"), || {
            let seen = proxy.seen();
            let stored = |s: &&walship_tests::proxy::Seen| s.request.is_upload_part() && s.status == Some(200);
            let part = seen.iter().filter(stored).find(|s| s.request.path() == path)?;
            part.request.query("uploadId").map(str::to_owned)
        })
    };
    let (old_id, young_id) = (upload_of(old_key), upload_of(young_key));
    // Begun in 2020 and in 2024; the age puts the boundary at the start of 2022.
    let boundary = SystemTime::UNIX_EPOCH + Duration::from_secs(1_640_995_200);
    let age = SystemTime::now().duration_since(boundary).unwrap();
    let listing = |request: &walship_tests::proxy::Request| request.method == "GET" && request.has_query("uploads");
    let (first, second) = (
        uploads_page(old_key, &old_id, "2020-01-01T00:00:00.000Z", true),
        uploads_page(young_key, &young_id, "2024-06-01T00:00:00.000Z", false),
    );
    proxy.add(Rule::new(Fault::Respond(second)).when(move |r| listing(r) && r.has_query("key-marker")).times(1));
    proxy.add(Rule::new(Fault::Respond(first)).when(listing).times(1));
    let found = store.run(storage.remove_stale(age)).expect("remove_stale");
    assert_eq!(found, Housekeeping { uploads: 1, ..Housekeeping::default() });
    assert_eq!(proxy.rules_left(), 0, "both pages of the listing were asked for");
    let aborts: Vec<String> = proxy
        .seen()
        .iter()
        .filter(|s| s.method == "DELETE" && s.request.has_query("uploadId"))
        .map(|s| s.request.query("uploadId").unwrap().to_owned())
        .collect();
    assert!(aborts.iter().all(|id| *id == old_id) && !aborts.is_empty(), "aborted: {aborts:?}");
    let leftovers = repo.s3_server().unwrap().multipart_leftovers();
    assert!(leftovers.iter().all(|name| !name.contains(&old_id)), "the old upload is still there: {leftovers:?}");
    assert!(leftovers.iter().any(|name| name.contains(&young_id)), "the young upload is gone: {leftovers:?}");
    store.run(young_writer.commit()).expect("the young upload completes");
    drop(old_writer);
    assert_eq!(get(&store, young_key).unwrap().0.len(), part.len());
}

/// On the backends with directories: a write into a directory that an expiry keeps emptying and
/// removing still succeeds (the directory may vanish between its creation and the temporary file's,
/// and is made again), and a write below a dangling link fails rather than trying for ever.
fn a_write_survives_an_expiry_removing_its_directory(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-write-vs-expiry-{}", backend.label()));
    let (repo, store) = open(backend, &scratch);
    let storage = store.storage();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let absent = ["wal/0000000100000000/absent".to_owned()];
    store.run(async {
        // Deleting an absent key of the directory removes the directory whenever it is empty.
        let expiry = async {
            let mut passes = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                storage.delete_many(&absent).await.expect("expiry pass");
                passes += 1;
            }
            passes
        };
        let writes = async {
            for i in 0..150 {
                let key = format!("wal/0000000100000000/{i:024}");
                let mut writer =
                    storage.create(&key, PutOptions::default()).await.unwrap_or_else(|e| panic!("{i}: {e}"));
                writer.write(Bytes::from_static(b"x")).await.unwrap();
                writer.commit().await.unwrap_or_else(|e| panic!("commit {i}: {e}"));
                storage.delete_many(std::slice::from_ref(&key)).await.unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        };
        let (passes, ()) = tokio::join!(expiry, writes);
        eprintln!("{passes} expiry passes beside 150 writes");
    });
    std::os::unix::fs::symlink("/nonexistent/walship", repo.object_file("wal/dangling")).unwrap();
    match put(&store, "wal/dangling/x", b"x", 1) {
        Err(e) => assert!(!e.is_not_found(), "a write below a dangling link: {e}"),
        Ok(()) => panic!("a write below a dangling link succeeded"),
    }
}

/// A listed object and its `head` say when it was stored (wal-verify's "newest segment archived X
/// ago" rests on it): within a minute of now on every backend.
fn listed_and_headed_objects_carry_their_time(backend: Backend) {
    let scratch = Scratch::new(&format!("storage-mtime-{}", backend.label()));
    let (_repo, store) = open(backend, &scratch);
    put(&store, "timed/object", b"bytes", 5).expect("create");
    let listed = store.run(store.storage().list("timed/", None, 10)).expect("list");
    let headed = store.run(store.storage().head("timed/object")).expect("head");
    assert_eq!(listed.len(), 1, "{listed:?}");
    for (what, modified) in [("list", listed[0].modified), ("head", headed.modified)] {
        let modified = modified.unwrap_or_else(|| panic!("{what}: no modification time"));
        let off = SystemTime::now().duration_since(modified).unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_secs(60), "{what}: stored {off:?} away from now");
    }
}
