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

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::basebackup::{
    Running, SINGLE_TABLESPACE_ONLY, basebackup_arguments, check_extra_args, redact, tool_failure_reason,
};
use super::manifest::{manifest_wal_ranges, parse_backup_label, parse_tablespace_map};
use super::owner::{owner_key, remove_keys, reserve_name, sweep_abandoned};
use super::recovery::now_rfc3339;
use super::tar_watch::{Observed, TarWatcher};
use super::tools::{required_tool, tool_error, tool_version};
use super::{
    ArchiveRecord, BACKUPS_PREFIX, BackupRecord, CATALOG_FORMAT_VERSION, PartRecord, Progress, TablespaceRecord,
    ToolRecord,
};
use crate::codec::{ContentDigest, Encoder};
use crate::error::Error;
use crate::log::Log;
use crate::repo::{ClusterFacts, Repository};
use crate::storage::{ObjectWriter, PutOptions, StorageError};
use crate::wal::LongPageHeader;

const READ_CHUNK: usize = 1 << 20;
const SEND_CHUNK: usize = 1 << 20;
/// Encoded chunks waiting for the network: bounds memory between the encoder and the writers.
const CHANNEL_DEPTH: usize = 8;

pub struct PushOptions {
    pub pg_bin_dir: Option<PathBuf>,
    /// Extra pg_basebackup arguments (connection, rate limit, checkpoint mode...).
    pub extra_args: Vec<String>,
    pub part_size: u64,
    pub compression_level: i32,
    /// zstd workers; 0: one per core.
    pub compression_workers: u32,
    /// Finished parts completing (uploading their last pieces) while the next streams.
    pub transfer_concurrency: usize,
    /// A write or completion that makes no progress for this long fails the backup.
    pub idle_timeout: Duration,
    /// Where a backup with extra tablespaces is spooled (pg_basebackup cannot stream those).
    pub spool_dir: PathBuf,
}

fn part_key(name: &str, archive: &str, index: usize) -> String {
    format!("{BACKUPS_PREFIX}{name}/{archive}.{index:06}")
}

/// Takes a base backup into `repo` and returns its catalog record, written last.
pub async fn base_push(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    log: &Log,
) -> Result<BackupRecord, Error> {
    check_extra_args(&options.extra_args)?;
    let pg_basebackup = required_tool(options.pg_bin_dir.as_deref(), "pg_basebackup")?;
    let version = tool_version(&pg_basebackup)?;
    repo.storage().check_root().await?;
    if let Err(e) = sweep_abandoned(repo, log).await {
        log.info(format_args!("warning: could not check for backups abandoned by killed base-push runs: {e}"));
    }
    let name = reserve_name(repo).await?;
    log.debug(format_args!("backup {name}: running {}", pg_basebackup.display()));

    let mut written: Vec<String> = vec![owner_key(&name)];
    let result = take_backup(repo, options, progress, log, &pg_basebackup, version, &name, &mut written).await;
    if result.is_err() {
        remove_keys(repo, &written, log).await;
    }
    result
}

/// What the reader thread sends to the writers.
enum Message {
    Chunk { bytes: Bytes, original_so_far: u64 },
    PartEnd(ContentDigest),
}

/// What the reader thread ends with.
struct StreamEnd {
    /// What the watcher found; `None` for a tablespace's archive, which is only checked for being a
    /// complete tar archive.
    observed: Result<Option<Observed>, String>,
    original_bytes: u64,
}

/// The stored archives of one backup, and what was learnt from them.
struct Stored {
    archives: Vec<ArchiveRecord>,
    observed: Observed,
    manifest: (std::fs::File, u64),
    original_bytes: u64,
    arguments: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
async fn take_backup(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    log: &Log,
    pg_basebackup: &Path,
    version: String,
    name: &str,
    written: &mut Vec<String>,
) -> Result<BackupRecord, Error> {
    let started_at = now_rfc3339();
    let tool_error = |reason: String| Error::ToolFailed { tool: pg_basebackup.display().to_string(), reason };
    let mut stored = match stream_backup(repo, options, progress, log, pg_basebackup, name, written).await {
        Err(Error::ToolFailed { reason, .. }) if reason.contains(SINGLE_TABLESPACE_ONLY) => {
            log.info(format_args!(
                "the cluster has extra tablespaces, which pg_basebackup cannot stream: spooling the backup through \
                 {} (it needs the backup's full size free there; set [base] spool_dir)",
                options.spool_dir.display()
            ));
            spool_backup(repo, options, progress, log, pg_basebackup, name, written).await?
        }
        other => other?,
    };
    let finished_at = now_rfc3339();
    let observed = &stored.observed;
    let header = LongPageHeader::parse(&observed.first_wal_header)
        .map_err(|reason| tool_error(format!("WAL file {} in the backup: {reason}", observed.first_wal_name)))?;
    let facts = ClusterFacts {
        system_identifier: header.system_identifier,
        pg_version: header.pg_major().expect("parse accepts known magics only"),
        wal_segment_size: header.segment_size,
    };
    if observed.pg_version != facts.pg_version.to_string() {
        return Err(tool_error(format!(
            "PG_VERSION says {} but the WAL is PostgreSQL {}",
            observed.pg_version, facts.pg_version
        )));
    }
    repo.ensure_identity(&facts, &format!("base backup {name}")).await?;
    let label =
        parse_backup_label(&observed.backup_label).map_err(|reason| tool_error(format!("backup_label: {reason}")))?;

    progress.phase("storing backup_manifest");
    let manifest_key = format!("{BACKUPS_PREFIX}{name}/backup_manifest");
    written.push(manifest_key.clone());
    let (manifest_file, manifest_len) = &mut stored.manifest;
    let manifest = store_file(repo, &manifest_key, manifest_file, *manifest_len, options).await?;
    let ranges =
        manifest_wal_ranges(manifest_file).map_err(|reason| tool_error(format!("backup_manifest: {reason}")))?;
    let stop = ranges.last().ok_or_else(|| tool_error("backup_manifest lists no WAL range".into()))?;
    let stored_bytes =
        stored.archives.iter().flat_map(|a| &a.parts).map(|p| p.stored_bytes).sum::<u64>() + manifest.stored_bytes;
    let record = BackupRecord {
        format_version: CATALOG_FORMAT_VERSION,
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
        pg_basebackup: ToolRecord { version, arguments: redact(&stored.arguments) },
        created_by: format!("walship {}", env!("CARGO_PKG_VERSION")),
    };
    log.debug(format_args!("backup {name}: {} tar members in base.tar", stored.observed.members));
    progress.phase("writing the catalog record");
    let key = BackupRecord::catalog_key(name);
    let mut json = serde_json::to_vec_pretty(&record).expect("plain struct serializes");
    json.push(b'\n');
    let mut writer = repo.storage().create(&key, PutOptions::default()).await?;
    writer.write(Bytes::from(json)).await?;
    writer.commit().await?;
    Ok(record)
}

fn compression_workers(options: &PushOptions) -> u32 {
    match options.compression_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        n => n,
    }
}

/// The usual way: pg_basebackup's stdout straight into the repository.
async fn stream_backup(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    log: &Log,
    pg_basebackup: &Path,
    name: &str,
    written: &mut Vec<String>,
) -> Result<Stored, Error> {
    let arguments = basebackup_arguments("-", name, &options.extra_args);
    let mut running = Running::spawn(pg_basebackup, &arguments, Stdio::piped(), log)?;
    let stdout = running.child.stdout.take().expect("piped");
    let stored =
        store_archive(repo, options, progress, name, "base.tar", Box::new(stdout), true, (0, 0), written, || {
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
async fn spool_backup(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    log: &Log,
    pg_basebackup: &Path,
    name: &str,
    written: &mut Vec<String>,
) -> Result<Stored, Error> {
    let spool = tempfile::Builder::new()
        .prefix("walship-base-push.")
        .tempdir_in(&options.spool_dir)
        .map_err(|e| Error::local_io(&options.spool_dir, "create spool directory", e))?;
    let target = spool.path().join("backup");
    let arguments = basebackup_arguments(&target.display().to_string(), name, &options.extra_args);
    let mut running = Running::spawn(pg_basebackup, &arguments, Stdio::null(), log)?;
    progress.phase("pg_basebackup is writing into the spool directory");
    let mut signals = Signals::new()?;
    let status = loop {
        match running.child.try_wait().map_err(|e| tool_error(pg_basebackup, e))? {
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
    running.check(status)?;
    let mut tablespace_archives: Vec<(u32, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&target).map_err(|e| Error::local_io(&target, "read", e))? {
        let entry = entry.map_err(|e| Error::local_io(&target, "read", e))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(oid) = file_name.strip_suffix(".tar").and_then(|stem| stem.parse::<u32>().ok()) {
            tablespace_archives.push((oid, entry.path()));
        }
    }
    tablespace_archives.sort();
    let open = |path: &Path| std::fs::File::open(path).map_err(|e| Error::local_io(path, "open", e));
    let base = open(&target.join("base.tar"))?;
    let (parts, end) =
        store_archive(repo, options, progress, name, "base.tar", Box::new(base), true, (0, 0), written, || {}).await?;
    let observed =
        end.observed.map_err(|reason| tool_failure_reason(pg_basebackup, &reason))?.expect("watched in full");
    let locations = parse_tablespace_map(observed.tablespace_map.as_deref().unwrap_or(""));
    let mut archives = vec![ArchiveRecord { name: "base.tar".into(), tablespace: None, parts }];
    let mut original_bytes = end.original_bytes;
    let mut stored_bytes: u64 = archives[0].parts.iter().map(|p| p.stored_bytes).sum();
    for (oid, path) in tablespace_archives {
        let location =
            locations.iter().find(|(o, _)| *o == oid).map(|(_, l)| l.clone()).ok_or_else(|| {
                tool_failure_reason(pg_basebackup, &format!("tablespace {oid} is not in tablespace_map"))
            })?;
        let archive_name = format!("{oid}.tar");
        let file = open(&path)?;
        let offsets = (original_bytes, stored_bytes);
        let (parts, end) =
            store_archive(repo, options, progress, name, &archive_name, Box::new(file), false, offsets, written, || {})
                .await?;
        end.observed.map_err(|reason| tool_failure_reason(pg_basebackup, &format!("{archive_name}: {reason}")))?;
        original_bytes += end.original_bytes;
        stored_bytes += parts.iter().map(|p| p.stored_bytes).sum::<u64>();
        archives.push(ArchiveRecord {
            name: archive_name,
            tablespace: Some(TablespaceRecord { oid, location }),
            parts,
        });
        // Free the spool as it goes: the disk a backup needs is then its largest archive, not all.
        let _ = std::fs::remove_file(&path);
    }
    let manifest_path = target.join("backup_manifest");
    let manifest = open(&manifest_path)?;
    let manifest_len = manifest.metadata().map_err(|e| Error::local_io(&manifest_path, "stat", e))?.len();
    log.debug(format_args!("backup {name}: {} archives stored from the spool", archives.len()));
    Ok(Stored { archives, observed, manifest: (manifest, manifest_len), original_bytes, arguments })
}

/// Stores one tar archive from `source`: a reader thread encodes, [`store_parts`] writes.
#[allow(clippy::too_many_arguments)]
async fn store_archive(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    name: &str,
    archive: &str,
    source: Box<dyn Read + Send>,
    watch: bool,
    offsets: (u64, u64),
    written: &mut Vec<String>,
    stop_source: impl FnOnce(),
) -> Result<(Vec<PartRecord>, StreamEnd), Error> {
    let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
    let (part_size, level, workers) = (options.part_size, options.compression_level, compression_workers(options));
    let reader = std::thread::spawn(move || read_stream(source, &sender, part_size, level, workers, watch));
    let parts = store_parts(repo, options, progress, name, archive, receiver, offsets, written).await;
    // The writers gave up: the reader stops at its next send, or once its source is stopped.
    if parts.is_err() {
        stop_source();
    }
    let end = reader.join().map_err(|_| Error::Internal("the stream reader panicked".into()))?;
    Ok((parts?, end))
}

/// The reader thread: follows the tar stream, encodes it part by part and hands the encoded bytes
/// to the writers. Stops early when they hang up.
fn read_stream(
    mut stdout: Box<dyn Read + Send>,
    sender: &mpsc::Sender<Message>,
    part_size: u64,
    level: i32,
    workers: u32,
    watch: bool,
) -> StreamEnd {
    let mut watcher = TarWatcher::new(LongPageHeader::LEN);
    let mut watch_error: Option<String> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::with_capacity(2 * SEND_CHUNK);
    let mut encoder: Option<Encoder> = None;
    let mut in_part = 0u64;
    let mut total = 0u64;
    let send = |message: Message| sender.blocking_send(message).is_ok();
    let end = |observed, total| StreamEnd { observed, original_bytes: total };
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return end(Err(format!("reading pg_basebackup's output: {e}")), total),
        };
        if watch_error.is_none()
            && let Err(e) = watcher.feed(&buf[..n])
        {
            watch_error = Some(e);
        }
        let mut offset = 0;
        while offset < n {
            let encoding = match &mut encoder {
                Some(encoding) => encoding,
                None => match Encoder::with_workers(level, workers) {
                    Ok(new) => encoder.insert(new),
                    Err(e) => return end(Err(format!("starting zstd: {e}")), total),
                },
            };
            let take = ((part_size - in_part) as usize).min(n - offset);
            if let Err(e) = encoding.update(&buf[offset..offset + take], &mut out) {
                return end(Err(format!("compressing: {e}")), total);
            }
            offset += take;
            in_part += take as u64;
            total += take as u64;
            if in_part == part_size {
                let digest = match encoder.take().expect("encoding").finish(&mut out) {
                    Ok(digest) => digest,
                    Err(e) => return end(Err(format!("compressing: {e}")), total),
                };
                in_part = 0;
                let bytes = Bytes::from(std::mem::replace(&mut out, Vec::with_capacity(2 * SEND_CHUNK)));
                if !send(Message::Chunk { bytes, original_so_far: total }) || !send(Message::PartEnd(digest)) {
                    return end(Err("stopped".into()), total);
                }
            } else if out.len() >= SEND_CHUNK {
                let bytes = Bytes::from(std::mem::replace(&mut out, Vec::with_capacity(2 * SEND_CHUNK)));
                if !send(Message::Chunk { bytes, original_so_far: total }) {
                    return end(Err("stopped".into()), total);
                }
            }
        }
    }
    if let Some(encoding) = encoder.take() {
        let digest = match encoding.finish(&mut out) {
            Ok(digest) => digest,
            Err(e) => return end(Err(format!("compressing: {e}")), total),
        };
        let bytes = Bytes::from(out);
        if !send(Message::Chunk { bytes, original_so_far: total }) || !send(Message::PartEnd(digest)) {
            return end(Err("stopped".into()), total);
        }
    }
    let observed = match watch_error {
        Some(e) => Err(e),
        None if total == 0 => Err("pg_basebackup wrote nothing".into()),
        None if watch => watcher.finish().map(Some),
        None => watcher.finish_archive().map(|()| None),
    };
    end(observed, total)
}

/// The async side: writes each part as its encoded bytes arrive, and completes finished parts while
/// the next one streams. Returns the parts in order, all durable.
#[allow(clippy::too_many_arguments)]
async fn store_parts(
    repo: &Repository,
    options: &PushOptions,
    progress: &dyn Progress,
    name: &str,
    archive: &str,
    mut receiver: mpsc::Receiver<Message>,
    (original_offset, stored_offset): (u64, u64),
    written: &mut Vec<String>,
) -> Result<Vec<PartRecord>, Error> {
    let mut signals = Signals::new()?;
    let mut completing: JoinSet<Result<(), StorageError>> = JoinSet::new();
    let mut parts: Vec<PartRecord> = Vec::new();
    let mut current: Option<(Box<dyn ObjectWriter>, String, u64)> = None;
    let mut stored_total = 0u64;
    let mut part_start = 0u64;
    let mut original_so_far = 0u64;
    let idle = options.idle_timeout;
    let timed = |what: String| Error::DeadlineExceeded {
        what,
        seconds: idle.as_secs(),
        last: "no progress (deadline_secs)".into(),
    };
    let result: Result<(), Error> = async {
        loop {
            let message = tokio::select! {
                message = receiver.recv() => message,
                signal = signals.recv() => return Err(Error::Interrupted { signal }),
                Some(done) = completing.join_next(), if !completing.is_empty() => {
                    done.map_err(|e| Error::Internal(format!("completing a part panicked: {e}")))??;
                    continue;
                }
            };
            let Some(message) = message else { return Ok(()) };
            match message {
                Message::Chunk { bytes, original_so_far: so_far } => {
                    if current.is_none() {
                        let key = part_key(name, archive, parts.len() + 1);
                        written.push(key.clone());
                        let options = PutOptions { attributes: Default::default(), size_hint: Some(options.part_size) };
                        let writer = tokio::time::timeout(idle, repo.storage().create(&key, options))
                            .await
                            .map_err(|_| timed(repo.storage().location(&key)))??;
                        current = Some((writer, key, 0));
                    }
                    let (writer, key, stored) = current.as_mut().expect("just created");
                    *stored += bytes.len() as u64;
                    stored_total += bytes.len() as u64;
                    original_so_far = so_far;
                    tokio::select! {
                        written = tokio::time::timeout(idle, writer.write(bytes)) => {
                            written.map_err(|_| timed(repo.storage().location(key)))??;
                        }
                        signal = signals.recv() => return Err(Error::Interrupted { signal }),
                    }
                    progress.update(original_offset + original_so_far, stored_offset + stored_total, None);
                }
                Message::PartEnd(digest) => {
                    let (writer, key, stored) = current.take().expect("a part ends after its chunks");
                    parts.push(PartRecord {
                        key: key.clone(),
                        original_bytes: original_so_far - part_start,
                        stored_bytes: stored,
                        sha256: digest.sha256_hex(),
                    });
                    debug_assert_eq!(digest.len, original_so_far - part_start);
                    part_start = original_so_far;
                    while completing.len() >= options.transfer_concurrency {
                        let done = completing.join_next().await.expect("not empty");
                        done.map_err(|e| Error::Internal(format!("completing a part panicked: {e}")))??;
                    }
                    completing.spawn(async move {
                        tokio::time::timeout(idle, writer.commit()).await.unwrap_or_else(|_| {
                            Err(StorageError::Other {
                                location: key,
                                message: format!("completing the part made no progress for {} s", idle.as_secs()),
                                retryable: false,
                            })
                        })
                    });
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        drop(receiver);
        if let Some((writer, _, _)) = current.take() {
            let _ = writer.abort().await;
        }
        // Let parts already completing settle, so that what they published can be removed.
        while completing.join_next().await.is_some() {}
        return Err(e);
    }
    while let Some(done) = completing.join_next().await {
        done.map_err(|e| Error::Internal(format!("completing a part panicked: {e}")))??;
    }
    if current.is_some() {
        return Err(Error::Internal("the stream ended inside a part".into()));
    }
    Ok(parts)
}

/// SIGINT, SIGTERM and SIGHUP: stop, remove what was written, exit.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind| signal(kind).map_err(|e| Error::local_io(Path::new("signal handler"), "install", e));
        Ok(Signals {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// Stores a local file (the spooled manifest) as one object.
async fn store_file(
    repo: &Repository,
    key: &str,
    file: &mut std::fs::File,
    len: u64,
    options: &PushOptions,
) -> Result<PartRecord, Error> {
    use std::io::{Seek, SeekFrom};
    let location = repo.storage().location(key);
    let local_error =
        |e: std::io::Error| Error::LocalIo { path: "backup_manifest (spooled)".into(), operation: "read", source: e };
    file.seek(SeekFrom::Start(0)).map_err(local_error)?;
    let mut writer =
        repo.storage().create(key, PutOptions { attributes: Default::default(), size_hint: Some(len) }).await?;
    let mut encoder = Encoder::new(options.compression_level).map_err(local_error)?;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    let mut stored = 0u64;
    let digest = loop {
        let n = file.read(&mut buf).map_err(local_error)?;
        if n == 0 {
            break encoder.finish(&mut out).map_err(local_error)?;
        }
        encoder.update(&buf[..n], &mut out).map_err(local_error)?;
        if out.len() >= SEND_CHUNK {
            stored += out.len() as u64;
            writer.write(Bytes::from(std::mem::take(&mut out))).await?;
        }
    };
    stored += out.len() as u64;
    writer.write(Bytes::from(out)).await?;
    tokio::time::timeout(options.idle_timeout, writer.commit()).await.map_err(|_| Error::DeadlineExceeded {
        what: location,
        seconds: options.idle_timeout.as_secs(),
        last: "no progress".into(),
    })??;
    file.seek(SeekFrom::Start(0)).map_err(local_error)?;
    Ok(PartRecord {
        key: key.to_owned(),
        original_bytes: digest.len,
        stored_bytes: stored,
        sha256: digest.sha256_hex(),
    })
}
