//! Taking a base backup: pg_basebackup's tar stream, compressed and checksummed in parts, straight
//! into the repository.
//!
//! ```text
//! pg_basebackup -D - -Ft -X fetch ──stdout──▶ reader thread: tar watcher, zstd (all cores), parts
//!                                                    │ bounded channel of encoded chunks
//!                                                    ▼
//!                                   async side: one writer per part; a finished part completes
//!                                   (multipart upload, fsync, link) while the next one streams
//! ```
//!
//! Nothing of the backup is kept locally but the backup_manifest (spooled to a temporary file), so
//! local disk and memory stay bounded whatever the database size. The catalog record is written only
//! after every part and the manifest are durable; a failure or a signal removes what was written, and
//! a base-push killed outright is cleaned up by the next one (see [`sweep_abandoned`]).
//!
//! This file is the orchestration: reserve a name, run pg_basebackup (streamed, or spooled when the
//! cluster has extra tablespaces), store the manifest, write the record. The jobs it calls live
//! beside it: `owner.rs` (names and the sweep), `basebackup.rs` (the process), `reader.rs` and
//! `parts.rs` (the stream into parts), `manifest.rs` (what the backup's own files say).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;

use super::basebackup::{
    Running, SINGLE_TABLESPACE_ONLY, basebackup_arguments, check_extra_args, redact, tool_failure_reason,
};
use super::catalog::release_parent;
use super::incremental::{
    Attempt, IncrementalOptions, check_parent_chain, check_pg_basebackup, choose_parent, claim_and_fetch_manifest,
    claim_key, refusal,
};
use super::manifest::{manifest_wal_ranges, parse_backup_label, parse_tablespace_map};
use super::owner::{owner_key, remove_keys, reserve_name, sweep_abandoned};
use super::parts::{Archive, Destination, PartOptions, store_archive, store_file};
use super::reader::{Contents, Encoding};
use super::recovery::now_rfc3339;
use super::signals::Signals;
use super::tar_watch::Observed;
use super::tools::{check_tar_to_stdout, required_tool, tool_error, tool_version};
use super::{
    ArchiveRecord, BACKUPS_PREFIX, BackupRecord, BackupType, FULL_RECORD_FORMAT, INCREMENTAL_RECORD_FORMAT, Progress,
    TablespaceRecord, ToolRecord, Transferred,
};
use crate::codec::Pipeline;
use crate::error::Error;
use crate::log::Log;
use crate::repo::{ClusterFacts, Repository};
use crate::storage::PutOptions;
use crate::wal::LongPageHeader;

/// How base-push takes a backup: what the configuration and the command line say.
pub struct PushOptions {
    /// Where PostgreSQL's programs are; `None`: PATH.
    pub pg_bin_dir: Option<PathBuf>,
    /// Extra pg_basebackup arguments (connection, rate limit, checkpoint mode...).
    pub extra_args: Vec<String>,
    /// Original bytes per stored part.
    pub part_size: u64,
    /// The zstd level of every part.
    pub compression_level: i32,
    /// zstd workers; 0: one per core.
    pub compression_workers: u32,
    /// Finished parts completing (uploading their last pieces) while the next streams.
    pub transfer_concurrency: usize,
    /// A write or completion that makes no progress for this long fails the backup.
    pub idle_timeout: Duration,
    /// Where a backup with extra tablespaces is spooled (pg_basebackup cannot stream those), and an
    /// incremental backup's parent manifest is kept while it is taken.
    pub spool_dir: PathBuf,
    /// Take an incremental backup (`--incremental`); `None`: a full one.
    pub incremental: Option<IncrementalOptions>,
}

impl PushOptions {
    /// How parts are cut and written: through `pipeline` (the repository's, encrypted or not), on
    /// the configured zstd workers.
    fn part_options(&self, pipeline: Pipeline) -> PartOptions {
        let workers = match self.compression_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        PartOptions {
            encoding: Encoding { part_size: self.part_size, pipeline: pipeline.with_workers(workers) },
            transfer_concurrency: self.transfer_concurrency,
            idle_timeout: self.idle_timeout,
        }
    }
}

/// Takes a base backup into `repo` and returns its catalog record, written last. With
/// `options.incremental`, an incremental backup on top of a parent (see `incremental.rs`), or a full
/// one when none can be taken and `full_if_needed` says so.
pub async fn base_push(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    log: &Log,
) -> Result<BackupRecord, Error> {
    check_extra_args(&options.extra_args)?;
    let pg_basebackup = required_tool(options.pg_bin_dir.as_deref(), "pg_basebackup")?;
    let version = tool_version(&pg_basebackup)?;
    check_tar_to_stdout(&pg_basebackup, &version)?;
    repo.storage().check_root().await?;
    // Refuses a configuration whose encryption the repository's does not match, before any work.
    repo.writer_pipeline(options.compression_level).await?;
    if let Err(e) = sweep_abandoned(repo, log).await {
        log.info(format_args!("warning: could not check for backups abandoned by killed base-push runs: {e}"));
    }
    let tool = Tool { path: &pg_basebackup, version: &version };
    let Some(incremental) = &options.incremental else {
        return take(repo, options, progress, log, tool, None).await.map_err(Attempt::into_error);
    };
    let attempt = async {
        check_pg_basebackup(&pg_basebackup, &version)?;
        let parent = choose_parent(repo, incremental.from.as_deref()).await?;
        check_parent_chain(repo, &parent).await?;
        take(repo, options, progress, log, tool, Some(&parent)).await
    };
    match attempt.await {
        Ok(record) => Ok(record),
        Err(Attempt::Refused(e)) if incremental.full_if_needed => {
            log.info(format_args!("no incremental backup possible ({e}); taking a full backup (--full-if-needed)"));
            take(repo, options, progress, log, tool, None).await.map_err(Attempt::into_error)
        }
        Err(attempt) => Err(attempt.into_error()),
    }
}

/// The pg_basebackup that takes the backup, and what its `--version` says.
#[derive(Clone, Copy)]
struct Tool<'a> {
    path: &'a Path,
    version: &'a str,
}

/// Takes one backup under a new name: full, or incremental on top of `parent`. A failure removes
/// what it wrote (the claim on the parent too); success releases the claim, the child's record now
/// naming its parent.
async fn take(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    log: &Log,
    tool: Tool<'_>,
    parent: Option<&BackupRecord>,
) -> Result<BackupRecord, Attempt> {
    let pipeline = repo.writer_pipeline(options.compression_level).await?;
    let name = reserve_name(repo).await?;
    log.debug(format_args!("backup {name}: running {}", tool.path.display()));
    let options_for_parts = options.part_options(pipeline);
    let to = Destination { repo, options: options_for_parts, progress, backup: &name, written: vec![owner_key(&name)] };
    let mut run = Run { to, options, log, pg_basebackup: tool.path, incremental: None };
    let result = run.take_backup(tool.version.to_owned(), parent).await;
    match (&result, parent) {
        (Err(_), _) => remove_keys(repo, &run.to.written, log).await,
        (Ok(_), Some(parent)) => {
            if let Err(e) = release_parent(repo, &parent.name, &name).await {
                log.info(format_args!(
                    "warning: could not remove the claim of backup {name} on its parent {} ({e}); base-expire \
                     removes it, since the record names the parent",
                    parent.name
                ));
            }
        }
        (Ok(_), None) => {}
    }
    result
}

/// One backup being taken: where it goes, and the pg_basebackup that makes it.
struct Run<'a> {
    to: Destination<'a>,
    options: &'a PushOptions,
    log: &'a Log,
    pg_basebackup: &'a Path,
    /// The parent's backup_manifest, for `pg_basebackup --incremental`.
    incremental: Option<PathBuf>,
}

/// The stored archives of one backup, and what was learnt from them.
struct Stored {
    archives: Vec<ArchiveRecord>,
    observed: Observed,
    /// The spooled backup_manifest and its length.
    manifest: (File, u64),
    original_bytes: u64,
    arguments: Vec<String>,
}

impl Run<'_> {
    fn tool_error(&self, reason: String) -> Error {
        Error::ToolFailed { tool: self.pg_basebackup.display().to_string(), reason }
    }

    async fn take_backup(&mut self, version: String, parent: Option<&BackupRecord>) -> Result<BackupRecord, Attempt> {
        let (repo, name) = (self.to.repo, self.to.backup);
        let started_at = now_rfc3339();
        // Kept until the backup is taken: pg_basebackup reads the parent's manifest from it.
        let mut _parent_manifest = None;
        if let Some(parent) = parent {
            self.to.written.push(claim_key(&parent.name, name));
            let spool_dir = &self.options.spool_dir;
            let dir = tempfile::Builder::new()
                .prefix("walship-parent-manifest.")
                .tempdir_in(spool_dir)
                .map_err(|e| Error::local_io(spool_dir, "create spool directory", e))?;
            let manifest = dir.path().join("backup_manifest");
            claim_and_fetch_manifest(repo, parent, name, &manifest).await?;
            self.log.info(format_args!("backup {name}: incremental, on top of backup {}", parent.name));
            self.incremental = Some(manifest);
            _parent_manifest = Some(dir);
        }
        let refused = |e: Error| match parent.and_then(|p| refusal(&e, &p.name)) {
            Some(attempt) => attempt,
            None => Attempt::Failed(e),
        };
        let mut stored = match self.stream_backup().await {
            Err(Error::ToolFailed { reason, .. }) if reason.contains(SINGLE_TABLESPACE_ONLY) => {
                self.log.info(format_args!(
                    "the cluster has extra tablespaces, which pg_basebackup cannot stream: spooling the backup \
                     through {} (it needs the backup's full size free there; set [base] spool_dir)",
                    self.options.spool_dir.display()
                ));
                self.spool_backup().await.map_err(refused)?
            }
            other => other.map_err(refused)?,
        };
        let finished_at = now_rfc3339();
        let facts = self.cluster_facts(&stored.observed)?;
        repo.ensure_identity(&facts, &format!("base backup {name}")).await?;
        let label = parse_backup_label(&stored.observed.backup_label)
            .map_err(|reason| self.tool_error(format!("backup_label: {reason}")))?;

        self.to.progress.phase("storing backup_manifest");
        let manifest_key = format!("{BACKUPS_PREFIX}{name}/backup_manifest");
        self.to.written.push(manifest_key.clone());
        let (manifest_file, manifest_len) = &mut stored.manifest;
        let manifest = store_file(&self.to, &manifest_key, manifest_file, *manifest_len).await?;
        let ranges = manifest_wal_ranges(manifest_file)
            .map_err(|reason| self.tool_error(format!("backup_manifest: {reason}")))?;
        let stop = ranges.last().ok_or_else(|| self.tool_error("backup_manifest lists no WAL range".into()))?;
        let stored_bytes =
            stored.archives.iter().flat_map(|a| &a.parts).map(|p| p.stored_bytes).sum::<u64>() + manifest.stored_bytes;
        let (backup_type, format_version) = match parent {
            Some(_) => (BackupType::Incremental, INCREMENTAL_RECORD_FORMAT),
            None => (BackupType::Full, FULL_RECORD_FORMAT),
        };
        let record = BackupRecord {
            format_version,
            name: name.to_owned(),
            started_at,
            finished_at,
            start_lsn: label.start_lsn,
            stop_lsn: stop.end_lsn.clone(),
            start_wal_file: label.start_wal_file,
            timeline: label.timeline,
            stop_timeline: stop.timeline,
            backup_from: label.backup_from,
            pg_version: facts.pg_version,
            system_identifier: facts.system_identifier.to_string(),
            wal_segment_size: facts.wal_segment_size,
            original_bytes: stored.original_bytes,
            stored_bytes,
            archives: stored.archives,
            manifest,
            pg_basebackup: ToolRecord { version, arguments: recorded_arguments(&stored.arguments, parent) },
            created_by: format!("walship {}", env!("CARGO_PKG_VERSION")),
            backup_type,
            parent: parent.map(|p| p.name.clone()),
        };
        self.log.debug(format_args!("backup {name}: {} tar members in base.tar", stored.observed.members));
        self.to.progress.phase("writing the catalog record");
        write_record(repo, &record).await?;
        Ok(record)
    }

    /// The cluster the backup is of, from its first WAL segment, checked against its PG_VERSION.
    fn cluster_facts(&self, observed: &Observed) -> Result<ClusterFacts, Error> {
        let header = LongPageHeader::parse(&observed.first_wal_header).map_err(|reason| {
            self.tool_error(format!("WAL file {} in the backup: {reason}", observed.first_wal_name))
        })?;
        let facts = ClusterFacts {
            system_identifier: header.system_identifier,
            pg_version: header.pg_major().expect("parse accepts known magics only"),
            wal_segment_size: header.segment_size,
        };
        if observed.pg_version != facts.pg_version.to_string() {
            return Err(self.tool_error(format!(
                "PG_VERSION says {} but the WAL is PostgreSQL {}",
                observed.pg_version, facts.pg_version
            )));
        }
        Ok(facts)
    }

    /// The usual way: pg_basebackup's stdout straight into the repository.
    async fn stream_backup(&mut self) -> Result<Stored, Error> {
        let pg_basebackup = self.pg_basebackup;
        let arguments =
            basebackup_arguments("-", self.to.backup, &self.options.extra_args, self.incremental.as_deref());
        let mut running = Running::spawn(pg_basebackup, &arguments, Stdio::piped(), self.log)?;
        let stdout = running.child.stdout.take().expect("piped");
        let base = Archive {
            name: "base.tar".into(),
            source: Box::new(stdout),
            contents: Contents::DataDirectory,
            before: Transferred::default(),
        };
        let stored = store_archive(&mut self.to, base, || {
            // A reader blocked on a stalled pg_basebackup only returns once its pipe closes.
            let _ = running.child.kill();
        })
        .await;
        let status = running.child.wait().map_err(|e| tool_error(pg_basebackup, e))?;
        let (parts, end) = match (stored, running.check(status)) {
            (Err(e @ Error::Interrupted { .. }), _) => return Err(e),
            (_, Err(failed)) => return Err(failed),
            (stored, Ok(())) => stored?,
        };
        let mut observed =
            end.observed.map_err(|reason| tool_failure_reason(pg_basebackup, &reason))?.expect("watched in full");
        let manifest = observed.manifest.take().ok_or_else(|| {
            tool_failure_reason(pg_basebackup, "the backup has no backup_manifest (do not pass --no-manifest)")
        })?;
        Ok(Stored {
            archives: vec![ArchiveRecord { name: "base.tar".into(), tablespace: None, parts }],
            observed,
            manifest,
            original_bytes: end.original_bytes,
            arguments,
        })
    }

    /// With extra tablespaces pg_basebackup refuses stdout: it writes `base.tar`, one `<OID>.tar` per
    /// tablespace and `backup_manifest` into a spool directory, and each archive is stored from there.
    async fn spool_backup(&mut self) -> Result<Stored, Error> {
        let spool_dir = &self.options.spool_dir;
        let spool = tempfile::Builder::new()
            .prefix("walship-base-push.")
            .tempdir_in(spool_dir)
            .map_err(|e| Error::local_io(spool_dir, "create spool directory", e))?;
        let target = spool.path().join("backup");
        let arguments = basebackup_arguments(
            &target.display().to_string(),
            self.to.backup,
            &self.options.extra_args,
            self.incremental.as_deref(),
        );
        let running = Running::spawn(self.pg_basebackup, &arguments, Stdio::null(), self.log)?;
        self.to.progress.phase("pg_basebackup is writing into the spool directory");
        self.wait_for(running).await?;
        let tablespace_archives = tablespace_archives(&target)?;
        let base = Archive {
            name: "base.tar".into(),
            source: Box::new(open(&target.join("base.tar"))?),
            contents: Contents::DataDirectory,
            before: Transferred::default(),
        };
        let (parts, end) = store_archive(&mut self.to, base, || {}).await?;
        let observed =
            end.observed.map_err(|reason| tool_failure_reason(self.pg_basebackup, &reason))?.expect("watched in full");
        let locations = parse_tablespace_map(observed.tablespace_map.as_deref().unwrap_or(""));
        let mut archives = vec![ArchiveRecord { name: "base.tar".into(), tablespace: None, parts }];
        let stored_bytes = archives[0].parts.iter().map(|p| p.stored_bytes).sum();
        let mut done = Transferred { original: end.original_bytes, stored: stored_bytes };
        for (oid, path) in tablespace_archives {
            let location = locations.iter().find(|(o, _)| *o == oid).map(|(_, l)| l.clone()).ok_or_else(|| {
                tool_failure_reason(self.pg_basebackup, &format!("tablespace {oid} is not in tablespace_map"))
            })?;
            let archive = self.store_tablespace(oid, location, &path, &mut done).await?;
            archives.push(archive);
            // Free the spool as it goes: the disk a backup needs is then its largest archive, not all.
            let _ = std::fs::remove_file(&path);
        }
        let manifest_path = target.join("backup_manifest");
        let manifest = open(&manifest_path)?;
        let manifest_len = manifest.metadata().map_err(|e| Error::local_io(&manifest_path, "stat", e))?.len();
        self.log.debug(format_args!("backup {}: {} archives stored from the spool", self.to.backup, archives.len()));
        Ok(Stored { archives, observed, manifest: (manifest, manifest_len), original_bytes: done.original, arguments })
    }

    /// Waits for a pg_basebackup writing into the spool; a signal stops it.
    async fn wait_for(&self, mut running: Running) -> Result<(), Error> {
        let mut signals = Signals::new()?;
        let status = loop {
            match running.child.try_wait().map_err(|e| tool_error(self.pg_basebackup, e))? {
                Some(status) => break status,
                None => tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    signal = signals.recv() => {
                        let _ = running.child.kill();
                        let _ = running.child.wait();
                        return Err(Error::Interrupted { signal });
                    }
                },
            }
        };
        running.check(status)
    }

    /// Stores a spooled tablespace archive; `done` counts what the backup has transferred so far.
    async fn store_tablespace(
        &mut self,
        oid: u32,
        location: String,
        path: &Path,
        done: &mut Transferred,
    ) -> Result<ArchiveRecord, Error> {
        let name = format!("{oid}.tar");
        let archive = Archive {
            name: name.clone(),
            source: Box::new(open(path)?),
            contents: Contents::Tablespace,
            before: *done,
        };
        let (parts, end) = store_archive(&mut self.to, archive, || {}).await?;
        end.observed.map_err(|reason| tool_failure_reason(self.pg_basebackup, &format!("{name}: {reason}")))?;
        done.original += end.original_bytes;
        done.stored += parts.iter().map(|p| p.stored_bytes).sum::<u64>();
        Ok(ArchiveRecord { name, tablespace: Some(TablespaceRecord { oid, location }), parts })
    }
}

/// The arguments as the catalog records them: passwords redacted, and the parent's manifest named by
/// its key rather than the temporary file pg_basebackup read it from.
fn recorded_arguments(arguments: &[String], parent: Option<&BackupRecord>) -> Vec<String> {
    let mut recorded = redact(arguments);
    if let Some(parent) = parent {
        for arg in recorded.iter_mut().filter(|a| a.starts_with("--incremental=")) {
            *arg = format!("--incremental={}", parent.manifest.key);
        }
    }
    recorded
}

fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|e| Error::local_io(path, "open", e))
}

/// The tablespace archives (`<OID>.tar`) pg_basebackup spooled into `target`, by OID.
fn tablespace_archives(target: &Path) -> Result<Vec<(u32, PathBuf)>, Error> {
    let mut archives: Vec<(u32, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(target).map_err(|e| Error::local_io(target, "read", e))? {
        let entry = entry.map_err(|e| Error::local_io(target, "read", e))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(oid) = file_name.strip_suffix(".tar").and_then(|stem| stem.parse::<u32>().ok()) {
            archives.push((oid, entry.path()));
        }
    }
    archives.sort();
    Ok(archives)
}

/// Writes the catalog record: the backup exists from here on.
async fn write_record(repo: &Repository, record: &BackupRecord) -> Result<(), Error> {
    let key = BackupRecord::catalog_key(&record.name);
    let mut json = serde_json::to_vec_pretty(record).expect("plain struct serializes");
    json.push(b'\n');
    let mut writer = repo.storage().create(&key, PutOptions::default()).await?;
    writer.write(Bytes::from(json)).await?;
    writer.commit().await?;
    Ok(())
}
