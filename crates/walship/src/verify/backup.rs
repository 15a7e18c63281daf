//! base-verify's integrity check: is every stored object of a backup what its catalog record says?
//!
//! Each part is read from the repository and decoded as a stream (the codec's pump into a sink that
//! keeps nothing), so memory stays bounded whatever the part's size, and checked by the same rules a
//! restore applies (its trailer, then [`crate::base::part_mismatch`] and the stored size against the
//! record). Parts are read in parallel, up to `transfer_concurrency` at a time. The stored
//! `backup_manifest` is decoded into a temporary file and its content compared with the record:
//! a manifest that disagrees with the record would make a restore check the files against the wrong
//! list, or start recovery at the wrong place.
//!
//! Damage is a [`Finding`]; a repository that cannot be read within the deadline is an error ("could
//! not check"): nothing is known then.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncSeekExt as _;
use tokio::sync::Semaphore;

use super::{Finding, FindingKind};
use crate::base::{BackupRecord, ManifestSummary, PartRecord, manifest_summary, part_mismatch, stored_mismatch};
use crate::codec::PumpError;
use crate::encryption::{Sealed, check_sealed};
use crate::error::Error;
use crate::log::Log;
use crate::repo::Repository;
use crate::retry;
use crate::storage::StorageError;

/// How base-verify reads a backup.
#[derive(Debug, Clone, Copy)]
pub struct IntegrityOptions {
    /// Parts read at once.
    pub transfer_concurrency: usize,
    /// Retries of one object's read end after this long.
    pub deadline: Duration,
}

/// Reads and checks every part of every archive of `record`, and its stored manifest. Returns what
/// is damaged; an error only when something could not be read at all.
pub async fn verify_backup(
    repo: &Repository,
    record: &BackupRecord,
    options: IntegrityOptions,
    log: &Log,
) -> Result<Vec<Finding>, Error> {
    let permits = Arc::new(Semaphore::new(options.transfer_concurrency.max(1)));
    let mut checks = tokio::task::JoinSet::new();
    let parts: Vec<PartRecord> = record.archives.iter().flat_map(|a| a.parts.iter().cloned()).collect();
    for (index, part) in parts.into_iter().enumerate() {
        let permit = Arc::clone(&permits).acquire_owned().await.expect("never closed");
        let (repo, log) = (repo.clone(), log.clone());
        checks.spawn(async move {
            let damage = check_with_retries(&repo, &part, None, options.deadline, &log).await;
            drop(permit);
            (index, part.key, damage)
        });
    }
    let mut damaged = Vec::new();
    while let Some(done) = checks.join_next().await {
        let (index, key, damage) = done.map_err(|e| Error::Internal(format!("a part check panicked: {e}")))?;
        if let Some(cause) = damage? {
            damaged.push((index, key, cause));
        }
    }
    // In the parts' order, whichever finished first.
    damaged.sort();
    let mut findings: Vec<Finding> = damaged
        .into_iter()
        .map(|(_, key, cause)| {
            let location = repo.storage().location(&key);
            Finding::new(FindingKind::DamagedPart, key, format!("backup {}: {location}: {cause}", record.name))
        })
        .collect();
    findings.extend(verify_manifest(repo, record, options, log).await?);
    Ok(findings)
}

/// Reads `part` until it decodes or is found damaged, retrying storage failures within `deadline`;
/// the decoded bytes go to `keep` when given (started over on each attempt), else nowhere.
/// `Some(cause)`: the part is damaged or missing.
async fn check_with_retries(
    repo: &Repository,
    part: &PartRecord,
    keep: Option<&std::fs::File>,
    deadline: Duration,
    log: &Log,
) -> Result<Option<String>, Error> {
    let location = repo.storage().location(&part.key);
    retry::with_deadline(deadline, log, &location, || {
        let location = &location;
        async move {
            match keep {
                None => check_part(repo, part, tokio::io::sink(), location).await,
                Some(file) => {
                    // Started over by each attempt.
                    let scratch = |e| Error::local_io(&std::env::temp_dir(), "write a temporary file", e);
                    let mut file = tokio::fs::File::from_std(file.try_clone().map_err(scratch)?);
                    file.set_len(0).await.map_err(scratch)?;
                    file.rewind().await.map_err(scratch)?;
                    check_part(repo, part, tokio::io::BufWriter::new(file), location).await
                }
            }
        }
    })
    .await
}

/// One attempt at reading and checking `part`.
async fn check_part(
    repo: &Repository,
    part: &PartRecord,
    sink: impl tokio::io::AsyncWrite + Unpin,
    location: &str,
) -> Result<Option<String>, Error> {
    if repo.encryption().is_keyless() {
        let Some(reader) = get_part(repo, part).await? else { return Ok(Some(MISSING_PART.into())) };
        // Without a key: the seal shows the bytes are the ones written, the trailer what they hold.
        match check_sealed(reader).await {
            Ok(Sealed::Whole { digest, stored }) => {
                return Ok(stored_mismatch(stored, part.stored_bytes).or_else(|| part_mismatch(part, &digest)));
            }
            // Decoded as ever: the reader pipeline refuses it unless accept_plain.
            Ok(Sealed::Plain) => {}
            Err(Ok(e)) => return Err(StorageError::io(location, "read", e).into()),
            Err(Err(damage)) => return Ok(Some(damage.to_string())),
        }
    }
    decode_part(repo, part, sink, location).await
}

const MISSING_PART: &str = "missing from the repository, though the catalog lists it";

/// The part's object; `None` when it is missing.
async fn get_part(repo: &Repository, part: &PartRecord) -> Result<Option<crate::storage::ObjectReader>, Error> {
    match repo.storage().get(&part.key).await {
        Ok(reader) => Ok(Some(reader)),
        Err(StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads `part` through the codec into `sink`, checking it against the record.
async fn decode_part(
    repo: &Repository,
    part: &PartRecord,
    sink: impl tokio::io::AsyncWrite + Unpin,
    location: &str,
) -> Result<Option<String>, Error> {
    let Some(reader) = get_part(repo, part).await? else { return Ok(Some(MISSING_PART.into())) };
    match repo.reader_pipeline().decode_async(reader, sink).await {
        Ok(pumped) => {
            Ok(stored_mismatch(pumped.stored_bytes, part.stored_bytes).or_else(|| part_mismatch(part, &pumped.digest)))
        }
        Err(PumpError::Source(e)) => Err(StorageError::io(location, "read", e).into()),
        Err(PumpError::Sink(e)) => Err(Error::local_io(std::path::Path::new("(scratch)"), "write", e)),
        // A key problem is not damage: the check cannot be made (exit 14), not a finding.
        Err(PumpError::Format(e)) if e.is_encryption() => Err(Error::stored(location, e)),
        Err(damage) => Ok(Some(damage.to_string())),
    }
}

/// Reads the stored manifest into a temporary file, checks it like a part, then compares what it says
/// with the record.
pub async fn verify_manifest(
    repo: &Repository,
    record: &BackupRecord,
    options: IntegrityOptions,
    log: &Log,
) -> Result<Vec<Finding>, Error> {
    let part = &record.manifest;
    // Unnamed (O_TMPFILE or unlinked at once): nothing is left behind whatever ends base-verify.
    let mut scratch = tempfile::tempfile().map_err(|e| Error::local_io(&std::env::temp_dir(), "create", e))?;
    let damage = check_with_retries(repo, part, Some(&scratch), options.deadline, log).await?;
    let location = repo.storage().location(&part.key);
    let finding = |cause: String| {
        vec![Finding::new(
            FindingKind::ManifestMismatch,
            part.key.clone(),
            format!("backup {}: {location}: {cause}", record.name),
        )]
    };
    if let Some(cause) = damage {
        return Ok(finding(cause));
    }
    if repo.encryption().is_keyless() {
        // Its seal checked out; what it says takes a key to read (README, "Encryption").
        return Ok(Vec::new());
    }
    let summary = tokio::task::spawn_blocking(move || {
        use std::io::Seek;
        scratch.rewind().map_err(|e| Error::local_io(&std::env::temp_dir(), "rewind a temporary file", e))?;
        Ok::<_, Error>(manifest_summary(scratch))
    })
    .await
    .map_err(|e| Error::Internal(format!("reading the manifest panicked: {e}")))??;
    match summary {
        Err(reason) => Ok(finding(format!("backup_manifest {reason}"))),
        Ok(summary) => Ok(manifest_disagreement(&summary, record).map(finding).unwrap_or_default()),
    }
}

/// What the manifest says that the record does not: the WAL the backup needs (where it starts, on
/// which timeline, where it becomes consistent) and, in version 2 manifests, the cluster.
fn manifest_disagreement(summary: &ManifestSummary, record: &BackupRecord) -> Option<String> {
    let lsn = |text: &str| crate::wal::parse_lsn(text);
    let Some(last) = summary.wal_ranges.last() else {
        return Some("backup_manifest lists no WAL range".into());
    };
    if last.timeline != record.stop_timeline || lsn(&last.end_lsn) != lsn(&record.stop_lsn) {
        return Some(format!(
            "backup_manifest's WAL ends at {} on timeline {}, but the catalog record says {} on timeline {}",
            last.end_lsn, last.timeline, record.stop_lsn, record.stop_timeline
        ));
    }
    let starts =
        summary.wal_ranges.iter().any(|r| r.timeline == record.timeline && lsn(&r.start_lsn) == lsn(&record.start_lsn));
    if !starts {
        let ranges: Vec<String> = summary
            .wal_ranges
            .iter()
            .map(|r| format!("{} to {} on timeline {}", r.start_lsn, r.end_lsn, r.timeline))
            .collect();
        return Some(format!(
            "backup_manifest's WAL ranges ({}) do not start at the catalog record's {} on timeline {}",
            ranges.join(", "),
            record.start_lsn,
            record.timeline
        ));
    }
    match summary.system_identifier {
        Some(id) if id.to_string() != record.system_identifier => Some(format!(
            "backup_manifest (version {}) is of system {id}, but the catalog record says {}",
            summary.version, record.system_identifier
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(json: &str) -> ManifestSummary {
        manifest_summary(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_manifest_must_agree_with_the_record_on_wal_and_system() {
        // test_record(0, 1, 2): timeline 1, start 0/2000000, stop 0/2000100, system 1.
        let record = crate::base::test_record(0, 1, 2);
        let good = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [{"Path": "x"}],
            "WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000000", "End-LSN": "0/2000100"}], "Manifest-Checksum": "00"}"#;
        assert_eq!(manifest_disagreement(&summary(good), &record), None);
        let bad_end = good.replace("0/2000100", "0/3000000");
        assert!(manifest_disagreement(&summary(&bad_end), &record).unwrap().contains("ends at 0/3000000"));
        let bad_start = good.replace("0/2000000", "0/1000000");
        assert!(manifest_disagreement(&summary(&bad_start), &record).unwrap().contains("do not start"));
        let bad_timeline = good.replace("\"Timeline\": 1", "\"Timeline\": 2");
        assert!(manifest_disagreement(&summary(&bad_timeline), &record).is_some());
        let v2 = good.replace("Version\": 1,", "Version\": 2, \"System-Identifier\": 7,");
        assert!(manifest_disagreement(&summary(&v2), &record).unwrap().contains("system 7"));
        let v2_same = good.replace("Version\": 1,", "Version\": 2, \"System-Identifier\": 1,");
        assert_eq!(manifest_disagreement(&summary(&v2_same), &record), None);
        let none = good.replace(r#"{"Timeline": 1, "Start-LSN": "0/2000000", "End-LSN": "0/2000100"}"#, "");
        assert!(manifest_disagreement(&summary(&none), &record).is_some());
    }
}
