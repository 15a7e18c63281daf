//! What the files pg_basebackup writes about a backup say: `backup_label` (where and on which
//! timeline it starts), `backup_manifest` (where its WAL ends), `tablespace_map` (where each
//! tablespace lived); and the copy of `backup_manifest` a restore checks against while pg_control is
//! held back under another name.
//!
//! Both sides read these as streams or line by line: a manifest lists every file of the cluster and
//! grows with it.

use std::fs::File;
use std::io;
use std::path::Path;

use serde::Deserialize;

use crate::codec::ContentDigest;
use crate::error::Error;

/// Where a restore keeps `global/pg_control` until every other step has passed, so that the
/// directory cannot be started before then.
pub(super) const HELD_BACK_CONTROL: &str = "global/pg_control.walship-incomplete";

#[derive(Debug, Deserialize)]
struct ManifestTail {
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<WalRange>,
}

/// One entry of the manifest's `WAL-Ranges`: the WAL a restore of the backup needs, on one timeline.
#[derive(Debug, Deserialize)]
pub(super) struct WalRange {
    /// The timeline of the range.
    #[serde(rename = "Timeline")]
    pub(super) timeline: u32,
    /// Where the range ends: for the last one, where a restore of the backup becomes consistent.
    #[serde(rename = "End-LSN")]
    pub(super) end_lsn: String,
}

/// What base-verify compares with the catalog record: the manifest's version, its system identifier
/// (version 2 manifests, PostgreSQL 17 on, carry one) and every WAL range with its start.
#[derive(Debug, Deserialize)]
pub(crate) struct ManifestSummary {
    /// `PostgreSQL-Backup-Manifest-Version`.
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    pub(crate) version: u32,
    /// `System-Identifier` (version 2 on).
    #[serde(rename = "System-Identifier", default)]
    pub(crate) system_identifier: Option<u64>,
    /// `WAL-Ranges`, in the manifest's order.
    #[serde(rename = "WAL-Ranges")]
    pub(crate) wal_ranges: Vec<FullWalRange>,
}

/// One `WAL-Ranges` entry with both its ends.
#[derive(Debug, Deserialize)]
pub(crate) struct FullWalRange {
    /// The timeline of the range.
    #[serde(rename = "Timeline")]
    pub(crate) timeline: u32,
    /// Where the range starts.
    #[serde(rename = "Start-LSN")]
    pub(crate) start_lsn: String,
    /// Where it ends.
    #[serde(rename = "End-LSN")]
    pub(crate) end_lsn: String,
}

/// Reads a manifest's [`ManifestSummary`] as a stream: its file list is skipped, not kept.
pub(crate) fn manifest_summary(reader: impl io::Read) -> Result<ManifestSummary, String> {
    serde_json::from_reader(io::BufReader::new(reader)).map_err(|e| format!("not readable: {e}"))
}

/// The WAL ranges of a manifest, read without keeping its (possibly long) file list.
pub(super) fn manifest_wal_ranges(file: &mut File) -> Result<Vec<WalRange>, String> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let tail: ManifestTail =
        serde_json::from_reader(io::BufReader::new(&mut *file)).map_err(|e| format!("not readable: {e}"))?;
    Ok(tail.wal_ranges)
}

/// What base-push keeps of `backup_label`.
pub(super) struct Label {
    /// START WAL LOCATION's LSN.
    pub(super) start_lsn: String,
    /// START WAL LOCATION's file.
    pub(super) start_wal_file: String,
    /// START TIMELINE.
    pub(super) timeline: u32,
    /// "primary" or "standby".
    pub(super) backup_from: String,
}

/// Reads the fields of [`Label`] from `backup_label`'s text.
pub(super) fn parse_backup_label(text: &str) -> Result<Label, String> {
    let field = |key: &str| {
        text.lines().find_map(|line| line.strip_prefix(key)).map(str::trim).ok_or_else(|| format!("no {key} line"))
    };
    // "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)"
    let location = field("START WAL LOCATION:")?;
    let (start_lsn, file) = location.split_once(" (file ").ok_or("START WAL LOCATION has no file")?;
    let timeline = field("START TIMELINE:")?.parse().map_err(|_| "START TIMELINE is not a number".to_owned())?;
    Ok(Label {
        start_lsn: start_lsn.trim().to_owned(),
        start_wal_file: file.trim_end_matches(')').to_owned(),
        timeline,
        backup_from: field("BACKUP FROM:").unwrap_or("primary").to_owned(),
    })
}

/// `tablespace_map` lines: `OID LOCATION`, the location escaped by PostgreSQL (`\\` for a backslash,
/// `\` before a newline).
pub(super) fn parse_tablespace_map(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|line| {
            let (oid, location) = line.split_once(' ')?;
            Some((oid.parse().ok()?, location.replace("\\\\", "\\")))
        })
        .collect()
}

/// Writes a copy of the backup manifest `from` to `to` that names the held-back pg_control, so
/// that pg_verifybackup checks pg_control's size and checksum before it is put into place.
pub(super) fn write_held_back_manifest(from: &Path, to: &Path) -> Result<(), Error> {
    let input = File::open(from).map_err(|e| Error::local_io(from, "open", e))?;
    let output = File::create(to).map_err(|e| Error::local_io(to, "create", e))?;
    let mut output = io::BufWriter::new(output);
    match manifest_with_held_back_control(io::BufReader::new(input), &mut output) {
        Ok(()) => io::Write::flush(&mut output).map_err(|e| Error::local_io(to, "write", e)),
        Err(ManifestError::Io(e)) => Err(Error::local_io(to, "copy the manifest", e)),
        Err(ManifestError::Unexpected(reason)) => Err(Error::Corrupt { location: from.display().to_string(), reason }),
    }
}

enum ManifestError {
    Io(io::Error),
    Unexpected(String),
}

/// Copies a backup manifest line by line (manifests grow with the number of files), renaming its
/// `global/pg_control` entry to the held-back file and recomputing its own checksum: PostgreSQL's is
/// the SHA-256 of every line but the last, which is `"Manifest-Checksum": "<hex>"}`.
fn manifest_with_held_back_control(
    mut input: impl io::BufRead,
    output: &mut impl io::Write,
) -> Result<(), ManifestError> {
    use sha2::Digest;
    let entry = b"\"Path\": \"global/pg_control\",";
    let renamed = format!("\"Path\": \"{HELD_BACK_CONTROL}\",");
    let (mut hasher, mut entries) = (sha2::Sha256::new(), 0);
    let (mut line, mut pending) = (Vec::new(), Vec::new());
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).map_err(ManifestError::Io)? == 0 {
            break;
        }
        // Every line but the last goes out (and into the checksum) once the next one is read.
        hasher.update(&pending);
        output.write_all(&pending).map_err(ManifestError::Io)?;
        pending.clear();
        match line.windows(entry.len()).position(|w| w == entry) {
            Some(at) => {
                entries += 1;
                pending.extend_from_slice(&line[..at]);
                pending.extend_from_slice(renamed.as_bytes());
                pending.extend_from_slice(&line[at + entry.len()..]);
            }
            None => pending.extend_from_slice(&line),
        }
    }
    if entries != 1 {
        return Err(ManifestError::Unexpected(format!("backup_manifest has {entries} entries for global/pg_control")));
    }
    if !pending.starts_with(b"\"Manifest-Checksum\"") {
        return Err(ManifestError::Unexpected("backup_manifest does not end with its Manifest-Checksum line".into()));
    }
    let checksum = ContentDigest { len: 0, sha256: hasher.finalize().into() }.sha256_hex();
    writeln!(output, "\"Manifest-Checksum\": \"{checksum}\"}}").map_err(ManifestError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest in PostgreSQL's layout, up to its checksum line.
    const MANIFEST: &str = concat!(
        "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n",
        "\"Files\": [\n",
        "{ \"Path\": \"global/pg_control\", \"Size\": 8192, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"43872087\" }\n",
        "],\n",
    );

    #[test]
    fn the_adjusted_manifest_names_the_held_back_file_and_checks_out() {
        let adjust = |text: &str| {
            let mut out = Vec::new();
            manifest_with_held_back_control(text.as_bytes(), &mut out).map(|()| String::from_utf8(out).unwrap())
        };
        let original =
            format!("{MANIFEST}\"Manifest-Checksum\": \"{}\"}}\n", ContentDigest::of(MANIFEST.as_bytes()).sha256_hex());
        let adjusted = adjust(&original).ok().unwrap();
        let body = MANIFEST.replace("global/pg_control", HELD_BACK_CONTROL);
        assert!(adjusted.starts_with(&body), "{adjusted}");
        let checksum = ContentDigest::of(body.as_bytes()).sha256_hex();
        assert_eq!(&adjusted[body.len()..], format!("\"Manifest-Checksum\": \"{checksum}\"}}\n"));
        assert!(adjust(MANIFEST).is_err(), "no checksum line");
        let twice = format!("{MANIFEST}{MANIFEST}\"Manifest-Checksum\": \"00\"}}\n");
        assert!(adjust(&twice).is_err(), "two entries");
    }

    #[test]
    fn tablespace_maps_parse_with_escapes() {
        let map = parse_tablespace_map("16384 /srv/ts one\n16390 /srv/back\\\\slash\n");
        assert_eq!(map, [(16384, "/srv/ts one".to_owned()), (16390, "/srv/back\\slash".to_owned())]);
    }

    #[test]
    fn backup_labels_parse() {
        let label = parse_backup_label(
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n\
             BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-22 08:00:00 UTC\n\
             LABEL: walship\nSTART TIMELINE: 1\n",
        )
        .unwrap();
        assert_eq!(label.start_lsn, "0/2000028");
        assert_eq!(label.start_wal_file, "000000010000000000000002");
        assert_eq!(label.timeline, 1);
        assert_eq!(label.backup_from, "primary");
    }
}
