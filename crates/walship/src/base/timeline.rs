//! Which backups lie on the history a recovery will follow.
//!
//! A recovery follows one target timeline (`recovery_target_timeline`, PostgreSQL's default
//! `latest`: the newest timeline whose history file the archive holds). It can start from a backup
//! on that timeline, or on one of its ancestors if the backup ended before the target's history left
//! that ancestor. A backup taken on the old timeline after a branch (the original primary kept
//! running after a point-in-time restore promoted elsewhere) lies on an abandoned branch: PostgreSQL
//! refuses to follow the target timeline from it ("requested timeline is not a child of this
//! server's history"), or with `current` restores the abandoned branch. The ancestors and their
//! switch points come from the target's history file (`wal/history/<TLI>.history`), whose lines are
//! `<parent timeline> <LSN where the parent ended> <reason>` for every ancestor.

use super::BackupRecord;
use crate::error::Error;
use crate::repo::Repository;
use crate::wal::{MAX_SMALL_FILE, WalFileKind, WalFileName, check_history_file, format_lsn, parse_lsn};

/// Where the timeline history files are.
pub(crate) const HISTORY_PREFIX: &str = "wal/history/";

/// The timeline a restore will follow, and where it left each of its ancestors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    /// The timeline recovery will follow.
    pub target: u32,
    /// (ancestor timeline, the LSN at which the target's history left it), oldest first.
    pub forks: Vec<(u32, u64)>,
    /// `latest`: the target is the newest timeline known, so a backup on a newer one than any
    /// history file raises it (a repository started after a promotion may have no history file).
    follows_newest: bool,
}

impl Lineage {
    /// Raises the target to `backup`'s timeline when this lineage follows the newest timeline and the
    /// backup's is newer; returns whether it did. Such a timeline has no history file in the
    /// repository (the target already is the newest that has one), so only backups on it qualify.
    pub fn follow(&mut self, backup: &BackupRecord) -> bool {
        if !self.follows_newest || backup.stop_timeline <= self.target {
            return false;
        }
        *self = Lineage { target: backup.stop_timeline, forks: Vec::new(), follows_newest: true };
        true
    }

    /// A lineage that follows `target` (with `latest`'s rising), for unit tests elsewhere.
    #[cfg(test)]
    pub(crate) fn for_test(target: u32, forks: Vec<(u32, u64)>) -> Lineage {
        Lineage { target, forks, follows_newest: true }
    }

    /// Why a recovery along this lineage cannot start from `backup`, if it cannot.
    pub fn excludes(&self, backup: &BackupRecord) -> Option<String> {
        // A backup taken from a standby across a promotion ends on a later timeline than it began.
        let timeline = backup.stop_timeline;
        if timeline == self.target {
            return None;
        }
        let Some(&(_, left_at)) = self.forks.iter().find(|(ancestor, _)| *ancestor == timeline) else {
            return Some(format!("its timeline {timeline} is not in the history of timeline {}", self.target));
        };
        match parse_lsn(&backup.stop_lsn) {
            Some(stop) if stop <= left_at => None,
            _ => Some(format!(
                "it ends at {} on timeline {timeline}, after timeline {} branched off it at {}: an abandoned branch",
                backup.stop_lsn,
                self.target,
                format_lsn(left_at)
            )),
        }
    }
}

/// The lineage a restore with `recovery_target_timeline = timeline` follows, or `None` when any
/// backup will do (`current`: the recovery stays on the backup's own timeline). Without a number,
/// the target is the newest timeline that has a history file in the repository, raised by
/// [`Lineage::follow`] for each backup on a newer one.
pub async fn lineage(repo: &Repository, timeline: Option<&str>) -> Result<Option<Lineage>, Error> {
    let (target, follows_newest) = match timeline {
        Some("current") => return Ok(None),
        None | Some("latest") => (newest_history_timeline(repo).await?.unwrap_or(1), true),
        Some(number) => {
            let number =
                number.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Error::Usage(format!("--target-timeline {number:?}: a number, latest or current"))
                })?;
            (number, false)
        }
    };
    let forks = if target == 1 { Vec::new() } else { read_history(repo, target).await? };
    Ok(Some(Lineage { target, forks, follows_newest }))
}

/// The highest timeline with a history file in the repository, if any.
async fn newest_history_timeline(repo: &Repository) -> Result<Option<u32>, Error> {
    Ok(history_timelines(repo).await?.into_iter().max())
}

/// The timelines that have a history file in the repository, in key order.
pub(crate) async fn history_timelines(repo: &Repository) -> Result<Vec<u32>, Error> {
    let mut timelines = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = repo.storage().list(HISTORY_PREFIX, after.as_deref(), 1000).await?;
        let Some(last) = page.last() else { return Ok(timelines) };
        after = Some(last.key.clone());
        timelines.extend(page.iter().filter_map(|meta| {
            let wal = WalFileName::parse(meta.key.strip_prefix(HISTORY_PREFIX)?).ok()?;
            (wal.kind() == WalFileKind::History).then(|| wal.timeline())
        }));
    }
}

/// The ancestors of `timeline` and where it left each, from its history file; none when the
/// repository has no history file for it (then only backups on `timeline` itself qualify).
pub(crate) async fn read_history(repo: &Repository, timeline: u32) -> Result<Vec<(u32, u64)>, Error> {
    let name = WalFileName::parse(&format!("{timeline:08X}.history")).expect("a well-formed history name");
    let key = Repository::wal_key(&name);
    let location = repo.storage().location(&key);
    let stored = match repo.read_small(&key, MAX_SMALL_FILE).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let corrupt = |reason: String| Error::Corrupt { location: location.clone(), reason };
    let content = repo.reader_pipeline().decode_bytes(&stored).map_err(|e| match e {
        crate::codec::DecodeError::Format(format) => Error::stored(&location, format),
        other => corrupt(other.to_string()),
    })?;
    check_history_file(&name, &content).map_err(corrupt)?;
    Ok(parse_history(&String::from_utf8_lossy(&content)))
}

/// `(parent, switch point)` of each line of a checked history file.
fn parse_history(text: &str) -> Vec<(u32, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let parent = fields.next()?.parse().ok()?;
            Some((parent, parse_lsn(fields.next()?)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(stop_timeline: u32, stop_lsn: &str) -> BackupRecord {
        let json = serde_json::json!({
            "format_version": 1, "name": "20261201T000000Z", "started_at": "2026-12-01T00:00:00Z",
            "finished_at": "2026-12-01T00:00:01Z", "start_lsn": "0/2000028", "stop_lsn": stop_lsn,
            "start_wal_file": "000000010000000000000002", "timeline": 1, "stop_timeline": stop_timeline,
            "backup_from": "primary", "pg_version": 15, "system_identifier": "1", "wal_segment_size": 16777216,
            "original_bytes": 1, "stored_bytes": 1, "archives": [],
            "manifest": { "key": "k", "original_bytes": 1, "stored_bytes": 1, "sha256": "00" },
            "pg_basebackup": { "version": "15", "arguments": [] }, "created_by": "test"
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn backups_qualify_on_the_target_or_before_it_branched() {
        let history = "1\t0/5000000\tbefore transaction 742 at 2026-12-01 08:00:00+00\n\n\
                       2\t0/9000000\tno recovery target specified\n";
        let lineage = Lineage { target: 3, forks: parse_history(history), follows_newest: false };
        assert_eq!(lineage.forks, [(1, 0x500_0000), (2, 0x900_0000)]);
        assert_eq!(lineage.excludes(&backup(3, "0/A000100")), None);
        assert_eq!(lineage.excludes(&backup(1, "0/4000100")), None);
        assert_eq!(lineage.excludes(&backup(1, "0/5000000")), None, "ended right at the switch point");
        assert!(lineage.excludes(&backup(1, "0/5000100")).unwrap().contains("abandoned branch"));
        assert_eq!(lineage.excludes(&backup(2, "0/8000000")), None);
        assert!(lineage.excludes(&backup(2, "0/9000100")).unwrap().contains("branched off it at 0/9000000"));
        assert!(lineage.excludes(&backup(4, "0/1")).unwrap().contains("not in the history of timeline 3"));
    }

    #[test]
    fn latest_rises_to_a_newer_backup_timeline_and_a_number_stays() {
        let mut latest = Lineage { target: 2, forks: vec![(1, 0x500_0000)], follows_newest: true };
        assert!(!latest.follow(&backup(2, "0/6000000")) && !latest.follow(&backup(1, "0/4000000")));
        assert!(latest.follow(&backup(3, "0/7000000")));
        assert_eq!((latest.target, latest.forks.as_slice()), (3, &[][..]));
        assert!(latest.excludes(&backup(2, "0/6000000")).is_some(), "no history links timeline 2 to 3");
        let mut fixed = Lineage { target: 2, forks: Vec::new(), follows_newest: false };
        assert!(!fixed.follow(&backup(3, "0/7000000")) && fixed.target == 2);
    }
}
