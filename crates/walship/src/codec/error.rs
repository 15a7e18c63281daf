//! The codec's failures, typed so that a caller can always tell a damaged object (report it, never
//! retry it into the cluster) from a failing disk or network on either side (an I/O error).

use std::io;

use super::{ContentDigest, FORMAT_VERSION};

/// Why stored bytes are not a valid object: a sign of damage or of a foreign file, but for
/// [`FormatError::Encryption`] (see [`FormatError::is_encryption`]).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not damage: no configured key opens the object, or it is plain where encryption is required.
    #[error("{0}")]
    Encryption(String),
    /// The object ends before its trailer, or a stage's stream ends early.
    #[error("truncated: {0}")]
    Truncated(String),
    /// The header's magic is not walship's: not an object at all.
    #[error("not a walship object (bad header magic)")]
    BadMagic,
    /// Written by a newer walship (or with stages this pipeline is not configured for).
    #[error("object format version {0} is newer than this walship reads (up to {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    /// The header names a compression other than zstd.
    #[error("unknown compression {0}")]
    UnknownCompression(u8),
    /// The header names a further stage (such as encryption) that this pipeline does not have.
    #[error("the object was written through stage {0}, which this walship is not configured for")]
    UnknownStage(u8),
    /// The zstd frame does not decode.
    #[error("compressed data is corrupt: {0}")]
    Corrupt(String),
    /// A further stage refused the bytes (for a cipher: authentication failed).
    #[error("{stage} stage: {reason}")]
    Stage {
        /// The stage's name, as [`Stage::name`](super::Stage::name) gives it.
        stage: &'static str,
        /// What it found.
        reason: String,
    },
    /// Everything decoded, but not to what the trailer records.
    #[error("checksum mismatch: the trailer records {expected}, the content decodes to {actual}")]
    ChecksumMismatch {
        /// What the trailer records.
        expected: ContentDigest,
        /// What the body decoded to.
        actual: ContentDigest,
    },
}

impl FormatError {
    /// A plain object read where encryption is configured and plain objects are not accepted.
    pub fn plain_where_encrypted() -> Self {
        FormatError::Encryption(
            "not encrypted, though [encryption] is configured: written before encryption was enabled (set \
             accept_plain = true to read such objects) or by someone without the key"
                .into(),
        )
    }

    /// Whether this is about keys (a wrong or missing key, a plain object where encryption is
    /// required) rather than damage: a configuration to fix, not an object to report as corrupt.
    pub fn is_encryption(&self) -> bool {
        matches!(self, FormatError::Encryption(_))
    }
}

/// A decoding failure: either the object is bad, or the place the decoded bytes go failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The object is damaged or foreign.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Writing the decoded bytes failed.
    #[error("{0}")]
    Sink(#[source] io::Error),
}

/// A failure of a pump ([`Pipeline::encode`](super::Pipeline::encode),
/// [`Pipeline::decode`](super::Pipeline::decode), [`Encoded`](super::Encoded),
/// [`Decoded`](super::Decoded)): which of the four parties failed.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading the input failed.
    #[error("{0}")]
    Source(#[source] io::Error),
    /// A stage could not start or run (not damage: zstd out of memory, a cipher without its key).
    #[error("{0}")]
    Codec(#[source] io::Error),
    /// The object being decoded is damaged or foreign.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Writing the output failed.
    #[error("{0}")]
    Sink(#[source] io::Error),
}

impl PumpError {
    /// As one `io::Error`, for a caller that reports every failure as I/O on one file, and for the
    /// `Read` forms: the I/O errors as they were, damage as `InvalidData` around the
    /// [`FormatError`] (found again with `get_ref().downcast_ref()`).
    pub fn into_io(self) -> io::Error {
        match self {
            PumpError::Source(e) | PumpError::Codec(e) | PumpError::Sink(e) => e,
            PumpError::Format(format) => io::Error::new(io::ErrorKind::InvalidData, format),
        }
    }
}

impl From<DecodeError> for PumpError {
    fn from(error: DecodeError) -> Self {
        match error {
            DecodeError::Format(format) => PumpError::Format(format),
            DecodeError::Sink(io) => PumpError::Sink(io),
        }
    }
}

/// A failure further down a decoding pipeline, passed back up through a stage untouched. A stage
/// cannot make one, so whatever a stage reports itself is a [`FormatError`], never a sink error.
#[derive(Debug)]
pub struct Downstream(pub(super) DecodeError);

/// What a [`StageDecoder`](super::StageDecoder) returns: its own finding, or one from further down.
#[derive(Debug)]
pub enum StageError {
    /// This stage found the bytes damaged.
    Damaged(FormatError),
    /// A later stage or the sink failed.
    Downstream(Downstream),
}

impl From<FormatError> for StageError {
    fn from(error: FormatError) -> Self {
        StageError::Damaged(error)
    }
}

impl From<Downstream> for StageError {
    fn from(error: Downstream) -> Self {
        StageError::Downstream(error)
    }
}

impl From<StageError> for DecodeError {
    fn from(error: StageError) -> Self {
        match error {
            StageError::Damaged(format) => DecodeError::Format(format),
            StageError::Downstream(Downstream(inner)) => inner,
        }
    }
}
