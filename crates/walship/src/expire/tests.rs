//! Whole runs of [`base_expire`] over a repository on local disk whose store lets a test act at an
//! exact moment of the run (a base-push's claim landing between two of its requests, a pin set
//! meanwhile): the orderings that no end-to-end test can time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::base::catalog::{expiring_key, needed_by_key, pin_key};
use crate::base::{BackupType, INCREMENTAL_RECORD_FORMAT, test_record};
use crate::storage::local::LocalStorage;
use crate::storage::{ListResult, ObjectMeta, ObjectReader, ObjectWriter, PutOptions, Storage, StorageError};

/// What a hook is told: the request (`create`, `head`, `delete`) and its key, and the repository's
/// directory (to act on it as a file system).
type Hook = Box<dyn Fn(&str, &str, &Path) + Send + Sync>;

/// Local storage that calls a hook before each request and records the deletes, in order.
struct Hooked {
    inner: LocalStorage,
    root: PathBuf,
    hook: Hook,
    deleted: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl Storage for Hooked {
    fn location(&self, key: &str) -> String {
        self.inner.location(key)
    }
    async fn create(&self, key: &str, options: PutOptions) -> Result<Box<dyn ObjectWriter>, StorageError> {
        (self.hook)("create", key, &self.root);
        self.inner.create(key, options).await
    }
    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError> {
        (self.hook)("head", key, &self.root);
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> ListResult {
        self.inner.list(prefix, after, limit).await
    }
    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        (self.hook)("delete", key, &self.root);
        self.deleted.lock().unwrap().push(key.to_owned());
        self.inner.delete(key).await
    }
    async fn delete_many(&self, keys: &[String]) -> Result<u64, StorageError> {
        for key in keys {
            (self.hook)("delete", key, &self.root);
            self.deleted.lock().unwrap().push(key.clone());
        }
        self.inner.delete_many(keys).await
    }
    async fn make_durable(&self, key: &str) -> Result<(), StorageError> {
        self.inner.make_durable(key).await
    }
    async fn check_root(&self) -> Result<(), StorageError> {
        self.inner.check_root().await
    }
    async fn remove_incomplete(&self, prefix: &str) -> Result<(), StorageError> {
        self.inner.remove_incomplete(prefix).await
    }
}

/// A repository in a new directory with the given catalog records, its store calling `hook`.
struct Setup {
    dir: tempfile::TempDir,
    repo: Repository,
    deleted: Arc<Mutex<Vec<String>>>,
}

impl Setup {
    fn new(records: &[BackupRecord], hook: Hook) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::create_dir_all(root.join("catalog")).unwrap();
        let identity = serde_json::json!({ "format_version": 1, "system_identifier": "1", "pg_version": 15,
            "wal_segment_size": 16777216, "created_by": "test" });
        std::fs::write(root.join("repository.json"), identity.to_string()).unwrap();
        for record in records {
            std::fs::write(root.join(BackupRecord::catalog_key(&record.name)), serde_json::to_vec(record).unwrap())
                .unwrap();
        }
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let storage = Hooked { inner: LocalStorage::open(&root).unwrap(), root, hook, deleted: Arc::clone(&deleted) };
        let repo = Repository::with_storage(Box::new(storage), format!("file://{}", dir.path().display()));
        Setup { dir, repo, deleted }
    }

    /// Runs base-expire with `--keep keep`, claims older than an hour abandoned.
    async fn expire(&self, keep: u32) -> ExpireReport {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128;
        let options = ExpireOptions {
            policy: Policy { keep: Some(keep), keep_within: None },
            dry_run: false,
            stale_after: Duration::from_secs(3600),
            now,
            deadline: Duration::from_secs(5),
        };
        base_expire(&self.repo, &options, &Log::new("base-expire", false), &mut |_: &str, _: u64| {}).await.unwrap()
    }

    fn has(&self, key: &str) -> bool {
        self.dir.path().join(key).exists()
    }

    /// Writes `key` as a running base-push would have (a plain small object).
    fn write(root: &Path, key: &str) {
        std::fs::write(root.join(key), b"{\"name\": \"x\", \"at\": \"now\", \"by\": \"test\"}\n").unwrap();
    }
}

/// Backups finished at the given hours after the epoch; `parents` makes `(child, parent)` incremental.
fn records(hours: &[i64], parents: &[(usize, usize)]) -> Vec<BackupRecord> {
    let mut records: Vec<BackupRecord> = hours.iter().map(|&h| test_record(h, 1, h as u64 + 2)).collect();
    for &(child, parent) in parents {
        let parent = records[parent].name.clone();
        let record = &mut records[child];
        (record.backup_type, record.parent, record.format_version) =
            (BackupType::Incremental, Some(parent), INCREMENTAL_RECORD_FORMAT);
    }
    records
}

fn names(list: &[BackupSummary]) -> Vec<&str> {
    list.iter().map(|b| b.name.as_str()).collect()
}

fn no_hook() -> Hook {
    Box::new(|_, _, _| {})
}

#[tokio::test]
async fn a_claim_that_lands_after_the_catalog_read_and_before_the_mark_keeps_its_parent() {
    // Backups at 1 h and 2 h; --keep 1 expires the first. A base-push claims it for an incremental
    // backup just before base-expire writes the expiry mark: the push saw no mark and goes on, so
    // base-expire must find the claim after its mark.
    let backups = records(&[1, 2], &[]);
    let (parent, child) = (backups[0].name.clone(), "19700105T000000Z".to_owned());
    let (mark, claim) = (expiring_key(&parent), needed_by_key(&parent, &child));
    let hook_claim = claim.clone();
    let setup = Setup::new(
        &backups,
        Box::new(move |op, key, root| {
            if op == "create" && key == mark {
                Setup::write(root, &hook_claim);
            }
        }),
    );
    let report = setup.expire(1).await;
    assert_eq!(names(&report.expired), Vec::<&str>::new(), "{report:#?}");
    let kept = report.kept.iter().find(|b| b.name == parent).expect("the claimed parent is kept");
    assert_eq!((kept.kept.as_slice(), kept.needed_by.as_slice()), (&[Keep::Claimed][..], &[child][..]));
    assert!(setup.has(&BackupRecord::catalog_key(&parent)), "the claimed parent's record went");
    assert!(!setup.has(&expiring_key(&parent)), "its expiry mark is removed again");
    assert!(setup.has(&claim), "a fresh claim without a child record stays");
}

#[tokio::test]
async fn a_claim_that_lands_after_the_recheck_meets_the_expiry_mark() {
    // The other order: the claim is written after base-expire looked for claims. The backup goes,
    // and the push that wrote the claim then finds the expiry mark (base-push checks it after its
    // claim) and takes no incremental backup on a parent being removed.
    let backups = records(&[1, 2], &[]);
    let parent = backups[0].name.clone();
    let (record_key, mark, claim) =
        (BackupRecord::catalog_key(&parent), expiring_key(&parent), needed_by_key(&parent, "19700105T000000Z"));
    let mark_seen = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&mark_seen);
    let setup = Setup::new(
        &backups,
        Box::new(move |op, key, root| {
            if op == "delete" && key == record_key && seen.lock().unwrap().is_none() {
                Setup::write(root, &claim);
                *seen.lock().unwrap() = Some(root.join(&mark).exists());
            }
        }),
    );
    let report = setup.expire(1).await;
    assert_eq!(names(&report.expired), [parent.as_str()], "{report:#?}");
    assert_eq!(*mark_seen.lock().unwrap(), Some(true), "the late claim's push finds the expiry mark");
}

#[tokio::test]
async fn claims_made_redundant_or_abandoned_are_removed_and_keep_nothing() {
    // A full at 1 h claimed long ago by an incremental backup never recorded (stale): it goes.
    // The full at 2 h has a claim from the incremental at 3 h, which finished (redundant): the claim
    // goes, the full stays for its child.
    let backups = records(&[1, 2, 3], &[(2, 1)]);
    let stale = needed_by_key(&backups[0].name, "19700110T000000Z");
    let redundant = needed_by_key(&backups[1].name, &backups[2].name);
    let setup = Setup::new(&backups, no_hook());
    for key in [&stale, &redundant] {
        Setup::write(setup.dir.path(), key);
    }
    let old = SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options().write(true).open(setup.dir.path().join(&stale)).unwrap().set_modified(old).unwrap();
    let report = setup.expire(1).await;
    assert_eq!(names(&report.expired), [backups[0].name.as_str()], "{report:#?}");
    let full = &report.kept[0];
    assert_eq!(
        (full.kept.as_slice(), full.needed_by.as_slice()),
        (&[Keep::NeededBy { later_wal: true }][..], &[backups[2].name.clone()][..])
    );
    assert_eq!(report.claims_removed, 2, "{report:#?}");
    assert!(!setup.has(&stale) && !setup.has(&redundant));
}

#[tokio::test]
async fn children_go_before_their_parents_and_a_late_pin_keeps_the_whole_chain() {
    // A chain of a full (1 h) and two incrementals (2 h, 3 h), then a full at 4 h: --keep 1 expires
    // the chain, newest first, so that a run cut off leaves no incremental without its parent.
    let chain = records(&[1, 2, 3, 4], &[(1, 0), (2, 1)]);
    let setup = Setup::new(&chain, no_hook());
    let report = setup.expire(1).await;
    assert_eq!(names(&report.expired), [&chain[0].name, &chain[1].name, &chain[2].name].map(String::as_str));
    let records_deleted: Vec<String> =
        setup.deleted.lock().unwrap().iter().filter(|k| k.ends_with(".json")).cloned().collect();
    let expected: Vec<String> = [2, 1, 0].iter().map(|&i| BackupRecord::catalog_key(&chain[i].name)).collect();
    assert_eq!(records_deleted, expected, "children first");

    // Pinned while the run decides: the last incremental stays, and with it its parents.
    let pin = pin_key(&chain[2].name);
    let setup = Setup::new(
        &chain,
        Box::new(move |op, key, root| {
            if op == "head" && key == pin {
                Setup::write(root, &pin);
            }
        }),
    );
    let report = setup.expire(1).await;
    assert_eq!(names(&report.expired), Vec::<&str>::new(), "{report:#?}");
    assert_eq!(report.kept[0].kept, [Keep::NeededBy { later_wal: false }], "{report:#?}");
    assert_eq!(report.kept[0].needed_by, [chain[1].name.clone()]);
    for record in &chain {
        assert!(setup.has(&BackupRecord::catalog_key(&record.name)), "{} went", record.name);
    }
}
