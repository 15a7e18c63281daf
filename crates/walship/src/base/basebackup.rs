//! Running pg_basebackup: the arguments base-push gives it (and the ones it refuses from the user),
//! the process with its stderr followed, the reasons it failed, and the arguments as the catalog
//! records them (passwords redacted).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::tools::tool_error;
use crate::error::Error;
use crate::log::Log;

/// Lines of pg_basebackup's stderr kept for the error message.
const STDERR_LINES: usize = 8;

/// pg_basebackup options that would change what base-push reads from it or relies on.
const RESERVED_OPTIONS: &[(&str, &str)] = &[
    ("-D", "--pgdata"),
    ("-F", "--format"),
    ("-X", "--wal-method"),
    ("-z", "--gzip"),
    ("-Z", "--compress"),
    ("-R", "--write-recovery-conf"),
    ("-T", "--tablespace-mapping"),
    ("-l", "--label"),
    ("-t", "--target"),
    ("-P", "--progress"),
    ("", "--no-manifest"),
    ("", "--waldir"),
    ("", "--incremental"),
];

/// Refuses pg_basebackup options that would break the stream base-push expects.
pub(super) fn check_extra_args(args: &[String]) -> Result<(), Error> {
    for arg in args {
        for (short, long) in RESERVED_OPTIONS {
            let hit = (!short.is_empty() && arg.starts_with(short) && !arg.starts_with("--"))
                || arg == long
                || arg.starts_with(&format!("{long}="));
            if hit {
                return Err(Error::Usage(format!(
                    "pg_basebackup option {arg:?} is set by base-push itself (it runs -D - -Ft -X fetch and \
                     stores the stream); leave it out"
                )));
            }
        }
    }
    Ok(())
}

/// pg_basebackup says this when a cluster has extra tablespaces and the output is stdout.
pub(super) const SINGLE_TABLESPACE_ONLY: &str = "can only write single tablespace to stdout";

/// The arguments pg_basebackup runs with: a tar stream into `target` (`-` for stdout), incremental
/// on top of the backup whose manifest is `incremental`, then the user's `extra` ones.
pub(super) fn basebackup_arguments(
    target: &str,
    name: &str,
    extra: &[String],
    incremental: Option<&Path>,
) -> Vec<String> {
    let mut arguments: Vec<String> =
        ["-D", target, "-F", "t", "-X", "fetch", "-l"].iter().map(|s| (*s).to_owned()).collect();
    arguments.push(format!("walship {name}"));
    if let Some(manifest) = incremental {
        arguments.push(format!("--incremental={}", manifest.display()));
    }
    arguments.extend(extra.iter().cloned());
    arguments
}

/// The last lines pg_basebackup wrote to stderr.
type StderrTail = Arc<Mutex<VecDeque<String>>>;

/// A pg_basebackup process, with its stderr followed by a thread that keeps the last lines (for the
/// error message) and logs them with -v.
pub(super) struct Running {
    /// The process; its stdout is what [`Running::spawn`] was given.
    pub(super) child: Child,
    program: PathBuf,
    stderr_tail: StderrTail,
    stderr_thread: JoinHandle<()>,
}

impl Running {
    /// Starts `pg_basebackup` with `arguments`, its stdout going to `stdout`.
    pub(super) fn spawn(pg_basebackup: &Path, arguments: &[String], stdout: Stdio, log: &Log) -> Result<Self, Error> {
        let mut child = Command::new(pg_basebackup)
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| tool_error(pg_basebackup, e))?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("piped");
        let tail = Arc::clone(&stderr_tail);
        let log = log.clone();
        let stderr_thread = std::thread::spawn(move || collect_stderr(stderr, &tail, &log));
        Ok(Running { child, program: pg_basebackup.to_owned(), stderr_tail, stderr_thread })
    }

    /// Once the process has ended with `status`: reads its stderr to the end and, if it failed,
    /// returns the error that quotes its last lines.
    pub(super) fn check(self, status: ExitStatus) -> Result<(), Error> {
        let _ = self.stderr_thread.join();
        if status.success() { Ok(()) } else { Err(tool_failure(&self.program, status, &self.stderr_tail)) }
    }
}

fn collect_stderr(stderr: std::process::ChildStderr, tail: &Mutex<VecDeque<String>>, log: &Log) {
    use std::io::BufRead;
    for line in std::io::BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let line = line.trim().to_owned();
        if line.is_empty() {
            continue;
        }
        log.debug(format_args!("{line}"));
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == STDERR_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

fn tool_failure(pg_basebackup: &Path, status: ExitStatus, tail: &Mutex<VecDeque<String>>) -> Error {
    let tail: Vec<String> = tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
    let said = if tail.is_empty() { "no message".to_owned() } else { tail.join("; ") };
    Error::ToolFailed { tool: pg_basebackup.display().to_string(), reason: format!("{status}: {said}") }
}

/// The error for an output that is not the backup base-push expects.
pub(super) fn tool_failure_reason(pg_basebackup: &Path, reason: &str) -> Error {
    Error::ToolFailed {
        tool: pg_basebackup.display().to_string(),
        reason: format!("its output is not a complete base backup: {reason}"),
    }
}

/// Connection strings may carry a password; the catalog record must not.
pub(super) fn redact(arguments: &[String]) -> Vec<String> {
    arguments
        .iter()
        .map(|arg| match arg.find("password=") {
            Some(at) => {
                let value_start = at + "password=".len();
                let value_end = arg[value_start..].find(' ').map_or(arg.len(), |end| value_start + end);
                format!("{}***{}", &arg[..value_start], &arg[value_end..])
            }
            None => arg.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_options_are_refused_and_others_pass() {
        for bad in ["-D", "-Dfoo", "--pgdata=/x", "-Ft", "--format=p", "-Xstream", "-z", "-Z9", "--no-manifest", "-R"] {
            assert!(check_extra_args(&[bad.to_owned()]).is_err(), "{bad}");
        }
        for good in ["--checkpoint=fast", "-c", "fast", "-h", "/tmp", "-U", "postgres", "--max-rate=10M", "-v"] {
            check_extra_args(&[good.to_owned()]).unwrap();
        }
    }

    #[test]
    fn passwords_do_not_reach_the_catalog() {
        let args = vec!["-d".to_owned(), "host=db password=s3cret user=x".to_owned(), "--dbname=password=p".to_owned()];
        assert_eq!(redact(&args), ["-d", "host=db password=*** user=x", "--dbname=password=***"]);
    }
}
