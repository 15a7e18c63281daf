//! A data directory without a server: what the binaries see when PostgreSQL runs them as
//! archive_command or restore_command (a `pg_wal` beside them, their working directory the data
//! directory), for suites that feed them synthetic WAL instead of starting PostgreSQL.

use std::path::PathBuf;

use crate::Scratch;
use crate::segments::{self, Segment};

/// `pgdata/` with its `pg_wal/`, in a [`Scratch`] of its own that also has room for a repository,
/// configuration files and restore targets beside it.
pub struct FakeDataDir {
    /// The directory holding `pgdata/` and whatever the test puts beside it.
    pub scratch: Scratch,
    /// The data directory: the working directory of the binaries.
    pub data: PathBuf,
    /// `pgdata/pg_wal`, where the files to archive are.
    pub wal: PathBuf,
}

impl FakeDataDir {
    /// A new, empty data directory in a scratch directory named after `label`.
    pub fn new(label: &str) -> FakeDataDir {
        let scratch = Scratch::new(label);
        let data = scratch.mkdir("pgdata");
        let wal = scratch.mkdir("pgdata/pg_wal");
        FakeDataDir { scratch, data, wal }
    }

    /// Writes `bytes` as `pg_wal/<name>`, owned by the server user.
    pub fn write_wal_file(&self, name: &str, bytes: &[u8]) {
        segments::write_file(&self.wal.join(name), bytes);
    }

    /// Writes `segment` into `pg_wal` under its name; returns its bytes.
    pub fn write_segment(&self, segment: &Segment) -> Vec<u8> {
        let bytes = segment.bytes();
        self.write_wal_file(segment.name(), &bytes);
        bytes
    }
}
