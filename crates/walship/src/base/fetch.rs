//! Restoring a base backup into an empty data directory, ready for `pg_ctl start`.
//!
//! Parts are downloaded in parallel into a staging directory inside DATA_DIR (same file system;
//! at most `transfer_concurrency` parts at a time), then decoded in order through one tar
//! extractor. Every part is checked against its trailer and against the catalog record's SHA-256.
//! A failure removes what was extracted.
//!
//! Nothing is startable before the restore is done: `global/pg_control` is held back under another
//! name until every other step has passed, in this order: extract everything, flush it (`syncfs`),
//! write the recovery settings and the signal file (durably), run pg_verifybackup (against a copy
//! of the manifest that names the held-back file, so pg_control is checked too), and only then
//! rename pg_control into place. A kill at any point before that last rename leaves a directory
//! PostgreSQL refuses to start ("could not find the database system"), never one that would start
//! crash recovery without the recovery settings, or one that was not checked against the manifest.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::cancel::{Cancel, CancelToken};
use super::combine::combiner_of;
use super::extract::{Downloaded, Layout, Unpacking, extract};
use super::manifest::{HELD_BACK_CONTROL, write_held_back_manifest};
use super::recovery::{RecoverySettings, RecoveryTarget, TargetAction, write_recovery_settings};
use super::tools::{error_on_one_line, find_tool_of_version, said_on_one_line};
use super::{BackupRecord, BackupType, PartRecord, Progress, TablespaceRecord, chain_of, select_backup};
use crate::error::Error;
use crate::log::Log;
use crate::repo::Repository;
use crate::retry;
use crate::storage::StorageError;

pub(super) const STAGING_DIR: &str = ".walship-restore";
const DOWNLOAD_CHUNK: usize = 1 << 20;

/// What base-fetch restores, where, and how recovery is to run after it.
pub struct FetchOptions {
    /// A backup name or `LATEST`.
    pub name: String,
    /// The directory to restore into: new, or empty.
    pub data_dir: PathBuf,
    /// Where recovery stops; it also picks the backup (one that ends before the target).
    pub target: RecoveryTarget,
    /// What the server does at the target (`recovery_target_action`); `None`: PostgreSQL's default.
    pub action: Option<TargetAction>,
    /// `recovery_target_timeline` (a number, `latest` or `current`); `None`: PostgreSQL's default.
    pub timeline: Option<String>,
    /// Restore a standby (`standby.signal`, keeps primary_conninfo) rather than a recovery that ends.
    pub standby: bool,
    /// Keep the backed-up cluster's archive settings instead of turning archiving off.
    pub keep_archiving: bool,
    /// The restore_command to write.
    pub restore_command: String,
    /// Where PostgreSQL's programs are (pg_verifybackup); `None`: PATH and the packages' directories.
    pub pg_bin_dir: Option<PathBuf>,
    /// Parts downloaded at once (and ahead of extraction).
    pub transfer_concurrency: usize,
    /// Retries of one part's download end after this long.
    pub deadline: Duration,
    /// Tablespaces restored elsewhere than where they lived: (old location, new directory).
    pub tablespace_mapping: Vec<(String, PathBuf)>,
    /// Skip pg_verifybackup (`--no-pg-verifybackup`): for a server whose own version's
    /// pg_verifybackup is not installed anywhere. Every part's SHA-256 is still checked.
    pub no_pg_verifybackup: bool,
    /// Where an incremental backup's chain is restored before it is combined; `None`: beside
    /// DATA_DIR (in its parent directory).
    pub scratch_dir: Option<PathBuf>,
}

/// Whether pg_verifybackup checked the restored files against the backup's manifest.
#[derive(Debug)]
pub enum Verification {
    /// It passed; what it said.
    Passed(String),
    /// It is not installed: only every part's checksums were checked.
    NotInstalled,
    /// It was not run, as asked (`--no-pg-verifybackup`): only every part's checksums were checked.
    Skipped,
}

/// What a restore did: the backup it restored, and how the result was checked.
#[derive(Debug)]
pub struct RestoreReport {
    /// The catalog record of the restored backup.
    pub record: BackupRecord,
    /// Whether pg_verifybackup checked the restored files.
    pub verification: Verification,
    /// How long downloading and extracting the parts took (with the manifest, the tablespace links
    /// and the flush to disk).
    pub download_and_extract: Duration,
    /// How long pg_verifybackup took (zero when it is not installed).
    pub verify: Duration,
    /// For an incremental backup, the chain combined into it, oldest (the full backup) first; empty
    /// for a full backup.
    pub chain: Vec<String>,
}

/// Restores a backup into `options.data_dir`: a full backup directly, an incremental one by
/// restoring its chain into scratch space and combining it (see `combine.rs`).
pub async fn base_fetch(
    repo: &Repository,
    options: &FetchOptions,
    progress: &Arc<dyn Progress>,
    log: &Log,
) -> Result<RestoreReport, Error> {
    // Refuse a bad directory before looking at the repository: it is the cheaper mistake to report.
    let created = prepare_data_dir(&options.data_dir)?;
    let mut prepared = vec![(options.data_dir.clone(), created)];
    let cancel = match Cancel::watch() {
        Ok(cancel) => cancel,
        Err(e) => {
            undo(&prepared);
            return Err(e);
        }
    };
    let job = Job { repo, options, cancel: cancel.token().clone(), progress, log };
    let result = job.fetch(&mut prepared).await;
    match result {
        Ok(report) => Ok(report),
        Err(e) => {
            undo(&prepared);
            // Whatever step the signal cut short, it is what ended the restore.
            Err(job.cancel.check().err().unwrap_or(e))
        }
    }
}

/// One restore: where from, where to, and what it reports to.
pub(super) struct Job<'a> {
    /// The repository the backup comes from.
    pub(super) repo: &'a Repository,
    /// What to restore where.
    pub(super) options: &'a FetchOptions,
    /// Set by a signal.
    pub(super) cancel: CancelToken,
    /// Where progress goes.
    pub(super) progress: &'a Arc<dyn Progress>,
    /// Where messages go.
    pub(super) log: &'a Log,
}

impl Job<'_> {
    /// Picks the backup (and its chain), finds the programs of its version, prepares every directory,
    /// then restores; `prepared` collects the directories to undo on failure.
    async fn fetch(&self, prepared: &mut Vec<(PathBuf, bool)>) -> Result<RestoreReport, Error> {
        let options = self.options;
        let record = select_backup(self.repo, &options.name, &options.target, options.timeline.as_deref()).await?;
        // An incremental backup restores only with its chain, and a record that says incremental
        // without a parent is a broken chain (chain_of says so), never a full backup.
        let chain = match record.backup_type {
            BackupType::Incremental => chain_of(self.repo, record.clone()).await?,
            BackupType::Full => Vec::new(),
        };
        // Before anything is downloaded: only the backup's own version may judge (or combine) it
        // (unless told not to run pg_verifybackup at all, then no other version's stands in the way).
        let verifier = match options.no_pg_verifybackup {
            true => None,
            false => find_tool_of_version(options.pg_bin_dir.as_deref(), "pg_verifybackup", record.pg_version)?,
        };
        let combiner = match chain.is_empty() {
            true => None,
            false => Some(combiner_of(options.pg_bin_dir.as_deref(), &record)?),
        };
        // Every tablespace's directory must be as free as DATA_DIR before anything is downloaded.
        let mut targets = Vec::new();
        for archive in &record.archives {
            let target = match &archive.tablespace {
                None => options.data_dir.clone(),
                Some(tablespace) => {
                    let target = tablespace_target(tablespace, &options.tablespace_mapping);
                    prepared.push((target.clone(), prepare_data_dir(&target)?));
                    target
                }
            };
            targets.push(target);
        }
        self.log.info(format_args!(
            "restoring backup {} ({}timeline {}, finished {}, {} bytes in {} parts) into {}",
            record.name,
            match chain.len() {
                0 => String::new(),
                n => format!("incremental, a chain of {n} backups from {}; ", chain[0].name),
            },
            record.stop_timeline,
            record.finished_at,
            record.original_bytes,
            record.archives.iter().map(|a| a.parts.len()).sum::<usize>(),
            options.data_dir.display()
        ));
        let Restored { verification, download_and_extract, verify } = match combiner {
            None => self.restore(&record, &targets, verifier.as_deref()).await?,
            Some(combiner) => self.restore_chain(&chain, &targets, verifier.as_deref(), &combiner).await?,
        };
        let chain = chain.into_iter().map(|link| link.name).collect();
        Ok(RestoreReport { record, verification, download_and_extract, verify, chain })
    }
}

pub(super) fn tablespace_target(tablespace: &TablespaceRecord, mapping: &[(String, PathBuf)]) -> PathBuf {
    mapping
        .iter()
        .find(|(old, _)| old.trim_end_matches('/') == tablespace.location.trim_end_matches('/'))
        .map_or_else(|| PathBuf::from(&tablespace.location), |(_, new)| new.clone())
}

/// Creates DATA_DIR (0700) or checks that it is empty. Returns whether it was created.
pub(super) fn prepare_data_dir(data_dir: &Path) -> Result<bool, Error> {
    match fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                let reason = if data_dir.join(HELD_BACK_CONTROL).exists() {
                    "the target directory holds a restore that was cut short (never startable); remove it and run \
                     base-fetch again"
                } else {
                    "the target directory is not empty; base-fetch restores only into an empty or new directory, \
                     so that nothing of another cluster mixes in"
                };
                return Err(Error::InvalidInput { file: data_dir.display().to_string(), reason: reason.into() });
            }
            fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::local_io(data_dir, "chmod 0700", e))?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new().mode(0o700).create(data_dir).map_err(|e| Error::local_io(data_dir, "create", e))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(Error::InvalidInput { file: data_dir.display().to_string(), reason: "not a directory".into() })
        }
        Err(e) => Err(Error::local_io(data_dir, "read", e)),
    }
}

/// Removes what a failed restore extracted: each directory (DATA_DIR, tablespaces) was empty or new
/// when it started.
fn undo(prepared: &[(PathBuf, bool)]) {
    for (dir, created) in prepared {
        if *created {
            let _ = fs::remove_dir_all(dir);
        } else if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
            }
        }
    }
}

/// What a restore did, and how long its steps took.
pub(super) struct Restored {
    pub(super) verification: Verification,
    pub(super) download_and_extract: Duration,
    pub(super) verify: Duration,
}

impl Job<'_> {
    /// A full backup: its archives straight into DATA_DIR and the tablespace directories.
    async fn restore(
        &self,
        record: &BackupRecord,
        targets: &[PathBuf],
        verifier: Option<&Path>,
    ) -> Result<Restored, Error> {
        let started = std::time::Instant::now();
        let data_dir = &self.options.data_dir;
        self.fetch_archives(record, data_dir, targets).await?;
        link_tablespaces(data_dir, record, targets)?;
        crate::failpoint::hit("base-fetch:extracted");
        self.finish(record, targets, verifier, started)
    }

    /// Downloads and extracts `record`'s archives: `base.tar` into `dir` (pg_control held back), each
    /// tablespace's into its `targets` entry, every part checked; then its backup_manifest, when
    /// base.tar did not carry it. Leaves the staging directory `dir/.walship-restore` in place.
    pub(super) async fn fetch_archives(
        &self,
        record: &BackupRecord,
        dir: &Path,
        targets: &[PathBuf],
    ) -> Result<(), Error> {
        let (repo, options, log) = (self.repo, self.options, self.log);
        let staging = dir.join(STAGING_DIR);
        fs::DirBuilder::new().mode(0o700).create(&staging).map_err(|e| Error::local_io(&staging, "create", e))?;
        let parts: Vec<PartRecord> = record.archives.iter().flat_map(|a| a.parts.iter().cloned()).collect();
        let locations: Vec<String> = parts.iter().map(|p| repo.storage().location(&p.key)).collect();

        // Downloads run ahead of extraction by at most `transfer_concurrency` parts: the extractor
        // releases a part's permit once it has consumed and deleted its file.
        let (ready_sender, ready_receiver) = mpsc::channel::<oneshot::Receiver<Downloaded>>(parts.len().max(1));
        let downloader = tokio::spawn(download_all(
            repo.clone(),
            parts.clone(),
            staging.clone(),
            options.transfer_concurrency,
            options.deadline,
            log.clone(),
            ready_sender,
        ));
        let extractor = {
            let (dir, parts, progress, cancel) =
                (dir.to_owned(), parts.clone(), Arc::clone(self.progress), self.cancel.clone());
            let pipeline = repo.reader_pipeline();
            let archives: Vec<(PathBuf, usize)> =
                targets.iter().cloned().zip(record.archives.iter().map(|a| a.parts.len())).collect();
            tokio::task::spawn_blocking(move || {
                let layout = Layout { data_dir: &dir, archives: &archives, parts: &parts, locations: &locations };
                let how = Unpacking { root_owned: nix_is_root(), progress: progress.as_ref(), cancel, pipeline };
                extract(layout, ready_receiver, how)
            })
        };
        let extracted = extractor.await.map_err(|e| Error::Internal(format!("extraction panicked: {e}")));
        // On success every download was consumed; on failure the rest are of no use.
        downloader.abort();
        let _ = downloader.await;
        extracted??;
        self.cancel.check()?;

        // Streamed backups carry backup_manifest inside base.tar; spooled ones (with tablespaces) beside.
        let manifest = dir.join("backup_manifest");
        if !manifest.exists() {
            let what = repo.storage().location(&record.manifest.key);
            retry::with_deadline(options.deadline, log, &what, || {
                crate::repo::fetch_object(repo, &record.manifest.key, &manifest)
            })
            .await?;
        }
        Ok(())
    }

    /// The steps after the files are in DATA_DIR (pg_control still held back), for a full backup and
    /// a combined chain alike: flush, recovery settings, pg_verifybackup, then pg_control into place.
    pub(super) fn finish(
        &self,
        record: &BackupRecord,
        targets: &[PathBuf],
        verifier: Option<&Path>,
        started: std::time::Instant,
    ) -> Result<Restored, Error> {
        let (options, progress, log) = (self.options, self.progress, self.log);
        let data_dir = &options.data_dir;
        let staging = data_dir.join(STAGING_DIR);
        progress.phase("syncing to disk");
        for target in targets {
            syncfs(target)?;
        }
        crate::failpoint::hit("base-fetch:synced");
        write_settings(options, record, log)?;
        crate::failpoint::hit("base-fetch:configured");
        let download_and_extract = started.elapsed();
        let verify_started = std::time::Instant::now();
        let verification = verify(options, record, verifier, &staging, progress.as_ref(), log)?;
        let verify = verify_started.elapsed();
        crate::failpoint::hit("base-fetch:verified");
        // A signal during pg_verifybackup: still nothing startable; stop here.
        self.cancel.check()?;
        let _ = fs::remove_dir_all(&staging);
        install_control(data_dir)?;
        crate::failpoint::hit("base-fetch:installed");
        Ok(Restored { verification, download_and_extract, verify })
    }
}

/// Starts each part's download as a permit frees up, in order, handing the extractor a receiver
/// for each.
async fn download_all(
    repo: Repository,
    parts: Vec<PartRecord>,
    staging: PathBuf,
    concurrency: usize,
    deadline: Duration,
    log: Log,
    ready: mpsc::Sender<oneshot::Receiver<Downloaded>>,
) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut downloads = tokio::task::JoinSet::new();
    for (index, part) in parts.into_iter().enumerate() {
        let permit = Arc::clone(&permits).acquire_owned().await.expect("never closed");
        let (sender, receiver) = oneshot::channel();
        if ready.send(receiver).await.is_err() {
            break;
        }
        let path = staging.join(format!("part-{index:06}"));
        let (repo, log) = (repo.clone(), log.clone());
        downloads.spawn(async move {
            let location = repo.storage().location(&part.key);
            let result = retry::with_deadline(deadline, &log, &location, || {
                download(&repo, &part.key, &path, part.stored_bytes)
            })
            .await
            .map(|()| path);
            let _ = sender.send(Downloaded { result, permit });
        });
        while downloads.try_join_next().is_some() {}
    }
    while downloads.join_next().await.is_some() {}
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One attempt at downloading a part's stored bytes to `path`.
async fn download(repo: &Repository, key: &str, path: &Path, expected: u64) -> Result<(), Error> {
    let location = repo.storage().location(key);
    let mut reader = repo.storage().get(key).await.map_err(|e| match e {
        StorageError::NotFound { location } => {
            Error::Corrupt { location, reason: "a part of the backup is missing from the repository".into() }
        }
        other => other.into(),
    })?;
    let mut file = tokio::fs::File::create(path).await.map_err(|e| Error::local_io(path, "create", e))?;
    let mut buf = vec![0u8; DOWNLOAD_CHUNK];
    let mut len = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| StorageError::io(&location, "read", e))?;
        if n == 0 {
            break;
        }
        len += n as u64;
        tokio::io::AsyncWriteExt::write_all(&mut file, &buf[..n])
            .await
            .map_err(|e| Error::local_io(path, "write", e))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| Error::local_io(path, "write", e))?;
    if let Some(reason) = stored_mismatch(len, expected) {
        return Err(Error::Corrupt { location, reason });
    }
    Ok(())
}

/// Why a part that decoded (its trailer checked out) to `digest` is still not the part the catalog
/// records; `None` when it is. Restores and base-verify both judge parts by this.
pub(crate) fn part_mismatch(part: &PartRecord, digest: &crate::codec::ContentDigest) -> Option<String> {
    (digest.sha256_hex() != part.sha256 || digest.len != part.original_bytes).then(|| {
        format!(
            "the part decodes to {digest}, but the catalog record says sha256 {}, {} bytes",
            part.sha256, part.original_bytes
        )
    })
}

/// Why an object of `len` stored bytes is not the one the catalog records at `expected`; `None`
/// when the sizes agree.
pub(crate) fn stored_mismatch(len: u64, expected: u64) -> Option<String> {
    (len != expected).then(|| format!("{len} bytes stored, but the catalog record says {expected}"))
}

/// Points `pg_tblspc/<OID>` at each tablespace's directory, and rewrites `tablespace_map` to match:
/// PostgreSQL recreates the links from it at startup, and pg_verifybackup follows the links.
pub(super) fn link_tablespaces(data_dir: &Path, record: &BackupRecord, targets: &[PathBuf]) -> Result<(), Error> {
    let mut map = String::new();
    for (archive, target) in record.archives.iter().zip(targets) {
        let Some(tablespace) = &archive.tablespace else { continue };
        let link = data_dir.join("pg_tblspc").join(tablespace.oid.to_string());
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).map_err(|e| Error::local_io(&link, "create symlink", e))?;
        let mut escaped = String::new();
        for c in target.display().to_string().chars() {
            if matches!(c, '\\' | '\n' | '\r') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        map.push_str(&format!("{} {escaped}\n", tablespace.oid));
    }
    if !map.is_empty() {
        let path = data_dir.join("tablespace_map");
        fs::write(&path, map).map_err(|e| Error::local_io(&path, "write", e))?;
    }
    Ok(())
}

/// Flushes everything written under `dir` to disk, for the whole file system at once.
fn syncfs(dir: &Path) -> Result<(), Error> {
    let handle = File::open(dir).map_err(|e| Error::local_io(dir, "open", e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is valid for the lifetime of `handle`.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
        return Err(Error::local_io(dir, "syncfs", io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes the recovery settings and the signal file (durably), and says what that changed about
/// the backed-up cluster's own settings.
fn write_settings(options: &FetchOptions, record: &BackupRecord, log: &Log) -> Result<(), Error> {
    let data_dir = &options.data_dir;
    let changes = write_recovery_settings(
        data_dir,
        &RecoverySettings {
            backup_name: &record.name,
            restore_command: options.restore_command.clone(),
            target: &options.target,
            action: options.action,
            timeline: options.timeline.clone(),
            standby: options.standby,
            keep_archiving: options.keep_archiving,
            pg_version: record.pg_version,
        },
    )
    .map_err(|e| Error::local_io(&data_dir.join("postgresql.auto.conf"), "write recovery settings", e))?;
    // Running as root, the files keep the owner pg_basebackup recorded; the directory itself follows.
    if nix_is_root()
        && let Ok(meta) = fs::metadata(data_dir.join("PG_VERSION"))
    {
        let _ = std::os::unix::fs::chown(data_dir, Some(meta.uid()), Some(meta.gid()));
        for name in ["recovery.signal", "standby.signal"] {
            let _ = std::os::unix::fs::chown(data_dir.join(name), Some(meta.uid()), Some(meta.gid()));
        }
    }
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::local_io(data_dir, "chmod", e))?;
    if changes.removed_standby_signal || changes.disabled.iter().any(|k| k.starts_with("primary_")) {
        log.info(format_args!(
            "backup {} was taken from a standby: removed its standby.signal and primary_conninfo, so that \
             recovery ends and promotes rather than following a primary (--standby restores a standby)",
            record.name
        ));
    }
    if !options.keep_archiving {
        log.info(format_args!(
            "archiving is off in the restored cluster (archive_command = 'false' in postgresql.auto.conf), so \
             that it cannot write into the repository it came from; if it is to become the primary, set \
             archive_command and reload, or restore with --keep-archiving"
        ));
    }
    Ok(())
}

/// Puts pg_control into place, durably: the step that makes the directory startable.
fn install_control(data_dir: &Path) -> Result<(), Error> {
    let held_back = data_dir.join(HELD_BACK_CONTROL);
    let control = data_dir.join("global/pg_control");
    fs::rename(&held_back, &control).map_err(|e| Error::local_io(&control, "rename into place", e))?;
    crate::fs::fsync_dir(&data_dir.join("global")).map_err(|e| Error::local_io(data_dir, "fsync global/", e))
}

/// Runs pg_verifybackup, when installed, on the restored files while pg_control is still held back.
fn verify(
    options: &FetchOptions,
    record: &BackupRecord,
    verifier: Option<&Path>,
    staging: &Path,
    progress: &dyn Progress,
    log: &Log,
) -> Result<Verification, Error> {
    let data_dir = &options.data_dir;
    if options.no_pg_verifybackup {
        log.info(format_args!(
            "skipped pg_verifybackup (--no-pg-verifybackup): the restored files are not checked against \
             backup_manifest; every part's SHA-256 still is"
        ));
        return Ok(Verification::Skipped);
    }
    progress.phase("running pg_verifybackup");
    let Some(tool) = verifier else {
        log.info(format_args!(
            "PostgreSQL {}'s pg_verifybackup is not installed: the restored files were not checked against \
             backup_manifest (every part's checksum was)",
            record.pg_version
        ));
        return Ok(Verification::NotInstalled);
    };
    let manifest = data_dir.join("backup_manifest");
    let held_back_manifest = staging.join("backup_manifest");
    write_held_back_manifest(&manifest, &held_back_manifest)?;
    let mut command = Command::new(tool);
    command.arg("--manifest-path").arg(&held_back_manifest).arg(format!("--ignore={STAGING_DIR}"));
    // base-fetch rewrites tablespace_map for the directories the tablespaces went to.
    if record.archives.iter().any(|a| a.tablespace.is_some()) {
        command.arg("--ignore=tablespace_map");
    }
    let output = command
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::ToolFailed { tool: tool.display().to_string(), reason: format!("cannot run: {e}") })?;
    if output.status.success() {
        return Ok(Verification::Passed(said_on_one_line(&String::from_utf8_lossy(&output.stdout))));
    }
    let errors = error_on_one_line(&String::from_utf8_lossy(&output.stderr));
    Err(Error::Corrupt {
        location: data_dir.display().to_string(),
        reason: format!("pg_verifybackup failed ({}): {errors}; the restored files were removed", output.status),
    })
}
