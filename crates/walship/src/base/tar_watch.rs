//! Watching pg_basebackup's tar stream as it passes, without holding it.
//!
//! base-push stores the stream byte for byte; what it needs to know about the backup is inside the
//! stream: `backup_label` (start LSN, time, timeline), `PG_VERSION`, the first WAL segment's page
//! header (system identifier, segment size) and, last, `backup_manifest` (the end LSN). The watcher
//! frames the tar stream by its 512-byte headers and keeps only those members; the manifest, which
//! grows with the number of files, is spooled to an anonymous temporary file rather than memory.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

const BLOCK: usize = 512;
/// backup_label and PG_VERSION are a few hundred bytes; anything larger is not what we expect.
const MAX_SMALL_MEMBER: u64 = 64 * 1024;

/// What the watcher found in a complete stream.
#[derive(Debug)]
pub struct Observed {
    /// The text of `backup_label`.
    pub backup_label: String,
    /// The text of `PG_VERSION`, trimmed.
    pub pg_version: String,
    /// The start of the first WAL segment in `pg_wal/`, up to a long page header.
    pub first_wal_header: Vec<u8>,
    /// That segment's file name.
    pub first_wal_name: String,
    /// The spooled `backup_manifest`, rewound, and its length. Streamed to stdout, pg_basebackup
    /// puts it at the end of the archive; into a directory, it writes it as a file of its own.
    pub manifest: Option<(File, u64)>,
    /// `tablespace_map`: one line `OID LOCATION` per extra tablespace.
    pub tablespace_map: Option<String>,
    /// Members in the archive, for the log.
    pub members: u64,
}

enum State {
    /// Collecting the next header block.
    Header { block: Vec<u8> },
    /// Inside a member's data, then its padding to the next block.
    Body { remaining: u64, padding: u64, capture: Capture },
    /// After the two zero blocks that end an archive.
    Ended,
}

enum Capture {
    Skip,
    Label,
    Version,
    WalHeader,
    Manifest,
    TablespaceMap,
}

/// Follows a tar stream fed to it in chunks of any size, keeping only the members [`Observed`] needs.
pub struct TarWatcher {
    state: State,
    zero_blocks: u32,
    backup_label: Option<Vec<u8>>,
    pg_version: Option<Vec<u8>>,
    first_wal: Option<(String, Vec<u8>)>,
    manifest: Option<(File, u64)>,
    tablespace_map: Option<Vec<u8>>,
    members: u64,
    wal_header_len: usize,
}

impl TarWatcher {
    /// `wal_header_len`: how many bytes of the first WAL segment to keep.
    pub fn new(wal_header_len: usize) -> Self {
        TarWatcher {
            state: State::Header { block: Vec::with_capacity(BLOCK) },
            zero_blocks: 0,
            backup_label: None,
            pg_version: None,
            first_wal: None,
            manifest: None,
            tablespace_map: None,
            members: 0,
            wal_header_len,
        }
    }

    /// Follows `bytes`, the next piece of the stream. An error means the stream is not the tar
    /// archive pg_basebackup writes.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Ended => {
                    // GNU tar pads archives to a record size with more zeros; anything else is not ours.
                    if bytes.iter().any(|&b| b != 0) {
                        return Err("data after the end of the tar archive".into());
                    }
                    return Ok(());
                }
                State::Header { block } => {
                    let take = (BLOCK - block.len()).min(bytes.len());
                    block.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if block.len() == BLOCK {
                        let block = std::mem::take(block);
                        self.state = self.begin_member(&block)?;
                    }
                }
                State::Body { remaining, padding, capture } => {
                    if *remaining > 0 {
                        let take = (*remaining).min(bytes.len() as u64) as usize;
                        let data = &bytes[..take];
                        match capture {
                            Capture::Skip => {}
                            Capture::Label => self.backup_label.get_or_insert_with(Vec::new).extend_from_slice(data),
                            Capture::Version => self.pg_version.get_or_insert_with(Vec::new).extend_from_slice(data),
                            Capture::TablespaceMap => {
                                self.tablespace_map.get_or_insert_with(Vec::new).extend_from_slice(data)
                            }
                            Capture::WalHeader => {
                                let (_, header) = self.first_wal.as_mut().expect("set when the member began");
                                let want = self.wal_header_len.saturating_sub(header.len()).min(data.len());
                                header.extend_from_slice(&data[..want]);
                            }
                            Capture::Manifest => {
                                let (file, len) = self.manifest.as_mut().expect("set when the member began");
                                file.write_all(data).map_err(|e| format!("spooling backup_manifest: {e}"))?;
                                *len += data.len() as u64;
                            }
                        }
                        *remaining -= take as u64;
                        bytes = &bytes[take..];
                    } else if *padding > 0 {
                        let take = (*padding).min(bytes.len() as u64);
                        *padding -= take;
                        bytes = &bytes[take as usize..];
                    }
                    if let State::Body { remaining: 0, padding: 0, .. } = self.state {
                        self.state = State::Header { block: Vec::with_capacity(BLOCK) };
                    }
                }
            }
        }
        Ok(())
    }

    fn begin_member(&mut self, block: &[u8]) -> Result<State, String> {
        if block.iter().all(|&b| b == 0) {
            self.zero_blocks += 1;
            return Ok(if self.zero_blocks == 2 { State::Ended } else { State::Header { block: Vec::new() } });
        }
        if self.zero_blocks > 0 {
            return Err("a member follows an end-of-archive block".into());
        }
        let header = tar::Header::from_byte_slice(block);
        let stored_sum: u32 = header.cksum().map_err(|e| format!("bad tar header: {e}"))?;
        let actual_sum: u32 =
            block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u32::from(b) }).sum();
        if stored_sum != actual_sum {
            return Err(format!("tar header checksum mismatch after {} members: not a tar stream", self.members));
        }
        let size = header.entry_size().map_err(|e| format!("bad tar header: {e}"))?;
        let path = header.path().map_err(|e| format!("bad tar member name: {e}"))?;
        let path = path.to_string_lossy().trim_start_matches("./").to_owned();
        self.members += 1;
        let regular = header.entry_type().is_file();
        let small = |what: &str| {
            if size > MAX_SMALL_MEMBER {
                Err(format!("{what} is {size} bytes, far larger than expected"))
            } else {
                Ok(())
            }
        };
        let capture = match path.as_str() {
            "backup_label" if regular => {
                small("backup_label")?;
                Capture::Label
            }
            "PG_VERSION" if regular => {
                small("PG_VERSION")?;
                Capture::Version
            }
            "tablespace_map" if regular => {
                small("tablespace_map")?;
                self.tablespace_map = Some(Vec::new());
                Capture::TablespaceMap
            }
            "backup_manifest" if regular => {
                let file =
                    tempfile::tempfile().map_err(|e| format!("creating a temporary file for backup_manifest: {e}"))?;
                self.manifest = Some((file, 0));
                Capture::Manifest
            }
            name if regular && self.first_wal.is_none() && is_wal_segment_path(name) => {
                let file_name = name.rsplit('/').next().unwrap_or(name).to_owned();
                self.first_wal = Some((file_name, Vec::with_capacity(self.wal_header_len)));
                Capture::WalHeader
            }
            _ => Capture::Skip,
        };
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        if size == 0 {
            return Ok(State::Header { block: Vec::with_capacity(BLOCK) });
        }
        Ok(State::Body { remaining: size, padding, capture })
    }

    /// Ends the stream of a tablespace's archive: checks only that it was a complete tar archive.
    pub fn finish_archive(self) -> Result<(), String> {
        match self.state {
            State::Ended => Ok(()),
            _ => Err(format!("the tar stream ended early, after {} members (no end-of-archive marker)", self.members)),
        }
    }

    /// Ends the stream: checks it was a complete archive with everything a backup must hold.
    pub fn finish(self) -> Result<Observed, String> {
        if !matches!(self.state, State::Ended) {
            return Err(format!(
                "the tar stream ended early, after {} members (no end-of-archive marker)",
                self.members
            ));
        }
        let text = |bytes: Option<Vec<u8>>, what: &str| {
            let bytes = bytes.ok_or_else(|| format!("the backup has no {what}"))?;
            String::from_utf8(bytes).map_err(|_| format!("{what} is not text"))
        };
        let backup_label = text(self.backup_label, "backup_label")?;
        let pg_version = text(self.pg_version, "PG_VERSION")?.trim().to_owned();
        let (first_wal_name, first_wal_header) =
            self.first_wal.ok_or("the backup holds no WAL in pg_wal/ (pg_basebackup must run with -X fetch)")?;
        let mut manifest = self.manifest;
        if let Some((file, _)) = manifest.as_mut() {
            file.seek(SeekFrom::Start(0)).map_err(|e| format!("rewinding the spooled backup_manifest: {e}"))?;
        }
        let tablespace_map = match self.tablespace_map {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|_| "tablespace_map is not UTF-8 text".to_owned())?),
            None => None,
        };
        Ok(Observed {
            backup_label,
            pg_version,
            first_wal_header,
            first_wal_name,
            manifest,
            tablespace_map,
            members: self.members,
        })
    }
}

fn is_wal_segment_path(path: &str) -> bool {
    path.strip_prefix("pg_wal/").is_some_and(|name| name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn archive(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn sample() -> Vec<u8> {
        archive(&[
            ("backup_label", b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".to_vec()),
            ("PG_VERSION", b"15\n".to_vec()),
            ("base/1/1259", vec![7u8; 9000]),
            ("pg_wal/000000010000000000000002", vec![1u8; 4096]),
            ("pg_wal/000000010000000000000003", vec![2u8; 4096]),
            ("backup_manifest", b"{\"PostgreSQL-Backup-Manifest-Version\": 1}\n".to_vec()),
        ])
    }

    #[test]
    fn finds_the_members_a_backup_needs_in_any_chunking() {
        let stream = sample();
        for chunk in [1, 7, 511, 512, 513, 4096, stream.len()] {
            let mut watcher = TarWatcher::new(40);
            for piece in stream.chunks(chunk) {
                watcher.feed(piece).unwrap();
            }
            let mut observed = watcher.finish().unwrap();
            assert!(observed.backup_label.starts_with("START WAL LOCATION: 0/2000028"));
            assert_eq!(observed.pg_version, "15");
            assert_eq!(observed.first_wal_name, "000000010000000000000002");
            assert_eq!(observed.first_wal_header, vec![1u8; 40]);
            assert_eq!(observed.members, 6);
            let mut manifest = String::new();
            let (file, len) = observed.manifest.as_mut().unwrap();
            file.read_to_string(&mut manifest).unwrap();
            assert_eq!(*len, manifest.len() as u64);
            assert!(manifest.contains("Manifest-Version"));
        }
    }

    #[test]
    fn a_cut_or_foreign_stream_is_refused() {
        let stream = sample();
        let mut watcher = TarWatcher::new(40);
        watcher.feed(&stream[..stream.len() - 1024]).unwrap();
        assert!(watcher.finish().unwrap_err().contains("ended early"));

        let mut watcher = TarWatcher::new(40);
        let err = watcher.feed(&[b'x'; 600]).unwrap_err();
        assert!(err.contains("not a tar stream") || err.contains("bad tar header"), "{err}");

        let without_wal = archive(&[("backup_label", b"START".to_vec()), ("PG_VERSION", b"15\n".to_vec())]);
        let mut watcher = TarWatcher::new(40);
        watcher.feed(&without_wal).unwrap();
        assert!(watcher.finish().unwrap_err().contains("no WAL"));
    }
}
