//! The reader thread of base-push: reads a tar archive (pg_basebackup's stdout or a spooled file),
//! watches it for what the catalog record needs, cuts it into parts and encodes each through the
//! codec's pump (zstd on every core, any further stage, SHA-256 trailer), and hands the encoded
//! bytes to the async writers.
//!
//! It runs on a thread of its own because both its source and the encoder block; a bounded channel
//! between it and the writers keeps memory bounded when the network is the slower side.

use std::io::{BufRead, BufReader, Read};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::tar_watch::{Observed, TarWatcher};
use crate::codec::{ContentDigest, Pipeline, PumpError};
use crate::wal::LongPageHeader;

/// Bytes read from the source at a time, and bytes of encoded output sent at a time.
pub(super) const READ_CHUNK: usize = 1 << 20;
/// Encoded bytes gathered before they are sent to the writers.
pub(super) const SEND_CHUNK: usize = 1 << 20;

/// What the reader thread sends to the writers.
pub(super) enum Message {
    /// Encoded bytes of the current part; `original_so_far`: the archive's original bytes read so far.
    Chunk { bytes: Bytes, original_so_far: u64 },
    /// The current part is complete; the digest of its original bytes.
    PartEnd(ContentDigest),
}

/// What the reader thread ends with.
pub(super) struct StreamEnd {
    /// What the watcher found; `None` for a tablespace's archive, which is only checked for being a
    /// complete tar archive.
    pub(super) observed: Result<Option<Observed>, String>,
    /// The archive's bytes read (and encoded).
    pub(super) original_bytes: u64,
}

/// How the archive is cut and encoded.
#[derive(Clone)]
pub(super) struct Encoding {
    /// Original bytes per part (the last part may be shorter).
    pub(super) part_size: u64,
    /// How each part is encoded (level, workers, encryption).
    pub(super) pipeline: Pipeline,
}

/// What an archive holds, and so how closely the reader watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Contents {
    /// `base.tar`: the data directory, watched for backup_label, PG_VERSION, the first WAL page
    /// header and the manifest.
    DataDirectory,
    /// `<OID>.tar`: a tablespace, only checked for being a complete tar archive.
    Tablespace,
}

/// Reads `source` to its end (or until the writers hang up), sending its parts through `sender`.
pub(super) fn read_stream(
    source: Box<dyn Read + Send>,
    sender: &mpsc::Sender<Message>,
    encoding: Encoding,
    contents: Contents,
) -> StreamEnd {
    let mut watched = Watched { inner: source, watcher: TarWatcher::new(LongPageHeader::LEN), error: None };
    let cutter = PartCutter { sender, pipeline: encoding.pipeline, part_size: encoding.part_size };
    let mut total = 0u64;
    let cut = cutter.cut(&mut BufReader::with_capacity(READ_CHUNK, &mut watched), &mut total);
    let Watched { watcher, error: watch_error, .. } = watched;
    let observed = match (cut, watch_error) {
        (Err(e), _) | (Ok(()), Some(e)) => Err(e),
        _ if total == 0 => Err("pg_basebackup wrote nothing".into()),
        _ if contents == Contents::DataDirectory => watcher.finish().map(Some),
        _ => watcher.finish_archive().map(|()| None),
    };
    StreamEnd { observed, original_bytes: total }
}

/// pg_basebackup's output, shown to the tar watcher as it is read: the watcher sees every byte
/// exactly once whatever the parts' boundaries, keeps its first complaint, and reading goes on
/// (the complaint is reported once the stream has been read, as the backup's failure).
struct Watched {
    inner: Box<dyn Read + Send>,
    watcher: TarWatcher,
    error: Option<String>,
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.error.is_none()
            && let Err(e) = self.watcher.feed(&buf[..n])
        {
            self.error = Some(e);
        }
        Ok(n)
    }
}

/// Cuts the original bytes into parts of `part_size`, each encoded by the codec's pump as one
/// object, so that a stage added to the pipeline reaches every part without a change here.
struct PartCutter<'a> {
    sender: &'a mpsc::Sender<Message>,
    pipeline: Pipeline,
    part_size: u64,
}

impl PartCutter<'_> {
    /// Sends every part of `source`; `total` counts the original bytes taken, also on failure.
    fn cut(&self, source: &mut impl BufRead, total: &mut u64) -> Result<(), String> {
        while has_more(source)? {
            self.send_part(source, total)?;
        }
        Ok(())
    }

    /// Encodes and sends the next part: its chunks, then its end with the digest.
    fn send_part(&self, source: &mut impl BufRead, total: &mut u64) -> Result<(), String> {
        let part_start = *total;
        let mut part = self
            .pipeline
            .encoded(source.take(self.part_size))
            .map_err(|e| format!("starting zstd: {}", e.into_io()))?;
        loop {
            let chunk = part.next_chunk(SEND_CHUNK);
            *total = part_start + part.original_bytes();
            let bytes = chunk.map_err(describe)?;
            if bytes.is_empty() {
                break;
            }
            self.send(Message::Chunk { bytes: Bytes::from(bytes), original_so_far: *total })?;
        }
        self.send(Message::PartEnd(part.digest().expect("the part has ended")))
    }

    /// Fails once the writers have hung up.
    fn send(&self, message: Message) -> Result<(), String> {
        self.sender.blocking_send(message).map_err(|_| "stopped".to_owned())
    }
}

/// Whether `source` has another byte: a part starts only where there is one, so that no empty
/// part follows the last.
fn has_more(source: &mut impl BufRead) -> Result<bool, String> {
    loop {
        match source.fill_buf() {
            Ok(buf) => return Ok(!buf.is_empty()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(describe(PumpError::Source(e))),
        }
    }
}

/// The reader thread's messages for a failing pump, as they were before the pump existed.
fn describe(error: PumpError) -> String {
    match error {
        PumpError::Source(e) => format!("reading pg_basebackup's output: {e}"),
        other => format!("compressing: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_all, encode_all};

    /// A tablespace-like archive: one member of `size` bytes that do not compress to nothing.
    fn archive(size: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_cksum();
        builder.append_data(&mut header, "16385/1259", &data[..]).unwrap();
        builder.into_inner().unwrap()
    }

    /// Runs the reader thread over `source`; returns each part's stored bytes and digest, and the end.
    fn cut(source: Box<dyn Read + Send>, part_size: u64) -> (Vec<(Vec<u8>, ContentDigest)>, StreamEnd) {
        let (sender, mut receiver) = mpsc::channel(2);
        let encoding = Encoding { part_size, pipeline: Pipeline::zstd(3) };
        let reader = std::thread::spawn(move || read_stream(source, &sender, encoding, Contents::Tablespace));
        let (mut parts, mut current) = (Vec::new(), Vec::new());
        while let Some(message) = receiver.blocking_recv() {
            match message {
                Message::Chunk { bytes, .. } => current.extend_from_slice(&bytes),
                Message::PartEnd(digest) => parts.push((std::mem::take(&mut current), digest)),
            }
        }
        assert!(current.is_empty(), "chunks after the last part's end");
        (parts, reader.join().unwrap())
    }

    #[test]
    fn cuts_parts_that_decode_back_to_the_stream_with_no_empty_part_after_the_last() {
        let stream = archive(300_000);
        // A part size that divides the stream, and one that leaves a short last part.
        for part_size in [stream.len() as u64 / 4, 100_000] {
            let (parts, end) = cut(Box::new(std::io::Cursor::new(stream.clone())), part_size);
            assert_eq!(parts.len(), stream.len().div_ceil(part_size as usize));
            assert_eq!(end.original_bytes, stream.len() as u64);
            assert!(matches!(end.observed, Ok(None)), "{:?}", end.observed.err());
            let pieces = stream.chunks(part_size as usize);
            for ((stored, digest), original) in parts.iter().zip(pieces) {
                assert_eq!(decode_all(stored).unwrap(), original);
                assert_eq!(digest.len, original.len() as u64);
                // The bytes stored do not depend on how the reader thread chunks its reads.
                assert_eq!(stored, &encode_all(original, 3).unwrap());
            }
        }
    }

    /// A source that yields some bytes, then fails.
    struct Failing(std::io::Cursor<Vec<u8>>);

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(std::io::Error::other("pipe broke")),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn a_failing_source_is_reported_as_pg_basebackup_output() {
        let (_, end) = cut(Box::new(Failing(std::io::Cursor::new(archive(50_000)))), 1 << 20);
        assert_eq!(end.observed.err().as_deref(), Some("reading pg_basebackup's output: pipe broke"));
        assert!(end.original_bytes > 0);
    }

    #[test]
    fn an_empty_source_sends_no_part() {
        let (parts, end) = cut(Box::new(std::io::empty()), 1 << 20);
        assert!(parts.is_empty());
        assert_eq!((end.observed.err().as_deref(), end.original_bytes), (Some("pg_basebackup wrote nothing"), 0));
    }
}
