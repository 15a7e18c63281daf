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
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if let Some(dir) = pg_bin_dir {
        return Some(dir.join(tool)).filter(|p| executable(p));
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
    on_path.into_iter().chain(packaged).find(|p| executable(p))
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
