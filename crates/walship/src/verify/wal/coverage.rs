//! The continuity logic of wal-verify, pure so that every rule is tested without a repository: which
//! segments each backup needs (its own start-to-stop range, then everything after it along its
//! timeline and every timeline that descends from it), which of them the archive lacks, and whether
//! the history files agree with each other and with the segments present.
//!
//! Present segments are kept as ranges per timeline ([`SegmentSet`]): memory grows with the gaps
//! and the timelines, never with the number of segments. Which timeline holds a segment on a
//! recovery's path follows PostgreSQL (`XLogFileReadAnyTLI`): a timeline N whose history file says
//! it left its parent P at LSN X owns the segments from `XLByteToSeg(X)` on (its first segment
//! starts with a copy of P's pages), and P the ones before.

use std::collections::{BTreeMap, BTreeSet};

use super::{Finding, FindingKind};
use crate::wal::{format_lsn, segment_file_name};

/// The segment numbers present, per timeline, as ranges `first..=last`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentSet {
    timelines: BTreeMap<u32, BTreeMap<u64, u64>>,
}

impl SegmentSet {
    /// Records segment `segment` of `timeline` as present.
    pub fn insert(&mut self, timeline: u32, segment: u64) {
        let ranges = self.timelines.entry(timeline).or_default();
        let before = ranges.range(..=segment).next_back().map(|(&first, &last)| (first, last));
        let after = segment.checked_add(1).and_then(|next| ranges.get(&next).map(|&last| (next, last)));
        match (before, after) {
            (Some((_, last)), _) if last >= segment => {}
            (Some((first, last)), Some((next, next_last))) if last + 1 == segment => {
                ranges.remove(&next);
                ranges.insert(first, next_last);
            }
            (Some((first, last)), None) if last + 1 == segment => {
                ranges.insert(first, segment);
            }
            (_, Some((next, next_last))) => {
                ranges.remove(&next);
                ranges.insert(segment, next_last);
            }
            _ => {
                ranges.insert(segment, segment);
            }
        }
    }

    /// Whether segment `segment` of `timeline` is present.
    pub fn contains(&self, timeline: u32, segment: u64) -> bool {
        self.timelines
            .get(&timeline)
            .and_then(|ranges| ranges.range(..=segment).next_back())
            .is_some_and(|(_, &last)| last >= segment)
    }

    /// The ranges of `first..=last` on `timeline` that are absent, in order.
    pub fn missing(&self, timeline: u32, first: u64, last: u64) -> Vec<(u64, u64)> {
        let mut holes = Vec::new();
        if first > last {
            return holes;
        }
        let mut cursor = first;
        let empty = BTreeMap::new();
        let ranges = self.timelines.get(&timeline).unwrap_or(&empty);
        let later = (first < last).then(|| ranges.range(first + 1..=last)).into_iter().flatten();
        let overlapping = ranges.range(..=first).next_back().into_iter().chain(later);
        for (&start, &end) in overlapping {
            if end < cursor {
                continue;
            }
            if start > cursor {
                holes.push((cursor, start - 1));
            }
            match end.checked_add(1) {
                Some(next) if next <= last => cursor = next,
                _ => return holes,
            }
        }
        holes.push((cursor, last));
        holes
    }

    /// The highest segment present on `timeline` within `first..=last`.
    pub fn newest_within(&self, timeline: u32, first: u64, last: u64) -> Option<u64> {
        if first > last {
            return None;
        }
        let (&start, &end) = self.timelines.get(&timeline)?.range(..=last).next_back()?;
        (end >= first).then(|| end.min(last).max(start))
    }

    /// The timelines with a segment, in order.
    pub fn timelines(&self) -> impl Iterator<Item = u32> + '_ {
        self.timelines.keys().copied()
    }

    /// How many segments `timeline` has, and its lowest and highest.
    pub fn extent(&self, timeline: u32) -> Option<(u64, u64, u64)> {
        let ranges = self.timelines.get(&timeline)?;
        let count = ranges.iter().map(|(first, last)| last - first + 1).sum();
        Some((count, *ranges.keys().next()?, *ranges.values().next_back()?))
    }
}

/// What wal-verify needs of one backup's catalog record, as segment numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpan {
    /// The backup's name.
    pub name: String,
    /// The timeline it started on.
    pub timeline: u32,
    /// The timeline it ended on.
    pub stop_timeline: u32,
    /// Its start segment.
    pub start: u64,
    /// The segment of its stop LSN.
    pub stop: u64,
    /// Its stop LSN: a timeline that left `stop_timeline` before it is an abandoned branch for it.
    pub stop_lsn: u64,
}

/// The history files present: each timeline's entries `(parent, LSN where the parent ended)`.
pub type Histories = BTreeMap<u32, Vec<(u32, u64)>>;

/// One stretch of a recovery's path: `timeline` supplies segments `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    timeline: u32,
    first: u64,
    last: u64,
}

/// The pieces a recovery following `timeline` reads, oldest first; a timeline without a history
/// file is followed on its own.
fn path_of(timeline: u32, histories: &Histories, segment_size: u32) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut first = 0;
    for &(parent, lsn) in histories.get(&timeline).map_or(&[][..], Vec::as_slice) {
        let takes_over = lsn / u64::from(segment_size);
        if takes_over > first {
            pieces.push(Piece { timeline: parent, first, last: takes_over - 1 });
        }
        first = first.max(takes_over);
    }
    pieces.push(Piece { timeline, first, last: u64::MAX });
    pieces
}

/// The timelines a recovery from `backup` may follow: its stop timeline, and each one whose history
/// left that timeline at or after the backup's stop (one that left before is an abandoned branch).
fn reachable(backup: &BackupSpan, known: &BTreeSet<u32>, histories: &Histories) -> Vec<u32> {
    known
        .iter()
        .copied()
        .filter(|&timeline| {
            timeline == backup.stop_timeline
                || histories.get(&timeline).is_some_and(|forks| {
                    forks.iter().any(|&(parent, left_at)| parent == backup.stop_timeline && backup.stop_lsn <= left_at)
                })
        })
        .collect()
}

/// Segments missing on one timeline, and the backups whose recovery they cut off.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Missing {
    /// Per timeline, ranges `first..=last` and the backups they concern.
    ranges: BTreeMap<u32, BTreeMap<(u64, u64), BTreeSet<String>>>,
}

impl Missing {
    fn add(&mut self, timeline: u32, range: (u64, u64), backup: &str) {
        let ranges = self.ranges.entry(timeline).or_default();
        ranges.entry(range).or_default().insert(backup.to_owned());
    }

    /// The ranges merged where they overlap or touch, each with every backup it concerns.
    pub fn merged(&self) -> Vec<(u32, u64, u64, BTreeSet<String>)> {
        let mut out: Vec<(u32, u64, u64, BTreeSet<String>)> = Vec::new();
        for (&timeline, ranges) in &self.ranges {
            for (&(first, last), backups) in ranges {
                match out.last_mut() {
                    Some(prev) if prev.0 == timeline && first <= prev.2.saturating_add(1) => {
                        prev.2 = prev.2.max(last);
                        prev.3.extend(backups.iter().cloned());
                    }
                    _ => out.push((timeline, first, last, backups.clone())),
                }
            }
        }
        out
    }
}

/// What the continuity check found: per backup the segments missing between its start and stop,
/// and the segments missing after it on the paths a recovery from it may follow.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Continuity {
    /// Missing between a backup's start and stop.
    pub incomplete: Missing,
    /// Missing after a backup's stop, up to the newest segment on each path.
    pub gaps: Missing,
}

impl Continuity {
    /// How many distinct ranges are missing where some backup needs them (incomplete or gap, merged),
    /// and how many segments they hold: the figures the metrics carry.
    pub fn union(&self) -> (u64, u64) {
        let mut all = self.gaps.clone();
        for (&timeline, ranges) in &self.incomplete.ranges {
            for (&range, backups) in ranges {
                for backup in backups {
                    all.add(timeline, range, backup);
                }
            }
        }
        let merged = all.merged();
        (merged.len() as u64, merged.iter().map(|(_, first, last, _)| last - first + 1).sum())
    }
}

/// Checks every backup against the segments present. `known` is every timeline the repository
/// mentions (segments, history files, backups).
pub fn continuity(
    backups: &[BackupSpan],
    present: &SegmentSet,
    histories: &Histories,
    known: &BTreeSet<u32>,
    segment_size: u32,
) -> Continuity {
    let mut found = Continuity::default();
    for backup in backups {
        for piece in path_of(backup.stop_timeline, histories, segment_size) {
            let (first, last) = (piece.first.max(backup.start), piece.last.min(backup.stop));
            for range in present.missing(piece.timeline, first, last) {
                found.incomplete.add(piece.timeline, range, &backup.name);
            }
        }
        let after = backup.stop.saturating_add(1);
        for timeline in reachable(backup, known, histories) {
            let pieces = path_of(timeline, histories, segment_size);
            let newest =
                pieces.iter().filter_map(|p| present.newest_within(p.timeline, p.first.max(after), p.last)).max();
            let Some(newest) = newest else { continue };
            for piece in pieces {
                for range in present.missing(piece.timeline, piece.first.max(after), piece.last.min(newest)) {
                    found.gaps.add(piece.timeline, range, &backup.name);
                }
            }
        }
    }
    found
}

/// `FIRST..LAST` as segment names, and how many segments that is.
pub fn range_name(timeline: u32, first: u64, last: u64, segment_size: u32) -> (String, u64) {
    let name = |segment| segment_file_name(timeline, segment, segment_size).unwrap_or_else(|| format!("#{segment}"));
    (format!("{}..{}", name(first), name(last)), last - first + 1)
}

/// The findings of [`continuity`]: one `incomplete_backup_wal` per backup and range, one `gap` per
/// merged range naming every backup it cuts off.
pub fn continuity_findings(found: &Continuity, segment_size: u32) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (timeline, first, last, backups) in found.incomplete.merged() {
        let (range, count) = range_name(timeline, first, last, segment_size);
        for backup in backups {
            let message = format!(
                "backup {backup} can never become consistent: {count} WAL segment(s) {range} on timeline \
                 {timeline}, between its start and its stop, are missing from the archive"
            );
            findings.push(Finding::new(FindingKind::IncompleteBackupWal, backup, message));
        }
    }
    for (timeline, first, last, backups) in found.gaps.merged() {
        let (range, count) = range_name(timeline, first, last, segment_size);
        let names: Vec<&str> = backups.iter().map(String::as_str).collect();
        let message = format!(
            "{count} WAL segment(s) {range} on timeline {timeline} are missing: a recovery from backup(s) {} \
             stops before them and cannot reach the WAL archived after",
            names.join(", ")
        );
        findings.push(Finding::new(FindingKind::Gap, range, message));
    }
    findings
}

/// What the history check looks at besides the history files.
#[derive(Debug, Default, Clone)]
pub struct TimelineFacts {
    /// Timelines with segments (or `.partial` segments), and each one's lowest segment.
    pub lowest_segment: BTreeMap<u32, u64>,
    /// Timelines a backup started or ended on.
    pub backup_timelines: BTreeSet<u32>,
    /// Timelines whose history file exists but could not be read (reported already).
    pub unreadable: BTreeSet<u32>,
}

/// The name of timeline `timeline`'s history file.
pub fn history_name(timeline: u32) -> String {
    format!("{timeline:08X}.history")
}

/// Every timeline after the first that has WAL, a backup or descendants needs its history file;
/// each history file must name a lower parent, list its parent's history plus one line, and switch
/// no later than the timeline's first segment.
pub fn history_findings(histories: &Histories, facts: &TimelineFacts, segment_size: u32) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut needed: BTreeMap<u32, &str> = BTreeMap::new();
    for &timeline in facts.lowest_segment.keys() {
        needed.entry(timeline).or_insert("has archived WAL");
    }
    for &timeline in &facts.backup_timelines {
        needed.entry(timeline).or_insert("has a base backup");
    }
    for forks in histories.values() {
        for &(parent, _) in forks {
            needed.entry(parent).or_insert("is the parent of a later timeline");
        }
    }
    for (timeline, why) in needed {
        if timeline > 1 && !histories.contains_key(&timeline) && !facts.unreadable.contains(&timeline) {
            let name = history_name(timeline);
            let message = format!(
                "timeline {timeline} {why} but its history file wal/history/{name} is missing: a recovery \
                 cannot follow it"
            );
            findings.push(Finding::new(FindingKind::MissingHistory, name, message));
        }
    }
    for (&timeline, forks) in histories {
        if let Some(problem) = history_problem(timeline, forks, histories, facts, segment_size) {
            let name = history_name(timeline);
            let message = format!("history file wal/history/{name} {problem}");
            findings.push(Finding::new(FindingKind::HistoryMismatch, name, message));
        }
    }
    findings
}

/// What is wrong with timeline `timeline`'s history `forks`, if anything.
fn history_problem(
    timeline: u32,
    forks: &[(u32, u64)],
    histories: &Histories,
    facts: &TimelineFacts,
    segment_size: u32,
) -> Option<String> {
    let Some((&(parent, switch), earlier)) = forks.split_last() else {
        return Some("names no parent timeline".into());
    };
    if parent >= timeline {
        return Some(format!("names timeline {parent} as the parent of timeline {timeline}, which is not lower"));
    }
    let takes_over = switch / u64::from(segment_size);
    if let Some(&lowest) = facts.lowest_segment.get(&timeline).filter(|&&lowest| lowest < takes_over) {
        let segment = segment_file_name(timeline, lowest, segment_size).unwrap_or_default();
        return Some(format!(
            "says timeline {timeline} began at {} (segment {takes_over:X}), but segment {segment} of timeline \
             {timeline} is archived before it",
            format_lsn(switch)
        ));
    }
    let parents: &[(u32, u64)] = match histories.get(&parent) {
        Some(theirs) => theirs,
        None if parent == 1 => &[],
        // The missing parent history is reported on its own.
        None => return None,
    };
    if earlier != parents {
        return Some(format!(
            "does not continue the history of its parent timeline {parent}: it lists {} line(s) before its \
             own, the parent's history has {}{}",
            earlier.len(),
            parents.len(),
            if earlier.len() == parents.len() { " that differ" } else { "" }
        ));
    }
    match parents.last() {
        Some(&(_, parent_began)) if switch < parent_began => Some(format!(
            "says timeline {timeline} left timeline {parent} at {}, before timeline {parent} itself began at {}",
            format_lsn(switch),
            format_lsn(parent_began)
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB16: u32 = 16 << 20;

    fn set(segments: &[(u32, u64)]) -> SegmentSet {
        let mut set = SegmentSet::default();
        for &(timeline, segment) in segments {
            set.insert(timeline, segment);
        }
        set
    }

    fn backup(name: &str, timeline: u32, start: u64, stop: u64) -> BackupSpan {
        let stop_lsn = stop * u64::from(MIB16) + 0x100;
        BackupSpan { name: name.into(), timeline, stop_timeline: timeline, start, stop, stop_lsn }
    }

    fn known(timelines: &[u32]) -> BTreeSet<u32> {
        timelines.iter().copied().collect()
    }

    #[test]
    fn ranges_merge_in_any_order_and_holes_are_exact() {
        let present = set(&[(1, 5), (1, 3), (1, 4), (1, 9), (1, 7), (1, 8), (1, 2), (1, 20), (2, 4)]);
        assert_eq!(present.timelines.get(&1).unwrap(), &BTreeMap::from([(2, 5), (7, 9), (20, 20)]));
        assert_eq!(present.missing(1, 1, 25), [(1, 1), (6, 6), (10, 19), (21, 25)]);
        assert_eq!(present.missing(1, 3, 9), [(6, 6)]);
        assert_eq!(present.missing(1, 7, 9), []);
        assert_eq!(present.missing(3, 1, 2), [(1, 2)], "a timeline without segments");
        assert!(present.contains(1, 8) && !present.contains(1, 6) && !present.contains(2, 5));
        assert_eq!(present.newest_within(1, 0, 15), Some(9));
        assert_eq!(present.newest_within(1, 10, 19), None);
        assert_eq!(present.newest_within(1, 3, 4), Some(4));
        assert_eq!(present.extent(1), Some((8, 2, 20)));
        let mut top = SegmentSet::default();
        top.insert(1, u64::MAX);
        top.insert(1, u64::MAX - 1);
        assert_eq!(top.missing(1, u64::MAX - 2, u64::MAX), [(u64::MAX - 2, u64::MAX - 2)]);
    }

    #[test]
    fn a_healthy_archive_has_no_gap() {
        let present = set(&(3..=12).map(|s| (1, s)).collect::<Vec<_>>());
        let found =
            continuity(&[backup("A", 1, 3, 4), backup("B", 1, 8, 8)], &present, &Histories::new(), &known(&[1]), MIB16);
        assert_eq!(found, Continuity::default());
    }

    #[test]
    fn a_hole_after_a_backup_is_a_gap_for_every_backup_before_it_and_named_once() {
        let present = set(&[3, 4, 5, 8, 9, 10, 11].map(|s| (1, s)));
        let backups = [backup("A", 1, 3, 3), backup("B", 1, 4, 4), backup("C", 1, 9, 10)];
        let found = continuity(&backups, &present, &Histories::new(), &known(&[1]), MIB16);
        assert_eq!(found.incomplete, Missing::default());
        let gaps = found.gaps.merged();
        assert_eq!(gaps, [(1, 6, 7, BTreeSet::from(["A".to_owned(), "B".to_owned()]))]);
        let findings = continuity_findings(&found, MIB16);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].subject, "000000010000000000000006..000000010000000000000007");
        assert!(findings[0].message.contains("backup(s) A, B"), "{}", findings[0].message);
    }

    #[test]
    fn a_hole_inside_a_backup_is_incomplete_and_a_gap_for_older_ones() {
        let present = set(&[3, 4, 6, 7].map(|s| (1, s)));
        let found =
            continuity(&[backup("A", 1, 3, 3), backup("B", 1, 4, 6)], &present, &Histories::new(), &known(&[1]), MIB16);
        assert_eq!(found.incomplete.merged(), [(1, 5, 5, BTreeSet::from(["B".to_owned()]))]);
        assert_eq!(found.gaps.merged(), [(1, 5, 5, BTreeSet::from(["A".to_owned()]))]);
        let kinds: Vec<FindingKind> = continuity_findings(&found, MIB16).iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [FindingKind::IncompleteBackupWal, FindingKind::Gap]);
        assert_eq!(found.union(), (1, 1), "one hole, counted once");
    }

    #[test]
    fn the_missing_start_segment_makes_a_backup_incomplete() {
        let present = set(&[(1, 4), (1, 5)]);
        let found = continuity(&[backup("A", 1, 3, 4)], &present, &Histories::new(), &known(&[1]), MIB16);
        assert_eq!(found.incomplete.merged(), [(1, 3, 3, BTreeSet::from(["A".to_owned()]))]);
    }

    /// Timeline 2 left timeline 1 inside segment 10: its segments from 10 on, timeline 1's before.
    fn switched() -> Histories {
        Histories::from([(2, vec![(1, 10 * u64::from(MIB16) + 0x28)])])
    }

    #[test]
    fn a_recovery_follows_descendant_timelines_from_their_switch_segment() {
        // Timeline 1 up to 9 (10 is its .partial), timeline 2 from 10 on, 13 missing.
        let mut segments: Vec<(u32, u64)> = (3..=9).map(|s| (1, s)).collect();
        segments.extend([10, 11, 12, 14].map(|s| (2, s)));
        let present = set(&segments);
        let found = continuity(&[backup("A", 1, 3, 3)], &present, &switched(), &known(&[1, 2]), MIB16);
        assert_eq!(found.incomplete, Missing::default());
        assert_eq!(found.gaps.merged(), [(2, 13, 13, BTreeSet::from(["A".to_owned()]))]);
        // Timeline 1's segments before the switch are needed on timeline 2's path.
        let present = set(&[(1, 3), (1, 4), (1, 6), (1, 7), (1, 8), (1, 9), (2, 10)]);
        let found = continuity(&[backup("A", 1, 3, 3)], &present, &switched(), &known(&[1, 2]), MIB16);
        assert_eq!(found.gaps.merged(), [(1, 5, 5, BTreeSet::from(["A".to_owned()]))]);
    }

    #[test]
    fn a_branch_that_left_before_the_backup_ended_is_not_its_path() {
        // B ended in segment 11 on timeline 1, after timeline 2 left it at 10: timeline 2's gap is not B's.
        let mut segments: Vec<(u32, u64)> = (3..=12).map(|s| (1, s)).collect();
        segments.extend([10, 12].map(|s| (2, s)));
        let present = set(&segments);
        let found = continuity(&[backup("B", 1, 11, 11)], &present, &switched(), &known(&[1, 2]), MIB16);
        assert_eq!(found, Continuity::default());
        let found = continuity(&[backup("A", 1, 3, 3)], &present, &switched(), &known(&[1, 2]), MIB16);
        assert_eq!(found.gaps.merged(), [(2, 11, 11, BTreeSet::from(["A".to_owned()]))]);
    }

    #[test]
    fn a_standby_backup_across_a_promotion_reads_both_timelines() {
        let present = set(&[(1, 8), (1, 9), (2, 10), (2, 11)]);
        let span = BackupSpan { stop_timeline: 2, stop: 11, stop_lsn: 11 * u64::from(MIB16), ..backup("S", 1, 8, 8) };
        let found = continuity(std::slice::from_ref(&span), &present, &switched(), &known(&[1, 2]), MIB16);
        assert_eq!(found, Continuity::default());
        let present = set(&[(1, 8), (2, 10), (2, 11)]);
        let found = continuity(&[span], &present, &switched(), &known(&[1, 2]), MIB16);
        assert_eq!(found.incomplete.merged(), [(1, 9, 9, BTreeSet::from(["S".to_owned()]))]);
    }

    fn facts(lowest: &[(u32, u64)], backups: &[u32]) -> TimelineFacts {
        TimelineFacts {
            lowest_segment: lowest.iter().copied().collect(),
            backup_timelines: backups.iter().copied().collect(),
            unreadable: BTreeSet::new(),
        }
    }

    fn kinds_and_subjects(findings: &[Finding]) -> Vec<(FindingKind, String)> {
        findings.iter().map(|f| (f.kind, f.subject.clone())).collect()
    }

    #[test]
    fn timelines_with_wal_a_backup_or_children_need_a_history_file() {
        let histories = Histories::from([(4, vec![(1, 0x500_0000), (3, 0x600_0000)])]);
        let found = history_findings(&histories, &facts(&[(1, 1), (2, 3)], &[5]), MIB16);
        let missing = [
            (FindingKind::MissingHistory, "00000002.history"),
            (FindingKind::MissingHistory, "00000003.history"),
            (FindingKind::MissingHistory, "00000005.history"),
        ];
        assert_eq!(kinds_and_subjects(&found), missing.map(|(k, s)| (k, s.to_owned())));
        assert!(found[1].message.contains("parent of a later timeline"), "{}", found[1].message);
        assert!(history_findings(&Histories::new(), &facts(&[(1, 1)], &[1]), MIB16).is_empty(), "timeline 1 has none");
    }

    #[test]
    fn history_files_must_agree_with_the_segments_and_their_parents() {
        let good = Histories::from([(2, vec![(1, 0xA00_0028)]), (3, vec![(1, 0xA00_0028), (2, 0xC00_0000)])]);
        assert!(history_findings(&good, &facts(&[(1, 3), (2, 10), (3, 12)], &[]), MIB16).is_empty());
        let early = history_findings(&good, &facts(&[(2, 9)], &[]), MIB16);
        assert_eq!(kinds_and_subjects(&early), [(FindingKind::HistoryMismatch, "00000002.history".to_owned())]);
        assert!(early[0].message.contains("000000020000000000000009"), "{}", early[0].message);
        let other_parent = Histories::from([(2, vec![(1, 0xA00_0028)]), (3, vec![(1, 0x900_0000), (2, 0xC00_0000)])]);
        let found = history_findings(&other_parent, &facts(&[], &[]), MIB16);
        assert_eq!(kinds_and_subjects(&found), [(FindingKind::HistoryMismatch, "00000003.history".to_owned())]);
        let before_parent = Histories::from([(2, vec![(1, 0xA00_0028)]), (3, vec![(1, 0xA00_0028), (2, 0x900_0000)])]);
        assert!(history_findings(&before_parent, &facts(&[], &[]), MIB16)[0].message.contains("before timeline 2"));
        let empty = Histories::from([(2, vec![])]);
        assert!(history_findings(&empty, &facts(&[], &[]), MIB16)[0].message.contains("no parent"));
    }
}
