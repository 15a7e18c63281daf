//! The reader thread of base-push: reads a tar archive (pg_basebackup's stdout or a spooled file),
//! watches it for what the catalog record needs, cuts it into parts and encodes each (zstd on every
//! core, SHA-256 trailer), and hands the encoded bytes to the async writers.
//!
//! It runs on a thread of its own because both its source and the encoder block; a bounded channel
//! between it and the writers keeps memory bounded when the network is the slower side.

use std::io::Read;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::tar_watch::{Observed, TarWatcher};
use crate::codec::{ContentDigest, Encoder};
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
#[derive(Debug, Clone, Copy)]
pub(super) struct Encoding {
    /// Original bytes per part (the last part may be shorter).
    pub(super) part_size: u64,
    /// The zstd level.
    pub(super) level: i32,
    /// zstd workers (already resolved: never 0).
    pub(super) workers: u32,
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
    mut source: Box<dyn Read + Send>,
    sender: &mpsc::Sender<Message>,
    encoding: Encoding,
    contents: Contents,
) -> StreamEnd {
    let mut watcher = TarWatcher::new(LongPageHeader::LEN);
    let mut watch_error: Option<String> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut parts = PartCutter { sender, encoding, encoder: None, out: Vec::with_capacity(2 * SEND_CHUNK), in_part: 0 };
    let mut total = 0u64;
    let end = |observed, total| StreamEnd { observed, original_bytes: total };
    loop {
        let n = match source.read(&mut buf) {
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
        if let Err(e) = parts.feed(&buf[..n], &mut total) {
            return end(Err(e), total);
        }
    }
    if parts.encoder.is_some()
        && let Err(e) = parts.end_part(total)
    {
        return end(Err(e), total);
    }
    let observed = match watch_error {
        Some(e) => Err(e),
        None if total == 0 => Err("pg_basebackup wrote nothing".into()),
        None if contents == Contents::DataDirectory => watcher.finish().map(Some),
        None => watcher.finish_archive().map(|()| None),
    };
    end(observed, total)
}

/// Cuts the original bytes into parts of `part_size`, each encoded as one codec object.
struct PartCutter<'a> {
    sender: &'a mpsc::Sender<Message>,
    encoding: Encoding,
    /// The current part's encoder; `None` between parts (a part starts with its first byte).
    encoder: Option<Encoder>,
    out: Vec<u8>,
    in_part: u64,
}

impl PartCutter<'_> {
    /// Encodes `bytes`, ending parts at `part_size` and sending output as it gathers; `total`
    /// counts the original bytes taken.
    fn feed(&mut self, bytes: &[u8], total: &mut u64) -> Result<(), String> {
        let mut offset = 0;
        while offset < bytes.len() {
            let encoder = match &mut self.encoder {
                Some(encoder) => encoder,
                None => match Encoder::with_workers(self.encoding.level, self.encoding.workers) {
                    Ok(new) => self.encoder.insert(new),
                    Err(e) => return Err(format!("starting zstd: {e}")),
                },
            };
            let take = ((self.encoding.part_size - self.in_part) as usize).min(bytes.len() - offset);
            encoder.update(&bytes[offset..offset + take], &mut self.out).map_err(|e| format!("compressing: {e}"))?;
            offset += take;
            self.in_part += take as u64;
            *total += take as u64;
            if self.in_part == self.encoding.part_size {
                self.end_part(*total)?;
            } else if self.out.len() >= SEND_CHUNK {
                self.send_chunk(*total)?;
            }
        }
        Ok(())
    }

    /// Finishes the current part and sends the rest of its bytes and its end.
    fn end_part(&mut self, total: u64) -> Result<(), String> {
        let digest = self
            .encoder
            .take()
            .expect("a part is open")
            .finish(&mut self.out)
            .map_err(|e| format!("compressing: {e}"))?;
        self.in_part = 0;
        self.send_chunk(total)?;
        self.send(Message::PartEnd(digest))
    }

    fn send_chunk(&mut self, total: u64) -> Result<(), String> {
        let bytes = Bytes::from(std::mem::replace(&mut self.out, Vec::with_capacity(2 * SEND_CHUNK)));
        self.send(Message::Chunk { bytes, original_so_far: total })
    }

    /// Fails once the writers have hung up.
    fn send(&self, message: Message) -> Result<(), String> {
        self.sender.blocking_send(message).map_err(|_| "stopped".to_owned())
    }
}
