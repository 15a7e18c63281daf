//! What every backend's settings table shares: how a size and a number of seconds are written.
//!
//! Each backend owns its table (`[s3]` in `s3.rs`, `[ssh]` in `ssh.rs`): the keys, their defaults
//! and their checks. The configuration reads the file and hands each table to its backend, so that a
//! new backend is one file here plus one line in the configuration, and no backend ever reads the
//! configuration.

use std::time::Duration;

use serde::Deserialize;

/// A size given as a number of bytes or a string with a binary unit (`"16MiB"`, `"1GiB"`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "toml::Value")]
pub(crate) struct ByteSize(pub(crate) u64);

impl TryFrom<toml::Value> for ByteSize {
    type Error = String;

    fn try_from(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) if n > 0 => Ok(ByteSize(n as u64)),
            toml::Value::String(text) => {
                let trimmed = text.trim();
                let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
                let (number, unit) = trimmed.split_at(split);
                let multiplier: u64 = match unit.trim() {
                    "" | "B" => 1,
                    "KiB" => 1 << 10,
                    "MiB" => 1 << 20,
                    "GiB" => 1 << 30,
                    _ => return Err(format!("size {text:?}: use bytes or a KiB, MiB or GiB suffix")),
                };
                number
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| n.checked_mul(multiplier))
                    .filter(|n| *n > 0)
                    .map(ByteSize)
                    .ok_or_else(|| format!("size {text:?} is not a positive number"))
            }
            other => Err(format!("a size cannot be a {}: use bytes or a string such as \"16MiB\"", other.type_str())),
        }
    }
}

/// A duration given in whole seconds under the key `name`: at least 1, `default` when unset.
pub(crate) fn seconds(value: Option<u64>, name: &str, default: Duration) -> Result<Duration, String> {
    match value {
        None => Ok(default),
        Some(0) => Err(format!("{name} must be at least 1")),
        Some(secs) => Ok(Duration::from_secs(secs)),
    }
}
