//! Finding and asking PostgreSQL's programs: base-push runs pg_basebackup and base-fetch
//! pg_verifybackup, and both look for them the same way (`pg_bin_dir`, PATH, the packages' own
//! directories), so that a program found by one is found by the other.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::Error;

/// Where to find a PostgreSQL program: in `pg_bin_dir` when configured; else on PATH; else, for a
/// known major version, where Debian/Ubuntu (`/usr/lib/postgresql/V/bin`) and the PGDG RPMs
/// (`/usr/pgsql-V/bin`) install it, since their PATH carries only some programs. `None`: not found.
pub(crate) fn find_tool(pg_bin_dir: Option<&Path>, tool: &str, pg_version: Option<u32>) -> Option<PathBuf> {
    candidates(pg_bin_dir, tool, pg_version).next()
}

/// Every executable `tool` in [`find_tool`]'s places, in its order, each file once.
fn candidates(pg_bin_dir: Option<&Path>, tool: &str, pg_version: Option<u32>) -> impl Iterator<Item = PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &PathBuf| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if let Some(dir) = pg_bin_dir {
        return vec![dir.join(tool)].into_iter().filter(executable);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(tool)).collect::<Vec<_>>())
        .unwrap_or_default();
    let packaged = pg_version
        .map(|v| {
            vec![
                PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{tool}")),
                PathBuf::from(format!("/usr/pgsql-{v}/bin/{tool}")),
            ]
        })
        .unwrap_or_default();
    let mut all: Vec<PathBuf> = on_path.into_iter().chain(packaged).collect();
    let mut seen = std::collections::HashSet::new();
    all.retain(|p| seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())));
    all.into_iter().filter(executable)
}

/// The PostgreSQL program `tool` of major version `pg_version`: in `pg_bin_dir` when configured,
/// else the first one in [`find_tool`]'s places whose `--version` says that major version. A backup
/// must be checked (pg_verifybackup) and started (postgres) by the programs of its own version:
/// PostgreSQL 18's pg_verifybackup calls a version 17 backup's pg_control corrupt. `Ok(None)`: no
/// such program anywhere; an error, naming what was found, when there are only programs of other
/// versions, so that a wrong version is never taken for damage.
pub(crate) fn find_tool_of_version(
    pg_bin_dir: Option<&Path>,
    tool: &str,
    pg_version: u32,
) -> Result<Option<PathBuf>, Error> {
    let mut others = Vec::new();
    for candidate in candidates(pg_bin_dir, tool, Some(pg_version)) {
        let Ok(version) = tool_version(&candidate) else { continue };
        if major_version(&version) == Some(pg_version) {
            return Ok(Some(candidate));
        }
        others.push(format!("{} is {version}", candidate.display()));
    }
    if others.is_empty() {
        return Ok(None);
    }
    Err(Error::ToolFailed {
        tool: tool.to_owned(),
        reason: format!(
            "the backup is PostgreSQL {pg_version}, but {}; install PostgreSQL {pg_version}'s programs or set \
             pg_bin_dir to their directory",
            others.join(", ")
        ),
    })
}

/// The major version in a `--version` line: `pg_verifybackup (PostgreSQL) 17.2 (Debian 17.2-1)`
/// and `postgres (PostgreSQL) 18beta1` say 17 and 18.
pub(crate) fn major_version(version_line: &str) -> Option<u32> {
    let number = version_line.split(") ").nth(1)?.split_whitespace().next()?;
    let digits: String = number.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// [`find_tool`] on `pg_bin_dir` or PATH, or a [`Error::ToolFailed`] that says where it looked.
pub(super) fn required_tool(pg_bin_dir: Option<&Path>, tool: &str) -> Result<PathBuf, Error> {
    find_tool(pg_bin_dir, tool, None).ok_or_else(|| Error::ToolFailed {
        tool: tool.to_owned(),
        reason: match pg_bin_dir {
            Some(dir) => format!("not found in pg_bin_dir {}", dir.display()),
            None => "not found on PATH (install PostgreSQL's client programs, or set pg_bin_dir in the configuration)"
                .into(),
        },
    })
}

/// The error for a program that could not be started.
pub(super) fn tool_error(tool: &Path, e: std::io::Error) -> Error {
    let reason = if e.kind() == std::io::ErrorKind::NotFound {
        "not found (install PostgreSQL's client programs, or set pg_bin_dir in the configuration)".to_owned()
    } else {
        format!("cannot run: {e}")
    };
    Error::ToolFailed { tool: tool.display().to_string(), reason }
}

/// What `tool --version` prints, for the catalog record.
pub(crate) fn tool_version(tool: &Path) -> Result<String, Error> {
    let output = Command::new(tool).arg("--version").stdin(Stdio::null()).output().map_err(|e| tool_error(tool, e))?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || text.is_empty() {
        return Err(Error::ToolFailed {
            tool: tool.display().to_string(),
            reason: format!("--version failed ({})", output.status),
        });
    }
    Ok(text)
}

/// What a PostgreSQL program said, on one line: its non-empty lines, trimmed, joined with "; ".
pub(super) fn said_on_one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Longest a program's error may be in walship's one-line message, before it is cut.
const MAX_SAID_LEN: usize = 600;

/// [`said_on_one_line`] for an error message: cut after [`MAX_SAID_LEN`] bytes (at a character
/// boundary, as a localized message may need) with "..." after, enough for the cause.
pub(super) fn error_on_one_line(text: &str) -> String {
    let mut said = said_on_one_line(text);
    if said.len() > MAX_SAID_LEN {
        let cut = (0..=MAX_SAID_LEN).rev().find(|&i| said.is_char_boundary(i)).unwrap_or(0);
        said.truncate(cut);
        said.push_str("...");
    }
    said
}

/// The oldest pg_basebackup whose tar archive on standard output is whole: 13's and 14's append
/// `backup_manifest` without padding it to a 512-byte block (fixed in 15), so the stream ends in a
/// torn block that no tar reader accepts. 15 and later also back up 13 and 14 servers.
pub(crate) const MIN_PG_BASEBACKUP_VERSION: u32 = 15;

/// Refuses, before anything is run or written, a pg_basebackup that [`MIN_PG_BASEBACKUP_VERSION`]
/// rules out. A version line that says no major version is let through: the stream is checked anyway.
pub(crate) fn check_tar_to_stdout(tool: &Path, version: &str) -> Result<(), Error> {
    match major_version(version) {
        Some(major) if major < MIN_PG_BASEBACKUP_VERSION => Err(Error::ToolFailed {
            tool: tool.display().to_string(),
            reason: format!(
                "{version} writes a broken tar archive to standard output (its backup_manifest is not padded to a \
                 512-byte block; fixed in PostgreSQL {MIN_PG_BASEBACKUP_VERSION}): use the pg_basebackup of \
                 PostgreSQL {MIN_PG_BASEBACKUP_VERSION} or later, which backs up {major} servers too (set pg_bin_dir, \
                 or put it first on PATH)"
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_basebackup_before_15_is_refused_by_its_version() {
        let tool = Path::new("/usr/lib/postgresql/14/bin/pg_basebackup");
        let error = check_tar_to_stdout(tool, "pg_basebackup (PostgreSQL) 14.23").unwrap_err().to_string();
        assert!(error.contains("14.23 writes a broken tar archive") && error.contains("15 or later"), "{error}");
        check_tar_to_stdout(tool, "pg_basebackup (PostgreSQL) 15.18").unwrap();
        check_tar_to_stdout(tool, "pg_basebackup (PostgreSQL) 18.6").unwrap();
        check_tar_to_stdout(tool, "a wrapper of some kind").unwrap();
    }

    #[test]
    fn a_programs_error_is_one_bounded_line() {
        assert_eq!(said_on_one_line("  first\n\n second  \n"), "first; second");
        let long = format!("{}é{}", "x".repeat(MAX_SAID_LEN - 1), "y".repeat(100));
        let cut = error_on_one_line(&long);
        assert_eq!(cut, format!("{}...", "x".repeat(MAX_SAID_LEN - 1)), "cut before the character it would split");
        assert_eq!(error_on_one_line("short"), "short");
    }

    #[test]
    fn the_major_version_is_read_from_the_version_line() {
        assert_eq!(major_version("pg_verifybackup (PostgreSQL) 17.2 (Debian 17.2-1.pgdg120+1)"), Some(17));
        assert_eq!(major_version("postgres (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(major_version("psql (PostgreSQL) 15.10"), Some(15));
        assert_eq!(major_version("something else"), None);
    }

    fn fake(dir: &Path, tool: &str, version: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\necho '{tool} (PostgreSQL) {version}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn only_the_backups_own_version_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "pg_verifybackup", "18.6");
        let error = find_tool_of_version(Some(dir.path()), "pg_verifybackup", 17).unwrap_err();
        assert_eq!(error.exit_code(), crate::ExitCode::ToolFailed);
        let text = error.to_string();
        assert!(text.contains("the backup is PostgreSQL 17") && text.contains("(PostgreSQL) 18.6"), "{text}");
        fake(dir.path(), "pg_verifybackup", "17.10");
        let found = find_tool_of_version(Some(dir.path()), "pg_verifybackup", 17).unwrap();
        assert_eq!(found, Some(dir.path().join("pg_verifybackup")));
        assert_eq!(find_tool_of_version(Some(dir.path()), "pg_combinebackup", 17).unwrap(), None, "not installed");
    }
}
