//! The object format: how a file's bytes are stored, the same on every backend.
//!
//! ```text
//! header  (16 bytes)  "WALSHIP\0" | format version u16 LE (1) | compression u8 (1 = zstd) | 5 zero bytes
//! body                one zstd frame of the original bytes
//! trailer (48 bytes)  original length u64 LE | SHA-256 of the original bytes (32) | "WSEND\0\0\x01"
//! ```
//!
//! The checksum sits in a trailer so that a stream of unknown length (a base backup from
//! pg_basebackup) can be encoded in one pass with bounded memory. A decoder holds back the last 48
//! bytes it has seen; whatever is there when the stream ends must be a valid trailer whose length and
//! checksum match what was decoded, so a truncated or altered object is always detected, and nothing
//! decoded from it is trusted before [`Decoder::finish`] says so.

use std::fmt;
use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 48;
const HEADER_MAGIC: &[u8; 8] = b"WALSHIP\0";
const TRAILER_MAGIC: &[u8; 8] = b"WSEND\0\0\x01";
pub const FORMAT_VERSION: u16 = 1;
const COMPRESSION_ZSTD: u8 = 1;

/// zstd levels a user may configure. Negative (fast) levels are allowed; above 19 needs more memory
/// than an archive command should take.
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = -7..=19;

/// Length and SHA-256 of an object's original bytes: its identity for "is this the same file?".
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContentDigest {
    pub len: u64,
    pub sha256: [u8; 32],
}

impl ContentDigest {
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn of(bytes: &[u8]) -> Self {
        ContentDigest { len: bytes.len() as u64, sha256: Sha256::digest(bytes).into() }
    }
}

impl fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256 {}, {} bytes", self.sha256_hex(), self.len)
    }
}

impl fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Hashes bytes as they pass, for callers that need a digest without encoding.
#[derive(Default)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    pub fn finish(self) -> ContentDigest {
        ContentDigest { len: self.len, sha256: self.sha.finalize().into() }
    }
}

impl ContentDigest {
    /// The digest of a file's content, read in 1 MiB chunks.
    pub fn of_file(path: &std::path::Path) -> io::Result<Self> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf)? {
                0 => return Ok(hasher.finish()),
                n => hasher.update(&buf[..n]),
            }
        }
    }
}

/// Why stored bytes are not a valid object. Always a sign of damage or of a foreign file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("not a walship object (bad header magic)")]
    BadMagic,
    #[error("object format version {0} is newer than this walship reads (up to {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown compression {0}")]
    UnknownCompression(u8),
    #[error("compressed data is corrupt: {0}")]
    Corrupt(String),
    #[error("checksum mismatch: the trailer records {expected}, the content decodes to {actual}")]
    ChecksumMismatch { expected: ContentDigest, actual: ContentDigest },
}

/// A decoding failure: either the object is bad, or the place the decoded bytes go failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0}")]
    Sink(#[source] io::Error),
}

/// Encodes a stream chunk by chunk; the caller moves the produced bytes wherever they go.
pub struct Encoder {
    zstd: zstd::stream::write::Encoder<'static, Vec<u8>>,
    hasher: Hasher,
    header_pending: bool,
}

impl Encoder {
    pub fn new(level: i32) -> io::Result<Self> {
        Ok(Encoder {
            zstd: zstd::stream::write::Encoder::new(Vec::new(), level)?,
            hasher: Hasher::default(),
            header_pending: true,
        })
    }

    /// An encoder compressing on `workers` threads (zstd's multi-threaded mode; still one frame).
    pub fn with_workers(level: i32, workers: u32) -> io::Result<Self> {
        let mut encoder = Self::new(level)?;
        if workers > 1 {
            encoder.zstd.multithread(workers)?;
        }
        Ok(encoder)
    }

    fn take_header(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.header_pending) {
            out.extend_from_slice(HEADER_MAGIC);
            out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            out.push(COMPRESSION_ZSTD);
            out.extend_from_slice(&[0u8; 5]);
        }
    }

    /// Consumes `input`, appending whatever encoded bytes are ready to `out`.
    pub fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.take_header(out);
        self.hasher.update(input);
        self.zstd.write_all(input)?;
        out.append(self.zstd.get_mut());
        Ok(())
    }

    /// Ends the stream: appends the rest of the body and the trailer, and returns the digest.
    pub fn finish(mut self, out: &mut Vec<u8>) -> io::Result<ContentDigest> {
        self.take_header(out);
        out.append(&mut self.zstd.finish()?);
        let digest = self.hasher.finish();
        out.extend_from_slice(&digest.len.to_le_bytes());
        out.extend_from_slice(&digest.sha256);
        out.extend_from_slice(TRAILER_MAGIC);
        Ok(digest)
    }
}

/// Decodes a stream chunk by chunk into `sink`, verifying as it goes and at the end.
pub struct Decoder<W: Write> {
    header: Vec<u8>,
    held_back: Vec<u8>,
    zstd: zstd::stream::raw::Decoder<'static>,
    frame_complete: bool,
    scratch: Vec<u8>,
    hasher: Hasher,
    sink: W,
}

impl<W: Write> Decoder<W> {
    pub fn new(sink: W) -> io::Result<Self> {
        Ok(Decoder {
            header: Vec::with_capacity(HEADER_LEN),
            held_back: Vec::with_capacity(2 * TRAILER_LEN),
            zstd: zstd::stream::raw::Decoder::new()?,
            frame_complete: false,
            scratch: vec![0u8; 128 * 1024],
            hasher: Hasher::default(),
            sink,
        })
    }

    pub fn update(&mut self, mut input: &[u8]) -> Result<(), DecodeError> {
        if self.header.len() < HEADER_LEN {
            let take = (HEADER_LEN - self.header.len()).min(input.len());
            self.header.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.header.len() == HEADER_LEN {
                check_header(&self.header)?;
            }
        }
        if input.is_empty() {
            return Ok(());
        }
        // Everything but the last TRAILER_LEN bytes seen so far is body.
        if input.len() >= TRAILER_LEN {
            let held = std::mem::take(&mut self.held_back);
            self.feed_body(&held)?;
            let (body, tail) = input.split_at(input.len() - TRAILER_LEN);
            self.feed_body(body)?;
            self.held_back = held;
            self.held_back.clear();
            self.held_back.extend_from_slice(tail);
        } else {
            self.held_back.extend_from_slice(input);
            if self.held_back.len() > TRAILER_LEN {
                let excess = self.held_back.len() - TRAILER_LEN;
                let body: Vec<u8> = self.held_back.drain(..excess).collect();
                self.feed_body(&body)?;
            }
        }
        Ok(())
    }

    fn feed_body(&mut self, body: &[u8]) -> Result<(), DecodeError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut input = InBuffer::around(body);
        while input.pos < body.len() {
            if self.frame_complete {
                return Err(FormatError::Corrupt("bytes after the end of the compressed body".into()).into());
            }
            let mut output = OutBuffer::around(&mut self.scratch[..]);
            let hint = self.zstd.run(&mut input, &mut output).map_err(|e| FormatError::Corrupt(e.to_string()))?;
            let produced = output.pos();
            self.frame_complete = hint == 0;
            self.hasher.update(&self.scratch[..produced]);
            self.sink.write_all(&self.scratch[..produced]).map_err(DecodeError::Sink)?;
        }
        // A frame can end with output still buffered inside zstd; drain it.
        loop {
            let mut output = OutBuffer::around(&mut self.scratch[..]);
            let mut empty = InBuffer::around(&[][..]);
            let hint = self.zstd.run(&mut empty, &mut output).map_err(|e| FormatError::Corrupt(e.to_string()))?;
            let produced = output.pos();
            if produced == 0 {
                break;
            }
            self.frame_complete = hint == 0;
            self.hasher.update(&self.scratch[..produced]);
            self.sink.write_all(&self.scratch[..produced]).map_err(DecodeError::Sink)?;
        }
        Ok(())
    }

    /// Where decoded bytes go. They are unverified until [`finish`](Self::finish) succeeds.
    pub fn sink_mut(&mut self) -> &mut W {
        &mut self.sink
    }

    /// Ends the stream: checks the trailer against what was decoded; only then is the sink's content
    /// trustworthy. Returns the digest and the sink.
    pub fn finish(self) -> Result<(ContentDigest, W), DecodeError> {
        if self.header.len() < HEADER_LEN {
            return Err(FormatError::Truncated(format!("{} bytes, shorter than the header", self.header.len())).into());
        }
        if self.held_back.len() < TRAILER_LEN || &self.held_back[40..48] != TRAILER_MAGIC {
            return Err(FormatError::Truncated("the end-of-object trailer is missing".into()).into());
        }
        if !self.frame_complete {
            return Err(FormatError::Truncated("the compressed body ends early".into()).into());
        }
        let expected = ContentDigest {
            len: u64::from_le_bytes(self.held_back[0..8].try_into().expect("8 bytes")),
            sha256: self.held_back[8..40].try_into().expect("32 bytes"),
        };
        let actual = self.hasher.finish();
        if expected != actual {
            return Err(FormatError::ChecksumMismatch { expected, actual }.into());
        }
        Ok((actual, self.sink))
    }
}

fn check_header(header: &[u8]) -> Result<(), FormatError> {
    if &header[0..8] != HEADER_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    if header[10] != COMPRESSION_ZSTD {
        return Err(FormatError::UnknownCompression(header[10]));
    }
    Ok(())
}

/// Encodes a whole buffer; for small objects and tests.
pub fn encode_all(bytes: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = Encoder::new(level)?;
    encoder.update(bytes, &mut out)?;
    encoder.finish(&mut out)?;
    Ok(out)
}

/// Decodes and verifies a whole buffer; for small objects and tests.
pub fn decode_all(bytes: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut decoder = Decoder::new(Vec::new()).map_err(DecodeError::Sink)?;
    decoder.update(bytes)?;
    Ok(decoder.finish()?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // WAL-like: runs of zeros between pseudo-random records.
        let mut state = 0x1234_5678_u32;
        (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                if (i / 4096) % 2 == 0 { 0 } else { state as u8 }
            })
            .collect()
    }

    #[test]
    fn round_trip_in_odd_chunks() {
        let original = sample(3 * 1024 * 1024 + 17);
        let mut encoded = Vec::new();
        let mut encoder = Encoder::new(1).unwrap();
        for chunk in original.chunks(100_003) {
            encoder.update(chunk, &mut encoded).unwrap();
        }
        let digest = encoder.finish(&mut encoded).unwrap();
        assert_eq!(digest, ContentDigest::of(&original));
        assert!(encoded.len() < original.len(), "WAL-like data compresses");
        // Feed the decoder in chunk sizes that straddle the header and trailer boundaries.
        for chunk_size in [1, 7, 47, 48, 49, 4096, encoded.len()] {
            let mut decoder = Decoder::new(Vec::new()).unwrap();
            for chunk in encoded.chunks(chunk_size) {
                decoder.update(chunk).unwrap();
            }
            let (decoded_digest, decoded) = decoder.finish().unwrap();
            assert_eq!(decoded_digest, digest);
            assert!(decoded == original, "chunk size {chunk_size}");
        }
    }

    #[test]
    fn empty_input_round_trips() {
        let encoded = encode_all(b"", 3).unwrap();
        assert_eq!(decode_all(&encoded).unwrap(), b"");
    }

    #[test]
    fn every_truncation_is_detected() {
        let encoded = encode_all(&sample(200_000), 1).unwrap();
        for cut in (0..encoded.len()).step_by(997).chain([encoded.len() - 1, encoded.len() - 48, 15, 16, 17]) {
            let err = decode_all(&encoded[..cut]).unwrap_err();
            assert!(matches!(err, DecodeError::Format(_)), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let encoded = encode_all(&sample(50_000), 1).unwrap();
        for at in (0..encoded.len()).step_by(101).chain([8, 10, encoded.len() - 1, encoded.len() - 20]) {
            let mut damaged = encoded.clone();
            damaged[at] ^= 0x40;
            assert!(decode_all(&damaged).is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn appended_bytes_are_detected() {
        let mut encoded = encode_all(&sample(10_000), 1).unwrap();
        encoded.extend_from_slice(&[0u8; 100]);
        assert!(decode_all(&encoded).is_err());
    }

    #[test]
    fn foreign_and_future_objects_are_named() {
        let raw = sample(1000);
        assert!(matches!(decode_all(&raw), Err(DecodeError::Format(FormatError::BadMagic))));
        let mut future = encode_all(&raw, 1).unwrap();
        future[8] = 2;
        let err = decode_all(&future).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn sink_failures_are_not_called_corruption() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let encoded = encode_all(&sample(300_000), 1).unwrap();
        let mut decoder = Decoder::new(Full).unwrap();
        assert!(matches!(decoder.update(&encoded), Err(DecodeError::Sink(_))));
    }
}
