//! The age stage: what encryption adds to an object's body, after compression.
//!
//! ```text
//! framing  version 1 | kind (1: recipients, 2: passphrase) | n | n key ids (8 bytes each)
//! age      an age file (binary): header with one stanza per recipient, nonce, 64 KiB chunks
//! seal     CRC-64/NVME of framing and age, big-endian (8 bytes)
//! ```
//!
//! The key ids name who the object was written for, so that "no key fits" can say which key is
//! missing; they are hints, not trusted: every configured key is tried. The seal lets a host with
//! public keys only (the archive host) check that a stored object is whole before it tells PostgreSQL
//! that a segment is safely archived; it protects against damage, not against someone who rewrites
//! the object (age's authentication, with a key, does that). The age crate does the cryptography; it
//! reads from a `Read`, so the decoder hands it the stored bytes through a small queue that says "would
//! block" until more arrive, which age's stream reader resumes from.

use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use age::secrecy::SecretString;

use super::keys::KEY_ID_LEN;
use super::{EncryptionConfig, KeyId, Writing};
use crate::codec::{FormatError, HoldBack, Next, Stage, StageDecoder, StageEncoder, StageError};

/// The byte that names the age stage in an object's header (the codec reserves it).
pub const AGE_STAGE_ID: u8 = crate::codec::AGE_ID;
const FRAMING_VERSION: u8 = 1;
const KIND_RECIPIENTS: u8 = 1;
const KIND_PASSPHRASE: u8 = 2;
/// Length of the seal.
pub(super) const SEAL_LEN: usize = 8;
/// An age header with a few recipients is a few hundred bytes; this bounds what is held looking for
/// its end.
const MAX_AGE_HEADER: usize = 64 * 1024;
/// How much plaintext the decoder passes on at a time (age's chunk size).
const PIECE: usize = 64 * 1024;
/// The highest scrypt work factor accepted when reading: the configurable range's top.
const MAX_READ_WORK_FACTOR: u8 = 20;

/// Encryption with age, configured once; cheap to share between objects and threads.
pub struct AgeStage {
    keys: Arc<Keys>,
}

/// The configuration, and age's keys made from it once, when first needed: an scrypt identity or
/// recipient times scrypt on this machine as it is made, which is work for a process, not for each
/// object.
struct Keys {
    config: Arc<EncryptionConfig>,
    reading: OnceLock<Vec<Box<dyn age::Identity + Send + Sync>>>,
    passphrase_recipient: OnceLock<age::scrypt::Recipient>,
}

impl AgeStage {
    /// The stage for `config`: it writes for `config.writing` and reads with every key `config` has.
    pub fn new(config: Arc<EncryptionConfig>) -> Self {
        AgeStage { keys: Arc::new(Keys { config, reading: OnceLock::new(), passphrase_recipient: OnceLock::new() }) }
    }
}

impl Keys {
    /// Every key reading tries: the identities, then the passphrase.
    fn reading(&self) -> &[Box<dyn age::Identity + Send + Sync>] {
        self.reading.get_or_init(|| {
            let mut identities: Vec<Box<dyn age::Identity + Send + Sync>> = Vec::new();
            for named in &self.config.identities {
                identities.push(Box::new(named.identity.clone()));
            }
            if let Some(passphrase) = &self.config.passphrase {
                let mut identity = age::scrypt::Identity::new(passphrase.clone());
                identity.set_max_work_factor(MAX_READ_WORK_FACTOR);
                identities.push(Box::new(identity));
            }
            identities
        })
    }

    /// The recipient objects written with `passphrase` are encrypted for.
    fn passphrase_recipient(&self, passphrase: &SecretString, work_factor: u8) -> &age::scrypt::Recipient {
        self.passphrase_recipient.get_or_init(|| {
            let mut recipient = age::scrypt::Recipient::new(passphrase.clone());
            recipient.set_work_factor(work_factor);
            recipient
        })
    }
}

impl Stage for AgeStage {
    fn id(&self) -> u8 {
        AGE_STAGE_ID
    }

    fn name(&self) -> &'static str {
        "age"
    }

    fn encoder(&self) -> io::Result<Box<dyn StageEncoder>> {
        let (framing, encryptor) = match &self.keys.config.writing {
            None => return Err(io::Error::other("no recipients or passphrase configured to encrypt for")),
            Some(Writing::Recipients(list)) => {
                let mut framing = vec![FRAMING_VERSION, KIND_RECIPIENTS, list.len() as u8];
                list.iter().for_each(|(id, _)| framing.extend_from_slice(&id.0));
                let encryptor = age::Encryptor::with_recipients(list.iter().map(|(_, r)| r as &dyn age::Recipient))
                    .map_err(|e| io::Error::other(e.to_string()))?;
                (framing, encryptor)
            }
            Some(Writing::Passphrase { passphrase, work_factor }) => {
                let recipient = self.keys.passphrase_recipient(passphrase, *work_factor);
                let encryptor = age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
                    .map_err(|e| io::Error::other(e.to_string()))?;
                (vec![FRAMING_VERSION, KIND_PASSPHRASE, 0], encryptor)
            }
        };
        let shared = Shared::default();
        let writer = encryptor.wrap_output(shared.clone())?;
        Ok(Box::new(AgeEncoder { framing: Some(framing), writer, shared, seal: Seal::new() }))
    }

    fn decoder(&self) -> io::Result<Box<dyn StageDecoder>> {
        Ok(Box::new(AgeDecoder {
            keys: self.keys.clone(),
            held: HoldBack::new(SEAL_LEN),
            seal: Seal::new(),
            state: State::Framing(Vec::new()),
            scratch: vec![0u8; PIECE],
        }))
    }
}

/// Where age's writer puts ciphertext until the encoder hands it on.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn drain_into(&self, seal: &mut Seal, out: &mut Vec<u8>) {
        let mut bytes = self.0.lock().expect("not poisoned");
        seal.update(&bytes[..]);
        // Between stages `out` starts empty: take the buffer rather than copy it.
        if out.is_empty() {
            std::mem::swap(out, &mut *bytes);
        } else {
            out.append(&mut bytes);
        }
    }
}

/// The seal over the stage's output (framing and age): CRC-64/NVME, big-endian. It tells a whole
/// object from a damaged one on a host without a key, and a wrong passphrase from damage on one with
/// it; authenticity is age's MAC, which no unkeyed checksum could give anyway (someone holding the
/// bucket can recompute any of them). A CRC with carry-less multiplication costs a fraction of what
/// SHA-256 did on this path, which was a third of what encryption added to a local restore.
#[derive(Clone)]
pub(super) struct Seal(crc_fast::Digest);

impl Seal {
    pub(super) fn new() -> Self {
        Seal(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme))
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(super) fn bytes(&self) -> [u8; SEAL_LEN] {
        self.0.finalize().to_be_bytes()
    }
}

struct AgeEncoder {
    framing: Option<Vec<u8>>,
    writer: age::stream::StreamWriter<Shared>,
    shared: Shared,
    seal: Seal,
}

impl AgeEncoder {
    fn take_framing(&mut self, out: &mut Vec<u8>) {
        if let Some(framing) = self.framing.take() {
            self.seal.update(&framing);
            out.extend_from_slice(&framing);
        }
    }
}

impl StageEncoder for AgeEncoder {
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.take_framing(out);
        self.writer.write_all(input)?;
        self.shared.drain_into(&mut self.seal, out);
        Ok(())
    }

    fn finish(mut self: Box<Self>, out: &mut Vec<u8>) -> io::Result<()> {
        self.take_framing(out);
        let AgeEncoder { writer, shared, mut seal, .. } = *self;
        writer.finish()?;
        shared.drain_into(&mut seal, out);
        out.extend_from_slice(&seal.bytes());
        Ok(())
    }
}

/// The stored bytes age reads: "would block" while empty, end of file once ended. Emptied by
/// [`pass_on`] after every push, so it holds little more than what one push brings.
#[derive(Clone, Default)]
struct Feed(Arc<Mutex<FeedState>>);

#[derive(Default)]
struct FeedState {
    bytes: Vec<u8>,
    /// How much of `bytes` age has read.
    read: usize,
    ended: bool,
}

impl Feed {
    fn push(&self, bytes: &[u8]) {
        let mut state = self.0.lock().expect("not poisoned");
        let read = std::mem::take(&mut state.read);
        state.bytes.drain(..read);
        state.bytes.extend_from_slice(bytes);
    }

    fn end(&self) {
        self.0.lock().expect("not poisoned").ended = true;
    }
}

impl Read for Feed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut state = self.0.lock().expect("not poisoned");
        let unread = &state.bytes[state.read..];
        if unread.is_empty() {
            return if state.ended { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        let n = unread.len().min(out.len());
        out[..n].copy_from_slice(&unread[..n]);
        state.read += n;
        Ok(n)
    }
}

/// Who an object says it was written for.
struct Framing {
    kind: u8,
    ids: Vec<KeyId>,
}

enum State {
    /// Collecting the framing.
    Framing(Vec<u8>),
    /// Collecting age's header and nonce.
    Header(Framing, Vec<u8>),
    /// Decrypting.
    Stream(Box<age::stream::StreamReader<Feed>>, Feed),
    /// No key opened it; the rest is only sealed-checked, so that damage is told from a wrong key.
    Refused(FormatError),
}

struct AgeDecoder {
    keys: Arc<Keys>,
    /// The last bytes seen: the seal, once the stream ends.
    held: HoldBack,
    seal: Seal,
    state: State,
    scratch: Vec<u8>,
}

impl StageDecoder for AgeDecoder {
    fn update(&mut self, input: &[u8], next: &mut Next<'_>) -> Result<(), StageError> {
        // Everything but the last SEAL_LEN bytes seen so far is framing and age.
        let (released, body) = self.held.push(input);
        self.consume(&released, next)?;
        self.consume(body, next)
    }

    fn finish(mut self: Box<Self>, next: &mut Next<'_>) -> Result<(), StageError> {
        let sealed = self.held.held().len() == SEAL_LEN && self.seal.bytes()[..] == *self.held.held();
        if !sealed {
            return Err(damaged("the seal does not match its content: the object was altered or cut short").into());
        }
        match std::mem::replace(&mut self.state, State::Framing(Vec::new())) {
            State::Stream(mut reader, feed) => {
                feed.end();
                pass_on(&mut reader, &mut self.scratch, next)?;
                Ok(())
            }
            State::Refused(error) => Err(error.into()),
            State::Framing(_) | State::Header(..) => {
                Err(FormatError::Truncated("the encrypted body ends inside its header".into()).into())
            }
        }
    }
}

impl AgeDecoder {
    /// Takes the next framing-and-age bytes: collects the framing and age's header, then decrypts.
    fn consume(&mut self, bytes: &[u8], next: &mut Next<'_>) -> Result<(), StageError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.seal.update(bytes);
        match &mut self.state {
            State::Framing(collected) => {
                collected.extend_from_slice(bytes);
                if let Some((framing, used)) = parse_framing(collected)? {
                    let rest = collected.split_off(used);
                    self.state = State::Header(framing, Vec::new());
                    return self.consume_unsealed(&rest, next);
                }
                Ok(())
            }
            _ => self.consume_unsealed(bytes, next),
        }
    }

    /// [`consume`](Self::consume) for bytes the seal has already taken.
    fn consume_unsealed(&mut self, bytes: &[u8], next: &mut Next<'_>) -> Result<(), StageError> {
        match &mut self.state {
            State::Framing(_) => unreachable!("the framing is complete"),
            State::Header(_, pending) => {
                pending.extend_from_slice(bytes);
                if let Some((reader, feed)) = self.open()? {
                    self.state = State::Stream(Box::new(reader), feed);
                    if let State::Stream(reader, _) = &mut self.state {
                        pass_on(reader, &mut self.scratch, next)?;
                    }
                }
                Ok(())
            }
            State::Stream(reader, feed) => {
                feed.push(bytes);
                pass_on(reader, &mut self.scratch, next)
            }
            State::Refused(_) => Ok(()),
        }
    }

    /// Once age's header and nonce are all here, opens the stream with the configured keys. A key
    /// that does not fit ends decryption: for a passphrase, whether it is wrong or the object damaged
    /// is only known from the seal, at the end; for key ids, at once.
    fn open(&mut self) -> Result<Option<(age::stream::StreamReader<Feed>, Feed)>, StageError> {
        let State::Header(framing, pending) = &self.state else { unreachable!("called while collecting the header") };
        let mut probe = Cursor::new(&pending[..]);
        match age::Decryptor::new(&mut probe) {
            Ok(_) => {}
            Err(age::DecryptError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                if pending.len() > MAX_AGE_HEADER {
                    return Err(damaged("no end to the age header in its first 64 KiB").into());
                }
                return Ok(None);
            }
            Err(e) => return Err(damaged(&format!("the age header is invalid: {e}")).into()),
        }
        let feed = Feed::default();
        feed.push(pending);
        let decryptor = age::Decryptor::new(feed.clone()).map_err(|e| damaged(&e.to_string()))?;
        match decryptor.decrypt(self.keys.reading().iter().map(|i| i.as_ref() as &dyn age::Identity)) {
            Ok(reader) => Ok(Some((reader, feed))),
            Err(error) => {
                let defer = framing.kind == KIND_PASSPHRASE && self.keys.config.passphrase.is_some();
                let refusal = refusal(&self.keys.config, framing, error);
                if defer {
                    self.state = State::Refused(refusal);
                    return Ok(None);
                }
                Err(refusal.into())
            }
        }
    }
}

/// Passes on whatever plaintext age can produce from what it has been fed so far.
fn pass_on(
    reader: &mut age::stream::StreamReader<Feed>,
    scratch: &mut [u8],
    next: &mut Next<'_>,
) -> Result<(), StageError> {
    loop {
        match reader.read(scratch) {
            Ok(0) => return Ok(()),
            Ok(n) => next(&scratch[..n])?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(FormatError::Truncated("the encrypted body ends before its last chunk".into()).into());
            }
            Err(e) => return Err(damaged(&format!("a chunk failed authentication ({e})")).into()),
        }
    }
}

/// Parses a complete framing: `None` while more bytes are needed, with how many bytes it took.
fn parse_framing(bytes: &[u8]) -> Result<Option<(Framing, usize)>, FormatError> {
    let [version, kind, count, ..] = *bytes else { return Ok(None) };
    if version != FRAMING_VERSION {
        return Err(damaged(&format!("unknown encryption framing version {version}")));
    }
    if kind != KIND_RECIPIENTS && kind != KIND_PASSPHRASE {
        return Err(damaged(&format!("unknown encryption kind {kind}")));
    }
    let used = 3 + KEY_ID_LEN * count as usize;
    if bytes.len() < used {
        return Ok(None);
    }
    let ids = bytes[3..used].chunks(KEY_ID_LEN).map(|c| KeyId(c.try_into().expect("8 bytes"))).collect();
    Ok(Some((Framing { kind, ids }, used)))
}

/// Why no configured key opened an object: a wrong or missing key (the encryption error), or damage
/// where the object names a key this host has.
fn refusal(config: &EncryptionConfig, framing: &Framing, error: age::DecryptError) -> FormatError {
    let ours = config.identity_ids();
    let written_for = framing.ids.iter().map(KeyId::to_string).collect::<Vec<_>>().join(", ");
    let have = if ours.is_empty() {
        "no identity_files are configured".to_owned()
    } else {
        format!("the configured identities are {}", ours.iter().map(KeyId::to_string).collect::<Vec<_>>().join(", "))
    };
    match (framing.kind, error) {
        (KIND_PASSPHRASE, _) if config.passphrase.is_none() => FormatError::Encryption(
            "encrypted with a passphrase, and no passphrase_file is configured to open it".into(),
        ),
        (KIND_PASSPHRASE, age::DecryptError::ExcessiveWork { required, .. }) => FormatError::Encryption(format!(
            "its passphrase work factor {required} is above the {MAX_READ_WORK_FACTOR} this walship accepts"
        )),
        (KIND_PASSPHRASE, _) => FormatError::Encryption("the configured passphrase does not open it".into()),
        (_, age::DecryptError::NoMatchingKeys) if framing.ids.iter().any(|id| ours.contains(id)) => {
            damaged(&format!("written for key {written_for}, which is configured, but that key does not open it"))
        }
        (_, age::DecryptError::NoMatchingKeys) => {
            FormatError::Encryption(format!("written for key {written_for}, and {have}: no identity fits"))
        }
        (_, e) => damaged(&format!("the age header does not open: {e}")),
    }
}

fn damaged(reason: &str) -> FormatError {
    // Some of age's messages run over several lines ("Unknown age format.\nHave you tried upgrading
    // to the latest version?"); an error is one line.
    let reason = reason.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    FormatError::Stage { stage: "age", reason }
}
