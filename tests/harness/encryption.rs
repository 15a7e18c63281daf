//! Helpers for the end-to-end encryption scenarios (tests/encryption.rs): commands whose every output
//! is checked for key material, configuration files with an `[encryption]` table for any repository,
//! and looking into (and damaging) the stored objects' framing.
//!
//! An encrypted object, as `crates/walship/src/encryption/stage.rs` writes it:
//!
//! ```text
//! header 16 | framing: version, kind, n, n key ids of 8 | age file | seal 32 | trailer 48
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::repository::{ConfigLines, Repository};
use crate::{Output, walship};

/// Where the age stage's framing starts: right after the codec header.
pub const FRAMING_AT: usize = walship::codec::HEADER_LEN;
/// The seal's length (CRC-64/NVME).
pub const SEAL_LEN: usize = 8;
/// The codec trailer's length.
pub const TRAILER_LEN: usize = walship::codec::TRAILER_LEN;

/// Every passphrase a scenario made, so that no output may carry one.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Remembers `secret` (a passphrase read back from its file): [`checked`] refuses any output holding
/// it from now on.
pub fn remember_secret(secret: &str) {
    SECRETS.lock().unwrap().push(secret.trim().to_owned());
}

/// Panics if `text` (an output, a server log) carries a private key or a remembered passphrase.
#[track_caller]
pub fn assert_no_secret(what: &str, text: &str) {
    assert!(!text.contains("AGE-SECRET-KEY"), "{what} shows a private key: {text}");
    for secret in SECRETS.lock().unwrap().iter() {
        assert!(!text.contains(secret.as_str()), "{what} shows a passphrase: {text}");
    }
}

/// `out`, after checking that neither stream carries key material.
#[track_caller]
pub fn checked(out: Output) -> Output {
    assert_no_secret("stdout", &out.stdout);
    assert_no_secret("stderr", &out.stderr);
    out
}

/// Runs `cmd` and [`checks`](checked) its output.
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    checked(crate::run(cmd))
}

/// A walship binary run from `cwd`, with the SSH server's scratch HOME on SSH (nobody's own
/// `~/.ssh` takes part).
pub fn command(repo: &Repository, program: &str, cwd: &Path) -> Command {
    let mut cmd = walship(program);
    cmd.current_dir(cwd);
    if let Some(server) = repo.ssh_server() {
        cmd.env("HOME", server.client_home());
    }
    cmd
}

/// `--config FILE`.
pub fn config_args(config: &Path) -> Vec<OsString> {
    vec!["--config".into(), config.into()]
}

/// zstd at a negative level stores literals as they are (no Huffman coding), so that a row written
/// in the clear shows in a plain object: the search for one in an encrypted repository then means
/// something. (At level 1, the default, literals are Huffman-coded and a marker would not show even
/// without encryption.)
pub const RAW_LITERALS: &str = "compression_level = -7";

/// Writes `dir/name`: a configuration of `repo` with `tables` (an `[encryption]` table, or nothing
/// for a plain one), compressing at [`RAW_LITERALS`].
pub fn config_with(repo: &Repository, dir: &Path, name: &str, tables: &str) -> PathBuf {
    repo.write_config(dir, name, ConfigLines { top: RAW_LITERALS, tables, ..ConfigLines::default() })
}

/// Rewrites the configuration file `path` in place (the next command reads the new text), keeping
/// its owner and mode.
pub fn rewrite_config(repo: &Repository, path: &Path, tables: &str) {
    // Written beside and renamed over, so that an archive_command running meanwhile reads the old
    // file or the new one, never half of one.
    let dir = path.parent().expect("a file in a directory");
    let name = path.file_name().unwrap().to_str().unwrap();
    let staged = config_with(repo, dir, &format!(".{name}.new"), tables);
    std::fs::rename(&staged, path).unwrap_or_else(|e| panic!("rename {staged:?} to {path:?}: {e}"));
}

/// 48 hex digits from /dev/urandom: found in a stored object only if it holds the row in the clear.
pub fn random_marker() -> String {
    let mut bytes = [0u8; 24];
    walship::fs::random_bytes(&mut bytes).expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under the repository's root (hidden ones too) whose bytes contain `needle`.
pub fn files_containing(repo: &Repository, needle: &[u8]) -> Vec<String> {
    repo.files_under("")
        .into_iter()
        .filter(|file| {
            let bytes = std::fs::read(repo.object_file(file)).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

/// The codec header's first further stage (byte 11): 2 for the age stage, 0 in a plain object.
pub fn stage_byte(path: &Path) -> u8 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    bytes[11]
}

/// The key ids (hex) an encrypted object's framing says it was written for.
pub fn framing_key_ids(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    assert_eq!(bytes[11], walship::encryption::AGE_STAGE_ID, "{path:?} is not encrypted");
    let count = bytes[FRAMING_AT + 2] as usize;
    let ids = &bytes[FRAMING_AT + 3..FRAMING_AT + 3 + 8 * count];
    ids.chunks(8).map(|id| id.iter().map(|b| format!("{b:02x}")).collect()).collect()
}

/// One byte of an encrypted object to damage: what it belongs to, where it is, the value to put there.
pub struct Damage {
    pub what: &'static str,
    pub offset: usize,
    pub value: u8,
}

/// One damaged byte in each part of an encrypted object, for damaging one at a time. In age's
/// header (base64 text) a byte is changed both to another base64 character (the stanza or the MAC
/// then fails to open) and to a character base64 does not have (the header does not parse): the two
/// are different errors on age's side.
pub fn places_to_damage(path: &Path) -> Vec<Damage> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let count = bytes[FRAMING_AT + 2] as usize;
    let age_at = FRAMING_AT + 3 + 8 * count;
    assert!(bytes[age_at..].starts_with(b"age-encryption.org/v1\n-> X25519 "), "no age header at {age_at} in {path:?}");
    // The 9th base64 character of the X25519 stanza's share, and the first of the header's MAC.
    let stanza = age_at + 32 + 8;
    let mac_line = bytes[age_at..].windows(5).position(|w| w == b"\n--- ").expect("the age header's MAC line");
    let mac = age_at + mac_line + 5;
    let other_base64 = |at: usize| if bytes[at] == b'A' { b'B' } else { b'A' };
    let flipped = |at: usize| bytes[at] ^ 0x01;
    let len = bytes.len();
    let at = |what, offset: usize, value| Damage { what, offset, value };
    vec![
        at("the header's magic", 3, flipped(3)),
        at("the header's stage id", 11, flipped(11)),
        at("the framing's key id", FRAMING_AT + 5, flipped(FRAMING_AT + 5)),
        at("the age stanza (another base64 character)", stanza, other_base64(stanza)),
        at("the age stanza (not base64)", stanza, b'*'),
        at("the age header's MAC", mac, other_base64(mac)),
        at("the middle", len / 2, flipped(len / 2)),
        at("the seal", len - TRAILER_LEN - SEAL_LEN + 5, flipped(len - TRAILER_LEN - SEAL_LEN + 5)),
        at("the trailer's length", len - TRAILER_LEN + 1, flipped(len - TRAILER_LEN + 1)),
        at("the trailer's checksum", len - TRAILER_LEN + 20, flipped(len - TRAILER_LEN + 20)),
    ]
}

/// Puts `value` at `offset` of the file at `path`; returns the original bytes, to put back with
/// [`put_back`].
pub fn set_byte(path: &Path, offset: usize, value: u8) -> Vec<u8> {
    let original = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut bytes = original.clone();
    assert_ne!(bytes[offset], value, "damage at {offset} of {path:?} changes the byte");
    bytes[offset] = value;
    std::fs::write(path, &bytes).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    original
}

/// Flips one bit of the byte at `offset` of the file at `path`; returns the original bytes, to put
/// back with [`put_back`].
pub fn flip_byte(path: &Path, offset: usize) -> Vec<u8> {
    let original = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut bytes = original.clone();
    bytes[offset] ^= 0x01;
    std::fs::write(path, &bytes).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    original
}

/// Writes `original` back over the file at `path`.
pub fn put_back(path: &Path, original: &[u8]) {
    std::fs::write(path, original).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
}

/// Whether `dir` is missing or empty: nothing was handed over there.
pub fn holds_nothing(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none())
}
