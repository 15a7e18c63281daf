//! The pipeline: the header, the stages in order, the checksum of the original bytes and the
//! trailer, in one place, so that every object (a WAL segment, a base-backup part, a manifest) is
//! written and read the same way, and a further stage is added once for all of them.

use std::io::{self, Write};
use std::sync::Arc;

use super::error::{DecodeError, Downstream, FormatError};
use super::stage::{AGE_ID, Stage, StageDecoder, StageEncoder, ZSTD_ID, Zstd};
use super::{ContentDigest, FORMAT_VERSION, HEADER_LEN, Hasher, HoldBack, STAGED_FORMAT_VERSION, TRAILER_LEN};

/// The first 8 bytes of every object.
pub const HEADER_MAGIC: &[u8; 8] = b"WALSHIP\0";
/// The last 8 bytes of every object.
pub const TRAILER_MAGIC: &[u8; 8] = b"WSEND\0\0\x01";
/// Header bytes 11..16 name the further stages of a version-2 object.
const MAX_FURTHER_STAGES: usize = HEADER_LEN - 11;

/// How objects are written and read: zstd, then any further stages, then the checksum trailer.
/// Cheap to clone; built once from the configuration and handed to whatever stores or fetches.
#[derive(Clone)]
pub struct Pipeline {
    zstd: Zstd,
    further: Vec<Arc<dyn Stage>>,
    /// Whether an object that went through none of the further stages is read (version 1).
    plain_allowed: bool,
}

impl Default for Pipeline {
    /// For reading: no further stage, so it reads every object today's walship writes. Writers
    /// take the configured level with [`Pipeline::zstd`] instead (zstd's default level here).
    fn default() -> Self {
        Pipeline::zstd(zstd::DEFAULT_COMPRESSION_LEVEL)
    }
}

impl Pipeline {
    /// Today's format: zstd at `level`, no further stage.
    pub fn zstd(level: i32) -> Self {
        Pipeline { zstd: Zstd { level, workers: 1 }, further: Vec::new(), plain_allowed: true }
    }

    /// Compresses on `workers` threads (base backups); the output is still one frame.
    pub fn with_workers(mut self, workers: u32) -> Self {
        self.zstd.workers = workers;
        self
    }

    /// Adds a stage after those already listed (after compression: a cipher goes here). Objects
    /// written then name it in their header; objects that do not are still read.
    ///
    /// # Panics
    /// On a stage id of 0 or 1, an id listed twice, or more than five further stages: each is a
    /// programming error, not something a configuration can cause.
    pub fn then(mut self, stage: Arc<dyn Stage>) -> Self {
        let id = stage.id();
        assert!(id > ZSTD_ID, "stage {} has the reserved id {id}", stage.name());
        assert!(self.further.iter().all(|s| s.id() != id), "stage id {id} listed twice");
        assert!(self.further.len() < MAX_FURTHER_STAGES, "at most {MAX_FURTHER_STAGES} further stages");
        self.further.push(stage);
        self
    }

    /// Refuses, when reading, an object that went through none of the further stages: with
    /// encryption configured, a plain object is either older than the encryption (allowed only when
    /// the configuration says so) or planted by someone who holds no key.
    pub fn refusing_plain(mut self) -> Self {
        self.plain_allowed = false;
        self
    }

    /// Whether objects written by this pipeline go through further stages (are encrypted).
    pub fn has_further_stages(&self) -> bool {
        !self.further.is_empty()
    }

    /// A fresh encoder for one object.
    pub fn encoder(&self) -> io::Result<Encoder> {
        let mut stages = vec![self.zstd.encoder()?];
        for stage in &self.further {
            stages.push(stage.encoder()?);
        }
        let ids: Vec<u8> = self.further.iter().map(|s| s.id()).collect();
        Ok(Encoder {
            header: Some(header(&ids)),
            scratch: vec![Vec::new(); stages.len() - 1],
            stages,
            hasher: Hasher::default(),
        })
    }

    /// A fresh decoder for one object, writing what it decodes to `sink`.
    pub fn decoder<W: Write>(&self, sink: W) -> io::Result<Decoder<W>> {
        let mut available = Vec::with_capacity(self.further.len());
        for stage in &self.further {
            available.push((stage.id(), stage.decoder()?));
        }
        Ok(Decoder {
            plain_allowed: self.plain_allowed,
            header: Vec::with_capacity(HEADER_LEN),
            held_back: HoldBack::new(TRAILER_LEN),
            zstd: Some(self.zstd.decoder()?),
            available,
            stages: Vec::new(),
            hasher: Hasher::default(),
            sink,
        })
    }
}

/// Version 1 when zstd is the only stage (every object walship wrote before further stages
/// existed, byte for byte), version 2 naming the further stages otherwise.
fn header(further: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(HEADER_MAGIC);
    let version = if further.is_empty() { FORMAT_VERSION } else { STAGED_FORMAT_VERSION };
    header[8..10].copy_from_slice(&version.to_le_bytes());
    header[10] = ZSTD_ID;
    header[11..11 + further.len()].copy_from_slice(further);
    header
}

/// Encodes a stream chunk by chunk; the caller moves the produced bytes wherever they go (an async
/// storage writer, a channel), so nothing here blocks on the destination.
pub struct Encoder {
    header: Option<[u8; HEADER_LEN]>,
    stages: Vec<Box<dyn StageEncoder>>,
    /// Between stage i and i + 1; none with zstd alone, so today's format copies nothing extra.
    scratch: Vec<Vec<u8>>,
    hasher: Hasher,
}

impl Encoder {
    /// Today's format at `level`: `Pipeline::zstd(level).encoder()`.
    pub fn new(level: i32) -> io::Result<Self> {
        Pipeline::zstd(level).encoder()
    }

    /// An encoder compressing on `workers` threads (zstd's multi-threaded mode; still one frame).
    pub fn with_workers(level: i32, workers: u32) -> io::Result<Self> {
        Pipeline::zstd(level).with_workers(workers).encoder()
    }

    fn take_header(&mut self, out: &mut Vec<u8>) {
        if let Some(header) = self.header.take() {
            out.extend_from_slice(&header);
        }
    }

    /// Consumes `input`, appending whatever encoded bytes are ready to `out`.
    pub fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.take_header(out);
        self.hasher.update(input);
        push_through(&mut self.stages, &mut self.scratch, input, out)
    }

    /// Ends the stream: appends the rest of the body and the trailer, and returns the digest.
    pub fn finish(mut self, out: &mut Vec<u8>) -> io::Result<ContentDigest> {
        self.take_header(out);
        let mut stages = std::mem::take(&mut self.stages);
        // Each stage's last bytes still go through the stages after it, which then finish too.
        while !stages.is_empty() {
            let first = stages.remove(0);
            if stages.is_empty() {
                first.finish(out)?;
            } else {
                let mut tail = Vec::new();
                first.finish(&mut tail)?;
                self.scratch.truncate(stages.len() - 1);
                push_through(&mut stages, &mut self.scratch, &tail, out)?;
            }
        }
        let digest = self.hasher.finish();
        out.extend_from_slice(&digest.len.to_le_bytes());
        out.extend_from_slice(&digest.sha256);
        out.extend_from_slice(TRAILER_MAGIC);
        Ok(digest)
    }
}

/// Runs `input` through `stages` in order, the last one appending to `out`.
fn push_through(
    stages: &mut [Box<dyn StageEncoder>],
    scratch: &mut [Vec<u8>],
    input: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let Some((first, rest)) = stages.split_first_mut() else {
        out.extend_from_slice(input);
        return Ok(());
    };
    let Some((between, more)) = scratch.split_first_mut() else {
        return first.update(input, out);
    };
    between.clear();
    first.update(input, between)?;
    push_through(rest, more, between, out)
}

/// Decodes a stream chunk by chunk into `sink`, verifying as it goes and at the end. Nothing it
/// wrote is to be trusted before [`finish`](Self::finish) succeeds.
pub struct Decoder<W: Write> {
    plain_allowed: bool,
    header: Vec<u8>,
    /// The last bytes seen: the trailer, once the stream ends.
    held_back: HoldBack,
    /// The stages the pipeline has, until the header says which of them this object went through.
    zstd: Option<Box<dyn StageDecoder>>,
    available: Vec<(u8, Box<dyn StageDecoder>)>,
    /// In reading order: the last stage written is the first undone.
    stages: Vec<Box<dyn StageDecoder>>,
    hasher: Hasher,
    sink: W,
}

impl<W: Write> Decoder<W> {
    /// A decoder for every object today's walship writes: `Pipeline::default().decoder(sink)`.
    pub fn new(sink: W) -> io::Result<Self> {
        Pipeline::default().decoder(sink)
    }

    /// Consumes the next stored bytes, passing what they decode to on to the sink.
    pub fn update(&mut self, mut input: &[u8]) -> Result<(), DecodeError> {
        if self.header.len() < HEADER_LEN {
            let take = (HEADER_LEN - self.header.len()).min(input.len());
            self.header.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.header.len() == HEADER_LEN {
                self.choose_stages()?;
            }
        }
        if input.is_empty() {
            return Ok(());
        }
        // Everything but the last TRAILER_LEN bytes seen so far is body.
        let (released, body) = self.held_back.push(input);
        self.feed_body(&released)?;
        self.feed_body(body)
    }

    /// Checks the complete header and picks the stages it names, in reading order.
    fn choose_stages(&mut self) -> Result<(), FormatError> {
        let header = &self.header;
        if &header[0..8] != HEADER_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        // Version 2 is read only by a pipeline with further stages: one without them reads
        // exactly what it read before they existed.
        let staged = version == STAGED_FORMAT_VERSION && !self.available.is_empty();
        if version == STAGED_FORMAT_VERSION && !staged && header[11..].contains(&AGE_ID) {
            return Err(FormatError::Encryption(
                "encrypted, and no [encryption] identity_files or passphrase_file is configured to open it".into(),
            ));
        }
        if version != FORMAT_VERSION && !staged {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if version == FORMAT_VERSION && !self.plain_allowed {
            return Err(FormatError::plain_where_encrypted());
        }
        if header[10] != ZSTD_ID {
            return Err(FormatError::UnknownCompression(header[10]));
        }
        let mut stages = Vec::new();
        // In version 1, bytes 11..16 are reserved and not looked at, as always.
        for &id in header[11..].iter().filter(|&&id| staged && id != 0) {
            let at = self.available.iter().position(|(known, _)| *known == id).ok_or(FormatError::UnknownStage(id))?;
            stages.push(self.available.swap_remove(at).1);
        }
        stages.reverse();
        stages.push(self.zstd.take().expect("the header is read once"));
        self.stages = stages;
        Ok(())
    }

    fn feed_body(&mut self, body: &[u8]) -> Result<(), DecodeError> {
        let Decoder { stages, hasher, sink, .. } = self;
        let mut end = |piece: &[u8]| {
            hasher.update(piece);
            sink.write_all(piece).map_err(DecodeError::Sink)
        };
        feed(stages, body, &mut end)
    }

    /// Where decoded bytes go. They are unverified until [`finish`](Self::finish) succeeds.
    pub fn sink_mut(&mut self) -> &mut W {
        &mut self.sink
    }

    /// Ends the stream: checks the trailer against what was decoded; only then is the sink's content
    /// trustworthy. Returns the digest and the sink.
    pub fn finish(self) -> Result<(ContentDigest, W), DecodeError> {
        let Decoder { header, held_back, mut stages, mut hasher, mut sink, .. } = self;
        let held_back = held_back.held();
        if header.len() < HEADER_LEN {
            return Err(FormatError::Truncated(format!("{} bytes, shorter than the header", header.len())).into());
        }
        if held_back.len() < TRAILER_LEN || &held_back[40..48] != TRAILER_MAGIC {
            return Err(FormatError::Truncated("the end-of-object trailer is missing".into()).into());
        }
        let mut end = |piece: &[u8]| {
            hasher.update(piece);
            sink.write_all(piece).map_err(DecodeError::Sink)
        };
        // Each stage's last bytes still go through the stages after it, which then finish too.
        while !stages.is_empty() {
            let first = stages.remove(0);
            first.finish(&mut |piece| feed(&mut stages, piece, &mut end).map_err(Downstream))?;
        }
        let expected = ContentDigest {
            len: u64::from_le_bytes(held_back[0..8].try_into().expect("8 bytes")),
            sha256: held_back[8..40].try_into().expect("32 bytes"),
        };
        let actual = hasher.finish();
        if expected != actual {
            return Err(FormatError::ChecksumMismatch { expected, actual }.into());
        }
        Ok((actual, sink))
    }
}

/// Runs stored `input` through `stages` in reading order, the last one passing to `end`.
fn feed(
    stages: &mut [Box<dyn StageDecoder>],
    input: &[u8],
    end: &mut dyn FnMut(&[u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let Some((first, rest)) = stages.split_first_mut() else {
        return end(input);
    };
    first.update(input, &mut |piece| feed(rest, piece, end).map_err(Downstream))?;
    Ok(())
}
