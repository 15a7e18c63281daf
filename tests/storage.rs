//! The `walship::storage::Storage` trait itself, called in this process on every backend (local
//! disk, S3 on s3s-fs, SSH on a real sshd) without PostgreSQL and without the binaries: the promises
//! that the module documentation of `crates/walship/src/storage/mod.rs` makes and every layer above
//! relies on. Create is create-if-absent and nothing is visible before the commit; a large object
//! streams; listing pages through more keys than a page holds, in key order; delete removes; and
//! "absent" is only ever said of a key that is absent, never of a store that cannot be read.
//!
//! Each body runs on every backend through `every_backend!`; the store is opened through
//! `Repository::open_storage`, the one place that knows how the library builds a store.

use std::fs;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use walship::storage::{PutOptions, StorageError};
use walship_tests::Scratch;
use walship_tests::repository::{Backend, Repository, Store};
use walship_tests::segments;

walship_tests::every_backend!(
    create_is_if_absent_and_invisible_until_committed,
    get_streams_a_multi_mib_object,
    list_pages_through_more_keys_than_a_page,
    delete_removes_the_object,
    absent_is_only_said_of_absent_keys,
);

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
