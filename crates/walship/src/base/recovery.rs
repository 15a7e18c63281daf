//! Recovery targets, and the settings base-fetch writes so that `pg_ctl start` alone completes the
//! restore: `restore_command` and the target in `postgresql.auto.conf`, plus `recovery.signal` or
//! `standby.signal` (PostgreSQL 12 and later).

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::BackupRecord;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The end of the archive.
    End,
    /// `--target-time`: kept as normalized RFC 3339 text and as Unix nanoseconds.
    Time {
        text: String,
        unix_nanos: i128,
    },
    Lsn {
        text: String,
        value: u64,
    },
    Xid(String),
    Name(String),
    /// As soon as the backup is consistent.
    Immediate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "promote" => Ok(TargetAction::Promote),
            "pause" => Ok(TargetAction::Pause),
            "shutdown" => Ok(TargetAction::Shutdown),
            other => Err(format!("target action {other:?}: expected promote, pause or shutdown")),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

impl RecoveryTarget {
    pub fn time(text: &str) -> Result<Self, String> {
        let unix_nanos = parse_timestamp(text)?;
        let utc =
            OffsetDateTime::from_unix_timestamp_nanos(unix_nanos).map_err(|e| format!("target time {text:?}: {e}"))?;
        // PostgreSQL's recovery_target_time takes its own style, in UTC here; it refuses RFC 3339's "Z".
        let normalized = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
            utc.year(),
            u8::from(utc.month()),
            utc.day(),
            utc.hour(),
            utc.minute(),
            utc.second(),
            utc.microsecond()
        );
        Ok(RecoveryTarget::Time { text: normalized, unix_nanos })
    }

    pub fn lsn(text: &str) -> Result<Self, String> {
        let value = parse_lsn(text).ok_or_else(|| format!("target LSN {text:?}: expected X/Y in hexadecimal"))?;
        Ok(RecoveryTarget::Lsn { text: text.to_owned(), value })
    }

    pub fn xid(text: &str) -> Result<Self, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("target xid {text:?}: expected a transaction number"));
        }
        Ok(RecoveryTarget::Xid(text.to_owned()))
    }

    pub fn name(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > 63 || text.contains(['\'', '\n', '\r', '\\']) {
            return Err(format!("target name {text:?}: a restore point name of 1 to 63 plain characters"));
        }
        Ok(RecoveryTarget::Name(text.to_owned()))
    }

    /// Why `backup` cannot reach this target, if it cannot: recovery cannot stop before the backup
    /// is consistent, so a backup that finished after a target time or LSN is of no use for it.
    pub fn excludes(&self, backup: &BackupRecord) -> Option<String> {
        match self {
            RecoveryTarget::Time { text, unix_nanos } => match backup.finished_at_unix() {
                Some(finished) if finished < *unix_nanos => None,
                _ => Some(format!("it finished at {}, not before the target time {text}", backup.finished_at)),
            },
            RecoveryTarget::Lsn { text, value } => match parse_lsn(&backup.stop_lsn) {
                Some(stop) if stop <= *value => None,
                _ => Some(format!("it ends at LSN {}, after the target LSN {text}", backup.stop_lsn)),
            },
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RecoveryTarget::End => "the end of the archive".into(),
            RecoveryTarget::Time { text, .. } => format!("target time {text}"),
            RecoveryTarget::Lsn { text, .. } => format!("target LSN {text}"),
            RecoveryTarget::Xid(xid) => format!("target xid {xid}"),
            RecoveryTarget::Name(name) => format!("restore point {name}"),
            RecoveryTarget::Immediate => "the end of the backup".into(),
        }
    }

    fn setting(&self) -> Option<(&'static str, String)> {
        match self {
            RecoveryTarget::End => None,
            RecoveryTarget::Time { text, .. } => Some(("recovery_target_time", text.clone())),
            RecoveryTarget::Lsn { text, .. } => Some(("recovery_target_lsn", text.clone())),
            RecoveryTarget::Xid(xid) => Some(("recovery_target_xid", xid.clone())),
            RecoveryTarget::Name(name) => Some(("recovery_target_name", name.clone())),
            RecoveryTarget::Immediate => Some(("recovery_target", "immediate".into())),
        }
    }
}

/// `X/Y` as PostgreSQL prints an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let high = u32::from_str_radix(high, 16).ok()?;
    let low = u32::from_str_radix(low, 16).ok()?;
    Some((u64::from(high) << 32) | u64::from(low))
}

/// Parses a timestamp with a time zone, in RFC 3339 or PostgreSQL's own output style
/// (`2026-11-22 08:00:00.5+00`), into Unix nanoseconds. A time without a zone is refused: PostgreSQL
/// would read it in the restored server's time zone, which we cannot know when picking the backup.
pub fn parse_timestamp(text: &str) -> Result<i128, String> {
    let trimmed = text.trim();
    let mut normalized = trimmed.replacen(' ', "T", 1);
    if let Some(rest) = normalized.strip_suffix(" UTC").or_else(|| normalized.strip_suffix("UTC")) {
        normalized = format!("{}Z", rest.trim_end());
    }
    // Offsets as PostgreSQL prints them, "+00" or "+0530", become "+00:00" and "+05:30".
    let zone_start = normalized.rfind(['+', '-']).filter(|&i| i > 10);
    if let Some(i) = zone_start {
        let zone = &normalized[i + 1..];
        if zone.len() == 2 && zone.bytes().all(|b| b.is_ascii_digit()) {
            normalized.push_str(":00");
        } else if zone.len() == 4 && zone.bytes().all(|b| b.is_ascii_digit()) {
            normalized.insert(i + 3, ':');
        }
    }
    let has_zone = normalized.ends_with('Z') || zone_start.is_some();
    if !has_zone {
        return Err(format!(
            "time {text:?} has no time zone: add one (\"+00\" or \"Z\" for UTC), since PostgreSQL would read it \
             in the server's time zone"
        ));
    }
    OffsetDateTime::parse(&normalized, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp_nanos)
        .map_err(|e| format!("time {text:?} is not a timestamp like 2026-11-22 08:00:00+00: {e}"))
}

/// The current time in RFC 3339, UTC.
pub(crate) fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).expect("the current time formats")
}

/// Quotes `text` for /bin/sh, which runs restore_command.
fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:=@+,".contains(&b)) {
        return text.to_owned();
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Quotes `text` as a postgresql.conf string.
fn conf_quote(text: &str) -> String {
    format!("'{}'", text.replace('\\', r"\\").replace('\'', "''"))
}

/// The restore_command that runs `wal_fetch` with the given arguments.
pub fn restore_command(wal_fetch: &Path, arguments: &[String]) -> String {
    let mut words = vec![shell_quote(&wal_fetch.display().to_string())];
    words.extend(arguments.iter().map(|a| shell_quote(a)));
    words.push("%f".into());
    words.push("%p".into());
    words.join(" ")
}

/// The settings recovery of this restore needs.
pub struct RecoverySettings<'a> {
    pub backup_name: &'a str,
    pub restore_command: String,
    pub target: &'a RecoveryTarget,
    pub action: Option<TargetAction>,
    pub timeline: Option<String>,
    pub standby: bool,
}

/// Settings earlier restores may have left in the backed-up cluster's postgresql.auto.conf; two
/// targets at once stop PostgreSQL from starting, and an old restore_command would read elsewhere.
fn is_ours(line: &str) -> bool {
    let key = line.split(['=', ' ', '\t']).next().unwrap_or("").trim().to_ascii_lowercase();
    key == "restore_command" || key.starts_with("recovery_target")
}

/// Writes the settings into `data_dir`'s postgresql.auto.conf (earlier ones of the same keys are
/// commented out) and the signal file, durably.
pub fn write_recovery_settings(data_dir: &Path, settings: &RecoverySettings<'_>) -> std::io::Result<()> {
    let conf = data_dir.join("postgresql.auto.conf");
    let existing = match fs::read_to_string(&conf) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut text = String::with_capacity(existing.len() + 512);
    for line in existing.lines() {
        if is_ours(line) {
            text.push_str("# disabled by walship base-fetch: ");
        }
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&format!(
        "# Written by walship base-fetch at {}, restoring backup {}\n",
        now_rfc3339(),
        settings.backup_name
    ));
    text.push_str(&format!("restore_command = {}\n", conf_quote(&settings.restore_command)));
    if let Some((key, value)) = settings.target.setting() {
        text.push_str(&format!("{key} = {}\n", conf_quote(&value)));
    }
    if let Some(action) = settings.action {
        text.push_str(&format!("recovery_target_action = {}\n", conf_quote(action.as_str())));
    }
    if let Some(timeline) = &settings.timeline {
        text.push_str(&format!("recovery_target_timeline = {}\n", conf_quote(timeline)));
    }
    let temp = data_dir.join("postgresql.auto.conf.walship.tmp");
    {
        let mut file = File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    copy_mode(&conf, &temp);
    fs::rename(&temp, &conf)?;
    let signal = data_dir.join(if settings.standby { "standby.signal" } else { "recovery.signal" });
    File::create(&signal)?.sync_all()?;
    crate::storage::local::fsync_dir(data_dir)
}

/// Gives `to` the mode and owner of `from`, when `from` exists.
fn copy_mode(from: &Path, to: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = fs::metadata(from) {
        let _ = fs::set_permissions(to, meta.permissions());
        let _ = std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_need_a_zone_and_accept_postgres_style() {
        let utc = parse_timestamp("2026-11-22T08:00:00Z").unwrap();
        assert_eq!(parse_timestamp("2026-11-22 08:00:00+00").unwrap(), utc);
        assert_eq!(parse_timestamp("2026-11-22 08:00:00 UTC").unwrap(), utc);
        assert_eq!(parse_timestamp("2026-11-22 09:00:00+01:00").unwrap(), utc);
        assert_eq!(parse_timestamp("2026-11-22 13:30:00+0530").unwrap(), utc);
        assert_eq!(parse_timestamp("2026-11-22 07:00:00-01").unwrap(), utc);
        assert_eq!(parse_timestamp("2026-11-22 08:00:00.5+00").unwrap(), utc + 500_000_000);
        assert!(parse_timestamp("2026-11-22 08:00:00").unwrap_err().contains("no time zone"));
        assert!(parse_timestamp("yesterday").is_err());
    }

    #[test]
    fn lsns_parse_as_postgres_prints_them() {
        assert_eq!(parse_lsn("0/2000028"), Some(0x2000028));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x/0"), None);
    }

    #[test]
    fn restore_command_survives_odd_paths() {
        let command =
            restore_command(Path::new("/opt/wal ship/wal-fetch"), &["--config".into(), "/etc/it's.toml".into()]);
        assert_eq!(command, r"'/opt/wal ship/wal-fetch' --config '/etc/it'\''s.toml' %f %p");
        assert_eq!(conf_quote(&command), r"'''/opt/wal ship/wal-fetch'' --config ''/etc/it''\\''''s.toml'' %f %p'");
    }

    #[test]
    fn settings_replace_earlier_restore_settings() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("postgresql.auto.conf"),
            "work_mem = '8MB'\nrestore_command = 'cp /old/%f %p'\nrecovery_target_lsn = '0/1'\n",
        )
        .unwrap();
        let target = RecoveryTarget::time("2026-11-22 08:00:00+00").unwrap();
        write_recovery_settings(
            dir.path(),
            &RecoverySettings {
                backup_name: "20261122T070000Z",
                restore_command: "wal-fetch %f %p".into(),
                target: &target,
                action: Some(TargetAction::Promote),
                timeline: None,
                standby: false,
            },
        )
        .unwrap();
        let text = fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.starts_with("work_mem = '8MB'\n# disabled by walship base-fetch: restore_command"), "{text}");
        assert!(text.contains("# disabled by walship base-fetch: recovery_target_lsn"));
        assert!(text.contains("restore_command = 'wal-fetch %f %p'\n"));
        assert!(text.contains("recovery_target_time = '2026-11-22 08:00:00.000000+00'\n"), "{text}");
        assert!(text.contains("recovery_target_action = 'promote'\n"));
        assert!(dir.path().join("recovery.signal").exists());
        assert!(!dir.path().join("standby.signal").exists());
    }
}
