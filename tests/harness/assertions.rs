//! Checks shared by the integration tests: what every failure must look like (its exit code, nothing
//! on stdout, one line on stderr naming the file and the cause) and what must not be left behind.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use walship::codec::ContentDigest;

use crate::Output;

/// The shared check of every failure: the exit code, nothing on stdout, and exactly one line on
/// stderr that contains every needle (the file and the cause).
#[track_caller]
pub fn assert_error(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "exit code; output: {out:#?}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:#?}");
    assert_one_line(out);
    for needle in needles {
        assert!(out.stderr.contains(needle), "stderr should mention {needle:?}: {:?}", out.stderr);
    }
}

#[track_caller]
pub fn assert_one_line(out: &Output) {
    assert!(
        out.stderr.ends_with('\n') && out.stderr.matches('\n').count() == 1,
        "stderr must be exactly one line: {:?}",
        out.stderr
    );
}

#[track_caller]
pub fn assert_ok(out: &Output, what: &str) {
    assert_eq!(out.code, Some(0), "{what}: {out:#?}");
    assert_one_line(out);
}

/// Hidden temporary files (`.<name>...tmp`) directly in `dir`; none when `dir` does not exist.
pub fn temp_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
        .collect();
    names.sort();
    names
}

#[track_caller]
pub fn assert_no_temp_files(dir: &Path) {
    let left = temp_files(dir);
    assert!(left.is_empty(), "temporary files left in {dir:?}: {left:?}");
}

#[track_caller]
pub fn assert_absent(path: &Path) {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        other => panic!("{path:?} should not exist: {other:?}"),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ContentDigest::of(bytes).sha256_hex()
}

/// Every file below `root`, as paths relative to it, sorted; empty if `root` does not exist.
pub fn files_below(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(root) {
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}
