//! Synthetic WAL files for tests that need no PostgreSQL server: segments whose first page carries a
//! PostgreSQL 15 long page header, timeline history files and backup labels.
//!
//! The content after the header is generated, not recorded WAL: walship only ever reads the header,
//! so what matters is whether the rest compresses (WAL-like) or not (pseudo-random, which makes a push
//! write the full size and so take long enough to interrupt). Generation is deterministic per seed, so
//! two segments of the same name differ only when asked to.

use std::fs;
use std::path::{Path, PathBuf};

/// PostgreSQL 15's `XLOG_PAGE_MAGIC`.
pub const PG15_PAGE_MAGIC: u16 = 0xD110;
/// XLP_LONG_HEADER | XLP_BKP_REMOVABLE, as on the first page of a segment written by a live server.
pub const LONG_HEADER_INFO: u16 = 0x0006;
pub const WAL_BLOCK_SIZE: u32 = 8192;
/// The system identifier segments get unless a test picks another.
pub const DEFAULT_SYSTEM_IDENTIFIER: u64 = 7_301_234_567_890_123_456;
/// The smallest segment size initdb allows; the default here so that most tests move little data.
pub const MIN_SEGMENT_SIZE: u32 = 1 << 20;

/// What follows the page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Short pseudo-random records at the start of every page, zeros after: compresses well, as
    /// real WAL does.
    WalLike,
    /// Pseudo-random bytes throughout: incompressible, so the stored object is as large as the file.
    Random,
}

/// The segment number a segment file name denotes (`log * segments-per-log + seg`), for a cluster
/// with `segment_size`-byte segments. Takes `.partial` names too.
pub fn segment_number(name: &str, segment_size: u32) -> u64 {
    assert!(name.len() >= 24, "{name:?} is not a segment name");
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("{name:?} is not a segment name"));
    let per_log = 0x1_0000_0000 / u64::from(segment_size);
    hex(&name[8..16]) * per_log + hex(&name[16..24])
}

/// The name PostgreSQL gives segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, segment_size: u32) -> String {
    let per_log = 0x1_0000_0000 / u64::from(segment_size);
    format!("{timeline:08X}{:08X}{:08X}", segno / per_log, segno % per_log)
}

/// Every segment name from `first` to `last`, both included, on the timeline of `first`.
pub fn segments_between(first: &str, last: &str, segment_size: u32) -> Vec<String> {
    let timeline = u32::from_str_radix(&first[..8], 16).unwrap_or_else(|_| panic!("{first:?} is not a segment name"));
    (segment_number(first, segment_size)..=segment_number(last, segment_size))
        .map(|segno| segment_name(timeline, segno, segment_size))
        .collect()
}

/// The key under which a repository keeps the WAL file `name` (the layout documented in
/// `crates/walship/src/repo/mod.rs`): history files together, segments sharded by timeline and log.
pub fn wal_key(name: &str) -> String {
    if name.ends_with(".history") { format!("wal/history/{name}") } else { format!("wal/{}/{name}", &name[..16]) }
}

/// Writes one chained setter `fn FIELD(self, value) -> Self` per field, so that each builder option
/// is one line with its doc rather than five.
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            }
        )*
    };
}

/// A synthetic segment, built up with chained setters and materialised by [`Segment::bytes`] or
/// [`Segment::write_to`].
#[derive(Debug, Clone)]
pub struct Segment {
    name: String,
    segment_size: u32,
    system_identifier: u64,
    fill: Fill,
    seed: u64,
}

impl Segment {
    /// A WAL-like 1 MiB segment of the default cluster, named `name` (a segment or `.partial` name).
    pub fn new(name: &str) -> Segment {
        Segment {
            name: name.to_owned(),
            segment_size: MIN_SEGMENT_SIZE,
            system_identifier: DEFAULT_SYSTEM_IDENTIFIER,
            fill: Fill::WalLike,
            seed: 0,
        }
    }

    setters! {
        /// The segment size, both in the header and as the file's length.
        segment_size: u32,
        /// The system identifier in the header (and mixed into the content).
        system_identifier: u64,
        /// What follows the page header.
        fill: Fill,
        /// Varies the content after the header: equal seeds give equal bytes.
        seed: u64,
    }

    /// The same segment under another name (the header follows the new name).
    pub fn name_as(mut self, name: &str) -> Segment {
        self.name = name.to_owned();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u32 {
        self.segment_size
    }

    fn timeline(&self) -> u32 {
        u32::from_str_radix(&self.name[..8], 16).unwrap_or_else(|_| panic!("{:?} is not a segment name", self.name))
    }

    fn segno(&self) -> u64 {
        segment_number(&self.name, self.segment_size)
    }

    /// `XLogLongPageHeaderData` as PostgreSQL 15 writes it at offset 0 of this segment.
    pub fn header(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..2].copy_from_slice(&PG15_PAGE_MAGIC.to_le_bytes());
        b[2..4].copy_from_slice(&LONG_HEADER_INFO.to_le_bytes());
        b[4..8].copy_from_slice(&self.timeline().to_le_bytes());
        b[8..16].copy_from_slice(&(self.segno() * u64::from(self.segment_size)).to_le_bytes());
        // 16..20 xlp_rem_len and 20..24 padding stay zero: no record continues from the last segment.
        b[24..32].copy_from_slice(&self.system_identifier.to_le_bytes());
        b[32..36].copy_from_slice(&self.segment_size.to_le_bytes());
        b[36..40].copy_from_slice(&WAL_BLOCK_SIZE.to_le_bytes());
        b
    }

    /// The whole file.
    pub fn bytes(&self) -> Vec<u8> {
        let size = self.segment_size as usize;
        let mut out = vec![0u8; size];
        // Mixing the name and cluster in keeps different segments different even with one seed.
        let mut rng = SplitMix64(
            self.seed ^ self.segno().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.system_identifier.rotate_left(17),
        );
        match self.fill {
            Fill::Random => rng.fill(&mut out),
            Fill::WalLike => {
                let block = WAL_BLOCK_SIZE as usize;
                for (page_index, page) in out.chunks_mut(block).enumerate() {
                    // A short page header on every page after the first, as in real segments.
                    let address = self.segno() * u64::from(self.segment_size) + (page_index * block) as u64;
                    page[0..2].copy_from_slice(&PG15_PAGE_MAGIC.to_le_bytes());
                    page[4..8].copy_from_slice(&self.timeline().to_le_bytes());
                    page[8..16].copy_from_slice(&address.to_le_bytes());
                    let record_len = 256 + (rng.next() % 768) as usize;
                    rng.fill(&mut page[40..40 + record_len]);
                }
            }
        }
        out[..40].copy_from_slice(&self.header());
        out
    }

    /// Writes the segment as `dir/<name>`, owned by the server user, and returns the path.
    pub fn write_to(&self, dir: &Path) -> PathBuf {
        let path = dir.join(&self.name);
        write_file(&path, &self.bytes());
        path
    }
}

/// Writes `bytes` to `path` (replacing any file there), owned by the server user so that the
/// binaries, which run as that user, can read and replace it.
pub fn write_file(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    crate::chown_to_server_user(path);
}

/// The content of timeline `timeline`'s history file (`<TLI>.history`): one line per earlier
/// timeline, in the tab-separated form PostgreSQL writes at promotion. `reason` ends each line, so two
/// valid files of one timeline can differ.
pub fn history_content(timeline: u32, reason: &str) -> String {
    assert!(timeline >= 2, "timeline 1 has no history file");
    (1..timeline)
        .map(|parent| format!("{parent}\t0/{:X}\t{reason}\n", 0x0300_0148 + u64::from(parent) * 0x100_0000))
        .collect()
}

/// The history file name of `timeline`.
pub fn history_name(timeline: u32) -> String {
    format!("{timeline:08X}.history")
}

/// A backup history file (`.backup` label) for a backup that started at `start_lsn` on `timeline`:
/// returns its archive name (`<segment>.<offset>.backup`) and content, as pg_stop_backup writes them.
pub fn backup_label(timeline: u32, start_lsn: u64, segment_size: u32) -> (String, String) {
    let segno = start_lsn / u64::from(segment_size);
    let segment = segment_name(timeline, segno, segment_size);
    let offset = start_lsn % u64::from(segment_size);
    let stop_lsn = start_lsn + 0xD8;
    let lsn = |l: u64| format!("{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF);
    let content = format!(
        "START WAL LOCATION: {} (file {segment})\n\
         STOP WAL LOCATION: {} (file {segment})\n\
         CHECKPOINT LOCATION: {}\n\
         BACKUP METHOD: streamed\n\
         BACKUP FROM: primary\n\
         START TIME: 2024-05-01 12:00:00 UTC\n\
         LABEL: pg_basebackup base backup\n\
         START TIMELINE: {timeline}\n\
         STOP TIME: 2024-05-01 12:00:01 UTC\n\
         STOP TIMELINE: {timeline}\n",
        lsn(start_lsn),
        lsn(stop_lsn),
        lsn(start_lsn + 0x38),
    );
    (format!("{segment}.{offset:08X}.backup"), content)
}

/// splitmix64: fast, deterministic and good enough that zstd finds nothing to compress.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}
