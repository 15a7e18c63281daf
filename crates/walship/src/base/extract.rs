//! The extractor of base-fetch: decodes each archive's downloaded parts, in order, into one tar
//! stream (every part checked against its trailer and the catalog's SHA-256 as it ends) and unpacks
//! it into the archive's directory, holding `global/pg_control` back under another name.
//!
//! It runs on a blocking thread: the tar reader and the file writes block. Downloads run ahead of it
//! on the async side; it waits for each part's download in order and frees its slot once the part
//! is consumed and its file deleted.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::manifest::HELD_BACK_CONTROL;
use super::{PartRecord, Progress, Transferred};
use crate::codec::Decoder;
use crate::error::Error;

/// Stored bytes read from a downloaded part at a time while extracting.
const RAW_CHUNK: usize = 256 * 1024;

/// A part's download, as the extractor receives it.
pub(super) struct Downloaded {
    /// The downloaded file, or why there is none.
    pub(super) result: Result<PathBuf, Error>,
    /// Held until the extractor has consumed the part.
    pub(super) permit: tokio::sync::OwnedSemaphorePermit,
}

/// Each part's download, in the parts' order.
pub(super) type Downloads = mpsc::Receiver<oneshot::Receiver<Downloaded>>;

/// The directories a backup's archives go to.
pub(super) struct Layout<'a> {
    /// DATA_DIR, where `base.tar` goes.
    pub(super) data_dir: &'a Path,
    /// Each archive's directory and number of parts, in the parts' order.
    pub(super) archives: &'a [(PathBuf, usize)],
    /// Every archive's parts, in order.
    pub(super) parts: &'a [PartRecord],
    /// Each part's location, for messages.
    pub(super) locations: &'a [String],
}

/// How the extractor unpacks, and where it reports.
pub(super) struct Unpacking<'a> {
    /// Running as root: files keep the owners the tar stream records.
    pub(super) root_owned: bool,
    /// Told the bytes consumed as they pass.
    pub(super) progress: &'a dyn Progress,
}

/// The extractor thread: decodes each archive's parts in order into one tar stream and unpacks it
/// into the archive's directory.
pub(super) fn extract(layout: Layout<'_>, mut ready: Downloads, how: Unpacking<'_>) -> Result<(), Error> {
    let total: u64 = layout.parts.iter().map(|p| p.original_bytes).sum();
    let (mut first, mut done) = (0, Transferred::default());
    for (target, count) in layout.archives {
        let range = first..first + count;
        first += count;
        let archive = ArchiveParts {
            dir: target,
            is_base: target == layout.data_dir,
            parts: &layout.parts[range.clone()],
            locations: &layout.locations[range],
        };
        let stream = PartStream::new(&archive, &mut ready, &how, done, total);
        done = extract_archive(&archive, stream, how.root_owned)?;
    }
    if !layout.data_dir.join(HELD_BACK_CONTROL).exists() {
        return Err(Error::Corrupt {
            location: layout.locations.first().cloned().unwrap_or_default(),
            reason: "the backup holds no global/pg_control".into(),
        });
    }
    Ok(())
}

/// One archive to extract: its directory and its parts.
struct ArchiveParts<'a> {
    dir: &'a Path,
    /// `base.tar`, which holds `global/pg_control`.
    is_base: bool,
    parts: &'a [PartRecord],
    locations: &'a [String],
}

impl ArchiveParts<'_> {
    fn location(&self) -> String {
        self.locations.first().cloned().unwrap_or_default()
    }
}

/// Extracts one archive into its directory; returns the bytes the restore has consumed so far.
fn extract_archive(to: &ArchiveParts<'_>, stream: PartStream<'_>, root_owned: bool) -> Result<Transferred, Error> {
    let failure = Arc::clone(&stream.failure);
    // Whether an error came from the parts themselves (download, decoding, checksums).
    let stream_failed = std::cell::Cell::new(false);
    let take_failure = |e: io::Error, what: &'static str| -> Error {
        match failure.lock().ok().and_then(|mut f| f.take()) {
            Some(error) => {
                stream_failed.set(true);
                error
            }
            None => Error::local_io(to.dir, what, e),
        }
    };
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(root_owned);
    archive.set_overwrite(false);
    let unpacked = unpack(&mut archive, to, &take_failure);
    let mut stream = archive.into_inner();
    if let Err(e) = unpacked {
        // A part's checksums are checked at its end, but damage inside it can trip the tar reader
        // first (a member header that no longer parses): then the damaged part is what to report,
        // not the tar error it led to. Reading on to the end of the part tells.
        if !stream_failed.get()
            && stream.finish_current_part().is_err()
            && let Some(damage @ Error::Corrupt { .. }) = failure.lock().ok().and_then(|mut f| f.take())
        {
            return Err(damage);
        }
        return Err(e);
    }
    // The archive's end markers come before the end of the last part: read on, so that every part's
    // trailer is checked.
    io::copy(&mut stream, &mut io::sink()).map_err(|e| take_failure(e, "read tar stream"))?;
    if stream.index < to.parts.len() {
        return Err(Error::Corrupt {
            location: to.locations[stream.index].clone(),
            reason: "the tar archive ended before the last part".into(),
        });
    }
    Ok(stream.done)
}

/// Unpacks every member into the archive's directory; `global/pg_control` under its held-back name.
fn unpack(
    archive: &mut tar::Archive<PartStream<'_>>,
    to: &ArchiveParts<'_>,
    take_failure: &dyn Fn(io::Error, &'static str) -> Error,
) -> Result<(), Error> {
    let entries = archive.entries().map_err(|e| take_failure(e, "read tar stream"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| take_failure(e, "read tar stream"))?;
        let path = entry.path().map_err(|e| take_failure(e, "read tar member name"))?.into_owned();
        if to.is_base && path == Path::new("global/pg_control") {
            fs::create_dir_all(to.dir.join("global")).map_err(|e| Error::local_io(to.dir, "create global/", e))?;
            entry.unpack(to.dir.join(HELD_BACK_CONTROL)).map_err(|e| take_failure(e, "extract global/pg_control"))?;
            continue;
        }
        let inside = entry.unpack_in(to.dir).map_err(|e| take_failure(e, "extract"))?;
        if !inside {
            return Err(Error::Corrupt {
                location: to.location(),
                reason: format!("tar member {} would land outside the data directory", path.display()),
            });
        }
    }
    Ok(())
}

/// The concatenated, verified original bytes of the parts, as one `Read`.
struct PartStream<'a> {
    parts: &'a [PartRecord],
    locations: &'a [String],
    ready: &'a mut Downloads,
    index: usize,
    current: Option<(File, PathBuf, Decoder<Vec<u8>>, tokio::sync::OwnedSemaphorePermit)>,
    decoded: Vec<u8>,
    offset: usize,
    /// Stored bytes read from the current part's file, before decoding.
    raw: Vec<u8>,
    failure: Arc<Mutex<Option<Error>>>,
    /// What the restore has consumed so far, of `total` original bytes.
    done: Transferred,
    total: u64,
    progress: &'a dyn Progress,
}

impl<'a> PartStream<'a> {
    /// The stream of `archive`'s parts; `done`: what the restore consumed before it, of `total`
    /// original bytes.
    fn new(
        archive: &ArchiveParts<'a>,
        ready: &'a mut Downloads,
        how: &Unpacking<'a>,
        done: Transferred,
        total: u64,
    ) -> Self {
        PartStream {
            parts: archive.parts,
            locations: archive.locations,
            ready,
            index: 0,
            current: None,
            decoded: Vec::new(),
            raw: vec![0u8; RAW_CHUNK],
            offset: 0,
            failure: Arc::default(),
            done,
            total,
            progress: how.progress,
        }
    }

    fn fail(&self, error: Error) -> io::Error {
        let message = error.to_string();
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(error);
        }
        io::Error::other(message)
    }

    /// Opens the next part once its download is done. `false` at the end of the parts.
    fn open_next(&mut self) -> io::Result<bool> {
        if self.index >= self.parts.len() {
            return Ok(false);
        }
        let Some(waiting) = self.ready.blocking_recv() else {
            return Err(self.fail(Error::Internal("the downloads stopped early".into())));
        };
        let downloaded =
            waiting.blocking_recv().map_err(|_| self.fail(Error::Internal("a download was abandoned".into())))?;
        let path = downloaded.result.map_err(|e| self.fail(e))?;
        let file = File::open(&path).map_err(|e| self.fail(Error::local_io(&path, "open", e)))?;
        let decoder = Decoder::new(Vec::new()).map_err(|e| self.fail(Error::local_io(&path, "decompress", e)))?;
        self.current = Some((file, path, decoder, downloaded.permit));
        Ok(true)
    }

    /// Decodes the rest of the part being read, discarding the bytes, and ends it: checks its
    /// checksums without opening the next part. Nothing to do between parts.
    fn finish_current_part(&mut self) -> io::Result<()> {
        while self.current.is_some() {
            self.decoded.clear();
            if self.decode_more()? == 0 {
                return self.close_current();
            }
        }
        Ok(())
    }

    /// Reads the open part's next stored bytes and decodes them into `decoded`, which must have
    /// been consumed; returns how many stored bytes were read, 0 at the end of the part. The read
    /// and decode buffers are reused from call to call.
    fn decode_more(&mut self) -> io::Result<usize> {
        let (file, path, decoder, _) = self.current.as_mut().expect("a part is open");
        let n = match file.read(&mut self.raw) {
            Ok(n) => n,
            Err(e) => {
                let path = path.clone();
                return Err(self.fail(Error::local_io(&path, "read", e)));
            }
        };
        if n == 0 {
            return Ok(0);
        }
        if let Err(e) = decoder.update(&self.raw[..n]) {
            let location = self.locations[self.index].clone();
            return Err(self.fail(Error::Corrupt { location, reason: e.to_string() }));
        }
        std::mem::swap(&mut self.decoded, decoder.sink_mut());
        Ok(n)
    }

    /// Ends the current part: its trailer and the catalog's checksum must both agree.
    fn close_current(&mut self) -> io::Result<()> {
        let (_, path, decoder, permit) = self.current.take().expect("a part is open");
        let part = &self.parts[self.index];
        let location = self.locations[self.index].clone();
        let (digest, rest) = decoder
            .finish()
            .map_err(|e| self.fail(Error::Corrupt { location: location.clone(), reason: e.to_string() }))?;
        if digest.sha256_hex() != part.sha256 || digest.len != part.original_bytes {
            return Err(self.fail(Error::Corrupt {
                location,
                reason: format!(
                    "the part decodes to {digest}, but the catalog record says sha256 {}, {} bytes",
                    part.sha256, part.original_bytes
                ),
            }));
        }
        self.decoded = rest;
        self.offset = 0;
        let _ = fs::remove_file(&path);
        drop(permit);
        self.index += 1;
        Ok(())
    }
}

impl Read for PartStream<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.offset < self.decoded.len() {
                let n = (self.decoded.len() - self.offset).min(out.len());
                out[..n].copy_from_slice(&self.decoded[self.offset..self.offset + n]);
                self.offset += n;
                return Ok(n);
            }
            self.decoded.clear();
            self.offset = 0;
            if self.current.is_none() && !self.open_next()? {
                return Ok(0);
            }
            let n = self.decode_more()?;
            if n == 0 {
                self.close_current()?;
                continue;
            }
            self.done.stored += n as u64;
            self.done.original += self.decoded.len() as u64;
            self.progress.update(self.done.original, self.done.stored, Some(self.total));
        }
    }
}
