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

use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;

use super::Repository;
use crate::codec::{DecodeError, Decoder};
use crate::error::Error;
use crate::process;
use crate::storage::StorageError;
use crate::wal::WalFileName;

const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    pub original_bytes: u64,
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
    publish_verified(reader, destination, &location).await
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
    publish_verified(reader, destination, &repo.storage().location(key)).await
}

async fn publish_verified(
    reader: crate::storage::ObjectReader,
    destination: &Path,
    location: &str,
) -> Result<FetchReport, Error> {
    let location = location.to_owned();
    let temp = temp_path_beside(destination)?;
    match write_verified(reader, &temp, destination, &location).await {
        Ok(report) => {
            let published =
                fs::rename(&temp, destination).map_err(|e| Error::local_io(destination, "rename into place", e));
            if published.is_err() {
                let _ = fs::remove_file(&temp);
            }
            // Without this, every wal-fetch killed mid-transfer would leave up to a segment's worth
            // of bytes in pg_wal for good.
            process::remove_orphaned_temp_files(parent_dir(destination));
            published.map(|()| report)
        }
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// The directory `path` is in: its parent, or the working directory for a bare name.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// A hidden name in the destination's directory, so the final rename is atomic. It carries our process
/// id, so that a file left by a killed wal-fetch can be recognised as orphaned.
fn temp_path_beside(destination: &Path) -> Result<PathBuf, Error> {
    let file_name = destination.file_name().ok_or_else(|| Error::InvalidInput {
        file: destination.display().to_string(),
        reason: "the destination has no file name".into(),
    })?;
    Ok(parent_dir(destination).join(process::temp_name(&file_name.to_string_lossy())))
}

async fn write_verified(
    mut reader: crate::storage::ObjectReader,
    temp: &Path,
    destination: &Path,
    location: &str,
) -> Result<FetchReport, Error> {
    // A file of this name can only be a leftover of an earlier run that had our process id.
    let _ = fs::remove_file(temp);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| Error::local_io(destination, "create temporary file", e))?;
    let mut decoder = Decoder::new(BufWriter::with_capacity(READ_CHUNK, file))
        .map_err(|e| Error::local_io(destination, "decompress", e))?;
    let corrupt = |e: DecodeError| match e {
        DecodeError::Format(format) => Error::Corrupt { location: location.to_owned(), reason: format.to_string() },
        DecodeError::Sink(io) => Error::local_io(destination, "write", io),
    };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut stored_bytes = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| StorageError::io(location, "read", e))?;
        if n == 0 {
            break;
        }
        stored_bytes += n as u64;
        decoder.update(&buf[..n]).map_err(corrupt)?;
    }
    let (digest, writer) = decoder.finish().map_err(corrupt)?;
    let _file: File = writer.into_inner().map_err(|e| Error::local_io(destination, "write", e.into_error()))?;
    Ok(FetchReport { original_bytes: digest.len, stored_bytes })
}
