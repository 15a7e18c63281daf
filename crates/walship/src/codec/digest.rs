//! What an object's original bytes are, in 40 bytes: the identity "is this the same file?" compares,
//! and what the trailer of every object records.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// Length and SHA-256 of an object's original bytes: its identity for "is this the same file?".
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContentDigest {
    /// How many original bytes there are.
    pub len: u64,
    /// The SHA-256 of the original bytes.
    pub sha256: [u8; 32],
}

impl ContentDigest {
    /// The SHA-256 in lower-case hex, as catalogs and object attributes record it.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The digest of bytes in memory.
    pub fn of(bytes: &[u8]) -> Self {
        ContentDigest { len: bytes.len() as u64, sha256: Sha256::digest(bytes).into() }
    }

    /// The digest of a file's content, read in 1 MiB chunks.
    pub fn of_file(path: &std::path::Path) -> io::Result<Self> {
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
    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// The digest of every byte added.
    pub fn finish(self) -> ContentDigest {
        ContentDigest { len: self.len, sha256: self.sha.finalize().into() }
    }
}
