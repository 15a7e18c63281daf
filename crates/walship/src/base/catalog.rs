//! The catalog directory, name by name: a backup's record, its pin and its expiry mark.
//!
//! ```text
//! catalog/<NAME>.expiring   base-expire is removing the backup (written before the record goes)
//! catalog/<NAME>.json       the catalog record: the backup exists
//! catalog/<NAME>.needed-by-<CHILD>
//!                           an incremental backup CHILD is being taken on top of NAME (written by
//!                           base-push before it reads NAME's manifest): base-expire keeps NAME
//! catalog/<NAME>.pin        the backup is kept forever
//! ```
//!
//! All three sit in one directory so that one listing, in key order, brings each name's entries
//! together (`.expiring` < `.json` < `.pin`), whatever the size of the catalog and without a request
//! per backup. Older walship versions read only `.json` and skip the rest.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::recovery::now_rfc3339;
use super::{BackupRecord, BackupType, CATALOG_PREFIX, MAX_CHAIN_LEN, read_named, read_record, validate_name};
use crate::error::Error;
use crate::repo::Repository;
use crate::storage::{PutOptions, StorageError};

/// What `catalog/` holds for one backup name.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    /// The backup name.
    pub name: String,
    /// Its catalog record, when there is one (the backup is complete and listed).
    pub record: Option<BackupRecord>,
    /// A pin: the backup is kept forever.
    pub pinned: bool,
    /// An expiry mark: a base-expire began removing the backup and may not have finished.
    pub expiring: bool,
    /// The incremental backups being taken on top of this one (`.needed-by-<CHILD>` claims), by
    /// name: until they finish (and their records name this backup as parent) or are abandoned.
    pub needed_by: Vec<String>,
}

/// What a pin or an expiry mark records, for people reading the repository.
#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    name: String,
    at: String,
    by: String,
}

/// The key of backup `name`'s pin.
pub fn pin_key(name: &str) -> String {
    format!("{CATALOG_PREFIX}{name}.pin")
}

/// The key of the claim that incremental backup `child` is being taken on top of `parent`.
pub fn needed_by_key(parent: &str, child: &str) -> String {
    format!("{CATALOG_PREFIX}{parent}.{NEEDED_BY}{child}")
}

/// The start of a claim's kind (after the parent's name and a dot).
const NEEDED_BY: &str = "needed-by-";

/// The key of backup `name`'s expiry mark.
pub fn expiring_key(name: &str) -> String {
    format!("{CATALOG_PREFIX}{name}.expiring")
}

/// Calls `each` for every name with an entry in `catalog/`, oldest name first, reading the listing
/// page by page and each record as its name comes up: memory stays that of one entry.
pub async fn for_each_entry(
    repo: &Repository,
    mut each: impl FnMut(CatalogEntry) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut pending: Option<(String, Flags)> = None;
    let mut after: Option<String> = None;
    loop {
        let page = repo.storage().list(CATALOG_PREFIX, after.as_deref(), 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for meta in page {
            let Some((name, kind)) = meta.key.strip_prefix(CATALOG_PREFIX).and_then(|k| k.rsplit_once('.')) else {
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            if pending.as_ref().is_some_and(|(pending_name, _)| pending_name != name) {
                let (done, flags) = pending.take().expect("checked");
                each(flags.into_entry(repo, done).await?)?;
            }
            let flags = &mut pending.get_or_insert_with(|| (name.to_owned(), Flags::default())).1;
            match kind {
                "json" => flags.record = true,
                "pin" => flags.pinned = true,
                "expiring" => flags.expiring = true,
                claim => {
                    if let Some(child) = claim.strip_prefix(NEEDED_BY).filter(|c| validate_name(c).is_ok()) {
                        flags.needed_by.push(child.to_owned());
                    }
                }
            }
        }
    }
    if let Some((name, flags)) = pending {
        each(flags.into_entry(repo, name).await?)?;
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Flags {
    record: bool,
    pinned: bool,
    expiring: bool,
    needed_by: Vec<String>,
}

impl Flags {
    async fn into_entry(self, repo: &Repository, name: String) -> Result<CatalogEntry, Error> {
        let record = if self.record {
            match read_record(repo, &name).await {
                Ok(record) => Some(record),
                // Removed since the listing (a base-expire at work): the name has no record now.
                Err(Error::NoSuchBackup(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        Ok(CatalogEntry { name, record, pinned: self.pinned, expiring: self.expiring, needed_by: self.needed_by })
    }
}

/// Writes a small mark object (`catalog/<NAME>.pin` or `.expiring`); one already there is as good.
pub(crate) async fn write_mark(repo: &Repository, key: &str, name: &str, by: &str) -> Result<(), Error> {
    let mark = Mark { name: name.to_owned(), at: now_rfc3339(), by: by.to_owned() };
    let mut json = serde_json::to_vec_pretty(&mark).expect("plain struct serializes");
    json.push(b'\n');
    let mut writer = repo.storage().create(key, PutOptions::default()).await?;
    writer.write(Bytes::from(json)).await?;
    match writer.commit().await {
        Ok(()) | Err(StorageError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes a mark; one already gone is as good.
pub(crate) async fn remove_mark(repo: &Repository, key: &str) -> Result<(), Error> {
    match repo.storage().delete(key).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Pins backup `name` (kept forever by base-expire) or, with `pinned = false`, unpins it. The backup
/// must exist: a pin for a missing backup would protect nothing and mislead whoever reads it.
pub async fn set_pinned(repo: &Repository, name: &str, pinned: bool) -> Result<(), Error> {
    let record = read_named(repo, name).await?;
    if pinned {
        write_mark(repo, &pin_key(&record.name), &record.name, "pin").await
    } else {
        remove_mark(repo, &pin_key(&record.name)).await
    }
}

/// Claims `parent` for the incremental backup `child` that base-push is about to take on top of it.
/// Written before the parent's manifest is read, and followed by [`is_expiring`]: base-expire writes
/// its expiry mark before it checks for claims, so of a push and an expiry that meet, at least one
/// sees the other's mark and backs off.
pub async fn claim_parent(repo: &Repository, parent: &str, child: &str) -> Result<(), Error> {
    write_mark(repo, &needed_by_key(parent, child), parent, &format!("base-push {child}")).await
}

/// Withdraws a claim (the incremental backup failed, or its record, naming the parent, now exists).
pub async fn release_parent(repo: &Repository, parent: &str, child: &str) -> Result<(), Error> {
    remove_mark(repo, &needed_by_key(parent, child)).await
}

/// The incremental backups claiming backup `name` now (asked again after an expiry mark is written).
pub async fn claims_on(repo: &Repository, name: &str) -> Result<Vec<String>, Error> {
    Ok(claims_with_age(repo, name).await?.into_iter().map(|claim| claim.child).collect())
}

/// One claim on a parent backup, as the store lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The incremental backup being taken on top of the parent.
    pub child: String,
    /// When the claim was stored, by the store's clock (`None` where the store does not say): a claim
    /// whose child never got a record is abandoned once it is older than `abandoned_after`.
    pub modified: Option<SystemTime>,
}

impl Claim {
    /// Whether the claim is older than `age` at `now`. A claim of unknown age is never stale: it
    /// keeps its parent until its child's record makes it redundant.
    pub fn older_than(&self, age: Duration, now: SystemTime) -> bool {
        self.modified.is_some_and(|at| now.duration_since(at).is_ok_and(|elapsed| elapsed > age))
    }
}

/// The claims on backup `name` now, with their ages.
pub async fn claims_with_age(repo: &Repository, name: &str) -> Result<Vec<Claim>, Error> {
    let prefix = format!("{CATALOG_PREFIX}{name}.{NEEDED_BY}");
    let mut claims = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = repo.storage().list(&prefix, after.as_deref(), 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        claims.extend(page.into_iter().filter_map(|meta| {
            let child = meta.key.strip_prefix(&prefix).filter(|c| validate_name(c).is_ok())?;
            Some(Claim { child: child.to_owned(), modified: meta.modified })
        }));
    }
    Ok(claims)
}

/// Why a restore of `record` could not use its chain, judged from records at hand (`parent_of` finds
/// a backup's record by name, `None` when the catalog has none): the rules of
/// [`super::chain_of`], link by link the same ([`next_link`], [`parent_problem`]), and with its
/// wording. `None`: the chain is whole (a full backup is a chain of one). base-expire judges its
/// whole catalog with it, from one listing, without a request per link.
pub fn chain_problem<'a>(
    record: &'a BackupRecord,
    parent_of: impl Fn(&str) -> Option<&'a BackupRecord>,
) -> Option<String> {
    let (mut child, mut length) = (record, 1);
    loop {
        let parent_name = match next_link(child, length) {
            Ok(None) => return None,
            Ok(Some(name)) => name,
            Err(reason) => return Some(broken_chain(child, &reason)),
        };
        let parent = parent_of(parent_name);
        if let Some(reason) = parent_problem(child, parent_name, parent) {
            return Some(broken_chain(child, &reason));
        }
        (child, length) = (parent.expect("parent_problem says a missing parent"), length + 1);
    }
}

/// The parent `child` rests on, at link `length` of a chain (the restored backup is link 1):
/// `Ok(None)` for a full backup (the chain ends there), the parent's name to look up, or why the
/// link is broken: an incremental backup without a parent, a chain too long to be anything but a
/// loop, a parent name that is no backup name or is not older than its child.
pub(crate) fn next_link(child: &BackupRecord, length: usize) -> Result<Option<&str>, String> {
    let Some(parent_name) = child.parent.as_deref() else {
        return match child.backup_type {
            BackupType::Full => Ok(None),
            BackupType::Incremental => Err("its catalog record names no parent".into()),
        };
    };
    if length >= MAX_CHAIN_LEN {
        return Err(format!("its chain is longer than {MAX_CHAIN_LEN} backups"));
    }
    validate_name(parent_name)?;
    if parent_name >= child.name.as_str() {
        return Err(format!("its parent {parent_name} is not older than it"));
    }
    Ok(Some(parent_name))
}

/// What is wrong with `child`'s parent `parent_name` as found (`None`: not in the catalog): gone,
/// or of another cluster or major version.
pub(crate) fn parent_problem(child: &BackupRecord, parent_name: &str, parent: Option<&BackupRecord>) -> Option<String> {
    let Some(parent) = parent else {
        return Some(format!("its parent {parent_name} is no longer in the catalog"));
    };
    (parent.system_identifier != child.system_identifier || parent.pg_version != child.pg_version).then(|| {
        format!(
            "its parent {parent_name} is of another cluster (system {} PostgreSQL {}, not system {} PostgreSQL {})",
            parent.system_identifier, parent.pg_version, child.system_identifier, child.pg_version
        )
    })
}

/// How a broken link is said, by [`chain_problem`] and [`super::chain_of`] alike.
pub(crate) fn broken_chain(child: &BackupRecord, reason: &str) -> String {
    format!("incremental backup {} cannot be restored: {reason}", child.name)
}

/// Whether a base-expire has marked backup `name` for removal.
pub async fn is_expiring(repo: &Repository, name: &str) -> Result<bool, Error> {
    match repo.storage().head(&expiring_key(name)).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether backup `name` is pinned now (asked again just before an expiry removes its record).
pub async fn is_pinned(repo: &Repository, name: &str) -> Result<bool, Error> {
    match repo.storage().head(&pin_key(name)).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::test_record;

    fn incremental(hour: i64, parent: &str) -> BackupRecord {
        let mut record = test_record(hour, 1, hour as u64 + 2);
        (record.backup_type, record.parent) = (BackupType::Incremental, Some(parent.to_owned()));
        record
    }

    #[test]
    fn a_chain_is_whole_only_down_to_a_full_backup_of_the_same_cluster() {
        let full = test_record(1, 1, 3);
        let middle = incremental(2, &full.name);
        let last = incremental(3, &middle.name);
        let catalog = [&full, &middle, &last];
        let find = |name: &str| catalog.iter().copied().find(|r| r.name == name);
        assert_eq!(chain_problem(&full, find), None, "a full backup is a chain of one");
        assert_eq!(chain_problem(&last, find), None);
        let without_middle = |name: &str| find(name).filter(|r| r.name != middle.name);
        let missing = chain_problem(&last, without_middle).unwrap();
        let expected = format!(
            "incremental backup {} cannot be restored: its parent {} is no longer in the catalog",
            last.name, middle.name
        );
        assert_eq!(missing, expected, "chain_of's wording");
        let mut other = full.clone();
        other.system_identifier = "2".into();
        let other_cluster = |name: &str| if name == full.name { Some(&other) } else { find(name) };
        assert!(chain_problem(&last, other_cluster).unwrap().contains("of another cluster"));
        let newer = incremental(1, &last.name);
        assert!(chain_problem(&newer, find).unwrap().contains("is not older than it"));
        let mut orphan = incremental(4, &full.name);
        orphan.parent = None;
        assert!(chain_problem(&orphan, find).unwrap().contains("names no parent"));
    }
}
