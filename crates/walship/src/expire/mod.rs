//! Retention: base-expire deletes the backups a policy no longer keeps and the WAL no kept backup can
//! need, in an order that a kill at any moment leaves safe.
//!
//! One run: read the catalog (records, pins, expiry marks) in one listing; decide (`policy.rs`);
//! finish removals an earlier run was cut off in; remove each expired backup (mark, record, parts,
//! owner, mark: `remove.rs`); then sweep the WAL (`wal_rule.rs` decides each file) in batches while
//! the listing streams; then the housekeeping of what killed writers left. Backups are gone from
//! `base-list` and `base-fetch` the moment their record is, before any part is touched; WAL goes only
//! after the backups, so a kill between the two leaves extra WAL, never a backup without its WAL.
//! A backup still being written has no record yet, so nothing here ever looks at it.

mod policy;
mod remove;
mod wal_rule;

pub use policy::{Candidate, Decision, Keep, Policy, decide};
pub use wal_rule::WalRule;

use std::collections::HashMap;
use std::time::Duration;

use crate::base::{self, BackupRecord, CatalogEntry};
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
    let decisions = decide(catalog.candidates, &options.policy, options.now, lineage);
    let mut report = ExpireReport { dry_run: options.dry_run, ..ExpireReport::default() };
    let mut remover = remove::Remover::new(repo, log, options.deadline, options.dry_run, deletions);
    for name in &catalog.interrupted {
        log.info(format_args!("finishing the removal of backup {name}, begun by an earlier run"));
        remover.backup_objects(name, true).await?;
        report.resumed.push(name.clone());
    }
    for decision in &decisions {
        let summary = summary_of(decision);
        if decision.is_kept() {
            if catalog.marked.contains(&summary.name) && !options.dry_run {
                // An earlier run meant to remove it and was cut off before its record went; the
                // policy keeps it now.
                let mark = base::catalog::expiring_key(&summary.name);
                let what = repo.storage().location(&mark);
                retry::with_deadline(options.deadline, log, &what, || base::catalog::remove_mark(repo, &mark)).await?;
            }
            report.kept.push(summary);
        } else if remover.backup(&decision.candidate.record).await? {
            report.expired.push(summary);
        } else {
            log.info(format_args!("backup {} was pinned meanwhile; it stays", summary.name));
        }
    }
    (report.backup_objects, report.backup_bytes) = remover.counted();
    let kept: Vec<&Decision> = decisions.iter().filter(|d| d.is_kept()).collect();
    let rule = wal_rule(identity.wal_segment_size, &kept, ancestry);
    (report.wal_files, report.wal_bytes) = remover.wal(&rule).await?;
    report.first_kept_segment = remover
        .timelines_seen()
        .iter()
        .filter_map(|&t| Some((t, segment_file_name(t, rule.first_kept(t)?, identity.wal_segment_size)?)))
        .collect();
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

fn summary_of(decision: &Decision) -> BackupSummary {
    let record = &decision.candidate.record;
    BackupSummary {
        name: record.name.clone(),
        finished_at: record.finished_at.clone(),
        timeline: record.timeline,
        stored_bytes: record.stored_bytes,
        kept: decision.kept.clone(),
    }
}

/// The catalog as one run sees it.
struct Catalog {
    candidates: Vec<Candidate>,
    /// Names with an expiry mark and no record: a removal to finish.
    interrupted: Vec<String>,
    /// Names with an expiry mark and a record still there.
    marked: Vec<String>,
}

async fn read_catalog(repo: &Repository) -> Result<Catalog, Error> {
    let mut catalog = Catalog { candidates: Vec::new(), interrupted: Vec::new(), marked: Vec::new() };
    base::for_each_entry(repo, |entry: CatalogEntry| {
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
