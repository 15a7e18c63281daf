//! The extractor of base-fetch: decodes each archive's downloaded parts through the codec's pump, in
//! order, into one tar stream (every part checked against its trailer and the catalog's SHA-256 as
//! it ends) and unpacks it into the archive's directory, holding `global/pg_control` back under
//! another name.
//!
//! It runs on a blocking thread: the tar reader and the file writes block. Downloads run ahead of it
//! on the async side; it waits for each part's download in order and frees its slot once the part
//! is consumed and its file deleted.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::cancel::CancelToken;
use super::manifest::HELD_BACK_CONTROL;
use super::{PartRecord, Progress, Transferred};
use crate::codec::{Decoded, Pipeline, PumpError};
use crate::error::Error;

/// Decoded bytes thrown away at a time when a part is read to its end only to check it.
const DISCARD_CHUNK: usize = 64 * 1024;

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
    /// Set by a signal: the next read fails, and the restore stops.
    pub(super) cancel: CancelToken,
    /// How parts are decoded (the repository's keys).
    pub(super) pipeline: Pipeline,
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
    /// The open part: decoded by the codec's pump straight from its downloaded file.
    current: Option<(Decoded<File>, PathBuf, tokio::sync::OwnedSemaphorePermit)>,
    failure: Arc<Mutex<Option<Error>>>,
    /// What the restore has consumed so far, of `total` original bytes.
    done: Transferred,
    total: u64,
    progress: &'a dyn Progress,
    cancel: CancelToken,
    pipeline: Pipeline,
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
            failure: Arc::default(),
            done,
            total,
            progress: how.progress,
            cancel: how.cancel.clone(),
            pipeline: how.pipeline.clone(),
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
        let decoded =
            self.pipeline.decoded(file).map_err(|e| self.fail(Error::local_io(&path, "decompress", e.into_io())))?;
        self.current = Some((decoded, path, downloaded.permit));
        Ok(true)
    }

    /// Decodes the rest of the part being read, discarding the bytes, and ends it: checks its
    /// checksums without opening the next part. Nothing to do between parts.
    fn finish_current_part(&mut self) -> io::Result<()> {
        let mut discard = vec![0u8; DISCARD_CHUNK];
        while self.current.is_some() {
            if self.read_part(&mut discard)? == 0 {
                return self.close_current();
            }
        }
        Ok(())
    }

    /// Reads the open part's next decoded bytes, counting the stored bytes the pump read for them;
    /// 0 at the part's end, once its trailer has checked out. A failing part file is a local read
    /// error; anything else the pump reports is damage to the part.
    fn read_part(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let (decoded, path, _) = self.current.as_mut().expect("a part is open");
        let stored_before = decoded.stored_bytes();
        match decoded.read_decoded(out) {
            Ok(n) => {
                self.done.stored += decoded.stored_bytes() - stored_before;
                Ok(n)
            }
            Err(PumpError::Source(e)) => {
                let path = path.clone();
                Err(self.fail(Error::local_io(&path, "read", e)))
            }
            Err(PumpError::Format(e)) => {
                let location = self.locations[self.index].clone();
                Err(self.fail(Error::stored(&location, e)))
            }
            Err(e) => {
                let location = self.locations[self.index].clone();
                Err(self.fail(Error::Corrupt { location, reason: e.to_string() }))
            }
        }
    }

    /// Ends the current part, whose trailer checked out: the catalog's checksum must agree too.
    fn close_current(&mut self) -> io::Result<()> {
        let (decoded, path, permit) = self.current.take().expect("a part is open");
        let part = &self.parts[self.index];
        let digest = decoded.digest().expect("the part has ended");
        if let Some(reason) = super::fetch::part_mismatch(part, &digest) {
            let location = self.locations[self.index].clone();
            return Err(self.fail(Error::Corrupt { location, reason }));
        }
        let _ = fs::remove_file(&path);
        drop(permit);
        self.index += 1;
        Ok(())
    }
}

impl Read for PartStream<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if let Err(stop) = self.cancel.check() {
            return Err(self.fail(stop));
        }
        loop {
            if self.current.is_none() && !self.open_next()? {
                return Ok(0);
            }
            let stored_before = self.done.stored;
            let n = self.read_part(out)?;
            if n == 0 {
                self.close_current()?;
                continue;
            }
            self.done.original += n as u64;
            // Once per read of the part file (a pump's read chunk of stored bytes), as before.
            if self.done.stored != stored_before {
                self.progress.update(self.done.original, self.done.stored, Some(self.total));
            }
            return Ok(n);
        }
    }
}
