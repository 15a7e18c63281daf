//! Running base-push, base-fetch and base-list the way an operator does: as the server user, with
//! PostgreSQL's programs first on PATH and libpq pointed at a test cluster.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use crate::pg::{Cluster, clear_pg_env};
use crate::versions::PgInstall;
use crate::{Output, run, walship};

/// PATH for the binaries: PostgreSQL's programs first, so that base-push and base-fetch find that
/// version's pg_basebackup and pg_verifybackup rather than whatever else is installed.
pub fn path_with_pg_bin() -> OsString {
    PgInstall::default_install().path()
}

/// A walship base-backup command (`base-push`, `base-fetch`, `base-list`) run as the server user
/// from `cwd`, on the repository `repo_args` selects, with no libpq settings of whoever runs the
/// tests.
pub fn base_command(program: &str, repo_args: &[OsString], cwd: &Path) -> Command {
    base_command_in(&PgInstall::default_install(), program, repo_args, cwd)
}

/// [`base_command`] with `install`'s programs first on PATH.
pub fn base_command_in(install: &PgInstall, program: &str, repo_args: &[OsString], cwd: &Path) -> Command {
    let mut cmd = walship(program);
    clear_pg_env(&mut cmd).env("PATH", install.path()).env("LC_ALL", "C").current_dir(cwd).args(repo_args);
    cmd
}

/// `base-push REPO -- --checkpoint=fast EXTRA` against `cluster`.
pub fn base_push_command(cluster: &Cluster, repo_args: &[OsString], cwd: &Path, extra: &[&str]) -> Command {
    let mut cmd = base_command_in(cluster.install(), "base-push", repo_args, cwd);
    cluster.libpq_env(&mut cmd).args(["--", "--checkpoint=fast"]).args(extra);
    cmd
}

/// Runs base-push and returns the name of the backup it took; panics with its output unless it
/// succeeded and printed exactly one well-formed name.
#[track_caller]
pub fn base_push(cluster: &Cluster, repo_args: &[OsString], cwd: &Path, extra: &[&str]) -> (String, Output) {
    let out = run(&mut base_push_command(cluster, repo_args, cwd, extra));
    assert_eq!(out.code, Some(0), "base-push failed: {out:#?}");
    let name = out.stdout.trim().to_owned();
    assert_eq!(out.stdout, format!("{name}\n"), "base-push prints the backup name and nothing else: {out:#?}");
    assert_backup_name(&name);
    assert!(!out.stderr.contains("error"), "base-push succeeded but logged an error: {}", out.stderr);
    (name, out)
}

#[track_caller]
pub fn assert_backup_name(name: &str) {
    let bytes = name.as_bytes();
    let well_formed = bytes.len() == 16
        && bytes[8] == b'T'
        && bytes[15] == b'Z'
        && bytes[..8].iter().chain(&bytes[9..15]).all(u8::is_ascii_digit);
    assert!(well_formed, "{name:?} is not a backup name (YYYYMMDDTHHMMSSZ)");
}

pub fn base_fetch(repo_args: &[OsString], cwd: &Path, name: &str, dir: &Path, extra: &[&str]) -> Output {
    run(base_command("base-fetch", repo_args, cwd).arg(name).arg(dir).args(extra))
}

/// Inverts 64 bytes in the middle of the stored object at `path` (a part damaged at rest, its size
/// unchanged); returns the original bytes, to put back.
pub fn damage_middle(path: &Path) -> Vec<u8> {
    let original = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut bytes = original.clone();
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..middle + 64] {
        *byte = !*byte;
    }
    std::fs::write(path, &bytes).unwrap();
    original
}

/// [`base_fetch`] with `install`'s programs first on PATH (its pg_verifybackup and pg_combinebackup).
pub fn base_fetch_in(
    install: &PgInstall,
    repo_args: &[OsString],
    cwd: &Path,
    name: &str,
    dir: &Path,
    extra: &[&str],
) -> Output {
    run(base_command_in(install, "base-fetch", repo_args, cwd).arg(name).arg(dir).args(extra))
}

/// base-list `--json` with `install`'s programs on PATH, parsed: one catalog record per backup.
#[track_caller]
pub fn listed_records_in(install: &PgInstall, repo_args: &[OsString], cwd: &Path) -> Vec<serde_json::Value> {
    let out = run(base_command_in(install, "base-list", repo_args, cwd).arg("--json"));
    assert_eq!(out.code, Some(0), "base-list --json failed: {out:#?}");
    let value: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("base-list --json: {e}: {:?}", out.stdout));
    value.as_array().unwrap_or_else(|| panic!("base-list --json prints an array: {value}")).clone()
}

/// The scratch directories of chain restores (`.walship-chain-*`) left in `dir`.
pub fn chain_scratch_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".walship-chain-"))
        .collect()
}
