//! The deleting half of a run, in its safe order, and its dry twin: the same walk that would delete
//! reports instead, so `--dry-run` lists exactly what a real run removes.
//!
//! A backup: its expiry mark (`catalog/<NAME>.expiring`), then its catalog record (from then on no
//! command sees the backup), then its objects under `backups/<NAME>/` with the owner record last,
//! then the mark. A run killed anywhere in between leaves the mark without a record, and the next
//! run finishes the removal. WAL files go in batches while the listing streams.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::base::catalog::{claims_with_age, expiring_key, needed_by_key, remove_mark, write_mark};
use crate::base::{BACKUPS_PREFIX, BackupRecord, HISTORY_PREFIX, is_pinned, owner_key, read_record, release_parent};
use crate::error::Error;
use crate::failpoint;
use crate::log::Log;
use crate::repo::Repository;
use crate::retry::with_deadline;
use crate::storage::ObjectMeta;
use crate::wal::WalFileName;

use super::{Deletions, WalRule};

const WAL_PREFIX: &str = "wal/";
/// Keys deleted at once: one S3 DeleteObjects request.
const BATCH: usize = 1000;

/// Deletes (or, dry, reports) and counts what it deleted.
pub(super) struct Remover<'a> {
    repo: &'a Repository,
    log: &'a Log,
    /// How long one step (a listing page, a batch of deletes, one backup's records) may retry.
    deadline: Duration,
    dry_run: bool,
    deletions: &'a mut dyn Deletions,
    objects: u64,
    bytes: u64,
    timelines: BTreeSet<u32>,
    claims_removed: u64,
}

/// What became of a backup the policy expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fate {
    /// Removed (or, dry, would be).
    Removed,
    /// Pinned since the catalog was read: it stays.
    Pinned,
    /// Claimed by these incremental backups, being taken or finished since the catalog was read: it
    /// stays.
    Claimed(Vec<String>),
}

/// How claims on a parent are judged.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClaimRule {
    /// A claim whose child has no record and that is older than this is abandoned.
    pub(super) abandoned_after: Duration,
    /// Now, by this host's clock (compared with the store's).
    pub(super) now: SystemTime,
}

impl<'a> Remover<'a> {
    pub(super) fn new(
        repo: &'a Repository,
        log: &'a Log,
        deadline: Duration,
        dry_run: bool,
        deletions: &'a mut dyn Deletions,
    ) -> Self {
        Remover {
            repo,
            log,
            deadline,
            dry_run,
            deletions,
            objects: 0,
            bytes: 0,
            timelines: BTreeSet::new(),
            claims_removed: 0,
        }
    }

    /// One listing page, retried within the step's deadline.
    async fn list(&self, prefix: &str, after: Option<&str>) -> Result<Vec<ObjectMeta>, Error> {
        let what = self.repo.storage().location(prefix);
        with_deadline(self.deadline, self.log, &what, || async {
            Ok(self.repo.storage().list(prefix, after, BATCH).await?)
        })
        .await
    }

    /// The stored size of `key` (0 when it is gone), retried within the step's deadline.
    async fn size_of(&self, key: &str) -> Result<u64, Error> {
        let what = self.repo.storage().location(key);
        with_deadline(self.deadline, self.log, &what, || async {
            match self.repo.storage().head(key).await {
                Ok(meta) => Ok(meta.size),
                Err(e) if e.is_not_found() => Ok(0),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Objects and bytes removed so far.
    pub(super) fn counted(&self) -> (u64, u64) {
        (self.objects, self.bytes)
    }

    /// The timelines of the WAL files the sweep saw.
    pub(super) fn timelines_seen(&self) -> &BTreeSet<u32> {
        &self.timelines
    }

    /// Removes an expired backup, unless a pin or a claim found after its expiry mark was written
    /// keeps it (the mark is then removed again).
    pub(super) async fn backup(&mut self, record: &BackupRecord, claims: &ClaimRule) -> Result<Fate, Error> {
        let name = &record.name;
        // A pin set since the catalog was read wins; the window left is this one request.
        let (mark, key) = (expiring_key(name), BackupRecord::catalog_key(name));
        let location = self.repo.storage().location(&key);
        let pinned = with_deadline(self.deadline, self.log, &location, || async {
            if is_pinned(self.repo, name).await? {
                return Ok(true);
            }
            if !self.dry_run {
                write_mark(self.repo, &mark, name, "base-expire").await?;
            }
            Ok(false)
        })
        .await?;
        if pinned {
            return Ok(Fate::Pinned);
        }
        // After the mark: a base-push that claimed the backup before the mark was written is seen
        // now, and one that claims it later sees the mark and takes no incremental backup on it.
        let claimed = self.claimed(name, claims).await?;
        if !claimed.is_empty() {
            if !self.dry_run {
                with_deadline(self.deadline, self.log, &location, || remove_mark(self.repo, &mark)).await?;
            }
            return Ok(Fate::Claimed(claimed));
        }
        failpoint::hit("base-expire:marked");
        let size = self.size_of(&key).await?;
        self.delete(vec![(key, size)]).await?;
        failpoint::hit("base-expire:unlisted");
        self.backup_objects(name, false).await?;
        Ok(Fate::Removed)
    }

    /// The children whose claims on `parent` keep it now; redundant and stale claims are released
    /// on the way (not in a dry run).
    pub(super) async fn claimed(&mut self, parent: &str, rule: &ClaimRule) -> Result<Vec<String>, Error> {
        let location = self.repo.storage().location(&needed_by_key(parent, ""));
        let claims = with_deadline(self.deadline, self.log, &location, || claims_with_age(self.repo, parent)).await?;
        let mut keeping = Vec::new();
        for claim in claims {
            let child = with_deadline(self.deadline, self.log, &location, || async {
                match read_record(self.repo, &claim.child).await {
                    Ok(record) => Ok(Some(record)),
                    Err(Error::NoSuchBackup(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
            let (keeps, release) = match &child {
                // Finished since the catalog was read (or kept late): it needs its parent, and its
                // record says so from now on.
                Some(record) if record.parent.as_deref() == Some(parent) => {
                    (true, Some("its incremental backup is complete and its record names the parent"))
                }
                Some(_) => (false, Some("the backup it names has another parent")),
                None if claim.older_than(rule.abandoned_after, rule.now) => {
                    (false, Some("no incremental backup was recorded and it is older than abandoned_after"))
                }
                None => (true, None),
            };
            if keeps {
                keeping.push(claim.child.clone());
            }
            if let (Some(why), false) = (release, self.dry_run) {
                let key = self.repo.storage().location(&needed_by_key(parent, &claim.child));
                self.log.info(format_args!("removing claim {key}: {why}"));
                with_deadline(self.deadline, self.log, &location, || release_parent(self.repo, parent, &claim.child))
                    .await?;
                self.claims_removed += 1;
            }
        }
        Ok(keeping)
    }

    /// Claims released so far.
    pub(super) fn claims_removed(&self) -> u64 {
        self.claims_removed
    }

    /// Removes everything under `backups/<name>/`, the owner record last, then the expiry mark.
    /// `resuming`: the mark was there before this run (it is reported as deleted too).
    pub(super) async fn backup_objects(&mut self, name: &str, resuming: bool) -> Result<(), Error> {
        let prefix = format!("{BACKUPS_PREFIX}{name}/");
        if !self.dry_run {
            // Open uploads and temporary files of the writer: it finished or died long ago.
            let what = self.repo.storage().location(&prefix);
            with_deadline(self.deadline, self.log, &what, || async {
                Ok(self.repo.storage().remove_incomplete(&prefix).await?)
            })
            .await?;
        }
        let owner_key = owner_key(name);
        let mut owner = None;
        let mut after: Option<String> = None;
        loop {
            let page = self.list(&prefix, after.as_deref()).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            let mut batch = Vec::with_capacity(page.len());
            for meta in page {
                if meta.key == owner_key {
                    owner = Some((meta.key, meta.size));
                } else {
                    batch.push((meta.key, meta.size));
                }
            }
            self.delete(batch).await?;
            failpoint::hit("base-expire:parts");
        }
        self.delete(owner.into_iter().collect()).await?;
        let mark = expiring_key(name);
        if resuming {
            let size = self.size_of(&mark).await?;
            self.report(&[(mark.clone(), size)]);
        }
        if !self.dry_run {
            let what = self.repo.storage().location(&mark);
            with_deadline(self.deadline, self.log, &what, || remove_mark(self.repo, &mark)).await?;
        }
        Ok(())
    }

    /// Sweeps `wal/` (history files aside): every file `rule` does not keep goes, a batch at a time.
    /// Returns the files and bytes removed.
    pub(super) async fn wal(&mut self, rule: &WalRule) -> Result<(u64, u64), Error> {
        let before = (self.objects, self.bytes);
        let mut batch = Vec::with_capacity(BATCH);
        let mut after: Option<String> = None;
        loop {
            let page = self.list(WAL_PREFIX, after.as_deref()).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for meta in page {
                if meta.key.starts_with(HISTORY_PREFIX) {
                    continue;
                }
                let file_name = meta.key.rsplit('/').next().unwrap_or_default();
                // Anything that is not a WAL file name is not ours to judge.
                let Ok(name) = WalFileName::parse(file_name) else { continue };
                self.timelines.insert(name.timeline());
                if !rule.keeps(&name) {
                    batch.push((meta.key, meta.size));
                }
            }
            if batch.len() >= BATCH {
                failpoint::hit("base-expire:wal");
                self.delete(std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            failpoint::hit("base-expire:wal");
        }
        self.delete(batch).await?;
        Ok((self.objects - before.0, self.bytes - before.1))
    }

    /// Deletes `objects` (key, stored bytes), or in a dry run only reports them.
    async fn delete(&mut self, objects: Vec<(String, u64)>) -> Result<(), Error> {
        if objects.is_empty() {
            return Ok(());
        }
        if !self.dry_run {
            let keys: Vec<String> = objects.iter().map(|(key, _)| key.clone()).collect();
            let what = self.repo.storage().location(&keys[0]);
            with_deadline(self.deadline, self.log, &what, || async {
                Ok(self.repo.storage().delete_many(&keys).await?)
            })
            .await?;
        }
        self.report(&objects);
        Ok(())
    }

    fn report(&mut self, objects: &[(String, u64)]) {
        for (key, size) in objects {
            self.deletions.object(key, *size);
            self.objects += 1;
            self.bytes += size;
        }
    }
}
