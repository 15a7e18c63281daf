//! Checking an encrypted object without its key: the archive host holds public keys only, yet must
//! not tell PostgreSQL "already archived, identical" about a damaged copy, since PostgreSQL then
//! recycles its own. The seal (a CRC-64 of the age stage's output) shows the stored bytes are the ones
//! written; the trailer says what they hold.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::stage::{AGE_STAGE_ID, SEAL_LEN, Seal};
use crate::codec::{
    ContentDigest, FormatError, HEADER_LEN, HEADER_MAGIC, HoldBack, STAGED_FORMAT_VERSION, TRAILER_LEN, TRAILER_MAGIC,
};

const READ_CHUNK: usize = 1 << 20;

/// What a keyless check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealed {
    /// Encrypted, whole, `stored` bytes long, and holding content with `digest` (as its writer
    /// recorded it).
    Whole {
        /// What the trailer records.
        digest: ContentDigest,
        /// The object's length in the repository.
        stored: u64,
    },
    /// Not an encrypted object: it can be decoded, and verified, without a key.
    Plain,
}

/// Reads an object and checks its seal, without decrypting. An I/O error reading is `Err(Ok(e))`;
/// damage is `Err(Err(format))`.
pub async fn check_sealed(mut reader: impl AsyncRead + Unpin) -> Result<Sealed, Result<std::io::Error, FormatError>> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut header[filled..]).await.map_err(Ok)? {
            0 => return Err(Err(FormatError::Truncated(format!("{filled} bytes, shorter than the header")))),
            n => filled += n,
        }
    }
    if &header[..8] != HEADER_MAGIC {
        return Err(Err(FormatError::BadMagic));
    }
    if u16::from_le_bytes([header[8], header[9]]) != STAGED_FORMAT_VERSION {
        return Ok(Sealed::Plain);
    }
    if header[11..] != [AGE_STAGE_ID, 0, 0, 0, 0] {
        return Err(Err(FormatError::UnknownStage(header[11])));
    }
    // Everything but the last SEAL_LEN + TRAILER_LEN bytes is sealed.
    let tail_len = SEAL_LEN + TRAILER_LEN;
    let mut seal = Seal::new();
    let mut tail = HoldBack::new(tail_len);
    let mut stored = HEADER_LEN as u64;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = reader.read(&mut buf).await.map_err(Ok)?;
        if n == 0 {
            break;
        }
        stored += n as u64;
        let (released, body) = tail.push(&buf[..n]);
        seal.update(&released);
        seal.update(body);
    }
    let pending = tail.held();
    if pending.len() < tail_len || &pending[tail_len - 8..] != TRAILER_MAGIC {
        return Err(Err(FormatError::Truncated("the end-of-object trailer is missing".into())));
    }
    if seal.bytes()[..] != pending[..SEAL_LEN] {
        return Err(Err(FormatError::Stage {
            stage: "age",
            reason: "the seal does not match its content: the object was altered or cut short".into(),
        }));
    }
    let trailer = &pending[SEAL_LEN..];
    let digest = ContentDigest {
        len: u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes")),
        sha256: trailer[8..40].try_into().expect("32 bytes"),
    };
    Ok(Sealed::Whole { digest, stored })
}
