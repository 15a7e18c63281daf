//! The codec's tests: the format's guarantees (every truncation, every flipped byte, sink failures
//! told apart), today's bytes unchanged, and a further stage slotted in.

use std::io::{self, Write};

use super::*;

fn sample(len: usize) -> Vec<u8> {
    // WAL-like: runs of zeros between pseudo-random records.
    let mut state = 0x1234_5678_u32;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            if (i / 4096) % 2 == 0 { 0 } else { state as u8 }
        })
        .collect()
}

#[test]
fn round_trip_in_odd_chunks() {
    let original = sample(3 * 1024 * 1024 + 17);
    let mut encoded = Vec::new();
    let mut encoder = Encoder::new(1).unwrap();
    for chunk in original.chunks(100_003) {
        encoder.update(chunk, &mut encoded).unwrap();
    }
    let digest = encoder.finish(&mut encoded).unwrap();
    assert_eq!(digest, ContentDigest::of(&original));
    assert!(encoded.len() < original.len(), "WAL-like data compresses");
    // Feed the decoder in chunk sizes that straddle the header and trailer boundaries.
    for chunk_size in [1, 7, 47, 48, 49, 4096, encoded.len()] {
        let mut decoder = Decoder::new(Vec::new()).unwrap();
        for chunk in encoded.chunks(chunk_size) {
            decoder.update(chunk).unwrap();
        }
        let (decoded_digest, decoded) = decoder.finish().unwrap();
        assert_eq!(decoded_digest, digest);
        assert!(decoded == original, "chunk size {chunk_size}");
    }
}

#[test]
fn empty_input_round_trips() {
    let encoded = encode_all(b"", 3).unwrap();
    assert_eq!(decode_all(&encoded).unwrap(), b"");
}

#[test]
fn every_truncation_is_detected() {
    let encoded = encode_all(&sample(200_000), 1).unwrap();
    for cut in (0..encoded.len()).step_by(997).chain([encoded.len() - 1, encoded.len() - 48, 15, 16, 17]) {
        let err = decode_all(&encoded[..cut]).unwrap_err();
        assert!(matches!(err, DecodeError::Format(_)), "cut at {cut}: {err}");
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    let encoded = encode_all(&sample(50_000), 1).unwrap();
    for at in (0..encoded.len()).step_by(101).chain([8, 10, encoded.len() - 1, encoded.len() - 20]) {
        let mut damaged = encoded.clone();
        damaged[at] ^= 0x40;
        assert!(decode_all(&damaged).is_err(), "flip at {at} went unnoticed");
    }
}

#[test]
fn appended_bytes_are_detected() {
    let mut encoded = encode_all(&sample(10_000), 1).unwrap();
    encoded.extend_from_slice(&[0u8; 100]);
    assert!(decode_all(&encoded).is_err());
}

#[test]
fn foreign_and_future_objects_are_named() {
    let raw = sample(1000);
    assert!(matches!(decode_all(&raw), Err(DecodeError::Format(FormatError::BadMagic))));
    let mut future = encode_all(&raw, 1).unwrap();
    future[8] = 2;
    let err = decode_all(&future).unwrap_err();
    assert!(err.to_string().contains("version 2"), "{err}");
}

#[test]
fn sink_failures_are_not_called_corruption() {
    let encoded = encode_all(&sample(300_000), 1).unwrap();
    let mut decoder = Decoder::new(Full).unwrap();
    assert!(matches!(decoder.update(&encoded), Err(DecodeError::Sink(_))));
}

/// The encoder as it was written before the pipeline existed, kept to prove the bytes did not change.
fn legacy_encode(chunks: &[&[u8]], level: i32, workers: u32) -> Vec<u8> {
    let mut zstd = zstd::stream::write::Encoder::new(Vec::new(), level).unwrap();
    if workers > 1 {
        zstd.multithread(workers).unwrap();
    }
    let mut out = b"WALSHIP\0".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.push(1);
    out.extend_from_slice(&[0u8; 5]);
    let mut hasher = Hasher::default();
    for chunk in chunks {
        hasher.update(chunk);
        zstd.write_all(chunk).unwrap();
        out.append(zstd.get_mut());
    }
    out.append(&mut zstd.finish().unwrap());
    let digest = hasher.finish();
    out.extend_from_slice(&digest.len.to_le_bytes());
    out.extend_from_slice(&digest.sha256);
    out.extend_from_slice(b"WSEND\0\0\x01");
    out
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn the_pipeline_writes_todays_bytes() {
    let original = sample(2 * 1024 * 1024 + 5);
    for (level, workers, chunk) in [(1, 1, 100_003), (3, 1, 1 << 20), (-7, 1, 4096), (19, 1, 700_000), (1, 2, 1 << 20)]
    {
        let chunks: Vec<&[u8]> = original.chunks(chunk).collect();
        let mut ours = Vec::new();
        let mut encoder = Pipeline::zstd(level).with_workers(workers).encoder().unwrap();
        for piece in &chunks {
            encoder.update(piece, &mut ours).unwrap();
        }
        encoder.finish(&mut ours).unwrap();
        assert!(ours == legacy_encode(&chunks, level, workers), "level {level}, {workers} workers");
        let mut pumped = Vec::new();
        Pipeline::zstd(level).with_workers(workers).encode(&original[..], &mut pumped).unwrap();
        assert!(pumped == legacy_encode(&[&original[..]], level, workers), "pump at level {level}");
    }
    assert_eq!(encode_all(b"", 3).unwrap(), legacy_encode(&[], 3, 1));
}

#[test]
fn objects_written_before_the_pipeline_decode() {
    // Written by walship before the pipeline existed (encode_all at level 3).
    let golden = hex("57414c5348495000010001000000000028b52ffd0058b1000077616c7368697020676f6c64656e206f626a6563740a\
         1600000000000000c9b4dd94214d28ea6ab00043353c89fc6e0caf016a20465121db1c7ae6b2dd405753454e44000001");
    assert_eq!(decode_all(&golden).unwrap(), b"walship golden object\n");
    let empty = hex("57414c5348495000010001000000000028b52ffd20000100000000000000000000e3b0c44298fc1c149afbf4c8996fb9\
         2427ae41e4649b934ca495991b7852b8555753454e44000001");
    assert_eq!(decode_all(&empty).unwrap(), b"");
    let scrambling = Pipeline::zstd(1).then(Arc::new(Scramble));
    let mut decoded = Vec::new();
    scrambling.decode(&golden[..], &mut decoded).unwrap();
    assert_eq!(decoded, b"walship golden object\n");
}

use std::sync::Arc;

/// A stand-in for a cipher such as age's STREAM: a header of its own, 64-byte chunks each with a
/// tag, the last chunk flagged, so that cutting the stream at a chunk boundary is noticed.
struct Scramble;

const SCRAMBLE_HEADER: &[u8; 4] = b"XOR1";
const SCRAMBLE_CHUNK: usize = 64;
const SCRAMBLE_KEY: u8 = 0x5a;

impl Stage for Scramble {
    fn id(&self) -> u8 {
        0x58
    }
    fn name(&self) -> &'static str {
        "scramble"
    }
    fn encoder(&self) -> io::Result<Box<dyn StageEncoder>> {
        Ok(Box::new(ScrambleEncoder { header_pending: true, partial: Vec::new() }))
    }
    fn decoder(&self) -> io::Result<Box<dyn StageDecoder>> {
        Ok(Box::new(ScrambleDecoder { header: Vec::new(), partial: Vec::new(), ended: false }))
    }
}

/// A chunk: length | last? | bytes XOR key | tag (the sum of the plain bytes and of the flag).
fn scramble_chunk(plain: &[u8], last: bool, out: &mut Vec<u8>) {
    out.push(plain.len() as u8);
    out.push(last as u8);
    out.extend(plain.iter().map(|b| b ^ SCRAMBLE_KEY));
    out.push(plain.iter().fold(last as u8, |sum, b| sum.wrapping_add(*b)));
}

struct ScrambleEncoder {
    header_pending: bool,
    partial: Vec<u8>,
}

impl StageEncoder for ScrambleEncoder {
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if std::mem::take(&mut self.header_pending) {
            out.extend_from_slice(SCRAMBLE_HEADER);
        }
        self.partial.extend_from_slice(input);
        // Keep at least one byte back: the last chunk, flagged, is written by finish.
        while self.partial.len() > SCRAMBLE_CHUNK {
            let rest = self.partial.split_off(SCRAMBLE_CHUNK);
            scramble_chunk(&self.partial, false, out);
            self.partial = rest;
        }
        Ok(())
    }
    fn finish(mut self: Box<Self>, out: &mut Vec<u8>) -> io::Result<()> {
        self.update(&[], out)?;
        scramble_chunk(&self.partial, true, out);
        Ok(())
    }
}

struct ScrambleDecoder {
    header: Vec<u8>,
    partial: Vec<u8>,
    ended: bool,
}

fn scramble_damage(reason: &str) -> StageError {
    FormatError::Stage { stage: "scramble", reason: reason.into() }.into()
}

impl StageDecoder for ScrambleDecoder {
    fn update(&mut self, mut input: &[u8], next: &mut Next<'_>) -> Result<(), StageError> {
        let take = (SCRAMBLE_HEADER.len() - self.header.len()).min(input.len());
        self.header.extend_from_slice(&input[..take]);
        input = &input[take..];
        if self.header.len() == SCRAMBLE_HEADER.len() && self.header != SCRAMBLE_HEADER {
            return Err(scramble_damage("bad header"));
        }
        self.partial.extend_from_slice(input);
        while let Some(&len) = self.partial.first() {
            let whole = 3 + len as usize;
            if self.ended {
                return Err(scramble_damage("bytes after the last chunk"));
            }
            if len as usize > SCRAMBLE_CHUNK || self.partial.len() < whole {
                break;
            }
            let chunk: Vec<u8> = self.partial.drain(..whole).collect();
            let last = chunk[1];
            let plain: Vec<u8> = chunk[2..whole - 1].iter().map(|b| b ^ SCRAMBLE_KEY).collect();
            if last > 1 || plain.iter().fold(last, |sum, b| sum.wrapping_add(*b)) != chunk[whole - 1] {
                return Err(scramble_damage("authentication failed"));
            }
            self.ended = last == 1;
            next(&plain)?;
        }
        Ok(())
    }
    fn finish(self: Box<Self>, _next: &mut Next<'_>) -> Result<(), StageError> {
        if !self.ended || !self.partial.is_empty() {
            return Err(scramble_damage("the stream ends before its last chunk"));
        }
        Ok(())
    }
}

fn scrambling() -> Pipeline {
    Pipeline::zstd(1).then(Arc::new(Scramble))
}

fn encode_with(pipeline: &Pipeline, original: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::new();
    pipeline.encode(original, &mut encoded).unwrap();
    encoded
}

fn decode_with(pipeline: &Pipeline, encoded: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut decoder = pipeline.decoder(Vec::new()).unwrap();
    decoder.update(encoded)?;
    Ok(decoder.finish()?.1)
}

#[test]
fn a_further_stage_round_trips_in_odd_chunks() {
    let original = sample(300_007);
    let pipeline = scrambling();
    let mut encoded = Vec::new();
    let mut encoder = pipeline.encoder().unwrap();
    for chunk in original.chunks(9_999) {
        encoder.update(chunk, &mut encoded).unwrap();
    }
    let digest = encoder.finish(&mut encoded).unwrap();
    assert_eq!(digest, ContentDigest::of(&original));
    assert_eq!(u16::from_le_bytes([encoded[8], encoded[9]]), STAGED_FORMAT_VERSION);
    assert_eq!(&encoded[10..16], &[ZSTD_ID, 0x58, 0, 0, 0, 0]);
    assert_eq!(&encoded[16..20], SCRAMBLE_HEADER, "the stage's own header opens the body");
    for chunk_size in [1, 3, 47, 48, 49, 65, 4096, encoded.len()] {
        let mut decoder = pipeline.decoder(Vec::new()).unwrap();
        for chunk in encoded.chunks(chunk_size) {
            decoder.update(chunk).unwrap();
        }
        let (decoded_digest, decoded) = decoder.finish().unwrap();
        assert_eq!(decoded_digest, digest);
        assert!(decoded == original, "chunk size {chunk_size}");
    }
    for empty in [encode_with(&pipeline, b""), encode_with(&Pipeline::zstd(1), b"")] {
        assert_eq!(decode_with(&pipeline, &empty).unwrap(), b"");
    }
}

#[test]
fn with_a_further_stage_every_truncation_and_flip_is_detected() {
    let pipeline = scrambling();
    let encoded = encode_with(&pipeline, &sample(100_000));
    for cut in (0..encoded.len()).step_by(499).chain([encoded.len() - 1, encoded.len() - 48, 15, 16, 17, 20]) {
        let err = decode_with(&pipeline, &encoded[..cut]).unwrap_err();
        assert!(matches!(err, DecodeError::Format(_)), "cut at {cut}: {err}");
    }
    for at in (0..encoded.len()).step_by(97).chain([8, 10, 11, 16, 19, encoded.len() - 1]) {
        let mut damaged = encoded.clone();
        damaged[at] ^= 0x40;
        let err = decode_with(&pipeline, &damaged).unwrap_err();
        assert!(matches!(err, DecodeError::Format(_)), "flip at {at}: {err}");
    }
}

#[test]
fn a_stage_refusing_bytes_is_damage_not_a_sink_error() {
    let pipeline = scrambling();
    let mut encoded = encode_with(&pipeline, &sample(10_000));
    encoded[16 + 2 + 10] ^= 0x01; // inside the first chunk's bytes
    let err = decode_with(&pipeline, &encoded).unwrap_err();
    assert!(matches!(err, DecodeError::Format(FormatError::Stage { stage: "scramble", .. })), "{err}");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    // Damage the stage lets through (zstd's input) is still damage, passed back up through it.
    let mut decoder = pipeline.decoder(Vec::new()).unwrap();
    let object = encoder_output_with_bad_zstd(&pipeline);
    let err = decoder.update(&object).and_then(|()| decoder.finish().map(drop)).unwrap_err();
    assert!(matches!(err, DecodeError::Format(FormatError::Corrupt(_))), "{err}");
}

#[test]
fn a_stage_stream_cut_at_a_chunk_boundary_is_damage() {
    let pipeline = scrambling();
    let encoded = encode_with(&pipeline, &sample(5_000));
    let (body, trailer) = encoded[HEADER_LEN..].split_at(encoded.len() - HEADER_LEN - TRAILER_LEN);
    // Walk the chunks to the start of the last one, and leave it out; the trailer stays intact.
    let mut at = SCRAMBLE_HEADER.len();
    while body[at + 1] == 0 {
        at += 3 + body[at] as usize;
    }
    let mut cut = encoded[..HEADER_LEN].to_vec();
    cut.extend_from_slice(&body[..at]);
    cut.extend_from_slice(trailer);
    let err = decode_with(&pipeline, &cut).unwrap_err();
    assert!(matches!(err, DecodeError::Format(FormatError::Stage { .. })), "{err}");
    assert!(err.to_string().contains("before its last chunk"), "{err}");
}

/// An object whose stage layer is intact but whose zstd frame inside it is not.
fn encoder_output_with_bad_zstd(pipeline: &Pipeline) -> Vec<u8> {
    let mut header = encode_with(pipeline, b"")[..HEADER_LEN].to_vec();
    let mut stage = Scramble.encoder().unwrap();
    let mut body = Vec::new();
    stage.update(b"this is not a zstd frame at all", &mut body).unwrap();
    stage.finish(&mut body).unwrap();
    header.extend(body);
    header.extend_from_slice(&[0u8; 40]);
    header.extend_from_slice(b"WSEND\0\0\x01");
    header
}

#[test]
fn headers_name_the_stages_a_reader_needs() {
    let staged = encode_with(&scrambling(), &sample(1000));
    // A walship without further stages reads exactly what it read before: version 1.
    let err = decode_with(&Pipeline::zstd(1), &staged).unwrap_err();
    assert!(matches!(err, DecodeError::Format(FormatError::UnsupportedVersion(2))), "{err}");
    let mut unknown = staged.clone();
    unknown[11] = 0x77;
    let err = decode_with(&scrambling(), &unknown).unwrap_err();
    assert!(matches!(err, DecodeError::Format(FormatError::UnknownStage(0x77))), "{err}");
    // Objects written before a stage was configured stay readable.
    let plain = encode_with(&Pipeline::zstd(1), &sample(1000));
    assert_eq!(decode_with(&scrambling(), &plain).unwrap(), sample(1000));
}

#[test]
fn sink_failures_are_not_called_corruption_through_a_stage_or_a_pump() {
    let original = sample(300_000);
    for pipeline in [Pipeline::zstd(1), scrambling()] {
        let encoded = encode_with(&pipeline, &original);
        let mut decoder = pipeline.decoder(Full).unwrap();
        assert!(matches!(decoder.update(&encoded), Err(DecodeError::Sink(_))));
        assert!(matches!(pipeline.decode(&encoded[..], Full), Err(PumpError::Sink(_))));
        assert!(matches!(pipeline.encode(&original[..], Full), Err(PumpError::Sink(_))));
        assert!(matches!(pipeline.decode(Failing, Vec::new()), Err(PumpError::Source(_))));
        assert!(matches!(pipeline.encode(Failing, Vec::new()), Err(PumpError::Source(_))));
        let buffered = || io::BufWriter::new(Full);
        assert!(matches!(pipeline.decode(&encoded[..10_000], buffered()), Err(PumpError::Format(_))));
        let tiny = encode_with(&pipeline, b"tiny");
        assert!(matches!(pipeline.decode(&tiny[..], buffered()), Err(PumpError::Sink(_))), "the flush counts");
        assert!(matches!(pipeline.encode(&b"tiny"[..], buffered()), Err(PumpError::Sink(_))), "the flush counts");
    }
}

struct Full;
impl Write for Full {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Failing;
impl io::Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

#[test]
fn the_pull_forms_round_trip() {
    use std::io::Read as _;
    let original = sample(3 * 1024 * 1024 + 1);
    for pipeline in [Pipeline::zstd(1), scrambling()] {
        let mut encoded = pipeline.encoded(&original[..]).unwrap();
        let mut object = Vec::new();
        loop {
            let chunk = encoded.next_chunk(300_000).unwrap();
            if chunk.is_empty() {
                break;
            }
            object.extend(chunk);
        }
        assert_eq!(encoded.digest(), Some(ContentDigest::of(&original)));
        assert_eq!((encoded.original_bytes(), encoded.stored_bytes()), (original.len() as u64, object.len() as u64));
        assert!(object == encode_with(&pipeline, &original));
        let mut decoded = pipeline.decoded(&object[..]).unwrap();
        let mut back = Vec::new();
        let mut buf = vec![0u8; 7_777];
        loop {
            match decoded.read_decoded(&mut buf).unwrap() {
                0 => break,
                n => back.extend_from_slice(&buf[..n]),
            }
        }
        assert!(back == original);
        assert_eq!(decoded.digest(), Some(ContentDigest::of(&original)));
        assert_eq!(decoded.stored_bytes(), object.len() as u64);
        // The std forms: io::copy through both.
        let mut via_read = Vec::new();
        io::copy(&mut pipeline.encoded(&original[..]).unwrap(), &mut via_read).unwrap();
        let mut again = Vec::new();
        pipeline.decoded(&via_read[..]).unwrap().read_to_end(&mut again).unwrap();
        assert!(again == original);
    }
}

#[test]
fn the_pull_decoder_reports_damage_only_as_damage() {
    use std::io::Read as _;
    let encoded = encode_with(&Pipeline::zstd(1), &sample(200_000));
    let mut decoded = Pipeline::default().decoded(&encoded[..encoded.len() - 1]).unwrap();
    let mut sink = Vec::new();
    let err = decoded.read_to_end(&mut sink).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<FormatError>());
    assert!(matches!(inner, Some(FormatError::Truncated(_))), "{err}");
    assert_eq!(decoded.digest(), None);
    let mut failing = Pipeline::default().decoded(Failing).unwrap();
    assert_eq!(failing.read(&mut [0u8; 16]).unwrap_err().raw_os_error(), Some(libc::EIO));
}

#[tokio::test]
async fn the_async_pump_decodes_checks_and_tells_the_sink_apart() {
    let original = sample(1_000_003);
    for pipeline in [Pipeline::zstd(1), scrambling()] {
        let mut encoded = Vec::new();
        let written = pipeline.encode(&original[..], &mut encoded).unwrap();
        assert_eq!(written, Pumped { digest: ContentDigest::of(&original), stored_bytes: encoded.len() as u64 });
        let mut decoded = Vec::new();
        let read = pipeline.decode_async(&encoded[..], &mut decoded).await.unwrap();
        assert_eq!(read, written);
        assert!(decoded == original);
        let err = pipeline.decode_async(&encoded[..encoded.len() - 1], Vec::new()).await.unwrap_err();
        assert!(matches!(err, PumpError::Format(FormatError::Truncated(_))), "{err}");
        // A pipe whose reading end is gone fails every write.
        let (full, gone) = tokio::io::duplex(64);
        drop(gone);
        let err = pipeline.decode_async(&encoded[..], full).await.unwrap_err();
        assert!(matches!(err, PumpError::Sink(_)), "{err}");
        let mut prefix = Prefix::new(1000);
        assert_eq!(pipeline.decode_async(&encoded[..], &mut prefix).await.unwrap(), written);
        assert_eq!(prefix.into_bytes(), &original[..1000]);
    }
}
