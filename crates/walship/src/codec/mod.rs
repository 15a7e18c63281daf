//! The object format: how a file's bytes are stored, the same on every backend, and the one place
//! they are transformed on the way in and out.
//!
//! ```text
//! header  (16 bytes)  "WALSHIP\0" | format version u16 LE | stage ids (6 bytes)
//! body                the original bytes through every stage, in order
//! trailer (48 bytes)  original length u64 LE | SHA-256 of the original bytes (32) | "WSEND\0\0\x01"
//! ```
//!
//! The stages, in the order the format fixes: **compress** (one zstd frame, always first, id 1),
//! then the **further stages** a [`Pipeline`] lists (encryption goes here), then the **checksum
//! trailer** over the original bytes. Version 1 (every object walship has written so far) has zstd
//! alone: byte 10 is 1 and bytes 11..16 are reserved zeros, never looked at. Version 2 is written
//! only when there are further stages, and names them in bytes 11..16, in writing order; a reader
//! undoes them in the reverse order, and reads version 2 only if its pipeline has further stages.
//!
//! The checksum sits in a trailer so that a stream of unknown length (a base backup from
//! pg_basebackup) can be encoded in one pass with bounded memory. A decoder holds back the last 48
//! bytes it has seen; whatever is there when the stream ends must be a valid trailer whose length and
//! checksum match what was decoded, so a truncated or altered object is always detected, and nothing
//! decoded from it is trusted before [`Decoder::finish`] says so.
//!
//! Three ways in, over the same [`Encoder`] and [`Decoder`]: the chunk-push form (`update` /
//! `finish`) for callers that move bytes themselves (an async storage writer or reader, a channel);
//! the pumps [`Pipeline::encode`] and [`Pipeline::decode`] between a `Read` and a `Write`, and
//! [`Pipeline::decode_async`] between an `AsyncRead` and an `AsyncWrite`; and the pull forms
//! [`Encoded`] and [`Decoded`]. Damage is always a [`FormatError`], never confused with a
//! failing source or sink.

#![warn(missing_docs)]

mod digest;
mod error;
mod hold_back;
mod pipeline;
mod pump;
mod stage;
#[cfg(test)]
mod tests;

use std::io;

pub use digest::{ContentDigest, Hasher};
pub use error::{DecodeError, Downstream, FormatError, PumpError, StageError};
pub(crate) use hold_back::HoldBack;
pub use pipeline::{Decoder, Encoder, HEADER_MAGIC, Pipeline, TRAILER_MAGIC};
pub use pump::{DECODE_READ_CHUNK, Decoded, ENCODE_READ_CHUNK, Encoded, Prefix, Pumped};
pub use stage::{AGE_ID, Next, Stage, StageDecoder, StageEncoder, ZSTD_ID, Zstd};

/// Length of the header, in bytes.
pub const HEADER_LEN: usize = 16;
/// Length of the trailer, in bytes.
pub const TRAILER_LEN: usize = 48;
/// The format of an object with zstd alone: every object walship writes without further stages.
pub const FORMAT_VERSION: u16 = 1;
/// The format of an object that also went through further stages, named in its header.
pub const STAGED_FORMAT_VERSION: u16 = 2;

/// zstd levels a user may configure. Negative (fast) levels are allowed; above 19 needs more memory
/// than an archive command should take.
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = -7..=19;

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
    Pipeline::default().decode_bytes(bytes)
}

impl Pipeline {
    /// Decodes and verifies a whole buffer (a small object: a history file).
    pub fn decode_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut decoder = self.decoder(Vec::new()).map_err(DecodeError::Sink)?;
        decoder.update(bytes)?;
        Ok(decoder.finish()?.1)
    }
}
