//! Base backups: pg_basebackup's tar stream stored in parts, a catalog record per backup, and
//! restores that write their own recovery settings.
//!
//! ```text
//! backups/<NAME>/owner.json           who is writing the backup (host, boot, pid): lets the next
//!                                     base-push remove what a killed one left
//! backups/<NAME>/base.tar.<NNNNNN>    the tar stream of pg_basebackup -Ft -X fetch, cut into parts,
//!                                     each a codec object (zstd, SHA-256 trailer)
//! backups/<NAME>/backup_manifest      a copy of the backup's manifest (codec object)
//! catalog/<NAME>.json                 the catalog record (plain JSON), written last
//! ```
//!
//! A backup exists only once its catalog record does: base-list and base-fetch read `catalog/` and
//! nothing else, so a backup cut short can never be picked for a restore. `NAME` is the UTC time the
//! backup started, `YYYYMMDDTHHMMSSZ`, so names sort by time.
//!
//! One file per job. Taking a backup: `push.rs` (the orchestration) calls `owner.rs` (owner
//! records, name reservation, the sweep of abandoned backups), `tools.rs` (finding PostgreSQL's
//! programs), `basebackup.rs` (running pg_basebackup), `reader.rs` (the reader thread: tar watch and
//! encoding, with `tar_watch.rs`), `parts.rs` (the part writer), `signals.rs` and `manifest.rs`
//! (backup_label, backup_manifest, tablespace_map). Restoring: `fetch.rs` (the orchestration) calls
//! `extract.rs` (decoding and unpacking the parts), `manifest.rs` (the held-back manifest copy),
//! `recovery.rs` (targets and recovery settings) and `timeline.rs` (which backups a timeline can use).
//! Incremental backups: `incremental.rs` (the parent, its claim and manifest, PostgreSQL's refusals)
//! for base-push, `combine.rs` (a chain restored into scratch space and combined) and `cancel.rs`
//! (a signal stops a restore and removes what it wrote) for base-fetch.

mod basebackup;
mod cancel;
pub mod catalog;
mod combine;
mod extract;
mod fetch;
mod incremental;
mod manifest;
mod owner;
mod parts;
mod push;
mod reader;
pub(crate) mod recovery;
mod signals;
mod tar_watch;
mod timeline;
mod tools;

pub use catalog::{
    CatalogEntry, claim_parent, claims_on, for_each_entry, is_expiring, is_pinned, release_parent, set_pinned,
};
pub use fetch::{FetchOptions, RestoreReport, Verification, base_fetch};
pub(crate) use fetch::{part_mismatch, stored_mismatch};
pub use incremental::{IncrementalOptions, MIN_INCREMENTAL_VERSION};
pub(crate) use manifest::{ManifestSummary, manifest_summary};
pub(crate) use owner::{Owner, owner_key};
pub use push::{PushOptions, base_push};
pub use recovery::{RecoveryTarget, TargetAction, parse_timestamp, restore_command};
pub(crate) use signals::Signals;
pub(crate) use timeline::{HISTORY_PREFIX, history_timelines, read_history};
pub use timeline::{Lineage, lineage};
pub(crate) use tools::find_tool_of_version;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::repo::Repository;
use crate::storage::StorageError;

/// Where the catalog records are: a backup exists once its record does.
pub const CATALOG_PREFIX: &str = "catalog/";
/// Where each backup's objects are (`backups/<NAME>/`).
pub const BACKUPS_PREFIX: &str = "backups/";
/// The newest catalog record format this build reads. It writes format 1 for a full backup, which
/// every walship reads, and format 2 for an incremental one, so that a walship that knows nothing of
/// chains refuses it ("upgrade walship") rather than restoring one link as if it were whole.
pub const CATALOG_FORMAT_VERSION: u32 = 2;
/// The format of a full backup's record.
pub const FULL_RECORD_FORMAT: u32 = 1;
/// The format of an incremental backup's record (it has a parent).
pub const INCREMENTAL_RECORD_FORMAT: u32 = 2;
/// A chain longer than this is taken for a damaged catalog (a loop of parents) rather than walked.
pub const MAX_CHAIN_LEN: usize = 1000;
/// A catalog record lists its parts; even a petabyte in 256 MiB parts stays far below this.
const MAX_RECORD_LEN: u64 = 64 << 20;

/// Reports how far a long transfer has got. base-push and base-fetch call it as bytes pass; the
/// commands draw a progress bar on a terminal and log a line now and then otherwise.
pub trait Progress: Send + Sync {
    /// `done` bytes of the backup's original (uncompressed) stream so far, `stored` bytes on the
    /// repository side; `total` where known (restores).
    fn update(&self, done: u64, stored: u64, total: Option<u64>);
    /// Says what the command is doing now ("verifying", "syncing").
    fn phase(&self, what: &str);
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _: u64, _: u64, _: Option<u64>) {}
    fn phase(&self, _: &str) {}
}

/// Bytes transferred so far: of the backup's original stream, and as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Transferred {
    original: u64,
    stored: u64,
}

/// One stored object of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// Its key in the repository.
    pub key: String,
    /// Its bytes before encoding.
    pub original_bytes: u64,
    /// Its bytes as stored (compressed, with the trailer).
    pub stored_bytes: u64,
    /// SHA-256 of the original bytes, as the object's trailer also records.
    pub sha256: String,
}

/// One tar archive of a backup: `base.tar` (the data directory) or `<OID>.tar` (a tablespace's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    /// `base.tar` or `<OID>.tar`.
    pub name: String,
    /// For a tablespace's archive: which tablespace, and where it lived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace: Option<TablespaceRecord>,
    /// Its parts, in order: their original bytes, concatenated, are the tar archive.
    pub parts: Vec<PartRecord>,
}

/// The tablespace a `<OID>.tar` archive holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceRecord {
    /// The tablespace's OID (its `pg_tblspc/<OID>` link).
    pub oid: u32,
    /// The tablespace's directory on the backed-up server (from `tablespace_map`).
    pub location: String,
}

/// The pg_basebackup that took a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolRecord {
    /// As `pg_basebackup --version` prints it.
    pub version: String,
    /// The arguments it ran with (passwords in connection strings replaced by `***`).
    pub arguments: Vec<String>,
}

/// Whether a backup holds every file (`full`) or only what changed since its parent
/// (`incremental`, PostgreSQL 17+ with `summarize_wal`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    /// Restorable alone.
    #[default]
    Full,
    /// Restorable only with its parent's chain, combined by pg_combinebackup.
    Incremental,
}

impl BackupType {
    /// `full` or `incremental`, as the catalog, base-list and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Incremental => "incremental",
        }
    }
}

/// The catalog record of one complete backup (`catalog/<NAME>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// The record format ([`CATALOG_FORMAT_VERSION`] when written by this build).
    pub format_version: u32,
    /// The backup's name, `YYYYMMDDTHHMMSSZ`: when it started.
    pub name: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// When pg_basebackup finished: the backup is consistent at some point before this.
    pub finished_at: String,
    /// Where the backup's WAL starts (backup_label's START WAL LOCATION).
    pub start_lsn: String,
    /// Where recovery from it becomes consistent (the manifest's last WAL range's end).
    pub stop_lsn: String,
    /// The WAL file that holds `start_lsn`.
    pub start_wal_file: String,
    /// The timeline the backup started on.
    pub timeline: u32,
    /// The timeline it ended on (a standby's may have moved on meanwhile).
    pub stop_timeline: u32,
    /// "primary" or "standby", from backup_label.
    pub backup_from: String,
    /// The PostgreSQL major version of the backed-up cluster.
    pub pg_version: u32,
    /// A string, like the repository identity record: JSON readers elsewhere lose 64-bit precision.
    pub system_identifier: String,
    /// The cluster's WAL segment size, in bytes.
    pub wal_segment_size: u32,
    /// Bytes of every archive before encoding.
    pub original_bytes: u64,
    /// Bytes stored: every part and the manifest.
    pub stored_bytes: u64,
    /// `base.tar` first, then one archive per extra tablespace.
    pub archives: Vec<ArchiveRecord>,
    /// The stored copy of backup_manifest.
    pub manifest: PartRecord,
    /// The pg_basebackup that took the backup, and how it ran.
    pub pg_basebackup: ToolRecord,
    /// The walship that wrote the record (`walship <version>`).
    pub created_by: String,
    /// Full or incremental; records written before incremental backups existed are full.
    #[serde(default)]
    pub backup_type: BackupType,
    /// An incremental backup's parent: the backup whose manifest pg_basebackup --incremental was
    /// given, itself full or incremental. `None` for a full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl BackupRecord {
    /// The key of backup `name`'s catalog record.
    pub fn catalog_key(name: &str) -> String {
        format!("{CATALOG_PREFIX}{name}.json")
    }

    /// `finished_at` in Unix nanoseconds; `None` when it does not parse.
    pub fn finished_at_unix(&self) -> Option<i128> {
        parse_timestamp(&self.finished_at).ok()
    }
}

/// The chain a restore of `record` needs, oldest first: the full backup it rests on, each
/// incremental after it, and `record` itself last (a full backup is a chain of one). Every parent must
/// still be in the catalog, older than its child, of the same cluster and version, and the chain must
/// begin with a full backup; otherwise it is broken and nothing of it may be restored (exit 7 names
/// the missing or wrong link). The rules are [`catalog::chain_problem`]'s, link by link the same
/// functions; it judges records already in memory.
pub async fn chain_of(repo: &Repository, record: BackupRecord) -> Result<Vec<BackupRecord>, Error> {
    let mut chain = vec![record];
    loop {
        let child = chain.last().expect("never empty");
        let broken = |reason: String| Error::Corrupt {
            location: repo.storage().location(&BackupRecord::catalog_key(&child.name)),
            reason: catalog::broken_chain(child, &reason),
        };
        let parent_name = match catalog::next_link(child, chain.len()) {
            Ok(None) => break,
            Ok(Some(name)) => name.to_owned(),
            Err(reason) => return Err(broken(reason)),
        };
        let parent = match read_record(repo, &parent_name).await {
            Ok(parent) => Some(parent),
            Err(Error::NoSuchBackup(_)) => None,
            Err(e) => return Err(e),
        };
        if let Some(reason) = catalog::parent_problem(child, &parent_name, parent.as_ref()) {
            return Err(broken(reason));
        }
        chain.push(parent.expect("parent_problem says a missing parent"));
    }
    chain.reverse();
    Ok(chain)
}

/// Checks a backup name given by a user or read from a listing: `YYYYMMDDTHHMMSSZ`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ok = bytes.len() == 16
        && bytes[8] == b'T'
        && bytes[15] == b'Z'
        && bytes[..8].iter().chain(&bytes[9..15]).all(u8::is_ascii_digit);
    if ok { Ok(()) } else { Err(format!("{name:?} is not a backup name (YYYYMMDDTHHMMSSZ, or LATEST)")) }
}

/// Calls `each` for every complete backup, oldest first, reading the catalog page by page.
pub async fn for_each_backup(
    repo: &Repository,
    mut each: impl FnMut(BackupRecord) -> Result<(), Error>,
) -> Result<(), Error> {
    catalog::for_each_entry(repo, |entry| entry.record.map_or(Ok(()), &mut each)).await
}

/// Reads the catalog record of backup `name`.
pub async fn read_record(repo: &Repository, name: &str) -> Result<BackupRecord, Error> {
    let key = BackupRecord::catalog_key(name);
    let location = repo.storage().location(&key);
    let bytes = repo.read_small(&key, MAX_RECORD_LEN).await.map_err(|e| match e {
        StorageError::NotFound { location } => Error::NoSuchBackup(format!("{location}: no backup named {name}")),
        other => other.into(),
    })?;
    let record: BackupRecord = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        location: location.clone(),
        reason: format!("unreadable catalog record: {e}"),
    })?;
    if record.format_version > CATALOG_FORMAT_VERSION {
        return Err(Error::WrongRepository {
            location,
            reason: format!(
                "catalog record format {} is newer than this walship reads ({CATALOG_FORMAT_VERSION}); upgrade walship",
                record.format_version
            ),
        });
    }
    if record.name != name {
        return Err(Error::Corrupt { location, reason: format!("the record is for backup {}", record.name) });
    }
    Ok(record)
}

/// Reads the record of the backup a user named, checking the name first. A missing backup in a
/// location that is not a repository at all is reported as that (a wrong directory or prefix makes
/// every backup look missing).
pub(crate) async fn read_named(repo: &Repository, name: &str) -> Result<BackupRecord, Error> {
    validate_name(name).map_err(Error::Usage)?;
    match read_record(repo, name).await {
        Err(e @ Error::NoSuchBackup(_)) => {
            repo.require_identity().await?;
            Err(e)
        }
        other => other,
    }
}

/// Picks the backup to restore: `name`, or for `LATEST` the newest one, and with a target the newest
/// one that finished before it (a recovery cannot stop before its backup's end). Either way the
/// backup must lie on the history of the timeline the recovery will follow (`timeline`, as
/// `--target-timeline` gave it): on it, or on an ancestor before the point where it branched off.
pub async fn select_backup(
    repo: &Repository,
    name: &str,
    target: &RecoveryTarget,
    timeline: Option<&str>,
) -> Result<BackupRecord, Error> {
    if name != "LATEST" {
        return select_named(repo, name, target, timeline).await;
    }
    // One pass, oldest first, keeping a few records whatever the catalog's size.
    let mut lineage = timeline::lineage(repo, timeline).await?;
    let mut pick = Pick::default();
    for_each_backup(repo, |record| {
        if lineage.as_mut().is_some_and(|l| l.follow(&record)) {
            // A newer timeline: no backup seen so far lies on it.
            pick = Pick::default();
        }
        pick.offer(record, lineage.as_ref(), target);
        Ok(())
    })
    .await?;
    let Some(newest) = pick.newest else {
        repo.require_identity().await?;
        return Err(Error::NoSuchBackup(format!("{}: the repository holds no base backup", repo.url())));
    };
    if let (Some(lineage), None) = (&lineage, &pick.oldest) {
        return Err(Error::NoSuchBackup(format!(
            "no base backup lies on the history of timeline {} (the timeline recovery would follow): the newest, \
             {}, cannot be used because {}; choose the timeline with --target-timeline",
            lineage.target,
            newest.name,
            lineage.excludes(&newest).unwrap_or_default()
        )));
    }
    if let Some(record) = pick.best {
        return Ok(record);
    }
    let oldest = pick.oldest.expect("a backup on the lineage, or every backup without one");
    Err(Error::NoSuchBackup(format!(
        "no base backup can reach {}: the oldest of {} backups ({}) finished at {} ({})",
        target.describe(),
        pick.on_lineage,
        oldest.name,
        oldest.finished_at,
        target.excludes(&oldest).unwrap_or_default()
    )))
}

/// What the pass over the catalog keeps for LATEST.
#[derive(Default)]
struct Pick {
    /// The newest backup on the lineage that can reach the target.
    best: Option<BackupRecord>,
    /// The oldest backup on the lineage, and how many there are: for the message when none reaches
    /// the target.
    oldest: Option<BackupRecord>,
    on_lineage: u64,
    /// The last backup seen, on the lineage or not.
    newest: Option<BackupRecord>,
}

impl Pick {
    fn offer(&mut self, record: BackupRecord, lineage: Option<&timeline::Lineage>, target: &RecoveryTarget) {
        if lineage.is_none_or(|l| l.excludes(&record).is_none()) {
            self.on_lineage += 1;
            if self.oldest.is_none() {
                self.oldest = Some(record.clone());
            }
            if target.excludes(&record).is_none() {
                self.best = Some(record.clone());
            }
        }
        self.newest = Some(record);
    }
}

async fn select_named(
    repo: &Repository,
    name: &str,
    target: &RecoveryTarget,
    timeline: Option<&str>,
) -> Result<BackupRecord, Error> {
    let record = read_named(repo, name).await?;
    if let Some(reason) = target.excludes(&record) {
        return Err(Error::NoSuchBackup(format!("backup {name} cannot reach the target: {reason}")));
    }
    if let Some(mut lineage) = timeline::lineage(repo, timeline).await? {
        lineage.follow(&record);
        if let Some(reason) = lineage.excludes(&record) {
            return Err(Error::NoSuchBackup(format!(
                "backup {name} cannot reach timeline {} (the timeline recovery would follow): {reason}; \
                 --target-timeline {} restores its own branch",
                lineage.target, record.stop_timeline
            )));
        }
    }
    Ok(record)
}

/// A catalog record for unit tests: finished `hour` hours after the epoch, on `timeline`, starting in
/// segment `start_segment` (16 MiB segments) and consistent 256 bytes later.
#[cfg(test)]
pub(crate) fn test_record(hour: i64, timeline: u32, start_segment: u64) -> BackupRecord {
    let (day, hour_of_day) = (1 + hour / 24, hour % 24);
    let start = start_segment << 24;
    let json = serde_json::json!({
        "format_version": 1, "name": format!("197001{day:02}T{hour_of_day:02}0000Z"),
        "started_at": format!("1970-01-{day:02}T{hour_of_day:02}:00:00Z"),
        "finished_at": format!("1970-01-{day:02}T{hour_of_day:02}:00:00Z"),
        "start_lsn": crate::wal::format_lsn(start), "stop_lsn": crate::wal::format_lsn(start + 0x100),
        "start_wal_file": format!("{timeline:08X}{:08X}{:08X}", start_segment >> 8, start_segment & 0xFF),
        "timeline": timeline, "stop_timeline": timeline,
        "backup_from": "primary", "pg_version": 15, "system_identifier": "1", "wal_segment_size": 16777216,
        "original_bytes": 1, "stored_bytes": 1, "archives": [],
        "manifest": { "key": "k", "original_bytes": 1, "stored_bytes": 1, "sha256": "00" },
        "pg_basebackup": { "version": "15", "arguments": [] }, "created_by": "test"
    });
    serde_json::from_value(json).expect("a well-formed record")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_timestamps_and_nothing_else() {
        validate_name("20261122T080000Z").unwrap();
        for bad in ["LATEST", "../../etc", "20261122T080000", "2026112xT080000Z", "20261122T080000Z/x"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
