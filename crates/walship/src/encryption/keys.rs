//! Key files and key ids. A key id names a key pair in messages and in stored objects without
//! revealing the public key: knowing a recipient is enough to write objects that decrypt, so the
//! repository never learns one.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::NamedIdentity;

/// The bytes of a key id.
pub const KEY_ID_LEN: usize = 8;
/// An identity or passphrase file larger than this is not one.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The first 8 bytes of SHA-256 over a recipient (public key) as age spells it; shown as 16 hex
/// digits. The same for a key pair's two halves, and not reversible to the public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// The id of `recipient`.
    pub fn of(recipient: &age::x25519::Recipient) -> Self {
        let digest = Sha256::new().chain_update(b"walship key id\0").chain_update(recipient.to_string()).finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses the `number`th (from 1) `recipients` entry (an `age1...` public key). The error never
/// quotes the entry: a private key pasted there by mistake must not reach a log.
pub(super) fn parse_recipient(number: usize, text: &str) -> Result<(KeyId, age::x25519::Recipient), String> {
    let recipient = age::x25519::Recipient::from_str(text.trim()).map_err(|e| {
        let hint = if text.trim_start().starts_with("AGE-SECRET-KEY") {
            " (it is a private key: put the public key here, and the private key's file in identity_files)"
        } else {
            ""
        };
        format!("recipients entry {number} is not an age public key (age1...): {e}{hint}")
    })?;
    Ok((KeyId::of(&recipient), recipient))
}

/// Reads a file holding a secret, refusing it, as ssh refuses such a private key, when it is not a
/// regular file, is owned by another user (other than root), or other users may read or change it.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!("{shown}: owned by uid {}, not by this user (uid {me}) or root: refused", meta.uid()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown}: permissions {mode:04o} let other users read or change it; a key must be readable by its \
             owner only (chmod 600 {shown})"
        ));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(format!("{shown}: {} bytes is far too large for a key file", meta.len()));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
    String::from_utf8(bytes).map_err(|_| format!("{shown}: not text"))
}

/// Reads an identity file as age-keygen (or `walship-key generate`) writes it: `AGE-SECRET-KEY-1...`
/// lines, `#` comments and blank lines. The error names the file and line, never the key.
pub fn load_identity_file(path: &Path) -> Result<Vec<NamedIdentity>, String> {
    let text = read_secret_file(path)?;
    let mut identities = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let identity = age::x25519::Identity::from_str(line).map_err(|e| {
            format!("{}: line {}: not an age private key (AGE-SECRET-KEY-1...): {e}", path.display(), number + 1)
        })?;
        let id = KeyId::of(&identity.to_public());
        identities.push(NamedIdentity { id, identity, file: path.to_owned() });
    }
    if identities.is_empty() {
        return Err(format!("{}: holds no age private key (AGE-SECRET-KEY-1...)", path.display()));
    }
    Ok(identities)
}

/// A new key pair: the identity file's text (with the public key in a comment, as age-keygen
/// writes it) and the public key.
pub fn generate() -> (String, String, KeyId) {
    let identity = age::x25519::Identity::generate();
    let public = identity.to_public();
    let id = KeyId::of(&public);
    let text = format!(
        "# created: {} by walship {}\n# key id: {id}\n# public key: {public}\n{}\n",
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        env!("CARGO_PKG_VERSION"),
        identity.to_string().expose_secret()
    );
    (text, public.to_string(), id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_pair_has_one_id_and_files_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (text, public, id) = generate();
        let path = dir.path().join("key");
        std::fs::write(&path, &text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_identity_file(&path).unwrap_err();
        assert!(err.contains("permissions 0644") && err.contains("chmod 600"), "{err}");
        assert!(!err.contains("AGE-SECRET-KEY"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = load_identity_file(&path).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, id);
        assert_eq!(parse_recipient(1, &public).unwrap().0, id);
        let secret = text.lines().find(|l| l.starts_with("AGE-SECRET-KEY")).unwrap();
        let err = parse_recipient(2, secret).unwrap_err();
        assert!(err.contains("entry 2") && err.contains("private key") && !err.contains(secret), "{err}");
        assert_eq!(id.to_string().len(), 16);
    }

    #[test]
    fn a_bad_line_is_named_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "# comment\nAGE-SECRET-KEY-1NOTAKEY\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_identity_file(&path).unwrap_err();
        assert!(err.contains("line 2") && !err.contains("NOTAKEY"), "{err}");
    }
}
