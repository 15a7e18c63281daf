//! Restoring an incremental backup: every backup of its chain (the full one it rests on first) is
//! restored into scratch space by the same extractor as a full restore (every part checked), then
//! pg_combinebackup of the backup's major version combines them, and the result goes through the
//! same last steps as a full restore (flush, recovery settings, pg_verifybackup, pg_control last).
//!
//! ```text
//! <scratch>/.walship-chain-<NAME>.XXXXXX/000-<FULL>/ ... 00N-<NAME>/   one directory per link
//! DATA_DIR/.walship-restore/combined/                                  pg_combinebackup's output
//! ```
//!
//! Nothing is startable in DATA_DIR before the end: pg_combinebackup writes into a directory inside
//! DATA_DIR's staging directory (same file system, so the move is renames), pg_control is renamed to
//! its held-back name there before anything moves into DATA_DIR, and only the usual last step puts
//! it into place. The scratch space (the size of every link, checked before any download) is
//! removed once the chain is combined, and on every failure and signal.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::BackupRecord;
use super::fetch::{Job, Restored, STAGING_DIR, link_tablespaces};
use super::manifest::HELD_BACK_CONTROL;
use super::tools::{error_on_one_line, find_tool_of_version, tool_error};
use crate::error::Error;

/// The pg_combinebackup of `record`'s major version, or the error (exit 10) that says there is none.
pub(super) fn combiner_of(pg_bin_dir: Option<&Path>, record: &BackupRecord) -> Result<PathBuf, Error> {
    find_tool_of_version(pg_bin_dir, "pg_combinebackup", record.pg_version)?.ok_or_else(|| Error::ToolFailed {
        tool: "pg_combinebackup".into(),
        reason: format!(
            "not found: backup {} is incremental, and only PostgreSQL {}'s pg_combinebackup can combine its chain; \
             install PostgreSQL {}'s programs or set pg_bin_dir to their directory",
            record.name, record.pg_version, record.pg_version
        ),
    })
}

impl Job<'_> {
    /// Restores `chain` (oldest first) into scratch space, combines it into DATA_DIR, and finishes
    /// the restore as for a full backup.
    pub(super) async fn restore_chain(
        &self,
        chain: &[BackupRecord],
        targets: &[PathBuf],
        verifier: Option<&Path>,
        combiner: &Path,
    ) -> Result<Restored, Error> {
        let started = Instant::now();
        let record = chain.last().expect("a chain is never empty");
        let data_dir = &self.options.data_dir;
        let scratch = self.make_scratch(record)?;
        check_free_space(scratch.path(), data_dir, chain)?;
        let mut inputs = Vec::new();
        for (index, link) in chain.iter().enumerate() {
            self.progress.phase(&format!(
                "restoring backup {} ({} of {} in the chain)",
                link.name,
                index + 1,
                chain.len()
            ));
            inputs.push(self.restore_link(scratch.path(), index, link).await?);
        }
        crate::failpoint::hit("base-fetch:chain-restored");
        let staging = data_dir.join(STAGING_DIR);
        fs::DirBuilder::new().mode(0o700).create(&staging).map_err(|e| Error::local_io(&staging, "create", e))?;
        let combined = staging.join("combined");
        // pg_combinebackup puts each tablespace where the final backup's link points unless told.
        let last = inputs.last().expect("a chain is never empty");
        let mapping: Vec<(PathBuf, &PathBuf)> = record
            .archives
            .iter()
            .zip(targets)
            .filter_map(|(archive, target)| {
                archive.tablespace.as_ref().map(|t| (link_tablespace_dir(last, t.oid), target))
            })
            .collect();
        self.progress.phase("combining the chain (pg_combinebackup)");
        self.combine(combiner, &inputs, &combined, &mapping, scratch.path()).await?;
        crate::failpoint::hit("base-fetch:combined");
        // The links are of no use now: free their space before the result is checked.
        drop(scratch);
        move_into_place(&combined, data_dir)?;
        link_tablespaces(data_dir, record, targets)?;
        crate::failpoint::hit("base-fetch:extracted");
        self.finish(record, targets, verifier, started)
    }

    /// The scratch directory of this restore: in `scratch_dir`, else beside DATA_DIR.
    fn make_scratch(&self, record: &BackupRecord) -> Result<tempfile::TempDir, Error> {
        let data_dir = &self.options.data_dir;
        let parent = match &self.options.scratch_dir {
            Some(dir) => dir.clone(),
            None => data_dir.parent().map_or_else(|| PathBuf::from("/"), Path::to_owned),
        };
        tempfile::Builder::new()
            .prefix(&format!(".walship-chain-{}.", record.name))
            .tempdir_in(&parent)
            .map_err(|e| Error::local_io(&parent, "create scratch directory", e))
    }

    /// Restores one link of the chain into `scratch`, as pg_combinebackup reads a backup: pg_control
    /// in place, tablespaces behind `pg_tblspc/<OID>` links, nothing of walship's own.
    async fn restore_link(&self, scratch: &Path, index: usize, link: &BackupRecord) -> Result<PathBuf, Error> {
        let dir = scratch.join(format!("{index:03}-{}", link.name));
        let targets: Vec<PathBuf> = link
            .archives
            .iter()
            .map(|a| a.tablespace.as_ref().map_or_else(|| dir.clone(), |t| link_tablespace_dir(&dir, t.oid)))
            .collect();
        for target in &targets {
            fs::DirBuilder::new().mode(0o700).create(target).map_err(|e| Error::local_io(target, "create", e))?;
        }
        self.fetch_archives(link, &dir, &targets).await?;
        let staging = dir.join(STAGING_DIR);
        fs::remove_dir_all(&staging).map_err(|e| Error::local_io(&staging, "remove", e))?;
        let control = dir.join("global/pg_control");
        fs::rename(dir.join(HELD_BACK_CONTROL), &control).map_err(|e| Error::local_io(&control, "rename", e))?;
        // pg_combinebackup finds each tablespace by its link; the tablespace_map this also writes
        // (pointing into the scratch space) is rewritten for the real directories once combined.
        link_tablespaces(&dir, link, &targets)?;
        Ok(dir)
    }

    /// Runs pg_combinebackup on `inputs` (oldest first) into `output`; a signal stops it.
    async fn combine(
        &self,
        combiner: &Path,
        inputs: &[PathBuf],
        output: &Path,
        mapping: &[(PathBuf, &PathBuf)],
        scratch: &Path,
    ) -> Result<(), Error> {
        let log_path = scratch.join("pg_combinebackup.log");
        let stderr = fs::File::create(&log_path).map_err(|e| Error::local_io(&log_path, "create", e))?;
        let mut command = Command::new(combiner);
        // base-fetch flushes the whole result itself (syncfs), once.
        command.arg("--no-sync").arg("-o").arg(output);
        for (old, new) in mapping {
            command.arg(format!("--tablespace-mapping={}={}", old.display(), new.display()));
        }
        let child = command
            .args(inputs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| tool_error(combiner, e))?;
        // Killed however this ends early: a signal, or the future dropped (base-verify's own signal).
        let mut child = KillOnDrop(child);
        let status = loop {
            if let Some(status) = child.0.try_wait().map_err(|e| tool_error(combiner, e))? {
                break status;
            }
            self.cancel.check()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if status.success() {
            return Ok(());
        }
        let said = error_on_one_line(&fs::read_to_string(&log_path).unwrap_or_default());
        Err(Error::ToolFailed { tool: combiner.display().to_string(), reason: format!("{status}: {said}") })
    }
}

/// A child process killed and reaped when dropped before it ended.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Where link `dir`'s tablespace `oid` is restored: beside it in the scratch directory.
fn link_tablespace_dir(dir: &Path, oid: u32) -> PathBuf {
    let mut name = dir.file_name().expect("a link directory has a name").to_owned();
    name.push(format!("-tablespace-{oid}"));
    dir.with_file_name(name)
}

/// Refuses a chain whose restore cannot fit: the scratch space holds every link (their original
/// bytes), DATA_DIR's file system the result, which is at most that much again.
fn check_free_space(scratch: &Path, data_dir: &Path, chain: &[BackupRecord]) -> Result<(), Error> {
    let links: u64 = chain.iter().map(|link| link.original_bytes).sum();
    let (scratch_free, scratch_device) = free_space(scratch)?;
    let (data_free, data_device) = free_space(data_dir)?;
    let needs = |free: u64, needed: u64, dir: &Path, what: &str| {
        if free >= needed {
            return Ok(());
        }
        Err(Error::local_io(
            dir,
            "check free space",
            std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{free} bytes free, but restoring the chain of {} backups needs {needed} ({what}); free space or \
                     choose another --scratch-dir",
                    chain.len()
                ),
            ),
        ))
    };
    if scratch_device == data_device {
        needs(scratch_free, 2 * links, scratch, "every link, then the combined result as large")
    } else {
        needs(scratch_free, links, scratch, "every link of the chain")?;
        needs(data_free, links, data_dir, "the combined result, at most as large as every link")
    }
}

/// The bytes an unprivileged user may still write on `dir`'s file system, and its device.
fn free_space(dir: &Path) -> Result<(u64, u64), Error> {
    let device = fs::metadata(dir).map_err(|e| Error::local_io(dir, "stat", e))?.dev();
    let free = crate::fs::free_bytes(dir).map_err(|e| Error::local_io(dir, "statvfs", e))?;
    Ok((free, device))
}

/// Moves pg_combinebackup's output into DATA_DIR: pg_control to its held-back name first, so that
/// DATA_DIR is never startable on the way, then every entry, by renames within one file system.
fn move_into_place(combined: &Path, data_dir: &Path) -> Result<(), Error> {
    let control = combined.join("global/pg_control");
    fs::rename(&control, combined.join(HELD_BACK_CONTROL)).map_err(|e| Error::local_io(&control, "rename", e))?;
    for entry in fs::read_dir(combined).map_err(|e| Error::local_io(combined, "read", e))? {
        let entry = entry.map_err(|e| Error::local_io(combined, "read", e))?;
        let to = data_dir.join(entry.file_name());
        fs::rename(entry.path(), &to).map_err(|e| Error::local_io(&to, "move into place", e))?;
    }
    fs::remove_dir(combined).map_err(|e| Error::local_io(combined, "remove", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_tablespace_lives_beside_its_link() {
        let dir = Path::new("/s/.walship-chain-X.abc/001-20261201T000000Z");
        assert_eq!(
            link_tablespace_dir(dir, 16400),
            Path::new("/s/.walship-chain-X.abc/001-20261201T000000Z-tablespace-16400")
        );
    }

    #[test]
    fn a_chain_too_large_for_its_scratch_space_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = crate::base::test_record(1, 1, 1);
        record.original_bytes = u64::MAX / 4;
        let error = check_free_space(dir.path(), dir.path(), &[record.clone()]).unwrap_err();
        assert_eq!(error.exit_code(), crate::ExitCode::LocalIo);
        assert!(error.to_string().contains("restoring the chain of 1 backups needs"), "{error}");
        record.original_bytes = 1;
        check_free_space(dir.path(), dir.path(), &[record]).unwrap();
    }
}
