//! Encryption keys for tests, made by `walship-key` as an operator would make them, owned by the
//! server user (who runs wal-push and wal-fetch) and readable by it alone.

use std::path::{Path, PathBuf};

use crate::{chown_to_server_user, run, walship};

/// One key pair: its identity file, public key and key id.
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// The identity file (mode 0600, owned by the server user).
    pub identity_file: PathBuf,
    /// The public key (`age1...`).
    pub recipient: String,
    /// The key id walship shows for it (16 hex digits).
    pub id: String,
}

impl KeyPair {
    /// Makes a key pair with `walship-key generate`, its identity file `dir/NAME.key`.
    pub fn generate(dir: &Path, name: &str) -> KeyPair {
        let identity_file = dir.join(format!("{name}.key"));
        let out = run(walship("walship-key").arg("generate").arg("--output").arg(&identity_file));
        assert_eq!(out.code, Some(0), "walship-key generate: {}", out.stderr);
        let recipient = out.stdout.trim().to_owned();
        assert!(recipient.starts_with("age1"), "{recipient}");
        let id = out.stderr.split_whitespace().skip_while(|w| *w != "key").nth(1).unwrap_or_default().to_owned();
        assert_eq!(id.len(), 16, "a key id in {:?}", out.stderr);
        chown_to_server_user(&identity_file);
        KeyPair { identity_file, recipient, id }
    }
}

/// An `[encryption]` table: objects written for `recipients`, read with `identities`' files.
pub fn encryption_table(recipients: &[&KeyPair], identities: &[&KeyPair], extra: &str) -> String {
    let quoted = |items: Vec<String>| items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let recipients = quoted(recipients.iter().map(|k| k.recipient.clone()).collect());
    let identities = quoted(identities.iter().map(|k| k.identity_file.display().to_string()).collect());
    format!("[encryption]\nrecipients = [{recipients}]\nidentity_files = [{identities}]\n{extra}")
}
