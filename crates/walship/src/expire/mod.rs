//! Retention: base-expire deletes the backups a policy no longer keeps and the WAL no kept backup can
//! need, in an order that a kill at any moment leaves safe.
//!
//! One run: read the catalog (records, pins, expiry marks, claims) in one listing; decide
//! (`policy.rs`: a kept incremental backup keeps its whole chain); finish removals an earlier run was
//! cut off in; remove each expired backup, newest first so that no child outlives its parent (mark,
//! claims checked, record, parts, owner, mark: `remove.rs`); then sweep the WAL (`wal_rule.rs` decides each file) in batches while
//! the listing streams; then the housekeeping of what killed writers left. Backups are gone from
//! `base-list` and `base-fetch` the moment their record is, before any part is touched; WAL goes only
//! after the backups, so a kill between the two leaves extra WAL, never a backup without its WAL.
//! A backup still being written has no record yet, so nothing here ever looks at it; an incremental
//! one claims its parent (`catalog/<PARENT>.needed-by-<CHILD>`) before it reads the parent's
//! manifest, and the claim is looked for after the parent's expiry mark is written: of the two
//! writers, at least one sees the other's object and backs off.

mod policy;
mod remove;
mod wal_rule;

pub use policy::{Candidate, Decision, Keep, Policy, decide};
pub use wal_rule::WalRule;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use remove::{ClaimRule, Fate};

use crate::base::{self, BackupRecord, BackupType, CatalogEntry};
use crate::error::Error;
use crate::log::Log;
use crate::repo::Repository;
use crate::retry;
use crate::storage::Housekeeping;
use crate::wal::segment_file_name;

/// How a run goes.
#[derive(Debug, Clone)]
pub struct ExpireOptions {
    /// What to keep.
    pub policy: Policy,
    /// Decide and report, delete nothing.
    pub dry_run: bool,
    /// Temporary files and multipart uploads older than this are abandoned (housekeeping).
    pub stale_after: Duration,
    /// Now, in Unix nanoseconds (the window's end).
    pub now: i128,
    /// How long one step (reading the catalog, a listing page, a batch of deletes) may retry
    /// transient failures: a run over a large repository takes longer than any one deadline.
    pub deadline: Duration,
}

/// One backup in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// Its name.
    pub name: String,
    /// When it finished (RFC 3339).
    pub finished_at: String,
    /// Its timeline.
    pub timeline: u32,
    /// Its stored bytes (catalog record).
    pub stored_bytes: u64,
    /// Why it stays (empty for an expired one).
    pub kept: Vec<Keep>,
    /// Full or incremental.
    pub backup_type: BackupType,
    /// An incremental backup's parent.
    pub parent: Option<String>,
    /// The kept incremental backups that rest directly on this one (why it stays, with
    /// [`Keep::NeededBy`] or [`Keep::Claimed`]).
    pub needed_by: Vec<String>,
    /// Why it cannot be restored, for an incremental backup whose chain is broken.
    pub broken_chain: Option<String>,
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct ExpireReport {
    /// Nothing was deleted.
    pub dry_run: bool,
    /// The backups that stay, oldest first.
    pub kept: Vec<BackupSummary>,
    /// The backups removed, oldest first.
    pub expired: Vec<BackupSummary>,
    /// Removals an earlier, interrupted run had begun, finished now.
    pub resumed: Vec<String>,
    /// Objects deleted (or to be), their bytes: backups' and WAL's.
    pub backup_objects: u64,
    /// Bytes of those objects, as stored.
    pub backup_bytes: u64,
    /// WAL files deleted (or to be).
    pub wal_files: u64,
    /// Their bytes as stored.
    pub wal_bytes: u64,
    /// Per timeline seen in the WAL, the first segment that stays on it (the oldest a kept backup
    /// can need), by name.
    pub first_kept_segment: Vec<(u32, String)>,
    /// What the housekeeping removed (nothing in a dry run).
    pub housekeeping: Housekeeping,
    /// Things the operator should know once (a store that lacks a request, say).
    pub notices: Vec<String>,
    /// Claims on parent backups removed: made redundant by their child's record, or abandoned.
    pub claims_removed: u64,
}

/// Every object a run deletes, or would: for `--dry-run`'s listing and for tests.
pub trait Deletions {
    /// `key` (of `bytes` stored bytes) is deleted, or would be.
    fn object(&mut self, key: &str, bytes: u64);
}

impl<F: FnMut(&str, u64)> Deletions for F {
    fn object(&mut self, key: &str, bytes: u64) {
        self(key, bytes)
    }
}

/// Runs retention on `repo`.
pub async fn base_expire(
    repo: &Repository,
    options: &ExpireOptions,
    log: &Log,
    deletions: &mut dyn Deletions,
) -> Result<ExpireReport, Error> {
    let (identity, catalog, lineage, ancestry) = retry::with_deadline(options.deadline, log, repo.url(), || async {
        let identity = repo.require_identity().await?;
        Ok((identity, read_catalog(repo).await?, base::lineage(repo, None).await?, ancestry(repo).await?))
    })
    .await?;
    let mut decisions = decide(catalog.candidates, &options.policy, options.now, lineage);
    let mut report = ExpireReport { dry_run: options.dry_run, ..ExpireReport::default() };
    let mut remover = remove::Remover::new(repo, log, options.deadline, options.dry_run, deletions);
    for name in &catalog.interrupted {
        log.info(format_args!("finishing the removal of backup {name}, begun by an earlier run"));
        remover.backup_objects(name, true).await?;
        report.resumed.push(name.clone());
    }
    let claims = ClaimRule { abandoned_after: options.stale_after, now: SystemTime::now() };
    let removed = remove_expired(&mut remover, &mut decisions, &claims, log).await?;
    for decision in decisions.iter().filter(|d| d.is_kept()) {
        let name = &decision.candidate.record.name;
        if catalog.marked.contains(name) && !options.dry_run {
            // An earlier run meant to remove it and was cut off before its record went; it stays now.
            let mark = base::catalog::expiring_key(name);
            let what = repo.storage().location(&mark);
            retry::with_deadline(options.deadline, log, &what, || base::catalog::remove_mark(repo, &mark)).await?;
        }
    }
    // Claims on backups that stay: those made redundant by their child's record, or abandoned.
    for name in catalog.claimed.iter().filter(|name| !removed.contains(name.as_str())) {
        remover.claimed(name, &claims).await?;
    }
    report.kept = decisions.iter().filter(|d| d.is_kept()).map(summary_of).collect();
    report.expired = decisions.iter().filter(|d| removed.contains(&d.candidate.record.name)).map(summary_of).collect();
    (report.backup_objects, report.backup_bytes) = remover.counted();
    let kept: Vec<&Decision> = decisions.iter().filter(|d| d.is_kept()).collect();
    let rule = wal_rule(identity.wal_segment_size, &kept, ancestry);
    (report.wal_files, report.wal_bytes) = remover.wal(&rule).await?;
    report.first_kept_segment = remover
        .timelines_seen()
        .iter()
        .filter_map(|&t| Some((t, segment_file_name(t, rule.first_kept(t)?, identity.wal_segment_size)?)))
        .collect();
    report.claims_removed = remover.claims_removed();
    if !options.dry_run {
        let stale = options.stale_after;
        report.housekeeping = retry::with_deadline(options.deadline, log, repo.url(), || async {
            Ok(repo.storage().remove_stale(stale).await?)
        })
        .await?;
    }
    report.notices = repo.storage().notices();
    Ok(report)
}

/// Removes the backups the policy expired, children before their parents (a child is newer than
/// its parent), so that a run cut off anywhere leaves no listed incremental backup without its
/// parent. One that stays after all (pinned or claimed meanwhile) keeps its whole chain with it.
/// Returns the names removed.
async fn remove_expired(
    remover: &mut remove::Remover<'_>,
    decisions: &mut [Decision],
    claims: &ClaimRule,
    log: &Log,
) -> Result<BTreeSet<String>, Error> {
    let index: HashMap<String, usize> =
        decisions.iter().enumerate().map(|(i, d)| (d.candidate.record.name.clone(), i)).collect();
    let mut removed = BTreeSet::new();
    for i in (0..decisions.len()).rev() {
        if decisions[i].is_kept() {
            continue;
        }
        let name = decisions[i].candidate.record.name.clone();
        let (reason, children) = match remover.backup(&decisions[i].candidate.record, claims).await? {
            Fate::Removed => {
                removed.insert(name);
                continue;
            }
            Fate::Pinned => {
                log.info(format_args!("backup {name} was pinned meanwhile; it stays"));
                (Keep::Pinned, Vec::new())
            }
            Fate::Claimed(children) => {
                log.info(format_args!(
                    "backup {name} stays: incremental backup(s) {} being taken on top of it claim it",
                    children.join(", ")
                ));
                (Keep::Claimed, children)
            }
        };
        let decision = &mut decisions[i];
        decision.keep(reason);
        decision.needed_by.extend(children);
        if decision.broken_chain.is_none() {
            policy::keep_ancestors(decisions, &index, i, Keep::NeededBy { later_wal: reason.keeps_later_wal() });
        }
    }
    Ok(removed)
}

fn summary_of(decision: &Decision) -> BackupSummary {
    let record = &decision.candidate.record;
    BackupSummary {
        name: record.name.clone(),
        finished_at: record.finished_at.clone(),
        timeline: record.timeline,
        stored_bytes: record.stored_bytes,
        kept: decision.kept.clone(),
        backup_type: record.backup_type,
        parent: record.parent.clone(),
        needed_by: decision.needed_by.clone(),
        broken_chain: decision.broken_chain.clone(),
    }
}

/// The catalog as one run sees it.
struct Catalog {
    candidates: Vec<Candidate>,
    /// Names with an expiry mark and no record: a removal to finish.
    interrupted: Vec<String>,
    /// Names with an expiry mark and a record still there.
    marked: Vec<String>,
    /// Names claimed by incremental backups (`.needed-by-<CHILD>`), with a record or not.
    claimed: Vec<String>,
}

async fn read_catalog(repo: &Repository) -> Result<Catalog, Error> {
    let mut catalog =
        Catalog { candidates: Vec::new(), interrupted: Vec::new(), marked: Vec::new(), claimed: Vec::new() };
    base::for_each_entry(repo, |entry: CatalogEntry| {
        if !entry.needed_by.is_empty() {
            catalog.claimed.push(entry.name.clone());
        }
        match entry.record {
            Some(record) => {
                if entry.expiring {
                    catalog.marked.push(entry.name);
                }
                // Without its parts list: a catalog of large backups stays small in memory.
                let record = BackupRecord { archives: Vec::new(), ..record };
                catalog.candidates.push(Candidate { record, pinned: entry.pinned });
            }
            None if entry.expiring => catalog.interrupted.push(entry.name),
            None => {}
        }
        Ok(())
    })
    .await?;
    Ok(catalog)
}

/// The WAL predicate for the backups that stay: those kept by the policy keep the WAL from their
/// start on; those kept only by a pin keep their own range.
fn wal_rule(segment_size: u32, kept: &[&Decision], ancestry: HashMap<u32, Vec<u32>>) -> WalRule {
    let onward = kept.iter().filter(|d| d.keeps_later_wal()).map(|d| &d.candidate.record);
    let ranges = kept.iter().filter(|d| !d.keeps_later_wal()).map(|d| &d.candidate.record);
    WalRule::new(segment_size, onward, ranges, ancestry)
}

/// Every timeline's ancestors, from the history files in the repository.
async fn ancestry(repo: &Repository) -> Result<HashMap<u32, Vec<u32>>, Error> {
    let mut ancestors = HashMap::new();
    for timeline in base::history_timelines(repo).await? {
        let forks = base::read_history(repo, timeline).await?;
        ancestors.insert(timeline, forks.into_iter().map(|(parent, _)| parent).collect());
    }
    Ok(ancestors)
}

#[cfg(test)]
mod tests;
