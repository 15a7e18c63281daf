//! Archiving one file: the work behind `archive_command`.
//!
//! The file is checked before anything is written (its name, its page header against the name and the
//! repository's cluster), hashed, and compared with whatever the repository already holds under that
//! name: identical content is success without an upload (PostgreSQL may archive a file twice after a
//! crash) once the archived copy is made durable (the push that stored it may have died before its
//! name was), different content is a conflict and nothing is overwritten. A new object is encoded and
//! hashed while it streams to the backend. Where the backend keeps the checksum as an attribute (S3
//! metadata, sent before the body), a hashing pass comes first and the encoder's digest must equal
//! it; everywhere the stored length must equal the inspected one. So a file that changes size while
//! we read it is never acknowledged.
//!
//! Reading the file (and encoding it) runs on tokio's blocking pool, handing encoded chunks to the
//! upload through a bounded channel: a read stuck on a hung file system (NFS under pg_wal) must not
//! keep the command's deadline from firing.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use tokio::sync::mpsc::Sender;

use super::{ClusterFacts, Repository};
use crate::codec::{ContentDigest, Pipeline, Prefix, PumpError};
use crate::encryption::{Sealed, check_sealed};
use crate::error::Error;
use crate::retry::off_runtime;
use crate::storage::{PutOptions, StorageError};
use crate::wal::{self, LongPageHeader, WalFileKind, WalFileName};

/// Attributes that let a backend with metadata answer "identical?" without a download: the SHA-256
/// of the original content, in hex...
pub const ATTR_SHA256: &str = "walship-sha256";
/// ...and its length in bytes, in decimal.
pub const ATTR_LENGTH: &str = "walship-length";

const WRITE_CHUNK: usize = 1 << 20;
/// Encoded chunks queued between the reading thread and the upload: enough to keep both busy,
/// few enough to keep memory bounded.
const CHUNKS_IN_FLIGHT: usize = 2;
/// The cluster's control file, relative to the data directory (archive_command's working directory).
const CONTROL_FILE: &str = "global/pg_control";

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// Length of the archived file.
    pub original_bytes: u64,
    /// Bytes stored; `None` when identical content was already archived and nothing was written.
    pub stored_bytes: Option<u64>,
    /// Length and SHA-256 of the archived content.
    pub digest: ContentDigest,
}

/// Archives `source` under `name`.
pub async fn push(repo: &Repository, source: &Path, name: &str, compression_level: i32) -> Result<PushReport, Error> {
    let wal = WalFileName::parse(name).map_err(|e| Error::InvalidInput { file: name.to_owned(), reason: e.0 })?;
    let checked = {
        let (wal, owned) = (wal.clone(), source.to_owned());
        off_runtime(source, move || inspect(&wal, &owned)).await?
    };
    // Before the identity record: a new repository that an encrypting writer makes is marked
    // encrypted before anything else is in it.
    let pipeline = repo.writer_pipeline(compression_level).await?;
    match checked.cluster {
        Some(facts) => {
            repo.ensure_identity(&facts, &source.display().to_string()).await?;
        }
        // Files without a page header carry no system identifier; the data directory's pg_control
        // (our working directory under archive_command) has it.
        None => {
            let control_file = Path::new(CONTROL_FILE);
            if let Some(system_identifier) = off_runtime(control_file, || Ok(control_file_system_identifier())).await? {
                repo.check_system_identifier(system_identifier, &source.display().to_string()).await?;
            }
            let identity = repo.identity().await?;
            repo.judge_store_for_writing(identity.as_ref())?;
        }
    }
    // A backend that keeps attributes (S3) needs the checksum before the upload starts, which takes
    // a hashing pass first; elsewhere one pass encodes and hashes at once.
    let known = if repo.storage().keeps_attributes() {
        let digest = hash_file(source).await?;
        if digest.len != checked.len {
            return Err(changed_while_reading(source));
        }
        Some(digest)
    } else {
        None
    };
    let key = Repository::wal_key(&wal);
    match upload(repo, &key, source, known, checked.len, pipeline).await {
        Ok((stored, digest)) => Ok(PushReport { original_bytes: digest.len, stored_bytes: Some(stored), digest }),
        // The name is taken (archived before, or by a racing push): decide by content.
        Err(Error::Storage(StorageError::AlreadyExists { .. })) => {
            let digest = match known {
                Some(digest) => digest,
                None => hash_file(source).await?,
            };
            if digest.len != checked.len {
                return Err(changed_while_reading(source));
            }
            let report = compare_with_archived(repo, &key, &wal, source, digest).await?;
            // The push that stored it may have been killed before its name was durable.
            repo.storage().make_durable(&key).await?;
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

struct Inspected {
    len: u64,
    cluster: Option<ClusterFacts>,
}

/// Checks that `source` is what `name` says it is, reading only what that takes.
fn inspect(wal: &WalFileName, source: &Path) -> Result<Inspected, Error> {
    let invalid = |reason: String| Error::InvalidInput { file: source.display().to_string(), reason };
    let mut file = File::open(source).map_err(|e| Error::local_io(source, "open", e))?;
    let meta = file.metadata().map_err(|e| Error::local_io(source, "stat", e))?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let len = meta.len();
    if wal.is_segment_data() {
        let mut header = [0u8; LongPageHeader::LEN];
        let mut filled = 0;
        while filled < header.len() {
            match file.read(&mut header[filled..]).map_err(|e| Error::local_io(source, "read", e))? {
                0 => break,
                n => filled += n,
            }
        }
        let header = LongPageHeader::parse(&header[..filled]).map_err(invalid)?;
        header.check_matches(wal, len).map_err(invalid)?;
        return Ok(Inspected {
            len,
            cluster: Some(ClusterFacts {
                system_identifier: header.system_identifier,
                pg_version: header.pg_major().expect("parse accepts known magics only"),
                wal_segment_size: header.segment_size,
            }),
        });
    }
    if len > wal::MAX_SMALL_FILE {
        return Err(invalid(format!("{len} bytes is far too large for a {} file", kind_label(wal.kind()))));
    }
    let mut content = Vec::with_capacity(len as usize);
    file.read_to_end(&mut content).map_err(|e| Error::local_io(source, "read", e))?;
    match wal.kind() {
        WalFileKind::History => wal::check_history_file(wal, &content).map_err(invalid)?,
        _ => {
            if !content.starts_with(b"START WAL LOCATION: ") {
                return Err(invalid("not a backup label file: it does not begin with \"START WAL LOCATION\"".into()));
            }
        }
    }
    Ok(Inspected { len, cluster: None })
}

fn kind_label(kind: WalFileKind) -> &'static str {
    match kind {
        WalFileKind::History => "timeline history",
        _ => "backup label",
    }
}

fn control_file_system_identifier() -> Option<u64> {
    let bytes = std::fs::read(CONTROL_FILE).ok()?;
    wal::control_file_system_identifier(&bytes)
}

async fn hash_file(source: &Path) -> Result<ContentDigest, Error> {
    let owned = source.to_owned();
    off_runtime(source, move || ContentDigest::of_file(&owned).map_err(|e| Error::local_io(&owned, "read", e))).await
}

fn changed_while_reading(source: &Path) -> Error {
    Error::InvalidInput {
        file: source.display().to_string(),
        reason: "the file changed while it was being archived; nothing was stored".into(),
    }
}

fn attributes_digest(attributes: &std::collections::BTreeMap<String, String>) -> Option<ContentDigest> {
    let len = attributes.get(ATTR_LENGTH)?.parse().ok()?;
    let hex = attributes.get(ATTR_SHA256)?;
    if hex.len() != 64 {
        return None;
    }
    let mut sha256 = [0u8; 32];
    for (i, byte) in sha256.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(ContentDigest { len, sha256 })
}

/// Streams `source` through the encoder into a new object, committed only if its digest is
/// `expected` (when known beforehand) and its length is `expected_len` (the length inspected).
/// Returns the stored size and the digest of what was stored.
async fn upload(
    repo: &Repository,
    key: &str,
    source: &Path,
    expected: Option<ContentDigest>,
    expected_len: u64,
    pipeline: Pipeline,
) -> Result<(u64, ContentDigest), Error> {
    let attributes = match expected {
        Some(expected) => {
            [(ATTR_SHA256.to_owned(), expected.sha256_hex()), (ATTR_LENGTH.to_owned(), expected.len.to_string())].into()
        }
        None => Default::default(),
    };
    let options = PutOptions { attributes, size_hint: Some(expected_len) };
    let mut writer = repo.storage().create(key, options).await?;
    let streamed = async {
        let (chunks, mut encoded) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
        let owned = source.to_owned();
        let encoding = off_runtime(source, move || encode_file(&owned, &pipeline, &chunks));
        let mut stored = 0u64;
        // Ends when the encoder is done and drops its sender. A failed write drops the receiver, and
        // the encoder stops at its next chunk.
        while let Some(chunk) = encoded.recv().await {
            stored += chunk.len() as u64;
            writer.write(chunk).await?;
        }
        let digest = encoding.await?;
        if expected.is_some_and(|expected| expected != digest) || digest.len != expected_len {
            return Err(changed_while_reading(source));
        }
        Ok((stored, digest))
    }
    .await;
    match streamed {
        Ok(done) => {
            writer.commit().await?;
            Ok(done)
        }
        Err(e) => {
            let _ = writer.abort().await;
            Err(e)
        }
    }
}

/// Reads and encodes `source` (blocking: it runs on the blocking pool), handing the encoded bytes
/// to `chunks` at least [`WRITE_CHUNK`] at a time, the last chunk possibly shorter.
fn encode_file(source: &Path, pipeline: &Pipeline, chunks: &Sender<Bytes>) -> Result<ContentDigest, Error> {
    let file = File::open(source).map_err(|e| Error::local_io(source, "open", e))?;
    let mut encoded = pipeline.encoded(file).map_err(|e| encode_error(source, e))?;
    // The uploader went away (its write failed, or the deadline dropped it): its error is the answer.
    let gone = || Error::local_io(source, "read", std::io::Error::other("the upload stopped"));
    loop {
        let chunk = encoded.next_chunk(WRITE_CHUNK).map_err(|e| encode_error(source, e))?;
        if chunk.is_empty() {
            break;
        }
        chunks.blocking_send(Bytes::from(chunk)).map_err(|_| gone())?;
    }
    Ok(encoded.digest().expect("the object has ended"))
}

/// Reading the file is a read error on it; anything else the encoder does is compression's.
fn encode_error(source: &Path, error: PumpError) -> Error {
    match error {
        PumpError::Source(e) => Error::local_io(source, "read", e),
        other => Error::local_io(source, "compress", other.into_io()),
    }
}

/// Decides a push whose name is already taken: identical content is success, anything else a conflict.
/// The archived object is verified on the way (unless the backend's attributes vouch for it), so a
/// damaged archive copy is reported rather than silently accepted as "identical".
async fn compare_with_archived(
    repo: &Repository,
    key: &str,
    wal: &WalFileName,
    source: &Path,
    digest: ContentDigest,
) -> Result<PushReport, Error> {
    let already = PushReport { original_bytes: digest.len, stored_bytes: None, digest };
    let is_history = wal.kind() == WalFileKind::History;
    let attributes = repo.storage().head(key).await?.attributes;
    // Attributes that name other content settle a conflict without a download. Attributes that name
    // ours do not settle "identical": that answer lets PostgreSQL recycle its copy, so the archived
    // bytes are read and verified first, whatever their metadata says.
    if let Some(existing) = attributes_digest(&attributes).filter(|existing| !is_history && *existing != digest) {
        return Err(Error::Conflict { name: wal.to_string(), existing, new: digest });
    }
    let location = repo.storage().location(key);
    if repo.encryption().is_keyless()
        && let Some(existing) = sealed_digest(repo, key, &location).await?
    {
        if existing != digest {
            return Err(Error::Conflict { name: wal.to_string(), existing, new: digest });
        }
        // Without a key the content cannot be compared byte for byte; its SHA-256 stands for it.
        return Ok(already);
    }
    let reader = repo.storage().get(key).await?;
    // History files are compared byte for byte, so keep their (small) content; segments only hash.
    let mut archived = Prefix::new(if is_history { wal::MAX_SMALL_FILE as usize + 1 } else { 0 });
    let existing = match repo.reader_pipeline().decode_async(reader, &mut archived).await {
        Ok(pumped) => pumped.digest,
        Err(PumpError::Source(e)) => return Err(StorageError::io(&location, "read", e).into()),
        Err(PumpError::Codec(e) | PumpError::Sink(e)) => return Err(Error::local_io(source, "decompress", e)),
        Err(PumpError::Format(e)) => return Err(Error::stored(&location, e)),
    };
    let archived_bytes = archived.into_bytes();
    if existing != digest {
        return Err(Error::Conflict { name: wal.to_string(), existing, new: digest });
    }
    if is_history {
        let owned = source.to_owned();
        let ours =
            off_runtime(source, move || std::fs::read(&owned).map_err(|e| Error::local_io(&owned, "read", e))).await?;
        if ours != archived_bytes {
            return Err(Error::Conflict { name: wal.to_string(), existing, new: ContentDigest::of(&ours) });
        }
    }
    Ok(already)
}

/// On a host without a private key: the digest an encrypted object's trailer records, once its seal
/// shows the stored bytes are whole. `None` for a plain object, which is decoded as ever.
async fn sealed_digest(repo: &Repository, key: &str, location: &str) -> Result<Option<ContentDigest>, Error> {
    let reader = repo.storage().get(key).await?;
    match check_sealed(reader).await {
        Ok(Sealed::Whole { digest, .. }) => Ok(Some(digest)),
        Ok(Sealed::Plain) => Ok(None),
        Err(Ok(e)) => Err(StorageError::io(location, "read", e).into()),
        Err(Err(e)) => Err(Error::stored(location, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_digests_parse_only_when_complete() {
        let digest = ContentDigest::of(b"abc");
        let attrs = [(ATTR_SHA256.to_owned(), digest.sha256_hex()), (ATTR_LENGTH.to_owned(), "3".to_owned())].into();
        assert_eq!(attributes_digest(&attrs), Some(digest));
        assert_eq!(attributes_digest(&Default::default()), None);
        let bad = [(ATTR_SHA256.to_owned(), "zz".repeat(32)), (ATTR_LENGTH.to_owned(), "3".to_owned())].into();
        assert_eq!(attributes_digest(&bad), None);
    }
}
