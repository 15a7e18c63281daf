//! Which WAL files the kept backups can need: the one predicate the WAL sweep asks of every object.
//!
//! A kept backup needs every file from its start segment on, on its own timeline and on every
//! timeline that descends from it (a recovery from it may follow any of them); ancestry comes from the
//! history files, never from the numbers. A file on a timeline whose ancestry is unknown (its history
//! file is missing) counts as reachable from every backup. A file no kept backup can reach (a branch
//! nobody kept a backup of, such as the WAL a restored copy archives before its first backup) is kept
//! from the oldest kept backup's start on all the same: the live cluster may be that copy. A pinned
//! backup that nothing else keeps needs only its own start-to-stop range. History files are never
//! deleted, and without any kept backup no WAL is.

use std::collections::HashMap;

use crate::base::BackupRecord;
use crate::wal::{WalFileKind, WalFileName, parse_lsn};

/// The segment range one backup needs, as segment numbers.
#[derive(Debug, Clone, Copy)]
struct Needs {
    timeline: u32,
    stop_timeline: u32,
    start: u64,
    stop: u64,
}

/// The predicate, built once per run from the kept backups and the repository's history files.
#[derive(Debug)]
pub struct WalRule {
    segment_size: u32,
    /// Backups that keep everything after their start.
    onward: Vec<Needs>,
    /// Pinned backups kept for themselves only: their start-to-stop range.
    ranges: Vec<Needs>,
    /// Timeline -> its ancestors, from its history file.
    ancestors: HashMap<u32, Vec<u32>>,
}

impl WalRule {
    /// `onward`: backups whose WAL from their start on stays; `ranges`: backups that keep only their
    /// own range; `ancestors`: each timeline's ancestors from its history file. A backup whose start
    /// or stop cannot be read keeps all WAL (from segment 0).
    pub fn new<'a>(
        segment_size: u32,
        onward: impl IntoIterator<Item = &'a BackupRecord>,
        ranges: impl IntoIterator<Item = &'a BackupRecord>,
        ancestors: HashMap<u32, Vec<u32>>,
    ) -> WalRule {
        let needs = |record: &BackupRecord| {
            let start = WalFileName::parse(&record.start_wal_file)
                .ok()
                .and_then(|name| name.segment_number(segment_size))
                .unwrap_or(0);
            let stop = parse_lsn(&record.stop_lsn).map_or(u64::MAX, |lsn| lsn / u64::from(segment_size));
            Needs { timeline: record.timeline, stop_timeline: record.stop_timeline, start, stop }
        };
        WalRule {
            segment_size,
            onward: onward.into_iter().map(needs).collect(),
            ranges: ranges.into_iter().map(needs).collect(),
            ancestors,
        }
    }

    /// Whether `name` must stay.
    pub fn keeps(&self, name: &WalFileName) -> bool {
        if name.kind() == WalFileKind::History || self.onward.is_empty() {
            return true;
        }
        let Some(segment) = name.segment_number(self.segment_size) else { return true };
        let reaching = self.onward.iter().filter(|b| self.reaches(b.timeline, name.timeline())).map(|b| b.start).min();
        let oldest = self.onward.iter().map(|b| b.start).min().expect("not empty");
        if segment >= reaching.unwrap_or(oldest) {
            return true;
        }
        self.ranges.iter().any(|b| {
            (name.timeline() == b.timeline || name.timeline() == b.stop_timeline)
                && (b.start..=b.stop).contains(&segment)
        })
    }

    /// Whether a recovery from a backup on `from` can read WAL of timeline `timeline`: the same
    /// timeline, or one that descends from it; unknown ancestry counts as yes.
    fn reaches(&self, from: u32, timeline: u32) -> bool {
        if from == timeline {
            return true;
        }
        match self.ancestors.get(&timeline) {
            Some(ancestors) => ancestors.contains(&from),
            None => timeline != 1,
        }
    }

    /// The lowest segment number on `timeline` that a kept backup may need, for the report.
    pub fn first_kept(&self, timeline: u32) -> Option<u64> {
        let reaching = self.onward.iter().filter(|b| self.reaches(b.timeline, timeline)).map(|b| b.start).min();
        reaching.or_else(|| self.onward.iter().map(|b| b.start).min())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::test_record;

    const MIB16: u32 = 16 << 20;

    fn wal(name: &str) -> WalFileName {
        WalFileName::parse(name).unwrap()
    }

    fn on(timeline: u32, start_segment: u64) -> BackupRecord {
        let mut record = test_record(1, timeline, start_segment);
        record.stop_timeline = timeline;
        record
    }

    #[test]
    fn wal_before_the_oldest_kept_backup_goes_and_history_files_stay() {
        let kept = [on(1, 5), on(1, 9)];
        let rule = WalRule::new(MIB16, &kept, [], HashMap::new());
        assert!(!rule.keeps(&wal("000000010000000000000004")));
        assert!(!rule.keeps(&wal("000000010000000000000003.00000028.backup")));
        assert!(rule.keeps(&wal("000000010000000000000005")), "the oldest kept backup's start segment");
        assert!(rule.keeps(&wal("000000010000000000000005.00000028.backup")));
        assert!(rule.keeps(&wal("000000010000000100000000")), "beyond the log boundary");
        assert!(rule.keeps(&wal("00000001.history")) && rule.keeps(&wal("00000005.history")));
    }

    #[test]
    fn without_a_kept_backup_nothing_goes() {
        let rule = WalRule::new(MIB16, [], [], HashMap::new());
        assert!(rule.keeps(&wal("000000010000000000000001")));
    }

    #[test]
    fn a_timeline_is_kept_from_the_oldest_backup_that_can_reach_it() {
        // Backup on timeline 1 at segment 5, one on timeline 2 (branched from 1) at segment 9.
        let kept = [on(1, 5), on(2, 9)];
        let ancestors = HashMap::from([(2, vec![1]), (3, vec![1])]);
        let rule = WalRule::new(MIB16, &kept, [], ancestors);
        assert!(rule.keeps(&wal("000000020000000000000006")), "timeline 2 descends from the backup at 5");
        assert!(!rule.keeps(&wal("000000020000000000000004")));
        // Timeline 2's backup cannot reach timeline 1, but the older one can.
        assert!(rule.keeps(&wal("000000010000000000000007")));
        assert!(!rule.keeps(&wal("000000010000000000000004.partial")));
    }

    #[test]
    fn ancestors_of_a_kept_backup_are_not_kept_for_it() {
        // Only a backup on timeline 2 at segment 9 stays: timeline 1's WAL before 9 goes.
        let rule = WalRule::new(MIB16, &[on(2, 9)], [], HashMap::from([(2, vec![1])]));
        assert!(!rule.keeps(&wal("000000010000000000000008.partial")));
        assert!(!rule.keeps(&wal("000000020000000000000008")));
        assert!(rule.keeps(&wal("000000020000000000000009")));
    }

    #[test]
    fn unreachable_and_unknown_timelines_are_kept_from_the_oldest_kept_start() {
        // Kept: a backup on timeline 2 at segment 9. Timeline 3 branched from 1 (a restored copy
        // nobody has backed up yet); timeline 4 has no history file.
        let rule = WalRule::new(MIB16, &[on(2, 9)], [], HashMap::from([(2, vec![1]), (3, vec![1])]));
        assert!(rule.keeps(&wal("000000030000000000000009")), "a live copy's new WAL is never swept");
        assert!(!rule.keeps(&wal("000000030000000000000008")));
        assert!(rule.keeps(&wal("000000040000000000000009")));
        assert!(!rule.keeps(&wal("000000040000000000000008")));
    }

    #[test]
    fn a_pin_keeps_its_own_range_and_nothing_after_it() {
        let mut pinned = on(1, 3);
        pinned.stop_lsn = "0/4000100".into();
        let rule = WalRule::new(MIB16, &[on(1, 9)], [&pinned], HashMap::new());
        assert!(!rule.keeps(&wal("000000010000000000000002")));
        assert!(rule.keeps(&wal("000000010000000000000003")) && rule.keeps(&wal("000000010000000000000004")));
        assert!(!rule.keeps(&wal("000000010000000000000005")));
        assert!(!rule.keeps(&wal("000000020000000000000003")), "another timeline's segment of the same number");
    }

    #[test]
    fn a_backup_whose_start_cannot_be_read_keeps_everything() {
        let mut odd = on(1, 9);
        odd.start_wal_file = "garbage".into();
        let rule = WalRule::new(MIB16, &[odd], [], HashMap::new());
        assert!(rule.keeps(&wal("000000010000000000000001")));
    }
}
