//! Recovery targets, and the settings base-fetch writes so that `pg_ctl start` alone completes the
//! restore: `restore_command` and the target in `postgresql.auto.conf`, plus `recovery.signal` or
//! `standby.signal` (PostgreSQL 12 and later).

use std::fs::{self, File};
use std::path::Path;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::BackupRecord;
use crate::wal::parse_lsn;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The end of the archive.
    End,
    /// `--target-time`: kept as normalized RFC 3339 text and as Unix nanoseconds.
    Time {
        /// As PostgreSQL's recovery_target_time takes it.
        text: String,
        /// The same instant, for comparing with backups' finish times.
        unix_nanos: i128,
    },
    /// `--target-lsn`.
    Lsn {
        /// As given (`X/Y`).
        text: String,
        /// Parsed.
        value: u64,
    },
    /// `--target-xid`: a transaction number.
    Xid(String),
    /// `--target-name`: a restore point made with `pg_create_restore_point`.
    Name(String),
    /// As soon as the backup is consistent.
    Immediate,
}

/// What the server does once recovery reaches its target (`recovery_target_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    /// End recovery and accept writes.
    Promote,
    /// Stay in recovery, paused, for a look before deciding.
    Pause,
    /// Stop the server.
    Shutdown,
}

impl TargetAction {
    /// `promote`, `pause` or `shutdown`.
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
    /// A target time, with a time zone (see [`parse_timestamp`]).
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

    /// A target LSN, `X/Y` in hexadecimal.
    pub fn lsn(text: &str) -> Result<Self, String> {
        let value = parse_lsn(text).ok_or_else(|| format!("target LSN {text:?}: expected X/Y in hexadecimal"))?;
        Ok(RecoveryTarget::Lsn { text: text.to_owned(), value })
    }

    /// A target transaction number.
    pub fn xid(text: &str) -> Result<Self, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("target xid {text:?}: expected a transaction number"));
        }
        Ok(RecoveryTarget::Xid(text.to_owned()))
    }

    /// A target restore point name.
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

    /// The target in words, for messages.
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
    /// The backup restored, named in the settings' comment.
    pub backup_name: &'a str,
    /// The restore_command that fetches WAL from the repository.
    pub restore_command: String,
    /// Where recovery stops.
    pub target: &'a RecoveryTarget,
    /// `recovery_target_action`, if set.
    pub action: Option<TargetAction>,
    /// `recovery_target_timeline`, if set.
    pub timeline: Option<String>,
    /// `standby.signal` rather than `recovery.signal`.
    pub standby: bool,
    /// Leave the backed-up cluster's archiving as it was (`--keep-archiving`); otherwise it is
    /// turned off, so that a restore never writes into the repository it came from.
    pub keep_archiving: bool,
    /// The backup's PostgreSQL major version: `archive_library` exists from 15 on, and an unknown
    /// setting in postgresql.auto.conf stops the server from starting.
    pub pg_version: u32,
}

/// What [`write_recovery_settings`] changed besides writing its own settings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SettingsChanges {
    /// Keys of earlier lines in postgresql.auto.conf that were commented out.
    pub disabled: Vec<String>,
    /// A `standby.signal` that came with the backup (taken from a standby) was removed.
    pub removed_standby_signal: bool,
}

/// Whether an earlier line of postgresql.auto.conf setting `key` must go. Two targets at once stop
/// PostgreSQL from starting, and an old restore_command would read elsewhere. Unless asked to keep
/// it, archiving would push the restored cluster's new timeline into the repository it came from
/// (same system identifier, so nothing refuses it) where a later restore of the original follows it.
/// A backup taken from a standby carries the standby's primary_conninfo: a point-in-time restore
/// must not stream from that server.
fn is_replaced(key: &str, settings: &RecoverySettings<'_>) -> bool {
    key == "restore_command"
        || key.starts_with("recovery_target")
        || (!settings.keep_archiving && (key == "archive_command" || key == "archive_library"))
        || (!settings.standby && (key == "primary_conninfo" || key == "primary_slot_name"))
}

fn setting_key(line: &str) -> String {
    line.split(['=', ' ', '\t']).next().unwrap_or("").trim().to_ascii_lowercase()
}

/// The text of postgresql.auto.conf: `existing` with replaced settings commented out, then ours.
fn settings_text(existing: &str, settings: &RecoverySettings<'_>, changes: &mut SettingsChanges) -> String {
    let mut text = String::with_capacity(existing.len() + 1024);
    for line in existing.lines() {
        let key = setting_key(line);
        if is_replaced(&key, settings) {
            text.push_str("# disabled by walship base-fetch: ");
            changes.disabled.push(key);
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
    if !settings.keep_archiving {
        // As Barman does: archive_mode stays, so .ready files pile up and nothing is lost if
        // archiving is turned on later; 'false' fails every attempt, visibly (pg_stat_archiver).
        text.push_str(ARCHIVING_OFF_COMMENT);
        text.push_str("archive_command = 'false'\n");
        if settings.pg_version >= 15 {
            // From PostgreSQL 15 a configured archive_library takes precedence over archive_command.
            text.push_str("archive_library = ''\n");
        }
    }
    text
}

/// Says in postgresql.auto.conf why archiving is off and how to turn it on.
const ARCHIVING_OFF_COMMENT: &str = "# Archiving is off: a restored cluster must not archive into the repository it came from.\n\
    # If this cluster is to be the primary: ALTER SYSTEM SET archive_command = '...'; SELECT pg_reload_conf();\n\
    # (or restore with base-fetch --keep-archiving)\n";

/// Writes the settings into `data_dir`'s postgresql.auto.conf (earlier ones of the same keys are
/// commented out) and the signal file, durably. Without `standby`, a `standby.signal` the backup
/// brought is removed: PostgreSQL prefers standby mode when both signal files exist, and a standby
/// never ends recovery at the end of the archive (it waits for more, or streams from its
/// primary_conninfo).
pub fn write_recovery_settings(data_dir: &Path, settings: &RecoverySettings<'_>) -> std::io::Result<SettingsChanges> {
    let conf = data_dir.join("postgresql.auto.conf");
    let existing = match fs::read_to_string(&conf) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut changes = SettingsChanges::default();
    let text = settings_text(&existing, settings, &mut changes);
    // The backup's own file keeps its mode and owner (running as root, the cluster's user).
    let kept = fs::metadata(&conf).ok();
    crate::fs::replace_file(&conf, text.as_bytes(), true)?;
    if let Some(meta) = kept {
        keep_mode(&conf, &meta);
    }
    if !settings.standby {
        match fs::remove_file(data_dir.join("standby.signal")) {
            Ok(()) => changes.removed_standby_signal = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let signal = data_dir.join(if settings.standby { "standby.signal" } else { "recovery.signal" });
    File::create(&signal)?.sync_all()?;
    crate::fs::fsync_dir(data_dir)?;
    Ok(changes)
}

/// Gives `path` the mode and owner in `meta` (those of the file it replaced). Best effort.
fn keep_mode(path: &Path, meta: &fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let _ = fs::set_permissions(path, meta.permissions());
    let _ = std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid()));
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

    fn settings<'a>(
        target: &'a RecoveryTarget,
        standby: bool,
        keep_archiving: bool,
        pg_version: u32,
    ) -> RecoverySettings<'a> {
        RecoverySettings {
            backup_name: "20261122T070000Z",
            restore_command: "wal-fetch %f %p".into(),
            target,
            action: None,
            timeline: None,
            standby,
            keep_archiving,
            pg_version,
        }
    }

    const STANDBY_AUTO_CONF: &str =
        "archive_command = 'wal-push %p %f'\nprimary_conninfo = 'host=/run/pg'\nprimary_slot_name = 's1'\n";

    #[test]
    fn a_restore_turns_archiving_off_and_drops_what_a_standby_backup_brought() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("postgresql.auto.conf"), STANDBY_AUTO_CONF).unwrap();
        fs::write(dir.path().join("standby.signal"), "").unwrap();
        let changes = write_recovery_settings(dir.path(), &settings(&RecoveryTarget::End, false, false, 15)).unwrap();
        assert_eq!(changes.disabled, ["archive_command", "primary_conninfo", "primary_slot_name"]);
        assert!(changes.removed_standby_signal);
        let text = fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.starts_with("# disabled by walship base-fetch: archive_command = 'wal-push"), "{text}");
        assert!(text.contains("# disabled by walship base-fetch: primary_conninfo"), "{text}");
        assert!(text.ends_with("archive_command = 'false'\narchive_library = ''\n"), "{text}");
        assert!(!dir.path().join("standby.signal").exists());
        assert!(dir.path().join("recovery.signal").exists());
    }

    #[test]
    fn keep_archiving_and_standby_keep_what_they_say() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("postgresql.auto.conf"), STANDBY_AUTO_CONF).unwrap();
        let changes = write_recovery_settings(dir.path(), &settings(&RecoveryTarget::End, true, true, 15)).unwrap();
        assert_eq!(changes, SettingsChanges::default());
        let text = fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.starts_with(STANDBY_AUTO_CONF), "{text}");
        assert!(!text.contains("'false'") && !text.contains("archive_library"), "{text}");
        assert!(dir.path().join("standby.signal").exists());
        // Before PostgreSQL 15 there is no archive_library to set (and an unknown one stops the server).
        let old = tempfile::tempdir().unwrap();
        write_recovery_settings(old.path(), &settings(&RecoveryTarget::End, false, false, 14)).unwrap();
        let text = fs::read_to_string(old.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.ends_with("archive_command = 'false'\n"), "{text}");
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
        let settings = RecoverySettings { action: Some(TargetAction::Promote), ..settings(&target, false, false, 15) };
        write_recovery_settings(dir.path(), &settings).unwrap();
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
