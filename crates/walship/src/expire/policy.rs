//! Which backups a retention policy keeps: pure decisions over the catalog, so that every rule of
//! "never delete" can be tested without a repository.
//!
//! Order is by `finished_at` (when a backup became usable), never by timeline or name: WAL-G once
//! sorted by timeline and deleted the newest backups after an upgrade (wal-g#636).

use std::time::Duration;

use crate::base::{BackupRecord, Lineage};

/// What the operator asked to keep. At least one of the two is set (the command refuses otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// Keep the N newest complete backups (N >= 1).
    pub keep: Option<u32>,
    /// Keep whatever a point-in-time recovery to any moment of this window (back from now) needs.
    pub keep_within: Option<Duration>,
}

/// Why a backup stays. A backup may have several reasons; it is deleted only when it has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The newest complete backup: never deleted, whatever the policy.
    Newest,
    /// Among the `--keep N` newest.
    Count,
    /// Finished inside the `--keep-within` window, or the newest one before it (recovery to the
    /// window's first moment starts there).
    Window,
    /// The newest backup the latest timeline can be restored from: after a point-in-time restore
    /// the newest backups may lie on the abandoned branch, and this one is then the only way back
    /// to the live timeline.
    LatestTimeline,
    /// Pinned: kept forever (with only the WAL that makes it consistent, unless kept otherwise).
    Pinned,
    /// Its `finished_at` does not parse, so it cannot be ordered; never deleted on a guess.
    Unordered,
}

impl Keep {
    /// A few words for the log and the JSON report.
    pub fn describe(self) -> &'static str {
        match self {
            Keep::Newest => "newest",
            Keep::Count => "keep",
            Keep::Window => "keep-within",
            Keep::LatestTimeline => "latest-timeline",
            Keep::Pinned => "pinned",
            Keep::Unordered => "unreadable finished_at",
        }
    }

    /// Whether this reason keeps the WAL after the backup too (a pin keeps only its own range).
    pub fn keeps_later_wal(self) -> bool {
        !matches!(self, Keep::Pinned)
    }
}

/// One complete backup, as the decision sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its catalog record, without the parts list (kept small for a large catalog).
    pub record: BackupRecord,
    /// It is pinned (`catalog/<NAME>.pin`).
    pub pinned: bool,
}

/// A backup and why it stays (empty: it is expired).
#[derive(Debug, Clone)]
pub struct Decision {
    /// The backup.
    pub candidate: Candidate,
    /// Why it stays; empty when the policy expires it.
    pub kept: Vec<Keep>,
}

impl Decision {
    /// Whether the backup stays.
    pub fn is_kept(&self) -> bool {
        !self.kept.is_empty()
    }

    /// Whether it stays for a reason that also keeps the WAL after it.
    pub fn keeps_later_wal(&self) -> bool {
        self.kept.iter().any(|k| k.keeps_later_wal())
    }
}

/// Decides every backup's fate. `now` is Unix nanoseconds; `lineage` follows the newest timeline
/// (`None` when the repository's history cannot tell, and then that rule keeps nothing extra).
pub fn decide(mut backups: Vec<Candidate>, policy: &Policy, now: i128, lineage: Option<Lineage>) -> Vec<Decision> {
    let finished = |c: &Candidate| c.record.finished_at_unix();
    backups.sort_by(|a, b| finished(a).cmp(&finished(b)).then_with(|| a.record.name.cmp(&b.record.name)));
    let mut decisions: Vec<Decision> =
        backups.into_iter().map(|candidate| Decision { candidate, kept: Vec::new() }).collect();
    let ordered: Vec<usize> = (0..decisions.len()).filter(|&i| finished(&decisions[i].candidate).is_some()).collect();
    for decision in &mut decisions {
        if finished(&decision.candidate).is_none() {
            decision.kept.push(Keep::Unordered);
        }
        if decision.candidate.pinned {
            decision.kept.push(Keep::Pinned);
        }
    }
    if let Some(&newest) = ordered.last() {
        decisions[newest].kept.push(Keep::Newest);
    }
    if let Some(n) = policy.keep {
        for &i in ordered.iter().rev().take(n as usize) {
            decisions[i].kept.push(Keep::Count);
        }
    }
    if let Some(window) = policy.keep_within {
        let boundary = now - window.as_nanos() as i128;
        let inside = ordered.partition_point(|&i| finished(&decisions[i].candidate).is_some_and(|t| t <= boundary));
        // The newest backup at or before the boundary is where a recovery to the boundary starts.
        for &i in &ordered[inside.saturating_sub(1)..] {
            decisions[i].kept.push(Keep::Window);
        }
    }
    if let Some(i) = newest_on_lineage(&decisions, &ordered, lineage) {
        decisions[i].kept.push(Keep::LatestTimeline);
    }
    decisions
}

/// The newest backup a recovery along `lineage` can start from, as `base-fetch LATEST` picks it.
fn newest_on_lineage(decisions: &[Decision], ordered: &[usize], lineage: Option<Lineage>) -> Option<usize> {
    let mut lineage = lineage?;
    let mut pick = None;
    for &i in ordered {
        let record = &decisions[i].candidate.record;
        if lineage.follow(record) {
            pick = None;
        }
        if lineage.excludes(record).is_none() {
            pick = Some(i);
        }
    }
    pick
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::test_record;

    const HOUR: i128 = 3_600_000_000_000;

    /// Backups finished at the given hours after the epoch, on timeline 1.
    fn at_hours(hours: &[i64]) -> Vec<Candidate> {
        hours.iter().map(|&h| Candidate { record: test_record(h, 1, h as u64 + 2), pinned: false }).collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<(String, Vec<Keep>)> {
        decisions.iter().map(|d| (d.candidate.record.name.clone(), d.kept.clone())).collect()
    }

    fn names_kept(decisions: &[Decision]) -> Vec<usize> {
        (0..decisions.len()).filter(|&i| decisions[i].is_kept()).collect()
    }

    #[test]
    fn keep_n_keeps_the_n_newest_by_finish_time_whatever_the_input_order() {
        let backups = at_hours(&[4, 1, 3, 2]);
        let decisions = decide(backups, &Policy { keep: Some(2), keep_within: None }, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [2, 3], "{:?}", kept(&decisions));
        assert_eq!(decisions[3].kept, [Keep::Newest, Keep::Count]);
    }

    #[test]
    fn the_newest_backup_stays_even_when_the_window_is_empty() {
        let decisions = decide(
            at_hours(&[1, 2]),
            &Policy { keep: None, keep_within: Some(Duration::from_secs(60)) },
            100 * HOUR,
            None,
        );
        assert_eq!(names_kept(&decisions), [1]);
        assert_eq!(decisions[1].kept, [Keep::Newest, Keep::Window], "the newest before the boundary, too");
    }

    #[test]
    fn keep_within_keeps_the_window_and_the_newest_backup_before_it() {
        // now = 10 h, window 5 h: boundary at 5 h. Backups at 1, 3, 6, 8 h: 3 h is where a recovery
        // to 5 h starts; 1 h goes.
        let policy = Policy { keep: None, keep_within: Some(Duration::from_secs(5 * 3600)) };
        let decisions = decide(at_hours(&[1, 3, 6, 8]), &policy, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [1, 2, 3], "{:?}", kept(&decisions));
        // A backup exactly at the boundary is a recovery start for the boundary itself.
        let decisions = decide(at_hours(&[1, 3, 5, 8]), &policy, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [2, 3], "{:?}", kept(&decisions));
    }

    #[test]
    fn both_policies_keep_a_backup_either_keeps() {
        let policy = Policy { keep: Some(1), keep_within: Some(Duration::from_secs(5 * 3600)) };
        let decisions = decide(at_hours(&[1, 3, 6, 8]), &policy, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [1, 2, 3]);
        let policy = Policy { keep: Some(3), keep_within: Some(Duration::from_secs(3600)) };
        assert_eq!(names_kept(&decide(at_hours(&[1, 3, 6, 8]), &policy, 10 * HOUR, None)), [1, 2, 3]);
    }

    #[test]
    fn pinned_and_unordered_backups_are_never_expired() {
        let mut backups = at_hours(&[1, 2, 3]);
        backups[0].pinned = true;
        backups[1].record.finished_at = "yesterday".into();
        let decisions = decide(backups, &Policy { keep: Some(1), keep_within: None }, 10 * HOUR, None);
        let reasons: Vec<_> = decisions.iter().map(|d| d.kept.clone()).collect();
        assert!(reasons.contains(&vec![Keep::Pinned]) && reasons.contains(&vec![Keep::Unordered]), "{reasons:?}");
        let pinned = decisions.iter().find(|d| d.candidate.pinned).unwrap();
        assert!(!pinned.keeps_later_wal(), "a pin keeps only its own WAL");
    }

    #[test]
    fn the_backup_the_latest_timeline_descends_from_stays_when_newer_ones_are_on_an_abandoned_branch() {
        // Backups at 1 h (timeline 1, ends at segment 3), then 2 h and 3 h on timeline 2. Timeline 3
        // branched from timeline 1 at segment 4 (a point-in-time restore from the first backup), so
        // the newer backups cannot reach it.
        let mut backups = at_hours(&[1, 2, 3]);
        for c in &mut backups[1..] {
            c.record.timeline = 2;
            c.record.stop_timeline = 2;
        }
        let lineage = Lineage::for_test(3, vec![(1, 4 << 24)]);
        let decisions = decide(backups, &Policy { keep: Some(1), keep_within: None }, 10 * HOUR, Some(lineage));
        assert_eq!(decisions[0].kept, [Keep::LatestTimeline], "{:?}", kept(&decisions));
        assert!(!decisions[1].is_kept());
    }
}
