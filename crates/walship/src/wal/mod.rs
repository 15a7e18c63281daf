//! What PostgreSQL hands to `archive_command` and asks of `restore_command`: file names, segment page
//! headers and timeline history files.
//!
//! Everything here is pure parsing, so a bad name or a file that is not WAL is refused before any byte
//! reaches a repository. PostgreSQL writes these structures in the server's native byte order; we read
//! them little-endian, so a big-endian server's segments are refused as "not WAL" rather than misread.

use std::fmt;

/// The four kinds of file PostgreSQL archives; nothing else is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFileKind {
    /// `000000010000000000000003`
    Segment,
    /// `000000010000000000000003.partial`: the last, incomplete segment of a timeline left by promotion.
    Partial,
    /// `00000002.history`
    History,
    /// `000000010000000000000003.00000028.backup`
    BackupLabel,
}

/// A validated WAL file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalFileName {
    name: String,
    kind: WalFileKind,
    timeline: u32,
    /// The high and low halves of the segment number in the name (`log`, `seg`); zero for history files.
    log: u32,
    seg: u32,
}

/// Why a name was refused; the message is meant for the operator as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid WAL file name: {0}")]
pub struct NameError(pub String);

impl WalFileName {
    /// Parses a name PostgreSQL hands to archive_command or restore_command; refuses anything else.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError("the name is empty".into()));
        }
        if name.contains('/') || name.contains('\\') || name.contains('\0') {
            return Err(NameError(format!(
                "{name:?} contains a path separator; expected a bare file name such as PostgreSQL's %f"
            )));
        }
        let (stem, kind) = if let Some(stem) = name.strip_suffix(".partial") {
            (stem, WalFileKind::Partial)
        } else if let Some(stem) = name.strip_suffix(".history") {
            (stem, WalFileKind::History)
        } else if let Some(stem) = name.strip_suffix(".backup") {
            (stem, WalFileKind::BackupLabel)
        } else {
            (name, WalFileKind::Segment)
        };
        let expected = match kind {
            WalFileKind::Segment | WalFileKind::Partial => 24,
            WalFileKind::History => 8,
            WalFileKind::BackupLabel => 24 + 1 + 8,
        };
        let well_formed = stem.len() == expected
            && stem.char_indices().all(|(i, c)| {
                if kind == WalFileKind::BackupLabel && i == 24 { c == '.' } else { matches!(c, '0'..='9' | 'A'..='F') }
            });
        if !well_formed {
            return Err(NameError(format!(
                "{name:?} is none of: a segment (24 upper-case hex digits), a .partial segment, \
                 a timeline .history file or a .backup label"
            )));
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).expect("checked hex digits");
        let timeline = hex(&stem[0..8]);
        let (log, seg) = match kind {
            WalFileKind::History => (0, 0),
            _ => (hex(&stem[8..16]), hex(&stem[16..24])),
        };
        if timeline == 0 {
            return Err(NameError(format!("{name:?} names timeline 0, which does not exist")));
        }
        Ok(WalFileName { name: name.to_owned(), kind, timeline, log, seg })
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// Segment, partial segment, backup history or timeline history.
    pub fn kind(&self) -> WalFileKind {
        self.kind
    }

    /// The timeline the name is on.
    pub fn timeline(&self) -> u32 {
        self.timeline
    }

    /// True for files whose content starts with a WAL page header (segments and `.partial` segments).
    pub fn is_segment_data(&self) -> bool {
        matches!(self.kind, WalFileKind::Segment | WalFileKind::Partial)
    }

    /// The timeline and log part of the name (its first 16 hex digits), or `None` for history files.
    pub fn timeline_and_log(&self) -> Option<&str> {
        match self.kind {
            WalFileKind::History => None,
            _ => Some(&self.name[..16]),
        }
    }

    /// The segment number the name denotes, given the cluster's segment size; `None` when the `seg`
    /// part is out of range for that size (such a name cannot come from that cluster).
    pub fn segment_number(&self, segment_size: u32) -> Option<u64> {
        let per_log = segments_per_log(segment_size);
        (u64::from(self.seg) < per_log).then(|| u64::from(self.log) * per_log + u64::from(self.seg))
    }
}

/// The file name of segment number `segment` on `timeline`, the inverse of
/// [`WalFileName::segment_number`]; `None` past the last segment a name can hold.
pub fn segment_file_name(timeline: u32, segment: u64, segment_size: u32) -> Option<String> {
    let per_log = segments_per_log(segment_size);
    let log = u32::try_from(segment / per_log).ok()?;
    Some(format!("{timeline:08X}{log:08X}{:08X}", segment % per_log))
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

fn segments_per_log(segment_size: u32) -> u64 {
    0x1_0000_0000 / u64::from(segment_size)
}

/// XLP_LONG_HEADER: set on the first page of every segment.
const XLP_LONG_HEADER: u16 = 0x0002;
/// XLP_ALL_FLAGS (PostgreSQL's `xlog_internal.h`): any other bit means the bytes are not a page
/// header. It includes 0x0008, XLP_FIRST_IS_OVERWRITE_CONTRECORD, which PostgreSQL sets on the page
/// after a record that a crash cut short; refusing that bit would stop archiving for good.
const XLP_ALL_FLAGS: u16 = 0x000F;

/// `XLOG_PAGE_MAGIC` of each supported major version. The magic changes whenever the WAL format does,
/// so it identifies the server version that wrote a segment.
const PAGE_MAGIC_BY_MAJOR: &[(u16, u32)] = &[
    (0xD097, 10),
    (0xD098, 11),
    (0xD101, 12),
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// The smallest `--wal-segsize` PostgreSQL allows (1 MiB).
pub const MIN_SEGMENT_SIZE: u32 = 1 << 20;
/// The largest `--wal-segsize` PostgreSQL allows (1 GiB).
pub const MAX_SEGMENT_SIZE: u32 = 1 << 30;

/// `XLogLongPageHeaderData`, the header at the start of every WAL segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    /// `xlp_magic`: differs by major version.
    pub magic: u16,
    /// `xlp_info`: the page's flags.
    pub info: u16,
    /// `xlp_tli`: the timeline the page was written on.
    pub timeline: u32,
    /// `xlp_pageaddr`: the LSN of the page's start, which names the segment.
    pub page_address: u64,
    /// `xlp_sysid`: the cluster's system identifier.
    pub system_identifier: u64,
    /// `xlp_seg_size`: the cluster's segment size.
    pub segment_size: u32,
    /// `xlp_xlog_blcksz`: the WAL block size.
    pub block_size: u32,
}

impl LongPageHeader {
    /// Bytes to read from the start of a segment to parse its header.
    pub const LEN: usize = 40;

    /// Parses and sanity-checks a header; the error says why the bytes are not a WAL segment start.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < Self::LEN {
            return Err(format!(
                "too short for a WAL segment ({} bytes, a page header needs {})",
                bytes.len(),
                Self::LEN
            ));
        }
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let header = LongPageHeader {
            magic: u16_at(0),
            info: u16_at(2),
            timeline: u32_at(4),
            page_address: u64_at(8),
            system_identifier: u64_at(24),
            segment_size: u32_at(32),
            block_size: u32_at(36),
        };
        if header.pg_major().is_none() {
            return Err(format!(
                "not a PostgreSQL WAL segment: page magic 0x{:04X} is not that of PostgreSQL 10 to 18",
                header.magic
            ));
        }
        if header.info & XLP_LONG_HEADER == 0 || header.info & !XLP_ALL_FLAGS != 0 {
            return Err(format!(
                "not a PostgreSQL WAL segment: the first page has no long header (flags 0x{:04X})",
                header.info
            ));
        }
        if !header.segment_size.is_power_of_two()
            || !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&header.segment_size)
        {
            return Err(format!(
                "not a PostgreSQL WAL segment: segment size {} in the header is not a power of two \
                 from 1 MiB to 1 GiB",
                header.segment_size
            ));
        }
        if !header.block_size.is_power_of_two() || !(1024..=65536).contains(&header.block_size) {
            return Err(format!(
                "not a PostgreSQL WAL segment: WAL block size {} in the header is invalid",
                header.block_size
            ));
        }
        if header.timeline == 0 {
            return Err("not a PostgreSQL WAL segment: timeline 0 in the page header".into());
        }
        Ok(header)
    }

    /// The PostgreSQL major version the page magic belongs to, when known.
    pub fn pg_major(&self) -> Option<u32> {
        PAGE_MAGIC_BY_MAJOR.iter().find(|(magic, _)| *magic == self.magic).map(|(_, major)| *major)
    }

    /// Checks that this header belongs to a complete segment called `name` of `file_len` bytes.
    ///
    /// The page's own timeline may be lower than the name's: when a timeline switches mid-segment, the
    /// first segment of the new timeline begins with a copy of the old timeline's pages.
    pub fn check_matches(&self, name: &WalFileName, file_len: u64) -> Result<(), String> {
        if file_len != u64::from(self.segment_size) {
            return Err(format!(
                "size {file_len} bytes differs from the segment size {} in its page header \
                 (incomplete or not a segment)",
                self.segment_size
            ));
        }
        let Some(segno) = name.segment_number(self.segment_size) else {
            return Err(format!(
                "the name's segment part is out of range for {} MiB segments",
                self.segment_size >> 20
            ));
        };
        let expected_address = segno * u64::from(self.segment_size);
        if self.page_address != expected_address {
            return Err(format!(
                "its page header says it starts at WAL position {}, but the name {} starts at {} \
                 (a different segment, or a recycled file)",
                format_lsn(self.page_address),
                name,
                format_lsn(expected_address)
            ));
        }
        if self.timeline > name.timeline() {
            return Err(format!(
                "its page header is on timeline {}, later than timeline {} in the name",
                self.timeline,
                name.timeline()
            ));
        }
        Ok(())
    }
}

/// Formats an LSN the way PostgreSQL prints it (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses an LSN the way PostgreSQL prints it (`X/Y` in hexadecimal); `None` for anything else.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from(u32::from_str_radix(hi, 16).ok()?) << 32) | u64::from(u32::from_str_radix(lo, 16).ok()?))
}

/// Checks that `content` looks like the timeline history file `name`: each entry names an earlier
/// timeline and the LSN where it ended, as PostgreSQL writes them.
pub fn check_history_file(name: &WalFileName, content: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(content).map_err(|_| "not a timeline history file: not text".to_owned())?;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parent = fields.next().and_then(|f| f.parse::<u32>().ok());
        let switchpoint = fields.next().and_then(parse_lsn);
        match (parent, switchpoint) {
            (Some(parent), Some(_)) if parent < name.timeline() => {}
            _ => {
                return Err(format!(
                    "not a timeline history file: line {} is not \"<earlier timeline> <LSN> <reason>\"",
                    number + 1
                ));
            }
        }
    }
    Ok(())
}

/// The largest history or backup label file we accept; real ones are a few hundred bytes.
pub const MAX_SMALL_FILE: u64 = 1 << 20;

/// Reads the system identifier from a `global/pg_control` file: the first field in every version.
pub fn control_file_system_identifier(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// A header as PostgreSQL 15 writes it at the start of segment `segno`.
#[cfg(test)]
pub(crate) fn header_bytes(segno: u64, segment_size: u32, timeline: u32, sysid: u64) -> Vec<u8> {
    let mut b = vec![0u8; LongPageHeader::LEN];
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&0x0006u16.to_le_bytes());
    b[4..8].copy_from_slice(&timeline.to_le_bytes());
    b[8..16].copy_from_slice(&(segno * u64::from(segment_size)).to_le_bytes());
    b[24..32].copy_from_slice(&sysid.to_le_bytes());
    b[32..36].copy_from_slice(&segment_size.to_le_bytes());
    b[36..40].copy_from_slice(&8192u32.to_le_bytes());
    b
}

/// A whole segment file called `name` for a cluster with `sysid`: header, then `fill` repeated.
#[cfg(test)]
pub(crate) fn segment_bytes(name: &str, segment_size: u32, sysid: u64, fill: u8) -> Vec<u8> {
    let parsed = WalFileName::parse(name).expect("valid name");
    let segno = parsed.segment_number(segment_size).expect("in range");
    let mut bytes = vec![fill; segment_size as usize];
    bytes[..LongPageHeader::LEN].copy_from_slice(&header_bytes(segno, segment_size, parsed.timeline(), sysid));
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_four_kinds() {
        let seg = WalFileName::parse("000000010000000A000000FF").unwrap();
        assert_eq!(seg.kind(), WalFileKind::Segment);
        assert_eq!(seg.timeline(), 1);
        assert_eq!(seg.timeline_and_log(), Some("000000010000000A"));
        assert_eq!(seg.segment_number(16 << 20), Some(0xA * 256 + 0xFF));
        assert_eq!(seg.segment_number(32 << 20), None, "0xFF is past the 128 segments of a 32 MiB log");
        assert_eq!(segment_file_name(1, 0xA * 256 + 0xFF, 16 << 20).as_deref(), Some(seg.as_str()));
        assert_eq!(segment_file_name(3, 0x1_0000_0000 * 256, 16 << 20), None, "past the last log a name holds");
        let partial = WalFileName::parse("000000020000000000000003.partial").unwrap();
        assert_eq!(partial.kind(), WalFileKind::Partial);
        assert!(partial.is_segment_data());
        let history = WalFileName::parse("0000000A.history").unwrap();
        assert_eq!((history.kind(), history.timeline()), (WalFileKind::History, 10));
        assert_eq!(history.timeline_and_log(), None);
        let backup = WalFileName::parse("000000010000000000000002.00000028.backup").unwrap();
        assert_eq!(backup.kind(), WalFileKind::BackupLabel);
        assert!(!backup.is_segment_data());
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "../000000010000000000000001",
            "pg_wal/000000010000000000000001",
            "00000001000000000000000",
            "0000000100000000000000011",
            "00000001000000000000000a",
            "000000010000000000000001.ready",
            "000000010000000000000001.partial.partial",
            "history",
            "1.history",
            "0000000G.history",
            "000000010000000000000002.0000028.backup",
            "000000010000000000000002-00000028.backup",
            "000000000000000000000001",
            "RECOVERYXLOG",
            "..",
        ] {
            assert!(WalFileName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let err = WalFileName::parse("a/b").unwrap_err();
        assert!(err.to_string().contains("path separator"), "{err}");
    }

    #[test]
    fn header_of_the_named_segment_passes() {
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        let header = LongPageHeader::parse(&header_bytes(3, 16 << 20, 1, 42)).unwrap();
        assert_eq!(header.pg_major(), Some(15));
        assert_eq!(header.system_identifier, 42);
        header.check_matches(&name, 16 << 20).unwrap();
    }

    #[test]
    fn header_from_an_earlier_timeline_passes_after_a_switch() {
        let name = WalFileName::parse("000000020000000000000003").unwrap();
        let header = LongPageHeader::parse(&header_bytes(3, 16 << 20, 1, 42)).unwrap();
        header.check_matches(&name, 16 << 20).unwrap();
        let later = LongPageHeader::parse(&header_bytes(3, 16 << 20, 3, 42)).unwrap();
        assert!(later.check_matches(&name, 16 << 20).unwrap_err().contains("timeline 3"));
    }

    #[test]
    fn header_of_another_segment_is_refused() {
        let name = WalFileName::parse("000000010000000000000004").unwrap();
        let header = LongPageHeader::parse(&header_bytes(3, 16 << 20, 1, 42)).unwrap();
        let err = header.check_matches(&name, 16 << 20).unwrap_err();
        assert!(err.contains("0/3000000") && err.contains("0/4000000"), "{err}");
    }

    #[test]
    fn wrong_size_is_refused() {
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        let header = LongPageHeader::parse(&header_bytes(3, 16 << 20, 1, 42)).unwrap();
        assert!(header.check_matches(&name, 8 << 20).unwrap_err().contains("size"));
    }

    #[test]
    fn segment_size_is_read_not_assumed() {
        let name = WalFileName::parse("000000010000000100000005").unwrap();
        // With 1 MiB segments a log holds 4096 of them.
        let header = LongPageHeader::parse(&header_bytes(4096 + 5, 1 << 20, 1, 7)).unwrap();
        header.check_matches(&name, 1 << 20).unwrap();
    }

    #[test]
    fn garbage_is_not_a_header() {
        assert!(LongPageHeader::parse(b"hello").unwrap_err().contains("too short"));
        assert!(LongPageHeader::parse(&[0u8; 64]).unwrap_err().contains("page magic"));
        let mut b = header_bytes(3, 16 << 20, 1, 42);
        b[2] = 0x80;
        assert!(LongPageHeader::parse(&b).unwrap_err().contains("long header"));
        let mut b = header_bytes(3, 16 << 20, 1, 42);
        b[32..36].copy_from_slice(&12345u32.to_le_bytes());
        assert!(LongPageHeader::parse(&b).unwrap_err().contains("segment size"));
    }

    #[test]
    fn every_flag_postgresql_sets_on_a_first_page_passes() {
        // XLP_FIRST_IS_CONTRECORD (1), XLP_BKP_REMOVABLE (4), XLP_FIRST_IS_OVERWRITE_CONTRECORD (8),
        // each beside XLP_LONG_HEADER (2).
        for flags in [0x0002u16, 0x0003, 0x0006, 0x000A, 0x000F] {
            let mut b = header_bytes(3, 16 << 20, 1, 42);
            b[2..4].copy_from_slice(&flags.to_le_bytes());
            assert!(LongPageHeader::parse(&b).is_ok(), "flags 0x{flags:04X}");
        }
        let mut b = header_bytes(3, 16 << 20, 1, 42);
        b[2..4].copy_from_slice(&0x0012u16.to_le_bytes());
        assert!(LongPageHeader::parse(&b).unwrap_err().contains("long header"), "an unknown bit");
    }

    #[test]
    fn history_files_are_checked() {
        let name = WalFileName::parse("00000003.history").unwrap();
        check_history_file(&name, b"1\t0/3000148\tno recovery target specified\n\n2\t0/5000000\tx\n").unwrap();
        assert!(check_history_file(&name, b"3\t0/3000148\tself\n").is_err());
        assert!(check_history_file(&name, b"\x00\x01\x02").is_err());
        assert!(check_history_file(&name, b"hello world\n").is_err());
    }

    #[test]
    fn lsn_formatting_matches_postgres() {
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
    }
}
