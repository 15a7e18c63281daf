//! One line per operation on stderr, which under archive_command and restore_command lands in the
//! PostgreSQL server log. Lines start with the program name so they can be found there. Nothing that
//! reaches this module may contain a secret.

use std::fmt::Display;

#[derive(Debug, Clone)]
pub struct Log {
    program: &'static str,
    verbose: bool,
    quiet: bool,
}

impl Log {
    pub fn new(program: &'static str, verbose: bool) -> Self {
        Log { program, verbose, quiet: false }
    }

    /// A log that prints nothing, for tests.
    pub fn quiet() -> Self {
        Log { program: "walship", verbose: false, quiet: true }
    }

    pub fn info(&self, message: impl Display) {
        if !self.quiet {
            eprintln!("{}: {message}", self.program);
        }
    }

    /// Printed with `-v` only.
    pub fn debug(&self, message: impl Display) {
        if self.verbose && !self.quiet {
            eprintln!("{}: {message}", self.program);
        }
    }
}
