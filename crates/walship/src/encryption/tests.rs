//! The age stage through the whole pipeline: what a reader with the right, a wrong or no key gets,
//! and that no byte of an object can change unnoticed.

use std::sync::Arc;

use super::*;
use crate::codec::{DecodeError, FormatError, Pipeline};

fn key_pair() -> (KeyId, age::x25519::Identity, age::x25519::Recipient) {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public();
    (KeyId::of(&recipient), identity, recipient)
}

fn named(id: KeyId, identity: age::x25519::Identity) -> NamedIdentity {
    NamedIdentity { id, identity, file: "/keys/test.key".into() }
}

fn writer_for(recipients: &[(KeyId, age::x25519::Recipient)]) -> Pipeline {
    let config = EncryptionConfig { writing: Some(Writing::Recipients(recipients.to_vec())), ..Default::default() };
    Pipeline::zstd(1).then(Arc::new(AgeStage::new(Arc::new(config))))
}

fn reader_with(identities: Vec<NamedIdentity>, passphrase: Option<&str>, accept_plain: bool) -> Pipeline {
    let config = EncryptionConfig {
        identities,
        passphrase: passphrase.map(|p| p.to_owned().into()),
        accept_plain,
        ..Default::default()
    };
    let pipeline = Pipeline::default().then(Arc::new(AgeStage::new(Arc::new(config))));
    if accept_plain { pipeline } else { pipeline.refusing_plain() }
}

fn encode(pipeline: &Pipeline, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = pipeline.encoder().unwrap();
    for piece in bytes.chunks(100_000) {
        encoder.update(piece, &mut out).unwrap();
    }
    encoder.finish(&mut out).unwrap();
    out
}

fn format_error(result: Result<Vec<u8>, DecodeError>) -> FormatError {
    match result {
        Err(DecodeError::Format(e)) => e,
        other => panic!("expected a format error, got {:?}", other.map(|v| v.len())),
    }
}

/// Content that compresses poorly, so that several 64 KiB chunks of ciphertext are written.
fn content(len: usize) -> Vec<u8> {
    let mut state = 0x1234_5678_u32;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

#[test]
fn what_is_written_for_a_key_reads_back_with_it_and_holds_no_plaintext() {
    let (id, identity, recipient) = key_pair();
    let mut original = content(300_000);
    original.extend_from_slice(b"a row the bucket must never see");
    original.extend(std::iter::repeat_n(b'x', 200_000));
    let stored = encode(&writer_for(&[(id, recipient)]), &original);
    assert_eq!(&stored[8..10], &[2, 0], "format version 2");
    assert_eq!(&stored[10..12], &[1, AGE_STAGE_ID], "zstd, then age");
    assert!(!stored.windows(31).any(|w| w == b"a row the bucket must never see"));
    assert_eq!(reader_with(vec![named(id, identity)], None, false).decode_bytes(&stored).unwrap(), original);
}

#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let (id, identity, recipient) = key_pair();
    let original = content(150_000);
    let stored = encode(&writer_for(&[(id, recipient)]), &original);
    let reader = reader_with(vec![named(id, identity)], None, false);
    // Every byte of the header, framing, age header and trailer, and a stride through the chunks.
    let positions: Vec<usize> =
        (0..400).chain((400..stored.len()).step_by(997)).chain(stored.len() - 100..stored.len()).collect();
    for at in positions {
        let mut damaged = stored.clone();
        damaged[at] ^= 0x01;
        let result = reader.decode_bytes(&damaged);
        assert!(result.is_err(), "a flipped byte at {at} of {} was accepted", stored.len());
        // Damage, never taken for a wrong key: the key ids are hints, the seal decides.
        if let Err(DecodeError::Format(e)) = result {
            assert!(!e.is_encryption(), "byte {at}: {e}");
        }
    }
    for cut in [stored.len() - 1, stored.len() - 49, stored.len() / 2, 20] {
        assert!(reader.decode_bytes(&stored[..cut]).is_err(), "cut at {cut} was accepted");
    }
}

#[test]
fn a_wrong_or_missing_key_is_an_encryption_error_naming_the_key_ids() {
    let (id, _, recipient) = key_pair();
    let (other_id, other, _) = key_pair();
    let stored = encode(&writer_for(&[(id, recipient)]), b"segment");
    let e = format_error(reader_with(vec![named(other_id, other)], None, false).decode_bytes(&stored));
    assert!(e.is_encryption(), "{e}");
    let text = e.to_string();
    assert!(text.contains(&id.to_string()) && text.contains(&other_id.to_string()), "{text}");
    let e = format_error(reader_with(vec![], None, false).decode_bytes(&stored));
    assert!(e.is_encryption() && e.to_string().contains("no identity_files"), "{e}");
    let e = format_error(Pipeline::default().decode_bytes(&stored));
    assert!(e.is_encryption() && e.to_string().contains("no [encryption]"), "{e}");
}

#[test]
fn after_a_change_of_recipients_both_identities_read_everything() {
    let (old_id, old, old_recipient) = key_pair();
    let (new_id, new, new_recipient) = key_pair();
    let before = encode(&writer_for(&[(old_id, old_recipient)]), b"written before the change");
    let after = encode(&writer_for(&[(new_id, new_recipient)]), b"written after the change");
    let reader = reader_with(vec![named(new_id, new.clone()), named(old_id, old)], None, false);
    assert_eq!(reader.decode_bytes(&before).unwrap(), b"written before the change");
    assert_eq!(reader.decode_bytes(&after).unwrap(), b"written after the change");
    let only_new = reader_with(vec![named(new_id, new)], None, false);
    let e = format_error(only_new.decode_bytes(&before));
    assert!(e.is_encryption() && e.to_string().contains(&old_id.to_string()), "{e}");
}

#[test]
fn plain_objects_are_refused_unless_accepted() {
    let (id, identity, _) = key_pair();
    let plain = encode(&Pipeline::zstd(1), b"written before encryption");
    let e = format_error(reader_with(vec![named(id, identity.clone())], None, false).decode_bytes(&plain));
    assert!(e.is_encryption() && e.to_string().contains("accept_plain"), "{e}");
    let accepting = reader_with(vec![named(id, identity)], None, true);
    assert_eq!(accepting.decode_bytes(&plain).unwrap(), b"written before encryption");
}

#[test]
fn a_passphrase_writes_and_reads_and_a_wrong_one_is_told_from_damage() {
    let passphrase = "correct horse battery staple and more";
    let config = EncryptionConfig {
        writing: Some(Writing::Passphrase { passphrase: passphrase.to_owned().into(), work_factor: 2 }),
        ..Default::default()
    };
    let writer = Pipeline::zstd(1).then(Arc::new(AgeStage::new(Arc::new(config))));
    let original = content(100_000);
    let stored = encode(&writer, &original);
    assert_eq!(reader_with(vec![], Some(passphrase), false).decode_bytes(&stored).unwrap(), original);
    let e = format_error(reader_with(vec![], Some("another passphrase entirely, long"), false).decode_bytes(&stored));
    assert!(e.is_encryption() && e.to_string().contains("passphrase does not open"), "{e}");
    let mut damaged = stored.clone();
    damaged[40] ^= 0x01;
    let e = format_error(reader_with(vec![], Some(passphrase), false).decode_bytes(&damaged));
    assert!(!e.is_encryption(), "damage is not a wrong passphrase: {e}");
}

#[tokio::test]
async fn a_host_without_a_key_checks_the_seal_and_reads_the_digest() {
    let (id, _, recipient) = key_pair();
    let original = content(200_000);
    let stored = encode(&writer_for(&[(id, recipient)]), &original);
    let digest = crate::codec::ContentDigest::of(&original);
    assert_eq!(check_sealed(&stored[..]).await.unwrap(), Sealed::Whole { digest, stored: stored.len() as u64 });
    for at in [17, 100, stored.len() / 2, stored.len() - 60] {
        let mut damaged = stored.clone();
        damaged[at] ^= 0x01;
        assert!(matches!(check_sealed(&damaged[..]).await, Err(Err(_))), "byte {at}");
    }
    let plain = encode(&Pipeline::zstd(1), b"plain");
    assert_eq!(check_sealed(&plain[..]).await.unwrap(), Sealed::Plain);
}

/// Decryption streams: by the time the last stored byte is in, all but a chunk or so of the
/// plaintext has been handed on, so memory stays bounded whatever the object's size.
#[test]
fn decryption_streams_rather_than_holding_the_object() {
    let (id, identity, recipient) = key_pair();
    let original = content(4 << 20);
    let stored = encode(&writer_for(&[(id, recipient)]), &original);
    let reader = reader_with(vec![named(id, identity)], None, false);
    let handed_on = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut decoder = reader.decoder(Counting(handed_on.clone(), Vec::new())).unwrap();
    for piece in stored.chunks(64 << 10) {
        decoder.update(piece).unwrap();
    }
    let before_finish = handed_on.load(std::sync::atomic::Ordering::SeqCst);
    let (_, out) = decoder.finish().unwrap();
    assert!(out.1 == original);
    assert!(
        before_finish + (256 << 10) >= original.len(),
        "only {before_finish} of {} bytes handed on before the end",
        original.len()
    );
}

struct Counting(Arc<std::sync::atomic::AtomicUsize>, Vec<u8>);

impl std::io::Write for Counting {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(bytes.len(), std::sync::atomic::Ordering::SeqCst);
        self.1.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the `[encryption]` table refuses, each naming the key at fault and never quoting a key:
/// recipients and a passphrase at once, a work factor out of range, key files by relative path.
#[test]
fn the_encryption_table_refuses_what_it_cannot_honour() {
    use std::os::unix::fs::PermissionsExt;
    let (_, _, recipient) = key_pair();
    let dir = tempfile::tempdir().unwrap();
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, "a long random passphrase of forty characters\n").unwrap();
    std::fs::set_permissions(&passphrase, std::fs::Permissions::from_mode(0o600)).unwrap();
    let table = |text: &str| -> EncryptionTable { toml::from_str(text).unwrap() };
    let file = format!("passphrase_file = {:?}", passphrase.display().to_string());
    let refused = [
        (format!("recipients = [\"{recipient}\"]\n{file}"), "recipients and passphrase_file are both set"),
        (format!("{file}\npassphrase_work_factor = 21"), "passphrase_work_factor = 21: expected 1 to 20"),
        (format!("{file}\npassphrase_work_factor = 0"), "passphrase_work_factor = 0: expected 1 to 20"),
        ("identity_files = [\"keys/k.key\"]".to_owned(), "identity_files: \"keys/k.key\" must be an absolute path"),
        ("passphrase_file = \"passphrase\"".to_owned(), "passphrase_file = \"passphrase\" must be an absolute path"),
    ];
    for (text, needle) in refused {
        let err = EncryptionConfig::from_table(table(&text)).err().unwrap_or_else(|| panic!("{text} was taken"));
        assert!(err.contains(needle), "{text}: {err}");
        assert!(!err.contains(&recipient.to_string()), "a key quoted: {err}");
    }
    let highest = EncryptionConfig::from_table(table(&format!("{file}\npassphrase_work_factor = 20")));
    assert!(highest.is_ok(), "work factor 20 is within the range");
}

/// An age header that never ends is refused once it passes 64 KiB, rather than held without bound.
#[test]
fn an_age_header_without_an_end_is_refused_after_64_kib() {
    let (id, identity, recipient) = key_pair();
    let stored = encode(&writer_for(&[(id, recipient)]), b"some content");
    let framing_end = crate::codec::HEADER_LEN + 3 + 8;
    let mut crafted = stored[..framing_end].to_vec();
    crafted.extend_from_slice(b"age-encryption.org/v1\n");
    while crafted.len() < framing_end + (80 << 10) {
        crafted.extend_from_slice(b"-> X25519 c3RhbnphIHRoYXQgbmV2ZXIgZW5kcw\nc3RhbnphIGJvZHk\n");
    }
    crafted.extend_from_slice(&stored[stored.len() - super::stage::SEAL_LEN - crate::codec::TRAILER_LEN..]);
    let e = format_error(reader_with(vec![named(id, identity)], None, false).decode_bytes(&crafted));
    assert!(e.to_string().contains("no end to the age header in its first 64 KiB"), "{e}");
}
