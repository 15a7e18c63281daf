//! One line per operation on stderr, which under archive_command and restore_command lands in the
//! PostgreSQL server log. Lines start with the program name so they can be found there. Nothing that
//! reaches this module may contain a secret.
//!
//! A line that cannot be written (the log's disk is full, stderr is a closed pipe or `/dev/full`)
//! is dropped: `eprintln!` would panic instead, and a panicking wal-fetch used to exit 101, which
//! PostgreSQL reads as "file not in the archive" and ends a recovery early.

use std::fmt::Display;
use std::io::Write;

/// Where a command's lines go: stderr, prefixed with the program's name.
#[derive(Debug, Clone)]
pub struct Log {
    program: &'static str,
    verbose: bool,
    quiet: bool,
}

impl Log {
    /// A log for `program`; `verbose` adds the `-v` lines.
    pub fn new(program: &'static str, verbose: bool) -> Self {
        Log { program, verbose, quiet: false }
    }

    /// A log that prints nothing, for tests.
    pub fn quiet() -> Self {
        Log { program: "walship", verbose: false, quiet: true }
    }

    /// A line always printed: what was done, or why it failed.
    pub fn info(&self, message: impl Display) {
        if !self.quiet {
            line(self.program, message);
        }
    }

    /// Printed with `-v` only.
    pub fn debug(&self, message: impl Display) {
        if self.verbose && !self.quiet {
            line(self.program, message);
        }
    }
}

/// Writes `program: message` to stderr as one write, ignoring failure (see the module comment).
pub fn line(program: &str, message: impl Display) {
    let text = format!("{program}: {message}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
