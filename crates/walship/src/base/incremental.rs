//! The parent of an incremental backup: which backup it is, the claim that keeps base-expire from
//! removing it while the child is taken, its stored backup_manifest fetched for
//! `pg_basebackup --incremental`, and what PostgreSQL's refusals of one mean.
//!
//! The handshake with base-expire: the claim (`catalog/<PARENT>.needed-by-<CHILD>`) is written
//! first, then the parent's expiry mark is looked for and its record read again. base-expire writes
//! its mark first and looks for claims second, so of the two that meet, one sees the other and backs
//! off: an incremental backup is never taken on top of a parent that is being removed.

use std::path::Path;

use super::catalog::{claim_parent, for_each_entry, is_expiring, needed_by_key};
use super::tools::major_version;
use super::{BackupRecord, chain_of, read_named, read_record, timeline};
use crate::codec::ContentDigest;
use crate::error::Error;
use crate::repo::Repository;

/// The oldest PostgreSQL whose server and pg_basebackup take incremental backups.
pub const MIN_INCREMENTAL_VERSION: u32 = 17;

/// What base-push is asked for beyond a full backup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncrementalOptions {
    /// The parent, by name (`--from`); `None`: the newest complete backup of the cluster on the
    /// newest timeline the repository knows.
    pub from: Option<String>,
    /// Take a full backup, saying why, when no incremental one can be taken (`--full-if-needed`).
    pub full_if_needed: bool,
}

/// Why an incremental backup was not taken. `Refused`: it cannot be (no usable parent, a server or
/// pg_basebackup older than 17, WAL summaries off or gone), which `--full-if-needed` answers with a
/// full backup; `Failed`: anything else, which it does not.
#[derive(Debug)]
pub(super) enum Attempt {
    /// No incremental backup is possible now; a full one may be.
    Refused(Error),
    /// The backup failed for another reason.
    Failed(Error),
}

impl Attempt {
    /// The error, whichever kind of failure it is.
    pub(super) fn into_error(self) -> Error {
        match self {
            Attempt::Refused(e) | Attempt::Failed(e) => e,
        }
    }
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// Refuses a parent whose own chain is broken (a link gone from the catalog, say): an incremental
/// backup on top of it could never be restored either, and base-push would say exit 0 for it every
/// night. `--full-if-needed` answers it with a full backup.
pub(super) async fn check_parent_chain(repo: &Repository, parent: &BackupRecord) -> Result<(), Attempt> {
    match chain_of(repo, parent.clone()).await {
        Ok(_) => Ok(()),
        Err(Error::Corrupt { location, reason }) => Err(Attempt::Refused(Error::Corrupt {
            location,
            reason: format!("cannot take an incremental backup on top of {}: {reason}", parent.name),
        })),
        Err(e) => Err(Attempt::Failed(e)),
    }
}

/// Refuses a pg_basebackup that cannot take an incremental backup.
pub(super) fn check_pg_basebackup(pg_basebackup: &Path, version: &str) -> Result<(), Attempt> {
    match major_version(version) {
        Some(major) if major >= MIN_INCREMENTAL_VERSION => Ok(()),
        _ => Err(Attempt::Refused(Error::ToolFailed {
            tool: pg_basebackup.display().to_string(),
            reason: format!(
                "{version} cannot take incremental backups: --incremental needs PostgreSQL \
                 {MIN_INCREMENTAL_VERSION} or later's pg_basebackup (set pg_bin_dir)"
            ),
        })),
    }
}

/// The parent an incremental backup builds on: `from`, or the newest complete backup of the
/// repository's cluster on the newest timeline (a backup being expired never qualifies).
pub(super) async fn choose_parent(repo: &Repository, from: Option<&str>) -> Result<BackupRecord, Attempt> {
    let Some(identity) = repo.identity().await? else {
        return Err(Attempt::Refused(Error::NoSuchBackup(format!(
            "{}: no backup to build an incremental backup on (the repository is new); take a full one first",
            repo.url()
        ))));
    };
    if let Some(name) = from {
        let record = read_named(repo, name).await?;
        if record.system_identifier != identity.system_identifier {
            return Err(Attempt::Failed(Error::WrongRepository {
                location: repo.storage().location(&BackupRecord::catalog_key(name)),
                reason: format!(
                    "--from {name}: that backup is of another cluster (system identifier {}, the repository's is {})",
                    record.system_identifier, identity.system_identifier
                ),
            }));
        }
        return Ok(record);
    }
    let mut lineage = timeline::lineage(repo, None).await?;
    let mut pick: Option<BackupRecord> = None;
    for_each_entry(repo, |entry| {
        let Some(record) = entry.record else { return Ok(()) };
        if lineage.as_mut().is_some_and(|l| l.follow(&record)) {
            pick = None;
        }
        let usable = !entry.expiring
            && record.system_identifier == identity.system_identifier
            && lineage.as_ref().is_none_or(|l| l.excludes(&record).is_none());
        if usable {
            pick = Some(record);
        }
        Ok(())
    })
    .await?;
    pick.ok_or_else(|| {
        Attempt::Refused(Error::NoSuchBackup(format!(
            "{}: no complete backup of this cluster on its newest timeline to build an incremental backup on; \
             take a full one first (or pass --full-if-needed)",
            repo.url()
        )))
    })
}

/// Claims `parent` for `child`, then checks that it is neither being expired nor gone, and fetches
/// its backup_manifest into `manifest` (verified against the parent's record). The caller removes
/// the claim ([`needed_by_key`]) when the child fails.
pub(super) async fn claim_and_fetch_manifest(
    repo: &Repository,
    parent: &BackupRecord,
    child: &str,
    manifest: &Path,
) -> Result<(), Attempt> {
    let name = &parent.name;
    claim_parent(repo, name, child).await?;
    if is_expiring(repo, name).await? {
        return Err(Attempt::Refused(Error::NoSuchBackup(format!(
            "backup {name} is being removed by base-expire; it cannot be the parent of an incremental backup"
        ))));
    }
    let parent = match read_record(repo, name).await {
        Ok(parent) => parent,
        Err(Error::NoSuchBackup(_)) => {
            return Err(Attempt::Refused(Error::NoSuchBackup(format!(
                "backup {name} was removed from the catalog meanwhile; it cannot be the parent of an incremental backup"
            ))));
        }
        Err(e) => return Err(e.into()),
    };
    crate::repo::fetch_object(repo, &parent.manifest.key, manifest).await?;
    let digest = ContentDigest::of_file(manifest).map_err(|e| Error::local_io(manifest, "read", e))?;
    let (sha256, len) = (digest.sha256_hex(), digest.len);
    if sha256 != parent.manifest.sha256 || len != parent.manifest.original_bytes {
        return Err(Attempt::Failed(Error::Corrupt {
            location: repo.storage().location(&parent.manifest.key),
            reason: format!(
                "backup {name}'s backup_manifest is sha256 {sha256}, {len} bytes, but its record says sha256 {}, {} \
                 bytes",
                parent.manifest.sha256, parent.manifest.original_bytes
            ),
        }));
    }
    Ok(())
}

/// The claim key base-push removes with everything else when the child fails.
pub(super) fn claim_key(parent: &str, child: &str) -> String {
    needed_by_key(parent, child)
}

/// What a pg_basebackup that failed with `error` says about incremental backups, as base-push's own
/// error: the server is too old, WAL summarization is off, the parent is of another cluster, or the
/// server cannot take an incremental backup on top of that parent. `None`: another failure.
pub(super) fn refusal(error: &Error, parent: &str) -> Option<Attempt> {
    let Error::ToolFailed { tool, reason } = error else { return None };
    let said = |what: &str| Error::ToolFailed { tool: tool.clone(), reason: format!("{what} ({reason})") };
    if reason.contains("server does not support incremental backup") {
        return Some(Attempt::Refused(said(&format!(
            "the server is older than PostgreSQL {MIN_INCREMENTAL_VERSION}: it cannot take incremental backups"
        ))));
    }
    if reason.contains("unless WAL summarization is enabled") {
        return Some(Attempt::Refused(said(
            "WAL summarization is not enabled on the server: set summarize_wal = on (and reload) to take incremental \
             backups",
        )));
    }
    if reason.contains("system identifier in backup manifest") {
        return Some(Attempt::Failed(Error::WrongRepository {
            location: format!("backup {parent}"),
            reason: format!("the server is another cluster than the parent backup {parent}'s ({reason})"),
        }));
    }
    let unusable = ["WAL summaries are required", "manifest requires WAL", "in this server's history"];
    if unusable.iter().any(|needle| reason.contains(needle)) {
        return Some(Attempt::Refused(Error::NoSuchBackup(format!(
            "backup {parent} cannot be the parent of an incremental backup of this server: {reason}"
        ))));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(reason: &str) -> Error {
        Error::ToolFailed { tool: "pg_basebackup".into(), reason: reason.into() }
    }

    #[test]
    fn postgresqls_refusals_are_told_apart() {
        let old =
            refusal(&failed("exit status: 1: pg_basebackup: error: server does not support incremental backup"), "P");
        assert!(
            matches!(old, Some(Attempt::Refused(Error::ToolFailed { ref reason, .. })) if reason.contains("older than PostgreSQL 17"))
        );
        let off = refusal(
            &failed(
                "could not initiate base backup: ERROR:  incremental backups cannot be taken unless WAL summarization is enabled",
            ),
            "P",
        );
        assert!(
            matches!(off, Some(Attempt::Refused(Error::ToolFailed { ref reason, .. })) if reason.contains("summarize_wal = on"))
        );
        let other = refusal(
            &failed("ERROR:  system identifier in backup manifest is 1, but database system identifier is 2"),
            "P",
        );
        assert!(matches!(other, Some(Attempt::Failed(Error::WrongRepository { .. }))));
        let gone =
            refusal(&failed("ERROR:  WAL summaries are required on timeline 1 from 0/2000028 to 0/4000060"), "P");
        assert!(matches!(gone, Some(Attempt::Refused(Error::NoSuchBackup(_)))));
        assert!(refusal(&failed("could not connect to server"), "P").is_none());
    }

    #[test]
    fn only_pg_basebackup_17_or_later_takes_incremental_backups() {
        let tool = Path::new("pg_basebackup");
        assert!(check_pg_basebackup(tool, "pg_basebackup (PostgreSQL) 17.2").is_ok());
        assert!(check_pg_basebackup(tool, "pg_basebackup (PostgreSQL) 18.6").is_ok());
        let refused = check_pg_basebackup(tool, "pg_basebackup (PostgreSQL) 16.14").unwrap_err();
        assert!(matches!(refused, Attempt::Refused(Error::ToolFailed { ref reason, .. }) if reason.contains("16.14")));
    }
}
