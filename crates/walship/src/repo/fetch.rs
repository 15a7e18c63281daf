//! Restoring one file: the work behind `restore_command`.
//!
//! The object is decoded into a temporary file beside the destination, verified against its trailer,
//! and only then renamed into place, so PostgreSQL never sees a partial or unverified file. It is not
//! fsynced: PostgreSQL makes a restored segment durable itself when it keeps it
//! (`KeepFileRestoredFromArchive` fsyncs and renames it), and a crash before that makes recovery ask
//! for the file again. Prefetch spools and base-fetch's staged parts are likewise thrown away after a
//! crash (a spool belongs to one run of the server; base-fetch ends with `syncfs`).
//! A missing object is reported as absent only once the repository's identity record proves we are
//! looking at a real repository.
//!
//! The file work (decoding, writing, renaming) runs on tokio's blocking pool, fed the downloaded
//! chunks through a bounded channel, so that a write stuck on a hung file system cannot keep the
//! command's deadline from firing.

use std::fs::{self, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::{Receiver, Sender};

use super::Repository;
use crate::codec::{Pipeline, PumpError};
use crate::error::Error;
use crate::fs::{parent_dir, remove_orphaned_temp_files, temp_name};
use crate::retry::off_runtime;
use crate::storage::StorageError;
use crate::wal::{LongPageHeader, WalFileName};

const READ_CHUNK: usize = 256 * 1024;
/// Chunks queued between the download and the writing thread: bounded memory, both kept busy.
const CHUNKS_IN_FLIGHT: usize = 4;

/// What a fetch restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// Length of the restored file.
    pub original_bytes: u64,
    /// Length of the object it came from (compressed, with header and trailer).
    pub stored_bytes: u64,
}

/// Restores `name` from the repository to `destination`.
pub async fn fetch(repo: &Repository, name: &str, destination: &Path) -> Result<FetchReport, Error> {
    let wal = WalFileName::parse(name).map_err(|e| Error::InvalidInput { file: name.to_owned(), reason: e.0 })?;
    let key = Repository::wal_key(&wal);
    let location = repo.storage().location(&key);
    let reader = match repo.storage().get(&key).await {
        Ok(reader) => reader,
        Err(e) if e.is_not_found() => {
            repo.require_identity().await?;
            return Err(Error::NotFound { name: name.to_owned(), location });
        }
        Err(e) => return Err(e.into()),
    };
    publish_verified(reader, destination, &location, repo.reader_pipeline(), Some(wal)).await
}

/// Restores the object under `key` (any key, unlike [`fetch`]) to `destination`, verified. A missing
/// object is an error here, not "absent": callers ask for objects a catalog says exist.
pub async fn fetch_object(repo: &Repository, key: &str, destination: &Path) -> Result<FetchReport, Error> {
    let reader = repo.storage().get(key).await.map_err(|e| match e {
        StorageError::NotFound { location } => {
            Error::Corrupt { location, reason: "missing from the repository, though the catalog lists it".into() }
        }
        other => other.into(),
    })?;
    publish_verified(reader, destination, &repo.storage().location(key), repo.reader_pipeline(), None).await
}

/// Streams the object into a temporary file beside `destination` and renames it into place once
/// verified. The file work (writing, decoding, renaming) runs on the blocking pool, fed chunk by
/// chunk, so that a hung file system cannot keep the deadline from firing.
async fn publish_verified(
    mut reader: crate::storage::ObjectReader,
    destination: &Path,
    location: &str,
    pipeline: Pipeline,
    expected: Option<WalFileName>,
) -> Result<FetchReport, Error> {
    let temp = temp_path_beside(destination)?;
    let (chunks, received) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let (owned_destination, owned_location) = (destination.to_owned(), location.to_owned());
    let writing = off_runtime(destination, move || {
        let how = Publish { location: &owned_location, pipeline: &pipeline, expected: expected.as_ref() };
        write_and_publish(received, &temp, &owned_destination, how)
    });
    match send_chunks(&mut reader, &chunks, location).await {
        Ok(stored_bytes) => {
            // A writer that stopped early (a damaged object) refuses this; its own result says why.
            let _ = chunks.send(None).await;
            drop(chunks);
            let original_bytes = writing.await?;
            Ok(FetchReport { original_bytes, stored_bytes })
        }
        Err(e) => {
            drop(chunks);
            // It removes its temporary file on the way out, before a retry creates one of that name.
            let _ = writing.await;
            Err(e)
        }
    }
}

/// Hands the object's bytes to the writer as they arrive, then returns how many there were. Stops
/// early, without error, when the writer stopped taking them: its result is the answer then.
async fn send_chunks(
    reader: &mut crate::storage::ObjectReader,
    chunks: &Sender<Option<Bytes>>,
    location: &str,
) -> Result<u64, Error> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut stored_bytes = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| StorageError::io(location, "read", e))?;
        if n == 0 {
            return Ok(stored_bytes);
        }
        stored_bytes += n as u64;
        if chunks.send(Some(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
            return Ok(stored_bytes);
        }
    }
}

/// How a fetched object is checked before it is published.
struct Publish<'a> {
    /// The object's location, for messages.
    location: &'a str,
    /// How it is decoded.
    pipeline: &'a Pipeline,
    /// The WAL file asked for: a segment's page header must be that segment's.
    expected: Option<&'a WalFileName>,
}

/// The blocking side of [`publish_verified`]: decodes what `received` brings (`None` ends the object)
/// into `temp`, verifies it and renames it to `destination`; returns the restored length. Whatever
/// fails, and a sender that goes away before the end (the deadline cut the fetch off), leaves no
/// temporary file.
fn write_and_publish(
    mut received: Receiver<Option<Bytes>>,
    temp: &Path,
    destination: &Path,
    how: Publish<'_>,
) -> Result<u64, Error> {
    let verified = write_verified(&mut received, temp, destination, how.location, how.pipeline)
        .and_then(|original_bytes| check_segment(temp, how, original_bytes).map(|()| original_bytes));
    match verified {
        Ok(original_bytes) => {
            let published =
                fs::rename(temp, destination).map_err(|e| Error::local_io(destination, "rename into place", e));
            if published.is_err() {
                let _ = fs::remove_file(temp);
            }
            // Without this, every wal-fetch killed mid-transfer would leave up to a segment's worth
            // of bytes in pg_wal for good.
            remove_orphaned_temp_files(parent_dir(destination));
            published.map(|()| original_bytes)
        }
        Err(e) => {
            let _ = fs::remove_file(temp);
            Err(e)
        }
    }
}

/// A segment whose object decoded and verified must still be the segment asked for: an object moved
/// to another name (by a bug, or by someone holding the bucket: encryption does not bind an object
/// to its name) would otherwise be handed to PostgreSQL, which takes a wrong page for the end of WAL
/// and ends recovery early.
fn check_segment(temp: &Path, how: Publish<'_>, original_bytes: u64) -> Result<(), Error> {
    use std::io::Read;
    let Some(name) = how.expected.filter(|name| name.is_segment_data()) else { return Ok(()) };
    let mut header = Vec::with_capacity(LongPageHeader::LEN);
    fs::File::open(temp)
        .and_then(|file| file.take(LongPageHeader::LEN as u64).read_to_end(&mut header))
        .map_err(|e| Error::local_io(temp, "read", e))?;
    LongPageHeader::parse(&header).and_then(|header| header.check_matches(name, original_bytes)).map_err(|reason| {
        Error::Corrupt { location: how.location.to_owned(), reason: format!("not the segment {name}: {reason}") }
    })
}

/// A hidden name in the destination's directory, so the final rename is atomic. It carries our process
/// id, so that a file left by a killed wal-fetch can be recognised as orphaned.
fn temp_path_beside(destination: &Path) -> Result<PathBuf, Error> {
    let file_name = destination.file_name().ok_or_else(|| Error::InvalidInput {
        file: destination.display().to_string(),
        reason: "the destination has no file name".into(),
    })?;
    Ok(parent_dir(destination).join(temp_name(&file_name.to_string_lossy())))
}

fn write_verified(
    received: &mut Receiver<Option<Bytes>>,
    temp: &Path,
    destination: &Path,
    location: &str,
    pipeline: &Pipeline,
) -> Result<u64, Error> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| Error::local_io(destination, "create temporary file", e))?;
    let mut sink = BufWriter::with_capacity(READ_CHUNK, file);
    let source = Chunks { received, current: Bytes::new() };
    let pumped = pipeline.decode(source, &mut sink).map_err(|e| match e {
        PumpError::Format(format) => Error::stored(location, format),
        PumpError::Codec(e) => Error::local_io(destination, "decompress", e),
        PumpError::Source(e) | PumpError::Sink(e) => Error::local_io(destination, "write", e),
    })?;
    Ok(pumped.digest.len)
}

/// The chunks the download hands over, as a reader for the codec's pump: `None` ends the object; a
/// sender gone before that (the deadline cut the fetch off) is an error, never a short object.
struct Chunks<'a> {
    received: &'a mut Receiver<Option<Bytes>>,
    current: Bytes,
}

impl std::io::Read for Chunks<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.received.blocking_recv() {
                Some(Some(chunk)) => self.current = chunk,
                Some(None) => return Ok(0),
                None => return Err(std::io::Error::other("the download stopped before the end of the object")),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_all;

    fn write_in_thread(chunks: Vec<Option<Bytes>>, dir: &Path) -> (Result<u64, Error>, PathBuf, PathBuf) {
        let (destination, temp) = (dir.join("000000010000000000000001"), dir.join(".000000010000000000000001.tmp"));
        let (sender, received) = tokio::sync::mpsc::channel(chunks.len().max(1));
        for chunk in chunks {
            sender.try_send(chunk).unwrap();
        }
        drop(sender);
        let (t, d) = (temp.clone(), destination.clone());
        let result = std::thread::spawn(move || {
            let pipeline = Pipeline::default();
            write_and_publish(
                received,
                &t,
                &d,
                Publish { location: "test://object", pipeline: &pipeline, expected: None },
            )
        })
        .join()
        .unwrap();
        (result, destination, temp)
    }

    #[test]
    fn a_complete_object_is_published_and_a_cut_off_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let object = Bytes::from(encode_all(b"segment bytes", 1).unwrap());
        let (half, rest) = (object.slice(..object.len() / 2), object.slice(object.len() / 2..));

        let (result, destination, temp) = write_in_thread(vec![Some(half.clone())], dir.path());
        assert!(result.is_err(), "a download that stopped before the end publishes nothing");
        assert!(!destination.exists() && !temp.exists(), "and leaves no temporary file");

        let (result, destination, temp) = write_in_thread(vec![Some(half), Some(rest), None], dir.path());
        assert_eq!(result.unwrap(), 13);
        assert_eq!(fs::read(&destination).unwrap(), b"segment bytes");
        assert!(!temp.exists());
    }
}
