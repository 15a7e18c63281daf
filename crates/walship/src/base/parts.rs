//! The part writer of base-push: the async side that takes the reader thread's encoded parts and
//! writes each as one object, completing a finished part (multipart upload, fsync, link) while the
//! next one streams; and the single-object store of the spooled manifest.
//!
//! Every key is recorded in [`Destination::written`] before it is created, so that a failure or a
//! signal removes all of it; a part counts only once its commit returned.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::reader::{Contents, Encoding, Message, SEND_CHUNK, StreamEnd, read_stream};
use super::signals::Signals;
use super::{BACKUPS_PREFIX, PartRecord, Progress, Transferred};
use crate::codec::ContentDigest;
use crate::error::Error;
use crate::repo::Repository;
use crate::storage::{ObjectWriter, PutOptions, StorageError};

/// Encoded chunks waiting for the network: bounds memory between the encoder and the writers.
const CHANNEL_DEPTH: usize = 8;

/// How parts are cut, encoded and written: the part writer's share of the push options.
#[derive(Clone)]
pub(super) struct PartOptions {
    /// How the archive is cut into parts and encoded.
    pub(super) encoding: Encoding,
    /// Finished parts completing while the next streams.
    pub(super) transfer_concurrency: usize,
    /// A write or completion that makes no progress for this long fails the backup.
    pub(super) idle_timeout: Duration,
}

/// Where the objects of one backup go, and what has been written there so far.
pub(super) struct Destination<'a> {
    /// The repository the backup goes to.
    pub(super) repo: &'a Repository,
    /// How its parts are written.
    pub(super) options: PartOptions,
    /// Told the bytes stored as they pass.
    pub(super) progress: &'a dyn Progress,
    /// The backup's name: its objects go under `backups/<NAME>/`.
    pub(super) backup: &'a str,
    /// Every key created (or about to be), oldest first: what a failure removes.
    pub(super) written: Vec<String>,
}

/// One tar archive to store.
pub(super) struct Archive {
    /// `base.tar` or `<OID>.tar`.
    pub(super) name: String,
    /// The tar archive's bytes: pg_basebackup's stdout or a spooled file.
    pub(super) source: Box<dyn Read + Send>,
    /// What it holds, and so what is checked as it passes.
    pub(super) contents: Contents,
    /// What the backup's earlier archives transferred, so that progress runs on from there.
    pub(super) before: Transferred,
}

fn part_key(backup: &str, archive: &str, index: usize) -> String {
    format!("{BACKUPS_PREFIX}{backup}/{archive}.{index:06}")
}

fn timed_out(what: String, idle: Duration) -> Error {
    Error::DeadlineExceeded { what, seconds: idle.as_secs(), last: "no progress (deadline_secs)".into() }
}

fn completion_panicked(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("completing a part panicked: {e}"))
}

/// Stores one tar archive: a reader thread encodes, the writers here write. `stop_source` is called
/// when the writers give up, so that a reader blocked on its source returns.
pub(super) async fn store_archive(
    to: &mut Destination<'_>,
    archive: Archive,
    stop_source: impl FnOnce(),
) -> Result<(Vec<PartRecord>, StreamEnd), Error> {
    let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
    let (source, encoding, contents) = (archive.source, to.options.encoding.clone(), archive.contents);
    let reader = std::thread::spawn(move || read_stream(source, &sender, encoding, contents));
    let parts = store_parts(to, &archive.name, receiver, archive.before).await;
    // The writers gave up: the reader stops at its next send, or once its source is stopped.
    if parts.is_err() {
        stop_source();
    }
    let end = reader.join().map_err(|_| Error::Internal("the stream reader panicked".into()))?;
    Ok((parts?, end))
}

/// The async side: writes each part as its encoded bytes arrive, and completes finished parts while
/// the next one streams. Returns the parts in order, all durable.
async fn store_parts(
    to: &mut Destination<'_>,
    archive: &str,
    mut receiver: mpsc::Receiver<Message>,
    before: Transferred,
) -> Result<Vec<PartRecord>, Error> {
    let mut signals = Signals::new()?;
    let mut writing = PartsWriter { archive, before, ..PartsWriter::default() };
    let result: Result<(), Error> = async {
        loop {
            let message = tokio::select! {
                message = receiver.recv() => message,
                signal = signals.recv() => return Err(Error::Interrupted { signal }),
                Some(done) = writing.completing.join_next(), if !writing.completing.is_empty() => {
                    done.map_err(completion_panicked)??;
                    continue;
                }
            };
            match message {
                None => return Ok(()),
                Some(Message::Chunk { bytes, original_so_far }) => {
                    writing.chunk(to, bytes, original_so_far, &mut signals).await?;
                }
                Some(Message::PartEnd(digest)) => writing.part_end(&to.options, digest).await?,
            }
        }
    }
    .await;
    if let Err(e) = result {
        drop(receiver);
        writing.abandon().await;
        return Err(e);
    }
    writing.settle().await
}

/// A part being written: its writer, key and the stored bytes written so far.
struct OpenPart {
    writer: Box<dyn ObjectWriter>,
    key: String,
    stored: u64,
}

/// The state of [`store_parts`] for one archive.
#[derive(Default)]
struct PartsWriter<'a> {
    archive: &'a str,
    before: Transferred,
    completing: JoinSet<Result<(), StorageError>>,
    parts: Vec<PartRecord>,
    current: Option<OpenPart>,
    stored_total: u64,
    part_start: u64,
    original_so_far: u64,
}

impl PartsWriter<'_> {
    /// Writes a chunk of the current part, creating the part's object with its first chunk.
    async fn chunk(
        &mut self,
        to: &mut Destination<'_>,
        bytes: Bytes,
        original_so_far: u64,
        signals: &mut Signals,
    ) -> Result<(), Error> {
        let idle = to.options.idle_timeout;
        let storage = to.repo.storage();
        if self.current.is_none() {
            let key = part_key(to.backup, self.archive, self.parts.len() + 1);
            to.written.push(key.clone());
            let size_hint = Some(to.options.encoding.part_size);
            let options = PutOptions { attributes: Default::default(), size_hint };
            let writer = tokio::time::timeout(idle, storage.create(&key, options))
                .await
                .map_err(|_| timed_out(storage.location(&key), idle))??;
            self.current = Some(OpenPart { writer, key, stored: 0 });
        }
        let part = self.current.as_mut().expect("just created");
        part.stored += bytes.len() as u64;
        self.stored_total += bytes.len() as u64;
        self.original_so_far = original_so_far;
        tokio::select! {
            written = tokio::time::timeout(idle, part.writer.write(bytes)) => {
                written.map_err(|_| timed_out(storage.location(&part.key), idle))??;
            }
            signal = signals.recv() => return Err(Error::Interrupted { signal }),
        }
        let (original, stored) = (self.before.original + self.original_so_far, self.before.stored + self.stored_total);
        to.progress.update(original, stored, None);
        Ok(())
    }

    /// Ends the current part: records it and starts its completion, once fewer than
    /// `transfer_concurrency` parts are completing.
    async fn part_end(&mut self, options: &PartOptions, digest: ContentDigest) -> Result<(), Error> {
        let OpenPart { writer, key, stored } = self.current.take().expect("a part ends after its chunks");
        let original_bytes = self.original_so_far - self.part_start;
        self.parts.push(PartRecord {
            key: key.clone(),
            original_bytes,
            stored_bytes: stored,
            sha256: digest.sha256_hex(),
        });
        debug_assert_eq!(digest.len, original_bytes);
        self.part_start = self.original_so_far;
        while self.completing.len() >= options.transfer_concurrency {
            let done = self.completing.join_next().await.expect("not empty");
            done.map_err(completion_panicked)??;
        }
        let idle = options.idle_timeout;
        self.completing.spawn(async move {
            tokio::time::timeout(idle, writer.commit()).await.unwrap_or_else(|_| {
                Err(StorageError::Other {
                    location: key,
                    message: format!("completing the part made no progress for {} s", idle.as_secs()),
                    retryable: false,
                })
            })
        });
        Ok(())
    }

    /// After a failure: aborts the open part, and lets parts already completing settle, so that what
    /// they published can be removed.
    async fn abandon(&mut self) {
        if let Some(part) = self.current.take() {
            let _ = part.writer.abort().await;
        }
        while self.completing.join_next().await.is_some() {}
    }

    /// At the end of the stream: waits for every part's completion; returns the parts in order.
    async fn settle(mut self) -> Result<Vec<PartRecord>, Error> {
        while let Some(done) = self.completing.join_next().await {
            done.map_err(completion_panicked)??;
        }
        if self.current.is_some() {
            return Err(Error::Internal("the stream ended inside a part".into()));
        }
        Ok(self.parts)
    }
}

/// Stores a local file (the spooled manifest) as one object, and rewinds it for the caller.
pub(super) async fn store_file(
    to: &Destination<'_>,
    key: &str,
    file: &mut File,
    len: u64,
) -> Result<PartRecord, Error> {
    let (repo, idle) = (to.repo, to.options.idle_timeout);
    let location = repo.storage().location(key);
    let local_error =
        |e: std::io::Error| Error::LocalIo { path: "backup_manifest (spooled)".into(), operation: "read", source: e };
    file.seek(SeekFrom::Start(0)).map_err(local_error)?;
    let mut writer =
        repo.storage().create(key, PutOptions { attributes: Default::default(), size_hint: Some(len) }).await?;
    let mut encoded = to.options.encoding.pipeline.encoded(&mut *file).map_err(|e| local_error(e.into_io()))?;
    loop {
        let chunk = encoded.next_chunk(SEND_CHUNK).map_err(|e| local_error(e.into_io()))?;
        if chunk.is_empty() {
            break;
        }
        writer.write(Bytes::from(chunk)).await?;
    }
    let (digest, stored) = (encoded.digest().expect("the object has ended"), encoded.stored_bytes());
    // The pump borrows the file; the borrow ends here so that the file can be rewound below.
    drop(encoded);
    tokio::time::timeout(idle, writer.commit()).await.map_err(|_| Error::DeadlineExceeded {
        what: location,
        seconds: idle.as_secs(),
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
