//! Client-side encryption: the `[encryption]` settings, the keys they name, and the age stage of the
//! codec that every object holding database content goes through (after compression, before
//! storage).
//!
//! Writing needs only public keys (recipients), so that a database server that archives never holds
//! what reads its archive; reading takes every identity (private key) configured, old and new, so
//! that a change of recipients never strands objects written before it. A passphrase file can stand
//! in for both. The cryptography is the `age` crate's (X25519 recipients, scrypt passphrases,
//! ChaCha20-Poly1305 in 64 KiB chunks); walship adds only the framing around it: which keys an object
//! was written for, and a seal that lets a host without a private key check an object's bytes.

mod keys;
mod sealed;
mod stage;

pub use keys::{KeyId, generate, load_identity_file, read_secret_file};
pub use sealed::{Sealed, check_sealed};
pub use stage::{AGE_STAGE_ID, AgeStage};

use std::path::PathBuf;

use age::secrecy::SecretString;

/// scrypt's work factor (log2 of N) for objects written with a passphrase, when unset. A passphrase
/// file holds a long random passphrase (walship refuses a short one), which no work factor needs to
/// protect; each object pays the work once on the way in and once on the way out.
pub const DEFAULT_PASSPHRASE_WORK_FACTOR: u8 = 10;
/// The work factors a configuration may ask for: above 20 each object would take seconds.
pub const PASSPHRASE_WORK_FACTORS: std::ops::RangeInclusive<u8> = 1..=20;
/// A passphrase shorter than this is refused: it would be guessable offline from any object.
pub const MIN_PASSPHRASE_LEN: usize = 20;

/// How objects are written: for public keys, or with a passphrase.
#[derive(Clone)]
pub enum Writing {
    /// For each of these recipients (any one of their identities reads the object).
    Recipients(Vec<(KeyId, age::x25519::Recipient)>),
    /// With a passphrase, at scrypt work factor `work_factor`.
    Passphrase {
        /// The passphrase, from `passphrase_file`.
        passphrase: SecretString,
        /// log2 of scrypt's N.
        work_factor: u8,
    },
}

/// A private key from an identity file, with the file it came from (for messages).
#[derive(Clone)]
pub struct NamedIdentity {
    /// The key's id (of its public half).
    pub id: KeyId,
    /// The key.
    pub identity: age::x25519::Identity,
    /// The identity file it came from.
    pub file: PathBuf,
}

impl std::fmt::Debug for NamedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {} from {}", self.id, self.file.display())
    }
}

/// The `[encryption]` table, resolved: keys read, permissions checked. Its `Debug` names key ids and
/// files, never a key or the passphrase.
#[derive(Clone, Default)]
pub struct EncryptionConfig {
    /// `None`: objects are written plain (no `recipients` and no `passphrase_file`).
    pub writing: Option<Writing>,
    /// Every private key of every `identity_files` entry, tried in turn when reading.
    pub identities: Vec<NamedIdentity>,
    /// `passphrase_file`'s passphrase, also tried when reading.
    pub passphrase: Option<SecretString>,
    /// `accept_plain`: read objects that are not encrypted (written before encryption was enabled).
    pub accept_plain: bool,
}

impl std::fmt::Debug for EncryptionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let writing = match &self.writing {
            None => "plain".to_owned(),
            Some(Writing::Recipients(list)) => {
                format!("recipients {}", list.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>().join(","))
            }
            Some(Writing::Passphrase { work_factor, .. }) => format!("passphrase (work factor {work_factor})"),
        };
        f.debug_struct("EncryptionConfig")
            .field("writing", &writing)
            .field("identities", &self.identities.iter().map(|i| (i.id.to_string(), &i.file)).collect::<Vec<_>>())
            .field("passphrase", &self.passphrase.as_ref().map(|_| "(set)"))
            .field("accept_plain", &self.accept_plain)
            .finish()
    }
}

impl EncryptionConfig {
    /// Whether any `[encryption]` key is configured: then plain objects are refused unless
    /// `accept_plain` says otherwise.
    pub fn is_configured(&self) -> bool {
        self.writing.is_some() || !self.identities.is_empty() || self.passphrase.is_some()
    }

    /// Whether this configuration can open an encrypted object (it has an identity or a passphrase).
    pub fn can_read(&self) -> bool {
        !self.identities.is_empty() || self.passphrase.is_some()
    }

    /// Whether this host reads an encrypted repository without a key (recipients only: the archive
    /// host): then what can be checked is only what seals and trailers show.
    pub fn is_keyless(&self) -> bool {
        self.is_configured() && !self.can_read()
    }

    /// The ids of the configured identities, for messages.
    pub fn identity_ids(&self) -> Vec<KeyId> {
        self.identities.iter().map(|i| i.id).collect()
    }
}

/// The `[encryption]` table as the file spells it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionTable {
    recipients: Option<Vec<String>>,
    identity_files: Option<Vec<PathBuf>>,
    passphrase_file: Option<PathBuf>,
    passphrase_work_factor: Option<u8>,
    accept_plain: Option<bool>,
}

impl EncryptionConfig {
    /// Resolves the table: parses the recipients, reads the key files (refusing any that other users
    /// can read). The error names the key or file at fault, never a key.
    pub fn from_table(table: EncryptionTable) -> Result<Self, String> {
        let recipients = table.recipients.unwrap_or_default();
        if !recipients.is_empty() && table.passphrase_file.is_some() {
            return Err("recipients and passphrase_file are both set: objects are written for one or the other \
                        (age cannot mix them); keep one"
                .into());
        }
        let passphrase = table.passphrase_file.as_deref().map(read_passphrase).transpose()?;
        let work_factor = table.passphrase_work_factor.unwrap_or(DEFAULT_PASSPHRASE_WORK_FACTOR);
        if !PASSPHRASE_WORK_FACTORS.contains(&work_factor) {
            return Err(format!(
                "passphrase_work_factor = {work_factor}: expected {} to {}",
                PASSPHRASE_WORK_FACTORS.start(),
                PASSPHRASE_WORK_FACTORS.end()
            ));
        }
        let writing = if !recipients.is_empty() {
            let parsed = recipients
                .iter()
                .enumerate()
                .map(|(i, text)| keys::parse_recipient(i + 1, text))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Writing::Recipients(parsed))
        } else {
            passphrase.clone().map(|passphrase| Writing::Passphrase { passphrase, work_factor })
        };
        let mut identities = Vec::new();
        for file in table.identity_files.unwrap_or_default() {
            if !file.is_absolute() {
                return Err(format!("identity_files: {:?} must be an absolute path", file.display().to_string()));
            }
            identities.extend(load_identity_file(&file)?);
        }
        Ok(EncryptionConfig { writing, identities, passphrase, accept_plain: table.accept_plain.unwrap_or(false) })
    }
}

fn read_passphrase(path: &std::path::Path) -> Result<SecretString, String> {
    if !path.is_absolute() {
        return Err(format!("passphrase_file = {:?} must be an absolute path", path.display().to_string()));
    }
    let text = read_secret_file(path)?;
    let passphrase = text.trim_end_matches(['\n', '\r']);
    if passphrase.chars().count() < MIN_PASSPHRASE_LEN {
        return Err(format!(
            "{}: the passphrase is shorter than {MIN_PASSPHRASE_LEN} characters, which anyone holding one \
             object could guess offline; put a long random one there (walship-key passphrase)",
            path.display()
        ));
    }
    Ok(SecretString::from(passphrase.to_owned()))
}

#[cfg(test)]
mod tests;
