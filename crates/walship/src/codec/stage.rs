//! A stage is one reversible transform of an object's body (compression, and next encryption), so
//! that a new one is a new type here rather than a change at every place that reads or writes
//! objects. The write side hands its output back in a `Vec` (encoding never grows bytes much); the
//! read side passes pieces of bounded size to the next stage as it goes, because decompression can
//! grow a few bytes into megabytes.

use std::io::{self, Write};

use super::error::{Downstream, FormatError, StageError};

/// Where a read-side stage passes its output: the next stage, or the checksum and the sink.
pub type Next<'a> = dyn FnMut(&[u8]) -> Result<(), Downstream> + 'a;

/// A kind of body transform, configured once (a level, a key) and asked for a fresh encoder or
/// decoder per object. Stages are applied in the order the pipeline lists them when writing, and
/// undone in the reverse order when reading.
pub trait Stage: Send + Sync {
    /// The byte that names this stage in a header; 1 is zstd, 0 means none, each stage its own.
    fn id(&self) -> u8;
    /// A short name for messages ("zstd", "age").
    fn name(&self) -> &'static str;
    /// A fresh write-side state for one object.
    fn encoder(&self) -> io::Result<Box<dyn StageEncoder>>;
    /// A fresh read-side state for one object.
    fn decoder(&self) -> io::Result<Box<dyn StageDecoder>>;
}

/// One object's write-side state of a stage. A stage with a header of its own (a cipher's) emits it
/// with its first output; one that works in chunks keeps a partial chunk until more input comes
/// or [`finish`](Self::finish).
pub trait StageEncoder: Send {
    /// Consumes `input`, appending whatever output is ready to `out`.
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()>;
    /// Ends the stream: appends the rest (a last chunk, an authentication tag) to `out`.
    fn finish(self: Box<Self>, out: &mut Vec<u8>) -> io::Result<()>;
}

/// One object's read-side state of a stage. Whatever it reports itself must be damage
/// ([`FormatError`]); failures further down reach it as [`Downstream`] and go back up with `?`.
/// It passes output on in pieces of bounded size, and only what it has verified (a cipher: whole
/// authenticated chunks).
pub trait StageDecoder: Send {
    /// Consumes `input`, passing whatever output is ready to `next`.
    fn update(&mut self, input: &[u8], next: &mut Next<'_>) -> Result<(), StageError>;
    /// Ends the stream: passes the rest on, and fails if the stream did not end properly (a frame
    /// cut short, a last chunk missing).
    fn finish(self: Box<Self>, next: &mut Next<'_>) -> Result<(), StageError>;
}

/// The id of zstd, the compression every object has.
pub const ZSTD_ID: u8 = 1;
/// The id of age encryption (`crate::encryption`): reserved here, so that the codec can say of an
/// encrypted object read without keys what it is.
pub const AGE_ID: u8 = 2;
/// How much a zstd decoder passes on at a time.
const ZSTD_PIECE: usize = 128 * 1024;

/// Compression: one zstd frame, on `workers` threads when more than one (still one frame).
#[derive(Clone, Copy, Debug)]
pub struct Zstd {
    /// The zstd level, within [`COMPRESSION_LEVELS`](super::COMPRESSION_LEVELS).
    pub level: i32,
    /// Compression threads; 0 and 1 both mean the calling thread.
    pub workers: u32,
}

impl Stage for Zstd {
    fn id(&self) -> u8 {
        ZSTD_ID
    }

    fn name(&self) -> &'static str {
        "zstd"
    }

    fn encoder(&self) -> io::Result<Box<dyn StageEncoder>> {
        let mut zstd = zstd::stream::write::Encoder::new(Vec::new(), self.level)?;
        if self.workers > 1 {
            zstd.multithread(self.workers)?;
        }
        Ok(Box::new(ZstdEncoder(zstd)))
    }

    fn decoder(&self) -> io::Result<Box<dyn StageDecoder>> {
        Ok(Box::new(ZstdDecoder {
            zstd: zstd::stream::raw::Decoder::new()?,
            frame_complete: false,
            scratch: vec![0u8; ZSTD_PIECE],
        }))
    }
}

struct ZstdEncoder(zstd::stream::write::Encoder<'static, Vec<u8>>);

impl StageEncoder for ZstdEncoder {
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.0.write_all(input)?;
        out.append(self.0.get_mut());
        Ok(())
    }

    fn finish(self: Box<Self>, out: &mut Vec<u8>) -> io::Result<()> {
        out.append(&mut self.0.finish()?);
        Ok(())
    }
}

struct ZstdDecoder {
    zstd: zstd::stream::raw::Decoder<'static>,
    frame_complete: bool,
    scratch: Vec<u8>,
}

impl ZstdDecoder {
    /// Runs zstd once over `input` into the scratch buffer and passes on what it produced. Returns
    /// how much that was and whether zstd says the frame is complete.
    fn step(
        &mut self,
        input: &mut zstd::stream::raw::InBuffer<'_>,
        next: &mut Next<'_>,
    ) -> Result<(usize, bool), StageError> {
        use zstd::stream::raw::{Operation, OutBuffer};
        let mut output = OutBuffer::around(&mut self.scratch[..]);
        let hint = self.zstd.run(input, &mut output).map_err(|e| FormatError::Corrupt(e.to_string()))?;
        let produced = output.pos();
        if produced > 0 {
            next(&self.scratch[..produced])?;
        }
        Ok((produced, hint == 0))
    }
}

impl StageDecoder for ZstdDecoder {
    fn update(&mut self, body: &[u8], next: &mut Next<'_>) -> Result<(), StageError> {
        use zstd::stream::raw::InBuffer;
        let mut input = InBuffer::around(body);
        while input.pos < body.len() {
            if self.frame_complete {
                return Err(FormatError::Corrupt("bytes after the end of the compressed body".into()).into());
            }
            (_, self.frame_complete) = self.step(&mut input, next)?;
        }
        // A frame can end with output still buffered inside zstd; drain it.
        loop {
            let (produced, complete) = self.step(&mut InBuffer::around(&[][..]), next)?;
            if produced == 0 {
                return Ok(());
            }
            self.frame_complete = complete;
        }
    }

    fn finish(self: Box<Self>, _next: &mut Next<'_>) -> Result<(), StageError> {
        if !self.frame_complete {
            return Err(FormatError::Truncated("the compressed body ends early".into()).into());
        }
        Ok(())
    }
}
