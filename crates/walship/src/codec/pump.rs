//! The pumps: one loop per direction between a reader and a writer, so that no caller writes the
//! read -> update -> write loop again. Each uses fixed buffers. [`Pipeline::decode_async`] awaits
//! an async source and sink (a storage reader, a tokio file) instead of blocking on them; the pull
//! forms ([`Encoded`], [`Decoded`]) leave the other end to the caller, for an async storage writer
//! (await each chunk) or a consumer that wants a `Read` (a tar extractor).

use std::io::{self, Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::ContentDigest;
use super::error::PumpError;
use super::pipeline::{Decoder, Encoder, Pipeline};

/// What an encoding pump reads from its source at a time.
pub const ENCODE_READ_CHUNK: usize = 1 << 20;
/// What a decoding pump reads from its source at a time.
pub const DECODE_READ_CHUNK: usize = 256 * 1024;
/// What a pull decoder hands the decoder at a time: bounds what one step can decompress to.
const DECODE_SLICE: usize = 64 * 1024;

/// What a pump moved: the original bytes' digest, and the size of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pumped {
    /// Length and SHA-256 of the original bytes.
    pub digest: ContentDigest,
    /// The size of the encoded object: written by an encoding pump, read by a decoding one.
    pub stored_bytes: u64,
}

impl Pipeline {
    /// Encodes everything `source` yields into `sink`, as one object, and flushes the sink. The
    /// sink's content is a complete object only when this returns `Ok`.
    pub fn encode(&self, source: impl Read, mut sink: impl Write) -> Result<Pumped, PumpError> {
        let mut encoded = self.encoded(source)?;
        loop {
            let chunk = encoded.next_chunk(ENCODE_READ_CHUNK)?;
            if chunk.is_empty() {
                sink.flush().map_err(PumpError::Sink)?;
                let digest = encoded.digest().expect("the object has ended");
                return Ok(Pumped { digest, stored_bytes: encoded.stored_bytes() });
            }
            sink.write_all(&chunk).map_err(PumpError::Sink)?;
        }
    }

    /// Decodes the object `source` yields into `sink`, checking it, and flushes the sink. What the
    /// sink received is to be trusted only when this returns `Ok`.
    pub fn decode(&self, mut source: impl Read, sink: impl Write) -> Result<Pumped, PumpError> {
        let mut decoder = self.decoder(sink).map_err(PumpError::Codec)?;
        let mut buf = vec![0u8; DECODE_READ_CHUNK];
        let mut stored_bytes = 0;
        loop {
            match read_retrying(&mut source, &mut buf)? {
                0 => {
                    // A buffered sink would drop a failed flush silently.
                    let (digest, mut sink) = decoder.finish()?;
                    sink.flush().map_err(PumpError::Sink)?;
                    return Ok(Pumped { digest, stored_bytes });
                }
                n => {
                    stored_bytes += n as u64;
                    decoder.update(&buf[..n])?;
                }
            }
        }
    }

    /// [`decode`](Self::decode) between an async source and an async sink, awaiting both: the
    /// decoded bytes go out a slice's worth at a time, and the sink is flushed at the end.
    pub async fn decode_async(
        &self,
        mut source: impl AsyncRead + Unpin,
        mut sink: impl AsyncWrite + Unpin,
    ) -> Result<Pumped, PumpError> {
        let mut decoder = self.decoder(Vec::new()).map_err(PumpError::Codec)?;
        let mut buf = vec![0u8; DECODE_READ_CHUNK];
        let mut stored_bytes = 0;
        loop {
            let n = source.read(&mut buf).await.map_err(PumpError::Source)?;
            if n == 0 {
                break;
            }
            stored_bytes += n as u64;
            for slice in buf[..n].chunks(DECODE_SLICE) {
                decoder.update(slice)?;
                sink.write_all(decoder.sink_mut()).await.map_err(PumpError::Sink)?;
                decoder.sink_mut().clear();
            }
        }
        let (digest, rest) = decoder.finish()?;
        sink.write_all(&rest).await.map_err(PumpError::Sink)?;
        sink.flush().await.map_err(PumpError::Sink)?;
        Ok(Pumped { digest, stored_bytes })
    }

    /// `source` as encoded chunks, pulled by the caller.
    pub fn encoded<R: Read>(&self, source: R) -> Result<Encoded<R>, PumpError> {
        Ok(Encoded::new(source, self.encoder().map_err(PumpError::Codec)?))
    }

    /// The object `source` yields, decoded and checked, as a `Read`.
    pub fn decoded<R: Read>(&self, source: R) -> Result<Decoded<R>, PumpError> {
        Ok(Decoded::new(source, self.decoder(Vec::new()).map_err(PumpError::Codec)?))
    }
}

fn read_retrying(source: &mut impl Read, buf: &mut [u8]) -> Result<usize, PumpError> {
    loop {
        match source.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            read => return read.map_err(PumpError::Source),
        }
    }
}

/// A source being encoded, pulled chunk by chunk: the caller writes each chunk wherever it goes
/// (awaiting an async writer in between), and learns the digest at the end.
pub struct Encoded<R> {
    source: R,
    encoder: Option<Encoder>,
    buf: Vec<u8>,
    original_bytes: u64,
    stored_bytes: u64,
    digest: Option<ContentDigest>,
    /// For the `Read` form: a chunk not yet handed out, and how much of it was.
    pending: (Vec<u8>, usize),
}

impl<R: Read> Encoded<R> {
    /// Encodes what `source` yields with `encoder`.
    pub fn new(source: R, encoder: Encoder) -> Self {
        Encoded {
            source,
            encoder: Some(encoder),
            buf: vec![0u8; ENCODE_READ_CHUNK],
            original_bytes: 0,
            stored_bytes: 0,
            digest: None,
            pending: (Vec::new(), 0),
        }
    }

    /// The next encoded bytes: at least `min` of them unless the object ends first, and none once
    /// it has ended (the trailer is in the last non-empty chunk).
    pub fn next_chunk(&mut self, min: usize) -> Result<Vec<u8>, PumpError> {
        let mut out = Vec::new();
        while out.len() < min.max(1) {
            let Some(encoder) = self.encoder.as_mut() else { break };
            out.reserve(min.saturating_sub(out.len()).min(2 * ENCODE_READ_CHUNK));
            let n = read_retrying(&mut self.source, &mut self.buf)?;
            if n == 0 {
                let encoder = self.encoder.take().expect("checked above");
                self.digest = Some(encoder.finish(&mut out).map_err(PumpError::Codec)?);
                break;
            }
            self.original_bytes += n as u64;
            encoder.update(&self.buf[..n], &mut out).map_err(PumpError::Codec)?;
        }
        self.stored_bytes += out.len() as u64;
        Ok(out)
    }

    /// How many original bytes were read from the source so far.
    pub fn original_bytes(&self) -> u64 {
        self.original_bytes
    }

    /// How many encoded bytes were handed out so far.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// The digest of the original bytes, once the last chunk has been handed out.
    pub fn digest(&self) -> Option<ContentDigest> {
        self.digest
    }
}

impl<R: Read> Read for Encoded<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pending.1 == self.pending.0.len() {
            self.pending = (self.next_chunk(out.len()).map_err(PumpError::into_io)?, 0);
        }
        let (chunk, at) = &mut self.pending;
        let n = (chunk.len() - *at).min(out.len());
        out[..n].copy_from_slice(&chunk[*at..*at + n]);
        *at += n;
        Ok(n)
    }
}

/// An object being decoded, pulled as its original bytes. They are unverified until the end:
/// [`read_decoded`](Self::read_decoded) returns 0 only once the trailer has been checked.
pub struct Decoded<R> {
    source: R,
    decoder: Option<Decoder<Vec<u8>>>,
    raw: Vec<u8>,
    /// The part of `raw` not yet decoded.
    raw_range: (usize, usize),
    decoded: Vec<u8>,
    offset: usize,
    stored_bytes: u64,
    digest: Option<ContentDigest>,
}

impl<R: Read> Decoded<R> {
    /// Decodes the object `source` yields with `decoder`.
    pub fn new(source: R, decoder: Decoder<Vec<u8>>) -> Self {
        Decoded {
            source,
            decoder: Some(decoder),
            raw: vec![0u8; DECODE_READ_CHUNK],
            raw_range: (0, 0),
            decoded: Vec::new(),
            offset: 0,
            stored_bytes: 0,
            digest: None,
        }
    }

    /// Like [`Read::read`], with the failure typed: 0 (for a non-empty `out`) means the object
    /// ended and checked out.
    pub fn read_decoded(&mut self, out: &mut [u8]) -> Result<usize, PumpError> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.offset < self.decoded.len() {
                let n = (self.decoded.len() - self.offset).min(out.len());
                out[..n].copy_from_slice(&self.decoded[self.offset..self.offset + n]);
                self.offset += n;
                return Ok(n);
            }
            self.decoded.clear();
            self.offset = 0;
            if !self.decode_more()? {
                return Ok(0);
            }
        }
    }

    /// Decodes the next slice of stored bytes into `decoded`; `false` once the object has ended.
    fn decode_more(&mut self) -> Result<bool, PumpError> {
        if self.decoder.is_none() {
            return Ok(false);
        }
        if self.raw_range.0 == self.raw_range.1 {
            let n = read_retrying(&mut self.source, &mut self.raw)?;
            if n == 0 {
                let (digest, rest) = self.decoder.take().expect("checked above").finish()?;
                self.digest = Some(digest);
                self.decoded = rest;
                return Ok(true);
            }
            self.stored_bytes += n as u64;
            self.raw_range = (0, n);
        }
        let (start, end) = self.raw_range;
        let slice_end = (start + DECODE_SLICE).min(end);
        let decoder = self.decoder.as_mut().expect("checked above");
        decoder.update(&self.raw[start..slice_end])?;
        self.raw_range.0 = slice_end;
        std::mem::swap(&mut self.decoded, decoder.sink_mut());
        Ok(true)
    }

    /// How many stored bytes were read from the source so far.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// The digest of the original bytes, once the end has been read and checked.
    pub fn digest(&self) -> Option<ContentDigest> {
        self.digest
    }
}

impl<R: Read> Read for Decoded<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.read_decoded(out).map_err(PumpError::into_io)
    }
}

/// A sink that keeps the first `limit` bytes written to it and drops the rest: for comparing a
/// decoded object with a small local file without holding a large object in memory.
#[derive(Debug, Default)]
pub struct Prefix {
    bytes: Vec<u8>,
    limit: usize,
}

impl Prefix {
    /// Keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Prefix { bytes: Vec::new(), limit }
    }

    /// What was kept.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn keep(&mut self, bytes: &[u8]) -> usize {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&bytes[..room.min(bytes.len())]);
        bytes.len()
    }
}

impl Write for Prefix {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        Ok(self.keep(bytes))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncWrite for Prefix {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(Ok(self.get_mut().keep(bytes)))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
