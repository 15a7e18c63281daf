//! The one error type the commands return, and the exit code each error maps to.
//!
//! Exit codes are an interface: scripts and PostgreSQL act on them. The table lives in
//! [`ExitCode`] and in the README, and the two must agree.

use std::io;
use std::path::Path;

use crate::codec::ContentDigest;
use crate::storage::StorageError;

/// Every way a walship command can fail; [`Error::exit_code`] maps each to the documented code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Wrong arguments.
    #[error("{0}")]
    Usage(String),

    /// A configuration file, flag or environment variable that cannot be used.
    #[error("{source_name}: {message}")]
    Config {
        /// Where the setting came from: the file's path, `--flag` or the environment variable.
        source_name: String,
        /// What is wrong with it (never the value of a secret).
        message: String,
    },

    /// The file handed to us is not what its name says (not WAL, another segment, a bad name).
    #[error("{file}: {reason}")]
    InvalidInput {
        /// The file (or name) refused.
        file: String,
        /// Why it is not what it says it is.
        reason: String,
    },

    /// The repository already holds different content under this name.
    #[error(
        "{name}: already archived with different content (archived: {existing}; new: {new}); \
         refusing to overwrite"
    )]
    Conflict {
        /// The WAL file name both pushes used.
        name: String,
        /// The digest of what the repository holds.
        existing: ContentDigest,
        /// The digest of what this push brought.
        new: ContentDigest,
    },

    /// The repository belongs to another cluster, is not a walship repository, or is too new.
    #[error("{location}: {reason}")]
    WrongRepository {
        /// The repository's location.
        location: String,
        /// What does not match (system identifier, version, missing identity record...).
        reason: String,
    },

    /// A stored object failed verification.
    #[error("{location}: corrupt object, not used: {reason}")]
    Corrupt {
        /// The damaged object's full location.
        location: String,
        /// What verification found.
        reason: String,
    },

    /// An object no configured key opens, or a repository whose encryption the configuration does
    /// not match (a key for a plain repository, none for an encrypted one, a plain object where
    /// encryption is required).
    #[error("{location}: {reason}")]
    Encryption {
        /// The object's or the repository's full location.
        location: String,
        /// What does not fit (key ids, never a key).
        reason: String,
    },

    /// The repository does not have the file (wal-fetch's "definitely absent").
    #[error("{name}: not in the archive ({location})")]
    NotFound {
        /// The WAL file name asked for.
        name: String,
        /// Where it would be.
        location: String,
    },

    /// The repository failed or was unreachable (permission, missing bucket, network, host key).
    #[error(transparent)]
    Storage(StorageError),

    /// Reading the file to archive, or writing the fetched file.
    #[error("{path}: {operation}: {source}")]
    LocalIo {
        /// The local file.
        path: String,
        /// What was being done to it (`read`, `create temporary file`, `rename into place`...).
        operation: &'static str,
        /// What the operating system said.
        source: io::Error,
    },

    /// No backup fits the request (an unknown name, or a target older than every backup).
    #[error("{0}")]
    NoSuchBackup(String),

    /// A PostgreSQL program we run (pg_basebackup, pg_verifybackup) failed or could not be run.
    #[error("{tool}: {reason}")]
    ToolFailed {
        /// The program's path.
        tool: String,
        /// Its exit status and the end of what it said, or why it could not start.
        reason: String,
    },

    /// A signal (SIGINT, SIGTERM, SIGHUP) stopped the command; what it had written was removed.
    #[error("interrupted by {signal}; nothing partial was left behind")]
    Interrupted {
        /// The signal's name, `SIGTERM` say.
        signal: &'static str,
    },

    /// Transient failures kept happening until the command's deadline.
    #[error("{what}: gave up after {seconds} s (deadline_secs): {last}")]
    DeadlineExceeded {
        /// The operation and its location.
        what: String,
        /// The deadline, in seconds.
        seconds: u64,
        /// The last failure seen before giving up.
        last: String,
    },

    /// A bug: walship reached a state it should never be in (a task panicked, a stream ended where
    /// it cannot). Says what, for the bug report.
    #[error("internal error (a bug in walship): {0}")]
    Internal(String),
}

impl Error {
    /// A failed operation on a local file.
    pub fn local_io(path: &Path, operation: &'static str, source: io::Error) -> Self {
        Error::LocalIo { path: path.display().to_string(), operation, source }
    }

    /// What reading the object at `location` found: a key problem, or damage.
    pub fn stored(location: &str, format: crate::codec::FormatError) -> Self {
        if format.is_encryption() {
            Error::Encryption { location: location.to_owned(), reason: format.to_string() }
        } else {
            Error::Corrupt { location: location.to_owned(), reason: format.to_string() }
        }
    }

    /// The documented exit code for this failure (before wal-fetch's recovery offset).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) => ExitCode::Usage,
            Error::Config { .. } => ExitCode::Config,
            Error::InvalidInput { .. } => ExitCode::InvalidInput,
            Error::Conflict { .. } => ExitCode::Conflict,
            Error::WrongRepository { .. } => ExitCode::WrongRepository,
            Error::Corrupt { .. } => ExitCode::Corrupt,
            Error::Encryption { .. } => ExitCode::Encryption,
            Error::NotFound { .. } | Error::NoSuchBackup(_) => ExitCode::NotFound,
            Error::ToolFailed { .. } => ExitCode::ToolFailed,
            Error::Interrupted { .. } => ExitCode::Interrupted,
            Error::Storage(_) | Error::DeadlineExceeded { .. } => ExitCode::Storage,
            Error::LocalIo { .. } => ExitCode::LocalIo,
            Error::Internal(_) => ExitCode::Internal,
        }
    }

    /// Whether trying the whole operation again soon may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Storage(e) if e.is_retryable())
    }
}

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Self {
        Error::Storage(e)
    }
}

/// Exit codes of every walship command. Codes 2 to 9 are below 126 so that PostgreSQL's archiver
/// treats them as "try again later"; wal-fetch lifts them above 125 during recovery (see
/// [`ExitCode::for_restore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Done (for wal-push: durable in the repository, or identical content already was).
    Success = 0,
    /// The archive definitely does not have the file, or no backup fits.
    NotFound = 1,
    /// Wrong arguments.
    Usage = 2,
    /// Unusable configuration.
    Config = 3,
    /// The input is not what its name says.
    InvalidInput = 4,
    /// Different content is already archived under the name.
    Conflict = 5,
    /// The repository is another cluster's, not a walship repository, or not the one it was.
    WrongRepository = 6,
    /// A stored object failed verification.
    Corrupt = 7,
    /// The repository failed, or stayed unreachable until the deadline.
    Storage = 8,
    /// A local file could not be read or written.
    LocalIo = 9,
    /// A PostgreSQL program (pg_basebackup, pg_verifybackup, postgres, psql) failed or could not be run.
    ToolFailed = 10,
    /// A signal stopped the command; what it wrote was removed.
    Interrupted = 11,
    /// A bug: walship panicked or reported [`Error::Internal`]. Distinct from every failure it knows,
    /// and never "absent".
    Internal = 12,
    /// wal-verify, base-verify: the check ran and found problems (gaps, a stale archive, damaged
    /// objects, a failed restore test); distinct from every code that means "could not check".
    ProblemsFound = 13,
    /// No configured key opens an object, or the repository's encryption and the configuration
    /// disagree (see README, "Encryption").
    Encryption = 14,
}

/// Added to wal-fetch's failure codes during archive recovery: PostgreSQL treats an exit above 125 as
/// fatal and stops, where any lower code would read as "end of archive" and promote early.
pub const RESTORE_ABORT_OFFSET: u8 = 200;

impl ExitCode {
    /// The code wal-fetch exits with. On a standby every failure is 1: the standby keeps retrying (and
    /// streaming), which is what it should do. During point-in-time recovery only a file that is
    /// definitely absent is 1; every other failure aborts recovery rather than ending it early.
    pub fn for_restore(self, standby: bool) -> u8 {
        match self {
            ExitCode::Success => 0,
            _ if standby => 1,
            ExitCode::NotFound => 1,
            other => RESTORE_ABORT_OFFSET + other as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_codes_never_claim_absence_falsely() {
        let all = [
            ExitCode::Usage,
            ExitCode::Config,
            ExitCode::InvalidInput,
            ExitCode::Conflict,
            ExitCode::WrongRepository,
            ExitCode::Corrupt,
            ExitCode::Storage,
            ExitCode::LocalIo,
            ExitCode::ToolFailed,
            ExitCode::Interrupted,
            ExitCode::Internal,
            ExitCode::ProblemsFound,
            ExitCode::Encryption,
        ];
        for code in all {
            assert!((code as u8) < 126, "{code:?} must be retryable for the archiver");
            assert!(code.for_restore(false) > 125, "{code:?} must abort point-in-time recovery");
            assert_eq!(code.for_restore(true), 1, "{code:?} on a standby");
        }
        assert_eq!(ExitCode::NotFound.for_restore(false), 1);
        assert_eq!(ExitCode::Success.for_restore(false), 0);
        assert_eq!(ExitCode::Storage.for_restore(false), 208);
    }

    #[test]
    fn internal_errors_are_bugs_not_local_io() {
        assert_eq!(Error::Internal("a task panicked".into()).exit_code(), ExitCode::Internal);
        assert_eq!(ExitCode::Internal as u8, 12);
    }
}
